"""Custom ops with their own VJPs: the memory-layer value lookup (embedding-bag) and
dropless MoE's grouped matmul."""

from jaxarch.kernels.grouped_matmul import grouped_matmul
from jaxarch.kernels.sharded_lookup import (sharded_sparse_lookup, sliced_sparse_lookup,
                                            width_sharded_sparse_lookup)
from jaxarch.kernels.sparse_lookup import sparse_lookup
