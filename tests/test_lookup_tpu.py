"""The Pallas TPU embedding-bag kernels, run in TPU interpret mode on CPU.

`pltpu.InterpretParams()` simulates HBM, VMEM, SMEM, DMAs and semaphores (plain
`interpret=True` would not), and fills fresh VMEM with NaN, so a row read before its
DMA landed shows up in the results.
"""

import functools

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from jaxarch.kernels import lookup_tpu

INTERPRET = pltpu.InterpretParams()


def _inputs(n, d, t, k, dtype, rows=None, seed=0):
  """values [n, d], indices [t, k] drawn from the first `rows` rows, weights, g [t, d]."""
  rng = np.random.default_rng(seed)
  values = jnp.asarray(rng.standard_normal((n, d)), dtype)
  indices = jnp.asarray(rng.integers(0, rows or n, (t, k)), jnp.int32)
  weights = jnp.asarray(rng.standard_normal((t, k)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  return values, indices, weights, g


def _reference(values, indices, weights, g):
  """fp32 einsum over the gathered rows, and its VJP."""
  bag = lambda v, w: jnp.einsum('tk,tkd->td', w, v[indices])
  out, vjp = jax.vjp(bag, values.astype(jnp.float32), weights)
  grad_values, grad_weights = vjp(g)
  return out, grad_values, grad_weights


def _close(actual, expected, rtol=1e-5):
  """Relative to the largest entry: fp32 accumulation in another order."""
  expected = np.asarray(expected)
  assert actual.dtype == jnp.float32 and actual.shape == expected.shape
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol,
                             atol=rtol * float(np.abs(expected).max() or 1.0))


def _check(values, indices, weights, g, forward, backward):
  out, grad_values, grad_weights = _reference(values, indices, weights, g)
  _close(forward(values, indices, weights), out)
  kernel_grad_values, kernel_grad_weights = backward(values, indices, weights, g)
  _close(kernel_grad_values, grad_values)
  _close(kernel_grad_weights, grad_weights)


# (N, D, T, K, rows the indices are drawn from): one token, T not a multiple of the token
# block, heavy duplicates within and across tokens (odd N: 16-bit tables get a pad row),
# K above a sublane tile and D not a multiple of 128.
SHAPES = [(64, 64, 1, 1, None), (100, 128, 13, 5, None), (37, 64, 20, 3, 3),
          (50, 192, 9, 17, None)]


# bf16 by default in the two tests below; every shape in bf16 too in the slow run.
@pytest.mark.parametrize('dtype', [
    pytest.param(jnp.float32, id='f32'),
    pytest.param(jnp.bfloat16, id='bf16', marks=pytest.mark.slow)])
@pytest.mark.parametrize('n,d,t,k,rows', SHAPES)
def test_matches_reference(n, d, t, k, rows, dtype):
  values, indices, weights, g = _inputs(n, d, t, k, dtype, rows)
  _check(values, indices, weights, g,
         functools.partial(lookup_tpu.forward, interpret=INTERPRET),
         functools.partial(lookup_tpu.backward, interpret=INTERPRET))


def test_under_jit():
  values, indices, weights, g = _inputs(40, 128, 11, 4, jnp.bfloat16, rows=6, seed=1)
  forward = jax.jit(functools.partial(lookup_tpu.forward, interpret=INTERPRET))
  backward = jax.jit(functools.partial(lookup_tpu.backward, interpret=INTERPRET))
  _check(values, indices, weights, g, forward, backward)


@pytest.mark.parametrize('dtype,params', [
    (jnp.float32, pltpu.InterpretParams(dma_execution_mode='eager')),
    (jnp.bfloat16, INTERPRET)], ids=['f32-eager-dma', 'bf16'])
def test_split_over_calls(dtype, params):
  """A tiny SMEM budget: several pallas_calls, token blocks of 2, entry blocks of 8.

  Runs of one row cross entry blocks and calls, so the carried partial sums are used.
  """
  values, indices, weights, g = _inputs(33, 64, 21, 3, dtype, rows=4, seed=2)
  _check(values, indices, weights, g,
         functools.partial(lookup_tpu._forward, interpret=params, smem_words=16,
                           block_tokens=2),
         functools.partial(lookup_tpu._backward, interpret=params, smem_words=32,
                           block_tokens=2, block_entries=8))


def test_lowers_for_tpu():
  """The kernels lower to Mosaic without a TPU (Mosaic itself only compiles on one)."""
  values, indices, weights, g = _inputs(16, 128, 9, 3, jnp.bfloat16)
  for fn, args in [(lookup_tpu.forward, (values, indices, weights)),
                   (lookup_tpu.backward, (values, indices, weights, g))]:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=('tpu',)).as_text()
    assert 'tpu_custom_call' in text
