"""Multi-process jobs: one `jax.distributed` start-up, from flags or from the cluster.

Where the processes learn who they are, first match wins:

  flags     --coordinator_address=HOST:PORT --num_processes=N --process_id=I
  JAX_*     JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (what the GKE
            JobSet and Ray templates of `launch/` set, from the pod's completion index)
  cluster   Open MPI (mpirun -n N; inside a SLURM job too, whose variables its ranks
            inherit), SLURM (srun with more than one task; the batch script itself is
            refused), a multi-host TPU slice (TPU_WORKER_HOSTNAMES), or
            JAXARCH_DISTRIBUTED=1 for any other environment `jax.distributed.initialize()`
            detects by itself (a GCE TPU VM pod); JAX reads the addresses from the
            environment
  none      a single process

On CPU the processes exchange collectives through gloo, so a multi-process job can be run
and tested on one machine.
"""

import dataclasses
import glob
import os
from collections.abc import Mapping

import jax

from jaxarch.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins the job; `source` says where that was read from."""
  source: str  # 'flags' | 'env' | 'slurm' | 'ompi' | 'tpu' | 'auto' | 'single'
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None  # None: as JAX decides


_ORTE_URI = 'OMPI_MCA_orte_hnp_uri'  # set by mpirun of Open MPI 4, read by JAX
# What JAX reads of a SLURM task; an srun step sets them, the batch script has no step.
_SLURM_STEP = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_LOCALID')


def _int(environ: Mapping[str, str], key: str, default: int = 1) -> int:
  try:
    return int(environ.get(key, default))
  except ValueError:
    raise ConfigError(f'environment variable {key}={environ[key]!r} must be an '
                      'integer') from None


def detect(coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None,
           environ: Mapping[str, str] = os.environ) -> Launch:
  """Where this process's place in the job comes from (nothing is started)."""
  flags = (coordinator_address, num_processes, process_id)
  if any(f is not None for f in flags):
    if any(f is None for f in flags):
      raise ConfigError('--coordinator_address, --num_processes and --process_id go '
                        'together; give all three or none')
    return _checked(Launch('flags', coordinator_address, num_processes, process_id))
  # mpirun of Open MPI 5 (PRRTE) sets no OMPI_MCA_orte_hnp_uri, from which JAX reads the
  # coordinator under Open MPI 4: JAX_COORDINATOR_ADDRESS names it, mpirun the rest.
  ompi5 = _int(environ, 'OMPI_COMM_WORLD_SIZE') > 1 and _ORTE_URI not in environ
  if 'JAX_COORDINATOR_ADDRESS' in environ and not ompi5:
    missing = [k for k in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID') if k not in environ]
    if missing:
      raise ConfigError(f'JAX_COORDINATOR_ADDRESS is set but {", ".join(missing)} is not; '
                        'set all three for a multi-process job')
    return _checked(Launch('env', environ['JAX_COORDINATOR_ADDRESS'],
                           _int(environ, 'JAX_NUM_PROCESSES'), _int(environ, 'JAX_PROCESS_ID')))
  if _int(environ, 'OMPI_COMM_WORLD_SIZE') > 1:
    gpus = _visible_gpus(environ)
    launch = Launch('ompi', num_processes=_int(environ, 'OMPI_COMM_WORLD_SIZE'),
                    process_id=_int(environ, 'OMPI_COMM_WORLD_RANK', 0),
                    local_device_ids=_node_devices(environ.get('OMPI_COMM_WORLD_LOCAL_SIZE'),
                                                   gpus))
    if not ompi5:
      return launch
    if 'JAX_COORDINATOR_ADDRESS' not in environ:
      raise ConfigError('mpirun of Open MPI 5 does not tell jax.distributed where the job\'s '
                        'coordinator is (no OMPI_MCA_orte_hnp_uri); set '
                        'JAX_COORDINATOR_ADDRESS=HOST:PORT, HOST the node of rank 0 (e.g. '
                        'mpirun -x JAX_COORDINATOR_ADDRESS=$(hostname):1234 ...)')
    local = launch.local_device_ids
    if local is None and gpus and _int(environ, 'OMPI_COMM_WORLD_LOCAL_SIZE') > 1:
      local = (_int(environ, 'OMPI_COMM_WORLD_LOCAL_RANK', 0),)  # a GPU per process, as JAX
    return _checked(dataclasses.replace(
        launch, coordinator_address=environ['JAX_COORDINATOR_ADDRESS'],
        local_device_ids=local))
  if _int(environ, 'SLURM_NTASKS') > 1 and 'SLURM_PROCID' in environ:
    missing = [k for k in _SLURM_STEP if k not in environ]
    if missing:  # the batch script's own shell: SLURM_NTASKS counts the job's tasks
      raise ConfigError(f'SLURM_NTASKS={environ["SLURM_NTASKS"]} with no {", ".join(missing)}'
                        ': this process runs in the batch script, not as a task '
                        'of a job step; start it with `srun` (one task per node, as '
                        'launch/slurm/train.sbatch does)')
    return Launch('slurm', num_processes=_int(environ, 'SLURM_NTASKS'),
                  process_id=_int(environ, 'SLURM_PROCID'),
                  local_device_ids=_slurm_node_devices(environ))
  # A GKE TPU pod: the hosts of its slice (JAX reads TPU_PROCESS_ADDRESSES first), and
  # the slices of a multislice job, which may be of one host each.
  hosts = environ.get('TPU_PROCESS_ADDRESSES') or environ.get('TPU_WORKER_HOSTNAMES', '')
  if len(hosts.split(',')) > 1 or (hosts and _int(environ, 'MEGASCALE_NUM_SLICES') > 1):
    return Launch('tpu')
  if environ.get('JAXARCH_DISTRIBUTED') == '1':
    return Launch('auto')
  return Launch('single')


def _slurm_node_devices(environ: Mapping[str, str]) -> tuple[int, ...] | None:
  """`_node_devices` of a SLURM task: its step's tasks per node (`srun -n` may run more
  than the job's --ntasks-per-node), the GPUs SLURM gave the node, or where it gave none
  as such (no --gpus-per-node), those the node has."""
  per_node = environ.get('SLURM_STEP_TASKS_PER_NODE') or environ.get('SLURM_NTASKS_PER_NODE')
  gpus = environ.get('SLURM_GPUS_ON_NODE', '')
  return _node_devices(per_node and per_node.split('(')[0],
                       int(gpus) if gpus.isdigit() else _visible_gpus(environ))


def _node_devices(tasks_per_node: str | None, gpus: int) -> tuple[int, ...] | None:
  """All `gpus` of the node when one task runs per node (`launch/slurm`, `mpirun
  --npernode 1`); else None. JAX gives each process of SLURM or Open MPI only the GPU of
  its local rank (right for one task per GPU), which would leave a one-task-per-node job
  on one GPU of each node."""
  return tuple(range(gpus)) if tasks_per_node == '1' and gpus > 1 else None


def _visible_gpus(environ: Mapping[str, str]) -> int:
  """The GPUs of this node a process may use: those CUDA_VISIBLE_DEVICES lists, else the
  node's /dev/nvidiaN devices (none on a CPU or TPU host)."""
  visible = environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    return len([d for d in visible.split(',') if d.strip()])
  return len(glob.glob('/dev/nvidia[0-9]*'))


def _checked(launch: Launch) -> Launch:
  if launch.num_processes < 1 or not 0 <= launch.process_id < launch.num_processes:
    raise ConfigError(f'process_id={launch.process_id} must be in [0, num_processes='
                      f'{launch.num_processes}) ({launch.source})')
  host, sep, port = launch.coordinator_address.rpartition(':')
  if not sep or not host or not port.isdigit():
    raise ConfigError(f'coordinator address {launch.coordinator_address!r} must be '
                      f'HOST:PORT ({launch.source})')
  return launch


def initialize(launch: Launch) -> Launch:
  """Starts `jax.distributed` for a multi-process launch; call before any JAX computation."""
  if launch.source == 'single':
    return launch
  # CPU processes (tests, or CPU clusters) need a collectives backend of their own.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if launch.coordinator_address is not None:  # flags, env, Open MPI 5
    jax.distributed.initialize(launch.coordinator_address, launch.num_processes,
                               launch.process_id, local_device_ids=launch.local_device_ids)
  else:  # JAX reads the cluster's own variables (SLURM_*, OMPI_*, TPU metadata)
    jax.distributed.initialize(local_device_ids=launch.local_device_ids)
  return dataclasses.replace(launch, num_processes=jax.process_count(),
                             process_id=jax.process_index())
