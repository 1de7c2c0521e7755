"""Token embeddings, with `attend` for a tied output head."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxarch.layers.params import normal, param
from jaxarch.parallel import context


class Embed(nnx.Module):

  def __init__(self, vocab_size: int, dim: int, *, init_std: float = 0.02,
               init_truncation: float = 0.0, scale: float | None = None, dtype=jnp.bfloat16,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    # Gemma's: the looked-up rows times `scale` (sqrt(dim)), rounded to the compute dtype
    # as transformers rounds it; the tied head (`attend`) reads the table unscaled.
    self.scale = scale
    self.embedding = param(rngs, normal(init_std, init_truncation), (vocab_size, dim),
                           ('vocab', 'embed'), param_dtype, weight_decay=False)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    if not isinstance(tokens, jax.core.Tracer) and getattr(tokens, 'is_fully_addressable',
                                                           True):  # said, where jit reads NaN
      ids, vocab = np.asarray(tokens), self.embedding.shape[0]  # (numpy: not traced)
      if (bad := ids[(ids < 0) | (ids >= vocab)]).size:
        raise ValueError(f'token ids {sorted(set(bad.tolist()))[:3]} outside the vocabulary '
                         f'[0, {vocab})')
    # The table whole along `d` (FSDP gathers a weight before use), and the rows split by
    # batch like the tokens. Left to XLA, the rows take the table's split of `d` over
    # fsdp, and on a data x fsdp mesh their gradient cannot reach that layout but through
    # a full gather of the activations ("involuntary full rematerialization").
    table = context.constrain(self.embedding[...], ('vocab', None))
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)  # b... -> b...d
    if self.scale is not None:
      x = x * jnp.asarray(self.scale, self.dtype)
    return context.constrain(x, ('batch',) + (None,) * tokens.ndim)

  def attend(self, x: jax.Array) -> jax.Array:
    """Logits of a tied head: x @ embeddingᵀ, in fp32 (`head_logits`)."""
    return head_logits(x, self.embedding[...].astype(self.dtype).T)


@jax.custom_vjp
def head_logits(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [b, t, d] @ w [d, vocab] -> logits summed and returned in fp32, whatever the dtype
  of x and w: rounded to bf16, logits of size 30 are off by up to 0.06, and every loss
  with them. The backward pass rounds the logits' gradient to that dtype first, as a
  plain einsum's would: its two matmuls run in bf16, not in fp32 against bf16 weights."""
  return jnp.einsum('...d,dv->...v', x, w, preferred_element_type=jnp.float32)


def _head_logits_fwd(x, w):
  return head_logits(x, w), (x, w)


def _head_logits_bwd(residuals, g):
  x, w = residuals
  g = g.astype(x.dtype)
  return (jnp.einsum('...v,dv->...d', g, w.astype(g.dtype)),
          jnp.einsum('...d,...v->dv', x, g).astype(w.dtype))


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)
