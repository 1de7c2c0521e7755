"""Custom ops with their own VJPs: the memory-layer value lookup (embedding-bag)."""

from jaxarch.kernels.sparse_lookup import sharded_sparse_lookup, sparse_lookup
