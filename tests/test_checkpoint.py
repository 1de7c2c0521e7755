"""Checkpoints: exact round trip, resharding restore, corrupt and partial checkpoints,
checkpoints of another model, failed writes."""

import errno
import json
import logging
import os
import shutil
import types

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from orbax.checkpoint._src.multihost import multihost

from conftest import devices, make_batch, mesh_config, tiny_config
from jaxarch import config as config_lib
from jaxarch import data
from jaxarch import load
from jaxarch.parallel import global_batch, make_mesh
from jaxarch.train import checkpoint
from jaxarch.train.checkpoint import Checkpointer, CheckpointError
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


def _saved_initial_state(tmp_path, **mesh) -> float:
  """Saves the initial state of an fp32 tiny run on `mesh`; -> its next-step loss."""
  cfg = mesh_config(tiny_config(**{'model.dtype': 'float32'}), **mesh)
  setup, step = _setup(cfg)
  state = init_state(cfg, setup)
  ckpt = Checkpointer(tmp_path)
  ckpt.save(0, state)
  ckpt.close()
  return _next_loss(setup, step, state)


def test_restore_onto_a_different_mesh_gives_the_same_next_loss(tmp_path):
  expected = _saved_initial_state(tmp_path, data=8)
  other_cfg = mesh_config(tiny_config(**{'model.dtype': 'float32'}), fsdp=4, tensor=2)
  other, other_step = _setup(other_cfg)
  restored, _ = Checkpointer(tmp_path).restore(other.abstract_state)
  gate = restored['params']['blocks'][0]['mlp']['gate'].get_value()
  assert gate.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  np.testing.assert_allclose(_next_loss(other, other_step, restored), expected, rtol=1e-5)


def _two_checkpoints(tmp_path):
  """Checkpoints 1 (the initial state) and 2 (after one step) of a tiny run; -> (config,
  setup, the state of step 2)."""
  cfg = mesh_config(tiny_config(), data=8)
  setup, step = _setup(cfg)
  state = init_state(cfg, setup)
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, state)
  ckpt.wait()
  state, _ = step(state, global_batch(make_batch(8, 32), setup.batch_sharding))
  ckpt.save(2, state)
  ckpt.close()
  return cfg, setup, state


def test_restore_on_fewer_devices_gives_the_same_next_loss(tmp_path):
  expected = _saved_initial_state(tmp_path, data=2, fsdp=4)
  # Half the devices: what is left of a job after losing a host.
  fewer_cfg = mesh_config(tiny_config(**{'model.dtype': 'float32'}), fsdp=2, tensor=2)
  fewer = make_setup(fewer_cfg, make_mesh(fewer_cfg, devices(4)))
  restored, _ = Checkpointer(tmp_path).restore(fewer.abstract_state)
  assert all(x.sharding.mesh.size == 4 for x in jax.tree.leaves(restored))
  np.testing.assert_allclose(_next_loss(fewer, make_train_step(fewer), restored), expected,
                             rtol=1e-5)


def test_a_save_on_cpu_writes_each_replicated_array_whole(tmp_path, monkeypatch):
  """Orbax's replica-parallel save slices each replicated array among its replicas, with a
  program compiled per shape: on CPU the replicas share one memory, so it gained nothing
  (2.8 s of a tiny UltraMem state's 3.9 s first save on 8 devices)."""
  sliced = []
  slice_in_dim = jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, 'slice_in_dim',
                      lambda *args, **kwargs: sliced.append(1) or slice_in_dim(*args, **kwargs))
  mesh = jax.make_mesh((8,), ('data',), devices=jax.devices())
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {'w': jax.device_put(jnp.arange(64.0).reshape(16, 4), replicated)}
  writer = Checkpointer(tmp_path, async_save=False)
  writer.save(1, state)
  writer.close()
  assert not sliced
  # Orbax's layout as its own handler writes it: each array's metadata too.
  assert [p.name for p in (tmp_path / 'checkpoints' / '1' / 'state').iterdir()
          if p.name == 'array_metadatas'] == ['array_metadatas']
  restored, _ = Checkpointer.read(tmp_path, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  np.testing.assert_array_equal(restored['w'], state['w'])


def test_checkpoint_of_another_model_is_an_error_not_skipped(tmp_path):
  cfg = mesh_config(tiny_config(), data=8)
  setup, _ = _setup(cfg)
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, init_state(cfg, setup))
  ckpt.close()
  wider = mesh_config(tiny_config(**{'model.d_ff': 256}), data=8)
  with pytest.raises(CheckpointError, match=r'not of this model: .*differ in shape.*e\.g\. '
                     r'params/.*mlp.*Use a new --workdir'):  # a parameter, not its moments
    Checkpointer(tmp_path).restore(_setup(wider)[0].abstract_state)
  with pytest.raises(CheckpointError, match=r'differ in shape.*\. Read it with the config it '
                     r'was trained with\.$'):  # a reader (generate, export): no new workdir
    Checkpointer.read(tmp_path, _setup(wider)[0].abstract_state, parts=('params',))
  moments = mesh_config(tiny_config(**{'train.mu_dtype': 'bfloat16'}), data=8)
  with pytest.raises(CheckpointError, match=r'holds the optimizer state of another config '
                     r'\(train.mu_dtype\?\): .*saved .* float32, model .* bfloat16'):
    Checkpointer(tmp_path).restore(_setup(moments)[0].abstract_state)
  deeper = mesh_config(tiny_config(**{'model.n_layers': 3}), data=8)
  with pytest.raises(CheckpointError, match=r'arrays missing \(e\.g\. .*blocks/2'):
    Checkpointer(tmp_path).restore(_setup(deeper)[0].abstract_state)
  assert (tmp_path / 'checkpoints' / '1').is_dir()  # left as it was


# Reading the damaged files fails inside orbax, whose pending reads then call back into
# its closed event loop ("Event loop is closed", unraisable): those reports are dropped,
# not printed by the hundred.
@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
def test_corrupt_or_partial_latest_checkpoint_is_skipped_moved_aside_by_the_trainer(
    tmp_path, caplog, monkeypatch):
  cfg, setup, state = _two_checkpoints(tmp_path)  # one setup serves both faults
  # Both faults within one second: the second copy moved aside must not land in the first.
  monkeypatch.setattr(checkpoint, 'time', types.SimpleNamespace(time=lambda: 1.7e9))
  state_dir = tmp_path / 'checkpoints' / '2' / 'state'

  def garbage():  # the array data destroyed (e.g. a disk that filled up during the write)
    for f in state_dir.rglob('*'):
      if f.is_file() and f.suffix != '.json' and f.name != '_METADATA':
        f.write_bytes(b'garbage')

  def partial():  # a copy that stopped half way: array files cut short, some missing
    files = sorted(f for f in state_dir.rglob('*') if f.is_file() and f.parent.name == 'd')
    for f in files[::2]:
      f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
    for f in files[1::2]:
      f.unlink()

  ckpt = Checkpointer(tmp_path)
  for n, damage in enumerate((garbage, partial), start=1):
    damage()
    caplog.clear()
    assert ckpt.restore(setup.abstract_state)[1] == 1  # a reader: skipped, left in place
    assert 'unreadable' in caplog.text and (tmp_path / 'checkpoints' / '2').is_dir()
    caplog.clear()
    restored, at = ckpt.restore(setup.abstract_state, move_aside=True)  # the trainer
    assert at == 1 and 'unreadable' in caplog.text, damage.__name__
    _assert_trees_equal(restored['params'], init_state(cfg, setup)['params'])  # step 1's
    assert not (tmp_path / 'checkpoints' / '2').exists()
    assert sorted(p.name.split('-')[0]
                  for p in (tmp_path / 'corrupt_checkpoints').iterdir()) == ['2'] * n
    ckpt.save(2, state)  # the resumed run writes step 2 again
    ckpt.wait()
  ckpt.close()
  again = Checkpointer(tmp_path)
  assert again.restore(setup.abstract_state)[1] == 2
  again.close()


# TensorStore reports failed reads and writes as ValueErrors whose text holds the errno.
def _tensorstore_error(code: str, errno_: int) -> ValueError:
  return ValueError(f'{code}: Error writing "params.x/0" in OCDBT database at local file '
                    '"/ckpt/2.orbax-checkpoint-tmp/": Failed to write 511420 bytes to file '
                    f"11: {os.strerror(errno_)} [os_error_code='{errno_}']")


@pytest.mark.parametrize('error,says', [
    (RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB'),
     'ran out of device memory.*kept'),
    # Not the checkpoint's fault: moving the checkpoints aside would lose them all.
    (OSError(errno.EIO, os.strerror(errno.EIO)), 'could not be read.*checkpoints are kept'),
    (_tensorstore_error('PERMISSION_DENIED', errno.EACCES), 'Permission denied.*are kept'),
], ids=['out_of_memory', 'io_error', 'permission'])
def test_a_restore_that_fails_for_want_of_memory_or_a_readable_disk_keeps_the_checkpoints(
    tmp_path, monkeypatch, error, says):
  cfg = mesh_config(tiny_config(), data=8)
  setup, _ = _setup(cfg)
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, init_state(cfg, setup))
  ckpt.save(2, init_state(cfg, setup))

  def fail(*args, **kwargs):
    raise error

  monkeypatch.setattr(ckpt.manager, 'restore', fail)
  with pytest.raises(CheckpointError, match=says):
    ckpt.restore(setup.abstract_state, move_aside=True)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['1', '2']


def _state_and_data(data_dir):
  """(setup, state, a function making a fresh training-data iterator) of `tiny` on data=8."""
  cfg = mesh_config(tiny_config(data_dir), data=8)
  setup, _ = _setup(cfg)
  fresh = lambda **kw: iter(data.make_train_dataset(
      cfg.data, seed=0, **{'global_batch_size': 8, **kw}))
  return setup, init_state(cfg, setup), fresh


def _save_data_positions(where, iterators):
  """Replaces checkpoint `where`'s data positions with those of `iterators`, as that many
  processes would have saved them."""
  for old in (where / 'data').glob('process_*.json'):
    old.unlink()
  for index, it in enumerate(iterators):
    name = f'process_{index}-of-{len(iterators)}.json'
    (where / 'data' / name).write_text(json.dumps(it.get_state()))


def test_data_positions_of_another_process_count_are_shared_out_again(tmp_path, data_dir,
                                                                     caplog):
  setup, state, fresh = _state_and_data(data_dir)
  saved = fresh()
  first_batch = next(saved)
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, state, saved)
  ckpt.close()
  after_saved = next(saved)
  saved.close()

  def restored_next_batch():
    it = fresh()
    try:
      restored, at = Checkpointer(tmp_path).restore(setup.abstract_state, it)
      _assert_trees_equal(restored, state)
      return at, next(it)
    finally:
      it.close()

  at, batch = restored_next_batch()  # same process count: the saved position
  assert at == 1 and (batch['inputs'] == after_saved['inputs']).all()
  where = tmp_path / 'checkpoints' / '1'
  assert [f.name for f in (where / 'data').glob('process_*.json')] == ['process_0-of-1.json']
  two = [fresh(process_index=p, process_count=2) for p in range(2)]  # saved by 2 processes
  for it in two:
    next(it)
  _save_data_positions(where, two)
  at, batch = restored_next_batch()  # their streams, dealt out to this one process
  assert at == 1 and (batch['inputs'] == after_saved['inputs']).all()
  # A position of other streams than this process reads (under another mesh) in the
  # file of this process: not applied to its streams; with the other processes' gone,
  # the data start afresh.
  _save_data_positions(where, [two[1]])
  caplog.clear()
  at, batch = restored_next_batch()
  assert at == 1 and (batch['inputs'] == first_batch['inputs']).all()
  assert 'hold streams [4, 5, 6, 7]..., not the 8' in caplog.text
  _save_data_positions(where, two)
  plain = iter(grain.MapDataset.range(10).to_iter_dataset())  # cannot share positions out
  caplog.clear()
  assert Checkpointer(tmp_path).restore(setup.abstract_state, plain)[1] == 1
  assert next(plain) == 0
  assert ('the data positions of other processes (process_0-of-2.json, process_1-of-2.json)'
          in caplog.text and 'start afresh' in caplog.text)
  (where / 'data' / 'process_1-of-2.json').unlink()  # a partial copy
  with pytest.raises(CheckpointError, match=r'could not be restored: FileNotFoundError: .*'
                     r'incomplete set of data positions \(process_0-of-2.json\)'):
    Checkpointer(tmp_path).restore(setup.abstract_state, fresh(), step=1)


def test_a_damaged_checkpoint_does_not_leave_its_data_position_for_the_previous_one(
    tmp_path, data_dir, caplog):
  # Checkpoint 2's position is set on the iterator before its arrays fail their checksum;
  # checkpoint 1's position does not apply (saved by 2 processes under another batch
  # size): the state of step 1 must go with data that start afresh, not with the data
  # after step 2's position.
  setup, state, fresh = _state_and_data(data_dir)
  it = fresh()
  first_batch = next(it)
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, state, it)
  for _ in range(3):
    next(it)
  ckpt.save(2, state, it)
  ckpt.close()
  it.close()
  other = [fresh(global_batch_size=4, process_index=p, process_count=2) for p in range(2)]
  for other_it in other:
    next(other_it)
  _save_data_positions(tmp_path / 'checkpoints' / '1', other)
  checksums = tmp_path / 'checkpoints' / '2' / 'checksums' / 'metadata'
  saved = json.loads(checksums.read_text())
  checksums.write_text(json.dumps(jax.tree.map(lambda x: x + 1, saved)))  # a bit flipped
  it = fresh()
  try:
    restored, at = Checkpointer(tmp_path).restore(setup.abstract_state, it, move_aside=True)
    assert at == 1 and 'unreadable' in caplog.text and 'batch_size 4 -> 8' in caplog.text
    assert 'start afresh' in caplog.text
    assert (next(it)['inputs'] == first_batch['inputs']).all()
  finally:
    it.close()


@pytest.mark.parametrize('damage', ['garbled array bytes', 'data position lost',
                                    'data item lost', 'checksums lost', 'array index lost'])
def test_a_damaged_latest_checkpoint_is_detected_and_the_previous_one_used(
    tmp_path, data_dir, damage, caplog):
  cfg = mesh_config(tiny_config(data_dir), data=8)
  setup, _ = _setup(cfg)
  state = init_state(cfg, setup)
  it = iter(data.make_train_dataset(cfg.data, seed=0, global_batch_size=8))
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, state, it)
  ckpt.save(2, jax.tree.map(lambda x: x + 1 if x.dtype == np.float32 else x, state), it)
  ckpt.close()
  latest = tmp_path / 'checkpoints' / '2'
  if damage == 'garbled array bytes':  # in the middle of the largest file: the arrays'
    f = max((f for f in (latest / 'state').rglob('*') if f.is_file()),
            key=lambda f: f.stat().st_size)
    data_bytes = bytearray(f.read_bytes())
    middle = len(data_bytes) // 2
    data_bytes[middle:middle + 64] = bytes(b ^ 0xFF for b in data_bytes[middle:middle + 64])
    f.write_bytes(bytes(data_bytes))
  elif damage == 'data position lost':  # a copy cut short
    for f in (latest / 'data').glob('process_*'):
      f.unlink()
  elif damage == 'array index lost':  # said as such, not as Orbax's AttributeError
    (latest / 'state' / '_METADATA').unlink()
  else:  # a copy that left out a whole item (its arrays could not be verified)
    shutil.rmtree(latest / damage.split()[0])
  try:
    restored, at = Checkpointer(tmp_path).restore(setup.abstract_state, it, move_aside=True)
  finally:
    it.close()
  assert at == 1 and 'checkpoint' in caplog.text and 'unreadable' in caplog.text
  if damage == 'array index lost':
    assert 'its state/_METADATA (what arrays it holds) went missing' in caplog.text
  _assert_trees_equal(restored, state)
  assert [p.name.split('-')[0] for p in (tmp_path / 'corrupt_checkpoints').iterdir()] == ['2']
  if damage == 'checksums lost':  # with the metadata that listed them: not silent either
    shutil.rmtree(tmp_path / 'checkpoints' / '1' / 'checksums')
    (tmp_path / 'checkpoints' / '1' / '_CHECKPOINT_METADATA').unlink()
    caplog.clear()
    restored, at = Checkpointer(tmp_path).restore(setup.abstract_state)
    assert at == 1 and 'has no checksums: its arrays are restored unverified' in caplog.text


def test_arrays_without_a_checksum_are_restored_with_a_warning(tmp_path, caplog):
  # A checksums file emptied by hand (or written in part) verified nothing, silently.
  state = {'w': np.arange(4, dtype=np.float32), 'b': np.ones(2, np.float32)}
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, state)
  ckpt.close()
  listed = next((tmp_path / 'checkpoints' / '1' / 'checksums').glob('*'))
  listed.write_text(json.dumps({'b': json.loads(listed.read_text())['b']}))
  restored, at = Checkpointer(tmp_path).restore(jax.tree.map(np.zeros_like, state))
  assert at == 1 and (restored['w'] == state['w']).all()
  assert 'no checksums for 1 of its 2 arrays (e.g. w)' in caplog.text


def test_the_last_checkpoints_and_the_best_evaluated_one_are_kept(tmp_path, caplog):
  state = {'w': np.arange(4, dtype=np.float32), 'step': np.int32(0)}
  kept = lambda: sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir())
  ckpt = Checkpointer(tmp_path, keep=1, keep_best=True, async_save=False)
  with caplog.at_level(logging.WARNING):
    for step, eval_loss in [(1, 2.0), (2, 1.0), (3, None), (4, 3.0), (5, float('nan'))]:
      ckpt.save(step, state, eval_loss=eval_loss)
  assert kept() == [2, 5]
  # Saves between evaluations have no eval_loss, by design: Orbax warned of each.
  assert 'tracked_metric' not in caplog.text
  ckpt.close()
  again = Checkpointer(tmp_path, keep=1, keep_best=True, async_save=False)  # resumed
  again.save(6, state)
  assert kept() == [2, 6]  # the best one's eval_loss was read back
  again.save(7, state, eval_loss=0.5)
  again.save(8, state)
  assert kept() == [7, 8]
  again.save(9, state, eval_loss=0.5)  # a tie: the newer one is kept (README)
  again.save(10, state)
  assert kept() == [9, 10]
  again.close()


def test_a_save_cut_short_by_a_kill_is_removed_by_the_next_writer_not_by_readers(tmp_path):
  state = {'w': np.arange(4, dtype=np.float32), 'step': np.int32(0)}
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, state)
  ckpt.close()
  # What kill -9 during the save of step 2 leaves: Orbax's temporary directory, which no
  # later save of another step replaces (up to a checkpoint's size on disk, each time).
  cut_short = tmp_path / 'checkpoints' / '2.orbax-checkpoint-tmp'
  shutil.copytree(tmp_path / 'checkpoints' / '1', cut_short)
  Checkpointer(tmp_path).close()  # a reader (e.g. `jaxarch eval` while a run saves)
  assert cut_short.is_dir()
  writer = Checkpointer(tmp_path, async_save=False, remove_interrupted=True)  # the trainer
  writer.save(3, state)
  writer.close()
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['1', '3']


def test_a_file_named_like_a_step_is_no_checkpoint(tmp_path):
  # Orbax lists no step for it: counted as one, the trainer refused to start ("no
  # checkpoint could be restored, all moved aside") on every run, having moved nothing.
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'checkpoints' / '7').write_text('notes')
  assert not Checkpointer.exists(tmp_path) and Checkpointer.latest(tmp_path) is None
  (tmp_path / 'checkpoints' / '5').mkdir()
  assert Checkpointer.latest(tmp_path) == 5


@pytest.mark.parametrize('failure', [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    _tensorstore_error('RESOURCE_EXHAUSTED', errno.ENOSPC)], ids=['os_error', 'tensorstore'])
def test_a_full_disk_is_a_one_line_error_naming_the_intact_checkpoint(tmp_path, monkeypatch,
                                                                       failure):
  cfg = mesh_config(tiny_config(), data=8)
  setup, _ = _setup(cfg)
  state = init_state(cfg, setup)
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, state)

  def no_space(*args, **kwargs):
    raise failure

  monkeypatch.setattr(ckpt.manager, 'save', no_space)
  with pytest.raises(CheckpointError) as error:
    ckpt.save(2, state)
  message = str(error.value)
  assert 'could not write checkpoint 2' in message and 'no space left' in message
  assert 'checkpoint 1 is intact' in message and '\n' not in message
  # Closing on the same full disk (the trainer's cleanup) says so in one line, too.
  close = ckpt.manager.close
  monkeypatch.setattr(ckpt.manager, 'close', no_space)
  with pytest.raises(CheckpointError, match='could not write checkpoint 2 in .*no space left.*'
                     'checkpoint 1 is intact'):  # the same failed write: named as the first
    ckpt.close()
  close()


def test_a_read_only_checkpoints_directory_fails_an_asynchronous_save_at_once_saying_so(
    tmp_path, monkeypatch):
  # Orbax made the step's directories in a thread, whose failure left the save waiting for
  # them (5 minutes), then saying "Timeout waiting for key '.../step_directory_creation'".
  monkeypatch.setattr(multihost, 'coordination_timeout', lambda: 3)  # that wait, shorter
  state = {'w': np.arange(4, dtype=np.float32), 'step': np.int32(0)}
  ckpt = Checkpointer(tmp_path, async_save=True)
  ckpt.save(1, state)
  ckpt.wait()
  makedirs = os.makedirs
  def read_only(path, *args, **kwargs):
    if 'orbax-checkpoint-tmp' in str(path):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    return makedirs(path, *args, **kwargs)
  monkeypatch.setattr(os, 'makedirs', read_only)
  with pytest.raises(CheckpointError, match='could not write checkpoint 2 in .*: Read-only '
                     'file system; checkpoint 1 is intact'):
    ckpt.save(2, state)
  monkeypatch.undo()
  ckpt.close()


def test_a_failed_asynchronous_write_is_named_by_its_own_step(tmp_path, monkeypatch):
  # It surfaces as the next checkpoint is saved, which must not take the blame.
  cfg = mesh_config(tiny_config(), data=8)
  setup, _ = _setup(cfg)
  state = init_state(cfg, setup)
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, state)
  ckpt.save(2, state)

  def no_space(*args, **kwargs):
    raise _tensorstore_error('RESOURCE_EXHAUSTED', errno.ENOSPC)

  monkeypatch.setattr(ckpt.manager, 'wait_until_finished', no_space)
  with pytest.raises(CheckpointError,
                     match='could not write checkpoint 2 .*no space left.*checkpoint 1 is'):
    ckpt.save(3, state)
  monkeypatch.undo()
  ckpt.close()


def test_readers_say_whether_there_is_no_checkpoint_or_none_restores_and_write_nothing(
    tmp_path):
  cfg = mesh_config(tiny_config(), data=8)
  setup, _ = _setup(cfg)
  with pytest.raises(FileNotFoundError, match='no checkpoint in .*train first'):
    Checkpointer.read(tmp_path, setup.abstract_state)
  assert not (tmp_path / 'checkpoints').exists()  # a reader creates nothing
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, init_state(cfg, setup))
  ckpt.close()
  shutil.rmtree(tmp_path / 'checkpoints' / '1' / 'state')
  with pytest.raises(CheckpointError, match='none of the checkpoints in .* could be restored'):
    Checkpointer.read(tmp_path, setup.abstract_state)
  assert (tmp_path / 'checkpoints' / '1').is_dir()  # left where it was


def _counting_reads(monkeypatch) -> list:
  """The arrays Orbax reads from now on, as it reads them."""
  read = []
  deserialize = ocp.type_handlers.ArrayHandler.deserialize

  async def counting(self, infos, args=None):
    arrays = await deserialize(self, infos, args)
    read.extend(arrays)
    return arrays

  monkeypatch.setattr(ocp.type_handlers.ArrayHandler, 'deserialize', counting)
  return read


def test_readers_of_the_model_read_its_shards_and_not_the_optimizer_state(tmp_path,
                                                                          monkeypatch):
  """Evaluation, generation and export need the weights alone: reading the optimizer state
  too (twice the weights under Adam) took three times the model's memory on the devices,
  enough to fail a model that fits them. The trainer reads it all."""
  cfg = mesh_config(tiny_config(), fsdp=4, tensor=2)
  setup, _ = _setup(cfg)
  state = init_state(cfg, setup)
  config_lib.save(cfg, tmp_path / 'config.json')
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, state)
  ckpt.close()
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  read = _counting_reads(monkeypatch)
  _, model = load(tmp_path)
  assert nbytes(read) == nbytes([state['params'], state['model_state']]) < nbytes(state) / 2
  _assert_trees_equal(nnx.state(model, nnx.Param), state['params'])
  gate = model.blocks[0].mlp.gate.get_value()
  assert gate.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  read.clear()
  restored, _ = Checkpointer(tmp_path).restore(setup.abstract_state)
  assert nbytes(read) == nbytes(state)
  _assert_trees_equal(restored, state)


@pytest.mark.parametrize('metadata', ['lost', 'garbled'])
def test_a_data_position_lost_with_the_metadata_is_not_silent(tmp_path, data_dir, caplog,
                                                              metadata):
  # A partial copy that lost the data item and the metadata that listed it: the state
  # cannot come with its data position, and that must not pass unnoticed (nor when the
  # metadata is there but unreadable: it listed nothing either).
  cfg = mesh_config(tiny_config(data_dir), data=8)
  setup = make_setup(cfg, make_mesh(cfg))
  state = init_state(cfg, setup)
  it = iter(data.make_train_dataset(cfg.data, seed=0, global_batch_size=8))
  first = next(it)
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, state, it)
  next(it)
  ckpt.save(2, state, it)
  ckpt.close()
  it.close()
  latest = tmp_path / 'checkpoints' / '2'
  shutil.rmtree(latest / 'data')
  if metadata == 'lost':
    (latest / '_CHECKPOINT_METADATA').unlink()
  else:
    (latest / '_CHECKPOINT_METADATA').write_bytes(b'\x00' * 64)  # a copy's unwritten blocks
  it = iter(data.make_train_dataset(cfg.data, seed=0, global_batch_size=8))
  try:
    restored, at = Checkpointer(tmp_path).restore(setup.abstract_state, it, move_aside=True)
    batch = next(it)
  finally:
    it.close()
  resumed_at_start = (batch['inputs'] == first['inputs']).all()
  assert at == 1 or (resumed_at_start and 'afresh' in caplog.text)


def test_a_garbled_eval_loss_is_a_damaged_checkpoint_not_a_crash(tmp_path, caplog):
  # Orbax reads every checkpoint's eval_loss as it opens the directory: one cut short by a
  # bad copy stopped every resume, evaluation and load with a JSONDecodeError.
  state = {'w': np.arange(4, dtype=np.float32)}
  ckpt = Checkpointer(tmp_path, keep_best=True, async_save=False)  # as the trainer's
  ckpt.save(1, state, eval_loss=2.0)
  ckpt.save(2, {'w': state['w'] + 1}, eval_loss=1.0)
  ckpt.close()
  metrics = tmp_path / 'checkpoints' / '2' / 'metrics' / 'metrics'
  metrics.write_text(metrics.read_text()[:7])
  target = jax.tree.map(np.zeros_like, state)
  restored, at = Checkpointer.read(tmp_path, target)  # a reader: skipped, left in place
  assert at == 1 and (restored['w'] == state['w']).all() and metrics.exists()
  assert 'its eval_loss (metrics/metrics) is garbled' in caplog.text
  trainer = Checkpointer(tmp_path, keep_best=True, remove_interrupted=True)  # resuming
  restored, at = trainer.restore(target, move_aside=True)
  trainer.close()
  assert at == 1 and (restored['w'] == state['w']).all()
  assert [p.name.split('-')[0] for p in (tmp_path / 'corrupt_checkpoints').iterdir()] == ['2']


def test_a_run_state_lost_with_the_metadata_is_none_not_empty(tmp_path):
  # Orbax's reader passes a missing or unreadable _CHECKPOINT_METADATA off as one without
  # custom metadata, so the trainer took a lost run state for a fresh one.
  state = {'w': np.arange(4, dtype=np.float32)}
  ckpt = Checkpointer(tmp_path, keep=4, async_save=False)
  ckpt.save(1, state)  # saved without a run state (as before 2026-12-04)
  for step in (2, 3, 4):
    ckpt.save(step, state, run_state={'nonfinite_steps_in_a_row': 2})
  ckpt.close()
  metadata = lambda step: tmp_path / 'checkpoints' / str(step) / '_CHECKPOINT_METADATA'
  metadata(3).write_text(metadata(3).read_text()[:-20])  # cut short
  metadata(4).unlink()
  ckpt = Checkpointer(tmp_path, async_save=False)
  assert ckpt.run_state(1) == {} and ckpt.run_state(2) == {'nonfinite_steps_in_a_row': 2}
  assert ckpt.run_state(3) is None and ckpt.run_state(4) is None
  ckpt.close()


def _flip_a_digit(path, key):
  """`path` with the first digit after `"key": ` raised by one (a flipped bit, 0x30 -> 0x31,
  that leaves valid JSON)."""
  text = path.read_text()
  at = text.index(f'"{key}": ') + len(f'"{key}": ')
  path.write_text(text[:at] + str(int(text[at]) + 1) + text[at + 1:])


@pytest.mark.parametrize('iterator', ['packing streams', 'plain', 'dealt from 2 processes'])
def test_a_flipped_digit_in_a_data_position_is_a_damaged_checkpoint(tmp_path, data_dir,
                                                                     caplog, iterator):
  # Valid JSON still: the run resumed from checkpoint 2 with its data skipping ahead.
  cfg = tiny_config(data_dir)
  fresh = {'plain': lambda **kw: iter(grain.MapDataset.range(100).to_iter_dataset()),
           }.get(iterator, lambda **kw: iter(data.make_train_dataset(
               cfg.data, seed=0, **{'global_batch_size': 8, **kw})))
  state = {'w': np.arange(4, dtype=np.float32)}
  target = jax.tree.map(np.zeros_like, state)
  it = fresh()
  batches = [next(it)]
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, state, it)
  batches += [next(it), next(it)]
  ckpt.save(2, state, it)
  batches.append(next(it))
  ckpt.close()
  it.close()
  same = lambda a, b: np.array_equal(a['inputs'], b['inputs']) if isinstance(a, dict) else (
      a == b)
  where = tmp_path / 'checkpoints' / '2' / 'data'
  damaged = where / 'process_0-of-1.json'
  if iterator == 'dealt from 2 processes':  # positions of 2 processes, sealed as they save
    two = [fresh(process_index=p, process_count=2) for p in range(2)]
    for other in two:
      for _ in range(3):
        next(other)
    damaged.unlink()
    for p, other in enumerate(two):
      (where / f'process_{p}-of-2.json').write_text(
          json.dumps(checkpoint._seal(other.get_state()), indent=4))  # pylint: disable=protected-access
    it = fresh()
    assert Checkpointer(tmp_path).restore(target, it)[1] == 2  # dealt out, checked
    assert same(next(it), batches[3])
    it.close()
    damaged = where / 'process_1-of-2.json'
  _flip_a_digit(damaged, 'next_index')
  it = fresh()
  try:
    restored, at = Checkpointer(tmp_path).restore(target, it, move_aside=True)
    assert at == 1 and same(next(it), batches[1])
  finally:
    it.close()
  assert f'{damaged.name} does not match its sha256' in caplog.text
  assert 'unreadable' in caplog.text and 'trying the previous one' in caplog.text


def test_a_flipped_digit_in_the_run_state_loses_it(tmp_path, caplog):
  # The trainer resumed counting non-finite steps in a row from 3, not 2, silently.
  state = {'w': np.arange(4, dtype=np.float32)}
  ckpt = Checkpointer(tmp_path, async_save=False)
  for step in (1, 2):
    ckpt.save(step, state, run_state={'nonfinite_steps_in_a_row': 2})
  ckpt.close()
  metadata = tmp_path / 'checkpoints' / '2' / '_CHECKPOINT_METADATA'
  _flip_a_digit(metadata, 'nonfinite_steps_in_a_row')
  ckpt = Checkpointer(tmp_path, async_save=False)
  assert ckpt.run_state(1) == {'nonfinite_steps_in_a_row': 2} and ckpt.run_state(2) is None
  ckpt.close()
  assert 'its run state (_CHECKPOINT_METADATA custom_metadata) does not match' in caplog.text


def test_side_files_saved_without_their_sha256_restore_as_before(tmp_path, caplog):
  # Checkpoints written before the data position and the run state held a sha256.
  state = {'w': np.arange(4, dtype=np.float32)}
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  next(it)
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, state, it, run_state={'nonfinite_steps_in_a_row': 2})
  ckpt.close()
  step = tmp_path / 'checkpoints' / '1'
  for path, key in [(step / 'data' / 'process_0-of-1.json', None),
                    (step / '_CHECKPOINT_METADATA', 'custom_metadata')]:
    saved = json.loads(path.read_text())
    inner = saved[key] if key else saved
    del inner['sha256']
    path.write_text(json.dumps(saved, indent=4))
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  ckpt = Checkpointer(tmp_path, async_save=False)
  restored, at = ckpt.restore(jax.tree.map(np.zeros_like, state), it)
  assert at == 1 and next(it) == 1 and (restored['w'] == state['w']).all()
  assert ckpt.run_state(1) == {'nonfinite_steps_in_a_row': 2}
  ckpt.close()
  assert 'unreadable' not in caplog.text and 'sha256' not in caplog.text


def test_a_checksum_changes_with_a_flipped_bit_or_a_moved_block():
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  flipped = x.copy()
  flipped.view(np.uint32)[1, 2] ^= 1 << 7
  sums = [int(checkpoint._checksum(jnp.asarray(a))) for a in (x, x[::-1], flipped, x)]
  assert len(set(sums[:3])) == 3 and sums[3] == sums[0]


def test_the_host_checksum_is_the_devices_for_every_kind_of_array(monkeypatch):
  """On a CPU backend numpy sums the arrays (`checksums`); the sums are the jitted ones, so
  a checkpoint verifies on any backend, whichever wrote it."""
  monkeypatch.setattr(checkpoint, '_HOST_CHUNK', 7)  # several chunks, a ragged last one
  rng = np.random.default_rng(0)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('a', 'b'))
  state = {
      'f32': rng.normal(size=(4, 6)).astype(np.float32),
      'bf16': jnp.asarray(rng.normal(size=(3, 5)), jnp.bfloat16),
      'int8': rng.integers(-128, 128, size=(2, 3, 4)).astype(np.int8),
      'bool': rng.random(9) < 0.5,
      'scalar': np.int32(-7),
      'key': jax.random.key(3),
      'sharded': jax.device_put(rng.normal(size=(8, 12)).astype(np.float32),
                                jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                                    'a', 'b'))),
      'replicated_over_b': jax.device_put(  # 4 replicas of each shard: one counted
          rng.normal(size=(6, 3, 5)).astype(np.float32),
          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('a'))),
      'sharded_key': jax.device_put(jax.random.split(jax.random.key(0), 8),
                                    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                                        'b'))),
  }
  on_devices = map(int, jax.device_get(checkpoint._checksums(state)))
  assert checkpoint.checksums(state) == dict(zip(sorted(state), on_devices))  # tree order
  # Read shard by shard: no host copy is left cached on an array (a second state's worth
  # of memory for as long as the array lives).
  assert state['sharded']._npy_value is None
