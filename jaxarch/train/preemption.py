"""SIGTERM and SIGINT end training cleanly: the step in flight finishes, a checkpoint is
written, the process exits 0, and the same command resumes.

Schedulers (SLURM, Kubernetes, TPU maintenance) send SIGTERM some time before they kill
a job. The handler only records the signal; the training loop asks `should_stop` between
steps. With several processes, they agree at the logging steps (one small all-gather), so
all of them stop after the same step and write the same checkpoint. A second Ctrl-C
interrupts at once.
"""

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
  """Context manager that turns SIGTERM / SIGINT into a stop request."""

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
    self.received = signal.Signals(signum).name

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
