"""UltraMem's two table-sharding designs side by side (two known designs: measure both).

  python benchmarks/table_split.py [--preset=tiny] [--steps=5] [--train_steps=300] \
      [--meshes=fsdp8,...] [--out=benchmarks/results/table_split.json]

**Step**: for each mesh, the trainer's sharded train step of `configs/ultramem.py:PRESET`
with `model.ultramem.table_split` = `rows` and `width` (`kernels/sharded_lookup.py`):
step time and the bytes its collectives produce per device (`train.profile.
collective_bytes`). Ratios are rows / width (> 1: width is faster or moves less). On CPU
the devices are fake (`--xla_force_host_platform_device_count`): their time says how much
work and copying the program does, not what links would cost.

**Load**: the rows design gives each device the reads that fall in its rows, so its
slowest device follows how unevenly reads fall on the table; the width design gives every
device every read (`D / devices` columns each), the same work on each. The benchmark
trains `ultramem:tiny` on the embedded corpus for `--train_steps` steps, counts every
memory layer's reads per value over validation batches at init and after training, and
reports, for 2, 4 and 8 row shards, the busiest shard's reads over the mean (1.0: even).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from report import emit, save

from jaxarch import config as config_lib
from jaxarch import data, models
from jaxarch.cli import at_least_one
from jaxarch.layers import signals
from jaxarch.train import train
from jaxarch.train.pretrained import load_model
from jaxarch.train.step import run_model
from jaxarch.train.throughput import measure

# Meshes of 8 devices: FSDP alone, FSDP with data parallelism, and with tensor parallelism
# (`values` splits over fsdp x tensor under the default rules).
MESHES = {
    'fsdp8': dict(data=1, fsdp=8),
    'data2_fsdp4': dict(data=2, fsdp=4),
    'data2_fsdp2_tensor2': dict(data=2, fsdp=2, tensor=2),
    'data2_tensor4': dict(data=2, tensor=4),
}
SHARDS = (2, 4, 8)


def step_cases(preset: str, meshes, steps: int, batch: int, out: str,
               info: dict) -> list[dict]:
  """Both designs' step per mesh; `info` (the device) heads each partial save."""
  if jax.device_count() < 8:
    print(f'skipping the step table: it needs 8 devices, {jax.device_count()} here '
          '(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8)')
    return []
  rows = []
  for mesh in meshes:
    sizes = MESHES[mesh]
    case = {'mesh': mesh}
    for split in ('rows', 'width'):
      overrides = [f'mesh.ici.{axis}={size}' for axis, size in sizes.items()] + [
          f'model.ultramem.table_split={split}', f'train.batch_size={batch}']
      measured = measure(config_lib.load(f'configs/ultramem.py:{preset}', overrides),
                         steps=steps)
      collectives = measured['collective_bytes_per_device']
      case |= {f'{split}_step_s': measured['step_time_s'], f'{split}_collectives': collectives,
               f'{split}_collective_mb': sum(collectives.values()) / 2**20}
    case['step_ratio'] = case['rows_step_s'] / case['width_step_s']
    case['collective_ratio'] = case['rows_collective_mb'] / case['width_collective_mb']
    rows.append(case)
    save({**info, 'step': rows}, out)  # a run cut off keeps these
  return rows


def read_counts(model: nnx.Module, batches) -> list[np.ndarray]:
  """Reads of each value of each memory layer over `batches`: [N] ints per layer."""
  counters = lambda: nnx.state(model, signals.WindowCounter)
  nnx.update(model, jax.tree.map(jnp.zeros_like, counters()))

  @nnx.jit
  def forward(model, batch):  # the metrics it sows are dropped with run_model's capture
    run_model(lambda m: m(batch['inputs'], batch['segment_ids'], batch['positions']), model)

  for batch in batches:
    forward(model, {k: jnp.asarray(v) for k, v in batch.items()})
  return [np.asarray(v) for v in jax.tree.leaves(counters())]


def imbalance(counts: np.ndarray, shards: int) -> float:
  """Busiest of `shards` equal row ranges' reads over the mean."""
  per_shard = counts.reshape(shards, -1).sum(1)
  return float(per_shard.max() / per_shard.mean())


def load_cases(train_steps: int, eval_batches: int, workdir: Path) -> list[dict]:
  preset = 'configs/ultramem.py:tiny'
  warmup = min(config_lib.load(preset).train.warmup_steps, train_steps)
  cfg = config_lib.load(preset, [f'train.steps={train_steps}', f'train.warmup_steps={warmup}'])
  eval_data = lambda: data.make_eval_dataset(cfg.data, batch_size=16, num_batches=eval_batches)
  fresh = models.build(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
  train(cfg, workdir)
  _, trained = load_model(workdir)
  rows = []
  for when, model in (('init', fresh), (f'step {train_steps}', trained)):
    for layer, counts in enumerate(read_counts(model, eval_data())):
      rows.append({'model': when, 'layer': layer, 'reads': int(counts.sum()),
                   'values_read': float((counts > 0).mean()),
                   **{f'rows_{s}_shards': imbalance(counts, s) for s in SHARDS}})
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='tiny', help='configs/ultramem.py preset')
  parser.add_argument('--meshes', default=','.join(MESHES), help=f'some of {", ".join(MESHES)}')
  parser.add_argument('--steps', type=at_least_one, default=5, help='timed steps per case')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--train_steps', type=int, default=300,
                      help='steps of ultramem:tiny before counting reads (0: skip the load)')
  parser.add_argument('--eval_batches', type=int, default=8)
  parser.add_argument('--workdir', help='for the trained run (default: a temporary one)')
  parser.add_argument('--out', default='benchmarks/results/table_split.json')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  device = jax.devices()[0].device_kind
  result = {'device': device, 'devices': jax.device_count(), 'preset': args.preset,
            'batch_size': args.batch_size}

  meshes = args.meshes.split(',') if args.meshes else []
  if unknown := set(meshes) - set(MESHES):
    parser.error(f'--meshes: unknown {sorted(unknown)}; expected some of {list(MESHES)}')
  result['step'] = step_cases(args.preset, meshes, args.steps, args.batch_size, args.out,
                              result)
  if result['step']:
    emit(f'ultramem:{args.preset} train step, table split by rows vs width ({device})',
         ('mesh', 'rows s', 'width s', 'rows/width', 'rows MiB', 'width MiB', 'rows/width'),
         [[r['mesh'], f'{r["rows_step_s"]:.3f}', f'{r["width_step_s"]:.3f}',
           f'{r["step_ratio"]:.2f}', f'{r["rows_collective_mb"]:.1f}',
           f'{r["width_collective_mb"]:.1f}', f'{r["collective_ratio"]:.2f}']
          for r in result['step']], result, args.out)
  if args.train_steps:
    with tempfile.TemporaryDirectory() as tmp:
      result['load'] = load_cases(args.train_steps, args.eval_batches,
                                 Path(args.workdir or tmp) / 'ultramem_tiny')
    emit("rows design: the busiest row shard's reads / the mean (width: 1 by construction)",
         ('model', 'layer', 'reads', 'values read', *[f'{s} shards' for s in SHARDS]),
         [[r['model'], str(r['layer']), f'{r["reads"]:,}', f'{r["values_read"]:.2f}',
           *[f'{r[f"rows_{s}_shards"]:.3f}' for s in SHARDS]] for r in result['load']],
         result, args.out)

if __name__ == '__main__':
  main()
