"""The transformer: shapes, causality, packing isolation, tied heads, remat."""

import ast
import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core
from jax.extend import source_info_util

from conftest import USER_CPU_COMPILE, compiled_call, llama3_frequencies, make_batch, tiny_config
from jaxarch import config as config_lib
from jaxarch import models
from jaxarch.config import ConfigError
from jaxarch.layers.attention import Attention
from jaxarch.layers import params as params_lib
from jaxarch.layers.embeddings import head_logits
from jaxarch.layers.rope import LinearScaling, Llama3Scaling, apply_rope, rope_frequencies
from jaxarch.train import step as step_lib


def _model(**overrides):
  cfg = tiny_config(**{'model.dtype': 'float32', **overrides})
  return cfg, models.build(cfg.model, rngs=nnx.Rngs(0))


def test_logits_have_batch_length_vocab_shape():
  cfg, model = _model()
  tokens = jnp.zeros((3, 17), jnp.int32)
  logits = compiled_call(model, tokens)
  assert logits.shape == (3, 17, cfg.model.vocab_size) and logits.dtype == jnp.float32


def test_changing_token_t_changes_no_logit_before_t():
  _, model = _model()
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 256)
  t = 11
  changed = tokens.at[:, t].set((tokens[:, t] + 7) % 256)
  a, b = compiled_call(model, tokens), compiled_call(model, changed)
  np.testing.assert_array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
  assert not np.allclose(a[:, t:], b[:, t:])  # and the change is seen from t on


def test_packed_documents_do_not_attend_across_boundaries():
  _, model = _model()
  key_a, key_b = jax.random.split(jax.random.PRNGKey(2))
  doc_a = jax.random.randint(key_a, (1, 10), 0, 256)
  doc_b = jax.random.randint(key_b, (1, 14), 0, 256)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  segments = jnp.array([[1] * 10 + [2] * 14])
  positions = jnp.array([list(range(10)) + list(range(14))])
  out = compiled_call(model, packed, segments, positions)
  np.testing.assert_allclose(out[:, :10], compiled_call(model, doc_a), atol=1e-5)
  np.testing.assert_allclose(out[:, 10:], compiled_call(model, doc_b), atol=1e-5)


def test_tied_head_has_no_separate_output_matrix():
  cfg, tied = _model(**{'model.tie_embeddings': True})
  _, untied = _model()
  assert tied.head is None
  count = lambda m: models.param_counts(m)['total']
  assert count(untied) - count(tied) == cfg.model.d_model * cfg.model.vocab_size
  assert compiled_call(tied, jnp.zeros((1, 5), jnp.int32)).shape[-1] == cfg.model.vocab_size


def test_remat_gives_the_same_loss_and_gradients():
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 256)

  def grads(remat):
    _, model = _model(**{'model.remat': remat})
    def loss(m):
      return jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])
    return nnx.jit(nnx.grad(loss))(model)  # compiled: remat is a compile-time rewrite

  plain, full, dots = grads('none'), grads('full'), grads('dots')
  for other in (full, dots):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, other)


def test_bfloat16_compute_keeps_float32_params():
  _, model = _model(**{'model.dtype': 'bfloat16'})
  params = nnx.state(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('float32')}
  out = compiled_call(model, jnp.ones((1, 8), jnp.int32))
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


def test_block_plan_repeats_the_pattern():
  from jaxarch.models.transformer import block_plan  # pylint: disable=g-import-not-at-top
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.model.n_layers = 5
    cfg.model.block_pattern = ('dense', 'moe')
  assert block_plan(cfg.model) == ['dense', 'moe', 'dense', 'moe', 'dense']


def test_side_layer_reads_the_ffn_input_of_block_read_and_writes_after_block_write(monkeypatch):
  from jaxarch.models import transformer  # pylint: disable=g-import-not-at-top
  from jaxarch.train.step import run_model  # pylint: disable=g-import-not-at-top

  class Probe(nnx.Module):
    """Records its input; returns a fixed update so the write point is visible."""

    def __init__(self, cfg, index, rngs):
      del index, rngs
      self.update = jnp.linspace(-1, 1, cfg.d_model)

    def __call__(self, x, positions, segment_ids):
      del positions, segment_ids
      self.sow(nnx.Intermediate, 'seen', x)
      return jnp.broadcast_to(self.update, x.shape).astype(x.dtype)

  monkeypatch.setitem(transformer.SIDE_LAYERS, 'probe', Probe)
  cfg = tiny_config(**{'model.dtype': 'float32', 'model.n_layers': 4})
  with cfg.unlocked():
    cfg.model.probe = {'placement': ((1, 2),)}
  model = models.build(cfg.model, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 12), 0, 256)
  logits, sown = run_model(model, tokens)
  seen = sown['side_layers'][0]['seen'].get_value()[0]

  segments = jnp.ones_like(tokens)
  positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
  x = model.embed(tokens)
  for i, block in enumerate(model.blocks):
    if i == 1:  # block 1's FFN input, normed: its residual stream after attention
      ffn_input = block.mlp_norm(x + block.attn(block.attn_norm(x), positions, segments))
    x = block(x, positions, segments)
    if i == 2:
      x = x + model.side_layers[0].update
  np.testing.assert_allclose(seen, ffn_input, atol=1e-6)
  expected = jnp.einsum('btd,dv->btv', model.final_norm(x), model.head.get_value())
  np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_cudnn_attention_runs_as_xla_off_a_gpu_and_needs_16_bit_on_one(caplog, request):
  build = lambda dtype: Attention(32, 2, 2, 16, impl='cudnn', dtype=dtype, rngs=nnx.Rngs(0))
  assert build(jnp.float32).impl is None  # a GPU run's config, loaded on CPU
  assert "attention_impl='cudnn' runs on GPUs" in caplog.text
  request.getfixturevalue('traced_as_on_gpu')
  assert build(jnp.bfloat16).impl == 'cudnn'
  with pytest.raises(ConfigError, match="needs model.dtype bfloat16 or float16.*not float32"):
    build(jnp.float32)


@pytest.mark.parametrize('spec, key', [('configs/ultramem.py:tiny', 'model.ultramem.lookup_impl'),
                                       ('configs/moe.py:tiny', 'model.moe.matmul_impl')])
def test_compiled_kernels_off_a_gpu_are_a_config_error_naming_the_key(spec, key):
  cfg = config_lib.load(spec, [f'{key}=pallas'])  # a GPU job's config loads anywhere
  with pytest.raises(ConfigError, match=f"{key}='pallas' needs a GPU.*runs on cpu; use "
                     f"{key}='interpret'"):
    models.build(cfg.model, rngs=nnx.Rngs(0))


def test_float16_off_a_gpu_is_a_config_error_naming_the_key():
  # XLA:CPU refuses float16 attention with float32 sums at compile time, deep in a step.
  cfg = config_lib.load('configs/dense.py:tiny', ['model.dtype=float16'])
  with pytest.raises(ConfigError, match="model.dtype='float16' runs on GPUs, not on cpu"):
    models.build(cfg.model, rngs=nnx.Rngs(0))


def test_residual_writes_start_smaller_unless_every_weight_takes_one_std():
  o_proj_std = lambda scaled: float(jnp.std(models.build(
      tiny_config(**{'model.residual_init_scale': scaled}).model,
      rngs=nnx.Rngs(0)).blocks[0].attn.o_proj[...]))
  layers = tiny_config().model.n_layers
  assert o_proj_std(False) == pytest.approx(0.02, rel=0.05)
  assert o_proj_std(True) == pytest.approx(0.02 / np.sqrt(2 * layers), rel=0.05)
  paper = config_lib.load('configs/megabyte.py:1.5b').model  # the paper's init
  assert (paper.init_std, paper.init_truncation, paper.residual_init_scale) == (
      0.006, 2.0, False)


@pytest.mark.parametrize('tied', [False, True])
def test_bfloat16_logits_are_summed_and_kept_in_float32(tied):
  # Logits rounded to bf16 are off by up to 2^-8 of their size: 0.06 at 30, in every loss.
  _, model = _model(**{'model.dtype': 'bfloat16', 'model.tie_embeddings': tied})
  table = model.embed.embedding if tied else model.head
  table[...] = table[...] * 40  # logits of a trained model's size (tens)
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 16), 0, 256)
  x = np.asarray(model.features(tokens).astype(jnp.float32), np.float64)
  w = np.asarray(table[...].astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  expected = x @ (w.T if tied else w)
  assert np.abs(expected).max() > 16
  np.testing.assert_allclose(model(tokens), expected, atol=1e-3)


def test_head_logits_differentiate_as_the_plain_matmul_with_bf16_backward_matmuls():
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 3, 8))
  w = jax.random.normal(jax.random.PRNGKey(7), (8, 16))
  loss = lambda head: lambda x, w: jnp.sum(jnp.sin(head(x, w)))
  plain = lambda x, w: jnp.einsum('btd,dv->btv', x, w)
  for ours, reference in zip(jax.grad(loss(head_logits), (0, 1))(x, w),
                             jax.grad(loss(plain), (0, 1))(x, w)):
    # The same sums, maybe in another order (XLA's CPU kernels differ by host): float32
    # rounding, up to 6e-8 seen on gradients of order 1.
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
  bf16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  backward = str(jax.make_jaxpr(jax.grad(loss(head_logits), (0, 1)))(*bf16))
  assert backward.count('bf16[2,3,8] = dot_general') == 1  # not in fp32 against bf16
  assert backward.count('bf16[8,16] = dot_general') == 1


# What bf16 (8 significant bits) loses: sums (the gradient of a weight broadcast over the
# positions is one), softmax's and log-sum-exp's exp and log, the norms' rsqrt, RoPE's sin
# and cos, top-k choices. Activations (silu, tanh) and matmul inputs may be bf16.
_FLOAT32_ONLY = ('reduce_sum', 'reduce_max', 'argmax', 'top_k', 'cumsum', 'exp', 'log',
                 'log1p', 'rsqrt', 'sin', 'cos')


def _bf16_uses(jaxpr, primitives) -> set[str]:
  """'name at file:line' of the equations of `jaxpr`, and of the jaxprs inside them, that
  are one of `primitives` with a bf16 operand or result."""
  found = set()
  for eqn in jaxpr.eqns:
    dtypes = [getattr(v.aval, 'dtype', None) for v in (*eqn.invars, *eqn.outvars)]
    if eqn.primitive.name in primitives and any(d == jnp.bfloat16 for d in dtypes):
      found.add(f'{eqn.primitive.name} at {source_info_util.summarize(eqn.source_info)}')
    for inner in jax_core.jaxprs_in_params(eqn.params):
      found |= _bf16_uses(inner, primitives)
  return found


@pytest.mark.parametrize('spec, overrides, bita', [
    ('configs/dense.py:tiny', ['model.qkv_bias=True', 'model.qk_norm=True'], False),
    ('configs/ultramem.py:tiny', ['model.ultramem.query_conv=3'], False),
    ('configs/megabyte.py:tiny', [], False),
    ('configs/dense.py:tiny', [], True),
], ids=['dense', 'ultramem', 'megabyte', 'bita'])
def test_bfloat16_training_sums_exponentiates_and_normalises_in_float32(spec, overrides, bita):
  """The loss and gradients of a bf16 model. The gradients of weights broadcast over the
  positions (qkv biases, the UltraMem query conv, MEGABYTE's pads and slot embeddings,
  BiTA's prompt and mask tokens, all that BiTA trains) were summed in bf16: on CPU, up to
  7.5% off the fp32 model's gradients at 16 x 1024 tokens (a v bias; MEGABYTE's slot
  embeddings 2%, BiTA's mask tokens 1.4%), where a matmul weight's are 0.7% off, and these
  0.3-1.1% once summed in fp32. (MoE is left out: its backward adds a token's k expert
  inputs in bf16, as a residual add does.)"""
  model_cfg = config_lib.load(spec, ['model.dtype=bfloat16', *overrides]).model
  if bita:
    model_cfg = config_lib.bita_model(model_cfg, dict(
        num_prompt_tokens=4, num_mask_tokens=3, draft_tree=(5, 4, 3), train_groups=0,
        init_std=0.02))
  graphdef, params, rest = nnx.split(models.build(model_cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  batch = jax.tree.map(jnp.asarray, make_batch(2, 32))

  def loss(params):
    model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
    (logits, targets, mask), _ = step_lib.run_model(step_lib.predictions, model, batch)
    nll, z = step_lib.cross_entropy(logits, targets, mask.astype(jnp.float32), z_loss=1e-4)
    return nll + z

  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr
  assert not _bf16_uses(jaxpr, _FLOAT32_ONLY)


def test_llama3_rope_frequencies_follow_meta_s_formula_in_each_band():
  """Hand-picked so that the 16 wavelengths 2π·10000^(i/16) of a 32-wide head fall in all
  three bands of an original context of 64: under 64 / 4 kept, over 64 / 1 stretched 32
  times, between interpolated."""
  plain = 10_000.0 ** (-np.arange(16) / 16)
  wavelengths = 2 * np.pi / plain
  assert (wavelengths < 16).sum() == 2 and (wavelengths > 64).sum() == 11
  scaling = Llama3Scaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_len=64)
  want = llama3_frequencies(plain, *scaling)
  np.testing.assert_allclose(rope_frequencies(16, 10_000.0, scaling), want, rtol=1e-6)
  np.testing.assert_allclose(want[:2], plain[:2])
  np.testing.assert_allclose(want[5:], plain[5:] / 32)
  assert all(p / 32 < w < p for p, w in zip(plain[2:5], want[2:5]))
  np.testing.assert_allclose(rope_frequencies(16, 10_000.0), plain, rtol=1e-6)  # none


def test_linear_rope_turns_position_p_as_the_unscaled_rope_turns_p_over_factor():
  """transformers' `linear` (Gemma 3 4B's global layers, factor 8): against a numpy
  rotate_half rotation of the fractional positions p / factor."""
  x = np.random.default_rng(0).normal(size=(2, 5, 3, 16)).astype(np.float32)  # [b, t, n, h]
  positions = np.array([[0, 1, 7, 8, 100], [3, 17, 40, 1000, 4095]])
  angles = (positions / 8.0)[..., None, None] * 500.0 ** (-np.arange(8) / 8)  # [b, t, 1, 8]
  cos, sin = np.cos(angles), np.sin(angles)
  want = np.concatenate([x[..., :8] * cos - x[..., 8:] * sin,
                         x[..., 8:] * cos + x[..., :8] * sin], -1)
  got = apply_rope(jnp.asarray(x), jnp.asarray(positions), 500.0, LinearScaling(8.0))
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert np.abs(np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), 500.0))
                - want).max() > 0.5  # unscaled: another rotation


def test_llama3_rope_scaling_changes_the_model_only_past_its_kept_band():
  """A pretraining context longer than every wavelength keeps them all: the logits are
  bitwise those without scaling (the default); a short one changes them."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 48)), jnp.int32)
  _, plain = _model()
  for original, same in ((10 ** 9, True), (64, False)):
    _, scaled = _model(**{'model.rope_scaling.type': 'llama3',
                          'model.rope_scaling.original_max_len': original})
    same_logits = np.array_equal(compiled_call(scaled, tokens), compiled_call(plain, tokens))
    assert same_logits == same, original


@pytest.mark.parametrize('spec', ['configs/dense.py:tiny', 'configs/moe.py:tiny',
                                  'configs/megabyte.py:tiny'])
def test_every_attention_layer_takes_the_rope_scaling(spec):
  """MEGABYTE's local model too, whose config keeps the global one's plain keys."""
  cfg = config_lib.load(spec, ['model.rope_scaling.type=llama3',
                               'model.rope_scaling.factor=32.0'])
  model = nnx.eval_shape(lambda: models.build(cfg.model, rngs=nnx.Rngs(0)))
  layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, Attention)]
  assert len(layers) == cfg.model.n_layers + cfg.model.get('megabyte', {}).get(
      'local', {}).get('n_layers', 0)
  assert {a.rope_scaling for a in layers} == {Llama3Scaling(32.0, 1.0, 4.0, 8192)}


def _attention_layers(model):
  return [m for _, m in nnx.iter_graph(model) if isinstance(m, Attention)]


def test_qkv_biases_are_zero_undecayed_params_of_the_heads_shapes_only_when_asked():
  """Off (the default), the params tree is as before: no bias leaves."""
  _, plain = _model()
  names = lambda m: {'.'.join(map(str, path))
                     for path, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  assert not any('bias' in name for name in names(plain))
  cfg, biased = _model(**{'model.qkv_bias': True})
  added = names(biased) - names(plain)
  assert added == {f'blocks.{i}.attn.{p}_bias' for i in range(cfg.model.n_layers)
                   for p in 'qkv'}
  attn = biased.blocks[0].attn
  n, kv, h = 4, 2, cfg.model.d_model // 4
  for bias, shape, axes in ((attn.q_bias, (n, h), ('heads', 'head_dim')),
                            (attn.k_bias, (kv, h), ('kv_heads', 'head_dim')),
                            (attn.v_bias, (kv, h), ('kv_heads', 'head_dim'))):
    assert bias.shape == shape and not bias[...].any()
    assert bias.get_metadata()['out_sharding'] == axes
    assert bias.get_metadata()['weight_decay'] is False


_f64 = lambda p: np.asarray(p[...], np.float64)


def _projected(x, proj) -> np.ndarray:
  """x [b, t, d] @ proj [d, heads, h] -> [b, t, heads, h], in float64."""
  return np.einsum('btd,dnh->btnh', np.asarray(x, np.float64), _f64(proj))


def _written_out_attention(q, k, v, o_proj) -> np.ndarray:
  """Causal attention of q [b, t, n, 8] and k, v [b, t, kv, 8] before the rotation (theta
  10000, rotate_half), each kv head shared by n // kv query heads -> [b, t, d]."""
  t, h = q.shape[1], q.shape[-1]
  angles = np.arange(t)[:, None] / 10_000.0 ** (np.arange(0, h, 2) / h)  # t h/2
  cos, sin = (f(np.concatenate([angles, angles], -1))[:, None] for f in (np.cos, np.sin))
  rope = lambda u: u * cos + np.concatenate([-u[..., h // 2:], u[..., :h // 2]], -1) * sin
  group = q.shape[2] // k.shape[2]
  q, k, v = rope(q), np.repeat(rope(k), group, 2), np.repeat(v, group, 2)
  scores = np.einsum('bqnh,bknh->bnqk', q, k) / np.sqrt(h)
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('bnqk,bknh,nhd->bqd', probs, v, _f64(o_proj))


def test_qkv_biases_are_added_before_the_rotation():
  """Against the attention written out: biases added to q, k and v, then q and k rotated.
  Zero biases compute the layer without them."""
  layer = Attention(32, 4, 2, 8, qkv_bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
  plain = Attention(32, 4, 2, 8, dtype=jnp.float32, rngs=nnx.Rngs(0))
  for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
    getattr(plain, name)[...] = getattr(layer, name)[...]
  x = jax.random.normal(jax.random.PRNGKey(8), (2, 6, 32))
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  segments = jnp.ones((2, 6), jnp.int32)
  np.testing.assert_array_equal(compiled_call(layer, x, positions, segments),
                                compiled_call(plain, x, positions, segments))
  keys = jax.random.split(jax.random.PRNGKey(9), 3)
  for key, bias in zip(keys, (layer.q_bias, layer.k_bias, layer.v_bias)):
    bias[...] = jax.random.normal(key, bias.shape)
  q, k, v = (_projected(x, p) + _f64(b) for p, b in ((layer.q_proj, layer.q_bias),
                                                     (layer.k_proj, layer.k_bias),
                                                     (layer.v_proj, layer.v_bias)))
  want = _written_out_attention(q, k, v, layer.o_proj)
  got = compiled_call(layer, x, positions, segments)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(got - compiled_call(plain, x, positions, segments)).max() > 0.1


@pytest.mark.parametrize('key, part', [('qkv_bias', 'q_bias'), ('qk_norm', 'q_norm')])
@pytest.mark.parametrize('spec', ['configs/dense.py:tiny', 'configs/moe.py:tiny',
                                  'configs/megabyte.py:tiny', 'configs/ultramem.py:tiny'])
def test_every_attention_layer_takes_the_qkv_bias_and_qk_norm(spec, key, part):
  cfg = config_lib.load(spec, [f'model.{key}=True'])
  model = nnx.eval_shape(lambda: models.build(cfg.model, rngs=nnx.Rngs(0)))
  layers = _attention_layers(model)
  assert len(layers) == cfg.model.n_layers + cfg.model.get('megabyte', {}).get(
      'local', {}).get('n_layers', 0)
  assert all(getattr(a, part) is not None for a in layers)
  plain = nnx.eval_shape(lambda: models.build(config_lib.load(spec).model,
                                              rngs=nnx.Rngs(0)))
  assert all(getattr(a, part) is None for a in _attention_layers(plain))


def test_qk_norm_scales_are_undecayed_ones_of_the_head_width_only_when_asked():
  _, plain = _model()
  names = lambda m: {'.'.join(map(str, path))
                     for path, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  cfg, normed = _model(**{'model.qk_norm': True, 'model.head_dim': 24})
  assert names(normed) - names(plain) == {f'blocks.{i}.attn.{p}_norm.scale'
                                          for i in range(cfg.model.n_layers) for p in 'qk'}
  for norm in (normed.blocks[0].attn.q_norm, normed.blocks[1].attn.k_norm):
    assert norm.scale.shape == (24,) and (norm.scale[...] == 1).all()
    assert norm.scale.get_metadata()['weight_decay'] is False
    assert norm.eps == cfg.model.norm_eps


def test_qk_norm_normalises_each_heads_query_and_key_before_the_rotation():
  """Against the attention written out; and the property QK-norm is for: the logits no
  longer grow with the query and key weights (scaling them changes nothing)."""
  layer = Attention(32, 4, 2, 8, qk_norm=True, norm_eps=1e-6, init_std=0.2,
                    dtype=jnp.float32, rngs=nnx.Rngs(0))
  plain = Attention(32, 4, 2, 8, init_std=0.2, dtype=jnp.float32, rngs=nnx.Rngs(0))
  for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
    getattr(plain, name)[...] = getattr(layer, name)[...]
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  layer.q_norm.scale[...] = 1 + 0.5 * jax.random.normal(keys[0], (8,))
  layer.k_norm.scale[...] = 1 + 0.5 * jax.random.normal(keys[1], (8,))
  x = jax.random.normal(keys[2], (2, 6, 32))
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  segments = jnp.ones((2, 6), jnp.int32)
  norm = lambda u, scale: u / np.sqrt((u * u).mean(-1, keepdims=True) + 1e-6) * _f64(scale)
  q = norm(_projected(x, layer.q_proj), layer.q_norm.scale)
  k = norm(_projected(x, layer.k_proj), layer.k_norm.scale)
  want = _written_out_attention(q, k, _projected(x, layer.v_proj), layer.o_proj)
  got = layer(x, positions, segments)
  np.testing.assert_allclose(got, want, atol=1e-5)
  for attn in (layer, plain):
    before = attn(x, positions, segments)
    attn.q_proj[...] *= 10.0
    attn.k_proj[...] *= 10.0
    change = np.abs(attn(x, positions, segments) - before).max()
    assert (change < 1e-4) if attn is layer else (change > 0.1), change


@pytest.mark.parametrize('pattern, windows', [
    (('local',), [3, 3, 3, 3]), (('local', 'global'), [3, None, 3, None]),
    (('global', 'local', 'local'), [None, 3, 3, None])])
def test_sliding_windows_go_to_the_blocks_the_attention_pattern_marks_local(pattern, windows):
  _, model = _model(**{'model.sliding_window': 3, 'model.attention_pattern': pattern,
                       'model.n_layers': 4})
  assert [block.attn.window for block in model.blocks] == windows
  _, plain = _model(**{'model.attention_pattern': pattern, 'model.n_layers': 4})  # no window
  assert all(block.attn.window is None for block in plain.blocks)


def test_a_sliding_window_limits_what_a_token_reaches_to_the_layers_windows():
  """With windows of w in all L layers a token reaches the L·(w − 1) positions after it
  and no further; with one global layer, every later position; a document starts anew."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 24)), jnp.int32)
  changed = tokens.at[:, 2].set((tokens[:, 2] + 1) % 256)

  def reached(**overrides):
    _, model = _model(**{'model.sliding_window': 3, 'model.n_layers': 4, **overrides})
    diff = np.abs(np.asarray(model(tokens) - model(changed))).max(axis=(0, 2))
    return np.nonzero(diff > 1e-6)[0].tolist()

  assert reached() == list(range(2, 2 + 4 * 2 + 1))  # 4 layers of windows of 3
  assert reached(**{'model.attention_pattern': ('local', 'global')}) == list(range(2, 24))
  assert reached(**{'model.sliding_window': 100}) == list(range(2, 24))


def test_a_sliding_window_lowers_into_cudnn_attention_for_cuda(traced_as_on_gpu):
  """On a GPU the window is cuDNN flash attention's own (forward and gradient), not a mask
  XLA builds: what `model.attention_impl=auto` runs there."""
  del traced_as_on_gpu
  layer = Attention(64, 4, 2, 16, impl='auto', window=5, dtype=jnp.bfloat16,
                    rngs=nnx.Rngs(0))
  assert layer.impl == 'cudnn'
  graphdef, params = nnx.split(layer)
  x = jnp.zeros((2, 32, 64), jnp.bfloat16)
  positions = jnp.broadcast_to(jnp.arange(32), (2, 32))
  segments = jnp.ones((2, 32), jnp.int32)
  loss = lambda params: jnp.sum(nnx.merge(graphdef, params)(x, positions, segments))
  hlo = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=('cuda',)).as_text()
  assert hlo.count('sliding_window_length\\22: 5,') == 2  # forward and backward
  assert 'fmhaScaleBiasSoftmaxBackward' in hlo


# Gemma 3's keys: model.post_norms, model.embed_scale, model.mlp_activation,
# model.local_rope_theta (`jaxarch import` of a Gemma3ForCausalLM sets them).

def _param_names(model):
  return {'.'.join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_gemma_keys_off_leave_the_params_and_logits_as_before():
  """Their defaults add no parameter and build the blocks as before; each one set changes
  the logits of the same weights."""
  cfg, plain = _model()
  assert (cfg.model.post_norms, cfg.model.embed_scale, cfg.model.mlp_activation,
          cfg.model.local_rope_theta) == (False, False, 'silu', None)
  assert not any('post_norm' in name for name in _param_names(plain))
  assert plain.embed.scale is None and plain.blocks[0].mlp.activation == 'silu'
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 24)), jnp.int32)
  windowed = {'model.sliding_window': 4, 'model.attention_pattern': ('local', 'global')}
  for base, key in [({}, {'model.post_norms': True}), ({}, {'model.embed_scale': True}),
                    ({}, {'model.mlp_activation': 'gelu_tanh'}),
                    (windowed, {'model.local_rope_theta': 100.0})]:
    _, without = _model(**base)
    _, model = _model(**base, **key)
    if 'model.post_norms' in key:  # post-norms of random scales
      for block in model.blocks:
        for norm in (block.attn_post_norm, block.mlp_post_norm):
          norm.scale[...] = 1 + jax.random.normal(jax.random.key(1), norm.scale.shape)
    else:
      assert _param_names(model) == _param_names(without)
    assert np.abs(np.asarray(model(tokens)) - np.asarray(without(tokens))).max() > 1e-3, key


def test_post_norms_norm_each_sublayers_output_before_it_is_added():
  cfg, model = _model(**{'model.post_norms': True})
  assert _param_names(model) - _param_names(_model()[1]) == {
      f'blocks.{i}.{name}.scale' for i in range(cfg.model.n_layers)
      for name in ('attn_post_norm', 'mlp_post_norm')}
  block = model.blocks[0]
  assert block.mlp_post_norm.scale.get_metadata()['weight_decay'] is False
  for norm in (block.attn_post_norm, block.mlp_post_norm):
    norm.scale[...] = 1 + jax.random.normal(jax.random.key(2), norm.scale.shape)
  x = jax.random.normal(jax.random.key(3), (2, 6, cfg.model.d_model))
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  segments = jnp.ones((2, 6), jnp.int32)
  w = lambda norm: np.asarray(norm.scale[...], np.float64)
  rms = lambda u, norm: u / np.sqrt((u * u).mean(-1, keepdims=True) + 1e-6) * w(norm)
  attn = np.asarray(block.attn(block.attn_norm(x), positions, segments), np.float64)
  mid = np.asarray(x, np.float64) + rms(attn, block.attn_post_norm)
  mlp = np.asarray(block.mlp(block.mlp_norm(jnp.asarray(mid, jnp.float32))), np.float64)
  want = mid + rms(mlp, block.mlp_post_norm)
  np.testing.assert_allclose(np.asarray(block(x, positions, segments)), want, atol=2e-5)


def test_embed_scale_multiplies_the_inputs_by_sqrt_d_model_not_the_tied_head():
  _, plain = _model(**{'model.tie_embeddings': True})
  cfg, scaled = _model(**{'model.tie_embeddings': True, 'model.embed_scale': True})
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
  np.testing.assert_allclose(np.asarray(scaled.embed(tokens)),
                             np.asarray(plain.embed(tokens)) * np.sqrt(cfg.model.d_model),
                             rtol=1e-6)
  x = jax.random.normal(jax.random.key(0), (2, 3, cfg.model.d_model))
  np.testing.assert_array_equal(np.asarray(scaled.logits(x)), np.asarray(plain.logits(x)))
  bf16 = models.build(config_lib.load('configs/dense.py:tiny', [
      'model.embed_scale=True', 'model.dtype=bfloat16']).model, rngs=nnx.Rngs(0))
  table = bf16.embed.embedding[...].astype(jnp.bfloat16)  # rounded as transformers rounds:
  want = table[tokens] * jnp.bfloat16(np.sqrt(128))  # both factors in the compute dtype
  np.testing.assert_array_equal(np.asarray(bf16.embed(tokens)), np.asarray(want))


def test_gelu_tanh_gate_is_the_tanh_approximation_of_gelu():
  """transformers' gelu_pytorch_tanh: 0.5·u·(1 + tanh(sqrt(2/π)·(u + 0.044715·u³)))."""
  _, model = _model(**{'model.mlp_activation': 'gelu_tanh'})
  mlp = model.blocks[1].mlp
  x = jax.random.normal(jax.random.key(0), (2, 5, 64))
  w = lambda p: np.asarray(p[...], np.float64)
  xs = np.asarray(x, np.float64)
  u = xs @ w(mlp.gate)
  gelu = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
  np.testing.assert_allclose(np.asarray(mlp(x)), (gelu * (xs @ w(mlp.up))) @ w(mlp.down),
                             atol=1e-5)


def test_local_rope_theta_turns_the_sliding_window_blocks_only_and_unscaled():
  cfg, model = _model(**{'model.sliding_window': 4, 'model.n_layers': 4,
                         'model.attention_pattern': ('local', 'local', 'global'),
                         'model.local_rope_theta': 100.0, 'model.rope_theta': 1e6,
                         'model.rope_scaling.type': 'llama3'})
  got = [(b.attn.window, b.attn.rope_theta, b.attn.rope_scaling is None) for b in model.blocks]
  assert got == [(4, 100.0, True), (4, 100.0, True), (None, 1e6, False), (4, 100.0, True)]


@pytest.mark.parametrize('spec', ['configs/dense.py:tiny', 'configs/moe.py:tiny',
                                  'configs/megabyte.py:tiny', 'configs/ultramem.py:tiny'])
def test_every_familys_blocks_take_the_post_norms(spec):
  cfg = config_lib.load(spec, ['model.post_norms=True'])
  model = nnx.eval_shape(lambda: models.build(cfg.model, rngs=nnx.Rngs(0)))
  blocks = [m for _, m in nnx.iter_graph(model) if hasattr(m, 'mlp_post_norm')]
  assert len(blocks) == cfg.model.n_layers + cfg.model.get('megabyte', {}).get(
      'local', {}).get('n_layers', 0)
  assert all(b.attn_post_norm is not None and b.mlp_post_norm is not None for b in blocks)


def _stated_counts(spec: str, preset: str) -> list[tuple[str, float, float]]:
  """The parameter counts `spec`'s docstring table states on `preset`'s row: (text, value,
  half a unit of its last digit)."""
  with open(spec) as f:
    doc = ast.get_docstring(ast.parse(f.read()))
  row = next(line for line in doc.splitlines() if line.split()[:1] == [preset])
  counts = []
  for text, digits in re.findall(r'(\d+\.(\d+)[MB])\b', row):
    scale = {'M': 1e6, 'B': 1e9}[text[-1]]
    counts.append((text, float(text[:-1]) * scale, 0.5 * scale / 10 ** len(digits)))
  return counts


@pytest.mark.parametrize('preset', ['small', '151m', '680m', '1.6b'])
def test_the_dense_and_moe_configs_state_their_presets_parameter_counts(preset):
  """configs/dense.py's non-embedding count and configs/moe.py's MoE and UltraMem totals
  and active counts hold to the digits they print: a reader sizes runs by them."""
  def counts(family):
    cfg = config_lib.load(f'configs/{family}.py:{preset}')
    return cfg, models.param_counts(nnx.eval_shape(
        lambda: models.build(cfg.model, rngs=nnx.Rngs(0))))
  cfg, dense = counts('dense')
  head = 0 if cfg.model.tie_embeddings else dense['embedding']
  (text, stated, tolerance), = _stated_counts('configs/dense.py', preset)
  assert abs(dense['total'] - dense['embedding'] - head - stated) <= tolerance, text
  (_, moe), (_, ultramem) = counts('moe'), counts('ultramem')
  actual = [moe['total'], moe['active'], ultramem['total'], ultramem['active']]
  stated = _stated_counts('configs/moe.py', preset)
  assert len(stated) == 4
  for (text, value, tolerance), count in zip(stated, actual):
    assert abs(count - value) <= tolerance, f'{text}: {count:,}'


def _built_params(cfg, grouped: bool):
  """The model's params from a jitted build, with the normal draws grouped or each alone."""
  def build():
    with params_lib.grouped_draws() if grouped else contextlib.nullcontext():
      model = models.build(cfg.model, rngs=nnx.Rngs(jax.random.PRNGKey(3)))
    return nnx.split(model, nnx.Param, ...)[1]
  return jax.jit(build)


@pytest.mark.parametrize('spec, overrides', [
    ('configs/dense.py:tiny', {}),
    ('configs/dense.py:tiny', {'model.init_truncation': 2.0, 'model.qkv_bias': True}),
    ('configs/moe.py:tiny', {}),
    ('configs/ultramem.py:tiny', {}),
    ('configs/megabyte.py:tiny', {}),
])
def test_grouped_draws_give_every_weight_the_values_of_its_own_draw(spec, overrides):
  cfg = config_lib.load(spec, [f'--config.{k}={v}' for k, v in overrides.items()])
  # Compiled as a user's CPU compiles them: the suite's quicker emitters round the normal's
  # transform differently where it is fused differently (the last bit of a quarter of them).
  alone, grouped = (jax.tree.leaves(_built_params(cfg, g).lower().compile(
      compiler_options=USER_CPU_COMPILE)()) for g in (False, True))
  assert len(alone) == len(grouped)
  for a, b in zip(alone, grouped):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_initialiser_compiles_one_random_program_per_weight_shape_not_per_layer():
  # threefry's rotations: one set per random-number program XLA kept
  def rotations(n_layers):
    cfg = tiny_config(**{'model.n_layers': n_layers})
    return _built_params(cfg, True).lower().compile().as_text().count('shift-right-logical')
  assert rotations(6) == rotations(2)


@pytest.mark.parametrize('spec, key, value, words', [
    ('configs/dense.py:tiny', 'n_kv_heads', 3, 'model.n_heads=4 must be divisible by '
     'model.n_kv_heads=3'),
    ('configs/dense.py:tiny', 'remat', 'bogus', "model.remat='bogus' must be one of"),
    ('configs/dense.py:tiny', 'mlp_activation', 'relu', "model.mlp_activation='relu' must be"),
    ('configs/dense.py:tiny', 'sliding_window', -4, 'model.sliding_window=-4 must be a '
     'positive int'),
    ('configs/moe.py:tiny', 'moe.num_experts', 0, 'model.moe.num_experts=0 must be a '
     'positive int'),
    ('configs/megabyte.py:tiny', 'megabyte.patch_size', 3, 'must be divisible by '
     'model.megabyte.patch_size=3'),
])
def test_build_checks_a_model_config_changed_after_load(spec, key, value, words):
  """KeyError 'bogus', jax's 'Incompatible shapes for broadcasting' and the like came from
  deep in the layers: `build` runs the config's model checks (those that need no other
  section) first."""
  cfg = config_lib.load(spec)
  *sections, name = key.split('.')
  parent = cfg.model
  for section in sections:
    parent = parent[section]
  parent[name] = value
  with pytest.raises(ConfigError, match=re.escape(words)):
    models.build(cfg.model, rngs=nnx.Rngs(0))


def test_a_models_checks_leave_what_needs_other_sections_to_validate():
  """data.seq_len over max_len, experts over the mesh: `config.check_model` has no data or
  mesh to read; a registered check that reads them does not stop the build either."""
  cfg = config_lib.load('configs/megabyte.py:tiny')
  config_lib.check_model(cfg.model)
  calls = []

  def reads_the_data(c):
    calls.append(c)
    return c.data.seq_len  # a plugin's check: the whole config's keys

  config_lib.FAMILY_CHECKS['reads_data'] = (reads_the_data,)
  config_lib.FAMILY_CHECKS['broken'] = (lambda c: {}['no such entry'],)  # its own bug: said
  try:
    with cfg.unlocked():
      cfg.model.family = 'reads_data'
    config_lib.check_model(cfg.model)
    assert len(calls) == 1
    with cfg.unlocked():
      cfg.model.family = 'broken'
    with pytest.raises(KeyError, match='no such entry'):
      config_lib.check_model(cfg.model)
  finally:
    del config_lib.FAMILY_CHECKS['reads_data'], config_lib.FAMILY_CHECKS['broken']


def test_build_given_the_whole_config_or_no_rngs_says_what_it_takes():
  """Were a 'missing key model.d_model' config error and AttributeErrors from inside."""
  cfg = tiny_config()
  for given, said in ((cfg, 'not the whole config'), (cfg.model.to_dict(), 'not a dict')):
    with pytest.raises(ConfigError, match="models.build takes the config's model section "
                       rf'\(cfg.model, a ConfigDict\), {said}$'):
      models.build(given, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match=r'models.build takes rngs=nnx.Rngs\(seed\), not 0$'):
    models.build(cfg.model, rngs=0)


@pytest.mark.parametrize('spec', ['configs/dense.py:tiny', 'configs/megabyte.py:tiny'])
def test_a_model_called_with_bad_inputs_says_what_it_takes(spec):
  """Were errors from deep inside (`ones_like requires ndarray`, `tuple index out of
  range`, an einsum's); an id past the vocabulary was NaN logits at every position of its
  row, -1 the last id's. Inside jit ids are not known: checked where they are."""
  model = models.build(config_lib.load(spec).model, rngs=nnx.Rngs(0))
  vocab = model(jnp.array([[1, 2]])).shape[-1]
  assert model([[1, 2]]).shape == (1, 2, vocab)  # a list is an array
  for args, said in [
      ((jnp.array([1, 2, 3]),), r'a model takes tokens as integers \[batch, length\], not '
       r'int32 \[3\]'),
      ((jnp.ones((1, 3)),), r'not float32 \[1, 3\]'),
      ((jnp.array([[1, 2]]), jnp.array([1, 1])), r'segment_ids \[2\] are not the shape of '
       r'the tokens \[1, 2\]'),
      ((jnp.array([[1, vocab, 2, -1, vocab]]),), rf'token ids \[-1, {vocab}\] outside the '
       rf'vocabulary \[0, {vocab}\)$')]:
    with pytest.raises(ValueError, match=said):
      model(*args)
