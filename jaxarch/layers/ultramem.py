"""UltraMem memory layer (Huang et al., "Ultra-Sparse Memory Network", arXiv 2411.12364).

A product-key memory: a table of `N = n²` values of which each token reads `top_k`, so
parameters grow without growing compute. Per token and head (UltraMem, arXiv 2411.12364):

1. query `W_q x -> [2, d_k]` (row half, column half), each LayerNormed (gain d_k^-0.33);
   `heads_per_query` adjacent heads may share one (2: pairs, an option of the release);
2. TDQKR: row and column scores `R, Cl [n', r]` against LayerNormed keys
   `[2, n', d_k, r]` (`n' = n·√E`); the rank-1 approximation `u vᵀ` of the summed Tucker
   cores `ΣC_i` ranks rows by `R·u` and columns by `Cl·v`; the top-m of each side span an
   `m × m` grid scored exactly per core, `S_i = R C_i Clᵀ`; the best `top_k` by `Σ_i S_i`
   are kept with their per-core scores `[top_k, c]`;
3. IVE: a virtual index `row·n' + col` in `[0, E·N)` goes through a fixed pseudo-random
   permutation `π` (`IvePermutation`, drawn from `permutation_seed`, so nothing of size
   E·N is stored); `physical = π mod N`, `group = π div N`;
4. the value (dim `d_v`) is split into `c` slices, slice `i` weighted by core `i`'s score;
   the weighted sum of the selected values per group (`sparse_lookup`, all heads into the
   same bags) gives `[E, d_v]`, flattened and projected to `d_model`.

The caller applies the pre-norm (the transformer reads the normalised FFN input of the
`read` block); this layer maps `x [b, s, d_model] -> [b, s, d_model]`.

Choices where the paper leaves room, stated once here:
- `top_m` (rows / columns kept per side) defaults to `top_k`, as the authors' release:
  the `k × k` candidate grid holds k times more candidates than needed.
- Rows and columns are ranked by `|R·u|` and `|Cl·v|` (`rank_by_magnitude=True`), not by
  `R·u` as the paper reads: with LayerNormed queries and keys the side scores are
  symmetric around 0, and a large score is as often (−)·(−) as (+)·(+); ranking by the
  signed value never searches the (−, −) quadrant. Measured recall of the true top-16 of
  64K virtual values at init (tests/test_ultramem.py): 0.98 by magnitude, 0.49 signed.
- Scores are the raw Tucker scores (no softmax), times one constant fixed at
  construction, `score_scale`, so that the output variance at init does not depend on
  `top_k` or `num_values`: raw top-k scores grow with `k` (more terms) and with `E·N`
  (the k-th best of more candidates is larger). The constant is `sqrt(E / (H·k·E[S²]))`
  with `E[S²]` the mean square of a top-k score at init (estimated from the init scales:
  a top-k score is about the product of a top-√k row and a top-√k column score), so
  that with values `~ N(0, 0.02²)` the output std is about 0.02 (measured 0.0198 and
  0.0192 for (k, N) = (16, 1024) and (64, 16384)).
- `u, v` are outside the gradient: they only choose candidates (a piecewise constant
  function of them), and SVD gradients blow up when singular values nearly coincide.
  Every non-deterministic forward (`deterministic=False`, the default; `nnx.Module.eval`
  sets it) recomputes them from `stop_gradient(ΣC_i)` before scoring, flipping their sign
  to agree with the stored vectors; the trainer's step recomputes them again after the
  update (`refresh_state`), so the vectors a checkpoint holds are of its cores and
  evaluation and serving, which only read them, rank by the same vectors.
- Heads share the value table and their reads are summed into the same bags.
- IVE groups are the bags of one lookup (`sparse_lookup(..., bags=group)`): `c` lookup
  rows of `H·k` entries per token, each entry summed into its group's bag, so every
  selected value row is read once (not `E·c` rows of `H·k` slots, `E − 1` of every `E`
  weighing 0).

Reported through `jaxarch.layers.signals`: aux loss `aux_loss_weight · tucker_aux` (only
when the weight is > 0); metrics `tucker_aux` (unweighted), `score_entropy` (entropy of
`|Σ_i S_i| / Σ_k |Σ_i S_i|` over a token's top-k, averaged over tokens and heads) and
`window_values_hit` (fraction of the N values read at least once in the logging window,
from the `WindowCounter` `hits [N]`); both count only the tokens that are not padding
(`segment_ids > 0`), whose reads would otherwise pass for used values.
"""

import dataclasses
import functools
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxarch.config import TABLE_SPLITS, check_ultramem, default_top_m
from jaxarch.kernels import sliced_sparse_lookup
from jaxarch.kernels.top_k import chunked_top_k
from jaxarch.layers import layout as layout_lib
from jaxarch.layers import signals
from jaxarch.layers.params import normal, param
from jaxarch.parallel import context

class TuckerVectors(nnx.Variable):
  """Leading singular vectors of ΣC_i: refreshed by the forward pass, never trained."""


def _wide(dtype):
  """fp32, or fp64 for fp64 inputs (finite-difference tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def _layer_norm(x: jax.Array, axis: int = -1, eps: float = 1e-5) -> jax.Array:
  x = x.astype(_wide(x.dtype))
  mean = jnp.mean(x, axis=axis, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=axis, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def _mul_mod(x: jax.Array, m: jax.Array, mod: int) -> jax.Array:
  """x·m mod `mod` for int32 x, m in [0, mod), mod < 2^30 (no int64 needed): double and
  add over m's bits."""
  r = jnp.zeros_like(x)
  for bit in reversed(range(mod.bit_length())):
    r = (2 * r) % mod
    r = jnp.where((m >> bit) & 1, (r + x) % mod, r)
  return r


@dataclasses.dataclass(frozen=True)
class IvePermutation:
  """The IVE map π of [0, E·N) onto itself, as (physical, group) of x = hi·N + lo: three
  bijective rounds over the pair (hi in [0, E), lo in [0, N)): lo ← a_hi·lo + b_hi (mod N,
  a_hi coprime to N); hi ← hi + hash(lo) (mod E); lo ← a'_hi·lo + b'_hi. The E virtual
  values that share a physical one are then spread over the grid pseudo-randomly; an
  affine map of x alone would make `x mod N` decide the physical value, so that they would
  all sit in one column at fixed row offsets. Hashable (a static attribute of the layer)."""
  num_values: int
  expansion: int
  rounds: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # ((a_hi), (b_hi)) x 2
  key: int  # odd: a multiplicative hash of lo

  @classmethod
  def draw(cls, num_values: int, expansion: int, seed: int) -> 'IvePermutation':
    n, gen = num_values, np.random.default_rng(seed)

    def coprime():
      while True:
        a = int(gen.integers(1, n)) if n > 1 else 1
        if math.gcd(a, n) == 1:
          return a

    rounds = tuple((tuple(coprime() for _ in range(expansion)),
                    tuple(int(b) for b in gen.integers(0, n, expansion))) for _ in range(2))
    return cls(num_values, expansion, rounds, int(gen.integers(0, 2**31)) * 2 + 1)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int32 virtual indices -> (physical index, group)."""
    n, e = self.num_values, self.expansion
    affine = lambda r, hi, lo: (_mul_mod(lo, jnp.asarray(r[0], jnp.int32)[hi], n)
                                + jnp.asarray(r[1], jnp.int32)[hi]) % n
    hi, lo = x // n, x % n
    lo = affine(self.rounds[0], hi, lo)
    mixed = (lo.astype(jnp.uint32) * np.uint32(self.key)) >> 16
    hi = (hi + (mixed % np.uint32(e)).astype(jnp.int32)) % e
    return affine(self.rounds[1], hi, lo), hi


def _tail_mean_square(k: float, n: int) -> float:
  """E[X² | X among the top k of n standard normals] (Gaussian tail, k/n <= 1/2)."""
  frac = min(k / n, 0.5)
  a = statistics.NormalDist().inv_cdf(1 - frac)
  density = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
  return 1 + a * density / frac


def _causal_depthwise_conv(x, kernel, segment_ids):
  """y[t] = Σ_j kernel[K-1-j] · x[t-j], taps restricted to the same document."""
  s = x.shape[1]
  out = x * kernel[-1]
  for j in range(1, kernel.shape[0]):
    shifted = jnp.pad(x, ((0, 0), (j, 0), (0, 0)))[:, :s]
    tap = shifted * kernel[-1 - j]
    if segment_ids is not None:
      same = jnp.pad(segment_ids, ((0, 0), (j, 0)), constant_values=-1)[:, :s] == segment_ids
      tap = tap * same[..., None]
    out = out + tap
  return out


class UltraMem(nnx.Module):
  """x [b, s, d_model] (already normed) -> memory read [b, s, d_model]."""

  def __init__(self, d_model: int, *, num_values: int, top_k: int, value_dim: int,
               key_dim: int, tucker_rank: int = 2, num_cores: int = 2,
               ive_expansion: int = 1, num_heads: int = 1, top_m: int | None = None,
               aux_loss_weight: float = 0.0, aux_tau: float = 0.15, query_conv: int = 0,
               heads_per_query: int = 1, rank_by_magnitude: bool = True, permutation_seed: int = 0,
               lookup_impl: str = 'auto', lookup_scatter: str = 'sorted',
               table_split: str = 'rows', top_k_chunk: int = 0, dtype=jnp.bfloat16,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.top_m = check_ultramem(num_values, top_k, value_dim, key_dim, tucker_rank, num_cores,
                        ive_expansion, num_heads, top_m, aux_loss_weight, aux_tau,
                        query_conv, heads_per_query)
    self.heads_per_query = heads_per_query
    self.num_values, self.top_k, self.value_dim = num_values, top_k, value_dim
    self.num_heads, self.num_cores, self.expansion = num_heads, num_cores, ive_expansion
    self.keys_per_side = math.isqrt(num_values) * math.isqrt(ive_expansion)
    self.aux_loss_weight, self.aux_tau = aux_loss_weight, aux_tau
    self.lookup_impl, self.lookup_scatter, self.dtype = lookup_impl, lookup_scatter, dtype
    self.top_k_chunk = top_k_chunk  # keys ranked in chunks (the same result; kernels/top_k.py)
    if table_split not in TABLE_SPLITS:
      raise ValueError(f'UltraMem: table_split={table_split!r}; expected one of {TABLE_SPLITS}')
    self.table_split = table_split
    self.rank_by_magnitude = rank_by_magnitude
    self.deterministic = False
    h, c, r, d_k = num_heads, num_cores, tucker_rank, key_dim

    self.permutation = IvePermutation.draw(num_values, ive_expansion, permutation_seed)

    self.query_conv = None if not query_conv else param(
        rngs, lambda key, shape, dt: jnp.zeros(shape, dt).at[-1].set(1),  # identity at init
        (query_conv, d_model), (None, 'embed'), param_dtype)
    q = h // heads_per_query  # distinct queries; each serves heads_per_query heads
    self.query_proj = param(rngs, normal(d_k ** -0.5), (d_model, q, 2, d_k),
                            ('embed', None, None, None), param_dtype)
    self.query_scale = param(rngs, jax.nn.initializers.constant(d_k ** -0.33), (q, 2, d_k),
                             (None, None, None), param_dtype, weight_decay=False)
    self.query_bias = param(rngs, jax.nn.initializers.zeros, (q, 2, d_k),
                            (None, None, None), param_dtype, weight_decay=False)
    self.keys = param(rngs, normal(d_k ** -0.5), (h, 2, self.keys_per_side, d_k, r),
                      (None, None, None, None, None), param_dtype, weight_decay=False)
    self.cores = param(rngs, jax.nn.initializers.uniform(1.0), (h, c, r, r),
                       (None, None, None, None), param_dtype, weight_decay=False)
    table_axes = ('values', None) if table_split == 'rows' else (None, 'values')
    self.values = param(rngs, normal(0.02), (num_values, value_dim), table_axes,
                        param_dtype, weight_decay=False, optim_group='values')
    self.out_proj = param(rngs, normal((ive_expansion * value_dim) ** -0.5),
                          (ive_expansion * value_dim, d_model), (None, 'embed'), param_dtype)
    u, v = self._leading_vectors(None)
    self.u = TuckerVectors(u, out_sharding=(None, None), eager_sharding=False)
    self.v = TuckerVectors(v, out_sharding=(None, None), eager_sharding=False)
    self.hits = signals.WindowCounter(jnp.zeros((num_values,), jnp.int32),
                                      out_sharding=('values',), eager_sharding=False)
    self.drop_cache()

    # Raw scores at init: <LN(q)·g, LN(k)> has variance d_k·g² per rank component, and
    # S_i = R C_i Clᵀ has variance (d_k·g²)²·E[ΣC²] = (d_k·g²)²·r²/3 (C ~ U(0, 1)).
    # ΣC_i is close to rank 1 at init, so S ≈ σ₁(R·u)(Cl·v): the top k of the grid are
    # roughly the products of the top √k rows and top √k columns of n' keys per side.
    score_var = (d_k * d_k ** -0.66) ** 2 * r * r / 3
    mean_square = score_var * _tail_mean_square(math.sqrt(top_k), self.keys_per_side) ** 2
    self.score_scale = math.sqrt(ive_expansion / (h * top_k * mean_square))

  def init_cache(self, batch: int, length: int):
    """For cached decoding: the query conv needs this layer's inputs of earlier positions."""
    if self.query_conv is not None:
      d_model = self.query_proj.shape[0]
      self.history = nnx.Cache(jnp.zeros((batch, length, d_model), self.dtype),
                               out_sharding=('batch', 'length', 'embed'), eager_sharding=False)

  def drop_cache(self):
    self.history = nnx.data(None)  # with query_conv: inputs while decoding (init_cache)

  def inactive_params(self) -> int:
    """Value parameters a token does not read: N·d_v minus its H·k rows (upper bound on
    distinct rows; IVE adds no reads, each virtual hit reads one physical row)."""
    return (self.num_values - min(self.num_values, self.num_heads * self.top_k)) * self.value_dim

  def keep_path(self, path: jax.Array, cached: jax.Array):
    """After a tree call: keep the query inputs of its accepted path (`layers.layout`)."""
    if self.history is not None:
      self.history[...] = layout_lib.keep_path(self.history[...], path, cached)

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None,
               layout: layout_lib.Layout | None = None) -> jax.Array:
    b, s, d_model = x.shape
    if not self.deterministic:
      self.refresh_state()  # for training loops other than the trainer's step
    q = self.query(x, segment_ids, positions, layout).reshape(b * s, self.num_heads, 2, -1)
    virtual, scores = self.retrieve(q)
    physical, group = self.permute(virtual)
    bags = self.read(physical, group, scores * self.score_scale)  # t E d_v
    out_proj = self.out_proj[...].reshape(self.expansion, self.value_dim, d_model)
    out = jnp.einsum('tev,evd->td', bags.astype(self.dtype), out_proj.astype(self.dtype))
    real = None if segment_ids is None else (segment_ids > 0).reshape(b * s)  # not padding
    self._report(physical, scores, real)
    return out.reshape(b, s, d_model)

  def query(self, x: jax.Array, segment_ids: jax.Array | None = None,
            positions: jax.Array | None = None,
            layout: layout_lib.Layout | None = None) -> jax.Array:
    """x [b, s, d] -> LayerNormed queries [b, s, heads, 2, d_k] (fp32).

    While decoding (`init_cache`), a call of several tokens is a prefill from position 0
    and a call of one token continues each sequence at `positions [b, 1]`.
    """
    x = x.astype(self.dtype)
    if self.query_conv is not None:
      # The conv runs in fp32 and its output is cast: the kernel's gradient sums over the
      # tokens in fp32 (layers/params.py).
      kernel = self.query_conv[...]
      if layout is None and self.history is not None and x.shape[1] == 1:
        layout = layout_lib.one_token(positions[:, 0])  # a decode step
      if layout is not None:
        x = self._conv_along_paths(x, kernel, positions, layout)
      else:
        if self.history is not None:
          self.history[...] = jax.lax.dynamic_update_slice_in_dim(self.history[...], x, 0, 1)
        x = _causal_depthwise_conv(x, kernel, segment_ids)
      x = x.astype(self.dtype)
    q = jnp.einsum('bsd,dhpk->bshpk', x, self.query_proj[...].astype(self.dtype))
    q = _layer_norm(q) * self.query_scale[...] + self.query_bias[...]
    return jnp.repeat(q, self.heads_per_query, axis=2)  # heads sharing a query: adjacent

  def _conv_along_paths(self, x, kernel, positions, layout):
    """The causal conv of a laid-out call: the taps follow each token's parents, then the
    cached inputs before the call (`layers.layout`)."""
    rows = jnp.arange(x.shape[0])[:, None]
    if layout.cached is not None:
      self.history[...] = layout_lib.write_call(self.history[...], x, layout.cached)
    out = x * kernel[-1]
    parent = layout.parent_rows(x.shape[0])
    node = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])  # walks up each path: b t
    for j in range(1, kernel.shape[0]):
      node = jnp.where(node >= 0, jnp.take_along_axis(parent, jnp.maximum(node, 0), 1), -1)
      if layout.context is not None:  # the caches hold whole rows; position p at p + offset
        at = positions - j + layout.context_offset  # b t: the cached slot, maybe before 0
        slot = jnp.clip(at, 0, layout.context.shape[-1] - 1)
        earlier = jnp.where((node >= 0)[..., None], x[rows, jnp.maximum(node, 0)],
                            self.history[...][rows, slot])
        seen = jnp.take_along_axis(layout.context, slot[..., None], 2)[..., 0]
        exists = (node >= 0) | (seen & (at >= 0))
      elif layout.cached is None:
        earlier, exists = x[rows, jnp.maximum(node, 0)], node >= 0
      else:
        slot = jnp.where(node >= 0, layout.cached[:, None] + node, positions - j)  # b t
        earlier, exists = self.history[...][rows, jnp.maximum(slot, 0)], slot >= 0
      out = out + jnp.where(exists[..., None], earlier * kernel[-1 - j], 0)
    return out

  def side_scores(self, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q [t, h, 2, d_k] -> row scores R, column scores Cl [t, h, n', r] (fp32)."""
    keys = _layer_norm(self.keys[...], axis=-2).astype(self.dtype)  # h 2 n d r
    q = q.astype(self.dtype)
    score = lambda p: jnp.einsum('thd,hjdr->thjr', q[:, :, p], keys[:, p],
                                 preferred_element_type=_wide(self.dtype))
    return score(0), score(1)

  def retrieve(self, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q [t, h, 2, d_k] -> virtual indices [t, h, k] and per-core scores [t, h, k, c]."""
    rows_all, cols_all = self.side_scores(q)
    cores = self.cores[...].astype(rows_all.dtype)  # h c r r
    m, sg = self.top_m, jax.lax.stop_gradient
    u, v = sg(self.u[...]).astype(cores.dtype), sg(self.v[...]).astype(cores.dtype)
    proxy = jnp.abs if self.rank_by_magnitude else (lambda s: s)
    rank = functools.partial(context.top_k,
                             rank=functools.partial(chunked_top_k, chunk=self.top_k_chunk))
    _, rows = rank(proxy(jnp.einsum('thjr,hr->thj', sg(rows_all), u)), m)  # t h m
    _, cols = rank(proxy(jnp.einsum('thjr,hr->thj', sg(cols_all), v)), m)
    r_top = jnp.take_along_axis(rows_all, rows[..., None], axis=2)  # t h m r
    c_top = jnp.take_along_axis(cols_all, cols[..., None], axis=2)
    grid = jnp.einsum('thar,hrs,thbs->thab', sg(r_top), sg(cores.sum(1)), sg(c_top))
    _, best = rank(grid.reshape(*grid.shape[:2], m * m), self.top_k)  # t h k
    a, b = best // m, best % m
    r_best = jnp.take_along_axis(r_top, a[..., None], axis=2)  # t h k r
    c_best = jnp.take_along_axis(c_top, b[..., None], axis=2)
    scores = jnp.einsum('thkr,hcrs,thks->thkc', r_best, cores, c_best)
    virtual = (jnp.take_along_axis(rows, a, axis=2) * self.keys_per_side
               + jnp.take_along_axis(cols, b, axis=2))
    return virtual, scores

  def permute(self, virtual: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Virtual index in [0, E·N) -> (physical row, IVE group)."""
    return self.permutation(virtual.astype(jnp.int32))

  def read(self, physical: jax.Array, group: jax.Array, weights: jax.Array) -> jax.Array:
    """Per-group, per-core weighted value sums: [t, h, k] x2, [t, h, k, c] -> [t, E, d_v].

    Slice i of each of the token's H·k values (d_v/c columns) is weighted by core i's
    score and summed into the bag of the value's group (`kernels.sliced_sparse_lookup`).
    """
    t, h, k, c = weights.shape
    e = self.expansion
    return sliced_sparse_lookup(
        self.values[...], physical.reshape(t, h * k), weights.reshape(t, h * k, c),
        bags=group.reshape(t, h * k) if e > 1 else None, num_bags=e,
        table_split=self.table_split, impl=self.lookup_impl, scatter=self.lookup_scatter)

  def tucker_aux_loss(self) -> jax.Array:
    """mean(relu(σ_2..r − τ)²) over heads of the singular values of ΣC_i."""
    cores = self.cores[...]
    sigma = jnp.linalg.svd(cores.astype(_wide(cores.dtype)).sum(1), compute_uv=False)
    return jnp.mean(jnp.square(jax.nn.relu(sigma[:, 1:] - self.aux_tau))) if (
        sigma.shape[-1] > 1) else jnp.zeros((), sigma.dtype)

  def refresh_state(self):
    """`u, v` of the current cores (the trainer calls it after each update)."""
    self.u[...], self.v[...] = self._leading_vectors(self.u[...])

  def _leading_vectors(self, previous):
    """(u, v) [h, r]: leading singular vectors of stop_gradient(ΣC_i), sign-aligned."""
    core = jax.lax.stop_gradient(self.cores[...])
    core = core.astype(_wide(core.dtype)).sum(1)
    left, _, right = jnp.linalg.svd(core)
    u, v = left[..., :, 0], right[..., 0, :]
    ref = jnp.ones_like(u) if previous is None else previous.astype(u.dtype)
    sign = jnp.where(jnp.sum(u * ref, axis=-1, keepdims=True) < 0, -1.0, 1.0)
    return u * sign, v * sign

  def _report(self, physical, scores, real=None):
    """Aux loss and metrics; the usage metrics count the `real` [t] tokens (None: all)."""
    aux = self.tucker_aux_loss()
    if self.aux_loss_weight > 0:
      signals.add_aux_loss(self, self.aux_loss_weight * aux)
    signals.add_metric(self, 'tucker_aux', aux)
    total = jnp.abs(jax.lax.stop_gradient(scores).sum(-1))  # t h k
    p = total / jnp.maximum(total.sum(-1, keepdims=True), 1e-9)
    entropy = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-9)), axis=-1)  # t h
    signals.add_metric(self, 'score_entropy', jnp.mean(signals.real_mean(entropy, real)),
                       per_token=True)
    reads = 1 if real is None else jnp.broadcast_to(
        real[:, None, None], physical.shape).reshape(-1).astype(jnp.int32)
    hits = self.hits[...].at[physical.reshape(-1)].add(reads)
    self.hits[...] = hits
    signals.add_metric(self, 'window_values_hit', jnp.mean((hits > 0).astype(jnp.float32)))
