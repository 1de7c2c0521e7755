"""End to end: `jaxarch.train.train` learns, logs, checkpoints and resumes exactly."""

import hashlib
import json
import logging
import shutil
import time
import types

import jax
import numpy as np
import pytest

from conftest import mesh_config, tiny_config
from jaxarch import cli
from jaxarch import config as config_lib
from jaxarch import data
from jaxarch import load
from jaxarch.parallel import make_mesh
from jaxarch.train import evaluate, train
from jaxarch.train import trainer
from jaxarch.train.checkpoint import Checkpointer, CheckpointError
from jaxarch.train.metrics import MetricsWriter, read_metrics, standard_json
from jaxarch.train.state import make_setup


def _cfg(data_dir, **overrides):
  base = {'train.steps': 20, 'train.warmup_steps': 2, 'train.lr': 3e-3,
          'checkpoint.every_steps': 5, 'log.every_steps': 1, 'log.eval_every_steps': 10,
          'log.eval_batches': 2}
  return mesh_config(tiny_config(data_dir, **{**base, **overrides}), data=2, fsdp=2, tensor=2)


def _losses(workdir):
  """Logged train loss per step."""
  return {m['step']: m['loss'] for m in read_metrics(workdir)}


def test_metrics_checkpoints_and_config_are_written(tmp_path, data_dir):
  result = train(_cfg(data_dir, **{'log.tensorboard': True, 'log.every_steps': 4}), tmp_path)
  records = read_metrics(tmp_path)
  # Evaluations and checkpoints (every 5) end a logging window too.
  assert [r['step'] for r in records] == [4, 5, 8, 10, 12, 15, 16, 20]
  evals = [r for r in records if 'eval_bpb' in r]
  assert [r['step'] for r in evals] == [10, 20]
  assert result['step'] == 20 and np.isfinite(result['eval_bpb'])
  # Logged; near 0 here: 20 small batches of a corpus of megabytes (the Python stdlib, whose
  # files differ by version), lagging by the documents the packing holds (test_data checks
  # the values).
  epochs = [r['epoch'] for r in records]
  assert epochs == sorted(epochs) and 0 <= epochs[-1] < 0.01
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()
                if p.name.isdigit()) == [10, 15, 20]  # keep = 3
  assert config_lib.load_json(tmp_path / 'config.json').train.steps == 20
  events = list((tmp_path / 'tensorboard').glob('events.out.tfevents*'))
  assert len(events) == 1 and events[0].stat().st_size > 0

  # Submitted again: nothing to train, the same final metrics; a line cut short by a
  # crash is dropped.
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 21, "lo')
  again = train(_cfg(data_dir, **{'log.tensorboard': True, 'log.every_steps': 4}), tmp_path)
  assert (again['step'], again['loss'], again['eval_bpb']) == (
      20, result['loss'], result['eval_bpb'])
  assert read_metrics(tmp_path) == records
  assert (tmp_path / 'metrics.jsonl').read_text().endswith('}\n')


def test_a_start_that_fails_leaves_no_empty_run_behind(tmp_path, data_dir):
  """Was a workdir holding only a hidden lock file (and an empty checkpoints folder)."""
  missing = {'data.source': f'files:{tmp_path}/nothing/*.py'}
  with pytest.raises(ValueError, match='no files match the glob'):
    train(_cfg(data_dir, **missing), tmp_path / 'new')
  assert not (tmp_path / 'new').exists()
  (tmp_path / 'mine').mkdir()  # a directory the user made is theirs
  with pytest.raises(ValueError, match='no files match the glob'):
    train(_cfg(data_dir, **missing), tmp_path / 'mine')
  assert (tmp_path / 'mine').is_dir()


def test_a_workdir_whose_files_the_data_glob_would_take_is_refused(tmp_path, data_dir):
  """A workdir inside `files:DIR/**/*` (the glob a directory's error suggests): its config,
  metrics and checkpoints became documents, and the resume failed on metrics.jsonl's
  missing 'text' key. A glob that takes none of them leaves the workdir alone."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  (corpus / 'a.txt').write_text('some text ' * 50)
  for glob, refused in [('**/*', True), ('**', True), ('*/*.json', True), ('**/*.txt', False),
                        ('*', False), ('**/.cache/*', False)]:
    cfg = _cfg(data_dir, **{'data.source': f'files:{corpus}/{glob}', 'train.steps': 1})
    assert (data.files_taken_from(cfg.data, corpus / 'run', trainer._RUN_FILES) is not None
            ) == refused, glob
  with pytest.raises(config_lib.ConfigError, match=(
      f"data.source 'files:{corpus}/\\*\\*/\\*' takes the files this run writes in its "
      f'workdir \\(e.g. {corpus}/run/config.json\\): its metrics')):
    train(_cfg(data_dir, **{'data.source': f'files:{corpus}/**/*'}), corpus / 'run')
  assert not (corpus / 'run').exists()


def test_a_new_run_in_a_folder_of_other_files_is_warned_of(tmp_path, caplog):
  from jaxarch.train.workdir import check_workdir  # pylint: disable=g-import-not-at-top
  cfg = tiny_config()
  for name, said in [('launch', False), ('train.log', False),  # `jaxarch launch`'s, a sweep's
                     ('notes.txt', True)]:
    (tmp_path / name).touch()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      check_workdir(tmp_path, cfg, 0, has_checkpoints=False)
    assert (f'--workdir={tmp_path} holds 1 entry of no jaxarch run (e.g. notes.txt)' in
            caplog.text) == said, caplog.text
  (tmp_path / 'config.json').write_text('{}')  # a run's
  caplog.clear()
  check_workdir(tmp_path, cfg, 0, has_checkpoints=False)
  assert 'no jaxarch run' not in caplog.text


def test_non_finite_metrics_are_written_as_null(tmp_path):
  writer = MetricsWriter(tmp_path, tensorboard=False)
  writer.write(3, {'loss': float('nan'), 'grad_norm': np.float32(np.inf), 'lr': 0.5})
  line = (tmp_path / 'metrics.jsonl').read_text()
  refuse = lambda token: pytest.fail(f'{token} is not JSON')
  assert json.loads(line, parse_constant=refuse) == {
      'step': 3, 'loss': None, 'grad_norm': None, 'lr': 0.5}
  # A file of an older version, with NaN, resumed at step 1: rewritten as standard JSON.
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "loss": NaN}\n{"step": 2}\n')
  MetricsWriter(tmp_path, tensorboard=False, after_step=1)
  assert (tmp_path / 'metrics.jsonl').read_text() == '{"step": 1, "loss": null}\n'
  # What `jaxarch train`, `eval` and `bench` print or write: nested, with arrays.
  printed = standard_json({'loss': np.float32(np.nan), 'eval': {'bpb': float('inf')},
                           'norms': np.array([1.5, np.nan]), 'steps': [1, 2]}, indent=2)
  assert json.loads(printed, parse_constant=refuse) == {
      'loss': None, 'eval': {'bpb': None}, 'norms': [1.5, None], 'steps': [1, 2]}


@pytest.mark.slow
@pytest.mark.parametrize('scan', [False, True])  # the layers one per block, or stacked
def test_interrupted_run_resumes_on_the_same_loss_curve(tmp_path, data_dir, monkeypatch, scan):
  layout = {'model.scan_layers': scan}
  reference = tmp_path / 'reference'
  train(_cfg(data_dir, **layout), reference)

  interrupted = tmp_path / 'interrupted'
  real_make_step = trainer.make_train_step

  def crashing_make_step(setup, **kw):
    step_fn = real_make_step(setup, **kw)
    def step(state, batch):
      if int(state['step']) == 12:
        raise KeyboardInterrupt  # the machine goes away after step 12
      return step_fn(state, batch)
    return step

  monkeypatch.setattr(trainer, 'make_train_step', crashing_make_step)
  with pytest.raises(KeyboardInterrupt):
    train(_cfg(data_dir, **layout), interrupted)
  monkeypatch.setattr(trainer, 'make_train_step', real_make_step)
  assert max(_losses(interrupted)) == 12
  train(_cfg(data_dir, **layout), interrupted)  # resumes from the step-10 checkpoint

  want, got = _losses(reference), _losses(interrupted)
  assert sorted(got) == list(range(1, 21))
  # Bit for bit (async saves, the data iterator mid-epoch): the same losses and final state.
  assert [got[s] for s in range(11, 21)] == [want[s] for s in range(11, 21)]
  setup = make_setup(_cfg(data_dir, **layout), make_mesh(_cfg(data_dir, **layout)))
  (ours, _), (theirs, _) = (Checkpointer.read(w, setup.abstract_state)
                            for w in (interrupted, reference))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(ours), jax.device_get(theirs))


@pytest.mark.slow  # five short runs
def test_a_moved_or_copied_run_resumes_from_its_checkpoint_and_data_position(
    tmp_path, data_dir, capsys, caplog):
  """A run holding its tokenizer (as an imported one does), moved, or copied with the
  original deleted: `jaxarch train --workdir=NEW` goes on as the run never stopped (its
  checkpoint and data position, no layout change), and moved again after that resume
  (which saves config.json again), it still does."""
  from test_data import _gpt2_style_tokenizer  # pylint: disable=g-import-not-at-top

  def cfg(workdir, steps):
    (workdir / 'tokenizer').mkdir(parents=True, exist_ok=True)
    return _cfg(data_dir, **{
        'train.steps': steps, 'train.schedule': 'constant', 'checkpoint.every_steps': 2,
        'log.eval_batches': 1, 'data.tokenizer': _gpt2_style_tokenizer(
            workdir / 'tokenizer' / 'tokenizer.json')})

  def resume(workdir, steps):
    capsys.readouterr()
    caplog.clear()
    assert cli.main(['train', f'--workdir={workdir}', f'--config.train.steps={steps}']) == 0
    out = ''.join(capsys.readouterr())
    assert 'resumed from' in out and 'since the checkpoint' not in out, out
    assert 'another data layout' not in caplog.text
    got = _losses(workdir)
    np.testing.assert_allclose([got[s] for s in range(1, steps + 1)],
                               [want[s] for s in range(1, steps + 1)], rtol=1e-6)

  train(cfg(tmp_path / 'reference', 6), tmp_path / 'reference')  # never stopped
  want = _losses(tmp_path / 'reference')
  train(cfg(tmp_path / 'run', 2), tmp_path / 'run')
  shutil.copytree(tmp_path / 'run', tmp_path / 'copied')
  (tmp_path / 'run').rename(tmp_path / 'moved')  # gone for both
  resume(tmp_path / 'copied', 4)
  resume(tmp_path / 'moved', 4)
  (tmp_path / 'moved').rename(tmp_path / 'moved_again')
  resume(tmp_path / 'moved_again', 6)


def test_a_run_is_refused_another_tokenizer_or_its_file_changed_since(tmp_path, data_dir,
                                                                        capsys, caplog):
  """Evaluating a run with another tokenizer gave a loss and bits per byte over ids its
  embeddings never learned, and a tokenizer file edited in place fed a resume (or a
  generation) other ids without a word: the run keeps its tokenizer's sha256."""
  from test_data import _gpt2_style_tokenizer  # pylint: disable=g-import-not-at-top
  tokenizer = tmp_path / 'tok.json'
  cfg = _cfg(data_dir, **{'train.steps': 2, 'log.eval_batches': 1,
                          'data.tokenizer': _gpt2_style_tokenizer(tokenizer)})
  run = tmp_path / 'run'
  train(cfg, run)
  digest = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
  assert (run / 'tokenizer.sha256').read_text() == f'{digest}  {tokenizer}\n'
  capsys.readouterr()
  assert cli.main(['eval', f'--workdir={run}', '--config.data.tokenizer=bytes']) == 2
  err = capsys.readouterr().err
  assert (f"data.tokenizer='bytes' is not the tokenizer that the run in {run} trained with "
          f"('{tokenizer}', tokenizer.sha256)") in err and err.count('\n') == 1
  original = tokenizer.read_bytes()
  tokenizer.write_text(tokenizer.read_text().replace('<|endoftext|>', '<|end|>'))
  for command in (['eval', f'--workdir={run}'],
                  ['train', f'--workdir={run}', '--config.train.steps=4'],
                  ['generate', f'--workdir={run}', '--prompt=a', '--max_new_tokens=1']):
    assert cli.main(command) == 2, command
    err = capsys.readouterr().err
    assert f"the tokenizer file data.tokenizer='{tokenizer}' has changed since the run" in err
  tokenizer.write_bytes(original)  # put back: the run is itself again
  assert evaluate(cfg, run)['step'] == 2
  assert cli.main(['eval', f'--workdir={run}', '--config.log.eval_batches=2']) == 0
  (other,) = run.glob('eval_2_*.json')  # over other data than the run's own: its own file
  assert f'jaxarch: wrote {other}\n' in capsys.readouterr().err
  copy = tmp_path / 'copy.json'  # the same file elsewhere: the same tokens, position kept
  shutil.copy(tokenizer, copy)
  with cfg.unlocked():
    cfg.data.tokenizer = str(copy)
  assert trainer.data_changes(run, cfg) is None
  with cfg.unlocked():
    cfg.train.batch_size *= 2
  assert trainer.data_changes(run, cfg) == 'train.batch_size 8 -> 16'
  capsys.readouterr()
  assert cli.main(['train', f'--workdir={run}', '--config.train.steps=4',
                   f'--config.data.tokenizer={copy}']) == 0  # resumed, its data position too
  out = ''.join(capsys.readouterr())
  assert 'resumed from' in out and 'since the checkpoint' not in out, out
  assert 'another data layout' not in caplog.text


def test_resuming_with_more_steps_says_where_the_learning_rate_moves(tmp_path, data_dir):
  cfg = _cfg(data_dir, **{'train.steps': 4, 'log.eval_every_steps': 4})
  train(cfg, tmp_path)
  assert trainer._schedule_moved(tmp_path, cfg, 4) is None  # resumed as it was
  longer = _cfg(data_dir, **{'train.steps': 8, 'log.eval_every_steps': 4})
  moved = trainer._schedule_moved(tmp_path, longer, 4)
  before = float(trainer.learning_rate_schedule(cfg.train)(4))
  after = float(trainer.learning_rate_schedule(longer.train)(4))
  assert after > 2 * before  # the cosine climbs back up
  assert moved.startswith('train.steps 4 -> 8 since the checkpoint: step 5 trains at a '
                          f'learning rate of {after:.3g} where the run was at {before:.3g}')


def test_resuming_with_more_steps_says_where_a_group_learning_rate_moves(tmp_path):
  """An extended WSD run keeps its rate in the stable phase, but UltraMem's value-table
  multiplier (4x decaying to 1x over train.steps) moves: resuming says so."""
  wsd = ['train.schedule=wsd', 'train.warmup_steps=2']
  cfg = config_lib.load('configs/ultramem.py:tiny', [*wsd, 'train.steps=30'])
  config_lib.save(cfg, tmp_path / 'config.json')
  assert trainer._schedule_moved(tmp_path, cfg, 10) is None
  longer = config_lib.load('configs/ultramem.py:tiny', [*wsd, 'train.steps=40'])
  assert float(trainer.learning_rate_schedule(longer.train)(10)) == pytest.approx(
      float(trainer.learning_rate_schedule(cfg.train)(10)))  # both in the stable phase
  lr = cfg.train.lr
  assert trainer._schedule_moved(tmp_path, longer, 10) == (
      'train.steps 30 -> 40 since the checkpoint: step 11 trains train.groups.values at a '
      f'learning rate of {lr * 3.25:.3g} where the run was at {lr * 3:.3g} (its '
      'lr_multiplier decays over train.steps, with any schedule)')
  # The group's own key changed: named (it was "the train keys"), without the decay's why.
  halved = config_lib.load('configs/ultramem.py:tiny', [
      *wsd, 'train.steps=30', 'train.groups.values.lr_multiplier=2.0'])
  assert trainer._schedule_moved(tmp_path, halved, 10) == (
      'train.groups.values.lr_multiplier 4.0 -> 2.0 since the checkpoint: step 11 trains '
      f'train.groups.values at a learning rate of {lr * 2 * 2 / 3 + lr / 3:.3g} where the '
      f'run was at {lr * 3:.3g}')


def test_evaluate_and_load_use_the_latest_checkpoint(tmp_path, data_dir, caplog):
  cfg = _cfg(data_dir, **{'train.steps': 10})
  result = train(cfg, tmp_path)
  ev = evaluate(cfg, tmp_path)
  assert ev['step'] == 10
  assert ev['eval_bpb'] == pytest.approx(result['eval_bpb'], rel=1e-5)
  saved = json.loads((tmp_path / 'eval_10.json').read_text())
  assert saved['step'] == 10 and saved['evaluated_on']['log.eval_batches'] == 2
  fewer = _cfg(data_dir, **{'train.steps': 10, 'log.eval_batches': 1})
  with caplog.at_level(logging.WARNING):
    evaluate(fewer, tmp_path)  # over other data: a file of its own, eval_10.json kept
  (other,) = tmp_path.glob('eval_10_*.json')
  assert json.loads(other.read_text())['evaluated_on']['log.eval_batches'] == 1
  assert json.loads((tmp_path / 'eval_10.json').read_text()) == saved
  saved['evaluated_on']['log.eval_batches'] = 3  # as an older jaxarch wrote it
  (tmp_path / 'eval_10.json').write_text(json.dumps(saved))
  with caplog.at_level(logging.WARNING):
    evaluate(cfg, tmp_path)  # replaced: said
  assert 'held an evaluation of this step over other data (log.eval_batches 3 -> 2)' in (
      caplog.text)
  with pytest.raises(CheckpointError, match=r'no checkpoint of step 42 in .*; its steps: .*10$'):
    evaluate(cfg, tmp_path, step=42)
  # An eval set smaller than log.eval_batches: all of it, said, and how much it was.
  (tmp_path.parent / 'heldout.txt').write_text('held-out text\n' * 200)
  heldout = _cfg(data_dir, **{'train.steps': 10, 'log.eval_batches': 50,
                              'data.source': f'files:{tmp_path.parent / "heldout.txt"}',
                              'data.validation_fraction': 1.0})
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    small = evaluate(heldout, tmp_path)
  assert small['eval_tokens'] == 200 * len('held-out text\n') + 1  # its eod
  assert (f"the validation data ended after 11 of log.eval_batches=50 batches: all of it was "
          f"evaluated ({small['eval_tokens']:,} tokens)") in caplog.text
  assert ev['eval_tokens'] == 2 * cfg.train.batch_size * cfg.data.seq_len  # 2 full batches
  # A run whose mesh wants more devices than there are (a pod run evaluated on one host)
  # is evaluated on a data-parallel mesh of the devices here.
  # Its result file cannot be written here (as in a read-only run): still evaluated.
  (tmp_path / 'eval_10.json').unlink()
  (tmp_path / 'eval_10.json').mkdir()
  pod = mesh_config(config_lib.load_json(tmp_path / 'config.json'), data=16)
  assert evaluate(pod, tmp_path)['eval_bpb'] == pytest.approx(ev['eval_bpb'], rel=1e-4)
  loaded_cfg, model = load(tmp_path)
  assert loaded_cfg.model.d_model == cfg.model.d_model
  assert model(np.zeros((1, 4), np.int32)).shape == (1, 4, cfg.model.vocab_size)


def test_a_new_run_starts_from_another_run_s_model_with_a_fresh_optimizer(tmp_path, data_dir):
  """`train.init_from` (MaxText's load_parameters_path): continued pretraining or
  fine-tuning from a checkpoint of another run, resharded onto this run's mesh; the step,
  the optimizer state and the data start afresh."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxarch.train.pretrained import initial_state, load_model  # pylint: disable=g-import-not-at-top
  train(_cfg(data_dir, **{'train.steps': 10}), tmp_path / 'first')
  init = {'train.init_from': str(tmp_path / 'first'), 'train.init_from_step': 5,
          'train.steps': 2, 'train.warmup_steps': 0, 'log.every_steps': 1}
  second = mesh_config(tiny_config(data_dir, **init), data=4, tensor=2)
  state = initial_state(second, make_setup(second, make_mesh(second)))
  _, model = load_model(tmp_path / 'first', step=5)
  for ours, theirs in zip(jax.tree.leaves(state['params']),
                          jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  assert int(state['step']) == 0
  assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves(state['opt_state'])
             if np.ndim(m))  # Adam's moments: none carried over
  train(second, tmp_path / 'second')
  first, started = _losses(tmp_path / 'first'), _losses(tmp_path / 'second')
  assert abs(started[1] - first[6]) < abs(started[1] - first[1])  # step 6 ran from step 5's

  grown = mesh_config(tiny_config(data_dir, **init, **{'model.n_layers': 3}), data=8)
  with pytest.raises(config_lib.ConfigError, match=r"does not fit this config's model .*"
                     r"\['blocks'\]\[2\].* here, not saved .*n_layers=3 \(2 there\)"):
    initial_state(grown, make_setup(grown, make_mesh(grown)))
  moe = mesh_config(config_lib.load('configs/moe.py:tiny', [
      f'train.init_from={tmp_path / "first"}']), data=8)
  with pytest.raises(config_lib.ConfigError, match='is a dense run; this config trains a moe'):
    initial_state(moe, make_setup(moe, make_mesh(moe)))


def test_a_run_whose_mesh_does_not_fit_the_devices_here_gets_one_that_does():
  from jaxarch.train.pretrained import mesh_here  # pylint: disable=g-import-not-at-top
  pod = mesh_config(tiny_config(**{'train.batch_size': 48}), data=4, fsdp=4)  # 16 devices
  assert dict(mesh_here(pod)[1].shape) == dict(data=8, fsdp=1, tensor=1, expert=1)
  with pod.unlocked():
    pod.train.batch_size = 12  # not a multiple of the 8 devices here
  assert dict(mesh_here(pod)[1].shape) == dict(data=4, fsdp=1, tensor=2, expert=1)


def test_weights_too_large_to_replicate_on_the_devices_here_are_split_over_fsdp(monkeypatch):
  """A pod checkpoint of a large model loaded on one host's GPUs was replicated over data:
  a 70B model's weights whole on every GPU. Where they would take over half of a device,
  the fallback mesh puts the same sizes on fsdp."""
  from jaxarch.train import pretrained  # pylint: disable=g-import-not-at-top
  pod = mesh_config(tiny_config(**{'train.batch_size': 12}), data=4, fsdp=4)
  weights = pretrained._weight_bytes_per_device(pretrained.mesh_here(pod)[0])  # data=4
  for limit, expected in ((None, dict(data=4, fsdp=1)), (3 * weights, dict(data=4, fsdp=1)),
                          (weights, dict(data=1, fsdp=4))):
    monkeypatch.setattr(pretrained, 'device_memory_bytes', lambda limit=limit: limit)
    cfg, mesh = pretrained.mesh_here(pod)
    assert dict(mesh.shape) == dict(**expected, tensor=2, expert=1)
    assert dict(cfg.mesh.ici) == dict(**expected, tensor=2, expert=1)
  assert pretrained._weight_bytes_per_device(cfg) <= weights / 3  # fsdp=4 of tensor=2's


def test_a_run_resumed_on_fewer_devices_than_its_mesh_says_which_overrides_fit(
    tmp_path, data_dir, capsys):
  """A pod run resumed as saved on the devices left (here 8 of its 16) keeps config.json's
  mesh: one line names that file and the flags of a mesh that fits, and those resume it."""
  train(_cfg(data_dir, **{'train.steps': 2, 'checkpoint.every_steps': 2}), tmp_path)
  saved = tmp_path / 'config.json'
  config_lib.save(mesh_config(config_lib.load_json(saved), data=2, fsdp=4, tensor=2), saved)
  capsys.readouterr()
  assert cli.main(['train', f'--workdir={tmp_path}', '--config.train.steps=3']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and f'the mesh of {saved}' in err, err
  flags = err.split('pass e.g. ')[1].split(' (')[0].split()
  assert flags == ['--config.mesh.ici.data=8', '--config.mesh.ici.fsdp=1',
                   '--config.mesh.ici.tensor=1', '--config.mesh.ici.expert=1']
  assert cli.main(['train', f'--workdir={tmp_path}', '--config.train.steps=3', *flags]) == 0
  assert 'resumed from' in ''.join(capsys.readouterr())
  assert set(_losses(tmp_path)) == {1, 2, 3}


def test_tiny_training_lowers_validation_bits_per_byte(tmp_path, data_dir):
  # From ~8.6 bpb at initialisation (log2 of the vocab) to under 4.5 in 60 steps.
  cfg = _cfg(data_dir, **{'train.steps': 60, 'train.batch_size': 16, 'data.seq_len': 64,
                          'log.every_steps': 10, 'log.eval_every_steps': 60,
                          'log.eval_batches': 4, 'checkpoint.every_steps': 60})
  result = train(cfg, tmp_path)
  assert result['eval_bpb'] < 4.5


@pytest.mark.slow
def test_quick_start_preset_reaches_its_stated_bits_per_byte(tmp_path, data_dir):
  # configs/dense.py:tiny exactly as the README's quick start runs it (8 simulated devices
  # here). It reaches about 2.6 bpb; 2.9 leaves room for thread-order noise.
  cfg = config_lib.load('configs/dense.py:tiny')
  with cfg.unlocked():
    cfg.data.data_dir = data_dir
    cfg.log.progress = False
  assert train(cfg, tmp_path)['eval_bpb'] < 2.9


@pytest.mark.slow
def test_tiny_ultramem_trains_with_its_table_sharded(tmp_path, data_dir):
  cfg = config_lib.load('configs/ultramem.py:tiny', [
      'model.d_model=64', 'model.n_heads=4', 'model.n_kv_heads=2', 'model.d_ff=128',
      'model.max_len=64', 'data.seq_len=32', 'train.batch_size=8', 'train.steps=30',
      'train.warmup_steps=3', 'log.every_steps=5', 'log.eval_every_steps=30',
      'log.eval_batches=2', 'checkpoint.every_steps=30', 'log.progress=false',
      'log.tensorboard=false', 'mesh.ici.data=2', 'mesh.ici.fsdp=2', 'mesh.ici.tensor=2',
      f'data.data_dir={data_dir}'])
  result = train(cfg, tmp_path)
  records = read_metrics(tmp_path)
  assert records[-1]['loss'] < records[0]['loss'] - 1.0
  for layer in (0, 1):
    assert 0 < records[-1][f'side_layers/{layer}/memory/window_values_hit'] <= 1
    assert f'side_layers/{layer}/memory/score_entropy' in records[-1]
    assert f'side_layers/{layer}/memory/tucker_aux' in records[-1]
  # The value table's rate: 4x the schedule's, decaying linearly to 1x (configs/ultramem.py).
  assert records[0]['lr/values'] == pytest.approx(records[0]['lr'] * (1 + 3 * (1 - 4 / 30)))
  assert np.isfinite(result['eval_bpb'])


@pytest.mark.slow  # test_moe.py's train step on the same mesh stays in the default suite
def test_tiny_moe_trains_with_its_experts_split_over_four_devices(tmp_path, data_dir):
  cfg = config_lib.load('configs/moe.py:tiny', [
      'model.d_model=64', 'model.n_heads=4', 'model.n_kv_heads=2', 'model.moe.expert_d_ff=64',
      'model.max_len=64', 'data.seq_len=32', 'train.batch_size=8', 'train.steps=30',
      'train.warmup_steps=3', 'log.every_steps=5', 'log.eval_every_steps=30',
      'log.eval_batches=2', 'checkpoint.every_steps=30', 'log.progress=false',
      'log.tensorboard=false', 'mesh.ici.data=2', 'mesh.ici.expert=4',
      f'data.data_dir={data_dir}'])
  result = train(cfg, tmp_path)
  records = read_metrics(tmp_path)
  assert records[-1]['loss'] < records[0]['loss'] - 1.0
  for layer in range(cfg.model.n_layers):
    loads = [records[-1][f'blocks/{layer}/mlp/load_e{e}'] for e in range(8)]
    assert abs(sum(loads) - 1.0) < 1e-4
    # Each step's, averaged over the window: at least the averaged loads' (max is convex).
    assert records[-1][f'blocks/{layer}/mlp/max_violation'] >= 8 * max(loads) - 1 - 1e-6
    assert records[-1][f'blocks/{layer}/mlp/dropped_fraction'] == 0.0  # dropless
  assert np.isfinite(result['eval_bpb'])


def test_a_run_held_back_by_its_data_says_so(tmp_path, data_dir, monkeypatch, capsys):
  """`data_wait`: the share of each window the loop waited for batches; past 10% the run
  says once that the input pipeline limits it and which key to raise."""
  from jaxarch import data  # pylint: disable=g-import-not-at-top
  make = data.make_train_dataset

  def slow(*args, **kwargs):
    def wait(batch):
      time.sleep(0.5)  # the tiny steps are done long before
      return batch
    return make(*args, **kwargs).map(wait)

  monkeypatch.setattr(data, 'make_train_dataset', slow)
  train(_cfg(data_dir, **{'train.steps': 8, 'log.every_steps': 2,
                          'log.eval_every_steps': 100}), tmp_path)
  waits = [r['data_wait'] for r in read_metrics(tmp_path) if 'data_wait' in r]
  # Windows end at steps 2, 4, 5 (a checkpoint), 6 and 8; the first, compiling, is untimed.
  assert len(waits) == 4 and all(0.5 < w <= 1 for w in waits), waits
  err = capsys.readouterr().err
  assert err.count('the input pipeline limits training: ') == 1
  assert 'these batches are read without threads' in err  # bytes: no data.num_threads
  assert 'keep_best' not in err  # every eval step (100) is a checkpoint step (every 5)


def test_keep_best_with_evaluations_between_checkpoints_says_so(tmp_path, data_dir, capsys):
  """keep_best compares the checkpoints saved with an eval_loss, those of eval steps:
  evaluations every 2 steps and checkpoints every 3 meet every 6 steps, and the run says
  so rather than keep a 'best' of next to none."""
  train(_cfg(data_dir, **{'train.steps': 4, 'checkpoint.every_steps': 3,
                          'log.eval_every_steps': 2}), tmp_path)
  assert ('checkpoint.keep_best keeps the best of the checkpoints written at an eval step: '
          'with log.eval_every_steps=2 and checkpoint.every_steps=3, those of every 6 steps '
          'and the last; set one to a multiple of the other') in capsys.readouterr().err


def test_a_wait_for_data_counts_once_the_device_has_run_out_of_steps():
  """The loop runs ahead of the device: waiting for a batch while the step dispatched
  before still runs costs nothing (counted, a pipeline that keeps up with the device
  read as one that limits it)."""
  from jaxarch.train.metrics import InputWait  # pylint: disable=g-import-not-at-top

  def batches():
    while True:
      time.sleep(0.05)
      yield {}

  class Step:  # a dispatched step's output, finished or not
    def __init__(self, ready):
      self.ready = ready

    def is_ready(self):
      return self.ready

  wait, it = InputWait(), batches()
  wait.next(it, {'loss': Step(False), 'grad_norm': Step(True)})  # the device is busy
  assert wait.take() == 0
  wait.next(it, {'loss': Step(True), 'grad_norm': Step(True)})  # the device is idle
  wait.next(it)  # no step dispatched before
  assert 0.09 < wait.take() < 1 and wait.take() == 0


def test_a_vocab_size_too_small_for_the_tokenizer_says_what_to_set(tmp_path, data_dir):
  """A run with its own tokenizer.json must raise model.vocab_size (384 holds the bytes):
  one line that names the value to set, before any data is prepared."""
  from test_data import _gpt2_style_tokenizer  # pylint: disable=g-import-not-at-top
  cfg = _cfg(data_dir, **{'model.vocab_size': 256})
  cfg.data.tokenizer = _gpt2_style_tokenizer(tmp_path / 'tokenizer.json')  # 257 ids
  with pytest.raises(config_lib.ConfigError) as error:
    train(cfg, tmp_path / 'run')
  assert str(error.value) == (
      f"config error: model.vocab_size=256 is smaller than the vocabulary of "
      f"data.tokenizer='{tmp_path}/tokenizer.json' (257); set "
      f"--config.model.vocab_size=384 (a multiple of 128 shards over `tensor`)")


def test_float16_training_is_refused_and_bfloat16_weights_are_warned_of(tmp_path):
  """No loss scaling: float16 gradients underflow (each token's is divided by the batch's
  tokens), and float16 weights give Adam a second moment of zeros. Refused by whatever
  trains or plans training, before a job starts. bfloat16 weights train, without a float32
  copy: said."""
  from jaxarch import launch  # pylint: disable=g-import-not-at-top
  from jaxarch.sweep import plan  # pylint: disable=g-import-not-at-top
  from jaxarch.train import memory, throughput  # pylint: disable=g-import-not-at-top
  for key in ('dtype', 'param_dtype'):
    cfg = tiny_config(**{f'model.{key}': 'float16'})
    said = f"config error: model.{key}='float16' trains without loss scaling"
    for trains in (lambda: train(cfg, tmp_path / 'run'), lambda: throughput.measure(cfg),
                   lambda: memory.plan(cfg), lambda: launch.check(cfg, 'slurm')):
      with pytest.raises(config_lib.ConfigError, match=said):
        trains()
    with pytest.raises(config_lib.ConfigError, match=f"run 'a': model.{key}='float16' trains"):
      plan.runs_from([{'name': 'a', 'config': 'configs/dense.py:tiny',
                       f'model.{key}': 'float16'}], 'sweep.py')
  assert not (tmp_path / 'run').exists()
  assert config_lib.check_train_precision(tiny_config().model) is None
  assert config_lib.check_train_precision(tiny_config(**{
      'model.param_dtype': 'bfloat16'}).model).startswith(
          "model.param_dtype='bfloat16' keeps no float32 copy of the weights")


def test_a_setting_that_does_nothing_in_its_config_is_said(tmp_path, caplog):
  """Accepted (a run saved with it resumes), but said: ep_capacity_factor bounds dropless
  expert parallelism's buffers, and a capacity run has none."""
  moe = lambda *overrides: config_lib.load('configs/moe.py:tiny', list(overrides)).model
  assert config_lib.unused_settings(moe()) == ()
  assert config_lib.unused_settings(moe('model.moe.ep_capacity_factor=2.0')) == ()
  assert config_lib.unused_settings(tiny_config().model) == ()
  cfg = config_lib.load('configs/moe.py:tiny', [
      'model.moe.capacity_factor=1.5', 'model.moe.ep_capacity_factor=2.0',
      f'data.source=files:{tmp_path}/none/*.jsonl'])  # said before the data are looked for
  with caplog.at_level('WARNING'), pytest.raises(config_lib.ConfigError, match='no files'):
    train(cfg, tmp_path / 'run')
  assert ('model.moe.ep_capacity_factor=2.0 does nothing beside model.moe.capacity_factor=1.5'
          in caplog.text)


def test_the_stopwatch_leaves_out_paused_time(monkeypatch):
  """Evaluations and checkpoint saves run paused: throughput and MFU count training only."""
  from jaxarch.train import metrics  # pylint: disable=g-import-not-at-top
  clock = iter([0.0, 3.0, 10.0, 12.0, 12.0, 12.5, 13.5])
  monkeypatch.setattr(metrics, 'time', types.SimpleNamespace(perf_counter=lambda: next(clock)))
  watch = metrics.Stopwatch()  # 0
  with watch.paused():  # 3 .. 10: 7 s paused
    pass
  assert watch.lap() == 5.0  # 12 - 0 - 7
  with watch.paused():  # 12 .. 12.5
    pass
  assert watch.lap() == 1.0  # 13.5 - 12 - 0.5


def test_progress_lines_show_steps_per_second_and_eta(capsys):
  """Where the bar is not live (a batch job's log), each line still says how fast the run
  goes and when it ends: steps/s from the window's step time, ETA for the steps left."""
  from jaxarch.train.metrics import ProgressBar  # pylint: disable=g-import-not-at-top
  with ProgressBar(1000, 0) as bar:
    bar.update(100, {'loss': 2.5, 'step_time_s': 0.25, 'tokens_per_s': 4096.0, 'mfu': 0.4,
                     'data_wait': 0.01})
    bar.update(200, {'loss': 2.5, 'step_time_s': 0.25, 'data_wait': 0.3})
  line, waiting = capsys.readouterr().err.splitlines()
  assert 'data wait' not in line and 'data wait 30%' in waiting  # shown once it matters
  assert 'step 100: loss 2.5000' in line
  assert '4.00 steps/s' in line and '4,096 tok/s' in line and 'MFU 40.0%' in line
  assert 'eta 0:03:45' in line  # 900 steps x 0.25 s


def test_progress_lines_are_not_wrapped_in_a_log_file(capsys, monkeypatch):
  """A batch job's log keeps one line per step (grep 'step 100:' finds all of it), however
  narrow the console rich assumes there (80 columns)."""
  from jaxarch.train.metrics import ProgressBar  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('COLUMNS', '80')
  with ProgressBar(1000, 0) as bar:
    bar.print('dense model: 1,836,416 parameters (1,836,416 active per token), mesh '
              "{'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1}, 1 x cpu")
    bar.update(100, {'loss': 4.5604, 'eval_loss': 4.9282, 'eval_bpb': 2.515, 'epoch': 0.08,
                     'step_time_s': 0.68, 'tokens_per_s': 2993.0, 'mfu': 0.4,
                     'data_wait': 0.3}, keep=True)
  model, step = capsys.readouterr().err.splitlines()
  assert model.endswith('1 x cpu') and len(model) > 80
  assert step.startswith('step 100: loss 4.5604 | eval 4.9282 (2.515 bpb)')
  assert step.endswith('data wait 30% | eta 0:10:12')  # 900 steps x 0.68 s


def test_the_commands_keep_compiled_programs_for_the_next_run(tmp_path, monkeypatch, capsys):
  """A resumed or repeated run loads its init and train step from the compilation cache
  (($XDG_CACHE_HOME or ~/.cache)/jaxarch/jit, or the user's own) rather than compiling
  them again: set by every command, before it reads its arguments' files."""
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  monkeypatch.delenv('JAX_COMPILATION_CACHE_MAX_SIZE', raising=False)
  suite_cache = jax.config.jax_compilation_cache_dir
  suite_cap = jax.config.jax_compilation_cache_max_size
  try:
    # jaxarch's own folder is capped (least recently used programs go); the user's keeps
    # the user's cap (none, -1, unless $JAX_COMPILATION_CACHE_MAX_SIZE set one).
    for own, expected, cap in ((str(tmp_path / 'own'), tmp_path / 'own', suite_cap),
                               (None, tmp_path / 'cache' / 'jaxarch' / 'jit', 2 * 2**30)):
      jax.config.update('jax_compilation_cache_dir', own)
      assert cli.main(['eval', f'--workdir={tmp_path / "none"}']) == 2
      assert jax.config.jax_compilation_cache_dir == str(expected)
      assert jax.config.jax_compilation_cache_max_size == cap
  finally:
    jax.config.update('jax_compilation_cache_dir', suite_cache)
    jax.config.update('jax_compilation_cache_max_size', suite_cap)
  assert 'jaxarch: ' in capsys.readouterr().err


def test_an_eval_on_other_expert_shards_than_the_run_s_says_so_in_a_file_of_its_own(
    tmp_path, data_dir, caplog):
  """MoE's ep_capacity_factor drops assignments by the expert shards: an eval on a mesh of
  other shards (one host's devices, a pod's run) gave another loss into the run's own
  eval_STEP.json, silently."""
  from jaxarch.train.state import init_state  # pylint: disable=g-import-not-at-top
  moe = config_lib.load('configs/moe.py:tiny', [f'data.data_dir={data_dir}',
                                                'model.moe.ep_capacity_factor=1.0',
                                                'log.eval_batches=1'])
  cfg = mesh_config(moe, data=4, expert=2)
  checkpointer = Checkpointer(tmp_path, async_save=False)
  checkpointer.save(0, init_state(cfg, make_setup(cfg, make_mesh(cfg))))
  checkpointer.close()
  config_lib.save(cfg, tmp_path / 'config.json')
  with caplog.at_level(logging.WARNING):
    evaluate(cfg, tmp_path)
  assert 'ep_capacity_factor' not in caplog.text
  assert json.loads((tmp_path / 'eval_0.json').read_text())['evaluated_on']['mesh.expert'] == (
      'ici 2 x dcn 1')
  with caplog.at_level(logging.WARNING):
    evaluate(mesh_config(moe, data=8), tmp_path)
  assert ('model.moe.ep_capacity_factor=1.0 drops assignments by the number of expert shards, '
          'and this eval runs on a mesh of these 8 devices (expert: ici 1 x dcn 1), not the '
          "run's (ici 2 x dcn 1)") in caplog.text
  (other,) = tmp_path.glob('eval_0_*.json')
  assert json.loads(other.read_text())['evaluated_on']['mesh.expert'] == 'ici 1 x dcn 1'
