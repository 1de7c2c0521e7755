"""Cached decoding of a jaxarch language model: inference mode, caches, prefill, one step.

A model decodes with state held in `nnx.Cache` variables that its own layers allocate
(`init_cache(batch, length)` on attention and on memory layers with a query conv), so the
blocks in between need no cache plumbing and every family built from these layers decodes
the same way. Generation uses the model's two halves, `features` (tokens -> final hidden
states) and `logits` (hidden -> vocabulary), so that a prefill only projects the last
position of each prompt onto the vocabulary.

These functions run eagerly or inside `jax.jit`; `generate.Generator` compiles them.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxarch.parallel import tree_shardings


def for_inference(model: nnx.Module) -> nnx.Module:
  """The same weights with inference behaviour; `model` itself is left as it was.

  - `deterministic`: no training-time state updates (UltraMem's Tucker vectors, MoE
    router bias);
  - MoE runs dropless (`capacity_factor=None`): no token is dropped, and a sequence's
    output does not depend on the other sequences of the batch;
  - no rematerialisation (there is no backward pass).
  """
  model = nnx.merge(*nnx.split(model))  # new module objects sharing the arrays
  model.set_attributes(deterministic=True, raise_if_not_found=False)
  model.set_attributes(capacity_factor=None, ep_capacity_factor=None,
                       raise_if_not_found=False)
  model.set_attributes(remat='none', raise_if_not_found=False)
  return model


def add_caches(model: nnx.Module, batch: int, length: int, mesh=None, rules=None):
  """Allocates zeroed decode caches of `length` positions in every layer that has them.

  With a mesh and `mesh.rules`, each cache is constrained to the sharding of its logical
  axes (batch over the data axes, kv heads over `tensor`), like the weights.
  """
  owners = [m for _, m in nnx.iter_graph(model)
            if isinstance(m, nnx.Module) and hasattr(m, 'init_cache')]
  for module in owners:
    module.init_cache(batch, length)
  if mesh is not None:
    caches = nnx.state(model, nnx.Cache)
    shardings = tree_shardings(caches, mesh, rules)
    nnx.update(model, jax.tree.map(jax.lax.with_sharding_constraint, caches, shardings))


def prefill(model: nnx.Module, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
  """Prompts [b, t] right-padded to t, `lengths` [b] -> next-token logits [b, vocab].

  Fills the caches with positions 0..t-1 (padding included; it is overwritten by the
  decode steps before it is ever attended to).
  """
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  segment_ids = (positions < lengths[:, None]).astype(jnp.int32)  # padding: 0
  x = model.features(tokens, segment_ids, positions)
  last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # b 1 d
  return model.logits(last)[:, 0]


def decode_step(model: nnx.Module, tokens: jax.Array, positions: jax.Array) -> jax.Array:
  """One new token per sequence, `tokens` [b] at `positions` [b] -> logits [b, vocab]."""
  x = model.features(tokens[:, None], jnp.ones_like(tokens)[:, None], positions[:, None])
  return model.logits(x)[:, 0]
