"""MoE layer throughput: dropless vs capacity vs the dense layer of the same active width.

  python benchmarks/moe.py [--grid=gpu|cpu] [--out=benchmarks/results/moe.json]

Times forward + backward of one layer on `tokens × d_model` inputs, for each expert count
and batch of the grid: the dropless path (sort + `ragged_dot`), the capacity path
(factor 1.25), and a dense SwiGLU of width `top_k · expert_d_ff` (the same activated
FLOPs per token, no routing). Prints tokens/s and the ratio to dense; writes JSON with
the device. Single device (expert parallelism is exercised by the tests).
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from report import emit, timed

from jaxarch.layers import SwiGLU
from jaxarch.layers.moe import MoE

GRIDS = {
    # d_model, expert_d_ff, top_k, experts, tokens
    'gpu': dict(d_model=1024, expert_d_ff=848, top_k=4, experts=(8, 32, 64),
                tokens=(4096, 16384, 65536), dtype='bfloat16'),
    'cpu': dict(d_model=128, expert_d_ff=96, top_k=2, experts=(4, 16), tokens=(512, 2048),
                dtype='float32'),
}


def train_fn(layer: nnx.Module):
  """jitted (x -> grads of sum(layer(x)²) for the weights and x)."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  @jax.jit
  def step(params, x):
    def loss(params, x):
      return jnp.sum(nnx.merge(graphdef, params, rest)(x).astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1))(params, x)

  return lambda x: step(params, x)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  on_accelerator = jax.default_backend() in ('gpu', 'tpu')
  parser.add_argument('--grid', choices=tuple(GRIDS), default='gpu' if on_accelerator else 'cpu')
  parser.add_argument('--iters', type=int, default=10 if on_accelerator else 3)
  parser.add_argument('--out', default='benchmarks/results/moe.json')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  g = GRIDS[args.grid]
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
      seconds = {name: timed(fn, x, iters=args.iters) for name, fn in
                 (('dense', dense), *layers.items())}
      record = dict(experts=experts, top_k=k, d_model=d, expert_d_ff=f, tokens=tokens,
                    dtype=g['dtype'], **{f'{n}_s': s for n, s in seconds.items()},
                    **{f'{n}_tokens_per_s': tokens / s for n, s in seconds.items()})
      records.append(record)
      rows.append([str(experts), str(tokens),
                   *(f'{tokens / seconds[n]:,.0f}' for n in ('dense', 'dropless', 'capacity')),
                   f'{seconds["dense"] / seconds["dropless"]:.2f}',
                   f'{seconds["dense"] / seconds["capacity"]:.2f}'])
  device = jax.devices()[0]
  data = dict(device=str(device), device_kind=device.device_kind, jax_version=jax.__version__,
              records=records)
  emit(f'MoE layer forward+backward on {device.device_kind} (d_model {d}, top-{k} of '
       f'experts with d_ff {f}; dense d_ff {k * f})',
       ['experts', 'tokens', 'dense tok/s', 'dropless tok/s', 'capacity tok/s',
        'dropless / dense', 'capacity / dense'], rows, data, args.out)
  return data


if __name__ == '__main__':
  main()
