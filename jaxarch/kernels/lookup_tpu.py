"""Pallas TPU (Mosaic) kernels for the embedding-bag and its VJP.

`out[t] = Σ_k weights[t, k] · values[indices[t, k]]`; the table never leaves HBM
(`memory_space=pl.ANY`) and no `[T, K, D]` tensor is ever built. Accumulation is fp32.

- **Gather** (forward and `grad_weights`): tokens go in blocks of `tb` (≤ 8) per grid
  step. The indices are scalar-prefetched into SMEM; each `(t, k)` row is its own DMA
  from HBM into a VMEM buffer `[2, tb, S, D]`, double-buffered: step `i` starts the DMAs
  of block `i + 1` before it waits for, and reduces, block `i` on the VPU. A 16-bit
  table packs row pairs into 32-bit words, so it is fetched as the aligned pair that
  holds the row (an odd N gets one pad row) and the wrapper's per-slot weights (0 for
  the other row of the pair and for the padding slots up to S) pick the row.
- **Scatter** (`grad_values`, TPU has no atomics): the wrapper sorts the flat `(row,
  entry)` pairs (`argsort`). A sequential grid walks the sorted entries in blocks of
  `eb`: it DMAs the rows of `g` by token id (double-buffered), scales them by the
  weights, sums the runs of equal rows with a masked segment-sum on the MXU (exact: the
  0/1 mask times a 3-way bf16 split of the fp32 rows) and writes each finished run with
  one DMA into the HBM output, which aliases a zero buffer (every row is written at most
  once, so no read-modify-write). A run open at the end of a block or call carries over.
- **SMEM bound**: the scalar-prefetched arrays of one `pallas_call` hold at most
  `SMEM_WORDS` (2^15 words, 128 KiB of the 1 MiB of TPU v4+); longer inputs are split
  into equal chunks that a `lax.map` / `lax.scan` runs as one call each (the scatter
  carries its output and its open run from call to call).
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

SMEM_WORDS = 1 << 15  # scalar-prefetch words per pallas_call (TPU v4+ SMEM: 1 MiB)
VMEM_BUDGET = 4 << 20  # bytes of the double-buffered row buffers
MAX_BLOCK_TOKENS = 8
MAX_BLOCK_ENTRIES = 64  # the scatter's segment-sum is [eb, eb] @ [eb, D]
_LANES = 128


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _packing(dtype) -> int:
  """Table rows sharing one 32-bit word of a TPU tile: 1 for 32-bit, 2 for 16-bit types.

  Mosaic DMAs whole words, so a 16-bit table is fetched as aligned pairs of rows.
  """
  return max(1, 4 // jnp.dtype(dtype).itemsize)


def _compiler_params(vmem_bytes: int) -> pltpu.CompilerParams:
  """Sequential grid (the DMA pipeline crosses steps); raise the VMEM limit if needed."""
  limit = None if vmem_bytes <= (12 << 20) else min(vmem_bytes + (8 << 20), 100 << 20)
  return pltpu.CompilerParams(dimension_semantics=('arbitrary',), vmem_limit_bytes=limit)


def _split(n: int, per_call: int) -> tuple[int, int]:
  """n units, at most per_call per call -> (calls, units per call), balanced."""
  calls = -(-n // max(1, per_call))
  return calls, -(-n // calls)


def _map_calls(call, xs, calls: int):
  """call(*x) on each of `calls` stacked chunks; one pallas_call when calls == 1."""
  if calls == 1:
    return jax.tree.map(lambda a: a[None], call(*[x[0] for x in xs]))
  return lax.map(lambda x: call(*x), xs)


# ---------------------------------------------------------------------------- gather


def _gather_rows(idx_ref, values_hbm, buf, sem, block, slot, *, k: int, pack: int,
                 start: bool):
  """Starts (or waits for) the DMAs of token block `block`'s rows into buf[slot].

  Entry (t, j) lands in buf[slot, t, pack·j : pack·(j + 1)]: the aligned group of `pack`
  rows that holds row indices[t, j].
  """
  tb = buf.shape[1]

  def one(e, carry):
    t, j = lax.div(e, k), lax.rem(e, k)  # (no floor division: it lowers via sign)
    if start:
      row = idx_ref[block * (tb * k) + e]
      first, slot_row = row, j
      if pack > 1:
        first = pl.multiple_of(row - lax.rem(row, pack), pack)
        slot_row = pl.multiple_of(j * pack, pack)
      pltpu.make_async_copy(values_hbm.at[pl.ds(first, pack)],
                            buf.at[slot, t, pl.ds(slot_row, pack)], sem.at[slot]).start()
    else:  # a wait only needs the byte count of one copy
      pltpu.make_async_copy(values_hbm.at[pl.ds(0, pack)], buf.at[slot, 0, pl.ds(0, pack)],
                            sem.at[slot]).wait()
    return carry

  lax.fori_loop(0, tb * k, one, 0)


def _pipelined_block(idx_ref, values_hbm, buf, sem, *, k: int, pack: int):
  """Double-buffered fetch of this step's rows -> the buffer slot that holds them.

  Slots past pack·k are never written: the kernels mask them out by their zero weight.
  """
  i, steps = pl.program_id(0), pl.num_programs(0)
  slot = lax.rem(i, 2)
  fetch = functools.partial(_gather_rows, idx_ref, values_hbm, buf, sem, k=k, pack=pack)

  @pl.when(i == 0)
  def _():
    fetch(0, 0, start=True)

  @pl.when(i + 1 < steps)
  def _():
    fetch(i + 1, 1 - slot, start=True)

  fetch(i, slot, start=False)
  return slot


def _forward_kernel(idx_ref, w_ref, values_hbm, out_ref, buf, sem, *, k: int, pack: int):
  """out[t] = Σ_s w[s, t] · rows[t, s] for the tb tokens of this step.

  A select rather than a product drops the slots of weight 0 (VMEM that was never
  written, the other row of a fetched pair), whatever they hold.
  """
  slot = _pipelined_block(idx_ref, values_hbm, buf, sem, k=k, pack=pack)
  for t in range(buf.shape[1]):
    rows = buf[slot, t].astype(jnp.float32)  # s d
    w = w_ref[:, t:t + 1]  # s 1
    out_ref[t:t + 1, :] = jnp.sum(jnp.where(w != 0.0, rows * w, 0.0), axis=0,
                                  keepdims=True)


def _grad_weights_kernel(idx_ref, g_ref, values_hbm, gw_ref, buf, sem, *, k: int,
                         pack: int):
  """gw[s, t] = <g[t], rows[t, s]> for the tb tokens of this step (the wrapper picks s)."""
  slot = _pipelined_block(idx_ref, values_hbm, buf, sem, k=k, pack=pack)
  for t in range(buf.shape[1]):
    rows = buf[slot, t].astype(jnp.float32)  # s d
    gw_ref[:, t:t + 1] = jnp.sum(rows * g_ref[t:t + 1, :], axis=1, keepdims=True)


def _gather_plan(values, t: int, k: int, smem_words: int, block_tokens: int | None):
  """-> (tb, slots per token, calls, blocks per call, buffer bytes)."""
  d = values.shape[1]
  slots = _packing(values.dtype) * _round_up(k, 8)  # a whole number of sublane tiles
  per_token = 2 * slots * _round_up(d, _LANES) * values.dtype.itemsize
  tb = block_tokens or max(1, min(MAX_BLOCK_TOKENS, VMEM_BUDGET // per_token))
  tb = min(tb, t)
  calls, blocks = _split(-(-t // tb), smem_words // (tb * k))
  return tb, slots, calls, blocks, tb * per_token


def _gather_setup(values, indices, smem_words: int, block_tokens: int | None):
  """-> (the table with whole row pairs, rows per packed pair, the gather plan)."""
  values = _even_rows(values)
  plan = _gather_plan(values, *indices.shape, smem_words, block_tokens)
  return values, _packing(values.dtype), plan


def _even_rows(values):
  """A 16-bit table with an odd row count gets a zero row, so that pairs stay aligned."""
  pad = -values.shape[0] % _packing(values.dtype)
  return jnp.pad(values, ((0, pad), (0, 0))) if pad else values


def _gather_call(kernel, values, idx, x, x_spec, out_shape, out_spec, *, k: int, tb: int,
                 slots: int, buf_bytes: int, interpret):
  """One pallas_call over the token blocks whose indices are `idx` (flat, in SMEM)."""
  lane_bytes = lambda shape: 4 * shape[-2] * _round_up(shape[-1], _LANES)
  block_bytes = 2 * (lane_bytes(x_spec.block_shape) + lane_bytes(out_spec.block_shape))
  return pl.pallas_call(
      functools.partial(kernel, k=k, pack=_packing(values.dtype)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(x.shape[0],),
          in_specs=[x_spec, pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=out_spec,
          scratch_shapes=[pltpu.VMEM((2, tb, slots, values.shape[1]), values.dtype),
                          pltpu.SemaphoreType.DMA((2,))]),
      out_shape=out_shape,
      compiler_params=_compiler_params(buf_bytes + block_bytes),
      interpret=interpret,
  )(idx, x, values)


def _token_blocks(indices, tpad: int, calls: int):
  """[T, K] -> the flat int32 indices of each call [calls, T' K / calls], T padded."""
  t, _ = indices.shape
  return jnp.pad(indices.astype(jnp.int32), ((0, tpad - t), (0, 0))).reshape(calls, -1)


@functools.partial(jax.jit, static_argnames=('interpret', 'smem_words', 'block_tokens'))
def _forward(values, indices, weights, *, interpret, smem_words, block_tokens):
  t, k = indices.shape
  d = values.shape[1]
  values, pack, (tb, slots, calls, blocks, buf_bytes) = _gather_setup(
      values, indices, smem_words, block_tokens)
  tpad = calls * blocks * tb
  # The weight of slot pack·j + p is weights[t, j] if row indices[t, j] is the p-th of
  # its fetched group, else 0.
  hit = lax.rem(indices, pack)[..., None] == jnp.arange(pack)  # t k p
  w = jnp.where(hit, weights.astype(jnp.float32)[..., None], 0.0).reshape(t, k * pack)
  w = jnp.pad(w, ((0, tpad - t), (0, slots - k * pack)))
  w = w.reshape(calls, blocks, tb, slots).transpose(0, 1, 3, 2)  # c b s tb

  def call(idx_c, w_c):
    return _gather_call(
        _forward_kernel, values, idx_c, w_c,
        pl.BlockSpec((None, slots, tb), lambda i, *_: (i, 0, 0)),
        jax.ShapeDtypeStruct((blocks, tb, d), jnp.float32),
        pl.BlockSpec((None, tb, d), lambda i, *_: (i, 0, 0)),
        k=k, tb=tb, slots=slots, buf_bytes=buf_bytes, interpret=interpret)

  out = _map_calls(call, (_token_blocks(indices, tpad, calls), w), calls)  # c b tb d
  return out.reshape(tpad, d)[:t]


def _grad_weights(values, indices, g, *, interpret, smem_words, block_tokens):
  t, k = indices.shape
  d = values.shape[1]
  values, pack, (tb, slots, calls, blocks, buf_bytes) = _gather_setup(
      values, indices, smem_words, block_tokens)
  tpad = calls * blocks * tb
  gb = jnp.pad(g, ((0, tpad - t), (0, 0))).reshape(calls, blocks, tb, d)

  def call(idx_c, g_c):
    return _gather_call(
        _grad_weights_kernel, values, idx_c, g_c,
        pl.BlockSpec((None, tb, d), lambda i, *_: (i, 0, 0)),
        jax.ShapeDtypeStruct((blocks, slots, tb), jnp.float32),
        pl.BlockSpec((None, slots, tb), lambda i, *_: (i, 0, 0)),
        k=k, tb=tb, slots=slots, buf_bytes=buf_bytes, interpret=interpret)

  gw = _map_calls(call, (_token_blocks(indices, tpad, calls), gb), calls)  # c b s tb
  gw = gw.transpose(0, 1, 3, 2).reshape(tpad, slots)[:t, :k * pack].reshape(t, k, pack)
  return jnp.take_along_axis(gw, lax.rem(indices, pack)[..., None], axis=-1)[..., 0]


# --------------------------------------------------------------------------- scatter


def _segment_sum(keys_col, keys_row, x):
  """Inclusive running sum of x's rows within runs of equal keys (keys sorted).

  The 0/1 mask is exact in bf16 and x is split into three bf16 parts whose sum is x, so
  the MXU's bf16 products are exact and only the fp32 accumulation rounds.
  """
  eb = x.shape[0]
  after = (lax.broadcasted_iota(jnp.int32, (eb, eb), 0)
           >= lax.broadcasted_iota(jnp.int32, (eb, eb), 1))
  mask = ((keys_col == keys_row) & after).astype(jnp.bfloat16)  # j i: i <= j, same row
  hi = x.astype(jnp.bfloat16)
  rest = x - hi.astype(jnp.float32)
  mid = rest.astype(jnp.bfloat16)
  lo = (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)
  return sum(jnp.dot(mask, part, preferred_element_type=jnp.float32)
             for part in (hi, mid, lo))


def _scatter_kernel(rows_ref, tok_ref, w_ref, key_col_ref, key_row_ref, acc_in_ref, g_hbm,
                    grad_in_hbm, grad_hbm, acc_ref, gbuf, stage, in_sem, out_sem,
                    count_ref):
  """One block of sorted entries: sum runs of equal rows, write each finished run.

  rows_ref [C + 2] holds the sorted rows of this call's C entries with the row before
  them and the row after them (-1 at the ends); tok_ref [C] their tokens. acc carries
  the partial sum of the run that is still open after the last entry processed.
  """
  del grad_in_hbm  # aliased to grad_hbm
  i, steps = pl.program_id(0), pl.num_programs(0)
  slot = lax.rem(i, 2)
  eb = gbuf.shape[1]

  def fetch(block, slot):
    def one(j, carry):
      tok = tok_ref[block * eb + j]
      pltpu.make_async_copy(g_hbm.at[pl.ds(tok, 1)], gbuf.at[slot, pl.ds(j, 1)],
                            in_sem.at[slot]).start()
      return carry
    lax.fori_loop(0, eb, one, 0)

  def wait_fetch(slot):
    def one(_, carry):
      pltpu.make_async_copy(g_hbm.at[pl.ds(0, 1)], gbuf.at[slot, pl.ds(0, 1)],
                            in_sem.at[slot]).wait()
      return carry
    lax.fori_loop(0, eb, one, 0)

  def wait_writes(slot):
    def one(_, carry):
      pltpu.make_async_copy(stage.at[slot, pl.ds(0, 1)], grad_hbm.at[pl.ds(0, 1)],
                            out_sem.at[slot]).wait()
      return carry
    lax.fori_loop(0, count_ref[slot], one, 0)
    count_ref[slot] = 0

  @pl.when(i == 0)
  def _():
    count_ref[0] = 0
    count_ref[1] = 0
    acc_ref[...] = acc_in_ref[...]
    fetch(0, 0)

  @pl.when(i + 1 < steps)
  def _():
    fetch(i + 1, 1 - slot)

  wait_writes(slot)  # stage[slot] is free once the writes of step i - 2 are done
  wait_fetch(slot)
  keys = key_col_ref[...]  # eb 1
  x = w_ref[...] * gbuf[slot]  # eb d
  run = _segment_sum(keys, key_row_ref[...], x)
  run = run + jnp.where(keys == rows_ref[i * eb], acc_ref[...], 0.0)  # open run
  stage[slot] = run
  acc_ref[...] = run[eb - 1:eb, :]

  def flush(j, count):
    p = i * eb + j
    row, after = rows_ref[p + 1], rows_ref[p + 2]

    @pl.when(row != after)
    def _():
      pltpu.make_async_copy(stage.at[slot, pl.ds(j, 1)], grad_hbm.at[pl.ds(row, 1)],
                            out_sem.at[slot]).start()

    return count + (row != after).astype(jnp.int32)

  count_ref[slot] = lax.fori_loop(0, eb, flush, jnp.int32(0))

  @pl.when(i == steps - 1)
  def _():
    wait_writes(0)
    wait_writes(1)


def _grad_values(n: int, indices, weights, g, *, interpret, smem_words, block_entries):
  t, k = indices.shape
  d = g.shape[1]
  e = t * k
  dp = _round_up(d, _LANES)
  eb = block_entries or max(8, min(MAX_BLOCK_ENTRIES, VMEM_BUDGET // (16 * dp)) // 8 * 8)
  calls, blocks = _split(-(-e // eb), (smem_words // 2) // eb)
  c = blocks * eb  # entries per call
  epad = calls * c

  flat = indices.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True)
  # Padding sorts last: row n-1, weight 0, token 0.
  rows = jnp.pad(flat[order], (0, epad - e), constant_values=n - 1)
  tok = jnp.pad((order // k).astype(jnp.int32), (0, epad - e))
  w = jnp.pad(weights.reshape(-1).astype(jnp.float32)[order], (0, epad - e))
  ext = jnp.pad(rows, (1, 1), constant_values=-1)
  rows_ext = ext[jnp.arange(calls)[:, None] * c + jnp.arange(c + 2)]  # calls c+2

  col = lambda a: a.reshape(calls, blocks, eb, 1)
  xs = (rows_ext, tok.reshape(calls, c), col(w), col(rows), rows.reshape(calls, blocks, 1, eb))
  vmem_bytes = 4 * 4 * eb * dp + 2 * 3 * 4 * eb * _LANES + 4 * 4 * eb * _round_up(eb, _LANES)

  def call(carry, x):
    grad, acc = carry
    rows_c, tok_c, w_c, key_col, key_row = x
    col_spec = pl.BlockSpec((None, eb, 1), lambda i, *_: (i, 0, 0))
    vec_spec = pl.BlockSpec((1, d), lambda i, *_: (0, 0))
    out = pl.pallas_call(
        _scatter_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(blocks,),
            in_specs=[col_spec, col_spec,
                      pl.BlockSpec((None, 1, eb), lambda i, *_: (i, 0, 0)),
                      vec_spec,
                      pl.BlockSpec(memory_space=pl.ANY),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=[pl.BlockSpec(memory_space=pl.ANY), vec_spec],
            scratch_shapes=[pltpu.VMEM((2, eb, d), jnp.float32),
                            pltpu.VMEM((2, eb, d), jnp.float32),
                            pltpu.SemaphoreType.DMA((2,)),
                            pltpu.SemaphoreType.DMA((2,)),
                            pltpu.SMEM((2,), jnp.int32)]),
        out_shape=[jax.ShapeDtypeStruct((n, d), jnp.float32),
                   jax.ShapeDtypeStruct((1, d), jnp.float32)],
        input_output_aliases={7: 0},  # operands: rows, tok, w, keys x2, acc, g, grad
        compiler_params=_compiler_params(vmem_bytes),
        interpret=interpret,
    )(rows_c, tok_c, w_c, key_col, key_row, acc, g, grad)
    return tuple(out), None

  init = (jnp.zeros((n, d), jnp.float32), jnp.zeros((1, d), jnp.float32))
  if calls == 1:
    (grad, _), _ = call(init, [x[0] for x in xs])
  else:
    (grad, _), _ = lax.scan(call, init, xs)
  return grad


@functools.partial(jax.jit, static_argnames=('interpret', 'smem_words', 'block_tokens',
                                             'block_entries'))
def _backward(values, indices, weights, g, *, interpret, smem_words, block_tokens,
              block_entries):
  g = g.astype(jnp.float32)
  grad_weights = _grad_weights(values, indices, g, interpret=interpret,
                               smem_words=smem_words, block_tokens=block_tokens)
  grad_values = _grad_values(values.shape[0], indices, weights, g, interpret=interpret,
                             smem_words=smem_words, block_entries=block_entries)
  return grad_values, grad_weights


def _check(values, indices, weights):
  if values.ndim != 2 or indices.ndim != 2 or indices.shape != weights.shape:
    raise ValueError(f'lookup_tpu: expected values [N, D], indices and weights [T, K]; '
                     f'got {values.shape}, {indices.shape}, {weights.shape}')


def forward(values, indices, weights, *, interpret=False) -> jax.Array:
  """values [N, D], indices [T, K] int32 in [0, N), weights [T, K] -> [T, D] fp32."""
  _check(values, indices, weights)
  return _forward(values, indices, weights, interpret=interpret, smem_words=SMEM_WORDS,
                  block_tokens=None)


def backward(values, indices, weights, g, *, interpret=False
             ) -> tuple[jax.Array, jax.Array]:
  """g [T, D] -> (grad_values [N, D], grad_weights [T, K]), both fp32."""
  _check(values, indices, weights)
  return _backward(values, indices, weights, g, interpret=interpret,
                   smem_words=SMEM_WORDS, block_tokens=None, block_entries=None)
