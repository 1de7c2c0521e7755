"""What every benchmark ends with: a table on the terminal and the full numbers as JSON."""

import argparse
import math
from pathlib import Path
import time

import jax
import jax.numpy as jnp
import numpy as np

from rich.console import Console
from rich.table import Table

from jaxarch.train.metrics import standard_json
from jaxarch.train.preemption import exit_code


def trained(metrics: dict) -> dict:
  """`jaxarch.train.train`'s result, which a signal may have cut short (Ctrl-C): the
  benchmark ends there, with the train command's exit code, instead of tabling a partial
  run (or failing on its missing eval)."""
  if metrics.get('stopped'):
    raise SystemExit(exit_code(metrics['stopped']))
  return metrics


def emit(title: str, columns, rows, data, out: str | Path):
  """Prints `rows` (lists of already formatted cells) under `columns`; writes `data`."""
  table = Table(title=title)
  for column in columns:
    table.add_column(column, justify='right')
  for row in rows:
    table.add_row(*row)
  console = Console()
  if not console.is_terminal:  # a log file: do not squeeze wide tables to 80 columns
    console = Console(width=200)
  console.print(table)
  save(data, out)
  print(f'wrote {out}')


def save(data, out: str | Path):
  """Writes `data` as JSON; also called after each case of a long benchmark, so a run cut
  off by a time limit keeps the cases it finished."""
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  part = out.with_name(out.name + '.part')  # a kill mid-write keeps the last whole file
  part.write_text(standard_json(data, indent=2) + '\n')  # NaN as null: strict JSON
  part.replace(out)


def timed(fn, *args, iters: int) -> float:
  """Median seconds per call of a jitted fn, after one compile-and-warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def timed_or_error(fn, *args, iters: int) -> float | str:
  """`timed`, or the error as text: a cell that does not compile or fit on this device
  (a kernel, an expanded ragged_dot) costs that cell only, not the table."""
  return or_error(timed, fn, *args, iters=iters)


def or_error(fn, *args, **kwargs):
  """`fn(*args, **kwargs)`, or the error as text (see `timed_or_error`)."""
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'[:2000]


@jax.jit
def _max_rel_error(got, want):
  f32 = lambda a: a.astype(jnp.float32)
  return jnp.max(jnp.abs(f32(got) - f32(want))) / jnp.max(jnp.abs(f32(want)))


def max_rel_error(got, want) -> float:
  """The largest difference between two sets of arrays over the largest magnitude of the
  reference, the worst over the set: a kernel's check against its reference, fused by XLA
  (no fp32 copies of large outputs). A NaN or infinity anywhere counts as an infinite error:
  `max` would skip a NaN, and `nan > limit` is False."""
  errors = [float(_max_rel_error(a, b)) for a, b in zip(got, want)]
  return max(e if math.isfinite(e) else math.inf for e in errors)


def device_info() -> dict:
  """What every benchmark JSON starts with: the device it ran on."""
  device = jax.devices()[0]
  return dict(device=str(device), device_kind=device.device_kind, jax_version=jax.__version__)


def on_accelerator() -> bool:
  return jax.default_backend() in ('gpu', 'tpu')


def ints(text: str) -> tuple[int, ...]:
  """'1,8,64' -> (1, 8, 64), for list-valued flags."""
  return tuple(int(x) for x in text.split(','))


def scaled_parser(doc: str, scales: dict) -> tuple[argparse.ArgumentParser, dict]:
  """A parser described by the script's docstring, and the defaults for this machine:
  `scales['gpu']` on an accelerator, else `scales['cpu']`."""
  parser = argparse.ArgumentParser(description=doc.split('\n')[0])
  return parser, scales['gpu' if on_accelerator() else 'cpu']
