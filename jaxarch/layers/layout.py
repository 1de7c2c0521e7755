"""Token layouts other than one causal sequence: BiTA's mask groups and draft trees.

Training and ordinary decoding read one sequence per row, where each token sees the ones
before it. BiTA feeds a call whose tokens form a tree instead: draft candidates that
branch from one another, and groups of mask tokens hung after a token. A `Layout` says,
for the t tokens of such a call, what each one sees:

- `visible` [t, t], or [b, t, t] per row: token i sees token j of the call (its
  ancestors and itself);
- `parent` [t], or [b, t] per row: the token before i on its path (a causal conv's
  previous input), or -1 when that token is before the call (in the cache, at position
  `positions[i] - 1`);
- `sees_prefix` [t]: token i also sees the learned prompt prefix (only mask tokens do);
- `cached` [b] or None: with decode caches, how many positions of each sequence are
  cached; the call is written to the slots after them and sees all of them. The layers
  then keep only the accepted path with `keep_path`.
- `context` [b, t, S] and `context_offset` [b, t], or None: with caches whose first S
  slots hold whole rows (BiTA's training fills them with a pass over the row's tokens,
  its decoding with the prefill), the cached slots each token of the call sees, and
  where its path continues in them: position p before the call sits at slot
  p + `context_offset`. The call reads the caches, never writes them.
  Such a call is groups of M consecutive tokens that see no other group, and `visible`
  is [M, M], one group's (attention then spans g·M² pairs of the call, not (g·M)²).

A draft tree has the same layout in every row (only `cached` differs); BiTA's training
call is the mask groups alone, each seeing its own anchor's past in the caches
(`context`, per row). Tokens along a path have consecutive positions. An ordinary decode
step is the one-token layout (`one_token`).
"""

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Layout:
  visible: jax.Array
  parent: jax.Array
  sees_prefix: jax.Array
  cached: jax.Array | None = None
  context: jax.Array | None = None
  context_offset: jax.Array | None = None

  def visible_rows(self, b: int) -> jax.Array:
    """`visible`, shared or per row -> [b, t, t]."""
    return jnp.broadcast_to(self.visible, (b, *self.visible.shape[-2:]))

  def parent_rows(self, b: int) -> jax.Array:
    """`parent`, shared or per row -> [b, t]."""
    return jnp.broadcast_to(self.parent, (b, self.parent.shape[-1]))


def one_token(positions: jax.Array) -> Layout:
  """A decode step: one new token per sequence, at `positions` [b], after its cached ones."""
  return Layout(visible=jnp.ones((1, 1), bool), parent=jnp.full((1,), -1, jnp.int32),
                sees_prefix=jnp.zeros((1,), bool), cached=positions)


def keep_path(cache: jax.Array, path: jax.Array, cached: jax.Array) -> jax.Array:
  """cache [b, S, ...] after a tree call written at slots `cached` [b] onwards -> the
  cache with the call's tokens `path` [b, A] (call indices, increasing) moved to slots
  cached .. cached+A-1, so that the cache holds only the accepted path."""
  def one(row, path, cached):  # per row (vmap): a batch dimension XLA keeps on its devices
    target = cached + jnp.arange(path.shape[0])
    return row.at[target].set(row[cached + path], mode='drop')
  return jax.vmap(one)(cache, path, cached)


def write_call(cache: jax.Array, x: jax.Array, cached: jax.Array) -> jax.Array:
  """cache [b, S, ...] with the call's x [b, t, ...] written at slots cached[b] + 0..t-1."""
  def one(row, x, cached):
    return row.at[cached + jnp.arange(x.shape[0])].set(x.astype(row.dtype), mode='drop')
  # Per row (vmap), so that the scatter's rows are a batch dimension, which XLA keeps on
  # the devices that hold them; indexed by a row iota, each device gathered the whole
  # batch's new keys and values on every decode step.
  return jax.vmap(one)(cache, x, cached)


def cache_mask(layout: Layout, length: int) -> jax.Array:
  """-> [b, t, length] bool: the cache slots each token of the call sees, once the call is
  written after the cached ones: every cached slot, and the slots of its visible tokens."""
  b, t = layout.cached.shape[0], layout.visible.shape[-1]
  offset = jnp.arange(length)[None, :] - layout.cached[:, None]  # b S
  in_call = (offset >= 0) & (offset < t)
  seen = jnp.take_along_axis(layout.visible_rows(b), jnp.clip(offset, 0, t - 1)[:, None],
                             axis=2)  # b t S
  return (offset < 0)[:, None, :] | (in_call[:, None, :] & seen)
