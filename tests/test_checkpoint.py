"""Checkpoints: exact round trip, resharding restore, resume, corrupt-checkpoint fallback."""

import jax
import numpy as np

from conftest import make_batch, mesh_config, tiny_config
from jaxarch.parallel import global_batch, make_mesh
from jaxarch.train.checkpoint import Checkpointer
from jaxarch.train.state import init_state, make_setup
from jaxarch.train.step import make_train_step


def _setup(cfg):
  setup = make_setup(cfg, make_mesh(cfg))
  return setup, make_train_step(setup)


def _next_loss(setup, step, state, seed=5):
  batch = global_batch(make_batch(8, 32, seed=seed), setup.batch_sharding)
  return float(step(state, batch)[1]['loss'])


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               jax.device_get(a), jax.device_get(b))


def test_save_restore_gives_identical_state_and_next_loss(tmp_path):
  cfg = mesh_config(tiny_config(), data=2, fsdp=2, tensor=2)
  setup, step = _setup(cfg)
  state = init_state(cfg, setup)
  state, _ = step(state, global_batch(make_batch(8, 32), setup.batch_sharding))
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, state)
  ckpt.wait()
  restored, at = Checkpointer(tmp_path).restore(setup.abstract_state)
  assert at == 1
  _assert_trees_equal(state, restored)
  first = _next_loss(setup, step, state)
  assert _next_loss(setup, step, restored) == first


def test_restore_onto_a_different_mesh_gives_the_same_next_loss(tmp_path):
  saved_cfg = mesh_config(tiny_config(**{'model.dtype': 'float32'}), data=8)
  setup, step = _setup(saved_cfg)
  state = init_state(saved_cfg, setup)
  ckpt = Checkpointer(tmp_path)
  ckpt.save(0, state)
  ckpt.close()
  expected = _next_loss(setup, step, state)
  other_cfg = mesh_config(tiny_config(**{'model.dtype': 'float32'}), fsdp=4, tensor=2)
  other, other_step = _setup(other_cfg)
  restored, _ = Checkpointer(tmp_path).restore(other.abstract_state)
  gate = restored['params']['blocks'][0]['mlp']['gate'].get_value()
  assert gate.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  np.testing.assert_allclose(_next_loss(other, other_step, restored), expected, rtol=1e-5)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  cfg = mesh_config(tiny_config(), data=8)
  setup, step = _setup(cfg)
  state = init_state(cfg, setup)
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, state)
  ckpt.wait()
  state, _ = step(state, global_batch(make_batch(8, 32), setup.batch_sharding))
  ckpt.save(2, state)
  ckpt.close()
  # Destroy the array data of step 2 (e.g. a disk that filled up during the write).
  for f in (tmp_path / 'checkpoints' / '2' / 'state').rglob('*'):
    if f.is_file() and f.suffix not in ('.json',) and f.name != '_METADATA':
      f.write_bytes(b'garbage')
  restored, at = Checkpointer(tmp_path).restore(setup.abstract_state)
  assert at == 1
  assert 'unreadable' in caplog.text
  _assert_trees_equal(restored['params'], init_state(cfg, setup)['params'])  # step 1's
