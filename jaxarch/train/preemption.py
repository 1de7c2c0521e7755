"""SIGTERM, SIGINT and SIGHUP end training cleanly: the step in flight finishes, a
checkpoint is written, the process exits 128 + the signal (`exit_code`), and the same
command resumes. SIGHUP is a terminal or ssh session gone (a TPU VM's `gcloud ... ssh`
dropped), whose default ends the process unsaved.

Schedulers (SLURM, Kubernetes, TPU maintenance) send SIGTERM some time before they kill
a job: Spot VMs 30 s. The handler only records the signal; the training loop asks
`should_stop` between steps. With several processes, they agree every `AGREE_S` seconds
of training or so (one small all-gather of the flags and each one's seconds per step, from
which all of them compute the same next step to agree at), so all of them stop after the
same step and write the same checkpoint, seconds after the signal, not a logging window
later. A second Ctrl-C interrupts at once.
"""

import os
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Seconds of training between the processes' agreements on a stop: each drains the queue
# of dispatched steps once (a few ms).
AGREE_S = 5.0
# The exit codes of `jaxarch train` stopped by one of SIGNALS, with its checkpoint.
STOPPED_CODES = tuple(128 + s for s in SIGNALS)


def exit_code(stopped: str | None) -> int:
  """The exit code of `jaxarch train` whose result's `stopped` (the signal's name, or
  None: finished) is this: 128 + the signal, as a shell reports a process the signal ended
  (143 for SIGTERM, 130 for Ctrl-C), so that a scheduler counts the run unfinished: a GKE
  pod that exited 0 on its node's drain counted as Succeeded, and its JobSet completed
  instead of restarting."""
  return 0 if stopped is None else 128 + signal.Signals[stopped.split()[0]]


def handled() -> tuple[signal.Signals, ...]:
  """SIGNALS but SIGHUP where it is ignored: `nohup jaxarch train ... &` trains on after
  the terminal is gone, as nohup is for."""
  return tuple(s for s in SIGNALS
               if s != signal.SIGHUP or signal.getsignal(s) is not signal.SIG_IGN)


class StopRequests:
  """Context manager that turns SIGTERM / SIGINT / SIGHUP into a stop request."""

  def __init__(self, sync_every: int):
    self.sync_every = sync_every  # the most steps between agreements (the logging steps')
    self.received: str | None = None  # the signal's name, once one arrived
    self._previous = {}
    self._next: int | None = None  # the step of the processes' next agreement
    self._last: tuple[int, float] | None = None  # (step, time) at the end of the last one
    self._per_step = 0.0  # seconds a step took between the last two (0: not timed yet)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signals need the main thread
      for sig in handled():
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
      when = (f'within about {AGREE_S:.0f} s, after the step all processes agree on'
              if jax.distributed.is_initialized() else 'after this step')
      again = '; Ctrl-C again stops at once, unsaved' if signum == signal.SIGINT else ''
      try:  # os.write: a print here could re-enter the stream the loop is printing to
        os.write(2, f'\njaxarch: {self.received}: stopping {when}, with a checkpoint'
                 f'{again}\n'.encode())
      except OSError:  # stderr gone (a closed pipe): the stop goes on unsaid
        pass

  def should_stop(self, step: int) -> bool:
    """Whether to stop after `step`; the same answer on every process, which each asks
    after every step from the same first one."""
    if jax.process_count() == 1:
      return self.received is not None
    if self._next is None:  # the first ask (before training: a signal while starting)
      self._next = step
    if step < self._next:
      return False
    gathered = multihost_utils.process_allgather(
        np.array([self.received is not None, self._per_step], np.float32))  # processes x 2
    # The gather waits for every step dispatched before it: the time between the ends of
    # two gathers is the steps' own, which the next gather shares (the first windows hold
    # the compiles: their agreements come a step apart until one is timed past them).
    now = time.monotonic()
    if self._last is not None:
      self._per_step = (now - self._last[1]) / max(step - self._last[0], 1)
    self._last = (step, now)
    flags, slowest = gathered[:, 0] > 0, float(gathered[:, 1].max())
    # The same on every process: computed from what all of them gathered.
    self._next = step + (1 if slowest <= 0 else max(
        1, min(self.sync_every, int(AGREE_S / slowest))))
    if flags.any() and self.received is None:
      self.received = 'SIGTERM (another process)'
    return bool(flags.any())
