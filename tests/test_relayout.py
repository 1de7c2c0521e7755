"""A checkpoint read into the other layout of its layers (`train.relayout`): a run resumes
scanned or unrolled, whatever it was saved in, and decodes, exports and serves as a BiTA
base unrolled."""

import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import mesh_config, tiny_config
from jaxarch import cli, load
from jaxarch import config as config_lib
from jaxarch.export import load_safetensors
from jaxarch.models import transformer
from jaxarch.parallel import make_mesh
from jaxarch.train import checkpoint, relayout, train
from jaxarch.train.checkpoint import Checkpointer, CheckpointError
from jaxarch.train.metrics import read_metrics
from jaxarch.train.pretrained import initial_state, load_model
from jaxarch.train.state import MODEL, init_state, make_setup
from jaxarch.train.step import tree_path


def _layout(scan, pattern=('global',), **overrides):
  """5 layers whose local and global attention layers alternate (`pattern` of 2: scanned
  in 2 pairs and a last layer unrolled) or are all global (period 1); the weights are the
  same."""
  return mesh_config(tiny_config(**{
      'model.n_layers': 5, 'model.sliding_window': 8, 'model.attention_pattern': pattern,
      'model.scan_layers': scan, **overrides}), data=2, fsdp=2, tensor=2)


def _by_layer(state, period: int) -> dict[str, np.ndarray]:
  """key -> array of a state, a scanned stack's `layers/<j>` [repeats, ...] named as its
  layers `blocks/<repeat * period + j>`: the test's own reading of the layout."""
  named = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    key, x = tree_path(path), np.asarray(x)
    if (m := re.fullmatch(r'(.*)/layers/(\d+)/(.*)', key)) is None:
      named[key] = x
    else:
      named.update({f'{m[1]}/blocks/{r * period + int(m[2])}/{m[3]}': x[r]
                    for r in range(x.shape[0])})
  return named


def _save(workdir, state):
  writer = Checkpointer(workdir, async_save=False)
  writer.save(1, state)
  writer.close()


def _read(workdir, cfg, parts=None):
  abstract = make_setup(cfg, make_mesh(cfg)).abstract_state
  state, _ = Checkpointer.read(workdir, abstract, parts=parts)
  shardings = lambda tree: [x.sharding for x in jax.tree.leaves(tree)]
  wanted = {k: abstract[k] for k in parts} if parts else abstract
  assert shardings(state) == shardings(wanted)  # each array read into the model's shards
  return state


def _noisy_state(cfg):
  """A train state of `cfg` in which every array differs from every other."""
  state = init_state(cfg, make_setup(cfg, make_mesh(cfg)))
  rng = np.random.default_rng(0)

  def noisy(x):  # on the host: drawn on the devices, each shape compiled a program (5 s)
    host = np.asarray(x)
    host = (host + rng.normal(size=x.shape)).astype(x.dtype) if jnp.issubdtype(
        x.dtype, jnp.floating) else host + 1
    return jax.device_put(host, x.sharding)
  return jax.tree.map(noisy, state)


def test_a_checkpoint_is_read_into_the_other_layout_and_another_period(tmp_path):
  state = _noisy_state(_layout(False))
  unrolled = _by_layer(state, 5)
  _save(tmp_path / 'unrolled', state)

  scanned = _read(tmp_path / 'unrolled', _layout(True))  # the optimizer's moments too
  assert _by_layer(scanned, 1).keys() == unrolled.keys()
  jax.tree.map(np.testing.assert_array_equal, _by_layer(scanned, 1), unrolled)
  _save(tmp_path / 'scanned', scanned)
  pairs = _read(tmp_path / 'scanned', _layout(True, ('local', 'global')))  # period 1 -> 2
  assert pairs['params']['layers'][1]['mlp']['up'].shape[0] == 2
  assert pairs['params']['blocks'][4]['mlp']['up'].shape == (64, 128)  # the last, unrolled
  jax.tree.map(np.testing.assert_array_equal, _by_layer(pairs, 2), unrolled)
  _save(tmp_path / 'pairs', pairs)
  back = _read(tmp_path / 'pairs', _layout(False))
  jax.tree.map(np.testing.assert_array_equal, _by_layer(back, 5), unrolled)
  model = _read(tmp_path / 'pairs', _layout(False), parts=MODEL)  # what readers read
  assert set(model) == set(MODEL)
  jax.tree.map(np.testing.assert_array_equal, _by_layer(model, 5),
               {k: v for k, v in unrolled.items() if k.split('/')[0] in MODEL})


def test_megabyte_s_two_stacks_are_read_into_the_other_layout(tmp_path):
  layout = lambda scan: mesh_config(config_lib.load('configs/megabyte.py:tiny', [
      f'model.scan_layers={scan}']), data=2, fsdp=2, tensor=2)
  state = _noisy_state(layout(True))
  _save(tmp_path, state)
  unrolled = _read(tmp_path, layout(False))
  assert 'blocks' in unrolled['params']['global_model']
  assert 'blocks' in unrolled['params']['local_model']
  jax.tree.map(np.testing.assert_array_equal, _by_layer(unrolled, 1), _by_layer(state, 1))


def test_ultramem_s_memory_layers_are_read_into_the_scan_s_units_and_back(tmp_path):
  """Blocks 2-5 scan as two units of two, each with its memory layer; blocks 0, 1 and 6
  stay unrolled. Every array (weights, Adam's moments, Tucker vectors, hit counters)
  reaches its layer's place and comes back as it was."""
  unrolled_cfg, scanned_cfg = (mesh_config(config_lib.load('configs/ultramem.py:tiny', [
      'model.n_layers=7', 'model.ultramem.placement=((2, 3), (4, 5))',
      f'model.scan_layers={scan}']), data=2, fsdp=2, tensor=2) for scan in (False, True))
  state = _noisy_state(unrolled_cfg)
  _save(tmp_path / 'unrolled', state)
  scanned = _read(tmp_path / 'unrolled', scanned_cfg)
  model = lambda cfg, state: nnx.merge(make_setup(cfg, make_mesh(cfg)).graphdef,
                                       state['params'], state['model_state'])
  as_scanned = model(scanned_cfg, scanned)
  assert as_scanned.scanned_side_layers[0].memory.values.shape[0] == 2
  want = transformer.unstacked_arrays(model(unrolled_cfg, state))
  got = transformer.unstacked_arrays(as_scanned)
  assert want.keys() == got.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
  _save(tmp_path / 'scanned', scanned)
  back = _read(tmp_path / 'scanned', unrolled_cfg)
  jax.tree.map(np.testing.assert_array_equal, back, state)


def test_the_gather_holds_one_array_s_layers_twice_not_the_state(tmp_path, monkeypatch):
  """Each saved array is dropped once the model's arrays that read it are made: the live
  arrays peak near one state during the gather, not two."""
  _save(tmp_path, _noisy_state(_layout(False)))
  live = lambda: _device_bytes(jax.live_arrays())
  peaks, make = [], relayout._gatherer

  def watched(*args):
    program = make(*args)
    def run(*inputs):
      out = program(*inputs)
      peaks.append(live())
      return out
    return run

  monkeypatch.setattr(relayout, '_gatherer', watched)
  before = live()
  state = _read(tmp_path, _layout(True))
  state_bytes = _device_bytes(jax.tree.leaves(state))
  assert peaks and max(peaks) - before < 1.3 * state_bytes  # was 2x


def _device_bytes(arrays) -> int:
  """The bytes of the devices' buffers that hold `arrays`, each buffer once: an array read
  on the host holds its shards as arrays of their own too, the same buffers."""
  buffers = {}
  for x in arrays:
    for shard in x.addressable_shards:
      buffers[shard.device, shard.data.unsafe_buffer_pointer()] = shard.data.nbytes
  return sum(buffers.values())


def test_a_checkpoint_of_the_other_layout_and_another_model_says_what_differs(tmp_path):
  shapes = lambda cfg: checkpoint._shapes(make_setup(cfg, make_mesh(cfg)).abstract_state)
  unrolled = shapes(_layout(False))
  intro = ('holds its layers unrolled and does not fit this model (its layers scanned '
           '(period 2)): ')
  assert relayout.plan(unrolled, shapes(_layout(True, ('local', 'global'), **{
      'model.n_layers': 2}))) == intro + 'it has 5 layers, the model 2 (model.n_layers?)'
  assert relayout.plan(unrolled, shapes(_layout(True, ('local', 'global'), **{
      'model.qk_norm': True}))) == intro + (
          "it lacks params/blocks/4/attn/k_norm/scale/value, which the model's "
          'params/blocks/4/attn/k_norm/scale/value reads')
  assert relayout.plan(unrolled, shapes(_layout(True, **{'model.d_ff': 64}))) == (
      'holds its layers unrolled and does not fit this model (its layers scanned (period '
      '1)): it holds params/blocks/0/mlp/down/value as (128, 64) float32 per layer, where the '
      "model's params/layers/0/mlp/down/value needs (64, 64) float32")
  # In the same layout, another model is no layout's business: `mismatch` says what.
  other = shapes(_layout(False, **{'model.qk_norm': True}))
  assert relayout.plan(unrolled, other) is None
  assert checkpoint.mismatch(unrolled, other).startswith('is not of this model: 30 arrays missing')
  # Where the layouts differ, the reader says it in one line.
  cfg = _layout(False)
  _save(tmp_path, init_state(cfg, make_setup(cfg, make_mesh(cfg))))
  with pytest.raises(CheckpointError, match=r'checkpoints/1 holds its layers unrolled and '
                     r'does not fit .* it has 5 layers, the model 2 \(model.n_layers\?\)\. Use'):
    _read(tmp_path, _layout(True, **{'model.n_layers': 2}))
  # Arrays outside the stacks are checked first: another optimizer config says which.
  with pytest.raises(CheckpointError, match=r'holds the optimizer state of another config '
                     r'\(train.mu_dtype\?\)'):
    _read(tmp_path, _layout(True, **{'train.mu_dtype': 'bfloat16'}))


def _run(data_dir, steps, scan):
  return mesh_config(tiny_config(data_dir, **{
      'train.steps': steps, 'train.warmup_steps': 1, 'train.schedule': 'constant',
      'checkpoint.every_steps': 3, 'log.every_steps': 1, 'log.eval_every_steps': 3,
      'log.eval_batches': 1, 'model.dtype': 'float32', 'model.scan_layers': scan}),
      data=2, fsdp=2, tensor=2)


def test_a_run_resumes_in_the_other_layout_and_decodes_and_exports_unrolled(
    tmp_path, data_dir, capsys):
  """An unrolled run resumed scanned goes on as the unrolled run does (its weights and
  Adam's moments gathered into stacks); the scanned run is then read unrolled to decode
  and export, with the config that says so."""
  train(_run(data_dir, 3, False), tmp_path / 'unrolled')
  shutil.copytree(tmp_path / 'unrolled', tmp_path / 'scanned')
  train(_run(data_dir, 6, False), tmp_path / 'unrolled')
  capsys.readouterr()
  train(_run(data_dir, 6, True), tmp_path / 'scanned')
  said = ''.join(capsys.readouterr())
  # (The start line, with the progress display on, says: `scanned_layers`.)
  assert transformer.scanned_layers(_run(data_dir, 6, True).model) == (
      ', layers scanned: 2 periods of 1 block')
  assert transformer.scanned_layers(_layout(True, ('local', 'global')).model) == (
      ', layers scanned: 2 periods of 2 blocks, 1 block unrolled')
  assert ('its layers were saved unrolled: read scanned (period 1), as model.scan_layers=True '
          'says; the next checkpoints hold them scanned (period 1)') in said
  losses = [{m['step']: m['loss'] for m in read_metrics(tmp_path / run) if 'loss' in m}
            for run in ('unrolled', 'scanned')]
  assert sorted(losses[1]) == list(range(1, 7))
  np.testing.assert_allclose([losses[1][s] for s in (4, 5, 6)],
                             [losses[0][s] for s in (4, 5, 6)], rtol=1e-5)
  assert config_lib.load_json(tmp_path / 'scanned' / 'config.json').model.scan_layers

  _, as_saved = load_model(tmp_path / 'scanned')
  assert transformer.scanned_stacks(as_saved)
  cfg, model = load(tmp_path / 'scanned', scan_layers=False)  # as `jaxarch generate` reads
  assert cfg.model.scan_layers is False and not transformer.scanned_stacks(model)
  _, reference = load_model(tmp_path / 'unrolled')
  weights = lambda m: nnx.to_flat_state(nnx.state(m, nnx.Param))
  for (path, ours), (_, theirs) in zip(weights(model), weights(reference)):
    np.testing.assert_allclose(ours.get_value(), theirs.get_value(), rtol=1e-4, atol=1e-6,
                               err_msg=str(path))
  assert cli.main(['export', f'--workdir={tmp_path / "scanned"}', '--format=safetensors',
                   f'--out={tmp_path / "export"}']) == 0
  exported_cfg, exported = load_safetensors(tmp_path / 'export')
  assert exported_cfg.model.scan_layers is False
  jax.tree.map(np.testing.assert_array_equal, nnx.state(exported), nnx.state(model))
  with pytest.raises(ValueError, match='is an export, whose layers are unrolled'):
    load(tmp_path / 'export', scan_layers=True)


def test_bita_reads_a_scanned_base_into_its_own_layout(tmp_path, data_dir):
  base = tmp_path / 'base'
  train(_run(data_dir, 1, True), base)
  cfg = config_lib.load('configs/bita.py:tiny', [
      f'model.bita.base_workdir={base}', 'data.source=distilled:/data', 'data.seq_len=64',
      'model.scan_layers=False'])
  setup = make_setup(cfg, make_mesh(cfg))
  state = initial_state(cfg, setup)
  _, as_saved = load_model(base)  # scanned, read without a relayout: the test's own reading
  assert transformer.scanned_stacks(as_saved)
  ours = {k.removeprefix('params/base/'): v for k, v in _by_layer(state, 1).items()
          if k.startswith('params/base/')}
  assert any(k.startswith('blocks/1/') for k in ours)  # unrolled
  theirs = _by_layer({'params': nnx.state(as_saved, nnx.Param)}, 1)
  assert ours.keys() == {k.removeprefix('params/') for k in theirs}
  for key, value in theirs.items():
    np.testing.assert_array_equal(ours[key.removeprefix('params/')], value, err_msg=key)


def test_a_gather_that_fails_is_the_config_s_and_keeps_the_checkpoint(tmp_path, monkeypatch):
  """The saved arrays passed their checksums: a failure after them is not the checkpoint's,
  which a resume must not move aside as unreadable."""
  cfg = _layout(False)
  _save(tmp_path, init_state(cfg, make_setup(cfg, make_mesh(cfg))))

  def broken(*args):
    raise RuntimeError('no program')

  monkeypatch.setattr(relayout, '_gatherer', broken)
  scanned = _layout(True)
  resuming = Checkpointer(tmp_path, remove_interrupted=True)
  with pytest.raises(CheckpointError, match=r"checkpoints/1 \(its layers unrolled\) could not "
                     r"be read into this model's layout, scanned \(period 1\) \(RuntimeError: "
                     r'no program\); the checkpoint is kept'):
    resuming.restore(make_setup(scanned, make_mesh(scanned)).abstract_state, move_aside=True)
  resuming.close()
  assert (tmp_path / 'checkpoints' / '1').is_dir()
  assert not (tmp_path / 'corrupt_checkpoints').exists()
