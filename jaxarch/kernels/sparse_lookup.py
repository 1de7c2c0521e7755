"""The embedding-bag `out[t] = Σ_k weights[t, k] · values[indices[t, k]]` and its VJP.

This is the hot spot of memory layers (UltraMem): memory-bound in the forward, a
scatter-add into the whole table in the backward. A gather-then-sum written with `take`
would keep the gathered `[T, K, D]` tensor alive for the backward (TensorFlow's
EmbeddingBag ran out of memory that way), so the op has a custom VJP whose residuals are
only its inputs: the backward gathers the rows again.

- `grad_values` is a scatter-add of `weights[t, k] · g[t]` into row `indices[t, k]`
  (repeated indices accumulate), in fp32;
- `grad_weights[t, k] = <g[t], values[indices[t, k]]>`.

**Bags** (`bags [T, K]`, ints in `[0, B)`): token t has B outputs and entry (t, k) adds
to `out[t, bags[t, k]]`; `g[t]` above is then `g[t, bags[t, k]]`. This is UltraMem's IVE,
where a token's entries fall in E groups: one lookup of the token's K entries instead of
E lookups of K slots each, E-1 of every E weighing 0 (which would still be E× the loop
steps, the sort keys of the sorted scatter and the `grad_weights` dots). The XLA and GPU
kernels take bags; the TPU kernels run the E lookups (E× the row DMAs: not yet measured).

**Implementations** (`impl`): `'xla'` is the pure-JAX reference (`lookup_xla`);
`'pallas'` runs the Pallas kernels of the platform, Triton on GPU (`lookup_triton`) and
Mosaic on TPU (`lookup_tpu`); `'interpret'` runs the GPU kernels and `'interpret_tpu'` the
TPU kernels in Pallas' interpreter on any backend (the CPU tests); `'auto'` is `'pallas'`
on GPU/TPU and `'xla'` on CPU. `scatter` picks how the table gradient is summed:
`'sorted'` (rows sorted, each written once: deterministic) or `'atomic'` (fp32 atomic
adds on GPU: run-to-run bit differences). Accumulation is in fp32 (fp64 for fp64 tables
on the XLA path); the output has `values`' dtype. Pallas kernels need D to be a multiple
of 64: other widths are zero-padded (a copy of the table: choose D accordingly).

**Out-of-range indices** are clamped to `[0, N)`, so nothing outside the table is ever
read or written (64-bit numpy indices too: they are clamped before jax, which keeps their
low 32 bits without x64, would wrap them into the table). `checked=True` also reports
them through `jax.experimental.checkify` (a no-op unless the caller runs under
`checkify.checkify`).

**Empty lookups** (T, K or D of 0) are zeros; a table of no rows is an error.

**Sharded tables** (`kernels.sharded_lookup`): the table split by rows or along its
width over the mesh axes of the logical axis `values`.
"""

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.experimental.pallas import tpu as pltpu

from jaxarch.config import LOOKUP_IMPLS as IMPLS, LOOKUP_SCATTERS as SCATTERS
from jaxarch.kernels import dispatch, lookup_tpu, lookup_triton, lookup_xla

PALLAS_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
COLUMN_MULTIPLE = 64  # Pallas kernels' row width granularity


def kernels_for(impl: str, key: str = 'impl') -> str:
  """impl -> which kernels run: 'xla', 'triton', 'tpu' (compiled) or '*_interpret'."""
  return dispatch.kernels_for('sparse_lookup', impl, IMPLS, {'gpu': 'triton', 'tpu': 'tpu'}, key)


def sparse_lookup(values: jax.Array, indices: jax.Array, weights: jax.Array, *,
                  bags: jax.Array | None = None, num_bags: int = 1, impl: str = 'auto',
                  scatter: str = 'sorted', checked: bool = False) -> jax.Array:
  """values [N, D], indices [T, K] int, weights [T, K] -> [T, D] in values' dtype; with
  `bags [T, K]` int in `[0, num_bags)`: -> [T, num_bags, D] (see the module doc).

  Device-local semantics: under `jit` with a sharded table XLA may gather the table; use
  `kernels.sharded_lookup` for a table sharded over the logical axis `values`.
  """
  values, weights = jnp.asarray(values), jnp.asarray(weights)
  indices = indices if isinstance(indices, np.ndarray) else jnp.asarray(indices)
  if values.ndim != 2 or indices.ndim != 2 or indices.shape != weights.shape:
    raise ValueError(f'sparse_lookup: expected values [N, D], indices and weights [T, K]; '
                     f'got {values.shape}, {indices.shape}, {weights.shape}')
  indices = jnp.asarray(_host_clamped(indices, values.shape[0]))
  kernels, indices, bags = prepare(values, indices, bags, num_bags, values.shape[0], impl,
                                    scatter, checked)
  (t, k), d = indices.shape, values.shape[1]
  if 0 in (t, k, d):  # nothing to sum (and the kernels' grids would be empty)
    return jnp.zeros((t, d) if bags is None else (t, num_bags, d), values.dtype)
  return bagged_lookup(values, indices, weights, bags, num_bags, kernels, scatter)


def _host_clamped(indices, num_rows: int):
  """Numpy indices clamped to [-1, N] (still out of range for `checked`) while they may be
  64-bit: jax without x64 keeps their low 32 bits, so 2^32 + 1 would read row 1."""
  if not (isinstance(indices, np.ndarray) and np.issubdtype(indices.dtype, np.integer)):
    return indices
  return np.clip(indices, -1 if np.issubdtype(indices.dtype, np.signedinteger) else 0, num_rows)


def prepare(values, indices, bags, num_bags, num_rows, impl, scatter, checked):
  """Checks the options, reports (`checked`) and clamps indices and bags ->
  (kernels, int32 indices, int32 bags or None)."""
  kernels = kernels_for(impl)
  if scatter not in SCATTERS:
    raise ValueError(f'sparse_lookup: scatter={scatter!r}; expected one of {SCATTERS}')
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f'sparse_lookup: indices must be integers, got {indices.dtype}')
  if num_rows < 1:
    raise ValueError(f'sparse_lookup: the table values {list(values.shape)} has no rows to '
                     'look up')
  if bags is None:
    if num_bags != 1:
      raise ValueError(f'sparse_lookup: num_bags={num_bags!r} needs bags (which bag each '
                       'entry adds to)')
  else:
    bags = jnp.asarray(bags)
    if bags.shape != indices.shape or not jnp.issubdtype(bags.dtype, jnp.integer):
      raise ValueError(f'sparse_lookup: bags must be integers shaped like indices '
                       f'{indices.shape}, got {bags.dtype}{list(bags.shape)}')
    if isinstance(num_bags, bool) or not isinstance(num_bags, numbers.Integral) or num_bags < 1:
      raise ValueError(f'sparse_lookup: num_bags must be a positive int, got {num_bags!r}')
    if checked:
      checkify.debug_check(jnp.all((bags >= 0) & (bags < num_bags)),
                           f'sparse_lookup: a bag is outside [0, {num_bags}) (it was clamped)')
    bags = jnp.clip(bags, 0, num_bags - 1).astype(jnp.int32)
  if impl == 'auto' and values.dtype not in PALLAS_DTYPES:
    kernels = 'xla'  # e.g. a float64 table: the kernels take 16- and 32-bit floats
  if kernels != 'xla' and values.dtype not in PALLAS_DTYPES:
    raise ValueError(f'sparse_lookup: the Pallas kernels take float32/bfloat16/float16 '
                     f"tables, got {values.dtype}; use impl='xla'")
  if checked:
    report_out_of_range(indices, num_rows)
  return kernels, jnp.clip(indices, 0, num_rows - 1).astype(jnp.int32), bags


def report_out_of_range(indices: jax.Array, num_rows: int):
  """`checked`: reports indices outside `[0, num_rows)` through checkify."""
  checkify.debug_check(jnp.all((indices >= 0) & (indices < num_rows)),
                       f'sparse_lookup: an index is outside the table [0, {num_rows}) '
                       '(it was clamped)')


def _accumulation_dtype(values: jax.Array):
  return jnp.promote_types(values.dtype, jnp.float32)


def _padded(values: jax.Array) -> jax.Array:
  """Pallas kernels need D % 64 == 0: pad columns with zeros."""
  pad = -values.shape[1] % COLUMN_MULTIPLE
  return jnp.pad(values, ((0, 0), (0, pad))) if pad else values


def _interpret(kernels: str):
  if kernels == 'tpu_interpret':
    return pltpu.InterpretParams()
  return kernels.endswith('_interpret')


def one_lookup_per_bag(indices: jax.Array, weights: jax.Array, bags: jax.Array,
                       num_bags: int) -> tuple[jax.Array, jax.Array]:
  """Bags as plain lookups: [T, K] x3 -> indices and weights [T·B, K], row t·B + b holding
  all K slots of token t, those of other bags at weight 0 (E× the slots)."""
  t, k = indices.shape
  in_bag = bags[:, None] == jnp.arange(num_bags)[:, None]  # t b k
  return (jnp.broadcast_to(indices[:, None], in_bag.shape).reshape(t * num_bags, k),
          jnp.where(in_bag, weights[:, None], 0).reshape(t * num_bags, k))


def bagged_lookup(values, indices, weights, bags, num_bags, kernels, scatter):
  """`sparse_lookup` on `prepare`d inputs (the sharded forms call it on each device's rows).

  The TPU kernels take no bags: there, they run `one_lookup_per_bag`."""
  if bags is None or not kernels.startswith('tpu'):
    return _lookup_lowered_once(values, indices, weights, bags, kernels, scatter, num_bags)
  out = _lookup_lowered_once(values, *one_lookup_per_bag(indices, weights, bags, num_bags),
                             None, kernels, scatter, 1)
  return out.reshape(indices.shape[0], num_bags, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _lookup(values, indices, weights, bags, kernels, scatter, num_bags):
  return _forward(values, indices, weights, bags, kernels, num_bags)


def _forward(values, indices, weights, bags, kernels, num_bags):
  d = values.shape[1]
  weights = weights.astype(_accumulation_dtype(values))
  if kernels == 'xla':
    out = lookup_xla.forward(values, indices, weights, bags, num_bags)
  elif kernels.startswith('triton'):
    with _x32():
      out = lookup_triton.forward(_padded(values), indices, weights, bags=bags,
                                  num_bags=num_bags, interpret=_interpret(kernels))
  else:
    with _x32():
      out = lookup_tpu.forward(_padded(values), indices, weights,
                               interpret=_interpret(kernels))
  return out[..., :d].astype(values.dtype)


def _lookup_fwd(values, indices, weights, bags, kernels, scatter, num_bags):
  del scatter  # backward only
  return (_forward(values, indices, weights, bags, kernels, num_bags),
          (values, indices, weights, bags))


def _lookup_bwd(kernels, scatter, num_bags, residuals, g):
  del num_bags  # g's shape
  values, indices, weights, bags = residuals
  n, d = values.shape
  acc = _accumulation_dtype(values)
  w, g = weights.astype(acc), g.astype(acc)
  if kernels == 'xla':
    grad_values, grad_w = lookup_xla.backward(values, indices, w, g, scatter, bags)
  else:
    padded = _padded(values)
    g = jnp.pad(g, [(0, 0)] * (g.ndim - 1) + [(0, padded.shape[1] - d)])
    with _x32():
      grad_values, grad_w = _pallas_backward(kernels, scatter, padded, indices, w, g, bags)
  int_zero = lambda a: None if a is None else jnp.zeros(a.shape, jax.dtypes.float0)
  return (grad_values[:n, :d].astype(values.dtype), int_zero(indices),
          grad_w.astype(weights.dtype), int_zero(bags))


def _pallas_backward(kernels, scatter, padded, indices, w, g, bags):
  if kernels.startswith('triton'):
    return lookup_triton.backward(padded, indices, w, g, bags=bags, scatter=scatter,
                                  interpret=_interpret(kernels))
  return lookup_tpu.backward(padded, indices, w, g, interpret=_interpret(kernels))


def _x32():
  """The Pallas kernels are traced with x64 off, whatever the caller's `jax_enable_x64`:
  their loop counters, `arange`s and Python ints are int32, as their int32 indices are (with
  x64 on they would be int64, which their index arithmetic refuses)."""
  return jax.enable_x64(False)


_lookup.defvjp(_lookup_fwd, _lookup_bwd)
# The memory layers look up at the same shapes: jitted, their calls (and gradients) share
# one lowering of the kernels instead of one per layer (XLA inlines the calls).
_lookup_lowered_once = jax.jit(_lookup, static_argnums=(4, 5, 6))
