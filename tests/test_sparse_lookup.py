"""sparse_lookup: the embedding-bag op, its kernels, its VJP, and its sharded form.

The Pallas kernels run in Pallas' interpreter on CPU (`impl='interpret'` for the GPU
kernels, `'interpret_tpu'` for the TPU kernels) against the pure-JAX reference.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.experimental import checkify
from jax.test_util import check_grads
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import mesh_config, tiny_config
from jaxarch.kernels import (lookup_triton, lookup_xla, sharded_lookup, sharded_sparse_lookup,
                             sliced_sparse_lookup, sparse_lookup)
from jaxarch.parallel import make_mesh
from jaxarch.parallel.context import logical_mesh

KERNEL_IMPLS = ('interpret', 'interpret_tpu')


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
  monkeypatch.setattr(lookup_xla, 'CHUNK_ELEMENTS', 24 * 16 * 3)  # chunks of 3 slots
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


def test_bad_impl_scatter_or_dtype_is_a_clear_error():
  values, indices, weights = random_case()
  with pytest.raises(ValueError, match="impl='pallas' needs a GPU or TPU"):
    sparse_lookup(values, indices, weights, impl='pallas')
  with pytest.raises(ValueError, match='expected one of'):
    sparse_lookup(values, indices, weights, impl='cuda')
  with pytest.raises(ValueError, match='scatter=.*expected one of'):
    sparse_lookup(values, indices, weights, scatter='atomics')
  with pytest.raises(ValueError, match='indices must be integers'):
    sparse_lookup(values, indices.astype(jnp.float32), weights)
  with pytest.raises(ValueError, match='float32/bfloat16/float16'):
    sparse_lookup(values.astype(jnp.int8), indices, weights, impl='interpret')


def test_auto_picks_xla_on_cpu():
  from jaxarch.kernels.sparse_lookup import kernels_for  # pylint: disable=g-import-not-at-top
  assert kernels_for('auto') == 'xla'
  assert kernels_for('interpret') == 'triton_interpret'


def test_auto_picks_xla_for_a_table_the_kernels_do_not_take(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')  # 'auto' would pick Triton
  values, indices, weights = random_case()
  table = values.astype(jnp.int8)
  np.testing.assert_allclose(sparse_lookup(table, indices, weights),
                             sparse_lookup(table, indices, weights, impl='xla'))


# (N, D, T, K): K=1 and T=1; ragged T with D = 3 column blocks of 128; heavy duplicates
# (40 tokens x 16 slots over 7 rows); D not a multiple of 64 (padded); K = 256.
KERNEL_SHAPES = [(64, 64, 1, 1), (100, 384, 37, 5), (7, 128, 40, 16), (300, 96, 20, 3),
                 (50, 64, 9, 256)]


def kernel_case(n, d, t, k, dtype, seed=0):
  rng = np.random.default_rng(seed)
  values = jnp.asarray(rng.normal(size=(n, d)), dtype)
  indices = jnp.asarray(rng.integers(0, n, (t, k)), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(t, k)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  return values, indices, weights, cot


@functools.partial(jax.jit, static_argnames=('impl', 'scatter'))
def lookup_and_grads(values, indices, weights, cot, *, impl, scatter='sorted'):
  """(forward in fp32, grad_values in fp32, grad_weights) of sum(lookup · cot)."""
  fn = lambda v, w: sparse_lookup(v, indices, w, impl=impl, scatter=scatter)
  out, vjp = jax.vjp(fn, values, weights)
  grad_values, grad_w = vjp(cot.astype(out.dtype))
  return out.astype(jnp.float32), grad_values.astype(jnp.float32), grad_w


def is_slow(impl, scatter, dtype, shape) -> bool:
  """The default suite runs every shape once per kernel set; the rest is `-m slow`.

  The TPU interpreter is slow (30 s at K=256), and tests/test_lookup_tpu.py compares the
  TPU kernels with a reference on its own grid; here they run the shapes that go
  through the public op's padding (D=96) and ragged T with 3 column blocks.
  """
  if impl == 'interpret_tpu':
    return shape not in [(100, 384, 37, 5), (300, 96, 20, 3)]
  return scatter == 'atomic' and dtype == jnp.bfloat16


def kernel_cases():
  """impl x scatter x dtype x shape."""
  for impl, scatter in [('interpret', 'sorted'), ('interpret', 'atomic'),
                        ('interpret_tpu', 'sorted')]:
    for dtype in (jnp.float32, jnp.bfloat16):
      for shape in KERNEL_SHAPES:
        marks = pytest.mark.slow if is_slow(impl, scatter, dtype, shape) else ()
        yield pytest.param(impl, scatter, dtype, shape, marks=marks,
                           id=f'{impl}-{scatter}-{jnp.dtype(dtype).name}-'
                              + 'x'.join(map(str, shape)))


@pytest.mark.parametrize('impl,scatter,dtype,shape', list(kernel_cases()))
def test_kernels_equal_reference(impl, scatter, dtype, shape):
  values, indices, weights, cot = kernel_case(*shape, dtype)
  got = lookup_and_grads(values, indices, weights, cot, impl=impl, scatter=scatter)
  want = lookup_and_grads(values, indices, weights, cot, impl='xla')
  # The output and grad_values are rounded to the table's dtype from fp32 sums that may
  # differ in order; grad_weights stays fp32.
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  for name, g, w in zip(('out', 'grad_values', 'grad_weights'), got, want):
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * 4, err_msg=name)


@pytest.mark.parametrize('impl', ('xla',) + KERNEL_IMPLS)
def test_gradients_match_finite_differences(impl):
  values, indices, weights, cot = kernel_case(5, 64, 3, 4, jnp.float32, seed=3)
  indices = indices.at[0].set(2)  # one row read four times by a token
  loss = lambda v, w: jnp.sum(jnp.tanh(sparse_lookup(v, indices, w, impl=impl)) * cot)
  check_grads(loss, (values, weights), order=1, modes=['rev'], eps=1e-2,
                            atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize('impl', KERNEL_IMPLS)
def test_kernels_run_under_x64(impl):
  """A notebook with `jax_enable_x64` on (for float64 `check_grads`) still runs the Pallas
  kernels on float32 tables: their int loop counters and aranges stay int32."""
  values, indices, weights, cot = kernel_case(5, 64, 3, 4, jnp.float32, seed=3)
  indices = indices.at[0].set(2)
  loss = lambda f: lambda v, w: jnp.sum(f(v, indices, w) * cot)
  want = jax.grad(loss(reference), (0, 1))(values, weights)
  with jax.enable_x64(True):
    lookup = lambda v, i, w: sparse_lookup(v, i, w, impl=impl)
    out = lookup(values, indices, weights)
    got = jax.grad(loss(lookup), (0, 1))(values, weights)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, reference(values, indices, weights), rtol=1e-5, atol=1e-5)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('impl', ['xla', pytest.param('interpret', marks=pytest.mark.slow),
                                  pytest.param('interpret_tpu', marks=pytest.mark.slow)])
def test_jit_and_vmap(impl):
  values, indices, weights, _ = kernel_case(50, 64, 30, 4, jnp.float32)
  indices, weights = indices.reshape(3, 10, 4), weights.reshape(3, 10, 4)
  one = lambda v, i, w: sparse_lookup(v, i, w, impl=impl)
  one_jitted = jax.jit(one)  # the references, one batch element at a time
  want = jnp.stack([one_jitted(values, indices[b], weights[b]) for b in range(3)])
  shared_table = jax.jit(jax.vmap(one, (None, 0, 0)))(values, indices, weights)
  np.testing.assert_allclose(shared_table, want, rtol=1e-5, atol=1e-5)
  tables = jnp.stack([values, 2 * values, -values])
  per_table = jax.jit(jax.vmap(one))(tables, indices, weights)
  np.testing.assert_allclose(per_table[1], 2 * want[1], rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda v: jax.vmap(one, (None, 0, 0))(v, indices, weights).sum()))(
      values)
  grad_one = jax.jit(jax.grad(lambda v, i, w: one_jitted(v, i, w).sum()))
  want_grads = sum(grad_one(values, indices[b], weights[b]) for b in range(3))
  np.testing.assert_allclose(grads, want_grads, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('impl', ('xla',) + KERNEL_IMPLS)
def test_out_of_range_indices_never_leave_the_table(impl):
  values, indices, weights, cot = kernel_case(8, 64, 6, 3, jnp.float32)
  indices = indices.at[:, 0].set(-5).at[:, 1].set(8 + 3)
  got = lookup_and_grads(values, indices, weights, cot, impl=impl)
  clamped = lookup_and_grads(values, jnp.clip(indices, 0, 7), weights, cot, impl='xla')
  for g, w in zip(got, clamped):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  assert got[1].shape == (8, 64)


@pytest.mark.parametrize('impl', ('xla',) + KERNEL_IMPLS)
def test_empty_lookups_are_zeros_and_a_table_of_no_rows_is_a_clear_error(impl):
  values = jnp.ones((5, 3))
  for t, k, d in [(0, 2, 3), (4, 0, 3), (4, 2, 0)]:
    indices, weights = jnp.zeros((t, k), jnp.int32), jnp.ones((t, k))
    lookup = lambda v, w: sparse_lookup(v, indices, w, impl=impl)
    out = lookup(values[:, :d], weights)
    assert out.shape == (t, d) and out.dtype == jnp.float32 and not np.any(out)
    grads = jax.grad(lambda v, w: lookup(v, w).sum(), (0, 1))(values[:, :d], weights)
    assert [g.shape for g in grads] == [(5, d), (t, k)] and not any(np.any(g) for g in grads)
  bagged = sparse_lookup(values, jnp.zeros((0, 2), jnp.int32), jnp.ones((0, 2)),
                         bags=jnp.zeros((0, 2), jnp.int32), num_bags=3, impl=impl)
  assert bagged.shape == (0, 3, 3)
  with pytest.raises(ValueError, match=r'the table values \[0, 3\] has no rows'):
    sparse_lookup(values[:0], jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 2)), impl=impl)


def test_64_bit_host_indices_are_clamped_not_wrapped():
  """Without x64, jax keeps the low 32 bits of int64 numpy indices: 2^32 + 1 read row 1."""
  values, _, _, _ = kernel_case(8, 64, 2, 3, jnp.float32)
  indices = np.array([[2**32 + 1, 2**31, -2**32 + 2], [3, 2**40, 0]], np.int64)
  weights = jnp.ones((2, 3))
  np.testing.assert_allclose(sparse_lookup(values, indices, weights),
                             reference(values, np.clip(indices, 0, 7), weights), rtol=1e-6)
  check = checkify.checkify(lambda i: sparse_lookup(values, i, weights, checked=True))
  with pytest.raises(checkify.JaxRuntimeError, match='outside the table'):
    check(indices)[0].throw()


def test_checked_mode_reports_out_of_range_indices():
  values, indices, weights, _ = kernel_case(8, 64, 6, 3, jnp.float32)
  checked = jax.jit(checkify.checkify(
      lambda v, i, w: sparse_lookup(v, i, w, impl='interpret', checked=True)))
  err, out = checked(values, indices, weights)
  assert err.get() is None and out.shape == (6, 64)
  err, _ = checked(values, indices.at[2, 1].set(8), weights)
  with pytest.raises(checkify.JaxRuntimeError, match=r'outside the table \[0, 8\)'):
    err.throw()
  # Without checkify the check is a no-op: the index is clamped.
  sparse_lookup(values, indices.at[2, 1].set(8), weights, checked=True)


@pytest.mark.parametrize('scatter', ['sorted', 'atomic'])
@pytest.mark.usefixtures('triton_builds_for_an_h100')
def test_triton_kernels_lower_for_cuda(scatter):
  """The GPU kernels lower to Triton IR (compiling and running them needs a GPU)."""
  shapes = (jax.ShapeDtypeStruct((1 << 26, 64), jnp.bfloat16),  # 2^26 rows: 64-bit offsets
            jax.ShapeDtypeStruct((4099, 33), jnp.int32),
            jax.ShapeDtypeStruct((4099, 33), jnp.float32),
            jax.ShapeDtypeStruct((4099, 64), jnp.float32))
  fn = lambda v, i, w, g: (lookup_triton.forward(v, i, w),
                           lookup_triton.backward(v, i, w, g, scatter=scatter))
  hlo = jax.jit(fn).trace(*shapes).lower(lowering_platforms=('cuda',)).as_text()
  assert hlo.count('xla.gpu.triton') == 3
  bags = jax.ShapeDtypeStruct((4099, 33), jnp.int32)
  g = jax.ShapeDtypeStruct((4099, 3, 64), jnp.float32)
  fn = lambda v, i, w, b, g: (lookup_triton.forward(v, i, w, bags=b, num_bags=3),
                              lookup_triton.backward(v, i, w, g, bags=b, scatter=scatter))
  hlo = jax.jit(fn).trace(*shapes[:3], bags, g).lower(lowering_platforms=('cuda',)).as_text()
  assert hlo.count('xla.gpu.triton') == 3


def test_entries_of_weight_zero_form_no_run_of_the_sorted_scatter():
  """As a sharded table makes them (every index another device owns becomes row 0 with
  weight 0): in one run they would be one program's serial sum; they sort last, in none."""
  indices = jnp.array([[3, 0, 0, 5], [0, 3, 0, 0], [0, 0, 0, 0]], jnp.int32)
  weights = jnp.array([[1.0, 0, 0, 2.0], [0, 0.5, 0, 0], [0, 0, 0, 0]])
  order, rows, run_starts, num_runs = lookup_triton.sorted_runs(indices, weights, 8)
  assert int(num_runs[0]) == 2
  np.testing.assert_array_equal(rows[run_starts[:2]], [3, 5])
  np.testing.assert_array_equal(run_starts[:3], [0, 2, 3])  # row 3 twice, row 5 once
  np.testing.assert_array_equal(order[:3], [0, 5, 3])  # the entries' flat positions
  values, _, _, cot = kernel_case(8, 64, 3, 4, jnp.float32)
  got = lookup_and_grads(values, indices, weights, cot, impl='interpret')
  want = lookup_and_grads(values, indices, weights, cot, impl='xla')
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def bagged_reference(values, indices, weights, bags, num_bags):
  """Naive gather-then-sum into bags, in fp32: [T, B, D]."""
  rows = values[indices].astype(jnp.float32)
  one_hot = jax.nn.one_hot(bags, num_bags, dtype=jnp.float32)
  return jnp.einsum('tk,tkb,tkd->tbd', weights.astype(jnp.float32), one_hot, rows)


def bagged_case(n, d, t, k, num_bags, dtype=jnp.float32, seed=0):
  values, indices, weights, _ = kernel_case(n, d, t, k, dtype, seed)
  rng = np.random.default_rng(seed + 1)
  bags = jnp.asarray(rng.integers(0, num_bags, (t, k)), jnp.int32)
  cot = jnp.asarray(rng.normal(size=(t, num_bags, d)), jnp.float32)
  return values, indices, weights.at[:, 0].set(0.0), bags, cot  # weight-0 entries too


# The GPU kernels with both scatters on ragged T and 3 column blocks; the TPU kernels
# (which run one lookup per bag) on D=96, padded.
@pytest.mark.parametrize('impl,scatter,shape', [
    ('xla', 'sorted', (50, 96, 20, 6)), ('interpret', 'sorted', (100, 384, 37, 5)),
    ('interpret', 'atomic', (100, 384, 37, 5)),
    pytest.param('interpret_tpu', 'sorted', (50, 96, 20, 6), marks=pytest.mark.slow)])
def test_bags_equal_the_naive_bagged_sum(impl, scatter, shape):
  num_bags = 3
  values, indices, weights, bags, cot = bagged_case(*shape, num_bags)

  def loss(f):
    return lambda v, w: jnp.sum(f(v, indices, w, bags, num_bags) * cot)
  op = lambda v, i, w, b, nb: sparse_lookup(v, i, w, bags=b, num_bags=nb, impl=impl,
                                            scatter=scatter)
  out = jax.jit(op, static_argnums=4)(values, indices, weights, bags, num_bags)
  assert out.shape == (shape[2], num_bags, shape[1])
  np.testing.assert_allclose(out, bagged_reference(values, indices, weights, bags, num_bags),
                             rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(loss(op), (0, 1)))(values, weights)
  want = jax.grad(loss(bagged_reference), (0, 1))(values, weights)
  for name, g, w in zip(('grad_values', 'grad_weights'), got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('impl', ['xla', 'interpret'])
def test_bags_under_vmap(impl):
  values, indices, weights, bags, _ = bagged_case(50, 64, 12, 4, 3)
  batched = lambda a: a.reshape(3, 4, 4)
  one = lambda v, i, w, b: sparse_lookup(v, i, w, bags=b, num_bags=3, impl=impl)
  many = jax.vmap(one, (None, 0, 0, 0))
  got = jax.jit(many)(values, *map(batched, (indices, weights, bags)))
  want = bagged_reference(values, indices, weights, bags, 3)
  np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(many(v, *map(batched, (indices, weights, bags)))
                                            ** 2)))(values)
  want_grad = jax.grad(lambda v: jnp.sum(bagged_reference(v, indices, weights, bags, 3)
                                         ** 2))(values)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-5)


def test_bad_bags_are_a_clear_error():
  values, indices, weights = random_case()
  with pytest.raises(ValueError, match=r'bags must be integers shaped like indices'):
    sparse_lookup(values, indices, weights, bags=indices[:, :2], num_bags=2)
  with pytest.raises(ValueError, match=r'bags must be integers'):
    sparse_lookup(values, indices, weights, bags=weights, num_bags=2)
  with pytest.raises(ValueError, match=r'num_bags must be a positive int, got 0'):
    sparse_lookup(values, indices, weights, bags=indices, num_bags=0)
  with pytest.raises(ValueError, match=r'num_bags=3 needs bags'):
    sparse_lookup(values, indices, weights, num_bags=3)


def table_all_gathers(hlo: str, n: int, d: int) -> list[str]:
  """all-gather ops in compiled HLO whose result has the table's row count (n x d)."""
  found = []
  for line in hlo.splitlines():
    match = re.search(r'= \w+\[([\d,]*)\]\S* all-gather\(', line)
    if match and [int(x) for x in match.group(1).split(',') if x][:1] == [n]:
      found.append(line.strip())
  return found


@pytest.mark.parametrize('impl,num_bags', [('xla', None), ('interpret', None), ('xla', 3),
                                           pytest.param('interpret', 3, marks=pytest.mark.slow)])
def test_sharded_lookup_equals_one_device_without_gathering_the_table(impl, num_bags):
  cfg = mesh_config(tiny_config(), data=2, fsdp=2, tensor=2)
  mesh = make_mesh(cfg)
  n, d = 256, 16
  values, indices, weights = random_case(n=n, d=d, t=40, k=8)  # 40 tokens: padded to 4 shards
  bags = None if num_bags is None else indices % num_bags
  cot = jax.random.normal(jax.random.key(2), (40,) + ((num_bags,) if bags is not None else ())
                          + (d,))
  unsharded = functools.partial(sparse_lookup, bags=bags, num_bags=num_bags or 1)
  loss = lambda f: lambda v, w: jnp.sum(f(v, indices, w) * cot)
  want = unsharded(values, indices, weights)
  want_grads = jax.grad(loss(unsharded), (0, 1))(values, weights)

  table = NamedSharding(mesh, P(('fsdp', 'tensor'), None))
  with logical_mesh(mesh, cfg.mesh.rules):
    placed = jax.device_put(values, table)
    lookup = functools.partial(sharded_sparse_lookup, bags=bags, num_bags=num_bags or 1,
                               impl=impl)
    forward = jax.jit(lambda v, w: lookup(v, indices, w))
    backward = jax.jit(jax.grad(loss(lookup), (0, 1)))
    np.testing.assert_allclose(forward(placed, weights), want, rtol=1e-5, atol=1e-5)
    grads = backward(placed, weights)
    for g, w in zip(grads, want_grads):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert grads[0].sharding.spec[0] == ('fsdp', 'tensor')  # the table gradient stays sharded
    for fn in (forward, backward):
      hlo = fn.lower(placed, weights).compile().as_text()
      assert 'all-gather' in hlo or 'all_gather' in hlo  # tokens are gathered over fsdp
      assert not table_all_gathers(hlo, n, d)


def sliced_case(n=256, d=32, t=40, k=6, s=2, num_bags=3, seed=0):
  """A table, indices, per-slice weights [T, K, S], bags, and the naive output [T, B, D]."""
  values, indices, _ = random_case(n=n, d=d, t=t, k=k, seed=seed)
  rng = np.random.default_rng(seed + 1)
  weights = jnp.asarray(rng.normal(size=(t, k, s)), jnp.float32)
  bags = jnp.asarray(rng.integers(0, num_bags, (t, k)), jnp.int32)
  rows = values[indices].reshape(t, k, s, d // s)
  naive = jnp.einsum('tkb,tks,tksc->tbsc', jax.nn.one_hot(bags, num_bags), weights, rows)
  return values, indices, weights, bags, naive.reshape(t, num_bags, d)


@pytest.mark.parametrize('table_split', ['rows', 'width'])
def test_sliced_lookup_weighs_each_slice_of_a_row_by_its_own_weight(table_split):
  values, indices, weights, bags, want = sliced_case()
  got = sliced_sparse_lookup(values, indices, weights, bags=bags, num_bags=3,
                             table_split=table_split)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got = sliced_sparse_lookup(values, indices, weights, table_split=table_split)  # one bag
  np.testing.assert_allclose(got, want.sum(1, keepdims=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('table_split', ['rows', 'width'])
def test_sliced_lookup_clamps_whole_rows(table_split):
  """An index past the table reads every slice of row N-1 (and one below it, of row 0),
  as `sparse_lookup` does; `checked` reports it against the N rows."""
  values, indices, weights, bags, _ = sliced_case(n=16, t=4)
  bad = indices.at[0, 0].set(16).at[1, 1].set(-3)
  lookup = lambda i, **kw: sliced_sparse_lookup(values, i, weights, bags=bags, num_bags=3,
                                                table_split=table_split, **kw)
  np.testing.assert_allclose(lookup(bad), lookup(jnp.clip(bad, 0, 15)), rtol=1e-6)
  err, _ = jax.jit(checkify.checkify(lambda i: lookup(i, checked=True)))(bad)
  with pytest.raises(checkify.JaxRuntimeError, match=r'outside the table \[0, 16\)'):
    err.throw()


REVERSED = (('batch', ('fsdp', 'data')), ('values', ('tensor', 'fsdp')))  # other axis orders


@pytest.mark.parametrize('impl,sizes,rules', [
    ('xla', dict(data=2, fsdp=2, tensor=2), ()), ('xla', dict(data=2, tensor=4), ()),
    ('xla', dict(data=1, fsdp=8), ()), ('xla', dict(data=2, fsdp=2, tensor=2), REVERSED),
    ('interpret', dict(data=2, fsdp=2, tensor=2), ())])
def test_table_split_by_width_equals_one_device_without_gathering_the_table(impl, sizes, rules,
                                                                           caplog):
  """Meta's design: every device reads its columns of every row; the table stays split."""
  sharded_lookup._warn_padded_columns.cache_clear()  # another test may have warned
  cfg = mesh_config(tiny_config(), **sizes)
  rules = [r for r in cfg.mesh.rules if r[0] not in dict(rules)] + list(rules)
  value_axes = dict(rules)['values']
  mesh = make_mesh(cfg)
  values, indices, weights, bags, want = sliced_case()
  cot = jax.random.normal(jax.random.key(2), want.shape)
  loss = lambda f: lambda v, w: jnp.sum(f(v, w) * cot)
  unsharded = lambda v, w: sliced_sparse_lookup(v, indices, w, bags=bags, num_bags=3)
  want_grads = jax.grad(loss(unsharded), (0, 1))(values, weights)
  lookup = lambda v, w: sliced_sparse_lookup(v, indices, w, bags=bags, num_bags=3,
                                             table_split='width', impl=impl)
  with logical_mesh(mesh, rules):
    placed = jax.device_put(values, NamedSharding(mesh, P(None, value_axes)))
    forward, backward = jax.jit(lookup), jax.jit(jax.grad(loss(lookup), (0, 1)))
    np.testing.assert_allclose(forward(placed, weights), want, rtol=1e-5, atol=1e-5)
    grads = backward(placed, weights)
    for g, w in zip(grads, want_grads):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert grads[0].sharding.spec[1] == value_axes  # the table gradient stays split
    for fn in (forward, backward):
      assert not table_all_gathers(fn.lower(placed, weights).compile().as_text(), 256, 32)
  # Each device's rows are 32 / 4 = 8 columns wide: the Pallas kernels pad them to 64. Said
  # once, not by every trace (forward, backward).
  assert caplog.text.count('pad to a multiple of 64') == (impl == 'interpret')


@pytest.mark.parametrize('sizes', [dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)])
def test_sliced_table_split_by_rows_gathers_each_token_s_indices_once_not_per_slice(sizes):
  """The rows split gathers its tokens' indices, bags and weights over fsdp and, in the
  backward, their output's gradient. Indices and bags were expanded to S slice rows each
  before the gather: S times their bytes (UltraMem tiny at fsdp=8: 2.0 of the step's
  10.8 MiB of all-gather, now 1.0); each device expands them after it."""
  from jaxarch.train import profile  # pylint: disable=g-import-not-at-top
  cfg = mesh_config(tiny_config(), **sizes)
  mesh = make_mesh(cfg)
  values, indices, weights, bags, want = sliced_case(t=64, s=4)
  cot = jax.random.normal(jax.random.key(2), want.shape)
  loss = lambda f: lambda v, w: jnp.sum(f(v, w) * cot)
  want_grads = jax.grad(loss(lambda v, w: sliced_sparse_lookup(
      v, indices, w, bags=bags, num_bags=3)), (0, 1))(values, weights)
  tokens = NamedSharding(mesh, P(('data', 'fsdp')))
  indices, weights, bags, cot = (jax.device_put(a, tokens) for a in (indices, weights, bags, cot))
  placed = jax.device_put(values, NamedSharding(mesh, P(('fsdp', 'tensor'), None)))

  def lookup(v, w):
    with logical_mesh(mesh, cfg.mesh.rules):
      return sliced_sparse_lookup(v, indices, w, bags=bags, num_bags=3)
  # Each device gathers the tokens of its data shard: indices and bags [T, K] int32 and
  # weights [T, K, S] in the forward, the output's gradient [T, B, D] in the backward.
  t, k, s = weights.shape
  tokens_bytes = t // sizes.get('data', 1) * k * (4 + 4 + 4 * s)
  cot_bytes = cot.size // sizes.get('data', 1) * 4
  gathered = lambda f: profile.collective_bytes(
      f.lower(placed, weights).compile().as_text())['all-gather']
  forward, backward = jax.jit(lookup), jax.jit(jax.grad(loss(lookup), (0, 1)))
  np.testing.assert_allclose(forward(placed, weights), want, rtol=1e-5, atol=1e-5)
  for g, w in zip(backward(placed, weights), want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  assert gathered(forward) <= tokens_bytes
  assert gathered(backward) <= tokens_bytes + cot_bytes


@pytest.mark.parametrize('table_split', ['rows', 'width'])
def test_a_table_split_over_no_axis_is_read_on_each_device_s_own_tokens(table_split):
  """Under pure data parallelism the table is whole on every device and the lookup runs on
  each device's tokens; only the table's gradient is summed (an all-reduce of its size).
  Left to XLA, the backward's sort of all T·K entries ran replicated: every device
  gathered the whole batch's entries and all-reduced their rows."""
  from jaxarch.train import profile  # pylint: disable=g-import-not-at-top
  cfg = mesh_config(tiny_config(), data=8)
  mesh = make_mesh(cfg)
  values, indices, weights, bags, want = sliced_case(t=64)
  cot = jax.random.normal(jax.random.key(2), want.shape)
  loss = lambda f: lambda v, w: jnp.sum(f(v, w) * cot)
  want_grads = jax.grad(loss(lambda v, w: sliced_sparse_lookup(
      v, indices, w, bags=bags, num_bags=3)), (0, 1))(values, weights)
  rows = NamedSharding(mesh, P('data'))
  indices, weights, bags, cot = (jax.device_put(a, rows) for a in (indices, weights, bags, cot))

  def lookup(v, w):
    with logical_mesh(mesh, cfg.mesh.rules):
      return sliced_sparse_lookup(v, indices, w, bags=bags, num_bags=3,
                                  table_split=table_split)
  backward = jax.jit(jax.grad(loss(lookup), (0, 1)))
  for g, w in zip(backward(values, weights), want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  found = profile.collective_bytes(backward.lower(values, weights).compile().as_text())
  assert set(found) <= {'all-reduce'}, found
  assert found.get('all-reduce', 0) <= values.size * values.dtype.itemsize, found


def test_sliced_lookup_rejects_bad_shapes_and_splits():
  values, indices, weights, _, _ = sliced_case()
  with pytest.raises(ValueError, match=r"table_split='cols'; expected one of \('rows', 'width'\)"):
    sliced_sparse_lookup(values, indices, weights, table_split='cols')
  with pytest.raises(ValueError, match=r'weights \[T, K, S\] with S dividing D'):
    sliced_sparse_lookup(values, indices, weights[..., :1].repeat(3, -1))
