"""The value lookup's kernels against the XLA reference: time, bandwidth, ratios.

  python benchmarks/sparse_lookup.py [--grid=gpu|cpu] [--out=benchmarks/results/sparse_lookup.json]

For each (T, K, D, N, dtype) of the grid, times the forward and the backward (both
gradients) of `jaxarch.kernels.sparse_lookup` for `impl='xla'` and, on a GPU or TPU,
`impl='pallas'` with each scatter mode, and checks each against the first (XLA, sorted):
`<impl>_<scatter>_max_rel_error`, the largest difference of the output and both gradients
over the reference's largest magnitude (bf16 tables: about 1e-2 or less). Forward
bandwidth counts the bytes that must move: the K rows read per token plus the output
written (plus indices and weights); the device's own copy bandwidth (`y = x + 1` over
1 GiB: read + write) is measured in the same run, so the forward's fraction of it is
comparable across devices. Ratios are XLA time / Pallas
time (> 1: the kernel is faster). On CPU only the XLA path runs (the Pallas kernels
compile for GPU and TPU; on CPU they only run in the interpreter, which says nothing
about speed).

The grid is the UltraMem reference setting and around it: K = heads · top_k (2 · 80 =
160 in the authors' release), D = a value row slice (d_v / cores = 192), N up to 2^24
rows (the 151m preset has 1104² · 2 = 2.4M slices per layer; 2^24 bf16 rows of 192 are
6 GiB).

A first table times UltraMem's IVE read, forward and backward together, both ways: one
lookup whose entries go to E bags (`bags=`, what the layer runs) against E lookups of all
K slots, those of other bags weighing 0 (what it ran before). Ratio = E lookups' time /
bags' time, per implementation; `max_rel_error` compares the two (output and gradients).
The JSON is written after each case, so a run cut off by a time limit keeps what it did.
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from report import (device_info, emit, max_rel_error, or_error, save, timed,
                    timed_or_error)

from jaxarch.cli import at_least_one
from jaxarch.kernels import sparse_lookup
from jaxarch.kernels.sparse_lookup import one_lookup_per_bag

GRIDS = {
    # (T, K, D, N, dtype)
    'gpu': [(t, k, d, n, dt) for dt in ('bfloat16', 'float32') for (t, k, d, n) in [
        (8192, 32, 192, 1 << 20), (8192, 160, 192, 1 << 20), (65536, 160, 192, 1 << 22),
        (16384, 160, 384, 1 << 24), (65536, 32, 256, 1 << 24), (4096, 256, 64, 1 << 26)]],
    'cpu': [(256, 32, 128, 1 << 14, 'float32'), (1024, 160, 192, 1 << 16, 'bfloat16')],
}
# (T, K, D, N, dtype, E): UltraMem's lookup rows (tokens · cores), H·k entries, IVE groups;
# 'gpu' is the 680m preset (slices of 768 / 2, 1460² · 2 of them) at 16K tokens per device.
BAG_GRIDS = {
    'gpu': [(32768, 160, 384, 1 << 22, 'bfloat16', 4)],
    'cpu': [(1024, 160, 128, 1 << 16, 'float32', 4)],
}


def copy_bandwidth(iters: int, gib: float) -> float:
  """Bytes per second of `x + 1` over a `gib` GiB array: read once, written once."""
  x = jnp.zeros((int(gib * (1 << 30)) // 4,), jnp.float32)
  seconds = timed(jax.jit(lambda x: x + 1), x, iters=iters)
  return 2 * x.nbytes / seconds


def case(t, k, d, n, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  values = jax.random.normal(keys[0], (n, d), dtype)
  indices = jax.random.randint(keys[1], (t, k), 0, n, jnp.int32)
  weights = jax.random.normal(keys[2], (t, k), jnp.float32)
  cot = jax.random.normal(keys[3], (t, d), dtype)
  return values, indices, weights, cot


def lookup_fns(impl: str, scatter: str):
  forward = jax.jit(lambda v, i, w: sparse_lookup(v, i, w, impl=impl, scatter=scatter))

  @jax.jit
  def backward(v, i, w, g):
    _, vjp = jax.vjp(lambda v, w: sparse_lookup(v, i, w, impl=impl, scatter=scatter), v, w)
    return vjp(g)

  return forward, backward


def lookup_outputs(forward, backward, values, indices, weights, cot) -> tuple:
  """(output, table gradient, weight gradient)."""
  return (forward(values, indices, weights), *backward(values, indices, weights, cot))


def ive_read_fns(impl: str, num_bags: int):
  """(bags, E lookups): fn(values, indices, weights, bags, cot) -> (out, grad_values,
  grad_weights), each jitted."""
  def bagged(v, i, w, b):
    return sparse_lookup(v, i, w, bags=b, num_bags=num_bags, impl=impl)

  def each_bag(v, i, w, b):
    out = sparse_lookup(v, *one_lookup_per_bag(i, w, b, num_bags), impl=impl)
    return out.reshape(i.shape[0], num_bags, -1)

  def with_grads(lookup):
    def fn(v, i, w, b, g):
      out, vjp = jax.vjp(lambda v, w: lookup(v, i, w, b), v, w)
      return (out, *vjp(g))
    return jax.jit(fn)

  return with_grads(bagged), with_grads(each_bag)


def ive_read_table(grid, impls, iters: int):
  """Times the IVE read both ways (module doc) -> (records, rows)."""
  records, rows = [], []
  for t, k, d, n, dtype, e in grid:
    values, indices, weights, _ = case(t, k, d, n, jnp.dtype(dtype))
    keys = jax.random.split(jax.random.key(1), 2)
    bags = jax.random.randint(keys[0], (t, k), 0, e, jnp.int32)
    cot = jax.random.normal(keys[1], (t, e, d), values.dtype)
    inputs = (values, indices, weights, bags, cot)
    record = dict(T=t, K=k, D=d, N=n, dtype=dtype, E=e)
    for impl in impls:
      bagged, each_bag = ive_read_fns(impl, e)
      cells = [str(t), str(k), str(d), f'2^{n.bit_length() - 1}', dtype, str(e), impl]
      bags_s = timed_or_error(bagged, *inputs, iters=iters)
      if isinstance(bags_s, str):  # the kernels fail here: this row only
        record[f'{impl}_error'] = bags_s
        rows.append(cells + ['–'] * 4)
        continue
      record[f'{impl}_bags_s'] = bags_s
      each_s = timed_or_error(each_bag, *inputs, iters=iters)
      if isinstance(each_s, str):  # E lookups need E times the memory: may not fit
        record[f'{impl}_each_bag_error'] = each_s
        rows.append(cells + [f'{bags_s * 1e3:.2f}'] + ['–'] * 3)
        continue
      record[f'{impl}_each_bag_s'] = each_s
      record[f'{impl}_ratio'] = record[f'{impl}_each_bag_s'] / bags_s
      record[f'{impl}_max_rel_error'] = max_rel_error(bagged(*inputs), each_bag(*inputs))
      rows.append(cells + [f'{bags_s * 1e3:.2f}', f'{record[f"{impl}_each_bag_s"] * 1e3:.2f}',
                           f'{record[f"{impl}_ratio"]:.2f}',
                           f'{record[f"{impl}_max_rel_error"]:.1e}'])
    records.append(record)
    del values, indices, weights, bags, cot, inputs
  return records, rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  on_accelerator = jax.default_backend() in ('gpu', 'tpu')
  parser.add_argument('--grid', choices=tuple(GRIDS), default='gpu' if on_accelerator else 'cpu')
  parser.add_argument('--iters', type=at_least_one, default=20 if on_accelerator else 3)
  parser.add_argument('--out', default='benchmarks/results/sparse_lookup.json')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)

  device = jax.devices()[0]
  impls = [('xla', 'sorted'), ('xla', 'atomic')]
  if on_accelerator:
    impls += [('pallas', 'sorted'), ('pallas', 'atomic')]
  else:
    print('CPU: timing the XLA path only (the Pallas kernels need a GPU or TPU)')
  copy_bw = copy_bandwidth(args.iters, gib=1.0 if on_accelerator else 0.125)

  data = dict(**device_info(), platform=device.platform, copy_bandwidth=copy_bw,
              pallas_timed=on_accelerator, ive_read=[], records=[])
  bag_impls = ['xla', 'pallas'] if on_accelerator else ['xla']
  data['ive_read'], rows = ive_read_table(BAG_GRIDS[args.grid], bag_impls, args.iters)
  emit(f'UltraMem IVE read, forward + backward, on {device.device_kind}: bags vs one '
       'lookup per bag', ['T', 'K', 'D', 'N', 'dtype', 'E', 'impl', 'bags ms',
                          'E lookups ms', 'ratio', 'max rel. error'], rows, data, args.out)

  rows = []
  for t, k, d, n, dtype in GRIDS[args.grid]:
    values, indices, weights, cot = case(t, k, d, n, jnp.dtype(dtype))
    item = values.dtype.itemsize
    moved = t * k * d * item + t * d * item + indices.nbytes + weights.nbytes
    times, errors, failed, reference = {}, {}, {}, None
    for impl, scatter in impls:
      forward, backward = lookup_fns(impl, scatter)
      cells = [(f'{impl}_{scatter}_backward_s', backward, (cot,))]
      if scatter == 'sorted':  # the forward does not depend on the scatter mode
        cells.insert(0, (f'{impl}_forward_s', forward, ()))
      for key, fn, extra in cells:  # a kernel that fails here costs its cells only
        seconds = timed_or_error(fn, values, indices, weights, *extra, iters=args.iters)
        if isinstance(seconds, str):
          failed[f'{impl}_{scatter}_error'] = seconds
          break
        times[key] = seconds
      if f'{impl}_{scatter}_error' in failed:
        continue
      # (output, table gradient, weight gradient) against XLA's, sorted: the kernels' check.
      # Its forward may fail where only the backward was timed (atomic): the cell fails,
      # its unchecked times go.
      outputs = or_error(lookup_outputs, forward, backward, values, indices, weights, cot)
      if isinstance(outputs, str):
        failed[f'{impl}_{scatter}_error'] = outputs
        for key, *_ in cells:
          times.pop(key, None)
        continue
      if reference is None:
        reference = outputs
      else:
        errors[f'{impl}_{scatter}_max_rel_error'] = max_rel_error(outputs, reference)
      del outputs
    del reference
    record = dict(T=t, K=k, D=d, N=n, dtype=dtype, forward_bytes=moved, **times, **errors,
                  **failed)
    # Any cell may have failed (out of memory, a kernel that does not compile): the
    # ratios need both of their times.
    forward = [times[f'{i}_forward_s'] for i in ('pallas', 'xla') if f'{i}_forward_s' in times]
    if forward:  # the kernel's when it ran
      record['forward_bandwidth'] = moved / forward[0]
      record['forward_fraction_of_copy'] = record['forward_bandwidth'] / copy_bw
    if 'pallas_forward_s' in times and 'xla_forward_s' in times:
      record['forward_ratio'] = times['xla_forward_s'] / times['pallas_forward_s']
    xla_bwd = min((times[f'xla_{m}_backward_s'] for m in ('sorted', 'atomic')
                   if f'xla_{m}_backward_s' in times), default=None)
    if xla_bwd is not None:
      record['xla_backward_s'] = xla_bwd
    for scatter in ('sorted', 'atomic'):
      if f'pallas_{scatter}_backward_s' in times and xla_bwd is not None:
        record[f'backward_ratio_{scatter}'] = xla_bwd / times[f'pallas_{scatter}_backward_s']
    data['records'].append(record)
    save(data, args.out)
    fmt = lambda key, scale=1.0, digits=2: (f'{record[key] * scale:.{digits}f}'
                                            if key in record else '-')
    rows.append([str(t), str(k), str(d), f'2^{n.bit_length() - 1}', dtype,
                 fmt('xla_forward_s', 1e3, 3), fmt('pallas_forward_s', 1e3, 3),
                 fmt('forward_bandwidth', 1e-9, 1), fmt('forward_fraction_of_copy'),
                 fmt('forward_ratio'), fmt('xla_backward_s', 1e3, 3),
                 fmt('backward_ratio_sorted'), fmt('backward_ratio_atomic'),
                 f'{max(errors.values()):.1e}' if errors else '-'])
    del values, indices, weights, cot

  emit(f'sparse_lookup on {device.device_kind} (copy bandwidth {copy_bw / 1e9:.1f} GB/s)',
       ['T', 'K', 'D', 'N', 'dtype', 'xla fwd ms', 'pallas fwd ms', 'fwd GB/s', 'of copy',
        'fwd ×', 'xla bwd ms', 'bwd × sorted', 'bwd × atomic', 'max rel. error'], rows, data,
       args.out)
  return data


if __name__ == '__main__':
  main()
