"""Orbax checkpoints of the train state and the data iterator, under workdir/checkpoints.

Saves are asynchronous and atomic (Orbax writes a temporary directory and renames it
once complete, so an interrupted save leaves no half checkpoint behind). A checkpoint
that exists but fails to restore is reported and the previous one is tried, so a run
loses at most the work since its last good checkpoint. Restoring into the abstract
state of the current mesh reshards, whatever mesh the checkpoint was written on.
"""

import logging
from pathlib import Path

import grain
import grain.checkpoint
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:

  def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True):
    self.directory = Path(workdir).absolute() / 'checkpoints'
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_iterator=None, *, force: bool = False) -> bool:
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: dict, data_iterator=None, *, step: int | None = None):
    """The newest restorable (state, step), or (None, None) if there is no checkpoint.

    `abstract_state` holds ShapeDtypeStructs with the target shardings; the data
    iterator, if given, is set to its saved position in place.
    """
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    for s in steps:
      items = {'state': ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise RuntimeError(f'checkpoint {self.directory / str(s)} could not be restored: '
                             f'{type(e).__name__}: {e}') from e
        log.warning('checkpoint %s is unreadable (%s: %s); trying the previous one',
                    self.directory / str(s), type(e).__name__, str(e).splitlines()[0])
        continue
      return restored['state'], s
    return None, None

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
