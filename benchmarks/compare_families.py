"""Families side by side at equal activated parameters: bits per byte, speed, sizes.

  python benchmarks/compare_families.py [--steps=500] [--out=benchmarks/results/compare_families.json]

Trains the dense, MoE and UltraMem `tiny` presets (MEGABYTE has its own comparison,
`benchmarks/megabyte.py`) for the same steps on the same data (the default corpus, same
seed and batch order) and evaluates them on the same validation batches. The
dense baseline's d_ff, and the MoE's expert_d_ff, are widened until their activated
parameters per token match UltraMem's (the `tiny` presets are not matched: MoE 0.89M
active, UltraMem 1.05M), so the comparison is at equal compute per token; the sparse
families keep their extra (inactive) parameters. Writes JSON with the device.
"""

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

from flax import nnx

from report import device_info, emit, trained

from jaxarch import config as config_lib
from jaxarch import models
from jaxarch.cli import at_least_one
from jaxarch.train import train


def counts(cfg) -> dict:
  return models.param_counts(nnx.eval_shape(lambda: models.build(cfg.model, rngs=nnx.Rngs(0))))


def matched_dense(target_active: int, overrides, preset: str = 'tiny'):
  """configs/dense.py:<preset> with d_ff widened so its active parameters reach the target."""
  return _widened(f'configs/dense.py:{preset}', 'model.d_ff', target_active, overrides)


def matched_moe(target_active: int, overrides, preset: str = 'tiny'):
  """configs/moe.py:<preset> with expert_d_ff widened so its active parameters reach the
  target; a preset at or above it (`small` and the paper presets, matched to UltraMem's
  already) stays as it is."""
  return _widened(f'configs/moe.py:{preset}', 'model.moe.expert_d_ff', target_active,
                  overrides)


def _widened(spec: str, key: str, target_active: int, overrides):
  """The config of `spec` with the width `key` grown, in steps of 8, to the nearest
  active parameter count to the target (never narrowed)."""
  cfg = config_lib.load(spec, overrides)
  width = functools.reduce(lambda node, name: node[name], key.split('.'), cfg)
  with_width = lambda w: config_lib.load(spec, [*overrides, f'{key}={w}'])
  base = counts(cfg)['active']
  per_8 = counts(with_width(width + 8))['active'] - base
  extra = max(0, round((target_active - base) / per_8)) * 8 if per_8 > 0 else 0
  return with_width(width + extra)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=at_least_one, default=500)
  parser.add_argument('--workdir', help='keep the runs here (default: a temporary dir)')
  parser.add_argument('--out', default='benchmarks/results/compare_families.json')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  overrides = [f'train.steps={args.steps}', f'train.warmup_steps={max(1, args.steps // 10)}',
               f'log.eval_every_steps={args.steps}',
               f'checkpoint.every_steps={args.steps}', 'log.progress=false']
  ultramem = config_lib.load('configs/ultramem.py:tiny', overrides)
  target = counts(ultramem)['active']
  runs = {'dense': matched_dense(target, overrides), 'ultramem': ultramem,
          'moe': matched_moe(target, overrides)}

  root = Path(args.workdir or tempfile.mkdtemp(prefix='jaxarch-compare-'))
  results = []
  for name, cfg in runs.items():
    c = counts(cfg)
    start = time.perf_counter()
    metrics = trained(train(cfg, root / name))
    results.append({'family': name, 'params_total': c['total'], 'params_active': c['active'],
                    'steps': args.steps, 'eval_bpb': metrics['eval_bpb'],
                    'eval_loss': metrics['eval_loss'], 'train_loss': metrics['loss'],
                    'tokens_per_s': metrics.get('tokens_per_s'),
                    'wall_s': time.perf_counter() - start})

  rows = [[r['family'], f'{r["params_total"]:,}', f'{r["params_active"]:,}',
           f'{r["eval_bpb"]:.3f}',
           '—' if r['tokens_per_s'] is None else f'{r["tokens_per_s"]:,.0f}',
           f'{r["wall_s"]:.0f} s']
          for r in results]
  emit(f'tiny presets, {args.steps} steps, default corpus, equal active params',
       ('family', 'total params', 'active params', 'val bpb', 'tokens/s', 'wall'), rows,
       {**device_info(), 'results': results}, args.out)

if __name__ == '__main__':
  main()
