"""Parameter creation with logical sharding axes.

Every weight in jaxarch is made here so that it carries, as Flax NNX metadata, the
logical names of its axes (`embed`, `mlp`, `heads`, ...). `jaxarch.parallel.sharding`
maps those names to mesh axes through `mesh.rules`; the modules never see the mesh.
Eager sharding is off: shardings are applied once, by the jitted initialiser.

Weights are kept in `param_dtype` (fp32) and cast to the compute dtype (bf16) where they
are used. A weight that is broadcast over the batch's positions (a bias, a learned pad or
slot embedding, BiTA's prompt and mask tokens, a per-channel conv kernel) is combined with
the activations in fp32 and the result cast, not cast first: its gradient is a sum over
every position, which the transpose of a bf16 broadcast runs as a bf16 reduction (XLA
accumulates a reduction in its operand's type; `jnp.sum` upcasts, a transpose does not).
Such a sum of 262,144 terms lost 1.7% on CPU, against 5e-8 in fp32. A matmul's weight
gradient needs nothing: its products are accumulated in fp32.

Inside `grouped_draws()` (the jitted initialiser), the normal weights are drawn by one
loop per (shape, dtype, truncation) over their keys: each weight gets the values its own
draw would, and XLA compiles one random-number program per group, not one per weight.
"""

import collections
from collections.abc import Callable, Iterator, Sequence
import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]

# The normal draws `param` leaves to the enclosing `grouped_draws` (None outside one):
# (variable, initializers, stream keys, stream counts, stacked) each: one of each for a
# weight; one per layer for a weight `stack_layers` stacked (its value [layers, ...]).
_PENDING: contextvars.ContextVar[list | None] = contextvars.ContextVar('pending_draws',
                                                                       default=None)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
           axes: Sequence[str | None], dtype=jnp.float32, *,
           weight_decay: bool = True, **metadata) -> nnx.Param:
  """A trainable weight with logical `axes`; `weight_decay=False` for norms and embeddings."""
  if len(axes) != len(shape):
    raise ValueError(f'param of shape {tuple(shape)} needs {len(shape)} axis names, got {axes}')
  pending = _PENDING.get()
  if pending is None or not isinstance(init, Normal):
    value = init(rngs.params(), tuple(shape), dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False,
                     weight_decay=weight_decay, **metadata)
  # What `rngs.params()` does (its key folded with its count, then the count moved on),
  # left to the grouped draw, which folds every key of a group in one program.
  stream = rngs.params
  variable = nnx.Param(jnp.zeros(tuple(shape), dtype), out_sharding=tuple(axes),
                       eager_sharding=False, weight_decay=weight_decay, **metadata)
  pending.append((variable, (init,), (stream.key[...],), (stream.count[...],), False))
  stream.count[...] += 1
  return variable


@dataclasses.dataclass(frozen=True)
class Normal:
  """N(0, std²), cut at ±truncation·std if `truncation` > 0: the values of jax's
  (truncated_)normal initialisers, from an object `grouped_draws` can group by."""
  std: float
  truncation: float = 0.0

  def __call__(self, key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    return _draw(key, jnp.asarray(self.std, dtype), shape=tuple(shape), dtype=dtype,
                 truncation=self.truncation)


def _draw(key, std, *, shape, dtype, truncation):
  """jax.nn.initializers' (truncated_)normal with `std` an argument, so that one loop
  body draws a whole group."""
  if truncation > 0:
    return jax.random.truncated_normal(key, -truncation, truncation, shape, dtype) * std
  return jax.random.normal(key, shape, dtype) * std


@contextlib.contextmanager
def grouped_draws() -> Iterator[None]:
  """Builds the model's normal weights with one draw per (shape, dtype, truncation).

  Drawn one by one, the weights of dense 680m (24 layers) make ~170 key derivations and
  random-number programs, and the initialiser compiled in 9.9 s on CPU, about as long as
  the train step (13.7 s); grouped, 2.5 s, with the same values. Each weight keeps the key
  and count `rngs.params()` would have given it, in the same order, so its values are
  those of drawing it alone. A module must not read a normal weight's value while it is
  built inside the block (it holds zeros until the block ends).
  """
  pending = []
  token = _PENDING.set(pending)
  try:
    yield
  finally:
    _PENDING.reset(token)
  groups = collections.defaultdict(list)  # -> (variable, layer or None, std, key, count)
  for variable, inits, keys, counts, stacked in pending:
    value = variable.get_value()
    shape = value.shape[1:] if stacked else value.shape
    for layer, (init, key, count) in enumerate(zip(inits, keys, counts)):
      groups[shape, value.dtype, init.truncation].append(
          (variable, layer if stacked else None, init.std, key, count))
  layers = {}  # id of a stacked variable -> (it, {layer: its slice})
  for (shape, dtype, truncation), members in groups.items():
    def draw(args, shape=shape, dtype=dtype, truncation=truncation):
      key, count, std = args
      return _draw(jax.random.fold_in(key, count), std, shape=shape, dtype=dtype,
                   truncation=truncation)
    _, _, stds, keys, counts = zip(*members)
    # A loop, not a vmap: XLA would fuse a vmapped draw into each weight's slice of it.
    values = jax.lax.map(draw, (jnp.stack(keys), jnp.stack(counts), jnp.asarray(stds, dtype)))
    for (variable, layer, *_), value in zip(members, values):
      if layer is None:
        variable.set_value(value)
      else:
        layers.setdefault(id(variable), (variable, {}))[1][layer] = value
  for variable, slices in layers.values():
    variable.set_value(jnp.stack([slices[layer] for layer in range(len(slices))]))


def stack_layers(variables: Sequence[nnx.Variable]) -> nnx.Variable:
  """`variables[0]`, made to hold every one of `variables` (one per layer, alike in
  shape and kind) stacked [layers, ...], its axis names led by None: a scanned stack's
  layers are not split over devices. Inside `grouped_draws`, weights still to be drawn
  stay so, each layer's slice with its own key and count: the stacked weights get the
  values the layers' weights would have had."""
  first, n = variables[0], len(variables)
  pending = _PENDING.get() or []
  ids = {id(v) for v in variables}
  draws = {id(entry[0]): entry for entry in pending if id(entry[0]) in ids}
  if 0 < len(draws) < n:
    raise ValueError(f'stack_layers: {len(draws)} of the {n} layers draw this weight from '
                     'a normal distribution, the others otherwise; stack alike weights')
  if draws:
    entries = [draws[id(v)] for v in variables]
    pending[:] = [entry for entry in pending if id(entry[0]) not in ids]
    pending.append((first, *(tuple(e[i][0] for e in entries) for i in (1, 2, 3)), True))
    value = first.get_value()
    first.set_value(jnp.zeros((n, *value.shape), value.dtype))
  else:
    first.set_value(jnp.stack([v.get_value() for v in variables]))
  axes = first.get_metadata().get('out_sharding')
  if axes is not None:
    first.set_metadata('out_sharding', (None, *axes))
  return first


def normal(std: float, truncation: float = 0.0) -> Initializer:
  """N(0, std²); with `truncation` > 0 cut at ±truncation·std (`model.init_truncation`;
  MEGABYTE's paper init cuts at 2σ), which leaves a std below `std` (0.88·std at 2σ)."""
  return Normal(std, truncation)
