"""Pallas GPU kernels (Triton backend) for the grouped matmul of dropless MoE.

Rows of `x [M, K]` come in contiguous groups, one expert each (`group_sizes [G]`); group g
multiplies expert g's `w[g] [K, N]`. Both kernels tile the rows in blocks of `block_m`; a
tile may hold the end of one group and the start of the next, so work is listed per
(tile, group) pair, as in megablox: at most `cdiv(M, block_m) + G - 1` pairs, each
masking the tile's rows to its group. Only the FLOPs of the real rows are spent (plus the
shared boundary tiles), where XLA's ragged-dot expansion computes every expert for every
row.

- `gmm`: `out[rows of g] = x[rows of g] @ w[g]` (or `@ w[g].T` with `transpose_rhs`, the
  input gradient). Grid (pairs, column blocks), or (column blocks, pairs) with
  `Tiling.order=1`; each program loops over K in blocks of `block_k` with an fp32
  accumulator. Rows past the last group are zero: they are one more group, whose pairs
  store zeros (so no zeroed buffer is filled first).
- `tgmm`: `out[g] = x[rows of g].T @ dy[rows of g]` (the weight gradient `[G, K, N]`).
  Grid (groups, K blocks, N blocks), or (K blocks, N blocks, groups) with `order=1`; each
  program loops over its group's tiles only (dynamic bounds), so an empty expert costs
  one store of zeros.

Triton blocks have power-of-two sizes; K and N need not be multiples of them (columns past
the edge are masked, e.g. an expert width of 1200 runs as 9 blocks of 128 and a masked
tenth). `interpret=True` runs the same kernels on CPU (the tests do).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt



class Tiling(NamedTuple):
  """Block sizes (powers of two: Triton's), Triton's warps and pipeline stages, and the
  order the programs launch in. The default is a common Hopper choice, not tuned here:
  `benchmarks/moe.py` times others on a GPU.

  `order` (a GPU starts programs in grid order, the first axis fastest): 0, rows first,
  launches every row tile of a column block before the next block, so x is read from
  memory once per column block (at the 680m shape x is 65,536 rows x 1536 in bf16, 201 MB,
  four times an H100's L2, and 1200 columns are 10 blocks); 1, columns first, launches a
  row tile's column blocks together, so x is read once while the expert's weights (3.7
  MB) stay in L2, and the weight gradient runs one expert's blocks together, sharing its
  rows. 0 is what the H200 timed (241-246 TFLOP/s); 1 is what L2 reuse favours, untimed
  until a GPU runs `benchmarks/moe.py`'s table, which times both."""
  block_m: int = 64
  block_n: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3
  order: int = 0

  @property
  def columns_first(self) -> bool:
    return self.order == 1


def _params(tiling: Tiling):
  return plt.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages)


def group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """(starts, ends) of each group's rows, clipped to the M rows there are."""
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends


def schedule(group_sizes: jax.Array, m: int, block_m: int) -> tuple[jax.Array, jax.Array]:
  """The (tile, group) pairs that hold rows, group-major, padded to the static bound
  `cdiv(m, block_m) + G - 1`: (tile [P], group [P]); padding pairs have group G (none)."""
  num_groups = group_sizes.shape[0]
  starts, ends = group_bounds(group_sizes, m)
  first = starts // block_m
  tiles = jnp.where(ends > starts, (ends - 1) // block_m - first + 1, 0)  # g
  offsets = jnp.cumsum(tiles)
  pair = jnp.arange(pl.cdiv(m, block_m) + num_groups - 1, dtype=jnp.int32)
  group = jnp.searchsorted(offsets, pair, side='right').astype(jnp.int32)  # G: padding
  g = jnp.minimum(group, num_groups - 1)
  tile = jnp.where(group < num_groups, first[g] + pair - (offsets[g] - tiles[g]), 0)
  return tile.astype(jnp.int32), group


def _span(start, block: int, limit: int):
  """The block of a dimension of `limit` elements at `start`: its slice and live mask."""
  start = pl.multiple_of(start, block)
  return pl.ds(start, block), start + jnp.arange(block) < limit


def _rows(tile, block_m: int, start, end):
  """Row tile `tile`: its slice and which of its rows are in the group [start, end)."""
  row0 = pl.multiple_of(tile * block_m, block_m)
  row_ids = row0 + jnp.arange(block_m)
  return pl.ds(row0, block_m), (row_ids >= start) & (row_ids < end)


def _grid(sizes: tuple[int, ...], columns_first: bool) -> tuple[int, ...]:
  """The launch grid of `sizes` (rows or groups first): with `columns_first` the first
  axis moves to the end, the slowest (a GPU launches the first axis fastest)."""
  return (*sizes[1:], sizes[0]) if columns_first else sizes


def _program_ids(rank: int, columns_first: bool) -> tuple:
  """This program's index along each axis of `_grid`'s `sizes`, in their order."""
  ids = tuple(pl.program_id(i) for i in range(rank))
  return (ids[-1], *ids[:-1]) if columns_first else ids


def _gmm_kernel(tile_ref, group_ref, starts_ref, ends_ref, x_ref, w_ref, out_ref, *, k: int,
                n: int, num_groups: int, block_m: int, block_n: int, block_k: int,
                transpose_rhs: bool, columns_first: bool):
  pair, col_block = _program_ids(2, columns_first)  # (read outside `when`: interpret)
  group = group_ref[pair]  # num_groups + 1: a padding pair, which writes nothing
  bounds = jnp.minimum(group, num_groups)  # (starts and ends hold num_groups + 1 groups)
  rows, live = _rows(tile_ref[pair], block_m, starts_ref[bounds], ends_ref[bounds])
  cols, col_ok = _span(col_block * block_n, block_n, n)

  @pl.when(group == num_groups)  # rows past the last group: zeros
  def _():
    plt.store(out_ref.at[rows, cols], jnp.zeros((block_m, block_n), out_ref.dtype),
              mask=live[:, None] & col_ok[None, :])

  @pl.when(group < num_groups)
  def _():
    def step(i, acc):
      inner, inner_ok = _span(i * block_k, block_k, k)
      a = plt.load(x_ref.at[rows, inner], mask=live[:, None] & inner_ok[None, :], other=0)
      if transpose_rhs:  # w[g] is [N, K]
        b = plt.load(w_ref.at[group, cols, inner], mask=col_ok[:, None] & inner_ok[None, :],
                     other=0)
      else:
        b = plt.load(w_ref.at[group, inner, cols], mask=inner_ok[:, None] & col_ok[None, :],
                     other=0)
      return acc + plt.dot(a, b, trans_b=transpose_rhs).astype(jnp.float32)

    acc = jax.lax.fori_loop(0, pl.cdiv(k, block_k), step,
                            jnp.zeros((block_m, block_n), jnp.float32))
    plt.store(out_ref.at[rows, cols], acc.astype(out_ref.dtype),
              mask=live[:, None] & col_ok[None, :])


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
        tiling: Tiling = Tiling(), interpret: bool = False) -> jax.Array:
  """x [M, K], w [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N] in x's dtype."""
  m, k = x.shape
  num_groups = w.shape[0]
  n = w.shape[1] if transpose_rhs else w.shape[2]
  # The rows past the last group are one more group, G, whose pairs write zeros: every row
  # is written once, so the output needs no zeroed [M, N] buffer filled before each call.
  sizes = group_sizes.astype(jnp.int32)
  sizes = jnp.concatenate([sizes, jnp.maximum(m - jnp.sum(sizes), 0)[None]])
  tile, group = schedule(sizes, m, tiling.block_m)
  starts, ends = group_bounds(sizes, m)
  kernel = functools.partial(_gmm_kernel, k=k, n=n, num_groups=num_groups,
                             block_m=tiling.block_m, block_n=tiling.block_n,
                             block_k=tiling.block_k, transpose_rhs=transpose_rhs,
                             columns_first=tiling.columns_first)
  grid = _grid((tile.shape[0], pl.cdiv(n, tiling.block_n)), tiling.columns_first)
  return pl.pallas_call(
      kernel, grid=grid,
      out_shape=jax.ShapeDtypeStruct((m, n), x.dtype), compiler_params=_params(tiling),
      interpret=interpret, name='grouped_matmul',
  )(tile, group, starts, ends, x, w)


def _tgmm_kernel(starts_ref, ends_ref, x_ref, dy_ref, out_ref, *, k: int, n: int,
                 block_m: int, block_n: int, block_k: int, columns_first: bool):
  group, inner_block, col_block = _program_ids(3, columns_first)
  start, end = starts_ref[group], ends_ref[group]
  inner, inner_ok = _span(inner_block * block_k, block_k, k)
  cols, col_ok = _span(col_block * block_n, block_n, n)

  def step(t, acc):
    rows, live = _rows(t, block_m, start, end)
    a = plt.load(x_ref.at[rows, inner], mask=live[:, None] & inner_ok[None, :], other=0)
    b = plt.load(dy_ref.at[rows, cols], mask=live[:, None] & col_ok[None, :], other=0)
    return acc + plt.dot(a, b, trans_a=True).astype(jnp.float32)  # [bk, bn]

  first = start // block_m
  stop = jnp.where(end > start, (end - 1) // block_m + 1, first)
  acc = jax.lax.fori_loop(first, stop, step, jnp.zeros((block_k, block_n), jnp.float32))
  plt.store(out_ref.at[group, inner, cols], acc.astype(out_ref.dtype),
            mask=inner_ok[:, None] & col_ok[None, :])


def tgmm(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *, out_dtype=None,
         tiling: Tiling = Tiling(), interpret: bool = False) -> jax.Array:
  """x [M, K], dy [M, N] -> [G, K, N]: per group, its rows of x transposed times dy's."""
  m, k = x.shape
  n = dy.shape[1]
  num_groups = group_sizes.shape[0]
  starts, ends = group_bounds(group_sizes, m)
  kernel = functools.partial(_tgmm_kernel, k=k, n=n, block_m=tiling.block_m,
                             block_n=tiling.block_n, block_k=tiling.block_k,
                             columns_first=tiling.columns_first)
  grid = _grid((num_groups, pl.cdiv(k, tiling.block_k), pl.cdiv(n, tiling.block_n)),
               tiling.columns_first)
  return pl.pallas_call(
      kernel, grid=grid,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype or x.dtype),
      compiler_params=_params(tiling), interpret=interpret,
      name='grouped_matmul_weight_grad',
  )(starts, ends, x, dy)
