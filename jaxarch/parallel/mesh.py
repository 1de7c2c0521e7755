"""Device mesh from `mesh.ici` / `mesh.dcn`: axes ('data', 'fsdp', 'tensor', 'expert').

`ici` sizes are the axes inside a slice or node (fast interconnect), `dcn` sizes the axes
across slices or nodes; each mesh axis spans ici × dcn devices.
"""

import logging

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from jaxarch import config as config_lib

AXES = ('data', 'fsdp', 'tensor', 'expert')
log = logging.getLogger(__name__)


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """The mesh of the whole job; `cfg` is the full config, validated against the devices."""
  devices = list(jax.devices() if devices is None else devices)
  config_lib.validate(cfg, num_devices=len(devices))
  total = config_lib.mesh_shape(cfg, len(devices))
  dcn = [config_lib.dcn_size(cfg.mesh, a, total[a]) for a in AXES]
  shape = [total[a] for a in AXES]
  ici = [t // d for t, d in zip(shape, dcn)]
  if np.prod(dcn) > 1 and devices[0].platform != 'cpu':
    # Slices (TPU) or processes (GPU nodes) are the granules that dcn axes span.
    slices = devices[0].platform == 'tpu' and hasattr(devices[0], 'slice_index')
    granules = len({d.slice_index if slices else d.process_index for d in devices})
    if granules != np.prod(dcn):
      spanned = ' '.join(f'{a}={d}' for a, d in zip(AXES, dcn) if d > 1)
      kind = 'slices' if slices else 'processes'
      raise config_lib.ConfigError(
          f'config error: mesh.dcn {spanned} spans {np.prod(dcn)} {kind} but the job has '
          f'{granules}; set mesh.dcn to the {kind} of the job (and mesh.ici to the devices '
          'of each)')
    grid = _topology_mesh(lambda **split: mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=not slices, **split), ici)
  elif np.prod(dcn) > 1:
    # CPU stand-in for multi-slice: consecutive device blocks play the slices.
    n = len(AXES)
    grid = np.asarray(devices).reshape(dcn + ici)
    grid = grid.transpose([j for i in range(n) for j in (i, n + i)]).reshape(shape)
  elif devices[0].platform in ('tpu', 'gpu', 'cuda', 'rocm'):
    grid = _topology_mesh(  # topology-aware order
        lambda **split: mesh_utils.create_device_mesh(shape, devices, **split), shape)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES)


def _topology_mesh(create, ici) -> np.ndarray:
  """`create()`'s device grid; where the ici sizes are not products of whole axes of the
  physical torus (tensor=2 on a 4x4x4 v4 slice), the one that splits torus axes, with a
  warning, as MaxText's allow_split_physical_axes: mesh_utils would refuse the config
  with a deep NotImplementedError."""
  try:
    return create()
  except (NotImplementedError, ValueError) as e:
    first = e
  try:
    grid = create(allow_split_physical_axes=True)
  except (NotImplementedError, ValueError) as e:
    sizes = ' '.join(f'{a}={s}' for a, s in zip(AXES, ici))
    raise config_lib.ConfigError(f'mesh.ici ({sizes}) does not fit the devices\' topology: '
                                 f'{str(first).splitlines()[0]} ({e})') from None
  log.warning('mesh.ici %s splits physical axes of the device torus; collectives over '
              'those mesh axes may be slower', dict(zip(AXES, ici)))
  return grid
