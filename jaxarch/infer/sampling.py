"""Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p."""

import dataclasses

import jax
import jax.numpy as jnp

METHODS = ('greedy', 'sample', 'bita')  # bita: greedy, several tokens per pass (infer.tree)


class GenerateError(ValueError):
  """A bad argument to `generate` (prompt, method, sampling option): one line for the user."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How `generate` picks tokens; hashable, so it is a static argument of the jitted loop.

  `top_k=0` and `top_p=1.0` keep every token. Top-k is applied before top-p, and both
  on the logits divided by the temperature.
  """
  method: str = 'greedy'
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise GenerateError(f'generate: method={self.method!r}; expected one of {METHODS}')
    if self.method != 'sample':
      if self.temperature not in (0.0, 1.0) or self.top_k or self.top_p != 1.0:
        raise GenerateError(
            f"generate: temperature, top_k and top_p choose among tokens for method='sample'; "
            f'method={self.method!r} takes the most likely one (got temperature='
            f'{self.temperature}, top_k={self.top_k}, top_p={self.top_p})')
      return
    if not self.temperature > 0:
      raise GenerateError(f'generate: temperature={self.temperature} must be > 0 '
                          "(0: use method='greedy' for the most likely token)")
    if self.top_k < 0:
      raise GenerateError(f'generate: top_k={self.top_k} must be >= 0 (0 keeps every token)')
    if not 0 < self.top_p <= 1:
      raise GenerateError(f'generate: top_p={self.top_p} must be in (0, 1]')


def within_vocab(logits: jax.Array, limit: int | None) -> jax.Array:
  """logits [..., V] with the ids from `limit` on (a model's vocabulary padded beyond its
  tokenizer's) never chosen; `limit` None: every id."""
  if limit is None or limit >= logits.shape[-1]:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < limit, logits, -jnp.inf)


def next_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [b, V] -> token ids [b] int32."""
  if sampling.method in ('greedy', 'bita'):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  vocab = logits.shape[-1]
  top_k = sampling.top_k if 0 < sampling.top_k < vocab else 0
  if top_k or sampling.top_p < 1:
    logits = _keep_most_likely(logits, top_k, sampling.top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _keep_most_likely(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Keeps the `top_k` most likely tokens (0: all), then the fewest of those whose
  probability reaches `top_p`, by rank: of tokens tied at the edge, only as many as fit."""
  rows = jnp.arange(logits.shape[0])[:, None]
  if top_p >= 1:  # top-k alone: no sort of the vocabulary
    chosen = jax.lax.top_k(logits, top_k)[1]
    keep = jnp.zeros(logits.shape, bool).at[rows, chosen].set(True)
    return jnp.where(keep, logits, -jnp.inf)
  order = jnp.argsort(-logits, axis=-1, stable=True)  # b V: most likely first
  ordered = jnp.take_along_axis(logits, order, axis=-1)
  rank = jnp.arange(logits.shape[-1])
  if top_k:
    ordered = jnp.where(rank < top_k, ordered, -jnp.inf)
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ahead of each
  kept = (before < top_p) & (ordered > -jnp.inf)  # the first is always kept
  keep = jnp.zeros(logits.shape, bool).at[rows, order].set(kept)
  return jnp.where(keep, logits, -jnp.inf)
