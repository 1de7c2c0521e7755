"""Custom ops with their own VJPs: the memory-layer value lookup (embedding-bag) and
dropless MoE's grouped matmul."""

from jaxarch.kernels.grouped_matmul import grouped_matmul
from jaxarch.kernels.sparse_lookup import sharded_sparse_lookup, sparse_lookup
