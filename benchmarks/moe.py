"""MoE layer throughput: dropless vs capacity vs the dense layer of the same active width.

  python benchmarks/moe.py [--grid=gpu|cpu] [--tables=matmul,layers,exchange]
      [--experts=8,16] [--out=benchmarks/results/moe.json]

Times forward + backward of one layer on `tokens × d_model` inputs, for each expert count
and batch of the grid: the dropless path (sort + grouped matmul, `matmul_impl=auto`), the
capacity path (factor 1.25), and a dense SwiGLU of width `top_k · expert_d_ff` (the same
activated FLOPs per token, no routing). Prints tokens/s and the ratio to dense.

A second table times the grouped matmul alone (forward + both gradients of one expert
projection) per implementation: `jax.lax.ragged_dot` and, on GPU, the Triton kernels
(`pallas`) and jax's Mosaic GPU ragged dot (`mosaic`, Hopper; its weight gradient is
Triton's), whose largest relative differences from `ragged_dot` are recorded; at one
expert count (`tiling_experts`) each kernel family again with each of its `tilings`
(block sizes and launch settings: which one to make the default; each checked against
`ragged_dot` too, the fastest that matches it is recorded as `<impl>_best_tiling`). The
forward alone is timed too (`<impl>_forward_tflops`): set against the whole, it says
whether the gradients' kernels or the forward's hold the rate down; with `mosaic`, the
weight gradient alone is timed for both families (`weight_grad_<family>_tflops`, the Mosaic
one checked against `ragged_dot`'s), which says whether Mosaic's should replace Triton's.
`mfu_overrides` says how `benchmarks/mfu.py --moe_kernels_from` runs its MoE cases after
that: the fastest kernel family at its fastest tiling, or `ragged_dot` if no family ran
and matched it. TFLOP/s
count the real rows' FLOPs; `XLA FLOPs / real` is what XLA's cost analysis counts for
`ragged_dot` over that, E where it computes every expert for every row. Writes JSON with
the device.
The `exchange` table (not run by default) splits the experts over every device and
times the dropless layer with each `model.moe.ep_exchange`: `padded` (every shard gets a
worst-case buffer) and `ragged` (`jax.lax.ragged_all_to_all`, only the routed rows; on
CPU `ragged_emulated`, its offsets through an all_gather, slower by design), with the
bytes per device XLA counts in the compiled layer's collectives and the routed rows' bytes
(what the ragged exchange sends: T·k·d each way, forward and backward; XLA's count of a
`ragged-all-to-all` is its worst-case result buffer, so the ragged column leaves it out).
It needs several devices: several GPUs, or
`XLA_FLAGS=--xla_force_host_platform_device_count=8` on CPU.
"""

import argparse
import contextlib
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from report import (device_info, emit, max_rel_error, on_accelerator, or_error, save,
                    timed_or_error)

from jaxarch import config as config_lib
from jaxarch.cli import at_least_one
from jaxarch.kernels import gmm_mosaic, gmm_triton
from jaxarch.kernels.gmm_mosaic import MosaicTiling
from jaxarch.kernels.gmm_triton import Tiling
from jaxarch.kernels.grouped_matmul import grouped_matmul
from jaxarch.layers import SwiGLU
from jaxarch.layers.moe import MoE
from jaxarch.parallel import make_mesh, tree_shardings
from jaxarch.parallel.context import logical_mesh
from jaxarch.train import flops, profile

GRIDS = {
    # d_model, expert_d_ff, top_k, experts, tokens (and tokens of the grouped-matmul table).
    # GPU: the 680m preset's experts (1536 x 1200, top-4); the tilings are swept at the
    # expert count of benchmarks/mfu.py's one-GPU MoE case (16), at its 16 x 1024 tokens.
    'gpu': dict(d_model=1536, expert_d_ff=1200, top_k=4, experts=(8, 16, 64),
                tokens=(4096, 16384, 65536), matmul_tokens=(16384,), dtype='bfloat16',
                impls=('xla', 'pallas', 'mosaic'), tiling_experts=16, tilings={
                    # Triton's (block_m, block_n, block_k, warps, stages, order), besides
                    # the default: the two fastest on an H200 (128, 128, 64, 8, 3: 246
                    # TFLOP/s; the default, 241) launched columns first (order 1: x read
                    # once), then around the fastest rows first (128 x 256 x 64 with 3
                    # stages asked for more shared memory than a block may use)
                    'pallas': ((128, 128, 64, 8, 3, 1), (64, 128, 64, 4, 3, 1),
                               (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4),
                               (128, 256, 64, 8, 2), (256, 128, 64, 8, 2), (128, 128, 128, 8, 2)),
                    # Mosaic's (block_m, block_n, block_k, steps in flight, grid_block_n),
                    # besides the default (128, 128, 64, 4, 8): jax's sweep of its kernel
                    'mosaic': ((128, 128, 64, 4, 1), (128, 128, 64, 4, 16), (192, 128, 64, 4, 8),
                               (128, 192, 64, 4, 8), (64, 128, 64, 4, 8), (128, 128, 64, 2, 8))}),
    'cpu': dict(d_model=128, expert_d_ff=96, top_k=2, experts=(4, 16), tokens=(512, 2048),
                matmul_tokens=(2048,), dtype='float32', impls=('xla',), tiling_experts=16,
                tilings={}),
}
# Each kernel family's tiling: its type and the config key that sets it.
TILINGS = {'pallas': (Tiling, 'kernel_tiling'), 'interpret': (Tiling, 'kernel_tiling'),
           'mosaic': (MosaicTiling, 'mosaic_tiling'),
           'interpret_mosaic': (MosaicTiling, 'mosaic_tiling')}


# Above this relative difference from ragged_dot (bf16 sums differ by about 1e-2 at most)
# the grouped-matmul kernels are wrong, and benchmarks/mfu.py's MoE cases do not run them.
MAX_KERNEL_ERROR = 0.05


def train_fn(layer: nnx.Module, mesh=None, rules=None):
  """jitted (x -> grads of sum(layer(x)²) for the weights and x); `.lower(x)` lowers it.
  With a mesh, the weights are placed over it as the trainer places them, and the layer
  runs in its logical context."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  if mesh is not None:
    params = jax.device_put(params, tree_shardings(params, mesh, rules))

  @jax.jit
  def step(params, x):
    def loss(params, x):
      with logical_mesh(mesh, rules) if mesh is not None else contextlib.nullcontext():
        return jnp.sum(nnx.merge(graphdef, params, rest)(x).astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1))(params, x)

  run = lambda x: step(params, x)
  run.lower = lambda x: step.lower(params, x)
  return run


def grouped_matmul_case(experts: int, rows: int, d: int, f: int, dtype, impls, iters: int,
                        tilings=None, progress=lambda record: None):
  """Forward + gradients of x [rows, d] @ w[e] [d, f] over `experts` groups of random
  sizes, per impl: seconds, real TFLOP/s, (ragged_dot) XLA's FLOPs over the real, (the
  kernels) their largest difference from ragged_dot and their times with `tilings[impl]`.
  `progress(record)` after each timing: a run cut off by its limit keeps what it timed."""
  tilings = tilings or {}
  kx, kw, kd, kg = jax.random.split(jax.random.key(rows + experts), 4)
  x = jax.random.normal(kx, (rows, d), dtype)
  # Scaled in fp32: numpy's float64 scale would promote bf16 weights to fp32 (not a weak
  # type), and ragged_dot's fp32 output would then not take the bf16 cotangent.
  w = (jax.random.normal(kw, (experts, d, f), jnp.float32) / d ** 0.5).astype(dtype)
  dy = jax.random.normal(kd, (rows, f), dtype)
  sizes = jnp.bincount(jax.random.randint(kg, (rows,), 0, experts), length=experts)
  real_flops = 3 * 2 * rows * d * f  # forward, input gradient, weight gradient
  record = dict(experts=experts, rows=rows, d_model=d, expert_d_ff=f, real_flops=real_flops)

  def product(impl, tiling=None):
    """x, w, sizes -> the grouped matmul with `impl` at `tiling` (None: the default)."""
    kwargs = {} if tiling is None else {'mosaic_tiling' if isinstance(
        tiling, MosaicTiling) else 'tiling': tiling}
    return lambda x, w, sizes: grouped_matmul(x, w, sizes, impl=impl, **kwargs)

  def run(impl, tiling=None):
    """(jitted forward + gradients, seconds) or (None, error); never raises: ragged_dot's
    expansion may not fit, a kernel may not compile here, and that is one cell only."""
    @jax.jit
    def fn(x, w, dy, sizes):  # all arguments: a closed-over array is a constant per compile
      y, backward = jax.vjp(lambda x, w: product(impl, tiling)(x, w, sizes), x, w)
      return (y, *backward(dy))  # y too, or XLA drops the forward product as unused
    seconds = timed_or_error(fn, x, w, dy, sizes, iters=iters)
    return (None if isinstance(seconds, str) else fn), seconds

  def tiling_record(impl, tiling) -> dict:
    """A swept tiling's time and, like the default's, its difference from ragged_dot:
    the fastest goes to benchmarks/mfu.py, so a wrong one must not look best."""
    fn, seconds = run(impl, tiling)
    if fn is None:
      return dict(tiling._asdict(), error=seconds)
    checked = {} if reference is None else {
        'max_rel_error': max_rel_error(fn(x, w, dy, sizes), reference)}
    return dict(tiling._asdict(), s=seconds, tflops=real_flops / seconds / 1e12, **checked)

  reference = None

  def default(impl, fn, seconds):
    """The record of `impl` at its default tiling, checked against ragged_dot."""
    nonlocal reference
    if fn is None:
      record[f'{impl}_s'], record[f'{impl}_error'] = None, seconds
      return
    record[f'{impl}_s'], record[f'{impl}_tflops'] = seconds, real_flops / seconds / 1e12
    forward = timed_or_error(jax.jit(product(impl)), x, w, sizes, iters=iters)
    if not isinstance(forward, str):  # one third of the real FLOPs
      record[f'{impl}_forward_tflops'] = real_flops / 3 / forward / 1e12
    if impl == 'xla':
      reference = fn(x, w, dy, sizes)
      executed = flops.compiled_flops(fn.lower(x, w, dy, sizes).compile())  # None: unknown
      record['xla_flops_over_real'] = None if executed is None else executed / real_flops
    elif reference is not None:  # the product and both gradients
      record[f'{impl}_max_rel_error'] = max_rel_error(fn(x, w, dy, sizes), reference)
    if impl == 'mosaic':
      record.update(weight_gradients(x, dy, sizes, real_flops / 3, iters,
                                     None if reference is None else reference[2]))

  for impl in impls:  # each at its default tiling first: a run cut off keeps every family
    default(impl, *run(impl))
    progress(record)
  for impl in impls:  # then the tilings (also where the default failed)
    if impl != 'xla' and tilings.get(impl):
      record[f'{impl}_tilings'] = []
      for t in tilings[impl]:
        record[f'{impl}_tilings'].append(tiling_record(impl, TILINGS[impl][0](*t)))
        record[f'{impl}_best_tiling'] = best_tiling(record, impl)
        progress(record)
  return record


def weight_gradients(x, dy, sizes, flops: int, iters: int, reference) -> dict:
  """The weight gradient alone (x.T @ dy per group, `flops` of them) by Triton's kernel
  and by jax's transposed Mosaic ragged dot (GPU only: no CPU interpreter runs it), the
  Mosaic one's difference from `reference` (ragged_dot's) recorded: which is faster."""
  record = {}
  for family, kernel in (('triton', gmm_triton.tgmm), ('mosaic', gmm_mosaic.tgmm)):
    fn = jax.jit(kernel)
    seconds = timed_or_error(fn, x, dy, sizes, iters=iters)
    if isinstance(seconds, str):
      record[f'weight_grad_{family}_error'] = seconds
      continue
    record[f'weight_grad_{family}_tflops'] = flops / seconds / 1e12
    if reference is not None:
      record[f'weight_grad_{family}_max_rel_error'] = max_rel_error(
          (fn(x, dy, sizes),), (reference,))
  return record


def tiling_name(t: dict) -> str:
  """'128x128x64 w8 s3' (Triton: warps, stages; ' cols' launched columns first) or
  '128x128x64 c4 g8' (Mosaic: copies in flight, grid_block_n)."""
  blocks = f'{t["block_m"]}x{t["block_n"]}x{t["block_k"]}'
  if 'num_warps' in t:
    return (f'{blocks} w{t["num_warps"]} s{t["num_stages"]}'
            + (' cols' if t.get('order') == 1 else ''))
  return f'{blocks} c{t["max_concurrent_steps"]} g{t["grid_block_n"]}'


def table_names(text: str) -> list[str]:
  """`--tables`, checked as it is parsed: a typo would otherwise run nothing, silently."""
  tables = text.split(',')
  if unknown := set(tables) - {'matmul', 'layers', 'exchange'}:
    raise argparse.ArgumentTypeError(f'unknown {sorted(unknown)}; expected some of matmul, '
                                     'layers, exchange')
  return tables


def expert_counts(text: str) -> tuple[int, ...]:
  try:
    counts = tuple(int(v) for v in text.split(','))
  except ValueError:
    counts = ()
  if not counts or min(counts) < 1:
    raise argparse.ArgumentTypeError(f'{text!r}: expected expert counts >= 1, e.g. 8,16')
  return counts


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  on_accelerator = jax.default_backend() in ('gpu', 'tpu')
  parser.add_argument('--grid', choices=tuple(GRIDS), default='gpu' if on_accelerator else 'cpu')
  parser.add_argument('--iters', type=at_least_one, default=10 if on_accelerator else 3)
  parser.add_argument('--tables', type=table_names, default='matmul,layers',
                      help='which tables: matmul (the grouped matmul per impl), layers, '
                      'exchange (expert parallelism over every device)')
  parser.add_argument('--experts', type=expert_counts,
                      help="expert counts instead of the grid's, e.g. 16 (comma-separated)")
  parser.add_argument('--out', default='benchmarks/results/moe.json')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  g = GRIDS[args.grid] if args.experts is None else dict(GRIDS[args.grid], experts=args.experts)
  data = device_info()
  tables = args.tables
  if 'matmul' in tables:  # first: the kernels' check against ragged_dot is the quick part
    data.update(matmul_table(g, args.iters, data, args.out))
  if 'layers' in tables:
    data['records'] = layer_table(g, args.iters, data, args.out)
  if 'exchange' in tables:
    data['exchange'] = exchange_table(g, args.iters, data, args.out)
  return data


def exchange_table(g: dict, iters: int, data: dict, out: str) -> list[dict]:
  """The dropless layer's forward + backward with its experts split over every device,
  per `model.moe.ep_exchange`, expert count and tokens per device."""
  n = jax.device_count()
  if n < 2:
    print('exchange: one device here, so no expert parallelism to time')
    return []
  dtype = jnp.dtype(g['dtype'])
  d, f, k = g['d_model'], g['expert_d_ff'], g['top_k']
  ragged = 'ragged' if on_accelerator() else 'ragged_emulated'
  cfg = config_lib.load('configs/moe.py:tiny', [f'mesh.ici.expert={n}', 'mesh.ici.data=1'])
  mesh, rules = make_mesh(cfg), cfg.mesh.rules
  records, rows = [], []
  for experts in (e for e in g['experts'] if e % n == 0):
    for tokens in g['tokens']:  # per device
      seq = min(tokens, 1024)
      x = jax.device_put(jax.random.normal(jax.random.key(tokens), (n * tokens // seq, seq, d),
                                           dtype), jax.NamedSharding(mesh, jax.P('expert')))
      record = dict(devices=n, experts=experts, top_k=k, d_model=d, expert_d_ff=f,
                    tokens_per_device=tokens, dtype=g['dtype'],
                    routed_row_bytes=4 * tokens * k * d * dtype.itemsize)
      for exchange in ('padded', ragged):
        layer = MoE(d, num_experts=experts, top_k=k, expert_d_ff=f, ep_exchange=exchange,
                    dtype=dtype, rngs=nnx.Rngs(0))
        step = train_fn(layer, mesh, rules)
        record[f'{exchange}_s'] = timed_or_error(step, x, iters=iters)
        hlo = or_error(lambda step=step: step.lower(x).compile().as_text())
        if not hlo.startswith('HloModule'):  # what failed is in the time's cell
          continue
        moved = profile.collective_bytes(hlo)
        record[f'{exchange}_collectives'] = moved
        record[f'{exchange}_collective_bytes'] = sum(
            v for op, v in moved.items() if op != 'ragged-all-to-all')
      records.append(record)
      save({**data, 'exchange': records}, out)
      cell = lambda v: f'{v * 1e3:.2f}' if isinstance(v, float) else '–'
      mib = lambda b: '–' if b is None else f'{b / 2**20:.2f}'
      rows.append([str(experts), str(tokens), cell(record['padded_s']),
                   cell(record[f'{ragged}_s']), mib(record.get('padded_collective_bytes')),
                   mib(record.get(f'{ragged}_collective_bytes')),
                   mib(record['routed_row_bytes'])])
  emit(f'MoE layer forward+backward, experts split over {n} × {data["device_kind"]} '
       f'(d_model {d}, top-{k}, expert d_ff {f})',
       ['experts', 'tokens/device', 'padded ms', f'{ragged} ms', 'padded collectives MiB',
        f'{ragged} collectives MiB', 'routed rows MiB'], rows,
       {**data, 'exchange': records}, out)
  return records


def layer_table(g: dict, iters: int, data: dict, out: str) -> list[dict]:
  """Dense vs dropless vs capacity layers, per expert count and batch."""
  dtype = jnp.dtype(g['dtype'])
  d, f, k = g['d_model'], g['expert_d_ff'], g['top_k']
  rngs = nnx.Rngs(0)
  dense = train_fn(SwiGLU(d, k * f, dtype=dtype, rngs=rngs))
  records, rows = [], []
  for experts in g['experts']:
    layers = {name: train_fn(MoE(d, num_experts=experts, top_k=k, expert_d_ff=f,
                                 capacity_factor=cf, dtype=dtype, rngs=rngs))
              for name, cf in (('dropless', None), ('capacity', 1.25))}
    for tokens in g['tokens']:
      x = jax.random.normal(jax.random.key(tokens), (1, tokens, d), dtype)
      times = {name: timed_or_error(fn, x, iters=iters) for name, fn in
               (('dense', dense), *layers.items())}
      seconds = {n: t for n, t in times.items() if not isinstance(t, str)}
      record = dict(experts=experts, top_k=k, d_model=d, expert_d_ff=f, tokens=tokens,
                    dtype=g['dtype'], **{f'{n}_s': s for n, s in seconds.items()},
                    **{f'{n}_tokens_per_s': tokens / s for n, s in seconds.items()},
                    **{f'{n}_error': t for n, t in times.items() if n not in seconds})
      records.append(record)
      save({**data, 'records': records}, out)  # a run cut off keeps these
      rate = lambda n: f'{tokens / seconds[n]:,.0f}' if n in seconds else '–'
      ratio = lambda n: (f'{seconds["dense"] / seconds[n]:.2f}'
                         if {'dense', n} <= seconds.keys() else '–')
      rows.append([str(experts), str(tokens), *map(rate, ('dense', 'dropless', 'capacity')),
                   *map(ratio, ('dropless', 'capacity'))])
  emit(f'MoE layer forward+backward on {data["device_kind"]} (d_model {d}, top-{k} of '
       f'experts with d_ff {f}; dense d_ff {k * f})',
       ['experts', 'tokens', 'dense tok/s', 'dropless tok/s', 'capacity tok/s',
        'dropless / dense', 'capacity / dense'], rows, {**data, 'records': records}, out)
  return records


def matmul_table(g: dict, iters: int, data: dict, out: str) -> dict:
  """The grouped matmul alone, per implementation, expert count and batch; the kernels'
  tilings at `tiling_experts`. -> {'grouped_matmul': records, 'mfu_overrides': ...}."""
  d, f, k, impls = g['d_model'], g['expert_d_ff'], g['top_k'], g['impls']
  kernels = [i for i in impls if i != 'xla']
  records = []

  def table_of(done: list[dict]) -> dict:
    return {'grouped_matmul': done, 'mfu_overrides': mfu_overrides(done, kernels)}

  for experts in g['experts']:
    for tokens in g['matmul_tokens']:
      records.append(grouped_matmul_case(
          experts, tokens * k, d, f, jnp.dtype(g['dtype']), impls, iters,
          g['tilings'] if experts == g['tiling_experts'] else None,
          # a run cut off keeps what it timed
          progress=lambda record: save({**data, **table_of([*records, record])}, out)))
      table = table_of(records)
  ms = lambda s: '–' if s is None else f'{1e3 * s:,.2f}'
  emit(f'grouped matmul, forward + gradients: rows x {d} times each expert\'s {d} x {f}, '
       f'on {data["device_kind"]}',
       ['experts', 'rows', *(f'{impl} ms' for impl in impls),
        *(f'{impl} TFLOP/s' for impl in impls), 'XLA FLOPs / real',
        *(f'{i} max rel. error' for i in kernels), *(f'{i} best tiling' for i in kernels)],
       [[str(r['experts']), str(r['rows']), *(ms(r[f'{i}_s']) for i in impls),
         *(f'{r[f"{i}_tflops"]:.3g}' if r[f'{i}_s'] else '–' for i in impls),
         f'{r["xla_flops_over_real"]:.1f}' if r.get('xla_flops_over_real') is not None else '–',
         *(f'{r[f"{i}_max_rel_error"]:.1e}' if f'{i}_max_rel_error' in r else '–'
           for i in kernels),
         *(best_tiling_cell(r, i) for i in kernels)]
        for r in records], {**data, **table}, out)
  for r in records:  # with mosaic: which weight-gradient kernel is faster
    rates = {f: r[f'weight_grad_{f}_tflops'] for f in ('triton', 'mosaic')
             if f'weight_grad_{f}_tflops' in r}
    if rates:
      print(f'weight gradient alone, {r["experts"]} experts: ' + ', '.join(
          f'{f} {t:.3g} TFLOP/s' for f, t in rates.items()))
  return table


def best_tiling(record: dict, impl: str) -> dict | None:
  """The fastest of the default tiling and the swept ones that match ragged_dot, with its
  TFLOP/s (None: none ran and matched)."""
  ran = [t for t in record[f'{impl}_tilings'] if 'tflops' in t]
  if record[f'{impl}_s']:  # the default tiling
    ran.insert(0, dict(TILINGS[impl][0]()._asdict(), tflops=record[f'{impl}_tflops'],
                       max_rel_error=record.get(f'{impl}_max_rel_error', math.inf)))
  correct = [t for t in ran if matches(t.get('max_rel_error', math.inf))]  # unchecked: out
  return max(correct, key=lambda t: t['tflops'], default=None)


def matches(error: float | None) -> bool:
  """Whether a kernel's difference from ragged_dot is within the limit; a NaN is not
  (`NaN > limit` is False, hence `<=`), nor a NaN read back from JSON (None)."""
  return error is not None and error <= MAX_KERNEL_ERROR


def mfu_overrides(records: list[dict], kernels: list[str]) -> list[str]:
  """How `benchmarks/mfu.py --moe_kernels_from` runs its MoE cases after this table: with
  the fastest kernel family that ran and matched `ragged_dot` in every record, at its
  fastest tiling (as configured when no tiling was timed); with `ragged_dot` when none
  did. Mosaic's weight gradient is Triton's, so a Mosaic choice keeps Triton's tiling, or
  jax's transposed Mosaic kernel where that matched ragged_dot and was faster."""
  good = [impl for impl in kernels  # unchecked (no ragged_dot reference ran): failed
          if not any(f'{impl}_error' in r or not matches(r.get(f'{impl}_max_rel_error',
                                                                math.inf))
                     for r in records if f'{impl}_s' in r)]
  if not good:
    return ['model.moe.matmul_impl=xla']
  best = {impl: [r[f'{impl}_best_tiling'] for r in records if r.get(f'{impl}_best_tiling')]
          for impl in good}
  fastest = max(good, key=lambda i: best[i][-1]['tflops'] if best[i] else 0.0)

  def tiling(impl):  # a field a record predates (Triton's order) has its default
    tiling_type, key = TILINGS[impl]
    values = tiling_type(**{f: v for f, v in best[impl][-1].items() if f in tiling_type._fields})
    return f'model.moe.{key}={tuple(values)}'

  overrides = [tiling(fastest)] if best[fastest] else []
  if TILINGS[fastest][1] == 'mosaic_tiling':  # not what `auto` runs
    overrides.insert(0, f'model.moe.matmul_impl={fastest}')
    overrides += [tiling(i) for i in good if TILINGS[i][1] == 'kernel_tiling' and best[i]]
    if fastest == 'mosaic' and mosaic_weight_grad_wins(records):
      overrides.append('model.moe.mosaic_weight_grad=mosaic')
  return overrides


def mosaic_weight_grad_wins(records: list[dict]) -> bool:
  """Whether jax's transposed Mosaic kernel matched ragged_dot's weight gradient and beat
  Triton's in every record that timed both (and at least one did)."""
  both = [r for r in records
          if {'weight_grad_mosaic_tflops', 'weight_grad_triton_tflops'} <= r.keys()]
  return bool(both) and all(
      matches(r.get('weight_grad_mosaic_max_rel_error', math.inf))
      and r['weight_grad_mosaic_tflops'] > r['weight_grad_triton_tflops'] for r in both)


def best_tiling_cell(record: dict, impl: str) -> str:
  best = record.get(f'{impl}_best_tiling')
  return f'{tiling_name(best)}: {best["tflops"]:.3g}' if best else '–'


if __name__ == '__main__':
  main()
