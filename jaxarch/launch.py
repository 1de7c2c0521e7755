"""`jaxarch launch`: a config's training run rendered as a cluster job from launch/ templates.

  jaxarch launch --config=configs/dense.py:1.6b --target=slurm --workdir=/shared/runs/1.6b \
      --config.launch.nodes=4 --config.mesh.ici.fsdp=8 --config.mesh.dcn.data=4 [--dry-run]

The `launch` config section describes the cluster; it must add up with the mesh
(launch.nodes × launch.devices_per_node = the mesh's devices), which is checked here,
before anything is written, rather than minutes into a job. Every process of the job runs
`jaxarch train --config=SPEC --workdir=WORKDIR --config.k=v ...` (the overrides given to
launch, less the launch.* ones) and finds the others as jaxarch.parallel.distributed
expects:

  slurm    one task per node under srun; jax.distributed reads SLURM's variables
  gke      GPU: JAX_COORDINATOR_ADDRESS (pod 0's name in the JobSet's headless service),
           JAX_NUM_PROCESSES and JAX_PROCESS_ID (the pod's completion index);
           TPU: TPU_WORKER_HOSTNAMES, which GKE sets. Also the same job as an xpk command.
  tpu-vm   `gcloud ... ssh --worker=all` with JAXARCH_DISTRIBUTED=1 on a multi-host TPU VM
  ray      the entrypoint sets the JAX_* variables of each node from the first one's address

Nothing here submits a job: `render` returns the files and the command that submits
them, `write` writes the files.
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import string
from collections.abc import Sequence
from pathlib import Path

from jaxarch import config as config_lib
from jaxarch.train.workdir import local_workdir

ConfigError = config_lib.ConfigError

TEMPLATES = config_lib.SHIPPED_CONFIGS.parent / 'launch'  # beside configs/, in a wheel too
TARGETS = ('slurm', 'gke', 'tpu-vm', 'ray')
# Targets and the accelerators they run on: GKE and its xpk command take both kinds.
GPU_TARGETS = ('slurm', 'gke', 'ray')
TPU_TARGETS = ('gke', 'tpu-vm')
# TensorCores per chip by TPU generation, to count the chips of a type: v5p-32 has 16.
# Other generations are not checked.
TPU_CORES_PER_CHIP = {'v4': 2, 'v5p': 2, 'v5litepod': 1, 'v5e': 1, 'v6e': 1}
# GKE's accelerator labels of each TPU generation's node pools.
TPU_ACCELERATORS = {'v4': ('tpu-v4-podslice',), 'v5p': ('tpu-v5p-slice',),
                    'v5litepod': ('tpu-v5-lite-podslice', 'tpu-v5-lite-device'),
                    'v5e': ('tpu-v5-lite-podslice', 'tpu-v5-lite-device'),
                    'v6e': ('tpu-v6e-slice',)}
# Each generation's slice shapes: its topology's dimensions, the chips of a slice of one
# host, and the chips of each host of a slice of several (GKE's and Cloud TPU's machine
# types: ct5p-hightpu-4t, ct5lp-hightpu-1t/4t/8t, ct6e-standard-1t/4t/8t). A job of
# another shape renders and then waits for nodes that no pool has.
TPU_SHAPES = {'v4': (3, (4,), 4), 'v5p': (3, (4,), 4), 'v5litepod': (2, (1, 4, 8), 4),
              'v5e': (2, (1, 4, 8), 4), 'v6e': (2, (1, 4, 8), 4)}
# Kubernetes object names (JobSet pods add '-workers-0-0' and must stay within 63).
NAME = re.compile(r'[a-z]([-a-z0-9]{0,38}[a-z0-9])?')
# jax.distributed's coordinator port where the job names one and launch.coordinator_port
# does not (GKE's GPU JobSet, Ray).
DEFAULT_PORT = 1234
SLURM_TIME = re.compile(r'(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE', re.IGNORECASE)


@dataclasses.dataclass
class Job:
  files: dict[Path, str]  # path -> text, written by `write`
  submit: str  # the command that submits the job
  alternatives: tuple[str, ...] = ()  # other ways to submit the same job
  warnings: tuple[str, ...] = ()  # what the job will likely trip on, said before it runs


def train_command(spec: str, workdir: str | os.PathLike, overrides: Sequence[str]) -> list[str]:
  """What every process runs: `--config.k=v`, `config.k=v` or `k=v` overrides, launch.* dropped."""
  keys = [o.removeprefix('--').removeprefix('config.') for o in overrides]
  return ['jaxarch', 'train', f'--config={spec}', f'--workdir={workdir}',
          *[f'--config.{k}' for k in keys if not k.startswith('launch.')]]


def render(target: str, cfg, *, spec: str, workdir: str | os.PathLike,
           overrides: Sequence[str] = (), out: str | os.PathLike) -> Job:
  """The job of `target` for the config (checked against its mesh), its files under `out`."""
  if target not in TARGETS:
    raise ConfigError(f'--target={target!r} must be one of {", ".join(TARGETS)}')
  shape = check(cfg, target)
  launch = cfg.launch
  if _kind(launch.accelerator) == 'tpu':
    where = (f'{launch.slices} x {launch.tpu_type} ({launch.nodes} '
             f'host{"s" * (launch.nodes != 1)} x '
             f'{launch.devices_per_node} chips)')
  else:
    where = (f'{launch.nodes} node{"s" * (launch.nodes != 1)} x {launch.devices_per_node} '
             f'{launch.accelerator}')
  mesh = ' '.join(f'{a}={s}' for a, s in shape.items())
  values = dict(name=launch.name, nodes=launch.nodes, description=f'{spec} on {where}, mesh {mesh}',
                data_dir=cfg.data.get('data_dir'))
  command = train_command(spec, local_workdir(workdir), overrides)
  job = _RENDER[target](launch, command, Path(out), values)
  return dataclasses.replace(job, warnings=job.warnings + job_warnings(target, cfg)
                             + _config_file_warnings(target, spec))


def _config_file_warnings(target: str, spec: str) -> tuple[str, ...]:
  """A config file that a GKE pod or a TPU VM worker will not find at the path given (Ray's
  job carries it; SLURM's nodes share the login node's files). jaxarch's own configs are
  found anywhere jaxarch is installed, as a relative configs/NAME.py."""
  if target not in ('gke', 'tpu-vm'):
    return ()
  path, source, _ = _config_file(spec)
  shipped = config_lib.SHIPPED_CONFIGS.resolve()
  if not Path(path).expanduser().is_absolute() and source.resolve().is_relative_to(shipped):
    return ()
  if target == 'gke':
    if path.startswith(GCS_MOUNTS):
      return ()
    return (f'--config={spec} is not one of the configs jaxarch installs, and every pod runs '
            f'`jaxarch train --config={spec}` in its container: put the file in a bucket the '
            f'JobSet mounts and give that path (--config={GCS_MOUNTS}BUCKET/...), or add it '
            'to the image (launch/Dockerfile)',)
  return (f'--config={spec} is not one of the configs jaxarch installs, and every worker runs '
          f'`jaxarch train --config={spec}`: copy it to that path on each (gcloud compute '
          'tpus tpu-vm scp FILE NAME:PATH --worker=all) unless it lies on storage they share',)


def job_warnings(target: str, cfg) -> tuple[str, ...]:
  """What a job of `target` renders fine with and then trips on in the cluster."""
  if target in ('slurm', 'tpu-vm') and not cfg.launch.setup:
    return ('launch.setup is empty, so each host runs the `jaxarch` its login shell finds; '
            "set --config.launch.setup='source /PATH/TO/.venv/bin/activate' (or a module "
            'load) unless jaxarch is installed there',)
  if target != 'gke':
    return ()
  said = []
  if '/' not in cfg.launch.image:
    said.append(f'launch.image={cfg.launch.image!r} names no registry, so the nodes would '
                f'pull docker.io/library/{cfg.launch.image}: build launch/Dockerfile, push '
                'it, and set --config.launch.image=REGISTRY/jaxarch:TAG')
  if cfg.data.get('data_dir') is None and not str(cfg.data.source).startswith('distilled:'):
    said.append('data.data_dir is unset, so every pod prepares the data into its own '
                'container, again after each restart: prepare it once where the pods share '
                'it (jaxarch prepare --config=... --data_dir=DIR) and set '
                '--config.data.data_dir=DIR')
  return tuple(said)


def write(job: Job) -> None:
  for path, text in job.files.items():
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(text)
      if path.suffix in ('.sh', '.sbatch'):
        path.chmod(0o755)
    except OSError as e:  # e.g. WORKDIR/launch, where WORKDIR is the cluster's path
      raise ConfigError(f'the job cannot be written to {path} ({e.strerror or e}); give '
                        '--out=DIR, a folder here to write it to') from None


def render_run(target: str, run, run_dir: Path) -> str:
  """A sweep's run (`jaxarch.sweep.plan.Run`) as a job in RUN_DIR/launch, written; returns
  the command that submits it. Jobs are named launch.name-RUN so that they do not clash,
  except on a TPU VM, whose launch.name names the VM they all run on (one at a time)."""
  cfg = run.config()
  if target != 'tpu-vm':
    cfg.launch.name = _run_job_name(cfg.launch.name, run.name)
  job = render(target, cfg, spec=run.spec, workdir=run_dir, overrides=run.overrides,
               out=Path(run_dir) / 'launch')
  write(job)
  return job.submit


def _run_job_name(name: str, run: str) -> str:
  """NAME-RUN as a job name that `check` takes: a run name with capitals, '_' or a last
  '.', or one that makes it longer than 40, would fail as a bad launch.name the user never
  wrote. A long one is cut, with a hash of the run's name that keeps the runs apart."""
  joined = re.sub(r'[^a-z0-9-]+', '-', f'{name}-{run}'.lower()).strip('-')
  if len(joined) <= 40:
    return joined
  digest = hashlib.sha1(run.encode()).hexdigest()[:8]
  return f'{joined[:31].rstrip("-")}-{digest}'


# Checks: the cluster against the target and the mesh.


def _slurm_seconds(time: str) -> int | None:
  """A `SLURM_TIME` in seconds (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]); None: unlimited."""
  if time.upper() in ('UNLIMITED', 'INFINITE'):
    return None
  days, _, clock = time.rpartition('-')
  parts = [int(p) for p in clock.split(':')]
  if days:
    hours, minutes, seconds = parts + [0] * (3 - len(parts))
    return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
  if len(parts) < 3:  # minutes[:seconds]
    return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)
  return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def check(cfg, target: str) -> dict[str, int]:
  """Raises ConfigError unless the launch section fits the target and the mesh; returns
  the mesh's axis sizes on the cluster's devices."""
  config_lib.check_train_precision(cfg.model)  # said here, not by the job once it starts
  launch = cfg.launch
  for key in ('nodes', 'devices_per_node', 'slices', 'stop_grace_s'):
    config_lib._positive_int(cfg, f'launch.{key}')  # pylint: disable=protected-access
  positive = config_lib._positive_int  # pylint: disable=protected-access
  if launch.coordinator_port is not None and positive(cfg, 'launch.coordinator_port') > 65535:
    raise ConfigError(f'launch.coordinator_port={launch.coordinator_port} must be a TCP port '
                      '(1-65535)')
  for key, value in launch.items():  # each one lands on one line of a script or YAML file
    if isinstance(value, str) and any(c in value for c in '\n\r'):
      raise ConfigError(f'launch.{key}={value!r} must be one line; join setup commands with '
                        "'&&' or ';'")
  if not SLURM_TIME.fullmatch(str(launch.time_limit)):
    raise ConfigError(f'launch.time_limit={launch.time_limit!r} must be a SLURM time: '
                      'MM, HH:MM:SS, D-HH[:MM[:SS]] or UNLIMITED')
  limit = _slurm_seconds(str(launch.time_limit))
  if target == 'slurm' and launch.stop_grace_s > 65535:
    raise ConfigError(f'launch.stop_grace_s={launch.stop_grace_s} is past the 65535 seconds '
                      "that SLURM's --signal=TERM@SECONDS takes")
  if target == 'slurm' and limit is not None and launch.stop_grace_s >= limit:
    raise ConfigError(f'launch.stop_grace_s={launch.stop_grace_s} must be shorter than '
                      f'launch.time_limit={launch.time_limit!r} ({limit} s): SLURM sends '
                      'SIGTERM that long before the limit, so the run would stop at once')
  if target == 'slurm':
    _check_slurm_options(cfg)
  if not isinstance(launch.max_restarts, int) or launch.max_restarts < 0:
    raise ConfigError(f'launch.max_restarts={launch.max_restarts!r} must be >= 0')
  if not NAME.fullmatch(launch.name):
    raise ConfigError(f'launch.name={launch.name!r} must be 1-40 lowercase letters, digits '
                      "and '-', starting with a letter (it names pods and hosts)")
  kind = _kind(launch.accelerator)
  targets = GPU_TARGETS if kind == 'gpu' else TPU_TARGETS
  if target not in targets:
    raise ConfigError(f'launch.accelerator={launch.accelerator!r} is a {kind.upper()}; '
                      f'--target={target} runs {"TPU" if kind == "gpu" else "GPU"} jobs '
                      f'(for {kind.upper()}s: {", ".join(targets)})')
  most = GKE_GPUS_PER_NODE.get(launch.accelerator)
  if target == 'gke' and most and launch.devices_per_node > most:  # no node would fit a pod
    raise ConfigError(f'launch.devices_per_node={launch.devices_per_node}: a GKE node of '
                      f'{launch.accelerator} has at most {most} GPUs; set '
                      f'launch.devices_per_node={most} and launch.nodes to the nodes the job '
                      'spans')
  if kind == 'gpu' and launch.slices != 1:
    raise ConfigError(f'launch.slices={launch.slices} is for TPU multislice; GPU jobs count '
                      'their hosts in launch.nodes')
  if kind == 'tpu':
    _check_tpu(launch, target)
  shape, dcn = _check_mesh(cfg)
  if kind == 'tpu' and dcn != launch.slices:
    raise ConfigError(f'{_sizes(cfg, "dcn")} spans {dcn} slices but launch.slices='
                      f'{launch.slices}; make the mesh.dcn sizes multiply to {launch.slices}')
  if kind == 'gpu' and dcn not in (1, launch.nodes):
    raise ConfigError(f'{_sizes(cfg, "dcn")} spans {dcn} processes but there are '
                      f'launch.nodes={launch.nodes}, one per node; make the mesh.dcn sizes '
                      f'multiply to {launch.nodes}, or to 1 (ici then spans the nodes)')
  config_lib.validate(cfg, num_devices=launch.nodes * launch.devices_per_node)  # the batch
  return shape


# sbatch options that the job script sets from other keys, or that would change how it runs.
_SLURM_SET = {'job-name': 'launch.name', 'nodes': 'launch.nodes',
              'gpus-per-node': 'launch.devices_per_node', 'time': 'launch.time_limit',
              'signal': 'launch.stop_grace_s', 'partition': 'launch.partition',
              'account': 'launch.account', 'exclusive': 'launch.exclusive',
              'gpus': 'launch.devices_per_node',
              'ntasks-per-node': None, 'ntasks': None, 'chdir': None, 'workdir': None,
              'output': None, 'error': None, 'array': None, 'open-mode': None,
              'requeue': None, 'no-requeue': None}


def _check_slurm_options(cfg) -> None:
  config_lib._choice(cfg, 'launch.exclusive', (True, False))  # pylint: disable=protected-access
  raw = config_lib._get(cfg, 'launch.slurm_options')  # pylint: disable=protected-access
  try:
    options = shlex.split(raw) if isinstance(raw, str) else None
  except ValueError as e:  # an unclosed quote
    raise ConfigError(f'launch.slurm_options={raw!r}: {e}') from None
  if options is None:
    raise ConfigError(f'launch.slurm_options={raw!r} must be a string of sbatch options, '
                      "e.g. '--qos=high --constraint=h100'")
  for option in options:
    key = option.removeprefix('--').split('=')[0]
    if any(c.isspace() or c in '\'"#\\' for c in option):
      raise ConfigError(f'launch.slurm_options: {option!r} holds a space, a quote, a # or a '
                        'backslash, which an #SBATCH line does not carry as a shell would; '
                        'give values without')
    if not option.startswith('--') or not key:
      raise ConfigError(f'launch.slurm_options: {option!r} must be a long sbatch option, '
                        '--key=value or --flag (e.g. --qos=high, not -q high)')
    # sbatch takes any unambiguous start of a long option: --part is --partition.
    if (name := key if key in _SLURM_SET else next(
        (n for n in _SLURM_SET if n.startswith(key)), None)):
      key, where = name, _SLURM_SET[name]
      raise ConfigError(f'launch.slurm_options: --{key} is '
                        + (f'set from {where}; set that instead' if where else
                           'set by the job script, which runs one task per node and '
                           'resumes its run after a requeue; drop it'))


def _kind(accelerator: str) -> str:
  if isinstance(accelerator, str) and accelerator.startswith('nvidia-'):
    return 'gpu'
  if isinstance(accelerator, str) and accelerator.startswith('tpu-'):
    return 'tpu'
  raise ConfigError(f'launch.accelerator={accelerator!r} must be a GKE accelerator name: '
                    'nvidia-* for GPUs (nvidia-h100-80gb) or tpu-* for TPU slices '
                    '(tpu-v5p-slice)')


def _check_tpu(launch, target: str) -> None:
  if launch.nodes % launch.slices:
    raise ConfigError(f'launch.nodes={launch.nodes} hosts do not split evenly into '
                      f'launch.slices={launch.slices}')
  if target == 'tpu-vm' and launch.slices != 1:
    raise ConfigError(f'launch.slices={launch.slices}: --target=tpu-vm runs on one TPU VM '
                      'slice; run several slices with --target=gke')
  hosts = launch.nodes // launch.slices
  if target == 'gke' and launch.slices > 1 and hosts == 1:  # GKE's Multislice documentation
    raise ConfigError(f'launch.slices={launch.slices} slices of one host each: GKE joins '
                      'multi-host slices only (not a ct5lp-hightpu-4t of 2x2, say); use fewer, '
                      'larger slices')
  chips = hosts * launch.devices_per_node
  per_slice = (f'launch.nodes={launch.nodes} / launch.slices={launch.slices} x '
               f'launch.devices_per_node={launch.devices_per_node} = {chips} chips per slice')
  topology = launch.tpu_topology
  if not (isinstance(topology, str) and re.fullmatch(r'\d+(x\d+)+', topology)):
    raise ConfigError(f'launch.tpu_topology={topology!r} must look like 2x2x4 (v4, v5p) or '
                      '4x4 (v5e, v6e)')
  if math.prod(map(int, topology.split('x'))) != chips:
    raise ConfigError(f'launch.tpu_topology={topology} has '
                      f'{math.prod(map(int, topology.split("x")))} chips but {per_slice}')
  match = re.fullmatch(r'([a-z0-9]+)-(\d+)', str(launch.tpu_type))
  if not match:
    raise ConfigError(f'launch.tpu_type={launch.tpu_type!r} must look like v5p-32 '
                      '(generation-cores)')
  _check_tpu_shape(launch, match[1], hosts)
  cores = TPU_CORES_PER_CHIP.get(match[1])
  if cores and int(match[2]) != chips * cores:
    raise ConfigError(f'launch.tpu_type={launch.tpu_type} has {int(match[2]) // cores} chips '
                      f'but {per_slice} ({match[1]}-{chips * cores})')
  labels = TPU_ACCELERATORS.get(match[1], (launch.accelerator,))
  if launch.accelerator not in labels:  # the job would wait for nodes of another chip
    raise ConfigError(f'launch.accelerator={launch.accelerator!r} does not label {match[1]} '
                      f'nodes, which launch.tpu_type={launch.tpu_type} asks for; set '
                      f'launch.accelerator={labels[0]!r}')


def _check_tpu_shape(launch, generation: str, hosts: int) -> None:
  """Refuses a topology or chips per host that `generation`'s slices do not come in."""
  if generation not in TPU_SHAPES:  # not checked
    return
  dims, one_host, per_host = TPU_SHAPES[generation]
  if (given := launch.tpu_topology.count('x') + 1) != dims:
    example = '2x2x4' if dims == 3 else '4x4'
    raise ConfigError(f'launch.tpu_topology={launch.tpu_topology} has {given} dimensions, '
                      f'and {generation} slices have {dims} (e.g. {example})')
  if hosts == 1 and launch.devices_per_node not in one_host:
    raise ConfigError(f'launch.devices_per_node={launch.devices_per_node}: a {generation} '
                      f'slice of one host has {" or ".join(map(str, one_host))} chips')
  if hosts > 1 and launch.devices_per_node != per_host:
    chips = hosts * launch.devices_per_node
    raise ConfigError(f'launch.devices_per_node={launch.devices_per_node}: each host of a '
                      f'{generation} slice of several has {per_host} chips; for '
                      f'{chips} chips per slice set launch.devices_per_node={per_host} and '
                      f'launch.nodes={chips // per_host * launch.slices}')


def _check_mesh(cfg) -> tuple[dict[str, int], int]:
  """(size of each mesh axis, devices spanned by mesh.dcn) on the cluster's devices."""
  launch = cfg.launch
  devices = launch.nodes * launch.devices_per_node
  ici, dcn = config_lib._mesh_sizes(cfg)  # pylint: disable=protected-access
  sizes = (*ici.values(), *dcn.values())
  fixed = math.prod(s for s in sizes if s != -1)
  if (devices % fixed) if -1 in sizes else (fixed != devices):
    needs = f'a multiple of {fixed}' if -1 in sizes else fixed
    raise ConfigError(f'the mesh needs {needs} devices ({_sizes(cfg, "ici")}, '
                      f'{_sizes(cfg, "dcn")}) but launch.nodes={launch.nodes} x '
                      f'launch.devices_per_node={launch.devices_per_node} = {devices}')
  shape = config_lib.mesh_shape(cfg, devices)
  spanned = math.prod(config_lib.dcn_size(cfg.mesh, a, shape[a]) for a in dcn)
  return shape, spanned


def _sizes(cfg, level: str) -> str:
  """'mesh.ici data=2 fsdp=8': the sizes that are not 1."""
  sizes = [f'{a}={s}' for a, s in cfg.mesh[level].items() if s != 1]
  return f'mesh.{level} {" ".join(sizes) or "1"}'


# Rendering: templates in launch/ filled in with string.Template.


def _template(template: str, /, **values) -> str:
  """launch/TEMPLATE with ${key} filled in; a line that is only an empty ${key} goes."""
  path = TEMPLATES / template
  if not path.is_file():
    raise FileNotFoundError(f'launch template {path} not found (launch/ of the checkout, '
                            'or jaxarch/_repo/launch of an installed wheel)')
  text = path.read_text()
  for key, value in values.items():
    if value == '':
      text = re.sub(rf'^\$\{{{key}\}}\n', '', text, flags=re.M)
  return string.Template(text).substitute(values)


def gpu_env() -> dict[str, str]:
  """launch/gpu.env as NAME -> value, its XLA_FLAGS lines joined."""
  env = {}
  for line in (TEMPLATES / 'gpu.env').read_text().splitlines():
    line = line.strip()
    if line and not line.startswith('#'):
      name, _, value = line.partition('=')
      env[name] = f'{env[name]} {value}' if name == 'XLA_FLAGS' and name in env else value
  return env


def _env_file(env: dict[str, str]) -> str:
  return '# launch/gpu.env, XLA_FLAGS joined\n' + ''.join(f'{k}={v}\n' for k, v in env.items())


def _gcloud_flags(launch) -> list[str]:
  return [f'--{key}={launch[key]}' for key in ('project', 'zone') if launch[key]]


def _slurm(launch, command, out, values) -> Job:
  options = [f'#SBATCH --{key}={launch[key]}' for key in ('partition', 'account')
             if launch[key]]
  options += [f'#SBATCH {option}' for option in shlex.split(launch.slurm_options)]
  path = out / 'train.sbatch'
  port = launch.coordinator_port
  text = _template(
      'slurm/train.sbatch', **values, gpus_per_node=launch.devices_per_node,
      coordinator_port=(f'export JAX_COORDINATOR_PORT={port}' if port else
                        "# (none set: JAX takes a port of the job's id, launch.coordinator_port)"),
      exclusive=_exclusive(launch),
      time_limit=launch.time_limit, stop_grace_s=launch.stop_grace_s,
      chdir=_sbatch_word(os.getcwd()), log=_sbatch_word(str(out / '%x-%j.out')),
      site_options='\n'.join(options), setup=launch.setup,
      gpu_env='\n'.join(f'export {k}={shlex.quote(v)}' for k, v in gpu_env().items()),
      command=shlex.join(command))
  return Job({path: text}, f'sbatch {shlex.quote(str(path))}')


def _exclusive(launch) -> str:
  """--exclusive gives a job every CPU and GPU of its nodes but only the memory it asks for
  (by default the site's per-CPU share, which a host-side data pipeline or checkpoint can
  run out of): --mem=0 asks for all of it, unless launch.slurm_options says how much."""
  if not launch.exclusive:
    return ''
  asked = any(option.removeprefix('--').split('=')[0] in ('mem', 'mem-per-cpu', 'mem-per-gpu')
              for option in shlex.split(launch.slurm_options))  # not --mem-bind
  return '#SBATCH --exclusive' + ('' if asked else '\n#SBATCH --mem=0')


def _sbatch_word(text: str) -> str:
  """`text` as one word of an #SBATCH line: sbatch reads double quotes there (a space, a
  '#' inside them), not a shell's single quotes or escapes."""
  if any(c in text for c in '"\\\n'):
    raise ConfigError(f'{text!r} holds a double quote, a backslash or a newline, which an '
                      '#SBATCH line cannot carry; run from (or write the workdir to) a folder '
                      'without them')
  return f'"{text}"' if any(c.isspace() or c in "'#" for c in text) else text


# A job script's #SBATCH lines that name it and its log, not what it runs on.
_SBATCH_OWN = re.compile(r'#SBATCH --(job-name|output)=')


def slurm_arrays(scripts: dict[str, Path], out: Path, name: str,
                 at_once: int | None = None) -> list[tuple[list[str], Job]]:
  """A sweep's SLURM jobs (run name -> its train.sbatch, as `render_run` wrote them) as
  array jobs, one per set of runs whose scripts ask for the same nodes, time and queue:
  task i runs the i-th run's own script, at most `at_once` at a time (None: as the queue
  allows). One `sbatch` then queues a sweep, and the queue holds one job per shape, not
  one per run. Returns (run names, job) for each array, its file in `out`."""
  groups: dict[tuple[str, ...], list[str]] = {}
  for run, script in scripts.items():
    directives = tuple(line for line in script.read_text().splitlines()
                       if line.startswith('#SBATCH ') and not _SBATCH_OWN.match(line))
    groups.setdefault(directives, []).append(run)
  arrays = []
  for k, (directives, runs) in enumerate(groups.items(), start=1):
    suffix = '' if len(groups) == 1 else f'-{k}'
    path = out / f'sweep{suffix}.sbatch'
    throttle = f'%{at_once}' if at_once and at_once < len(runs) else ''
    text = _template(
        'slurm/sweep.sbatch', name=_run_job_name(name, f'sweep{suffix}'),
        description=f'{len(runs)} runs ({", ".join(runs[:5])}{", ..." * (len(runs) > 5)})',
        array=f'0-{len(runs) - 1}{throttle}', directives='\n'.join(directives),
        log=_sbatch_word(str(out / '%x-%A_%a.out')),
        scripts='\n'.join(f'  {shlex.quote(str(scripts[run]))}  # {i}: {run}'
                          for i, run in enumerate(runs)))
    arrays.append((runs, Job({path: text}, f'sbatch {shlex.quote(str(path))}')))
  return arrays


# Where a GKE pod finds bucket BUCKET: the GCS FUSE CSI driver's mount at /gcs/BUCKET.
GCS_MOUNTS = '/gcs/'


# Cloud Storage's bucket names (dots allowed, as in domain-named buckets).
BUCKET = re.compile(r'[a-z0-9][-_.a-z0-9]{1,220}[a-z0-9]')


def _workdir(command: list[str]) -> str:
  """The --workdir of `train_command`'s command."""
  return command[3].removeprefix('--workdir=')


def _job_paths(command: list[str], data_dir: str | None) -> tuple[tuple[str, str], ...]:
  """(key, path) of the folders a job reads and writes: its workdir and data directory."""
  return ('--workdir', _workdir(command)), ('data.data_dir', data_dir or '')


def _gcs_buckets(paths) -> list[str]:
  """The buckets that `_job_paths` lie in, by their paths under `GCS_MOUNTS`
  (/gcs/BUCKET/...), in order."""
  buckets = {}
  for key, path in paths:
    if path.startswith(GCS_MOUNTS) and (bucket := path[len(GCS_MOUNTS):].split('/')[0]):
      if not BUCKET.fullmatch(bucket):
        raise ConfigError(f'{key}={path}: {bucket!r} is no Cloud Storage bucket name (3-222 '
                          "lowercase letters, digits, '-', '_' and '.'), which a path under "
                          f'{GCS_MOUNTS} names for the pods to mount')
      buckets[bucket] = None
  return list(buckets)


def _bucket_volumes(buckets: list[str], *, host_network: bool, listed: bool) -> dict:
  """The pod template's lines that mount `buckets` with the GCS FUSE CSI driver (an
  ephemeral volume each, at /gcs/BUCKET): its annotation, the container's volumeMounts
  and the pod's volumes (`listed`: under headers the template has already). A pod on the
  host's network (TPU) has the sidecar take its token from the pod's service account."""
  if not buckets:
    return dict(pod_metadata='', volume_mounts='', volumes='')
  mounts = ''.join(f'              - name: gcs-{i}\n                mountPath: {GCS_MOUNTS}{b}\n'
                   for i, b in enumerate(buckets))
  ksa = '                  hostNetworkPodKSA: "true"\n' if host_network else ''
  volumes = ''.join(f'            - name: gcs-{i}\n              csi:\n'
                    '                driver: gcsfuse.csi.storage.gke.io\n'
                    '                volumeAttributes:\n'
                    f'                  bucketName: {json.dumps(b)}\n'  # '12345': a string
                    '                  mountOptions: implicit-dirs\n' + ksa
                    for i, b in enumerate(buckets))
  return dict(
      pod_metadata='          metadata:\n            annotations:\n'
                   '              gke-gcsfuse/volumes: "true"  # the GCS FUSE CSI sidecar',
      volume_mounts=(mounts if listed else '              volumeMounts:\n' + mounts).rstrip('\n'),
      volumes=(volumes if listed else '            volumes:\n' + volumes).rstrip('\n'))


def _gke(launch, command, out, values) -> Job:
  _require_shared_workdir(command, "a pod writes a relative path into its own container, "
                          'whose files go with the pod (a restart would begin at step 0)')
  tpu = _kind(launch.accelerator) == 'tpu'
  paths = _job_paths(command, values['data_dir'])
  # Kubernetes expands $(VAR) in a container's command and reads $$ as $: each $ doubled
  # stays the $ it was (an override's path, say).
  common = dict(values, image=launch.image, accelerator=launch.accelerator,
                max_restarts=launch.max_restarts, stop_grace_s=launch.stop_grace_s,
                command=json.dumps([word.replace('$', '$$') for word in command]),
                **_bucket_volumes(_gcs_buckets(paths),
                                  host_network=tpu, listed=not tpu))
  path = out / 'jobset.yaml'
  env = lambda names: ''.join(f'              - name: {k}\n                value: '
                             f'{json.dumps(str(v))}\n' for k, v in names.items()).rstrip('\n')
  if tpu:  # JAX finds the coordinator in the TPU metadata, on its own port unless given
    port = {'JAX_COORDINATOR_PORT': launch.coordinator_port} if launch.coordinator_port else {}
    files = {path: _template(
        'gke/jobset-tpu.yaml', **common, slices=launch.slices,
        hosts_per_slice=launch.nodes // launch.slices, topology=launch.tpu_topology,
        chips_per_host=launch.devices_per_node,
        port_env=f'              env:\n{env(port)}' if port else '')}
  else:
    files = {path: _template('gke/jobset-gpu.yaml', **common, gpus_per_node=
                             launch.devices_per_node, gpu_env=env(gpu_env()),
                             coordinator_port=launch.coordinator_port or DEFAULT_PORT)}
  unmounted = [f'{key}={path}' for key, path in paths if path and not path.startswith(GCS_MOUNTS)]
  warnings = (f'the JobSet mounts only buckets, at {GCS_MOUNTS}BUCKET, and not '
              f'{" or ".join(unmounted)}: add its volume (Filestore, a PersistentVolumeClaim) '
              f'to {path}, or each pod reads and writes its own container (a restart begins '
              'at step 0)',) if unmounted else ()
  job = Job(files, f'kubectl apply -f {shlex.quote(str(path))}', warnings=warnings)
  if launch.cluster:  # xpk needs to know the cluster; kubectl uses the current context
    xpk = out / 'xpk.sh'
    flags = [f'--cluster={launch.cluster}', f'--workload={launch.name}',
             f'--docker-image={launch.image}', f'--max-restarts={launch.max_restarts}',
             *_gcloud_flags(launch)]
    env_flag = []
    shell = shlex.join(command)
    if tpu:
      flags += [f'--tpu-type={launch.tpu_type}', f'--num-slices={launch.slices}']
    else:
      # xpk sets JAX_COORDINATOR_ADDRESS (a host), JAX_COORDINATOR_PORT, NNODES and
      # NODE_RANK; jaxarch reads HOST:PORT, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
      files[out / 'gpu.env'] = _env_file(gpu_env())
      env_flag = ['--env-file="$(dirname "$0")/gpu.env"']  # wherever the script is run from
      flags += [f'--device-type={_xpk_device_type(launch)}', f'--num-nodes={launch.nodes}']
      shell = ('JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS:$JAX_COORDINATOR_PORT '
               'JAX_NUM_PROCESSES=$NNODES JAX_PROCESS_ID=$NODE_RANK ' + shell)
    flags = [shlex.quote(f) for f in flags] + env_flag + [f'--command={shlex.quote(shell)}']
    files[xpk] = _template('gke/xpk.sh', **values, flags=' \\\n  '.join(flags))
    job.alternatives = (f'bash {shlex.quote(str(xpk))}',)
  return job


# The most GPUs a GKE node of each accelerator has (A2 mega: 16 A100s; A3, A4: 8; A4X: 4).
GKE_GPUS_PER_NODE = {'nvidia-tesla-a100': 16, 'nvidia-a100-80gb': 8, 'nvidia-l4': 8,
                     'nvidia-h100-80gb': 8, 'nvidia-h100-mega-80gb': 8,
                     'nvidia-h200-141gb': 8, 'nvidia-b200': 8, 'nvidia-gb200': 4}

# xpk's GPU device types: (GKE accelerator, GPUs per node) -> its --device-type.
XPK_GPU_DEVICE_TYPES = {
    **{('nvidia-l4', n): f'l4-{n}' for n in (1, 2, 4, 8)},
    **{('nvidia-tesla-a100', n): f'a100-40gb-{n}' for n in (1, 2, 4, 8)},
    ('nvidia-h100-80gb', 8): 'h100-80gb-8', ('nvidia-h100-mega-80gb', 8): 'h100-mega-80gb-8',
    ('nvidia-h200-141gb', 8): 'h200-141gb-8', ('nvidia-b200', 8): 'b200-8',
    ('nvidia-gb200', 4): 'gb200-4',
}


def _xpk_device_type(launch) -> str:
  device = XPK_GPU_DEVICE_TYPES.get((launch.accelerator, launch.devices_per_node))
  if device is None:
    known = ', '.join(f'{a} x {n}' for a, n in XPK_GPU_DEVICE_TYPES)
    raise ConfigError(f'launch.accelerator={launch.accelerator!r} with launch.devices_per_node='
                      f'{launch.devices_per_node} is not an xpk GPU device type (xpk knows '
                      f'{known}); leave launch.cluster unset to write the JobSet only')
  return device


def _require_shared_workdir(command: list[str], why: str) -> None:
  """A relative --workdir of a job whose hosts do not start in one shared folder would
  be a different folder on each."""
  workdir = _workdir(command)
  if not workdir.startswith('/'):
    raise ConfigError(f'--workdir={workdir!r}: {why}; give an absolute path on storage that '
                      'every node shares')


def _tpu_vm(launch, command, out, values) -> Job:
  if launch.nodes > 1:
    _require_shared_workdir(command, 'each TPU VM worker runs the command in its own home '
                            'directory')
  steps = [launch.setup] if launch.setup else []
  # Several workers: every process joins jax.distributed, which reads the TPU metadata.
  port = (f'JAX_COORDINATOR_PORT={launch.coordinator_port} '
          if launch.coordinator_port and launch.nodes > 1 else '')
  steps.append(('JAXARCH_DISTRIBUTED=1 ' + port if launch.nodes > 1 else '')
               + shlex.join(command))
  flags = ''.join(f'{shlex.quote(f)} ' for f in _gcloud_flags(launch))
  path = out / 'run.sh'
  text = _template('tpu_vm/run.sh', **values, gcloud_flags=flags,
                   remote_command=shlex.quote(' && '.join(steps)))
  return Job({path: text}, f'bash {shlex.quote(str(path))}')


def _ray(launch, command, out, values) -> Job:
  command, configs = _ray_command(command, out)
  # The command travels as JSON: Ray's CLI would join its words for a shell on the head
  # node without quoting them (an override like block_pattern=('dense','moe') breaks).
  entrypoint = ['python', 'entrypoint.py', f'--nodes={launch.nodes}',
                f'--gpus_per_node={launch.devices_per_node}',
                f'--port={launch.coordinator_port or DEFAULT_PORT}', '--env_file=gpu.env',
                '--command_file=command.json']
  submit = shlex.join(['ray', 'job', 'submit', f'--working-dir={out}', '--', *entrypoint])
  in_script = 'ray job submit --working-dir="$(dirname "$0")" -- ' + shlex.join(entrypoint)
  files = {
      out / 'submit.sh': _template('ray/submit.sh', **values, submit=in_script),
      out / 'entrypoint.py': (TEMPLATES / 'ray' / 'entrypoint.py').read_text(),
      out / 'command.json': json.dumps(command) + '\n',
      out / 'gpu.env': _env_file(gpu_env()),
      **configs,
  }
  return Job(files, submit, (f'bash {shlex.quote(str(out / "submit.sh"))}',))


def _ray_command(command: list[str], out: Path) -> tuple[list[str], dict[Path, str]]:
  """Ray runs the job in a copy of its folder on each node, so the config file travels in
  it, with its neighbours (a config may load them: bita.py reads dense.py), and the
  workdir must be a path that every node shares -> (the command, the config files)."""
  _require_shared_workdir(command, 'a Ray job runs in a temporary copy of its folder on '
                          'each node')
  _, source, arg = _config_file(command[2].removeprefix('--config='))
  # A run's saved config.json travels alone, naming the run's own files (its tokenizer) by
  # their paths; a .py config with the files it may load.
  neighbours = source.parent.glob('*.py') if source.suffix == '.py' else []
  files = {out / 'configs' / p.name: p.read_text() for p in [*neighbours, source]}
  if source.suffix == '.json':
    tree = config_lib.run_files(json.loads(source.read_text()), source.parent,
                                config_lib.run_file_path)
    files[out / 'configs' / source.name] = json.dumps(tree, sort_keys=True, indent=2) + '\n'
  spec = f'configs/{source.name}' + (f':{arg}' if arg else '')
  return [*command[:2], f'--config={spec}', *command[3:]], files


def _config_file(spec: str) -> tuple[str, Path, str | None]:
  """(the path as given, the file it names here, the preset) of a --config=SPEC."""
  path, arg = config_lib._split_spec(spec)  # pylint: disable=protected-access
  return path, config_lib._resolve_path(path), arg  # pylint: disable=protected-access


_RENDER = {'slurm': _slurm, 'gke': _gke, 'tpu-vm': _tpu_vm, 'ray': _ray}
