"""Pure-JAX reference of the sparse value lookup: gathers and scatter-adds, chunked over K.

Both directions loop over chunks of the K slots, so the transient gathered block is at
most `T × chunk × D` (about 2^24 elements) rather than `T × K × D`. The scatter-add of the
table gradient either sorts each chunk's rows first (`scatter='sorted'`, a sorted
scatter that XLA lowers without atomics conflicts, and that does not suffer from the
unsorted scatter-add regressions some jaxlib releases had on GPU, jax issue 38806) or
scatters in token order (`scatter='atomic'`).

With `bags [T, K]` (int32 in `[0, B)`), token t's output is `[B, D]` and entry (t, k) adds
to its bag `bags[t, k]`: each entry's row is still gathered once, and the chunk's sum is
one `[B, chunk] @ [chunk, D]` contraction per token.

Inputs are validated by the caller: indices int32 in `[0, N)`, weights fp32; results are
fp32 (fp64 for fp64 tables).
"""

import jax
import jax.numpy as jnp

CHUNK_ELEMENTS = 1 << 24  # bound on the transient gathered block T x chunk x D


def _chunk(t: int, k: int, d: int) -> int:
  return max(1, min(k, CHUNK_ELEMENTS // max(1, t * d)))


def _chunked(chunk: int, *arrays: jax.Array) -> list[jax.Array]:
  """Each [T, K] -> [K/chunk, T, chunk], K padded with zeros (index 0, weight 0, bag 0)."""
  t, k = arrays[0].shape
  pad = -k % chunk
  split = lambda a: jnp.pad(a, ((0, 0), (0, pad))).reshape(t, -1, chunk).transpose(1, 0, 2)
  return [split(a) for a in arrays]


def _chunks(indices, weights, bags, d):
  """The scanned chunks (indices, weights[, bags]): [K/chunk, T, chunk] each."""
  t, k = indices.shape
  return _chunked(_chunk(t, k, d), indices, weights, *(() if bags is None else (bags,)))


def forward(values: jax.Array, indices: jax.Array, weights: jax.Array,
            bags: jax.Array | None = None, num_bags: int = 1) -> jax.Array:
  """values [N, D], indices/weights [T, K] -> [T, D] (with bags: [T, B, D]) in the
  accumulation dtype."""
  d = values.shape[1]
  acc = weights.dtype

  def partial_sum(i, wc, bc=None):
    rows = values[i].astype(acc)  # t c d
    if bc is None:
      return jnp.einsum('tc,tcd->td', wc, rows)
    one_hot = (bc[..., None] == jnp.arange(num_bags)).astype(acc)  # t c b
    return jnp.einsum('tc,tcb,tcd->tbd', wc, one_hot, rows)

  # The first chunk seeds the carry (so that it has the inputs' varying mesh axes
  # inside shard_map); the scan adds the others.
  chunks = _chunks(indices, weights, bags, d)
  out, _ = jax.lax.scan(lambda total, c: (total + partial_sum(*c), None),
                        partial_sum(*(c[0] for c in chunks)), [c[1:] for c in chunks])
  return out


def backward(values: jax.Array, indices: jax.Array, weights: jax.Array, g: jax.Array,
             scatter: str = 'sorted',
             bags: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """g [T, D] (with bags: [T, B, D]) -> (grad_values [N, D], grad_weights [T, K]), both in
  g's (accumulation) dtype."""
  n, d = values.shape
  t, k = indices.shape
  acc = g.dtype

  def body(grad_values, c):
    i, wc = c[:2]
    rows = values[i].astype(acc)  # t c d
    if bags is None:
      grad_w = jnp.einsum('td,tcd->tc', g, rows)
      contrib = jnp.einsum('tc,td->tcd', wc, g)
    else:  # an entry's output gradient is its bag's
      g_entry = jnp.take_along_axis(g, c[2][..., None], axis=1)  # t c d
      grad_w = jnp.einsum('tcd,tcd->tc', g_entry, rows)
      contrib = wc[..., None] * g_entry
    contrib = contrib.reshape(-1, d)
    flat = i.reshape(-1)
    if scatter == 'sorted':
      order = jnp.argsort(flat)
      grad_values = grad_values.at[flat[order]].add(contrib[order], indices_are_sorted=True)
    else:
      grad_values = grad_values.at[flat].add(contrib)  # repeated rows accumulate
    return grad_values, grad_w

  chunks = _chunks(indices, weights, bags, d)
  grad_values, grad_w0 = body(jnp.zeros((n, d), acc), [c[0] for c in chunks])
  grad_values, grad_w = jax.lax.scan(body, grad_values, [c[1:] for c in chunks])
  grad_w = jnp.concatenate([grad_w0[None], grad_w]).transpose(1, 0, 2).reshape(t, -1)[:, :k]
  return grad_values, grad_w
