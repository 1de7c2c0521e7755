"""`jaxarch` command line: train and evaluate language models from config files.

  jaxarch train --config=configs/dense.py:tiny --workdir=/tmp/run [--config.train.steps=50]
  jaxarch eval  --workdir=/tmp/run            (config from the run, or --config=...)
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from jaxarch import config as config_lib


def _config(args, overrides):
  if args.config:
    cfg = config_lib.load(args.config, overrides)
  else:
    saved = Path(args.workdir) / 'config.json'
    if not saved.exists():
      raise config_lib.ConfigError(
          f'config error: --config is required (no {saved} from an earlier run)')
    cfg = config_lib.load_json(saved, overrides)
  if args.data_dir:
    with cfg.unlocked():
      cfg.data.data_dir = args.data_dir
  return cfg


def _train(args, overrides):
  from jaxarch.train import train  # pylint: disable=g-import-not-at-top
  result = train(_config(args, overrides), args.workdir)
  print(json.dumps(result, indent=2))


def _eval(args, overrides):
  from jaxarch.train import evaluate  # pylint: disable=g-import-not-at-top
  result = evaluate(_config(args, overrides), args.workdir, step=args.step)
  print(json.dumps(result, indent=2))


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='jaxarch', description='Train and evaluate jaxarch language models from config '
      'files. Override any config key with --config.KEY=VALUE.')
  commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  def command(name, func, help_text):
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.add_argument('--config', help='config file and preset, e.g. configs/dense.py:tiny')
    sub.add_argument('--workdir', required=True, help='checkpoints, metrics and logs go here')
    sub.add_argument('--data_dir', help='prepared-data cache (default: $JAXARCH_DATA_DIR '
                     'or ~/.cache/jaxarch/data)')
    sub.set_defaults(func=func)
    return sub

  command('train', _train, 'train a model, resuming from the workdir if it has checkpoints')
  command('eval', _eval, 'validation loss and bits per byte of a checkpoint').add_argument(
      '--step', type=int, help='checkpoint step (default: latest)')
  return parser


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  overrides = [a for a in argv if a.startswith('--config.')]
  args = _parser().parse_args([a for a in argv if not a.startswith('--config.')])
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
  # TFDS and Orbax chat through absl at WARNING about routine things; jaxarch's own
  # warnings (e.g. an unreadable checkpoint skipped) use their module loggers.
  logging.getLogger('absl').setLevel(logging.ERROR)
  try:
    args.func(args, overrides)
  except (config_lib.ConfigError, FileNotFoundError, ImportError) as e:
    print(f'jaxarch: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('jaxarch: interrupted', file=sys.stderr)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
