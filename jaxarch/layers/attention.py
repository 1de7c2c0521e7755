"""Grouped-query self-attention with RoPE, causal and segment (packing) masks.

The attention itself is `jax.nn.dot_product_attention`, which handles grouped KV heads
natively and dispatches to cuDNN flash attention on GPU when asked (`impl='cudnn'`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxarch.layers.params import normal, param
from jaxarch.layers.rope import apply_rope


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """[b, t] segment ids -> [b, 1, t, t] bool: causal and within one document."""
  t = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
  same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same_doc)[:, None]


class Attention(nnx.Module):

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
               rope_theta: float = 10_000.0, init_std: float = 0.02,
               out_std: float | None = None, impl: str = 'xla', dtype=jnp.bfloat16,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.rope_theta = rope_theta
    self.impl = None if impl == 'xla' else impl
    self.dtype = dtype
    init = normal(init_std)
    self.q_proj = param(rngs, init, (d_model, n_heads, head_dim),
                        ('embed', 'heads', 'head_dim'), param_dtype)
    self.k_proj = param(rngs, init, (d_model, n_kv_heads, head_dim),
                        ('embed', 'kv_heads', 'head_dim'), param_dtype)
    self.v_proj = param(rngs, init, (d_model, n_kv_heads, head_dim),
                        ('embed', 'kv_heads', 'head_dim'), param_dtype)
    self.o_proj = param(rngs, normal(out_std or init_std), (n_heads, head_dim, d_model),
                        ('heads', 'head_dim', 'embed'), param_dtype)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    cast = lambda p: p[...].astype(self.dtype)
    q = jnp.einsum('btd,dnh->btnh', x, cast(self.q_proj))
    k = jnp.einsum('btd,dkh->btkh', x, cast(self.k_proj))
    v = jnp.einsum('btd,dkh->btkh', x, cast(self.v_proj))
    q = apply_rope(q, positions, self.rope_theta)
    k = apply_rope(k, positions, self.rope_theta)
    out = jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segment_ids),
                                       implementation=self.impl)  # btnh
    return jnp.einsum('btnh,nhd->btd', out, cast(self.o_proj))
