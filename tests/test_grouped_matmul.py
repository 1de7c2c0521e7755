"""grouped_matmul: dropless MoE's grouped matmul, its Triton and Mosaic GPU kernels and
their VJP.

The kernels run in Pallas' interpreters on CPU (`impl='interpret'`, `'interpret_mosaic'`)
against `jax.lax.ragged_dot`; small blocks make groups start and end inside tiles.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxarch.kernels import gmm_mosaic, gmm_triton
from jaxarch.kernels.grouped_matmul import _gmm, _Kernels, grouped_matmul, kernels_for
from jaxarch.layers.moe import MoE

SMALL_BLOCKS = dict(tiling=gmm_triton.Tiling(block_m=16, block_n=32, block_k=16),
                    interpret=True)
# The Mosaic GPU kernels' smallest blocks (one warpgroup's 64 rows); 100 x 40 rows times
# 40 x 72 weights are padded to them on every side.
MOSAIC_BLOCKS = dict(tiling=gmm_mosaic.MosaicTiling(64, 64, 64, 2, 1), interpret=True)
# Group sizes over 100 rows: an empty group, groups inside one tile and across several,
# 7 rows past the last group (which give 0); everything in one group.
GROUPS = {'ragged': [13, 0, 40, 30, 10], 'one_group': [0, 0, 100, 0, 0]}


def case(sizes, m=100, k=40, n=72, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  x, w, dy = (jnp.asarray(rng.normal(size=s), dtype)
              for s in ((m, k), (len(sizes), k, n), (m, n)))
  return x, w, jnp.asarray(sizes, jnp.int32), dy


@pytest.mark.parametrize('order', [0, 1])  # rows first, columns first
@pytest.mark.parametrize('groups', list(GROUPS))
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_kernels_equal_ragged_dot(groups, dtype, tol, order):
  x, w, sizes, dy = case(GROUPS[groups], dtype=dtype)
  f32 = lambda a: np.asarray(a, np.float32)
  blocks = dict(SMALL_BLOCKS, tiling=SMALL_BLOCKS['tiling']._replace(order=order))
  want = jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)
  np.testing.assert_allclose(f32(gmm_triton.gmm(x, w, sizes, **blocks)), want,
                             rtol=tol, atol=tol * 10)
  want_t = jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), sizes,
                              preferred_element_type=jnp.float32)
  np.testing.assert_allclose(
      f32(gmm_triton.gmm(dy, w, sizes, transpose_rhs=True, **blocks)), want_t,
      rtol=tol, atol=tol * 10)
  want_w = jax.grad(lambda w: jnp.sum(jax.lax.ragged_dot(
      x.astype(jnp.float32), w, sizes) * dy.astype(jnp.float32)))(w.astype(jnp.float32))
  np.testing.assert_allclose(f32(gmm_triton.tgmm(x, dy, sizes, **blocks)), want_w,
                             rtol=tol, atol=tol * 10)


@pytest.mark.parametrize('order', [0, 1])
def test_rows_past_the_groups_are_zero_and_empty_groups_get_zero_gradient(order):
  x, w, sizes, dy = case(GROUPS['ragged'])
  blocks = dict(SMALL_BLOCKS, tiling=SMALL_BLOCKS['tiling']._replace(order=order))
  assert not np.any(np.asarray(gmm_triton.gmm(x, w, sizes, **blocks))[93:])
  assert not np.any(np.asarray(gmm_triton.tgmm(x, dy, sizes, **blocks))[1])


def test_schedule_lists_each_tile_once_per_group_it_holds():
  tile, group = gmm_triton.schedule(jnp.asarray([13, 0, 40, 30, 10]), 100, 16)
  pairs = [(int(t), int(g)) for t, g in zip(tile, group) if g < 5]
  # rows 0-12 | 13-52 | 53-82 | 83-92 in tiles of 16 rows
  assert pairs == [(0, 0), (0, 2), (1, 2), (2, 2), (3, 2), (3, 3), (4, 3), (5, 3), (5, 4)]
  assert len(tile) == 7 + 5 - 1  # the static bound: tiles + groups - 1


def test_gradients_equal_ragged_dot_gradients():
  x, w, sizes, dy = case(GROUPS['ragged'])
  loss = lambda impl: lambda x, w: jnp.sum(grouped_matmul(x, w, sizes, impl=impl) * dy)
  got = jax.jit(jax.grad(loss('interpret'), argnums=(0, 1)))(x, w)
  want = jax.grad(loss('xla'), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the default suite runs the layer with the kernels expert-parallel
def test_moe_layer_with_the_kernels_equals_ragged_dot():  # (test_moe.py, 'gpu-kernels')
  make = lambda impl: MoE(16, num_experts=8, top_k=2, expert_d_ff=24, dtype=jnp.float32,
                          matmul_impl=impl, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 5, 16))

  def grads(layer):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)
    return jax.grad(loss, argnums=(0, 1))(params, x)

  got, want = grads(make('interpret')), grads(make('xla'))
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_moe_layer_with_the_mosaic_kernels_equals_ragged_dot():
  """One device: Pallas' Mosaic GPU interpreter deadlocks inside `shard_map` over several
  CPU devices, so the expert-parallel layer is checked with the Triton kernels only."""
  make = lambda impl: MoE(16, num_experts=8, top_k=2, expert_d_ff=24, dtype=jnp.bfloat16,
                          matmul_impl=impl, kernel_tiling=tuple(SMALL_BLOCKS['tiling']),
                          mosaic_tiling=tuple(MOSAIC_BLOCKS['tiling']), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 5, 16), jnp.bfloat16)

  def grads(layer):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x).astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  got, want = grads(make('interpret_mosaic')), grads(make('xla'))
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = float(np.max(np.abs(np.asarray(r, np.float32))))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                               rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.usefixtures('triton_builds_for_an_h100')
def test_kernels_lower_for_cuda():
  """The GPU kernels lower to Triton IR at the 680m preset's shapes (running them needs a
  GPU): 64 experts, d_model 1536, expert width 1200 (not a multiple of the blocks)."""
  shapes = (jax.ShapeDtypeStruct((65536, 1536), jnp.bfloat16),
            jax.ShapeDtypeStruct((64, 1536, 1200), jnp.bfloat16),
            jax.ShapeDtypeStruct((64,), jnp.int32),
            jax.ShapeDtypeStruct((65536, 1200), jnp.bfloat16))

  def fn(x, w, sizes, dy):
    out, vjp = jax.vjp(lambda x, w: _gmm(x, w, sizes, _Kernels(
        'triton', gmm_triton.Tiling(), gmm_mosaic.MosaicTiling())), x, w)
    return out, vjp(dy)

  hlo = jax.jit(fn).trace(*shapes).lower(lowering_platforms=('cuda',)).as_text()
  assert hlo.count('xla.gpu.triton') == 3  # forward, input gradient, weight gradient


@pytest.mark.usefixtures('triton_builds_for_an_h100')
def test_columns_first_launches_a_row_tiles_column_blocks_together():
  """A GPU launches the grid's x axis fastest: rows first, x is the (tile, group) pairs
  (at most 1024 tiles + 65 groups - 1 at the 680m shape: the 64 experts and the rows past
  them) and y the 10 column blocks; columns first, the other way round. The weight
  gradient puts the experts last."""
  x = jax.ShapeDtypeStruct((65536, 1536), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((64, 1536, 1200), jnp.bfloat16)
  sizes = jax.ShapeDtypeStruct((64,), jnp.int32)
  dy = jax.ShapeDtypeStruct((65536, 1200), jnp.bfloat16)

  def grid(fn, *args):
    hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).as_text()
    return tuple(int(v) for v in re.findall(r'grid_[xyz] = (\d+)', hlo))

  for order, want, want_t in ((0, (1088, 10, 1), (64, 24, 10)),
                              (1, (10, 1088, 1), (24, 10, 64))):
    tiling = gmm_triton.Tiling(order=order)
    assert grid(lambda x, w, s: gmm_triton.gmm(x, w, s, tiling=tiling), x, w, sizes) == want
    assert grid(lambda x, dy, s: gmm_triton.tgmm(x, dy, s, tiling=tiling), x, dy,
                sizes) == want_t


@pytest.mark.parametrize('groups', list(GROUPS))
def test_mosaic_kernels_equal_ragged_dot(groups):
  """jax's Mosaic GPU ragged dot, padded to its blocks, for the product and (on the
  transposed weights) the input gradient; the rows past the groups are 0."""
  x, w, sizes, dy = case(GROUPS[groups], dtype=jnp.bfloat16)
  f32 = lambda a: np.asarray(a, np.float32)
  got = f32(gmm_mosaic.gmm(x, w, sizes, **MOSAIC_BLOCKS))
  np.testing.assert_allclose(got, jax.lax.ragged_dot(x, w, sizes, preferred_element_type=
                                                     jnp.float32), rtol=2e-2, atol=0.2)
  assert not np.any(got[int(sizes.sum()):])
  np.testing.assert_allclose(
      f32(gmm_mosaic.gmm(dy, w, sizes, transpose_rhs=True, **MOSAIC_BLOCKS)),
      jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), sizes, preferred_element_type=jnp.float32),
      rtol=2e-2, atol=0.2)


def test_mosaic_gradients_equal_ragged_dot_gradients():
  """impl='interpret_mosaic': the Mosaic forward and input gradient, Triton's weight
  gradient, through the custom VJP (bf16: the kernels' dtype)."""
  x, w, sizes, dy = case(GROUPS['ragged'], dtype=jnp.bfloat16)
  def loss(impl):
    return lambda x, w: jnp.sum((grouped_matmul(
        x, w, sizes, impl=impl, tiling=SMALL_BLOCKS['tiling'],
        mosaic_tiling=MOSAIC_BLOCKS['tiling']) * dy).astype(jnp.float32))
  got = jax.jit(jax.grad(loss('interpret_mosaic'), argnums=(0, 1)))(x, w)
  want = jax.grad(loss('xla'), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                               rtol=2e-2, atol=0.3)


@pytest.fixture
def gpu_with_132_sms(monkeypatch):
  """jax's transposed Mosaic ragged dot sizes its grid by the first device's SM count,
  which a CPU device lacks; tests that lower it for CUDA here see an H100/H200's."""
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as kernel_module
  real = jax.devices
  class Gpu:
    core_count = 132
    def __init__(self, device):
      self.device = device
    def __getattr__(self, name):
      return getattr(self.device, name)
  view = type('JaxOnAGpu', (), {'__getattr__': lambda self, name: getattr(jax, name),
                                'devices': staticmethod(lambda *a: [Gpu(d) for d in real(*a)])})
  monkeypatch.setattr(kernel_module, 'jax', view())


@pytest.mark.usefixtures('triton_builds_for_an_h100', 'gpu_with_132_sms')
def test_mosaic_kernels_lower_for_cuda():
  """At the 680m preset's shapes (16 experts, d_model 1536, expert width 1200: padded to
  the blocks), impl='mosaic' lowers to two Mosaic GPU kernels (product, input gradient)
  and Triton's weight gradient, or with `mosaic_weight_grad='mosaic'` three Mosaic kernels
  (jax's transposed one for the weight gradient); running them needs a Hopper GPU."""
  shapes = (jax.ShapeDtypeStruct((65536, 1536), jnp.bfloat16),
            jax.ShapeDtypeStruct((16, 1536, 1200), jnp.bfloat16),
            jax.ShapeDtypeStruct((16,), jnp.int32),
            jax.ShapeDtypeStruct((65536, 1200), jnp.bfloat16))
  def lowered(weight_grad):
    kernels = _Kernels('mosaic', gmm_triton.Tiling(), gmm_mosaic.MosaicTiling(), weight_grad)
    def fn(x, w, sizes, dy):
      out, vjp = jax.vjp(lambda x, w: _gmm(x, w, sizes, kernels), x, w)
      return out, vjp(dy)
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=('cuda',)).as_text()

  hlo = lowered('triton')
  assert hlo.count('custom_call @mosaic_gpu') == 2 and hlo.count('xla.gpu.triton') == 1
  hlo = lowered('mosaic')  # jax's transposed Mosaic kernel for the weight gradient
  assert hlo.count('custom_call @mosaic_gpu') == 3 and 'xla.gpu.triton' not in hlo


def test_mosaic_impl_errors_name_what_to_use_instead():
  x, w, sizes, _ = case(GROUPS['ragged'], dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=r"impl='mosaic' needs a Hopper GPU .* runs on cpu; "
                                       r"use impl='pallas'"):
    grouped_matmul(x, w, sizes, impl='mosaic')
  with pytest.raises(ValueError, match='bfloat16 or float16 rows, not float32'):
    grouped_matmul(x.astype(jnp.float32), w, sizes, impl='interpret_mosaic')
  for impl, weight_grad in (('interpret_mosaic', 'mosaic'), ('xla', 'cutlass')):
    with pytest.raises(ValueError, match=rf"mosaic_weight_grad='{weight_grad}' must be one "
                                         r"of \('triton', 'mosaic'\), and 'mosaic' runs on"):
      grouped_matmul(x, w, sizes, impl=impl, mosaic_weight_grad=weight_grad)
  # Other impls ignore it: a model trained with it evaluates and exports on any path.
  np.testing.assert_array_equal(grouped_matmul(x, w, sizes, impl='xla', mosaic_weight_grad=
                                               'mosaic'), grouped_matmul(x, w, sizes, impl='xla'))
  assert kernels_for('interpret_mosaic') == 'mosaic_interpret'


def test_bad_impl_or_shapes_are_clear_errors():
  x, w, sizes, _ = case(GROUPS['ragged'])
  with pytest.raises(ValueError, match="impl='pallas' needs a GPU"):
    grouped_matmul(x, w, sizes, impl='pallas')
  with pytest.raises(ValueError, match='expected one of'):
    grouped_matmul(x, w, sizes, impl='triton')
  with pytest.raises(ValueError, match=r'expected x \[M, K\], w \[G, K, N\]'):
    grouped_matmul(x, w[:, :8], sizes)
  assert kernels_for('auto') == 'xla' and kernels_for('interpret') == 'triton_interpret'


@pytest.mark.parametrize('impl', ['xla', 'interpret'])
def test_output_has_the_dtype_of_x_whatever_the_weights(impl):
  """bf16 rows times fp32 weights: bf16 out from every impl (ragged_dot alone promotes)."""
  x, w, sizes, _ = case(GROUPS['ragged'], dtype=jnp.bfloat16)
  out = grouped_matmul(x, w.astype(jnp.float32), sizes, impl=impl)
  assert out.dtype == jnp.bfloat16
  want = jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2e-2, atol=0.2)


@pytest.mark.parametrize('impl', ['xla', 'interpret'])
def test_empty_shapes_give_empty_or_zero_outputs_and_float_group_sizes_are_an_error(impl):
  for m, g, k, n in [(0, 2, 4, 3), (5, 0, 4, 3), (5, 2, 4, 0), (5, 2, 0, 3)]:
    x, w = jnp.ones((m, k)), jnp.ones((g, k, n))
    sizes = [m] + [0] * (g - 1) if g else jnp.zeros((0,), jnp.int32)  # (a list is taken)
    out = grouped_matmul(x, w, sizes, impl=impl, tiling=SMALL_BLOCKS['tiling'])
    assert out.shape == (m, n) and out.dtype == jnp.float32 and not np.any(out)
  x, w, sizes, _ = case(GROUPS['ragged'])
  with pytest.raises(ValueError, match='group_sizes must be integers, got float32'):
    grouped_matmul(x, w, sizes.astype(jnp.float32), impl=impl)
