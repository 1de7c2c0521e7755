"""What every benchmark ends with: a table on the terminal and the full numbers as JSON."""

import json
from pathlib import Path
import time

import jax
import numpy as np

from rich.console import Console
from rich.table import Table


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
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(data, indent=2) + '\n')
  print(f'wrote {out}')


def timed(fn, *args, iters: int) -> float:
  """Median seconds per call of a jitted fn, after one compile-and-warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))
