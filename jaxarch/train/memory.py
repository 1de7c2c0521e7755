"""Device memory of a train step, known before anything is allocated.

A 9B-parameter MoE holds 12 bytes per parameter of fp32 weights and AdamW moments (16 with
the gradients): one GPU cannot hold that, and finding out by allocating it ends in a
traceback from deep inside XLA. The state's bytes per device are exact without allocating:
each array's shard under the config's mesh and `mesh.rules`. So the trainer and the
throughput benchmark check them against the device's memory first, and `plan` adds what
the compiled step needs on top (XLA's buffer assignment, `Compiled.memory_analysis()`),
the compiler's own figure for the backend at hand: on a GPU or TPU close to what it will
allocate; on CPU only indicative, as the CPU compiler neither fuses attention nor schedules
for memory as the GPU compiler does.
"""

import contextlib
import copy

import jax
import ml_collections
import numpy as np

from jaxarch import config as config_lib
from jaxarch.data import synthetic_batch
from jaxarch.parallel import make_mesh
from jaxarch.train.state import TrainSetup, describe, make_setup
from jaxarch.train.step import make_train_step
from jaxarch.train.workdir import readable_size


class OutOfMemoryError(RuntimeError):
  """The train state does not fit the devices; one line saying how to shard it."""


@contextlib.contextmanager
def explained_out_of_memory(explain):
  """XLA running out of device (or host) memory is a traceback from deep inside jax; inside
  this it raises `explain(detail)` instead, `detail` being XLA's own first line, e.g.
  'Out of memory allocating 256000002048 bytes': one line saying what to change."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    detail = str(e).split('RESOURCE_EXHAUSTED: ', 1)[-1].splitlines()[0].rstrip('.')
    raise explain(detail) from None


def shard_bytes(tree) -> int:
  """Bytes that one device holds of a tree of sharded `ShapeDtypeStruct`s (the largest
  share: replicated arrays count whole on every device)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def state_bytes_per_device(setup: TrainSetup) -> dict[str, int]:
  """{'params', 'opt_state', 'other', 'total'}: the train state's bytes on one device."""
  state = setup.abstract_state
  parts = {'params': shard_bytes(state['params']),
           'opt_state': shard_bytes(state['opt_state'])}
  parts['other'] = shard_bytes(state) - sum(parts.values())
  return {**parts, 'total': sum(parts.values())}


def device_memory_bytes() -> int | None:
  """What one device may allocate (the allocator's limit), or None where the backend does
  not say (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get('bytes_limit')


def check_state_fits(cfg: ml_collections.ConfigDict, setup: TrainSetup) -> None:
  """Raises `OutOfMemoryError` if the train state alone exceeds a device's memory."""
  limit = device_memory_bytes()
  need = state_bytes_per_device(setup)
  if limit is None or need['total'] <= limit:
    return
  mu = ('' if cfg.train.mu_dtype == 'bfloat16' else
        ', or keep the first Adam moment in bf16 (--config.train.mu_dtype=bfloat16)')
  raise OutOfMemoryError(
      f'the train state takes {readable_size(need["total"])} per device (weights '
      f'{readable_size(need["params"])}, optimizer {readable_size(need["opt_state"])}) under '
      f'mesh {dict(setup.mesh.shape)}, and a {jax.devices()[0].device_kind} has '
      f'{readable_size(limit)}: {_sharding_hint(cfg, setup, need["total"], limit)}{mu}')


def _sharding_hint(cfg: ml_collections.ConfigDict, setup: TrainSetup, need: int,
                   limit: int) -> str:
  """The smallest mesh.ici.fsdp, on these devices and beside the mesh's other axes, that
  brings the state to at most 60% of a device (the rest: activations), as overrides that
  validate; the data axis takes what is left."""
  devices, fsdp = jax.device_count(), setup.mesh.shape['fsdp']
  dcn_free = -1 not in cfg.mesh.dcn.values()
  for n in range(2, devices + 1):
    overrides = {'fsdp': n, **({'data': -1} if dcn_free and cfg.mesh.ici.data != -1 else {})}
    candidate = copy.deepcopy(cfg)
    with candidate.unlocked():
      candidate.mesh.ici.update(overrides)
    try:
      config_lib.validate(candidate, devices)
      shards = config_lib.mesh_shape(candidate, devices)['fsdp']
    except config_lib.ConfigError:
      continue
    if need * fsdp / shards <= 0.6 * limit:
      return 'shard it with ' + ' '.join(f'--config.mesh.ici.{k}={v}'
                                         for k, v in overrides.items())
  factor = need * fsdp / (0.6 * limit)
  return (f'shard it over about {2 ** int(np.ceil(np.log2(factor)))} devices with '
          'mesh.ici.fsdp')


def compiled_train_step(cfg: ml_collections.ConfigDict, setup=None):
  """The train step of `cfg` compiled for its mesh from the abstract state and batch, so
  that nothing is allocated: for its memory analysis and HLO (its collectives)."""
  setup = setup or make_setup(cfg, make_mesh(cfg))
  batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=setup.batch_sharding),
      synthetic_batch(cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size, 0))
  return make_train_step(setup).lower(setup.abstract_state, batch).compile()


def plan(cfg: ml_collections.ConfigDict, *, compile_step: bool = True,
         device_memory: int | None = None) -> dict:
  """Bytes per device of the train state and, with `compile_step`, of the compiled step
  (arguments, outputs, temporaries, and their peak), without allocating anything.

  `device_memory` (bytes) plans for another device than the present one, e.g. an 80 GB
  GPU from a CPU with `--xla_force_host_platform_device_count` devices.
  """
  config_lib.check_train_precision(cfg.model)  # a step `train` refuses is planned for none
  setup = make_setup(cfg, make_mesh(cfg))
  state = state_bytes_per_device(setup)
  limit = device_memory or device_memory_bytes()
  result = {**describe(cfg, setup), 'state_bytes': state, 'device_memory_bytes': limit}
  if compile_step:
    stats = compiled_train_step(cfg, setup).memory_analysis()
    compiled = {k: int(getattr(stats, f'{k}_size_in_bytes'))
                for k in ('argument', 'output', 'alias', 'temp')}
    # The donated state is updated in place (aliased): it is not counted twice.
    compiled['peak'] = (compiled['argument'] + compiled['output'] - compiled['alias']
                        + compiled['temp'])
    result['compiled_bytes'] = compiled
  need = result.get('compiled_bytes', {}).get('peak', state['total'])
  result['fits'] = None if limit is None else need <= limit
  return result


def summary(result: dict) -> str:
  """A few lines for the terminal."""
  state = result['state_bytes']
  lines = [f'{result["family"]} ({result["params_total"] / 1e6:,.1f}M parameters), batch '
           f'{result["batch_size"]} x {result["seq_len"]}, mesh {result["mesh"]} on '
           f'{result["num_devices"]} x {result["device_kind"]}; per device:',
           f'  train state   {readable_size(state["total"])} (weights '
           f'{readable_size(state["params"])}, optimizer {readable_size(state["opt_state"])}, '
           f'other {readable_size(state["other"])})']
  if 'compiled_bytes' in result:
    c = result['compiled_bytes']
    lines.append(f'  compiled step {readable_size(c["peak"])} at peak '
                 f'({readable_size(c["temp"])} temporaries, as the {result["platform"]} '
                 'compiler assigns them)')
  limit = result['device_memory_bytes']
  lines.append('  device memory unknown on this backend' if limit is None else
               f'  device memory {readable_size(limit)}: ' +
               ('fits' if result['fits'] else 'DOES NOT FIT'))
  return '\n'.join(lines)
