"""UltraMem models: the transformer with memory layers placed by (read, write) pairs.

`model.family = 'ultramem'` builds the same `Transformer` as a dense model; what makes it
UltraMem is the `model.ultramem` section, whose `placement` puts one memory layer per
pair: it reads the normalised FFN input of block `read` (what that block's FFN reads,
arXiv 2411.12364) and adds its output to the residual stream after block `write`.
The memory layers share one IVE permutation (`model.ultramem.permutation='shared'`), so
that they stack into a scan with the blocks (`model.scan_layers`); runs from before
2026-12-07 drew each its own from its index ('per_layer'), and keep it.
"""

import ml_collections
from flax import nnx

from jaxarch.layers.ultramem import UltraMem
from jaxarch.models.transformer import DTYPES, register_side_layer


class MemoryLayer(nnx.Module):
  """UltraMem as a side layer: normed x [b, t, d] -> update [b, t, d] for the residual
  stream."""

  def __init__(self, memory: UltraMem):
    self.memory = memory

  def __call__(self, x, positions, segment_ids, layout=None):
    return self.memory(x, segment_ids, positions, layout)


@register_side_layer('ultramem')
def memory_layer(cfg: ml_collections.ConfigDict, index: int, rngs: nnx.Rngs) -> MemoryLayer:
  u = cfg.ultramem
  dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
  memory = UltraMem(
      cfg.d_model, num_values=u.num_values, top_k=u.top_k, value_dim=u.value_dim,
      key_dim=u.key_dim, tucker_rank=u.tucker_rank, num_cores=u.num_cores,
      ive_expansion=u.ive_expansion, num_heads=u.num_heads, top_m=u.top_m,
      aux_loss_weight=u.aux_loss_weight, aux_tau=u.aux_tau, query_conv=u.query_conv,
      heads_per_query=u.heads_per_query,
      rank_by_magnitude=u.rank_by_magnitude, lookup_impl=u.lookup_impl,
      lookup_scatter=u.lookup_scatter, table_split=u.table_split, top_k_chunk=u.top_k_chunk,
      permutation_seed=index if u.permutation == 'per_layer' else 0, dtype=dtype,
      param_dtype=param_dtype, rngs=rngs)
  return MemoryLayer(memory)

