"""model.scan_layers: the blocks' weights stacked by layer and run by one lax.scan give the
unrolled model's weights, steps, metrics, generations and exports."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import family_config, jitted, make_batch, mesh_config, sharded_copy, tiny_config
from jaxarch import config as config_lib
from jaxarch import cli, infer, models
from jaxarch.export import load_safetensors, write_hf, write_model
from jaxarch.layers.params import grouped_draws
from jaxarch.models import transformer
from jaxarch.parallel import global_batch, make_mesh
from jaxarch.train import throughput
from jaxarch.train.pretrained import load_model
from jaxarch.train.state import init_state, make_setup
from jaxarch.train import step as step_lib
from jaxarch.train.step import make_train_step

# Local and global attention layers alternating: the stack repeats every 2 blocks.
WINDOWED = ('model.sliding_window=4', "model.attention_pattern=('local', 'global')")
CASES = {  # name -> (config spec, overrides, mesh); 5 layers: 2 periods and one unrolled
    'dense': ('configs/dense.py:tiny', ('model.n_layers=5', *WINDOWED, 'model.remat=dots'),
              dict(data=2, fsdp=2, tensor=2)),
    # Experts every other layer, the router bias moved once per step from the step's
    # statistics (`end_step`, per layer), over two microbatches, experts split 4 ways.
    'moe': ('configs/moe.py:tiny', ('model.n_layers=5', "model.block_pattern=('dense', 'moe')",
                                    'model.moe.bias_update_rate=0.01',
                                    'train.grad_accum_steps=2'), dict(data=2, expert=4)),
    'megabyte': ('configs/megabyte.py:tiny', (), dict(data=2, fsdp=2, tensor=2)),
    # Two blocks unrolled, two units of two blocks each with its memory layer (read in the
    # unit's first block, written after its second), one block unrolled; the value tables
    # split over fsdp.
    'ultramem': ('configs/ultramem.py:tiny', ('model.n_layers=7',
                                              'model.ultramem.placement=((2, 3), (4, 5))',
                                              'train.batch_size=8', 'data.seq_len=64'),
                 dict(data=2, fsdp=2, tensor=2)),
}


def _config(case, scan):
  spec, overrides, mesh = CASES[case]
  cfg = config_lib.load(spec, ['model.dtype=float32', *overrides, f'model.scan_layers={scan}'])
  return config_lib.validate(mesh_config(cfg, **mesh))


def _model(cfg):
  """The model of `cfg` as the trainer's initialiser draws it: jitted, normal weights grouped."""
  def build():
    with grouped_draws():
      return models.build(cfg.model, rngs=nnx.Rngs(0))
  return nnx.jit(build)()


def _arrays(model) -> dict:
  """path -> array of the unrolled model's variables (a scanned stack's layers split)."""
  return {path: np.asarray(x) for path, x in transformer.unstacked_arrays(model).items()}


def _same_weights(scanned, unrolled):
  """The scanned model's layers hold the unrolled one's draws, bit for bit."""
  want, got = _arrays(unrolled), _arrays(scanned)
  assert want.keys() == got.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
  assert models.param_counts(scanned) == models.param_counts(unrolled)


@pytest.mark.parametrize('case', ['dense', 'moe'])
def test_a_scanned_stack_holds_the_unrolled_weights_stacked_by_layer(case):
  unrolled, scanned = (_model(_config(case, scan))
                       for scan in (False, True))
  assert [block is None for block in scanned.blocks] == [True] * 4 + [False]  # after 2 periods
  q_proj = scanned.layers[0].attn.q_proj
  assert q_proj.shape[0] == 2 and q_proj.get_metadata()['out_sharding'][0] is None
  _same_weights(scanned, unrolled)


def test_ultramem_scans_its_memory_layers_in_the_units_between_unrolled_blocks():
  """Placed (2, 3) and (4, 5) in 7 blocks: blocks 0-1 unrolled, then 2 units of 2 blocks
  each with its memory layer, then block 6; the weights are the unrolled model's."""
  unrolled, scanned = (_model(_config('ultramem', scan)) for scan in (False, True))
  assert transformer.scanned_layers(_config('ultramem', True).model) == (
      ', layers scanned: 2 periods of 2 blocks and 1 side layer, 3 blocks unrolled')
  # The preset's (0, 2), (1, 3) in 4 blocks fit one unit of all 4 only.
  assert transformer.scanned_layers(config_lib.load('configs/ultramem.py:tiny', [
      'model.scan_layers=True']).model) == (
      ', layers scanned: 1 period of 4 blocks and 2 side layers (a scan of one period '
      'compiles no less than the layers unrolled)')
  # Listed out of block order, the memory layers' indices run backwards: not scanned, said.
  assert transformer.scanned_layers(config_lib.load('configs/ultramem.py:151m', [
      'model.scan_layers=True', 'model.ultramem.placement=((10, 11), (6, 9), (2, 5))']).model
  ).endswith("(the side layers' placement lists its pairs out of block order, so they do "
             'not scan: a new run that lists them by block scans them)')
  assert [block is None for block in scanned.blocks] == [False] * 2 + [True] * 4 + [False]
  assert len(scanned.layers) == 2 and len(scanned.side_layers) == 0
  values = scanned.scanned_side_layers[0].memory.values
  assert values.shape == (2, 4096, 64)
  assert values.get_metadata()['out_sharding'] == (None, 'values', None)
  _same_weights(scanned, unrolled)


def test_the_scan_layout_leaves_fewest_blocks_to_trace():
  """UltraMem 680m's memory layers read every 4 blocks from block 2 and write 3 after:
  5 units of 4 from block 2. A layer outside any unit's pattern runs unrolled before."""
  layout = lambda spec, *overrides: config_lib.scan_layout(
      config_lib.load(spec, ['model.scan_layers=True', *overrides]).model)
  big = layout('configs/ultramem.py:680m')
  assert big.blocks == config_lib.Numbering(24, start=2, period=4, repeats=5)
  assert big.side_layers == config_lib.Numbering(5, start=0, period=1, repeats=5)
  odd = layout('configs/ultramem.py:tiny', 'model.n_layers=12',
               'model.ultramem.placement=((0, 1), (4, 6), (8, 10))')
  assert odd.blocks == config_lib.Numbering(12, start=3, period=4, repeats=2)
  assert odd.side_layers == config_lib.Numbering(3, start=1, period=1, repeats=2)
  assert layout('configs/dense.py:tiny', 'model.n_layers=5').blocks == (
      config_lib.Numbering(5, start=0, period=1, repeats=5))


def test_layers_drawn_with_their_own_std_stack_their_own_draws(monkeypatch):
  """A block of the user's own whose init depends on its depth keeps each layer's
  initialiser when stacked (one program per group of draws: `grouped_draws`)."""
  def deeper_is_smaller(cfg, layer, rngs):
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.init_std = 0.02 / (layer + 1)
    return transformer.dense_block(cfg, layer, rngs)
  monkeypatch.setitem(transformer.BLOCKS, 'dense', deeper_is_smaller)
  want, got = (_arrays(_model(tiny_config(**{'model.n_layers': 4, 'model.scan_layers': scan})))
               for scan in (False, True))
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
  q_proj = [float(np.std(want['blocks', i, 'attn', 'q_proj'])) for i in range(4)]
  np.testing.assert_allclose(q_proj, [0.02 / (i + 1) for i in range(4)], rtol=0.1)


def _steps(cfg, n=3):
  setup = make_setup(cfg, make_mesh(cfg))
  state = init_state(cfg, setup)
  step = make_train_step(setup)
  history = []
  for i in range(n):
    batch = make_batch(cfg.train.batch_size, cfg.data.seq_len, seed=i)
    batch['segment_ids'][:3, 20:] = 0
    state, metrics = step(state, global_batch(batch, setup.batch_sharding))
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()
                    if np.ndim(v) == 0})
  model = nnx.merge(setup.graphdef, state['params'], state['model_state'])
  return history, _arrays(model)


# UltraMem's in the default suite: it scans dense blocks too, in units with memory layers
# beside them. The others in the slow suite. MoE's moves each scanned layer's router bias
# from the step's statistics over microbatches, its experts split; its scanned experts'
# forward equals the unrolled one's in the default suite's BiTA test below. A scanned dense
# run's steps equal the unrolled run's on the same mesh in tests/test_relayout.py's resume
# test, and the local/global period of 2 scans in test_scanned_generation_with_ring_caches'.
# MEGABYTE's two stacks' reads into either layout are tests/test_relayout.py's, and its scan
# is the dense blocks'.
@pytest.mark.parametrize('case', [case if case == 'ultramem' else
                                  pytest.param(case, marks=pytest.mark.slow)
                                  for case in CASES])
def test_scanned_train_steps_equal_the_unrolled_ones_on_a_mesh(case):
  steps = 3 if case == 'moe' else 2  # the second runs on weights the first updated
  want_history, want = _steps(_config(case, False), steps)
  history, got = _steps(_config(case, True), steps)
  for want_metrics, metrics in zip(want_history, history):
    # The same metrics under the same names (each layer's `blocks/<i>/...`), equal to
    # float precision: the scan adds nothing up in another order.
    assert metrics.keys() == want_metrics.keys()
    for key, value in want_metrics.items():
      if key not in ('step_time', 'tokens_per_second'):
        np.testing.assert_allclose(metrics[key], value, rtol=2e-5, atol=1e-6, err_msg=key)
  assert got.keys() == want.keys()
  for path in want:  # weights and the state the steps moved (the router bias)
    np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=1e-5, err_msg=str(path))
  if case == 'moe':  # 3 moves of ±rate each: never back at 0
    bias = [path for path in want if path[-1] == 'bias' and 'mlp' in path]
    assert bias and all(np.all(want[path] != 0) for path in bias)


def test_scanned_generation_with_ring_caches_equals_the_unrolled_one():
  """The caches are stacked by layer as the weights are (a local layer's ring of 3 slots
  beside a global layer's whole context), and written back through the scan."""
  greedy = {}
  for scan in (False, True):
    cfg = family_config('dense', data=2, fsdp=2, tensor=2)
    for override in ('model.sliding_window=3', "model.attention_pattern=('local', 'global')",
                     'model.n_layers=5', f'model.scan_layers={scan}'):
      config_lib.apply_override(cfg, override)
    model = models.build(config_lib.validate(cfg).model, rngs=nnx.Rngs(0))
    mesh, sharded = sharded_copy(model, cfg)
    generator = infer.Generator(sharded, mesh=mesh, rules=cfg.mesh.rules)
    prompts = [[257, 10], [257] + list(range(40, 53)), [257, 7, 8, 9, 3]]
    greedy[scan], _ = generator(prompts, max_new_tokens=10)
    if scan:
      decoder = infer.for_inference(model)
      infer.add_caches(decoder, batch=2, length=32)
      caches = [layer.attn.cache_k.shape[:3] for layer in decoder.layers]
      assert caches == [(2, 2, 3), (2, 2, 32)]  # [repeats, batch, slots, ...]
      assert decoder.blocks[4].attn.cache_k.shape[:2] == (2, 3)  # the local layer after them
  assert greedy[True] == greedy[False]


def test_a_scanned_model_exports_as_the_unrolled_one(tmp_path):
  """Exports hold each layer under its own name (`blocks.i.*`) whatever the layout: the
  same bytes, and a config that loads the unrolled model."""
  written = {}
  for scan in (False, True):
    cfg = _config('dense', scan)
    model = _model(cfg)
    written[scan] = write_model(model, cfg, tmp_path / str(scan))
  for scan in (False, True):
    assert (written[scan] / 'model.safetensors').read_bytes() == (
        written[False] / 'model.safetensors').read_bytes()
  cfg, loaded = load_safetensors(written[True])
  assert cfg.model.scan_layers is False and len(loaded.blocks) == 5


def test_scanned_megabyte_generates_as_the_unrolled_one():
  """Both of MEGABYTE's stacks scanned: the global one's caches over patches, the local
  one's inside the patch."""
  greedy = []
  for scan in (False, True):
    cfg = _config('megabyte', scan)
    generator = infer.Generator(models.build(cfg.model, rngs=nnx.Rngs(0)))
    greedy.append(generator([[257, 10, 11], [257] + list(range(40, 50))], max_new_tokens=9)[0])
  assert greedy[0] == greedy[1]


def test_bita_over_a_scanned_base_predicts_and_drafts_as_over_the_unrolled_one():
  """BiTA's per-layer prompt keys and values go through the scan with their layers, and
  a tree decode keeps each layer's accepted path (`keep_path`, per layer)."""
  outputs, drafted = [], []
  for scan in (False, True):  # (BiTA's layouts have no sliding window: experts repeat)
    base = family_config('moe')
    for override in ('model.n_layers=5', "model.block_pattern=('dense', 'moe')",
                     f'model.scan_layers={scan}'):
      config_lib.apply_override(base, override)
    model_cfg = config_lib.bita_model(base.model, dict(
        num_prompt_tokens=4, num_mask_tokens=3, draft_tree=(5, 4, 3), train_groups=0,
        init_std=0.02))
    model = nnx.jit(lambda: models.build(model_cfg, rngs=nnx.Rngs(0)))()
    batch = {k: jnp.asarray(v) for k, v in make_batch(2, 24).items()}
    outputs.append(nnx.jit(type(model).predictions)(model, batch))
    tokens, stats = infer.Generator(model)([[257, 5, 6, 7], [257, 9]], max_new_tokens=12)
    drafted.append((tokens, stats['forward_passes']))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *outputs)
  assert drafted[0] == drafted[1]


@pytest.mark.parametrize('spec, overrides, error', [
    ('configs/dense.py:tiny', ('model.n_layers=1', *WINDOWED),
     r'period of model.attention_pattern \(2 blocks\), more than model.n_layers=1: no period '
     r'repeats; set model.scan_layers=False'),
    ('configs/moe.py:tiny', ('model.n_layers=4', "model.block_pattern=('dense', 'moe')",
                             *WINDOWED, "model.attention_pattern=('local', 'local', 'global')"),
     r'period of model.block_pattern and model.attention_pattern \(6 blocks\), more than '
     r'model.n_layers=4'),
    ('configs/megabyte.py:tiny', ("model.attention_pattern=('local', 'global')",
                                  'model.sliding_window=8', 'model.megabyte.local.n_layers=1'),
     r'period of model.attention_pattern \(2 blocks\), more than '
     r'model.megabyte.local.n_layers=1'),
    # Windows of 2 or 4 blocks: in each, a memory layer reads in one and writes in another.
    ('configs/ultramem.py:tiny', ('model.n_layers=5', *WINDOWED,
                                  'model.ultramem.placement=((0, 1), (1, 2), (2, 3), (3, 4))'),
     r'no unit of the scan fits the side layers model.ultramem.placement puts between the '
     r'blocks \(a unit of a multiple of 2 blocks'),
    # A run from before 2026-12-07: each memory layer its own IVE permutation.
    ('configs/ultramem.py:tiny', ('model.n_layers=7', 'model.ultramem.placement=((2, 3), (4, 5))',
                                  'model.ultramem.permutation=per_layer'),
     r"model.ultramem.permutation='per_layer' .* keep model.scan_layers=False for this run"),
    ('configs/dense.py:tiny', ('model.scan_layers=yes',), r"model.scan_layers='yes' must be a bool"),
])
def test_a_stack_that_cannot_scan_is_refused_with_the_config(spec, overrides, error):
  """By `config.validate`, before a job is launched (`jaxarch launch` validates only)."""
  with pytest.raises(config_lib.ConfigError, match=error):
    config_lib.validate(config_lib.load(spec, ['model.scan_layers=True', *overrides]))


def test_a_block_s_state_derived_from_its_weights_is_refreshed_per_layer(monkeypatch):
  class Derived(nnx.Module):  # state derived from the weights, as UltraMem's Tucker vectors
    def __init__(self, rngs):
      self.w = nnx.Param(jax.random.normal(rngs.params(), (4,)))
      self.norm = nnx.Variable(jnp.zeros(()))
    def refresh_state(self):
      self.norm[...] = jnp.sqrt(jnp.sum(jnp.square(self.w[...])))
  def block(cfg, layer, rngs):
    block = transformer.dense_block(cfg, layer, rngs)
    block.derived = Derived(rngs)
    return block
  monkeypatch.setitem(transformer.BLOCKS, 'dense', block)
  norms = []
  for scan in (False, True):
    cfg = tiny_config(**{'model.n_layers': 4, 'model.scan_layers': scan})
    setup = make_setup(cfg, make_mesh(cfg))
    state = init_state(cfg, setup)
    model_state = step_lib._refresh_state(setup, state['params'], state['model_state'])
    model = nnx.merge(setup.graphdef, state['params'], model_state)  # as after a step
    norms.append({path: x for path, x in _arrays(model).items() if path[-1] == 'norm'})
  assert norms[0].keys() == norms[1].keys() and len(norms[0]) == 4
  for path, norm in norms[0].items():
    np.testing.assert_allclose(norms[1][path], norm, rtol=1e-6)
    assert norm > 0


def test_layers_of_other_shapes_cannot_be_stacked(monkeypatch):
  def wider_deeper(cfg, layer, rngs):  # a FFN twice as wide from layer 2 on
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.d_ff *= 2 if layer >= 2 else 1
    return transformer.dense_block(cfg, layer, rngs)
  monkeypatch.setitem(transformer.BLOCKS, 'dense', wider_deeper)
  cfg = tiny_config(**{'model.n_layers': 4, 'model.scan_layers': True})
  with pytest.raises(config_lib.ConfigError,
                     match=r'mlp/down of block 2 is float32\[256, 64\], of block 0 '
                     r'float32\[128, 64\]: layers of other shapes do not stack'):
    _model(cfg)


def test_blocks_built_unlike_their_period_cannot_be_stacked(monkeypatch):
  def uneven(cfg, layer, rngs):  # a block of the user's own, wider in its last layer
    block = transformer.dense_block(cfg, layer, rngs)
    block.extra = nnx.Param(jnp.zeros(1)) if layer == cfg.n_layers - 1 else None
    return block
  monkeypatch.setitem(transformer.BLOCKS, 'dense', uneven)
  cfg = tiny_config(**{'model.n_layers': 4, 'model.scan_layers': True})
  with pytest.raises(config_lib.ConfigError, match='block 3 is built unlike block 0'):
    models.build(cfg.model, rngs=nnx.Rngs(0))


def test_an_hf_checkpoint_imports_into_scanned_layers_with_its_logits(tmp_path):
  """`jaxarch import --config.model.scan_layers=True`: each layer read in turn into its
  slice of the stacked weights, in their shards; the run's logits are the checkpoint's."""
  cfg = family_config('moe')  # a Mixtral
  model = models.build(cfg.model, rngs=nnx.Rngs(0))
  write_hf(model, cfg, tmp_path / 'hf')
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}',
                   '--config.model.scan_layers=True', '--config.mesh.ici.fsdp=4']) == 0
  imported_cfg, imported = load_model(tmp_path / 'run')
  assert imported_cfg.model.scan_layers is True
  assert imported.layers[0].mlp.w_gate.shape[0] == cfg.model.n_layers > 1
  tokens = jnp.asarray([[257, 100, 101, 102, 103, 104, 105, 106]], jnp.int32)
  forward = jitted(lambda m, t: m(t))
  np.testing.assert_allclose(forward(imported, tokens), forward(model, tokens), atol=1e-5)


def test_a_checkpoint_whose_layers_overrun_the_period_imports_scanned_with_the_rest_unrolled(
    tmp_path):
  """Gemma 3's layers are periods of 6 and a rest (26 = 4 x 6 + 2): here 5 = 3 + 2. The
  rest stay unrolled, each under its own name, and run after the scan."""
  cfg = family_config('dense')
  for override in ('model.n_layers=5', 'model.sliding_window=4',
                   "model.attention_pattern=('local', 'local', 'global')"):
    config_lib.apply_override(cfg, override)
  model = models.build(config_lib.validate(cfg).model, rngs=nnx.Rngs(0))
  write_hf(model, cfg, tmp_path / 'hf')
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}',
                   '--config.model.scan_layers=True']) == 0
  _, imported = load_model(tmp_path / 'run')
  assert imported.layers[2].attn.q_proj.shape[0] == 1  # one period of 3, then 2 layers
  assert [block is None for block in imported.blocks] == [True] * 3 + [False] * 2
  tokens = jnp.asarray([[257] + list(range(100, 111))], jnp.int32)
  forward = jitted(lambda m, t: m(t))
  np.testing.assert_allclose(forward(imported, tokens), forward(model, tokens), atol=1e-5)


def test_bench_leaves_out_xla_flops_it_would_count_one_period_of_a_scanned_stack():
  """XLA's cost analysis counts a loop's body once: of a scanned stack, one period of
  blocks (for dense tiny, 0.85 of 2.84 GFLOPs). The MFU, from the model's FLOPs, stays."""
  cfg = tiny_config(**{'model.n_layers': 4, 'model.scan_layers': True})
  result = throughput.measure(cfg, steps=1, warmup=1)
  assert result['xla_flops_per_device'] is None and result['xla_flops_over_model'] is None
  assert result['tokens_per_s'] > 0 and result['flops_per_token'] > 0
  assert result['scan_layers'] is True  # the record says which layout it measured


@pytest.mark.parametrize('case, name', [('dense', 'blocks/3/attn/q_proj'),
                                        ('ultramem', 'side_layers/1/memory/values')])
def test_per_parameter_norms_name_each_layer_of_a_scanned_stack(case, name):
  """The non-finite report's statistics (`layer_grad_norms`) are per layer in either
  layout, under the unscanned names (UltraMem's: blocks and memory layers before, in and
  after the scan)."""
  norms = []
  for scan in (False, True):
    params = nnx.state(_model(_config(case, scan)), nnx.Param)
    names, values = step_lib.leaf_names(params), np.asarray(step_lib.leaf_norms(params))
    assert len(names) == len(values) == len(set(names))
    norms.append(dict(zip(names, values)))
  assert norms[0].keys() == norms[1].keys() and name in norms[1]
  for name, norm in norms[0].items():
    np.testing.assert_allclose(norms[1][name], norm, rtol=1e-6, err_msg=name)


def test_the_logged_param_norm_is_the_whole_model_s_in_either_layout():
  """`param_norm` picks the trained parameters' norms out of the per-layer ones."""
  norms = []
  for scan in (False, True):
    cfg = tiny_config(**{'model.n_layers': 4, 'model.scan_layers': scan,
                         'model.dtype': 'float32'})
    setup = make_setup(cfg, make_mesh(cfg))
    batch = make_batch(cfg.train.batch_size, cfg.data.seq_len)
    _, metrics = make_train_step(setup)(init_state(cfg, setup),
                                        global_batch(batch, setup.batch_sharding))
    norms.append(float(metrics['param_norm']))
  np.testing.assert_allclose(norms[1], norms[0], rtol=1e-5)
