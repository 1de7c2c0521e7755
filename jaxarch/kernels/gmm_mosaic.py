"""Hopper kernels for the grouped matmul of dropless MoE: jax's own Mosaic GPU ragged dots.

The Triton kernels of `gmm_triton` reach about 40% of a dense matmul's rate on an H200
(246 TFLOP/s against 600-675, benchmarks/records/grouped_matmul_h200.json): Triton's
pipelining through Pallas does not keep Hopper's tensor cores fed. jax ships grouped
matmuls written for them in Mosaic GPU (TMA copies into swizzled shared memory, `wgmma`,
one persistent program per SM): `jax.experimental.pallas.ops.gpu.ragged_dot_mgpu` and
`transposed_ragged_dot_mgpu`. This module fits them to `grouped_matmul`'s contract:

- `gmm`: `out[rows of g] = x[rows of g] @ w[g]`, or `@ w[g].T` (the input gradient: the
  weights are transposed first, a copy of the weights and not of the rows, so one kernel
  serves both, and Pallas' interpreter runs it);
- `tgmm`: `out[g] = x[rows of g].T @ dy[rows of g]` (the weight gradient), GPU only (see
  its docstring): `grouped_matmul(impl='mosaic')` takes its weight gradient from
  `gmm_triton.tgmm` unless `mosaic_weight_grad='mosaic'`.

What the wrappers add. The kernels need block-aligned sizes (the contraction a multiple
of `block_k`; the weight gradient's dimensions multiples of `block_m` and `block_n`), so
unaligned dimensions are zero-padded and the result sliced back (an expert width of 1200
copies its activations once per matmul; a multiple of 128 costs nothing). The forward
kernel leaves the rows past the last group unwritten, so those are set to 0 (the
contract, and what expert parallelism's empty rows need: unwritten memory may hold NaN).
Inputs must be 16-bit floats (`wgmma` on bf16 or f16); outputs have x's dtype,
accumulated in fp32. `interpret=True` runs `gmm` in Pallas' Mosaic GPU interpreter on
CPU (the tests; every block is simulated with its barriers, so only small shapes are
practical).
"""

import contextlib
from typing import NamedTuple

import jax
import jax.numpy as jnp

# The dtypes Hopper's wgmma multiplies from shared memory with an fp32 accumulator.
DTYPES = (jnp.bfloat16, jnp.float16)


class MosaicTiling(NamedTuple):
  """Blocks of the output (`block_m` x `block_n`) and of the contraction (`block_k`);
  `max_concurrent_steps`: TMA copies in flight per program (the pipeline's depth);
  `grid_block_n`: output column blocks a program walks before the next row block (the
  order that keeps weights in L2). The default follows jax's sweep of these kernels;
  `benchmarks/moe.py` times others on a GPU."""
  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  max_concurrent_steps: int = 4
  grid_block_n: int = 8


def _pad_to(a: jax.Array, axis: int, multiple: int) -> jax.Array:
  """`a` with zeros appended along `axis` up to a multiple of `multiple` (no copy when
  it is one already)."""
  short = -a.shape[axis] % multiple
  if not short:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, short)
  return jnp.pad(a, widths)


def _rows_in_groups(out: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """`out` [M, N] with the rows past the last group set to 0."""
  total = jnp.sum(group_sizes)
  return jnp.where(jnp.arange(out.shape[0])[:, None] < total, out, jnp.zeros((), out.dtype))


def _check_dtype(dtype) -> None:
  """A clear error for rows the kernels cannot multiply (they would fail deep in Mosaic)."""
  if dtype not in DTYPES:
    raise ValueError(f'grouped_matmul: the Mosaic GPU kernels multiply bfloat16 or float16 '
                     f"rows, not {jnp.dtype(dtype).name} (impl='pallas' or 'xla' take any)")


def _interpreted(interpret: bool):
  """The context the kernels run in: on the GPU, or simulated on CPU."""
  if not interpret:
    return contextlib.nullcontext()
  # Not yet exported by jax.experimental.pallas.mosaic_gpu (jax 0.10).
  from jax._src.pallas.mosaic_gpu.interpret import params  # (lazy)
  return params.force_gpu_interpret_mode()


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
        tiling: MosaicTiling = MosaicTiling(), interpret: bool = False) -> jax.Array:
  """x [M, K], w [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N] in x's dtype."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # (lazy: Mosaic GPU's 0.3 s)
  _check_dtype(x.dtype)
  w = w.astype(x.dtype)
  if transpose_rhs:  # a copy of the weights (not of the rows), which the kernel then
    w = jnp.swapaxes(w, 1, 2)  # streams as it does the forward's (and the interpreter runs)
  m, n = x.shape[0], w.shape[2]
  x = _pad_to(_pad_to(x, 1, tiling.block_k), 0, tiling.block_m)
  w = _pad_to(_pad_to(w, 1, tiling.block_k), 2, tiling.block_n)
  with _interpreted(interpret):
    out = ragged_dot_mgpu.ragged_dot(
        x, w, group_sizes=group_sizes, block_m=tiling.block_m, block_n=tiling.block_n,
        block_k=tiling.block_k, max_concurrent_steps=tiling.max_concurrent_steps,
        grid_block_n=tiling.grid_block_n)
  return _rows_in_groups(out[:m, :n], group_sizes)


def tgmm(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *,
         tiling: MosaicTiling = MosaicTiling()) -> jax.Array:
  """x [M, K], dy [M, N] -> [G, K, N] in x's dtype: per group, its rows of x transposed
  times dy's (jax's `transposed_ragged_dot`). GPU only: jax 0.10's interpreter cannot run
  its transposed `wgmma` operand, so no CPU test checks its numbers (tests lower it for
  CUDA); `benchmarks/moe.py` times it against `gmm_triton.tgmm` and checks it against
  `ragged_dot` on the GPU, and only then does `mfu.py --moe_kernels_from` train with it."""
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu  # (lazy)
  _check_dtype(x.dtype)
  dy = dy.astype(x.dtype)
  k, n = x.shape[1], dy.shape[1]
  # The kernel's contraction runs over the rows, in blocks of block_k rows.
  x = _pad_to(_pad_to(x, 1, tiling.block_m), 0, tiling.block_k)
  dy = _pad_to(_pad_to(dy, 1, tiling.block_n), 0, tiling.block_k)
  out = transposed_ragged_dot_mgpu.transposed_ragged_dot(
      x, dy, group_sizes=group_sizes, block_m=tiling.block_m, block_n=tiling.block_n,
      block_k=tiling.block_k, max_concurrent_steps=tiling.max_concurrent_steps,
      grid_block_n=tiling.grid_block_n)
  return out[:, :k, :n]
