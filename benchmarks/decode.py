"""Decode speed: dense vs MoE vs UltraMem at equal parameters, per batch size and prompt.

  python benchmarks/decode.py [--preset=151m|small] [--batches=1,8,64,256]
                              [--prompts=128,2048] [--new_tokens=64] [--out=...]

The MoE and UltraMem presets of one name have equal total and equal activated parameters
(stated in configs/moe.py and configs/ultramem.py); the dense model is the dense preset
widened to the same activated count. Each model prefills random prompts of each length
and generates `new_tokens` greedy tokens per sequence (no stop ids, so every sequence
runs to the end) through `jaxarch.infer.Generator`. Reported per case: time per decode
step, decode tokens/s (batch / step time), and the parameter and KV-cache bytes a decode
step reads (analytic, below), with the ratio of MoE's to UltraMem's step time measured
in the same run.

MoE runs on both inference paths, dropless (exact; while batch·top_k <= experts it reads
only the chosen experts) and capacity factor 1.0 (padded batched matmuls; overflow
dropped), and is compared on the faster of the two. Weights are random: the speed does
not depend on them, only on routing balance, which is near uniform at init as after
balanced training. Compute and parameters are bf16 on accelerators, fp32 on CPU.

Bytes read per step, for a batch of b new tokens: every parameter once, except the
embedding table (b rows), MoE experts (an expert is read if a token chose it: expected
E·(1 - (1 - k/E)^b) of E experts, uniform routing) and UltraMem values (expected
N·(1 - (1 - H·k/N)^b) of N rows, uniform retrieval); KV cache: keys and values of every
layer at the mean context length of the decode (a windowed layer's window at most).
"""

import sys

import jax
import numpy as np
from flax import nnx

from compare_families import counts, matched_dense
from report import device_info, emit, ints, on_accelerator, save, scaled_parser

from jaxarch import config as config_lib
from jaxarch import infer, models
from jaxarch.cli import at_least_one
from jaxarch.layers.attention import Attention
from jaxarch.layers.moe import MoE
from jaxarch.layers.ultramem import UltraMem

SCALES = {  # preset, batches, prompt lengths, new tokens per sequence
    'gpu': dict(preset='151m', batches=(1, 8, 64, 256), prompts=(128, 2048), new_tokens=64),
    'cpu': dict(preset='small', batches=(1, 8, 64, 256), prompts=(32, 256), new_tokens=16),
}
MOE_PATHS = {'moe_dropless': None, 'moe_capacity': 1.0}


def configs(preset: str, dtype: str) -> dict:
  overrides = [f'model.dtype={dtype}', f'model.param_dtype={dtype}']
  sparse = {f: config_lib.load(f'configs/{f}.py:{preset}', overrides)
            for f in ('moe', 'ultramem')}
  target = counts(sparse['ultramem'])['active']
  return {'dense': matched_dense(target, overrides, preset), **sparse}


def param_bytes_per_step(model: nnx.Module, batch: int) -> float:
  """Expected bytes of parameters one decode step over `batch` sequences reads."""
  nbytes = lambda v: v.get_value().size * v.get_value().dtype.itemsize
  total = sum(nbytes(v) for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param))
  table = model.embed.embedding
  total -= nbytes(table) * (1 - min(batch, table.shape[0]) / table.shape[0])
  for _, m in nnx.iter_graph(model):
    if isinstance(m, MoE):
      unread = (1 - m.top_k / m.num_experts) ** batch
      total -= unread * sum(nbytes(w) for w in (m.w_gate, m.w_up, m.w_down))
    elif isinstance(m, UltraMem):
      reads = min(m.num_heads * m.top_k, m.num_values)
      total -= (1 - reads / m.num_values) ** batch * nbytes(m.values)
  return total


def kv_bytes_per_step(model: nnx.Module, batch: int, context: float, itemsize: int) -> float:
  """Keys and values of every attention layer at `context` positions (a windowed layer's
  window at most), `batch` sequences."""
  return batch * itemsize * sum(
      2 * m.k_proj.shape[1] * m.k_proj.shape[2] * min(context, m.window or context)
      for _, m in nnx.iter_graph(model) if isinstance(m, Attention))


def time_decode(generator, batch: int, prompt: int, new_tokens: int, repeats: int) -> dict:
  """Seconds per decode step (best of `repeats`) and per prefill, for one shape."""
  rng = np.random.default_rng(batch * 100_003 + prompt)
  prompts = rng.integers(0, 256, (batch, prompt)).tolist()
  runs = [generator(prompts, max_new_tokens=new_tokens)[1] for _ in range(repeats)]
  assert all(r['forward_passes'] == new_tokens for r in runs)
  return {'step_s': min(r['decode_step_s'] for r in runs),
          'prefill_s': min(r['prefill_s'] for r in runs),
          'compile_s': runs[0]['compile_s'], 'cache_bytes': runs[0]['cache_bytes']}


def main(argv=None):
  parser, scale = scaled_parser(__doc__, SCALES)
  parser.add_argument('--preset', default=scale['preset'])
  parser.add_argument('--batches', type=ints, default=scale['batches'])
  parser.add_argument('--prompts', type=ints, default=scale['prompts'])
  parser.add_argument('--new_tokens', type=at_least_one, default=scale['new_tokens'])
  parser.add_argument('--repeats', type=at_least_one, default=2)
  parser.add_argument('--out', default='benchmarks/results/decode.json')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  dtype = 'bfloat16' if on_accelerator() else 'float32'
  itemsize = np.dtype(dtype).itemsize

  built = {}
  for family, cfg in configs(args.preset, dtype).items():
    model = models.build(cfg.model, rngs=nnx.Rngs(0))
    c = counts(cfg)
    paths = MOE_PATHS if family == 'moe' else {family: None}
    for name, capacity in paths.items():
      built[name] = dict(model=model, params_total=c['total'], params_active=c['active'],
                         generator=infer.Generator(model, moe_capacity_factor=capacity))

  device = jax.devices()[0]
  records, rows = [], []
  data = dict(**device_info(), preset=args.preset, dtype=dtype, new_tokens=args.new_tokens,
              params={n: (b['params_total'], b['params_active']) for n, b in built.items()},
              records=records)
  for prompt in args.prompts:
    for batch in args.batches:
      context = prompt + args.new_tokens / 2
      case = {}
      for name, b in built.items():
        timing = time_decode(b['generator'], batch, prompt, args.new_tokens, args.repeats)
        case[name] = dict(
            family=name, batch=batch, prompt=prompt, new_tokens=args.new_tokens,
            params_total=b['params_total'], params_active=b['params_active'],
            decode_step_ms=timing['step_s'] * 1e3, tokens_per_s=batch / timing['step_s'],
            prefill_s=timing['prefill_s'], compile_s=timing['compile_s'],
            param_bytes_per_step=param_bytes_per_step(b['model'], batch),
            kv_bytes_per_step=kv_bytes_per_step(b['model'], batch, context, itemsize))
        records.append(case[name])
        save(data, args.out)  # a run cut off by a time limit keeps the models it timed
      best_moe = min(MOE_PATHS, key=lambda n: case[n]['decode_step_ms'])
      ultramem = case['ultramem']['decode_step_ms']
      moe_ratio = case[best_moe]['decode_step_ms'] / ultramem
      dense_ratio = case['dense']['decode_step_ms'] / ultramem
      for record in case.values():
        record.update(moe_best_path=best_moe, moe_over_ultramem=moe_ratio,
                      dense_over_ultramem=dense_ratio)
      save(data, args.out)
      ms = lambda n: f'{case[n]["decode_step_ms"]:.2f}'
      mb = lambda n: f'{case[n]["param_bytes_per_step"] / 2**20:,.1f}'
      rows.append([str(prompt), str(batch), ms('dense'), ms('moe_dropless'),
                   ms('moe_capacity'), ms('ultramem'),
                   f'{case["ultramem"]["tokens_per_s"]:,.0f}', f'{moe_ratio:.2f}',
                   f'{dense_ratio:.2f}', mb('dense'), mb('moe_dropless'), mb('ultramem'),
                   f'{case["ultramem"]["kv_bytes_per_step"] / 2**20:,.1f}'])

  sizes = ', '.join(f'{n} {t / 1e6:.1f}M/{a / 1e6:.2f}M' for n, (t, a) in data['params'].items()
                    if n != 'moe_capacity')
  emit(f'Decode on {device.device_kind}, {args.preset} presets in {dtype} (total/active: '
       f'{sizes}); ms per decode step; MoE/UltraMem uses the faster MoE path',
       ['prompt', 'batch', 'dense ms', 'MoE dropless ms', 'MoE capacity ms', 'UltraMem ms',
        'UltraMem tok/s', 'MoE / UltraMem', 'dense / UltraMem', 'dense MiB/step',
        'MoE MiB/step', 'UltraMem MiB/step', 'KV MiB/step'], rows, data, args.out)
  return data


if __name__ == '__main__':
  main()
