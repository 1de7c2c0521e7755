"""MEGABYTE against a byte-level transformer with the same parameter count.

  python benchmarks/megabyte.py [--preset=151m|tiny] [--seq_lens=2048,8192,32768]
                                [--gen_context=8192] [--bpb_preset=small] [--bpb_steps=N]
                                [--out=benchmarks/results/megabyte.json]

The byte transformer keeps MEGABYTE's global width, heads, feed-forward and training
settings; its depth, then its feed-forward width, are chosen so that its parameter count
matches MEGABYTE's. Three measurements, all in one run:

- **training**: tokens (bytes) per second of the jitted train step on synthetic bytes
  (`jaxarch.train.throughput.measure`), and model FLOPs per byte (`jaxarch.train.flops`: MEGABYTE
  runs its global model once per patch), at each sequence length with the same number of
  bytes per batch;
- **generation**: bytes per second of greedy decoding at `gen_context` bytes of context
  (prompt plus new bytes) through `jaxarch.infer.Generator`, random weights: MEGABYTE
  steps its global model once per patch and its local model once per byte;
- **quality at equal compute**: both train on the default corpus with the same batch;
  the transformer for `bpb_steps`, MEGABYTE for as many more steps as its lower FLOPs
  per byte buy, then both report validation bits per byte. (MEGABYTE packs documents on
  patch boundaries, so its validation batches hold the same documents with a little
  padding that the loss ignores.)

Compute is bf16 on accelerators, fp32 on CPU.
"""

import sys
import tempfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from compare_families import counts
from report import device_info, emit, ints, on_accelerator, save, scaled_parser, trained

from jaxarch import config as config_lib
from jaxarch import infer, models
from jaxarch.cli import at_least_one
from jaxarch.train import flops, train
from jaxarch.train.throughput import measure

SCALES = {
    'gpu': dict(preset='151m', seq_lens=(2048, 8192, 32768), batch_bytes=65536,
                gen_context=8192, gen_batches=(1, 8), new_tokens=256, bpb_preset='small',
                bpb_steps=2000),
    'cpu': dict(preset='tiny', seq_lens=(512, 1024, 2048), batch_bytes=8192,
                gen_context=1024, gen_batches=(1, 8), new_tokens=64, bpb_preset='tiny',
                bpb_steps=300),
}


def byte_transformer(mb: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The dense byte-level transformer at MEGABYTE `mb`'s global width and parameter count."""
  target = counts(mb)['total']

  def dense(n_layers: int, d_ff: int) -> ml_collections.ConfigDict:
    tree = config_lib.to_dict(mb)
    tree['model'].update(family='dense', n_layers=n_layers, d_ff=d_ff)
    for section in ('megabyte', 'ultramem'):
      tree['model'].pop(section, None)
    tree['data']['pack_align'] = 1
    return _validated(tree)

  d_ff = mb.model.d_ff
  one, two = (counts(dense(n, d_ff))['total'] for n in (1, 2))
  n_layers = max(1, (target - one) // (two - one) + 1)  # deepest that does not overshoot
  below = counts(dense(n_layers, d_ff))['total']
  per_unit = 3 * mb.model.d_model * n_layers  # SwiGLU parameters per unit of d_ff
  return dense(n_layers, d_ff + round((target - below) / per_unit / 8) * 8)


def configs(preset: str, overrides) -> dict:
  mb = config_lib.load(f'configs/megabyte.py:{preset}', overrides)
  return {'megabyte': mb, 'transformer': byte_transformer(mb)}


def with_keys(cfg: ml_collections.ConfigDict, **values) -> ml_collections.ConfigDict:
  """A validated copy of `cfg` with `values` set, as `'model.max_len': 4096`-style keys."""
  tree = config_lib.to_dict(cfg)
  for key, value in values.items():
    section, name = key.split('.')
    tree[section][name] = value
  return _validated(tree)


def _validated(tree: dict) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(tree)
  cfg.lock()
  return config_lib.validate(cfg)


def training_speed(runs: dict, seq_lens, batch_bytes: int, steps: int, records: list,
                   saved) -> list[dict]:
  for seq_len in seq_lens:
    batch = max(1, batch_bytes // seq_len)
    for name, cfg in runs.items():
      cfg = with_keys(cfg, **{'data.seq_len': seq_len, 'train.batch_size': batch,
                              'model.max_len': max(seq_len, cfg.model.max_len)})
      result = measure(cfg, steps=steps, warmup=2)
      records.append(dict(model=name, seq_len=seq_len, batch_size=batch,
                          tokens_per_s=result['tokens_per_s'],
                          step_time_s=result['step_time_s'],
                          flops_per_byte=result['flops_per_token'], mfu=result['mfu']))
      saved()
  return records


def generation_speed(runs: dict, context: int, batches, new_tokens: int, records: list,
                     saved) -> list[dict]:
  prompt = context - new_tokens
  for name, cfg in runs.items():
    cfg = with_keys(cfg, **{'model.max_len': max(2 * context, cfg.model.max_len)})
    generator = infer.Generator(models.build(cfg.model, rngs=nnx.Rngs(0)))
    for batch in batches:
      prompts = np.random.default_rng(batch).integers(0, 256, (batch, prompt)).tolist()
      stats = [generator(prompts, max_new_tokens=new_tokens)[1] for _ in range(2)]
      best = min(stats, key=lambda s: s['decode_step_s'])
      records.append(dict(model=name, context=context, prompt=prompt, batch=batch,
                          new_tokens=new_tokens, bytes_per_s=batch / best['decode_step_s'],
                          decode_step_ms=1e3 * best['decode_step_s'],
                          prefill_s=best['prefill_s'], compile_s=stats[0]['compile_s']))
      saved()
  return records


def equal_compute_quality(runs: dict, steps: int, workdir: Path) -> list[dict]:
  sizes = {n: counts(c) for n, c in runs.items()}
  per_byte = {n: flops.train_flops_per_token(c.model, sizes[n], c.data.seq_len)
              for n, c in runs.items()}
  records = []
  for name, cfg in runs.items():
    n = round(steps * per_byte['transformer'] / per_byte[name])
    cfg = with_keys(cfg, **{'train.steps': n, 'train.warmup_steps': max(1, n // 10),
                            'log.eval_every_steps': n, 'checkpoint.every_steps': n,
                            'log.progress': False})
    metrics = trained(train(cfg, workdir / name))
    bytes_seen = n * cfg.train.batch_size * cfg.data.seq_len
    records.append(dict(model=name, steps=n, train_bytes=bytes_seen,
                        train_flops=bytes_seen * per_byte[name], eval_bpb=metrics['eval_bpb'],
                        train_loss=metrics['loss'], params_total=sizes[name]['total']))
  return records


def ratio(records, key, **match):
  """MEGABYTE's `key` over the transformer's, for the records matching `match`."""
  value = {r['model']: r[key] for r in records
           if all(r[k] == v for k, v in match.items())}
  return value['megabyte'] / value['transformer']


def main(argv=None):
  parser, scale = scaled_parser(__doc__, SCALES)
  parser.add_argument('--preset', default=scale['preset'], help='for the speed measurements')
  parser.add_argument('--seq_lens', type=ints, default=scale['seq_lens'])
  parser.add_argument('--batch_bytes', type=int, default=scale['batch_bytes'])
  parser.add_argument('--train_steps', type=at_least_one, default=5, help='timed train steps')
  parser.add_argument('--gen_context', type=int, default=scale['gen_context'])
  parser.add_argument('--gen_batches', type=ints, default=scale['gen_batches'])
  parser.add_argument('--new_tokens', type=at_least_one, default=scale['new_tokens'])
  parser.add_argument('--bpb_preset', default=scale['bpb_preset'])
  parser.add_argument('--bpb_steps', type=int, default=scale['bpb_steps'],
                      help="the transformer's training steps; 0 skips the quality run")
  parser.add_argument('--workdir', help='keep the quality runs here (default: temporary)')
  parser.add_argument('--out', default='benchmarks/results/megabyte.json')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if args.gen_context <= args.new_tokens:  # the prompt is the context less the new bytes
    parser.error(f'--gen_context={args.gen_context} must exceed --new_tokens='
                 f'{args.new_tokens}')
  dtype = 'bfloat16' if on_accelerator() else 'float32'
  overrides = [f'model.dtype={dtype}', f'model.param_dtype={dtype}']

  runs = configs(args.preset, overrides)
  params = {n: counts(c)['total'] for n, c in runs.items()}
  shapes = {n: f'{c.model.d_model}x{c.model.n_layers} d_ff {c.model.d_ff}'
            for n, c in runs.items()}
  device = jax.devices()[0]
  data = dict(**device_info(), preset=args.preset, bpb_preset=args.bpb_preset, dtype=dtype,
              params=params, shapes=shapes, training=[], generation=[], quality=[])
  # Saved after each record: a run cut off by a time limit keeps the ones it finished.
  saved = lambda: save(data, args.out)
  training = training_speed(runs, args.seq_lens, args.batch_bytes, args.train_steps,
                            data['training'], saved)
  generation = generation_speed(runs, args.gen_context, args.gen_batches, args.new_tokens,
                                data['generation'], saved)
  quality = []
  if args.bpb_steps:
    root = Path(args.workdir or tempfile.mkdtemp(prefix='jaxarch-megabyte-'))
    quality = data['quality'] = equal_compute_quality(configs(args.bpb_preset, overrides),
                                                      args.bpb_steps, root)

  rows = []
  for seq_len in args.seq_lens:
    get = {r['model']: r for r in training if r['seq_len'] == seq_len}
    rows.append([f'train {seq_len}', f'{get["megabyte"]["tokens_per_s"]:,.0f} B/s',
                 f'{get["transformer"]["tokens_per_s"]:,.0f} B/s',
                 f'{ratio(training, "tokens_per_s", seq_len=seq_len):.2f}',
                 f'{get["megabyte"]["flops_per_byte"] / 1e6:,.2f} / '
                 f'{get["transformer"]["flops_per_byte"] / 1e6:,.2f} MFLOP/B'])
  for batch in args.gen_batches:
    get = {r['model']: r for r in generation if r['batch'] == batch}
    rows.append([f'generate {args.gen_context} b{batch}',
                 f'{get["megabyte"]["bytes_per_s"]:,.0f} B/s',
                 f'{get["transformer"]["bytes_per_s"]:,.0f} B/s',
                 f'{ratio(generation, "bytes_per_s", batch=batch):.2f}',
                 f'{get["megabyte"]["decode_step_ms"]:.2f} / '
                 f'{get["transformer"]["decode_step_ms"]:.2f} ms per byte'])
  if quality:
    get = {r['model']: r for r in quality}
    rows.append([f'val bpb, {get["transformer"]["train_flops"]:.2g} FLOPs',
                 f'{get["megabyte"]["eval_bpb"]:.3f}', f'{get["transformer"]["eval_bpb"]:.3f}',
                 f'{ratio(quality, "eval_bpb"):.3f}',
                 f'{get["megabyte"]["steps"]} / {get["transformer"]["steps"]} steps '
                 f'({args.bpb_preset})'])

  emit(f'MEGABYTE vs byte transformer on {device.device_kind}, {args.preset} '
       f'({params["megabyte"] / 1e6:.2f}M: {shapes["megabyte"]} global; transformer '
       f'{params["transformer"] / 1e6:.2f}M: {shapes["transformer"]}), {dtype}',
       ('measure', 'MEGABYTE', 'transformer', 'MEGABYTE / transformer', 'detail'), rows,
       data, args.out)
  return data


if __name__ == '__main__':
  main()
