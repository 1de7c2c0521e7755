"""The mesh and logical-axis rules in force while a step is traced.

Most layers never need them: XLA propagates the shardings of weights and batches. Layers
that must place work explicitly (a sharded memory-value lookup, expert all-to-all) read
them here with `current()`; the train step enters `logical_mesh(...)` around its body, so
the context exists exactly while the step is traced and nowhere else.
"""

import contextlib
import contextvars

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxarch.parallel.sharding import Rules, logical_to_spec

_CURRENT: contextvars.ContextVar = contextvars.ContextVar('jaxarch_logical_mesh', default=None)


@contextlib.contextmanager
def logical_mesh(mesh: Mesh, rules: Rules):
  token = _CURRENT.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _CURRENT.reset(token)


def current() -> tuple[Mesh, Rules] | None:
  """(mesh, rules) inside `logical_mesh`, else None (e.g. a model run eagerly on one device)."""
  return _CURRENT.get()


def mesh_axes(logical: str, size: int | None = None) -> tuple[str, ...]:
  """Mesh axes of size > 1 that a logical axis maps to in the current context; () outside.

  With `size`, the axes a dimension of that size is split over as `tree_shardings` places
  it (mesh axes that do not divide it are dropped).
  """
  ctx = current()
  if ctx is None:
    return ()
  mesh, rules = ctx
  shape = None if size is None else (size,)
  spec = logical_to_spec((logical,), rules, shape, mesh if shape else None)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return tuple(a for a in axes if mesh.shape[a] > 1)


def constrain(x: jax.Array, logical_axes) -> jax.Array:
  """`x` laid out as its logical axes say (e.g. ('batch', 'length', None)) in the current
  context; as it is outside. For a value whose layout XLA would otherwise take from a
  weight's, where the two disagree (see `Embed`)."""
  ctx = current()
  if ctx is None:
    return x
  mesh, rules = ctx
  spec = logical_to_spec(logical_axes, rules, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def top_k(x: jax.Array, k: int, rank=jax.lax.top_k) -> tuple[jax.Array, jax.Array]:
  """`rank(x, k)` (`jax.lax.top_k` or an equal) of x [rows, ..., n], each device ranking
  its own rows: the rows split over the `batch` axes (those that divide them) in the
  current context. XLA's SPMD partitioner replicates a top-k: left to it, every device
  gathers the whole batch's rows and ranks all of them (the MoE router's gates; UltraMem's
  key scores, 90% of the bytes its fsdp=8 step gathered)."""
  axes = mesh_axes('batch', x.shape[0])
  if not axes:
    return rank(x, k)
  mesh, _ = current()
  spec = P(axes, *[None] * (x.ndim - 1))
  return jax.shard_map(lambda rows: tuple(rank(rows, k)), mesh=mesh, in_specs=spec,
                       out_specs=(spec, spec))(x)
