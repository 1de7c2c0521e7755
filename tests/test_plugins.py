"""Blocks and families of the user's own, registered from outside jaxarch: the config
accepts them, the model builds them, and the `jaxarch` command imports them as plugins."""

import json
import sys

import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import tiny_config
from jaxarch import cli, models
from jaxarch import config as config_lib
from jaxarch.export.huggingface import check_exportable
from jaxarch.export.weights import ExportError
from jaxarch.models.transformer import (BLOCKS, SIDE_LAYERS, DenseBlock, Transformer,
                                        dense_block)


@pytest.fixture(autouse=True)
def registries():
  """Each test's registrations are undone after it."""
  saved = [(r, dict(r)) for r in (BLOCKS, SIDE_LAYERS, models.FAMILIES,
                                  config_lib.BLOCK_CHECKS, config_lib.FAMILY_CHECKS)]
  kinds = list(config_lib.SIDE_LAYER_KINDS)
  yield
  for registry, before in saved:
    registry.clear()
    registry.update(before)
  config_lib.SIDE_LAYER_KINDS[:] = kinds


class ScaledMLPBlock(DenseBlock):
  """A dense block whose MLP output is halved: another block, the same weights."""

  def ffn(self, x, normed, segment_ids):
    return x + 0.5 * self.mlp(normed)


def scaled_mlp_block(cfg, layer, rngs):
  block = dense_block(cfg, layer, rngs)
  return ScaledMLPBlock(block.attn, block.mlp, cfg.d_model, eps=cfg.norm_eps,
                        dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


def positive_halving(cfg):
  if cfg.model.halved.factor <= 0:
    raise config_lib.ConfigError(f'model.halved.factor={cfg.model.halved.factor} must be > 0')


def test_a_registered_block_is_accepted_by_the_config_and_built():
  models.register_block('halved')(scaled_mlp_block)
  cfg = config_lib.load('configs/dense.py:tiny', ["model.block_pattern=('halved', 'dense')",
                                                  'model.dtype=float32'])
  model = models.build(cfg.model, rngs=nnx.Rngs(0))
  assert [type(b) for b in model.blocks][:2] == [ScaledMLPBlock, DenseBlock]
  assert model(jnp.ones((1, 8), jnp.int32)).shape == (1, 8, cfg.model.vocab_size)


def test_a_registered_block_s_checks_run_on_its_own_section():
  models.register_block('halved', checks=(positive_halving,))(scaled_mlp_block)
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.model.block_pattern = ('halved',)
  with pytest.raises(config_lib.ConfigError, match=r'has .halved. blocks, whose settings '
                     r'\(model.halved\) this config lacks'):
    config_lib.validate(cfg)
  with cfg.unlocked():
    cfg.model.halved = config_lib.ConfigDict({'factor': 0.0})
  with pytest.raises(config_lib.ConfigError, match=r'model.halved.factor=0.0 must be > 0'):
    config_lib.validate(cfg)
  cfg.model.halved.factor = 0.5
  config_lib.validate(cfg)


class Adapter(nnx.Module):
  """A side layer of one's own: x [b, t, d] -> a rank-2 update [b, t, d]."""

  def __init__(self, d, *, rngs):
    self.down = nnx.Param(jnp.full((d, 2), 0.1))
    self.up = nnx.Param(jnp.full((2, d), 0.1))

  def __call__(self, x, positions, segment_ids, layout=None):
    return x @ self.down[...] @ self.up[...]


@pytest.mark.parametrize('pair', [(1, 0), (0, 2)])
def test_a_side_layer_of_one_s_own_placed_outside_the_stack_is_one_line(pair):
  SIDE_LAYERS['adapter'] = lambda cfg, index, rngs: Adapter(cfg.d_model, rngs=rngs)
  cfg = tiny_config()  # 2 blocks
  with cfg.unlocked():
    cfg.model.adapter = config_lib.ConfigDict({'placement': ((0, 1),)})
  model = models.build(cfg.model, rngs=nnx.Rngs(0))
  assert model.placement == (('adapter', 0, 1),)
  cfg.model.adapter.placement = (pair,)
  with pytest.raises(config_lib.ConfigError, match=rf'model.adapter.placement holds '
                     rf'\({pair[0]}, {pair[1]}\), which must be \(read, write\) with 0 <= read '
                     r'<= write < model.n_layers=2'):
    models.build(cfg.model, rngs=nnx.Rngs(0))


class Tempered(Transformer):
  """A family of one's own: the transformer with a learned logit temperature."""

  def __init__(self, cfg, *, rngs):
    super().__init__(cfg, rngs=rngs)
    self.temperature = nnx.Param(jnp.full((), 2.0))

  def logits(self, x):
    return super().logits(x) * self.temperature[...]


def test_a_registered_family_is_accepted_by_the_config_and_built():
  models.register_family('tempered', Tempered)
  cfg = config_lib.load('configs/dense.py:tiny', ['model.family=tempered',
                                                  'model.dtype=float32'])
  model = models.build(cfg.model, rngs=nnx.Rngs(0))
  assert isinstance(model, Tempered)
  # The dense family's checks by default: the decoder stack's shape.
  with pytest.raises(config_lib.ConfigError, match='head dimension 25 .* must be even'):
    config_lib.load('configs/dense.py:tiny', ['model.family=tempered', 'model.d_model=100'])


def test_an_unknown_block_or_family_says_how_to_register_one():
  for override, call in (("model.block_pattern=('halved',)", 'register_block'),
                         ('model.family=tempered', 'register_family')):
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.load('configs/dense.py:tiny', [override])
    assert f'jaxarch.models.{call}' in str(e.value) and 'jaxarch.plugins' in str(e.value)
    assert '\n' not in str(e.value)


def test_hf_export_refuses_blocks_and_families_of_one_s_own_in_one_line():
  for key, value in (('block_pattern', ('halved', 'dense')), ('family', 'tempered')):
    cfg = tiny_config()
    with cfg.unlocked():
      cfg.model[key] = value
    with pytest.raises(ExportError, match='of your own.*use --format=safetensors'):
      check_exportable(cfg)


def _installed_plugin(root, module: str, source: str):
  """`root` as a site directory holding `module` and a distribution whose
  `jaxarch.plugins` entry point names it, as `pip install` of the user's package leaves."""
  (root / f'{module}.py').write_text(source)
  info = root / f'{module}-0.1.dist-info'
  info.mkdir()
  (info / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n')
  (info / 'entry_points.txt').write_text(f'[jaxarch.plugins]\n{module} = {module}\n')


def test_the_command_imports_plugins_before_it_reads_a_config(tmp_path, monkeypatch, capsys):
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.model.block_pattern = ('plugged',)
  config_lib.save(cfg, tmp_path / 'config.json')
  bench = ['bench', 'memory', f'--config={tmp_path / "config.json"}',
           f'--workdir={tmp_path / "bench"}', '--state_only']
  site = tmp_path / 'site'
  site.mkdir()
  _installed_plugin(site, 'jaxarch_test_plugin', (
      'from jaxarch.models import register_block\n'
      'from jaxarch.models.transformer import dense_block\n'
      "register_block('plugged')(dense_block)\n"))
  monkeypatch.syspath_prepend(str(site))
  monkeypatch.delitem(sys.modules, 'jaxarch_test_plugin', raising=False)
  assert cli.main(bench) == 0, capsys.readouterr().err
  assert json.loads((tmp_path / 'bench' / 'bench_memory.json').read_text())['params_total'] > 0


def test_a_plugin_that_fails_to_import_is_one_line(tmp_path, monkeypatch, capsys):
  _installed_plugin(tmp_path, 'jaxarch_broken_plugin', 'raise RuntimeError("no GPU here")\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, 'jaxarch_broken_plugin', raising=False)
  assert cli.main(['eval', f'--workdir={tmp_path / "run"}']) == 2
  err = capsys.readouterr().err
  assert err == ("jaxarch: plugin jaxarch_broken_plugin = 'jaxarch_broken_plugin' (entry point "
                 'group jaxarch.plugins of jaxarch_broken_plugin) failed to import: '
                 'RuntimeError: no GPU here\n')


def test_a_side_layer_section_that_no_code_registered_is_refused():
  """Its layers were left out of the model without a word: a plugin not loaded, or a
  misspelt section (model.adaptor), trained a plain dense model."""
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.model.adaptor = config_lib.ConfigDict({'placement': ((0, 1),)})
  with pytest.raises(config_lib.ConfigError, match=r'model.adaptor.placement places side '
                     r'layers of a kind no code registered \(side layers: ultramem\), or the '
                     r'section.s name is misspelt \(a side layer of your own is registered by '
                     r'jaxarch.models.register_side_layer in a module imported first: .*\)$'):
    models.build(cfg.model, rngs=nnx.Rngs(0))

  @models.register_side_layer('adaptor')
  def adaptor(cfg, index, rngs):
    return Adapter(cfg.d_model, rngs=rngs)
  assert models.build(cfg.model, rngs=nnx.Rngs(0)).placement == (('adaptor', 0, 1),)


def test_side_layers_are_numbered_by_the_order_their_kinds_registered():
  """Not by the sections' names (a ConfigDict lists them sorted): a plugin's layers come
  after UltraMem's, as before the scan's layouts read placements from the config, so that
  a run's `side_layers/<i>` (and an old run's permutation seeds) stay where they were."""
  @models.register_side_layer('adapter')
  def adapter(cfg, index, rngs):
    return Adapter(cfg.d_model, rngs=rngs)
  cfg = config_lib.load('configs/ultramem.py:tiny')
  with cfg.unlocked():
    cfg.model.adapter = config_lib.ConfigDict({'placement': ((3, 3),)})
  assert models.build(cfg.model, rngs=nnx.Rngs(0)).placement == (
      ('ultramem', 0, 2), ('ultramem', 1, 3), ('adapter', 3, 3))


def test_a_name_taken_by_other_code_is_refused_and_the_same_code_registers_again():
  """The last plugin imported won, silently: a run then built other layers than it had
  trained with (a built-in's name shadowed changed every run of the installation)."""
  with pytest.raises(ValueError, match=r"block 'dense' is registered already, by "
                     r'jaxarch.models.transformer.dense_block; give .*scaled_mlp_block '
                     'another name'):
    models.register_block('dense')(scaled_mlp_block)
  with pytest.raises(ValueError, match="family 'dense' is registered already"):
    models.register_family('dense', Tempered)
  with pytest.raises(ValueError, match="side layer 'ultramem' is registered already"):
    models.register_side_layer('ultramem')(scaled_mlp_block)
  models.register_block('halved')(scaled_mlp_block)
  models.register_block('halved')(scaled_mlp_block)  # a module reloaded: the same code
  models.register_family('tempered', Tempered)
  models.register_family('tempered', Tempered)
  assert BLOCKS['halved'] is scaled_mlp_block and models.FAMILIES['tempered'] is Tempered


def test_a_factory_that_cannot_be_called_as_jaxarch_calls_it_is_refused_when_registered():
  """Before, it registered, and the build failed with a TypeError traceback from inside
  the stack."""
  with pytest.raises(config_lib.ConfigError, match=(
      r"block 'narrow': \S*narrow\(cfg, layer\) cannot be called as jaxarch calls a block "
      r'factory, factory\(model_cfg, layer, rngs\) \(too many positional arguments\)')):
    @models.register_block('narrow')
    def narrow(cfg, layer):
      return scaled_mlp_block(cfg, layer, nnx.Rngs(0))
  with pytest.raises(config_lib.ConfigError, match=r"side layer 'probe': .* factory\(model_cfg, "
                     r'index, rngs\)'):
    models.register_side_layer('probe')(lambda cfg, rngs: None)
  with pytest.raises(config_lib.ConfigError, match=r"family 'bare': .* constructor\(model_cfg, "
                     r"rngs=rngs\) \(got an unexpected keyword argument 'rngs'\)"):
    models.register_family('bare', lambda cfg: None)
  assert 'narrow' not in BLOCKS and 'probe' not in SIDE_LAYERS
  assert 'bare' not in models.FAMILIES


class Scratch(nnx.Module):
  """A family of one's own that trains but has none of the decoding methods."""

  def __init__(self, cfg, *, rngs):
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)

  def __call__(self, tokens, segment_ids=None, positions=None):
    return self.embed.attend(self.embed(tokens))


def test_a_family_without_decoding_methods_is_refused_by_generate_and_stablehlo(tmp_path):
  """A 30-line AttributeError traceback from inside generation before."""
  from jaxarch import infer  # pylint: disable=g-import-not-at-top
  from jaxarch.export.stablehlo import export_stablehlo  # pylint: disable=g-import-not-at-top
  from jaxarch.infer.sampling import GenerateError  # pylint: disable=g-import-not-at-top
  models.register_family('scratch', Scratch)
  cfg = config_lib.load('configs/dense.py:tiny', ['model.family=scratch'])
  model = models.build(cfg.model, rngs=nnx.Rngs(0))
  with pytest.raises(GenerateError, match='^generate: Scratch has no init_cache, prefill, '
                     'decode_step, which cached decoding calls .*subclass '
                     r'jaxarch.models.transformer.Transformer'):
    infer.Generator(model)
  with pytest.raises(ExportError, match='^export: --format=stablehlo writes a cached '
                     'decoder: Scratch has no init_cache'):
    export_stablehlo(model, cfg, tmp_path / 'out', batch_size=1, prompt_len=4, max_len=8)
  assert not (tmp_path / 'out').exists()


def test_a_block_of_one_s_own_without_its_section_says_to_add_it_to_the_config_file():
  """It pointed at configs/halved.py, which no one shipped."""
  models.register_block('halved', checks=(positive_halving,))(scaled_mlp_block)
  with pytest.raises(config_lib.ConfigError, match=r'\(model.halved\) this config lacks; add '
                     r'them in your config file \(with c.unlocked\(\): c.model.halved = '):
    config_lib.load('configs/dense.py:tiny', ["model.block_pattern=('halved',)"])
  with pytest.raises(config_lib.ConfigError, match=r"unknown key 'model.halved.factor': this "
                     'config has no model.halved section, which .halved. blocks read; add it '
                     'in your config file'):
    config_lib.load('configs/dense.py:tiny', ['model.halved.factor=2'])


def test_an_import_error_in_one_s_own_code_says_where(tmp_path, monkeypatch, capsys):
  """`jaxarch: No module named 'triton_not_here'`, and nowhere to look, before."""
  site = tmp_path / 'site'
  site.mkdir()
  _installed_plugin(site, 'jaxarch_lazy_plugin', (
      'from jaxarch.models import register_block\n'
      "@register_block('lazy')\n"
      'def lazy_block(cfg, layer, rngs):\n'
      '  import triton_not_here\n'))
  monkeypatch.syspath_prepend(str(site))
  monkeypatch.delitem(sys.modules, 'jaxarch_lazy_plugin', raising=False)
  assert cli.main(['bench', 'memory', '--config=configs/dense.py:tiny', '--state_only',
                   f'--workdir={tmp_path / "bench"}',
                   "--config.model.block_pattern=('lazy',)"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxarch: No module named 'triton_not_here' (raised at "
                        f"{site / 'jaxarch_lazy_plugin.py'}:4; JAXARCH_TRACEBACK=1 shows"), err
  monkeypatch.setenv('JAXARCH_TRACEBACK', '1')
  with pytest.raises(ModuleNotFoundError):
    cli.main(['bench', 'memory', '--config=configs/dense.py:tiny', '--state_only',
              f'--workdir={tmp_path / "bench"}', "--config.model.block_pattern=('lazy',)"])


def test_weights_without_logical_axes_are_said_to_be_whole_on_every_device(caplog):
  """nnx.Embed's table carries no axes: replicated over the mesh without a word."""
  from jaxarch.parallel import make_mesh  # pylint: disable=g-import-not-at-top
  from jaxarch.train.state import make_setup  # pylint: disable=g-import-not-at-top
  models.register_family('scratch', Scratch)
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.model.family = 'scratch'
  with caplog.at_level('WARNING'):
    make_setup(cfg, make_mesh(cfg))
  assert (f'1 weight of this model has no logical axes (embed/embedding '
          f'[{cfg.model.vocab_size}, {cfg.model.d_model}]) and is whole on each of the 8 '
          'devices') in caplog.text
  caplog.clear()
  with caplog.at_level('WARNING'):
    make_setup(tiny_config(), make_mesh(tiny_config()))  # jaxarch's own: every weight has axes
  assert 'no logical axes' not in caplog.text


class Widening(DenseBlock):
  """A block of one's own that returns [b, t, 2d]: the next block's norm failed on it."""

  def __call__(self, x, positions, segment_ids, layout=None, prefix=None):
    return jnp.concatenate([x, x], axis=-1)


@pytest.mark.parametrize('scan', [False, True])
def test_a_block_that_changes_the_stream_s_shape_is_named_in_one_line(scan):
  models.register_block('widening')(lambda cfg, layer, rngs: Widening(
      *(lambda b: (b.attn, b.mlp))(dense_block(cfg, layer, rngs)), cfg.d_model,
      eps=cfg.norm_eps, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs))
  cfg = config_lib.load('configs/dense.py:tiny', ["model.block_pattern=('dense', 'widening')",
                                                  f'model.scan_layers={scan}'])
  model = models.build(cfg.model, rngs=nnx.Rngs(0))
  d = cfg.model.d_model
  with pytest.raises(config_lib.ConfigError, match=rf'block 1 (of the period )?\(Widening\) '
                     rf'returned \[1, 8, {2 * d}\] for x \[1, 8, {d}\]: a block'):
    model(jnp.ones((1, 8), jnp.int32))


def test_the_start_line_names_blocks_other_than_the_family_s_own():
  """'dense model: ...' for a model of the user's parallel blocks."""
  from jaxarch.train import trainer  # pylint: disable=g-import-not-at-top
  models.register_block('halved')(scaled_mlp_block)
  cfg = config_lib.load('configs/dense.py:tiny', ["model.block_pattern=('halved', 'dense')"])
  assert trainer._blocks_of(cfg.model) == ' of halved/dense blocks'  # pylint: disable=protected-access
  assert trainer._blocks_of(tiny_config().model) == ''  # pylint: disable=protected-access


def test_an_export_s_readme_names_the_code_of_one_s_own_it_needs(tmp_path):
  """Loading such an export fails until that code is registered; its README said nothing."""
  from jaxarch.export.weights import write_model  # pylint: disable=g-import-not-at-top
  models.register_block('halved')(scaled_mlp_block)
  cfg = config_lib.load('configs/dense.py:tiny', ["model.block_pattern=('halved', 'dense')"])
  write_model(models.build(cfg.model, rngs=nnx.Rngs(0)), cfg, tmp_path / 'own')
  readme = (tmp_path / 'own' / 'README.md').read_text()
  assert (f"code of its own, which must be registered first: block 'halved' (module "
          f'{scaled_mlp_block.__module__}). Import that module') in readme
  write_model(models.build(tiny_config().model, rngs=nnx.Rngs(0)), tiny_config(),
              tmp_path / 'dense')
  assert 'of its own' not in (tmp_path / 'dense' / 'README.md').read_text()


class Halving(nnx.Module):
  """A block without parameters: a scanned stack could not be laid out by them."""

  def __init__(self, cfg, layer, rngs):
    del cfg, layer, rngs

  def __call__(self, x, positions, segment_ids, layout=None, prefix=None):
    return 0.5 * x


def test_a_block_without_parameters_builds_unrolled_and_is_refused_by_a_scan():
  """Scanned, its unit was read as one block shorter: block 2's weights were named block 1
  in the per-layer gradient norms, and a checkpoint read into the other layout was read
  from the wrong layers."""
  models.register_block('halving')(Halving)
  pattern = "model.block_pattern=('dense', 'halving')"
  cfg = config_lib.load('configs/dense.py:tiny', [pattern])
  model = models.build(cfg.model, rngs=nnx.Rngs(0))
  assert model(jnp.ones((1, 8), jnp.int32)).shape == (1, 8, cfg.model.vocab_size)
  cfg = config_lib.load('configs/dense.py:tiny', [pattern, 'model.scan_layers=True'])
  with pytest.raises(config_lib.ConfigError, match=r'model.scan_layers: block 1 \(Halving\) has '
                     r'no parameters, .* set model.scan_layers=False'):
    models.build(cfg.model, rngs=nnx.Rngs(0))
