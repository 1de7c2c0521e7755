"""Token embeddings, with `attend` for a tied output head."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxarch.layers.params import normal, param
from jaxarch.parallel import context


class Embed(nnx.Module):

  def __init__(self, vocab_size: int, dim: int, *, init_std: float = 0.02,
               init_truncation: float = 0.0, dtype=jnp.bfloat16, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = param(rngs, normal(init_std, init_truncation), (vocab_size, dim),
                           ('vocab', 'embed'), param_dtype, weight_decay=False)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    # The table whole along `d` (FSDP gathers a weight before use), and the rows split by
    # batch like the tokens. Left to XLA, the rows take the table's split of `d` over
    # fsdp, and on a data x fsdp mesh their gradient cannot reach that layout but through
    # a full gather of the activations ("involuntary full rematerialization").
    table = context.constrain(self.embedding[...], ('vocab', None))
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)  # b... -> b...d
    return context.constrain(x, ('batch',) + (None,) * tokens.ndim)

  def attend(self, x: jax.Array) -> jax.Array:
    """Logits of a tied head: x @ embeddingᵀ."""
    return jnp.einsum('btd,vd->btv', x, self.embedding[...].astype(self.dtype))
