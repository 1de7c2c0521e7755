"""SIGTERM, SIGINT and SIGHUP end training cleanly: the step in flight finishes, a
checkpoint is written, the process exits 128 + the signal (`exit_code`), and the same
command resumes. SIGHUP is a terminal or ssh session gone (a TPU VM's `gcloud ... ssh`
dropped), whose default ends the process unsaved.

Schedulers (SLURM, Kubernetes, TPU maintenance) send SIGTERM some time before they kill
a job. The handler only records the signal; the training loop asks `should_stop` between
steps. With several processes, they agree at the logging steps (one small all-gather), so
all of them stop after the same step and write the same checkpoint. A second Ctrl-C
interrupts at once.
"""

import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# The exit codes of `jaxarch train` stopped by one of SIGNALS, with its checkpoint.
STOPPED_CODES = tuple(128 + s for s in SIGNALS)


def exit_code(stopped: str | None) -> int:
  """The exit code of `jaxarch train` whose result's `stopped` (the signal's name, or
  None: finished) is this: 128 + the signal, as a shell reports a process the signal ended
  (143 for SIGTERM, 130 for Ctrl-C), so that a scheduler counts the run unfinished: a GKE
  pod that exited 0 on its node's drain counted as Succeeded, and its JobSet completed
  instead of restarting."""
  return 0 if stopped is None else 128 + signal.Signals[stopped.split()[0]]


class StopRequests:
  """Context manager that turns SIGTERM / SIGINT / SIGHUP into a stop request."""

  def __init__(self, sync_every: int):
    self.sync_every = sync_every
    self.received: str | None = None  # the signal's name, once one arrived
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signals need the main thread
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # asked twice: stop now
    first = self.received is None
    self.received = signal.Signals(signum).name
    if first:  # said at once: the stop may be a step and a save away
      # Nothing here may wait on a lock the interrupted code holds: is_initialized reads a
      # flag where process_count would set up the backend under its lock.
      when = ('at the next logging step (a multiple of '
              f'{self.sync_every})' if jax.distributed.is_initialized() else 'after this step')
      again = '; Ctrl-C again stops at once, unsaved' if signum == signal.SIGINT else ''
      try:  # os.write: a print here could re-enter the stream the loop is printing to
        os.write(2, f'\njaxarch: {self.received}: stopping {when}, with a checkpoint'
                 f'{again}\n'.encode())
      except OSError:  # stderr gone (a closed pipe): the stop goes on unsaid
        pass

  def should_stop(self, step: int) -> bool:
    """Whether to stop after `step`; the same answer on every process."""
    if jax.process_count() == 1:
      return self.received is not None
    if step % self.sync_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    if flags.any() and self.received is None:
      self.received = 'SIGTERM (another process)'
    return bool(flags.any())
