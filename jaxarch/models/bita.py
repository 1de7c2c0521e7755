"""BiTA (arXiv 2401.12522): a frozen language model that drafts several tokens per pass.

Two kinds of learned parameters are added to a frozen jaxarch transformer (dense, MoE or
UltraMem): 0.06% of a 7B model, 0.26% of the 151m preset, 0.96% of tiny (configs/bita.py):

- **prompt tokens**: per-layer keys and values (`num_prompt_tokens` of them, deep prompt
  tuning) that only mask tokens see, so the model's ordinary outputs do not change;
- **mask tokens**: `num_mask_tokens` = M learned input embeddings, one per offset. A group
  of M mask tokens hung after a token at position a sits at positions a+1 .. a+M and
  sees that token's past; mask m predicts the token at a+2+m (the token itself already
  predicts a+1).

`with_masks` runs the base model over tokens with any tree layout (a draft tree in
decoding) plus a mask group after chosen anchor tokens, and `prefill_with_masks` drafts
after a prompt; `jaxarch.infer` builds the draft tree and verifies it. Training
(`predictions`) runs the frozen model forward over the rows' tokens first, filling its
caches, then only the mask groups, which read their anchors' past there: no backward
pass runs over the tokens. MEGABYTE is not wrapped: its
global model consumes whole patches, so a draft tree of bytes would need a global step
per candidate patch and its caches could not keep one accepted path cheaply.
"""

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxarch.layers import signals
from jaxarch.layers.layout import Layout
from jaxarch.layers.params import normal, param
from jaxarch.models.transformer import DTYPES, Transformer, head_dim, prompt_rows


def base_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The wrapped model's config: `cfg` without its `bita` section, of `bita.base_family`."""
  base = ml_collections.ConfigDict({k: v for k, v in cfg.to_dict().items() if k != 'bita'})
  base.family = cfg.bita.base_family
  return base


class Bita(nnx.Module):
  """tokens [b, t] -> the base model's logits [b, t, vocab]; `with_masks` drafts."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    b = cfg.bita
    self.num_mask_tokens = b.num_mask_tokens
    self.draft_tree = tuple(b.draft_tree)  # candidates per level (`infer.tree`)
    self.train_groups = b.train_groups  # mask groups per training row; 0: one per token
    self.base = Transformer(base_config(cfg), rngs=rngs)
    # Frozen: no optimizer updates (`train.optimizer` reads the `frozen` metadata), no
    # training-time state updates, and no auxiliary losses pulling on the new tokens.
    for _, variable in nnx.iter_graph(self.base):
      if isinstance(variable, nnx.Param):
        variable.set_metadata('frozen', True)
    self.base.set_attributes(deterministic=True, raise_if_not_found=False)
    self.base.set_attributes(aux_loss_weight=0.0, z_loss_weight=0.0,
                             raise_if_not_found=False)
    self.dtype = DTYPES[cfg.dtype]
    param_dtype, init = DTYPES[cfg.param_dtype], normal(b.init_std)
    shape = (cfg.n_layers, b.num_prompt_tokens, cfg.n_kv_heads, head_dim(cfg))
    axes = (None, None, 'kv_heads', 'head_dim')
    self.prompt_k = param(rngs, init, shape, axes, param_dtype, weight_decay=False)
    self.prompt_v = param(rngs, init, shape, axes, param_dtype, weight_decay=False)
    self.mask_embed = param(rngs, init, (b.num_mask_tokens, cfg.d_model), (None, 'embed'),
                            param_dtype, weight_decay=False)

  def __call__(self, tokens, segment_ids=None, positions=None):
    return self.base(tokens, segment_ids, positions)

  # Cached generation of the base model (greedy decoding is the base model's own).
  def init_cache(self, batch: int, length: int):
    self.base.init_cache(batch, length)

  def prefill(self, tokens, lengths):
    return self.base.prefill(tokens, lengths)

  def prefill_with_masks(self, tokens: jax.Array, lengths: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
    """`prefill` with a mask group after each prompt's last token -> (next-token logits
    [b, vocab], mask logits [b, M, vocab]): the first tree pass then verifies drafts, as
    every later one does (the release appends the masks to the prompt's pass too)."""
    logits = self.base.prefill(tokens, lengths)
    positions, segments = prompt_rows(tokens, lengths)
    x = self._groups_after_cached(segments, positions, (lengths - 1)[:, None])
    return logits, self.base.logits(self.base.final_norm(x))

  def decode_step(self, tokens, positions):
    return self.base.decode_step(tokens, positions)

  def keep_path(self, path, cached):
    self.base.keep_path(path, cached)

  def with_masks(self, tokens: jax.Array, positions: jax.Array, visible: jax.Array,
                 parent: jax.Array, anchors: jax.Array, cached: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """Tokens [b, n] at `positions` [b, n], laid out by `visible` [n, n] (ancestors and
    self) and `parent` [n] (-1: before the call), with a mask group after each of the
    tokens `anchors` [g] -> (token logits [b, n, vocab], mask logits [b, g, M, vocab]).
    `visible`, `parent` and `anchors` may also differ per row ([b, n, n], [b, n], [b, g]).

    With decode caches, `cached` [b] positions of each sequence precede the call; the
    call is written after them (`keep_path` then keeps the accepted tokens).
    """
    x = self._hidden(tokens, positions, visible, parent, anchors, cached)
    logits = self.base.logits(self.base.final_norm(x))
    b, n = tokens.shape
    return logits[:, :n], logits[:, n:].reshape(b, anchors.shape[-1], self.num_mask_tokens, -1)

  def _hidden(self, tokens, positions, visible, parent, anchors, cached):
    """`with_masks` up to the final norm -> [b, n + g·M, d]: the tokens, then the groups."""
    b, n = tokens.shape
    calls = Layout(visible, parent, jnp.zeros(n, bool))
    visible, parent = calls.visible_rows(b), calls.parent_rows(b)
    groups = self._groups(positions, anchors)
    rows = jnp.arange(b)[:, None]
    layout = Layout(
        visible=jnp.concatenate([
            jnp.concatenate([visible, jnp.zeros((b, n, groups.size), bool)], axis=2),
            jnp.concatenate([visible[rows, groups.anchor], groups.visible], axis=2)],
            axis=1),
        parent=jnp.concatenate([parent, jnp.where(groups.parent >= 0, n + groups.parent,
                                                  groups.anchor)], axis=1),
        sees_prefix=jnp.arange(n + groups.size) >= n, cached=cached)
    x = jnp.concatenate([self.base.embed(tokens), groups.inputs], axis=1)
    positions = jnp.concatenate([positions, groups.positions], axis=1)
    return self.base.run_blocks(x, positions, jnp.ones((b, n + groups.size), jnp.int32),
                                layout, self._prompts())

  def _hidden_after_tokens(self, tokens, segments, positions, anchors):
    """Training's mask groups after a causal pass over the packed rows `tokens` [b, t] ->
    [b, g·M, d] up to the final norm.

    The tokens' pass only fills the layers' caches: nothing trainable lies behind it, so
    it runs forward only (as the base model's own training runs), and the groups' pass
    reads the keys, values and conv inputs of each group's anchor and its past there.
    """
    b, t = tokens.shape
    self.base.init_cache(b, t)
    self.base.run_blocks(self.base.embed(tokens), positions, segments)
    x = self._groups_after_cached(segments, positions, anchors)
    self.base.drop_cache()
    return x

  def _groups_after_cached(self, segments, positions, anchors):
    """Mask groups after the tokens `anchors` [b, g] of rows whose tokens fill the first
    slots of the caches, with `segments` and `positions` [b, t] -> [b, g·M, d] up to the
    final norm."""
    b, t = segments.shape
    groups = self._groups(positions, anchors)
    rows = jnp.arange(b)[:, None]
    # A group sees its anchor's sequence up to the anchor, as the anchor does.
    context = ((jnp.arange(t) <= groups.anchor[..., None])
               & (segments[:, None, :] == segments[rows, groups.anchor][..., None]))
    m = self.num_mask_tokens
    layout = Layout(jnp.tril(jnp.ones((m, m), bool)), groups.parent,
                    jnp.ones(groups.size, bool), context=context,
                    context_offset=groups.anchor - positions[rows, groups.anchor])
    return self.base.run_blocks(groups.inputs, groups.positions,
                                jnp.ones((b, groups.size), jnp.int32), layout,
                                self._prompts())

  def _groups(self, positions, anchors) -> '_Groups':
    """The mask groups hung after the tokens `anchors` [g] or [b, g] at `positions` [b, n]."""
    b = positions.shape[0]
    g, m = anchors.shape[-1], self.num_mask_tokens
    group, offset = jnp.arange(g * m) // m, jnp.arange(g * m) % m
    anchor = jnp.broadcast_to(anchors, (b, g))[:, group]  # b gM: each mask token's anchor
    own_group = (group[:, None] == group[None, :]) & (offset[None, :] <= offset[:, None])
    # Broadcast, then cast: the embeddings' gradient sums over the groups in fp32
    # (layers/params.py).
    inputs = jnp.broadcast_to(self.mask_embed[...][None, None],
                              (b, g, m, self.mask_embed.shape[-1])).astype(self.dtype)
    inputs = inputs.reshape(b, g * m, -1)
    return _Groups(
        anchor=anchor, inputs=inputs,
        positions=(positions[jnp.arange(b)[:, None], anchor] + 1 + offset).astype(
            positions.dtype),
        visible=jnp.broadcast_to(own_group, (b, g * m, g * m)),
        parent=jnp.broadcast_to(jnp.where(offset == 0, -1, jnp.arange(g * m) - 1),
                                (b, g * m)))

  def _prompts(self) -> list[tuple[jax.Array, jax.Array]]:
    """The deep prompt's keys and values of each layer, seen by the mask tokens."""
    return list(zip(self.prompt_k[...], self.prompt_v[...]))

  def predictions(self, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The training objective: a mask group after `train_groups` tokens of each row,
    spread evenly over its labelled part (the release packs up to 64 per response), or
    after every token -> (mask logits [b, g, M, vocab], targets [b, g, M], loss mask
    [b, g, M]).

    Mask m after the input at index a predicts the target at a+1+m (the input at
    a+2+m). A label counts when it is in the anchor's sequence and, with a `loss_mask`
    batch feature (distilled data: the base model's continuation), marked there.
    """
    tokens, segments = batch['inputs'], batch['segment_ids']
    b, t = tokens.shape
    m = self.num_mask_tokens
    labelled = batch.get('loss_mask', segments > 0).astype(bool)
    # An anchor is useful when its first mask's label counts.
    same = segments[:, 1:] == segments[:, :-1]
    useful = jnp.zeros((b, t), bool).at[:, :-1].set(labelled[:, 1:] & same
                                                     & (segments[:, :-1] > 0))
    anchors, real = spread_anchors(useful, mask_groups(self.train_groups, t))  # b g
    x = self._hidden_after_tokens(tokens, segments, batch['positions'], anchors)
    logits = self.base.logits(self.base.final_norm(x))
    logits = logits.reshape(b, anchors.shape[1], m, -1)
    label = anchors[..., None] + 1 + jnp.arange(m)  # b g M: index into targets
    inside = label < t
    label = jnp.minimum(label, t - 1)
    rows = jnp.arange(b)[:, None, None]
    anchor_segment = jnp.take_along_axis(segments, anchors, axis=1)[..., None]
    mask = (real[..., None] & inside & (segments[rows, label] == anchor_segment)
            & labelled[rows, label] & (anchor_segment > 0))
    targets = batch['targets'][rows, label]
    hits = (jnp.argmax(logits, -1) == targets) & mask  # b g M
    for i in range(m):
      signals.add_metric(self, f'mask{i}_top1', hits[..., i].sum() / jnp.maximum(
          mask[..., i].sum(), 1))
    return logits, targets, mask


@flax.struct.dataclass
class _Groups:
  """Mask groups of a call, per row: g·M mask tokens, each group's offsets in order."""
  anchor: jax.Array  # [b, gM] index of each mask token's anchor token
  inputs: jax.Array  # [b, gM, d] the mask embeddings
  positions: jax.Array  # [b, gM] the anchor's position + 1 + offset
  visible: jax.Array  # [b, gM, gM] each mask token sees its group's earlier offsets
  parent: jax.Array  # [b, gM] the previous offset in its group, -1 (the anchor) for the first

  @property
  def size(self) -> int:
    return self.anchor.shape[1]


def mask_groups(train_groups: int, length: int) -> int:
  """Mask groups per training row of `length` tokens: `train_groups`, one per token if 0."""
  return min(train_groups or length, length)


def spread_anchors(useful: jax.Array, g: int) -> tuple[jax.Array, jax.Array]:
  """useful [b, t] bool -> g token indices per row spread evenly over its useful tokens
  [b, g], and which of them are real [b, g]: a row with fewer than g useful tokens takes
  each once, and the rest of its groups count for nothing."""
  count = useful.sum(axis=1, keepdims=True)  # b 1
  rank = jnp.arange(g) * count // g  # b g: take the rank-th useful token (from 0)
  upto = jnp.cumsum(useful, axis=1)  # b t: useful tokens up to each one
  anchors = jax.vmap(jnp.searchsorted)(upto, rank + 1)  # the first with rank+1 up to it
  new = jnp.concatenate([jnp.ones_like(rank[:, :1], bool), rank[:, 1:] > rank[:, :-1]], 1)
  return jnp.minimum(anchors, useful.shape[1] - 1).astype(jnp.int32), new & (rank < count)
