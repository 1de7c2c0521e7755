"""The embedding-bag `out[t] = Σ_k weights[t, k] · values[indices[t, k]]` and its VJP.

This is the hot spot of memory layers (UltraMem): memory-bound in the forward, a
scatter-add into the whole table in the backward. A gather-then-sum written with `take`
would keep the gathered `[T, K, D]` tensor alive for the backward (TensorFlow's
EmbeddingBag ran out of memory that way), so the op has a custom VJP whose residuals are
only its inputs: the backward gathers the rows again.

- `grad_values` is a scatter-add of `weights[t, k] · g[t]` into row `indices[t, k]`
  (repeated indices accumulate), in fp32;
- `grad_weights[t, k] = <g[t], values[indices[t, k]]>`.

Both directions loop over chunks of the K slots, so the transient gathered block is at
most `T × chunk × D` (about 2^24 elements) rather than `T × K × D`. Accumulation is in
fp32 (fp64 for fp64 tables); the output has `values`' dtype. Indices outside `[0, N)` are
clamped to the table, so nothing outside it is ever read or written.

**Sharded lookup** (`sharded_sparse_lookup`). Inside `jaxarch.parallel.context.
logical_mesh`, the table's rows are split over the mesh axes that the logical axis
`values` maps to (e.g. `fsdp × tensor`), tokens over the `batch` axes (e.g. `data ×
fsdp`). Under `shard_map` each device:
1. all-gathers the indices and weights of its token block over the value axes that also
   split the batch (`fsdp`), so it sees every token whose lookups its rows may serve;
2. computes partial sums from the rows it owns, `[lo, hi)`: other indices get weight 0;
3. reduce-scatters the `[T, D]` partial outputs back over those axes and `psum`s them
   over the value axes that do not split the batch (`tensor`).
Communicated: indices and weights (`[T, K]`) and outputs (`[T, D]`), never the table;
autodiff through `shard_map` gives the backward, where the table gradient stays sharded
and the output cotangent is all-gathered over the same axes (the table-shard gradient is
then summed over the batch axes that do not split the table, e.g. `data`, like the
gradient of any data-parallel weight). Load follows the index
distribution (a device owning popular rows does more gathers). Rows split along the
value *width* (Meta's memory layers) is the other design, not implemented here.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxarch.parallel import context

IMPLS = ('auto', 'xla', 'pallas', 'interpret')
_CHUNK_ELEMENTS = 1 << 24  # bound on the transient gathered block T x chunk x D


def _resolve(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f'sparse_lookup: impl={impl!r}; expected one of {IMPLS}')
  if impl in ('pallas', 'interpret'):
    raise ValueError(f'sparse_lookup: impl={impl!r} is not available: the Pallas GPU/TPU '
                     "kernels are not built yet; use impl='xla' (or 'auto')")
  return 'xla'


def sparse_lookup(values: jax.Array, indices: jax.Array, weights: jax.Array, *,
                  impl: str = 'auto') -> jax.Array:
  """values [N, D], indices [T, K] int, weights [T, K] -> [T, D] in values' dtype.

  Device-local semantics: under `jit` with a sharded table XLA may gather the table; use
  `sharded_sparse_lookup` for a table sharded over the logical axis `values`.
  """
  _resolve(impl)
  if values.ndim != 2 or indices.ndim != 2 or indices.shape != weights.shape:
    raise ValueError(f'sparse_lookup: expected values [N, D], indices and weights [T, K]; '
                     f'got {values.shape}, {indices.shape}, {weights.shape}')
  return _lookup(values, indices.astype(jnp.int32), weights)


def _chunk(t: int, k: int, d: int) -> int:
  return max(1, min(k, _CHUNK_ELEMENTS // max(1, t * d)))


def _chunked(indices: jax.Array, weights: jax.Array, chunk: int):
  """[T, K] -> [K/chunk, T, chunk], K padded with index 0 / weight 0."""
  t, k = indices.shape
  pad = -k % chunk
  indices = jnp.pad(indices, ((0, 0), (0, pad)))
  weights = jnp.pad(weights, ((0, 0), (0, pad)))
  split = lambda a: a.reshape(t, -1, chunk).transpose(1, 0, 2)
  return split(indices), split(weights)


@jax.custom_vjp
def _lookup(values, indices, weights):
  return _forward(values, indices, weights)


def _forward(values, indices, weights):
  n, d = values.shape
  t, k = indices.shape
  acc = jnp.promote_types(values.dtype, jnp.float32)
  indices = jnp.clip(indices, 0, n - 1)
  idx, w = _chunked(indices, weights.astype(acc), _chunk(t, k, d))

  def partial_sum(i, wc):
    rows = values[i].astype(acc)  # t c d
    return jnp.einsum('tc,tcd->td', wc, rows)

  # The first chunk seeds the carry (so that it has the inputs' varying mesh axes
  # inside shard_map); the scan adds the others.
  out, _ = jax.lax.scan(lambda acc, c: (acc + partial_sum(*c), None),
                        partial_sum(idx[0], w[0]), (idx[1:], w[1:]))
  return out.astype(values.dtype)


def _lookup_fwd(values, indices, weights):
  return _forward(values, indices, weights), (values, indices, weights)


def _lookup_bwd(residuals, g):
  values, indices, weights = residuals
  n, d = values.shape
  t, k = indices.shape
  acc = jnp.promote_types(values.dtype, jnp.float32)
  chunk = _chunk(t, k, d)
  idx, w = _chunked(jnp.clip(indices, 0, n - 1), weights.astype(acc), chunk)
  g = g.astype(acc)

  def body(grad_values, c):
    i, wc = c
    rows = values[i].astype(acc)  # t c d
    grad_w = jnp.einsum('td,tcd->tc', g, rows)
    contrib = jnp.einsum('tc,td->tcd', wc, g).reshape(-1, d)
    grad_values = grad_values.at[i.reshape(-1)].add(contrib)  # repeated rows accumulate
    return grad_values, grad_w

  grad_values, grad_w0 = body(jnp.zeros((n, d), acc), (idx[0], w[0]))
  grad_values, grad_w = jax.lax.scan(body, grad_values, (idx[1:], w[1:]))
  grad_w = jnp.concatenate([grad_w0[None], grad_w]).transpose(1, 0, 2).reshape(t, -1)[:, :k]
  int_zero = jnp.zeros(indices.shape, jax.dtypes.float0)
  return grad_values.astype(values.dtype), int_zero, grad_w.astype(weights.dtype)


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def sharded_sparse_lookup(values: jax.Array, indices: jax.Array, weights: jax.Array, *,
                          split: int = 1, impl: str = 'auto') -> jax.Array:
  """`sparse_lookup` with the table split over the logical axis `values`; see module doc.

  `split` views each row of `values [N, D]` as `split` rows of width `D / split` (index
  `p·split + i` is slice `i` of row `p`), so indices are in `[0, N·split)` and the output
  is `[T, D / split]`; the view is taken on each device's own rows.

  Outside a `logical_mesh` context, or when `values` maps to no mesh axis of size > 1,
  this is `sparse_lookup`. Inside, `values` is expected to be placed with rows split over
  those axes (as `tree_shardings` places a `('values', None)` parameter) and the token
  dimension of `indices` / `weights` over the `batch` axes.
  """
  _resolve(impl)
  n, d = values.shape
  if d % split:
    raise ValueError(f'sharded_sparse_lookup: width {d} is not divisible by split={split}')
  view = lambda v: v.reshape(v.shape[0] * split, d // split)
  value_axes = context.mesh_axes('values', n)
  if not value_axes:
    return sparse_lookup(view(values), indices, weights, impl=impl)
  mesh, _ = context.current()
  batch_axes = context.mesh_axes('batch')
  shared = tuple(a for a in value_axes if a in batch_axes)  # split both rows and tokens
  rest = tuple(a for a in value_axes if a not in batch_axes)  # split rows only
  others = tuple(a for a in batch_axes if a not in value_axes)  # split tokens only

  t = indices.shape[0]
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  pad = -t % shards
  indices = jnp.pad(indices.astype(jnp.int32), ((0, pad), (0, 0)))
  weights = jnp.pad(weights, ((0, pad), (0, 0)))
  indices = jnp.clip(indices, 0, n * split - 1)
  rows_per_shard = n * split // math.prod(mesh.shape[a] for a in value_axes)
  token_spec = P(batch_axes or None, None)

  def local(values, indices, weights):
    values = view(values)
    if shared:
      indices = jax.lax.all_gather(indices, shared, axis=0, tiled=True)
      weights = jax.lax.all_gather(weights, shared, axis=0, tiled=True)
    if others:  # the table is replicated there: its gradient is summed over them
      values = jax.lax.pcast(values, others, to='varying')
    lo = jax.lax.axis_index(value_axes) * rows_per_shard
    mine = (indices >= lo) & (indices < lo + rows_per_shard)
    out = _lookup(values, jnp.where(mine, indices - lo, 0),
                  jnp.where(mine, weights, jnp.zeros_like(weights)))
    if shared:
      out = jax.lax.psum_scatter(out, shared, scatter_dimension=0, tiled=True)
    if rest:
      out = jax.lax.psum(out, rest)
    return out

  out = jax.shard_map(local, mesh=mesh, in_specs=(P(value_axes, None), token_spec, token_spec),
                      out_specs=token_spec)(values, indices, weights)
  return out[:t]
