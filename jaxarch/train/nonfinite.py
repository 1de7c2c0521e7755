"""NaN and Inf in training: never applied, then skipped or reported, as the config says.

The train step never applies an update whose loss or gradient norm is not finite, or
that would make the weights' norm overflow (see
`step.make_train_step`), so the weights stay those of the last good step. The trainer
reads the step flags at each logging step and then, by `train.nonfinite`:

  stop   (default) ends the run with a `NonFiniteError` naming the first bad step and the
         parameters whose gradients were largest or not finite; the full statistics are
         written to workdir/nonfinite_step_<N>.json, and the last checkpoint stands
  skip   counts the step and goes on; after `train.max_consecutive_skips` bad steps in a
         row it stops as above (a run that keeps diverging is not recovering)
"""

import json
import math
from pathlib import Path

import jax
import numpy as np

from jaxarch.train.checkpoint import Checkpointer


# `jaxarch train`'s exit code when it stops on non-finite training (a config error is 2):
# a sweep records such a run as diverged rather than training it again.
DIVERGED = 3


# WORKDIR/nonfinite_step_<N>.json: the statistics of the step N that the run stopped on.
_REPORT = 'nonfinite_step_{}.json'


def reported_steps(workdir: str | Path) -> list[int]:
  """The steps of the run's reports of non-finite training, in order."""
  return sorted(int(p.stem.rpartition('_')[2]) for p in Path(workdir).glob(
      _REPORT.format('*')) if p.stem.rpartition('_')[2].isdigit())


class NonFiniteError(RuntimeError):
  """Training met a NaN or Inf it was configured not to skip; the message is the report."""


class NonFiniteMonitor:
  """Applies the policy to the per-step metrics of each logging window."""

  def __init__(self, policy: str, max_consecutive: int, names: list[str],
               workdir: str | Path, skipped: int = 0, checkpointer: Checkpointer | None = None,
               consecutive: int = 0):
    """`checkpointer`: the run's, whose pending saves complete before the report names
    the last checkpoint; `consecutive`: the non-finite steps in a row that ended the
    checkpoint a resumed run starts from (a run that resumes does not start the count
    again)."""
    self.policy = policy
    self.max_consecutive = max_consecutive
    self.names = names
    self.workdir = Path(workdir)
    self.skipped = skipped  # in this process's lifetime
    self.consecutive = consecutive
    self.checkpointer = checkpointer

  def check(self, first_step: int, window: list[dict]) -> int:
    """Steps skipped in `window` (per-step host metrics from `first_step` on); raises
    `NonFiniteError` when the run must stop."""
    bad = 0
    for i, metrics in enumerate(window):
      if not metrics['nonfinite']:
        self.consecutive = 0
        continue
      bad += 1
      self.consecutive += 1
      if self.policy == 'stop' or self.consecutive > self.max_consecutive:
        raise NonFiniteError(self.report(first_step + i, metrics))
    self.skipped += bad
    return bad

  def report(self, step: int, metrics: dict) -> str:
    grads = np.asarray(metrics['layer_grad_norms'], np.float64)
    params = np.asarray(metrics['layer_param_norms'], np.float64)
    stats = [{'name': n, 'grad_norm': _json_float(g), 'param_norm': _json_float(p)}
             for n, g, p in zip(self.names, grads, params)]
    path = self.workdir / _REPORT.format(step)
    where = f'all parameter statistics are in {path}'
    if jax.process_index() == 0:
      try:
        path.write_text(json.dumps({'step': step, 'loss': _json_float(metrics['loss']),
                                    'grad_norm': _json_float(metrics['grad_norm']),
                                    'parameters': stats}, indent=1) + '\n')
      except OSError as e:  # a full disk must not hide the report behind a traceback
        where = f'the parameter statistics could not be written to {path} ({e.strerror or e})'
    bad = [n for n, g in zip(self.names, grads) if not np.isfinite(g)]
    largest = 'largest gradient norms ' + ', '.join(f'{self.names[i]} {grads[i]:.3g}'
                                                    for i in np.argsort(-grads)[:3])
    if bad:
      worst = (f'non-finite gradients in {len(bad)} of {len(grads)} parameters, e.g. '
               f'{", ".join(bad[:3])}')
    elif np.isfinite(float(metrics['loss'])) and np.isfinite(float(metrics['grad_norm'])):
      worst = f"the update would have made the weights' norm overflow; {largest}"
    else:  # a non-finite loss with finite gradients
      worst = largest
    why = (f'{self.consecutive} non-finite steps in a row (train.max_consecutive_skips='
           f'{self.max_consecutive})' if self.policy == 'skip' else 'train.nonfinite=stop')
    if self.checkpointer is not None:
      self.checkpointer.wait()
    latest = Checkpointer.latest(self.workdir)
    saved = ('No checkpoint was written yet' if latest is None else
             f'The last checkpoint ({latest}) is intact')
    return (f'non-finite training at step {step}: loss {float(metrics["loss"]):.4g}, '
            f'gradient norm {float(metrics["grad_norm"]):.4g}; the update was not applied; '
            f'{worst}. Stopped ({why}); {where}. {saved}: '
            'lower train.lr, raise train.warmup_steps or train.grad_clip, or '
            + ('raise train.max_consecutive_skips' if self.policy == 'skip' else
               'set train.nonfinite=skip')
            + ', and rerun' + (' to resume.' if latest else '.'))


def _json_float(x) -> float | str:
  x = float(x)
  return x if math.isfinite(x) else str(x)
