"""kernels.top_k: a row ranked in chunks equals one jax.lax.top_k, ties and all."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxarch.kernels.top_k import chunked_top_k


@pytest.mark.parametrize('shape, k, chunk', [
    ((7, 6400), 80, 1024),  # UltraMem's grid: 7 chunks, the last partly padding
    ((3, 5, 1000), 16, 128),  # leading axes
    ((4, 2048), 80, 1024),  # whole chunks
    ((4, 100), 80, 64),  # k > chunk: one top-k
    ((4, 100), 8, 128),  # n <= chunk: one top-k
    ((4, 100), 8, 0),  # chunk 0: one top-k
])
@pytest.mark.parametrize('ties', [False, True])
def test_chunks_rank_as_one_top_k(shape, k, chunk, ties):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  if ties:  # a few distinct values: the lower index must come first, as top_k's
    x = np.round(x * 2) / 2
  want = jax.lax.top_k(x, k)
  got = jax.jit(chunked_top_k, static_argnums=(1, 2))(x, k, chunk)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_padding_loses_ties_to_real_values():
  """Scores of -inf tie the padding: the real ones, of lower index, rank first."""
  x = np.full((2, 3000), -np.inf, np.float32)
  x[:, 2999] = 1.0  # in the last, padded chunk
  values, index = chunked_top_k(jnp.asarray(x), 80, 1024)
  want_values, want_index = jax.lax.top_k(x, 80)
  np.testing.assert_array_equal(index, want_index)
  np.testing.assert_array_equal(values, want_values)
  ints = np.arange(3000, dtype=np.int32)[::-1].reshape(1, -1) % 7
  for g, w in zip(chunked_top_k(jnp.asarray(ints), 20, 512), jax.lax.top_k(ints, 20)):
    np.testing.assert_array_equal(g, w)
