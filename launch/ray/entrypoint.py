"""Ray job entrypoint: one `jaxarch train` process per node, joined by jax.distributed.

  ray job submit --working-dir=DIR -- python entrypoint.py --nodes=4 --gpus_per_node=8 \
      [--port=1234] [--env_file=gpu.env] --command_file=command.json
  (or, instead of --command_file: -- jaxarch train --config=... --workdir=...)

Ray reserves one bundle of a node's GPUs on each of `--nodes` nodes (a STRICT_SPREAD
placement group), asks the first bundle's node for its address, and runs the command in
every bundle with JAX_COORDINATOR_ADDRESS (that address and `--port`), JAX_NUM_PROCESSES
and JAX_PROCESS_ID set, plus the NAME=value settings of `--env_file`. The job fails if any
process fails. `--command_file` holds the command as a JSON list, which no shell re-splits
on the way (Ray's CLI joins the words after `--` for a shell without quoting them).
Copied next to the job by `jaxarch launch --target=ray` (launch/ray/); it needs only Ray,
so it runs on a head node without jaxarch.
"""

import argparse
import json
import os
import subprocess
import sys

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@ray.remote(num_cpus=1)
def node_address() -> str:
  return ray.util.get_node_ip_address()


@ray.remote(num_cpus=1, max_retries=0)
def run(command: list[str], env: dict[str, str]) -> int:
  # Ray set CUDA_VISIBLE_DEVICES to this bundle's GPUs; the child process inherits it.
  return subprocess.call(command, env={**os.environ, **env})


def read_env(path: str) -> dict[str, str]:
  """NAME=value lines; blank lines and # comments are skipped."""
  env = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line and not line.startswith('#'):
        name, _, value = line.partition('=')
        env[name] = value
  return env


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--nodes', type=int, required=True, help='processes, one per node')
  parser.add_argument('--gpus_per_node', type=int, required=True)
  parser.add_argument('--port', type=int, default=1234, help='jax.distributed coordinator')
  parser.add_argument('--env_file', help='NAME=value settings for every process')
  parser.add_argument('--command_file', help='the command, a JSON list of words')
  parser.add_argument('command', nargs=argparse.REMAINDER, help='-- jaxarch train ...')
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if args.command_file:
    with open(args.command_file) as f:
      command = json.load(f)
  if not command:
    parser.error('give the command after --, e.g. -- jaxarch train --config=...')
  env = read_env(args.env_file) if args.env_file else {}

  ray.init()
  bundles = [{'CPU': 1, 'GPU': args.gpus_per_node}] * args.nodes
  group = placement_group(bundles, strategy='STRICT_SPREAD')
  ray.get(group.ready())
  on = lambda i: PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
  coordinator = f'{ray.get(node_address.options(scheduling_strategy=on(0)).remote())}:{args.port}'
  print(f'entrypoint: {args.nodes} processes, coordinator {coordinator}', flush=True)
  codes = ray.get([
      run.options(scheduling_strategy=on(i), num_gpus=args.gpus_per_node).remote(
          command, {**env, 'JAX_COORDINATOR_ADDRESS': coordinator,
                    'JAX_NUM_PROCESSES': str(args.nodes), 'JAX_PROCESS_ID': str(i)})
      for i in range(args.nodes)])
  failed = {i: code for i, code in enumerate(codes) if code}
  if failed and set(failed.values()) <= {129, 130, 143}:  # `jaxarch train`: 128 + the signal
    print('entrypoint: stopped by a signal (process: exit code): '
          f'{failed}; submit the job again to resume from its last checkpoint', file=sys.stderr)
    return 143
  if failed:
    print(f'entrypoint: processes failed (process: exit code): {failed}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
