"""Grouped-query self-attention with RoPE, causal and segment (packing) masks.

The attention itself is `jax.nn.dot_product_attention`, which handles grouped KV heads
natively and dispatches to cuDNN flash attention on GPU when asked (`impl='cudnn'`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxarch.layers.params import normal, param
from jaxarch.layers.rope import apply_rope


def document_mask(segment_ids: jax.Array) -> jax.Array:
  """[b, t] segment ids -> [b, 1, t, t] bool: query and key in the same document.

  Causality is added by the attention kernel itself (`is_causal`), which lets cuDNN use
  its native causal mask.
  """
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def _implementation(impl: str, dtype) -> str | None:
  """'auto' is cuDNN flash attention where it runs (GPU, 16-bit), XLA elsewhere."""
  if impl == 'auto':
    on_gpu = jax.default_backend() == 'gpu'
    impl = 'cudnn' if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else 'xla'
  return None if impl == 'xla' else impl


class Attention(nnx.Module):

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
               rope_theta: float = 10_000.0, init_std: float = 0.02,
               out_std: float | None = None, impl: str = 'xla', dtype=jnp.bfloat16,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.rope_theta = rope_theta
    self.impl = _implementation(impl, dtype)
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
    out = jax.nn.dot_product_attention(q, k, v, mask=document_mask(segment_ids),
                                       is_causal=True, implementation=self.impl)  # btnh
    return jnp.einsum('btnh,nhd->btd', out, cast(self.o_proj))
