"""`generate`: batched prompts in, continuations out, with a compiled prefill and decode loop.

Prompts of different lengths are right-padded to a bucket (a power of two, so a handful of
shapes compile) and prefilled together; the decode loop is one `lax.while_loop` inside one
jitted call, which writes each sequence's new token at its own position and stops when
every sequence has produced a stop id or `max_new_tokens`. The batch is padded to a
multiple of the mesh's batch shards with one-token dummy prompts. `max_new_tokens` (rounded
up to a bucket for the output and caches), the sampling values and the stop ids are traced
arguments, so changing them does not compile again.

`method='bita'` (a BiTA model, `models.bita`) decodes greedily with a draft tree
(`infer.tree`): each pass verifies the previous pass's candidates (the prefill's, for the
first) and drafts the next ones, and the caches keep only the accepted tokens; the output
equals greedy decoding.

Past `model.max_len` (a prompt of n tokens continued by more than max_len + 1 - n tokens:
the last new token is never read) generation goes on, with a warning: the caches are sized
for the call and rotary positions have no table, so the tokens are those the full forward
gives at those positions, which the model was not built for. BiTA's drafts may reach past
it sooner; they change no token.
"""

import contextlib
import dataclasses
import logging
import math
import operator
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxarch.infer.decoding import (add_caches, cannot_decode, decode_step, for_inference,
                                    prefill)
from jaxarch.infer.sampling import GenerateError, Sampling, choose, within_vocab
from jaxarch.infer.tree import DraftTree
from jaxarch.parallel import context
from jaxarch.train.memory import explained_out_of_memory

log = logging.getLogger(__name__)

_MIN_BUCKET = 8
_NEW_TOKENS_BUCKET = 64  # output and cache room for new tokens: a multiple of this


@dataclasses.dataclass(frozen=True)
class _Shape:
  """The static part of a call: one compiled prefill and decode loop per distinct value."""
  batch: int
  prompt_len: int
  cache_len: int
  new_tokens: int  # the room for them: max_new_tokens rounded up to a bucket
  method: str
  filtered: bool  # Sampling.filtered
  num_stops: int  # stop ids, padded with -1 to a power of two
  tree: DraftTree | None = None  # method='bita'


class Generator:
  """Compiled generation for one model; keep it to reuse the compiled functions.

  `mesh` and `rules` (`cfg.mesh.rules`) place the caches and run expert-parallel and
  sharded-memory layers as in training; without them XLA places everything by the
  weights' shardings. `moe_capacity_factor`: see `decoding.for_inference`.
  `vocab_limit`: the tokenizer's vocabulary size; the ids of the model's vocabulary
  padding beyond it are never generated (None: any id of the model's vocabulary).
  A call that runs past the model's `max_len` is warned about once per Generator.
  """

  def __init__(self, model: nnx.Module, *, mesh: Mesh | None = None, rules=None,
               moe_capacity_factor: float | None = None, vocab_limit: int | None = None):
    if (mesh is None) != (rules is None):
      raise GenerateError('generate: pass both mesh and rules (cfg.mesh.rules), or neither')
    if vocab_limit is not None and _whole('vocab_limit', vocab_limit) < 1:
      raise GenerateError(f'generate: vocab_limit={vocab_limit} must be >= 1 (the '
                          "tokenizer's vocabulary size), or None for the model's")
    if (why := cannot_decode(model)) is not None:
      raise GenerateError(f'generate: {why}')
    model = for_inference(model, moe_capacity_factor=moe_capacity_factor)
    self.graphdef, self.state = nnx.split(model)
    self.mesh, self.rules = mesh, None if rules is None else tuple(map(tuple, rules))
    self.vocab_size = _vocab_size(model)
    if vocab_limit is not None and vocab_limit > self.vocab_size:
      raise GenerateError(f"generate: vocab_limit={vocab_limit} is more than the model's "
                          f'{self.vocab_size} ids: is it the tokenizer of another model?')
    self.vocab_limit = vocab_limit
    self.patch_size = getattr(model, 'patch_size', 1)  # MEGABYTE prefills whole patches
    self.num_mask_tokens = getattr(model, 'num_mask_tokens', None)  # BiTA
    self.default_tree = getattr(model, 'draft_tree', None)
    self.max_len = getattr(getattr(model, 'base', model), 'max_len', None)  # BiTA: its base's
    self._warned_max_len = False
    self._compiled: dict[_Shape, tuple] = {}

  def __call__(self, prompts: Sequence[Sequence[int]] | np.ndarray, *, max_new_tokens: int,
               method: str = 'greedy', temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, stop_ids: Sequence[int] = (),
               seed: int | Sequence[int] = 0,
               draft_tree: Sequence[int] | None = None) -> tuple[list[list[int]], dict]:
    """-> (the new tokens of each prompt, ending with its stop id if one came; stats).

    `seed`: one for the call (each prompt then draws by its place in `prompts`, so copies
    of a prompt draw differently), or one per prompt (a prompt then draws the same tokens
    with its seed in any call, wherever it stands among any others: a request's seed).
    `draft_tree`: candidates per level for method='bita' (default: the model's).

    stats: `batch` (prompts), `prompt_tokens`, `new_tokens` (their sums), `forward_passes`
    (of the decode loop, the prefill included), `tokens_per_pass` (new tokens per pass of
    a sequence: 1 but with BiTA), `compile_s`, `prefill_s`, `decode_s` (seconds),
    `tokens_per_s` (new tokens over prefill and decode), `decode_step_s`, `cache_bytes`
    (the caches' device bytes) and, for method='bita', `accepted_per_pass` (tokens a tree
    pass gives a sequence, the bonus token included; 0 where `tree_passes`, the passes
    of all sequences, is 0: each stopped at the prefill's token).
    """
    if method == 'sample' and temperature == 0:  # as in vLLM and HF: the most likely
      Sampling(method, 1.0, _whole('top_k', top_k), _real('top_p', top_p))  # still checked
      method, top_k, top_p = 'greedy', 0, 1.0
    sampling = Sampling(method, _real('temperature', temperature), _whole('top_k', top_k),
                        _real('top_p', top_p))
    prompts = _token_lists(prompts)
    max_new_tokens = _whole('max_new_tokens', max_new_tokens)
    stop_ids = _stop_ids(stop_ids)
    self._check(prompts, max_new_tokens, stop_ids)
    self._warn_past_max_len(prompts, max_new_tokens)
    if draft_tree is not None and method != 'bita':
      raise GenerateError(f"generate: draft_tree is for method='bita', not {method!r}")
    tree = self._draft_tree(draft_tree) if method == 'bita' else None
    n = len(prompts)
    batch = _round_up(n, self._batch_shards())
    lengths = np.array([len(p) for p in prompts] + [1] * (batch - n), np.int32)
    live = np.arange(batch) < n  # the rest fill the batch out to the mesh: done at once
    prompt_len = _round_up(max(_MIN_BUCKET, 1 << (int(lengths.max()) - 1).bit_length()),
                           self.patch_size)
    tokens = np.zeros((batch, prompt_len), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    new_room = _round_up(max_new_tokens, _NEW_TOKENS_BUCKET)
    tree_room = 0 if tree is None else tree.size * (1 + self.num_mask_tokens)  # one call
    stop_ids = sorted(set(stop_ids))
    stops = np.full(1 << (max(len(stop_ids), 1) - 1).bit_length(), -1, np.int32)
    stops[:len(stop_ids)] = stop_ids
    shape = _Shape(batch, prompt_len, prompt_len + new_room + tree_room, new_room,
                   sampling.method, sampling.filtered, len(stops), tree)
    if shape.cache_len >= 2**31:  # positions and max_new_tokens are int32 in the loop
      raise GenerateError(f'generate: max_new_tokens={max_new_tokens:,} makes caches of '
                          f'{shape.cache_len:,} positions, past the 2**31 that int32 '
                          'positions reach; lower max_new_tokens')
    given = (lengths, live, np.int32(max_new_tokens), sampling.values(), stops,
             _row_keys(seed, n, batch))

    with _cache_memory(shape, max_new_tokens):
      start = time.perf_counter()
      run_prefill, run_decode = self._compile(shape, tokens, given)
      compile_s = time.perf_counter() - start
      start = time.perf_counter()
      start_tokens, caches = jax.block_until_ready(run_prefill(self.state, tokens, *given))
      prefill_s = time.perf_counter() - start
      cache_bytes = sum(x.nbytes for x in jax.tree.leaves(caches))  # donated to the loop
      start = time.perf_counter()
      out, steps, accepted, _ = run_decode(self.state, caches, start_tokens, *given)
      out, steps = np.asarray(out), int(steps)
      decode_s = time.perf_counter() - start

    results = [_until_stop(row, stop_ids) for row in out[:n, :max_new_tokens]]
    new_tokens = sum(map(len, results))
    # Passes each sequence took until it stopped: one per token, or with BiTA the prefill
    # and its tree passes.
    passes = new_tokens if tree is None else n + int(accepted[1])
    stats = {
        'batch': n, 'prompt_tokens': int(lengths[:n].sum()), 'new_tokens': new_tokens,
        'forward_passes': steps, 'tokens_per_pass': new_tokens / max(passes, 1),
        'compile_s': compile_s, 'prefill_s': prefill_s, 'decode_s': decode_s,
        'tokens_per_s': new_tokens / max(prefill_s + decode_s, 1e-9),
        'decode_step_s': decode_s / max(steps - 1, 1), 'cache_bytes': cache_bytes,
    }
    if tree is not None:  # tokens per tree pass and sequence, the bonus token included
      stats['accepted_per_pass'] = float(accepted[0] / max(accepted[1], 1))
      stats['tree_passes'] = int(accepted[1])
    return results, stats

  def _draft_tree(self, widths) -> DraftTree:
    return draft_tree(widths, default=self.default_tree, num_mask_tokens=self.num_mask_tokens,
                      vocab=self.vocab_limit or self.vocab_size)

  def _check(self, prompts, max_new_tokens, stop_ids):
    if not prompts:
      raise GenerateError('generate: no prompts')
    if max_new_tokens < 1:
      raise GenerateError(f'generate: max_new_tokens={max_new_tokens} must be >= 1')
    for i, p in enumerate(prompts):
      if not p:
        raise GenerateError(f'generate: prompt {i} is empty; start prompts with the '
                         "run's BOS (data.bos_id; by default the tokenizer's eod id; none "
                         'under data.add_bos=False: give some text)')
      vocab = self.vocab_limit or self.vocab_size  # the padding's ids are no token's
      bad = [t for t in p if not 0 <= t < vocab]
      if bad:
        raise GenerateError(f'generate: prompt {i} has token ids {bad[:5]} outside the '
                         f'vocabulary [0, {vocab})')
    bad = [t for t in stop_ids if not 0 <= t < self.vocab_size]
    if bad:
      raise GenerateError(f'generate: stop_ids {bad} outside the vocabulary [0, {self.vocab_size})')

  def _warn_past_max_len(self, prompts, max_new_tokens):
    """Says, once, before compiling, which prompt reads positions past model.max_len."""
    if self.max_len is None or self._warned_max_len:
      return
    # The last new token is never read: a prompt of n tokens reads n + max_new_tokens - 1.
    past = [i for i, p in enumerate(prompts) if len(p) + max_new_tokens - 1 > self.max_len]
    if not past:
      return
    self._warned_max_len = True
    n = len(prompts[past[0]])
    more = f' ({len(past)} of the {len(prompts)} prompts read past it)' if len(past) > 1 else ''
    if n <= self.max_len:
      fix = f'lower max_new_tokens to {self.max_len + 1 - n}'
    elif max_new_tokens <= self.max_len:
      fix = f'shorten the prompt to at most {self.max_len + 1 - max_new_tokens} tokens'
    else:
      fix = f'shorten the prompt and lower max_new_tokens (to at most {self.max_len})'
    log.warning('generate: prompt %d of %d tokens + max_new_tokens=%d reads %d positions, '
                'more than model.max_len=%d%s; it goes on past them, which the model was not '
                'built for (tokens of unknown quality): %s', past[0], n, max_new_tokens,
                n + max_new_tokens - 1, self.max_len, more, fix)

  def _batch_shards(self) -> int:
    with self._context():
      return math.prod(self.mesh.shape[a] for a in context.mesh_axes('batch'))

  def _context(self):
    if self.mesh is None:
      return contextlib.nullcontext()
    return context.logical_mesh(self.mesh, self.rules)

  def _compile(self, shape: _Shape, tokens, given):
    if shape not in self._compiled:
      prefill_fn = jax.jit(lambda *a: self._prefill(shape, *a))
      decode = self._decode if shape.tree is None else self._decode_tree
      decode_fn = jax.jit(lambda *a: decode(shape, *a), donate_argnums=(1,))
      run_prefill = prefill_fn.lower(self.state, tokens, *given).compile()
      first, caches = jax.tree.map(
          lambda s, c: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=c),
          jax.eval_shape(prefill_fn, self.state, tokens, *given),
          run_prefill.output_shardings)
      run_decode = decode_fn.lower(self.state, caches, first, *given).compile()
      self._compiled[shape] = run_prefill, run_decode
    return self._compiled[shape]

  def _with_caches(self, shape: _Shape, state):
    model = nnx.merge(self.graphdef, state)
    add_caches(model, shape.batch, shape.cache_len, self.mesh, self.rules)
    return model

  def _prefill(self, shape: _Shape, state, tokens, lengths, live, limit, values, stops, keys):
    """-> (first new token [b], or with BiTA (it, the drafts after it [b, M, width]);
    caches)."""
    del live, limit, stops  # the decode loop's
    with self._context():
      model = self._with_caches(shape, state)
      if shape.tree is None:
        logits = prefill(model, tokens, lengths)
      else:
        logits, mask_logits = model.prefill_with_masks(tokens, lengths)
    logits = within_vocab(logits, self.vocab_limit)
    first = choose(logits, _at_step(keys, 0), shape.method, shape.filtered, values)
    if shape.tree is not None:
      with self._context():
        first = first, _drafts(within_vocab(mask_logits, self.vocab_limit), shape.tree)
    return first, nnx.state(model, nnx.Cache)

  def _decode(self, shape: _Shape, state, caches, first, lengths, live, limit, values, stops,
              keys):
    """-> (new tokens [b, max_new_tokens], forward passes including the prefill, caches).

    The caches are returned only so that their donated buffers are updated in place.
    """
    with self._context():
      graphdef, _, rest = nnx.split(self._with_caches(shape, state), nnx.Cache, ...)
    out = jnp.zeros((shape.batch, shape.new_tokens), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stops) | ~live

    def unfinished(carry):
      i, _, done, _ = carry
      return (i < limit) & ~jnp.all(done)

    def step(carry):
      i, out, done, caches = carry
      with self._context():
        # Fresh Variables of this trace level: layers may write their (discarded) state.
        model = nnx.merge(graphdef, caches, jax.tree.map(lambda x: x, rest))
        logits = within_vocab(decode_step(model, out[:, i - 1], lengths + i - 1),
                              self.vocab_limit)
      token = choose(logits, _at_step(keys, i), shape.method, shape.filtered, values)
      out = out.at[:, i].set(jnp.where(done, 0, token))
      return i + 1, out, done | jnp.isin(token, stops), nnx.state(model, nnx.Cache)

    steps, out, _, caches = jax.lax.while_loop(unfinished, step,
                                               (jnp.int32(1), out, done, caches))
    return out, steps, jnp.zeros(2, jnp.int32), caches

  def _decode_tree(self, shape: _Shape, state, caches, start, lengths, live, limit, values,
                   stops, keys):
    """BiTA: -> (new tokens [b, new_tokens + levels + 1], forward passes including the
    prefill, [tokens produced by tree passes, sequence-passes], caches)."""
    del values, keys  # greedy
    first, drafts = start
    tree = shape.tree
    with self._context():
      model = self._with_caches(shape, state)
      # A tree pass is many tokens of one sequence, where a MoE capacity path could drop
      # a candidate that greedy decoding (one token per sequence: none dropped) keeps.
      model.set_attributes(capacity_factor=None, raise_if_not_found=False)
      graphdef, _, rest = nnx.split(model, nnx.Cache, ...)
    b, rows = shape.batch, jnp.arange(shape.batch)
    slots = jnp.arange(tree.levels + 1)
    out = jnp.zeros((b, shape.new_tokens + tree.levels + 1), jnp.int32).at[:, 0].set(first)
    count = jnp.ones(b, jnp.int32)
    done = jnp.isin(first, stops) | (count >= limit) | ~live

    def unfinished(carry):
      return ~jnp.all(carry[3])

    def step(carry):
      i, out, count, done, root, cached, drafts, tally, caches = carry
      with self._context():
        model = nnx.merge(graphdef, caches, jax.tree.map(lambda x: x, rest))
        nodes = tree.tokens(root, drafts)
        positions = cached[:, None] + jnp.asarray(tree.depth)
        node_logits, mask_logits = (
            within_vocab(x, self.vocab_limit) for x in model.with_masks(
                nodes, positions, jnp.asarray(tree.visible), jnp.asarray(tree.parent),
                jnp.arange(tree.size), cached))
        greedy = jnp.argmax(node_logits, axis=-1).astype(jnp.int32)
        last, path = tree.accept(nodes, greedy)
        model.keep_path(path, cached)
        # The accepted node's masks [b, M, vocab], by a gather along the rows (indexed by
        # a row iota, XLA sums every row's logits over the batch's devices).
        accepted = jnp.take_along_axis(mask_logits, last[:, None, None, None], axis=1)[:, 0]
        drafts = _drafts(accepted, tree)
      depth = jnp.asarray(tree.depth)[last]
      bonus = greedy[rows, last]
      new = jnp.where(slots < depth[:, None], nodes[rows[:, None], jnp.roll(path, -1, 1)],
                      bonus[:, None])  # the accepted candidates, then the bonus token
      produced = jnp.where(done, 0, depth + 1)
      kept = slots < produced[:, None]
      out = out.at[rows[:, None], jnp.where(kept, count[:, None] + slots, out.shape[1])].set(
          new, mode='drop')
      at_stop = kept & jnp.isin(new, stops)
      stopped = jnp.any(at_stop, axis=1)
      # The statistics count the tokens returned: none past a stop or max_new_tokens.
      returned = jnp.minimum(jnp.where(stopped, jnp.argmax(at_stop, axis=1) + 1, produced),
                             jnp.maximum(limit - count, 0))
      tally = tally + jnp.stack([returned.sum(), (~done).sum()])
      cached = cached + produced
      count = count + produced
      root = jnp.where(done, root, bonus)
      done = done | stopped | (count >= limit)
      return (i + 1, out, count, done, root, cached, drafts, tally,
              nnx.state(model, nnx.Cache))

    carry = (jnp.int32(1), out, count, done, first, lengths, drafts, jnp.zeros(2, jnp.int32),
             caches)
    steps, out, *_, tally, caches = jax.lax.while_loop(unfinished, step, carry)
    return out, steps, tally, caches


def generate(model: nnx.Module, prompt_tokens, *, max_new_tokens: int,
             method: str = 'greedy', mesh: Mesh | None = None, rules=None,
             vocab_limit: int | None = None, **options) -> tuple[list[list[int]], dict]:
  """Continues each prompt (a list of token ids) by up to `max_new_tokens` tokens.

  `method`: 'greedy' or 'sample' (with `temperature`, `top_k`, `top_p`, `seed`);
  `stop_ids` (ids, or one id) end a sequence (the stop id is kept as its last token).
  Returns the new tokens of each prompt and statistics (tokens/s, forward passes,
  timings: the keys are listed in `Generator.__call__`). Compiles on every call; keep a
  `Generator` to generate repeatedly with one model. `vocab_limit`: the tokenizer's
  vocabulary, below the model's padded one (ids past it are never chosen).
  """
  return Generator(model, mesh=mesh, rules=rules, vocab_limit=vocab_limit)(
      prompt_tokens, max_new_tokens=max_new_tokens, method=method, **options)


def draft_tree(widths: Sequence[int] | None, *, default: Sequence[int] | None,
               num_mask_tokens: int | None, vocab: int) -> DraftTree:
  """The tree a BiTA model with `num_mask_tokens` (None: not BiTA) drafts for `widths`
  (None: its own, `default`); read from a run's config too, before its weights load."""
  if num_mask_tokens is None:
    raise GenerateError("generate: method='bita' needs a BiTA model (model.family='bita', "
                        'trained with configs/bita.py on a base run)')
  if widths is not None and (isinstance(widths, str) or not isinstance(
      widths, (Sequence, np.ndarray))):
    raise GenerateError(f'generate: draft_tree={widths!r}; give candidates per level, '
                        'e.g. (5, 4, 3)')
  if widths is not None and not len(widths):
    raise GenerateError('generate: draft_tree=() has no levels; give one width per level, '
                        'or None for the model\'s own tree')
  try:
    tree = DraftTree(tuple(int(w) for w in (default if widths is None else widths)))
  except (TypeError, ValueError) as e:
    raise GenerateError(f'generate: {e}') from e
  if max(tree.widths) > vocab:
    raise GenerateError(f'generate: draft_tree {tree.widths} asks for more candidates '
                        f'than the {vocab} tokens of the vocabulary')
  if tree.levels > num_mask_tokens:
    raise GenerateError(f'generate: draft_tree {tree.widths} has {tree.levels} levels; '
                        f'the model has {num_mask_tokens} mask tokens, one per level')
  return tree


def _cache_memory(shape: _Shape, max_new_tokens: int):
  """Caches too big for the device (a huge max_new_tokens: its room is allocated up front)
  end in a traceback from deep inside XLA; this says which argument to lower."""
  return explained_out_of_memory(lambda detail: GenerateError(
      f'generate: out of device memory ({detail}) for caches of {shape.batch} sequences x '
      f'{shape.cache_len:,} positions (prompts padded to {shape.prompt_len} + room for '
      f'max_new_tokens={max_new_tokens:,}): lower max_new_tokens, or give fewer prompts '
      'at a time'))


def _drafts(mask_logits: jax.Array, tree: DraftTree) -> jax.Array:
  """Mask logits [b, M, vocab] -> the most likely tokens of each mask [b, M, widest level];
  in a mesh context each device ranks its own rows (`context.top_k`), the logits split
  over `vocab` as the head computes them until then (left free, XLA may gather the head's
  weight whole instead of the rows' logits)."""
  mask_logits = context.constrain(mask_logits, ('batch', None, 'vocab'))
  return context.top_k(mask_logits, max(tree.widths))[1].astype(jnp.int32)


def _vocab_size(model: nnx.Module) -> int:
  model = getattr(model, 'base', model)  # BiTA: its base model's vocabulary
  embed = getattr(model, 'embed', None) or getattr(model, 'local_embed', None)
  if embed is None:
    raise GenerateError(f'generate: {type(model).__name__} has no token embedding (`embed`); '
                     'pass a jaxarch language model')
  return embed.embedding.shape[0]


def _token_lists(prompts) -> list[list[int]]:
  """The prompts as lists of ids. A flat list of ids, text or non-integer ids are refused
  here by name: they would fail deep inside, or text of digits would read as ids."""
  if isinstance(prompts, (np.ndarray, jax.Array)):
    prompts = np.asarray(prompts).tolist()
  try:  # a str's characters are no ids either
    return [[operator.index(t) for t in p] for p in prompts]
  except TypeError:
    raise GenerateError(
        f'generate: prompts must be a list of prompts, each a list of token ids (ints), e.g. '
        f'[[257, 72, 105]]; got {str(prompts)[:60]} (encode text with the tokenizer)') from None


def _whole(name: str, value) -> int:
  try:
    return operator.index(value)
  except TypeError:
    raise GenerateError(f'generate: {name}={value!r} must be an int') from None


def _real(name: str, value) -> float:
  try:  # text of digits is refused too, as for the ids
    if isinstance(value, (str, bytes)):
      raise TypeError
    return float(value)
  except (TypeError, ValueError):
    raise GenerateError(f'generate: {name}={value!r} must be a number') from None


def _key(seed) -> np.ndarray:
  """The PRNG key of a 64-bit `seed`, as `jax.random.PRNGKey` makes it with x64 on; without,
  it keeps the low 32 bits only, so that seeds 2**32 and 0 would draw the same tokens."""
  seed = _whole('seed', seed)
  if not -2**63 <= seed < 2**64:
    raise GenerateError(f'generate: seed={seed} does not fit 64 bits')
  seed %= 2**64
  return np.array([seed >> 32, seed & 0xffffffff], np.uint32)


def _row_keys(seed, n: int, batch: int) -> np.ndarray:
  """[batch, 2] uint32: the PRNG key of each row. One seed per prompt: that seed's key,
  whatever the row; one seed for the call: its key folded with each row's index."""
  if isinstance(seed, np.ndarray) and seed.ndim == 0:  # one seed, as an array
    seed = seed.item()
  if isinstance(seed, (Sequence, np.ndarray)) and not isinstance(seed, str):
    if len(seed) != n:
      raise GenerateError(f'generate: {len(seed)} seeds for {n} prompts; give one seed per '
                          'prompt, or one int for the call')
    return np.stack([_key(s) for s in seed] + [_key(0)] * (batch - n))
  base = _key(seed)
  return np.asarray(jax.vmap(jax.random.fold_in, (None, 0))(base, np.arange(batch)))


def _at_step(keys: jax.Array, i) -> jax.Array:
  """Each row's key [b, 2] for the token of step `i`."""
  return jax.vmap(jax.random.fold_in, (0, None))(keys, i)


def _stop_ids(stop_ids) -> list[int]:
  """`stop_ids` as a list: one id or None (no stop) are taken as well."""
  if stop_ids is None:
    return []
  if isinstance(stop_ids, (int, np.integer)) or getattr(stop_ids, 'ndim', None) == 0:
    return [_whole('stop_ids', stop_ids)]  # also a 0-d numpy or jax array
  try:
    return [operator.index(t) for t in stop_ids]
  except TypeError:
    raise GenerateError(f'generate: stop_ids={stop_ids!r} must be token ids (ints)') from None


def _until_stop(row: np.ndarray, stop_ids: Sequence[int]) -> list[int]:
  tokens = row.tolist()
  for i, token in enumerate(tokens):
    if token in stop_ids:
      return tokens[:i + 1]
  return tokens


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple
