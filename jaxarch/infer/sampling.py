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
    if not self.temperature > 0:
      raise GenerateError(f'generate: temperature={self.temperature} must be > 0 '
                       "(use method='greedy' for the most likely token)")
    if self.top_k < 0:
      raise GenerateError(f'generate: top_k={self.top_k} must be >= 0 (0 keeps every token)')
    if not 0 < self.top_p <= 1:
      raise GenerateError(f'generate: top_p={self.top_p} must be in (0, 1]')


def next_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [b, V] -> token ids [b] int32."""
  if sampling.method in ('greedy', 'bita'):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1:
    logits = _nucleus(logits, sampling.top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _nucleus(logits: jax.Array, top_p: float) -> jax.Array:
  """Keeps the smallest set of most likely tokens whose probability reaches top_p."""
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ahead of each
  kept = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1: the first is always kept
  threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
  return jnp.where(logits < threshold, -jnp.inf, logits)
