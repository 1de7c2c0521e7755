"""BiTA: lossless tree decoding for every wrapped family, the tree, the statistics; its
config, distilled data and training with the base frozen."""

import contextlib
import json
import logging
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import (FAMILIES, family_config, make_batch, sharded_copy, tiny_config,
                      with_random_query_convs)
from jaxarch import config as config_lib
from jaxarch import cli, data, infer, models
from jaxarch.data.sources import write_distilled
from jaxarch.infer.distill import distill
from jaxarch.infer.tree import DraftTree
from jaxarch.layers.rope import apply_rope
from jaxarch.layers.signals import WindowCounter
from jaxarch.models.bita import Bita, spread_anchors
from jaxarch.parallel import global_batch, make_mesh
from jaxarch.train import flops, train
from jaxarch.train import step as step_lib
from jaxarch.train.checkpoint import Checkpointer
from jaxarch.train.pretrained import initial_state, load_model
from jaxarch.train.state import init_state, make_setup
from jaxarch.train.step import make_eval_step, make_train_step, summarize_eval

BASES = ('dense', 'moe', 'ultramem')  # the families BiTA wraps (conftest.FAMILIES)
BITA = dict(num_prompt_tokens=4, num_mask_tokens=3, draft_tree=(5, 4, 3), train_groups=0,
            init_std=0.02)


def _bita_config(family, **bita):
  return config_lib.bita_model(family_config(family).model, {**BITA, **bita})


def _prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [[257] + rng.integers(1, 256, rng.integers(1, 30)).tolist() for _ in range(n)]


@pytest.mark.parametrize('family', [  # moe and ultramem: also the oracle and sharded tests
    'dense', *(pytest.param(f, marks=pytest.mark.slow) for f in ('moe', 'ultramem'))])
def test_bita_decoding_with_untrained_prompts_equals_greedy(family):
  model = with_random_query_convs(models.build(_bita_config(family), rngs=nnx.Rngs(0)))
  generator = infer.Generator(model)
  prompts = _prompts(5)
  greedy, _ = generator(prompts, max_new_tokens=24)
  drafted, stats = generator(prompts, max_new_tokens=24, method='bita')
  assert drafted == greedy
  assert stats['accepted_per_pass'] >= 1


@pytest.mark.slow
def test_bita_decoding_equals_greedy_under_a_moe_capacity_factor():
  """A tree pass must not drop candidates that greedy decoding, one token per sequence,
  keeps (found with a tight factor and strong experts: 2 of 4 rows differed)."""
  base = config_lib.load('configs/moe.py:tiny', ['model.dtype=float32', 'model.n_layers=2',
                                                 'model.vocab_size=6']).model
  model = models.build(config_lib.bita_model(base, BITA), rngs=nnx.Rngs(3))
  for path, variable in nnx.iter_graph(model):
    if path and path[-1] == 'w_down':
      variable[...] = 30.0 * variable[...]  # routing decides the outputs
  generator = infer.Generator(model, moe_capacity_factor=0.25)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 6, rng.integers(1, 40)).tolist() for _ in range(4)]
  greedy, _ = generator(prompts, max_new_tokens=32)
  drafted, stats = generator(prompts, max_new_tokens=32, method='bita')
  assert drafted == greedy and stats['accepted_per_pass'] > 1.5  # measured 1.94


class OracleBita(Bita):
  """BiTA whose masks rank a known continuation first at the first `levels_right` levels
  and last after them (so the accepted tokens per pass are known exactly)."""

  def __init__(self, cfg, reference, levels_right, *, rngs):
    super().__init__(cfg, rngs=rngs)
    self.reference = nnx.data(jnp.asarray(reference))  # b, length: prompt + greedy
    self.levels_right = levels_right

  def with_masks(self, tokens, positions, visible, parent, anchors, cached=None):
    node_logits, mask_logits = super().with_masks(tokens, positions, visible, parent,
                                                  anchors, cached)
    return node_logits, self._known(mask_logits, positions[:, anchors])

  def prefill_with_masks(self, tokens, lengths):
    logits, mask_logits = super().prefill_with_masks(tokens, lengths)
    return logits, self._known(mask_logits[:, None], (lengths - 1)[:, None])[:, 0]

  def _known(self, mask_logits, anchor_positions):
    """mask logits [b, g, M, vocab] of groups after tokens at `anchor_positions` [b, g]."""
    m = jnp.arange(self.num_mask_tokens)
    target = anchor_positions[..., None] + 2 + m  # b g M
    truth = jnp.take_along_axis(
        self.reference, jnp.minimum(target, self.reference.shape[1] - 1).reshape(
            target.shape[0], -1), axis=1).reshape(target.shape)
    sign = jnp.where(m < self.levels_right, 100.0, -100.0)[:, None]  # first or last
    return mask_logits + sign * jax.nn.one_hot(truth, mask_logits.shape[-1])


@pytest.mark.parametrize('family, levels_right',
                         [('dense', 3), ('dense', 1),
                          pytest.param('moe', 3, marks=pytest.mark.slow),
                          pytest.param('ultramem', 1, marks=pytest.mark.slow)])
def test_accepted_tokens_per_pass_on_a_hand_made_oracle(family, levels_right):
  # The prefill produces 1 token and drafts after it; each tree pass, the first too,
  # accepts the right levels plus the bonus token. Equal output also shows that the
  # caches keep exactly the accepted path.
  cfg = _bita_config(family)
  prompts = [[257, 5, 6, 7], [257] + list(range(40, 61))]
  base = models.build(cfg, rngs=nnx.Rngs(0))
  new = 1 + 5 * (levels_right + 1)
  greedy, _ = infer.Generator(base)(prompts, max_new_tokens=new + 8)
  length = max(map(len, prompts)) + new + 8
  reference = np.zeros((len(prompts), length), np.int32)
  for i, (p, g) in enumerate(zip(prompts, greedy)):
    reference[i, :len(p) + len(g)] = p + g
  oracle = OracleBita(cfg, reference, levels_right, rngs=nnx.Rngs(0))
  drafted, stats = infer.Generator(oracle)(prompts, max_new_tokens=new, method='bita')
  assert drafted == [g[:new] for g in greedy]
  assert stats['forward_passes'] == 1 + 5  # the prefill, 5 tree passes
  assert stats['accepted_per_pass'] == levels_right + 1
  # One token fewer: the last pass still accepts as many, but the stats count the tokens
  # returned (they counted the one past max_new_tokens too).
  drafted, stats = infer.Generator(oracle)(prompts, max_new_tokens=new - 1, method='bita')
  assert drafted == [g[:new - 1] for g in greedy] and stats['forward_passes'] == 6
  assert stats['accepted_per_pass'] == pytest.approx((new - 2) / 5)


def test_bita_past_its_base_max_len_is_greedy_and_warned_as_greedy_is(caplog):
  """A tree pass reads positions past the tokens it returns (candidates, mask tokens):
  around and past the base's max_len the output is still greedy's, with the base's warning
  (the oracle accepts 4 tokens per pass, so the last pass writes near the caches' end)."""
  cfg = _bita_config('dense')
  with cfg.unlocked():
    cfg.max_len = 16
  prompts = [[257, 5, 6, 7], [257] + list(range(40, 49))]  # 4 and 10 tokens
  base = models.build(cfg, rngs=nnx.Rngs(0))
  greedy, _ = infer.Generator(base)(prompts, max_new_tokens=20)
  reference = np.zeros((2, 40), np.int32)
  for i, (p, g) in enumerate(zip(prompts, greedy)):
    reference[i, :len(p) + len(g)] = p + g
  generator = infer.Generator(OracleBita(cfg, reference, 3, rngs=nnx.Rngs(0)))
  caplog.clear()  # the base generator's warning
  with caplog.at_level(logging.WARNING, logger='jaxarch.infer.generate'):
    assert generator(prompts, max_new_tokens=7, method='bita')[0] == [g[:7] for g in greedy]
    assert not caplog.records  # 10 + 7 - 1 = 16 positions returned; the drafts read more
    drafted, _ = generator(prompts, max_new_tokens=12, method='bita')
  assert drafted == [g[:12] for g in greedy]
  assert [r.getMessage() for r in caplog.records] == [
      'generate: prompt 1 of 10 tokens + max_new_tokens=12 reads 21 positions, more than '
      'model.max_len=16; it goes on past them, which the model was not built for (tokens '
      'of unknown quality): lower max_new_tokens to 7']


def test_the_tree_mask_lets_each_node_see_exactly_its_ancestors():
  tree = DraftTree((3, 2, 2))
  # root 0; level 0: 1 2 3 (under 0); level 1: 4 5 (under 1); level 2: 6 7 (under 4)
  assert tree.parent.tolist() == [-1, 0, 0, 0, 1, 1, 4, 4]
  assert tree.depth.tolist() == [0, 1, 1, 1, 2, 2, 3, 3]
  ancestors = {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 3], 4: [0, 1, 4], 5: [0, 1, 5],
               6: [0, 1, 4, 6], 7: [0, 1, 4, 7]}
  for node, seen in ancestors.items():
    assert np.flatnonzero(tree.visible[node]).tolist() == seen


def test_acceptance_walks_the_levels_against_the_greedy_choices():
  tree = DraftTree((3, 2, 2))
  drafts = jnp.array([[[7, 8, 9], [4, 5, 0], [1, 2, 0]]] * 3)  # b M width
  tokens = tree.tokens(jnp.array([30, 30, 30]), drafts)
  assert tokens[0].tolist() == [30, 7, 8, 9, 4, 5, 1, 2]
  # greedy after each node: row 0 accepts 8 (a side branch) and stops; row 1 accepts
  # 7, 5 and stops; row 2 accepts 7, 4, 2 (the deepest level).
  greedy = jnp.array([[8, 0, 0, 0, 0, 0, 0, 0],
                      [7, 5, 0, 0, 0, 0, 0, 0],
                      [7, 4, 0, 0, 2, 0, 0, 0]])
  last, path = tree.accept(tokens, greedy)
  assert last.tolist() == [2, 5, 7]
  assert path[:, :3].tolist() == [[0, 2, 2], [0, 1, 5], [0, 1, 4]]
  assert path[2].tolist() == [0, 1, 4, 7]


def test_bita_needs_a_bita_model_and_a_tree_within_its_masks():
  base = models.build(config_lib.load('configs/dense.py:tiny').model, rngs=nnx.Rngs(0))
  with pytest.raises(infer.GenerateError, match='needs a BiTA model'):
    infer.Generator(base)([[257, 1]], max_new_tokens=2, method='bita')
  model = models.build(_bita_config('dense'), rngs=nnx.Rngs(0))
  with pytest.raises(infer.GenerateError, match='4 levels; the model has 3 mask tokens'):
    infer.Generator(model)([[257, 1]], max_new_tokens=2, method='bita',
                           draft_tree=(2, 2, 2, 2))
  generator = infer.Generator(model, vocab_limit=258)
  for tree, words in [((), 'has no levels'), ((300,), 'more candidates than the 258 tokens')]:
    with pytest.raises(infer.GenerateError, match=words):
      generator([[257, 1]], max_new_tokens=2, method='bita', draft_tree=tree)
  with pytest.raises(infer.GenerateError, match="draft_tree is for method='bita'"):
    generator([[257, 1]], max_new_tokens=2, draft_tree=(2,))
  with pytest.raises(infer.GenerateError, match='draft_tree=2; give candidates per level'):
    generator([[257, 1]], max_new_tokens=2, method='bita', draft_tree=2)  # was a TypeError


def test_generate_command_reports_bita_acceptance_and_refuses_sampling_flags(tmp_path,
                                                                              capsys):
  # A BiTA run at step 0: its config (model from the base run's) and a fresh checkpoint.
  base = _base_workdir(tmp_path / 'base')
  cfg = _bita_load(base)
  config_lib.save(cfg, tmp_path / 'bita' / 'config.json')
  checkpointer = Checkpointer(tmp_path / 'bita', async_save=False)
  checkpointer.save(0, init_state(cfg, make_setup(cfg, make_mesh(cfg))))
  checkpointer.close()
  generate = lambda *flags: cli.main(['generate', f'--workdir={tmp_path / "bita"}',
                                      '--prompt=def ', '--max_new_tokens=8', *flags])
  # A temperature of 0 is greedy, as in vLLM: BiTA takes it.
  assert generate('--method=bita', '--ignore_eod', '--temperature=0') == 0
  # Was the speed alone: the drafts' acceptance, what BiTA is for, was not shown.
  assert 'BiTA accepted ' in capsys.readouterr().err
  # One new token is the prefill's: no tree pass ran (it said 0.00 tokens per pass).
  assert generate('--method=bita', '--ignore_eod', '--max_new_tokens=1') == 0
  assert 'BiTA ran no tree pass (each prompt stopped at its first token)' in (
      capsys.readouterr().err)
  # Was greedy decoding, the flag ignored: --temperature=1 keeps every token, so it passed.
  # With a temperature of 0 (greedy), another sampling flag was refused in Python's words.
  for flags in [('--temperature=1',), ('--top_k=0', '--top_p=1'),
                ('--temperature=0', '--top_k=3')]:
    for method in ('bita', 'greedy'):
      assert generate(f'--method={method}', *flags) == 2
      err = capsys.readouterr().err
      assert err.count('\n') == 1, err
      named = [f.split('=')[0] for f in flags if f != '--temperature=0']
      assert (f'{", ".join(named)} choose among tokens for '
              f'--method=sample; --method={method} takes the most likely ones') in err
  # Another draft tree from the command line (it implies --method=bita, as a --temperature
  # implies sampling; it was refused without the flag): the same tokens as greedy decoding.
  ids = {}
  for flags in (('--method=greedy',), ('--draft_tree=1,1,1',)):
    assert generate('--ignore_eod', '--json', *flags) == 0
    ids[flags[0]] = json.loads(capsys.readouterr().out)['ids']
  assert ids['--draft_tree=1,1,1'] == ids['--method=greedy'] and len(ids['--method=greedy']) == 8
  for flags, parsed, said in [
      (('--method=bita', '--draft_tree=1,1,1,1'), True, 'has 4 levels'),
      (('--method=greedy', '--draft_tree=2'), True,
       "--draft_tree is BiTA's; --method=greedy drafts nothing"),
      (('--method=bita', '--draft_tree=5,x'), False,  # argparse's error: it exits
       "argument --draft_tree: '5,x': 'x' is not a whole number; give candidates per level, "
       'e.g. 5,4,3')]:
    with contextlib.nullcontext() if parsed else pytest.raises(SystemExit):
      assert generate(*flags) == 2
    err = capsys.readouterr().err
    assert said in err and 'Traceback' not in err, err
  # Before the weights load (minutes, for a large base): was said after, the tree too deep or
  # the run no BiTA one. A config without a checkpoint shows which comes first.
  (tmp_path / 'config_only').mkdir()
  config_lib.save(cfg, tmp_path / 'config_only' / 'config.json')
  (tmp_path / 'dense_only').mkdir()
  shutil.copy(base / 'config.json', tmp_path / 'dense_only' / 'config.json')
  (tmp_path / 'bytes_only').mkdir()
  config_lib.save(config_lib.load('configs/megabyte.py:tiny'),
                  tmp_path / 'bytes_only' / 'config.json')
  for workdir, flags, said in [
      ('config_only', ('--draft_tree=1,1,1,1',), 'draft_tree (1, 1, 1, 1) has 4 levels; the '
       'model has 3 mask tokens'),
      ('dense_only', ('--method=bita',), "--method=bita drafts with a BiTA model, and "),
      ('dense_only', ('--method=bita',), "'dense' one (train BiTA on it: configs/bita.py)"),
      ('bytes_only', ('--method=bita',), "'megabyte' one (BiTA wraps dense, moe, ultramem "
       'models)'),
      ('dense_only', ('--draft_tree=2',), "--draft_tree drafts with a BiTA model, and "),
      ('config_only', ('--draft_tree=1,1',), 'no checkpoint')]:  # a good tree: loading
    assert cli.main(['generate', f'--workdir={tmp_path / workdir}', '--prompt=def ',
                     *flags]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count('\n') == 1, err


# Training rows: mask groups hang after tokens of each row's own labelled part.

def test_training_anchors_spread_over_the_useful_tokens_of_each_row():
  useful = np.zeros((3, 12), bool)
  useful[0, 2:10] = True  # 8 useful tokens, 4 groups: every other one
  useful[1, [3, 7]] = True  # 2 useful tokens, 4 groups: each once, 2 groups unused
  anchors, real = map(np.asarray, spread_anchors(jnp.asarray(useful), 4))  # row 2: none
  assert anchors[0].tolist() == [2, 4, 6, 8] and real[0].all()
  assert anchors[1][real[1]].tolist() == [3, 7] and real[1].sum() == 2
  assert not real[2].any() and (anchors < 12).all()


@pytest.mark.parametrize('family', ['dense', 'ultramem'])  # ultramem: its query conv too
def test_mask_groups_hang_in_the_continuation_and_see_only_their_own_sequence(family):
  model = models.build(_bita_config(family, train_groups=4), rngs=nnx.Rngs(0))
  t = 24
  batch = make_batch(2, t)
  # Row 0: a prompt of 6 and a continuation up to 16, then padding. Row 1: two sequences
  # of 10 and 14 packed, the loss on the second one's continuation only.
  segments = np.zeros((2, t), np.int32)
  segments[0, :16], segments[1, :10], segments[1, 10:] = 1, 1, 2
  positions = np.zeros((2, t), np.int32)
  positions[0, :16], positions[1, :10], positions[1, 10:] = range(16), range(10), range(14)
  loss_mask = np.zeros((2, t), np.int32)
  loss_mask[0, 5:15], loss_mask[1, 14:23] = 1, 1
  batch.update(segment_ids=segments, positions=positions, loss_mask=loss_mask)
  predictions = nnx.jit(type(model).predictions)  # compiled once: faster than eager
  logits, _, mask = predictions(model, batch)
  assert np.asarray(mask[..., 0]).all()  # every group's first mask has its label

  other = dict(batch, inputs=batch['inputs'].copy())
  other['inputs'][1, :10] = (other['inputs'][1, :10] + 1) % 256  # the other sequence
  np.testing.assert_allclose(predictions(model, other)[0][1], logits[1], atol=1e-5)
  other['inputs'][1, 12] = (other['inputs'][1, 12] + 1) % 256  # before every anchor
  assert not np.allclose(predictions(model, other)[0][1], logits[1], atol=1e-5)


@pytest.mark.parametrize('family', [  # ultramem: attention and its query conv
    pytest.param('dense', marks=pytest.mark.slow), 'ultramem'])
def test_training_groups_read_the_tokens_pass_as_one_call_with_the_tokens_would(family):
  # Training runs the tokens forward into the caches, then the mask groups alone.
  # A group after every token: one after the first of each document too, whose conv taps
  # must stop at the document's start.
  model = with_random_query_convs(models.build(
      _bita_config(family, train_groups=0, init_std=0.5), rngs=nnx.Rngs(0)))
  t = 24
  batch = make_batch(2, t)
  segments = np.zeros((2, t), np.int32)
  segments[0, :16], segments[1, :10], segments[1, 10:] = 1, 1, 2
  positions = np.zeros((2, t), np.int32)
  # Row 1's second sequence continues a document of the previous row (positions from 7).
  positions[0, :16], positions[1, :10], positions[1, 10:] = range(16), range(10), range(7, 21)
  batch.update(segment_ids=segments, positions=positions)
  logits = nnx.jit(type(model).predictions)(model, batch)[0]
  assert model.base.blocks[0].attn.cache_k is None  # the caches are the call's own

  segments = jnp.asarray(segments)
  same = segments[:, 1:] == segments[:, :-1]
  visible = jnp.tril(jnp.ones((t, t), bool)) & (segments[:, :, None] == segments[:, None])
  parent = jnp.concatenate([jnp.full((2, 1), -1), jnp.where(same, jnp.arange(t - 1), -1)], 1)
  useful = jnp.zeros((2, t), bool).at[:, :-1].set(same & (segments[:, 1:] > 0))
  anchors, _ = spread_anchors(useful, t)
  _, one_call = nnx.jit(type(model).with_masks)(
      model, jnp.asarray(batch['inputs']), jnp.asarray(positions), visible, parent, anchors)
  np.testing.assert_allclose(logits, one_call, atol=2e-5)


@pytest.mark.parametrize('family', ['dense', 'ultramem'])
def test_mask_groups_per_row_equal_each_row_on_its_own(family):
  model = models.build(_bita_config(family), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(make_batch(2, 12)['inputs'])
  positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
  visible, parent = jnp.tril(jnp.ones((12, 12), bool)), jnp.arange(12) - 1
  anchors = jnp.array([[2, 5, 9], [0, 4, 11]])
  with_masks = nnx.jit(type(model).with_masks)
  token_logits, mask_logits = with_masks(model, tokens, positions, visible, parent, anchors)
  for i in range(2):
    alone = with_masks(model, tokens[i:i + 1], positions[i:i + 1], visible, parent, anchors[i])
    np.testing.assert_allclose(token_logits[i], alone[0][0], atol=1e-5)
    np.testing.assert_allclose(mask_logits[i], alone[1][0], atol=1e-5)


# Running on a mesh: the sharded model drafts and verifies like the single-device one.

MESHES = {'dense': dict(data=2, fsdp=2, tensor=2), 'moe': dict(data=2, expert=4)}


@pytest.mark.parametrize('family', ['dense', pytest.param('moe', marks=pytest.mark.slow)])
def test_sharded_bita_decoding_equals_greedy(family):
  cfg = family_config(family, **MESHES[family])
  with cfg.unlocked():
    cfg.model = config_lib.bita_model(cfg.model, BITA)
    cfg.data.source = 'distilled:/not/read'
  model = models.build(cfg.model, rngs=nnx.Rngs(0))
  mesh, sharded = sharded_copy(model, cfg)
  generator = infer.Generator(sharded, mesh=mesh, rules=cfg.mesh.rules)
  prompts = _prompts(3, seed=1)
  greedy, _ = generator(prompts, max_new_tokens=12)
  drafted, _ = generator(prompts, max_new_tokens=12, method='bita')
  assert drafted == greedy


def test_a_data_parallel_bita_decode_step_moves_no_activations():
  """Under data=8 each device decodes its own rows with whole weights: a tree pass needs
  no more than a few ints of bookkeeping across devices. Before, every device gathered
  the whole batch's new keys and values (cache writes indexed by a row iota), the mask
  logits of the whole batch (their top-k) and all-reduced the accepted node's: 0.94 MiB
  per step at tiny, against 12 KiB for one token's logits of the batch."""
  from jaxarch.train import profile  # pylint: disable=g-import-not-at-top
  cfg = family_config('dense', data=8)
  with cfg.unlocked():
    cfg.model = config_lib.bita_model(cfg.model, BITA)
    cfg.data.source = 'distilled:/not/read'
  mesh, sharded = sharded_copy(models.build(cfg.model, rngs=nnx.Rngs(0)), cfg)
  generator = infer.Generator(sharded, mesh=mesh, rules=cfg.mesh.rules)
  generator(_prompts(8, seed=2), max_new_tokens=8, method='bita')
  (_, decode), = generator._compiled.values()
  moved = sum(profile.collective_bytes(decode.as_text()).values())
  assert moved < 8 * cfg.model.vocab_size * 4, moved


# Self-distillation data: one right-padded row per sequence, loss on the continuation.

def _distilled_config(directory, seq_len=8):
  cfg = tiny_config(**{'data.seq_len': seq_len})
  with cfg.unlocked():
    cfg.data.source = f'distilled:{directory}'
  return cfg


def test_distilled_sequences_become_rows_with_loss_on_the_continuation(tmp_path, caplog):
  sequences = [(list(range(1, 1 + n)), p) for n, p in ((5, 2), (12, 3), (9, 4), (3, 1))]
  write_distilled(tmp_path, {'train': sequences, 'validation': sequences[:3]})
  cfg = _distilled_config(tmp_path)
  batch = next(iter(data.make_eval_dataset(cfg.data, batch_size=4, num_batches=1)))
  by_length = {int(s.sum()): i for i, s in enumerate(batch['segment_ids'])}
  short, long = by_length[4], by_length[8]  # 5 tokens -> 4 rows; 12 -> cut at 8 + 1
  pad = data.get_tokenizer('bytes').pad_id
  np.testing.assert_array_equal(batch['inputs'][short], [1, 2, 3, 4] + [pad] * 4)
  np.testing.assert_array_equal(batch['targets'][short], [2, 3, 4, 5] + [pad] * 4)
  np.testing.assert_array_equal(batch['positions'][short], [0, 1, 2, 3, 0, 0, 0, 0])
  # Prompt of 2: the target at index 1 (token 3) is the first continuation token.
  np.testing.assert_array_equal(batch['loss_mask'][short], [0, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(batch['targets'][long], range(2, 10))
  np.testing.assert_array_equal(batch['loss_mask'][long], [0, 0, 1, 1, 1, 1, 1, 1])
  assert not batch['segment_ids'][3].any() and not batch['loss_mask'][3].any()  # filler

  threads = threading.active_count()
  with caplog.at_level('WARNING', logger='jaxarch.data.pipeline'):
    batches = iter(data.make_train_dataset(cfg.data, seed=0, global_batch_size=8))
    next(batches)
  assert '4 training sequences for 8 packing streams' in caplog.text
  # The prefetch thread only: each stream started grain's 16 read threads (15 s on 2 cores).
  assert threading.active_count() <= threads + 1
  batches.close()
  train = iter(data.make_train_dataset(cfg.data, seed=0, global_batch_size=2))
  next(train)
  state = train.get_state()
  expected = next(train)
  resumed = iter(data.make_train_dataset(cfg.data, seed=0, global_batch_size=2))
  resumed.set_state(state)
  for key, value in next(resumed).items():
    np.testing.assert_array_equal(value, expected[key])


def test_distilled_sources_refuse_a_missing_or_reused_directory(tmp_path):
  with pytest.raises(config_lib.ConfigError, match='jaxarch distill'):
    data.make_eval_dataset(_distilled_config(tmp_path / 'none').data, batch_size=2,
                           num_batches=1)
  write_distilled(tmp_path, {'train': [([1, 2, 3], 1)]})
  with pytest.raises(FileExistsError, match='new directory'):
    write_distilled(tmp_path, {'train': [([1, 2, 3], 1)]})
  # `distill` finds it before loading and running the model (there is none in `nowhere`).
  with pytest.raises(FileExistsError, match='new directory'):
    distill(tmp_path / 'nowhere', tmp_path)
  with pytest.raises(ValueError, match='--validation_prompts=-1 must be >= 0'):
    distill(tmp_path / 'nowhere', tmp_path / 'new', validation_prompts=-1)
  # Prompts that fill the rows leave nothing to train on: refused, not a loss of 0.
  (tmp_path / 'distill.json').write_text(json.dumps({'prompt_len': 300}))
  with pytest.raises(config_lib.ConfigError, match='prompts of up to 300 tokens'):
    data.make_eval_dataset(_distilled_config(tmp_path).data, batch_size=2, num_batches=1)


def test_distill_refuses_a_negative_seed_and_a_run_trained_on_distilled_data(tmp_path):
  # numpy's generators take no negative seed: was a ValueError traceback from numpy.
  with pytest.raises(ValueError, match='--seed=-1 must be >= 0'):
    distill(tmp_path / 'nowhere', tmp_path / 'new', seed=-1)
  # A BiTA run (or any run on distilled data) has no text to draw prompts from: was
  # "data.source='distilled:...' must be ... or 'distilled:<dir>'", after loading the model.
  (tmp_path / 'bita').mkdir()
  config_lib.save(_distilled_config(tmp_path / 'data'), tmp_path / 'bita' / 'config.json')
  with pytest.raises(ValueError, match='distill the base run'):
    distill(tmp_path / 'bita', tmp_path / 'new')


@pytest.mark.parametrize('base, prompt_len, said', [
    ('configs/dense.py:tiny model.sliding_window=8', 32,
     'model.sliding_window=8), which BiTA cannot train over'),
    ('configs/megabyte.py:tiny', 32, "holds a 'megabyte' model, and BiTA wraps dense, moe"),
    ('configs/dense.py:tiny', 255, '--prompt_len=255 leaves no continuation in its rows of '
     'at most model.max_len=256 tokens (a mask needs the token two past its anchor); '
     'give --prompt_len=254 or less, and the BiTA run a data.seq_len of at least '
     '--prompt_len + 2'),
    ('configs/dense.py:tiny', 254, None)])
def test_distill_warns_before_generating_of_a_base_bita_refuses(tmp_path, caplog, base,
                                                                 prompt_len, said):
  """Was said by the BiTA config only, after the distillation had run."""
  (tmp_path / 'base').mkdir()
  spec, *overrides = base.split()
  config_lib.save(config_lib.load(spec, overrides), tmp_path / 'base' / 'config.json')
  with caplog.at_level('WARNING', logger='jaxarch.infer.distill'):
    with pytest.raises(FileNotFoundError, match='no checkpoint'):  # warned before loading
      distill(tmp_path / 'base', tmp_path / 'new', prompt_len=prompt_len)
  if said is None:
    assert not [r for r in caplog.records if r.name == 'jaxarch.infer.distill']
  else:
    assert said in caplog.text and 'a BiTA run over this base is refused' in caplog.text


# The BiTA config: its model section and tokenizer come from the base run.

def _base_workdir(path, family='dense'):
  path.mkdir(parents=True, exist_ok=True)
  config_lib.save(config_lib.load(FAMILIES[family][0]), path / 'config.json')
  return path


def _bita_load(base, *overrides, source='distilled:/data'):
  return config_lib.load('configs/bita.py:tiny', [
      f'model.bita.base_workdir={base}', f'data.source={source}', *overrides])


def test_bita_config_takes_the_base_runs_model_and_overrides_its_keys(tmp_path):
  base = _base_workdir(tmp_path / 'moe', 'moe')
  cfg = _bita_load(base, 'model.remat=full', 'model.bita.num_prompt_tokens=8')
  base_cfg = config_lib.load_json(base / 'config.json')
  assert cfg.model.family == 'bita' and cfg.model.bita.base_family == 'moe'
  assert cfg.model.moe.to_dict() == base_cfg.model.moe.to_dict()
  assert cfg.model.remat == 'full' and cfg.model.bita.num_prompt_tokens == 8
  assert cfg.data.tokenizer == base_cfg.data.tokenizer
  config_lib.save(cfg, tmp_path / 'bita.json')  # a BiTA run's own config reloads as is
  assert config_lib.load_json(tmp_path / 'bita.json').to_dict() == cfg.to_dict()


@pytest.mark.parametrize('train_groups,most', [  # the tiny preset's; one group per token
    (1, 1.15), pytest.param(32, 1.2, marks=pytest.mark.slow),
    pytest.param(0, 1.25, marks=pytest.mark.slow)])
def test_bita_model_flops_are_at_most_what_its_step_executes(tmp_path, train_groups, most):
  # XLA counts more FLOPs than the useful ones, never fewer: each mask token attends to
  # its anchor's whole row, and the model does not count the slots hidden by the masks.
  # Measured 1.09x, 1.14x and 1.2x. Attention over the whole groups' call gave 1.11x and
  # 1.66x; running the tokens in that call, with their backward pass, 1.82x and 2.05x.
  # With one group the tokens' pass dominates: counting it as 2·N per token (the head and
  # the last block, which no cache needs, included) gave 0.81x.
  cfg = _bita_load(_base_workdir(tmp_path / 'dense'), 'model.dtype=float32',
                   f'model.bita.train_groups={train_groups}')
  setup = make_setup(cfg, make_mesh(cfg))
  batch = global_batch(data.synthetic_batch(cfg.train.batch_size, cfg.data.seq_len,
                                            cfg.model.vocab_size, 0), setup.batch_sharding)
  compiled = make_train_step(setup).lower(setup.abstract_state, batch).compile()
  executed = flops.compiled_flops(compiled) * jax.device_count()
  model = (flops.train_flops_per_token(cfg.model, setup.param_counts, cfg.data.seq_len)
           * cfg.train.batch_size * cfg.data.seq_len)
  assert 1 <= executed / model <= most, executed / model


@pytest.mark.slow
def test_a_base_key_override_that_changes_shapes_is_named(tmp_path):
  # It said only 'different params names or shapes', not which array or why.
  base_cfg = config_lib.load(FAMILIES['dense'][0])
  setup = make_setup(base_cfg, make_mesh(base_cfg))
  checkpointer = Checkpointer(tmp_path, async_save=False)
  checkpointer.save(1, init_state(base_cfg, setup))
  checkpointer.close()
  config_lib.save(base_cfg, tmp_path / 'config.json')
  cfg = _bita_load(tmp_path, f'model.d_ff={2 * base_cfg.model.d_ff}')
  bita_setup = make_setup(cfg, make_mesh(cfg))
  with pytest.raises(config_lib.ConfigError, match=r"part 'base' .*\(params: .*mlp.* is "
                     r"\(.*\) here, \(.*\) saved\); an override of a model key"):
    initial_state(cfg, bita_setup)


def test_bita_warns_when_its_base_trained_on_since_the_distillation(tmp_path, caplog):
  # distill.json names the base's step; a later checkpoint generates other continuations.
  base_cfg = config_lib.load(FAMILIES['dense'][0])
  setup = make_setup(base_cfg, make_mesh(base_cfg))
  checkpointer = Checkpointer(tmp_path / 'base', async_save=False)
  checkpointer.save(3, init_state(base_cfg, setup))
  checkpointer.close()
  config_lib.save(base_cfg, tmp_path / 'base' / 'config.json')
  for distilled_at, warned in ((1, True), (3, False)):
    distilled = tmp_path / f'distilled{distilled_at}'
    distilled.mkdir()
    (distilled / 'distill.json').write_text(json.dumps(
        {'base_workdir': str(tmp_path / 'base'), 'base_step': distilled_at}))
    cfg = _bita_load(tmp_path / 'base', source=f'distilled:{distilled}')
    bita_setup = make_setup(cfg, make_mesh(cfg))
    caplog.clear()
    with caplog.at_level('WARNING', logger='jaxarch.train.pretrained'):
      initial_state(cfg, bita_setup)
    assert ('was distilled from step 1 of' in caplog.text) == warned, caplog.text
    assert ('latest checkpoint is now step 3; distill it again' in caplog.text) == warned
  # A shape of the base overridden: the arrays that differ, and the key. (The lists were
  # compared pairwise: every pair after the missing block differed, the first named.)
  cfg = _bita_load(tmp_path / 'base', 'model.n_layers=3', source=f'distilled:{distilled}')
  with pytest.raises(config_lib.ConfigError) as error:
    initial_state(cfg, make_setup(cfg, make_mesh(cfg)))
  assert str(error.value).endswith(
      "(params: ['blocks'][3]['attn']['k_proj'] saved, not here (and 8 more)); an override "
      'of a model key that sets its shapes cannot apply to a pretrained part; this '
      "config's model keys that differ from that run's: n_layers=3 (4 there)"), str(error.value)


@pytest.mark.slow  # 37 s
def test_bita_base_takes_the_base_runs_state_with_its_weights(tmp_path):
  """UltraMem's Tucker vectors (like the MoE router's bias) are state, not weights, and
  decide what the model computes: the frozen base takes them from the base run too."""
  base_dir = tmp_path / 'base'
  base_cfg = config_lib.load(FAMILIES['ultramem'][0], [
      'train.lr=0.1', 'train.warmup_steps=0', 'train.batch_size=8', 'data.seq_len=16'])
  setup = make_setup(base_cfg, make_mesh(base_cfg))
  state, step = init_state(base_cfg, setup), make_train_step(setup)
  for i in range(2):  # large steps: the cores, and so u and v, move
    state, _ = step(state, global_batch(make_batch(8, 16, seed=i), setup.batch_sharding))
  checkpointer = Checkpointer(base_dir, async_save=False)
  checkpointer.save(2, state)
  checkpointer.close()
  config_lib.save(base_cfg, base_dir / 'config.json')

  cfg = _bita_load(base_dir, 'data.seq_len=16', 'train.batch_size=8')
  bita_setup = make_setup(cfg, make_mesh(cfg))
  # The read counts of the base run's last logging window are its metrics: not taken.
  variables = lambda state: [v.get_value() for v in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable)) if not isinstance(v, WindowCounter)]
  fresh = init_state(cfg, bita_setup)
  fresh_base = jax.device_get(variables(fresh['model_state']['base']))
  got = variables(initial_state(cfg, bita_setup)['model_state']['base'])
  want = variables(state['model_state'])
  assert len(want) == 4  # u and v of each of the two memory layers
  assert not any(np.allclose(a, b) for a, b in zip(fresh_base, want))
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(g, w)


def test_bita_config_errors_name_the_key(tmp_path):
  base = _base_workdir(tmp_path / 'dense')
  megabyte = _base_workdir(tmp_path / 'megabyte', 'megabyte')
  load = lambda *o: config_lib.load('configs/bita.py:tiny', o)
  assert 'model.bita.base_workdir is required' in error_of(load, 'data.source=distilled:/d')
  assert 'has no config.json' in error_of(_bita_load, tmp_path)
  assert "holds a 'megabyte' model" in error_of(_bita_load, megabyte)
  assert "data.source='default'" in error_of(lambda: _bita_load(base, source='default'))
  # `jaxarch bench` trains on random tokens: what it needs, said (it read as training data).
  assert "`jaxarch bench`, which reads no data, takes any 'distilled:<dir>'" in error_of(
      lambda: _bita_load(base, source='default'))
  assert 'model.bita.draft_tree=(5, 4, 3, 2) has 4 levels' in error_of(
      _bita_load, base, 'model.bita.draft_tree=(5, 4, 3, 2)')
  # A fourth mask would train and never draft (DESIGN: level m holds mask m's top 5 - m).
  assert ('has 3 levels for model.bita.num_mask_tokens=4; give each mask a level, e.g. '
          'model.bita.draft_tree=(5, 4, 3, 2)') in error_of(
              _bita_load, base, 'model.bita.num_mask_tokens=4')
  assert "unknown key 'model.bita.num_masks'" in error_of(
      _bita_load, base, 'model.bita.num_masks=2')
  assert "unknown key 'model.bita.base_workdr' (did you mean 'model.bita.base_workdir'" in (
      error_of(load, 'model.bita.base_workdr=/a/run'))  # not 'base_workdir is required'
  assert "data.tokenizer='x.model' differs" in error_of(_bita_load, base,
                                                        'data.tokenizer=x.model')
  # Accepted (inf passed `> 0`): the prompt and mask tokens started as infinities.
  assert 'model.bita.init_std=inf must be > 0 and finite' in error_of(
      _bita_load, base, 'model.bita.init_std=inf')


def test_rerunning_a_bita_command_line_after_its_base_moved_points_to_the_resume(tmp_path,
                                                                               capsys):
  run = tmp_path / 'bita'
  argv = ['train', '--config=configs/bita.py:tiny', f'--workdir={run}',
          f'--config.model.bita.base_workdir={tmp_path / "moved"}',
          '--config.data.source=distilled:/d']
  assert cli.main(argv) == 2
  assert capsys.readouterr().err.strip().endswith('has no config.json: is it a jaxarch workdir?')
  run.mkdir()
  config_lib.save(family_config('dense'), run / 'config.json')  # the run it started
  assert cli.main(argv) == 2
  assert (f'has no config.json: is it a jaxarch workdir? ({run} holds a run: `jaxarch train '
          f'--workdir={run}` without --config reads its config.json)') in capsys.readouterr().err


def test_bita_data_must_be_distilled_from_its_own_base(tmp_path):
  # Continuations of another run would train drafts that this base rejects, silently.
  base, other = _base_workdir(tmp_path / 'base'), _base_workdir(tmp_path / 'other')
  distilled = tmp_path / 'distilled'
  distilled.mkdir()
  (distilled / 'distill.json').write_text(json.dumps({'base_workdir': str(other.absolute()),
                                                      'prompt_len': 8}))
  assert f'holds the continuations of {other.absolute()}' in error_of(
      lambda: _bita_load(base, source=f'distilled:{distilled}'))
  assert _bita_load(other, source=f'distilled:{distilled}').model.family == 'bita'
  other.rename(tmp_path / 'moved')  # the distilled-from run copied elsewhere: unchecked
  assert _bita_load(base, source=f'distilled:{distilled}').model.family == 'bita'


def error_of(fn, *args) -> str:
  with pytest.raises(config_lib.ConfigError) as info:
    fn(*args)
  return str(info.value)


# Training: only the prompt and mask tokens change.

def test_train_steps_leave_the_base_as_it_was_and_keep_no_optimizer_state_for_it():
  cfg = family_config('moe', data=2, expert=4)
  with cfg.unlocked():
    cfg.model.moe.bias_update_rate = 0.01  # a training-time state update, off when frozen
    cfg.model = config_lib.bita_model(cfg.model, {**BITA, 'train_groups': 8})
    cfg.data.source = 'distilled:/not/read'
    cfg.data.seq_len, cfg.train.batch_size, cfg.train.lr = 32, 8, 3e-2
  setup = make_setup(cfg, make_mesh(cfg))
  state = init_state(cfg, setup)
  before = jax.device_get((state['params'], state['model_state']))
  train_step = make_train_step(setup)
  batch = make_batch(8, 32)
  batch['loss_mask'] = (np.arange(32) >= 8).astype(np.int32)[None].repeat(8, 0)
  for _ in range(3):
    state, metrics = train_step(state, global_batch(batch, setup.batch_sharding))
  flat = lambda tree: dict(nnx.to_flat_state(tree))
  params, model_state = map(flat, jax.device_get((state['params'], state['model_state'])))
  old_params, old_model_state = map(flat, before)
  ours = {('prompt_k',), ('prompt_v',), ('mask_embed',)}
  for path, value in old_params.items():
    same = np.array_equal(params[path].get_value(), value.get_value())
    assert same == (path not in ours), path  # the base stays, BiTA's tokens train
  for path, value in old_model_state.items():
    if not isinstance(value, WindowCounter):  # e.g. the router bias does not move
      np.testing.assert_array_equal(model_state[path].get_value(), value.get_value(),
                                    err_msg=str(path))
  trained = setup.param_counts['trained']
  assert trained == sum(old_params[p].get_value().size for p in ours)
  moments = sum(x.size for x in jax.tree.leaves(state['opt_state']) if x.ndim)
  assert moments == 2 * trained  # Adam's two moments, for the trained parameters only
  assert 0 <= float(metrics['mask2_top1']) <= 1 and np.isfinite(float(metrics['loss']))
  ours_norm = np.sqrt(sum(np.sum(np.square(params[p].get_value())) for p in ours))
  np.testing.assert_allclose(float(metrics['param_norm']), ours_norm, rtol=1e-5)


def test_an_evaluation_reports_each_masks_top1_as_training_does():
  """Was a BiTA run's eval_loss alone, which does not say how many drafts a base accepts:
  `eval_mask{m}_top1` is held-out mask m's top-1 accuracy, what acceptance follows. The
  training forward's `mask{m}_top1` (counted in models/bita.py) on the same batch and
  weights is the same share (here over 2 microbatches, whose sums the eval step adds)."""
  cfg = family_config('dense', data=2, fsdp=4)
  with cfg.unlocked():
    cfg.model = config_lib.bita_model(cfg.model, {**BITA, 'train_groups': 8})
    cfg.data.source = 'distilled:/not/read'
    cfg.data.seq_len, cfg.train.batch_size = 32, 16
    cfg.train.grad_accum_steps = 2
  setup = make_setup(cfg, make_mesh(cfg))
  state = init_state(cfg, setup)
  embed = state['params']['mask_embed']  # masks whose drafts differ from each other's
  state['params']['mask_embed'] = embed.replace(embed.get_value() * 50)
  batch = make_batch(16, 32, seed=3)
  position = np.arange(32)  # labelled from 8 on, with holes where masks' labels count not
  batch['loss_mask'] = ((position >= 8) & (position % 5 > 0)).astype(np.int32)[None].repeat(
      16, 0)
  forward = jax.jit(lambda state, batch: step_lib._forward(
      setup, state['params'], state['model_state'], batch)[:3:2])  # predictions, metrics
  (logits, _, _), _ = forward(state, global_batch(batch, setup.batch_sharding))
  # Every target the last mask's most drafted token: it hits often, where the loss mask
  # counts and in its holes (a hit counted there would change the share).
  last = BITA['num_mask_tokens'] - 1
  batch['targets'][:] = np.bincount(np.asarray(logits[:, :, last].argmax(-1)).ravel()).argmax()
  batch = global_batch(batch, setup.batch_sharding)
  evaluated = summarize_eval(jax.device_get(make_eval_step(setup, np.ones(512))(state, batch)))
  _, trained = forward(state, batch)  # the training forward's metrics
  assert evaluated[f'eval_mask{last}_top1'] > 0.5, evaluated
  for m in range(BITA['num_mask_tokens']):
    np.testing.assert_allclose(evaluated[f'eval_mask{m}_top1'],
                               float(trained[f'mask{m}_top1']), rtol=1e-6, err_msg=str(m))
  assert len({evaluated[f'eval_mask{m}_top1'] for m in range(3)}) > 1, evaluated
  assert not any('mask' in key for key in summarize_eval(
      {'nll': 1.0, 'tokens': 1.0, 'bytes': 1.0}))  # a language model's eval: none


# The whole recipe: base run -> distill -> BiTA run -> lossless decoding.

@pytest.mark.slow
def test_bita_trains_only_its_tokens_and_decodes_losslessly(tmp_path, data_dir):
  base_dir, out, bita_dir = tmp_path / 'base', tmp_path / 'distilled', tmp_path / 'bita'
  train(tiny_config(data_dir, **{'train.steps': 20, 'train.warmup_steps': 2,
                             'checkpoint.every_steps': 20}), base_dir)
  summary = distill(base_dir, out, num_prompts=16, validation_prompts=8, prompt_len=8,
                    max_new_tokens=24, batch_size=16)
  assert summary['sequences'] == {'train': 16, 'validation': 8} and summary['base_step'] == 20
  cfg = config_lib.load('configs/bita.py:tiny', [
      f'model.bita.base_workdir={base_dir}', f'data.source=distilled:{out}',
      'model.bita.num_prompt_tokens=4', 'model.bita.train_groups=8', 'data.seq_len=32',
      'train.steps=24', 'train.batch_size=8', 'train.warmup_steps=2', 'log.every_steps=4',
      'log.eval_every_steps=24', 'log.eval_batches=1', 'checkpoint.every_steps=24',
      'log.progress=false', 'log.tensorboard=false', f'data.data_dir={data_dir}'])
  final = train(cfg, bita_dir)
  losses = [json.loads(line)['loss'] for line in (bita_dir / 'metrics.jsonl').open()]
  assert losses[-1] < losses[0]
  assert 0 <= final['mask0_top1'] <= 1 and np.isfinite(final['eval_loss'])

  _, base = load_model(base_dir)
  _, bita = load_model(bita_dir)
  for (path, before), after in zip(nnx.to_flat_state(nnx.state(base, nnx.Param)),
                                   jax.tree.leaves(nnx.state(bita.base, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before.get_value()),
                                  err_msg=str(path))
  fresh = Bita(cfg.model, rngs=nnx.Rngs(0))
  assert not np.array_equal(bita.mask_embed[...], fresh.mask_embed[...])
  counts = models.param_counts(bita)
  assert counts['trained'] == bita.prompt_k.size + bita.prompt_v.size + bita.mask_embed.size
  assert counts['trained'] < counts['total'] / 20

  prompts = _prompts(4, seed=2)
  generator = infer.Generator(bita)
  greedy, _ = generator(prompts, max_new_tokens=16)
  drafted, stats = generator(prompts, max_new_tokens=16, method='bita')
  assert drafted == greedy and stats['accepted_per_pass'] >= 1


def _reference_mask_logits(model, tokens, positions, start, anchor):
  """An independent dense forward of one sequence tokens[start..anchor] then the M mask
  tokens, causal, the masks (only) also seeing each layer's prompt keys and values. The
  sequence is padded to len(tokens) with keys nobody sees, so that every call has the
  same shapes (each new shape compiles every op again)."""
  base, m, t = model.base, model.num_mask_tokens, len(tokens)
  n = anchor + 1 - start
  sequence, pos = np.zeros(t, np.int32), np.zeros(t, np.int32)
  sequence[:n], pos[:n] = tokens[start:anchor + 1], positions[start:anchor + 1]
  x = jnp.concatenate([base.embed(jnp.asarray(sequence)[None]),
                       model.mask_embed[...][None]], 1)
  pos = jnp.concatenate([jnp.asarray(pos), positions[anchor] + 1 + jnp.arange(m)])[None]
  is_mask, real = jnp.arange(t + m) >= t, (jnp.arange(t + m) < n) | (jnp.arange(t + m) >= t)
  sees = jnp.concatenate([jnp.broadcast_to(is_mask[:, None], (t + m, model.prompt_k.shape[1])),
                          jnp.tril(jnp.ones((t + m, t + m), bool)) & real[None]], 1)
  for layer, block in enumerate(base.blocks):
    attn, h = block.attn, block.attn_norm(x)
    rope = lambda y: apply_rope(y, pos, attn.rope_theta)
    q = rope(jnp.einsum('btd,dnh->btnh', h, attn.q_proj[...]))
    k = jnp.concatenate([model.prompt_k[...][layer][None],
                         rope(jnp.einsum('btd,dkh->btkh', h, attn.k_proj[...]))], 1)
    v = jnp.concatenate([model.prompt_v[...][layer][None],
                         jnp.einsum('btd,dkh->btkh', h, attn.v_proj[...])], 1)
    k, v = (jnp.repeat(y, q.shape[2] // y.shape[2], 2) for y in (k, v))
    scores = jnp.einsum('bqnh,bknh->bnqk', q, k) / np.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(sees, scores, -1e30), -1)
    x = x + jnp.einsum('bqnh,nhd->bqd', jnp.einsum('bnqk,bknh->bqnh', probs, v),
                       attn.o_proj[...])
    x = x + block.mlp(block.mlp_norm(x))
  return np.asarray(base.logits(base.final_norm(x))[0, t:])


def test_training_mask_logits_targets_and_loss_mask_match_an_independent_reference():
  model = models.build(_bita_config('dense', train_groups=0, init_std=0.5), rngs=nnx.Rngs(0))
  t, rng = 20, np.random.default_rng(1)
  sequence = rng.integers(1, 256, (2, t + 1)).astype(np.int32)
  segments, positions = np.zeros((2, t), np.int32), np.zeros((2, t), np.int32)
  segments[0, :14], segments[1, :8], segments[1, 8:] = 1, 1, 2
  positions[0, :14], positions[1, :8], positions[1, 8:] = range(14), range(8), range(12)
  loss_mask = np.zeros((2, t), np.int32)
  loss_mask[0, 4:13], loss_mask[1, 10:19] = 1, 1  # continuations ending inside the rows
  batch = dict(inputs=sequence[:, :-1], targets=sequence[:, 1:], segment_ids=segments,
               positions=positions, loss_mask=loss_mask)
  logits, targets, mask = map(np.asarray, nnx.jit(type(model).predictions)(model, batch))
  useful = np.zeros((2, t), bool)
  useful[:, :-1] = (segments[:, :-1] > 0) & (segments[:, 1:] == segments[:, :-1]) & (
      loss_mask[:, 1:] > 0)
  anchors, real = map(np.asarray, spread_anchors(jnp.asarray(useful), t))
  for r in range(2):
    assert anchors[r][real[r]].tolist() == np.flatnonzero(useful[r]).tolist()
    assert not mask[r][~real[r]].any()
    for g in np.flatnonzero(real[r]):
      a, s = anchors[r, g], segments[r, anchors[r, g]]
      start = int(np.flatnonzero(segments[r] == s)[0])
      np.testing.assert_allclose(
          logits[r, g], _reference_mask_logits(model, batch['inputs'][r], positions[r],
                                               start, a), atol=1e-4)
      for m in range(3):  # mask m predicts the input two past the anchor, plus m
        label = a + 1 + m
        counts = label < t and segments[r, label] == s and loss_mask[r, label] == 1
        assert bool(mask[r, g, m]) == counts, (r, a, m)
        if counts:
          assert targets[r, g, m] == sequence[r, a + 2 + m]
