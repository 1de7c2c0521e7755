"""How a layer tells the trainer about losses, metrics and per-window statistics.

- `add_aux_loss(module, value)`: a scalar added to the training loss.
- `add_metric(module, name, value)`: a scalar logged as `<module path>/<name>` (averaged
  over the logging window). With `per_token=True`, a mean over the batch's real tokens,
  which an evaluation also reports over the held-out tokens (`eval_<name>/<module path>`).
- `PerStepState` and `add_step_statistic(module, name, value)`: a non-trainable variable
  that the layer's `end_step` moves once per step from sums over the step's batch.
- `WindowCounter`: a non-trainable variable that the trainer zeroes after every logged
  step, so a layer can count what happened during the window (e.g. which memory values
  were read); metrics computed from it are logged with their last value, and their names
  start with `window_`.
"""

import jax
import jax.numpy as jnp
from flax import nnx


class WindowCounter(nnx.Variable):
  """Counts that live for one logging window; zeroed by the trainer after each log."""


class PerStepState(nnx.Variable):
  """A non-trainable value a layer moves once per training step from what the step's
  whole batch did (MoE's router bias). The forward pass only reports sums over its tokens
  (`add_step_statistic`); the train step adds them up over its microbatches
  (`train.grad_accum_steps`) and then calls the layer's `end_step(**sums)`. So with
  microbatches every one routes with the step's value, and the value moves as it would
  on the whole batch at once, also where the move is not linear in the sums (a sign)."""


def capturing(module: nnx.Module) -> bool:
  """Whether signals sown on `module` are read. Only the train step reads them, through
  `nnx.capture` (which gives every submodule its `__captures__`). Elsewhere (generation,
  export) they are dropped, not attached to the module, which flax >= 0.12 deprecates.
  Older flax has no capture: `run_model` pops them."""
  return not hasattr(nnx, 'capture') or hasattr(module, '__captures__')


def _sow(module: nnx.Module, name: str, value: jax.Array):
  if capturing(module):
    module.sow(nnx.Intermediate, name, value)


def sow_layers(stack: nnx.Module, sown, sequences):
  """Sows on `stack` what the layers of its scan sowed (`sown`: stacked [repeats, ...],
  keyed by the sequence's place in the unit and the layer's in its sequence, `0/j/...`)
  as if each layer had: losses and metrics under the layer's unscanned name
  (`blocks/<layer>/...`); step statistics under the stacked layer's own path
  (`layers/j/...`), still stacked, for its `end_step` run on each layer. `sequences`:
  (scanned name, unrolled name, layer(j, repeat) -> index) of each sequence of the unit."""
  for path, variable in nnx.to_flat_state(sown):
    sequence, j, *inner = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
    scanned, unrolled, layer = sequences[int(sequence)]
    for value in jax.tree.leaves(variable):
      if inner[-1].startswith('step_'):
        _sow(stack, '/'.join([scanned, j, *inner]), value)
        continue
      for repeat, layer_value in enumerate(value):
        _sow(stack, '/'.join([unrolled, str(layer(int(j), repeat)), *inner]), layer_value)


def add_aux_loss(module: nnx.Module, value: jax.Array):
  _sow(module, 'aux_loss', value)


PER_TOKEN = 'token_metric_'  # a sown metric that is a mean over the real tokens


def add_metric(module: nnx.Module, name: str, value: jax.Array, *, per_token: bool = False):
  _sow(module, f'{PER_TOKEN if per_token else "metric_"}{name}', value)


def add_step_statistic(module: nnx.Module, name: str, value: jax.Array):
  """A sum over the forward pass's tokens, passed to `module.end_step(name=...)` once the
  step has added up every microbatch's (and every call's, if the module ran twice)."""
  _sow(module, f'step_{name}', value)


def real_mean(x: jax.Array, real: jax.Array | None = None) -> jax.Array:
  """x [T, ...] averaged over the `real` [T] tokens (None: all): a layer's statistics
  leave out the padding that fills a row's end."""
  real = jnp.ones(x.shape[:1], jnp.float32) if real is None else real.astype(jnp.float32)
  return jnp.tensordot(real, x, axes=1) / jnp.maximum(jnp.sum(real), 1.0)


def is_window_metric(key: str) -> bool:
  """Whether a logged metric (`<module path>/<name>`) counts over the logging window, so
  that its last value, not the mean, is the window's (and a step's, over microbatches)."""
  return key.rsplit('/', 1)[-1].startswith('window_')
