"""MoE layer: routing, dropless and capacity paths, expert parallelism, losses, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import (compiled_call, jitted, make_batch, mesh_config, padded_batch,
                      tight_moe_config, tiny_config)
from jaxarch import config as config_lib
from jaxarch import models
from jaxarch.layers.moe import MoE, load_violations, ragged_plan, repeat_rows
from jaxarch.parallel import global_batch, make_mesh, tree_shardings
from jaxarch.parallel.context import logical_mesh
from jaxarch.train.state import init_state, make_setup
from jaxarch.train.step import make_train_step, run_model
from jaxarch.train.step import signals as collect_signals


def make_moe(num_experts=8, top_k=2, d_model=16, expert_d_ff=24, seed=0, **kw):
  return MoE(d_model, num_experts=num_experts, top_k=top_k, expert_d_ff=expert_d_ff,
             dtype=jnp.float32, rngs=nnx.Rngs(seed), **kw)


run = jitted(run_model)  # compiled, as `compiled_call`


def metric(sown, name: str) -> float:
  """A metric the layer (the root module here) reported."""
  return float(collect_signals(sown)[1][name])


def naive(layer: MoE, x):
  """Per token, per chosen expert: weight · SwiGLU_e(x_t), summed in Python."""
  tokens = np.asarray(x.reshape(-1, x.shape[-1]))
  weights, experts = layer.route(jnp.asarray(tokens))
  gate, up, down = (np.asarray(w[...]) for w in (layer.w_gate, layer.w_up, layer.w_down))
  out = np.zeros_like(tokens)
  for t, row in enumerate(tokens):
    for w, e in zip(np.asarray(weights[t]), np.asarray(experts[t])):
      h = jax.nn.silu(row @ gate[e]) * (row @ up[e])
      out[t] += w * np.asarray(h @ down[e])
  return out.reshape(x.shape)


def test_dropless_equals_a_naive_loop_over_the_chosen_experts():
  layer = make_moe()
  x = jax.random.normal(jax.random.key(1), (3, 5, 16))
  np.testing.assert_allclose(compiled_call(layer, x), naive(layer, x), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('gate,renormalize', [('softmax', True), ('sigmoid', True),
                                               ('sigmoid', False)])
def test_routing_equals_a_numpy_top_k_of_gates_plus_bias(gate, renormalize):
  """DESIGN §7.2 in numpy: experts = top-k of gate + bias, weights = their gates (without
  the bias), renormalised if asked; out = Σ weight · SwiGLU_expert(x)."""
  layer = make_moe(top_k=3, gate=gate, renormalize=renormalize)
  layer.bias[...] = 0.3 * jax.random.normal(jax.random.key(7), (8,))
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 5, 16))).reshape(-1, 16)
  router, gate_w, up, down = (np.asarray(w[...], np.float64) for w in (
      layer.router, layer.w_gate, layer.w_up, layer.w_down))
  logits = x @ router
  gates = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True) if gate == 'softmax'
           else 1 / (1 + np.exp(-logits)))
  silu = lambda a: a / (1 + np.exp(-a))
  want = np.zeros_like(x)
  for t in range(len(x)):
    chosen = np.argsort(-(gates[t] + np.asarray(layer.bias[...])))[:3]
    weights = gates[t, chosen] / (gates[t, chosen].sum() if renormalize else 1)
    for w, e in zip(weights, chosen):
      want[t] += w * (silu(x[t] @ gate_w[e]) * (x[t] @ up[e])) @ down[e]
  got = compiled_call(layer, jnp.asarray(x).reshape(2, 5, 16)).reshape(-1, 16)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_shared_experts_add_an_always_on_swiglu():
  layer = make_moe(num_shared_experts=2)
  x = jax.random.normal(jax.random.key(12), (2, 5, 16))
  assert layer.shared.up.shape == (16, 2 * 24)
  np.testing.assert_allclose(compiled_call(layer, x), naive(layer, x) + layer.shared(x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('gate,renormalize', [('softmax', True), ('sigmoid', False)])
def test_capacity_path_with_ample_capacity_equals_dropless(gate, renormalize):
  dropless = make_moe(gate=gate, renormalize=renormalize)
  capacity = make_moe(gate=gate, renormalize=renormalize, capacity_factor=8.0)  # C = T·k
  x = jax.random.normal(jax.random.key(2), (2, 6, 16))
  (out, sown) = run(capacity, x)
  np.testing.assert_allclose(out, compiled_call(dropless, x), rtol=1e-5, atol=1e-5)
  assert metric(sown, 'dropped_fraction') == 0.0


def test_tight_capacity_drops_and_reports_the_dropped_fraction():
  layer = make_moe(num_experts=4, top_k=1, capacity_factor=0.5)  # 2 of 4 slots per expert
  x = jax.random.normal(jax.random.key(3), (1, 16, 16))
  out, sown = run(layer, x)
  dropped = metric(sown, 'dropped_fraction')
  zero_rows = int(jnp.sum(jnp.all(out[0] == 0, axis=-1)))
  assert dropped == zero_rows / 16 and dropped >= 0.5  # dropped tokens add nothing


def test_capacity_is_first_come_first_served_per_sequence():
  """All tokens of a row choose expert 0, which takes 2 per row: each row keeps its first
  two tokens, whatever the other row holds."""
  layer = make_moe(num_experts=4, top_k=1, d_model=4, capacity_factor=1.0)  # 8·1/4 = 2
  layer.router[...] = 10.0 * jnp.eye(4)
  x = jnp.stack([jnp.eye(4)[jnp.zeros(8, int)], jnp.eye(4)[jnp.array([0, 1] * 4)]])
  out, sown = run(layer, x)
  kept = np.any(np.asarray(out) != 0, axis=-1)
  np.testing.assert_array_equal(kept, [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
  assert metric(sown, 'dropped_fraction') == 10 / 16


def test_the_dropped_fraction_counts_only_the_real_tokens_assignments():
  """As `test_capacity_is_first_come_first_served_per_sequence`, with row 0 real for its
  first 3 tokens only: 1 of its 3 real assignments and 4 of row 1's 8 are dropped, 5 of
  11 (counting the padding, which comes last and is dropped first: 10 of 16). The same
  on 8 devices, with the experts split over 4 of them."""
  layer = make_moe(num_experts=4, top_k=1, d_model=4, capacity_factor=1.0)
  layer.router[...] = 10.0 * jnp.eye(4)
  x = jnp.stack([jnp.eye(4)[jnp.zeros(8, int)], jnp.eye(4)[jnp.array([0, 1] * 4)]])
  real = jnp.arange(8)[None, :] < jnp.array([[3], [8]])
  _, sown = run(layer, x, real)
  assert metric(sown, 'dropped_fraction') == pytest.approx(5 / 11)
  cfg = mesh_config(tiny_config(), data=2, expert=4)
  mesh = make_mesh(cfg)
  with logical_mesh(mesh, cfg.mesh.rules):
    _, sown = nnx.jit(run_model)(layer, jnp.tile(x, (4, 1, 1)), jnp.tile(real, (4, 1)))
  assert metric(sown, 'dropped_fraction') == pytest.approx(5 / 11)


def test_tight_capacity_stays_causal_and_independent_of_the_other_rows():
  """Changing token t changes no output before t, and a row's output is the same alone
  or in a batch (GShard's batch-wide top-1-first order breaks both)."""
  layer = make_moe(num_experts=4, top_k=2, capacity_factor=1.0)
  x = jax.random.normal(jax.random.key(5), (2, 24, 16))
  out, sown = run(layer, x)
  out = np.asarray(out)
  assert np.mean(np.all(out == 0, axis=-1)) < 0.5  # some, not all, are dropped
  assert metric(sown, 'dropped_fraction') > 0
  for t in (3, 11, 23):
    changed = np.asarray(run(layer, x.at[:, t].set(
        jax.random.normal(jax.random.key(t), (2, 16))))[0])
    np.testing.assert_array_equal(changed[:, :t], out[:, :t])
    assert not np.allclose(changed[:, t], out[:, t])
  np.testing.assert_array_equal(np.asarray(run(layer, x[1:])[0]), out[1:])


def test_balance_loss_equals_its_formula_on_a_hand_made_routing():
  layer = make_moe(num_experts=4, top_k=1, d_model=4, aux_loss_weight=1.0, z_loss_weight=0.0)
  layer.router[...] = 10.0 * jnp.eye(4)  # token i -> expert argmax(x_i)
  x = jnp.eye(4)[jnp.array([0, 0, 0, 1])][None]  # experts 0, 0, 0, 1
  _, sown = run(layer, x)
  losses, *_ = collect_signals(sown)
  probs = jax.nn.softmax(10.0 * x[0], axis=-1)
  f = jnp.array([0.75, 0.25, 0.0, 0.0])
  want = 4 * jnp.sum(f * probs.mean(0))
  np.testing.assert_allclose(sum(losses.values()), want, rtol=1e-6)
  np.testing.assert_allclose(metric(sown, 'load_e0'), 0.75)
  np.testing.assert_allclose(metric(sown, 'z_loss'),
                             jnp.mean(jax.nn.logsumexp(10.0 * x[0], axis=-1) ** 2), rtol=1e-6)


def test_router_and_every_expert_weight_get_gradients():
  layer = make_moe(num_experts=4, top_k=2)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(4), (4, 8, 16))

  def loss(params):
    out, sown = run_model(nnx.merge(graphdef, params, rest), x)
    return jnp.sum(out ** 2) + sum(collect_signals(sown)[0].values())

  grads = jax.jit(jax.grad(loss))(params)
  for name in ('router', 'w_gate', 'w_up', 'w_down'):
    assert float(jnp.abs(grads[name].get_value()).max()) > 0, name


def test_sort_backward_is_a_gather_not_a_scatter():
  layer = make_moe()
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(5), (2, 8, 16))
  fn = lambda x: jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)
  hlo = jax.jit(jax.grad(fn)).lower(x).as_text()
  # The only scatters left are the router's load count and the inverse permutation's
  # construction (integer, [T·k]); no [T·k, d] float rows are scattered.
  assert 'scatter' not in ''.join(l for l in hlo.splitlines() if 'f32[32,16]' in l
                                  and 'scatter' in l)


def test_bias_balancing_raises_the_bias_of_under_loaded_experts():
  layer = make_moe(num_experts=4, top_k=1, bias_update_rate=0.1)
  layer.router[...] = jnp.zeros_like(layer.router[...]).at[:, 0].set(1.0)
  x = jnp.abs(jax.random.normal(jax.random.key(6), (1, 8, 16)))  # all prefer expert 0
  _, sown = run(layer, x)
  np.testing.assert_array_equal(layer.bias[...], jnp.zeros(4))  # moved by the step, once
  layer.end_step(**collect_signals(sown)[2][''])
  np.testing.assert_allclose(layer.bias[...], [-0.1, 0.1, 0.1, 0.1])
  assert metric(sown, 'bias_spread') == 0.0  # the step routed with the bias before the move
  _, sown = run(layer, x)
  np.testing.assert_allclose(metric(sown, 'bias_spread'), 0.2)


def test_padding_tokens_count_in_no_routing_statistic_nor_the_bias_move():
  # A row's padding (segment 0) carries no loss; it must not pull on the router either.
  layer = make_moe(num_experts=4, top_k=2, bias_update_rate=0.1, z_loss_weight=0.001)
  real = jnp.arange(8)[None, :] < jnp.array([[5], [8]])  # row 0: 3 padding tokens
  x = jax.random.normal(jax.random.key(6), (2, 8, 16))
  noise = jnp.where(real[..., None], x, 5.0 * jax.random.normal(jax.random.key(7), x.shape))

  def statistics(x, real):
    layer.bias[...] = jnp.zeros(4)
    out, sown = run(layer, x, real)
    losses, metrics, statistics, _ = collect_signals(sown)
    layer.end_step(**statistics[''])
    return out, sum(losses.values()), metrics, layer.bias[...]

  out, loss, metrics, bias = statistics(x, real)
  noisy_out, noisy_loss, noisy_metrics, noisy_bias = statistics(noise, real)
  np.testing.assert_allclose(noisy_out[real], out[real], rtol=1e-6)
  np.testing.assert_allclose(noisy_loss, loss, rtol=1e-6)
  for name, value in metrics.items():
    np.testing.assert_allclose(noisy_metrics[name], value, rtol=1e-6, err_msg=name)
  np.testing.assert_array_equal(noisy_bias, bias)
  assert abs(sum(metrics[f'load_e{e}'] for e in range(4)) - 1.0) < 1e-6
  counted = statistics(noise, None)  # the padding counted: the statistics move
  assert not np.allclose(counted[1], loss, rtol=1e-3)


def test_an_assignment_copy_s_gradients_add_up_in_fp32():
  """The tokens' gradient adds each token's k assignment gradients in fp32, rounded once
  to bf16; `jnp.repeat`'s transpose added them in bf16 (measured: 2.3x the error)."""
  x = jax.random.normal(jax.random.key(0), (256, 64)).astype(jnp.bfloat16)
  g = jax.random.normal(jax.random.key(1), (256 * 8, 64)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(repeat_rows(x, 8), jnp.repeat(x, 8, axis=0))
  got = jax.vjp(lambda x: repeat_rows(x, 8), x)[1](g)[0]
  want = g.astype(jnp.float32).reshape(256, 8, 64).sum(1).astype(jnp.bfloat16)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == jnp.bfloat16


def step_on_mesh(layer, x, cot, mesh=None, rules=None):
  """(out, grads) of sum(out · cot); with a mesh, sharded like the trainer shards it."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def fn(params, x):
    def loss(params):
      out = nnx.merge(graphdef, params, rest)(x)
      return jnp.sum(out * cot), out
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grads

  if mesh is None:
    return jax.jit(fn)(params, x)
  shardings = tree_shardings(params, mesh, rules)
  batch = NamedSharding(mesh, P(('data', 'fsdp', 'expert'), None, None))

  def sharded(params, x):
    with logical_mesh(mesh, rules):
      return fn(params, x)
  return jax.jit(sharded)(jax.device_put(params, shardings), jax.device_put(x, batch))


@pytest.mark.parametrize('axes,impl,exchange', [
    (dict(data=2, expert=4), 'xla', 'padded'),
    (dict(fsdp=2, tensor=2, expert=2), 'xla', 'padded'),
    (dict(data=2, expert=4), 'interpret', 'padded'),
    (dict(data=1, tensor=2, expert=4), 'interpret', 'padded'),
    (dict(data=2, expert=4), 'xla', 'ragged_emulated'),
    (dict(fsdp=2, tensor=2, expert=2), 'xla', 'ragged_emulated'),
    (dict(data=1, tensor=2, expert=4), 'interpret', 'ragged_emulated')],
    ids=['data2-expert4', 'fsdp2-tensor2-expert2', 'gpu-kernels', 'gpu-kernels-tensor2',
         'ragged-data2-expert4', 'ragged-fsdp2-tensor2-expert2', 'ragged-gpu-kernels-tensor2'])
def test_dropless_expert_parallel_on_eight_devices_equals_one_device(axes, impl, exchange):
  # 'gpu-kernels': the Pallas grouped matmuls (in the interpreter) inside shard_map;
  # 'ragged': the exchange that sends only the real rows, its collective emulated on CPU.
  cfg = mesh_config(tiny_config(), **axes)
  mesh = make_mesh(cfg)
  x = jax.random.normal(jax.random.key(7), (8, 6, 16))
  cot = jax.random.normal(jax.random.key(8), (8, 6, 16))
  want = step_on_mesh(make_moe(num_experts=8, top_k=2), x, cot)
  layer = make_moe(num_experts=8, top_k=2, matmul_impl=impl, ep_exchange=exchange)
  got = step_on_mesh(layer, x, cot, mesh, cfg.mesh.rules)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  assert got[1]['w_gate'].get_value().sharding.spec[0] == 'expert'


@pytest.mark.parametrize('axes,exchange', [(dict(data=2, expert=4), 'ragged_emulated'),
                                           (dict(expert=8), 'padded'),
                                           (dict(expert=8), 'ragged_emulated')],
                         ids=['ragged-two-per-device', 'padded-one-per-device',
                              'ragged-one-per-device'])
def test_every_token_on_experts_0_and_1_fills_their_buffers_exactly(axes, exchange):
  """The exchanges at their edges, equal to one device: every assignment bound for
  experts 0 and 1. With two experts per device (expert=4) the ragged plan sends all rows
  to device 0, the others receive none; with one (expert=8) a token's two experts differ,
  so each of devices 0 and 1 gets one row per token, the buffers' size (min(k, E/n))."""
  cfg = mesh_config(tiny_config(), **axes)
  layers = [make_moe(num_experts=8, top_k=2, ep_exchange=exchange) for _ in range(2)]
  for layer in layers:
    layer.bias[...] = jnp.array([9.0, 9.0, 0, 0, 0, 0, 0, 0])  # selection: experts 0, 1
  x = jax.random.normal(jax.random.key(9), (8, 6, 16))
  cot = jax.random.normal(jax.random.key(10), (8, 6, 16))
  want = step_on_mesh(layers[0], x, cot)
  got = step_on_mesh(layers[1], x, cot, make_mesh(cfg), cfg.mesh.rules)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_the_ragged_exchange_where_xla_lacks_it_is_an_error():
  cfg = mesh_config(tiny_config(), data=2, expert=4)
  x = jax.random.normal(jax.random.key(9), (8, 6, 16))
  with pytest.raises(ValueError, match=r"ep_exchange='ragged': XLA implements "
                                       r"ragged_all_to_all on GPU and TPU, .* runs on cpu"):
    step_on_mesh(make_moe(ep_exchange='ragged'), x, x, make_mesh(cfg), cfg.mesh.rules)


def _exchange(plans, rows_of, size: int):
  """What `ragged_all_to_all` does with every device's (input offsets, send sizes, output
  offsets, receive sizes): device j's buffer of `size` rows (-1 where none landed)."""
  n = len(plans)
  buffers = [np.full(size, -1) for _ in range(n)]
  for i, (start, sizes, at, _) in enumerate(plans):
    for j in range(n):
      rows = rows_of[i][start[j]:start[j] + sizes[j]]
      assert len(rows) == sizes[j] == plans[j][3][i]  # sent as the receiver expects
      buffers[j][at[j]:at[j] + sizes[j]] = rows
  return buffers


@pytest.mark.parametrize('seed', range(12))
def test_the_ragged_plan_delivers_every_row_to_its_expert_and_back(seed):
  """`ragged_plan` on random loads (empty experts, empty devices): the rows each device
  receives are those of its experts, labelled with their local expert, and sent back,
  each device gets its own rows in their order."""
  rng = np.random.default_rng(seed)
  n, local_e = int(rng.choice([2, 4])), int(rng.integers(1, 4))
  counts = rng.integers(0, 4, (n, n * local_e)) * (rng.random((n, n * local_e)) < 0.7)
  counts[rng.integers(n)] = 0  # a device that routes nothing
  size = int(counts.sum())  # room for everything (the layer sizes it for the worst case)
  plans = [jax.tree.map(np.asarray, ragged_plan(jnp.asarray(counts), jnp.int32(me), size))
           for me in range(n)]
  # Each device's rows, sorted by expert, named (device, place) to follow them.
  rows_of = [np.arange(counts[i].sum()) + 1000 * i for i in range(n)]
  expert_of = {r: e for i in range(n)
               for r, e in zip(rows_of[i], np.repeat(np.arange(n * local_e), counts[i]))}
  received = _exchange([p[0] for p in plans], rows_of, size)
  for j, (buffer, (_, _, local)) in enumerate(zip(received, plans)):
    real = buffer >= 0
    assert real.sum() == counts[:, j * local_e:(j + 1) * local_e].sum()
    assert not real[real.sum():].any()  # the real rows first, then the empty ones
    np.testing.assert_array_equal(local[~real], local_e)
    np.testing.assert_array_equal([expert_of[r] for r in buffer[real]],
                                  j * local_e + local[real])
  returned = _exchange([p[1] for p in plans], [b[b >= 0] for b in received], size)
  for i in range(n):
    np.testing.assert_array_equal(returned[i][:counts[i].sum()], rows_of[i])


def _lowered_for_gpu(exchange: str) -> str:
  """The StableHLO of a MoE layer's forward and gradients on data=2 x expert=4, lowered
  for CUDA."""
  cfg = mesh_config(tiny_config(), data=2, expert=4)
  mesh = make_mesh(cfg)
  graphdef, params, rest = nnx.split(make_moe(matmul_impl='xla', ep_exchange=exchange),
                                     nnx.Param, ...)
  x = jax.device_put(jnp.zeros((8, 6, 16)), NamedSharding(mesh, P(('data', 'expert'))))

  def loss(params, x):
    with logical_mesh(mesh, cfg.mesh.rules):
      return jnp.sum(nnx.merge(graphdef, params, rest)(x))
  placed = jax.device_put(params, tree_shardings(params, mesh, cfg.mesh.rules))
  return jax.jit(jax.grad(loss, argnums=(0, 1))).trace(placed, x).lower(
      lowering_platforms=('cuda',)).as_text()


def test_on_a_gpu_the_ragged_exchange_sends_only_the_real_rows(traced_as_on_gpu):
  """`ep_exchange='ragged'` lowered for CUDA: the rows and their results cross by
  `ragged_all_to_all` (twice forward, twice backward); no padded buffer of rows is sent
  with `all_to_all`, only the plans' integer offsets (in the collective's transpose).
  `'auto'` on a GPU is the padded exchange (see `layers.moe` for why)."""
  del traced_as_on_gpu
  sent_rows = lambda hlo: [line for line in hlo.split('\n') if 'stablehlo.all_to_all' in line
                           and 'xf32>' in line]
  ragged = _lowered_for_gpu('ragged')
  assert ragged.count('custom_call @ragged_all_to_all') == 4
  assert not sent_rows(ragged)
  padded = _lowered_for_gpu('auto')
  assert 'ragged_all_to_all' not in padded and len(sent_rows(padded)) == 4


def test_the_mosaic_interpreter_on_several_devices_is_an_error_not_a_hang():
  """Pallas' Mosaic GPU interpreter deadlocks inside shard_map over several CPU devices
  (test_grouped_matmul runs the Mosaic layer on one device)."""
  cfg = mesh_config(tiny_config(), data=2, expert=4)
  x = jax.random.normal(jax.random.key(7), (8, 6, 16), jnp.bfloat16)
  layer = MoE(16, num_experts=8, top_k=2, expert_d_ff=24, dtype=jnp.bfloat16,
              matmul_impl='interpret_mosaic', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'interpret_mosaic' runs on one device: .*\(this mesh "
                                       r"has 8\); use 'interpret'"):
    step_on_mesh(layer, x, x, make_mesh(cfg), cfg.mesh.rules)


def test_capacity_path_across_expert_shards_equals_dropless_with_ample_capacity():
  cfg = mesh_config(tiny_config(), data=2, expert=4)
  mesh = make_mesh(cfg)
  x = jax.random.normal(jax.random.key(9), (8, 6, 16))
  cot = jax.random.normal(jax.random.key(10), (8, 6, 16))
  want = step_on_mesh(make_moe(), x, cot)
  got = step_on_mesh(make_moe(capacity_factor=8.0), x, cot, mesh, cfg.mesh.rules)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('capacity_factor,tokens', [(8.0, 6), (None, 1)],
                         ids=['capacity', 'decode-size'])
def test_experts_split_over_tensor_by_hidden_units_equal_one_device(capacity_factor, tokens):
  """tensor=2 halves every expert's hidden units on each device; outputs are summed."""
  cfg = mesh_config(tiny_config(), data=4, tensor=2)
  mesh = make_mesh(cfg)
  x = jax.random.normal(jax.random.key(12), (8, tokens, 16))
  cot = jax.random.normal(jax.random.key(13), (8, tokens, 16))
  want = step_on_mesh(make_moe(), x, cot)
  got = step_on_mesh(make_moe(capacity_factor=capacity_factor), x, cot, mesh, cfg.mesh.rules)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  assert got[1]['w_down'].get_value().sharding.spec[1] == 'tensor'


def per_device_flops(axes) -> float:
  """XLA's FLOPs per device of the layer's forward and backward on 8 devices."""
  cfg = mesh_config(tiny_config(), **axes)
  mesh = make_mesh(cfg)
  graphdef, params, rest = nnx.split(make_moe(expert_d_ff=64), nnx.Param, ...)
  x = jax.random.normal(jax.random.key(14), (8, 64, 16))

  def loss(params, x):
    with logical_mesh(mesh, cfg.mesh.rules):
      return jnp.sum(nnx.merge(graphdef, params, rest)(x))
  placed = jax.device_put(params, tree_shardings(params, mesh, cfg.mesh.rules))
  x = jax.device_put(x, NamedSharding(mesh, P(('data', 'fsdp', 'expert'), None, None)))
  cost = jax.jit(jax.grad(loss)).lower(placed, x).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops']


def test_tensor_parallel_devices_do_not_repeat_each_others_expert_work():
  """tensor=2 holds twice the tokens of data=2 per device and half of each expert: the
  same FLOPs (before hidden-unit parallelism: twice, 33.3M against 16.7M)."""
  split = per_device_flops(dict(data=1, tensor=2, expert=4))
  assert split / per_device_flops(dict(data=2, expert=4)) < 1.1  # measured 1.02


def test_tensor_parallel_experts_sum_the_tokens_gradient_once():
  """Hidden units split over tensor=8: the backward sums the tokens' gradient [T, d] over
  the devices once (and the routing weights' [T, k]). Each projection that read the
  tokens summed its own before, per assignment: 2·k [T, d], 3.7x the bytes at k=2."""
  from jaxarch.train import profile  # pylint: disable=g-import-not-at-top
  cfg = mesh_config(tiny_config(), tensor=8)
  mesh = make_mesh(cfg)
  layer = make_moe(expert_d_ff=64)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(15), (8, 64, 16))

  def loss(params, x):
    with logical_mesh(mesh, cfg.mesh.rules):
      return jnp.sum(nnx.merge(graphdef, params, rest)(x))
  placed = jax.device_put(params, tree_shardings(params, mesh, cfg.mesh.rules))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(placed, x).compile()
  t, d, k = 8 * 64, 16, layer.top_k
  summed = profile.collective_bytes(compiled.as_text())['all-reduce']
  assert summed <= (t * d + t * k) * 4 + 64, summed  # + a few scalars


def test_bounded_expert_parallel_buffers_drop_the_overflow_causally():
  """Each sequence fills its rows of a shard's buffer first come first served: changing
  token t changes no output before t, nor another row's (ranking the device's
  assignments by expert let later tokens push earlier ones out)."""
  cfg = mesh_config(tiny_config(), data=2, expert=4)
  mesh = make_mesh(cfg)
  layer = make_moe(num_experts=8, top_k=2, ep_capacity_factor=0.5)
  layer.router[...] = 2.0 * jax.random.normal(jax.random.key(3), (16, 8))  # uneven loads
  x = jax.random.normal(jax.random.key(11), (16, 6, 16))  # 2 rows per device
  run = nnx.jit(run_model)
  with logical_mesh(mesh, cfg.mesh.rules):
    out, sown = run(layer, x)
    assert metric(sown, 'dropped_fraction') > 0.3  # measured 0.44
    for t in (2, 5):
      changed, _ = run(layer, x.at[:, t].set(3.0 * jax.random.normal(jax.random.key(t),
                                                                      (16, 16))))
      np.testing.assert_array_equal(changed[:, :t], out[:, :t])
      assert not np.allclose(changed[:, t], out[:, t])
    others, _ = run(layer, x.at[1::2].set(jax.random.normal(jax.random.key(12), (8, 6, 16))))
    np.testing.assert_array_equal(others[::2], out[::2])


def test_invalid_moe_configs_are_one_line_errors():
  with pytest.raises(config_lib.ConfigError, match=r'model\.moe\.top_k=9 must be <= '):
    config_lib.load('configs/moe.py:tiny', ['model.moe.top_k=9'])
  with pytest.raises(config_lib.ConfigError, match=r'divisible by the expert mesh axis'):
    config_lib.validate(config_lib.load('configs/moe.py:tiny', [
        'model.moe.num_experts=6', 'mesh.ici.expert=4', 'mesh.ici.data=2']), 8)
  with pytest.raises(config_lib.ConfigError, match=r"ep_exchange='ragged' sends every row "):
    config_lib.load('configs/moe.py:tiny', ['model.moe.ep_exchange=ragged',
                                            'model.moe.ep_capacity_factor=1.0'])
  with pytest.raises(config_lib.ConfigError, match=r'model\.moe\.ep_exchange'):
    config_lib.load('configs/moe.py:tiny', ['model.moe.ep_exchange=sparse'])
  with pytest.raises(config_lib.ConfigError, match=r'model\.moe\.gate'):
    config_lib.load('configs/moe.py:tiny', ['model.moe.gate=relu'])
  with pytest.raises(config_lib.ConfigError, match=r'model\.moe\.renormalize=True with '):
    config_lib.load('configs/moe.py:tiny', ['model.moe.top_k=1'])
  config_lib.load('configs/moe.py:tiny', ['model.moe.top_k=1', 'model.moe.renormalize=False'])
  for tiling in ('(64, 128, 64, 4)', '(48, 128, 64, 4, 3)', '(64, 128, 8, 4, 3)',
                 '(64, 128, 64, 64, 3)', '(64, 128, 64, 4, 0)', '(64, 128, 64, 4, 3, 2)',
                 '(64, 128, 64, 4, 3, 1, 1)'):
    with pytest.raises(config_lib.ConfigError,
                       match=r'model\.moe\.kernel_tiling=.* must be \(block_m, block_n, '):
      config_lib.load('configs/moe.py:tiny', [f'model.moe.kernel_tiling={tiling}'])
  for tiling in ('(64, 128, 64, 4, 3)', '(64, 128, 64, 4, 3, 1)'):  # order 0 if unsaid
    config_lib.load('configs/moe.py:tiny', [f'model.moe.kernel_tiling={tiling}'])
  for tiling in ('(128, 128, 64, 4)', '(96, 128, 64, 4, 8)', '(128, 256, 64, 4, 8)',
                 '(128, 128, 16, 4, 8)',
                 '(128, 128, 64, 1, 8)', '(128, 128, 64, 4, 0)'):
    with pytest.raises(config_lib.ConfigError, match=r'model\.moe\.mosaic_tiling=.* must be '
                                                     r'\(block_m, block_n, block_k, max_conc'):
      config_lib.load('configs/moe.py:tiny', [f'model.moe.mosaic_tiling={tiling}'])
  with pytest.raises(config_lib.ConfigError, match=r"matmul_impl='mosaic': the Mosaic GPU "
                                                   r'kernels multiply bfloat16 .* model\.dtype='):
    config_lib.load('configs/moe.py:tiny', ['model.moe.matmul_impl=mosaic',
                                            'model.dtype=float32'])
  with pytest.raises(config_lib.ConfigError, match=r"mosaic_weight_grad='mosaic' runs on a "
                                                   r"GPU only .*matmul_impl='interpret_mosaic'"):
    config_lib.load('configs/moe.py:tiny', ['model.moe.mosaic_weight_grad=mosaic',
                                            'model.moe.matmul_impl=interpret_mosaic',
                                            'model.dtype=bfloat16'])


def test_the_configured_kernel_tiling_is_what_the_gpu_kernels_launch_with(traced_as_on_gpu):
  """`model.moe.kernel_tiling` reaches every Triton launch of the model (lowered for
  CUDA: running needs a GPU); the default tiling is not used anywhere. Every layer calls
  the kernels at the same shapes, so their lowerings are shared: lowering a model costs
  its shapes' kernels, not its layers'."""
  del traced_as_on_gpu
  cfg = config_lib.load('configs/moe.py:tiny', ['model.dtype=bfloat16', 'model.n_layers=3',
                                                'model.moe.kernel_tiling=(32, 64, 32, 8, 2)'])
  graphdef, state = nnx.split(models.build(cfg.model, rngs=nnx.Rngs(0)))
  loss = lambda state, tokens: jnp.sum(nnx.merge(graphdef, state)(tokens))
  hlo = jax.jit(jax.grad(loss)).trace(state, jnp.zeros((2, 16), jnp.int32)).lower(
      lowering_platforms=('cuda',)).as_text()
  launches = hlo.count('xla.gpu.triton')
  # forward, input and weight gradients of two shapes (gate and up: d -> f; down: f -> d)
  assert launches == 6
  assert hlo.count('num_warps = 8 : i32') == hlo.count('num_stages = 2 : i32') == launches


def test_the_configured_mosaic_tiling_is_what_the_mosaic_kernels_get(traced_as_on_gpu,
                                                                     monkeypatch):
  """`model.moe.matmul_impl=mosaic`: each projection's product and input gradient lower to
  jax's Mosaic GPU ragged dot with `model.moe.mosaic_tiling`, its weight gradient to
  Triton's kernel (lowered for CUDA: running needs a Hopper GPU)."""
  del traced_as_on_gpu
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # pylint: disable=g-import-not-at-top
  calls, kernel = [], ragged_dot_mgpu.ragged_dot
  monkeypatch.setattr(ragged_dot_mgpu, 'ragged_dot',
                      lambda *args, **kw: calls.append(kw) or kernel(*args, **kw))
  cfg = config_lib.load('configs/moe.py:tiny', [
      'model.dtype=bfloat16', 'model.n_layers=1', 'model.moe.matmul_impl=mosaic',
      'model.moe.mosaic_tiling=(64, 192, 32, 3, 2)'])
  graphdef, state = nnx.split(models.build(cfg.model, rngs=nnx.Rngs(0)))
  loss = lambda state, tokens: jnp.sum(nnx.merge(graphdef, state)(tokens))
  hlo = jax.jit(jax.grad(loss)).trace(state, jnp.zeros((2, 16), jnp.int32)).lower(
      lowering_platforms=('cuda',)).as_text()
  # Product and input gradient (Mosaic), weight gradient (Triton) of the two shapes
  # (gate and up: d -> f; down: f -> d), each lowered once.
  assert hlo.count('custom_call @mosaic_gpu') == 4 and hlo.count('xla.gpu.triton') == 2
  fields = ('block_m', 'block_n', 'block_k', 'max_concurrent_steps', 'grid_block_n')
  assert calls and {tuple(kw[f] for f in fields) for kw in calls} == {
      (64, 192, 32, 3, 2)}


def test_moe_train_step_reports_load_losses_and_dropped_fraction():
  cfg = config_lib.load('configs/moe.py:tiny', [
      'model.d_model=32', 'model.n_heads=2', 'model.n_kv_heads=2', 'model.n_layers=2',
      'model.moe.expert_d_ff=32', 'data.seq_len=16', 'train.batch_size=8',
      'mesh.ici.data=2', 'mesh.ici.expert=4', 'model.moe.bias_update_rate=0.01',
      'model.remat=full'])  # the bias update also survives rematerialisation
  setup = make_setup(cfg, make_mesh(cfg))
  state = init_state(cfg, setup)
  step = make_train_step(setup)
  batch = make_batch(8, 16, seed=0)
  batch['segment_ids'][:3, 6:] = 0  # padding: the aux losses are means over real tokens
  losses, spreads = [], []
  for i in range(3):
    bias = state['model_state']['blocks'][1]['mlp']['bias'].get_value()
    spread = float(bias.max() - bias.min())  # read before the step donates the state
    state, metrics = step(state, global_batch(batch, setup.batch_sharding))
    losses.append(float(metrics['loss']))
    spreads.append((float(metrics['blocks/1/mlp/bias_spread']), spread))
  assert losses[-1] < losses[0]
  assert spreads[0] == (0.0, 0.0) and spreads[1][0] > 0  # the bias each step routed with
  np.testing.assert_allclose(*zip(*spreads), rtol=1e-6)
  moe = cfg.model.moe
  for layer in (0, 1):
    assert float(metrics[f'aux_loss/blocks/{layer}/mlp']) == pytest.approx(
        moe.aux_loss_weight * float(metrics[f'blocks/{layer}/mlp/balance_loss'])
        + moe.z_loss_weight * float(metrics[f'blocks/{layer}/mlp/z_loss']), rel=1e-5)
  loads = [float(metrics[f'blocks/0/mlp/load_e{e}']) for e in range(8)]
  np.testing.assert_allclose(sum(loads), 1.0, rtol=1e-5)
  for name in ('balance_loss', 'z_loss', 'dropped_fraction'):
    assert f'blocks/1/mlp/{name}' in metrics
  bias = state['model_state']['blocks'][0]['mlp']['bias'].get_value()
  assert float(jnp.abs(bias).max()) > 0  # updated outside the gradient, kept in the state


def test_the_router_bias_moves_once_per_step_by_the_whole_batch_with_microbatches():
  """Two microbatches both route with the step's bias, and the step moves it once, by the
  sign of the whole batch's load: as a step without microbatches does (not twice, nor by
  the mean of the microbatches' signs, which is 0 where they disagree)."""
  overrides = ['model.d_model=32', 'model.n_heads=2', 'model.n_kv_heads=2',
               'model.n_layers=1', 'model.moe.expert_d_ff=32', 'data.seq_len=16',
               'model.dtype=float32', 'mesh.ici.data=4', 'model.moe.bias_update_rate=0.01']

  def bias_after_one_step(batch, accum):
    cfg = config_lib.load('configs/moe.py:tiny', overrides + [
        f'train.batch_size={len(batch["inputs"])}', f'train.grad_accum_steps={accum}'])
    setup = make_setup(cfg, make_mesh(cfg, devices=jax.devices()[:4]))
    state, _ = make_train_step(setup)(init_state(cfg, setup),
                                      global_batch(batch, setup.batch_sharding))
    return state['model_state']['blocks'][0]['mlp']['bias'].get_value()

  batch = make_batch(8, 16, seed=1)
  one_step = bias_after_one_step(batch, accum=1)
  np.testing.assert_allclose(np.abs(one_step), 0.01)  # no expert at exactly the mean load
  np.testing.assert_allclose(bias_after_one_step(batch, accum=2), one_step, atol=1e-7)


def test_a_logged_window_has_each_moe_layer_s_max_violation_per_step_averaged():
  """64 `load_e<i>` keys per layer said little at a glance: `max_violation` (MaxVio) is
  the busiest expert's share over the balanced one, less 1, of each step, then averaged
  over the logging window like the other metrics."""
  from jaxarch.train import trainer  # pylint: disable=g-import-not-at-top
  step = lambda first, second, loss: {
      'blocks/1/mlp/load_e0': first, 'blocks/1/mlp/load_e1': second,
      'blocks/3/mlp/load_e0': 0.5, 'blocks/3/mlp/load_e1': 0.5, 'loss': loss,
      'nonfinite': False}
  logged = trainer._window_metrics([step(0.75, 0.25, 2.0), step(0.25, 0.75, 1.0)])
  assert logged['blocks/1/mlp/max_violation'] == pytest.approx(0.5)  # not 0: the loads' mean
  assert logged['blocks/3/mlp/max_violation'] == 0.0  # balanced
  assert logged['loss'] == 1.5 and 'max_violation' not in logged
  assert load_violations({'loss': 1.0, 'blocks/0/mlp/dropped_fraction': 0.0}) == {}


def test_an_evaluation_reports_each_moe_layer_s_balance_and_drops_on_the_held_out_tokens():
  """`eval_max_violation/<layer>` (MaxVio of the loads over every evaluated token) and
  `eval_dropped_fraction/<layer>`, the whole batch's however many microbatches it runs in
  (padded rows left out): routing on held-out data was not reported at all."""
  from jaxarch.train import step as step_lib  # pylint: disable=g-import-not-at-top
  batch = padded_batch()
  summaries = {}
  for accum in (1, 2):
    cfg = tight_moe_config(accum, n_layers=2)
    setup = make_setup(cfg, make_mesh(cfg, devices=jax.devices()[:1]))
    state = init_state(cfg, setup)
    sums = step_lib.make_eval_step(setup, np.ones(cfg.model.vocab_size))(
        state, global_batch(batch, setup.batch_sharding))
    summaries[accum] = step_lib.summarize_eval(jax.device_get(sums))
  metrics = jax.jit(lambda state, batch: step_lib._forward(  # one forward, as served
      setup, state['params'], state['model_state'], batch, deterministic=True)[2])(
          state, global_batch(batch, setup.batch_sharding))
  for layer in ('blocks/0/mlp', 'blocks/1/mlp'):
    want = load_violations(jax.device_get(metrics))[f'{layer}/max_violation']
    assert want > 0
    for summary in summaries.values():
      assert summary[f'eval_max_violation/{layer}'] == pytest.approx(want, rel=1e-5)
      assert summary[f'eval_dropped_fraction/{layer}'] == pytest.approx(
          float(metrics[f'{layer}/dropped_fraction']), rel=1e-5)
  assert summaries[1][f'eval_dropped_fraction/blocks/0/mlp'] > 0
  assert set(summaries[2]) == {'eval_loss', 'eval_bpb', 'eval_tokens', *(
      f'eval_{name}/blocks/{i}/mlp' for name in ('max_violation', 'dropped_fraction')
      for i in (0, 1))}  # the loads summed up as the balance, not one by one
  assert not any('violation' in key for key in step_lib.summarize_eval(
      {'nll': 1.0, 'tokens': 1.0, 'bytes': 1.0}))  # a dense model's eval: none
