"""Scaling-law fits (Hoffmann et al. 2022, "Chinchilla"): IsoFLOP parabolas and L(N, D).

Records are dicts with at least `params` (N), `tokens` (D), `loss` and, for IsoFLOP
profiles, `budget` (the compute C the run was planned for, in FLOPs).

- **IsoFLOP profiles** (approach 2): at each budget, loss against log N is a parabola; its
  vertex is the compute-optimal size N*(C), and D*(C) is read off the budget's (log N,
  log D) line at N*. Power laws N* ∝ C^a and D* ∝ C^b are fitted through the vertices.
- **Parametric fit** (approach 3): L(N, D) = E + A/N^α + B/D^β, fitted in log space,
  log L ≈ LSE(a − α log N, b − β log D, e) with A = e^a, B = e^b, E = e^e, under a Huber
  loss (δ = 1e-3) of the residuals, minimised by L-BFGS-B from the best points of a grid
  of starts. Bootstrap resamples of the runs give intervals for the exponents.
"""

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np
from scipy import optimize, special

HUBER_DELTA = 1e-3
# Starting grid of (a, b, e, alpha, beta), coarser than the paper's; L-BFGS-B refines the
# best `_STARTS` of them.
_GRID = dict(a=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0), b=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
             e=(-1.0, -0.5, 0.0, 0.5, 1.0), alpha=(0.0, 0.25, 0.5, 1.0, 1.5, 2.0),
             beta=(0.0, 0.25, 0.5, 1.0, 1.5, 2.0))
_STARTS = 16
_BOUNDS = [(-10, 60), (-10, 60), (-5, 5), (0, 4), (0, 4)]
SEARCH_BOUNDS = (f'E >= {math.exp(_BOUNDS[2][0]):.2g}, {_BOUNDS[3][0]} <= α, β <= '
                 f'{_BOUNDS[3][1]}')  # for reports, of the parameters that fits reach
# The summed Huber loss of good fits is ~1e-4 and below, so scipy's default tolerances
# (relative to max(|f|, 1)) would stop L-BFGS-B on the plateau long before the minimum.
_TOLERANCES = dict(ftol=1e-15, gtol=1e-10, maxiter=10_000)


class FitError(ValueError):
  """Too few or unusable records for a fit."""


def _records(records) -> list:
  """`records` as a list of dicts: a generator is read once, not once per column."""
  if isinstance(records, Mapping) or not isinstance(records, Iterable):
    raise FitError('fit: records must be a list of dicts with params, tokens and loss; got '
                   f'{type(records).__name__}')
  records = list(records)
  if (bad := next((r for r in records if not isinstance(r, Mapping)), None)) is not None:
    raise FitError(f'fit: records must be dicts with params, tokens and loss; one is '
                   f'{type(bad).__name__} {str(bad)[:60]}')
  return records


def _columns(records, *keys):
  records = _records(records)
  try:
    columns = [np.array([float(r[k]) for r in records]) for k in keys]
  except KeyError as e:
    sweep = any('params_active' in r for r in records)  # results.jsonl's, not fit points
    raise FitError(f'fit: every record needs {", ".join(keys)}; one lacks {e}' + (
        ': the records of results.jsonl become fit points by jaxarch.sweep.report.'
        "fit_points(records, params='active')" if sweep else '')) from None
  except (TypeError, ValueError) as e:  # None, or text
    raise FitError(f'fit: {", ".join(keys)} must be numbers ({e})') from None
  for key, column in zip(keys, columns):
    if not np.all(np.isfinite(column)):
      raise FitError(f'fit: {key} must be finite; {np.sum(~np.isfinite(column))} records '
                     'have NaN or inf (leave out the runs that diverged)')
  return columns


def _objective(theta, log_n, log_d, log_l, delta):
  """Summed Huber loss of the log-space residuals, and its gradient."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  pred = special.logsumexp(terms, axis=0)
  weights = np.exp(terms - pred)  # d pred / d term
  r = pred - log_l
  small = np.abs(r) <= delta
  loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
  dr = np.where(small, r, delta * np.sign(r))
  grad = np.array([
      (dr * weights[0]).sum(), (dr * weights[1]).sum(), (dr * weights[2]).sum(),
      -(dr * weights[0] * log_n).sum(), -(dr * weights[1] * log_d).sum()])
  return loss, grad


def _grid_starts(log_n, log_d, log_l, delta, count):
  grid = np.array(list(itertools.product(*_GRID.values())))  # S 5
  a, b, e, alpha, beta = (grid[:, i, None] for i in range(5))
  pred = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
  r = np.abs(pred - log_l)
  loss = np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta)).sum(1)
  return grid[np.argsort(loss)[:count]]


def _fit(log_n, log_d, log_l, delta, starts):
  best = None
  for start in starts:
    result = optimize.minimize(_objective, start, args=(log_n, log_d, log_l, delta),
                               jac=True, method='L-BFGS-B', bounds=_BOUNDS,
                               options=_TOLERANCES)
    if best is None or result.fun < best.fun:
      best = result
  return best


def fit_scaling_law(records, *, delta: float = HUBER_DELTA, bootstrap: int = 0,
                    seed: int = 0) -> dict:
  """L(N, D) = E + A/N^alpha + B/D^beta through `records` (`params`, `tokens`, `loss`).

  -> {E, A, B, alpha, beta, huber_loss, num_runs, at_bound (those of E, A, B, alpha, beta
  that the search's bounds hold, not the runs)}, plus `intervals` {alpha, beta, E}
  (5th and 95th percentiles over `bootstrap` resamples of the runs), `bootstrap` and
  `intervals_at_bound` (those whose interval reaches a bound of the search) when asked for.
  """
  # L-BFGS-B's BLAS calls on 5 numbers: OpenBLAS's threads only wait on each other (a fit
  # took 10x as long on 2 busy cores). Imported here: every command imports this module.
  import threadpoolctl  # pylint: disable=g-import-not-at-top
  with threadpoolctl.threadpool_limits(1, user_api='blas'):
    return _fit_scaling_law(records, delta, bootstrap, seed)


def _fit_scaling_law(records, delta: float, bootstrap: int, seed: int) -> dict:
  n, d, loss = _columns(records, 'params', 'tokens', 'loss')
  if len(n) < 5:
    raise FitError(f'fit: L(N, D) has 5 parameters and needs at least 5 runs, got {len(n)}')
  if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0):
    raise FitError('fit: params, tokens and loss must all be positive')
  for key, column in (('params', n), ('tokens', d)):
    # Each of A/N^alpha and B/D^beta adds two unknowns to the floor E: three sizes of
    # each at least, or the fit returns a law the runs do not determine.
    if len(np.unique(column)) < 3:
      raise FitError(f'fit: L(N, D) needs 3 or more distinct {key} values, got '
                     f'{len(np.unique(column))}; vary both the model size and the tokens')
  log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
  best = _fit(log_n, log_d, log_l, delta, _grid_starts(log_n, log_d, log_l, delta, _STARTS))
  a, b, e, alpha, beta = best.x
  for key, log_coefficient, exponent, logs, column in (
      ('alpha', a, alpha, log_n, 'params'), ('beta', b, beta, log_d, 'tokens')):
    # A term that does not change over the runs, at alpha = 0 a constant that E absorbs
    # or at a large alpha one too small to see (which of the two the search ends in
    # depends on scipy's version), leaves E and A (or B) anything.
    term = np.exp(log_coefficient - exponent * logs)
    if term.max() - term.min() <= 1e-6 * loss.mean():
      raise FitError(f'fit: the loss does not fall with {column} in these runs ({key} = '
                     f'{exponent:.2g} fits best, a term that is constant over them), so '
                     'L(N, D) does not determine E; check the runs, or add runs over a wider '
                     f'range of {column}')
  result = dict(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha),
                beta=float(beta), huber_loss=float(best.fun), num_runs=len(n),
                # Held by the search's bounds, not by the runs: e.g. E = e^-5 = 0.0067 is
                # "no floor seen", not a measured irreducible loss.
                at_bound=[key for key, x, (low, high) in zip(('A', 'B', 'E', 'alpha', 'beta'),
                                                              best.x, _BOUNDS)
                          if x <= low + 1e-6 or x >= high - 1e-6])
  if bootstrap:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
      i = rng.integers(0, len(n), len(n))
      fit = _fit(log_n[i], log_d[i], log_l[i], delta, [best.x])
      samples.append((fit.x[3], fit.x[4], math.exp(fit.x[2])))
    samples = np.array(samples)
    result['intervals'] = {k: [float(np.percentile(samples[:, j], 5)),
                               float(np.percentile(samples[:, j], 95))]
                           for j, k in enumerate(('alpha', 'beta', 'E'))}
    result['bootstrap'] = bootstrap
    # An interval that reaches a bound of the search is bounded there by it, not the runs.
    ranges = {'alpha': _BOUNDS[3], 'beta': _BOUNDS[4],
              'E': tuple(math.exp(v) for v in _BOUNDS[2])}
    result['intervals_at_bound'] = [
        k for k, (lo, hi) in result['intervals'].items()
        if np.isclose(lo, ranges[k][0], rtol=1e-3, atol=1e-6)
        or np.isclose(hi, ranges[k][1], rtol=1e-3)]
  return result


def predict_loss(fit: dict, params, tokens):
  """The fitted L(N, D)."""
  return fit['E'] + fit['A'] / np.power(params, fit['alpha']) + fit['B'] / np.power(
      tokens, fit['beta'])


def isoflop_minimum(params, losses) -> dict:
  """The vertex of the parabola loss = c2·x² + c1·x + c0 in x = log N -> {params, loss,
  coefficients, inside, side, bound}.

  `side` is None when the vertex lies inside the sizes run and the best run has a worse
  one on each side (bracketed), else 'below' or 'above' them: the side the optimum lies
  on, and `bound` the size it lies below or above (the smallest or largest size, or the
  next one in when only the best run is at an end). Where the best run has a worse one on
  each side but the parabola through all sizes puts its vertex outside them, the vertex
  is that of the parabola through the best size and its two neighbours.
  A profile that falls or rises all the way (e.g. the smallest model best at every size)
  bounds the optimum: its best size is returned with `inside` False and the side the
  optimum lies on. One with a maximum in the middle has no minimum (FitError).
  """
  if np.any(np.asarray(params, float) <= 0):
    raise FitError('fit: params must be positive')
  x = np.log(np.asarray(params, float))
  y = np.asarray(losses, float)  # None -> NaN
  if not np.all(np.isfinite(y)):
    raise FitError(f'fit: loss must be finite; {np.sum(~np.isfinite(y))} of the IsoFLOP '
                   'profile\'s runs have NaN or inf (leave out the runs that diverged)')
  if len(np.unique(x)) < 3:
    raise FitError(f'fit: an IsoFLOP profile needs 3 or more model sizes, got {len(np.unique(x))}')
  order = np.argsort(x, kind='stable')
  x, y = x[order], y[order]
  sizes = np.unique(x)  # a size may be run twice (two seeds, or equal active params)
  c2, c1, c0 = np.polyfit(x, y, 2)
  x_opt = -c1 / (2 * c2) if c2 > 0 else None
  best = int(np.argmin(y))
  i = int(np.searchsorted(sizes, x[best]))
  if 0 < i < len(sizes) - 1 and (x_opt is None or not x[0] <= x_opt <= x[-1]):
    # The runs bracket the optimum (the best one has a worse one on each side) where the
    # parabola through all of them does not (a profile far from a parabola over a wide
    # range): the vertex of the parabola through the best size and its neighbours, which
    # lies between them.
    near = (x >= sizes[i - 1]) & (x <= sizes[i + 1])
    c2, c1, c0 = np.polyfit(x[near], y[near], 2)
    if c2 <= 0:  # repeated runs at a size can make even these three concave
      raise FitError('fit: the IsoFLOP profile has no minimum around its best run (loss is '
                     'not convex in log N there); widen the size range around the optimum')
    x_opt = -c1 / (2 * c2)
  coefficients = [float(c2), float(c1), float(c0)]
  span = x[-1] - x[0]
  # No curvature, or too little to place a vertex within one span of the sizes run (a
  # profile linear in log N up to rounding would put it at exp(±1e15)).
  if x_opt is None or not x[0] - span <= x_opt <= x[-1] + span:
    steps = np.diff(y)
    if not (np.all(steps >= 0) or np.all(steps <= 0)):
      raise FitError('fit: the IsoFLOP profile has no minimum (loss is not convex in log '
                     'N); widen the size range around the optimum')
    edge = 0 if y[0] <= y[-1] else -1
    return dict(params=float(math.exp(x[edge])), loss=float(y[edge]),
                coefficients=coefficients, inside=False,
                side='below' if edge == 0 else 'above', bound=float(math.exp(x[edge])))
  if x_opt < x[0] or x_opt > x[-1]:
    side, bound = ('below', x[0]) if x_opt < x[0] else ('above', x[-1])
  elif x[best] in (sizes[0], sizes[-1]):
    # The vertex lies between the sizes, but the best run is the smallest or the largest:
    # the optimum is only known to lie before the next size in.
    side, bound = ('below', sizes[1]) if x[best] == sizes[0] else ('above', sizes[-2])
  else:
    side, bound = None, x_opt
  return dict(params=float(math.exp(x_opt)), loss=float(c0 - c1 * c1 / (4 * c2)),
              coefficients=coefficients, inside=side is None, side=side,
              bound=float(math.exp(bound)))


def isoflop_fits(records) -> dict:
  """Per budget, the IsoFLOP vertex, and the power laws N*(C), D*(C) through them.

  -> {'profiles': [{budget, params, tokens, loss, inside, coefficients}],
      'params_exponent', 'params_coefficient', 'tokens_exponent', 'tokens_coefficient'}
  (N* = params_coefficient · C^params_exponent, through the vertices that lie inside the
  sizes run at their budget; the laws need two or more of them).
  """
  records = _records(records)
  (budgets,) = _columns(records, 'budget')
  if np.any(budgets <= 0):
    raise FitError('fit: budget must be positive FLOPs')
  by_budget = defaultdict(list)
  for budget, r in zip(budgets, records):
    by_budget[float(budget)].append(r)
  profiles = []
  for budget in sorted(by_budget):
    runs = by_budget[budget]
    n, d, loss = _columns(runs, 'params', 'tokens', 'loss')
    try:
      if np.any(d <= 0):
        raise FitError('fit: tokens must be positive')
      vertex = isoflop_minimum(n, loss)
    except FitError as e:  # this budget says nothing about the optimum; the others may
      profiles.append(dict(budget=budget, error=str(e), inside=False))
      continue
    slope, intercept = np.polyfit(np.log(n), np.log(d), 1)  # the budget's N-D line
    tokens = math.exp(intercept + slope * math.log(vertex['params']))
    profiles.append(dict(budget=budget, tokens=tokens, **vertex))
  result = {'profiles': profiles}
  # A vertex outside the sizes run is an extrapolation, not a measured optimum.
  inside = [p for p in profiles if p['inside']]
  if len(inside) >= 2:
    log_c = np.log([p['budget'] for p in inside])
    for key in ('params', 'tokens'):
      exponent, log_k = np.polyfit(log_c, np.log([p[key] for p in inside]), 1)
      result[f'{key}_exponent'] = float(exponent)
      result[f'{key}_coefficient'] = float(math.exp(log_k))
  return result
