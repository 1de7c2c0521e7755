"""Logical axis names -> `PartitionSpec` / `NamedSharding`, through `mesh.rules`.

Modules name the axes of their weights (`embed`, `mlp`, ...); the config maps names to
mesh axes. Weights whose dimension does not divide the mesh axes it maps to are
replicated along that dimension rather than failing (e.g. 2 KV heads on tensor=4).
"""

import collections
from collections.abc import Sequence
import difflib
import logging
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxarch import config as config_lib

Rules = Sequence[tuple[str, str | Sequence[str] | None]]
LARGE_WEIGHT = 1 << 20  # elements: replicating a weight this large is worth a warning
log = logging.getLogger(__name__)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def logical_to_spec(axes: Sequence[str | None], rules: Rules,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                    dropped: list | None = None) -> P:
  """('batch', 'length') -> P(('data', 'fsdp', 'expert'), None) under the default rules.

  A mesh axis is used at most once per spec (first dimension wins), and with `shape` and
  `mesh` given, mesh axes that do not divide a dimension are dropped (and listed in
  `dropped` as (logical name, size, mesh axis)).
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(axes):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      close = difflib.get_close_matches(name, table, n=1)
      raise config_lib.ConfigError(
          f'mesh.rules has no entry for logical axis {name!r}, which the model '
          f'uses' + (f' (is {close[0]!r} a misspelling of it?)' if close else ''))
    target = table[name]
    target = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    kept = []
    for axis in target:
      if axis in used:
        continue
      if shape is not None and mesh is not None:
        size = int(np.prod([mesh.shape[a] for a in kept + [axis]]))
        if shape[i] % size:
          if dropped is not None:
            dropped.append((name, shape[i], axis))
          continue
      kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def tree_shardings(tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a tree of (abstract) nnx Variables and plain arrays.

  Variables are sharded by their `out_sharding` logical axes; everything else (optimizer
  step counters, RNG keys, scalars) is replicated. Works for params, optimizer states
  built from them (optax keeps the Variables), and whole train states.
  """
  # Large weights that lost a mesh axis, keyed by shape and what was dropped, so that a
  # weight counts once, not once more per Adam moment: -> (first path, shape, first drop).
  replicated = {}

  def sharding(path, x):
    if _is_variable(x):
      axes = x.get_metadata().get('out_sharding')
      value = x.get_value()
      dropped = []
      spec = P() if not axes else logical_to_spec(axes, rules, value.shape, mesh, dropped)
      if dropped and math.prod(value.shape) >= LARGE_WEIGHT:
        replicated.setdefault(value.shape + tuple(dropped), (jax.tree_util.keystr(path),
                                                              value.shape, dropped[0]))
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  shardings = jax.tree_util.tree_map_with_path(sharding, tree, is_leaf=_is_variable)
  if replicated:
    path, shape, (name, size, axis) = next(iter(replicated.values()))
    log.warning('%d large weights are replicated along mesh axes that do not divide them, '
                'e.g. %s %s: %s=%d over %s=%d; pad that dimension or map %r elsewhere in '
                'mesh.rules', len(replicated), path, list(shape), name, size, axis,
                mesh.shape[axis], name)
  return shardings


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of [batch, length] input arrays."""
  return NamedSharding(mesh, logical_to_spec(('batch', 'length'), rules))


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """This process's rows -> global jax.Arrays laid out over the whole mesh.

  Each process passes whole rows: where `length` is split over mesh axes (sequence
  sharding), each device takes its columns of them, also across processes."""
  splits = math.prod(sharding.mesh.shape[a] for a in _spec_axes(sharding.spec, 0))
  _, count = data_shard(sharding, splits)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      sharding, x, (x.shape[0] * count, *x.shape[1:])), local_batch)


def _spec_axes(spec: P, dim: int) -> tuple[str, ...]:
  entry = spec[dim] if dim < len(spec) else None
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)



def data_shard(sharding: NamedSharding, batch_size: int,
               process_of=lambda device: device.process_index) -> tuple[int, int]:
  """(index, count): this process loads slice `index` of `count` equal slices of the
  global batch, as many rows as its devices hold under the batch `sharding`. That is one
  slice per process unless a mesh axis that does not split the batch (e.g. `tensor`)
  spans processes: processes whose devices hold the same rows load the same slice
  (`global_batch` then places each process's rows on its devices)."""
  held = collections.defaultdict(set)  # process -> the (start, stop) row ranges it holds
  # Rows only: the other dimensions (`length`, when sequence-sharded) do not decide them.
  by_row = NamedSharding(sharding.mesh, P(sharding.spec[0] if len(sharding.spec) else None))
  for device, index in by_row.devices_indices_map((batch_size,)).items():
    held[process_of(device)].add(index[0].indices(batch_size)[:2])
  slices = sorted({frozenset(rows) for rows in held.values()}, key=min)
  sizes = [sum(b - a for a, b in rows) for rows in slices]
  if len(set(sizes)) > 1 or sum(sizes) != batch_size:
    raise ValueError(f'the batch sharding gives processes unequal or overlapping rows of '
                     f'the global batch of {batch_size} ({[sorted(r) for r in slices]}); '
                     'shape the mesh so that processes hold equal shares of the batch axes')
  return slices.index(frozenset(held[jax.process_index()])), len(slices)
