"""How a layer tells the trainer about losses, metrics and per-window statistics.

- `add_aux_loss(module, value)`: a scalar added to the training loss.
- `add_metric(module, name, value)`: a scalar logged as `<module path>/<name>` (averaged
  over the logging window).
- `PerStepState`: a non-trainable variable moved once per step (see below).
- `WindowCounter`: a non-trainable variable that the trainer zeroes after every logged
  step, so a layer can count what happened during the window (e.g. which memory values
  were read); metrics computed from it are logged with their last value, and their names
  start with `window_`.
"""

import jax
from flax import nnx


class WindowCounter(nnx.Variable):
  """Counts that live for one logging window; zeroed by the trainer after each log."""


class PerStepState(nnx.Variable):
  """A non-trainable value a layer moves once per training step from what the step's
  batch did (MoE's router bias). With microbatches (`train.grad_accum_steps`) every
  microbatch starts from the step's value and the step applies the mean of their moves,
  so the value moves once per step. That mean is the move of the whole batch where the
  move is linear in the batch's statistics; MoE's bias moves by a sign, so there it is
  the mean of the microbatches' signs (0 where two disagree), not the sign of the
  batch's mean load as without microbatches."""


def _sow(module: nnx.Module, name: str, value: jax.Array):
  # Only the train step reads signals, through `nnx.capture` (which gives every submodule
  # its `__captures__`). Elsewhere (generation, export) they are dropped, not attached to
  # the module, which flax >= 0.12 deprecates. Older flax has no capture: `run_model` pops.
  if hasattr(nnx, 'capture') and not hasattr(module, '__captures__'):
    return
  module.sow(nnx.Intermediate, name, value)


def add_aux_loss(module: nnx.Module, value: jax.Array):
  _sow(module, 'aux_loss', value)


def add_metric(module: nnx.Module, name: str, value: jax.Array):
  _sow(module, f'metric_{name}', value)


def is_window_metric(key: str) -> bool:
  """Whether a logged metric (`<module path>/<name>`) counts over the logging window, so
  that its last value, not the mean, is the window's (and a step's, over microbatches)."""
  return key.rsplit('/', 1)[-1].startswith('window_')
