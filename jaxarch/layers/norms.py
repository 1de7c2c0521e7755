"""RMSNorm: the pre-norm of every block (no mean, no bias)."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxarch.layers.params import param


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.bfloat16,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ('norm',), param_dtype,
                       weight_decay=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    # Statistics in fp32 whatever the compute dtype.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)
