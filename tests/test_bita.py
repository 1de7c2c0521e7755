"""BiTA: lossless tree decoding for every wrapped family, the tree, the statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import family_config
from jaxarch import config as config_lib
from jaxarch import infer, models
from jaxarch.infer.tree import DraftTree
from jaxarch.models.bita import Bita, wrap_config

BASES = ('dense', 'moe', 'ultramem')  # the families BiTA wraps (conftest.FAMILIES)
BITA = dict(num_prompt_tokens=4, num_mask_tokens=3, draft_tree=(5, 4, 3), init_std=0.02)


def _bita_config(family, **bita):
  return wrap_config(family_config(family).model, {**BITA, **bita})


def _prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [[257] + rng.integers(1, 256, rng.integers(1, 30)).tolist() for _ in range(n)]


@pytest.mark.parametrize('family', BASES)
def test_bita_decoding_with_untrained_prompts_equals_greedy(family):
  model = models.build(_bita_config(family), rngs=nnx.Rngs(0))
  generator = infer.Generator(model)
  prompts = _prompts(5)
  greedy, _ = generator(prompts, max_new_tokens=24)
  drafted, stats = generator(prompts, max_new_tokens=24, method='bita')
  assert drafted == greedy
  assert stats['accepted_per_pass'] >= 1


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
    m = jnp.arange(self.num_mask_tokens)
    target = positions[:, anchors, None] + 2 + m  # b g M
    truth = jnp.take_along_axis(
        self.reference, jnp.minimum(target, self.reference.shape[1] - 1).reshape(
            target.shape[0], -1), axis=1).reshape(target.shape)
    sign = jnp.where(m < self.levels_right, 100.0, -100.0)[:, None]  # first or last
    return node_logits, mask_logits + sign * jax.nn.one_hot(truth, mask_logits.shape[-1])


@pytest.mark.parametrize('family', BASES)
@pytest.mark.parametrize('levels_right', [3, 1])
def test_accepted_tokens_per_pass_on_a_hand_made_oracle(family, levels_right):
  # The first pass has no drafts yet and produces 1 token; each later pass accepts the
  # right levels plus the bonus token. Equal output also shows that the caches keep
  # exactly the accepted path.
  cfg = _bita_config(family)
  prompts = [[257, 5, 6, 7], [257] + list(range(40, 61))]
  base = models.build(cfg, rngs=nnx.Rngs(0))
  new = 2 + 5 * (levels_right + 1)
  greedy, _ = infer.Generator(base)(prompts, max_new_tokens=new + 8)
  length = max(map(len, prompts)) + new + 8
  reference = np.zeros((len(prompts), length), np.int32)
  for i, (p, g) in enumerate(zip(prompts, greedy)):
    reference[i, :len(p) + len(g)] = p + g
  oracle = OracleBita(cfg, reference, levels_right, rngs=nnx.Rngs(0))
  drafted, stats = infer.Generator(oracle)(prompts, max_new_tokens=new, method='bita')
  assert drafted == [g[:new] for g in greedy]
  assert stats['forward_passes'] == 1 + 1 + 5  # prefill, the draftless pass, 5 full ones
  assert stats['accepted_per_pass'] == pytest.approx((new - 1) / 6)


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
