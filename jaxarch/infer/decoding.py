"""Cached decoding of a jaxarch language model: inference mode, caches, prefill, one step.

A model decodes with state held in `nnx.Cache` variables that its own layers allocate
(`init_cache(batch, length)` on attention and on memory layers with a query conv), so the
blocks in between need no cache plumbing. A language model that generates provides
`init_cache(batch, length)`, `prefill(tokens, lengths) -> logits [b, vocab]` and
`decode_step(tokens [b], positions [b]) -> logits [b, vocab]`: the transformer projects
only the last position of each prompt onto the vocabulary; MEGABYTE steps its global
model once per patch and its local model once per byte.

These functions run eagerly or inside `jax.jit`; `generate.Generator` compiles them.
They refuse a model without caches and a prompt longer than its caches; a decode step's
positions past them are refused when the positions are concrete (eagerly), unchecked
inside jit.
"""

import jax
import numpy as np
from flax import nnx

from jaxarch.infer.sampling import GenerateError
from jaxarch.parallel import tree_shardings


def for_inference(model: nnx.Module, *, moe_capacity_factor: float | None = None
                  ) -> nnx.Module:
  """The same weights with inference behaviour; `model` itself is left as it was.

  - `deterministic`: no training-time state updates (UltraMem's Tucker vectors, MoE
    router bias);
  - MoE runs dropless by default (`moe_capacity_factor=None`): no token is dropped, and a
    sequence's output does not depend on the other sequences of the batch. A factor
    selects the capacity path instead (padded batched matmuls; a prompt's overflow is
    dropped as in training, at the capacity of a sequence as long as the prompt, whatever
    the batch pads it to, while a decode step, one token per sequence, drops none);
  - no rematerialisation (there is no backward pass).
  """
  model = nnx.merge(*nnx.split(model))  # new module objects sharing the arrays
  model.set_attributes(deterministic=True, raise_if_not_found=False)
  model.set_attributes(capacity_factor=moe_capacity_factor, ep_capacity_factor=None,
                       capacity_of_real=True, raise_if_not_found=False)
  model.set_attributes(remat='none', raise_if_not_found=False)
  return model


# What cached decoding calls on a model: `init_cache(batch, length)`, then
# `prefill(tokens [b, t], lengths [b])` and `decode_step(tokens [b], positions [b])`, each
# -> logits [b, vocab]. `models.transformer.Transformer` has them.
DECODING_METHODS = ('init_cache', 'prefill', 'decode_step')


def cannot_decode(model: nnx.Module) -> str | None:
  """Why `model` cannot be decoded with caches (a family of the user's own without the
  methods), or None."""
  missing = [name for name in DECODING_METHODS if not callable(getattr(model, name, None))]
  if not missing:
    return None
  return (f'{type(model).__name__} has no {", ".join(missing)}, which cached decoding calls '
          '(init_cache(batch, length), then prefill(tokens, lengths) and '
          'decode_step(tokens, positions), each -> next-token logits [b, vocab]); subclass '
          'jaxarch.models.transformer.Transformer, which has them, or write them')


def add_caches(model: nnx.Module, batch: int, length: int, mesh=None, rules=None):
  """Allocates the model's zeroed decode caches for `batch` sequences of `length` positions.

  With a mesh and `mesh.rules`, each cache is constrained to the sharding of its logical
  axes (batch over the data axes, kv heads over `tensor`), like the weights.
  """
  model.init_cache(batch, length)
  model.cache_length = length  # what prefill and decode_step check against
  model.cache_batch = batch
  if mesh is not None:
    caches = nnx.state(model, nnx.Cache)
    shardings = tree_shardings(caches, mesh, rules)
    nnx.update(model, jax.tree.map(jax.lax.with_sharding_constraint, caches, shardings))


def prefill(model: nnx.Module, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
  """Prompts [b, t] right-padded to t, `lengths` [b] -> next-token logits [b, vocab].

  Fills the caches with what the prompts leave for the decode steps, slots 0..t-1.
  """
  length = _cache_length(model, 'prefill')
  _check_rows(model, 'prefill', ('tokens', tokens, '[b, t]'), ('lengths', lengths, '[b]'))
  # Else a shape error deep inside, or a sliding window's ring that lost keys.
  if length is not None and tokens.shape[1] > length:
    raise GenerateError(f'prefill: prompts of {tokens.shape[1]} tokens do not fit caches of '
                        f'{length} positions; add_caches with a length of at least '
                        f'{tokens.shape[1]} (the prompts plus the new tokens)')
  return model.prefill(tokens, lengths)


def decode_step(model: nnx.Module, tokens: jax.Array, positions: jax.Array) -> jax.Array:
  """One new token per sequence, `tokens` [b] at `positions` [b] -> logits [b, vocab].

  Positions must be below the caches' `length` (`add_caches`): a token at or past it is
  not written (a sliding-window layer's ring wraps instead), and its logits are wrong;
  refused when `positions` are concrete, unchecked inside jit. `Generator` sizes the
  caches for its calls.
  """
  length = _cache_length(model, 'decode_step')
  _check_rows(model, 'decode_step', ('tokens', tokens, '[b]'), ('positions', positions, '[b]'))
  if length is not None and not isinstance(positions, jax.core.Tracer):
    bad = np.asarray(positions)
    bad = bad[(bad < 0) | (bad >= length)]
    if bad.size:
      raise GenerateError(f'decode_step: positions {bad[:5].tolist()} outside the caches\' '
                          f'{length} positions [0, {length}); add_caches with a length of '
                          f'at least {int(bad.max()) + 1}')
  return model.decode_step(tokens, positions)


def _check_rows(model: nnx.Module, call: str, *inputs: tuple[str, jax.Array, str]) -> None:
  """Each (name, array, '[b, ...]') of a call has that rank and the caches' b rows: else
  an einsum's or a dynamic_update_slice's shape error from deep inside the model."""
  rows = getattr(model, 'cache_batch', None)
  for name, array, shape in inputs:
    got = np.shape(array)
    if len(got) != shape.count(',') + 1 or rows is not None and got[0] != rows:
      rows_said = '' if rows is None else f' with b={rows} (the rows add_caches made)'
      raise GenerateError(f'{call}: {name} must be {shape}{rows_said}, not {list(got)}')


def _cache_length(model: nnx.Module, call: str) -> int | None:
  """The positions `add_caches` allocated (None: caches of `model.init_cache` itself,
  unchecked). Without caches a prefill fails deep inside and a decode step attends to
  its own token alone: wrong logits, silently."""
  if not jax.tree.leaves(nnx.state(model, nnx.Cache)):
    raise GenerateError(f'{call}: the model has no decode caches; allocate them first with '
                        'add_caches(model, batch, length)')
  return getattr(model, 'cache_length', None)
