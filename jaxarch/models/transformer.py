"""Decoder-only transformer with a per-layer block plan and skip-placed side layers.

`model.block_pattern` is repeated over the `n_layers` blocks, e.g. ('dense',) for a dense
model or ('dense', 'moe') for MoE every other layer. Block types live in the `BLOCKS`
registry; a new family registers its block here without touching the model or trainer.

Side layers (UltraMem memory layers) are placed by `(read, write)` pairs of block
indices in `model.<kind>.placement`: the layer reads the normalised FFN input of block
`read` (the residual stream after its attention, through its FFN's norm; UltraMem, arXiv
2411.12364) and its output is added to the residual stream after block `write` (>= read),
so its lookup can overlap with the blocks in between. Kinds live in the `SIDE_LAYERS`
registry. Layers report aux losses and metrics through `jaxarch.layers.signals`.
"""

from collections.abc import Callable, Iterable, Sequence
import inspect
import math

import flax
import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from jaxarch import config as config_lib
from jaxarch.layers import Attention, Embed, RMSNorm, SwiGLU, remat
from jaxarch.layers.embeddings import head_logits
from jaxarch.layers import signals
from jaxarch.layers.params import normal, param, stack_layers
from jaxarch.layers.rope import LinearScaling, Llama3Scaling, RopeScaling

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# Block type name -> factory(model_cfg, layer_index, rngs) -> block module. A block maps
# (x [b,t,d], positions [b,t], segment_ids [b,t]) -> x [b,t,d] including its residuals,
# and takes an optional `layers.layout.Layout` and attention prefix (BiTA) after them.
# A block that side layers read also splits at its FFN, as `DenseBlock` does:
# `ffn_input(x, ...) -> (x, normed)` and `ffn(x, normed, segment_ids) -> x`.
BLOCKS: dict[str, Callable[..., nnx.Module]] = {}

# Config section name -> factory(model_cfg, index, rngs) -> side layer mapping
# (x [b,t,d], positions [b,t], segment_ids [b,t], optional layout) to an update [b,t,d]
# for the residual stream, placed by `model.<name>.placement`; `index` is the layer's place
# among all the side layers placed (`config.placements`).
SIDE_LAYERS: dict[str, Callable[..., nnx.Module]] = {}


def check_new_name(registry: dict, what: str, name: str, entry) -> None:
  """Refuses `name` for `entry` where another entry (a built-in, or another plugin's) has
  it: the last import would win, silently, and a run would build other layers than it was
  trained with. The same code registered again (a module reloaded) replaces it."""
  old = registry.get(name)
  code = lambda f: (f'{getattr(f, "__module__", "?")}.{getattr(f, "__qualname__", f)}')
  if old is not None and code(old) != code(entry):
    raise ValueError(f'{what} {name!r} is registered already, by {code(old)}; give '
                     f'{code(entry)} another name')


def check_called_as(what: str, name: str, entry, call: str, *args, **kwargs) -> None:
  """Refuses a factory that cannot be called as jaxarch calls it (`call`, e.g.
  'factory(model_cfg, layer, rngs)'), when it is registered: called, it would fail with a
  TypeError deep inside the model's build."""
  try:
    signature = inspect.signature(entry)
  except (TypeError, ValueError):  # no signature to read (a builtin): left to the call
    return
  try:
    signature.bind(*args, **kwargs)
  except TypeError as e:
    raise config_lib.ConfigError(
        f'{what} {name!r}: {getattr(entry, "__qualname__", entry)}{signature} cannot be '
        f'called as jaxarch calls a {what} factory, {call} ({e})') from None


def register_block(name: str, checks: Sequence[config_lib.Check] = ()):
  """Decorator: `factory` builds the blocks `model.block_pattern` names `name`, and the
  config accepts that name. `checks` validate the block's own section (`model.<name>`,
  which the config must then have) whenever the pattern uses it, raising
  `config.ConfigError`; none by default."""
  def register(factory):
    check_new_name(BLOCKS, 'block', name, factory)
    check_called_as('block', name, factory, 'factory(model_cfg, layer, rngs)', None, 0, None)
    BLOCKS[name] = factory
    config_lib.BLOCK_CHECKS[name] = tuple(checks) or config_lib.BLOCK_CHECKS.get(name, ())
    return factory
  return register


def register_side_layer(name: str):
  """Decorator: `factory(model_cfg, index, rngs)` builds the side layers that
  `model.<name>.placement` places (`SIDE_LAYERS`)."""
  def register(factory):
    check_new_name(SIDE_LAYERS, 'side layer', name, factory)
    check_called_as('side layer', name, factory, 'factory(model_cfg, index, rngs)', None, 0,
                    None)
    SIDE_LAYERS[name] = factory
    if name not in config_lib.SIDE_LAYER_KINDS:
      config_lib.SIDE_LAYER_KINDS.append(name)
    return factory
  return register


def model_inputs(tokens, segment_ids=None, positions=None) -> tuple[jax.Array, ...]:
  """A language model's inputs (tokens int [b, t]; segment ids and positions [b, t], by
  default one document from 0), checked: a list, a vector or floats given to a model
  were errors from deep inside its layers."""
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f'a model takes tokens as integers [batch, length], not '
                     f'{tokens.dtype} {list(tokens.shape)}')
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  for name, value in (('segment_ids', segment_ids), ('positions', positions)):
    if jnp.shape(value) != tokens.shape:
      raise ValueError(f'{name} {list(jnp.shape(value))} are not the shape of the tokens '
                       f'{list(tokens.shape)}')
  return tokens, jnp.asarray(segment_ids), jnp.asarray(positions)


def prompt_rows(tokens: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Prompts [b, t] right-padded, `lengths` [b] -> (positions, segment ids) [b, t]: the
  slots 0..t-1 the prefill fills, and 1 on each prompt, 0 on its padding."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return positions, (positions < lengths[:, None]).astype(jnp.int32)


def head_dim(cfg: ml_collections.ConfigDict) -> int:
  return cfg.head_dim or cfg.d_model // cfg.n_heads


class DenseBlock(nnx.Module):
  """Pre-norm attention + SwiGLU, each added to the residual stream; with `post_norms`
  (Gemma 2's and 3's "sandwich"), each one's output normed again before it is added."""

  def __init__(self, attention: Attention, mlp: nnx.Module, d_model: int, *, eps: float,
               post_norms: bool = False, dtype, param_dtype, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(d_model, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = norm()
    self.attn = attention
    self.mlp_norm = norm()
    self.mlp = mlp
    self.attn_post_norm = norm() if post_norms else None
    self.mlp_post_norm = norm() if post_norms else None

  def __call__(self, x, positions, segment_ids, layout=None, prefix=None):
    return self.ffn(*self.ffn_input(x, positions, segment_ids, layout, prefix), segment_ids)

  def ffn_input(self, x, positions, segment_ids, layout=None, prefix=None):
    """-> (residual stream after attention, its normed copy: the FFN's input, which
    side layers placed at this block read too)."""
    x = x + post_norm(self.attn_post_norm,
                      self.attn(self.attn_norm(x), positions, segment_ids, layout, prefix))
    return x, self.mlp_norm(x)

  def ffn(self, x, normed, segment_ids):
    del segment_ids  # which tokens are padding: for FFNs that route (`models.moe`)
    return x + post_norm(self.mlp_post_norm, self.mlp(normed))


def post_norm(norm: RMSNorm | None, x: jax.Array) -> jax.Array:
  """A sublayer's output x [b, t, d] through its post-norm, if the block has them."""
  return x if norm is None else norm(x)


def make_attention(cfg: ml_collections.ConfigDict, layer: int, rngs: nnx.Rngs) -> Attention:
  """Block `layer`'s attention: with `model.sliding_window` where `model.attention_pattern`
  (cycled over the blocks) marks it 'local', and there with RoPE at
  `model.local_rope_theta`, unscaled, if set (Gemma 3's)."""
  window = layer_windows(cfg)[layer]
  theta, scaling = ((cfg.local_rope_theta, None) if window and cfg.local_rope_theta
                    else (cfg.rope_theta, rope_scaling(cfg)))
  return Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, head_dim(cfg),
                   rope_theta=theta, rope_scaling=scaling,
                   init_std=cfg.init_std,
                   out_std=residual_init_std(cfg), init_truncation=cfg.init_truncation,
                   impl=cfg.attention_impl, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm,
                   norm_eps=cfg.norm_eps, window=window,
                   dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype], rngs=rngs)


def rope_scaling(cfg: ml_collections.ConfigDict) -> RopeScaling | None:
  """`model.rope_scaling` as the attention layers take it: None for type 'none'."""
  s = cfg.rope_scaling
  if s.type == 'none':
    return None
  if s.type == 'linear':
    return LinearScaling(s.factor)
  return Llama3Scaling(s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_len)


def residual_init_std(cfg: ml_collections.ConfigDict) -> float:
  """GPT-2 style: layers that write to the residual stream start scaled by 1/sqrt(2L)
  (`model.residual_init_scale`)."""
  return cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.residual_init_scale else (
      cfg.init_std)


@register_block('dense')
def dense_block(cfg: ml_collections.ConfigDict, layer: int, rngs: nnx.Rngs) -> DenseBlock:
  dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
  mlp = SwiGLU(cfg.d_model, cfg.d_ff, init_std=cfg.init_std, out_std=residual_init_std(cfg),
               init_truncation=cfg.init_truncation, activation=cfg.mlp_activation,
               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  return DenseBlock(make_attention(cfg, layer, rngs), mlp, cfg.d_model, eps=cfg.norm_eps,
                    post_norms=cfg.post_norms, dtype=dtype, param_dtype=param_dtype,
                    rngs=rngs)


def cycled(pattern, n_layers: int) -> list:
  """A per-block pattern (model.block_pattern, model.attention_pattern) repeated over
  `n_layers` blocks."""
  pattern = tuple(pattern)
  return [pattern[i % len(pattern)] for i in range(n_layers)]


def block_plan(cfg: ml_collections.ConfigDict) -> list[str]:
  if unknown := [kind for kind in cfg.block_pattern if kind not in BLOCKS]:
    raise config_lib.ConfigError(
        f'model.block_pattern has {unknown[0]!r} blocks, which no code registered (blocks: '
        f'{", ".join(BLOCKS)}){config_lib.OWN_CODE.format("block", "register_block")}')
  return cycled(cfg.block_pattern, cfg.n_layers)


def layer_windows(cfg: ml_collections.ConfigDict) -> list[int | None]:
  """Each block's sliding window: `model.sliding_window` in the blocks
  `model.attention_pattern` (cycled) marks 'local', None in the others or without one."""
  window = cfg.get('sliding_window')
  return [window if kind == 'local' else None
          for kind in cycled(cfg.get('attention_pattern', ('local',)), cfg.n_layers)]


def side_placement(cfg: ml_collections.ConfigDict) -> list[tuple[str, int, int]]:
  """(kind, read, write) of every side layer the config places, in the config's order
  (`config.placements`): the side layers' indices. A section with a `placement` that no
  registered side layer reads is refused: its layers would be left out of the model
  without a word (a plugin not loaded, a misspelt section)."""
  placed = config_lib.placements(cfg)
  if unknown := [kind for kind, _, _ in placed if kind not in SIDE_LAYERS]:
    raise config_lib.ConfigError(
        f'model.{unknown[0]}.placement places side layers of a kind no code registered '
        f'(side layers: {", ".join(SIDE_LAYERS)}), or the section\'s name is misspelt'
        f'{config_lib.OWN_CODE.format("side layer", "register_side_layer")}')
  return placed


def scan_layout(cfg: ml_collections.ConfigDict) -> config_lib.ScanLayout:
  """Which blocks and side layers of a stack run in one scan (`model.scan_layers`,
  `config.scan_layout`); none unscanned."""
  if cfg.get('scan_layers') and not hasattr(nnx, 'capture'):
    # the scan's blocks sow through a capture of their own
    raise config_lib.ConfigError(f'model.scan_layers needs nnx.capture, which flax '
                                 f'{flax.__version__} lacks; upgrade flax')
  return config_lib.scan_layout(cfg)


def scanned_layers(cfg: ml_collections.ConfigDict) -> str:
  """', layers scanned: 5 periods of 4 blocks and 1 side layer, 4 blocks unrolled' for a
  scanned stack of the model section `cfg` (the start of a run says it), '' unscanned."""
  layout = scan_layout(cfg)
  blocks, sides = layout.blocks, layout.side_layers
  if not blocks.repeats:
    return ''
  plural = lambda n, what: f'{n} {what}{"s" * (n != 1)}'
  unit = plural(blocks.period, 'block') + (f' and {plural(sides.period, "side layer")}'
                                           if sides.repeats else '')
  rest = len(blocks.unrolled())
  pairs = [(read, write) for _, read, write in config_lib.placements(cfg)]
  return (f', layers scanned: {plural(blocks.repeats, "period")} of {unit}'
          + (f', {plural(rest, "block")} unrolled' if rest else '')
          + (' (a scan of one period compiles no less than the layers unrolled)'
             if blocks.repeats == 1 else '')
          + (' (the side layers\' placement lists its pairs out of block order, so they do '
             'not scan: a new run that lists them by block scans them)'
             if pairs != sorted(pairs) and not sides.repeats else ''))


def stacked_layers(layers: Sequence[nnx.Module], numbering: config_lib.Numbering,
                   what: str = 'block') -> list[nnx.Module]:
  """The scanned layers of `layers` (all of a sequence: `numbering` says which), each
  stacked layer j holding repeat 0's and its repeats' (`params.stack_layers`): the same
  weights, in the scanned layout."""
  first = lambda i: numbering.layer(numbering.slot(i)[0], 0)
  scanned = [i for i in range(len(layers)) if numbering.slot(i) is not None]
  if (bare := next((i for i, layer in enumerate(layers)
                    if not jax.tree.leaves(nnx.state(layer, nnx.Param))), None)) is not None:
    raise config_lib.ConfigError(
        f'model.scan_layers: {what} {bare} ({type(layers[bare]).__name__}) has no '
        f'parameters, and a scanned stack is laid out by its {what}s\' parameters (a '
        f'checkpoint names each {what} by them); set model.scan_layers=False, or give the '
        f'{what} a parameter')
  for i in scanned:
    if nnx.graphdef(layers[i]) != nnx.graphdef(layers[first(i)]):
      raise config_lib.ConfigError(
          f'model.scan_layers: {what} {i} is built unlike {what} {first(i)}, '
          f'{i - first(i)} {what}s before it (its factory depends on more than the '
          f'patterns), so the {what}s do not stack; set model.scan_layers=False')
  for j in range(numbering.period):
    same = [dict(nnx.iter_graph(layers[numbering.layer(j, r)]))
            for r in range(numbering.repeats)]
    for path, node in same[0].items():
      if isinstance(node, nnx.Variable):
        stacked = [nodes[path] for nodes in same]
        shapes = [(v.get_value().shape, v.get_value().dtype) for v in stacked]
        if (r := next((r for r, s in enumerate(shapes) if s != shapes[0]), None)) is not None:
          raise config_lib.ConfigError(
              f'model.scan_layers: {"/".join(map(str, path))} of {what} '
              f'{numbering.layer(j, r)} is {shapes[r][1]}{list(shapes[r][0])}, of {what} '
              f'{numbering.layer(j, 0)} {shapes[0][1]}{list(shapes[0][0])}: layers of other '
              'shapes do not stack; set model.scan_layers=False')
        stack_layers(stacked)
  return [layers[numbering.layer(j, 0)] for j in range(numbering.period)]


def unrolled_only(layers: Sequence[nnx.Module], numbering: config_lib.Numbering) -> list:
  """`layers` with None for each scanned one, under their own indices; [] if all are."""
  kept = [None if numbering.slot(i) is not None else layer for i, layer in enumerate(layers)]
  return kept if any(layer is not None for layer in kept) else []


# A stack's two sequences of layers: each one's name unrolled (one module per layer) and
# scanned (one module per layer of a unit, its variables stacked [repeats, ...]).
SEQUENCES = {'blocks': 'layers', 'side_layers': 'scanned_side_layers'}
UNROLLED_NAME = {scanned: unrolled for unrolled, scanned in SEQUENCES.items()}


def scanned_stacks(model: nnx.Module) -> list[tuple[tuple, 'Stack']]:
  """(path, stack) of every scanned stack in `model`."""
  return [(path, stack) for path, stack in nnx.iter_graph(model)
          if isinstance(stack, Stack) and stack.layers is not None]


def stack_at(keys: Sequence[str]) -> tuple[int, str] | None:
  """Where a variable's path (its keys) enters one of a stack's sequences, and under
  which name (`SEQUENCES`): (index, 'blocks') for an unrolled stack's `blocks/<i>` (layer
  i); (index, 'layers') for a scanned stack's `layers/<j>`, whose variables hold every
  repeat of block j stacked; likewise 'side_layers' and 'scanned_side_layers'. None
  outside the sequences."""
  names = {*SEQUENCES, *UNROLLED_NAME}
  return next(((i, a) for i, (a, b) in enumerate(zip(keys, keys[1:]))
               if a in names and b.isdigit()), None)


def scanned_at(keys: Sequence[str]) -> int | None:
  """Where a variable's path enters a scanned sequence's stacked layer (`layers/<j>`,
  `scanned_side_layers/<k>`); None outside them."""
  at = stack_at(keys)
  return at[0] if at is not None and at[1] in UNROLLED_NAME else None


def numberings(paths: Iterable[tuple[Sequence[str], Sequence[int]]]
               ) -> dict[tuple[tuple[str, ...], str], config_lib.Numbering]:
  """(stack's path, sequence's unrolled name) -> how its layers are laid out, read off a
  state's variables (`paths`: each one's keys and shape; a checkpoint's or a tree's): a
  scanned sequence's layers before and after its scan are those unrolled under their own
  indices, so its scan starts at the first index none has. A state must name every layer:
  the parameters do (a scanned stack refuses a layer without them, `stacked_layers`),
  where an optimizer's state may leave some out."""
  found = {}  # -> [unrolled indices, stacked layers per unit, repeats]
  for keys, shape in paths:
    if (at := stack_at(keys)) is None:
      continue
    i, name = at
    sequence = UNROLLED_NAME.get(name, name)
    where = found.setdefault((tuple(keys[:i]), sequence), [set(), 0, 0])
    if name in UNROLLED_NAME:
      where[1], where[2] = max(where[1], int(keys[i + 1]) + 1), shape[0]
    else:
      where[0].add(int(keys[i + 1]))
  layouts = {}
  for key, (unrolled, period, repeats) in found.items():
    start = min(set(range(len(unrolled) + 1)) - unrolled) if repeats else 0
    layouts[key] = config_lib.Numbering(len(unrolled) + period * repeats, start, period,
                                        repeats)
  return layouts


def stacked_modules(model: nnx.Module) -> dict[int, int]:
  """id -> repeats of the modules in `model`'s scanned stacks, whose variables hold all
  of a stack's repeats [repeats, ...]: their methods run on each layer (`per_layer`)."""
  return {id(m): stack.scan.repeats for _, stack in scanned_stacks(model)
          for _, m in nnx.iter_graph(stack.scanned()) if isinstance(m, nnx.Module)}


def each_layer(fn: Callable) -> Callable:
  """fn(module, *args) of a stacked module run on each of its layers: a vmap over its
  variables' leading axis, and over the args' (`in_axes`); variables it creates are
  stacked, their axis names led by None as `stack_layers` leads them."""
  return nnx.vmap(fn, transform_metadata={nnx.PARTITION_NAME: None})


def per_layer(module: nnx.Module, stacked: dict[int, int]) -> Callable:
  """How to run fn(module, *args) per layer: `each_layer` for a module of a scanned stack
  (`stacked`: `stacked_modules`), else as it is."""
  return each_layer if id(module) in stacked else (lambda fn: fn)


def unstacked_arrays(model: nnx.Module) -> dict[tuple, jax.Array]:
  """path -> array of every variable of `model` as the unscanned model holds it: a
  scanned stack's `layers/j/...` [repeats, ...] split into its layers' `blocks/i/...`,
  and its `scanned_side_layers/k/...` into `side_layers/s/...`."""
  arrays = {path: variable.get_value() for path, variable in nnx.to_flat_state(nnx.state(model))}
  for where, stack in scanned_stacks(model):
    for sequence, numbering in stack.scan_sequences():
      scanned = getattr(stack, SEQUENCES[sequence])
      if scanned is None:
        continue
      for path, variable in nnx.to_flat_state(nnx.state(scanned)):
        stacked = arrays.pop((*where, SEQUENCES[sequence], *path))
        j, *inner = path
        for repeat in range(numbering.repeats):
          arrays[(*where, sequence, numbering.layer(j, repeat), *inner)] = stacked[repeat]
  return arrays


def layer_slot(name: str, numbering: config_lib.Numbering) -> tuple[str, int] | None:
  """Where an unrolled layer's variable lies in a scanned stack at the model's root whose
  blocks `numbering` lays out: 'blocks.5.attn.q_proj' -> ('layers.1.attn.q_proj', 2) for
  period 2 from block 0, the stacked variable's name (as exports name them) and the
  layer's index in it; None outside the blocks and in the unrolled ones."""
  part, _, rest = name.partition('.')
  layer, _, inner = rest.partition('.')
  if part != 'blocks' or not layer.isdigit() or (slot := numbering.slot(int(layer))) is None:
    return None
  return f'layers.{slot[0]}.{inner}', slot[1]


def _kept_shape(layer: nnx.Module, x: jax.Array, out: jax.Array, which: str) -> jax.Array:
  """`out`, which must be shaped as the residual stream `x` [b, t, d]: a block (or side
  layer) of the user's own that returns another shape failed deep inside the next one's
  norm, naming neither."""
  if getattr(out, 'shape', None) != x.shape:
    raise config_lib.ConfigError(
        f'{which} ({type(layer).__name__}) returned {list(getattr(out, "shape", [type(out)]))} '
        f'for x {list(x.shape)}: a block, or a side layer\'s update, is shaped as the '
        'residual stream x [b, t, d]')
  return out


class Stack(nnx.Module):
  """The blocks of `model.block_pattern` and the side layers placed between them,
  x [b, t, d] -> x [b, t, d] (residual stream, not normed). The transformer runs one over
  its token embeddings; MEGABYTE one over patches and one inside each patch."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.remat = cfg.remat
    blocks = [BLOCKS[kind](cfg, i, rngs) for i, kind in enumerate(block_plan(cfg))]
    self.placement = tuple(side_placement(cfg))
    for kind, read, write in self.placement:
      # Checked here for every kind, a side layer of the user's own too (`SIDE_LAYERS`):
      # a write past the last block would drop the layer's output unseen.
      if not 0 <= read <= write < len(blocks):
        raise config_lib.ConfigError(
            f'model.{kind}.placement holds ({read}, {write}), which must be (read, write) '
            f'with 0 <= read <= write < model.n_layers={len(blocks)}')
      if not hasattr(blocks[read], 'ffn_input'):
        raise config_lib.ConfigError(
            f'model.{kind}.placement reads block {read}, a {block_plan(cfg)[read]!r} block, '
            'which has no FFN input to read (`ffn_input`); place the layer at another block')
    side_layers = [SIDE_LAYERS[kind](cfg, i, rngs)
                   for i, (kind, _, _) in enumerate(self.placement)]
    # Unrolled: `blocks` [n_layers] and `side_layers` [placed]. Scanned
    # (`model.scan_layers`, `scan_layout`): `layers` [period], the blocks of one unit of the
    # scan, each variable holding its block in every unit stacked [repeats, ...], and
    # `scanned_side_layers` the side layers of a unit alike, run by one `lax.scan` over the
    # repeats; the blocks and side layers before and after the scan stay in `blocks` and
    # `side_layers`, under their own indices (None in the scan's places).
    self.scan = scan_layout(cfg)
    layers = scanned_side_layers = None
    if self.scan.repeats:
      blocks_at, sides_at = self.scan.blocks, self.scan.side_layers
      layers = nnx.List(stacked_layers(blocks, blocks_at))
      if sides_at.repeats:
        scanned_side_layers = nnx.List(stacked_layers(side_layers, sides_at, 'side layer'))
      blocks = unrolled_only(blocks, blocks_at)
      side_layers = unrolled_only(side_layers, sides_at)
    self.blocks, self.layers = nnx.List(blocks), layers
    self.side_layers, self.scanned_side_layers = nnx.List(side_layers), scanned_side_layers

  def scan_sequences(self) -> list[tuple[str, config_lib.Numbering]]:
    """(unrolled name, layout) of the blocks and of the side layers (`SEQUENCES`)."""
    return [('blocks', self.scan.blocks), ('side_layers', self.scan.side_layers)]

  def scanned(self) -> tuple:
    """The modules one unit of the scan runs: (its blocks, its side layers)."""
    return self.layers, self.scanned_side_layers or nnx.List([])

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    return self.run_blocks(x, positions, segment_ids)

  def run_blocks(self, x, positions, segment_ids, layout=None, prefixes=None):
    """`layout` (`layers.layout`) and per-block attention `prefixes`: BiTA's calls."""
    extra = lambda i: () if layout is None else (layout, None if prefixes is None else prefixes[i])
    blocks = self.scan.blocks
    if not blocks.repeats:
      return self._run_unrolled(range(blocks.count), x, positions, segment_ids, extra)
    x = self._run_unrolled(range(blocks.start), x, positions, segment_ids, extra)
    x = self._scan_blocks(x, positions, segment_ids, layout, prefixes)
    return self._run_unrolled(range(blocks.end, blocks.count), x, positions, segment_ids,
                              extra)

  def _run_unrolled(self, span: range, x, positions, segment_ids, extra):
    """The blocks of `span` (unrolled) and the side layers placed in it, as they come."""
    sides = [(self.side_layers[j], read - span.start, write - span.start, f'side layer {j}')
             for j, (_, read, write) in enumerate(self.placement) if read in span]
    return self._run_with_sides([(self.blocks[i], f'block {i}', extra(i)) for i in span],
                                sides, x, positions, segment_ids)

  def _run_with_sides(self, blocks, sides, x, positions, segment_ids):
    """x through `blocks` ((block, name for messages, its extra arguments) each), with
    `sides` ((side layer, read, write, name) each; read and write index `blocks`): a side
    layer reads the FFN input of its read block, and its output waits for its write."""
    pending = {}  # side layer's place in `sides` -> its output, waiting for its write block
    for at, (block, name, extra) in enumerate(blocks):
      readers = [k for k, (_, read, _, _) in enumerate(sides) if read == at]
      if readers:
        x, normed = self._remat(type(block).ffn_input, block, x, positions, segment_ids,
                                *extra)
        for k in readers:
          side, _, _, side_name = sides[k]
          pending[k] = _kept_shape(side, x, side(normed, positions, segment_ids, *extra[:1]),
                                   side_name)
        x = _kept_shape(block, x, self._remat(type(block).ffn, block, x, normed, segment_ids),
                        name)
      else:
        x = _kept_shape(block, x, self._remat(type(block).__call__, block, x, positions,
                                              segment_ids, *extra), name)
      for k, (_, _, write, _) in enumerate(sides):
        if write == at:
          x = x + pending.pop(k)
    return x

  def _scan_blocks(self, x, positions, segment_ids, layout, prefixes):
    """The scanned blocks and side layers as one `lax.scan` over their repeats: each step
    runs one unit on its slice of the weights (and caches), so the step's program holds
    one unit, not every layer. What the layers sow comes back stacked and is sown again
    under each layer's own name (`signals.sow_layers`)."""
    blocks_at, sides_at = self.scan.blocks, self.scan.side_layers
    unit = self.scanned()
    for _, module in nnx.iter_graph(unit):
      if isinstance(module, nnx.Module) and hasattr(module, '__captures__'):
        # An outer `nnx.capture`'s, empty: the layers sow through their own, below. Its
        # str keys beside the list's int keys would make the state unsortable.
        delattr(module, '__captures__')
    # Decode caches ride in the carry, each layer's slice written back into it: as the
    # scan's input and output, a decode step took 2.2x the unrolled one's, 1.3x so
    # (docs/performance.md).
    graphdef, caches, state = nnx.split(unit, nnx.Cache, ...)
    capturing = signals.capturing(self)
    if prefixes is not None:  # one per scanned block -> each leaf [repeats, period, ...]
      prefixes = jax.tree.map(lambda *layers: jnp.stack(layers).reshape(
          blocks_at.repeats, blocks_at.period, *layers[0].shape),
          *prefixes[blocks_at.start:blocks_at.end])
    # The unit's side layers, read and write counted from its first block.
    placed = [self.placement[sides_at.layer(k, 0)] for k in range(sides_at.period)]

    def run(unit, x, prefix):
      blocks, sides = unit
      extra = lambda j: () if layout is None else (
          layout, None if prefix is None else jax.tree.map(lambda x: x[j], prefix))
      return self._run_with_sides(
          [(block, f'block {j} of the period', extra(j)) for j, block in enumerate(blocks)],
          [(side, read - blocks_at.start, write - blocks_at.start,
            f'side layer {k} of the period')
           for k, (side, (_, read, write)) in enumerate(zip(sides, placed))],
          x, positions, segment_ids)

    def body(carry, xs):
      x, caches, repeat = carry
      state, prefix = xs
      unit = nnx.merge(graphdef, jax.tree.map(lambda c: c[repeat], caches), state)
      if capturing:
        x, sown = nnx.capture(run, nnx.Intermediate)(unit, x, prefix)
      else:
        x, sown = run(unit, x, prefix), None
      caches = jax.tree.map(lambda c, new: c.at[repeat].set(new), caches,
                            nnx.state(unit, nnx.Cache))
      changed = nnx.state(unit, nnx.Not(nnx.Any(nnx.Param, nnx.Cache, nnx.Intermediate)))
      return (x, caches, repeat + 1), (changed, sown)

    (x, caches, _), (changed, sown) = jax.lax.scan(body, (x, caches, 0), (state, prefixes))
    nnx.update(unit, caches, changed)
    if sown is not None:
      signals.sow_layers(self, sown, [(SEQUENCES[name], name, numbering.layer)
                                      for name, numbering in self.scan_sequences()])
    return x

  def init_cache(self, batch: int, length: int):
    """Decode caches of `length` positions in every layer that keeps some (`jaxarch.infer`)."""
    for layer, per_layer in self._layers_with('init_cache'):
      per_layer(lambda m: m.init_cache(batch, length))(layer)

  def drop_cache(self):
    for layer, _ in self._layers_with('drop_cache'):
      layer.drop_cache()

  def keep_path(self, path: jax.Array, cached: jax.Array):
    """After a tree call (`layers.layout`): every cache keeps only the accepted path."""
    for layer, per_layer in self._layers_with('keep_path'):
      per_layer(lambda m: m.keep_path(path, cached))(layer)

  def _layers_with(self, method: str) -> list[tuple[nnx.Module, Callable]]:
    """(layer, how to run a function of it on each of its layers: `per_layer`) for every
    layer that has `method`."""
    stacked = stacked_modules(self)
    return [(m, per_layer(m, stacked)) for _, m in nnx.iter_graph(self)
            if m is not self and isinstance(m, nnx.Module) and hasattr(m, method)]

  def _remat(self, method, block, *args):
    """method(block, *args), rematerialised as `model.remat` says."""
    if self.remat == 'none':
      return method(block, *args)
    return nnx.remat(method, policy=remat.POLICIES[self.remat])(block, *args)


class Transformer(Stack):
  """tokens [b, t] -> logits [b, t, vocab] (fp32).

  For cached generation (`jaxarch.infer`): `init_cache`, then `prefill` once and
  `decode_step` per new token.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    self.max_len = cfg.max_len  # positions it is built for: `generate` warns past them
    self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std,
                       init_truncation=cfg.init_truncation,
                       scale=math.sqrt(cfg.d_model) if cfg.embed_scale else None,
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    super().__init__(cfg, rngs=rngs)
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
    self.head = None if cfg.tie_embeddings else param(
        rngs, normal(cfg.init_std, cfg.init_truncation), (cfg.d_model, cfg.vocab_size),
        ('embed', 'vocab'), param_dtype)

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    return self.logits(self.features(tokens, segment_ids, positions))

  def features(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """tokens [b, t] -> final-normed hidden states [b, t, d]; `logits` maps them to the
    vocabulary (generation only needs the last position of each prompt)."""
    tokens, segment_ids, positions = model_inputs(tokens, segment_ids, positions)
    return self.final_norm(self.run_blocks(self.embed(tokens), positions, segment_ids))

  def logits(self, x: jax.Array) -> jax.Array:
    """Hidden states [b, t, d] -> logits [b, t, vocab] (fp32)."""
    if self.head is None:
      return self.embed.attend(x)
    return head_logits(x, self.head[...].astype(x.dtype))

  def prefill(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """Prompts [b, t] right-padded, `lengths` [b] -> next-token logits [b, vocab]; fills
    the caches with positions 0..t-1 (the padding is overwritten before it is read)."""
    positions, segment_ids = prompt_rows(tokens, lengths)
    x = self.features(tokens, segment_ids, positions)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # b 1 d
    return self.logits(last)[:, 0]

  def decode_step(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """One new token per sequence, `tokens` [b] at `positions` [b] -> logits [b, vocab]."""
    x = self.features(tokens[:, None], jnp.ones_like(tokens)[:, None], positions[:, None])
    return self.logits(x)[:, 0]
