"""Sweep definitions: what a `configs/sweeps/*.py` file returns, checked before any run.

A sweep file defines `get_sweep(arg)` returning a list of runs, each a dict of config
overrides (`'model.d_model': 256`) plus three reserved keys:

  config   the config spec the overrides apply to, e.g. 'configs/moe.py:small'
  name     unique within the sweep; the run's sub-workdir is DIR/runs/<name>
  budget   (optional) the compute in FLOPs the run was planned for: its IsoFLOP group

`isoflop_grid` builds the usual design: at each budget, several model sizes, each trained
for the number of steps that spends the budget by the FLOPs convention of
`jaxarch.train.flops` (so the tokens follow from the budget and the size).
"""

import dataclasses
import difflib
import functools
import json
import logging
import math
from collections.abc import Sequence

import ml_collections
import numpy as np
from flax import nnx

from jaxarch import config as config_lib
from jaxarch import models
from jaxarch.train import flops

RESERVED = ('config', 'name', 'budget')

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  spec: str  # config file and preset
  overrides: tuple[str, ...]  # 'key=value' strings, as on the command line
  budget: float | None

  def config(self) -> ml_collections.ConfigDict:
    return config_lib.load(self.spec, self.overrides)


def _plain(value):
  """numpy scalars and arrays (np.geomspace, ...) as Python values, whose repr is a
  literal the override parser reads (numpy 2 writes np.float64(0.1) inside a tuple)."""
  if isinstance(value, (tuple, list, np.ndarray)):
    return (tuple if isinstance(value, tuple) else list)(_plain(v) for v in value)
  if isinstance(value, np.floating):  # float32's own shortest digits, as str() writes them
    return float(str(value))
  return value.item() if isinstance(value, np.generic) else value


def _override(key: str, value) -> str:
  value = _plain(value)
  return f'{key}={value!r}' if isinstance(value, (tuple, list)) else f'{key}={value}'


def runs_from(members: Sequence[dict], where: str) -> list[Run]:
  """The sweep's dicts as `Run`s, each config loaded and validated (a `ConfigError` names
  the member and the key)."""
  if not isinstance(members, (list, tuple)) or not members:
    raise config_lib.ConfigError(f'{where}: get_sweep must return a non-empty list of run '
                                 'dicts')
  runs, seen = [], set()
  for i, member in enumerate(members):
    if not isinstance(member, dict) or 'config' not in member or 'name' not in member:
      raise config_lib.ConfigError(f"{where}: run {i} must be a dict with 'config' and "
                                   f"'name' keys, got {member!r:.80}")
    name = str(member['name'])
    if name in seen or name in ('', '.', '..') or '/' in name:
      raise config_lib.ConfigError(f'{where}: run {i} has name {name!r}; names must be '
                                   'unique folder names (not "." or "..", no "/")')
    seen.add(name)
    for key in member:  # a reserved key misspelt would be taken for a config key
      if key not in RESERVED and '.' not in str(key) and (
          near := difflib.get_close_matches(str(key), RESERVED, n=1)):
        raise config_lib.ConfigError(f'{where}: run {name!r}: unknown key {key!r} (did you '
                                     f'mean {near[0]!r}?)')
    overrides = tuple(_override(k, v) for k, v in member.items() if k not in RESERVED)
    budget = member.get('budget')
    if budget is not None:
      try:
        budget = float(budget)
      except (TypeError, ValueError):
        budget = None
      if budget is None or not 0 < budget < float('inf'):
        raise config_lib.ConfigError(f'{where}: run {name!r}: budget={member["budget"]!r} '
                                     'must be a positive number of FLOPs, e.g. 1e18')
    run = Run(name, str(member['config']), overrides, budget)
    try:
      cfg = run.config()
      config_lib.check_train_precision(cfg.model)  # said now, not by each run as it starts
    except config_lib.ConfigError as e:
      why = str(e).removeprefix('config error: ')  # said once, before the sweep's name
      raise config_lib.ConfigError(f'{where}: run {name!r}: {why}') from None
    if budget is not None and abs((spent := train_flops(cfg)) / budget - 1) > 0.1:
      # A hand-written run (isoflop_grid's are checked): the fits take it for its budget.
      log.warning('%s: run %r: %d steps spend %.3g FLOPs, %.2fx its budget %.3g, and the '
                  'IsoFLOP fits count it at its budget; %d steps would spend it', where, name,
                  cfg.train.steps, spent, spent / budget, budget, steps_for_budget(cfg, budget))
    runs.append(run)
  return runs


def param_counts(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """Total and active parameter counts of a config's model, without allocating it."""
  return dict(_model_counts(json.dumps(cfg.model.to_dict(), sort_keys=True)))


@functools.lru_cache(maxsize=256)  # a grid repeats each size at every budget
def _model_counts(model_json: str) -> tuple:
  model_cfg = ml_collections.ConfigDict(json.loads(model_json))
  counts = models.param_counts(nnx.eval_shape(lambda: models.build(model_cfg,
                                                                   rngs=nnx.Rngs(0))))
  return tuple(counts.items())


def flops_per_token(cfg: ml_collections.ConfigDict) -> float:
  return flops.train_flops_per_token(cfg.model, param_counts(cfg), cfg.data.seq_len)


def train_flops(cfg: ml_collections.ConfigDict, steps: int | None = None) -> float:
  """The FLOPs of `steps` (default: `train.steps`) of the config's batch."""
  steps = cfg.train.steps if steps is None else steps
  return steps * flops_per_token(cfg) * cfg.train.batch_size * cfg.data.seq_len


def steps_for_budget(cfg: ml_collections.ConfigDict, budget: float) -> int:
  """Train steps that spend `budget` FLOPs on the config's model and batch (at least 1)."""
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  return max(1, round(budget / (flops_per_token(cfg) * tokens_per_step)))


def _budget_labels(budgets: Sequence[float]) -> dict[float, str]:
  """Budget -> its part of the run names ('1e17'): two significant digits, or as many as
  tell the budgets apart (1.2e17 and 1.24e17 would both be '1.2e17')."""
  distinct = set(map(float, budgets))
  for digits in range(2, 18):  # 17 tell any two floats apart
    labels = {b: f'{b:.{digits}g}'.replace('+', '') for b in distinct}
    if len(set(labels.values())) == len(distinct):
      return labels
  raise AssertionError(budgets)


# Chinchilla's compute-optimal models read about 20 tokens per parameter: C = 6·N·D with
# D = 20·N puts the optimum near 6·N = sqrt(0.3·C) FLOPs per token.
TOKENS_PER_PARAM = 20


def near_optimum(flops_per_size: dict[str, float], budget: float, count: int,
                 tokens_per_param: float = TOKENS_PER_PARAM) -> list[str]:
  """The `count` sizes whose training FLOPs per token lie nearest (in log) to a
  compute-optimal model's at `budget`, in their given order: an IsoFLOP profile needs
  sizes on both sides of its optimum, and a size far from it costs the whole budget for a
  point the parabola barely uses (a 3M-parameter model at 3e18 FLOPs trains for days)."""
  optimum = math.sqrt(6 * budget / tokens_per_param)
  nearest = sorted(flops_per_size, key=lambda s: abs(math.log(flops_per_size[s] / optimum)))
  return [s for s in flops_per_size if s in nearest[:count]]


def isoflop_grid(family: str, spec: str, sizes: dict[str, dict], budgets: Sequence[float],
                 common: dict | None = None, *, per_budget: int | None = None,
                 tokens_per_param: float = TOKENS_PER_PARAM,
                 warmup_fraction: float = 0.1) -> list[dict]:
  """Runs of sizes (name -> overrides) at each budget, steps from the budget: every size,
  or with `per_budget` the ones nearest the budget's likely optimum (`near_optimum`)."""
  members, labels = [], _budget_labels(budgets)
  values = {size: {**(common or {}), **overrides} for size, overrides in sizes.items()}
  configs = {}
  for size, overrides in values.items():
    try:
      configs[size] = config_lib.load(spec, [_override(k, v) for k, v in overrides.items()])
    except config_lib.ConfigError as e:
      why = str(e).removeprefix('config error: ')
      raise config_lib.ConfigError(f'isoflop_grid({family!r}, {spec!r}): size {size!r}: '
                                   f'{why}') from None
  per_token = {size: flops_per_token(cfg) for size, cfg in configs.items()}
  for budget in budgets:
    chosen = list(sizes) if per_budget is None else near_optimum(
        per_token, budget, per_budget, tokens_per_param)
    for size in chosen:
      cfg = configs[size]
      steps = steps_for_budget(cfg, budget)
      spent = train_flops(cfg, steps)
      if abs(spent / budget - 1) > 0.1:  # the fits would put the run at the wrong compute
        raise config_lib.ConfigError(
            f'isoflop_grid({family!r}, {spec!r}): size {size!r} at budget {budget:.3g}: '
            f'{steps} steps spend {spent:.3g} FLOPs, {spent / budget:.2f}x the budget; '
            'raise the budget or leave the size out')
      members.append({
          'config': spec, 'name': f'{family}-{size}-{labels[float(budget)]}',
          'budget': budget, **values[size], 'train.steps': steps,
          'train.warmup_steps': max(1, int(steps * warmup_fraction)),
          'checkpoint.every_steps': max(1, min(steps, 500)),
          'log.eval_every_steps': steps})
  return members
