"""Restoring a checkpoint into the other layout of its layers: time and host memory.

  python benchmarks/relayout.py [--config=configs/dense.py:680m] [--saved=unrolled] \
      [--dir=/tmp/relayout] [--config.model.n_layers=12 ...] [--out=...]

A run resumed with the other `model.scan_layers` reads its checkpoint as saved, then
gathers each array into the model's layout (`jaxarch/train/relayout.py`). This writes
one checkpoint of a fresh train state (weights and Adam's moments) in the `--saved`
layout, then restores it, each restore in a fresh process: the whole state (a resume)
and the model alone (what generate and export read), into the saved layout and into the
other. Prints each restore's time and the process's peak resident memory, with the
ratios of the other layout to the saved one, and writes JSON.
"""

import argparse
from concurrent import futures
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax

from report import device_info, emit

from jaxarch import config as config_lib
from jaxarch.cli import split_overrides
from jaxarch.parallel import make_mesh
from jaxarch.train.checkpoint import Checkpointer
from jaxarch.train.state import MODEL, init_state, make_setup

LAYOUTS = {'unrolled': False, 'scanned': True}


def _config(spec: str, overrides: list[str], layout: str):
  return config_lib.load(spec, [*overrides, f'--config.model.scan_layers={LAYOUTS[layout]}'])


def write(spec: str, overrides: list[str], layout: str, workdir: str) -> dict:
  cfg = _config(spec, overrides, layout)
  setup = make_setup(cfg, make_mesh(cfg))
  state = jax.block_until_ready(init_state(cfg, setup))
  start = time.perf_counter()
  writer = Checkpointer(workdir, async_save=False)
  writer.save(1, state)
  writer.close()
  return dict(save_s=time.perf_counter() - start,
              state_bytes=sum(x.nbytes for x in jax.tree.leaves(state)))


def restore(spec: str, overrides: list[str], layout: str, workdir: str,
            model_only: bool) -> dict:
  cfg = _config(spec, overrides, layout)
  abstract = make_setup(cfg, make_mesh(cfg)).abstract_state
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.perf_counter()
  state, _ = Checkpointer.read(workdir, abstract, parts=MODEL if model_only else None)
  jax.block_until_ready(state)
  return dict(restore_s=time.perf_counter() - start,
              peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              rss_before_bytes=before * 1024)


def _in_fresh_process(fn, *args):
  with futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:
    return pool.submit(fn, *args).result()


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/dense.py:680m')
  parser.add_argument('--saved', choices=tuple(LAYOUTS), default='unrolled')
  parser.add_argument('--dir', help='where to write the checkpoint (deleted after); '
                      'default: a temporary directory')
  parser.add_argument('--out', default='benchmarks/results/relayout.json')
  overrides, rest = split_overrides(list(argv))
  args = parser.parse_args(rest)
  other = next(layout for layout in LAYOUTS if layout != args.saved)
  try:
    for layout in LAYOUTS:  # a bad flag, or a period that cannot scan: said here
      config_lib.validate(_config(args.config, overrides, layout))
  except config_lib.ConfigError as e:
    parser.error(str(e))
  workdir = Path(args.dir or tempfile.mkdtemp(prefix='relayout-'))
  try:
    written = _in_fresh_process(write, args.config, overrides, args.saved, str(workdir))
    records = {(part, layout): _in_fresh_process(restore, args.config, overrides, layout,
                                                 str(workdir), part == 'model')
               for part in ('state', 'model') for layout in (args.saved, other)}
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  rows, ratios = [], {}
  for part in ('state', 'model'):
    same, into = records[(part, args.saved)], records[(part, other)]
    ratios[part] = {k: into[k] / same[k] for k in ('restore_s', 'peak_rss_bytes')}
    for layout, record in ((args.saved, same), (other, into)):
      rows.append([part, f'{args.saved} -> {layout}', f'{record["restore_s"]:.2f} s',
                   f'{record["peak_rss_bytes"] / 2**30:.2f} GiB'])
    rows.append([part, f'{other} / {args.saved}', f'{ratios[part]["restore_s"]:.2f}',
                 f'{ratios[part]["peak_rss_bytes"]:.2f}'])
  data = dict(**device_info(), config=args.config, overrides=overrides, saved=args.saved,
              **written, records={f'{part}:{layout}': r for (part, layout), r in records.items()},
              ratios=ratios)
  emit(f'Restoring {"an" if args.saved == "unrolled" else "a"} {args.saved} checkpoint of {args.config} {" ".join(overrides)} '
       f'({written["state_bytes"] / 2**30:.2f} GiB, saved in {written["save_s"]:.1f} s) on '
       f'{jax.device_count()} × {jax.devices()[0].device_kind}',
       ['restored', 'layout', 'restore time', 'peak resident memory'], rows, data, args.out)
  return data


if __name__ == '__main__':
  main()
