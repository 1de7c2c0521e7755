"""Reading a checkpoint whose layers are laid out otherwise than the model's.

A stack's blocks are saved unrolled (`model.scan_layers=False`: `blocks/<i>/...`, one
array per layer) or scanned (`layers/<j>/...`: layer i = start + repeat * period + j,
stacked [repeats, ...], of a unit of the scan (`config.scan_layout`); the layers before
and after the scan unrolled); its side layers likewise (`side_layers/<s>/...`, or
`scanned_side_layers/<k>/...` for those inside the scan's units). The checkpoint's arrays
are read as saved (and verified against their checksums), then each of the model's arrays
is gathered from them, so that a run resumes in the other layout and a scanned run's
model is read unrolled to decode. The optimizer's arrays repeat the parameters' paths,
and follow them. The gathering holds one array's sources twice at a time, not the state:
each saved array is dropped after its last use.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxarch.config import Numbering
from jaxarch.models.transformer import SEQUENCES, UNROLLED_NAME, numberings, stack_at
from jaxarch.train.step import tree_path

Read = tuple[str, int | None]  # a saved array's key, and the layer's index in it if stacked


def _read(numbering: Numbering, prefix: str, sequence: str, layer: int, inner: str) -> Read:
  """Where layer `layer` of a stack's sequence (`prefix`: the stack's path) lies in a
  state that lays it out by `numbering`."""
  if (slot := numbering.slot(layer)) is not None:
    return f'{prefix}/{SEQUENCES[sequence]}/{slot[0]}/{inner}', slot[1]
  return f'{prefix}/{sequence}/{layer}/{inner}', None


def _layout(numbering: Numbering) -> tuple:
  return ((numbering.start, numbering.period, numbering.repeats) if numbering.repeats
          else ())


def _describe(numbering: Numbering) -> str:
  if not numbering.repeats:
    return 'unrolled'
  return f'scanned (period {numbering.period}' + (
      f' from block {numbering.start})' if numbering.start else ')')


@dataclasses.dataclass(frozen=True)
class Relayout:
  """How each of the model's arrays (by key) is read from a checkpoint of another layout:
  its reads, stacked into one array [repeats, ...] or, one read, taken as it is."""
  reads: dict[str, tuple[tuple[Read, ...], bool]]
  saved: str  # the layouts, for messages
  wanted: str

  def passes(self, key: str) -> bool:
    """Whether the model's array `key` is the saved one of its name, as it is (outside
    the stacks): read straight into the model's shards."""
    return self.reads[key] == (((key, None),), False)

  def sources(self) -> dict[str, int]:
    """Saved key -> the number of the model's arrays that read it."""
    uses = {}
    for reads, _ in self.reads.values():
      for key in {key for key, _ in reads}:
        uses[key] = uses.get(key, 0) + 1
    return uses


def _split(key: str) -> tuple[str, str, bool, int, str] | None:
  """'params/stack/layers/1/mlp/up/value' -> ('params/stack', 'blocks', True, 1,
  'mlp/up/value'): the stack's path, the sequence (`SEQUENCES`, by its unrolled name),
  whether scanned, the index (layer, or stacked layer of a unit) and the path inside the
  layer; None outside the stacks' sequences."""
  parts = key.split('/')
  if (found := stack_at(parts)) is None:
    return None
  at, name = found
  return ('/'.join(parts[:at]), UNROLLED_NAME.get(name, name), name in UNROLLED_NAME,
          int(parts[at + 1]), '/'.join(parts[at + 2:]))


def outside(shapes: dict[str, tuple]) -> dict[str, tuple]:
  """The arrays of a `checkpoint._shapes` map outside the stacks' layers: the same in
  either layout."""
  return {key: value for key, value in shapes.items() if _split(key) is None}


Stacks = dict[tuple[str, str], Numbering]  # (stack's path in the model, sequence) -> layout


def _stacks(shapes: dict[str, tuple]) -> Stacks:
  """The layout of each stack's sequences that the parameters' keys name, by the stack's
  path in the model ('' at its root), from a state's `checkpoint._shapes` map: the
  parameters name every layer, where the optimizer's or model state's arrays may leave
  some out."""
  params = [(key.split('/')[1:], shape) for key, (shape, _) in shapes.items()
            if key.split('/')[0] == 'params']
  return {('/'.join(where), sequence): numbering
          for (where, sequence), numbering in numberings(params).items()}


def _stack_of(prefix: str, sequence: str, stacks: Stacks) -> tuple[str, str] | None:
  """The stack whose path ends `prefix`: a parameter's, an optimizer moment's
  ('opt_state/1/0/mu/global_model'), the model state's."""
  ends = [(where, kind) for where, kind in stacks
          if kind == sequence and (not where or prefix.endswith(f'/{where}'))]
  return max(ends, key=lambda stack: len(stack[0]), default=None)


def plan(saved: dict[str, tuple], wanted: dict[str, tuple]) -> Relayout | str | None:
  """How the model's arrays (`wanted`, `checkpoint._shapes` maps) are read from a
  checkpoint's (`saved`) whose stacks are laid out otherwise; None where the layouts are
  the same (or the stacks are another model's: `checkpoint.mismatch` says how); a string
  saying why where the layouts differ and the arrays do not fit."""
  saved_stacks, wanted_stacks = _stacks(saved), _stacks(wanted)
  layouts = lambda stacks: {where: _layout(numbering) for where, numbering in stacks.items()}
  if layouts(saved_stacks) == layouts(wanted_stacks) or set(saved_stacks) != set(
      wanted_stacks):
    return None
  describe = lambda stacks: ', '.join(sorted({_describe(numbering) for (_, sequence), numbering
                                              in stacks.items() if sequence == 'blocks'}))
  reads = _reads(saved, wanted, saved_stacks, wanted_stacks)
  if isinstance(reads, str):
    return (f'holds its layers {describe(saved_stacks)} and does not fit this model (its '
            f'layers {describe(wanted_stacks)}): {reads}')
  return Relayout(reads, describe(saved_stacks), describe(wanted_stacks))


def _reads(saved: dict[str, tuple], wanted: dict[str, tuple], saved_stacks: Stacks,
           wanted_stacks: Stacks) -> dict | str:
  """`Relayout.reads`, or why the arrays do not fit."""
  for (where, sequence), numbering in wanted_stacks.items():
    if (count := saved_stacks[where, sequence].count) != numbering.count:
      what = 'layers' if sequence == 'blocks' else sequence.replace('_', ' ')
      return (f'it has {count} {what}{f" in {where}" if where else ""}, the model '
              f'{numbering.count} (model.n_layers?)')
  reads = {}
  for key in sorted(wanted, key=lambda k: not k.startswith('params/')):  # named first
    shape, dtype = wanted[key]
    split = _split(key)
    if split is None:  # outside the stacks: the same array
      reads[key] = ((key, None),), False
      element = shape
    else:
      prefix, sequence, scanned, index, inner = split
      stack = _stack_of(prefix, sequence, wanted_stacks)
      numbering = wanted_stacks[stack]
      layers = ([numbering.layer(index, r) for r in range(numbering.repeats)] if scanned
                else [index])
      reads[key] = tuple(_read(saved_stacks[stack], prefix, sequence, i, inner)
                         for i in layers), scanned
      element = shape[1:] if scanned else shape
    for source, index in reads[key][0]:
      if source not in saved:
        return f"it lacks {source}, which the model's {key} reads"
      saved_shape, saved_dtype = saved[source]
      saved_shape = tuple(saved_shape if index is None else saved_shape[1:])
      if (saved_shape, saved_dtype) != (tuple(element), dtype):
        return (f'it holds {source} as {saved_shape} {saved_dtype} per layer, where the '
                f"model's {key} needs {tuple(element)} {dtype}")
  read = {source for layers, _ in reads.values() for source, _ in layers}
  if unread := sorted(set(saved) - read):
    return f'it holds {len(unread)} arrays the model lacks (e.g. {unread[0]})'
  return reads


def _source_sharding(sharding, stacked_model: bool, stacked_saved: bool):
  """The sharding to read a saved array with, from the model's array it feeds: a layer's
  own spec, led by None where stacked."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  element = spec[1:] if stacked_model else spec
  return NamedSharding(sharding.mesh, PartitionSpec(*((None,) if stacked_saved else ()),
                                                    *element))


def target(relayout: Relayout, saved_tree, abstract_state):
  """The saved tree (Orbax's metadata tree of the checkpoint's state, or the part of it
  read) as ShapeDtypeStructs with the shardings to read it in: each array led by the
  sharding of the model's array that reads it."""
  model = {tree_path(path): x for path, x
           in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  read_by = {}
  for key, (reads, stacked) in relayout.reads.items():
    for source, index in reads:
      read_by.setdefault(source, (key, stacked, index is not None))

  def leaf(path, metadata):
    key, stacked, stacked_saved = read_by[tree_path(path)]
    if relayout.passes(key):
      return model[key]
    return jax.ShapeDtypeStruct(metadata.shape, model[key].dtype, sharding=_source_sharding(
        model[key].sharding, stacked, stacked_saved))

  return jax.tree_util.tree_map_with_path(leaf, saved_tree)


def gather(relayout: Relayout, saved: list, abstract_state):
  """The state of the model's layout (`abstract_state`'s tree) gathered from the saved
  state read with `target`, handed over in the list `saved`, which this empties: the
  caller holds no reference that would keep the saved arrays until the end."""
  arrays = {tree_path(path): x for path, x
            in jax.tree_util.tree_flatten_with_path(saved.pop())[0]}
  uses = relayout.sources()
  programs = {}  # (its jit compiles one per shape: the layer indices are arguments)

  def leaf(path, abstract):
    key = tree_path(path)
    if relayout.passes(key):
      return arrays.pop(key)
    reads, stacked = relayout.reads[key]
    sources = list(dict.fromkeys(source for source, _ in reads))
    order = tuple((sources.index(source), index is not None) for source, index in reads)
    signature = (order, stacked, abstract.sharding)
    if signature not in programs:
      programs[signature] = _gatherer(*signature)
    value = programs[signature](np.asarray([i or 0 for _, i in reads], np.int32),
                                *(arrays[source] for source in sources))
    for source in sources:
      uses[source] -= 1
      if not uses[source]:
        del arrays[source]
    return value

  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def _gatherer(order: tuple[tuple[int, bool], ...], stacked: bool, sharding):
  """(indices, *sources) -> one array of the model: its reads, `order`'s (source, whether
  it is a layer of a stacked source, at `indices`' entry), stacked, or the one read, in
  the model array's `sharding`. The indices are arguments: one program reads any layer."""

  def gather_one(indices, *sources):
    layers = [sources[k][indices[n]] if indexed else sources[k]
              for n, (k, indexed) in enumerate(order)]
    return jnp.stack(layers) if stacked else layers[0]

  return jax.jit(gather_one, out_shardings=sharding)
