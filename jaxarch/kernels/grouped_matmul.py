"""The grouped matmul of dropless MoE: rows in contiguous groups, each times its expert.

`grouped_matmul(x [M, K], w [G, K, N], group_sizes [G]) -> [M, N]` has the semantics of
`jax.lax.ragged_dot`: group g's rows (after those of groups < g) times `w[g]`; rows past
the groups give 0. Why not always `ragged_dot`: outside TPU, XLA lowers it by expanding
the rows into every group (a `[G, M, K]` masked copy, or on GPU an `[M, G·K]` one) and one
dense matmul, so it spends G times the FLOPs and memory of the real product (measured on
CPU: the compiled train step of `moe:tiny`, 8 experts top-2, counts 5.8x the model FLOPs).

**Implementations** (`impl`): `'xla'` is `ragged_dot` (native on TPU, the reference
elsewhere); `'pallas'` runs the Triton kernels of `gmm_triton` (GPU), with a custom VJP
whose input gradient is the grouped matmul by the transposed weights and whose weight
gradient is the per-group `x.T @ dy` kernel; `'mosaic'` (Hopper) runs the forward and the
input gradient with jax's Mosaic GPU ragged dot (`gmm_mosaic`) and the weight gradient
with the Triton kernel, or with jax's transposed Mosaic ragged dot if
`mosaic_weight_grad='mosaic'` (GPU only: `benchmarks/moe.py` checks it against
`ragged_dot` on the GPU, no CPU test can); `'interpret'` / `'interpret_mosaic'` run the
other kernels in Pallas' interpreters on any backend (the CPU tests); `'auto'` is
`'pallas'` on GPU and `'xla'` elsewhere. Accumulation is in fp32; outputs have x's dtype.
The kernels take w in x's dtype, so the weight gradient is rounded to x's dtype before it
is cast back to w's (the MoE layer casts its weights to the compute dtype first anyway).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxarch.config import MOE_MATMUL_IMPLS as IMPLS
from jaxarch.config import MOE_WEIGHT_GRADS as WEIGHT_GRADS
from jaxarch.kernels import dispatch, gmm_mosaic, gmm_triton


def kernels_for(impl: str, key: str = 'impl') -> str:
  """impl -> which code runs: 'xla', 'triton', 'mosaic' or '<either>_interpret'."""
  return dispatch.kernels_for('grouped_matmul', impl, IMPLS, {'gpu': 'triton'}, key)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   impl: str = 'auto', tiling: gmm_triton.Tiling = gmm_triton.Tiling(),
                   mosaic_tiling: gmm_mosaic.MosaicTiling = gmm_mosaic.MosaicTiling(),
                   mosaic_weight_grad: str = 'triton') -> jax.Array:
  """x [M, K], w [G, K, N], group_sizes [G] int (sum <= M) -> [M, N] in x's dtype;
  `tiling`: the Triton kernels' blocks and launch settings (with `'mosaic'`, the weight
  gradient's); `mosaic_tiling`: the Mosaic GPU kernels'; `mosaic_weight_grad`: with
  `impl='mosaic'`, which kernel computes the weight gradient ('triton' or 'mosaic'; other
  impls ignore it, so a model trained with it exports and evaluates on any path)."""
  group_sizes = jnp.asarray(group_sizes)
  if x.ndim != 2 or w.ndim != 3 or group_sizes.shape != w.shape[:1] or x.shape[1] != w.shape[1]:
    raise ValueError(f'grouped_matmul: expected x [M, K], w [G, K, N], group_sizes [G]; got '
                     f'{x.shape}, {w.shape}, {group_sizes.shape}')
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f'grouped_matmul: group_sizes must be integers, got {group_sizes.dtype}')
  kernels = kernels_for(impl)
  if mosaic_weight_grad not in WEIGHT_GRADS or (mosaic_weight_grad == 'mosaic'
                                                and kernels == 'mosaic_interpret'):
    raise ValueError(f'grouped_matmul: mosaic_weight_grad={mosaic_weight_grad!r} must be one '
                     f"of {WEIGHT_GRADS}, and 'mosaic' runs on a GPU only (no interpreter runs "
                     f'that kernel); got impl={impl!r}')
  # ragged_dot would promote to a wider w's dtype: out in x's, as documented. It also takes
  # empty shapes, where the kernels' grids would be empty.
  if kernels == 'xla' or 0 in x.shape + w.shape:
    return jax.lax.ragged_dot(x, w, group_sizes).astype(x.dtype)
  return _gmm_lowered_once(x, w.astype(x.dtype), group_sizes.astype(jnp.int32),
                           _Kernels(kernels, tiling, mosaic_tiling,
                                    mosaic_weight_grad if kernels == 'mosaic' else 'triton'))


class _Kernels(NamedTuple):
  """Which kernels the custom VJP runs, with their tilings (hashable: a static argument)."""
  name: str  # 'triton', 'mosaic' or '<either>_interpret'
  tiling: gmm_triton.Tiling
  mosaic_tiling: gmm_mosaic.MosaicTiling
  weight_grad: str = 'triton'  # or 'mosaic': jax's transposed Mosaic ragged dot

  @property
  def interpret(self) -> bool:
    return self.name.endswith('_interpret')

  def gmm(self, x, w, group_sizes, transpose_rhs=False):
    if self.name.startswith('mosaic'):
      return gmm_mosaic.gmm(x, w, group_sizes, transpose_rhs=transpose_rhs,
                            tiling=self.mosaic_tiling, interpret=self.interpret)
    return gmm_triton.gmm(x, w, group_sizes, transpose_rhs=transpose_rhs, tiling=self.tiling,
                          interpret=self.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(x, w, group_sizes, kernels):
  return kernels.gmm(x, w, group_sizes)


def _gmm_fwd(x, w, group_sizes, kernels):
  return _gmm(x, w, group_sizes, kernels), (x, w, group_sizes)


def _gmm_bwd(kernels, residuals, dy):
  x, w, group_sizes = residuals
  dy = dy.astype(x.dtype)
  dx = kernels.gmm(dy, w, group_sizes, transpose_rhs=True)
  if kernels.weight_grad == 'mosaic':
    dw = gmm_mosaic.tgmm(x, dy, group_sizes, tiling=kernels.mosaic_tiling).astype(w.dtype)
  else:
    dw = gmm_triton.tgmm(x, dy, group_sizes, out_dtype=w.dtype, tiling=kernels.tiling,
                         interpret=kernels.interpret)
  return dx, dw, jnp.zeros(group_sizes.shape, jax.dtypes.float0)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


# A model calls the kernels with the same shapes in every layer. As a jitted function, the
# calls (and their gradients) share one lowering instead of lowering the Pallas kernels
# again per layer: lowering MoE 680m's train step for CUDA took 40 s with the Mosaic
# kernels and 11 s with Triton's, most of it in the kernels (XLA inlines the calls, so the
# compiled step is the same).
_gmm_lowered_once = jax.jit(_gmm, static_argnums=(3,))
