"""Train-step MFU of every family: one table, one JSON, with the device name.

  python benchmarks/mfu.py [--cases=dense:680m:32:dots,moe:680m:16:dots ...] [--steps=10]
      [--profile [--profile_dir=DIR]] [--moe_kernels_from=benchmarks/results/moe.json]
      [--out=benchmarks/results/mfu.json]

Each case is FAMILY:PRESET:BATCH:REMAT[:KEY=VALUE+KEY=VALUE] (sequences of `data.seq_len`
tokens, bf16 compute on an accelerator) timed by `jaxarch.train.throughput.measure`, as
`jaxarch bench train` does. On a GPU or TPU the default cases are the paper-scale presets
whose MFU targets the docs track (dense ~1B at 45%, MoE and UltraMem 680m at 35% on one
H100). The MoE and UltraMem 680m presets hold 8.7-9.0B parameters, 130 GiB with fp32 AdamW
state and gradients, more than one H100 holds: their one-GPU cases keep the active model
and shrink the sparse part (16 experts: 2.35B total; a 512² table: 1.74B total). On CPU
the cases are the tiny presets, where MFU is not defined (no peak FLOP/s) and tokens/s is
what is compared. A case that runs out of memory (or fails otherwise) is reported as such
in its row, not as a crash of the whole table.

Each row also gives its model FLOP/s over what one large matmul reaches on the device,
measured in the same run (`of matmul`: the share of the achievable rate, which a datasheet
peak overstates), the FLOPs the compiled step executes over the model FLOPs (XLA's cost
analysis), and with `--profile` where the device time goes (the kinds of
`jaxarch.train.profile`: matmul, attention, collective, elementwise, ...), which is what
limits the MFU; the traces stay in `--profile_dir`, the digests go into the JSON.

`--moe_kernels_from` runs the MoE cases with the fastest grouped-matmul kernels that
`benchmarks/moe.py --tables=matmul` found on this device (its JSON): Triton's at their
fastest `model.moe.kernel_tiling`, or Mosaic GPU's (`matmul_impl=mosaic`) at their fastest
`mosaic_tiling`, or `ragged_dot` if no kernels ran there and matched it; each row records
the overrides it ran with. A MoE or UltraMem case whose Pallas kernels fail on the device
(a kernel that does not compile there) is measured again on XLA's path (`ragged_dot`, the
XLA lookup), a MoE case on the Mosaic kernels first on Triton's: its row is marked
`[xla]` or `[pallas]` and keeps the first failure as `kernels_failed`, so one kernel fault
does not cost the family's MFU row.
"""

import json
import os
import platform
import sys
import tempfile
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp

from report import emit, on_accelerator, save, scaled_parser, timed

from jaxarch import config as config_lib
from jaxarch.cli import at_least_one
from jaxarch.train import flops, profile
from jaxarch.train.memory import OutOfMemoryError
from jaxarch.train.throughput import measure

SCALES = {
    # The cases not yet measured on a GPU first: a run cut off by its time limit keeps
    # the cases it finished (the others' rows are in docs/performance.md).
    'gpu': dict(cases='ultramem:680m:16:dots:model.ultramem.num_values=262144,'
                      'megabyte:151m:8:none,moe:680m:16:dots:model.moe.num_experts=16,'
                      'dense:1.6b:16:dots,dense:680m:32:dots,dense:151m:32:none',
                steps=10),
    'cpu': dict(cases='dense:tiny:16:none,moe:tiny:16:none,ultramem:tiny:16:none,'
                      'megabyte:tiny:16:none', steps=5),
}
# The matmul whose rate is the device's achievable ceiling, measured in the same run:
# (size, dtype). A datasheet peak is above what any matmul reaches (on this workplace's
# H200, 8192³ bf16 on random data ran at 769-798 of the 989 TFLOP/s in one call, 600 and
# 675 in the two of benchmarks/records/mfu_h200_*.json).
CEILING = {'gpu': (8192, 'bfloat16'), 'cpu': (512, 'float32')}
# A family's Pallas kernels off: how a case whose kernels fail is measured again.
XLA_PATHS = {'moe': 'model.moe.matmul_impl=xla', 'ultramem': 'model.ultramem.lookup_impl=xla'}
MOSAIC = 'model.moe.matmul_impl=mosaic'
# Triton's kernels, also for the weight gradient (which goes with the Mosaic kernels only).
TRITON = ('model.moe.matmul_impl=pallas', 'model.moe.mosaic_weight_grad=triton')


def parse_case(case: str, moe_overrides=()) -> tuple[str, str, list[str]]:
  """FAMILY:PRESET:BATCH:REMAT[:KEY=VALUE+...] -> (family, preset, config overrides);
  `moe_overrides`: the MoE family's kernel settings (`moe_kernel_overrides`)."""
  parts = case.split(':')
  if len(parts) < 4 or not all(parts[:4]):
    raise ValueError('expected FAMILY:PRESET:BATCH:REMAT[:KEY=VALUE+...]')
  family, preset, batch, remat, *extra = parts
  overrides = [f'train.batch_size={batch}', f'model.remat={remat}', 'mesh.ici.data=-1',
               *[o for o in ':'.join(extra).split('+') if o],
               *(moe_overrides if family == 'moe' else ())]
  return family, preset, overrides


def run_case(case: str, steps: int, profile_dir: Path | None = None,
             moe_overrides: tuple[str, ...] = ()) -> dict:
  family, preset, overrides = parse_case(case, moe_overrides)
  result = _measured(case, family, preset, overrides, steps, profile_dir)
  # MoE on the Mosaic kernels falls back to Triton's, then (as any family) to XLA's path.
  fallbacks = [TRITON] if MOSAIC in overrides else []
  fallbacks += [(XLA_PATHS[family],)] if family in XLA_PATHS else []
  for fallback in fallbacks:
    if not result.get('error', '').startswith('failed') or fallback[0] in overrides:
      break
    print(f'{case}: {result["error"]}; measured again with {" ".join(fallback)}')
    failure = result.get('kernels_failed', result['detail'])
    overrides = [*overrides, *fallback]
    result = _measured(case, family, preset, overrides, steps, profile_dir)
    result.update(kernels_failed=failure, fallback=fallback[0].split('=')[1])
  return result


def _measured(case, family, preset, overrides, steps, profile_dir) -> dict:
  """`measure`'s record of one case, or its error (a failure costs this row only)."""
  try:
    cfg = config_lib.load(f'configs/{family}.py:{preset}', overrides)
  except config_lib.ConfigError as e:  # e.g. overrides read from another run's JSON
    return {'case': case, 'family': family, 'error': 'config error', 'detail': str(e)}
  try:
    trace_dir = None if profile_dir is None else profile_dir / case.replace(':', '_')
    return {'case': case, 'overrides': overrides,
            **measure(cfg, steps=steps, warmup=2, profile_dir=trace_dir)}
  except OutOfMemoryError as e:  # the state alone: known before allocating
    return {'case': case, 'family': family, 'error': 'state does not fit', 'detail': str(e)}
  except Exception as e:  # pylint: disable=broad-except
    if 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower():
      return {'case': case, 'family': family, 'error': 'out of memory'}
    # Any other failure (e.g. a kernel that does not compile here) costs this row only.
    traceback.print_exc()
    return {'case': case, 'family': family, 'error': f'failed: {type(e).__name__}',
            'detail': str(e)[:2000]}


def matmul_ceiling(n: int, dtype: str) -> float:
  """FLOP/s of one n × n × n matmul on random data, on one device."""
  a, b = (jax.random.normal(k, (n, n), dtype) for k in jax.random.split(jax.random.key(0)))
  return 2 * n ** 3 / timed(jax.jit(jnp.matmul), a, b, iters=10)


def moe_kernel_overrides(path: str) -> list[str]:
  """How the MoE cases run, as `benchmarks/moe.py --tables=matmul` decided from what it
  measured on this device (`mfu_overrides` in its JSON); as configured (said) without it."""
  try:
    overrides = json.loads(Path(path).read_text())['mfu_overrides']
  except (OSError, json.JSONDecodeError, KeyError) as e:
    print(f'--moe_kernels_from: no mfu_overrides in {path} ({e!r}); MoE runs as configured')
    return []
  print(f'--moe_kernels_from: MoE runs with {overrides or "its configured kernels"}')
  return overrides


def device_time(digest: dict | None) -> str:
  """The profile's three largest kinds, and how much of the step it names if too little."""
  if digest is None:
    return '–'
  named = profile.named_too_little(digest)
  return profile.kind_shares(digest, top=3) + (
      '' if named is None else f' (of {100 * named:.0f}% of the step)')


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser, defaults = scaled_parser(__doc__, SCALES)
  parser.add_argument('--cases', default=defaults['cases'],
                      help='comma-separated FAMILY:PRESET:BATCH:REMAT[:KEY=VALUE+...]')
  parser.add_argument('--steps', type=at_least_one, default=defaults['steps'],
                      help='timed steps')
  parser.add_argument('--profile', action='store_true',
                      help='also trace 3 steps per case and digest where the time goes')
  parser.add_argument('--profile_dir', help='where the traces go (default: a temp dir)')
  parser.add_argument('--moe_kernels_from', help="benchmarks/moe.py's JSON: run the MoE "
                      'cases with the fastest grouped-matmul tiling it found (or ragged_dot '
                      'if the kernels failed there)')
  parser.add_argument('--out', default='benchmarks/results/mfu.json')
  args = parser.parse_args(argv)
  moe_overrides = moe_kernel_overrides(args.moe_kernels_from) if args.moe_kernels_from else []
  for case in args.cases.split(','):  # a typo in the last case fails now, not after the rest
    try:
      family, preset, overrides = parse_case(case, moe_overrides)
      config_lib.load(f'configs/{family}.py:{preset}', overrides)
    except ValueError as e:  # config_lib.ConfigError too
      parser.error(f'--cases: {case}: {e}')
  if args.profile_dir and not args.profile:
    parser.error('--profile_dir is where --profile writes its traces; add --profile')
  profile_dir = None
  if args.profile:
    profile_dir = Path(args.profile_dir or tempfile.mkdtemp(prefix='jaxarch_mfu_'))
  device = jax.devices()[0]
  size, dtype = CEILING['gpu' if on_accelerator() else 'cpu']
  ceiling = matmul_ceiling(size, dtype)
  info = {'device_kind': device.device_kind, 'host': platform.node(), 'jax': jax.__version__,
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'matmul_ceiling': {'size': size, 'dtype': dtype, 'tflops': ceiling / 1e12}}
  results = []
  for case in args.cases.split(','):
    result = run_case(case, args.steps, profile_dir, tuple(moe_overrides))
    if 'error' not in result:  # the step's model FLOP/s over what a plain matmul reaches
      result['of_matmul_ceiling'] = result['model_tflops_per_device'] * 1e12 / ceiling
    results.append(result)
    save({**info, 'results': results}, args.out)
  rows = []
  for r in results:
    name = r['case'] + (f' [{r["fallback"]}]' if 'fallback' in r else '')
    if 'error' in r:
      rows.append([name, '–', '–', '–', '–', r['error'], '–', '–', '–'])
      continue
    ratio = r['xla_flops_over_model']
    opaque = '*' if r['opaque_kernels'] else ''  # XLA counts no FLOPs inside them
    rows.append([name, f'{r["params_active"] / 1e6:,.1f}M / {r["params_total"] / 1e6:,.1f}M',
                 f'{1e3 * r["step_time_s"]:,.1f} ms', f'{r["tokens_per_s"]:,.0f}',
                 f'{r["model_tflops_per_device"]:.2f}',
                 '–' if r['mfu'] is None else f'{100 * r["mfu"]:.1f}%',
                 f'{100 * r["of_matmul_ceiling"]:.1f}%',
                 '–' if ratio is None else f'{ratio:.2f}{opaque}',
                 device_time(r.get('profile'))])
  emit(f'train-step MFU on {jax.device_count()} × {device.device_kind} (a {size}³ {dtype} '
       f'matmul runs at {ceiling / 1e12:,.1f} TFLOP/s here; *: XLA\'s count leaves out '
       'the kernels it calls: cuBLAS, cuDNN, Pallas'
       + ('' if flops.peak_flops(device.device_kind) is not None else
          f'; MFU –: no peak bf16 FLOP/s known for {device.device_kind!r}') + ')',
       ('case', 'params active / total', 'step', 'tokens/s', 'TFLOP/s/device', 'MFU',
        'of matmul', 'XLA / model FLOPs', 'device time'), rows, {**info, 'results': results},
       args.out)


if __name__ == '__main__':
  main()
