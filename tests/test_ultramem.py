"""UltraMem memory layer: retrieval against brute force, gradients, sharding, init, state."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import USER_CPU_COMPILE, make_batch, mesh_config, padded_batch, tiny_config
from jaxarch import config as config_lib
from jaxarch import models
from jaxarch.layers import signals
from jaxarch.config import check_ultramem_config as check_config
from jaxarch.layers import ultramem
from jaxarch.layers.ultramem import UltraMem
from jaxarch.parallel import global_batch, make_mesh, tree_shardings
from jaxarch.parallel.context import logical_mesh
from jaxarch.infer import for_inference
from jaxarch.train.state import init_state, make_setup, merge_model
from jaxarch.train.step import cross_entropy, make_eval_step, make_train_step, run_model
from jaxarch.train.step import signals as collect_signals


def make_layer(d_model=32, num_values=64, top_k=8, value_dim=16, key_dim=8, num_heads=2,
               ive_expansion=4, seed=0, dtype=jnp.float32, **kw):
  return UltraMem(d_model, num_values=num_values, top_k=top_k, value_dim=value_dim,
                  key_dim=key_dim, num_heads=num_heads, ive_expansion=ive_expansion,
                  dtype=dtype, param_dtype=kw.pop('param_dtype', jnp.float32),
                  rngs=nnx.Rngs(seed), **kw)


def queries(layer, x):
  return layer.query(x[None]).reshape(x.shape[0], layer.num_heads, 2, -1)


def grid_scores(layer, q):
  """Exact Tucker scores of every virtual value: [t, h, n'², c]."""
  rows, cols = layer.side_scores(q)
  s = jnp.einsum('thar,hcrs,thbs->thabc', rows, layer.cores[...], cols)
  return s.reshape(*s.shape[:2], -1, s.shape[-1])


def test_exhaustive_top_m_retrieves_the_brute_force_top_k():
  layer = make_layer(top_m=16)  # n' = 8·√4 = 16 keys per side: every row and column
  layer.cores[...] = jax.random.normal(jax.random.key(3), layer.cores.shape)  # not rank 1
  q = queries(layer, jax.random.normal(jax.random.key(1), (12, 32)))
  virtual, scores = nnx.jit(lambda m, q: m.retrieve(q))(layer, q)
  full = nnx.jit(grid_scores)(layer, q)
  best, want = jax.lax.top_k(full.sum(-1), layer.top_k)
  np.testing.assert_array_equal(np.sort(virtual, -1), np.sort(want, -1))
  np.testing.assert_allclose(scores.sum(-1), best, rtol=1e-4, atol=1e-4)
  per_core = jnp.take_along_axis(full, virtual[..., None], axis=2)
  np.testing.assert_allclose(scores, per_core, rtol=1e-4, atol=1e-4)


def numpy_forward(layer, x):
  """DESIGN §7.1 written out per token and head in numpy: LayerNormed query halves (gain,
  bias) and keys (over d_k), side scores, rows and columns ranked by |R·u| and |Cl·v|
  (u, v: leading singular vectors of ΣC_i), the top-m grid scored exactly per core, the
  best k by Σ_i S_i; value slice i weighted by core i's score into the bag of its IVE
  group; the E bags flattened through the output projection."""
  get = lambda v: np.asarray(v[...], np.float64)
  w_q, gain, bias, keys, cores, values, w_out = map(get, (
      layer.query_proj, layer.query_scale, layer.query_bias, layer.keys, layer.cores,
      layer.values, layer.out_proj))
  norm = lambda a, axis: (a - a.mean(axis, keepdims=True)) / np.sqrt(
      a.var(axis, keepdims=True) + 1e-5)
  q = norm(np.einsum('td,dhpk->thpk', x, w_q), -1) * gain + bias
  q = np.repeat(q, layer.heads_per_query, axis=1)  # adjacent heads share a query
  keys = norm(keys, 3)
  n_side, m, e = keys.shape[2], layer.top_m, layer.expansion
  slice_of = np.arange(values.shape[1]) * layer.num_cores // values.shape[1]
  bags = np.zeros((len(x), e, values.shape[1]))
  physical_of, group_of = map(np.asarray, layer.permute(jnp.arange(e * n_side**2)))
  for h in range(layer.num_heads):
    left, _, right = np.linalg.svd(cores[h].sum(0))
    for t in range(len(x)):
      rows = np.einsum('k,jkr->jr', q[t, h, 0], keys[h, 0])  # n' r
      cols = np.einsum('k,jkr->jr', q[t, h, 1], keys[h, 1])
      top_rows = np.argsort(-np.abs(rows @ left[:, 0]))[:m]
      top_cols = np.argsort(-np.abs(cols @ right[0]))[:m]
      grid = [(np.einsum('r,crs,s->c', rows[a], cores[h], cols[b]), a * n_side + b)
              for a in top_rows for b in top_cols]
      for scores, virtual in sorted(grid, key=lambda z: -z[0].sum())[:layer.top_k]:
        bags[t, group_of[virtual]] += (scores[slice_of] * layer.score_scale *
                                       values[physical_of[virtual]])
  return bags.reshape(len(x), -1) @ w_out


@pytest.mark.parametrize('kw', [dict(), dict(heads_per_query=2),
                                dict(ive_expansion=1, top_m=5, num_cores=4)])
def test_forward_equals_the_design_written_out_in_numpy(kw):
  with jax.enable_x64(True):
    layer = make_layer(dtype=jnp.float64, param_dtype=jnp.float64, **kw)
    layer.cores[...] = jax.random.uniform(jax.random.key(5), layer.cores.shape, jnp.float64)
    layer.query_bias[...] = 0.1 * jax.random.normal(jax.random.key(6), layer.query_bias.shape,
                                                    jnp.float64)
    x = jax.random.normal(jax.random.key(1), (1, 6, 32), jnp.float64)
    np.testing.assert_allclose(nnx.jit(type(layer).__call__)(layer, x)[0],
                               numpy_forward(layer, np.asarray(x[0])),
                               rtol=1e-9, atol=1e-12)


@nnx.jit
def recall(layer, x):
  q = queries(layer, x)
  virtual, _ = layer.retrieve(q)
  _, want = jax.lax.top_k(grid_scores(layer, q).sum(-1), layer.top_k)
  return (virtual[..., :, None] == want[..., None, :]).any(-1).mean()


def test_recall_of_default_top_m_on_random_inputs():
  # 64K virtual values (N = 64², E = 4), top-16 of them from a 16 x 16 candidate grid.
  x = jax.random.normal(jax.random.key(1), (256, 64))
  kw = dict(d_model=64, num_values=64 * 64, top_k=16, value_dim=32, key_dim=32)
  measured = float(recall(make_layer(**kw), x))
  assert measured > 0.95, measured  # measured 0.978
  # Ranking rows and columns by the signed rank-1 score never searches (−)·(−) pairs.
  signed = float(recall(make_layer(rank_by_magnitude=False, **kw), x))
  assert signed < 0.6, signed  # measured 0.490


def split_apply(layer):
  """(params, f(params, x) -> out) with the layer's non-parameter state held fixed."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def apply(params, x):
    model = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))
    return model(x)
  return params, apply


def test_gradients_reach_every_weight_and_match_finite_differences():
  with jax.enable_x64(True):
    layer = make_layer(dtype=jnp.float64, param_dtype=jnp.float64, query_conv=2)
    x = jax.random.normal(jax.random.key(1), (2, 5, 32), jnp.float64)
    cot = jax.random.normal(jax.random.key(2), (2, 5, 32), jnp.float64)
    params, apply = split_apply(layer)
    loss = jax.jit(lambda p: jnp.sum(apply(p, x) * cot))
    grads = jax.jit(jax.grad(loss))(params)
    for name in ('query_conv', 'query_proj', 'query_scale', 'keys', 'cores', 'values',
                 'out_proj'):
      assert float(jnp.abs(grads[name].get_value()).max()) > 0, name
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    direction = treedef.unflatten([jax.random.normal(k, l.shape, l.dtype)
                                   for k, l in zip(keys, leaves)])
    eps = 1e-6
    shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)
    numeric = (loss(shifted(1.0)) - loss(shifted(-1.0))) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads),
                                                   jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


@pytest.mark.parametrize('impl,table_split', [('xla', 'rows'), ('interpret', 'rows'),
                                               ('xla', 'width'), ('interpret', 'width')])
def test_read_sums_each_groups_values_slice_by_core(impl, table_split):
  """IVE and multi-core scoring: bag (t, group, slice i) = Σ score_i · slice i of the value."""
  layer = make_layer(num_values=64, value_dim=128, num_cores=2, lookup_impl=impl,
                     table_split=table_split)
  e, c, (t, h, k) = 4, 2, (5, 2, 8)
  keys = jax.random.split(jax.random.key(3), 3)
  physical = jax.random.randint(keys[0], (t, h, k), 0, 64)
  group = jax.random.randint(keys[1], (t, h, k), 0, e)
  weights = jax.random.normal(keys[2], (t, h, k, c))
  rows = layer.values[...].reshape(64, c, -1)[physical]  # t h k c d
  want = jnp.einsum('thke,thkc,thkcd->tecd', jax.nn.one_hot(group, e), weights, rows)
  got = nnx.jit(lambda m, *a: m.read(*a))(layer, physical, group, weights)
  np.testing.assert_allclose(got, want.reshape(t, e, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('table_split', ['rows', 'width'])
def test_table_sharded_over_four_devices_matches_one_device(table_split):
  cfg = mesh_config(tiny_config(), data=2, fsdp=2, tensor=2)
  mesh = make_mesh(cfg)
  layer = make_layer(num_values=256, table_split=table_split)
  table = 0 if table_split == 'rows' else 1  # the dimension split over fsdp x tensor
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (8, 4, 32))
  cot = jax.random.normal(jax.random.key(2), (8, 4, 32))

  def step(state, x):
    params, rest = nnx.split_state(state, nnx.Param, ...) if hasattr(nnx, 'split_state') \
        else (nnx.filter_state(state, nnx.Param), nnx.filter_state(state, nnx.Not(nnx.Param)))

    def loss(params):
      model = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))
      out = model(x)
      return jnp.sum(out * cot), (out, nnx.state(model, signals.WindowCounter))
    (_, (out, hits)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grads, hits

  want = jax.jit(step)(state, x)
  shardings = tree_shardings(state, mesh, cfg.mesh.rules)
  assert shardings['values'].get_value().spec[table] == ('fsdp', 'tensor')
  batch = NamedSharding(mesh, P(('data', 'fsdp', 'expert'), None, None))

  def sharded_step(state, x):
    with logical_mesh(mesh, cfg.mesh.rules):
      return step(state, x)
  got = jax.jit(sharded_step, in_shardings=(shardings, batch))(
      jax.device_put(state, shardings), jax.device_put(x, batch))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  assert got[1]['values'].get_value().sharding.spec[table] == ('fsdp', 'tensor')


def init_output_std(top_k, num_values):
  layer = make_layer(d_model=64, num_values=num_values, top_k=top_k, value_dim=32,
                     key_dim=16)
  x = jax.random.normal(jax.random.key(1), (4, 64, 64))
  return float(jnp.std(nnx.jit(lambda m, x: m(x))(layer, x)))


def test_output_std_at_init_is_about_the_values_std():
  """The score scale's IVE expansion included: measured 0.0196 (0.0098 without it)."""
  assert 0.014 < init_output_std(16, 1024) < 0.028


def test_the_query_conv_does_not_reach_across_packed_documents():
  layer = make_layer(query_conv=3)
  layer.query_conv[...] = jax.random.normal(jax.random.key(3), layer.query_conv.shape)
  x = jax.random.normal(jax.random.key(1), (1, 9, 32))
  segments = jnp.array([[1] * 5 + [2] * 4])
  positions = jnp.array([list(range(5)) + list(range(4))])
  packed = layer.query(x, segments, positions)
  for doc in (slice(0, 5), slice(5, 9)):  # each document's queries as if it were alone
    alone = layer.query(x[:, doc], segments[:, doc], positions[:, doc])
    np.testing.assert_allclose(packed[:, doc], alone, rtol=1e-6, atol=1e-6)
  assert not np.allclose(layer.query(x)[:, 5:], packed[:, 5:], atol=1e-3)  # taps do cross


@pytest.mark.slow
def test_output_variance_at_init_is_independent_of_top_k_and_num_values():
  small, large = init_output_std(16, 1024), init_output_std(64, 16384)
  assert 0.8 < (large / small) ** 2 < 1.25, (small, large)  # measured 0.0198, 0.0192
  assert 0.01 < small < 0.04  # values ~ N(0, 0.02²) per unit of score weight


def test_tucker_vectors_keep_their_sign_across_refreshes():
  layer = make_layer()
  x = jax.random.normal(jax.random.key(1), (1, 4, 32))
  u0, v0 = layer.u[...], layer.v[...]
  layer.u[...], layer.v[...] = -u0, -v0  # the stored sign is the one to keep
  forward = nnx.jit(lambda m, x: m(x))
  forward(layer, x)
  np.testing.assert_allclose(layer.u[...], -u0, atol=1e-6)
  np.testing.assert_allclose(layer.v[...], -v0, atol=1e-6)
  for i in range(3):  # cores drift: u, v follow without flipping
    previous = layer.u[...]
    layer.cores[...] = layer.cores[...] + 0.1 * jax.random.normal(
        jax.random.key(i), layer.cores.shape)
    forward(layer, x)
    assert bool(jnp.all(jnp.sum(layer.u[...] * previous, -1) > 0))
  total = layer.cores[...].sum(1)
  left, sigma, right = jnp.linalg.svd(total)
  rank1 = sigma[:, 0, None, None] * left[:, :, 0, None] * right[:, None, 0, :]
  u, v = layer.u[...], layer.v[...]
  np.testing.assert_allclose(sigma[:, 0, None, None] * u[:, :, None] * v[:, None, :], rank1,
                             atol=1e-5)


def test_aux_loss_is_zero_for_rank_one_core_sum_and_positive_otherwise():
  layer = make_layer(tucker_rank=3, aux_loss_weight=0.01)
  a, b = jnp.arange(1.0, 4.0), jnp.array([0.5, -1.0, 2.0])
  core = jnp.einsum('r,s->rs', a, b)
  layer.cores[...] = jnp.broadcast_to(core / 2, layer.cores.shape)  # ΣC = a bᵀ per head
  assert float(layer.tucker_aux_loss()) < 1e-10
  layer.cores[...] = layer.cores[...] + jnp.eye(3)  # σ₂, σ₃ well above τ = 0.15
  assert float(layer.tucker_aux_loss()) > 0.1
  # Reported to the trainer: weighted loss and the unweighted metric.
  _, sown = nnx.jit(run_model)(layer, jnp.ones((1, 2, 32)))
  losses, metrics, *_ = collect_signals(sown)
  aux = float(layer.tucker_aux_loss())
  np.testing.assert_allclose(sum(losses.values()), 0.01 * aux, rtol=1e-5)
  assert any(k.endswith('tucker_aux') for k in metrics)
  assert {k.rsplit('/', 1)[-1] for k in metrics} >= {'score_entropy', 'window_values_hit'}


def test_an_evaluation_reports_each_memory_layer_s_score_entropy_on_the_held_out_tokens():
  """`eval_score_entropy/<layer>`: its mean over every real evaluated token, however many
  microbatches the batch runs in (UltraMem's evaluation reported no memory statistic)."""
  from jaxarch.train import step as step_lib  # pylint: disable=g-import-not-at-top
  batch = padded_batch()
  summaries = {}
  for accum in (1, 2):
    cfg = config_lib.load('configs/ultramem.py:tiny', [
        'model.dtype=float32', 'train.batch_size=8', 'data.seq_len=16',
        f'train.grad_accum_steps={accum}'])
    setup = make_setup(cfg, make_mesh(cfg, devices=jax.devices()[:1]))
    state = init_state(cfg, setup)
    # Random Tucker cores: each token's top scores far from alike, and unlike others'.
    state['params'] = jax.tree.map_with_path(
        lambda path, x: jax.random.normal(jax.random.key(1), x.shape) if 'cores' in
        jax.tree_util.keystr(path) else x, state['params'])
    sums = make_eval_step(setup, np.ones(cfg.model.vocab_size))(
        state, global_batch(batch, setup.batch_sharding))
    summaries[accum] = step_lib.summarize_eval(jax.device_get(sums))
  forward = jax.jit(lambda state, batch: step_lib._forward(  # one forward, as served
      setup, state['params'], state['model_state'], batch, deterministic=True)[2])
  metrics = forward(state, batch)
  layers = [key.removesuffix('/score_entropy') for key in metrics
            if key.endswith('/score_entropy')]
  assert len(layers) == 2  # the tiny preset's two memory layers
  for summary in summaries.values():
    assert set(summary) == {'eval_loss', 'eval_bpb', 'eval_tokens',
                            *(f'eval_score_entropy/{layer}' for layer in layers)}
    for layer in layers:
      assert summary[f'eval_score_entropy/{layer}'] == pytest.approx(
          float(metrics[f'{layer}/score_entropy']), rel=2e-6)
  # The two microbatches' means differ (by 1.7e-4 of them): weighed alike, not by their 34
  # and 64 real tokens, they would be 2.5e-5 off.
  halves = [float(forward(state, {k: v[rows] for k, v in batch.items()})[
      f'{layers[0]}/score_entropy']) for rows in (slice(0, 4), slice(4, 8))]
  assert abs(halves[0] - halves[1]) > 1e-4 * halves[0], halves


def test_window_counter_counts_every_read():
  layer = make_layer(num_values=256, top_k=8, num_heads=2)
  x = jax.random.normal(jax.random.key(1), (2, 3, 32))
  _, sown = nnx.jit(run_model)(layer, x)
  _, metrics, *_ = collect_signals(sown)
  hits = layer.hits[...]
  assert hits.dtype == jnp.int32 and int(hits.sum()) == 2 * 3 * 2 * 8
  hit = [v for k, v in metrics.items() if k.endswith('window_values_hit')][0]
  np.testing.assert_allclose(hit, float((hits > 0).mean()))
  assert layer.hits.get_metadata()['out_sharding'] == ('values',)


def test_padding_tokens_count_in_no_value_usage_metric():
  """Row 0 ends in 3 padding tokens (segment 0): whatever they hold, the reads and the
  score entropy are those of the 5 + 8 real tokens alone (counting the padding, the
  noisy padding's reads and entropy would move them)."""
  layer = make_layer(num_values=256, top_k=8, num_heads=2)
  segment_ids = jnp.stack([jnp.array([1] * 5 + [0] * 3), jnp.array([1] * 4 + [2] * 4)])
  real = segment_ids > 0
  x = jax.random.normal(jax.random.key(1), (2, 8, 32))
  noise = jnp.where(real[..., None], x, 5.0 * jax.random.normal(jax.random.key(2), x.shape))
  run = nnx.jit(run_model)

  def usage(x, segment_ids):
    layer.hits[...] = jnp.zeros_like(layer.hits[...])
    _, sown = run(layer, x, segment_ids)
    return layer.hits[...], collect_signals(sown)[1]

  hits, metrics = usage(x, segment_ids)
  noisy_hits, noisy_metrics = usage(noise, segment_ids)
  assert int(hits.sum()) == 13 * 2 * 8  # real tokens x heads x top_k
  np.testing.assert_array_equal(noisy_hits, hits)
  for name in ('score_entropy', 'window_values_hit'):
    np.testing.assert_allclose(noisy_metrics[name], metrics[name], rtol=1e-6)
  alone_hits, alone = usage(x[real][None], None)  # the real tokens alone, no padding
  np.testing.assert_array_equal(alone_hits, hits)
  for name in ('score_entropy', 'window_values_hit'):
    np.testing.assert_allclose(alone[name], metrics[name], rtol=1e-5)


def test_inactive_params_are_the_values_a_token_does_not_read():
  layer = make_layer(num_values=256, top_k=8, num_heads=2, value_dim=16)
  assert layer.inactive_params() == (256 - 2 * 8) * 16


def ucfg(**overrides):
  c = ml_collections.ConfigDict(dict(
      num_values=1024, top_k=16, top_m=None, value_dim=64, key_dim=32, num_heads=2,
      tucker_rank=2, num_cores=2, ive_expansion=4, aux_loss_weight=0.0, aux_tau=0.15,
      query_conv=0))
  c.update(overrides)
  return c


@pytest.mark.parametrize('overrides,message', [
    (dict(num_values=1000), r'model\.ultramem\.num_values=1000 must be a perfect square '
                            r'\(e\.g\. 1024\)'),
    (dict(ive_expansion=2), r'model\.ultramem\.ive_expansion=2 must be a perfect square'),
    (dict(value_dim=63, num_cores=2), r'model\.ultramem\.value_dim=63 must be divisible'),
    (dict(top_k=300, top_m=16), r'model\.ultramem\.top_k=300 must be <= top_m² = 256'),
    (dict(num_values=16, ive_expansion=16, top_k=20, top_m=16),
     r'model\.ultramem\.top_k=20 must be <= num_values=16'),
    (dict(top_m=65), r'model\.ultramem\.top_m=65 must be in \[1, 64\]'),
    (dict(tucker_rank=0), r'model\.ultramem\.tucker_rank=0 must be an integer >= 1'),
    (dict(query_conv=-1), r'model\.ultramem\.query_conv=-1 must be'),
])
def test_invalid_configs_are_one_line_errors(overrides, message):
  check_config(ucfg())  # the base is valid
  with pytest.raises(ValueError, match='^config error: ' + message) as info:
    check_config(ucfg(**overrides))
  assert '\n' not in str(info.value)


def ultramem_steps(impl: str, scatter: str = 'sorted', n: int = 1, table_split: str = 'rows'):
  """Losses and updated params of n train steps of a small UltraMem on a 2x2x2 mesh."""
  cfg = config_lib.load('configs/ultramem.py:tiny', [
      'model.d_model=64', 'model.n_heads=4', 'model.n_kv_heads=2', 'model.d_ff=128',
      'model.max_len=64', 'data.seq_len=16', 'train.batch_size=8', 'model.dtype=float32',
      'model.ultramem.num_values=1024', 'mesh.ici.data=2', 'mesh.ici.fsdp=2',
      'mesh.ici.tensor=2', f'model.ultramem.lookup_impl={impl}',
      f'model.ultramem.lookup_scatter={scatter}', f'model.ultramem.table_split={table_split}'])
  setup = make_setup(cfg, make_mesh(cfg))
  state = init_state(cfg, setup)
  step = make_train_step(setup)
  losses = []
  for i in range(n):
    batch = global_batch(make_batch(8, 16, seed=i), setup.batch_sharding)
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return losses, jax.device_get(state['params'])


@pytest.mark.slow  # 24 s
def test_evaluation_scores_the_model_that_generation_serves():
  """The Tucker vectors a train step leaves are those of its updated cores (they were of
  the cores before the update), and evaluation reads them as `generate` does."""
  cfg = config_lib.load('configs/ultramem.py:tiny', [
      'model.d_model=64', 'model.n_heads=4', 'model.n_kv_heads=2', 'model.d_ff=128',
      'data.seq_len=16', 'train.batch_size=8', 'model.dtype=float32', 'train.lr=0.1',
      'train.warmup_steps=0'])  # large steps: the cores move away from u, v
  setup = make_setup(cfg, make_mesh(cfg))
  state, step = init_state(cfg, setup), make_train_step(setup)
  for i in range(3):
    state, _ = step(state, global_batch(make_batch(8, 16, seed=i), setup.batch_sharding))
  batch = make_batch(8, 16, seed=9)
  model = for_inference(merge_model(setup, state))
  layer = next(m for _, m in nnx.iter_graph(model) if isinstance(m, UltraMem))
  u, v = layer._leading_vectors(layer.u[...])
  np.testing.assert_allclose(layer.u[...], u, atol=1e-6)  # 0.035 apart before the refresh
  np.testing.assert_allclose(layer.v[...], v, atol=1e-6)
  logits = nnx.jit(lambda m, b: m(b['inputs'], b['segment_ids'], b['positions']))(
      model, batch)
  nll, _ = cross_entropy(logits, batch['targets'], batch['segment_ids'] > 0)
  got = make_eval_step(setup, np.ones(cfg.model.vocab_size))(
      state, global_batch(batch, setup.batch_sharding))
  np.testing.assert_allclose(got['nll'], nll, rtol=1e-5)


@pytest.mark.slow  # the kernels themselves are checked against the reference by default
@pytest.mark.parametrize('scatter', ['sorted', 'atomic'])
def test_train_steps_with_pallas_lookup_equal_the_xla_lookup(scatter):
  """The GPU kernels (interpreted) inside the sharded train step: same losses and params."""
  want_losses, want_params = ultramem_steps('xla')
  got_losses, got_params = ultramem_steps('interpret', scatter)
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               got_params, want_params)


@pytest.mark.slow  # 40 s; the layer on a 2x2x2 mesh is checked by default
def test_train_steps_with_the_table_split_by_width_equal_split_by_rows():
  """UltraMem's two table-sharding designs train the same model: same losses and params."""
  want_losses, want_params = ultramem_steps('xla', n=2)
  got_losses, got_params = ultramem_steps('xla', n=2, table_split='width')
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_ive_permutation_is_a_bijection_that_scatters_the_sharers_over_the_grid():
  """E·N virtual values onto N physical ones in E groups: each physical value is shared
  by one virtual value per group, and the sharers lie anywhere on the n'×n' grid (an affine
  map of the flat index would put all of them in one column)."""
  n_values, e = 32 * 32, 4
  side = math.isqrt(n_values * e)
  perm = ultramem.IvePermutation.draw(n_values, e, seed=3)
  virtual = jnp.arange(n_values * e, dtype=jnp.int32)
  physical, group = jax.jit(perm)(virtual)
  flat = np.asarray(group) * n_values + np.asarray(physical)
  assert sorted(flat.tolist()) == list(range(n_values * e))  # a bijection
  sharers = np.argsort(np.asarray(physical), kind='stable').reshape(n_values, e)
  assert (np.sort(np.asarray(group)[sharers], axis=1) == np.arange(e)).all()  # one per group
  columns = sharers % side
  same_column = np.mean([len(set(c)) < e for c in columns])
  assert same_column < 0.2  # random: 1 - (63·62·61)/64³ = 9%; affine in x: 100%
  assert perm == ultramem.IvePermutation.draw(n_values, e, seed=3)  # fixed by the seed


def test_heads_may_share_one_query_in_pairs():
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 32))
  shared = make_layer(num_heads=4, heads_per_query=2)
  assert shared.query_proj.shape == (32, 2, 2, 8)  # two queries for four heads
  q = queries(shared, x)
  np.testing.assert_array_equal(q[:, 0], q[:, 1])
  np.testing.assert_array_equal(q[:, 2], q[:, 3])
  assert not np.allclose(q[:, 1], q[:, 2])
  with pytest.raises(config_lib.ConfigError, match='heads_per_query=3 must be an integer'):
    make_layer(num_heads=4, heads_per_query=3)


def test_the_memory_layers_share_one_lowering_of_the_lookup_kernels(traced_as_on_gpu):
  """The memory layers look up at the same shapes, so lowering the model for CUDA lowers
  the Triton kernels (forward, and the backward's two) once, not once per layer."""
  del traced_as_on_gpu
  cfg = config_lib.load('configs/ultramem.py:tiny', ['model.dtype=bfloat16'])
  assert len(cfg.model.ultramem.placement) == 2
  graphdef, params, rest = nnx.split(models.build(cfg.model, rngs=nnx.Rngs(0)), nnx.Param,
                                     ...)

  def loss(params, tokens):
    model = nnx.merge(graphdef, params, nnx.clone(rest))  # its Tucker vectors change
    return jnp.sum(model(tokens))

  hlo = jax.jit(jax.grad(loss)).trace(params, jnp.zeros((2, 16), jnp.int32)).lower(
      lowering_platforms=('cuda',)).as_text()
  assert hlo.count('xla.gpu.triton') == 3


def test_keys_ranked_in_chunks_read_and_learn_as_one_top_k():
  """`top_k_chunk=16` ranks the 64-key sides and the 8 x 8 grid in chunks of 16
  (kernels/top_k.py): the layer's output and gradients are one top-k's, bit for bit."""
  x = jax.random.normal(jax.random.key(1), (2, 6, 32))
  results = []
  for chunk in (0, 16):
    layer = make_layer(num_values=1024, top_k=8, top_k_chunk=chunk)  # sides of 64 keys
    params, apply = split_apply(layer)
    loss = lambda p: jnp.sum(apply(p, x) ** 2)
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  jax.tree.map(np.testing.assert_array_equal, *results)
  with pytest.raises(config_lib.ConfigError, match=r'model\.ultramem\.top_k_chunk=-1'):
    config_lib.load('configs/ultramem.py:tiny', ['model.ultramem.top_k_chunk=-1'])


# The train steps' check in the slow suite (23 s): the ranking is the layer's, above.
@pytest.mark.slow
def test_keys_ranked_in_chunks_train_as_one_top_k():
  """`model.ultramem.top_k_chunk` ranks the 64-key sides and the 16 x 16 grid in chunks
  of 16 (kernels/top_k.py): two train steps on 4 devices, each ranking its own rows, give
  the same losses and weights as one top-k per ranking, bit for bit."""
  batch = make_batch(8, 32)
  runs = []
  for chunk in (0, 16):
    cfg = config_lib.load('configs/ultramem.py:tiny', [
        f'model.ultramem.top_k_chunk={chunk}', 'model.dtype=float32', 'mesh.ici.data=4',
        'train.batch_size=8', 'data.seq_len=32'])
    assert cfg.model.ultramem.top_k < 16 * 16 < cfg.model.ultramem.num_values
    setup = make_setup(cfg, make_mesh(cfg, devices=jax.devices()[:4]))
    state = init_state(cfg, setup)
    inputs = global_batch(batch, setup.batch_sharding)
    # Compiled as a user's CPU compiles it: the suite's quicker emitters round fused
    # loops by how the two rankings' programs fuse them (the last bit).
    step = make_train_step(setup).lower(state, inputs).compile(
        compiler_options=USER_CPU_COMPILE)
    losses = []
    for _ in range(2):
      state, metrics = step(state, inputs)
      losses.append(float(metrics['loss']))
    runs.append((losses, jax.tree.leaves(state['params'])))
  assert runs[0][0] == runs[1][0]
  for a, b in zip(runs[0][1], runs[1][1]):
    np.testing.assert_array_equal(a, b)
