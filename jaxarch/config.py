"""Configs: load `path.py[:arg]`, apply `--config.x=y` overrides, validate, save as JSON.

A config file defines `get_config(arg)` returning an `ml_collections.ConfigDict`; `arg`
picks a preset. Overrides follow `ml_collections.config_flags` syntax and are parsed by
the type of the field they replace, so `train.steps=1e3` fails at load time instead of
deep inside the trainer. Every mistake the user can make in a config is a `ConfigError`
with a one-line message naming the key and what was expected.
"""

import ast
from collections.abc import Callable, Sequence
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
from pathlib import Path
import re
import sys
import traceback
import types
from typing import Any

import ml_collections
import numpy as np

ConfigDict = ml_collections.ConfigDict

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')
DTYPES = ('float32', 'bfloat16', 'float16')
REMAT = ('none', 'full', 'dots')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')
ROPE_SCALINGS = ('none', 'llama3', 'linear')  # model.rope_scaling.type (layers.rope)
# kernels.sparse_lookup: which kernels run the value lookup, and how its backward sums.
LOOKUP_IMPLS = ('auto', 'xla', 'pallas', 'interpret', 'interpret_tpu')
LOOKUP_SCATTERS = ('sorted', 'atomic')
# model.ultramem.permutation: one IVE permutation for every memory layer, or each layer's
# own (drawn from its index: older runs), which cannot be scanned.
ULTRAMEM_PERMUTATIONS = ('shared', 'per_layer')
TABLE_SPLITS = ('rows', 'width')  # how a sharded memory table is split (kernels.sharded_lookup)
MOE_GATES = ('softmax', 'sigmoid')
# kernels.grouped_matmul: which code runs dropless MoE's grouped matmuls.
MOE_MATMUL_IMPLS = ('auto', 'xla', 'pallas', 'mosaic', 'interpret', 'interpret_mosaic')
MOE_EP_EXCHANGES = ('auto', 'ragged', 'padded', 'ragged_emulated')
MOE_WEIGHT_GRADS = ('triton', 'mosaic')  # which kernel takes the weight gradient with 'mosaic'
SCHEDULES = ('cosine', 'wsd', 'constant')
NONFINITE = ('stop', 'skip')
GROUP_DECAYS = ('none', 'linear')  # train.groups.<name>.multiplier_decay
DATA_SOURCE_KINDS = ('files:', 'tfds:', 'distilled:')  # each with its argument after it
DATA_SOURCE_ERROR = ("data.source={!r} must be 'default', 'files:<glob>', 'tfds:<name>', "
                     "'distilled:<dir>' or a mixture 'SOURCE,WEIGHT;SOURCE,WEIGHT'")
POSITIVE_INTS = (
    'model.d_model', 'model.n_layers', 'model.n_heads', 'model.n_kv_heads', 'model.d_ff',
    'model.vocab_size', 'model.max_len', 'data.seq_len', 'train.steps', 'train.batch_size',
    'checkpoint.every_steps', 'checkpoint.keep', 'log.every_steps', 'log.eval_every_steps',
    'log.eval_batches', 'train.max_consecutive_skips', 'train.grad_accum_steps',
    'data.pack_align',
)

# Where the shipped configs/ and launch/ are: the root of the checkout this package runs
# from (a clone, an editable install), or jaxarch/_repo in an installed wheel, which
# pyproject.toml fills with the same two folders. Relative config paths that are not found
# from the working directory are looked up there.
_PACKAGE = Path(__file__).resolve().parent
_REPO_ROOT = _PACKAGE / '_repo' if (_PACKAGE / '_repo' / 'configs').is_dir() else _PACKAGE.parent
SHIPPED_CONFIGS = _REPO_ROOT / 'configs'  # jaxarch's own, whatever folder a command runs in


class ConfigError(ValueError):
  """A mistake in a config file, an override or their combination; one line for the user."""

  def __init__(self, message: str):
    prefix = 'config error: '
    super().__init__(message if message.startswith(prefix) else prefix + message)


class UnknownKeyError(ConfigError):
  """An override of a key that the config does not have."""


class MissingKeyError(ConfigError):
  """A key that validation needs and the config lacks (a saved config of an older jaxarch,
  or one edited by hand)."""

  def __init__(self, key: str):
    super().__init__(f'missing key {key!r}')
    self.key = key


# Loading.


def load(spec: str | os.PathLike, overrides: Sequence[str] = ()) -> ConfigDict:
  """`configs/dense.py:tiny` plus `train.steps=50`-style overrides -> locked, valid config.

  A run's saved `config.json` loads too (`load_json`), so a run can be trained again.
  """
  _check_overrides(overrides)
  path, arg = _split_spec(os.fspath(spec))
  if path.endswith('.json'):
    if arg:
      raise ConfigError(f'config file {path!r} is a saved config: it takes no preset '
                        f'(:{arg})')
    return load_json(_resolve_path(path), overrides)
  module = _import_file(_resolve_path(path))
  get_config = getattr(module, 'get_config', None)
  if not callable(get_config):
    raise ConfigError(f'config file {path!r} does not define get_config(arg)')
  cfg = call_config_function(module, get_config, arg)
  if not isinstance(cfg, ConfigDict):
    raise ConfigError(f'{path}: get_config returned {type(cfg).__name__}, not a ConfigDict')
  cfg.lock()  # an override can only change a key the config file defines
  complete = MODEL_FROM.get((cfg.get('model') or {}).get('family'))
  deferred = []
  for override in overrides:
    try:
      apply_override(cfg, override)
    except UnknownKeyError:
      if complete is None or not _completed_later(cfg, override):
        raise
      deferred.append(override)  # a key of the model section `complete` fills in
  if complete is not None:
    cfg = complete(cfg)
    cfg.lock()
    for override in deferred:
      apply_override(cfg, override)
  return validate(cfg)


def _check_overrides(overrides) -> None:
  """One override given as a string would be read as overrides of one character each."""
  if isinstance(overrides, (str, bytes)):
    raise ConfigError(f'overrides={overrides!r} is one string; give a list of overrides, '
                      f'e.g. [{overrides!r}]')


def _split_spec(spec: str) -> tuple[str, str | None]:
  # The preset is after the last ':' so paths may contain colons; `x.py` alone has none.
  if spec.endswith('.py') or ':' not in spec:
    return spec, None
  path, arg = spec.rsplit(':', 1)
  return path, arg or None


def _resolve_path(path: str) -> Path:
  p = Path(path).expanduser()
  candidates = [p]
  if not p.is_absolute() and (_REPO_ROOT / 'configs').is_dir():
    candidates.append(_REPO_ROOT / p)
    if p.parts[:1] != ('configs',):
      candidates.append(_REPO_ROOT / 'configs' / p)
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  places = dict.fromkeys(str((Path.cwd() / c).parent) for c in candidates)
  raise ConfigError(f'config file {path!r} not found (looked in {", ".join(places)})')


def _import_file(path: Path):
  """The config or sweep file as a module, compiled from its text each time: Python's
  bytecode cache would serve the old code of a file rewritten within the same second at
  the same size (a sweep file a script edits), and it litters the configs' folders."""
  name = '_jaxarch_config_' + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
  if path.suffix != '.py':
    raise ConfigError(f'config file {str(path)!r} is neither a Python file defining '
                      "get_config(arg) nor a run's saved config.json")
  module = types.ModuleType(name)
  module.__file__ = str(path)
  sys.modules[name] = module  # dataclasses and pickling look modules up by name
  try:
    exec(compile(path.read_bytes(), str(path), 'exec'), module.__dict__)  # pylint: disable=exec-used
  except SyntaxError as e:
    raise ConfigError(f'config error: {path}:{e.lineno}: {e.msg}'
                      + (f' ({e.text.strip()})' if e.text else '')) from None
  except Exception as e:  # pylint: disable=broad-except
    raise _error_in(path, e, 'importing it') from None
  return module


def call_config_function(module, function, arg: str | None):
  """`function(arg)` (or `function()`) of a config or sweep file; what it raises is one
  line naming the file and line ('config error: ...' ValueErrors keep their words)."""
  try:
    return function(arg) if arg else function()
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, ValueError) and str(e).startswith('config error: '):
      raise ConfigError(str(e)) from None  # how config files report a bad preset
    call = f'{function.__name__}({arg!r})' if arg else f'{function.__name__}()'
    raise _error_in(Path(module.__file__), e, call) from None


def _error_in(path: Path, error: Exception, what: str) -> ConfigError:
  """`error`, raised by user code in `path`, as one line at its innermost line there."""
  lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
           if Path(f.filename) == path]
  where = f'{path}:{lines[-1]}' if lines else str(path)
  return ConfigError(f'config error: {where}: {what} raised {type(error).__name__}: '
                     f'{str(error).splitlines()[0] if str(error) else ""}')


# Overrides.


def _completed_later(cfg: ConfigDict, override: str) -> bool:
  """Whether `override` sets a key that `MODEL_FROM` may add: one of the model section
  itself, or of a model subsection the config file lacks (not a typo in one it has)."""
  key = override.removeprefix('--').removeprefix('config.').partition('=')[0].split('.')
  return key[0] == 'model' and (len(key) == 2 or key[1] not in cfg.get('model', {}))


def apply_override(cfg: ConfigDict, override: str) -> None:
  """Sets one `--config.a.b=v`, `config.a.b=v` or `a.b=v`, parsing `v` by the field's type."""
  text = override.removeprefix('--').removeprefix('config.')
  key, sep, raw = text.partition('=')
  key = key.strip()  # 'train.steps = 5', written in Python
  if not sep or not key:
    raise ConfigError(f'override {override!r} must look like --config.section.key=value')
  parent, name = _find_parent(cfg, key)
  field_type = parent.get_type(name)
  if field_type is ConfigDict:
    raise ConfigError(f'{key} is a section; override its keys, e.g. '
                      f'{key}.{next(iter(parent[name]), "name")}=...')
  field = dict(parent.items(preserve_field_references=True))[name]
  nullable = parent[name] is None or isinstance(field, ml_collections.FieldReference)
  value = _parse(key, raw.strip(), field_type, nullable)
  try:
    parent[name] = value
  except TypeError as e:
    raise ConfigError(f'{key}={raw!r} must be {_article(field_type)}') from e


def _find_parent(cfg: ConfigDict, key: str) -> tuple[ConfigDict, str]:
  *sections, name = key.split('.')
  node = cfg
  for section in sections:
    node = node.get(section) if isinstance(node, ConfigDict) else None
  if not isinstance(node, ConfigDict) or name not in node:
    raise UnknownKeyError(_unknown_key_message(cfg, key))
  return node, name


# MaxText's names for keys of ours, which its users type first (`learning_rate=1e-3`);
# matched on the last part of an unknown key.
MAXTEXT_KEYS = {
    'learning_rate': 'train.lr', 'per_device_batch_size': 'train.batch_size',
    'global_batch_size_to_train_on': 'train.batch_size',
    'gradient_accumulation_steps': 'train.grad_accum_steps',
    'gradient_clipping_threshold': 'train.grad_clip', 'adam_b1': 'train.b1',
    'adam_b2': 'train.b2', 'adam_eps': 'train.eps', 'adam_weight_decay': 'train.weight_decay',
    'base_emb_dim': 'model.d_model',
    'emb_dim': 'model.d_model', 'base_num_decoder_layers': 'model.n_layers',
    'num_decoder_layers': 'model.n_layers', 'base_num_query_heads': 'model.n_heads',
    'num_query_heads': 'model.n_heads', 'base_num_kv_heads': 'model.n_kv_heads',
    'num_kv_heads': 'model.n_kv_heads', 'base_mlp_dim': 'model.d_ff', 'mlp_dim': 'model.d_ff',
    'weight_dtype': 'model.param_dtype', 'remat_policy': 'model.remat',
    'logits_via_embedding': 'model.tie_embeddings', 'max_target_length': 'data.seq_len',
    'tokenizer_path': 'data.tokenizer', 'dataset_path': 'data.data_dir',
    'dataset_name': 'data.source', 'checkpoint_period': 'checkpoint.every_steps',
    'eval_interval': 'log.eval_every_steps', 'num_experts': 'model.moe.num_experts',
    'num_experts_per_tok': 'model.moe.top_k',
    **{f'{level}_{axis}_parallelism': f'mesh.{level}.{axis}'
       for level in ('ici', 'dcn') for axis in ('data', 'fsdp', 'tensor', 'expert')},
}
# Names of the families' own releases, which their users bring: whose, and our key.
RELEASE_KEYS = {
    'knn': ("the UltraMem release's", 'model.ultramem.top_k'),
    'mem_knn': ("XLM's product-key memory's", 'model.ultramem.top_k'),
}


def _foreign_name(name: str) -> tuple[str, str] | None:
  """(whose name it is, our key) for another framework's or release's name of a key."""
  if name in MAXTEXT_KEYS:
    return "MaxText's", MAXTEXT_KEYS[name]
  return RELEASE_KEYS.get(name)


def closest_key(cfg: ConfigDict, key: str) -> str | None:
  """The key of `cfg` that `key` was probably meant as: MaxText's name for it, the one key
  ending in it (`steps` -> `train.steps`), or the closest spelling; None if none is close.
  Where a section of `key` is absent (`model.moe` in a dense config) only keys as deep are
  close."""
  keys = list(_all_keys(cfg))
  foreign = _foreign_name(key.split('.')[-1])
  if foreign and foreign[1] in keys:
    return foreign[1]
  ending = [k for k in keys if k.endswith('.' + key)]
  if len(ending) == 1:
    return ending[0]
  if _missing_section(cfg, key)[2]:
    keys = [k for k in keys if k.count('.') == key.count('.')]
  match = difflib.get_close_matches(key, keys, n=1)
  return match[0] if match else None


def _missing_section(cfg: ConfigDict, key: str) -> tuple[ConfigDict, int, bool]:
  """(the deepest section of `key` in `cfg`, its depth, whether a section of key is absent)."""
  *sections, _ = key.split('.')
  node, depth = cfg, 0
  while depth < len(sections) and isinstance(node.get(sections[depth]), ConfigDict):
    node, depth = node[sections[depth]], depth + 1
  return node, depth, depth < len(sections) and sections[depth] not in node


def _unknown_key_message(cfg: ConfigDict, key: str) -> str:
  """Names the closest key, or without one the sections that exist; a section of another
  family's config (model.moe on a dense one), that family's config."""
  parts = key.split('.')
  own = (*FAMILY_SECTIONS, *(kind for kind in BLOCK_CHECKS if kind != 'dense'))
  if (len(parts) > 2 and parts[0] == 'model' and parts[1] in own
      and parts[1] not in cfg.get('model', {})):
    if not (SHIPPED_CONFIGS / f'{parts[1]}.py').is_file():  # a block of the user's own
      return (f'unknown key {key!r}: this config has no model.{parts[1]} section, which '
              f'{parts[1]!r} blocks read; add it in your config file (with c.unlocked(): '
              f'c.model.{parts[1]} = ml_collections.ConfigDict(...))')
    return (f'unknown key {key!r}: model.{parts[1]} belongs to the {parts[1]} family\'s '
            f'config (configs/{parts[1]}.py), and this one is model.family='
            f'{cfg.model.get("family")!r}')
  match = closest_key(cfg, key)
  if match:
    name = key.split('.')[-1]
    whose, ours = _foreign_name(name) or (None, None)
    if ours != match:
      return f'unknown key {key!r} (did you mean {match!r}?)'
    note = ', the global batch in sequences' if name == 'per_device_batch_size' else ''
    return f'unknown key {key!r} ({whose} {name} is {match!r} here{note})'
  *sections, _ = key.split('.')
  node, depth, no_section = _missing_section(cfg, key)
  if not no_section:
    return f'unknown key {key!r}'
  where = '.'.join(sections[:depth]) or 'the config'
  subsections = [name for name in node if isinstance(node[name], ConfigDict)]
  if where == 'train.groups':  # a group is a section of its own: made in a config file
    return (f'unknown key {key!r}: train.groups has no group {sections[depth]!r}'
            + (f' (its groups: {", ".join(subsections)})' if subsections else '')
            + '; a new one is made in a config file (c.train.groups.'
            f'{sections[depth]} = ml_collections.ConfigDict(dict(lr_multiplier=...))), '
            'whose keys --config.train.groups.NAME.KEY then override')
  return (f'unknown key {key!r}: {where} has no section {sections[depth]!r}'
          + (f' (its sections: {", ".join(subsections)})' if subsections else ''))


def _all_keys(cfg: ConfigDict, prefix: str = ''):
  for name in cfg:
    yield prefix + name
    if isinstance(cfg[name], ConfigDict):
      yield from _all_keys(cfg[name], f'{prefix}{name}.')


def _parse(key: str, raw: str, field_type: type, nullable: bool) -> Any:
  """`raw` as a value of `field_type`; `none` clears fields that are None or placeholders."""
  if nullable and raw in ('none', 'None'):
    return None
  try:
    if field_type is bool:
      return {'true': True, 'false': False, '1': True, '0': False}[raw.lower()]
    if field_type is int:
      return int(raw)
    if field_type is float:
      return float(raw)
    if field_type is str:
      return raw
    if field_type in (tuple, list):
      value = ast.literal_eval(raw)
      if not isinstance(value, (tuple, list)):
        raise ValueError(raw)
      return _as_tuples(value) if field_type is tuple else list(value)
    if field_type is type(None):  # a None default takes any literal, else the string
      try:
        return ast.literal_eval(raw)
      except (ValueError, SyntaxError):
        return raw
  except (KeyError, ValueError, SyntaxError) as e:
    raise ConfigError(f'{key}={raw!r} must be {_article(field_type)}') from e
  raise ConfigError(f'{key} has type {field_type.__name__}, which overrides cannot set')


def _as_tuples(value):
  # Nested sequences such as mesh.rules stay tuples however they were written.
  return tuple(_as_tuples(v) for v in value) if isinstance(value, (tuple, list)) else value


def _article(field_type: type) -> str:
  return {
      bool: 'a bool (true/false/1/0)',
      int: 'an int',
      float: 'a float',
      str: 'a str',
      tuple: "a tuple, written as a Python literal such as ('a', 'b')",
      list: "a list, written as a Python literal such as ['a', 'b']",
  }.get(field_type, f'a {field_type.__name__}')


# Validation.

Check = Callable[[ConfigDict], None]


def _check_heads(prefix: str, section: ConfigDict, hint: str = '') -> None:
  """`<prefix>.d_model` split over the heads (unless head_dim is set), and query heads
  grouped over KV heads."""
  if section.get('head_dim') is None and section.d_model % section.n_heads:
    raise ConfigError(f'{prefix}.d_model={section.d_model} must be divisible by '
                      f'{prefix}.n_heads={section.n_heads}{hint}')
  if section.n_heads % section.n_kv_heads:
    raise ConfigError(f'{prefix}.n_heads={section.n_heads} must be divisible by '
                      f'{prefix}.n_kv_heads={section.n_kv_heads} (grouped-query attention)')
  if section.get('head_dim') is not None:  # set: name it, not d_model / n_heads
    if section.head_dim % 2:
      raise ConfigError(f'{prefix}.head_dim={section.head_dim} must be even for rotary '
                        'position embeddings')
  elif (section.d_model // section.n_heads) % 2:
    raise ConfigError(f'{prefix}: the head dimension {section.d_model // section.n_heads} '
                      f'(d_model={section.d_model} / n_heads={section.n_heads}) must be even '
                      'for rotary position embeddings; change the heads or the width')


@dataclasses.dataclass(frozen=True)
class Numbering:
  """How one sequence of a stack's layers (its blocks, or its side layers) is laid out:
  `count` layers, of which `start` to `end - 1` are scanned, layer `start + r·period + j`
  held as repeat r of the stacked layer j; the others unrolled, each under its own index.
  Unscanned: no repeats."""
  count: int
  start: int = 0
  period: int = 0
  repeats: int = 0

  @property
  def end(self) -> int:
    return self.start + self.period * self.repeats

  def slot(self, layer: int) -> tuple[int, int] | None:
    """(stacked layer j, repeat) of `layer`; None where it runs unrolled."""
    if not self.start <= layer < self.end:
      return None
    return (layer - self.start) % self.period, (layer - self.start) // self.period

  def layer(self, j: int, repeat: int) -> int:
    """The index of repeat `repeat` of the stacked layer `j`."""
    return self.start + repeat * self.period + j

  def unrolled(self) -> list[int]:
    return [i for i in range(self.count) if self.slot(i) is None]


@dataclasses.dataclass(frozen=True)
class ScanLayout:
  """Where a stack's layers run (`model.scan_layers`): the blocks by `blocks`, the side
  layers placed between them (`<kind>.placement`) by `side_layers`, whose repeats are the
  blocks': a unit of the scan is `blocks.period` blocks with the side layers that read and
  write inside them. Unscanned, both have no repeats."""
  blocks: Numbering
  side_layers: Numbering

  @property
  def repeats(self) -> int:
    return self.blocks.repeats


def placements(model: ConfigDict) -> list[tuple[str, int, int]]:
  """(kind, read, write) of every side layer that `model` places (`model.<kind>.placement`),
  the kinds in the order their code registered them (`SIDE_LAYER_KINDS`; others last, by
  name), each kind's pairs in order: the side layers' indices."""
  sections = [(kind, section) for kind, section in model.items()
              if isinstance(section, ConfigDict) and 'placement' in section]
  registered = lambda kind: (SIDE_LAYER_KINDS.index(kind) if kind in SIDE_LAYER_KINDS
                             else len(SIDE_LAYER_KINDS))
  placed = []
  for kind, section in sorted(sections, key=lambda item: registered(item[0])):
    for i, pair in enumerate(section.placement or ()):
      if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
          isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pair)):
        raise ConfigError(f'model.{kind}.placement[{i}]={pair!r} must be (read, write), two '
                          'block indices, e.g. placement=((1, 2),)')
      placed.append((kind, int(pair[0]), int(pair[1])))
  return placed


def scan_layout(model: ConfigDict, where: str = 'model') -> ScanLayout:
  """How the `model` section's stack (or one shaped like it at `where`) runs. Scanned, its
  blocks repeat with the block and attention patterns' common period or a multiple of it,
  from a first block on, as often as the side layers allow: each unit of the scan must
  hold the same side layers at the same places, none reading in one unit and writing in
  another (UltraMem 680m's (2, 5), (6, 9), ..., (18, 21) in 24 blocks scan as 5 units of 4
  blocks from block 2, each with its memory layer; blocks 0, 1, 22 and 23 run unrolled).
  Of the layouts that fit, the one that leaves the fewest blocks to trace wins (the
  program holds one unit and the unrolled blocks); ties go to the earliest start."""
  n, placed = model.n_layers, placements(model)
  if not model.get('scan_layers'):
    return ScanLayout(Numbering(n), Numbering(len(placed)))
  patterns = {'model.block_pattern': len(tuple(model.block_pattern)),
              'model.attention_pattern': len(tuple(model.get('attention_pattern', ('local',))))}
  period = math.lcm(*patterns.values())
  if n < period:
    which = ' and '.join(key for key, size in patterns.items() if size > 1)
    raise ConfigError(f'model.scan_layers stacks the blocks by the period of {which} '
                      f'({period} blocks), more than {where}.n_layers={n}: no period '
                      'repeats; set model.scan_layers=False')
  pairs = [(read, write) for _, read, write in placed]
  if not pairs:  # the search's answer, at once
    return ScanLayout(Numbering(n, 0, period, n // period), Numbering(0))
  fits = [layout for unit in range(period, n + 1, period) for start in range(n - unit + 1)
          if (layout := _scan_from(pairs, n, start, unit)) is not None]
  if not fits:
    raise ConfigError(f'model.scan_layers: no unit of the scan fits the side layers '
                      f'{where}.{placed[0][0]}.placement puts between the blocks (a unit of '
                      f'a multiple of {period} blocks, holding the same side layers at the '
                      'same places, each reading and writing inside one unit); place them so, '
                      'or set model.scan_layers=False')
  traced = lambda blocks: (n - blocks.period * (blocks.repeats - 1), blocks.start, blocks.period)
  return min(fits, key=lambda layout: traced(layout.blocks))


def _scan_from(pairs: list[tuple[int, int]], n: int, start: int, unit: int) -> ScanLayout | None:
  """The layout scanning units of `unit` blocks from block `start`, as many as fit, with
  the side layers (`pairs`: (read, write)) they hold; None if not one unit fits."""
  for repeats in range((n - start) // unit, 0, -1):
    end = start + unit * repeats
    inside = [i for i, (read, write) in enumerate(pairs) if write >= start and read < end]
    sides = len(inside) // repeats
    if inside and (len(inside) % repeats
                   or inside != list(range(inside[0], inside[0] + len(inside)))):
      continue  # the side layers of the units must follow each other, unit by unit
    relative = [(pairs[i][0] - start - unit * (k // sides), pairs[i][1] - start - unit * (
        k // sides)) for k, i in enumerate(inside)] if sides else []
    if all(0 <= read <= write < unit for read, write in relative) and all(
        relative[k] == relative[k % sides] for k in range(len(relative))):
      first = inside[0] if inside else 0
      return ScanLayout(Numbering(n, start, unit, repeats),
                        Numbering(len(pairs), first, sides, repeats if sides else 0))
  return None


def _check_transformer(cfg: ConfigDict) -> None:
  """The decoder-stack shape that every family builds on."""
  m = cfg.model
  if _get(cfg, 'model.head_dim') is not None:
    _positive_int(cfg, 'model.head_dim')
  _check_heads('model', m, hint=' (or set model.head_dim)')
  if 'data' in cfg and cfg.data.seq_len > m.max_len:
    raise ConfigError(f'data.seq_len={cfg.data.seq_len} must be <= model.max_len={m.max_len}')
  _choice(cfg, 'model.dtype', DTYPES)
  _choice(cfg, 'model.param_dtype', DTYPES)
  _choice(cfg, 'model.remat', REMAT)
  if _choice(cfg, 'model.scan_layers', (True, False)):
    scan_layout(m)
  _choice(cfg, 'model.attention_impl', ATTENTION_IMPLS)
  _choice(cfg, 'model.tie_embeddings', (True, False))

# UltraMem (`model.ultramem`, jaxarch/layers/ultramem.py).

_ULTRAMEM_MAX_VIRTUAL = 1 << 30  # int32 arithmetic of the IVE permutation


def default_top_m(top_k: int, keys_per_side: int) -> int:
  return min(top_k, keys_per_side)


def _finite_at_least(value, low: float) -> bool:
  """Whether `value` is a number (not a bool) in [low, inf): NaN and inf are not."""
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, bool) and low <= value < math.inf)


def _isqrt_exact(x: int) -> int | None:
  r = math.isqrt(x) if x >= 0 else -1
  return r if r >= 0 and r * r == x else None


def check_ultramem(num_values, top_k, value_dim, key_dim, tucker_rank, num_cores,
                   ive_expansion, num_heads, top_m, aux_loss_weight, aux_tau, query_conv,
                   heads_per_query=1, prefix='model.ultramem'):
  """The UltraMem layer's shape rules, shared by the layer and `validate`; returns top_m."""
  def fail(key, value, what):
    raise ConfigError(f'config error: {prefix}.{key}={value!r} {what}')

  for key, value in (('num_values', num_values), ('top_k', top_k), ('value_dim', value_dim),
                     ('key_dim', key_dim), ('tucker_rank', tucker_rank),
                     ('num_cores', num_cores), ('ive_expansion', ive_expansion),
                     ('num_heads', num_heads)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      fail(key, value, 'must be an integer >= 1')
  n = _isqrt_exact(num_values)
  if n is None:
    near = round(math.sqrt(num_values)) ** 2
    fail('num_values', num_values, f'must be a perfect square (e.g. {near})')
  s = _isqrt_exact(ive_expansion)
  if s is None:
    fail('ive_expansion', ive_expansion,
         'must be a perfect square (1, 4, 9, ...): each key side grows by its square root')
  if num_values * ive_expansion >= _ULTRAMEM_MAX_VIRTUAL:
    fail('num_values', num_values, f'times ive_expansion={ive_expansion} must be < 2^30')
  if value_dim % num_cores:
    fail('value_dim', value_dim, f'must be divisible by num_cores={num_cores}')
  side = n * s
  if top_m is not None and not 1 <= top_m <= side:
    fail('top_m', top_m, f'must be in [1, {side}] (keys per side = sqrt(num_values · '
         'ive_expansion))')
  m = default_top_m(top_k, side) if top_m is None else top_m
  if top_k > m * m:
    fail('top_k', top_k, f'must be <= top_m² = {m * m} (the candidate grid)')
  if top_k > num_values:
    fail('top_k', top_k, f'must be <= num_values={num_values}')
  for key, value in (('aux_loss_weight', aux_loss_weight), ('aux_tau', aux_tau)):
    if not _finite_at_least(value, 0):  # NaN and inf passed `< 0`: every loss NaN
      fail(key, value, 'must be a number >= 0 and finite')
  if not isinstance(query_conv, (int, np.integer)) or query_conv < 0:
    fail('query_conv', query_conv, 'must be an integer >= 0 (0 = no convolution)')
  if (not isinstance(heads_per_query, (int, np.integer)) or heads_per_query < 1
      or num_heads % heads_per_query):
    fail('heads_per_query', heads_per_query,
         f'must be an integer >= 1 that divides num_heads={num_heads}')
  return m


def check_ultramem_config(cfg, prefix: str = 'model.ultramem') -> None:
  """Raises a one-line `ConfigError` naming the first inconsistent `model.ultramem` key."""
  get = cfg.get
  check_ultramem(get('num_values'), get('top_k'), get('value_dim'), get('key_dim'),
         get('tucker_rank', 2), get('num_cores', 2), get('ive_expansion', 1),
         get('num_heads', 1), get('top_m'), get('aux_loss_weight', 0.0),
         get('aux_tau', 0.15), get('query_conv', 0), get('heads_per_query', 1),
         prefix=prefix)



# Every key the memory layer is built from: check_ultramem_config has defaults for some,
# the model build has none, so a saved config lacking one must fail here, not there.
ULTRAMEM_KEYS = ('num_values', 'top_k', 'value_dim', 'key_dim', 'tucker_rank', 'num_cores',
                 'ive_expansion', 'num_heads', 'top_m', 'aux_loss_weight', 'aux_tau',
                 'query_conv', 'heads_per_query')


def _check_ultramem(cfg: ConfigDict) -> None:
  """model.ultramem: the layer's shape rules, and a placement inside the stack."""
  for key in ULTRAMEM_KEYS:
    _get(cfg, f'model.ultramem.{key}')
  check_ultramem_config(_get(cfg, 'model.ultramem'))
  _choice(cfg, 'model.ultramem.rank_by_magnitude', (True, False))
  _choice(cfg, 'model.ultramem.lookup_impl', LOOKUP_IMPLS)
  _choice(cfg, 'model.ultramem.lookup_scatter', LOOKUP_SCATTERS)
  _choice(cfg, 'model.ultramem.table_split', TABLE_SPLITS)
  _choice(cfg, 'model.ultramem.permutation', ULTRAMEM_PERMUTATIONS)
  if _number(cfg, 'model.ultramem.top_k_chunk', int) < 0:
    raise ConfigError(f'model.ultramem.top_k_chunk={cfg.model.ultramem.top_k_chunk} must be 0 '
                      '(one top-k per ranking) or the chunk length, e.g. 1024')
  placement = _get(cfg, 'model.ultramem.placement')
  if not placement:
    raise ConfigError('model.ultramem.placement must hold at least one (read, write) pair')
  for i, pair in enumerate(placement):
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            and 0 <= pair[0] <= pair[1] < cfg.model.n_layers):
      raise ConfigError(f'model.ultramem.placement[{i}]={pair!r} must be (read, write) with '
                        f'0 <= read <= write < model.n_layers={cfg.model.n_layers}, e.g. '
                        'placement=((1, 2),)')
  if (cfg.model.ultramem.permutation == 'per_layer' and cfg.model.get('scan_layers')
      and scan_layout(cfg.model).side_layers.repeats > 1):
    raise ConfigError("model.ultramem.permutation='per_layer' (the runs of jaxarch before "
                      '2026-12-07) draws each memory layer its own IVE permutation, so the '
                      'memory layers do not stack into a scan: keep model.scan_layers=False '
                      "for this run (a new run's 'shared' permutation scans)")


def _check_moe(cfg: ConfigDict) -> None:
  """model.moe: expert counts, paths and balancing; experts must split over `expert`."""
  e = _positive_int(cfg, 'model.moe.num_experts')
  k = _positive_int(cfg, 'model.moe.top_k')
  if k > e:
    raise ConfigError(f'model.moe.top_k={k} must be <= model.moe.num_experts={e}')
  _choice(cfg, 'model.moe.renormalize', (True, False))  # the build reads it at any top_k
  if k == 1 and cfg.model.moe.renormalize:
    raise ConfigError('model.moe.renormalize=True with model.moe.top_k=1 makes every gate '
                      'weight 1, so the router learns only from the balance loss; set '
                      'model.moe.renormalize=False (the Switch Transformer top-1 form)')
  _positive_int(cfg, 'model.moe.expert_d_ff')
  shared = _number(cfg, 'model.moe.num_shared_experts', int)
  if shared < 0:
    raise ConfigError(f'model.moe.num_shared_experts={shared} must be >= 0')
  _choice(cfg, 'model.moe.gate', MOE_GATES)
  _choice(cfg, 'model.moe.matmul_impl', MOE_MATMUL_IMPLS)
  if (_choice(cfg, 'model.moe.ep_exchange', MOE_EP_EXCHANGES).startswith('ragged')
      and _get(cfg, 'model.moe.ep_capacity_factor') is not None):
    raise ConfigError(f'model.moe.ep_exchange={cfg.model.moe.ep_exchange!r} sends every row '
                      'and never drops, and model.moe.ep_capacity_factor bounds padded '
                      "buffers; set ep_exchange='padded' or ep_capacity_factor=None")
  if 'mosaic' in cfg.model.moe.matmul_impl and cfg.model.dtype == 'float32':
    raise ConfigError(f'model.moe.matmul_impl={cfg.model.moe.matmul_impl!r}: the Mosaic GPU '
                      'kernels multiply bfloat16 or float16 rows, and model.dtype=float32; '
                      "set model.dtype=bfloat16 or model.moe.matmul_impl='pallas'")
  _kernel_tiling(cfg, 'model.moe.kernel_tiling')
  _mosaic_tiling(cfg, 'model.moe.mosaic_tiling')
  if (_choice(cfg, 'model.moe.mosaic_weight_grad', MOE_WEIGHT_GRADS) == 'mosaic'
      and cfg.model.moe.matmul_impl == 'interpret_mosaic'):
    raise ConfigError("model.moe.mosaic_weight_grad='mosaic' runs on a GPU only (no "
                      "interpreter runs it): with model.moe.matmul_impl='interpret_mosaic' "
                      "set it to 'triton'")
  # NaN and inf passed `<= 0` and `< 0`: the capacities raised deep in the layer, the
  # weights made every loss NaN.
  for key in ('model.moe.capacity_factor', 'model.moe.ep_capacity_factor'):
    if _get(cfg, key) is not None and not 0 < _number(cfg, key) < math.inf:
      raise ConfigError(f'{key}={_get(cfg, key)!r} must be > 0 and finite (or None: '
                        'dropless)')
  for key in ('model.moe.aux_loss_weight', 'model.moe.z_loss_weight',
              'model.moe.bias_update_rate'):
    if not 0 <= _number(cfg, key) < math.inf:
      raise ConfigError(f'{key}={_get(cfg, key)!r} must be >= 0 and finite')
  if 'mesh' not in cfg:  # a model alone (`check_model`)
    return
  ici, dcn = _mesh_sizes(cfg)  # checked first: a hand-edited config.json may hold anything
  expert = ici['expert'] * dcn['expert']
  if expert > 1 and e % expert:
    raise ConfigError(f'model.moe.num_experts={e} must be divisible by the expert mesh axis '
                      f'(mesh.ici.expert x mesh.dcn.expert = {expert})')


def _check_moe_family(cfg: ConfigDict) -> None:
  pattern = tuple(_get(cfg, 'model.block_pattern'))
  if 'moe' not in pattern:
    raise ConfigError(f"model.block_pattern={pattern!r} holds no 'moe' block, which "
                      "model.family='moe' needs (e.g. ('moe',) or ('dense', 'moe'))")


def _check_megabyte(cfg: ConfigDict) -> None:
  """model.megabyte: patches that tile the global width and the rows; a local model."""
  p = _positive_int(cfg, 'model.megabyte.patch_size')
  if p < 2:
    raise ConfigError(f'model.megabyte.patch_size={p} must be >= 2')
  if cfg.model.d_model % p:
    raise ConfigError(f'model.d_model={cfg.model.d_model} (the global width, patch_size x '
                      f'byte embedding) must be divisible by model.megabyte.patch_size={p}')
  if not cfg.model.tie_embeddings:
    raise ConfigError('model.tie_embeddings=False: a MEGABYTE head is always tied to its '
                      'local byte embedding; set it True')
  if 'data' not in cfg:  # a model alone (`check_model`)
    return
  if cfg.data.seq_len % p:
    raise ConfigError(f'data.seq_len={cfg.data.seq_len} must be a multiple of '
                      f'model.megabyte.patch_size={p}')
  align = _number(cfg, 'data.pack_align', int)
  if align % p:
    raise ConfigError(f'data.pack_align={align} must be a multiple of model.megabyte.'
                      f'patch_size={p}, so that every document starts on a patch boundary')
  if _get(cfg, 'data.tokenizer') != 'bytes':
    raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r}: MEGABYTE models bytes; use 'bytes'")
  if not cfg.data.get('add_bos', True):
    raise ConfigError("data.add_bos=False: MEGABYTE never reads a document's first input "
                      '(the pad patch stands in before it), which without a BOS is its first '
                      'byte; keep data.add_bos=True')
  for key in ('d_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff'):
    _positive_int(cfg, f'model.megabyte.local.{key}')
  _check_heads('model.megabyte.local', cfg.model.megabyte.local)
  _choice(cfg, 'model.megabyte.local.attention_impl', ATTENTION_IMPLS)
  if cfg.model.get('scan_layers'):  # the local model scans too, with the attention pattern
    scan_layout(ConfigDict({'n_layers': cfg.model.megabyte.local.n_layers, 'scan_layers': True,
                            'block_pattern': ('dense',),
                            'attention_pattern': cfg.model.get('attention_pattern',
                                                               ('local',))}),
                'model.megabyte.local')
  if 'ultramem' in cfg.model:  # memory layers in the global model
    _check_ultramem(cfg)


# BiTA (`model.bita`, jaxarch/models/bita.py): a frozen base run plus prompt and mask tokens.

BITA_BASES = ('dense', 'moe', 'ultramem')


def bita_model(base: ConfigDict, bita: ConfigDict | dict) -> ConfigDict:
  """The model section of a BiTA model over a base model's section `base`."""
  cfg = ConfigDict(base.to_dict())
  cfg.family = 'bita'
  cfg.bita = ConfigDict(dict(bita))
  cfg.bita.base_family = base.family
  return cfg


def bita_base_refusal(base_model: ConfigDict) -> str | None:
  """Why BiTA cannot wrap a run's model section, or None: BiTA's config refuses that base,
  and `jaxarch distill` says so before generating continuations for it (hours)."""
  if base_model.family not in BITA_BASES:
    return (f"it holds a {base_model.family!r} model, and BiTA wraps "
            f"{', '.join(BITA_BASES)} models")
  if (window := base_model.get('sliding_window')) is not None:
    return (f'it attends through a sliding window (model.sliding_window={window}), which BiTA '
            'cannot train over (its draft trees attend without one)')
  return None


def _bita_from_base_run(cfg: ConfigDict) -> ConfigDict:
  """configs/bita.py's `model.bita` section + the base run's model section and tokenizer."""
  workdir = _get(cfg, 'model.bita.base_workdir')
  if not workdir:
    raise ConfigError('model.bita.base_workdir is required: the workdir of a trained '
                      f'{", ".join(BITA_BASES)} run (--config.model.bita.base_workdir=DIR)')
  saved = Path(workdir).expanduser() / 'config.json'
  if not saved.is_file():
    raise ConfigError(f'model.bita.base_workdir={workdir!r} has no config.json: is it a '
                      'jaxarch workdir?')
  base = load_json(saved)
  if why := bita_base_refusal(base.model):
    raise ConfigError(f'model.bita.base_workdir={workdir!r}: {why}')
  _check_distilled_from(_get(cfg, 'data.source'), workdir)
  tree = cfg.to_dict()
  tree['model'] = bita_model(base.model, cfg.model.bita).to_dict()
  if tree['data']['tokenizer'] is None:
    tree['data']['tokenizer'] = base.data.tokenizer
  elif tree['data']['tokenizer'] != base.data.tokenizer:
    raise ConfigError(f'data.tokenizer={tree["data"]["tokenizer"]!r} differs from the base '
                      f'run\'s {base.data.tokenizer!r}; leave it unset')
  # BiTA's prompts start as the base run's documents did (an imported Llama's `<s>`, an
  # imported Qwen's no BOS at all).
  for key in ('bos_id', 'add_bos'):
    value = base.data.get(key)
    if tree['data'].get(key) is None:
      tree['data'][key] = value
    elif tree['data'][key] != value:
      raise ConfigError(f'data.{key}={tree["data"][key]!r} differs from the base run\'s '
                        f'{value!r}; leave it unset')
  # And its generation stops where the base's does (an imported instruct model's end of turn).
  stops = tuple(base.data.get('stop_ids', ()))
  if not tree['data'].get('stop_ids'):
    tree['data']['stop_ids'] = stops
  elif tuple(tree['data']['stop_ids']) != stops:
    raise ConfigError(f'data.stop_ids={tuple(tree["data"]["stop_ids"])!r} differs from the '
                      f'base run\'s {stops!r}; leave it unset')
  # And it chats as the base does (`generate --chat`: an imported instruct model's template).
  if tree['data'].get('chat_template') is None:
    tree['data']['chat_template'] = base.data.get('chat_template')
  return ConfigDict(tree)


def distill_summary(source) -> dict:
  """The `distill.json` that `jaxarch distill` wrote beside a 'distilled:<dir>' source's
  sequences, or {} (another source, or sequences written by hand without one)."""
  if not (isinstance(source, str) and source.startswith('distilled:')):
    return {}
  try:
    summary = json.loads((Path(source[len('distilled:'):]).expanduser() /
                          'distill.json').read_text())
  except (OSError, ValueError):  # missing, or not JSON (or not UTF-8)
    return {}
  return summary if isinstance(summary, dict) else {}


def _check_distilled_from(source, base_workdir: str) -> None:
  """BiTA's masks learn what its own base generates: continuations distilled from another
  run (its `distill.json` says which) would teach drafts that this base rejects, which
  trains without a sign of it and decodes no faster."""
  distilled_from = distill_summary(source).get('base_workdir')
  if distilled_from is None:
    return  # written by hand, without a summary: nothing to check against
  distilled_from = Path(distilled_from).expanduser()
  # A base run copied or moved since (to shared storage) leaves no other run at the path.
  if distilled_from.exists() and distilled_from.resolve() != Path(
      base_workdir).expanduser().resolve():
    raise ConfigError(f'data.source={source!r} holds the continuations of {distilled_from} '
                      f'(its distill.json), not of model.bita.base_workdir={base_workdir!r}; '
                      f'distill the base: jaxarch distill --workdir={base_workdir} --out=NEW_DIR '
                      "(or, if that run is a copy of this base, set distill.json's base_workdir)")


def _check_bita(cfg: ConfigDict) -> None:
  """model.bita over a base model section checked as its own family; distilled rows."""
  base = _choice(cfg, 'model.bita.base_family', BITA_BASES)
  for check in FAMILY_CHECKS[base]:
    check(cfg)
  _positive_int(cfg, 'model.bita.num_prompt_tokens')
  masks = _positive_int(cfg, 'model.bita.num_mask_tokens')
  tree = _get(cfg, 'model.bita.draft_tree')
  if not (isinstance(tree, (tuple, list)) and tree and
          all(isinstance(w, int) and w >= 1 for w in tree)):
    raise ConfigError(f'model.bita.draft_tree={tree!r} must be a non-empty tuple of '
                      'positive ints (candidates per level)')
  if len(tree) > masks:
    raise ConfigError(f'model.bita.draft_tree={tuple(tree)!r} has {len(tree)} levels; '
                      f'model.bita.num_mask_tokens={masks} gives one mask token per level')
  if len(tree) < masks:  # the masks past the tree would train and never draft
    raise ConfigError(f'model.bita.draft_tree={tuple(tree)!r} has {len(tree)} levels for '
                      f'model.bita.num_mask_tokens={masks}; give each mask a level, e.g. '
                      f'model.bita.draft_tree={tuple(max(5 - m, 1) for m in range(masks))!r} '
                      '(a decode may still use fewer: Generator(...)(..., draft_tree=...))')
  groups = _number(cfg, 'model.bita.train_groups', int)
  if groups < 0:
    raise ConfigError(f'model.bita.train_groups={groups} must be >= 0 (0: a mask group '
                      'after every token)')
  if not 0 < _number(cfg, 'model.bita.init_std') < math.inf:
    raise ConfigError(f'model.bita.init_std={cfg.model.bita.init_std} must be > 0 and finite')
  source = _get(cfg, 'data.source') if 'data' in cfg else 'distilled:'
  if not (isinstance(source, str) and source.startswith('distilled:')):
    raise ConfigError(f'data.source={source!r}: BiTA trains on the base model\'s own '
                      "continuations, 'distilled:<dir>' written by `jaxarch distill "
                      "--workdir=BASE --out=DIR` (one sequence per row, not packed); "
                      "`jaxarch bench`, which reads no data, takes any 'distilled:<dir>'")


# model.family -> a function that completes a config whose model section is defined
# elsewhere; overrides of model keys the config file lacks are applied after it.
MODEL_FROM: dict[str, Callable[[ConfigDict], ConfigDict]] = {
    'bita': _bita_from_base_run,
}

# Families whose model has a section of their own (model.<family>).
FAMILY_SECTIONS = ('ultramem', 'megabyte', 'bita')

# model.family -> checks of the model it builds; the keys are the families that exist.
# A family adds itself with the checks of its own section.
FAMILY_CHECKS: dict[str, tuple[Check, ...]] = {
    'dense': (_check_transformer,),
    'ultramem': (_check_transformer, _check_ultramem),
    'moe': (_check_transformer, _check_moe_family),
    'megabyte': (_check_transformer, _check_megabyte),
    'bita': (_check_bita,),
}

# Side-layer kinds (`model.<kind>.placement`) in the order their code registered them
# (`models.register_side_layer`): the order of the side layers' indices (`placements`).
SIDE_LAYER_KINDS: list[str] = []

# Block kind in model.block_pattern -> checks of its section (e.g. 'moe': (_check_moe,)
# for model.moe), run whenever the pattern uses the block, whatever the family.
BLOCK_CHECKS: dict[str, tuple[Check, ...]] = {
    'dense': (),
    'moe': (_check_moe,),
}


# How a family or block of the user's own becomes known (README, Extending jaxarch).
OWN_CODE = (' (a {0} of your own is registered by jaxarch.models.{1} in a module imported '
             "first: in Python by you, or of installed packages' by "
             "jaxarch.plugins.load_plugins(); for the jaxarch command by a 'jaxarch.plugins' "
             'entry point of an installed package)')


def validate(cfg: ConfigDict, num_devices: int | None = None) -> ConfigDict:
  """Raises ConfigError on the first inconsistency; with `num_devices`, checks the mesh too."""
  _check_completed(cfg)
  for key in POSITIVE_INTS:
    _positive_int(cfg, key)
  _check_model(cfg)
  _check_train(cfg)
  _check_data(cfg)
  _check_mesh(cfg, num_devices)
  return cfg


# The sections of a run's config besides `model`, which `check_model` has not.
_OTHER_SECTIONS = ('data', 'train', 'mesh', 'log', 'checkpoint', 'launch')


def check_model(model: ConfigDict) -> None:
  """`validate`'s checks of a model section alone, which `jaxarch.models.build` runs: a
  model config changed after `load`, or written by hand, fails in one line rather than
  deep inside a layer. What needs the other sections (data.seq_len <= model.max_len, the
  experts over the mesh's expert axis) is left to `validate`, as are the keys of a
  registered check that reads them."""
  cfg = ConfigDict({'model': model}, convert_dict=False)
  _check_completed(cfg)
  for key in POSITIVE_INTS:
    if key.startswith('model.'):
      _positive_int(cfg, key)
  try:
    _check_model(cfg)
  except MissingKeyError as e:
    if e.key.startswith('model.'):
      raise
  except (AttributeError, KeyError) as e:  # a registered check read cfg.data or cfg.mesh
    if not any(f"'{section}'" in str(e) for section in _OTHER_SECTIONS):
      raise


def _check_model(cfg: ConfigDict) -> None:
  """The model section's checks; those of its keys that relate it to another section run
  when that section is there (`check_model` checks a model alone)."""
  family = _get(cfg, 'model.family')
  if family not in FAMILY_CHECKS:
    raise ConfigError(f'model.family={family!r} must be one of {", ".join(FAMILY_CHECKS)}'
                      f'{OWN_CODE.format("family", "register_family")}')
  if family in FAMILY_SECTIONS and not isinstance(cfg.model.get(family), ConfigDict):
    raise ConfigError(f'model.family={family!r} needs its settings (model.{family}), which '
                      f'this config lacks; start from a config that has them '
                      f'(--config=configs/{family}.py:<preset>)')
  pattern = _get(cfg, 'model.block_pattern')
  if not isinstance(pattern, (tuple, list)) or not pattern:
    raise ConfigError(f'model.block_pattern={pattern!r} must be a non-empty tuple of '
                      f'block kinds from {", ".join(BLOCK_CHECKS)}')
  for i, block in enumerate(pattern):
    if block not in BLOCK_CHECKS:
      raise ConfigError(f'model.block_pattern[{i}]={block!r} must be one of '
                        f'{", ".join(BLOCK_CHECKS)}'
                        f'{OWN_CODE.format("block", "register_block")}')
  checks = list(FAMILY_CHECKS[family])
  for block in pattern:
    if BLOCK_CHECKS[block] and not isinstance(cfg.model.get(block), ConfigDict):
      start = (f'configs/megabyte.py:tiny_{block}' if family == 'megabyte'
               else f'configs/{block}.py:<preset>')
      advice = (f'start from a config that has them (--config={start})'
                if (SHIPPED_CONFIGS / f'{block}.py').is_file() else
                f'add them in your config file (with c.unlocked(): c.model.{block} = '
                'ml_collections.ConfigDict(...))')
      raise ConfigError(f'model.block_pattern={tuple(pattern)!r} has {block!r} blocks, whose '
                        f'settings (model.{block}) this config lacks; {advice}')
    checks += BLOCK_CHECKS[block]
  for check in dict.fromkeys(checks):  # each once, in order
    check(cfg)
  for key in ('model.init_std', 'model.rope_theta'):
    if not 0 < _number(cfg, key) < math.inf:
      raise ConfigError(f'{key}={_get(cfg, key)} must be > 0 and finite')
  _check_rope_scaling(cfg)
  if not 0 <= _number(cfg, 'model.norm_eps') < math.inf:
    raise ConfigError(f'model.norm_eps={cfg.model.norm_eps} must be >= 0 and finite')
  _choice(cfg, 'model.residual_init_scale', (True, False))
  _choice(cfg, 'model.qkv_bias', (True, False))
  _choice(cfg, 'model.qk_norm', (True, False))
  _check_sliding_window(cfg)
  _check_gemma_keys(cfg)
  if not _number(cfg, 'model.init_truncation') >= 0:
    raise ConfigError(f'model.init_truncation={cfg.model.init_truncation} must be >= 0 '
                      '(0: no truncation; else in standard deviations, e.g. 2)')


def _check_completed(cfg: ConfigDict) -> None:
  """A BiTA config straight from `get_config()` (not through `load`) lacks the model that
  `load` takes from its base run: say so, not that model.d_model is missing."""
  model = cfg.get('model') or {}
  bita = model.get('bita')
  if (model.get('family') == 'bita' and isinstance(bita, ConfigDict)
      and 'base_family' not in bita):
    raise ConfigError("model.family='bita' takes its model from the base run "
                      '(model.bita.base_workdir), which jaxarch.config.load fills in; load '
                      "the config with config.load('configs/bita.py:<preset>', "
                      "['model.bita.base_workdir=DIR', 'data.source=distilled:DIR'])")


def _check_sliding_window(cfg: ConfigDict) -> None:
  """model.sliding_window (None or positions) over the blocks model.attention_pattern marks
  'local'; MEGABYTE's patches and BiTA's draft layouts attend otherwise."""
  pattern = _get(cfg, 'model.attention_pattern')
  if (not isinstance(pattern, (tuple, list)) or not pattern
      or any(kind not in ('local', 'global') for kind in pattern)):
    raise ConfigError(f"model.attention_pattern={pattern!r} must be a non-empty tuple of "
                      "'local' (sliding-window) and 'global' blocks, cycled over the blocks")
  window = _get(cfg, 'model.sliding_window')
  if window is None:
    return
  _positive_int(cfg, 'model.sliding_window')
  why = {'megabyte': "MEGABYTE's global model attends over patches; unset it",
         'bita': "BiTA's draft trees attend without one; unset it"}  # an override
  if cfg.model.family in why:
    raise ConfigError(f'model.sliding_window={window}: {why[cfg.model.family]}')


def _check_gemma_keys(cfg: ConfigDict) -> None:
  """Gemma 3's model keys: post_norms in every family's blocks; embed_scale but for
  MEGABYTE's patch embeddings; gelu_tanh in dense blocks (not MoE experts); a local RoPE
  theta for the blocks with the sliding window."""
  _choice(cfg, 'model.post_norms', (True, False))
  if _choice(cfg, 'model.embed_scale', (True, False)) and cfg.model.family == 'megabyte':
    raise ConfigError("model.embed_scale=True: MEGABYTE embeds patches of bytes; unset it")
  if (_choice(cfg, 'model.mlp_activation', ('silu', 'gelu_tanh')) != 'silu'
      and 'moe' in cfg.model.block_pattern):
    raise ConfigError(f'model.mlp_activation={cfg.model.mlp_activation!r}: MoE experts are '
                      "SwiGLUs; use 'silu' with 'moe' blocks")
  theta = _get(cfg, 'model.local_rope_theta')
  if theta is None:
    return
  if not 0 < _number(cfg, 'model.local_rope_theta') < math.inf:
    raise ConfigError(f'model.local_rope_theta={theta} must be > 0 and finite, or None')
  if _get(cfg, 'model.sliding_window') is None:
    raise ConfigError(f'model.local_rope_theta={theta} turns the sliding-window blocks, and '
                      'model.sliding_window is unset; set it or unset local_rope_theta')


def _check_rope_scaling(cfg: ConfigDict) -> None:
  """model.rope_scaling: Llama 3.1's bands (transformers' checks, as errors), or linear's
  factor."""
  kind = _choice(cfg, 'model.rope_scaling.type', ROPE_SCALINGS)
  if kind == 'none':
    return
  key = 'model.rope_scaling.'
  if kind == 'linear':
    if not 0 < _number(cfg, key + 'factor') < math.inf:
      raise ConfigError(f'{key}factor={cfg.model.rope_scaling.factor} must be > 0 and finite '
                        '(positions are divided by it; Gemma 3: 8)')
    return
  if not 1 <= _number(cfg, key + 'factor') < math.inf:
    raise ConfigError(f'{key}factor={cfg.model.rope_scaling.factor} must be >= 1 and finite '
                      '(how many times longer the slow wavelengths turn, e.g. 8)')
  low = _number(cfg, key + 'low_freq_factor')
  high = _number(cfg, key + 'high_freq_factor')
  if not 0 < low < high < math.inf:
    raise ConfigError(f'{key}low_freq_factor={low} and high_freq_factor={high} must be '
                      '0 < low_freq_factor < high_freq_factor, finite (Llama 3.1: 1 and 4)')
  _positive_int(cfg, key + 'original_max_len')


def _is_one_source(source: str) -> bool:
  return source == 'default' or any(source.startswith(kind) and source[len(kind):]
                                    for kind in DATA_SOURCE_KINDS)


@dataclasses.dataclass(frozen=True)
class MixtureComponent:
  """One source of a data mixture; `weight` is its share of the training rows (of
  tokens), normalised over the mixture; `text_key` its own `data.text_key`, if given."""
  name: str
  source: str
  weight: float
  text_key: str | None = None


_MIXTURE_NAME = re.compile(r'[A-Za-z_][\w.-]*')
_SOURCE_START = re.compile(r'default$|files:|tfds:|distilled:')


def data_mixture(source: str) -> tuple[MixtureComponent, ...] | None:
  """The components of a mixture `data.source`, None for a single source.

  A mixture is `[NAME=]SOURCE,WEIGHT[,TEXT_KEY]` components joined by `;` (MaxText's
  grain `path,weight;path,weight`, with optional names), e.g.
  `web=files:/data/web/*.jsonl.gz,0.7;code=files:/data/stack/*.parquet,0.3,content`;
  spaces around each part are dropped. A weight of 0 evaluates a source without training
  on it (Levanter's convention). A component without a name is named by its place, '0',
  '1', ...; the names label its eval metrics (`eval_bpb/web`). TEXT_KEY is the source's
  own `data.text_key` (The Stack's code is in `content`). Raises `ConfigError` naming the
  component that is wrong."""
  if ';' not in source:
    return None
  components, names = [], set()
  for i, part in enumerate(p.strip() for p in source.split(';')):
    component = _mixture_component(i, part, source)
    if component.name in names:
      raise ConfigError(f'data.source component {i + 1} ({part!r}) of {source!r}: the name '
                        f'{component.name!r} is taken by another component')
    names.add(component.name)
    components.append(component)
  largest = max(c.weight for c in components)  # (dividing first: a sum may overflow)
  if not largest:  # evaluated only (`jaxarch eval`); training refuses it
    return tuple(components)
  total = sum(c.weight / largest for c in components)
  return tuple(dataclasses.replace(c, weight=c.weight / largest / total)
               for c in components)


def _mixture_component(i: int, part: str, source: str) -> MixtureComponent:
  """Component `i` of the mixture `source`, `[NAME=]SOURCE,WEIGHT[,TEXT_KEY]`."""
  where = f'data.source component {i + 1} ({part!r}) of {source!r}'
  spec, comma, weight = (p.strip() for p in part.rpartition(','))
  text_key = None
  if _MIXTURE_NAME.fullmatch(weight) and ',' in spec:  # SOURCE,WEIGHT,TEXT_KEY
    text_key = weight
    spec, comma, weight = (p.strip() for p in spec.rpartition(','))
  try:
    weight = float(weight) if comma else math.nan
  except ValueError:
    weight = math.nan
  if not 0 <= weight < math.inf:
    raise ConfigError(f'{where} must end in ",WEIGHT", a number >= 0 (its share of the '
                      'training tokens; 0: evaluated only), or ",WEIGHT,TEXT_KEY", e.g. '
                      "'files:/data/web/*.jsonl,0.7'")
  name, equals, rest = (p.strip() for p in spec.partition('='))
  if equals and not _SOURCE_START.match(spec) and _SOURCE_START.match(rest):
    if not _MIXTURE_NAME.fullmatch(name):
      raise ConfigError(f'{where}: the name {name!r} must start with a letter or _ and '
                        'hold only letters, digits, _, . and -')
    spec = rest
  else:
    name = str(i)
  if not _is_one_source(spec) or spec.startswith('distilled:'):
    raise ConfigError(f"{where}: {spec!r} must be 'default', 'files:<glob>' or "
                      "'tfds:<name>', optionally named as 'NAME=SOURCE'")
  return MixtureComponent(name, spec, weight, text_key)


def trained_sources(source: str) -> list[str]:
  """The sources `data.source` trains on, in order: itself, or a mixture's sources of
  weight above 0."""
  mixture = data_mixture(source)
  return [source] if mixture is None else [c.source for c in mixture if c.weight > 0]


def trained_reads(source: str, text_key: str | None = None) -> list[tuple[str, str | None]]:
  """(source, the text key it reads: its own, else `data.text_key`) of each source that
  `data.source` trains on, in order."""
  mixture = data_mixture(source)
  if mixture is None:
    return [(source, text_key)]
  return [(c.source, c.text_key or text_key) for c in mixture if c.weight > 0]


def reweighted(old_source, new_source, old_text_key=None, new_text_key=None) -> bool:
  """Whether `new_source` trains on the same sources as `old_source`, in the same order,
  each read by the same text key (with any weights and names, any sources evaluated only,
  and a key given to the source or to `data.text_key`): a data position of the one holds
  in the other, each source going on from its own place, as when a run anneals on
  another mixture or gains an eval set."""
  try:
    return (trained_reads(old_source, old_text_key)
            == trained_reads(new_source, new_text_key))
  except (ConfigError, TypeError, AttributeError):  # (a hand-edited config.json)
    return False


def _check_data(cfg: ConfigDict) -> None:
  for key, example in (('data.source', 'default'), ('data.tokenizer', 'bytes')):
    if not isinstance(_get(cfg, key), (str, type(None))):  # a hand-edited config.json
      raise ConfigError(f'{key}={_get(cfg, key)!r} must be a string, e.g. {example!r}')
  source = _get(cfg, 'data.source')
  # Checked here too, not only when the data opens: a sweep's runs fail before they start.
  if isinstance(source, str) and data_mixture(source) is None and not _is_one_source(source):
    try:
      alone = _mixture_component(0, source.strip(), source)
    except ConfigError:
      files = ('/' in source or '*' in source) and ':' not in source.split('/')[0]
      raise ConfigError(DATA_SOURCE_ERROR.format(source) + (
          f"; your own files are 'files:{source}'" if files else '')) from None
    key = '' if alone.text_key is None else f' and --config.data.text_key={alone.text_key}'
    raise ConfigError(f'data.source={source!r} is one source with a weight or a name, which '
                      "belong to a mixture of two or more 'SOURCE,WEIGHT' joined by ';': give "
                      f'the source alone, {alone.source!r}{key}')
  threads = cfg.data.get('num_threads', 0)  # (a run saved before the key read inline)
  if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
    raise ConfigError(f'data.num_threads={threads!r} must be an int >= 0: threads that read '
                      'and tokenize the training documents (0: in the prefetch thread alone)')
  if not 0 <= _number(cfg, 'data.validation_fraction') <= 1:
    raise ConfigError(f'data.validation_fraction={cfg.data.validation_fraction} must be in '
                      '[0, 1]: the share of files held out for validation (1: all, a corpus '
                      'to evaluate on)')
  # Read with get: a run saved before the key starts documents with eod, as it trained.
  bos, vocab = cfg.data.get('bos_id'), cfg.model.vocab_size
  if bos is not None and not is_token_id(bos, vocab):
    raise ConfigError(f'data.bos_id={bos!r} must be a token id in [0, model.vocab_size='
                      f"{vocab}), or None (the tokenizer's end-of-document id)")
  add_bos = cfg.data.get('add_bos', True)
  if not isinstance(add_bos, bool):
    raise ConfigError(f'data.add_bos={add_bos!r} must be True or False (False: documents and '
                      'prompts start with no BOS)')
  if not add_bos and bos is not None:
    raise ConfigError(f'data.bos_id={bos} names a BOS, but data.add_bos=False adds none; '
                      'unset data.bos_id or set data.add_bos=True')
  stops = cfg.data.get('stop_ids', ())
  if not isinstance(stops, (tuple, list)) or not all(is_token_id(t, vocab) for t in stops):
    raise ConfigError(f'data.stop_ids={stops!r} must be a tuple of token ids in [0, '
                      f'model.vocab_size={vocab}), e.g. (128009,): where generation stops '
                      'besides the end-of-document id')
  template = cfg.data.get('chat_template')
  if template is not None and not (isinstance(template, str)
                                   and os.path.isfile(os.path.expanduser(template))):
    raise ConfigError(f'data.chat_template={template!r}: no such file (a Jinja chat '
                      "template, as `jaxarch import` keeps in the run's tokenizer/; None: "
                      'no template)')
  # Packing aligns documents within a row; rows of another length shift the next row's.
  if cfg.data.seq_len % cfg.data.pack_align:
    raise ConfigError(f'data.seq_len={cfg.data.seq_len} must be a multiple of '
                      f'data.pack_align={cfg.data.pack_align}')


def _check_train(cfg: ConfigDict) -> None:
  _choice(cfg, 'train.schedule', SCHEDULES)
  step = cfg.train.get('init_from_step')
  if step is not None and not (cfg.train.get('init_from') and step >= 0):
    raise ConfigError(f'train.init_from_step={step} must be >= 0, the step of a checkpoint '
                      'of the run train.init_from names (--config.train.init_from=DIR)')
  _choice(cfg, 'train.nonfinite', NONFINITE)
  _choice(cfg, 'checkpoint.keep_best', (True, False))
  _choice(cfg, 'checkpoint.async_save', (True, False))  # 'no' in a hand-edited config.json
  seed = _number(cfg, 'train.seed', int)
  if not 0 <= seed < 2**32:  # jax.random.PRNGKey's range (int64 overflows; x64 off: mod 2^32)
    raise ConfigError(f'train.seed={seed} must be in [0, 2^32)')
  _choice(cfg, 'train.mu_dtype', ('float32', 'bfloat16'))
  steps = cfg.train.steps
  warmup = _number(cfg, 'train.warmup_steps', int)
  if not 0 <= warmup <= steps:
    raise ConfigError(f'train.warmup_steps={warmup} must be in [0, train.steps={steps}]; '
                      f'for a short run set --config.train.warmup_steps={steps // 10}')
  if not 0 < _number(cfg, 'train.lr') < math.inf:
    raise ConfigError(f'train.lr={cfg.train.lr} must be > 0 and finite')
  for key in ('train.min_lr_ratio', 'train.decay_fraction'):
    if not 0 <= _number(cfg, key) <= 1:
      raise ConfigError(f'{key}={_get(cfg, key)} must be in [0, 1]')
  if not _number(cfg, 'train.grad_clip') >= 0:
    raise ConfigError(f'train.grad_clip={cfg.train.grad_clip} must be >= 0 (0: no clipping)')
  for key in ('train.b1', 'train.b2'):
    if not 0 <= _number(cfg, key) < 1:
      raise ConfigError(f'{key}={_get(cfg, key)} must be in [0, 1)')
  if not 0 < _number(cfg, 'train.eps') < math.inf:
    raise ConfigError(f'train.eps={cfg.train.eps} must be > 0 and finite')
  for key in ('train.weight_decay', 'train.z_loss'):
    if not 0 <= _number(cfg, key) < math.inf:
      raise ConfigError(f'{key}={_get(cfg, key)} must be >= 0 and finite')
  for name, group in (_get(cfg, 'train.groups') or {}).items():
    _check_group(f'train.groups.{name}', group)


def check_train_precision(model_cfg: ConfigDict) -> str | None:
  """Raises for float16 training (no loss scaling is applied); returns the warning that
  bfloat16 weights call for (no float32 copy of them is kept), or None. Read by every
  command that trains or plans training (`train`, `bench`, `sweep`, `launch`)."""
  for key in ('dtype', 'param_dtype'):
    if model_cfg[key] == 'float16':
      # Each token's gradient is divided by the batch's tokens (overflow-safe), which at
      # 256 x 1024 tokens puts the head's backward below float16's normal range; float16
      # weights give Adam a float16 second moment, whose small values (and eps) are 0.
      raise ConfigError(f"config error: model.{key}='float16' trains without loss scaling, "
                        "which jaxarch does not apply: the gradients (or Adam's second "
                        'moment) underflow float16; train in bfloat16 (or float32); '
                        '`jaxarch eval --config.model.dtype=float16` evaluates on GPUs')
  if model_cfg.param_dtype == 'bfloat16':
    return ("model.param_dtype='bfloat16' keeps no float32 copy of the weights: an update "
            'below half a bfloat16 step is lost (a norm scale near 1 moves only at lr >= '
            "4e-3), and Adam's second moment is bfloat16 too; model.param_dtype='float32' "
            '(the default) trains them')
  return None


def unused_settings(model_cfg: ConfigDict) -> tuple[str, ...]:
  """What a valid model config sets that then does nothing: said when a run starts, not
  refused (a run saved with it resumes)."""
  moe = model_cfg.get('moe')
  if (moe is not None and moe.get('capacity_factor') is not None
      and moe.get('ep_capacity_factor') is not None):
    return (f'model.moe.ep_capacity_factor={moe.ep_capacity_factor} does nothing beside '
            f'model.moe.capacity_factor={moe.capacity_factor}: each expert keeps its '
            'capacity, whose buffers are bounded already; ep_capacity_factor bounds the '
            'buffers of dropless expert parallelism (capacity_factor=None)',)
  return ()


def _check_group(key: str, group) -> None:
  """A parameter group's settings (`train.optimizer.group_multiplier`)."""
  if not isinstance(group, (dict, ConfigDict)):
    raise ConfigError(f'{key}={group!r} must be a section with lr_multiplier and, '
                      'optionally, multiplier_decay')
  unknown = sorted(set(group) - {'lr_multiplier', 'multiplier_decay'})
  if unknown:
    raise ConfigError(f'{key}.{unknown[0]} is not a group setting; expected lr_multiplier '
                      'and, optionally, multiplier_decay')
  multiplier = group.get('lr_multiplier')
  if (isinstance(multiplier, bool) or not isinstance(multiplier, (int, float))
      or not 0 < multiplier < math.inf):
    raise ConfigError(f'{key}.lr_multiplier={multiplier!r} must be a number > 0 and finite')
  decay = group.get('multiplier_decay', 'none')
  if decay not in GROUP_DECAYS:
    raise ConfigError(f'{key}.multiplier_decay={decay!r} must be one of '
                      f'{", ".join(GROUP_DECAYS)}')


def _check_mesh(cfg: ConfigDict, num_devices: int | None) -> None:
  _mesh_sizes(cfg)
  rules = _get(cfg, 'mesh.rules')
  if not isinstance(rules, (tuple, list)):
    raise ConfigError(f'mesh.rules={rules!r} must be a tuple of (logical, mesh_axes) pairs')
  seen = set()
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f'mesh.rules[{i}]={rule!r} must be a (logical, mesh_axes) pair')
    if rule[0] in seen:
      raise ConfigError(f'mesh.rules[{i}] maps logical axis {rule[0]!r} a second time')
    seen.add(rule[0])
    axes = _rule_axes(rule[1])
    if axes is None or any(a not in MESH_AXES for a in axes):
      raise ConfigError(f'mesh.rules[{i}]={tuple(rule)!r}: mesh axes must be None, one of '
                        f'{", ".join(MESH_AXES)} or a tuple of them')
  if 'batch' not in seen:
    raise ConfigError("mesh.rules has no entry for logical axis 'batch'")
  if num_devices is None:
    return
  shape = mesh_shape(cfg, num_devices)
  batch_axes = _rule_axes(dict(rules)['batch'])
  split = math.prod(shape[a] for a in dict.fromkeys(batch_axes))
  accum = cfg.train.grad_accum_steps
  if cfg.train.batch_size % (split * accum):
    sizes = ', '.join(f'{a}={shape[a]}' for a in batch_axes)
    why = f'{split}, the mesh axes the batch is split over ({sizes})'
    if accum > 1:
      why = f'{split * accum}: train.grad_accum_steps={accum} microbatches of {why}'
    raise ConfigError(f'train.batch_size={cfg.train.batch_size} must be divisible by {why}')
  if 'moe' in tuple(_get(cfg, 'model.block_pattern')):
    _check_expert_split(cfg, shape, dict(rules))


def _check_expert_split(cfg: ConfigDict, shape: dict[str, int], rules: dict) -> None:
  """The mesh axes experts are split over, as resolved (-1 included): they divide the
  experts, and split the batch too, so each expert shard routes tokens of its own."""
  axes = [a for a in dict.fromkeys(_rule_axes(rules.get('expert'))) if shape[a] > 1]
  sizes = ', '.join(f'{a}={shape[a]}' for a in axes)
  split, e = math.prod(shape[a] for a in axes), cfg.model.moe.num_experts
  if e % split:
    raise ConfigError(f'model.moe.num_experts={e} must be divisible by {split}, the mesh axes '
                      f'experts are split over ({sizes})')
  missing = [a for a in axes if a not in _rule_axes(rules['batch'])]
  if missing:
    raise ConfigError(f"mesh.rules: 'batch' -> {rules['batch']!r} must include the mesh axes "
                      f"experts are split over ({sizes}); {', '.join(missing)} is missing")


def _rule_axes(mesh_axes) -> tuple[str, ...] | None:
  """A rule's mesh axes as a tuple; None where they are not None, a str or strs."""
  if mesh_axes is None:
    return ()
  if isinstance(mesh_axes, str):
    return (mesh_axes,)
  if isinstance(mesh_axes, (tuple, list)) and all(isinstance(a, str) for a in mesh_axes):
    return tuple(mesh_axes)
  return None


def _mesh_sizes(cfg: ConfigDict) -> tuple[dict[str, int], dict[str, int]]:
  """(ici, dcn) sizes per axis, checked: positive or -1, one -1 in the whole mesh."""
  result = []
  for level in ('ici', 'dcn'):
    section = _get(cfg, f'mesh.{level}')
    if not isinstance(section, (dict, ConfigDict)):
      raise ConfigError(f'mesh.{level}={section!r} must be a section of mesh axis sizes '
                        f'({", ".join(f"{a}=N" for a in MESH_AXES)})')
    extra = set(section) - set(MESH_AXES)
    if extra:
      raise ConfigError(f'mesh.{level}.{sorted(extra)[0]} is not a mesh axis; the axes are '
                        f'{", ".join(MESH_AXES)}')
    sizes = {}
    for axis in MESH_AXES:
      size = _get(cfg, f'mesh.{level}.{axis}')
      if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
        raise ConfigError(f'mesh.{level}.{axis}={size!r} must be a positive int or -1 '
                          f'(take the remaining devices)')
      sizes[axis] = size
    if list(sizes.values()).count(-1) > 1:
      raise ConfigError(f'mesh.{level} ({_describe(sizes)}) has more than one -1; '
                        f'at most one size can be inferred')
    result.append(sizes)
  ici, dcn = result
  if -1 in ici.values() and -1 in dcn.values():
    raise ConfigError(f'mesh.ici ({_describe(ici)}) and mesh.dcn ({_describe(dcn)}) both '
                      f'have a -1; at most one size in the whole mesh can be inferred')
  return ici, dcn


def dcn_size(mesh_cfg: ConfigDict, axis: str, total: int) -> int:
  """How many slices (or processes) `axis` spans, of its `total` size from `mesh_shape`."""
  dcn, ici = mesh_cfg.dcn[axis], mesh_cfg.ici[axis]
  if dcn != -1:
    return dcn
  return total // ici if ici != -1 else 1


def mesh_shape(cfg: ConfigDict, num_devices: int) -> dict[str, int]:
  """Size of each mesh axis (ici × dcn) on `num_devices` devices, with the -1 resolved."""
  if num_devices < 1:
    raise ValueError(f'num_devices={num_devices} must be >= 1')
  ici, dcn = _mesh_sizes(cfg)
  where = f'mesh.ici ({_describe(ici)})'
  if any(s != 1 for s in dcn.values()):
    where += f' x mesh.dcn ({_describe(dcn)})'
  fixed = math.prod(s for s in (*ici.values(), *dcn.values()) if s != -1)
  if -1 in (*ici.values(), *dcn.values()):
    if num_devices % fixed:
      factors = [a for a in MESH_AXES if ici[a] != -1]
      factors += [f'dcn.{a}' for a in MESH_AXES if dcn[a] not in (-1, 1)]
      raise ConfigError(f'{where} does not divide the {num_devices} devices '
                        f'({"*".join(factors)}={fixed})')
    rest = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f'{where} uses {fixed} devices but there are {num_devices}; '
                      f'make them multiply to {num_devices} or set one size to -1')
  else:
    rest = 1
  return {a: (rest if ici[a] == -1 else ici[a]) * (rest if dcn[a] == -1 else dcn[a])
          for a in MESH_AXES}


def _describe(sizes: dict[str, int]) -> str:
  return ', '.join(f'{a}={s}' for a, s in sizes.items())


def _get(cfg: ConfigDict, key: str) -> Any:
  node = cfg
  for part in key.split('.'):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      raise MissingKeyError(key) from None
  return node


def is_token_id(value, vocab_size: int) -> bool:
  """Whether `value` is an int id in [0, vocab_size) (not a bool, a float or a string)."""
  return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


def _positive_int(cfg: ConfigDict, key: str) -> int:
  value = _get(cfg, key)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f'{key}={value!r} must be a positive int')
  if value >= 2**31:  # a typo's extra zeros, which int32 counters would wrap
    raise ConfigError(f'{key}={value} must be below 2^31: jax counts steps and sizes in int32')
  return value


def _number(cfg: ConfigDict, key: str, kind: type | tuple[type, ...] = (int, float)):
  value = _get(cfg, key)
  if isinstance(value, bool) or not isinstance(value, kind):
    raise ConfigError(f'{key}={value!r} must be {"an int" if kind is int else "a number"}')
  return value


def _ints(value, lengths=(5,)) -> bool:
  """Whether a kernel tiling is a tuple (or a list, from JSON) of ints, as many as one of
  `lengths`."""
  return (isinstance(value, (tuple, list)) and len(value) in lengths
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def _kernel_tiling(cfg: ConfigDict, key: str) -> None:
  """Triton's rules: power-of-two blocks of at least 16 (its dot's minimum), warps a
  power of two up to 32, at least one pipeline stage; then the launch order, 0 or 1 (a
  run configured before it existed has five values: order 0)."""
  value = _get(cfg, key)
  power_of_two = lambda v, low, high: low <= v <= high and not v & (v - 1)
  if not (_ints(value, (5, 6)) and all(power_of_two(v, 16, 1024) for v in value[:3])
          and power_of_two(value[3], 1, 32) and value[4] >= 1
          and tuple(value[5:]) in ((), (0,), (1,))):
    raise ConfigError(f'{key}={value!r} must be (block_m, block_n, block_k, num_warps, '
                      'num_stages, order): blocks powers of two from 16 to 1024, warps a '
                      'power of two up to 32, stages >= 1, order 0 (rows first) or 1 '
                      '(columns first); e.g. (64, 128, 64, 4, 3, 0)')


def _mosaic_tiling(cfg: ConfigDict, key: str) -> None:
  """jax's Mosaic GPU ragged dot: output blocks in whole warpgroup tiles (64 rows) whose
  fp32 accumulator one warpgroup's registers hold (jax sweeps 64, 128 and 192), a
  contraction block whose bf16 rows fill a shared-memory swizzle (32 to 128 elements), at
  least two copies in flight (the pipeline releases each a step late)."""
  value = _get(cfg, key)
  if not (_ints(value) and all(v in (64, 128, 192) for v in value[:2])
          and value[2] in (32, 64, 128) and 2 <= value[3] <= 8 and value[4] >= 1):
    raise ConfigError(f'{key}={value!r} must be (block_m, block_n, block_k, '
                      'max_concurrent_steps, grid_block_n): blocks m and n of 64, 128 or '
                      '192, block k of 32, 64 or 128, 2 to 8 steps in flight, '
                      'grid_block_n >= 1; e.g. (128, 128, 64, 4, 8)')


def _choice(cfg: ConfigDict, key: str, options: Sequence) -> Any:
  value = _get(cfg, key)
  if value not in options:  # options may be True, False
    raise ConfigError(f'{key}={value!r} must be one of {", ".join(map(str, options))}')
  return value


# Saving the resolved config.


def flat(tree: dict, prefix: str = '') -> dict:
  """{'model': {'n_layers': 4}} -> {'model.n_layers': 4}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def differences(old: dict, new: dict, prefix: str = '') -> list[tuple[str, Any, Any]]:
  """(key, old value, new value) of each key of two nested dicts whose values differ, by
  key (`flat`'s names, after `prefix`); a key one of them lacks has the value None."""
  old, new = flat(old, prefix), flat(new, prefix)
  return [(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
          if old.get(k) != new.get(k)]


def to_dict(cfg: ConfigDict | ml_collections.FrozenConfigDict) -> dict[str, Any]:
  """The config as plain nested dicts (tuples kept), placeholders resolved to their values."""
  return cfg.to_dict()


def _to_json(tree: dict[str, Any]) -> str:
  def unsupported(value):
    raise ConfigError(f'{type(value).__name__} value {value!r} cannot be saved as JSON; '
                      f'configs hold numbers, strings, bools, None and tuples')
  return json.dumps(tree, sort_keys=True, indent=2, default=unsupported)


# Sections that say where a run goes, not what it trains: left out of config hashes, so
# that a sweep keeps its records whichever cluster (or none) its runs were launched on.
UNHASHED_SECTIONS = ('launch',)


def config_hash(cfg: ConfigDict) -> str:
  """sha256 of the config's JSON: equal configs hash equally, whatever their key order."""
  return tree_hash(to_dict(cfg))


def tree_hash(tree: dict[str, Any]) -> str:
  """`config_hash` of a config as nested dicts, e.g. a saved config.json as it was read."""
  hashed = {k: v for k, v in tree.items() if k not in UNHASHED_SECTIONS}
  return hashlib.sha256(_to_json(hashed).encode()).hexdigest()


# Keys that may name a file of the run itself (an import's or an export's copy of its
# tokenizer, DIR/tokenizer/NAME, and of its chat template): its config.json names such a
# file relative to the run's directory, so that the directory keeps working when it is
# moved or copied.
RUN_FILES = ('data.tokenizer', 'data.chat_template')


def run_file_path(spec, run_dir: str | os.PathLike):
  """A RUN_FILES value to open: a relative name of a file in `run_dir` (as the run's
  config.json holds it) as that file's path; anything else as given."""
  if not isinstance(spec, str) or spec == 'bytes' or os.path.isabs(os.path.expanduser(spec)):
    return spec
  path = os.path.abspath(os.path.join(run_dir, spec))
  return path if os.path.isfile(path) else spec


def run_file_name(spec, run_dir: str | os.PathLike):
  """A RUN_FILES value as the config.json of the run in `run_dir` names it: a file in the
  run relative to it ('tokenizer/tokenizer.json'); anything else as given."""
  path = run_file_path(spec, run_dir)
  if not isinstance(path, str) or path == 'bytes' or not os.path.isfile(
      os.path.expanduser(path)):
    return spec
  file = Path(os.path.abspath(os.path.expanduser(path)))
  directory = Path(os.path.abspath(run_dir))
  if not file.is_relative_to(directory):  # one of them reached through a link
    file, directory = file.resolve(), directory.resolve()
  return file.relative_to(directory).as_posix() if file.is_relative_to(directory) else spec


def run_files(tree: dict, run_dir: str | os.PathLike, convert: Callable) -> dict:
  """A config as nested dicts with its RUN_FILES values converted (`run_file_name`,
  `run_file_path`); other sections shared with `tree`."""
  tree = dict(tree)
  for key in RUN_FILES:
    section, name = key.split('.')
    if isinstance(tree.get(section), dict) and name in tree[section]:
      tree[section] = {**tree[section], name: convert(tree[section][name], run_dir)}
  return tree


def save(cfg: ConfigDict, path: str | os.PathLike) -> None:
  """Writes the resolved config as JSON (workdir/config.json), readable by other tools;
  the run's own files named relative to it (`RUN_FILES`)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  _write_whole(path, _to_json(run_files(to_dict(cfg), path.parent, run_file_name)) + '\n')
  if (line := tokenizer_sum(cfg.data.tokenizer, path.parent)) is not None:
    _write_whole(path.with_name(TOKENIZER_SUM), line + '\n')


def _write_whole(path: Path, text: str) -> None:
  """`text` into `path` through a temporary file: a reader never sees half a file."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  tmp.replace(path)


# RUN_DIR/tokenizer.sha256: the tokenizer whose ids the run's embeddings learned, as
# `sha256sum` writes it ('HEX  data.tokenizer'), or 'bytes'. A run's config names a file
# that may be edited, replaced or swapped for another later; this says so.
TOKENIZER_SUM = 'tokenizer.sha256'


def tokenizer_sum(spec, run_dir: str | os.PathLike) -> str | None:
  """`TOKENIZER_SUM`'s line for `data.tokenizer=spec` (None: no file to read)."""
  path = run_file_path(spec, run_dir)
  if path == 'bytes':
    return 'bytes'
  try:
    digest = hashlib.sha256(Path(os.path.expanduser(path)).read_bytes()).hexdigest()
  except (OSError, TypeError):
    return None
  return f'{digest}  {run_file_name(spec, run_dir)}'


def _tokenizer_sums(spec, run_dir: str | os.PathLike) -> tuple[str, str] | None:
  """(the run's `TOKENIZER_SUM` line, that of `spec`); None where either is not known: a
  run of jaxarch before 2026-12-07 (or an export without it), or a file that cannot be
  read (said where it is read)."""
  try:
    saved = (Path(run_dir) / TOKENIZER_SUM).read_text().strip()
  except OSError:
    return None
  now = tokenizer_sum(spec, run_dir)
  return None if now is None else (saved, now)


def _digest(line: str) -> str:
  return line.split('  ')[0]


def is_runs_tokenizer(spec, run_dir: str | os.PathLike) -> bool:
  """Whether `data.tokenizer=spec` holds what the run in `run_dir` trained with (its
  `TOKENIZER_SUM`): a copy at another path reads the documents alike."""
  sums = _tokenizer_sums(spec, run_dir)
  return sums is not None and _digest(sums[0]) == _digest(sums[1])


def check_tokenizer(cfg: ConfigDict, run_dir: str | os.PathLike) -> None:
  """Refuses a `data.tokenizer` other than the one the run in `run_dir` trained with (its
  `TOKENIZER_SUM`): another file, or the same file changed since, feeds the embeddings
  ids that mean other tokens, and the losses and bits per byte read as if nothing had."""
  sums = _tokenizer_sums(cfg.data.tokenizer, run_dir)
  if sums is None or _digest(sums[0]) == _digest(sums[1]):
    return
  saved, now = sums
  old_name, new_name = (line.split('  ', 1)[-1] for line in (saved, now))
  if old_name == new_name:
    raise ConfigError(f'the tokenizer file data.tokenizer={new_name!r} has changed since the '
                      f'run in {run_dir} trained with it (sha256 {saved[:12]}... -> '
                      f"{now[:12]}...): the model's embeddings learned the old file's ids; "
                      'put it back as it was, or point data.tokenizer at a copy of it')
  raise ConfigError(f'data.tokenizer={new_name!r} is not the tokenizer that the run in '
                    f'{run_dir} trained with ({old_name!r}, {TOKENIZER_SUM}): the model\'s '
                    "embeddings learned that one's ids; use it (a --config without "
                    'data.tokenizer, or a copy of that file)')


def load_json(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ConfigDict:
  """The config `save` wrote, with `overrides` applied, as a locked, validated ConfigDict.

  JSON has no tuples; configs hold sequences as tuples (they are hashable and cannot be
  mutated in place), so every JSON list comes back as a tuple. Keys of `RUN_SECTIONS`
  that jaxarch gained after the run was saved take their defaults. The run's own files
  (`RUN_FILES`, named relative to the directory of `path`) come back as their paths.
  """
  _check_overrides(overrides)
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f'config file {str(path)!r} not found')
  try:
    tree = json.loads(path.read_text())
  except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError: bytes that are not text
    raise ConfigError(f'{path} is not valid JSON: {e}') from e
  if not isinstance(tree, dict):
    raise ConfigError(f'{path} holds a JSON {type(tree).__name__}, not a config (an object '
                      'of sections: model, data, train, ...)')
  if 'model' not in tree and ('model_type' in tree or 'architectures' in tree):
    raise ConfigError(f'{path} is a Hugging Face config (model_type '
                      f'{tree.get("model_type")!r}), not a jaxarch run\'s: make a run of its '
                      f'checkpoint with `jaxarch import --hf={path.parent} --workdir=NEW_DIR`')
  tree = run_files(tree, path.parent, run_file_path)
  cfg = ConfigDict(_with_placeholders(_lists_to_tuples(_with_new_run_keys(tree)), path))
  cfg.lock()
  for override in overrides:
    apply_override(cfg, override)
  try:
    return validate(cfg)
  except MissingKeyError as e:
    raise ConfigError(f'{path}: {str(e).removeprefix("config error: ")} (an older or edited '
                      'saved config)') from None


# Sections that say how to run, not what is trained: a key added to them after a run was
# saved (e.g. train.mu_dtype) takes its default, which is the behaviour the run had, when
# the run resumes. A missing key of the model or data is still an error.
RUN_SECTIONS = ('train', 'checkpoint', 'log', 'launch')
# Model keys that pick kernels, which compute the same function, or that jaxarch gained
# with a default that is what older runs did (heads_per_query=1): filled the same way,
# from the shipped config of the family that names the key's section.
RUN_MODEL_KEYS = (('moe', 'matmul_impl'), ('moe', 'kernel_tiling'), ('moe', 'mosaic_tiling'),
                  ('moe', 'mosaic_weight_grad'), ('moe', 'ep_exchange'),
                  ('ultramem', 'lookup_impl'),
                  ('ultramem', 'lookup_scatter'), ('ultramem', 'table_split'),
                  ('ultramem', 'top_k_chunk'),
                  ('ultramem', 'heads_per_query'),
                  ('megabyte', 'local', 'attention_impl'))
# Model keys that only shape the initial weights (a saved run's are in its checkpoints),
# and model and data keys that jaxarch gained with a default that is what older runs did
# (no rope scaling, no q/k/v biases, no QK-norm, no sliding window, none of Gemma 3's keys,
# unscanned layers, generation stopping at the end-of-document id alone, documents and
# prompts starting with a BOS, no chat template), or that say how to read the same batches
# (data.num_threads).
FILLED_KEYS = (('model', 'init_truncation'), ('model', 'residual_init_scale'),
               ('model', 'rope_scaling'), ('model', 'qkv_bias'), ('model', 'qk_norm'),
               ('model', 'sliding_window'), ('model', 'attention_pattern'),
               ('model', 'local_rope_theta'), ('model', 'embed_scale'),
               ('model', 'post_norms'), ('model', 'mlp_activation'), ('model', 'scan_layers'),
               ('data', 'stop_ids'), ('data', 'add_bos'), ('data', 'chat_template'),
               ('data', 'num_threads'))


def _with_new_run_keys(tree: dict) -> dict:
  model = tree.get('model')
  if isinstance(model, dict) and model.get('family') == 'megabyte':
    model['tie_embeddings'] = True  # always tied; saved as False before 2026-12-03
    if isinstance(model.get('megabyte'), dict):  # what filled a partial last patch, which
      model['megabyte'].pop('pad_id', None)      # changed no prediction: gone 2026-12-07
  if isinstance(model, dict) and isinstance(model.get('ultramem'), dict):
    # Each memory layer drew its own IVE permutation before 2026-12-07.
    model['ultramem'].setdefault('permutation', 'per_layer')
  if (dense := _shipped('dense', None)) is None:  # nothing to fill from
    return tree
  defaults = to_dict(dense)

  def fill(saved: dict, default: dict):
    for key, value in default.items():
      if key not in saved:
        saved[key] = value
      elif isinstance(value, dict) and isinstance(saved[key], dict):
        fill(saved[key], value)

  for section in RUN_SECTIONS:
    if isinstance(tree.get(section, {}), dict):
      fill(tree.setdefault(section, {}), defaults[section])
  for section, key in FILLED_KEYS:
    saved = tree.get(section)
    if isinstance(saved, dict) and key not in saved:
      saved[key] = defaults[section][key]
  for *sections, key in RUN_MODEL_KEYS:
    saved = model
    for section in sections:
      saved = saved.get(section) if isinstance(saved, dict) else None
    if isinstance(saved, dict) and key not in saved:
      default = to_dict(_shipped(sections[0]))['model']
      for section in sections:
        default = default[section]
      saved[key] = default[key]
  return tree


@functools.cache
def _shipped(family: str, arg: str | None = 'tiny') -> ConfigDict | None:
  """The shipped `configs/<family>.py[:arg]` (of the package, not ./configs), loaded once;
  None in an install without configs/. Read it only: it is shared."""
  try:
    return load(str(SHIPPED_CONFIGS / f'{family}.py') + (f':{arg}' if arg else ''))
  except ConfigError:
    return None


def _with_placeholders(tree: dict, path: Path) -> dict:
  """`tree` with the keys the shipped configs leave optional (`placeholder(type)`, e.g.
  model.moe.capacity_factor) as typed placeholders again: JSON keeps only their values,
  so an override could not set None, or a saved None any type."""
  for key, field_type in _shipped_placeholders().items():
    *sections, name = key.split('.')
    parent = tree
    for section in sections:
      parent = parent.get(section) if isinstance(parent, dict) else None
    if isinstance(parent, dict) and name in parent:
      reference = ml_collections.config_dict.placeholder(field_type)
      try:
        if parent[name] is not None:
          reference.set(parent[name])
      except TypeError:
        raise ConfigError(f'{path}: {key}={parent[name]!r} must be '
                          f'{_article(field_type)} or None') from None
      parent[name] = reference
  return tree


@functools.cache
def _shipped_placeholders() -> dict[str, type]:
  """Dotted key -> type of every optional key of the shipped families' configs."""
  found = {}

  def collect(cfg: ConfigDict, prefix: str):
    for name, value in cfg.items(preserve_field_references=True):
      if isinstance(value, ml_collections.FieldReference):
        found[prefix + name] = value.get_type()
      elif isinstance(value, ConfigDict):
        collect(value, f'{prefix}{name}.')

  for family in ('dense', 'moe', 'ultramem', 'megabyte'):
    if (shipped := _shipped(family)) is not None:  # else nothing to restore
      collect(shipped, '')
  return found


def _lists_to_tuples(tree):
  if isinstance(tree, dict):
    return {k: _lists_to_tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_lists_to_tuples(v) for v in tree)
  return tree
