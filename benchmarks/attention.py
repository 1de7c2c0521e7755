"""Attention with and without a sliding window: cuDNN against XLA, speed and agreement.

  python benchmarks/attention.py [--batch=4] [--seq_len=4096] [--window=1024]
                                 [--iters=10] [--out=...]

The model's attention layer (`layers/attention.py`: projections, RoPE, the document mask
of packed rows, causal) at a 151m-like width, forward and gradients of its weights and
input, as training runs it. Each implementation the device has (XLA everywhere, cuDNN
flash attention on a GPU in bf16) runs with every position seen and with a sliding
`--window`; the rows hold two documents each, so the window and the document mask apply
together. Reported: time per call, its ratio to the same implementation without the
window, and on a GPU cuDNN's largest relative difference from XLA on the output and
gradients (`report.max_rel_error`), the check that cuDNN's window is the model's.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from report import (device_info, emit, max_rel_error, on_accelerator, or_error, save,
                    scaled_parser, timed)

from jaxarch.cli import at_least_one
from jaxarch.layers.attention import Attention

SCALES = {  # batch, sequence, window; width: d_model, heads, kv heads, head_dim
    'gpu': dict(batch=4, seq_len=4096, window=1024, width=(1024, 8, 8, 128)),
    'cpu': dict(batch=2, seq_len=256, window=64, width=(128, 4, 2, 32)),
}


def loss_and_grads(impl: str, window, width, dtype):
  """The jitted (x, positions, segment ids) -> (output, grads of the weights and x)."""
  layer = Attention(*width, impl=impl, window=window, dtype=dtype, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)

  def run(x, positions, segments):
    def loss(params, x):
      out = nnx.merge(graphdef, params)(x, positions, segments)
      return jnp.sum(out.astype(jnp.float32) ** 2) / out.size, out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return out, grads

  return jax.jit(run)


def main(argv=None):
  parser, scale = scaled_parser(__doc__, SCALES)
  parser.add_argument('--batch', type=at_least_one, default=scale['batch'])
  parser.add_argument('--seq_len', type=at_least_one, default=scale['seq_len'])
  parser.add_argument('--window', type=at_least_one, default=scale['window'])
  parser.add_argument('--iters', type=at_least_one, default=10)
  parser.add_argument('--out', default='benchmarks/results/attention.json')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  dtype = jnp.bfloat16 if on_accelerator() else jnp.float32
  width = scale['width']
  b, t = args.batch, args.seq_len
  x = jax.random.normal(jax.random.key(1), (b, t, width[0]), dtype)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  segments = (positions >= t // 3).astype(jnp.int32) + 1  # two documents per row
  # The document's positions restart with it, as the packed rows the trainer builds.
  positions = jnp.where(segments == 2, positions - t // 3, positions)
  impls = ['xla'] + (['cudnn'] if jax.default_backend() == 'gpu' else [])

  records, rows, outputs = [], [], {}
  data = dict(**device_info(), dtype=jnp.dtype(dtype).name, batch=b, seq_len=t,
              window=args.window, width=width, records=records)
  for impl in impls:
    for window in (None, args.window):
      fn = loss_and_grads(impl, window, width, dtype)
      record = dict(impl=impl, window=window)
      seconds = or_error(timed, fn, x, positions, segments, iters=args.iters)
      if isinstance(seconds, str):
        record['error'] = seconds
      else:
        record['ms'] = seconds * 1e3
        outputs[impl, window] = jax.tree.leaves(fn(x, positions, segments))
        if window is not None and 'ms' in records[-1]:
          record['over_no_window'] = record['ms'] / records[-1]['ms']
        if impl != 'xla' and ('xla', window) in outputs:
          record['max_rel_error_vs_xla'] = max_rel_error(outputs[impl, window],
                                                         outputs['xla', window])
      records.append(record)
      ms = record['error'][:60] if 'error' in record else f'{record["ms"]:.2f}'
      rows.append([impl, str(window or 'none'), ms,
                   f'{record["over_no_window"]:.2f}' if 'over_no_window' in record else '-',
                   f'{record["max_rel_error_vs_xla"]:.2e}'
                   if 'max_rel_error_vs_xla' in record else '-'])
      save(data, args.out)  # a run cut off keeps the cases it timed

  emit(f'Attention on {jax.devices()[0].device_kind} ({data["dtype"]}): batch {b} x {t}, '
       f'd_model {width[0]}, {width[1]} heads ({width[2]} kv) of {width[3]}, two documents '
       f'per row; forward + gradients',
       ['impl', 'window', 'ms', 'window / none', 'max rel. diff. from XLA'], rows, data,
       args.out)
  return data


if __name__ == '__main__':
  main()
