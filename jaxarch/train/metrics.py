"""Where training metrics go: workdir/metrics.jsonl, TensorBoard events, a progress bar."""

import contextlib
import datetime
import json
import logging
import math
import time
from pathlib import Path

import jax
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from jaxarch.train.workdir import unwritable


class MetricsWriter:
  """One JSON object per logged step, and the same scalars as TensorBoard events.

  Only process 0 writes, so multi-host runs produce one file. A non-finite value is
  written as null, so that every line is standard JSON (jq, pandas, JavaScript).
  """

  def __init__(self, workdir: str | Path, *, tensorboard: bool = True, after_step: int = 0):
    """`after_step`: where the run (re)starts; the records of later steps, which it logs
    again, are forgotten in both."""
    self.enabled = jax.process_index() == 0
    self.path = Path(workdir) / 'metrics.jsonl'
    self.tb = None
    if not self.enabled:
      return
    self._drop_after(after_step)
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # TensorBoard hides the events of steps >= purge_step written before it.
      self.tb = SummaryWriter(str(Path(workdir) / 'tensorboard'), purge_step=after_step + 1)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    clean = {k: _scalar(v) for k, v in metrics.items()}
    line = _line({'step': step, **clean})
    try:
      with self.path.open('a') as f:
        f.write(line)
      if self.tb is not None:
        for k, v in clean.items():
          if isinstance(v, (int, float)) and math.isfinite(v):
            self.tb.add_scalar(k, v, step)
        self.tb.flush()
    except OSError as e:  # disk full, permissions: the run resumes from its last checkpoint
      raise unwritable(f'the metrics of step {step} to {self.path.parent}', e) from None

  def _drop_after(self, step: int):
    """Forgets the records of steps after `step`, and a last line cut short by a crash."""
    if not self.path.exists():
      return
    records, torn = _read(self.path)
    kept = [r for r in records if r['step'] <= step]
    if torn:
      logging.warning('jaxarch: %s: dropped %d line(s) cut short (a crash while writing)',
                      self.path, torn)
    if torn or len(kept) < len(records):
      tmp = self.path.with_name(self.path.name + '.tmp')
      tmp.write_text(''.join(map(_line, kept)))  # NaN of older versions becomes null
      tmp.replace(self.path)

  def close(self):
    """A disk that is full (or read-only) by now loses the events TensorBoard still holds:
    a warning, not an error over the one that ended the run (metrics.jsonl has them)."""
    if self.tb is None:
      return
    tb, self.tb = self.tb, None
    try:
      tb.close()
    except OSError as e:
      logging.warning('jaxarch: could not write the last TensorBoard events to %s (%s)',
                      self.path.parent / 'tensorboard', e.strerror or e)
      _drop_events(tb)


def _drop_events(tb) -> None:
  """Stops a tensorboardX writer whose close failed without the events it holds: else its
  exit handler and thread write them again, each failing with a traceback."""
  for writer in (tb.all_writers or {}).values():
    writer.event_writer._worker.stop()  # pylint: disable=protected-access
    writer.event_writer._closed = True  # pylint: disable=protected-access


def _line(record: dict) -> str:
  """One record as a line of standard JSON: non-finite values as null."""
  return standard_json(record) + '\n'


def standard_json(tree, **kwargs) -> str:
  """`tree` (dicts, lists, numbers, arrays) as standard JSON, which strict parsers (jq,
  JavaScript) read: non-finite numbers as null, not NaN."""
  def clean(x):
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) or getattr(x, 'ndim', 0):
      return [clean(v) for v in x]
    return _scalar(x)
  return json.dumps(clean(tree), allow_nan=False, **kwargs)


def _scalar(v):
  v = v.item() if hasattr(v, 'item') else v
  if isinstance(v, float):
    return float(v) if math.isfinite(v) else None
  return v


def _read(path: Path) -> tuple[list[dict], int]:
  """(the records of a metrics file, how many lines could not be read)."""
  records, torn = [], 0
  for line in path.read_text().splitlines() if path.exists() else []:
    try:
      record = json.loads(line)
      if not isinstance(record.get('step'), int):
        raise ValueError('no step')
      records.append(record)
    except (ValueError, AttributeError):
      torn += bool(line.strip())
  return records, torn


def read_metrics(workdir: str | Path) -> list[dict]:
  """The records of workdir/metrics.jsonl, in order; a line cut short is left out."""
  return _read(Path(workdir) / 'metrics.jsonl')[0]


def final_metrics(workdir: str | Path) -> dict:
  """Each metric's last logged value, as `train` returns them ({} before any)."""
  final = {}
  for record in read_metrics(workdir):
    final.update(record)
  return final


class _Console(Console):
  """rich's Console, whose closed pipe is an OSError for the caller to handle: rich's own
  answer is SystemExit(1), which ended a training run unsaved."""

  def on_broken_pipe(self) -> None:
    raise BrokenPipeError('the pipe stderr writes to is closed')


class ProgressBar:
  """Step, loss, steps/s, tokens/s, MFU and ETA on the terminal; plain log lines elsewhere."""

  def __init__(self, total_steps: int, start_step: int, *, enabled: bool = True):
    self.console = _Console(stderr=True)
    self.enabled = enabled and jax.process_index() == 0
    self.live = self.enabled and self.console.is_terminal
    self.progress = Progress(
        TextColumn('[bold]train'), BarColumn(), MofNCompleteColumn(),
        TextColumn('{task.fields[info]}'), TimeElapsedColumn(), TextColumn('eta'),
        TimeRemainingColumn(), console=self.console, disable=not self.live)
    self.task = self.progress.add_task('train', total=total_steps, completed=start_step,
                                       info='compiling…')
    self.total_steps = total_steps
    self.last_print = 0.0
    self.lost: OSError | None = None  # why stderr could not be written, once it could not

  def __enter__(self):
    self.progress.start()
    return self

  def __exit__(self, *exc):
    with contextlib.suppress(OSError):  # the terminal gone: its last refresh with it
      self.progress.stop()

  def update(self, step: int, metrics: dict, *, keep: bool = False):
    """Shows the metrics; `keep` also leaves them on a line of their own (e.g. evals)."""
    info = format_metrics(metrics)
    self.progress.update(self.task, completed=step, info=info)
    if self.enabled and (keep or not self.live):
      # A plain line has no ETA column: it comes from the window's step time (training
      # only; evaluations and saves are left out, as in tokens/s).
      if metrics.get('step_time_s'):
        left = round(metrics['step_time_s'] * max(self.total_steps - step, 0))
        info += f' | eta {datetime.timedelta(seconds=left)}'
      self._write(f'step {step}: {info}')

  def print(self, message: str):
    if self.enabled:
      self._write(message)

  def alert(self, message: str):
    """Printed even with the progress display off: what the user must know (tried again
    after stderr failed: a full disk may have room again)."""
    if jax.process_index() == 0:
      self._write(message)

  def _write(self, message: str):
    """One line to stderr. Where it cannot be written (a closed pipe: `... 2>&1 | head`, a
    terminal hung up, a full disk under `2> log`), training goes on without the display:
    it was stopped by it, unsaved; metrics.jsonl and TensorBoard keep the metrics."""
    try:  # soft_wrap: one line per step in a log file too (rich wraps at 80 columns there)
      self.progress.console.print(message, highlight=False, soft_wrap=True)
    except OSError as e:
      if self.lost:
        return
      self.lost, self.enabled, self.live = e, False, False
      with contextlib.suppress(OSError):
        self.progress.stop()
      logging.warning('jaxarch: stderr cannot be written (%s): training goes on without the '
                      'progress display; metrics.jsonl has the metrics', e)


def format_metrics(m: dict) -> str:
  parts = []
  if 'loss' in m:
    parts.append(f'loss {m["loss"]:.4f}')
  if 'eval_loss' in m:
    parts.append(f'eval {m["eval_loss"]:.4f} ({m["eval_bpb"]:.3f} bpb)')
  if 'epoch' in m:
    parts.append(f'epoch {m["epoch"]:.2f}')
  if m.get('step_time_s'):
    parts.append(f'{1 / m["step_time_s"]:.2f} steps/s')
  if 'tokens_per_s' in m:
    parts.append(f'{m["tokens_per_s"]:,.0f} tok/s')
  if m.get('mfu') is not None:
    parts.append(f'MFU {100 * m["mfu"]:.1f}%')
  if m.get('data_wait', 0) >= 0.05:  # the input pipeline holds the device back
    parts.append(f'data wait {100 * m["data_wait"]:.0f}%')
  return ' | '.join(parts)


class Stopwatch:

  def __init__(self):
    self.start = time.perf_counter()

  def lap(self) -> float:
    now = time.perf_counter()
    elapsed, self.start = now - self.start, now
    return elapsed

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside does not count towards the next lap (evaluations, checkpoints)."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self.start += time.perf_counter() - start


class InputWait:
  """Seconds the device sat idle for want of a batch, in a logging window.

  Steps are dispatched asynchronously, so the loop runs ahead of the device: waiting for
  a batch while the device still runs the steps dispatched before costs nothing. A wait
  counts when the last step dispatched (its `previous` outputs) had finished by the time
  the batch came, in full: the device idled for part of it at least, so an input-bound
  run reads slightly high, one that the device limits reads 0.
  """

  def __init__(self):
    self.seconds = 0.0

  def next(self, batches, previous=None):
    """The next of `batches`, timed."""
    start = time.perf_counter()
    batch = next(batches)
    if previous is None or all(x.is_ready() for x in jax.tree.leaves(previous)):
      self.seconds += time.perf_counter() - start
    return batch

  def take(self) -> float:
    """The window's seconds; the next window starts at 0."""
    seconds, self.seconds = self.seconds, 0.0
    return seconds
