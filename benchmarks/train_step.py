"""Train-step throughput: tokens/s, step time and MFU of a config preset.

  python benchmarks/train_step.py --config=configs/dense.py:151m --steps=20 \
      [--config.train.batch_size=16 ...] [--out=benchmarks/results/train_step.json]

Times the jitted, sharded train step on synthetic tokens (the data pipeline is measured
by its own tests), after warm-up steps that include compilation. FLOPs follow the
convention of `jaxarch.train.flops`; MFU is against the peak bf16 FLOP/s of the device
kind (none on CPU). Prints a table and writes JSON with the device name.
"""

import argparse
import platform
import statistics
import sys
import time

import jax
import numpy as np

from report import emit

from jaxarch import config as config_lib
from jaxarch.parallel import global_batch, make_mesh
from jaxarch.train import flops
from jaxarch.train.state import init_state, make_setup
from jaxarch.train.step import make_train_step


def synthetic_batch(batch_size: int, seq_len: int, vocab: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, min(vocab, 256), (batch_size, seq_len + 1), dtype=np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'segment_ids': np.ones((batch_size, seq_len), np.int32),
          'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                       (batch_size, seq_len)).copy()}


def benchmark(cfg, *, steps: int, warmup: int) -> dict:
  setup = make_setup(cfg, make_mesh(cfg))
  state = init_state(cfg, setup)
  step = make_train_step(setup, z_loss=cfg.train.z_loss)
  batches = [global_batch(synthetic_batch(cfg.train.batch_size, cfg.data.seq_len,
                                          cfg.model.vocab_size, i), setup.batch_sharding)
             for i in range(2)]
  compile_start = time.perf_counter()
  for i in range(warmup):
    state, metrics = step(state, batches[i % 2])
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - compile_start
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batches[i % 2])
    jax.block_until_ready(metrics['loss'])
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  per_token = flops.train_flops_per_token(cfg.model, setup.param_counts, cfg.data.seq_len)
  device = jax.devices()[0]
  achieved = per_token * tokens / step_s
  return {
      'device_kind': device.device_kind, 'platform': device.platform,
      'num_devices': jax.device_count(), 'mesh': dict(setup.mesh.shape),
      'params_total': setup.param_counts['total'],
      'params_active': setup.param_counts['active'],
      'batch_size': cfg.train.batch_size, 'seq_len': cfg.data.seq_len,
      'dtype': cfg.model.dtype, 'remat': cfg.model.remat,
      'attention_impl': cfg.model.attention_impl,
      'warmup_s': compile_s, 'step_time_s': step_s,
      'step_time_min_s': min(times), 'step_time_max_s': max(times),
      'tokens_per_s': tokens / step_s, 'flops_per_token': per_token,
      'model_tflops_per_device': achieved / jax.device_count() / 1e12,
      'mfu': flops.mfu(achieved, jax.device_count(), device.device_kind),
      'final_loss': float(metrics['loss']),
  }


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/dense.py:tiny')
  parser.add_argument('--steps', type=int, default=10, help='timed steps')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps (compilation)')
  parser.add_argument('--out', default='benchmarks/results/train_step.json')
  overrides = [a for a in argv if a.startswith('--config.')]
  args = parser.parse_args([a for a in argv if not a.startswith('--config.')])
  cfg = config_lib.load(args.config, overrides)
  result = {'config': args.config, 'overrides': overrides, 'host': platform.node(),
            'jax': jax.__version__, **benchmark(cfg, steps=args.steps, warmup=args.warmup)}

  mfu = result['mfu']
  row = [f'{result["params_total"] / 1e6:,.1f}M',
         f'{result["batch_size"]} × {result["seq_len"]}',
         f'{1e3 * result["step_time_s"]:,.1f} ms', f'{result["tokens_per_s"]:,.0f}',
         f'{result["model_tflops_per_device"]:.2f}',
         '–' if mfu is None else f'{100 * mfu:.1f}%']
  emit(f'train step: {args.config} on {result["num_devices"]} × {result["device_kind"]}',
       ('params', 'batch × seq', 'step time', 'tokens/s', 'TFLOP/s/device', 'MFU'), [row],
       result, args.out)

if __name__ == '__main__':
  main()
