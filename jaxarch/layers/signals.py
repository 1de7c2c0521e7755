"""How a layer tells the trainer about losses, metrics and per-window statistics.

- `add_aux_loss(module, value)`: a scalar added to the training loss.
- `add_metric(module, name, value)`: a scalar logged as `<module path>/<name>` (averaged
  over the logging window).
- `WindowCounter`: a non-trainable variable that the trainer zeroes after every logged
  step, so a layer can count what happened during the window (e.g. which memory values
  were read); metrics computed from it are logged with their last value, and their names
  start with `window_`.
"""

import jax
from flax import nnx


class WindowCounter(nnx.Variable):
  """Counts that live for one logging window; zeroed by the trainer after each log."""


def add_aux_loss(module: nnx.Module, value: jax.Array):
  module.sow(nnx.Intermediate, 'aux_loss', value)


def add_metric(module: nnx.Module, name: str, value: jax.Array):
  module.sow(nnx.Intermediate, f'metric_{name}', value)
