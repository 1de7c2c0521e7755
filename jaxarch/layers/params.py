"""Parameter creation with logical sharding axes.

Every weight in jaxarch is made here so that it carries, as Flax NNX metadata, the
logical names of its axes (`embed`, `mlp`, `heads`, ...). `jaxarch.parallel.sharding`
maps those names to mesh axes through `mesh.rules`; the modules never see the mesh.
Eager sharding is off: shardings are applied once, by the jitted initialiser.

Weights are kept in `param_dtype` (fp32) and cast to the compute dtype (bf16) where they
are used. A weight that is broadcast over the batch's positions (a bias, a learned pad or
slot embedding, BiTA's prompt and mask tokens, a per-channel conv kernel) is combined with
the activations in fp32 and the result cast, not cast first: its gradient is a sum over
every position, which the transpose of a bf16 broadcast runs as a bf16 reduction (XLA
accumulates a reduction in its operand's type; `jnp.sum` upcasts, a transpose does not).
Such a sum of 262,144 terms lost 1.7% on CPU, against 5e-8 in fp32. A matmul's weight
gradient needs nothing: its products are accumulated in fp32.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
           axes: Sequence[str | None], dtype=jnp.float32, *,
           weight_decay: bool = True, **metadata) -> nnx.Param:
  """A trainable weight with logical `axes`; `weight_decay=False` for norms and embeddings."""
  if len(axes) != len(shape):
    raise ValueError(f'param of shape {tuple(shape)} needs {len(shape)} axis names, got {axes}')
  value = init(rngs.params(), tuple(shape), dtype)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False,
                   weight_decay=weight_decay, **metadata)


def normal(std: float, truncation: float = 0.0) -> Initializer:
  """N(0, std²); with `truncation` > 0 cut at ±truncation·std (`model.init_truncation`;
  MEGABYTE's paper init cuts at 2σ), which leaves a std below `std` (0.88·std at 2σ)."""
  if truncation > 0:
    return jax.nn.initializers.truncated_normal(stddev=std, lower=-truncation,
                                                upper=truncation)
  return jax.nn.initializers.normal(stddev=std)
