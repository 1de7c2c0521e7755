"""Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ('greedy', 'sample', 'bita')  # bita: greedy, several tokens per pass (infer.tree)


class GenerateError(ValueError):
  """A bad argument to `generate` (prompt, method, sampling option): one line for the user."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How `generate` picks tokens, checked when made.

  `top_k=0` and `top_p=1.0` keep every token. Top-k is applied before top-p, and both
  on the logits divided by the temperature. A compiled loop depends only on `method` and
  `filtered`; the values are its traced arguments (`values`).
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
    if not 0 < self.temperature < math.inf:
      raise GenerateError(f'generate: temperature={self.temperature} must be > 0 and finite '
                          "(0: use method='greedy' for the most likely token)")
    if self.top_k < 0:
      raise GenerateError(f'generate: top_k={self.top_k} must be >= 0 (0 keeps every token)')
    if not 0 < self.top_p <= 1:
      raise GenerateError(f'generate: top_p={self.top_p} must be in (0, 1]')

  @property
  def filtered(self) -> bool:
    """Whether top-k or top-p may drop tokens: a sort of the vocabulary per step."""
    return self.method == 'sample' and (self.top_k > 0 or self.top_p < 1)

  def values(self) -> np.ndarray:
    """[temperature, top_k, top_p] float32: the traced part of the setting. A temperature
    below float32's range would round to 0 (0/0 at the most likely token); the smallest
    normal float32 picks the same token, as any temperature that small does."""
    temperature = max(self.temperature, float(np.finfo(np.float32).tiny))
    return np.array([temperature, self.top_k, self.top_p], np.float32)


def within_vocab(logits: jax.Array, limit: int | None) -> jax.Array:
  """logits [..., V] with the ids from `limit` on (a model's vocabulary padded beyond its
  tokenizer's) never chosen; `limit` None: every id."""
  if limit is None or limit >= logits.shape[-1]:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < limit, logits, -jnp.inf)


def next_tokens(logits: jax.Array, key: jax.Array | None, sampling: Sampling) -> jax.Array:
  """logits [b, V] -> token ids [b] int32; `key` one for all rows (`jax.random.key(seed)`,
  or a legacy `PRNGKey(seed)`), or one per row [b]; None for greedy."""
  if key is None and sampling.method == 'sample':
    raise GenerateError("next_tokens: method='sample' draws with a key; pass "
                        'jax.random.key(seed)')
  # One key: [] typed, or [2] legacy uint32 (whose rows are [b, 2]).
  typed = key is not None and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  if key is not None and jnp.ndim(key) == (0 if typed else 1):
    key = jax.random.split(key, logits.shape[0])
  return choose(logits, key, sampling.method, sampling.filtered, sampling.values())


def choose(logits: jax.Array, keys: jax.Array, method: str, filtered: bool,
           values: jax.Array) -> jax.Array:
  """`next_tokens` with `values` ([temperature, top_k, top_p]) traced, so that one compiled
  loop serves every setting of a method: logits [b, V], a key per row [b] -> token ids [b]
  int32. A row's draw depends on its logits and key only, not on the other rows."""
  if method in ('greedy', 'bita'):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  temperature, top_k, top_p = values[0], values[1], values[2]
  # From each row's maximum, so that a tiny temperature overflows to -inf only away from
  # the most likely token (the limit is greedy), never to +inf.
  logits = logits.astype(jnp.float32)
  logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
  if filtered:
    logits = _keep_most_likely(logits, top_k, top_p)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def _keep_most_likely(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Keeps the `top_k` most likely tokens (0: all) and those tied with the k-th, as
  transformers' and vLLM's top-k do, then the fewest of those whose probability reaches
  `top_p`, by rank: of tokens tied at the top-p edge, only as many as fit (theirs too)."""
  rows = jnp.arange(logits.shape[0])[:, None]
  order = jnp.argsort(-logits, axis=-1, stable=True)  # b V: most likely first
  ordered = jnp.take_along_axis(logits, order, axis=-1)
  rank = jnp.arange(logits.shape[-1])
  kth = ordered[:, jnp.clip(top_k.astype(jnp.int32) - 1, 0, logits.shape[-1] - 1)]  # b
  ordered = jnp.where((top_k <= 0) | (ordered >= kth[:, None]), ordered, -jnp.inf)
  probs = jax.nn.softmax(ordered, axis=-1)
  # The probability of the tokens ahead of each: the sum up to the one before, not the sum
  # less its own probability, whose rounding kept a second token where the first reached
  # top_p exactly.
  before = jnp.concatenate([jnp.zeros_like(probs[..., :1]),
                            jnp.cumsum(probs, axis=-1)[..., :-1]], axis=-1)
  # The first is always kept (also when top_p rounds to 0 in float32); top_p=1 keeps all,
  # however the sum rounds.
  kept = ((before < top_p) | (rank == 0) | (top_p >= 1)) & (ordered > -jnp.inf)
  keep = jnp.zeros(logits.shape, bool).at[rows, order].set(kept)
  return jnp.where(keep, logits, -jnp.inf)
