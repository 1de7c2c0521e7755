"""SwiGLU feed-forward (Shazeer 2020): down(silu(x·W_gate) * x·W_up); with the tanh GELU
for the gate's activation it is GeGLU, Gemma's (`model.mlp_activation`)."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxarch.layers.params import normal, param

# model.mlp_activation -> the gate's activation. 'gelu_tanh' is the tanh approximation of
# GELU, transformers' gelu_pytorch_tanh.
ACTIVATIONS = {'silu': jax.nn.silu, 'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True)}


class SwiGLU(nnx.Module):

  def __init__(self, d_model: int, d_ff: int, *, init_std: float = 0.02,
               out_std: float | None = None, init_truncation: float = 0.0,
               activation: str = 'silu', dtype=jnp.bfloat16, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.activation = activation
    init, out = normal(init_std, init_truncation), normal(out_std or init_std, init_truncation)
    self.gate = param(rngs, init, (d_model, d_ff), ('embed', 'mlp'), param_dtype)
    self.up = param(rngs, init, (d_model, d_ff), ('embed', 'mlp'), param_dtype)
    self.down = param(rngs, out, (d_ff, d_model), ('mlp', 'embed'), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    cast = lambda p: p[...].astype(self.dtype)
    h = ACTIVATIONS[self.activation](jnp.einsum('btd,df->btf', x, cast(self.gate)))
    h = h * jnp.einsum('btd,df->btf', x, cast(self.up))
    return jnp.einsum('btf,fd->btd', h, cast(self.down))
