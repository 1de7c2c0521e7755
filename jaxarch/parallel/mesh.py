"""Device mesh from `mesh.ici` / `mesh.dcn`: axes ('data', 'fsdp', 'tensor', 'expert').

`ici` sizes are the axes inside a slice or node (fast interconnect), `dcn` sizes the axes
across slices or nodes; each mesh axis spans ici × dcn devices.
"""

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from jaxarch import config as config_lib

AXES = ('data', 'fsdp', 'tensor', 'expert')


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
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                process_is_granule=not slices)
  elif np.prod(dcn) > 1:
    # CPU stand-in for multi-slice: consecutive device blocks play the slices.
    n = len(AXES)
    grid = np.asarray(devices).reshape(dcn + ici)
    grid = grid.transpose([j for i in range(n) for j in (i, n + i)]).reshape(shape)
  elif devices[0].platform in ('tpu', 'gpu', 'cuda', 'rocm'):
    grid = mesh_utils.create_device_mesh(shape, devices)  # topology-aware order
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES)

