"""MEGABYTE: byte-level causality, partial patches, packed documents, sharding, training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import compiled_call, jitted, mesh_config, sharded_copy
from jaxarch import config as config_lib
from jaxarch import infer, models
from jaxarch.data import make_train_dataset
from jaxarch.layers.params import normal
from jaxarch.parallel.context import logical_mesh
from jaxarch.train import train

P = 4  # the tiny presets' patch size


def _cfg(preset='tiny', *overrides):
  return config_lib.load(f'configs/megabyte.py:{preset}', ['model.dtype=float32', *overrides])


@pytest.fixture(scope='module')
def model():
  return models.build(_cfg().model, rngs=nnx.Rngs(0))


def _logits(model, tokens, segment_ids=None, positions=None):
  tokens = jnp.asarray(tokens, jnp.int32)
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return compiled_call(model, tokens, jnp.asarray(segment_ids), jnp.asarray(positions))


def _reference_logits(model, x):
  """MEGABYTE's paper written out on the byte stream x [T] that the positions predict, with the
  model's weights and its global and local stacks: the global input of patch k is the
  concatenation of the global embeddings (+ slot) of patch k-1 of x, a pad patch at k = 0;
  the local input at byte p is slice p of the global output projected by w_GL, plus the
  local embedding of byte p-1 (a pad byte at p = 0)."""
  p = model.patch_size
  k = -(-len(x) // p)
  x = np.concatenate([x, np.zeros(k * p - len(x), int)])  # after the last byte: never read
  table = np.asarray(model.global_embed.embedding[...])
  slots = np.asarray(model.slot_embed[...])
  patches = [np.asarray(model.pad_patch[...])]
  patches += [np.concatenate([table[x[(i - 1) * p + j]] + slots[j] for j in range(p)])
              for i in range(1, k)]
  positions = jnp.arange(k)[None]
  h = model.global_model(jnp.asarray(np.stack(patches))[None], positions,
                         jnp.ones_like(positions))
  h = np.asarray(model.global_norm(h))[0].reshape(k, p, -1)
  local_table = np.asarray(model.local_embed.embedding[...])
  previous = [np.asarray(model.local_pad[...]) if j % p == 0 else local_table[x[j - 1]]
              for j in range(k * p)]
  x_local = h.reshape(k * p, -1) @ np.asarray(model.to_local[...]) + np.stack(previous)
  local_positions = jnp.broadcast_to(jnp.arange(p), (k, p))
  y = model.local_model(jnp.asarray(x_local.reshape(k, p, -1), jnp.float32),
                        local_positions, jnp.ones_like(local_positions))
  return np.asarray(model.logits(y)).reshape(k * p, -1)


@pytest.mark.parametrize('first', [257, 65])  # a document's start; a continuation row
def test_logits_equal_the_design_written_out_on_the_predicted_bytes(model, first):
  # Inputs u = [first] + x[:-1] predict x; u[0] is not read (the module docstring).
  x = np.random.default_rng(4).integers(0, 256, 13)  # 3 patches and a byte
  logits = _logits(model, np.concatenate([[first], x[:-1]])[None])[0]
  np.testing.assert_allclose(logits, _reference_logits(model, x)[:13], atol=1e-5)


def test_changing_a_byte_changes_no_prediction_at_or_before_it(model):
  # Position t predicts byte t+1 of the input, i.e. target byte t. Changing input t (target
  # byte t-1) must leave the predictions of targets 0..t-1 alone and change target t's.
  tokens = np.random.default_rng(0).integers(0, 256, (2, 22))  # 5.5 patches
  reference = _logits(model, tokens)
  for t in range(1, 22):
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 1 + t) % 256
    diff = np.abs(np.asarray(_logits(model, changed) - reference)).max(axis=(0, 2))
    assert diff[:t].max() == 0, f'input {t} reached an earlier prediction'
    assert diff[t] > 0, f'input {t} did not reach its own position'


def test_a_partial_last_patch_is_padded_without_changing_the_rest(model):
  tokens = np.random.default_rng(1).integers(0, 256, (2, 16))
  full = _logits(model, tokens)
  for t in (5, 6, 7, 9):
    np.testing.assert_allclose(_logits(model, tokens[:, :t]), full[:, :t], atol=1e-6)


def test_packed_documents_see_only_themselves(model):
  # One row: document a (8 bytes), document b (10 bytes + 2 alignment padding). Each
  # document's predictions equal those of the document alone.
  rng = np.random.default_rng(2)
  a, b = rng.integers(0, 256, 8), rng.integers(0, 256, 10)
  row = np.concatenate([a, b, [256, 256]])[None]
  segments = np.array([[1] * 8 + [2] * 10 + [0] * 2])
  positions = np.array([list(range(8)) + list(range(12))])
  packed = _logits(model, row, segments, positions)
  np.testing.assert_allclose(packed[:, :8], _logits(model, a[None]), atol=1e-5)
  np.testing.assert_allclose(packed[:, 8:18], _logits(model, b[None]), atol=1e-5)


@pytest.mark.parametrize('preset, mesh', [
    pytest.param('tiny_ultramem', dict(data=2, fsdp=2, tensor=2),  # the table over fsdp x tensor
                 marks=pytest.mark.slow),
    ('tiny_moe', dict(data=2, expert=2, tensor=2)),  # the global model's experts over expert
])
def test_sharded_over_8_devices_equals_one_device(preset, mesh):
  cfg = mesh_config(_cfg(preset), **mesh)
  model = models.build(cfg.model, rngs=nnx.Rngs(3))
  model.set_attributes(deterministic=True, raise_if_not_found=False)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 256, (4, 32)), jnp.int32)
  single = _logits(model, tokens)
  mesh, sharded_model = sharded_copy(model, cfg)
  graphdef, state = nnx.split(sharded_model)

  @jax.jit
  def sharded(state, tokens):
    with logical_mesh(mesh, cfg.mesh.rules):
      return nnx.merge(graphdef, state)(tokens)

  np.testing.assert_allclose(sharded(state, tokens), single, atol=2e-5)


def test_documents_start_on_patch_boundaries_in_packed_rows(data_dir):
  cfg = _cfg('tiny', f'data.data_dir={data_dir}', 'data.seq_len=64')
  batches = iter(make_train_dataset(cfg.data, seed=0, global_batch_size=8, packing_streams=1))
  rows = [next(batches) for _ in range(40)]  # stdlib files run over many rows
  segments = np.concatenate([b['segment_ids'] for b in rows])
  inputs = np.concatenate([b['inputs'] for b in rows])
  starts = np.argwhere((segments > 0) & (np.diff(segments, prepend=-1, axis=1) != 0))
  assert (starts[:, 1] > 0).sum() >= 2  # documents that start inside a row
  assert (starts[:, 1] % P == 0).all()
  assert ((inputs == 256) == (segments == 0)).all()  # alignment padding carries no loss
  assert (inputs[segments > 0] < 258).all()


@pytest.mark.slow  # 60 train steps on 8 devices (1 min); the dense learning test is default
def test_tiny_megabyte_learns_on_the_default_corpus(tmp_path, data_dir):
  # From ~8.6 bpb at initialisation to under 5 in 60 steps. The default corpus is the
  # running Python's stdlib, so its validation files differ by version: 4.23 under 3.11,
  # 4.53 under 3.12.
  cfg = mesh_config(_cfg('tiny', f'data.data_dir={data_dir}', 'train.steps=60',
                         'train.batch_size=16', 'data.seq_len=64', 'train.warmup_steps=6',
                         'train.lr=3e-3', 'log.every_steps=10', 'log.eval_every_steps=60',
                         'log.eval_batches=4', 'checkpoint.every_steps=60',
                         'log.progress=false', 'log.tensorboard=false'), data=2, fsdp=2,
                    tensor=2)
  assert train(cfg, tmp_path)['eval_bpb'] < 5.0


def test_flops_per_byte_count_the_global_model_once_per_patch():
  from jaxarch.train import flops  # pylint: disable=g-import-not-at-top
  cfg = _cfg('small')
  model = nnx.eval_shape(lambda: models.build(cfg.model, rngs=nnx.Rngs(0)))
  size = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  p, t = cfg.model.megabyte.patch_size, cfg.data.seq_len
  local = size(model.local_model) + model.to_local.size + model.local_embed.embedding.size
  expected = (6 * (size(model.global_model) / p + local)
              + 6 * 4 * (t // p) * 512 / p  # global attention: 4 layers, width 512
              + 6 * 2 * p * 256)  # local attention: 2 layers, width 256
  got = flops.train_flops_per_token(cfg.model, models.param_counts(model), t)
  assert got == pytest.approx(expected, rel=0.01)  # norms and pads are counted as matmuls


def test_the_paper_init_is_a_normal_cut_at_two_sigma():
  """`model.init_truncation=2` (the 151m and 1.5b presets, arXiv 2305.07185): every
  normal-initialised weight stays within ±2σ of its own std, whose spread is 0.88σ."""
  cfg = config_lib.load('configs/megabyte.py:tiny', ['model.init_std=0.006',
                                                     'model.init_truncation=2.0'])
  paper = config_lib.load('configs/megabyte.py:151m')
  assert paper.model.init_truncation == 2.0
  # Adam (0.9, 0.98) without weight decay, clip 1.0, 500 warm-up steps (as the MEGABYTE paper).
  assert (paper.train.b1, paper.train.b2, paper.train.weight_decay) == (0.9, 0.98, 0.0)
  assert (paper.train.grad_clip, paper.train.warmup_steps) == (1.0, 500)
  model = models.build(cfg.model, rngs=nnx.Rngs(0))
  embedding = model.local_embed.embedding.get_value()
  assert float(jnp.abs(embedding).max()) <= 0.012
  assert 0.85 * 0.006 < float(embedding.std()) < 0.91 * 0.006
  for path, w in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if 'norm' not in '/'.join(map(str, path)):  # norm scales start at 1
      assert float(jnp.abs(w.get_value()).max()) <= 0.012, path
  untruncated = normal(0.006)(jax.random.PRNGKey(0), embedding.shape)
  assert float(jnp.abs(untruncated).max()) > 0.012


def test_cached_generation_equals_the_full_forward_for_prompts_of_every_length_mod_p(model):
  # Prompts of 1 .. 2P+2 bytes (1, P-1, P, P+1, ...) prefilled together, with other bytes
  # after each prompt in the prefill buffer, then decoded across several patch boundaries.
  rng = np.random.default_rng(5)
  lengths = np.arange(1, 2 * P + 3)
  batch, width, total = len(lengths), 3 * P, 3 * P + 8
  tokens = jnp.asarray(rng.integers(0, 256, (batch, total)), jnp.int32)
  decoder = infer.for_inference(model)
  full = np.asarray(compiled_call(decoder, tokens))
  infer.add_caches(decoder, batch=batch, length=total)
  prompts = np.asarray(tokens[:, :width]).copy()
  for i, n in enumerate(lengths):
    prompts[i, n:] = rng.integers(0, 256, width - n)
  rows = np.arange(batch)
  logits = jitted(infer.prefill)(decoder, jnp.asarray(prompts), jnp.asarray(lengths))
  np.testing.assert_allclose(logits, full[rows, lengths - 1], atol=1e-5)
  decode_step = jitted(infer.decode_step)
  for step in range(total - lengths.max()):
    positions = lengths + step
    logits = decode_step(decoder, tokens[rows, positions], jnp.asarray(positions))
    np.testing.assert_allclose(logits, full[rows, positions], atol=1e-5,
                               err_msg=f'positions {positions}')


def test_prefill_of_a_prompt_buffer_not_in_whole_patches_says_so(model):
  decoder = infer.for_inference(model)
  infer.add_caches(decoder, batch=1, length=4 * P)
  with pytest.raises(ValueError, match=rf'whole patches of {P} bytes, not {P + 1}: pad them'):
    infer.prefill(decoder, jnp.zeros((1, P + 1), jnp.int32), jnp.array([P]))


def test_the_local_model_attends_with_xla_unless_told_otherwise(traced_as_on_gpu, tmp_path):
  """On a GPU the global model's attention is cuDNN's (`model.attention_impl=auto`) and the
  local model's, over patches of P bytes, XLA's (`model.megabyte.local.attention_impl`):
  lowered for CUDA, cuDNN's flash attention appears once per global layer, or per layer
  of both models with the local key `auto`. A run saved before the key gets its default."""
  del traced_as_on_gpu

  def cudnn_calls(*overrides):
    cfg = config_lib.load('configs/megabyte.py:tiny', ['model.dtype=bfloat16', *overrides])
    graphdef, state = nnx.split(models.build(cfg.model, rngs=nnx.Rngs(0)))
    loss = lambda state, tokens: jnp.sum(nnx.merge(graphdef, state)(tokens))
    hlo = jax.jit(loss).trace(state, jnp.zeros((2, 32), jnp.int32)).lower(
        lowering_platforms=('cuda',)).as_text()
    return hlo.count('__cudnn$fmha')

  cfg = config_lib.load('configs/megabyte.py:tiny')
  assert (cfg.model.n_layers, cfg.model.megabyte.local.n_layers) == (2, 2)
  assert cudnn_calls() == 2
  assert cudnn_calls('model.megabyte.local.attention_impl=auto') == 4
  config_lib.save(cfg, tmp_path / 'config.json')
  saved = json.loads((tmp_path / 'config.json').read_text())
  del saved['model']['megabyte']['local']['attention_impl']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  restored = config_lib.load_json(tmp_path / 'config.json')
  assert restored.model.megabyte.local.attention_impl == 'xla'
