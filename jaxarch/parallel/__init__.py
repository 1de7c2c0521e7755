"""Device meshes from the config and logical-axis sharding of weights and batches."""

from jaxarch.parallel.mesh import AXES, make_mesh
from jaxarch.parallel.sharding import (batch_sharding, data_shard, global_batch,
                                       logical_to_spec, tree_shardings)
