"""sparse_lookup: the embedding-bag op, its VJP, and its sharded form on 8 fake devices."""

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import mesh_config, tiny_config
from jaxarch.kernels import sharded_sparse_lookup, sparse_lookup
from jaxarch.parallel import make_mesh
from jaxarch.parallel.context import logical_mesh

# The module, not the function that `jaxarch.kernels` re-exports under the same name.
lookup_module = importlib.import_module('jaxarch.kernels.sparse_lookup')


def reference(values, indices, weights):
  """Naive gather-then-sum, in fp32."""
  rows = values[jnp.clip(indices, 0, values.shape[0] - 1)].astype(jnp.float32)
  return jnp.einsum('tk,tkd->td', weights.astype(jnp.float32), rows)


def random_case(n=64, d=16, t=24, k=8, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  values = jnp.asarray(rng.normal(size=(n, d)), dtype)
  indices = jnp.asarray(rng.integers(0, n, (t, k)), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(t, k)), dtype)
  return values, indices, weights


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_lookup_equals_gathered_einsum(dtype, tol):
  values, indices, weights = random_case(dtype=dtype)
  out = sparse_lookup(values, indices, weights)
  assert out.dtype == dtype and out.shape == (24, 16)
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             reference(values, indices, weights), rtol=tol, atol=tol)


def test_gradients_equal_naive_reference_with_repeated_indices():
  values, indices, weights = random_case(n=6, k=10)  # 10 reads of 6 rows: repeats
  indices = indices.at[0].set(3)  # one token reads row 3 ten times
  cot = jax.random.normal(jax.random.key(0), (24, 16))
  loss = lambda f: lambda v, w: jnp.sum(f(v, indices, w) * cot)
  got = jax.grad(loss(sparse_lookup), (0, 1))(values, weights)
  want = jax.grad(loss(reference), (0, 1))(values, weights)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_chunked_loop_over_k_equals_reference(monkeypatch):
  values, indices, weights = random_case(k=8)
  monkeypatch.setattr(lookup_module, '_CHUNK_ELEMENTS', 24 * 16 * 3)  # chunks of 3 slots
  cot = jax.random.normal(jax.random.key(1), (24, 16))
  loss = lambda f: lambda v, w: jnp.sum(f(v, indices, w) * cot)
  np.testing.assert_allclose(sparse_lookup(values, indices, weights),
                             reference(values, indices, weights), rtol=1e-5, atol=1e-5)
  for g, w in zip(jax.grad(loss(sparse_lookup), (0, 1))(values, weights),
                  jax.grad(loss(reference), (0, 1))(values, weights)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_out_of_range_indices_are_clamped():
  values, indices, weights = random_case(n=8)
  indices = indices.at[:, 0].set(-5).at[:, 1].set(8 + 3)
  np.testing.assert_allclose(sparse_lookup(values, indices, weights),
                             reference(values, indices, weights), rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda v: sparse_lookup(v, indices, weights).sum())(values)
  want = jax.grad(lambda v: reference(v, indices, weights).sum())(values)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5)


def test_backward_keeps_no_gathered_rows(capsys):
  values, indices, weights = random_case(t=7, k=5)
  print_saved_residuals(lambda v, w: sparse_lookup(v, indices, w).sum(), values, weights)
  saved = capsys.readouterr().out
  assert '[7,5,16]' not in saved and '[64,16]' in saved  # the table itself, not T x K x D


def test_unbuilt_or_unknown_impl_is_a_clear_error():
  values, indices, weights = random_case()
  with pytest.raises(ValueError, match='not built yet'):
    sparse_lookup(values, indices, weights, impl='pallas')
  with pytest.raises(ValueError, match='expected one of'):
    sparse_lookup(values, indices, weights, impl='cuda')


def table_all_gathers(hlo: str, n: int, d: int) -> list[str]:
  """all-gather ops in compiled HLO whose result has the table's row count (n x d)."""
  found = []
  for line in hlo.splitlines():
    match = re.search(r'= \w+\[([\d,]*)\]\S* all-gather\(', line)
    if match and [int(x) for x in match.group(1).split(',') if x][:1] == [n]:
      found.append(line.strip())
  return found


def test_sharded_lookup_equals_one_device_without_gathering_the_table():
  cfg = mesh_config(tiny_config(), data=2, fsdp=2, tensor=2)
  mesh = make_mesh(cfg)
  n, d = 256, 16
  values, indices, weights = random_case(n=n, d=d, t=40, k=8)  # 40 tokens: padded to 4 shards
  cot = jax.random.normal(jax.random.key(2), (40, d))
  loss = lambda f: lambda v, w: jnp.sum(f(v, indices, w) * cot)
  want = sparse_lookup(values, indices, weights)
  want_grads = jax.grad(loss(sparse_lookup), (0, 1))(values, weights)

  table = NamedSharding(mesh, P(('fsdp', 'tensor'), None))
  with logical_mesh(mesh, cfg.mesh.rules):
    placed = jax.device_put(values, table)
    forward = jax.jit(lambda v, w: sharded_sparse_lookup(v, indices, w))
    backward = jax.jit(jax.grad(loss(sharded_sparse_lookup), (0, 1)))
    np.testing.assert_allclose(forward(placed, weights), want, rtol=1e-5, atol=1e-5)
    grads = backward(placed, weights)
    for g, w in zip(grads, want_grads):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert grads[0].sharding.spec[0] == ('fsdp', 'tensor')  # the table gradient stays sharded
    for fn in (forward, backward):
      hlo = fn.lower(placed, weights).compile().as_text()
      assert 'all-gather' in hlo or 'all_gather' in hlo  # tokens are gathered over fsdp
      assert not table_all_gathers(hlo, n, d)
