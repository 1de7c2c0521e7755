"""Pallas GPU kernels (Triton backend) for the sparse value lookup.

Triton blocks must have power-of-two sizes, so columns are split into blocks of
`BD` = the largest power of two ≤ 256 dividing D (D is a multiple of 64): D = 384 runs
as 3 column blocks of 128, with no padding read.

- `forward`: grid (token blocks, bags, column blocks). A program keeps a `[BT, BD]` fp32
  accumulator and loops over the K slots; each slot gathers the BT row slices
  `values[idx[:, k], d0:d0+BD]` with one vector load. Slots with weight 0 (padding,
  entries another device owns, tokens past T) and, with bags, those of other bags are
  masked out of the load, so they cost no memory traffic.
- `grad_weights`: grid over token blocks; per slot, a gather-dot `<g[t], values[idx]>`
  summed over the column blocks.
- `grad_values`, `scatter='atomic'`: one program per token, fp32 atomic adds of
  `w · g[t]` into the rows it read. Fast, but the order of the sums (and so the last bits)
  varies from run to run.
- `grad_values`, `scatter='sorted'`: the T·K (row, token, weight) entries are sorted by
  row in XLA (those of weight 0 last, in no run: `sorted_runs`); a persistent grid of
  programs strides over the runs of equal rows, each sums its run's `w · g[token]` in
  fp32 and writes its row once. Deterministic, no atomics, written directly in the
  table's dtype. Untouched rows keep the zeros of the aliased output buffer. A row read
  by very many tokens is still one program's serial sum.

With bags, an entry's output gradient is the row `bag` of its token's `[B, D]` (`g` viewed
as `[T, B·D]`, or as `[T·B, D]` rows `token·B + bag` for the sorted scatter).

`interpret=True` runs the same kernels on CPU (the tests do). Inputs are validated by
the caller: indices int32 in `[0, N)`, weights fp32, D a multiple of 64.

An entry of weight 0 is skipped: a NaN or Inf in its row does not reach the output, nor
one in its token's output gradient the table gradient, where the XLA reference computes
0 · NaN.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

BLOCK_T = 16  # tokens per program of the gather kernels
BLOCK_E = 32  # sorted entries summed per vector step of the segment kernel
MAX_PROGRAMS = 4096  # persistent programs striding over the sorted runs
NUM_WARPS = 4


def column_block(d: int) -> int:
  """The largest power of two ≤ 256 that divides d."""
  return min(256, d & -d)


def _params():
  return plt.CompilerParams(num_warps=NUM_WARPS, num_stages=2)


def _token_block(num_tokens: int, block_t: int):
  """This program's slice of the tokens, and which of its rows are real (T is ragged)."""
  start = pl.program_id(0) * block_t
  return pl.ds(start, block_t), start + jnp.arange(block_t) < num_tokens


def _columns(j, block_d: int):
  return pl.ds(pl.multiple_of(j * block_d, block_d), block_d)


def _column_ids(j, block_d: int):
  """Column block j as an index vector, for gathers `ref.at[rows[:, None], cols[None]]`."""
  return j * block_d + jnp.arange(block_d)


def _pop_bags(refs: list, bags: bool):
  """The kernels' `bags_ref` comes first of the refs after the indices (and weights)."""
  return refs.pop(0) if bags else None


def _forward_kernel(*refs, num_slots: int, num_tokens: int, block_t: int, block_d: int,
                    num_col_blocks: int, bags: bool):
  indices_ref, weights_ref, *refs = refs
  bags_ref = _pop_bags(refs, bags)
  values_ref, out_ref = refs
  rows, live = _token_block(num_tokens, block_t)
  bag, j = pl.program_id(1), pl.program_id(2)
  col_ids = _column_ids(j, block_d)

  def slot(k, acc):
    idx = plt.load(indices_ref.at[rows, k], mask=live, other=0)  # bt
    w = plt.load(weights_ref.at[rows, k], mask=live, other=0.0)  # bt
    if bags:
      w = jnp.where(plt.load(bags_ref.at[rows, k], mask=live, other=0) == bag, w, 0.0)
    hit = (w != 0.0)[:, None]
    vals = plt.load(values_ref.at[idx[:, None], col_ids[None, :]], mask=hit, other=0.0)  # bt bd
    return acc + w[:, None] * vals.astype(jnp.float32)

  acc = jax.lax.fori_loop(0, num_slots, slot, jnp.zeros((block_t, block_d), jnp.float32))
  out_cols = _columns(bag * num_col_blocks + j, block_d)  # out is [T, B·D]
  plt.store(out_ref.at[rows, out_cols], acc.astype(out_ref.dtype), mask=live[:, None])


def forward(values: jax.Array, indices: jax.Array, weights: jax.Array, *,
            bags: jax.Array | None = None, num_bags: int = 1,
            interpret: bool = False) -> jax.Array:
  """values [N, D], indices/weights [T, K] -> [T, D] (with bags [T, K]: [T, B, D]) in
  values' dtype."""
  _, d = values.shape
  t, k = indices.shape
  block_d = column_block(d)
  kernel = functools.partial(_forward_kernel, num_slots=k, num_tokens=t, block_t=BLOCK_T,
                             block_d=block_d, num_col_blocks=d // block_d,
                             bags=bags is not None)
  out = pl.pallas_call(
      kernel, grid=(pl.cdiv(t, BLOCK_T), num_bags, d // block_d),
      out_shape=jax.ShapeDtypeStruct((t, num_bags * d), values.dtype),
      compiler_params=_params(), interpret=interpret, name='sparse_lookup_forward',
  )(indices, weights, *([] if bags is None else [bags]), values)
  return out if bags is None else out.reshape(t, num_bags, d)


def _grad_weights_kernel(*refs, num_slots: int, num_tokens: int, block_t: int, block_d: int,
                         num_col_blocks: int, bags: bool):
  indices_ref, *refs = refs
  bags_ref = _pop_bags(refs, bags)
  values_ref, g_ref, grad_w_ref = refs
  rows, live = _token_block(num_tokens, block_t)
  row_ids = pl.program_id(0) * block_t + jnp.arange(block_t)

  def slot(k, carry):
    idx = plt.load(indices_ref.at[rows, k], mask=live, other=0)  # bt
    if bags:  # g is [T, B·D]: this entry's bag's columns
      bag = plt.load(bags_ref.at[rows, k], mask=live, other=0)  # bt
      bag_start = bag * (num_col_blocks * block_d)

    def col(j, dot):
      col_ids = _column_ids(j, block_d)
      if bags:
        g = plt.load(g_ref.at[row_ids[:, None], bag_start[:, None] + col_ids[None, :]],
                     mask=live[:, None], other=0.0)
      else:
        g = plt.load(g_ref.at[rows, _columns(j, block_d)], mask=live[:, None], other=0.0)
      vals = plt.load(values_ref.at[idx[:, None], col_ids[None, :]])  # bt bd
      return dot + jnp.sum(g * vals.astype(jnp.float32), axis=1)

    dot = jax.lax.fori_loop(0, num_col_blocks, col, jnp.zeros((block_t,), jnp.float32))
    plt.store(grad_w_ref.at[rows, k], dot, mask=live)
    return carry

  jax.lax.fori_loop(0, num_slots, slot, 0)


def grad_weights(values: jax.Array, indices: jax.Array, g: jax.Array, *,
                 bags: jax.Array | None = None, interpret: bool = False) -> jax.Array:
  """grad_weights[t, k] = <g[t], values[indices[t, k]]> (with bags, g [T, B, D]:
  <g[t, bags[t, k]], ...>): [T, K] fp32."""
  _, d = values.shape
  t, k = indices.shape
  block_d = column_block(d)
  kernel = functools.partial(_grad_weights_kernel, num_slots=k, num_tokens=t,
                             block_t=BLOCK_T, block_d=block_d, num_col_blocks=d // block_d,
                             bags=bags is not None)
  return pl.pallas_call(
      kernel, grid=(pl.cdiv(t, BLOCK_T),),
      out_shape=jax.ShapeDtypeStruct((t, k), jnp.float32),
      compiler_params=_params(), interpret=interpret, name='sparse_lookup_grad_weights',
  )(indices, *([] if bags is None else [bags]), values, g.reshape(t, -1))


def _scatter_atomic_kernel(*refs, num_slots: int, block_d: int, num_col_blocks: int,
                           bags: bool):
  indices_ref, weights_ref, *refs = refs
  bags_ref = _pop_bags(refs, bags)
  g_ref, _, grad_ref = refs  # the zeros are aliased to grad_ref
  token = pl.program_id(0)

  def slot(k, carry):
    idx = indices_ref[token, k]
    w = weights_ref[token, k]
    first_block = bags_ref[token, k] * num_col_blocks if bags else 0  # g is [T, B·D]

    @pl.when(w != 0.0)
    def _():
      def col(j, carry):
        g = g_ref[token, _columns(first_block + j, block_d)]
        plt.atomic_add(grad_ref, (idx, _columns(j, block_d)), w * g)
        return carry

      jax.lax.fori_loop(0, num_col_blocks, col, 0)

    return carry

  jax.lax.fori_loop(0, num_slots, slot, 0)


def _scatter_atomic(indices, weights, bags, g, num_rows, interpret):
  t, k = indices.shape
  d = g.shape[-1]
  block_d = column_block(d)
  kernel = functools.partial(_scatter_atomic_kernel, num_slots=k, block_d=block_d,
                             num_col_blocks=d // block_d, bags=bags is not None)
  inputs = [indices, weights, *([] if bags is None else [bags]), g.reshape(t, -1)]
  return pl.pallas_call(
      kernel, grid=(t,), out_shape=jax.ShapeDtypeStruct((num_rows, d), jnp.float32),
      input_output_aliases={len(inputs): 0}, compiler_params=_params(), interpret=interpret,
      name='sparse_lookup_scatter_atomic',
  )(*inputs, jnp.zeros((num_rows, d), jnp.float32))


def _scatter_sorted_kernel(num_runs_ref, run_starts_ref, rows_ref, tokens_ref, weights_ref,
                           g_ref, zeros_ref, grad_ref, *, num_programs: int, block_e: int,
                           block_d: int):
  del zeros_ref  # aliased to grad_ref: untouched rows stay zero
  program = pl.program_id(0)
  cols = _columns(pl.program_id(1), block_d)
  col_ids = _column_ids(pl.program_id(1), block_d)
  num_runs = num_runs_ref[0]

  def run(r, carry):
    start = run_starts_ref[r]
    end = run_starts_ref[r + 1]

    def step(s, acc):
      entries = start + s * block_e + jnp.arange(block_e)
      live = entries < end
      entries = jnp.where(live, entries, start)
      tokens = plt.load(tokens_ref.at[entries])  # be
      w = jnp.where(live, plt.load(weights_ref.at[entries]), 0.0)  # be
      g = plt.load(g_ref.at[tokens[:, None], col_ids[None, :]], mask=(w != 0.0)[:, None], other=0.0)  # be bd
      return acc + jnp.sum(w[:, None] * g, axis=0)

    acc = jax.lax.fori_loop(0, pl.cdiv(end - start, block_e), step,
                            jnp.zeros((block_d,), jnp.float32))
    grad_ref[rows_ref[start], cols] = acc.astype(grad_ref.dtype)
    return carry

  # Runs program, program + P, program + 2P, ... (a persistent grid of P programs).
  jax.lax.fori_loop(0, pl.cdiv(num_runs - program, num_programs),
                    lambda i, c: run(program + i * num_programs, c), 0)


def sorted_runs(indices: jax.Array, weights: jax.Array, num_rows: int):
  """The T·K entries sorted by row, in runs of one row each: (order [T·K], rows [T·K],
  run_starts [T·K + 1], num_runs [1]); run r is entries run_starts[r]:run_starts[r + 1].

  Entries of weight 0 add nothing, so they sort after every row (key `num_rows`) and form
  no run. There are many: a sharded table sends every index another device owns to row 0
  with weight 0 (`sparse_lookup.sharded_sparse_lookup`). As one run they would make one
  program per column block sum them all, serially.
  """
  entries = indices.size
  live = weights.reshape(-1) != 0
  keys = jnp.where(live, indices.reshape(-1), num_rows)
  order = jnp.argsort(keys, stable=True)
  rows = keys[order]
  first = jnp.concatenate([jnp.ones((1,), bool), rows[1:] != rows[:-1]]) & (rows < num_rows)
  num_live = jnp.sum(live, dtype=jnp.int32)  # the last run ends where the dead entries start
  run_starts = jnp.nonzero(first, size=entries + 1, fill_value=num_live)[0].astype(jnp.int32)
  return order, rows, run_starts, jnp.sum(first, dtype=jnp.int32)[None]


def _scatter_sorted(indices, weights, bags, g, num_rows, dtype, interpret):
  t, k = indices.shape
  d = g.shape[-1]
  entries = t * k
  order, rows, run_starts, num_runs = sorted_runs(indices, weights, num_rows)
  targets = order // k  # the entries' rows of g: tokens, or with bags token·B + bag
  if bags is not None:
    targets = targets * g.shape[1] + bags.reshape(-1)[order]
  block_d = column_block(d)
  num_programs = min(entries, MAX_PROGRAMS)
  kernel = functools.partial(_scatter_sorted_kernel, num_programs=num_programs,
                             block_e=BLOCK_E, block_d=block_d)
  return pl.pallas_call(
      kernel, grid=(num_programs, d // block_d),
      out_shape=jax.ShapeDtypeStruct((num_rows, d), dtype),
      input_output_aliases={6: 0}, compiler_params=_params(), interpret=interpret,
      name='sparse_lookup_scatter_sorted',
  )(num_runs, run_starts, rows, targets.astype(jnp.int32), weights.reshape(-1)[order],
    g.reshape(-1, d), jnp.zeros((num_rows, d), dtype))


def backward(values: jax.Array, indices: jax.Array, weights: jax.Array, g: jax.Array, *,
             bags: jax.Array | None = None, scatter: str = 'sorted',
             interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """-> (grad_values [N, D], grad_weights [T, K] fp32); g is fp32 [T, D] (with bags
  [T, B, D]).

  grad_values is fp32 for `scatter='atomic'` (atomics need it) and values' dtype for
  `scatter='sorted'` (each row is written once, from an fp32 sum).
  """
  n = values.shape[0]
  grad_w = grad_weights(values, indices, g, bags=bags, interpret=interpret)
  if scatter == 'atomic':
    return _scatter_atomic(indices, weights, bags, g, n, interpret), grad_w
  return _scatter_sorted(indices, weights, bags, g, n, values.dtype, interpret), grad_w
