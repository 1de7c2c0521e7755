"""Generation: cached decoding equals the full forward pass, batching, sampling, stops, CLI."""

import json
import sys
import logging
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import (FAMILIES, compiled_call, family_config, jitted, mesh_config,
                      sharded_copy, with_random_query_convs)
from jaxarch import cli, infer, models
from jaxarch import config as config_lib
from jaxarch.parallel import make_mesh
from jaxarch.train.checkpoint import Checkpointer
from jaxarch.train.state import init_state, make_setup
from jaxarch.train.workdir import CHECKPOINTS

MESHES = {  # the 8 devices as each family is trained on them
    'dense': dict(data=2, fsdp=2, tensor=2),
    'moe': dict(data=2, expert=4),
    'ultramem': dict(data=2, fsdp=2, tensor=2),
    'megabyte': dict(data=2, fsdp=2, tensor=2),
}


def _greedy_without_cache(model, prompt, steps):
  """The reference: the full forward pass over the whole sequence for every new token
  (a fixed-length buffer; causal attention makes what follows position p irrelevant). The
  buffer is a multiple of 32 positions, so that one program serves every prompt and length
  (each new shape would be another compilation)."""
  n = len(prompt)
  tokens = np.zeros((1, -(-(n + steps) // 32) * 32), np.int32)
  tokens[0, :n] = prompt
  for p in range(n, n + steps):
    tokens[0, p] = int(jnp.argmax(compiled_call(model, tokens)[0, p - 1]))
  return tokens[0, n:n + steps].tolist()


@pytest.mark.parametrize('family, overrides', [
    # MEGABYTE's caches are test_megabyte.py's (prompts of every length mod the patch size),
    # UltraMem's below: their composition runs in the slow run.
    *((family, ()) if family != 'megabyte' else
      pytest.param(family, (), marks=pytest.mark.slow) for family in sorted(FAMILIES)),
    ('dense', ('model.qkv_bias=True', 'model.qk_norm=True')),  # a Qwen2's and a Qwen3's
    ('dense', ('model.sliding_window=4', "model.attention_pattern=('local', 'global')")),
    # The window's ring caches are the attention layer's, checked here by the dense models;
    # MoE and UltraMem blocks (checked above) around windowed attention in the slow run.
    pytest.param('moe', ('model.sliding_window=3',), marks=pytest.mark.slow),
    pytest.param('ultramem', ('model.sliding_window=3',), marks=pytest.mark.slow),
    ('dense', ('model.sliding_window=4', "model.attention_pattern=('local', 'global')",  # a
               'model.local_rope_theta=100.0', 'model.qk_norm=True',  # Gemma 3's
               'model.post_norms=True', 'model.embed_scale=True',
               'model.mlp_activation=gelu_tanh'))])
def test_cached_decoding_gives_the_full_forward_logits_at_every_position(family, overrides):
  # Two prompts of lengths 5 and 11 prefilled together (bucket 16), then fed their
  # continuation one token per step up to position 23 (for MEGABYTE, the two sequences
  # cross patch boundaries at different steps). fp32; measured error <= 3e-7.
  cfg = family_config(family)
  for override in overrides:
    config_lib.apply_override(cfg, override)
  model = with_random_query_convs(models.build(config_lib.validate(cfg).model,
                                               rngs=nnx.Rngs(0)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 24)), jnp.int32)
  decoder = infer.for_inference(model)
  full = compiled_call(decoder, tokens)  # b t v
  infer.add_caches(decoder, batch=2, length=32)
  # A windowed layer keeps a ring of its window's slots, which the 11-token prompt and the
  # decode steps wrap around (and the prefill's padding must not overwrite).
  if cfg.model.sliding_window:
    assert [block.attn.cache_k.shape[1] for block in decoder.blocks] == [
        block.attn.window or 32 for block in decoder.blocks]
  lengths = jnp.array([5, 11])
  rows = jnp.arange(2)
  logits = jitted(infer.prefill)(decoder, tokens[:, :16], lengths)
  np.testing.assert_allclose(logits, full[rows, lengths - 1], atol=1e-5)
  decode_step = jitted(infer.decode_step)
  for step in range(24 - 11):
    positions = lengths + step
    logits = decode_step(decoder, tokens[rows, positions], positions)
    np.testing.assert_allclose(logits, full[rows, positions], atol=1e-5,
                               err_msg=f'positions {positions}')


# Every family's caches are checked against the full forward by default (above); sharded,
# the dense model by default and the others in the slow run.
@pytest.mark.parametrize('family', [
    *(f if f == 'dense' else pytest.param(f, marks=pytest.mark.slow) for f in sorted(FAMILIES))])
def test_sharded_greedy_generation_equals_uncached_greedy_alone_or_in_a_batch(family):
  cfg = family_config(family, **MESHES[family])
  model = with_random_query_convs(models.build(cfg.model, rngs=nnx.Rngs(0)))
  mesh, sharded = sharded_copy(model, cfg)
  generator = infer.Generator(sharded, mesh=mesh, rules=cfg.mesh.rules)
  prompts = [[257, 10, 11, 12], [257] + list(range(40, 61)), [257, 99]]
  batched, stats = generator(prompts, max_new_tokens=8)
  assert stats['forward_passes'] == 8 and stats['new_tokens'] == 24
  alone, _ = generator(prompts[1:2], max_new_tokens=8)
  assert alone[0] == batched[1]
  for prompt, out in zip(prompts, batched):
    assert out == _greedy_without_cache(model, prompt, 8)


def test_sharded_greedy_generation_with_windowed_ring_caches_equals_uncached_greedy():
  """Local layers of window 3 keep rings of 3 slots, global ones the whole context;
  prompts shorter and longer than the window, padded together, then 10 steps."""
  cfg = family_config('dense', **MESHES['dense'])
  for override in ('model.sliding_window=3', "model.attention_pattern=('local', 'global')"):
    config_lib.apply_override(cfg, override)
  model = models.build(config_lib.validate(cfg).model, rngs=nnx.Rngs(0))
  mesh, sharded = sharded_copy(model, cfg)
  generator = infer.Generator(sharded, mesh=mesh, rules=cfg.mesh.rules)
  prompts = [[257, 10], [257] + list(range(40, 53)), [257, 7, 8, 9, 3]]
  batched, _ = generator(prompts, max_new_tokens=10)
  for prompt, out in zip(prompts, batched):
    assert out == _greedy_without_cache(model, prompt, 10)


def _short_context(family, max_len=16):
  """FAMILIES[family] built for `max_len` positions (its training rows no longer); MEGABYTE
  without the UltraMem layer of its global model, which reads no position (and whose
  lookups take as long to compile as the rest of the model)."""
  cfg = (family_config(family) if family != 'megabyte' else
         config_lib.load('configs/megabyte.py:tiny', ['model.dtype=float32']))
  for override in (f'data.seq_len={max_len}', f'model.max_len={max_len}'):
    config_lib.apply_override(cfg, override)
  return models.build(config_lib.validate(cfg).model, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('family', ['dense', 'megabyte'])
def test_generation_past_max_len_is_the_full_forwards_and_warned_once(family, caplog):
  """Past model.max_len nothing runs out (caches sized for the call, rotary positions):
  the tokens are uncached greedy's there, and the Generator says so once, before
  compiling. A prompt of n tokens continues by max_len + 1 - n tokens unwarned: the last
  new token is never read (for MEGABYTE, 10 and 17 tokens end inside a patch of 4)."""
  model = _short_context(family)
  generator = infer.Generator(model)
  prompts = [[257, 5], [257] + list(range(40, 49)), [257] + list(range(60, 76))]
  # Uncached greedy's tokens, each prompt's longest continuation below (greedy's first
  # tokens do not depend on later ones: shorter calls give prefixes of these).
  want = [_greedy_without_cache(model, p, steps) for p, steps in zip(prompts, (12, 12, 3))]
  with caplog.at_level(logging.WARNING, logger='jaxarch.infer.generate'):
    assert generator(prompts[:2], max_new_tokens=7)[0][1] == want[1][:7]  # 10 + 7 - 1 = 16
    assert not caplog.records
    out, _ = generator(prompts[:2], max_new_tokens=12)  # 21
    assert [r.getMessage() for r in caplog.records] == [
        'generate: prompt 1 of 10 tokens + max_new_tokens=12 reads 21 positions, more than '
        'model.max_len=16; it goes on past them, which the model was not built for (tokens '
        'of unknown quality): lower max_new_tokens to 7']
    assert out == want[:2]
    out, _ = generator(prompts, max_new_tokens=3)  # a prompt past it: not warned again
    assert len(caplog.records) == 1 and out == [w[:3] for w in want]
    infer.Generator(model)(prompts, max_new_tokens=3)  # the same shapes: compiled once
  assert caplog.records[1].getMessage().startswith(
      'generate: prompt 2 of 17 tokens + max_new_tokens=3 reads 19 positions')
  assert caplog.records[1].getMessage().endswith(': shorten the prompt to at most 14 tokens')


def test_prefill_and_decode_step_refuse_what_their_caches_cannot_hold():
  """Without caches a decode step attended to its own token alone (logits 0.63 off, no
  error); past the caches its keys were dropped (0.09 off); a prompt longer than them was
  a shape error from inside jax. Inside jit a decode step's positions are not known."""
  model = infer.for_inference(models.build(family_config('dense').model, rngs=nnx.Rngs(0)))
  tokens = jnp.arange(8, dtype=jnp.int32)[None]
  for call, args in (('prefill', (tokens, jnp.array([8]))),
                     ('decode_step', (tokens[:, 0], jnp.array([0])))):
    with pytest.raises(infer.GenerateError, match=f'^{call}: the model has no decode caches; '
                       r'allocate them first with add_caches\(model, batch, length\)$'):
      getattr(infer, call)(model, *args)
  infer.add_caches(model, batch=1, length=6)
  with pytest.raises(infer.GenerateError, match='^prefill: prompts of 8 tokens do not fit '
                     'caches of 6 positions; add_caches with a length of at least 8'):
    infer.prefill(model, tokens, jnp.array([5]))
  # Shapes that are not the caches' rows: were an einsum's or a dynamic_update_slice's error.
  for call, args, said in (
      ('prefill', (jnp.tile(tokens[:, :5], (3, 1)), jnp.array([5] * 3)), r'tokens must be '
       r'\[b, t\] with b=1 \(the rows add_caches made\), not \[3, 5\]'),
      ('prefill', (tokens[:, :5], jnp.array(5)), r'lengths must be \[b\] with b=1'),
      ('decode_step', (tokens[:, 5:6], jnp.array([5])), r'tokens must be \[b\] with b=1 '
       r'\(the rows add_caches made\), not \[1, 1\]')):
    with pytest.raises(infer.GenerateError, match=f'^{call}: {said}'):
      getattr(infer, call)(model, *args)
  infer.prefill(model, tokens[:, :5], jnp.array([5]))
  infer.decode_step(model, tokens[:, 5], jnp.array([5]))  # the last slot
  with pytest.raises(infer.GenerateError, match=r"^decode_step: positions \[6\] outside the "
                     r"caches' 6 positions \[0, 6\); add_caches with a length of at least 7$"):
    infer.decode_step(model, tokens[:, 6], jnp.array([6]))


def test_inference_mode_leaves_the_model_as_it_was():
  cfg = config_lib.load('configs/moe.py:tiny', ['model.moe.capacity_factor=1.25',
                                                'model.remat=full'])
  model = models.build(cfg.model, rngs=nnx.Rngs(0))
  decoder = infer.for_inference(model)
  moe, copy = model.blocks[0].mlp, decoder.blocks[0].mlp
  assert (moe.capacity_factor, moe.deterministic, model.remat) == (1.25, False, 'full')
  assert (copy.capacity_factor, copy.deterministic, decoder.remat) == (None, True, 'none')
  assert (moe.capacity_of_real, copy.capacity_of_real) == (False, True)
  assert copy.w_gate.get_value() is moe.w_gate.get_value()  # the weights are shared


@pytest.fixture(scope='module')
def dense_generator():
  model = models.build(family_config('dense').model, rngs=nnx.Rngs(1))
  return infer.Generator(model)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(dense_generator):
  prompts = [[257, 1, 2, 3], [257, 4]]
  sample = lambda seed, **kw: dense_generator(prompts, max_new_tokens=12, method='sample',
                                              seed=seed, **kw)[0]
  first = sample(3, temperature=1.3, top_p=0.95)
  assert first == sample(3, temperature=1.3, top_p=0.95)
  assert first != sample(4, temperature=1.3, top_p=0.95)
  greedy, _ = dense_generator(prompts, max_new_tokens=12)
  assert sample(5, top_k=1) == greedy
  # Seeds past 32 bits draw differently (jax without x64 keeps the low 32 bits of a seed).
  assert sample(3 + 2**32, temperature=1.3, top_p=0.95) != first


def test_a_prompt_with_its_own_seed_draws_the_same_tokens_wherever_it_stands(dense_generator):
  a, b, c = [257, 1, 2, 3], [257, 4], [257, 9, 9]
  sample = lambda prompts, seed: dense_generator(prompts, max_new_tokens=10, method='sample',
                                                 temperature=1.5, seed=seed)[0]
  alone = sample([a], [11])[0]
  assert sample([b, a], [5, 11])[1] == alone  # another place, another batch
  assert sample([c, b, a], [7, 5, 11])[2] == alone
  assert sample([a, a], [11, 12])[0] == alone != sample([a, a], [11, 12])[1]
  # One seed for the call: copies of a prompt draw by their places, differently.
  twice = sample([a, a], 11)
  assert twice[0] != twice[1] and twice == sample([a, a], 11)
  with pytest.raises(infer.GenerateError, match='2 seeds for 3 prompts'):
    sample([a, b, c], [1, 2])


def test_sampling_values_stop_ids_and_lengths_are_traced_not_compiled_again():
  generator = infer.Generator(models.build(family_config('dense').model, rngs=nnx.Rngs(1)))
  prompts = [[257, 1, 2, 3], [257, 4]]
  sample = lambda **kw: generator(prompts, method='sample', seed=3, **kw)[0]
  greedy, _ = generator(prompts, max_new_tokens=12)
  assert sample(max_new_tokens=12, temperature=1.3) != greedy
  assert sample(max_new_tokens=12, temperature=1e-4) == greedy  # the new value counts
  assert sample(max_new_tokens=12, top_p=0.9) != greedy
  assert sample(max_new_tokens=12, top_k=1, temperature=2.0) == greedy
  assert generator(prompts, max_new_tokens=5)[0] == [row[:5] for row in greedy]
  stop = greedy[0][2]
  assert generator(prompts, max_new_tokens=9, stop_ids=[stop])[0][0] == greedy[0][:3]
  assert len(generator._compiled) == 3  # greedy; sample; sample with top-k or top-p


def test_generation_stops_at_a_stop_id(dense_generator):
  prompt = [[257, 30, 31, 32]]
  (free,), _ = dense_generator(prompt, max_new_tokens=10)
  stop = free[3]
  (stopped,), stats = dense_generator(prompt, max_new_tokens=10, stop_ids=[stop])
  assert stopped == free[:free.index(stop) + 1]
  assert stats['forward_passes'] == len(stopped)  # the loop ends when every row stopped


def test_one_stop_id_or_none_and_prompts_as_an_array(dense_generator):
  prompts = [[257, 30, 31, 32], [257, 40, 41, 42]]
  free, _ = dense_generator(prompts, max_new_tokens=6)
  stop = free[0][2]
  assert dense_generator(prompts, max_new_tokens=6, stop_ids=stop)[0] == dense_generator(
      prompts, max_new_tokens=6, stop_ids=[stop])[0]
  assert dense_generator(prompts, max_new_tokens=6, stop_ids=None)[0] == free
  assert dense_generator(np.array(prompts), max_new_tokens=np.int64(6))[0] == free
  assert dense_generator(jnp.array(prompts), max_new_tokens=6)[0] == free
  for one in (np.array(stop), jnp.int32(stop)):  # was: "must be token ids (ints)"
    assert dense_generator(prompts, max_new_tokens=6, stop_ids=one)[0] == dense_generator(
        prompts, max_new_tokens=6, stop_ids=[stop])[0]


def test_every_stat_is_documented(dense_generator):
  _, stats = dense_generator([[257, 30, 31]], max_new_tokens=3)
  documented = set(re.findall(r'`(\w+)`', infer.Generator.__call__.__doc__))
  assert set(stats) <= documented, set(stats) - documented


def test_temperature_zero_samples_the_most_likely_token(dense_generator):
  prompts = [[257, 40, 41], [257, 50]]
  greedy, _ = dense_generator(prompts, max_new_tokens=6)
  assert dense_generator(prompts, max_new_tokens=6, method='sample', temperature=0,
                         top_p=0.9)[0] == greedy
  # The values it then leaves unused are still checked (they were reset and passed).
  for value, message in (({'top_p': 5.0}, r'top_p=5.0 must be in \(0, 1\]'),
                         ({'top_k': -7}, 'top_k=-7 must be >= 0')):
    with pytest.raises(infer.GenerateError, match=message):
      dense_generator(prompts, max_new_tokens=6, method='sample', temperature=0, **value)


def test_rows_that_fill_the_batch_out_to_the_mesh_stop_at_once():
  # One prompt on a data=8 mesh: 7 stand-in rows fill the batch; the loop ends with the
  # prompt's stop, and the statistics count the prompt alone.
  cfg = mesh_config(config_lib.load('configs/dense.py:tiny', ['model.dtype=float32']), data=8)
  mesh, model = sharded_copy(models.build(cfg.model, rngs=nnx.Rngs(0)), cfg)
  generator = infer.Generator(model, mesh=mesh, rules=cfg.mesh.rules)
  prompt = [[257, 30, 31, 32]]
  (free,), _ = generator(prompt, max_new_tokens=12)
  (stopped,), stats = generator(prompt, max_new_tokens=12, stop_ids=[free[2]])
  assert stopped == free[:free.index(free[2]) + 1]
  assert stats['forward_passes'] == len(stopped) and stats['tokens_per_pass'] == 1.0


def test_ids_beyond_the_tokenizers_vocabulary_are_never_generated():
  # The byte tokenizer has 258 ids; the model's vocabulary is padded to 384.
  model = models.build(config_lib.load('configs/dense.py:tiny').model, rngs=nnx.Rngs(1))
  prompts = [[257, i] for i in range(40, 48)]
  free, _ = infer.Generator(model)(prompts, max_new_tokens=16)
  assert max(map(max, free)) >= 258  # an untrained model picks padding ids too
  limited, _ = infer.Generator(model, vocab_limit=258)(prompts, max_new_tokens=16)
  assert max(map(max, limited)) < 258
  limited, _ = infer.generate(model, prompts, max_new_tokens=16, vocab_limit=258)
  assert max(map(max, limited)) < 258


def test_sampling_keeps_only_the_top_k_and_nucleus_tokens():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)), (4000, 4))
  draw = lambda **kw: np.asarray(infer.next_tokens(
      logits, jax.random.PRNGKey(0), infer.Sampling('sample', **kw)))
  frequencies = np.bincount(draw(), minlength=4) / 4000
  np.testing.assert_allclose(frequencies, probs, atol=0.03)
  assert set(draw(top_k=2)) == {0, 1}
  assert set(draw(top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
  assert set(draw(top_p=0.5)) == {0}
  # A first token that reaches top_p exactly is kept alone: its sum less its own
  # probability rounded below 0.4 and kept the second.
  exact = jnp.broadcast_to(jnp.log(jnp.asarray([0.4, 0.25, 0.2, 0.15])), (400, 4))
  assert set(np.asarray(infer.next_tokens(exact, jax.random.PRNGKey(0), infer.Sampling(
      'sample', top_p=0.4))).tolist()) == {0}
  assert set(draw(temperature=0.05)) == {0}
  # Tiny temperatures tend to greedy: 1e-39 overflowed float32 to +inf for every token
  # above 0 (all of them here) and picked the first.
  shifted = logits[:8] - 10.0  # every logit negative
  assert set(np.asarray(infer.next_tokens(shifted, jax.random.PRNGKey(0), infer.Sampling(
      'sample', temperature=1e-39))).tolist()) == {0}
  assert set(np.asarray(infer.next_tokens(shifted[:, ::-1], jax.random.PRNGKey(0),
                                          infer.Sampling('sample', temperature=1e-39)))) == {3}
  # Ties at the edge: of four equally likely tokens, top_p=0.3 keeps two (by rank, as
  # transformers and vLLM do), top_k=3 all four (tied with the third, as theirs keep them).
  tied = jnp.zeros((4000, 4))
  draw = lambda logits=tied, **kw: set(np.asarray(infer.next_tokens(
      logits, jax.random.PRNGKey(0), infer.Sampling('sample', **kw))).tolist())
  assert len(draw(top_p=0.3)) == 2 and len(draw(top_k=3)) == 4
  assert len(draw(top_k=3, top_p=0.3)) == 2  # top-p of the four (1/4 each)
  edge = jnp.broadcast_to(jnp.array([2.0, 1.0, 1.0, 0.0]), (4000, 4))
  assert draw(edge, top_k=1) == {0} and draw(edge, top_k=2) == draw(edge, top_k=3) == {0, 1, 2}
  greedy = infer.next_tokens(logits[:2], None, infer.Sampling())
  np.testing.assert_array_equal(greedy, [0, 0])


def test_sampling_takes_typed_keys_as_legacy_ones():
  # jax.random.key(0) (a typed key, shape []) was taken for a key per row and failed in
  # vmap; a typed key per row [b] failed in split.
  logits = jax.random.normal(jax.random.PRNGKey(1), (64, 10))
  sampling = infer.Sampling('sample', temperature=1.5)
  legacy = np.asarray(infer.next_tokens(logits, jax.random.PRNGKey(0), sampling))
  assert len(set(legacy.tolist())) > 1
  np.testing.assert_array_equal(infer.next_tokens(logits, jax.random.key(0), sampling), legacy)
  np.testing.assert_array_equal(
      infer.next_tokens(logits, jax.random.split(jax.random.key(0), 64), sampling), legacy)
  with pytest.raises(infer.GenerateError, match="^next_tokens: method='sample' draws with"):
    infer.next_tokens(logits, None, sampling)


def test_sampling_values_below_float32s_range_keep_the_most_likely_token():
  # top_p=1e-46 and temperature=1e-46 round to 0 in float32: top-p then kept no token,
  # and 0/0 at the most likely one sorted it last; both drew token 0, not the argmax.
  logits = jnp.array([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 0.0, 0.0]])
  for kwargs in (dict(top_p=1e-46), dict(temperature=1e-46, top_k=2),
                 dict(temperature=1e-46, top_p=0.9), dict(temperature=1e-46)):
    draws = infer.next_tokens(logits, jax.random.PRNGKey(0), infer.Sampling('sample', **kwargs))
    assert np.asarray(draws).tolist() == [1, 0], kwargs


def test_a_vocab_limit_below_one_or_past_the_model_s_ids_is_refused():
  model = models.build(family_config('dense').model, rngs=nnx.Rngs(1))
  for limit in (0, -5):  # every logit -inf: greedy drew id 0 at every step, silently
    with pytest.raises(infer.GenerateError, match=f'vocab_limit={limit} must be >= 1'):
      infer.Generator(model, vocab_limit=limit)
  with pytest.raises(infer.GenerateError, match="vocab_limit=10000 is more than the model's "
                     '384 ids: is it the tokenizer of another model'):
    infer.Generator(model, vocab_limit=10000)  # was taken: it limited nothing
  # A prompt's id in the padding past the tokenizer's is no token's: was generated from.
  with pytest.raises(infer.GenerateError, match=r'prompt 0 has token ids \[300\] outside the '
                     r'vocabulary \[0, 258\)'):
    infer.Generator(model, vocab_limit=258)([[257, 300]], max_new_tokens=1)


def test_one_seed_as_a_0d_array_is_one_seed(dense_generator):
  sample = lambda seed: dense_generator([[257, 1, 2]], max_new_tokens=4, method='sample',
                                        seed=seed)[0]
  assert sample(np.array(3)) == sample(3)  # was: TypeError, len() of unsized object


@pytest.mark.parametrize('kwargs, message', [
    (dict(prompts=[[257], []]), 'prompt 1 is empty'),
    (dict(prompts=[[257, 999]]), 'token ids [999] outside the vocabulary [0, 384)'),
    (dict(method='beam'), "method='beam'"),
    (dict(method='sample', temperature=-1.0), 'temperature=-1.0 must be > 0'),
    (dict(method='sample', temperature=float('inf')), 'temperature=inf must be > 0 and finite'),
    (dict(top_p=0.9), "top_p choose among tokens for method='sample'"),  # greedy
    (dict(method='sample', top_p=1.5), 'top_p=1.5'),
    (dict(max_new_tokens=0), 'max_new_tokens=0'),
    # Not deep TypeErrors, and text of digits is not read as ids ('12' -> [1, 2]).
    (dict(prompts=[257, 1, 2]), 'each a list of token ids'),  # one prompt, not in a list
    (dict(prompts=['12']), 'each a list of token ids'),
    (dict(prompts=np.array([257, 1, 2])), 'each a list of token ids'),
    (dict(max_new_tokens=5.5), 'max_new_tokens=5.5 must be an int'),
    (dict(method='sample', top_k=2.5), 'top_k=2.5 must be an int'),  # not top-2
    (dict(stop_ids=['x']), "stop_ids=['x'] must be token ids"),
    # Were a bare ValueError / TypeError from float().
    (dict(method='sample', temperature='hot'), "temperature='hot' must be a number"),
    (dict(method='sample', top_p=None), 'top_p=None must be a number'),
])
def test_bad_generation_arguments_are_one_line_errors(dense_generator, kwargs, message):
  kwargs = {'prompts': [[257, 1]], 'max_new_tokens': 4, **kwargs}
  with pytest.raises(infer.GenerateError, match='^generate: ') as error:
    dense_generator(kwargs.pop('prompts'), **kwargs)
  assert message in str(error.value) and '\n' not in str(error.value)


def test_a_huge_max_new_tokens_is_one_line_not_an_xla_traceback(dense_generator,
                                                                monkeypatch):
  """Its room in the caches is allocated up front: past int32 positions it was an
  OverflowError, and caches past the memory a RESOURCE_EXHAUSTED traceback from XLA."""
  with pytest.raises(infer.GenerateError, match='^generate: max_new_tokens=2,147,483,648 '
                     'makes caches of 2,147,483,656 positions, past the 2[*][*]31'):
    dense_generator([[257, 1]], max_new_tokens=2**31)

  def out_of_memory(*args):
    raise jax.errors.JaxRuntimeError(
        'RESOURCE_EXHAUSTED: Out of memory allocating 1099511627776 bytes.\nmore')

  # (Allocated for real, a TiB of caches could meet an overcommitting host's OOM killer.)
  with monkeypatch.context() as patch:
    patch.setattr(dense_generator, '_compile', lambda *args: (out_of_memory, out_of_memory))
    with pytest.raises(infer.GenerateError, match='^generate: out of device memory [(]Out of '
                       'memory allocating 1099511627776 bytes[)] for caches') as error:
      dense_generator([[257, 1]], max_new_tokens=2**31 - 2**10)
  assert 'max_new_tokens=2,147,482,624): lower max_new_tokens' in str(error.value)
  assert '\n' not in str(error.value)
  assert dense_generator([[257, 1]], max_new_tokens=3)[0][0]  # still generates after it


@pytest.fixture(scope='module')
def tiny_checkpoints(tmp_path_factory):
  """The checkpoints of a run of configs/dense.py:tiny on the 8 devices, made once for
  the commands' tests (an initial state takes seconds to compile): `_tiny_run` copies them
  into each test's own run."""
  cfg = mesh_config(config_lib.load('configs/dense.py:tiny'), data=8)
  path = tmp_path_factory.mktemp('tiny')
  checkpointer = Checkpointer(path, async_save=False)
  checkpointer.save(7, init_state(cfg, make_setup(cfg, make_mesh(cfg))))
  checkpointer.close()
  return path / CHECKPOINTS


def _tiny_run(workdir, checkpoints, cfg):
  """A run of `cfg` in `workdir`: its config.json and a copy of `tiny_checkpoints` (data
  keys, and max_len, which rotary embeddings give no weights, leave them as they are)."""
  shutil.copytree(checkpoints, workdir / CHECKPOINTS)
  config_lib.save(cfg, workdir / 'config.json')


def test_generate_command_continues_prompts_from_the_latest_checkpoint(tmp_path, capsys,
                                                                       tiny_checkpoints,
                                                                       monkeypatch):
  _tiny_run(tmp_path, tiny_checkpoints,
            mesh_config(config_lib.load('configs/dense.py:tiny'), data=8))

  assert cli.main(['generate', '--workdir', str(tmp_path), '--prompt', 'import os',
                   '--prompt', 'def f(', '--max_new_tokens', '6', '--ignore_eod']) == 0
  out, err = capsys.readouterr()
  first, second = out.split('-' * 40 + '\n')
  assert first.startswith('import os') and second.startswith('def f(')
  assert 'tokens/s' in err and '12 new tokens' in err
  # The caches the call allocated (tiny: 4 layers of 2 kv heads of 32, k and v, fp32; the
  # 2 prompts filled out to the 8 data shards; the 16-token bucket + 64 new tokens' room).
  assert f'KV caches {4 * 2 * 2 * 32 * 4 * 8 * (16 + 64) / 2**20:,.1f} MiB' in err
  # --json: a line per prompt, with the ids that the text may not hold (a byte model's
  # bytes that are not UTF-8); the same tokens, greedy.
  assert cli.main(['generate', '--workdir', str(tmp_path), '--prompt', 'import os',
                   '--prompt', 'def f(', '--max_new_tokens', '6', '--ignore_eod',
                   '--json']) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [line['prompt'] for line in lines] == ['import os', 'def f(']
  assert [line['prompt'] + line['completion'] for line in lines] == [
      first.rstrip('\n'), second.rstrip('\n')]
  assert all(len(line['ids']) == 6 for line in lines)
  # --stop: a completion ends before the first stop text to appear in it (vLLM's), its ids
  # at the one that completes it; a prompt whose completion holds none is whole.
  whole = lines[0]['completion']
  stop = whole[len(whole) // 2:len(whole) // 2 + 2]
  assert cli.main(['generate', '--workdir', str(tmp_path), '--prompt', 'import os',
                   '--prompt', 'def f(', '--max_new_tokens', '6', '--ignore_eod', '--json',
                   '--stop', stop, '--stop', 'never there']) == 0
  cut = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert cut[0]['completion'] == whole[:whole.index(stop)] and len(whole) >= 4
  assert cut[0]['ids'] == lines[0]['ids'][:len(cut[0]['ids'])] and len(cut[0]['ids']) < 6
  if stop not in lines[1]['completion']:
    assert cut[1] == lines[1]
  # A stop that cannot match, before the weights load: empty (it matched at once), or not
  # UTF-8 (it never matched, silently).
  for bad, said in [('', "'' would end every completion before its first token"),
                    ('x\udcff', "'x\\udcff' is not UTF-8 (at character 1)")]:
    with pytest.raises(SystemExit):
      cli.main(['generate', '--workdir', str(tmp_path), '--prompt', 'a', '--stop', bad])
    assert said in capsys.readouterr().err
  # On a terminal, control characters (a byte model may write any byte) are shown as
  # escapes, not sent: ESC [2J would clear the screen. Into a pipe, the text as it is.
  monkeypatch.setattr(sys.stdout, 'isatty', lambda: True)
  assert cli.main(['generate', '--workdir', str(tmp_path), '--prompt', 'os\x1b[2J\tx',
                   '--max_new_tokens', '2', '--ignore_eod']) == 0
  assert capsys.readouterr().out.startswith('os\\x1b[2J\tx')
  # A prompt that is not UTF-8 (the command line's bytes, which Python keeps as lone
  # surrogates): a byte model reads its bytes as given (a traceback before).
  assert cli.main(['generate', '--workdir', str(tmp_path), '--prompt', 'a\udcffb',
                   '--max_new_tokens', '2', '--ignore_eod', '--json']) == 0
  line = json.loads(capsys.readouterr().out)
  assert line['prompt'] == 'a\ufffdb' and len(line['ids']) == 2
  assert cli._shown('a\x07b\r\n\x9bc', terminal=False) == 'a\x07b\r\n\x9bc'
  assert cli._shown('a\x07b\r\n\x9bc', terminal=True) == 'a\\x07b\\x0d\n\\x9bc'
  monkeypatch.undo()

  assert cli.main(['generate', '--workdir', str(tmp_path / 'missing'), '--prompt', 'x']) == 2
  assert 'config.json not found' in capsys.readouterr().err
  assert cli.main(['generate', '--workdir', str(tmp_path), '--prompt', 'x',
                   '--temperature', '-1']) == 2
  assert 'temperature=-1.0 must be > 0' in capsys.readouterr().err
  # A seed draws nothing for greedy decoding: refused, not ignored (with sampling, taken).
  assert cli.main(['generate', '--workdir', str(tmp_path), '--prompt', 'x',
                   '--seed', '3']) == 2
  assert ('--seed draws sampled tokens; --method=greedy takes the most likely ones'
          in capsys.readouterr().err)


@pytest.mark.parametrize('setting, first', [('data.bos_id=none', [257]),
                                            ('data.bos_id=65', [65]),
                                            ('data.add_bos=False', [])])
def test_generate_command_starts_prompts_with_the_runs_bos(tmp_path, monkeypatch, capsys,
                                                           tiny_checkpoints, setting, first):
  """data.bos_id (an imported Llama's <s>), else the tokenizer's eod, as documents start;
  with data.add_bos=False (an imported Qwen's) the text alone, and an empty prompt, which
  is then no tokens, is one line."""
  _tiny_run(tmp_path, tiny_checkpoints,
            mesh_config(config_lib.load('configs/dense.py:tiny', [setting]), data=8))
  prompts, generate = [], infer.Generator.__call__

  def spy(self, batch, **kwargs):
    prompts.extend(batch)
    return generate(self, batch, **kwargs)

  monkeypatch.setattr(infer.Generator, '__call__', spy)
  assert cli.main(['generate', '--workdir', str(tmp_path), '--prompt', 'hi',
                   '--max_new_tokens', '2']) == 0
  assert prompts == [[*first, *b'hi']]
  assert capsys.readouterr().out.startswith('hi')
  code = cli.main(['generate', '--workdir', str(tmp_path), '--prompt', '',
                   '--max_new_tokens', '2'])
  err = capsys.readouterr().err
  if first:
    assert code == 0 and prompts[-1] == first
  else:
    assert code == 2 and len(prompts) == 1 and err.count('\n') == 1, err
    assert "--prompt '' (prompt 0) is no tokens and the run starts prompts with no BOS" in err


def test_generate_command_stops_at_the_runs_stop_ids_too(tmp_path, monkeypatch, capsys,
                                                        tiny_checkpoints):
  """An imported instruct model ends its turn with another token than the eod (Llama 3's
  <|eot_id|>): data.stop_ids stops `generate` there too; --ignore_eod stops at none."""
  cfg = mesh_config(config_lib.load('configs/dense.py:tiny'), data=8)
  _tiny_run(tmp_path, tiny_checkpoints, cfg)
  calls, generate = [], infer.Generator.__call__

  def spy(self, batch, **kwargs):
    out = generate(self, batch, **kwargs)
    calls.append((kwargs['stop_ids'], out[0][0]))
    return out

  monkeypatch.setattr(infer.Generator, '__call__', spy)
  run = lambda *flags: cli.main(['generate', '--workdir', str(tmp_path), '--prompt', 'hi',
                                 '--max_new_tokens', '8', *flags])
  assert run('--ignore_eod') == 0
  _, free = calls.pop()
  assert len(free) == 8 and 257 not in free[:3]
  stop = free[2]  # the untrained model's third greedy token, as an end of turn
  with cfg.unlocked():
    cfg.data.stop_ids = (stop,)
  config_lib.save(cfg, tmp_path / 'config.json')
  capsys.readouterr()
  assert run() == 0
  stops, got = calls.pop()
  assert tuple(stops) == (257, stop) and got == free[:free.index(stop) + 1]
  assert f'{len(got)} new tokens' in capsys.readouterr().err
  assert run('--ignore_eod') == 0
  assert calls.pop() == ((), free)


def test_generate_command_warns_past_max_len_as_python_does(tmp_path, capsys, caplog,
                                                           tiny_checkpoints):
  """It warned from its own count, prompt + max_new_tokens, one position more than the
  model reads (the last new token is never fed back): now the Generator's warning."""
  _tiny_run(tmp_path, tiny_checkpoints, mesh_config(config_lib.load(
      'configs/dense.py:tiny', ['data.seq_len=16', 'model.max_len=16']), data=8))
  run = lambda new: cli.main(['generate', '--workdir', str(tmp_path), '--prompt', 'import os',
                              '--max_new_tokens', str(new), '--ignore_eod'])  # 10 tokens
  with caplog.at_level(logging.WARNING, logger='jaxarch.infer.generate'):
    assert run(7) == 0
    assert not caplog.records and 'max_len' not in capsys.readouterr().err
    assert run(8) == 0
  assert [r.getMessage() for r in caplog.records] == [
      'generate: prompt 0 of 10 tokens + max_new_tokens=8 reads 17 positions, more than '
      'model.max_len=16; it goes on past them, which the model was not built for (tokens '
      'of unknown quality): lower max_new_tokens to 7']
  assert '8 new tokens' in capsys.readouterr().err


def test_distill_prompts_start_with_the_runs_bos(tmp_path):
  from test_data import _data_config, _write_corpus  # pylint: disable=g-import-not-at-top
  from jaxarch.data import ByteTokenizer  # pylint: disable=g-import-not-at-top
  from jaxarch.infer.distill import sample_prompts  # pylint: disable=g-import-not-at-top
  _write_corpus(tmp_path / 'corpus', num_docs=8, max_len=20)
  cfg = _data_config(tmp_path, f'files:{tmp_path}/corpus/*.txt', bos_id=65)
  # Prompts longer than every document: each is a whole document, from its start.
  prompts = sample_prompts(cfg, 'train', 6, 64, 0, ByteTokenizer())
  assert len(prompts) == 6 and all(p[0] == 65 and 257 not in p for p in prompts)
  # With no BOS (an imported Qwen's), the same documents' text alone.
  cfg.bos_id, cfg.add_bos = None, False
  assert sample_prompts(cfg, 'train', 6, 64, 0, ByteTokenizer()) == [
      p[1:] for p in prompts if p[1:]]


def test_distill_stops_where_generate_does(tmp_path, monkeypatch, tiny_checkpoints):
  """Distilled continuations end at the eod or at data.stop_ids, as `generate`'s."""
  from test_data import _write_corpus  # pylint: disable=g-import-not-at-top
  from jaxarch.infer.distill import distill  # pylint: disable=g-import-not-at-top
  _write_corpus(tmp_path / 'corpus', num_docs=8, max_len=20)
  cfg = mesh_config(config_lib.load('configs/dense.py:tiny', [
      f'data.source=files:{tmp_path}/corpus/*.txt', f'data.data_dir={tmp_path / "data"}',
      'data.stop_ids=(65, 66)']), data=8)
  _tiny_run(tmp_path / 'run', tiny_checkpoints, cfg)
  stops, generate = set(), infer.Generator.__call__

  def spy(self, batch, **kwargs):
    stops.add(tuple(kwargs['stop_ids']))
    return generate(self, batch, **kwargs)

  monkeypatch.setattr(infer.Generator, '__call__', spy)
  distill(tmp_path / 'run', tmp_path / 'out', num_prompts=2, validation_prompts=1,
          prompt_len=4, max_new_tokens=2, batch_size=2)
  assert stops == {(257, 65, 66)}


def test_distill_warns_past_max_len_where_generate_does(tmp_path, caplog, tiny_checkpoints):
  """It warned from prompt_len + max_new_tokens, one position more than the model reads,
  where `generate` did not: now the Generator's warning, once for all its batches."""
  from test_data import _write_corpus  # pylint: disable=g-import-not-at-top
  from jaxarch.infer.distill import distill  # pylint: disable=g-import-not-at-top
  _write_corpus(tmp_path / 'corpus', num_docs=8, max_len=20)
  cfg = mesh_config(config_lib.load('configs/dense.py:tiny', [
      f'data.source=files:{tmp_path}/corpus/*.txt', f'data.data_dir={tmp_path / "data"}',
      'data.seq_len=5', 'model.max_len=5']), data=8)
  _tiny_run(tmp_path / 'run', tiny_checkpoints, cfg)
  with caplog.at_level(logging.WARNING):
    distill(tmp_path / 'run', tmp_path / 'out', num_prompts=4, validation_prompts=2,
            prompt_len=4, max_new_tokens=2, batch_size=2)  # 4 + 2 - 1 = 5 positions read
    assert not [r for r in caplog.records if r.getMessage().startswith('generate:')]
    distill(tmp_path / 'run', tmp_path / 'out2', num_prompts=4, validation_prompts=2,
            prompt_len=4, max_new_tokens=3, batch_size=2)
  warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith('generate:')]
  assert len(warned) == 1 and re.match(
      r'generate: prompt \d of 4 tokens \+ max_new_tokens=3 reads 6 positions, more than '
      r'model.max_len=5( [(]2 of the 2 prompts read past it[)])?; .*: lower max_new_tokens to 2$', warned[0]), warned


@pytest.mark.slow
@pytest.mark.parametrize('family', ['moe', 'ultramem', 'megabyte'])
def test_gpu_prefill_and_decode_step_lower_for_cuda(family, traced_as_on_gpu):
  """Prefill and one decode step, as `auto` builds them on a GPU (cuDNN attention, the
  Pallas kernels), lower for CUDA; what `benchmarks/decode.py` runs there."""
  del traced_as_on_gpu
  spec, overrides = FAMILIES[family]
  cfg = config_lib.load(spec, ['model.dtype=bfloat16', *overrides])
  model = infer.for_inference(models.build(cfg.model, rngs=nnx.Rngs(0)))
  infer.add_caches(model, 4, 64)
  graphdef, state = nnx.split(model)

  def prefill_then_step(state, tokens, lengths):
    model = nnx.merge(graphdef, state)
    first = jnp.argmax(infer.prefill(model, tokens, lengths), axis=-1)
    return infer.decode_step(model, first, lengths)

  hlo = jax.jit(prefill_then_step).trace(
      state, jnp.zeros((4, 32), jnp.int32), jnp.full((4,), 32)).lower(
          lowering_platforms=('cuda',)).as_text()
  assert 'xla.gpu.triton' in hlo and 'cudnn' in hlo  # the kernels; the prefill's attention


def test_a_prompt_s_moe_capacity_does_not_depend_on_the_batch_it_is_padded_with():
  """The capacity was the padded bucket's: a 7-token prompt kept 1 assignment per expert
  alone (a bucket of 8) and every one beside a 61-token prompt (a bucket of 64), so its
  continuation depended on the other prompts."""
  cfg = config_lib.load('configs/moe.py:tiny', ['model.dtype=float32', 'model.n_layers=2'])
  model = models.build(cfg.model, rngs=nnx.Rngs(0))
  for path, v in nnx.iter_graph(model):  # experts that move the stream: drops show
    if path and path[-1] == 'w_down':
      v[...] = 30.0 * v[...]
  rng = np.random.default_rng(1)
  prompts = [[257, *rng.integers(1, 256, 6)], [257, *rng.integers(1, 256, 60)]]
  generator = infer.Generator(model, moe_capacity_factor=0.5)
  alone = [generator([p], max_new_tokens=10)[0][0] for p in prompts]
  together = generator(prompts, max_new_tokens=10)[0]
  assert together == alone
  dropless = infer.Generator(model)([prompts[0]], max_new_tokens=10)[0][0]
  assert dropless != alone[0]  # the short prompt drops assignments all the same


def test_each_sampled_token_draws_with_its_own_key(dense_generator):
  """At a huge temperature the distribution is all but uniform, so what decides a token is
  the step's key: drawn with one key at every step, a row would repeat one token."""
  out, _ = dense_generator([[257, 1, 2, 3], [257, 4]], max_new_tokens=12, method='sample',
                           temperature=1e4, seed=7)
  for row in out:
    assert len(row) == 12 and len(set(row)) >= 8, row


def test_a_stop_id_chosen_by_the_prefill_ends_the_row_with_no_decode_step(dense_generator):
  """The prefill's token is checked against the stop ids too: rows that all stop there
  run no decode step (the output would be cut at the stop anyway; the passes would not)."""
  prompts = [[257, 30, 31, 32], [257, 40, 41]]
  free, _ = dense_generator(prompts, max_new_tokens=10)
  stopped, stats = dense_generator(prompts, max_new_tokens=10,
                                   stop_ids=[free[0][0], free[1][0]])
  assert stopped == [free[0][:1], free[1][:1]]
  assert stats['forward_passes'] == 1 and stats['new_tokens'] == 2
