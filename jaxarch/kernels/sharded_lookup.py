"""`sparse_lookup` on a table sharded over the mesh axes of the logical axis `values`.

Two known designs, both under `shard_map` inside `parallel.context.
logical_mesh`, tokens split over the `batch` axes. Value axes that also split the batch
(`fsdp` under the default rules) are *shared*; those that do not (`tensor`) are *rest*;
batch axes that do not split the table (`data`) are *others*.

**Rows** (`sharded_sparse_lookup`, `model.ultramem.table_split='rows'`): each device owns
rows `[lo, hi)`. It
1. all-gathers the indices and weights (and bags) of its token block over the shared
   axes, so it sees every token whose lookups its rows may serve;
2. sums the reads of the rows it owns: other indices get weight 0 (which the Pallas
   kernels skip: no row is read for them);
3. reduce-scatters the `[T, D]` (with bags `[T, B, D]`) partial outputs back over the
   shared axes and `psum`s them over the rest.
Load follows the index distribution: a device owning popular rows does more reads.

**Width** (`width_sharded_sparse_lookup`, `table_split='width'`, Meta's memory layers):
each device owns columns `[lo, hi)` of every row. It all-gathers the indices and weights
over the shared axes as above and reads its columns of every row those tokens ask for:
the same work on every device, whatever the index distribution. An all-to-all over the
value axes then trades its columns of those tokens for all columns of `1 / devices` of
them, so the output leaves split over tokens only (over the others and the value axes)
and the next matmul needs no re-sharding of its contracted width. Each row read is
`D / devices` wide, so the Pallas kernels' 64-column granularity matters sooner: a
device's columns, cut at slice boundaries (below), should be a multiple of 64 or they are
padded (a copy of the device's table).

Both communicate indices and weights (`[T, K]`) and outputs (rows: a reduce-scatter of
`[T, D]` partial sums; width: an all-to-all of `[T, D / devices]`), never the table; autodiff
through `shard_map` gives the backward, where the table gradient stays sharded and is
summed over the others like the gradient of any data-parallel weight.

A table split over no axis (under pure data parallelism) still runs under `shard_map`
over the batch axes, each device on its own tokens: left to XLA's partitioner, the
backward's sorted scatter (one sort of all T·K entries) and the Pallas kernels (custom
calls) run replicated, every device gathering the whole batch's entries (UltraMem tiny at
data=8: 36 MiB all-reduced per step per device, for 6 MiB of parameters).

**Slices** (UltraMem's multi-core scoring): a row of D columns is S equal slices and
entry (t, k) weighs slice i by `weights[t, k, i]`. `sliced_sparse_lookup` takes weights
`[T, K, S]` and runs either design: rows view the table as `[N·S, D/S]` (row `p·S + i` is
slice i of row p), each device expanding the `[T, K]` indices and bags it gathered to the
`[T·S, K]` slice rows (expanded before the gather, they were S times the bytes); width
cuts each device's columns at slice boundaries.
"""

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxarch.config import TABLE_SPLITS
from jaxarch.kernels.sparse_lookup import (COLUMN_MULTIPLE, bagged_lookup, prepare,
                                           report_out_of_range, sparse_lookup)
from jaxarch.parallel import context

log = logging.getLogger(__name__)


def sliced_sparse_lookup(values: jax.Array, indices: jax.Array, weights: jax.Array, *,
                         bags: jax.Array | None = None, num_bags: int = 1,
                         table_split: str = 'rows', impl: str = 'auto',
                         scatter: str = 'sorted', checked: bool = False) -> jax.Array:
  """values [N, D], indices [T, K], weights [T, K, S] -> [T, B, D] (B = num_bags, 1
  without bags): entry (t, k) adds `weights[t, k, i] · values[indices[t, k], slice i]` to
  slice i of `out[t, bags[t, k]]`, with the table split by `table_split` (module doc)."""
  if table_split not in TABLE_SPLITS:
    raise ValueError(f'sliced_sparse_lookup: table_split={table_split!r}; expected one of '
                     f'{TABLE_SPLITS}')
  t = _check_sliced(values, indices, weights)[0]
  lookup = width_sharded_sparse_lookup if table_split == 'width' else sharded_sparse_lookup
  return lookup(values, indices, weights, bags=bags, num_bags=num_bags, impl=impl,
                scatter=scatter, checked=checked).reshape(t, num_bags, -1)


def sharded_sparse_lookup(values: jax.Array, indices: jax.Array, weights: jax.Array, *,
                          bags: jax.Array | None = None, num_bags: int = 1,
                          impl: str = 'auto', scatter: str = 'sorted',
                          checked: bool = False) -> jax.Array:
  """`sparse_lookup` with the table's rows split over the logical axis `values`.

  Weights `[T, K, S]` (`sliced_sparse_lookup`) view each row of `values [N, D]` as S rows
  of width `D / S` (row `p·S + i` is slice `i` of row `p`), taken on each device's own
  rows; the indices stay rows in `[0, N)`, expanded to slice rows on each device after
  the gather, and the output is `[T, D]` as with weights `[T, K]` (with bags
  `[T, num_bags, D]`).

  Outside a `logical_mesh` context, or when neither `values` nor `batch` maps to a mesh
  axis of size > 1, this is `sparse_lookup`. Inside, `values` is expected to be placed
  with rows split over those axes (as `tree_shardings` places a `('values', None)`
  parameter) and the token dimension of `indices` / `weights` over the `batch` axes.
  """
  n, d = values.shape
  split = 1
  if weights.ndim == 3:
    _, _, split = _check_sliced(values, indices, weights)
    if checked:
      report_out_of_range(indices, n)
    # Whole rows are clamped (as `width` and `sparse_lookup` do): clamping the slice rows
    # would read slice S-1 of row N-1 for every slice of an index past the table.
    indices = jnp.clip(indices, 0, n - 1)
  view = lambda v: v.reshape(v.shape[0] * split, d // split)
  value_axes = context.mesh_axes('values', n)
  if not value_axes and not context.mesh_axes('batch'):
    rows, weights, bags = _slice_rows(indices, weights, bags)
    return _unslice(sparse_lookup(view(values), rows, weights, bags=bags, num_bags=num_bags,
                                  impl=impl, scatter=scatter, checked=checked), split)
  kernels, indices, bags = prepare(values, indices, bags, num_bags, n, impl, scatter, checked)
  mesh, batch_axes, shared, others = _axes(value_axes)
  rest = tuple(a for a in value_axes if a not in batch_axes)  # split rows only
  rows_per_shard = n * split // math.prod(mesh.shape[a] for a in value_axes)
  token_spec = P(batch_axes or None, None)
  check_vma = _check_vma(kernels)

  def local(values, indices, weights, bags=None):
    values = view(values)
    # Gathered as [T, K] and expanded here: S times fewer bytes of indices and bags.
    indices, weights, bags = _slice_rows(*_gather_tokens(shared, indices, weights, bags))
    if others and check_vma:  # the table is replicated there: its gradient is summed
      values = jax.lax.pcast(values, others, to='varying')
    if value_axes:  # the rows this device owns; entries of the others' weigh 0
      lo = jax.lax.axis_index(value_axes) * rows_per_shard
      mine = (indices >= lo) & (indices < lo + rows_per_shard)
      indices = jnp.where(mine, indices - lo, 0)
      weights = jnp.where(mine, weights, jnp.zeros_like(weights))
    out = _unslice(bagged_lookup(values, indices, weights, bags, num_bags, kernels, scatter),
                   split)
    if shared:
      out = jax.lax.psum_scatter(out, shared, scatter_dimension=0, tiled=True)
    if rest:
      out = jax.lax.psum(out, rest)
    return out

  t, tokens = _padded_tokens(mesh, batch_axes, indices, weights, bags)
  in_specs = (P(value_axes or None, None),) + (token_spec,) * len(tokens)
  out = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=token_spec,
                      check_vma=check_vma)(values, *tokens)
  return out[:t]


@functools.cache  # once per process: every layer and the backward pass would repeat it
def _warn_padded_columns(part: int):
  log.warning('sparse_lookup: the table split by width reads rows of %d columns, which the '
              'Pallas kernels pad to a multiple of %d (a copy of the table on each call): '
              'choose value_dim so that value_dim / lcm(devices of `values`, num_cores) is '
              'a multiple of %d, or table_split=rows', part, COLUMN_MULTIPLE, COLUMN_MULTIPLE)


def width_sharded_sparse_lookup(values: jax.Array, indices: jax.Array, weights: jax.Array, *,
                                bags: jax.Array | None = None, num_bags: int = 1,
                                impl: str = 'auto', scatter: str = 'sorted',
                                checked: bool = False) -> jax.Array:
  """values [N, D], indices [T, K], weights [T, K, S] -> [T, D] (with bags [T, B, D]),
  as `sliced_sparse_lookup`, with the table's columns split over the logical axis
  `values` (placed as `tree_shardings` places a `(None, 'values')` parameter).

  Outside a `logical_mesh` context, or when neither `values` nor `batch` maps to a mesh
  axis of size > 1, it runs on one device.
  """
  n, d = values.shape
  _check_sliced(values, indices, weights)
  kernels, indices, bags = prepare(values, indices, bags, num_bags, n, impl, scatter, checked)
  value_axes = context.mesh_axes('values', d)
  if not value_axes and not context.mesh_axes('batch'):
    return _columns(values, indices, weights, bags, num_bags, 0, d, kernels, scatter)
  mesh, batch_axes, shared, others = _axes(value_axes)
  rest = tuple(a for a in value_axes if a not in batch_axes)
  columns = d // math.prod(mesh.shape[a] for a in value_axes)
  check_vma = _check_vma(kernels)
  part = math.gcd(columns, d // weights.shape[-1])  # columns per row read (_columns)
  if kernels != 'xla' and part % COLUMN_MULTIPLE:
    _warn_padded_columns(part)

  def local(values, indices, weights, bags=None):
    indices, weights, bags = _gather_tokens(shared, indices, weights, bags)
    if others and check_vma:
      values = jax.lax.pcast(values, others, to='varying')
    if not value_axes:  # the whole table: the device's own tokens
      return _columns(values, indices, weights, bags, num_bags, 0, d, kernels, scatter)
    lo = jax.lax.axis_index(value_axes) * columns
    out = _columns(values, indices, weights, bags, num_bags, lo, d, kernels, scatter)
    # Every device holds its columns of the gathered tokens: trade them for all columns
    # of 1/devices of those tokens (column chunks arrive in the order of `value_axes`).
    return jax.lax.all_to_all(out, value_axes, 0, out.ndim - 1, tiled=True)

  # Tokens arrive ordered others-major, so that gathering over the shared axes gives each
  # device the tokens of its `others` block in order; they leave split over the value axes
  # too, in the all-to-all's order (XLA moves both into place).
  t, tokens = _padded_tokens(mesh, batch_axes + rest, indices, weights, bags)
  token_axes = others + shared or None
  in_specs = (P(None, value_axes or None), P(token_axes, None), P(token_axes, None, None),
              P(token_axes, None))[:1 + len(tokens)]
  out_spec = P(others + value_axes, *([None] if bags is not None else []), None)
  out = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_spec,
                      check_vma=check_vma)(values, *tokens)
  # Back to the tokens' own sharding (an all-gather over the rest), so that the split
  # over the value axes does not spread into the rest of the model.
  batch_spec = P(batch_axes or None, *[None] * (out.ndim - 1))
  return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, batch_spec))[:t]


def _columns(values, indices, weights, bags, num_bags, lo, width, kernels, scatter):
  """A device's columns `[lo, lo + C)` of rows `width` wide: values [N, C] -> [T, (B,) C].

  The columns are cut into parts that each lie in one slice (`width / S` columns); part q
  is one lookup row per token, weighted by its slice's weights.
  """
  n, c = values.shape
  t, k, s = weights.shape
  part = math.gcd(c, width // s)
  parts = c // part
  slice_of = (lo + jnp.arange(parts) * part) // (width // s)  # parts
  rows = indices[:, None] * parts + jnp.arange(parts)[None, :, None]  # t parts k
  each = lambda a: None if a is None else jnp.broadcast_to(a[:, None], rows.shape).reshape(
      t * parts, k)
  part_weights = jnp.take(weights, slice_of, axis=2).transpose(0, 2, 1)  # t parts k
  out = bagged_lookup(values.reshape(n * parts, part), rows.reshape(t * parts, k),
                      part_weights.reshape(t * parts, k), each(bags), num_bags, kernels,
                      scatter)  # (t parts) [b] part
  if bags is None:
    return out.reshape(t, c)
  return out.reshape(t, parts, num_bags, part).transpose(0, 2, 1, 3).reshape(t, num_bags, c)


def _check_sliced(values, indices, weights) -> tuple[int, int, int]:
  if values.ndim != 2 or indices.ndim != 2 or weights.shape[:-1] != indices.shape or (
      weights.ndim != 3) or values.shape[1] % weights.shape[-1]:
    raise ValueError(f'sliced_sparse_lookup: expected values [N, D], indices [T, K] and '
                     f'weights [T, K, S] with S dividing D; got {values.shape}, '
                     f'{indices.shape}, {weights.shape}')
  return weights.shape


def _axes(value_axes):
  """(mesh, batch axes, shared: value axes that split the batch too, others: batch axes
  that do not split the table), each in the order of `batch`'s rule."""
  mesh, _ = context.current()
  batch_axes = context.mesh_axes('batch')
  shared = tuple(a for a in batch_axes if a in value_axes)
  others = tuple(a for a in batch_axes if a not in value_axes)
  return mesh, batch_axes, shared, others


def _check_vma(kernels: str) -> bool:
  """Pallas' interpreter cannot yet trace its grid loop with varying-axes checks on (its
  loop carry loses them), so the kernels run with the checks off; a table replicated over
  the others then has its gradient summed by shard_map's own transpose."""
  return kernels == 'xla'


def _gather_tokens(shared, *arrays):
  if not shared:
    return arrays
  return tuple(None if a is None else jax.lax.all_gather(a, shared, axis=0, tiled=True)
               for a in arrays)


def _slice_rows(indices, weights, bags):
  """Indices [T, K] of rows of S slices and weights [T, K, S] -> the slices' rows (`p·S + i`
  for slice i of row p), weights and bags, each [T·S, K] token-major; weights [T, K] (no
  slices) pass through."""
  if weights.ndim == 2:
    return indices, weights, bags
  t, k, s = weights.shape
  rows = indices[:, None] * s + jnp.arange(s)[None, :, None]  # t s k
  if bags is not None:
    bags = jnp.broadcast_to(bags[:, None], rows.shape).reshape(t * s, k)
  return rows.reshape(t * s, k), weights.transpose(0, 2, 1).reshape(t * s, k), bags


def _unslice(out, split):
  """The slices' outputs [T·S, (B,) D/S] -> [T, (B,) D]."""
  if split == 1:
    return out
  t, bags, c = out.shape[0] // split, out.shape[1:-1], out.shape[-1]
  out = out.reshape(t, split, math.prod(bags), c).transpose(0, 2, 1, 3)  # t b s c
  return out.reshape(t, *bags, split * c)


def _padded_tokens(mesh, axes, *arrays):
  """(T, arrays padded along tokens to a multiple of the shards of `axes`, Nones dropped)."""
  t = arrays[0].shape[0]
  pad = -t % math.prod(mesh.shape[a] for a in axes)
  return t, [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays
             if a is not None]
