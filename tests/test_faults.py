"""Faults in training: NaN and Inf steps, a corrupt checkpoint on resume, bad workdirs and
bad inputs. Each ends in a resumed run or a one-line message, never in lost work."""

import collections
import errno
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import types

import grain
import jax
import numpy as np
import pytest

import jaxarch
from conftest import mesh_config, tiny_config
from jaxarch import cli
from jaxarch import config as config_lib
from jaxarch import oserrors
from jaxarch.config import load_json
from jaxarch.train import evaluate, train
from jaxarch.train import trainer
from jaxarch.train.checkpoint import CheckpointError
from jaxarch.train.metrics import MetricsWriter, read_metrics
from jaxarch.train import nonfinite
from jaxarch.train.nonfinite import NonFiniteError, NonFiniteMonitor
from jaxarch.train.workdir import WorkdirError, check_workdir, only_trainer_in

TINY = ['--config=configs/dense.py:tiny', '--config.model.d_model=64',
        '--config.model.n_layers=2', '--config.model.d_ff=128', '--config.data.seq_len=32',
        '--config.train.batch_size=8', '--config.train.steps=2',
        '--config.train.warmup_steps=1', '--config.log.progress=false',
        '--config.log.tensorboard=false', '--config.log.eval_batches=1']


def _cfg(data_dir, **overrides):
  base = {'train.steps': 10, 'train.warmup_steps': 2, 'checkpoint.every_steps': 2,
          'log.every_steps': 5, 'log.eval_every_steps': 10, 'log.eval_batches': 1}
  return mesh_config(tiny_config(data_dir, **{**base, **overrides}), data=8)


class _Poison(grain.transforms.Map):
  """Puts a token id past the vocabulary into the batches of the given steps: the
  embedding lookup of such an id is NaN, as from a corrupt data file."""

  def __init__(self, steps):
    self.steps = set(steps)
    self.step = 0

  def map(self, batch):
    self.step += 1
    if self.step in self.steps:
      batch = dict(batch, inputs=batch['inputs'].copy())
      batch['inputs'][0, 0] = 10**6
    return batch


def _poison(monkeypatch, steps):
  make = trainer.data.make_train_dataset
  monkeypatch.setattr(trainer.data, 'make_train_dataset',
                      lambda *a, **kw: make(*a, **kw).map(_Poison(steps)))


def _run_cli(args, capsys) -> tuple[int, str]:
  code = cli.main(args)
  return code, capsys.readouterr().err.strip()


# NaN and Inf.


def test_nonfinite_step_stops_with_a_report_and_the_weights_untouched(tmp_path, data_dir,
                                                                      monkeypatch):
  _poison(monkeypatch, steps={3})
  with pytest.raises(NonFiniteError) as error:
    train(_cfg(data_dir), tmp_path)
  message = str(error.value)
  assert message.startswith('non-finite training at step 3: loss nan') and '\n' not in message
  assert 'non-finite gradients in' in message and 'blocks/0/attn' in message
  assert 'The last checkpoint (2) is intact' in message and message.endswith('to resume.')
  report = json.loads((tmp_path / 'nonfinite_step_3.json').read_text())
  grads = {p['name']: p['grad_norm'] for p in report['parameters']}
  assert report['step'] == 3 and grads['embed/embedding'] == 'nan'
  assert all(isinstance(p['param_norm'], float) for p in report['parameters'])
  # Found when the next checkpoint (4) ends the logging window, before it is written: the
  # run resumes from checkpoint 2, the last one before the bad step.
  assert [r['step'] for r in read_metrics(tmp_path)] == [2]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  monkeypatch.undo()
  result = train(_cfg(data_dir), tmp_path)
  assert [r['step'] for r in read_metrics(tmp_path)] == [2, 4, 5, 6, 8, 10]
  assert result['step'] == 10 and np.isfinite(result['loss'])


def test_a_run_stopped_on_nonfinite_training_exits_3(tmp_path, capsys, monkeypatch):
  """Not 2, a config error's: a sweep records such a run as diverged (an LR sweep's
  largest rates) and does not train it again."""
  import jaxarch.train  # pylint: disable=g-import-not-at-top

  def diverges(cfg, workdir):
    raise NonFiniteError('non-finite training at step 3: loss nan')

  monkeypatch.setattr(jaxarch.train, 'train', diverges)
  code, err = _run_cli(['train', '--config=configs/dense.py:tiny',
                        f'--workdir={tmp_path}/run'], capsys)
  assert code == 3 == nonfinite.DIVERGED
  assert err == 'jaxarch: non-finite training at step 3: loss nan'


def test_skip_policy_counts_bad_steps_and_stops_after_too_many_in_a_row(
    tmp_path, data_dir, monkeypatch):
  _poison(monkeypatch, steps={3, 4, 7})
  cfg = _cfg(data_dir, **{'train.nonfinite': 'skip', 'log.every_steps': 1})
  result = train(cfg, tmp_path / 'skip')
  records = {r['step']: r for r in read_metrics(tmp_path / 'skip')}
  assert [s for s, r in records.items() if r.get('skipped_steps')] == [3, 4, 7]
  assert all(np.isfinite(r['loss']) for s, r in records.items() if s not in (3, 4, 7))
  # A skipped step leaves the weights as they were.
  assert records[3]['param_norm'] == records[4]['param_norm'] == records[2]['param_norm']
  assert records[5]['param_norm'] != records[4]['param_norm']
  assert result['step'] == 10 and np.isfinite(result['eval_loss'])

  _poison(monkeypatch, steps={3, 4, 5})
  cfg = _cfg(data_dir, **{'train.nonfinite': 'skip', 'train.max_consecutive_skips': 2})
  with pytest.raises(NonFiniteError, match=r'step 5: .*3 non-finite steps in a row'):
    train(cfg, tmp_path / 'diverging')


def test_a_resumed_run_goes_on_counting_the_nonfinite_steps_in_a_row_or_says_it_cannot(
    tmp_path, data_dir, monkeypatch, capsys):
  # Steps 3 and 4 are skipped and the run stops with checkpoint 4; resumed, its first step
  # is the third bad one in a row, past train.max_consecutive_skips=2.
  cfg = lambda steps: _cfg(data_dir, **{'train.nonfinite': 'skip', 'train.steps': steps,
                                        'train.max_consecutive_skips': 2})
  _poison(monkeypatch, steps={3, 4})
  train(cfg(4), tmp_path)
  monkeypatch.undo()
  _poison(monkeypatch, steps={1})  # the resumed iterator's first batch: step 5
  with pytest.raises(NonFiniteError, match=r'step 5: .*3 non-finite steps in a row'):
    train(cfg(10), tmp_path)
  # The count is kept in Orbax's _CHECKPOINT_METADATA, whose reader passes a damaged one
  # off as empty: the run went on from a count of 0, and nothing said so.
  metadata = tmp_path / 'checkpoints' / '4' / '_CHECKPOINT_METADATA'
  metadata.write_text(metadata.read_text()[:100])  # a copy cut short
  capsys.readouterr()
  result = train(cfg(6), tmp_path)
  out = ''.join(capsys.readouterr())
  assert f'resumed from {metadata.parent}' in out and result['step'] == 6
  assert (f'checkpoint {metadata.parent}: its _CHECKPOINT_METADATA is missing, unreadable or damaged, '
          'and with it the count of non-finite steps in a row') in out
  assert 'counting them from 0' in out


def test_weights_that_would_overflow_are_named_and_a_run_without_checkpoints_says_so(
    tmp_path):
  monitor = NonFiniteMonitor('stop', 10, ['embed/embedding', 'head'], tmp_path)
  overflow = {'nonfinite': 1.0, 'loss': 5.5, 'grad_norm': 2.0,
              'layer_grad_norms': [1.0, 1.7], 'layer_param_norms': [3.0, 4.0]}
  with pytest.raises(NonFiniteError) as error:
    monitor.check(1, [overflow])
  message = str(error.value)
  assert ("the update would have made the weights' norm overflow; largest gradient norms "
          'head 1.7, embed/embedding 1') in message  # it named no parameter
  assert 'No checkpoint was written yet' in message and message.endswith('and rerun.')
  assert 'set train.nonfinite=skip' in message


def test_a_skip_policy_that_stops_advises_more_skips_not_the_policy_it_has(tmp_path):
  monitor = NonFiniteMonitor('skip', 1, ['embed/embedding', 'head'], tmp_path)
  bad = {'nonfinite': 1.0, 'loss': float('nan'), 'grad_norm': 2.0,
         'layer_grad_norms': [1.0, 1.7], 'layer_param_norms': [3.0, 4.0]}
  monitor.check(1, [bad])  # skipped
  with pytest.raises(NonFiniteError, match=r'step 2: .*2 non-finite steps in a row') as error:
    monitor.check(2, [bad])
  assert 'or raise train.max_consecutive_skips, and rerun' in str(error.value)
  assert 'set train.nonfinite=skip' not in str(error.value)  # it is set


def test_a_report_whose_statistics_cannot_be_written_still_reports(tmp_path):
  # A full disk raised OSError from the report, which hid the non-finite step behind it.
  (tmp_path / 'nonfinite_step_1.json').mkdir()  # fails as a full disk would
  monitor = NonFiniteMonitor('stop', 10, ['embed/embedding', 'head'], tmp_path)
  nan = {'nonfinite': 1.0, 'loss': float('nan'), 'grad_norm': float('nan'),
         'layer_grad_norms': [1.0, float('nan')], 'layer_param_norms': [3.0, 4.0]}
  with pytest.raises(NonFiniteError, match=r'non-finite training at step 1: .*statistics '
                     r'could not be written to .*nonfinite_step_1.json \(Is a directory\)'):
    monitor.check(1, [nan])


# Corrupt checkpoints.


def test_training_resumes_past_a_corrupt_latest_checkpoint(tmp_path, data_dir, caplog):
  cfg = _cfg(data_dir, **{'log.every_steps': 1})
  train(cfg, tmp_path)
  want = {r['step']: r['loss'] for r in read_metrics(tmp_path)}
  for f in (tmp_path / 'checkpoints' / '10' / 'state').rglob('*'):
    if f.is_file() and f.parent.name == 'd':
      f.write_bytes(b'garbage')
  result = train(cfg, tmp_path)
  assert 'checkpoint' in caplog.text and 'unreadable' in caplog.text
  assert (tmp_path / 'corrupt_checkpoints').is_dir() and result['step'] == 10
  records = read_metrics(tmp_path)
  assert [r['step'] for r in records] == list(range(1, 11))  # 9 and 10 logged again, once
  assert records[-1]['loss'] == pytest.approx(want[10], rel=1e-6)
  # Every checkpoint unreadable: an error, not a silent start from step 0.
  for f in (tmp_path / 'checkpoints').rglob('*'):
    if f.is_file() and f.parent.name == 'd':
      f.write_bytes(b'garbage')
  with pytest.raises(CheckpointError, match='no checkpoint in .* could be restored'):
    train(cfg, tmp_path)
  assert len(read_metrics(tmp_path)) == 10  # nothing trained, nothing forgotten


def test_config_json_changes_only_with_a_checkpoint_of_the_new_config(tmp_path, data_dir,
                                                                      monkeypatch):
  # `load` and `eval` build the model from config.json: it must be the config the
  # newest checkpoint was trained with.
  train(_cfg(data_dir, **{'train.steps': 2}), tmp_path)
  saved = lambda: load_json(tmp_path / 'config.json')
  train(_cfg(data_dir, **{'train.steps': 2, 'model.rope_theta': 500.0}), tmp_path)
  assert saved().model.rope_theta == 10_000  # a finished run: nothing trained, nothing saved

  def killed(*args, **kwargs):  # the machine goes away while checkpoint 4 is being written
    raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(trainer.Checkpointer, 'save', killed)
    with pytest.raises(KeyboardInterrupt):
      train(_cfg(data_dir, **{'train.steps': 4, 'model.rope_theta': 500.0}), tmp_path)
  assert saved().model.rope_theta == 10_000  # checkpoint 2 is still the newest
  train(_cfg(data_dir, **{'train.steps': 4, 'model.rope_theta': 500.0}), tmp_path)
  assert saved().model.rope_theta == 500  # saved with checkpoint 4


# Bad workdirs and inputs: one line, exit code 2, before any training.


def test_unwritable_workdir_is_one_line(tmp_path, data_dir, capsys):
  (tmp_path / 'file').write_text('not a directory')
  code, err = _run_cli(['train', *TINY, f'--workdir={tmp_path}/file/run',
                        f'--data_dir={data_dir}'], capsys)
  assert code == 2 and err.startswith(f'jaxarch: {tmp_path}/file/run') and 'not writable' in err
  assert '\n' not in err
  # Its checkpoint directory too: found before training, not at the first save.
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'checkpoints').write_text('not a directory')
  code, err = _run_cli(['train', *TINY, f'--workdir={tmp_path}/run', f'--data_dir={data_dir}'],
                       capsys)
  assert code == 2 and f'{tmp_path}/run/checkpoints is a file' in err and '\n' not in err
  assert not (tmp_path / 'run' / 'metrics.jsonl').exists()


def test_a_damaged_saved_config_makes_the_data_position_unknown_not_a_traceback(tmp_path):
  cfg = tiny_config()
  config_lib.save(cfg, tmp_path / 'config.json')
  assert trainer.data_changes(tmp_path, cfg) is None
  for damaged in ('{"train": ', '[]', '{"train": [], "data": null}'):
    (tmp_path / 'config.json').write_text(damaged)
    changed = trainer.data_changes(tmp_path, cfg)
    assert changed and ('unreadable' in changed or 'train.batch_size None -> 8' in changed)


def test_a_runs_own_tokenizer_is_named_in_it_so_a_moved_run_keeps_its_data_layout(tmp_path):
  """config.json names a tokenizer in the run (an import's copy) relative to the run and
  reads it back as its path there: moved, the run has the same data layout (no data
  position dropped on resume); an older config.json naming its path reads as before, a
  tokenizer outside the run stays as given (a copy of the run's is no layout change), and
  another tokenizer is a layout change."""
  from test_data import (  # pylint: disable=g-import-not-at-top
      _gpt2_style_tokenizer, _llama_style_tokenizer)
  run, moved = tmp_path / 'run', tmp_path / 'moved'
  (run / 'tokenizer').mkdir(parents=True)
  cfg = tiny_config(**{'data.tokenizer': _gpt2_style_tokenizer(
      run / 'tokenizer' / 'tokenizer.json')})
  config_lib.save(cfg, run / 'config.json')
  saved = lambda: json.loads((moved / 'config.json').read_text())
  run.rename(moved)
  assert saved()['data']['tokenizer'] == 'tokenizer/tokenizer.json'
  moved_cfg = load_json(moved / 'config.json')
  assert moved_cfg.data.tokenizer == str(moved / 'tokenizer' / 'tokenizer.json')
  assert trainer.data_changes(moved, moved_cfg) is None
  config_lib.save(moved_cfg, moved / 'config.json')  # as a resumed run saves it again
  assert saved()['data']['tokenizer'] == 'tokenizer/tokenizer.json'
  older = saved()
  older['data']['tokenizer'] = moved_cfg.data.tokenizer
  (moved / 'config.json').write_text(json.dumps(older))
  assert load_json(moved / 'config.json').data.tokenizer == moved_cfg.data.tokenizer
  assert trainer.data_changes(moved, moved_cfg) is None
  with moved_cfg.unlocked():  # a copy outside the run: the same tokens
    moved_cfg.data.tokenizer = _gpt2_style_tokenizer(tmp_path / 'copy.json')
  assert trainer.data_changes(moved, moved_cfg) is None
  with moved_cfg.unlocked():
    moved_cfg.data.tokenizer = _llama_style_tokenizer(tmp_path / 'tokenizer.json')
  assert trainer.data_changes(moved, moved_cfg) == (
      f'data.tokenizer tokenizer/tokenizer.json -> {tmp_path / "tokenizer.json"}')
  config_lib.save(moved_cfg, moved / 'config.json')
  assert saved()['data']['tokenizer'] == str(tmp_path / 'tokenizer.json')


def test_a_trained_source_set_to_weight_zero_says_a_tiny_weight_keeps_the_position(tmp_path):
  cfg = tiny_config(**{'data.source': 'a=default,1;b=files:/x/*.txt,1'})
  config_lib.save(cfg, tmp_path / 'config.json')
  with cfg.unlocked():
    cfg.data.source = 'a=default,1;b=files:/x/*.txt,0'
  assert trainer.data_changes(tmp_path, cfg) == (
      'data.source a=default,1;b=files:/x/*.txt,1 -> a=default,1;b=files:/x/*.txt,0, (no '
      'longer trained on: files:/x/*.txt; at a tiny weight such as 1e-6 instead, each source '
      'would keep its position)')
  with cfg.unlocked():
    cfg.data.source = 'a=default,1;b=files:/x/*.txt,1e-6'
  assert trainer.data_changes(tmp_path, cfg) is None


def test_a_text_key_given_to_the_source_instead_is_the_same_data_layout(tmp_path):
  """data.text_key=content for one source, or that source given ',1,content' in a mixture
  that adds an eval set, reads the same documents: the position holds. Another key on a
  mixture's own source (which the sources' comparison alone missed) does not."""
  cfg = tiny_config(**{'data.source': 'files:/x/*.jsonl', 'data.text_key': 'content'})
  config_lib.save(cfg, tmp_path / 'config.json')
  with cfg.unlocked():
    cfg.data.source, cfg.data.text_key = 'a=files:/x/*.jsonl,1,content;ev=default,0', None
  assert trainer.data_changes(tmp_path, cfg) is None
  config_lib.save(cfg, tmp_path / 'config.json')
  with cfg.unlocked():
    cfg.data.source = 'a=files:/x/*.jsonl,1,body;ev=default,0'
  assert trainer.data_changes(tmp_path, cfg) == (
      'data.source a=files:/x/*.jsonl,1,content;ev=default,0 -> '
      'a=files:/x/*.jsonl,1,body;ev=default,0')
  assert config_lib.reweighted('files:/x/*.jsonl', 'a=files:/x/*.jsonl,1,content;default,0',
                               'content', None)


def test_a_run_saved_before_add_bos_keeps_its_data_position_unless_it_changes(tmp_path):
  """Without a BOS a document is one token shorter, so data.add_bos is of the data
  layout; a run saved before the key added a BOS, and resumes with its position."""
  cfg = tiny_config()
  config_lib.save(cfg, tmp_path / 'config.json')
  old = json.loads((tmp_path / 'config.json').read_text())
  del old['data']['add_bos']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  assert trainer.data_changes(tmp_path, cfg) is None
  with cfg.unlocked():
    cfg.data.add_bos = False
  assert trainer.data_changes(tmp_path, cfg) == 'data.add_bos True -> False'


def test_metrics_that_cannot_be_written_are_one_line(tmp_path):
  writer = MetricsWriter(tmp_path, tensorboard=False)
  (tmp_path / 'metrics.jsonl').mkdir()  # as a full disk or a lost permission would fail
  with pytest.raises(WorkdirError, match='could not write the metrics of step 5 to .*resume'):
    writer.write(5, {'loss': 1.0})


def test_tensorboard_events_that_cannot_be_written_at_the_end_are_a_warning(tmp_path,
                                                                             monkeypatch):
  # The disk filled: closing raised the OSError over the run's one-line error (a traceback),
  # and tensorboardX's exit handler failed on the same events again, with another.
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  writer = MetricsWriter(tmp_path, tensorboard=True)
  writer.write(1, {'loss': 1.0})
  tb = writer.tb
  def full(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(record_writer.RecordWriter, 'flush', full)
  writer.close()
  tb.file_writer.event_writer.close()  # what its exit handler does: nothing left to write
  assert (tmp_path / 'metrics.jsonl').is_file()


def test_free_space_counts_the_saves_that_a_full_disk_cut_short(tmp_path, monkeypatch):
  # Deleted before the run saves again: counted as used, a run stopped by a full disk could
  # not resume once the space for a checkpoint was freed.
  cut_short = tmp_path / 'run' / 'checkpoints' / '6.orbax-checkpoint-tmp' / 'state'
  cut_short.mkdir(parents=True)
  (cut_short / 'd').write_bytes(b'0' * 3_000_000)
  usage = collections.namedtuple('usage', 'total used free')
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage(10**9, 10**9, 16 << 20))
  check_workdir(tmp_path / 'run', tiny_config(), 2_000_000, has_checkpoints=False)
  shutil.rmtree(cut_short.parent)
  with pytest.raises(WorkdirError, match='MiB free, but one checkpoint'):
    check_workdir(tmp_path / 'run', tiny_config(), 2_000_000, has_checkpoints=False)


@pytest.mark.parametrize('section,key,value', [
    ('checkpoint', 'keep_best', 'no'), ('checkpoint', 'async_save', 'no'),
    ('train', 'seed', '0')])
def test_a_hand_edited_saved_config_of_the_wrong_type_is_one_line(tmp_path, section, key,
                                                                   value):
  config_lib.save(tiny_config(), tmp_path / 'config.json')
  edited = json.loads((tmp_path / 'config.json').read_text())
  edited[section][key] = value
  (tmp_path / 'config.json').write_text(json.dumps(edited))
  with pytest.raises(config_lib.ConfigError, match=f"^config error: {section}.{key}='"):
    load_json(tmp_path / 'config.json')


def test_a_config_that_cannot_be_saved_is_one_line(tmp_path):
  # Saved with a resumed run's first checkpoint, hours in: a full disk is no traceback.
  (tmp_path / 'config.json').mkdir()  # fails as a full disk or a lost permission would
  (tmp_path / 'config.json' / 'x').touch()
  with pytest.raises(WorkdirError, match='could not write .*config.json.*resume'):
    trainer._save_config(tiny_config(), tmp_path)  # pylint: disable=protected-access


@pytest.mark.parametrize('stdout', ['full disk', 'closed pipe'])
def test_stdout_that_takes_no_more_is_one_line_or_quiet(tmp_path, stdout):
  """`jaxarch ... > file` on a full disk, or `jaxarch ... | head` whose reader has gone: a
  traceback, then Python's "Exception ignored" at exit (rc 120), before."""
  command = [sys.executable, '-m', 'jaxarch.cli', 'launch', *TINY, '--target=slurm',
             '--dry-run', f'--workdir={tmp_path / "run"}']
  if stdout == 'full disk':
    with open('/dev/full', 'w') as full:
      done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True)
    assert done.stderr.strip().endswith(
        'jaxarch: could not write to stdout (no space left on device)')
  else:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    process.stdout.close()  # before it writes: the reader of `| head` gone
    done = types.SimpleNamespace(returncode=process.wait(), stderr=process.stderr.read())
    assert 'jaxarch: could not write' not in done.stderr  # quiet, as other tools are
  assert done.returncode == 1
  assert 'Traceback' not in done.stderr and 'Exception ignored' not in done.stderr


def test_the_command_s_warnings_name_their_logger_in_its_format(tmp_path):
  """'WARNING jaxarch.x: message', not Python's default 'WARNING:jaxarch.x:message' that
  absl's first log line (Orbax's, at import) had set up before the command's own."""
  probe = ('import logging\nfrom jaxarch import cli\n'
           f'cli.main(["fit", "--workdir={tmp_path}/none"])\n'
           'logging.getLogger("jaxarch.probe").warning("past model.max_len")\n')
  done = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True)
  assert done.stderr.splitlines()[-1] == 'WARNING jaxarch.probe: past model.max_len', done.stderr


@pytest.mark.parametrize('command', [
    ['train', *TINY], ['sweep', '--config=configs/sweeps/isoflop.py:tiny'],
    ['launch', *TINY, '--target=slurm', '--dry-run']])
def test_a_bucket_url_workdir_is_one_line(tmp_path, monkeypatch, capsys, command):
  monkeypatch.chdir(tmp_path)  # `gs://b/run` used to become the folder gs:/b/run here
  code, err = _run_cli([*command, '--workdir=gs://b/run'], capsys)
  assert code == 2 and 'mount the bucket' in err and '\n' not in err
  assert not (tmp_path / 'gs:').exists()


@pytest.mark.parametrize('command', [
    ['train', *TINY], ['sweep', '--config=configs/sweeps/isoflop.py:tiny'],
    ['launch', *TINY, '--target=slurm', '--dry-run'], ['fit', '--workdir=WORKDIR', '--out=FILE'],
    ['distill', '--workdir=WORKDIR', '--out=FILE'],
    ['bench', 'memory', *TINY, '--state_only', '--device_memory_gib=-1']])
def test_a_file_where_a_directory_goes_is_one_line(tmp_path, capsys, command):
  (tmp_path / 'file').write_text('not a directory')
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'results.jsonl').write_text('{"name": "x"}\n')
  args = [a.replace('WORKDIR', str(tmp_path / 'run')).replace('FILE', str(tmp_path / 'file'))
          for a in command]
  if not any(a.startswith('--workdir') for a in args):
    args.append(f'--workdir={tmp_path / "file"}')
  try:
    code, err = _run_cli(args, capsys)
  except SystemExit as e:  # argparse
    code, err = e.code, capsys.readouterr().err.splitlines()[-1]
  assert code == 2 and ('is a file' in err or 'must be > 0' in err), err
  assert '\n' not in err.strip()


def test_a_second_trainer_in_a_workdir_is_one_line(tmp_path, data_dir, capsys):
  (tmp_path / 'run').mkdir()
  with open(tmp_path / 'run' / '.train.lock.0', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a trainer holds the workdir
    code, err = _run_cli(['train', *TINY, f'--workdir={tmp_path}/run',
                          f'--data_dir={data_dir}'], capsys)
  assert code == 2 and 'in use by another jaxarch train' in err
  assert not (tmp_path / 'run' / 'checkpoints').exists()


@pytest.mark.parametrize('code', [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_workdir_on_a_filesystem_without_locks_trains_unguarded(tmp_path, monkeypatch,
                                                                   caplog, code):
  """NFS without its lock daemon (ENOLCK), Lustre mounted noflock (ENOSYS): the lock is
  a guard, not a need. A busy lock still refuses, and other errors still raise."""
  def raising(error):
    def flock(file, operation):
      raise error
    return flock
  monkeypatch.setattr(fcntl, 'flock', raising(OSError(code, os.strerror(code))))
  monkeypatch.setattr(oserrors, '_unlocked_told', set())
  for _ in range(2):
    with only_trainer_in(tmp_path):
      pass
  told = [r.getMessage() for r in caplog.records if 'cannot be locked' in r.getMessage()]
  assert len(told) == 1, told  # once per lock file
  assert '.train.lock.0' in told[0] and os.strerror(code) in told[0]
  assert 'nothing stops a second jaxarch train in this workdir' in told[0]
  for error, raised in ((BlockingIOError(errno.EWOULDBLOCK, 'held'), WorkdirError),
                        (OSError(errno.EBADF, 'bad file descriptor'), OSError)):
    monkeypatch.setattr(fcntl, 'flock', raising(error))
    with pytest.raises(raised, match='in use by another jaxarch train|bad file descriptor'):
      with only_trainer_in(tmp_path):
        pass


def test_counts_below_one_and_overrides_fit_does_not_take_are_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(['bench', 'train', *TINY, f'--workdir={tmp_path}/bench', '--steps=0'])
  assert exit_.value.code == 2 and 'argument --steps: 0 must be >= 1' in (
      capsys.readouterr().err)
  assert not (tmp_path / 'bench').exists()
  with pytest.raises(SystemExit) as exit_:
    cli.main(['fit', f'--workdir={tmp_path}', '--bootstrap=-1'])
  assert exit_.value.code == 2 and 'argument --bootstrap: -1 must be >= 0' in (
      capsys.readouterr().err)
  code, err = _run_cli(['fit', f'--workdir={tmp_path}', '--config.train.steps=3'], capsys)
  assert code == 2 and err.endswith('drop --config.train.steps')


@pytest.mark.parametrize('command', ['eval', 'export', 'generate'])
def test_a_config_json_that_is_not_text_is_one_line(tmp_path, capsys, command):
  (tmp_path / 'config.json').write_bytes(b'\xff\xfe{"model": {}}')
  args = {'eval': [], 'export': [f'--out={tmp_path}/out'], 'generate': ['--prompt=x']}
  code, err = _run_cli([command, f'--workdir={tmp_path}', *args[command]], capsys)
  assert code == 2 and err.startswith('jaxarch: config error:') and 'not valid JSON' in err
  assert '\n' not in err


@pytest.mark.parametrize('command', [['eval'], ['train'], ['fit']])
def test_a_workdir_that_holds_no_run_is_one_line_saying_what_to_pass(tmp_path, capsys, command):
  code, err = _run_cli([*command, f'--workdir={tmp_path}'], capsys)
  assert code == 2 and '\n' not in err
  if command == ['fit']:
    assert err.endswith(f'run `jaxarch sweep --config=SWEEP_FILE.py[:ARG] --workdir={tmp_path}` '
                        'first')
  else:  # eval said "--config is required", which evaluates no trained run
    assert err.endswith('pass --config, or the --workdir of a training run')


def test_full_disk_is_found_before_training(tmp_path, data_dir, capsys, monkeypatch):
  usage = collections.namedtuple('usage', 'total used free')
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage(10**9, 10**9, 1000))
  code, err = _run_cli(['train', *TINY, f'--workdir={tmp_path}/run',
                        f'--data_dir={data_dir}'], capsys)
  # A tiny run's checkpoint in MiB, where GiB said "takes about 0.02 GiB"; 1000 bytes in KiB.
  assert code == 2 and 'has 1.0 KiB free, but one checkpoint of this run takes about ' in err
  assert re.search(r'takes about \d+\.\d MiB;', err)
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_a_config_of_another_family_on_an_existing_run_is_refused(tmp_path, data_dir, capsys):
  assert _run_cli(['train', *TINY, f'--workdir={tmp_path}', f'--data_dir={data_dir}'],
                  capsys)[0] == 0
  moe = [a.replace('dense.py', 'moe.py') for a in TINY] + ['--config.model.moe.expert_d_ff=64']
  code, err = _run_cli(['train', *moe, f'--workdir={tmp_path}', f'--data_dir={data_dir}'],
                       capsys)
  assert code == 2 and 'holds checkpoints of a dense model' in err and 'moe' in err
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  # A dense model of another shape: its checkpoint does not fit, and is left alone.
  narrower = [a for a in TINY if not a.startswith('--config.model.d_ff=')]
  code, err = _run_cli(['train', *narrower, '--config.model.d_ff=96', f'--workdir={tmp_path}',
                        f'--data_dir={data_dir}'], capsys)
  assert code == 2 and 'is not of this model' in err and 'mlp' in err
  assert '\n' not in err
  assert load_json(tmp_path / 'config.json').model.d_ff != 96  # still the checkpoints'
  # Another batch size: the state resumes; the saved data position (one packing stream
  # per row) does not apply, and is not mistaken for a corrupt checkpoint.
  code, err = _run_cli(['train', *TINY, '--config.train.batch_size=16',
                        '--config.train.steps=3', f'--workdir={tmp_path}',
                        f'--data_dir={data_dir}'], capsys)
  err = ' '.join(err.split())
  assert code == 0 and 'resumed from' in err and 'train.batch_size 8 -> 16' in err, err
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '3']
  assert not (tmp_path / 'corrupt_checkpoints').exists()
  code, err = _run_cli(['train', *TINY, f'--workdir={tmp_path}', f'--data_dir={data_dir}'],
                       capsys)  # train.steps=2, below the run's step 3
  assert code == 2 and 'train.steps=2 is below the step of the run' in err


@pytest.mark.parametrize('make_files, expected', [
    (lambda d: None, 'no files match'),
    (lambda d: [(d / f'{i}.txt').write_text('') for i in range(3)], 'are all empty'),
])
def test_missing_or_empty_corpus_is_one_line(tmp_path, data_dir, capsys, make_files,
                                            expected):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  make_files(corpus)
  code, err = _run_cli(['train', *TINY, f'--workdir={tmp_path}/run',
                        f'--data_dir={data_dir}', f'--config.data.source=files:{corpus}/*.txt'],
                       capsys)
  assert code == 2 and expected in err and '\n' not in err


def test_a_corpus_without_validation_data_trains_without_eval_and_cannot_be_evaluated(
    tmp_path, data_dir, capsys):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  (corpus / 'only.txt').write_text('a single file: all of it is training data. ' * 40)
  cfg = _cfg(data_dir, **{'train.steps': 2, 'log.every_steps': 1, 'log.eval_every_steps': 1,
                          'data.source': f'files:{corpus}/*.txt'})
  result = train(cfg, tmp_path / 'run')
  assert result['step'] == 2 and 'eval_loss' not in result
  assert not any('eval_loss' in r for r in read_metrics(tmp_path / 'run'))
  assert 'has no validation data' in ' '.join(capsys.readouterr().err.split())  # wrapped
  with pytest.raises(config_lib.ConfigError, match='no validation data.*nothing to evaluate'):
    evaluate(cfg, tmp_path / 'run')
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    evaluate(_cfg(data_dir), tmp_path / 'missing')
  assert not (tmp_path / 'missing').exists()  # a reader creates nothing


def test_a_tilde_in_a_commands_paths_is_the_home_directory(tmp_path, monkeypatch, capsys):
  """`--workdir=~/run` reaches the program unexpanded (the shell expands a tilde only at
  the start of a word): it named a folder `~` in the current directory."""
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.chdir(tmp_path)
  code, err = _run_cli(['eval', '--workdir=~/run'], capsys)
  assert code == 2 and f"{tmp_path / 'home' / 'run' / 'config.json'}" in err, err
  code, err = _run_cli(['export', '--workdir=~/run', '--out=~/out'], capsys)
  assert code == 2 and f"{tmp_path / 'home' / 'run'}" in err, err
  code, err = _run_cli(['train', '--config=~/nowhere.py:tiny', '--workdir=~/run'], capsys)
  assert code == 2 and f"{tmp_path / 'home' / 'nowhere.py'}" in err, err
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'home' / 'run')):
    jaxarch.load('~/run')
  assert not (tmp_path / '~').exists()


def test_free_space_is_counted_where_the_checkpoints_go(tmp_path, monkeypatch):
  # The checkpoints folder linked to another disk (a big volume, or a full one): the
  # checkpoint is written there, so that disk's free space decides.
  full_disk = tmp_path / 'full_disk'
  full_disk.mkdir()
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'checkpoints').symlink_to(full_disk)
  usage = collections.namedtuple('usage', 'total used free')
  free = lambda path: 1000 if os.path.realpath(path).startswith(str(full_disk)) else 10**12
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage(10**12, 0, free(path)))
  with pytest.raises(WorkdirError, match='has 1.0 KiB free, but one checkpoint'):
    check_workdir(tmp_path / 'run', tiny_config(), 10**6, has_checkpoints=False)


@pytest.mark.parametrize('args, message', [
    # MaxText's `key=value` and an override that lost its `config.`: argparse said
    # "unrecognized arguments" and nothing of --config.KEY=VALUE.
    (['train', *TINY, 'steps=5'], 'steps=5: config overrides are --config.KEY=VALUE, e.g. '
     '--config.train.steps=5'),
    (['train', *TINY, '--train.steps=5'], '--train.steps=5: config overrides are '
     '--config.KEY=VALUE, e.g. --config.train.steps=5'),
    (['train', 'configs/dense.py:tiny'],
     'configs/dense.py:tiny: give the config as --config=configs/dense.py:tiny'),
    (['generate', '--prompt=x', '--config=configs/dense.py:tiny'],
     'generate takes the config of its --workdir; drop --config=configs/dense.py:tiny'),
    # One dash: '--config.config.train.steps=5' was the advice.
    (['train', *TINY, '-config.train.steps=5'], '-config.train.steps=5: config overrides '
     'are --config.KEY=VALUE, e.g. --config.train.steps=5'),
    # A flag spelled with '-' for '_': argparse's usage, and no word of the flag.
    (['train', *TINY, '--data-dir=/data'], '--data-dir=/data: did you mean --data_dir=/data?'),
    (['generate', '--prompt=x', '--max-new-tokens=4'],
     '--max-new-tokens=4: did you mean --max_new_tokens=4?'),
    (['launch', *TINY, '--target=slurm', '--dry_run'], '--dry_run: did you mean --dry-run?'),
    # train takes --config: one dash, or none, is a misspelt --config, not one to drop.
    (['train', '-config=configs/dense.py:tiny'],
     '-config=configs/dense.py:tiny: give the config as --config=configs/dense.py:tiny')])
def test_a_misplaced_argument_says_what_it_should_be(tmp_path, capsys, args, message):
  code, err = _run_cli([*args, f'--workdir={tmp_path}/run'], capsys)
  assert code == 2 and err == f'jaxarch: {message}'
  assert not (tmp_path / 'run').exists()


def test_a_key_given_twice_says_which_value_is_taken(tmp_path, capsys):
  """The last, as absl takes it; said, since an edited command line may hold the first
  value further left, unseen."""
  code, err = _run_cli(['launch', *TINY, '--target=slurm', f'--workdir={tmp_path}/run',
                        '--dry-run', '--config.train.steps=4', '--config.train.steps=8',
                        '--config.train.lr=0.001', '--config.train.lr=0.001'], capsys)
  assert code == 0
  assert ('jaxarch: warning: --config.train.steps is given 3 times (2, 4, 8); the last, 8, is '
          'taken\n') in err
  assert 'train.lr is given' not in err  # the same value twice changes nothing


@pytest.mark.parametrize('args', [
    ['train', *TINY, '--workdir='], ['train', '--config=', '--workdir=RUN'],
    ['export', '--workdir=RUN', '--out= ']])
def test_an_empty_path_is_refused_not_taken_as_the_current_directory(
    tmp_path, monkeypatch, capsys, args):
  # `--workdir=$RUN` with RUN unset trained into the current directory; an empty --config
  # resumed the workdir's run without saying so.
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'run').mkdir()
  code, err = _run_cli([a.replace('RUN', str(tmp_path / 'run')) for a in args], capsys)
  assert code == 2 and err.endswith('is empty (an unset shell variable?); give a path')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['run']


@pytest.mark.parametrize('error', [
    AssertionError(),  # JAX_PLATFORMS=cuda without the CUDA plugin
    RuntimeError("Unable to initialize backend 'rocm': Backend 'rocm' is not in the list of "
                 "known backends: ['cpu', 'tpu']. (set JAX_PLATFORMS='' to automatically "
                 'choose an available backend)')])
@pytest.mark.parametrize('command', [['train', *TINY], ['generate', '--prompt=x']])
def test_a_platform_jax_cannot_start_is_one_line(tmp_path, monkeypatch, capsys, error,
                                                 command):
  def devices(*_):
    raise error
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text(json.dumps(tiny_config().to_dict()))
  monkeypatch.setenv('JAX_PLATFORMS', 'gpu')
  monkeypatch.setattr(jax, 'devices', devices)
  code, err = _run_cli([*command, f'--workdir={tmp_path}/run'], capsys)
  assert code == 2 and '\n' not in err
  assert err.startswith("jaxarch: JAX_PLATFORMS='gpu' names a platform jax cannot start here")
  assert err.endswith("unset it to use the devices present, or install jax for that platform, "
                      "e.g. pip install 'jax[cuda12]'")
  assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == ['config.json']


def test_a_step_out_of_device_memory_says_what_to_change(tmp_path, data_dir, monkeypatch,
                                                        capsys):
  # What XLA raises when a step's buffers do not fit (CPU, whose memory the trainer cannot
  # check first, said this as a traceback).
  def step_that_does_not_fit(*_):
    raise jax.errors.JaxRuntimeError(
        'RESOURCE_EXHAUSTED: Out of memory allocating 56506685520 bytes.')
  monkeypatch.setattr(trainer, 'make_train_step', lambda setup: step_that_does_not_fit)
  args = ['train', *TINY, f'--workdir={tmp_path}/run', f'--data_dir={data_dir}']
  code, err = _run_cli(args, capsys)
  err = err.splitlines()[-1]  # after the data preparation's progress
  assert code == 2 and err.startswith('jaxarch: out of device memory (Out of memory allocating 56506685520 '
                        'bytes) with train.batch_size=8 x data.seq_len=32 on 8 cpu devices: '
                        'lower --config.train.batch_size')
  monkeypatch.undo()  # a batch that fits, in the same workdir
  assert _run_cli(args, capsys)[0] == 0
