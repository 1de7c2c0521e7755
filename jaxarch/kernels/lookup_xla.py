"""Pure-JAX reference of the sparse value lookup: gathers and scatter-adds, chunked over K.

Both directions loop over chunks of the K slots, so the transient gathered block is at
most `T × chunk × D` (about 2^24 elements) rather than `T × K × D`. The scatter-add of the
table gradient either sorts each chunk's rows first (`scatter='sorted'`, a sorted
scatter that XLA lowers without atomics conflicts, and that does not suffer from the
unsorted scatter-add regressions some jaxlib releases had on GPU, jax issue 38806) or
scatters in token order (`scatter='atomic'`).

Inputs are validated by the caller: indices int32 in `[0, N)`, weights fp32; results are
fp32 (fp64 for fp64 tables).
"""

import jax
import jax.numpy as jnp

CHUNK_ELEMENTS = 1 << 24  # bound on the transient gathered block T x chunk x D


def _chunk(t: int, k: int, d: int) -> int:
  return max(1, min(k, CHUNK_ELEMENTS // max(1, t * d)))


def _chunked(indices: jax.Array, weights: jax.Array, chunk: int):
  """[T, K] -> [K/chunk, T, chunk], K padded with index 0 / weight 0."""
  t, k = indices.shape
  pad = -k % chunk
  indices = jnp.pad(indices, ((0, 0), (0, pad)))
  weights = jnp.pad(weights, ((0, 0), (0, pad)))
  split = lambda a: a.reshape(t, -1, chunk).transpose(1, 0, 2)
  return split(indices), split(weights)


def forward(values: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
  """values [N, D], indices/weights [T, K] -> [T, D] in the accumulation dtype."""
  _, d = values.shape
  t, k = indices.shape
  acc = weights.dtype
  idx, w = _chunked(indices, weights, _chunk(t, k, d))

  def partial_sum(i, wc):
    rows = values[i].astype(acc)  # t c d
    return jnp.einsum('tc,tcd->td', wc, rows)

  # The first chunk seeds the carry (so that it has the inputs' varying mesh axes
  # inside shard_map); the scan adds the others.
  out, _ = jax.lax.scan(lambda total, c: (total + partial_sum(*c), None),
                        partial_sum(idx[0], w[0]), (idx[1:], w[1:]))
  return out


def backward(values: jax.Array, indices: jax.Array, weights: jax.Array, g: jax.Array,
             scatter: str = 'sorted') -> tuple[jax.Array, jax.Array]:
  """-> (grad_values [N, D], grad_weights [T, K]), both in g's (accumulation) dtype."""
  n, d = values.shape
  t, k = indices.shape
  acc = g.dtype
  idx, w = _chunked(indices, weights, _chunk(t, k, d))

  def body(grad_values, c):
    i, wc = c
    rows = values[i].astype(acc)  # t c d
    grad_w = jnp.einsum('td,tcd->tc', g, rows)
    contrib = jnp.einsum('tc,td->tcd', wc, g).reshape(-1, d)
    flat = i.reshape(-1)
    if scatter == 'sorted':
      order = jnp.argsort(flat)
      grad_values = grad_values.at[flat[order]].add(contrib[order], indices_are_sorted=True)
    else:
      grad_values = grad_values.at[flat].add(contrib)  # repeated rows accumulate
    return grad_values, grad_w

  grad_values, grad_w0 = body(jnp.zeros((n, d), acc), (idx[0], w[0]))
  grad_values, grad_w = jax.lax.scan(body, grad_values, (idx[1:], w[1:]))
  grad_w = jnp.concatenate([grad_w0[None], grad_w]).transpose(1, 0, 2).reshape(t, -1)[:, :k]
  return grad_values, grad_w
