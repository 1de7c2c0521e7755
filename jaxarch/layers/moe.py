"""Token-choice mixture of experts: router, SwiGLU experts, two execution paths.

**Router** (fp32): logits `td,de->te`, gates by softmax or sigmoid, the top-k experts per
token chosen by `gates + bias` (the bias is DeepSeek-V3's auxiliary-loss-free balancing:
raised for under-loaded experts by `bias_update_rate · sign(mean load − load)` once per
training step, from the load of the step's whole batch, outside the gradient), weights =
the chosen gates, renormalised to sum to 1 if asked. Losses: the Switch/GShard balance
loss `E · Σ_e f_e · P_e` (`f_e` the fraction of assignments to expert e, `P_e` its mean
gate probability) and the router z-loss `mean(logsumexp(logits)²)`. These statistics,
the bias move and the dropped fraction count only the tokens that are not padding
(`real`): what fills a row's end would otherwise pull on the router (and, coming last
in its row, is the first to be dropped).

**Experts** run per device on its own tokens (inside `shard_map` over the batch axes),
with the experts split over the mesh axes of the logical axis `expert`:
- *dropless* (`capacity_factor=None`): assignments sorted by expert, one grouped matmul
  per projection (`kernels.grouped_matmul`: Pallas kernels on GPU, `ragged_dot`
  elsewhere; `matmul_impl`), unsorted. The sort and unsort are permutations
  with a custom VJP: their backward is a gather by the inverse permutation, not the
  scatter-add that `take` would give.
- *capacity* (`capacity_factor=c`): each expert takes at most `ceil(c · s·k / E)` of a
  sequence's s·k assignments, first come first served in token order (a token's top-1
  to top-k, then the next token's); the rest are dropped, pass through the residual
  only, and are counted. So whether a token is dropped depends only on the tokens
  before it in its own sequence: the model stays causal and independent of the batch's
  other rows (ranking all top-1 choices of the batch first, as GShard does, lets a later
  token or another row push an earlier token out). Served (`capacity_of_real`), s is a
  prompt's own length, not the bucket its batch is padded to.

- dropless with few tokens on a device (`T·k <= E`, e.g. a decode step): each assignment
  multiplies its expert's weights gathered by index, so only the chosen experts are read
  from memory.

**Hidden-unit parallelism.** Mesh axes that split the experts' `mlp` dimension but not
the tokens (`tensor` under the default rules) split each expert's SwiGLU as in Megatron:
each device computes its hidden units of every assignment and the outputs are summed
over those axes (one `psum` of `[T, d]`), so no two devices compute the same product.

**Expert parallelism.** With the experts split over n devices, the capacity path sends
its `[E, C, d]` buffers with one `all_to_all` there and back. The dropless path has two
exchanges (`model.moe.ep_exchange`):

- `'ragged'` sorts each device's assignments by expert and sends each shard only the
  rows for its experts with `jax.lax.ragged_all_to_all`: the devices first share how many
  rows each sends each expert (an `all_gather` of [n, E] counts), from which every device
  computes where its slices go and what it receives; the receiver sorts what arrived by
  its local experts, runs the grouped matmul and sends the results back the same way.
  Only the real rows cross the links, n times fewer bytes than padded buffers.
- `'padded'`: each device sends every shard `S` rows per sequence with `all_to_all`,
  with their local expert ids (`S = s·min(k, E/n)`, the worst case; or
  `ceil(ep_capacity_factor · s·k / n)` to bound the memory, in which case a sequence's
  overflow is dropped first come first served, as in the capacity path, so the model
  stays causal, and counted).

Either receive buffer holds the worst case, every device's every token with as many of
its k (different) experts as the shard holds, min(k, E/n) rows, so nothing is dropped
unless `ep_capacity_factor` says so. XLA implements `ragged_all_to_all` on GPU and TPU,
not on CPU. `'auto'` takes it on TPU only: on GPUs it has been reported at about 2% of
NVLink's bandwidth within a node (openxla/xla#33386) and, in jax 0.11's one-shot
lowering, to corrupt gradients at some expert-parallel shapes
(marin-community/marin#8077), and no GPU has run it here; there, as on CPU, `'auto'`
takes the padded exchange, NCCL's own all-to-all. `benchmarks/moe.py --tables=exchange`
times both. `'ragged_emulated'` runs the ragged path with an `all_gather` in place of
the collective (`parallel.ragged`; any backend, n times the memory): the CPU tests check
its offsets so.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from jaxarch.config import MOE_EP_EXCHANGES as EP_EXCHANGES
from jaxarch.config import MOE_GATES as GATES
from jaxarch.kernels.gmm_mosaic import MosaicTiling
from jaxarch.kernels.gmm_triton import Tiling
from jaxarch.kernels.grouped_matmul import grouped_matmul, kernels_for
from jaxarch.layers import remat, signals
from jaxarch.layers.mlp import SwiGLU
from jaxarch.layers.params import normal, param
from jaxarch.parallel import context
from jaxarch.parallel.ragged import ragged_all_to_all


class RouterBias(signals.PerStepState):
  """Per-expert selection bias (auxiliary-loss-free balancing); not trained by gradients."""


@jax.custom_vjp
def permute(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
  """x[order]; `inverse` is the inverse permutation, used by the backward (a gather)."""
  return x[order]


def _permute_fwd(x, order, inverse):
  return x[order], (order, inverse)


def _permute_bwd(residuals, g):
  order, inverse = residuals
  zero = lambda a: jnp.zeros(a.shape, jax.dtypes.float0)
  return g[inverse], zero(order), zero(inverse)


permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def repeat_rows(x: jax.Array, k: int) -> jax.Array:
  """x [T, d] -> [T·k, d], each row k times (one per assignment). Its backward adds a
  row's k gradients in fp32 and rounds once: summed in bf16, as `jnp.repeat`'s transpose
  is, they were 2.3x as far from the fp32 sum at k=8 (XLA:CPU)."""
  return jnp.repeat(x, k, axis=0)


def _repeat_rows_fwd(x, k):
  return repeat_rows(x, k), None


def _repeat_rows_bwd(k, _, g):
  t = g.shape[0] // k
  return (jnp.sum(g.reshape(t, k, *g.shape[1:]).astype(jnp.float32), axis=1).astype(g.dtype),)


repeat_rows.defvjp(_repeat_rows_fwd, _repeat_rows_bwd)


def sort_by(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(order, inverse) that sort `keys` stably."""
  order = jnp.argsort(keys, stable=True)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype),
                                                unique_indices=True)  # no atomics on GPU
  return order, inverse


def first_come_slots(buckets: jax.Array, num_buckets: int, per_group: int,
                     limits: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """buckets [g, m]: the bucket of each of group g's m assignments, in token order ->
  (slot [g·m], kept [g·m]). Bucket b's rows in a buffer of `num_buckets · g · per_group`
  hold `per_group` rows per group (or its `limits` [g] <= per_group), row (g, p) its
  p-th assignment to b: first come first served, so whether one is kept depends only on
  the assignments before it in its group. A dropped assignment's slot is the buffer's
  size (one row past it)."""
  g = buckets.shape[0]
  one_hot = jax.nn.one_hot(buckets, num_buckets, dtype=jnp.int32)  # g m b
  position = jnp.sum((jnp.cumsum(one_hot, axis=1) - 1) * one_hot, axis=2)  # g m
  kept = (position < (per_group if limits is None else limits[:, None])).reshape(-1)
  rows = g * per_group  # per bucket
  slot = (buckets * rows + jnp.arange(g)[:, None] * per_group + position).reshape(-1)
  return jnp.where(kept, slot, num_buckets * rows), kept


def scatter_rows(x: jax.Array, slot: jax.Array, rows: int, fill=0) -> jax.Array:
  """x [m, ...] into a buffer [rows, ...] at `slot` (slot `rows`: dropped); others `fill`."""
  buffer = jnp.full((rows + 1, *x.shape[1:]), fill, x.dtype).at[slot].set(x)
  return buffer[:-1]


def gather_rows(buffer: jax.Array, slot: jax.Array) -> jax.Array:
  """buffer [rows, d] at `slot` [m] -> [m, d]; zeros where slot is `rows` (dropped)."""
  return jnp.concatenate([buffer, jnp.zeros((1, buffer.shape[1]), buffer.dtype)])[slot]


def ragged_plan(counts: jax.Array, me: jax.Array, rows: int):
  """counts [n, E]: device i's assignments to each expert (the experts split into n
  shards of E/n in order); `me`: this device's index; `rows`: its receive buffer's ->
  (there, back, received): the offsets and sizes of `parallel.ragged.ragged_all_to_all`
  that send this device's rows (sorted by expert) to their shards and the results back,
  and the local expert of each row it receives [rows] (E/n past the real ones)."""
  n, e = counts.shape
  local_e = e // n
  sends = jnp.sum(counts.reshape(n, n, local_e), axis=2)  # [sender, shard] rows
  before = lambda x, axis: jnp.cumsum(x, axis=axis) - x  # exclusive prefix sums
  mine, to_me = sends[me], sends[:, me]
  # Where sender i's rows for shard j start in i's sorted rows, and land in j's buffer.
  in_sender, in_receiver = before(sends, 1), before(sends, 0)
  there = (in_sender[me], mine, in_receiver[me], to_me)
  back = (in_receiver[:, me], to_me, in_sender[:, me], mine)
  # What arrives: sender by sender, each one's rows for this shard's experts in order.
  segments = jax.lax.dynamic_slice_in_dim(counts, me * local_e, local_e, axis=1).reshape(-1)
  segment = jnp.searchsorted(jnp.cumsum(segments), jnp.arange(rows), side='right')
  received = jnp.where(segment < segments.size, segment % local_e, local_e)
  return there, back, received


def grouped_swiglu(x, group_sizes, gate, up, down, **kernels):
  """Rows of x [m, d] in contiguous groups, one expert each -> [m, d]; rows past the
  groups give 0. `kernels`: `grouped_matmul`'s choice of kernels and their settings."""
  def matmul(a, w):  # named: `model.remat=dots` keeps it (layers/remat.py)
    return checkpoint_name(grouped_matmul(a, w, group_sizes, **kernels), remat.EXPERT_MATMUL)
  h = jax.nn.silu(matmul(x, gate)) * matmul(x, up)
  return matmul(h, down)


def batched_swiglu(x, gate, up, down):
  """x [e, c, d] through expert e's SwiGLU -> [e, c, d]."""
  def matmul(spec, a, w):  # batched over experts: kept by `dots` only by its name
    return checkpoint_name(jnp.einsum(spec, a, w), remat.EXPERT_MATMUL)
  h = jax.nn.silu(matmul('ecd,edf->ecf', x, gate)) * matmul('ecd,edf->ecf', x, up)
  return matmul('ecf,efd->ecd', h, down)


def is_load(name: str) -> bool:
  return name.startswith('load_e') and name.removeprefix('load_e').isdigit()


def _max_violations(metrics: dict) -> dict[str, float]:
  """layer -> MaxVio of its loads in `metrics` (`<layer>/load_e<i>`): the busiest expert's
  share of the assignments over the balanced share, less 1 (as in auxiliary-loss-free
  balancing): 0 when balanced, E - 1 when one expert takes all."""
  loads = {}
  for key, value in metrics.items():
    layer, _, name = key.rpartition('/')
    if is_load(name):
      loads.setdefault(layer, []).append(float(value))
  return {layer: len(v) * max(v) - 1 for layer, v in loads.items()}


def load_violations(metrics: dict) -> dict[str, float]:
  """`<layer>/max_violation` of each MoE layer in a step's metrics (`_max_violations`)."""
  return {f'{layer}/max_violation' if layer else 'max_violation': value
          for layer, value in _max_violations(metrics).items()}


def eval_load_violations(means: dict) -> dict[str, float]:
  """Of per-token metrics averaged over held-out tokens: each MoE layer's
  `eval_max_violation/<layer>` (of its loads over all of them, MaxVio's global form)."""
  return {f'eval_max_violation/{layer}': value
          for layer, value in _max_violations(means).items()}


class MoE(nnx.Module):
  """x [b, s, d] (already normed) -> [b, s, d]: routed experts (+ shared experts)."""

  def __init__(self, d_model: int, *, num_experts: int, top_k: int, expert_d_ff: int,
               num_shared_experts: int = 0, capacity_factor: float | None = None,
               ep_capacity_factor: float | None = None, gate: str = 'softmax',
               renormalize: bool = True, aux_loss_weight: float = 0.01,
               z_loss_weight: float = 0.0, bias_update_rate: float = 0.0,
               matmul_impl: str = 'auto', kernel_tiling: tuple[int, ...] = tuple(Tiling()),
               mosaic_tiling: tuple[int, ...] = tuple(MosaicTiling()),
               mosaic_weight_grad: str = 'triton', ep_exchange: str = 'auto',
               init_std: float = 0.02, out_std: float | None = None,
               init_truncation: float = 0.0, dtype=jnp.bfloat16, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if gate not in GATES:
      raise ValueError(f'config error: model.moe.gate={gate!r}; expected one of {GATES}')
    if not 1 <= top_k <= num_experts:
      raise ValueError(f'config error: model.moe.top_k={top_k} must be in [1, num_experts='
                       f'{num_experts}]')
    self.num_experts, self.top_k, self.expert_d_ff = num_experts, top_k, expert_d_ff
    self.capacity_factor, self.ep_capacity_factor = capacity_factor, ep_capacity_factor
    self.gate, self.renormalize = gate, renormalize
    self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
    self.bias_update_rate, self.dtype = bias_update_rate, dtype
    self.matmul_impl, self.kernel_tiling = matmul_impl, Tiling(*kernel_tiling)
    self.mosaic_tiling, self.mosaic_weight_grad = MosaicTiling(*mosaic_tiling), mosaic_weight_grad
    self.ep_exchange = ep_exchange
    self.deterministic = False  # True: no bias update (evaluation)
    # True (serving, `infer.for_inference`): a sequence's capacity counts its real tokens,
    # so that a prompt's drops do not depend on the bucket its batch is padded to.
    self.capacity_of_real = False
    e, d, f = num_experts, d_model, expert_d_ff
    init, out = normal(init_std, init_truncation), normal(out_std or init_std, init_truncation)
    self.router = param(rngs, init, (d, e), ('embed', None), jnp.float32)
    self.bias = RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,),
                           eager_sharding=False)
    self.w_gate = param(rngs, init, (e, d, f), ('expert', 'embed', 'mlp'),
                        param_dtype)
    self.w_up = param(rngs, init, (e, d, f), ('expert', 'embed', 'mlp'),
                      param_dtype)
    self.w_down = param(rngs, out, (e, f, d),
                        ('expert', 'mlp', 'embed'), param_dtype)
    self.shared = SwiGLU(d, num_shared_experts * f, init_std=init_std, out_std=out_std,
                         init_truncation=init_truncation,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs
                         ) if num_shared_experts else None

  def inactive_params(self) -> int:
    """The routed experts a token does not use, in one layer (in a scanned stack, the
    weights are stacked [layers, E, d, f]: d is read from the end)."""
    return (self.num_experts - self.top_k) * 3 * self.w_gate.shape[-2] * self.expert_d_ff

  def __call__(self, x: jax.Array, real: jax.Array | None = None) -> jax.Array:
    """x [b, s, d]; `real` [b, s]: the tokens that are not padding (None: all), the only
    ones the routing statistics count."""
    b, s, d = x.shape
    tokens = x.reshape(b * s, d)
    real = None if real is None else real.reshape(b * s)
    weights, experts = self.route(tokens, real)
    out = self.run_experts(tokens, experts, weights.astype(self.dtype), seq_len=s, real=real)
    out = out.reshape(b, s, d)
    if self.shared is not None:
      out = out + self.shared(x)
    return out

  def route(self, tokens: jax.Array, real: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array]:
    """tokens [T, d] -> (weights [T, k] fp32, experts [T, k] int32); reports losses,
    metrics and the bias's step statistic over the `real` [T] tokens (None: all)."""
    e, k = self.num_experts, self.top_k
    logits = jnp.einsum('td,de->te', tokens.astype(jnp.float32), self.router[...])
    gates = jax.nn.softmax(logits) if self.gate == 'softmax' else jax.nn.sigmoid(logits)
    _, experts = context.top_k(jax.lax.stop_gradient(gates + self.bias[...]), k)
    weights = jnp.take_along_axis(gates, experts, axis=1)
    if self.renormalize:
      weights = weights / jnp.sum(weights, axis=1, keepdims=True)

    real = jnp.ones(tokens.shape[:1], jnp.float32) if real is None else real.astype(
        jnp.float32)
    count = jnp.maximum(jnp.sum(real), 1.0)
    mean = lambda x: signals.real_mean(x, real)
    assignments = jnp.zeros((e,), jnp.float32).at[experts.reshape(-1)].add(
        jnp.repeat(real, k))  # of the real tokens to each expert
    load = assignments / (count * k)
    probs = gates / jnp.sum(gates, axis=1, keepdims=True)  # = gates for softmax
    balance = e * jnp.sum(load * mean(probs))
    z_loss = mean(jax.nn.logsumexp(logits, axis=1) ** 2)
    if self.aux_loss_weight or self.z_loss_weight:
      signals.add_aux_loss(self, self.aux_loss_weight * balance + self.z_loss_weight * z_loss)
    signals.add_metric(self, 'balance_loss', balance)
    signals.add_metric(self, 'z_loss', z_loss)
    for i in range(e):
      signals.add_metric(self, f'load_e{i}', load[i], per_token=True)
    if self.bias_update_rate:  # how far the balancing has pushed the experts apart
      signals.add_metric(self, 'bias_spread', jnp.max(self.bias[...]) - jnp.min(self.bias[...]))
      if not self.deterministic:
        signals.add_step_statistic(self, 'assignments', assignments)
    return weights, experts.astype(jnp.int32)

  def end_step(self, assignments: jax.Array):
    """Moves the bias by the load of the step's batch: `assignments` [E], the real
    tokens' assignments to each expert (not on a batch of padding alone)."""
    total = jnp.sum(assignments)
    load = assignments / jnp.maximum(total, 1.0)
    self.bias[...] = self.bias[...] + jnp.where(total > 0, self.bias_update_rate, 0.0
                                                ) * jnp.sign(1.0 / self.num_experts - load)

  def run_experts(self, tokens, experts, weights, *, seq_len: int,
                  real: jax.Array | None = None) -> jax.Array:
    """Each device's tokens (whole sequences of `seq_len`, row-major) through their
    experts; experts split over the `expert` axes. The dropped fraction counts the
    assignments of the `real` [T] tokens (None: all)."""
    real = jnp.ones(tokens.shape[:1], bool) if real is None else real.astype(bool)
    params = tuple(w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))
    expert_axes = context.mesh_axes('expert', self.num_experts)
    batch_axes = context.mesh_axes('batch')
    # Axes that split the experts' hidden units but not the tokens (`tensor`): each of
    # their devices computes its slice of every expert's SwiGLU, summed after `down`.
    hidden_axes = tuple(a for a in context.mesh_axes('mlp', self.expert_d_ff)
                        if a not in batch_axes and a not in expert_axes)
    if not batch_axes and not expert_axes and not hidden_axes:
      out, dropped = self._local(tokens, experts, weights, real, *params, expert_axes=(),
                                 shards=1, seq_len=seq_len)
    else:
      mesh, _ = context.current()
      if mesh.size > 1 and kernels_for(self.matmul_impl) == 'mosaic_interpret':
        raise ValueError(f"model.moe.matmul_impl='interpret_mosaic' runs on one device: "
                         f"Pallas' Mosaic GPU interpreter hangs inside shard_map over several "
                         f"(this mesh has {mesh.size}); use 'interpret' (Triton's kernels) or "
                         f"'xla' on a mesh")
      shards = math.prod(mesh.shape[a] for a in expert_axes)
      tok, per_token = P(batch_axes or None, None), P(batch_axes or None)
      into = P(expert_axes or None, None, hidden_axes or None)  # gate, up: e d f
      out_of = P(expert_axes or None, hidden_axes or None, None)  # down: e f d

      # Pallas kernels declare no varying mesh axes for their outputs, so they run with
      # shard_map's checks off (as sparse_lookup's do); its transpose then sums the
      # gradients of the weights over the axes they are replicated on.
      check_vma = self.capacity_factor is not None or kernels_for(self.matmul_impl) == 'xla'

      def local(tokens, *args):
        if hidden_axes and check_vma:
          # The tokens' gradient is summed over the hidden axes once, as [T, d] here; left
          # implicit, each projection that reads them sums its own, per assignment
          # ([T·k, d] for gate and up: 2·k times the bytes; after an exchange, padded).
          tokens = jax.lax.pcast(tokens, hidden_axes, to='varying')
        out, dropped = self._local(tokens, *args, expert_axes=expert_axes, shards=shards,
                                   seq_len=seq_len)
        if hidden_axes:
          out = jax.lax.psum(out, hidden_axes)
        return out, jax.lax.psum(dropped, batch_axes) if batch_axes else dropped

      out, dropped = jax.shard_map(
          local, mesh=mesh, in_specs=(tok, tok, tok, per_token, into, into, out_of),
          out_specs=(tok, P()), check_vma=check_vma)(tokens, experts, weights, real, *params)
    signals.add_metric(self, 'dropped_fraction',
                       dropped / jnp.maximum(jnp.sum(real) * self.top_k, 1), per_token=True)
    return out

  def _local(self, tokens, experts, weights, real, gate, up, down, *, expert_axes, shards,
             seq_len):
    """One device: tokens [T, d], experts/weights [T, k], real [T], its experts' weights
    -> ([T, d], the real tokens' dropped assignments)."""
    t, d = tokens.shape
    k = self.top_k
    if self.capacity_factor is None and shards == 1 and t * k <= self.num_experts:
      y, dropped = self._gathered(tokens, experts, gate, up, down), jnp.zeros(t * k, bool)
    elif self.capacity_factor is None and shards > 1 and (
        exchange := self._exchange()) != 'padded':
      y, dropped = self._dropless_ragged(tokens, experts, gate, up, down, expert_axes, shards,
                                         emulated=exchange == 'ragged_emulated')
    elif self.capacity_factor is None:
      y, dropped = self._dropless(tokens, experts, gate, up, down, expert_axes, shards,
                                  seq_len)
    else:
      y, dropped = self._capacity(tokens, experts, real, gate, up, down, expert_axes, shards,
                                  seq_len)
    out = jnp.einsum('tk,tkd->td', weights, y.reshape(t, k, d))
    return out, jnp.sum(dropped & jnp.repeat(real, k)).astype(jnp.float32)

  def _kernels(self) -> dict:
    """`grouped_matmul`'s kernel settings, as configured."""
    return dict(impl=self.matmul_impl, tiling=self.kernel_tiling,
                mosaic_tiling=self.mosaic_tiling, mosaic_weight_grad=self.mosaic_weight_grad)

  def _exchange(self) -> str:
    """How expert parallelism's dropless path exchanges rows: 'ragged', 'ragged_emulated'
    or 'padded' (`model.moe.ep_exchange`)."""
    if self.ep_exchange not in EP_EXCHANGES:
      raise ValueError(f'model.moe.ep_exchange={self.ep_exchange!r}; expected one of '
                       f'{EP_EXCHANGES}')
    backend = jax.default_backend()
    if self.ep_exchange == 'ragged' and backend not in ('gpu', 'tpu'):
      raise ValueError(f"model.moe.ep_exchange='ragged': XLA implements ragged_all_to_all on "
                       f"GPU and TPU, and this process runs on {backend}; use "
                       "'padded', or 'ragged_emulated' (the same rows through an all_gather)")
    if self.ep_capacity_factor is not None:  # bounded buffers are padded ones
      return 'padded'
    if self.ep_exchange == 'auto':  # see the module's docstring for why not on GPU
      return 'ragged' if backend == 'tpu' else 'padded'
    return self.ep_exchange

  def _gathered(self, tokens, experts, gate, up, down):
    """Few tokens (T·k <= E, a decode step): each assignment's expert weights gathered,
    so only the chosen experts are read. -> y [T·k, d] token-major, nothing dropped."""
    flat = experts.reshape(-1)
    x = repeat_rows(tokens, self.top_k)[:, None]  # m 1 d: one "expert" per assignment
    return batched_swiglu(x, gate[flat], up[flat], down[flat])[:, 0]

  def _dropless(self, tokens, experts, gate, up, down, expert_axes, shards, seq_len):
    """-> (y [T·k, d] per assignment in token-major order, dropped [T·k])."""
    t, d = tokens.shape
    e, k = self.num_experts, self.top_k
    flat = experts.reshape(-1)
    if shards == 1:
      order, inverse = sort_by(flat)
      xs = permute(repeat_rows(tokens, k), order, inverse)  # sorted by expert
      ys = grouped_swiglu(xs, jnp.bincount(flat, length=e), gate, up, down,
                          **self._kernels())
      return permute(ys, inverse, order), jnp.zeros(t * k, bool)

    # Padded exchange: the buffer for shard j holds `per_seq` rows per sequence, row
    # (g, p) sequence g's p-th assignment bound for j (token-major), with its local expert.
    local_e = e // shards
    s = seq_len if t % seq_len == 0 else t  # (a device holding part of a sequence: one group)
    g = t // s
    most = s * min(k, local_e)  # a token's k experts differ: at most local_e on one shard
    per_seq = most if self.ep_capacity_factor is None else max(
        1, min(most, math.ceil(self.ep_capacity_factor * s * k / shards)))
    slot, kept = first_come_slots((flat // local_e).reshape(g, s * k), shards, per_seq)
    rows = shards * g * per_seq
    send_x = scatter_rows(repeat_rows(tokens, k), slot, rows)
    send_e = scatter_rows(flat % local_e, slot, rows, fill=local_e)  # local_e: empty
    exchange = lambda a: jax.lax.all_to_all(a, expert_axes, 0, 0, tiled=True)
    recv_x = exchange(send_x.reshape(shards, -1, d)).reshape(rows, d)
    recv_e = exchange(send_e.reshape(shards, -1)).reshape(rows)
    order, inverse = sort_by(recv_e)  # empty rows last: past every group
    sizes = jnp.sum(recv_e[:, None] == jnp.arange(local_e), axis=0)
    ys = grouped_swiglu(permute(recv_x, order, inverse), sizes, gate, up, down,
                        **self._kernels())
    back = exchange(permute(ys, inverse, order).reshape(shards, -1, d)).reshape(rows, d)
    return gather_rows(back, slot).astype(tokens.dtype), ~kept

  def _dropless_ragged(self, tokens, experts, gate, up, down, expert_axes, shards, *,
                       emulated: bool):
    """Expert parallelism sending only the real rows (`emulated`: through an all_gather)
    -> (y [T·k, d] per assignment in token-major order, dropped [T·k]: none)."""
    t, d = tokens.shape
    e, k = self.num_experts, self.top_k
    flat = experts.reshape(-1)
    order, inverse = sort_by(flat)  # by expert, so by shard
    xs = permute(repeat_rows(tokens, k), order, inverse)
    counts = jax.lax.all_gather(jnp.bincount(flat, length=e), expert_axes)  # n E
    me = jax.lax.axis_index(expert_axes)
    local_e = e // shards
    # The worst case: every device's tokens all bound here, each with min(k, local_e) of
    # its k (different) experts.
    most = shards * t * min(k, local_e)
    there, back, received = ragged_plan(counts, me, most)
    exchange = lambda rows, out, plan: ragged_all_to_all(
        rows, jnp.zeros((out, d), rows.dtype), *plan, axis_name=expert_axes, emulated=emulated)
    recv_x = exchange(xs, most, there)
    recv_order, recv_inverse = sort_by(received)  # by local expert; empty rows last
    ys = grouped_swiglu(permute(recv_x, recv_order, recv_inverse),
                        jnp.bincount(received, length=local_e), gate, up, down,
                        **self._kernels())
    ys = exchange(permute(ys, recv_inverse, recv_order), t * k, back)
    return permute(ys, inverse, order).astype(tokens.dtype), jnp.zeros(t * k, bool)

  def _capacity(self, tokens, experts, real, gate, up, down, expert_axes, shards, seq_len):
    """-> (y [T·k, d] per assignment in token-major order, dropped [T·k]).

    Expert e's buffer holds `capacity` rows per sequence: row (g, p) is the p-th of
    sequence g's assignments to e in token-major order. With `capacity_of_real`, a
    sequence of n real tokens keeps the capacity of a sequence of n."""
    t, d = tokens.shape
    e, k = self.num_experts, self.top_k
    s = seq_len if t % seq_len == 0 else t  # (a device holding part of a sequence: one group)
    g = t // s
    of_length = lambda n: max(1, math.ceil(self.capacity_factor * n * k / e))
    capacity, limits = of_length(s), None
    if self.capacity_of_real:  # by a table, so the rounding is the same as of_length's
      table = jnp.array([of_length(n) for n in range(s + 1)], jnp.int32)
      limits = table[jnp.sum(real.reshape(g, s), axis=1)]
    slot, kept = first_come_slots(experts.reshape(g, s * k), e, capacity, limits)
    rows = g * capacity  # per expert
    buffer = scatter_rows(repeat_rows(tokens, k), slot, e * rows).reshape(e, rows, d)
    if shards == 1:
      y = batched_swiglu(buffer, gate, up, down)
    else:
      local_e = e // shards
      exchange = lambda a: jax.lax.all_to_all(a, expert_axes, 0, 0, tiled=True)
      recv = exchange(buffer.reshape(shards, local_e, rows, d))  # source, e, rows, d
      recv = recv.transpose(1, 0, 2, 3).reshape(local_e, shards * rows, d)
      y = batched_swiglu(recv, gate, up, down)
      y = y.reshape(local_e, shards, rows, d).transpose(1, 0, 2, 3)
      y = exchange(y).reshape(e, rows, d)
    return gather_rows(y.reshape(e * rows, d), slot), ~kept
