"""Pure train and eval step functions: (state, batch) -> (state, metrics).

A batch is a dict of int32 `[batch, length]` arrays: `inputs`, `targets`, `segment_ids`
(0 marks padding, which carries no loss) and `positions`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxarch.layers.moe import eval_load_violations, is_load
from jaxarch.layers.signals import PER_TOKEN, WindowCounter, is_window_metric
from jaxarch.models.transformer import (UNROLLED_NAME, numberings, per_layer, scanned_at,
                                        stacked_modules)
from jaxarch.parallel.context import logical_mesh
from jaxarch.train.optimizer import frozen
from jaxarch.train.state import TrainSetup


def cross_entropy(logits, targets, mask, z_loss: float = 0.0):
  """Summed next-token NLL over unmasked tokens, and the optional z-loss (PaLM)."""
  log_z = jax.nn.logsumexp(logits, axis=-1)  # bt
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = (log_z - target_logit) * mask
  z = z_loss * jnp.square(log_z) * mask
  return nll.sum(), z.sum()


def _key_name(key) -> str:
  return str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))


def run_model(fn, *args):
  """fn(*args) and the `nnx.Intermediate` values sown on the way; `fn` is a module, or a
  function whose first argument is the module."""
  if hasattr(nnx, 'capture'):  # flax >= 0.12.x
    return nnx.capture(fn, nnx.Intermediate)(*args)
  out = fn(*args)
  return out, nnx.pop(fn if isinstance(fn, nnx.Module) else args[0], nnx.Intermediate)


def predictions(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(logits [..., vocab], targets [...], loss mask [...]): what the loss compares.

  A language model predicts each next token, where `segment_ids > 0` (and `loss_mask`,
  when the data marks which targets carry loss). A model with its own objective (BiTA:
  future tokens at its mask positions) provides `predictions(batch)`.
  """
  if hasattr(model, 'predictions'):
    return model.predictions(batch)
  mask = batch['segment_ids'] > 0
  if 'loss_mask' in batch:
    mask &= batch['loss_mask'].astype(bool)
  logits = model(batch['inputs'], batch['segment_ids'], batch['positions'])
  return logits, batch['targets'], mask


def signals(sown) -> tuple[dict[str, jax.Array], dict[str, jax.Array],
                           dict[str, dict[str, jax.Array]], set[str]]:
  """(aux losses, metrics, step statistics, the metrics that are means over the real
  tokens) that layers sowed in a forward pass, keyed by module path.

  See `jaxarch.layers.signals`: a layer sows `aux_loss` (summed into the loss),
  `metric_<name>` values (averaged when a layer ran several times), per-token ones likewise
  and `step_<name>` sums (summed; statistics[path][name] is for that layer's `end_step`).
  """
  losses, metrics, statistics, per_token = {}, {}, {}, set()
  for path, variable in nnx.to_flat_state(sown):
    # A name may hold a path of its own (`signals.sow_layers`): the leaf is its last part.
    where, _, leaf = tree_path(path).rpartition('/')
    values = [jnp.asarray(v, jnp.float32) for v in jax.tree.leaves(variable)]
    if leaf == 'aux_loss':
      losses[where] = sum(jnp.sum(v) for v in values)
    elif leaf.startswith(('metric_', PER_TOKEN)):
      name = leaf.removeprefix('metric_').removeprefix(PER_TOKEN)
      key = f'{where}/{name}' if where else name
      metrics[key] = sum(values) / len(values)
      if leaf.startswith(PER_TOKEN):
        per_token.add(key)
    elif leaf.startswith('step_'):
      statistics.setdefault(where, {})[leaf.removeprefix('step_')] = sum(values)
  return losses, metrics, statistics, per_token


def _forward(setup: TrainSetup, params, model_state, batch, *, deterministic: bool = False):
  """-> ((logits, targets, float loss mask), aux losses, metrics, step statistics, new
  model state, the metrics that are means over the real tokens).

  `deterministic`: the model as it is served (`infer.for_inference`), its state read, not
  updated (UltraMem's Tucker vectors, the MoE router's bias)."""
  # Fresh Variables of this trace level, so that layers may update their state here, and
  # `nnx.remat` may merge parameters closed over from an outer trace (the microbatch scan
  # of an eval step, where no gradient makes them fresh).
  params, model_state = jax.tree.map(lambda x: x, (params, model_state))
  model = nnx.merge(setup.graphdef, params, model_state)
  if deterministic:
    model.set_attributes(deterministic=True, raise_if_not_found=False)
  with logical_mesh(setup.mesh, setup.rules):
    (logits, targets, mask), sown = run_model(predictions, model, batch)
  aux, metrics, statistics, per_token = signals(sown)
  return ((logits, targets, mask.astype(jnp.float32)), aux, metrics, statistics,
          nnx.state(model, nnx.Not(nnx.Param)), per_token)


def _end_step(setup: TrainSetup, params, model_state, statistics):
  """The model state after every layer that reported step statistics moved its
  `PerStepState` by the step's sums (`end_step`)."""
  if not statistics:
    return model_state
  model = nnx.merge(setup.graphdef, params, jax.tree.map(lambda x: x, model_state))
  stacked = stacked_modules(model)
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and (where := tree_path(path)) in statistics:
      # A scanned stack's block: its statistics are stacked too.
      per_layer(node, stacked)(lambda layer, sums: layer.end_step(**sums))(
          node, statistics[where])
  return nnx.state(model, nnx.Not(nnx.Param))


def _refresh_state(setup: TrainSetup, params, model_state):
  """The model state after every layer whose state derives from its weights (UltraMem's
  Tucker vectors) recomputed it from the updated ones (`refresh_state`): a checkpoint's
  state is then its weights', which evaluation and serving read without refreshing."""
  model = nnx.merge(setup.graphdef, params, jax.tree.map(lambda x: x, model_state))
  refreshed, stacked = False, stacked_modules(model)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and hasattr(node, 'refresh_state'):
      # A scanned stack's block: each layer from its own weights.
      per_layer(node, stacked)(lambda layer: layer.refresh_state())(node)
      refreshed = True
  return nnx.state(model, nnx.Not(nnx.Param)) if refreshed else model_state


def leaf_norms(tree) -> jax.Array:
  """L2 norm of each array of `tree`, of each layer of a scanned stack's stacked arrays,
  in `leaf_names` order."""
  norms = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    squares = jnp.square(x.astype(jnp.float32))
    norms.append(jnp.sqrt(jnp.sum(squares, axis=tuple(range(1, x.ndim))))
                 if _layers_at(path) is not None
                 else jnp.sqrt(jnp.sum(squares))[None])
  return jnp.concatenate(norms)


def _global_norm(norms: jax.Array) -> jax.Array:
  """The L2 norm of a whole tree from its `leaf_norms`."""
  return jnp.sqrt(jnp.sum(jnp.square(norms)))


def leaf_names(tree) -> list[str]:
  """'blocks/0/mlp/gate'-style names of the arrays of `tree` (every parameter: a scanned
  stack's layout is read off its arrays, `transformer.numberings`), in `jax.tree.leaves`
  order; a scanned stack's stacked array (`layers/j/...`) has one per layer, its
  unscanned name."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  keys = [[_key_name(k) for k in path] for path, _ in leaves]
  layouts = numberings(zip(keys, (x.shape for _, x in leaves)))
  names = []
  for parts, (_, x) in zip(keys, leaves):
    if (at := scanned_at(parts)) is None:
      names.append('/'.join(parts).removesuffix('/value'))
      continue
    sequence = UNROLLED_NAME[parts[at]]
    numbering, j = layouts[tuple(parts[:at]), sequence], int(parts[at + 1])
    inner = '/'.join(parts[at + 2:]).removesuffix('/value')
    names += ['/'.join(filter(None, [*parts[:at], sequence, str(numbering.layer(j, r)), inner]))
              for r in range(x.shape[0])]
  return names


def norm_counts(tree) -> list[int]:
  """How many of `leaf_norms` each array of `tree` has: its layers' for a scanned stack's."""
  return [1 if _layers_at(path) is None else x.shape[0]
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _layers_at(path) -> int | None:
  """Where a key path enters a scanned stack's `layers/<j>` (`transformer.scanned_at`)."""
  return scanned_at([_key_name(k) for k in path])


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def tree_path(path) -> str:
  return '/'.join(_key_name(k) for k in path)


def make_train_step(setup: TrainSetup):
  """The jitted, sharded train step; the incoming state's buffers are donated.

  With `setup.grad_accum_steps=A` the batch runs as A microbatches in a `lax.scan` (each
  spread over all devices), summing gradients, so the global batch outgrows what one
  step's activations leave room for. The loss is the same token mean over the whole batch; aux
  losses (MoE balance) are the token-weighted mean of the microbatches' values, and the
  layers' metrics the mean weighted by their real tokens: a mean over the real tokens (an
  expert's load, the dropped fraction) is then the whole batch's. A layer's
  `PerStepState` (the MoE router's bias) stays put through the microbatches and moves
  once at the end, by the statistics of the whole batch.

  Its metrics include `grad_norm` (the global norm of the accumulated gradient before
  `train.grad_clip` clips it), `nonfinite` (1 when the loss or a gradient was NaN or Inf,
  and the update was not applied) and the norms of every parameter's gradient and value
  (`layer_grad_norms`, `layer_param_norms`, in `leaf_names` order) for the trainer's
  report on such a step.
  """
  is_frozen = frozen(setup.abstract_state['params'])
  # `param_norm` is of the weights that train (BiTA's frozen base would swamp its tokens').
  trained = np.flatnonzero(np.repeat([not f for f in jax.tree.leaves(is_frozen)],
                                     norm_counts(setup.abstract_state['params'])))
  grad_accum_steps = setup.grad_accum_steps

  def microbatch_grads(params, model_state, batch):
    """Gradients of the summed NLL + z-loss, plus aux losses x tokens, of one microbatch,
    over its number of input tokens: sums that add up over microbatches, rescaled by that
    number / the batch's loss tokens at the end. (Divided by the constant, the backward
    pass carries values of a mean's magnitude, not of a sum over many tokens.)"""

    def objective(params):
      # Frozen parameters get no gradient, so XLA drops their weight-gradient matmuls.
      params = jax.tree.map(lambda f, p: jax.lax.stop_gradient(p) if f else p,
                            is_frozen, params)
      (logits, targets, mask), aux, layer_metrics, statistics, new_model_state, _ = _forward(
          setup, params, model_state, batch)
      tokens = mask.sum()
      nll, z = cross_entropy(logits, targets, mask, setup.z_loss)
      aux = {k: v * tokens for k, v in aux.items()}
      total = nll + z + sum(aux.values(), jnp.zeros(()))
      return total / batch['inputs'].size, {
          'nll': nll, 'total': total, 'tokens': tokens, 'aux': aux, 'metrics': layer_metrics,
          'statistics': statistics, 'model_state': new_model_state}

    (_, out), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, out

  def accumulate(params, model_state, batch):
    if grad_accum_steps == 1:
      return microbatch_grads(params, model_state, batch)

    def body(carry, microbatch):
      grads, sums, model_state = carry
      weights, microbatch = _per_microbatch(params, microbatch)
      g, out = microbatch_grads(weights, model_state, microbatch)
      grads = jax.tree.map(jnp.add, grads, g)
      # Layers' metrics are means over a microbatch's real tokens (`signals.real_mean`):
      # weighted by that count, their step value is the whole batch's, as at A=1 (a plain
      # mean over microbatches of unequal padding is not).
      real = real_tokens(microbatch)
      weighted = dict(out, real=real, metrics={k: v * real for k, v in out['metrics'].items()})
      sums = jax.tree.map(jnp.add, sums, {k: weighted[k] for k in sums})
      # A window count's metric already counts the microbatches before: its last value.
      sums['metrics'] = {k: out['metrics'][k] if is_window_metric(k) else v
                         for k, v in sums['metrics'].items()}
      return (grads, sums, out['model_state']), None

    microbatches = _microbatches(setup, batch)
    first = jax.tree.map(lambda x: x[0], microbatches)
    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(
        microbatch_grads, params, model_state, first))
    sums = {k: zero[1][k] for k in ('nll', 'total', 'tokens', 'aux', 'metrics', 'statistics')}
    sums['real'] = jnp.zeros((), jnp.float32)
    (grads, sums, model_state), _ = jax.lax.scan(body, (zero[0], sums, model_state),
                                                 microbatches)
    real = jnp.maximum(sums.pop('real'), 1.0)
    sums['metrics'] = {k: v if is_window_metric(k) else v / real
                       for k, v in sums['metrics'].items()}
    return grads, {**sums, 'model_state': model_state}

  def train_step(state, batch):
    grads, out = accumulate(state['params'], state['model_state'], batch)
    model_state = _end_step(setup, state['params'], out['model_state'], out['statistics'])
    num_tokens = jnp.maximum(out['tokens'], 1.0)
    microbatch_size = batch['inputs'].size // grad_accum_steps  # as microbatch_grads divides
    rescale = microbatch_size / num_tokens
    grads = jax.tree.map(lambda g: g * rescale.astype(g.dtype), grads)
    loss = out['total'] / num_tokens
    aux = {k: v / num_tokens for k, v in out['aux'].items()}
    updates, opt_state = setup.tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    grad_norms = leaf_norms(grads)
    grad_norm = _global_norm(grad_norms)
    param_norms = leaf_norms(params)
    # A non-finite loss or gradient, or weights whose norm overflows, never reach the
    # weights: the step keeps the old state (the selects fuse into the optimizer's
    # elementwise update).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(
        _global_norm(param_norms))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep(params, state['params'])
    # The kept weights' norms: read again only on a skipped step.
    param_norms = jax.lax.cond(finite, lambda: param_norms,
                               lambda: leaf_norms(state['params']))
    metrics = {'loss': out['nll'] / num_tokens, 'total_loss': loss, 'grad_norm': grad_norm,
               'param_norm': _global_norm(param_norms[trained]), 'tokens': out['tokens'],
               'nonfinite': 1.0 - finite.astype(jnp.float32),
               'layer_grad_norms': grad_norms, 'layer_param_norms': param_norms,
               **{f'aux_loss/{k}': v for k, v in aux.items()}, **out['metrics']}
    # The schedules' step counts advance on a skipped step too: the learning rate and
    # UltraMem's value multiplier stay on `step`, as the trainer logs them. Adam's own
    # count stays with its moments: its bias correction is for the steps they hold.
    opt_state = jax.tree.map(lambda n, o: n if _is_schedule(n) else keep(n, o),
                             opt_state, state['opt_state'], is_leaf=_is_schedule)
    model_state = _refresh_state(setup, params, keep(model_state, state['model_state']))
    new_state = dict(state, step=state['step'] + 1, params=params, opt_state=opt_state,
                     model_state=model_state)
    return new_state, metrics

  replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
  return jax.jit(train_step, in_shardings=(setup.shardings, setup.batch_sharding),
                 out_shardings=(setup.shardings, replicated), donate_argnums=(0,))


def _is_schedule(x) -> bool:
  """A schedule's state (the learning rate's, UltraMem's value multiplier's): its step
  count, which moves on with `step`."""
  return isinstance(x, optax.ScaleByScheduleState)


def _per_microbatch(params, microbatch):
  """(params, microbatch) as values of one microbatch loop iteration (an optimization
  barrier ties the weights to the microbatch), so that XLA's while-loop invariant code
  motion cannot hoist what is computed from the weights alone out of the loop: the FSDP
  all-gathers (and layout copies, casts), which would then hold every weight whole,
  gathered, through the whole step. Each is gathered for each microbatch, as at A=1."""
  return jax.lax.optimization_barrier((params, microbatch))


def _microbatches(setup: TrainSetup, batch: dict) -> dict:
  """[B, ...] -> [A, B/A, ...] (A = `setup.grad_accum_steps`): microbatch i takes rows
  i, i + A, ..., so that each is spread over the batch's devices as the batch is."""
  a = setup.grad_accum_steps

  def split(x):
    x = jnp.swapaxes(x.reshape(x.shape[0] // a, a, *x.shape[1:]), 0, 1)
    spec = jax.sharding.PartitionSpec(None, *setup.batch_sharding.spec,
                                      *[None] * (x.ndim - 3))
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(setup.mesh, spec))

  return jax.tree.map(split, batch)


def real_tokens(batch: dict) -> jax.Array:
  """The batch's real (not padding) tokens, which the layers' metrics average over
  (`signals.real_mean`): their weight when microbatches or batches are added up."""
  return jnp.sum(batch['segment_ids'] > 0).astype(jnp.float32)


def make_eval_step(setup: TrainSetup, byte_lengths):
  """Summed NLL, token and byte counts of a batch; bits per byte = nll / ln2 / bytes. A
  target's bytes are the batch's `target_bytes`, the text's own (evaluation batches of
  documents carry them: `data.pipeline`), else `byte_lengths[target]` (a distilled
  sequence's, which has no text). With
  `train.grad_accum_steps=A` the batch runs as A microbatches, as in training, so that an
  evaluation fits wherever the train step does. The model's state is read as `generate`
  reads it, not updated (`_forward(deterministic=True)`). Weights are gathered in each
  microbatch, as in training (`_per_microbatch`): hoisted out of the loop, every weight
  would be held whole through the evaluation, which then fits where the train step does
  only while the whole model fits a device."""
  byte_lengths = jnp.asarray(byte_lengths, jnp.float32)

  def sums(state, batch):
    (logits, targets, mask), _, metrics, _, _, per_token = _forward(
        setup, state['params'], state['model_state'], batch, deterministic=True)
    nll, _ = cross_entropy(logits, targets, mask)
    if batch.get('target_bytes') is not None and batch['target_bytes'].shape == targets.shape:
      target_bytes = batch['target_bytes'].astype(jnp.float32)
    else:  # BiTA's mask targets have another shape: counted by token
      target_bytes = byte_lengths[targets]
    num_bytes = (target_bytes * mask).sum()
    out = {'nll': nll, 'tokens': mask.sum(), 'bytes': num_bytes}
    if per_token:  # the layers' means over the real tokens (MoE's loads and drops)
      real = real_tokens(batch)  # weighted as the train step weighs its microbatches'
      out.update({'real': real, **{f'per_token/{k}': metrics[k] * real for k in per_token}})
    if logits.ndim == 4:  # BiTA's [b, groups, masks, V]: each mask's top-1 (`mask_top1`)
      hits = (jnp.argmax(logits, -1) == targets) * mask
      out.update(mask_hits=hits.sum((0, 1)), mask_tokens=mask.sum((0, 1)))
    return out

  def eval_step(state, batch):
    if setup.grad_accum_steps == 1:
      return sums(state, batch)

    def add(total, microbatch):
      params, microbatch = _per_microbatch(state['params'], microbatch)
      return jax.tree.map(jnp.add, total, sums({**state, 'params': params}, microbatch)), None

    microbatches = _microbatches(setup, batch)
    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), jax.eval_shape(
        sums, state, jax.tree.map(lambda x: x[0], microbatches)))
    return jax.lax.scan(add, zero, microbatches)[0]

  # Laid out as its inputs are (`setup.shardings`, `setup.batch_sharding`), of a train
  # state or of a reader's, which holds the model alone (`state.MODEL`).
  return jax.jit(eval_step)


def make_window_reset(setup: TrainSetup):
  """Zeroes every `WindowCounter` of the model state (after each logged step)."""
  counters = [v for v in jax.tree.leaves(setup.abstract_state['model_state'],
                                         is_leaf=_is_variable)
              if isinstance(v, WindowCounter)]
  if not counters:
    return lambda state: state

  def reset(state):
    zero = lambda v: v.replace(jnp.zeros_like(v.get_value())) if isinstance(
        v, WindowCounter) else v
    model_state = jax.tree.map(zero, state['model_state'], is_leaf=_is_variable)
    return dict(state, model_state=model_state)

  return jax.jit(reset, in_shardings=(setup.shardings,), out_shardings=setup.shardings,
                 donate_argnums=(0,))


def summarize_eval(totals: dict) -> dict:
  """eval_loss, eval_bpb and eval_tokens (the targets evaluated); of a BiTA run, each
  mask's top-1 accuracy too (`eval_mask{m}_top1`: the share of held-out tokens m+2 ahead
  its drafts would get); of the layers' per-token metrics, their means over the held-out
  tokens (`eval_<name>/<layer>`: UltraMem's score entropy, MoE's dropped fraction), MoE's
  loads as each layer's balance (`eval_load_violations`), not one by one."""
  summary = {'eval_loss': totals['nll'] / max(totals['tokens'], 1.0),
             'eval_bpb': totals['nll'] / math.log(2) / max(totals['bytes'], 1.0),
             'eval_tokens': int(totals['tokens'])}  # the targets evaluated
  for m, (hits, count) in enumerate(zip(totals.get('mask_hits', ()),
                                        totals.get('mask_tokens', ()))):
    summary[f'eval_mask{m}_top1'] = float(hits) / max(float(count), 1.0)
  means = {k.removeprefix('per_token/'): v / max(totals['real'], 1.0)
           for k, v in totals.items() if k.startswith('per_token/')}
  for key, value in means.items():
    layer, _, name = key.rpartition('/')
    if not is_load(name):
      summary[f'eval_{name}/{layer}' if layer else f'eval_{name}'] = float(value)
  return {**summary, **eval_load_violations(means)}


def summarize_mixture_eval(totals: dict[str, dict], weights: dict[str, float]) -> dict:
  """Each source's eval_loss and eval_bpb (`eval_loss/<name>`), and the mixture's: the
  loss per token and bytes per token of each source weighted by its share of the
  training tokens, as the training batches mix them. A source without validation tokens
  is left out, and the others' weights renormalised; one of weight 0 (evaluated only)
  has its own metrics alone."""
  summary, nll, num_bytes, weight = {}, 0.0, 0.0, 0.0
  for name, source in totals.items():
    if source['tokens'] > 0:
      summary.update({f'{k}/{name}': v for k, v in summarize_eval(source).items()})
      nll += weights[name] * source['nll'] / source['tokens']
      num_bytes += weights[name] * source['bytes'] / source['tokens']
      weight += weights[name]
  if weight:
    summary['eval_loss'] = nll / weight
    summary['eval_bpb'] = nll / math.log(2) / max(num_bytes, 1e-30)
    summary['eval_tokens'] = sum(int(t['tokens']) for t in totals.values())
  return summary
