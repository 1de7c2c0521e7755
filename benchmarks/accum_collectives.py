"""Collectives per train step with gradient accumulation: once per step, or per microbatch?

  python benchmarks/accum_collectives.py [--config=configs/dense.py:tiny] [--accum=4]
      [--meshes=data8,fsdp8,data2_fsdp4] [--batch_size=32] [--out=...]

With `train.grad_accum_steps=A` the train step sums A microbatches' gradients in a loop
(`train/step.py`). Where the weights are replicated over `data`, each microbatch's
gradient is all-reduced over it unless the compiler moves that all-reduce after the loop
(XLA's while-loop all-reduce code motion, which its GPU pipeline runs and its CPU one does
not); under FSDP a reduce-scatter per microbatch is the usual cost, and so are the
weights' all-gathers (x A: the step keeps XLA from hoisting them out of the loop, which
held every weight whole for the step).

For each mesh of 8 devices this compiles (never runs) the trainer's step of `--config` at
A=1 and A=`--accum`, the same global batch, and reports the bytes each device's
collectives produce per step, by kind (loops counted as often as they run:
`train.profile.collective_bytes`), their ratio (about 1: reduced once per step; about A:
once per microbatch) and the compiled step's temporary memory. It needs 8 devices, not
their memory: on CPU `XLA_FLAGS=--xla_force_host_platform_device_count=8`; for what a
GPU's compiler does, one GPU posing as eight, `JAX_MOCK_GPU_TOPOLOGY=1x8x1`.
"""

import argparse
import sys

import jax

from report import device_info, emit, save

from jaxarch import config as config_lib
from jaxarch.cli import at_least_one
from jaxarch.train import profile
from jaxarch.train.memory import compiled_train_step

MESHES = {  # 8 devices: pure data parallelism, FSDP, both
    'data8': dict(data=8),
    'fsdp8': dict(data=1, fsdp=8),
    'data2_fsdp4': dict(data=2, fsdp=4),
}
KINDS = ('all-reduce', 'reduce-scatter', 'all-gather')


def compiled_step(spec: str, mesh: dict, accum: int, batch_size: int, seq_len: int):
  """The compiled train step of `spec` on `mesh`, from abstract state and batch."""
  overrides = [f'mesh.ici.{axis}={size}' for axis, size in mesh.items()] + [
      f'train.grad_accum_steps={accum}', f'train.batch_size={batch_size}',
      f'data.seq_len={seq_len}']
  return compiled_train_step(config_lib.load(spec, overrides))


def measure(compiled) -> dict:
  """Collective bytes per device per step by kind, and the step's temporary bytes."""
  found = profile.collective_bytes(compiled.as_text())
  memory = compiled.memory_analysis()
  return {'collective_bytes': {k: found.get(k, 0) for k in KINDS},
          'temp_bytes': getattr(memory, 'temp_size_in_bytes', None)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/dense.py:tiny')
  parser.add_argument('--accum', type=at_least_one, default=4)
  parser.add_argument('--meshes', default=','.join(MESHES))
  parser.add_argument('--batch_size', type=at_least_one, default=32)
  parser.add_argument('--seq_len', type=at_least_one, default=64)
  parser.add_argument('--out', default='benchmarks/results/accum_collectives.json')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  meshes = args.meshes.split(',')
  if unknown := sorted(set(meshes) - set(MESHES)):
    parser.error(f'--meshes: unknown {unknown}; known: {",".join(MESHES)}')
  if jax.device_count() != 8:
    parser.error(f'it needs 8 devices, {jax.device_count()} here (CPU: XLA_FLAGS='
                 '--xla_force_host_platform_device_count=8; GPU: JAX_MOCK_GPU_TOPOLOGY=1x8x1)')
  if args.batch_size % (8 * args.accum):
    parser.error(f'--batch_size={args.batch_size} must split into --accum={args.accum} '
                 'microbatches over 8 devices')

  records, rows = [], []
  data = dict(**device_info(), config=args.config, accum=args.accum,
              batch_size=args.batch_size, seq_len=args.seq_len, records=records)
  for mesh in meshes:
    once, looped = (measure(compiled_step(args.config, MESHES[mesh], a, args.batch_size,
                                          args.seq_len)) for a in (1, args.accum))
    record = dict(mesh=mesh, temp_bytes_accum_1=once['temp_bytes'],
                  temp_bytes_accum_a=looped['temp_bytes'])
    cells = [mesh]
    for kind in KINDS:
      before, after = once['collective_bytes'][kind], looped['collective_bytes'][kind]
      ratio = after / before if before else None
      record[kind] = dict(bytes_accum_1=before, bytes_accum_a=after, ratio=ratio)
      cells.append(f'{before / 2**20:,.2f} -> {after / 2**20:,.2f}'
                   + ('' if ratio is None else f' (x{ratio:.2f})'))
    mib = lambda b: '-' if b is None else f'{b / 2**20:,.1f}'
    cells.append(f'{mib(once["temp_bytes"])} -> {mib(looped["temp_bytes"])}')
    records.append(record)
    rows.append(cells)
    save(data, args.out)  # a run cut off keeps the meshes it compiled

  emit(f'Collectives per train step on {jax.devices()[0].device_kind} x 8: {args.config}, '
       f'batch {args.batch_size} x {args.seq_len}, grad_accum_steps 1 -> {args.accum} '
       f'(x1: reduced once per step; x{args.accum}: once per microbatch)',
       ['mesh', *(f'{k} MiB/device' for k in KINDS), 'step temp MiB'],
       rows, data, args.out)
  return data


if __name__ == '__main__':
  main()
