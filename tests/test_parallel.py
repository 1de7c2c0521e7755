"""Meshes from config, logical-axis rules, and weights that really are sharded."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import mesh_config, tiny_config
from jaxarch import config as config_lib
from jaxarch.layers.attention import Attention
from jaxarch.parallel import data_shard, logical_to_spec, make_mesh, tree_shardings
from jaxarch.parallel.context import logical_mesh
from jaxarch.parallel.ragged import ragged_all_to_all
from jaxarch.train.state import init_state, make_setup


def test_mesh_resolves_minus_one_over_eight_devices():
  mesh = make_mesh(mesh_config(tiny_config(), data=-1, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2, 'expert': 1}


def test_mesh_that_does_not_divide_devices_is_a_config_error():
  with pytest.raises(config_lib.ConfigError, match='mesh'):
    make_mesh(mesh_config(tiny_config(), data=-1, fsdp=3))


def test_rules_map_logical_axes_to_mesh_axes():
  rules = tiny_config().mesh.rules
  assert logical_to_spec(('batch', 'length'), rules) == P(('data', 'fsdp', 'expert'), None)
  assert logical_to_spec(('embed', 'mlp'), rules) == P('fsdp', 'tensor')
  misspelt = (('batch', 'data'), ('embed', 'fsdp'), ('mpl', 'tensor'))
  with pytest.raises(config_lib.ConfigError, match=(
      "^config error: mesh.rules has no entry for logical axis 'mlp', which the model uses "
      r"\(is 'mpl' a misspelling of it\?\)$")):
    logical_to_spec(('embed', 'mlp'), misspelt)


def test_a_dimension_split_over_two_mesh_axes_must_divide_by_their_product():
  """12 rows over data=2 x fsdp=4: 2 divides them, 8 does not; fsdp is dropped, said."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'fsdp'))
  dropped = []
  spec = logical_to_spec(('embed',), [('embed', ('data', 'fsdp'))], (12,), mesh, dropped)
  assert spec == P('data') and dropped == [('embed', 12, 'fsdp')]
  assert logical_to_spec(('embed',), [('embed', ('data', 'fsdp'))], (16,), mesh) == P(
      ('data', 'fsdp'))


def test_mesh_axis_that_does_not_divide_a_dimension_is_dropped():
  mesh = make_mesh(mesh_config(tiny_config(), data=2, tensor=4))
  # 2 kv heads cannot be split 4 ways: replicated along that dimension instead.
  spec = logical_to_spec(('embed', 'kv_heads', 'head_dim'), tiny_config().mesh.rules,
                         (64, 2, 16), mesh)
  assert spec == P('fsdp', None, None)


def test_fsdp_and_tensor_parallelism_really_shard_the_weights():
  cfg = mesh_config(tiny_config(), data=2, fsdp=2, tensor=2)
  setup = make_setup(cfg, make_mesh(cfg))
  state = init_state(cfg, setup)
  gate = state['params']['blocks'][0]['mlp']['gate'].get_value()  # [embed, mlp]
  assert gate.sharding.spec == P('fsdp', 'tensor')
  shard_shapes = {s.data.shape for s in gate.addressable_shards}
  assert shard_shapes == {(gate.shape[0] // 2, gate.shape[1] // 2)}
  # Adam's moments follow their parameter's sharding.
  mu = jax.tree.leaves(state['opt_state'])
  assert any(getattr(x, 'sharding', None) is not None and x.shape == gate.shape and
             x.sharding.spec == P('fsdp', 'tensor') for x in mu)
  q = state['params']['blocks'][0]['attn']['q_proj'].get_value()  # [embed, heads, head_dim]
  assert q.sharding.spec == P('fsdp', 'tensor', None)


def test_batch_is_split_over_data_and_fsdp():
  cfg = mesh_config(tiny_config(), data=2, fsdp=2, tensor=2)
  setup = make_setup(cfg, make_mesh(cfg))
  assert setup.batch_sharding.spec == P(('data', 'fsdp', 'expert'), None)
  batch = np.zeros((8, 32), np.int32)
  from jaxarch.parallel import global_batch  # pylint: disable=g-import-not-at-top
  arr = global_batch({'x': batch}, setup.batch_sharding)['x']
  assert {s.data.shape for s in arr.addressable_shards} == {(2, 32)}


def test_each_process_loads_the_rows_its_devices_hold():
  """Simulated processes (`process_of`): with `tensor` inside a process each process loads
  its own quarter; with one device per process the two of a tensor pair hold the same
  rows and load the same slice; a layout that gives processes unequal rows is refused."""
  cfg = mesh_config(tiny_config(), data=4, tensor=2)
  sharding = make_setup(cfg, make_mesh(cfg)).batch_sharding
  ids = np.vectorize(lambda d: d.id)(make_mesh(cfg).devices)  # [data, fsdp, tensor, expert]
  pair = {i: n for n, i in enumerate(ids.reshape(4, 2).ravel())}  # device -> mesh position
  within = lambda first: (lambda d: (pair[d.id] - first) % 8 // 2)  # tensor pair = process
  assert [data_shard(sharding, 8, within(2 * p))[0] for p in range(4)] == [0, 1, 2, 3]
  assert data_shard(sharding, 8, within(0)) == (0, 4)
  across = lambda first: (lambda d: (pair[d.id] - first) % 8)  # a process per device
  assert [data_shard(sharding, 8, across(p)) for p in range(8)] == [
      (i // 2, 4) for i in range(8)]
  with pytest.raises(ValueError, match='unequal or overlapping rows'):
    data_shard(sharding, 8, lambda d: int(pair[d.id] >= 2))  # 2 rows and 6 rows


def test_a_sequence_sharded_batch_is_loaded_and_placed_by_its_rows():
  """`length` mapped to a mesh axis (sequence sharding; the step runs it): the trainer's
  and bench's `data_shard` raised an IndivisibleError traceback, laying the rows over a
  [batch, 1] array; and processes that hold other columns of the same rows must pass the
  same whole rows (simulated here: a process per tensor index)."""
  from jaxarch.parallel import global_batch  # pylint: disable=g-import-not-at-top
  cfg = mesh_config(tiny_config(), data=4, tensor=2)
  with cfg.unlocked():
    cfg.mesh.rules = tuple((k, 'tensor') if k == 'length' else (k, v)
                           for k, v in cfg.mesh.rules)
  mesh = make_mesh(cfg)
  sharding = make_setup(cfg, mesh).batch_sharding
  assert sharding.spec == P(('data', 'fsdp', 'expert'), 'tensor')
  assert data_shard(sharding, 8) == (0, 1)
  tensor_of = {d.id: t for t in range(2) for d in mesh.devices[:, :, t].ravel()}
  assert data_shard(sharding, 8, lambda d: tensor_of[d.id]) == (0, 1)
  batch = np.arange(8 * 32, dtype=np.int32).reshape(8, 32)
  arr = global_batch({'x': batch}, sharding)['x']
  assert arr.shape == (8, 32)
  for shard in arr.addressable_shards:
    np.testing.assert_array_equal(shard.data, batch[shard.index])


def test_dcn_axes_multiply_the_ici_axes():
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.mesh.ici.update(dict(data=1, fsdp=2, tensor=2, expert=1))
    cfg.mesh.dcn.update(dict(data=2, fsdp=1, tensor=1, expert=1))
  mesh = make_mesh(cfg)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2, 'expert': 1}
  # Each "slice" (a data index) holds one consecutive block of 4 devices.
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  assert sorted(ids[0].ravel()) == [0, 1, 2, 3] and sorted(ids[1].ravel()) == [4, 5, 6, 7]


def test_dcn_axes_that_do_not_match_the_jobs_processes_are_a_config_error():
  # One process with 8 GPUs (stand-ins: only what make_mesh reads before the mesh).
  gpus = [types.SimpleNamespace(platform='gpu', process_index=0, id=i) for i in range(8)]
  cfg = mesh_config(tiny_config(), fsdp=4)
  with cfg.unlocked():
    cfg.mesh.ici.data, cfg.mesh.dcn.data = 1, 2
  with pytest.raises(config_lib.ConfigError,
                     match='mesh.dcn data=2 spans 2 processes but the job has 1'):
    make_mesh(cfg, gpus)


def test_a_large_weight_that_loses_a_mesh_axis_is_reported(caplog):
  """A vocabulary of 50257 (GPT-2) does not divide over tensor=2: its embedding, head and
  their Adam moments are replicated along it, which a user should hear of."""
  cfg = mesh_config(tiny_config(**{'model.vocab_size': 50257, 'model.d_model': 64}),
                    data=4, tensor=2)
  make_setup(cfg, make_mesh(cfg))
  assert "vocab=50257 over tensor=2" in caplog.text and '2 large weights' in caplog.text
  caplog.clear()
  small = mesh_config(tiny_config(**{'model.vocab_size': 385}), data=4, tensor=2)
  make_setup(small, make_mesh(small))  # small weights: replicating them is fine
  assert 'replicated' not in caplog.text


def test_a_data_by_fsdp_step_compiles_without_replicating_activations(capfd):
  """XLA's SPMD partitioner warns when it can reach a layout only by gathering a whole
  tensor. The embedding's rows, laid out like the table's `d` over fsdp, did so on every
  data x fsdp mesh, gathering the whole batch's embeddings and their gradient (at tiny,
  the step's collectives moved 4x the bytes)."""
  from jaxarch.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  cfg = mesh_config(tiny_config(**{'model.d_model': 48, 'model.n_layers': 1}), data=2, fsdp=4)
  setup = make_setup(cfg, make_mesh(cfg))
  state = jax.eval_shape(lambda: init_state(cfg, setup))
  batch = {k: jax.ShapeDtypeStruct((8, 32), np.int32, sharding=setup.batch_sharding)
           for k in ('inputs', 'targets', 'segment_ids', 'positions')}
  capfd.readouterr()
  cached = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)  # XLA warns only when it compiles
  try:
    make_train_step(setup).lower(state, batch).compile()
  finally:
    jax.config.update('jax_enable_compilation_cache', cached)
  assert 'Involuntary full rematerialization' not in capfd.readouterr().err


def test_ici_sizes_that_split_a_tpu_torus_axis_still_make_a_mesh(monkeypatch, caplog):
  """tensor=2 on a 4x4x4 TPU v4 slice is no product of whole torus axes; mesh_utils
  refused it with a NotImplementedError traceback. The mesh splits an axis instead, with a
  warning (MaxText's allow_split_physical_axes)."""
  import itertools  # pylint: disable=g-import-not-at-top
  from jaxarch.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  tpus = [types.SimpleNamespace(platform='tpu', id=i, coords=(x, y, z), core_on_chip=0,
                                device_kind='TPU v4', process_index=i // 4, slice_index=0)
          for i, (z, y, x) in enumerate(itertools.product(range(4), repeat=3))]
  monkeypatch.setattr(mesh_lib, 'Mesh', lambda grid, axes: grid)  # stand-ins: the grid
  cfg = mesh_config(tiny_config(**{'train.batch_size': 64}), data=1, fsdp=-1, tensor=2)
  grid = make_mesh(cfg, tpus)
  assert grid.shape == (1, 32, 2, 1)
  assert sorted(d.id for d in grid.ravel()) == list(range(64))
  assert 'splits physical axes of the device torus' in caplog.text


@pytest.mark.parametrize('spec, key, value, message', [
    ('configs/moe.py:tiny', 'ici', {'data': -1, 'fsdp': 1, 'tensor': 1, 'expert': '2'},
     r"mesh.ici.expert='2' must be a positive int or -1"),
    ('configs/moe.py:tiny', 'dcn', None, 'mesh.dcn=None must be a section of mesh axis sizes'),
    ('configs/dense.py:tiny', 'ici', 8, 'mesh.ici=8 must be a section of mesh axis sizes'),
])
def test_a_hand_edited_mesh_in_config_json_is_a_one_line_error(tmp_path, spec, key, value,
                                                              message):
  """A TypeError or AttributeError traceback before (the MoE check read the sizes first)."""
  import json  # pylint: disable=g-import-not-at-top
  config_lib.save(config_lib.load(spec), tmp_path / 'config.json')
  tree = json.loads((tmp_path / 'config.json').read_text())
  tree['mesh'][key] = value
  (tmp_path / 'config.json').write_text(json.dumps(tree))
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config_lib.load_json(tmp_path / 'config.json'), num_devices=8)


def test_tensor_parallel_attention_with_qkv_biases_and_qk_norm_equals_one_device():
  """The biases are split over `tensor` as their projections' heads, the QK-norm scales
  are whole on every device: with random ones the outputs and gradients on (data=2,
  fsdp=2, tensor=2) are one device's."""
  cfg = mesh_config(tiny_config(), data=2, fsdp=2, tensor=2)
  mesh = make_mesh(cfg)
  layer = Attention(64, 4, 2, 16, qkv_bias=True, qk_norm=True, dtype=jnp.float32,
                    rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(1), 7)
  for key, weight in zip(keys[5:], (layer.q_norm.scale, layer.k_norm.scale)):
    weight[...] = 1 + jax.random.normal(key, weight.shape)
  for key, bias in zip(keys, (layer.q_bias, layer.k_bias, layer.v_bias)):
    bias[...] = jax.random.normal(key, bias.shape)
  x = jax.random.normal(keys[3], (8, 6, 64))
  cot = jax.random.normal(keys[4], (8, 6, 64))
  positions = jnp.broadcast_to(jnp.arange(6), (8, 6))
  segments = jnp.ones((8, 6), jnp.int32)
  graphdef, params = nnx.split(layer, nnx.Param)

  def step(params, x):
    def loss(params):
      out = nnx.merge(graphdef, params)(x, positions, segments)
      return jnp.sum(out * cot), out
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grads

  def sharded(params, x):
    with logical_mesh(mesh, cfg.mesh.rules):
      return step(params, x)

  want = jax.jit(step)(params, x)
  shardings = tree_shardings(params, mesh, cfg.mesh.rules)
  batch = NamedSharding(mesh, P(('data', 'fsdp', 'expert'), None, None))
  got = jax.jit(sharded)(jax.device_put(params, shardings), jax.device_put(x, batch))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  grads = got[1]
  assert grads['q_bias'].get_value().sharding.spec == P('tensor', None)
  assert grads['k_bias'].get_value().sharding.spec == P('tensor', None)
  assert np.abs(np.asarray(grads['v_bias'].get_value())).max() > 0
  assert grads['k_norm']['scale'].get_value().sharding.spec in (P(), P(None))
  assert np.abs(np.asarray(grads['q_norm']['scale'].get_value())).max() > 0


def test_top_k_in_a_mesh_ranks_each_device_s_rows_without_gathering_them():
  """XLA's SPMD partitioner replicates `lax.top_k`: every device gathered the whole batch's
  rows and ranked all of them (the MoE router's gates, UltraMem's key scores: 24 of the
  27 MiB its tiny step gathered per device at fsdp=8). Rows that do not divide over the
  batch axes are ranked as before."""
  from jaxarch.parallel import context  # pylint: disable=g-import-not-at-top
  from jaxarch.train import profile  # pylint: disable=g-import-not-at-top
  cfg = mesh_config(tiny_config(), data=2, fsdp=4)
  mesh = make_mesh(cfg)
  for rows in (64, 6):
    x = jax.random.normal(jax.random.key(0), (rows, 3, 40))

    def top_k(x):
      with logical_mesh(mesh, cfg.mesh.rules):
        return context.top_k(x, 5)
    split = NamedSharding(mesh, P(('data', 'fsdp')) if rows % 8 == 0 else P())
    placed = jax.device_put(x, split)
    compiled = jax.jit(top_k).lower(placed).compile()
    if rows % 8 == 0:
      assert 'all-gather' not in profile.collective_bytes(compiled.as_text())
    for got, want in zip(compiled(placed), jax.lax.top_k(x, 5)):
      np.testing.assert_array_equal(got, want)


def test_emulated_ragged_all_to_all_gives_what_jax_documents():
  """`parallel.ragged` on CPU (no XLA:CPU collective): the example of
  `jax.lax.ragged_all_to_all`'s docstring, on an axis of 2 devices, and its gradient: each
  sent row's cotangent comes back from where it landed."""
  mesh = jax.make_mesh((2,), ('x',), devices=jax.devices()[:2])
  rows = NamedSharding(mesh, P('x'))
  operand = jax.device_put(jnp.array([[1., 2, 2], [3, 4, 0]]), rows)
  plan = [jax.device_put(jnp.array(a), rows) for a in (
      [[0, 1], [0, 1]], [[1, 2], [1, 1]], [[0, 0], [1, 2]], [[1, 1], [2, 1]])]

  def exchange(operand, *plan):
    squeeze = lambda a: a[0]
    return ragged_all_to_all(squeeze(operand), jnp.zeros(4), *map(squeeze, plan),
                             axis_name='x', emulated=True)[None]
  run = jax.shard_map(exchange, mesh=mesh, in_specs=P('x'), out_specs=P('x'))
  np.testing.assert_array_equal(jax.jit(run)(operand, *plan), [[1, 3, 0, 0], [2, 2, 4, 0]])
  weights = jnp.array([[10., 20, 30, 40], [50, 60, 70, 80]])
  grad = jax.jit(jax.grad(lambda o: jnp.sum(run(o, *plan) * weights)))(operand)
  # Device 0 sent 1 to its slot 0 and 2, 2 to device 1's slots 0, 1; device 1 sent 3 to
  # device 0's slot 1 and 4 to its own slot 2; device 1's last row went nowhere.
  np.testing.assert_array_equal(grad, [[10, 50, 60], [20, 70, 0]])
