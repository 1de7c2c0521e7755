"""Decoding with sliding-window attention: KV-cache memory and step time against global.

  python benchmarks/window_decode.py [--preset=small|151m] [--window=128] [--batch=8]
                                     [--prompts=512,2048] [--new_tokens=16] [--out=...]

One dense preset three ways: every layer global (the baseline), every layer a sliding
window of `--window` positions (Mistral's layout), and three windowed layers to one global
(Gemma 3 has five to one; three fit the 4 layers of `small`). A windowed layer keeps a ring of `window` cache slots, not one per position
(`layers/attention.py`), so its decode step reads and holds the window alone. Reported per
prompt length: the bytes of KV cache `Generator` allocated for the call (its
`cache_bytes`, read off the cache arrays) and the time per decode step, each with its ratio to the global model in
the same run. Weights are random; speed and memory do not depend on them.
"""

import sys

import jax
import numpy as np
from flax import nnx

from decode import time_decode
from report import device_info, emit, ints, on_accelerator, save, scaled_parser

from jaxarch import config as config_lib
from jaxarch import infer, models
from jaxarch.cli import at_least_one

SCALES = {
    'gpu': dict(preset='151m', window=1024, batch=8, prompts=(2048, 8192), new_tokens=64),
    'cpu': dict(preset='small', window=128, batch=8, prompts=(512, 2048), new_tokens=16),
}
PATTERNS = {  # name -> model.attention_pattern, or None for no window
    'global': None,
    'window': ('local',),
    'window 3:1 global': ('local',) * 3 + ('global',),
}


def main(argv=None):
  parser, scale = scaled_parser(__doc__, SCALES)
  parser.add_argument('--preset', default=scale['preset'])
  parser.add_argument('--window', type=at_least_one, default=scale['window'])
  parser.add_argument('--batch', type=at_least_one, default=scale['batch'])
  parser.add_argument('--prompts', type=ints, default=scale['prompts'])
  parser.add_argument('--new_tokens', type=at_least_one, default=scale['new_tokens'])
  parser.add_argument('--repeats', type=at_least_one, default=2)
  parser.add_argument('--out', default='benchmarks/results/window_decode.json')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  dtype = 'bfloat16' if on_accelerator() else 'float32'
  # Room for the longest prompt's bucket and the new tokens, past which generate warns.
  needed = 2 ** int(np.ceil(np.log2(max(args.prompts)))) + args.new_tokens
  built = {}
  for name, pattern in PATTERNS.items():
    overrides = [f'model.dtype={dtype}', f'model.param_dtype={dtype}']
    if pattern is not None:
      overrides += [f'model.sliding_window={args.window}', f'model.attention_pattern={pattern!r}']
    cfg = config_lib.load(f'configs/dense.py:{args.preset}', overrides)
    if cfg.model.max_len < needed:
      config_lib.apply_override(cfg, f'model.max_len={needed}')
      cfg = config_lib.validate(cfg)
    built[name] = infer.Generator(models.build(cfg.model, rngs=nnx.Rngs(0)))

  records, rows = [], []
  data = dict(**device_info(), preset=args.preset, dtype=dtype, window=args.window,
              batch=args.batch, new_tokens=args.new_tokens, records=records)
  for prompt in args.prompts:
    case = {}
    for name, generator in built.items():
      timing = time_decode(generator, args.batch, prompt, args.new_tokens, args.repeats)
      case[name] = dict(pattern=name, prompt=prompt, batch=args.batch,
                        cache_bytes=timing['cache_bytes'],
                        decode_step_ms=timing['step_s'] * 1e3, prefill_s=timing['prefill_s'])
    for record in case.values():
      record['cache_over_global'] = record['cache_bytes'] / case['global']['cache_bytes']
      record['step_over_global'] = record['decode_step_ms'] / case['global']['decode_step_ms']
      records.append(record)
      rows.append([str(prompt), record['pattern'],
                   f'{record["cache_bytes"] / 2**20:,.1f}', f'{record["cache_over_global"]:.3f}',
                   f'{record["decode_step_ms"]:.2f}', f'{record["step_over_global"]:.2f}'])
    save(data, args.out)  # a run cut off by a time limit keeps the prompts it timed

  emit(f'Decoding on {jax.devices()[0].device_kind}: dense {args.preset} in {dtype}, window '
       f'{args.window}, batch {args.batch}, {args.new_tokens} new tokens',
       ['prompt', 'attention', 'KV cache MiB', 'cache / global',
        'ms per decode step', 'step / global'], rows, data, args.out)
  return data


if __name__ == '__main__':
  main()
