"""Orbax checkpoints of the train state and the data iterator, under workdir/checkpoints.

Saves are asynchronous and atomic: Orbax writes a temporary directory and renames it once
complete, so a save that is interrupted (kill -9, a node lost) leaves no checkpoint
behind, only the previous ones. Each checkpoint holds a checksum of every array, computed
on the devices (on a CPU backend, by numpy) as it is saved and checked after it is read. A
checkpoint that exists but fails to restore (a file truncated or garbled on disk, a data
position or the checksums missing, an array that does not match its checksum) is reported
and the previous one is tried, so a run loses at most the work since its last good
checkpoint; the resuming trainer also moves it to workdir/corrupt_checkpoints, so that it
can write that step again (readers such as `evaluate` leave the workdir as it is). A
checkpoint whose Orbax metadata alone (_CHECKPOINT_METADATA) is damaged is restored, its
arrays verified: only the trainer's run state kept there is lost, which `run_state` says
(None) for the trainer to warn of.
The JSON side files, each process's data position and that run state, each hold a sha256
of their own content (`_seal`): a flipped bit that leaves valid JSON (a digit 2 -> 3) would
otherwise resume silently wrong, skipping or repeating data. A data position that fails it
is garbled, as one that is not JSON: the checkpoint is unreadable and the previous one
tried; a run state that fails it is lost. Side files written before 2026-12-05 (no sha256)
are read as they are.
Running out of memory while restoring is an error, not a sign of corruption, and so is a
read that the filesystem refuses (EIO, EACCES, a stale network mount): the checkpoints
stay where they are. A checkpoint whose arrays do not fit the model (another model's
workdir) is an error, never skipped: training from scratch over it would lose it. What an
interrupted save leaves (a temporary directory, up to a checkpoint in size) is deleted by
the next trainer.
Restoring into the abstract state of the current mesh reshards, whatever mesh the
checkpoint was written on; each array is read straight into its shards. One whose layers
are laid out otherwise than the model's (scanned or unrolled, `model.scan_layers`, or
scanned by another period) is read as saved and verified, then its arrays are gathered
into the model's layout (`relayout`): a run resumes in either layout. Readers of the
model (evaluation, generation, export) read its weights and state alone (`parts`), not the
optimizer state, which would take twice the weights' memory on the devices besides.
Each process saves its data iterator's position; resumed on another number of processes
(a pod restarted on fewer or more hosts), the iterators share out the saved positions
again (jaxarch's training data: their packing streams), so the data go on where they
stopped; positions that cannot be shared out (another iterator) leave the iterators to
start afresh, with a warning.
"""

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import grain
import grain.checkpoint
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as preservation

from jaxarch.oserrors import caused_by_os_error, chain, reason
from jaxarch.train import relayout as relayout_lib
from jaxarch.train.step import tree_path
from jaxarch.train.workdir import CHECKPOINTS, interrupted_saves

log = logging.getLogger(__name__)

_OWN_POSITION = 'own'  # a data position grain saved for this process and process count


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written or does not fit the model; one line for the user."""


def _shapes(tree) -> dict[str, tuple]:
  """'params/blocks/0/mlp/gate/value' -> (shape, dtype) of every array of a state tree."""
  return {tree_path(path): (tuple(x.shape), str(x.dtype))
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def mismatch(saved: dict, wanted: dict) -> str | None:
  """How a checkpoint's arrays differ from the model's (`_shapes` maps), or None; the
  examples are parameters where any differ (the optimizer's arrays only repeat them)."""
  params_first = lambda keys: sorted(keys, key=lambda k: not k.startswith('params/'))
  missing = params_first(k for k in wanted if k not in saved)
  extra = params_first(k for k in saved if k not in wanted)
  if missing or extra:
    parts = [f'{len(missing)} arrays missing (e.g. {missing[0]})' if missing else '',
             f'{len(extra)} arrays the model lacks (e.g. {extra[0]})' if extra else '']
    return 'is not of this model: ' + ', '.join(p for p in parts if p)
  differ = params_first(k for k in wanted if saved[k] != wanted[k])
  if differ:
    k = differ[0]
    what = ('is not of this model' if k.startswith('params/') else
            'holds the optimizer state of another config (train.mu_dtype?)')
    return (f'{what}: {len(differ)} arrays differ in shape or dtype, e.g. {k}: saved '
            f'{saved[k][0]} {saved[k][1]}, model {wanted[k][0]} {wanted[k][1]}')
  return None


class Checkpointer:
  """The run's checkpoints: the last `keep`, and with `keep_best` also the one saved with
  the lowest `eval_loss` (`save(eval_loss=)`)."""

  def __init__(self, workdir: str | Path, *, keep: int = 3, keep_best: bool = False,
               async_save: bool = True, remove_interrupted: bool = False):
    """`remove_interrupted`: deletes the temporary directories of saves that a kill
    interrupted (each up to a checkpoint's size, and never finished by a later save of
    another step); only for the run that writes, as a reader's could be a save in progress."""
    self.directory = Path(workdir).absolute() / CHECKPOINTS
    self._saving = None  # the step of the last save, which may still be being written
    self.relaid = None  # (saved, model's) layouts of the layers the last restore read
    self._failed = None  # the step whose write failed: closing fails on it again
    if remove_interrupted:
      self._remove_interrupted_saves()
    garbled = self._garbled_metrics(move_aside=remove_interrupted)
    eval_loss = lambda metrics: metrics['eval_loss']
    policies = [preservation.LatestN(n=keep)]
    if keep_best:
      policies.append(preservation.BestN(get_metric_fn=eval_loss, reverse=True, n=1,
                                         keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation.AnyPreservationPolicy(policies), create=True,
        enable_async_checkpointing=async_save,
        # A step's directories are made before save returns: made in Orbax's threads, one
        # that fails (a read-only or full disk) left the others waiting for it, 5 minutes.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        # Orbax writes a checkpoint's metrics (read back by BestN) only when it has a best_fn.
        best_fn=eval_loss if keep_best else None, best_mode='min',
        lightweight_initialize=bool(garbled))  # a reader's: opened without reading metrics
    _shorten_write_error_reports()
    _quiet_saves_without_metrics()
    _quiet_closed_loop_reports()  # before a read or write can fail
    _whole_replicas_on_cpu()
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'checksums': ocp.JsonCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler()})

  def _remove_interrupted_saves(self) -> None:
    """Deletes what saves cut short by a kill left: Orbax's temporary directories (its own
    `cleanup_tmp_directories` runs in a thread, which a run that ends at once, e.g. on a
    config error, leaves to fail at interpreter exit)."""
    if jax.process_index() == 0:
      for path in interrupted_saves(self.directory):
        log.warning('removing %s, a save that was interrupted', path)
        shutil.rmtree(path, ignore_errors=True)  # garbage: never a reason to stop
    sync_processes('jaxarch_remove_interrupted_saves')

  def _garbled_metrics(self, move_aside: bool) -> list[int]:
    """The steps whose saved eval_loss (`metrics/metrics`) is unreadable: Orbax reads every
    one when it opens the directory, and one cut short or garbled would stop every resume,
    evaluation and load there. The writer moves those checkpoints aside (damaged, as in
    `restore`); a reader leaves them, and its `restore` skips them (Orbax reads the metrics
    again there)."""
    garbled = []
    paths = self.directory.glob('*/metrics/metrics') if self.directory.is_dir() else []
    for path in paths:
      if not path.parent.parent.name.isdigit():
        continue
      try:
        valid = isinstance(json.loads(path.read_text()), dict)
      except ValueError:  # JSON or UTF-8
        valid = False
      if not valid:
        garbled.append(int(path.parent.parent.name))
    for step in sorted(garbled):
      where = self.directory / str(step)
      if move_aside:
        log.warning('checkpoint %s is unreadable (its eval_loss, metrics/metrics, is '
                    'garbled); moved to %s, trying the previous one', where,
                    self._move_step_aside(step))
      else:
        log.warning('checkpoint %s: its eval_loss (metrics/metrics) is garbled', where)
    return [] if move_aside else garbled

  @staticmethod
  def exists(workdir: str | Path) -> bool:
    """Whether `workdir` has checkpoints (readable or not), without opening them."""
    return Checkpointer.latest(workdir) is not None

  @staticmethod
  def latest(workdir: str | Path) -> int | None:
    """The newest checkpoint step in `workdir` by its directory names, without opening it
    (a file of such a name is none: Orbax does not list it, so it could not be restored)."""
    directory = Path(workdir) / CHECKPOINTS
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()] if (
        directory.is_dir()) else []
    return max(steps, default=None)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_iterator=None, *, eval_loss: float | None = None,
           force: bool = False, run_state: dict | None = None) -> bool:
    """`run_state`: JSON values of the trainer's own that a resumed run continues from
    (`run_state(step)`), such as the non-finite steps in a row so far."""
    items = {'state': ocp.args.StandardSave(state),
             'checksums': ocp.args.JsonSave(checksums(state))}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(_sealing(data_iterator))
    if run_state is not None:
      run_state = _seal(run_state)
    self.wait()  # a failed asynchronous write is named by its own step
    with self._write_errors(step):
      finite = eval_loss is not None and np.isfinite(eval_loss)
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force,
                                metrics={'eval_loss': float(eval_loss)} if finite else None,
                                custom_metadata=run_state)
    self._saving = step
    return saved

  def run_state(self, step: int) -> dict | None:
    """The `run_state` saved with checkpoint `step`; {} where none was (written before
    2026-12-04, or by a reader); None where it is lost: the _CHECKPOINT_METADATA that
    holds it is missing or unreadable (a damaged copy), which Orbax's own reader would
    pass off as {}, so that the run state silently started again, or it fails its
    sha256 (a flipped digit: a count 2 read as 3)."""
    metadata = _checkpoint_metadata(self.directory / str(step))
    saved = None if metadata is None else metadata.get('custom_metadata') or {}
    if not isinstance(saved, dict):
      return None
    try:
      return dict(_unseal(saved, f'its run state ({_CHECKPOINT_METADATA} custom_metadata)'))
    except ValueError as e:
      log.warning('checkpoint %s: %s', self.directory / str(step), e)
      return None

  @classmethod
  def read(cls, workdir: str | Path, abstract_state: dict, *, step: int | None = None,
           parts: tuple[str, ...] | None = None):
    """(state, step) of `workdir`'s newest restorable (or given) checkpoint, for readers
    (evaluation, loading a model): writes nothing, and says why there is none. `parts`:
    as for `restore`."""
    cls.require(workdir)  # before the manager, which would create the directory
    checkpointer = cls(workdir, async_save=False)
    try:
      state, restored = checkpointer.restore(abstract_state, step=step, parts=parts)
    finally:
      checkpointer.close()
    if state is None:
      raise CheckpointError(f'none of the checkpoints in {checkpointer.directory} could be '
                            'restored (see the warnings above)')
    return state, restored

  @classmethod
  def require(cls, workdir: str | Path) -> None:
    """Raises, saying how to make one, if `workdir` has no checkpoints."""
    if not cls.exists(workdir):
      where = f'no checkpoint in {Path(workdir).absolute() / CHECKPOINTS}'
      if (Path(workdir) / 'model.safetensors').is_file():  # `jaxarch export`'s weights
        raise FileNotFoundError(f'{where}: {workdir} is an export, which `jaxarch generate` '
                                'and `jaxarch.load` read; this command needs the run it was '
                                'exported from')
      raise FileNotFoundError(f'{where}; train first with `jaxarch train --workdir={workdir}`')

  @contextlib.contextmanager
  def _write_errors(self, step: int | None):
    """A failed write (disk full, permissions) -> a `CheckpointError` that names the
    directory and the checkpoint that is still intact."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      os_error = caused_by_os_error(e)
      if os_error is None:
        raise
      step = self._failed if step is None else step
      earlier = [s for s in self.manager.all_steps() if s != step]
      intact = (f'checkpoint {max(earlier)} is intact' if earlier
                else 'there is no earlier checkpoint')
      what = 'the checkpoints' if step is None else f'checkpoint {step}'
      self._saving, self._failed = None, step
      raise CheckpointError(f'could not write {what} in {self.directory}: {reason(os_error)}; '
                            f'{intact}. Free space (or fix permissions) and rerun to '
                            'resume.') from e

  def restore(self, abstract_state: dict, data_iterator=None, *, step: int | None = None,
              move_aside: bool = False, parts: tuple[str, ...] | None = None):
    """The newest restorable (state, step), or (None, None) if there is no checkpoint.

    `abstract_state` holds ShapeDtypeStructs with the target shardings; the data
    iterator, if given, is set to its saved position in place. A checkpoint of another
    model raises `CheckpointError`; an unreadable one is skipped for the previous one
    (with `step` given: raises), and with `move_aside` (the run that resumes and will
    write again) moved to workdir/corrupt_checkpoints. `parts` (keys of the state, e.g.
    the model's `params` and `model_state`): only those are read and returned, so that a
    reader of the model neither reads nor holds the optimizer state (twice the weights
    under Adam); None: the whole state.
    """
    self.relaid = None  # of this restore, not an earlier one's
    if parts is not None:
      abstract_state = {k: abstract_state[k] for k in parts}
    wanted = _shapes(abstract_state)
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step is not None and step not in steps:
      raise CheckpointError(f'no checkpoint of step {step} in {self.directory}; its steps: '
                            f'{", ".join(map(str, sorted(steps))) or "none"}')
    # A checkpoint that fails after its data position was set (a checksum, another
    # process) must not leave that position for an earlier checkpoint whose own does not
    # apply (another layout or process count): each attempt starts where the iterator was.
    start = data_iterator.get_state() if data_iterator is not None else None
    for s in [step] if step is not None else steps:
      where = self.directory / str(s)
      if start is not None:
        data_iterator.set_state(start)
      try:
        # Items written and since lost (a partial copy): unverifiable, or no data position.
        if lost := _lost_items(where) - (set() if data_iterator is not None else {'data'}):
          raise FileNotFoundError(f'its {" and ".join(sorted(lost))} went missing')
        state_metadata = self.manager.item_metadata(s).get('state')
        if state_metadata is None:  # else an AttributeError or KeyError said nothing
          raise FileNotFoundError('its state/_METADATA (what arrays it holds) went missing')
        saved_tree = state_metadata.tree
        if parts is not None:
          saved_tree = {k: v for k, v in saved_tree.items() if k in parts}
        saved = _shapes(saved_tree)
        relayout = relayout_lib.plan(saved, wanted)  # the layers laid out otherwise
        if relayout is None:
          why = mismatch(saved, wanted)
        else:  # the arrays outside the stacks first: those of another config say which
          why = mismatch(*map(relayout_lib.outside, (saved, wanted))) or (
              relayout if isinstance(relayout, str) else None)
        if why is not None:  # a trainer may start elsewhere; a reader needs the config
          raise CheckpointError(f'checkpoint {self.directory / str(s)} {why}. ' + (
              'Use a new --workdir, or the config the checkpoint was trained with.'
              if parts is None else 'Read it with the config it was trained with.'))
        target = (abstract_state if relayout is None else
                  relayout_lib.target(relayout, saved_tree, abstract_state))
        items = {'state': ocp.args.StandardRestore(target)} if parts is None else {}
        if (where / 'checksums').is_dir():
          items['checksums'] = ocp.args.JsonRestore()
        else:  # written before 2026-12, or lost with the metadata that listed them
          log.warning('checkpoint %s has no checksums: its arrays are restored unverified',
                      where)
        position = (self._data_position(s, data_iterator) if data_iterator is not None
                    else None)
        if position == _OWN_POSITION:
          items['data'] = grain.checkpoint.CheckpointRestore(_sealing(data_iterator))
        restored = self.manager.restore(s, args=ocp.args.Composite(**items)) if items else {}
        state = (restored['state'] if parts is None else
                 _restore_parts(where / 'state', target))
        if 'checksums' in items:
          _verify(state, restored['checksums'], where)
        del restored
        if relayout is not None:
          log.info('checkpoint %s holds its layers %s: read into the model\'s, %s', where,
                   relayout.saved, relayout.wanted)
          # Handed over in a list that `gather` empties: it drops each saved array once
          # read, which a name here would keep to the end (the state held twice).
          saved_state, state = [state], None
          state = self._gathered(relayout, saved_state, abstract_state, where)
          self.relaid = relayout.saved, relayout.wanted
        if isinstance(position, list):
          self._deal_data_position(s, data_iterator, position)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        error = e
      else:
        error = None
      # Every process acts on the worst outcome of all: a read may fail on one host only.
      outcome = _worst_everywhere(_outcome(error))
      if outcome == _RESTORED:
        return state, s
      what = (f'{type(error).__name__}: {_first_line(error)}' if error is not None
              else 'it failed on another process')
      if outcome == _OUT_OF_MEMORY:
        raise CheckpointError(f'restoring checkpoint {where} ran out of device memory '
                              f'({what}); the checkpoint is kept. Restore on more devices '
                              '(--config.mesh.ici.fsdp) or with a smaller state.') from error
      if outcome == _REFUSED:
        raise CheckpointError(f'checkpoint {where} could not be read ({what}); the '
                              'checkpoints are kept. Fix the filesystem or its '
                              'permissions and rerun.') from error
      if step is not None:
        raise CheckpointError(f'checkpoint {where} could not be restored: {what}') from error
      moved = f'moved to {self._move_aside(s)}, ' if move_aside else ''
      log.warning('checkpoint %s is unreadable (%s); %strying the previous one', where, what,
                  moved)
    return None, None

  @staticmethod
  def _gathered(relayout, saved: list, abstract_state: dict, where: Path) -> dict:
    """`relayout.gather`; its failure is this config's, not the checkpoint's: it is kept
    (the checksums passed), and is not moved aside as unreadable. Running out of memory
    is said as for any restore."""
    try:
      return relayout_lib.gather(relayout, saved, abstract_state)
    except Exception as e:  # pylint: disable=broad-except
      if _out_of_memory(e):
        raise
      raise CheckpointError(f'checkpoint {where} (its layers {relayout.saved}) could not be '
                            f"read into this model's layout, {relayout.wanted} "
                            f'({type(e).__name__}: {_first_line(e)}); the checkpoint is '
                            'kept. Resume with the layout it was saved in '
                            '(model.scan_layers).') from e

  def _data_position(self, step: int, data_iterator) -> str | list[dict] | None:
    """The data position of checkpoint `step` for this process: `_OWN_POSITION` where grain
    saved one for this process and process count, of the streams it reads; otherwise
    (another process count, or a mesh that gives this process other streams) the
    positions of all the processes that saved, in process order (for
    `_deal_data_position`); None where there is none to use (says why)."""
    data = self.directory / str(step) / 'data'
    if not data.is_dir():  # saved without a data iterator, or lost with the metadata
      if _checkpoint_metadata(self.directory / str(step)) is None:
        log.warning('checkpoint %s has no data position (nor the metadata that would list '
                    'it): the state is restored, the data iterators start afresh',
                    self.directory / str(step))
      return None
    index, count = jax.process_index(), jax.process_count()
    own = data / f'process_{index}-of-{count}.json'
    dealing = hasattr(data_iterator, 'set_state_of_processes')
    if own.exists():
      if not dealing or data_iterator.reads_streams_of(_read_position(own)):
        return _OWN_POSITION
    found = sorted(p.name for p in data.glob('process_*'))  # one listing (on GCS: a call)
    saved = {}
    for name in found:
      if m := re.fullmatch(r'process_(\d+)-of-(\d+)\.json', name):
        saved.setdefault(int(m[2]), {})[int(m[1])] = data / name
    names = ', '.join(found[:4]) + (f' and {len(found) - 4} more' if len(found) > 4 else '')
    if not saved:  # written with a data position that is gone: a partial copy
      raise FileNotFoundError(f'{data} holds no data position')
    if len(saved) > 1 or any(set(files) != set(range(n)) for n, files in saved.items()):
      raise FileNotFoundError(f'{data} holds an incomplete set of data positions ({names})')
    ((saved_count, files),) = saved.items()
    if dealing:
      return [_read_position(files[i]) for i in range(saved_count)]
    log.warning('checkpoint %s holds the data positions of other processes (%s), not of '
                'process %d of %d: the state is restored, the data iterators start afresh',
                self.directory / str(step), names, index, count)
    return None

  def _deal_data_position(self, step: int, data_iterator, states: list[dict]):
    """Sets the iterator to its share of the positions that `len(states)` processes saved
    (a run resumed on another number of hosts); where they cannot be shared out, says why
    and leaves the iterator, whose data then start afresh."""
    try:
      data_iterator.set_state_of_processes(states)
    except ValueError as e:
      log.warning('checkpoint %s holds the data positions of %d processes, which cannot be '
                  'shared out over %d (%s): the state is restored, the data iterators start '
                  'afresh', self.directory / str(step), len(states), jax.process_count(), e)
    else:
      log.info('checkpoint %s: the data positions of %d processes shared out over %d',
               self.directory / str(step), len(states), jax.process_count())

  def _move_aside(self, step: int) -> Path:
    """Moves an unreadable checkpoint out of the way (kept for inspection), so that the
    resumed run can write that step again."""
    target = self._move_step_aside(step)
    self.manager.reload()
    return target

  def _move_step_aside(self, step: int) -> Path:
    stamp = f'{step}-{int(time.time())}'
    target = self.directory.parent / 'corrupt_checkpoints' / stamp
    n = 0
    while target.exists():  # the same step moved aside again within the second
      n += 1
      target = target.with_name(f'{stamp}-{n}')
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(self.directory / str(step), target)
    sync_processes(f'jaxarch_move_aside_{step}')
    return target

  def wait(self):
    with self._write_errors(self._saving):
      self.manager.wait_until_finished()

  def close(self):
    try:
      self.wait()
    finally:
      with self._write_errors(None):  # e.g. the disk is still full
        self.manager.close()


_CHECKPOINT_METADATA = '_CHECKPOINT_METADATA'  # Orbax's, of each step: its items, run_state


def _checkpoint_metadata(step_dir: Path) -> dict | None:
  """A checkpoint's _CHECKPOINT_METADATA, or None where it is missing or unreadable."""
  try:
    metadata = json.loads((step_dir / _CHECKPOINT_METADATA).read_text())
  except (OSError, ValueError):  # ValueError: JSON or UTF-8
    return None
  return metadata if isinstance(metadata, dict) else None


_SHA256 = 'sha256'  # the key of a side file's checksum, over the file's other keys


def _sha256(payload: dict) -> str:
  """sha256 of `payload`'s canonical JSON, the same before it is written as after it is
  read back (the round trip makes int keys str and tuples lists first)."""
  canonical = json.dumps(json.loads(json.dumps(payload)), sort_keys=True,
                         separators=(',', ':'))
  return hashlib.sha256(canonical.encode()).hexdigest()


def _seal(payload: dict) -> dict:
  """`payload` with the sha256 of its content, to be written as a self-verifying JSON
  file: each process writes its own, so nothing is collected across processes."""
  return {**payload, _SHA256: _sha256(payload)}


def _unseal(saved, what: str):
  """The payload of a `_seal`ed dict read back; raises ValueError naming `what` if it does
  not match its sha256. Saved before 2026-12-05 (no sha256): as it is."""
  if not isinstance(saved, dict) or _SHA256 not in saved:
    return saved
  payload = {k: v for k, v in saved.items() if k != _SHA256}
  if saved[_SHA256] != _sha256(payload):
    raise ValueError(f'{what} does not match its sha256: the file is damaged')
  return payload


def _read_position(path: Path):
  """The data position saved in `path` (a process's), checked against its sha256."""
  return _unseal(json.loads(path.read_text()), str(path))


class _SealedPosition:
  """A data iterator as grain's checkpoint handler sees it, whose saved position holds its
  sha256 (`_seal`). It hands the handler the position as JSON text (as grain's
  DataLoaderIterator does), which the handler writes and reads back as it is, within
  Orbax's save of the whole step (written in a temporary directory, then renamed)."""

  def __init__(self, iterator: grain.DatasetIterator):
    self._iterator = iterator

  def get_state(self) -> bytes:
    return json.dumps(_seal(self._iterator.get_state()), indent=4).encode()

  def set_state(self, text: bytes):
    name = f'data/process_{jax.process_index()}-of-{jax.process_count()}.json'
    self._iterator.set_state(_unseal(json.loads(text), name))

  def start_prefetch(self):
    self._iterator.start_prefetch()


def _sealing(iterator):
  """`iterator` saved and restored with a checked position (`_SealedPosition`); another
  kind than a DatasetIterator (grain's DataLoaderIterator: its position is bytes) as is."""
  return _SealedPosition(iterator) if isinstance(iterator, grain.DatasetIterator) else iterator


def _restore_parts(directory: Path, target: dict) -> dict:
  """The arrays of `target`, part of the state saved in `directory`, each read into its
  shards; the others are not read. (Orbax's StandardRestore reads whole states only; its
  arrays are those of a PyTreeCheckpointHandler, which reads parts.)"""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.restore(directory, args=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  finally:
    handler.close()


def _lost_items(step_dir: Path) -> set[str]:
  """The items that Orbax recorded writing into a checkpoint and that are not there (a
  partial copy); none when it recorded none."""
  listed = (_checkpoint_metadata(step_dir) or {}).get('item_handlers')
  if not isinstance(listed, dict):
    return set()
  return {name for name in listed if not (step_dir / name).is_dir()}


def _bits(x: jax.Array) -> jax.Array:
  """x's bit patterns as unsigned ints (a typed PRNG key's key data)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(
      x, {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32))


_POSITION_WEIGHT = 2654435761  # odd: each flat position weighs its bits differently


def _checksum(x: jax.Array) -> jax.Array:
  """A uint32 sum of x's bit patterns weighted by position: a flipped bit or moved block
  changes it, and it is the same on any mesh (integer sums do not depend on their order)."""
  bits = _bits(x).astype(jnp.uint32)
  index = jnp.zeros(bits.shape, jnp.uint32)  # the row-major position, modulo 2**32
  for axis, size in enumerate(bits.shape):
    index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
  return jnp.sum(bits * (index * jnp.uint32(_POSITION_WEIGHT) + jnp.uint32(1)),
                 dtype=jnp.uint32)


@jax.jit
def _checksums(state) -> list[jax.Array]:
  return [_checksum(x) for x in jax.tree.leaves(state)]


_HOST_CHUNK = 1 << 22  # elements: the host sum's scratch stays a few 32 MiB arrays


def _words(block: np.ndarray) -> np.ndarray | None:
  """A block's bit patterns as unsigned words (as `_bits`); None for 8-byte elements (x64),
  which `_bits` bitcasts to pairs of words: those are left to the devices' sum."""
  if block.dtype == np.bool_:
    return block.astype(np.uint32)
  words = {1: np.uint8, 2: np.uint16, 4: np.uint32}.get(block.dtype.itemsize)
  return None if words is None else block.view(words)


def _host_blocks(x) -> tuple[tuple[int, ...], list] | None:
  """(the shape of x's bit patterns, [(the bit patterns of a block, its first element's
  coordinates)] covering every element once): a CPU array's shards (one replica of each)
  read where they lie, without gathering the array or leaving a host copy on it; None if
  x is elsewhere."""
  if not isinstance(x, jax.Array):
    words = _words(np.asarray(x))
    return None if words is None else (words.shape, [(words, (0,) * words.ndim)])
  if not x.is_fully_addressable or any(d.platform != 'cpu' for d in x.sharding.device_set):
    return None
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  blocks = []
  for shard in x.addressable_shards:
    if shard.replica_id == 0:
      words = _words(np.asarray(shard.data))
      if words is None:
        return None
      starts = tuple(index.indices(size)[0] for index, size in zip(shard.index, x.shape))
      blocks.append((words, starts))
  return x.shape, blocks


def _host_checksum(shape: tuple[int, ...], blocks: list) -> int:
  """`_checksum` of an array given as `_host_blocks` gives it, summed by numpy a few rows
  at a time: the same uint32 sum (positions modulo 2**32)."""
  if not shape:  # a scalar: position 0 of a one-element row
    shape, blocks = (1,), [(words.reshape(1), (0,)) for words, _ in blocks]
  strides = [math.prod(shape[axis + 1:]) for axis in range(len(shape))]
  total = 0
  for words, starts in blocks:
    rows = max(1, _HOST_CHUNK // max(1, math.prod(words.shape[1:])))
    for first in range(0, words.shape[0], rows):
      part = words[first:first + rows]
      index = np.zeros(part.shape, np.uint64)
      for axis, size in enumerate(part.shape):
        coords = np.arange(size, dtype=np.uint64) + starts[axis] + (first if axis == 0 else 0)
        index = index + (coords * np.uint64(strides[axis])).reshape(
            [-1 if a == axis else 1 for a in range(part.ndim)])
      weight = index.astype(np.uint32) * np.uint32(_POSITION_WEIGHT) + np.uint32(1)
      total += int(np.sum(part.astype(np.uint32) * weight, dtype=np.uint32))
  return total % (1 << 32)


def checksums(state) -> dict[str, int]:
  """'params/blocks/0/mlp/gate/value' -> the checksum of that array of a state tree.
  On a CPU backend the arrays are summed where they lie, by numpy: a jitted sum of every
  array compiles for seconds per state's shape, which each save and restore paid."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  paths = [tree_path(path) for path, _ in flat]
  on_host = [_host_blocks(x) for _, x in flat]
  if all(blocks is not None for blocks in on_host):
    return {path: _host_checksum(*blocks) for path, blocks in zip(paths, on_host)}
  return dict(zip(paths, map(int, jax.device_get(_checksums(state)))))


def _verify(state, saved: dict[str, int], where: Path) -> None:
  """Raises if an array of a restored state does not match the checksum it was saved with;
  warns of arrays that have none (a checksums file edited or written in part)."""
  ours = checksums(state)
  if unlisted := [k for k in ours if k not in saved]:
    log.warning('checkpoint %s has no checksums for %d of its %d arrays (e.g. %s): those are '
                'restored unverified', where, len(unlisted), len(ours), unlisted[0])
  bad = [k for k, v in ours.items() if k in saved and saved[k] != v]
  if bad:
    raise ValueError(f'{len(bad)} arrays do not match their checksums (e.g. {bad[0]}): '
                     'the data on disk are garbled')


def _quiet_closed_loop_reports() -> None:
  """After a restore or a save fails, TensorStore reads or writes still in flight call
  back into Orbax's closed event loop, and Python reports each as an unraisable 'Event
  loop is closed' traceback (hundreds of lines). Those reports are dropped; every other
  passes through."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_reports', False):
    return

  def hook(report):
    if not (report.exc_type is RuntimeError and
            str(report.exc_value) == 'Event loop is closed'):
      previous(report)

  hook.drops_closed_loop_reports = True
  sys.unraisablehook = hook


class _WholeReplicas(ocp.type_handlers.ArrayHandler):
  """Orbax's array handler, each replicated shard written whole by its first replica;
  with the default handler's array metadata store, so checkpoints keep their layout."""

  def __init__(self, default: ocp.type_handlers.ArrayHandler):
    super().__init__(use_replica_parallel=False,
                     array_metadata_store=getattr(default, '_array_metadata_store', None))


def _whole_replicas_on_cpu() -> None:
  """On CPU every device is this process's memory: Orbax's replica-parallel save (each
  replica of a replicated array writes a slice of it) gains nothing there, and slices
  every array with a small program compiled per shape: 2.8 s of the 3.9 s first save of a
  tiny UltraMem state on 8 CPU devices. GPUs and TPUs keep Orbax's default."""
  default = ocp.type_handlers.get_type_handler(jax.Array)
  if jax.default_backend() != 'cpu' or isinstance(default, _WholeReplicas):
    return
  absl = logging.getLogger('absl')  # which says it overrides the default: as meant
  level = absl.level
  absl.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, _WholeReplicas(default),
                                            override=True)
  finally:
    absl.setLevel(level)


def _shorten_write_error_reports() -> None:
  """Orbax's save threads log each failed write (a full disk) with its traceback, a few
  hundred lines before the one-line `CheckpointError` that says the same; such reports
  keep their first line only. Other reports pass through whole."""
  absl_logger = logging.getLogger('absl')
  if any(getattr(f, 'shortens_write_errors', False) for f in absl_logger.filters):
    return

  def shorten(record: logging.LogRecord) -> bool:
    if record.exc_info and caused_by_os_error(record.exc_info[1]) is not None:
      record.exc_info = record.exc_text = None
    return True

  shorten.shortens_write_errors = True
  absl_logger.addFilter(shorten)


def _quiet_saves_without_metrics() -> None:
  """With `keep_best`, Orbax warns of every save that has no eval_loss ('Requested
  `tracked_metric`; did not provide metrics.'): the saves between evaluations, which
  the best-checkpoint policy leaves out by design. That warning alone is dropped."""
  absl_logger = logging.getLogger('absl')
  if any(getattr(f, 'drops_untracked_saves', False) for f in absl_logger.filters):
    return

  def drop(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith('Requested `tracked_metric`')

  drop.drops_untracked_saves = True
  absl_logger.addFilter(drop)


def _out_of_memory(error) -> bool:
  if (os_error := caused_by_os_error(error)) is not None and os_error.errno == errno.ENOSPC:
    return False  # TensorStore's RESOURCE_EXHAUSTED for a full disk
  return any('RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower()
             for e in chain(error))


# What a failed restore says: worse outcomes have larger codes (`_worst_everywhere`).
_RESTORED, _UNREADABLE, _OUT_OF_MEMORY, _REFUSED = range(4)
# Reads the filesystem refuses, which say nothing about the checkpoint's data.
_REFUSING_ERRNOS = {errno.EIO, errno.EACCES, errno.EPERM, errno.ESTALE, errno.EMFILE,
                    errno.ENFILE, errno.ENOMEM, errno.ETIMEDOUT, errno.ENOTCONN,
                    errno.EHOSTDOWN, errno.ECONNREFUSED, errno.ECONNRESET}


def _outcome(error: Exception | None) -> int:
  if error is None:
    return _RESTORED
  if _out_of_memory(error):
    return _OUT_OF_MEMORY
  os_error = caused_by_os_error(error)
  if os_error is not None and os_error.errno in _REFUSING_ERRNOS:
    return _REFUSED
  return _UNREADABLE


def _first_line(error: Exception) -> str:
  """The error's first line, without TensorStore's pointer to its details (a bound
  method's repr)."""
  line = (str(error).strip().splitlines() or [''])[0]
  return line.split(' [source locations=')[0].split(' See full TensorStore details')[0][:300]


def _worst_everywhere(code: int) -> int:
  """The largest of every process's `code` (`_outcome`)."""
  if jax.process_count() == 1:
    return code
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.int32(code))))


def sync_processes(name: str) -> None:
  """Every process of a job reaches this point (`name`) before any goes on."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
