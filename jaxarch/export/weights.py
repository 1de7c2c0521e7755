"""A trained model as safetensors with stable flat names, its config and tokenizer, and back.

  OUT/model.safetensors   every variable of the model (parameters, and buffers such as
                          UltraMem's Tucker vectors; not training statistics such as its
                          hit counters), named by its path: 'embed.embedding',
                          'blocks.3.attn.q_proj', 'blocks.1.mlp.gate'; a BiTA model's are
                          'base.…' (the frozen model) beside 'prompt_k', 'prompt_v',
                          'mask_embed'
  OUT/config.json         the run's resolved config (`jaxarch.config.load_json` reads it)
  OUT/tokenizer.json      how text becomes ids: the tokenizer spec and its special ids
                          (bos_id, null when the model reads no BOS, and
                          stop_ids: where generation stops);
                          a SentencePiece or tokenizer.json file is copied into
                          OUT/tokenizer/ (so an HF `tokenizer.json` keeps its name),
                          an instruct model's chat template (data.chat_template) too
  OUT/README.md           what the directory holds and how to load it

Names are the module attribute paths joined by dots, so they change only when a module's
attribute names do. `load_safetensors` builds the model from config.json with abstract
shapes and fills in the arrays, checking that every name and shape matches.
"""

import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import struct
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors
from flax import nnx

from jaxarch import config as config_lib
from jaxarch import models
from jaxarch.data import bos_id, get_tokenizer, stop_ids
from jaxarch.layers.signals import WindowCounter
from jaxarch.models import named_variables
from jaxarch.oserrors import explained_write_errors
from jaxarch.parallel.sharding import tree_shardings
from jaxarch.train.pretrained import mesh_here

WEIGHTS = 'model.safetensors'


class ExportError(RuntimeError):
  """An export directory that cannot be written or read back; one line for the user."""


def _exported_state(model: nnx.Module) -> nnx.State:
  """The variables that define the model's outputs: not decode caches, sown values nor
  training statistics (`WindowCounter`s, which start at zero)."""
  return nnx.state(model, nnx.Not(nnx.Any(nnx.Cache, nnx.Intermediate, WindowCounter)))


def flat_arrays(model: nnx.Module) -> dict[str, jax.Array]:
  """'blocks.3.attn.q_proj' -> array, for every exported variable of `model`."""
  return {name: variable.get_value()
          for name, (_, variable) in named_variables(_exported_state(model)).items()}


# safetensors' names of the dtypes, in the order its writer lays tensors out (then by name).
_SAFETENSORS_DTYPES = {
    'uint64': 'U64', 'int64': 'I64', 'float64': 'F64', 'float32': 'F32', 'uint32': 'U32',
    'int32': 'I32', 'bfloat16': 'BF16', 'float16': 'F16', 'uint16': 'U16', 'int16': 'I16',
    'float8_e4m3fn': 'F8_E4M3', 'float8_e5m2': 'F8_E5M2', 'int8': 'I8', 'uint8': 'U8',
    'bool': 'BOOL'}


def save_safetensors(arrays: dict, path: Path, metadata: dict[str, str]) -> None:
  """Writes `arrays` (name -> anything with a shape and dtype that `np.asarray` makes an
  array of, e.g. a `Deferred`) as safetensors' own writer does, byte for byte, each made
  only when it is written: host memory for one tensor, where safetensors' `save_file`
  takes them all in host memory at once (a model's size, twice that in Hugging Face's
  layouts)."""
  dtypes = {name: np.dtype(a.dtype).name for name, a in arrays.items()}
  if unknown := sorted(n for n, d in dtypes.items() if d not in _SAFETENSORS_DTYPES):
    raise ExportError(f'export: {unknown[0]} is {dtypes[unknown[0]]}, which safetensors '
                      'cannot hold')
  rank = list(_SAFETENSORS_DTYPES)
  order = sorted(arrays, key=lambda name: (rank.index(dtypes[name]), name))
  header, offset = {'__metadata__': metadata}, 0
  for name in order:
    shape = [int(n) for n in arrays[name].shape]
    size = math.prod(shape) * np.dtype(arrays[name].dtype).itemsize
    header[name] = {'dtype': _SAFETENSORS_DTYPES[dtypes[name]], 'shape': shape,
                    'data_offsets': [offset, offset + size]}
    offset += size
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)  # the tensors start 8-byte aligned
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(text)) + text)
    for name in order:
      array = np.ascontiguousarray(arrays[name]).reshape(-1)  # little-endian, as the host
      f.write(array.view(np.uint8).data)


class Deferred:
  """`make(source)` (by default `source`), made on the source's devices and fetched only
  when `np.asarray` asks for it, and not kept: a tensor of an export. Its shape and dtype
  are known before."""

  def __init__(self, source: jax.Array, make=lambda x: x):
    out = jax.eval_shape(make, source)
    self.shape, self.dtype = out.shape, out.dtype
    self._source, self._make = source, make

  def __array__(self, dtype=None, copy=None):
    made = self._make(self._source)
    if made is self._source:  # jax keeps the host copy of an array it converted while the
      made = jnp.copy(made)   # array lives: the weights' copies would add up to the model
    return np.asarray(made, dtype)


def free_out(out: str | Path, *, command: str = 'export', flag: str = '--out') -> Path:
  """`out`, refused if something is there already (an empty directory is free) or if it
  cannot be made (a file where a folder above it should be): checked before a checkpoint
  is read, which takes minutes for a big model. `command`, `flag`: how the error names it."""
  out = Path(out)
  if out.exists() and not out.is_dir():
    raise ExportError(f'{command}: {flag}={out} is a file; give a new directory for the '
                      f'{command}')
  if out.exists() and any(out.iterdir()):
    raise ExportError(f'{command}: {out} exists and is not empty; choose a new {flag}')
  above = next((p for p in out.absolute().parents if p.exists()), None)
  if above is not None and not above.is_dir():
    raise ExportError(f'{command}: {flag}={out} is under {above}, a file; give a new '
                      'directory under a directory')
  return out


def readable(path: Path, mode: int = 0o666) -> None:
  """`path` given the permissions the user's umask gives new files (or directories)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, mode & ~umask)


def _partial_prefix(out: Path) -> str:
  """Names the host, then the process, so that a retry knows which ones were killed."""
  return f'.{out.name}.partial-{socket.gethostname()}-'


def _remove_killed_partials(out: Path) -> None:
  """Removes the hidden directories that exports to `out` killed on this host (SIGKILL, a
  lost node: no `finally` ran) left beside it, each as large as the model."""
  pattern = re.compile(re.escape(_partial_prefix(out)) + r'(\d+)-')
  for path in out.parent.iterdir():
    pid = pattern.match(path.name)
    if pid is None or _running(int(pid[1])):
      continue  # another host's, or an export still writing
    shutil.rmtree(path, ignore_errors=True)
    logging.getLogger(__name__).warning('removed %s, left by an earlier try that was killed',
                                        path)


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)  # signal 0 only asks whether the process is there
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's
  return True


@contextlib.contextmanager
def all_or_nothing(out: str | Path, **names):
  """Yields a fresh directory beside `out` to write an export into; it becomes `out` once
  the writing succeeded, and is removed if it failed, so a failed export leaves nothing
  that blocks the next try (nor, once retried, when it was killed); one that the
  filesystem refused (disk full) says so in one line. `names`: `free_out`'s."""
  out = free_out(out, **names)
  out.parent.mkdir(parents=True, exist_ok=True)
  _remove_killed_partials(out)
  partial = Path(tempfile.mkdtemp(prefix=f'{_partial_prefix(out)}{os.getpid()}-',
                                  dir=out.parent))
  command = names.get('command', 'export')
  try:
    with explained_write_errors(lambda reason: ExportError(
        f'{command}: could not write {out} ({reason}); nothing was left there: free space '
        '(or fix permissions) and rerun')):
      yield partial
      readable(partial, 0o777)  # made 0700, as a temporary directory is
      if out.exists():
        out.rmdir()  # empty, as checked
      partial.rename(out)
  finally:
    shutil.rmtree(partial, ignore_errors=True)


def write_model(model: nnx.Module, cfg: ml_collections.ConfigDict, out: str | Path, *,
                source: str = '', final: str | Path | None = None) -> Path:
  """Writes `model` (built from `cfg`) as OUT/{model.safetensors, config.json, ...}.

  `final`: where OUT will be once written (`all_or_nothing`), named in its README.
  """
  cfg, model = models.unscanned(cfg, model)  # each layer under its own name
  out = free_out(out)
  out.mkdir(parents=True, exist_ok=True)
  arrays = {name: Deferred(array) for name, array in flat_arrays(model).items()}
  # One metadata key: safetensors' own writer puts several in a random order, and the same
  # model should export to the same bytes (config.json names the family).
  save_safetensors(arrays, out / WEIGHTS, metadata={'format': 'jaxarch'})
  readable(out / WEIGHTS)  # as the other files (it is written 0600)
  cfg = copy_tokenizer(cfg, out)
  config_lib.save(cfg, out / 'config.json')
  tokenizer = get_tokenizer(cfg.data.tokenizer)
  bos = bos_id(cfg.data, tokenizer)
  (out / 'tokenizer.json').write_text(json.dumps({
      'spec': config_lib.run_file_name(cfg.data.tokenizer, out),
      'vocab_size': tokenizer.vocab_size,
      'eod_id': tokenizer.eod_id, 'pad_id': tokenizer.pad_id,
      'bos_id': bos, 'stop_ids': list(stop_ids(cfg.data, tokenizer)),
      'bos': ('prompts start with bos_id, which the model was trained to read as BOS'
              if bos is not None else 'bos_id null: prompts are the text\'s ids alone, '
              'with no BOS, as the model was trained'),
      'stop': 'generation stops at any of stop_ids: the eod_id, then an end of turn'},
      indent=2) + '\n')
  count = sum(int(np.prod(a.shape)) for a in arrays.values())
  (out / 'README.md').write_text(_README.format(
      family=cfg.model.family, source=source or 'a jaxarch run', arrays=len(arrays),
      count=count, out=final or out, needs=_needs_own_code(cfg.model)))
  return out


def _needs_own_code(model_cfg: ml_collections.ConfigDict) -> str:
  """The README's word on the family, blocks and side layers of the user's own code that
  the model is built of (without it, loading fails), or ''."""
  parts = [('family', model_cfg.family, models.FAMILIES.get(model_cfg.family))]
  parts += [('block', kind, models.BLOCKS.get(kind))
            for kind in dict.fromkeys(model_cfg.get('block_pattern', ()))]
  parts += [('side layer', kind, models.SIDE_LAYERS.get(kind))
            for kind in dict.fromkeys(kind for kind, _, _ in config_lib.placements(model_cfg))]
  own = [f"{what} '{name}' (module {code.__module__})" for what, name, code in parts
         if code is not None and not code.__module__.startswith('jaxarch.')]
  if not own:
    return ''
  return ('\nIt is built of code of its own, which must be registered first: '
          f'{", ".join(own)}. Import that module (or, for an installed package, call '
          '`jaxarch.plugins.load_plugins()`) before loading it.\n')


def copy_tokenizer(cfg, out: Path):
  """`cfg` naming a copy of its tokenizer file (and of its chat template: `keep_chat_template`)
  in OUT/tokenizer/, which OUT's config.json names relative to OUT (`config_lib.save`), so
  that OUT can be moved or copied; a folder of its own, since an export's
  OUT/tokenizer.json is its own."""
  spec = cfg.data.tokenizer
  if spec != 'bytes' and Path(spec).expanduser().is_file():
    source = Path(spec).expanduser()
    (out / 'tokenizer').mkdir()
    shutil.copy(source, out / 'tokenizer' / source.name)
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.data.tokenizer = str(out / 'tokenizer' / source.name)
  if cfg.data.get('chat_template') is not None:
    template = Path(cfg.data.chat_template).expanduser()
    cfg = keep_chat_template(cfg, out, template.read_text(encoding='utf-8'),
                             template.with_name('tokenizer_config.json'))
  return cfg


CHAT_TEMPLATE = 'chat_template.jinja'  # the name transformers >= 4.50 saves a template as


def keep_chat_template(cfg, out: Path, template: str, settings: Path):
  """`cfg` naming OUT/tokenizer/chat_template.jinja, which holds `template`, with the
  tokenizer_config.json `settings` (if there is one) beside it: the special tokens'
  names the template writes (`bos_token`, `eos_token`: `jaxarch.infer.chat`)."""
  (out / 'tokenizer').mkdir(exist_ok=True)
  (out / 'tokenizer' / CHAT_TEMPLATE).write_text(template, encoding='utf-8')
  if settings.is_file():
    shutil.copy(settings, out / 'tokenizer' / 'tokenizer_config.json')
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.data.chat_template = str(out / 'tokenizer' / CHAT_TEMPLATE)
  return cfg


def load_safetensors(out: str | Path) -> tuple[ml_collections.ConfigDict, nnx.Module]:
  """(config, model) from an export directory; the model's logits equal the run's.

  Sharded as `jaxarch.load` shards a run's checkpoint: over the run's mesh where it fits
  the devices here, else a data-parallel one (`mesh_here`, whose config is returned), each
  array read from the file (one at a time) into its shards: no device holds the whole
  model, nor does host memory.
  """
  out = Path(out)
  for name in ('config.json', WEIGHTS):
    if not (out / name).is_file():
      raise ExportError(f'export: {out / name} not found; is {out} a `jaxarch export` '
                        'directory?')
  cfg, mesh = mesh_here(config_lib.load_json(out / 'config.json'))  # tokenizer: OUT's copy
  abstract = nnx.eval_shape(lambda: models.build(cfg.model, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  shardings = dict(nnx.to_flat_state(tree_shardings(state, mesh, cfg.mesh.rules)))
  names = {name: path
           for name, (path, _) in named_variables(_exported_state(abstract)).items()}
  counters = named_variables(nnx.state(abstract, WindowCounter))
  flat = dict(nnx.to_flat_state(state))
  try:
    with safetensors.safe_open(out / WEIGHTS, framework='numpy') as weights:
      stored = set(weights.keys()) - set(counters)  # exports before 2026-12 held counters
      missing, extra = sorted(set(names) - stored), sorted(stored - set(names))
      if missing or extra:
        raise ExportError(f'export: {out / WEIGHTS} does not fit {cfg.model.family} '
                          f'config.json: {len(missing)} names missing (e.g. {missing[:1]}), '
                          f'{len(extra)} unknown (e.g. {extra[:1]})')
      for name, path in names.items():
        want, got = flat[path].get_value(), weights.get_tensor(name)  # one in host memory
        if (tuple(want.shape), want.dtype) != (tuple(got.shape), got.dtype):
          raise ExportError(f'export: {name} is {got.dtype}{list(got.shape)} in '
                            f'{out / WEIGHTS}, the config expects '
                            f'{want.dtype}{list(want.shape)}')
        flat[path].set_value(jax.device_put(got, shardings[path].get_value()))
  except safetensors.SafetensorError as e:  # cut short or garbled
    raise ExportError(f'export: {out / WEIGHTS} cannot be read ({e}); export the run '
                      'again') from None
  for _, (path, counter) in counters.items():
    flat[path].set_value(jax.device_put(
        np.zeros(counter.get_value().shape, counter.get_value().dtype),
        shardings[path].get_value()))
  return cfg, nnx.merge(graphdef, nnx.from_flat_state(flat))


_README = """# A jaxarch {family} model

Exported from {source}: {arrays} arrays, {count:,} numbers.

- `model.safetensors`: the weights (and buffers), named by module path
  (`blocks.3.attn.q_proj`); read them with any safetensors library.
- `config.json`: the run's config; `model` describes the architecture.
- `tokenizer.json`: the tokenizer (`spec`) and its special ids. Prompts start with
  `bos_id`, which the model reads as the beginning of a document (null: with no BOS, the
  text's ids alone); generation stops at any of `stop_ids` (`eod_id`, and an instruct
  model's end of turn).

Load it back with jaxarch:
{needs}
```python
from jaxarch.export import load_safetensors
cfg, model = load_safetensors('{out}')
logits = model(tokens)  # tokens: int32 [batch, length] -> [batch, length, vocab]
```
"""
