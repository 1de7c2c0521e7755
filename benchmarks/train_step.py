"""Train-step throughput: tokens/s, step time and MFU of a config preset.

  python benchmarks/train_step.py --config=configs/dense.py:151m --steps=20 \
      [--config.train.batch_size=16 ...] [--out=benchmarks/results/train_step.json]

Times the jitted, sharded train step on synthetic tokens after warm-up steps that include
compilation (`jaxarch.train.throughput`, also `jaxarch bench train`). FLOPs follow the
convention of `jaxarch.train.flops`; MFU is against the peak bf16 FLOP/s of the device
kind (none on CPU). Prints a table and writes JSON with the device name; `--profile=DIR`
adds a jax.profiler trace.
"""

import argparse
import platform
import sys

import jax

from report import emit

from jaxarch import config as config_lib
from jaxarch.cli import at_least_one, split_overrides
from jaxarch.train.throughput import measure


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/dense.py:tiny')
  parser.add_argument('--steps', type=at_least_one, default=10, help='timed steps')
  parser.add_argument('--warmup', type=at_least_one, default=2,
                      help='untimed steps (compilation)')
  parser.add_argument('--out', default='benchmarks/results/train_step.json')
  parser.add_argument('--profile', help='also write a jax.profiler trace of 3 steps here')
  overrides, rest = split_overrides(list(argv))  # as `jaxarch bench train` takes them
  args = parser.parse_args(rest)
  try:  # a bad preset, override or mesh: one line naming the key, as the jaxarch CLI says it
    cfg = config_lib.load(args.config, overrides)
    measured = measure(cfg, steps=args.steps, warmup=args.warmup, profile_dir=args.profile)
  except config_lib.ConfigError as e:
    parser.error(str(e))
  result = {'config': args.config, 'overrides': overrides, 'host': platform.node(),
            'jax': jax.__version__, **measured}

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
