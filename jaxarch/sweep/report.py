"""`jaxarch fit`: scaling-law fits per family, PNG plots and a markdown report.

  jaxarch fit --workdir=DIR [--out=DIR/report] [--params=active|total] [--bootstrap=100]

Reads DIR/results.jsonl (written by `jaxarch sweep`). Per family: the IsoFLOP vertices and
the N*(C), D*(C) power laws through them, and L(N, D) = E + A/N^α + B/D^β (see
`sweep.fit`). N is the active parameter count by default (what a token's FLOPs scale
with; for MoE and UltraMem `--params=total` fits against all stored parameters), and the
loss is the validation loss. Writes `loss_vs_compute.png`, `isoflop.png`, `frontier.png`
and `report.md`, which compares the families at equal compute in nats per byte.
"""

import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # files only; no display
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxarch.sweep import fit as fit_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxarch.sweep.runner import read_results, records_of_runs  # pylint: disable=g-import-not-at-top,wrong-import-position

COLORS = {'dense': 'tab:blue', 'moe': 'tab:orange', 'ultramem': 'tab:green',
          'megabyte': 'tab:red'}


def fit_points(records, params: str = 'active') -> list[dict]:
  """Records as fit inputs: {params, tokens, loss, budget, flops, named_budget, validation,
  per_byte} (budget: the sweep's, else the run's FLOPs, named_budget saying which; loss:
  the validation loss, or the final training loss of a run without validation
  data; per_byte: the validation loss in nats per byte, None where not known); runs
  without a finite loss (diverged) are left out."""
  points = []
  for r in records:
    validation = r.get('eval_loss') is not None
    loss = r['eval_loss'] if validation else r.get('final_loss')
    if loss is None or not math.isfinite(loss):
      continue
    budget = r.get('budget') or r['flops']
    bpb = r.get('bpb')
    known = validation and isinstance(bpb, (int, float)) and math.isfinite(bpb) and bpb > 0
    points.append(dict(params=r[f'params_{params}'], tokens=r['tokens'], loss=loss,
                       budget=budget, flops=r.get('flops') or budget,  # planned, if not run
                       named_budget=r.get('budget') is not None,
                       name=r['name'], validation=validation,
                       per_byte=bpb * math.log(2) if known else None))
  return points


def _problem(record: dict, params: str) -> str | None:
  """What keeps a results.jsonl record (hand-edited, or of another tool) out of the fits."""
  for key in ('family', f'params_{params}', 'tokens'):
    if key not in record:
      return f'lacks {key!r}'
  if not isinstance(record['family'], str) or not record['family']:  # fits sort by it
    return f"has family={record['family']!r}, not a family name"
  if record['family'] == 'bita':  # its loss, of drafts m+2 ahead, is no language model's
    return ("is a BiTA run, whose eval_loss is its mask tokens' (drafts 2 or more tokens "
            "ahead) and whose parameters count its frozen base: no language model's loss")
  if record.get('budget') is None and record.get('flops') is None:
    return "lacks 'budget' and 'flops'"
  logged = (f'params_{params}', 'tokens', 'budget', 'flops')  # the fits take their logs
  for key in (*logged, 'eval_loss', 'final_loss'):
    value = record.get(key)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return f'has {key}={value!r}, not a number'
    if key in logged and not 0 < value < math.inf:
      return f'has {key}={value!r}, not a positive finite number'
  return None


def usable_records(records, params: str, path) -> list[dict]:
  """The records a fit can read; the others are skipped with a warning naming the run."""
  kept = []
  for r in records:
    if (problem := _problem(r, params)) is None:
      kept.append(r)
    else:
      print(f'jaxarch: warning: {path}: run {r.get("name")!r} {problem}; skipped', file=sys.stderr)
  return kept


def fit_families(records, *, params: str = 'active', bootstrap: int = 100,
                 validation_only: bool = False) -> dict:
  """family -> {points, runs, unvalidated, isoflop, law (or the reason it could not be
  fitted)}; `validation_only` leaves out the runs without a validation loss (their
  number: `unvalidated`), which are otherwise fitted on their final training loss."""
  by_family = defaultdict(list)
  for r in records:
    by_family[r['family']].append(r)
  fits = {}
  for family, runs in sorted(by_family.items()):
    points = fit_points(runs, params)
    unvalidated = sum(not p['validation'] for p in points) if validation_only else 0
    if validation_only:
      points = [p for p in points if p['validation']]
    entry = {'points': points, 'runs': len(runs), 'unvalidated': unvalidated}
    for key, fn in (('isoflop', lambda: fit_lib.isoflop_fits(points)),
                    ('law', lambda: fit_lib.fit_scaling_law(points, bootstrap=bootstrap))):
      try:
        entry[key] = fn()
      except fit_lib.FitError as e:
        entry[key] = {'error': str(e)}
    fits[family] = entry
  return fits


def compared_loss(fits) -> tuple[str, str]:
  """The points' key the families are compared on, and its name: nats per byte where every
  run has it (bpb · ln 2), as nats per token compare only between runs of one tokenizer (a
  BPE token holds about 4 bytes, a MEGABYTE position one); else each run's own loss."""
  points = [p for entry in fits.values() for p in entry['points']]
  if points and all(p['per_byte'] is not None for p in points):
    return 'per_byte', 'validation nats per byte'
  return 'loss', 'loss'


def _plot_loss_vs_compute(fits, path: Path):
  key, name = compared_loss(fits)
  fig, ax = plt.subplots(figsize=(6, 4))
  for family, entry in fits.items():
    pts = entry['points']
    ax.scatter([p['flops'] for p in pts], [p[key] for p in pts], s=14, alpha=0.6,
               color=COLORS.get(family), label=family)
    best = _best_per_budget(pts, key)
    ax.plot([b['flops'] for b in best], [b[key] for b in best], color=COLORS.get(family))
  ax.set(xlabel='training FLOPs', ylabel=name,
         title='Loss against compute (line: best run per budget)')
  if any(entry['points'] for entry in fits.values()):
    ax.set_xscale('log')
    _log_labels(ax.xaxis)
    ax.legend()
  else:  # a log axis with no data fails to lay out
    ax.text(0.5, 0.5, 'no run with a finite loss', ha='center', transform=ax.transAxes)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _log_labels(axis) -> None:
  """A log axis labelled at 1, 2 and 5 of each decade with SI prefixes ('50k', '250G'):
  matplotlib labels the minor ticks of an axis spanning less than a decade, and its
  '2×10^5 3×10^5 4×10^5' run into each other."""
  axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  axis.set_major_formatter(ticker.EngFormatter(sep=''))
  axis.set_minor_formatter(ticker.NullFormatter())


def _best_per_budget(points, key='loss'):
  best = {}
  for p in points:
    if p['budget'] not in best or p[key] < best[p['budget']][key]:
      best[p['budget']] = p
  return [best[b] for b in sorted(best)]


def _plot_isoflop(fits, path: Path):
  families = list(fits)
  fig, axes = plt.subplots(1, len(families), figsize=(4 * len(families), 3.6), squeeze=False)
  for ax, family in zip(axes[0], families):
    entry = fits[family]
    by_budget = defaultdict(list)
    for p in entry['points']:
      by_budget[p['budget']].append(p)
    cmap = plt.get_cmap('viridis', max(len(by_budget), 2))
    profiles = {p['budget']: p for p in entry['isoflop'].get('profiles', [])}
    for i, budget in enumerate(sorted(by_budget)):
      pts = sorted(by_budget[budget], key=lambda p: p['params'])
      ax.scatter([p['params'] for p in pts], [p['loss'] for p in pts], color=cmap(i), s=14,
                 label=ticker.EngFormatter(sep='')(budget))
      if 'coefficients' in profiles.get(budget, {}):
        c2, c1, c0 = profiles[budget]['coefficients']
        x = np.linspace(math.log(pts[0]['params']), math.log(pts[-1]['params']), 50)
        ax.plot(np.exp(x), c2 * x * x + c1 * x + c0, color=cmap(i))
      if budget in profiles and profiles[budget]['inside']:
        ax.scatter([profiles[budget]['params']], [profiles[budget]['loss']], color=cmap(i),
                   marker='*', s=90, edgecolor='k')
    ax.set(xscale='log', xlabel='parameters N', ylabel='validation loss', title=family)
    _log_labels(ax.xaxis)
    if by_budget:  # a family whose every run diverged has no points to name
      ax.legend(title='FLOPs', fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _plot_frontier(fits, path: Path):
  fig, ax = plt.subplots(figsize=(6, 4))
  drawn = False
  for family, entry in fits.items():
    iso = entry['isoflop']
    profiles = [p for p in iso.get('profiles', []) if p['inside']]
    if not profiles:
      continue
    drawn = True
    c = np.array([p['budget'] for p in profiles])
    ax.scatter(c, [p['params'] for p in profiles], color=COLORS.get(family), label=family)
    if 'params_exponent' in iso:
      grid = np.geomspace(c.min() / 2, c.max() * 2, 20)
      ax.plot(grid, iso['params_coefficient'] * grid ** iso['params_exponent'],
              color=COLORS.get(family),
              label=f'{family}: N* ∝ C^{iso["params_exponent"]:.2f}')
  ax.set(xscale='log', yscale='log', xlabel='compute C (FLOPs)',
         ylabel='compute-optimal N*', title='Compute-optimal model size')
  _log_labels(ax.xaxis)
  _log_labels(ax.yaxis)
  if drawn:
    ax.legend(fontsize=7)
  else:
    ax.text(0.5, 0.5, 'no IsoFLOP minimum inside the sizes run', ha='center',
            transform=ax.transAxes)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _fmt(x, digits=3):
  return '–' if x is None else f'{x:.{digits}g}'


def markdown(fits, params: str, title) -> str:
  lines = [f'# Scaling-law report for {title}', '',
           f'N = {params} parameters, D = training tokens, loss = validation loss (nats per '
           "token of the runs' tokenizer: per byte for byte-level models; the families are "
           'compared in nats per byte), C = training FLOPs by the convention of '
           '`jaxarch.train.flops`.', '',
           '![loss against compute](loss_vs_compute.png)', '', '![IsoFLOP profiles](isoflop.png)',
           '', '![compute-optimal size](frontier.png)', '', '## Runs per family', '',
           '| family | runs | budgets | N range | D range | best loss |', '|---|---|---|---|---|---|']
  notes = []
  for family, entry in fits.items():
    pts = entry['points']
    if not pts:
      lines.append(f'| {family} | 0 of {entry["runs"]} with a finite loss | | | | |')
      continue
    n = [p['params'] for p in pts]
    d = [p['tokens'] for p in pts]
    lines.append(f'| {family} | {len(pts)} | {len({p["budget"] for p in pts})} | '
                 f'{min(n):.3g}–{max(n):.3g} | {min(d):.3g}–{max(d):.3g} | '
                 f'{min(p["loss"] for p in pts):.4f} |')
    if (left := entry['runs'] - len(pts) - entry['unvalidated']):
      notes.append(f'{family}: {left} run{"s" * (left != 1)} without a finite loss (diverged) '
                   f'{"is" if left == 1 else "are"} left out.')
    if (unvalidated := entry['unvalidated']):
      notes.append(f'{family}: {unvalidated} run{"s" * (unvalidated != 1)} without validation '
                   f'data {"is" if unvalidated == 1 else "are"} left out (--validation_only).')
    if (training := sum(not p['validation'] for p in pts)):
      notes.append(f'{family}: {training} run{"s" * (training != 1)} had no validation data; '
                   f'{"its" if training == 1 else "their"} loss is the final training loss.')
  lines += [''] + notes if notes else []
  lines += ['', '## IsoFLOP profiles (approach 2)', '',
            '| family | budget C | N* | D* | loss at N* | N* inside the sizes run |',
            '|---|---|---|---|---|---|']
  for family, entry in fits.items():
    iso = entry['isoflop']
    if entry['points'] and not any(p['named_budget'] for p in entry['points']):
      lines.append(f'| {family} | no run names its `budget`, so each would be an IsoFLOP '
                   'profile of one size: give the runs of one compute the same budget in the '
                   'sweep file | | | | |')
      continue
    if 'error' in iso:
      lines.append(f'| {family} | {iso["error"]} | | | | |')
    for p in iso.get('profiles', []):
      if 'error' in p:
        lines.append(f'| {family} | {p["budget"]:.3g} | {p["error"]} | | | |')
      elif p['inside']:
        lines.append(f'| {family} | {p["budget"]:.3g} | {p["params"]:.3g} | '
                     f'{p["tokens"]:.3g} | {p["loss"]:.4f} | yes |')
      else:  # not bracketed by the sizes: say only on which side of them it is
        side = f'< {p["bound"]:.3g}' if p['side'] == 'below' else f'> {p["bound"]:.3g}'
        end = 'smallest' if p['side'] == 'below' else 'largest'
        lines.append(f'| {family} | {p["budget"]:.3g} | {side} | – | – | no: the {end} '
                     'size is best |')
  lines += ['', 'Power laws through the vertices inside the sizes run (two or more needed; '
            'through two, a line with no error estimate):', '',
            '| family | N* ∝ C^a | D* ∝ C^b | vertices |', '|---|---|---|---|']
  for family, entry in fits.items():
    iso = entry['isoflop']
    vertices = sum(bool(p.get('inside')) for p in iso.get('profiles', []))
    lines.append(f'| {family} | a = {_fmt(iso.get("params_exponent"))} | '
                 f'b = {_fmt(iso.get("tokens_exponent"))} | {vertices} |')
  resamples = {law['bootstrap'] for law in (e['law'] for e in fits.values()) if 'bootstrap' in law}
  lines += ['', '## L(N, D) = E + A/N^α + B/D^β (approach 3)', '',
            '| family | E | A | α (5–95%) | B | β (5–95%) | runs |', '|---|---|---|---|---|---|---|']
  bound_notes = [f'Intervals: 5th to 95th percentile over {", ".join(map(str, resamples))} '
                 'bootstrap resamples of the runs.'] if resamples else []
  for family, entry in fits.items():
    law = entry['law']
    if 'error' in law:
      lines.append(f'| {family} | {law["error"]} | | | | | |')
      continue
    ci = law.get('intervals', {})
    interval = lambda k: (f' ({ci[k][0]:.2f}–{ci[k][1]:.2f})' if k in ci else '')
    lines.append(f'| {family} | {law["E"]:.3f} | {law["A"]:.3g} | {law["alpha"]:.3f}'
                 f'{interval("alpha")} | {law["B"]:.3g} | {law["beta"]:.3f}{interval("beta")} '
                 f'| {law["num_runs"]} |')
    if len({pt['budget'] for pt in entry['points']}) == 1:
      bound_notes.append(f'{family}: every run has one budget, so N and D fall together '
                         '(D ∝ C/N) and the runs hardly tell A/N^α from B/D^β: α and β '
                         'are weakly determined; runs at two or more budgets fix them.')
    if law.get('at_bound'):
      held = law['at_bound']
      bound_notes.append(f'{family}: {", ".join(held)} held at a bound of the fit\'s search '
                         f'({fit_lib.SEARCH_BOUNDS}), not by the runs, which do not '
                         f'determine {"it" if len(held) == 1 else "them"}.')
    if law.get('intervals_at_bound'):
      held = law['intervals_at_bound']
      bound_notes.append(f'{family}: the interval of {", ".join(held)} reaches a bound of '
                         f'the search ({fit_lib.SEARCH_BOUNDS}): the runs bound '
                         f'{"it" if len(held) == 1 else "them"} on one side only.')
  lines += [''] + bound_notes if bound_notes else []
  lines += ['', '## Families at equal compute', '', _equal_compute_table(fits), '']
  return '\n'.join(lines)


def _equal_compute_table(fits) -> str:
  """Best loss per family at each budget that every family ran, in nats per byte where
  known (`compared_loss`)."""
  key, name = compared_loss(fits)
  best = {f: {p['budget']: p for p in _best_per_budget(e['points'], key)}
          for f, e in fits.items() if e['points']}
  budgets = sorted(set.intersection(*(set(b) for b in best.values()))) if best else []
  if not budgets:
    return 'No budget was run by every family.'
  families = list(best)
  rows = [f'Best {name} per family' + (
              '' if key == 'per_byte' else ' (not every run has validation bits per byte: '
              'these compare only between families of one tokenizer)') + ':', '',
          '| budget C | ' + ' | '.join(families) + ' | best |',
          '|---' * (len(families) + 2) + '|']
  for budget in budgets:
    losses = {f: best[f][budget][key] for f in families}
    winner = min(losses, key=losses.get)
    rows.append(f'| {budget:.3g} | ' + ' | '.join(
        f'{losses[f]:.4f} (N={best[f][budget]["params"]:.3g})' for f in families) +
                f' | {winner} |')
  return '\n'.join(rows)


def report_dir(workdir: str | Path | None, out: str | Path | None) -> Path:
  """Where `jaxarch fit` writes: `out`, by default the sweep's WORKDIR/report."""
  return Path(out) if out else Path(workdir) / 'report'


def write_report(workdir: str | Path | None, out: str | Path | None = None, *,
                 runs: Sequence[str | Path] = (), params: str = 'active',
                 bootstrap: int = 100, validation_only: bool = False) -> dict:
  """Fits every family of DIR/results.jsonl, or of the training runs in the workdirs `runs`
  (`fit_families`); writes the plots, report.md and fits.json."""
  if params not in ('active', 'total'):
    raise ValueError(f"fit: params={params!r} must be 'active' or 'total'")
  if runs and out is None:
    raise fit_lib.FitError('fit: --runs needs --out, the directory to write the report in')
  out = report_dir(workdir, out)
  if out.exists() and not out.is_dir():
    raise FileExistsError(f'fit: --out={out} is a file; give a directory for the report')
  if runs:
    records, title = _records_of_runs(runs, params), f'{len(runs)} training runs'
  else:
    records, title = _records_of_sweep(Path(workdir), params), workdir
  out.mkdir(parents=True, exist_ok=True)
  fits = fit_families(records, params=params, bootstrap=bootstrap,
                      validation_only=validation_only)
  _plot_loss_vs_compute(fits, out / 'loss_vs_compute.png')
  _plot_isoflop(fits, out / 'isoflop.png')
  _plot_frontier(fits, out / 'frontier.png')
  (out / 'report.md').write_text(markdown(fits, params, title))
  (out / 'fits.json').write_text(json.dumps(
      {f: {k: v for k, v in e.items() if k != 'points'} for f, e in fits.items()}, indent=2))
  return fits


def _records_of_sweep(workdir: Path, params: str) -> list[dict]:
  """The fittable records of a sweep's results.jsonl, the others said and skipped."""
  if not workdir.is_dir():
    raise FileNotFoundError(f'fit: --workdir={workdir} ' + (
        'is a file' if workdir.exists() else 'does not exist') + '; give the workdir of a '
        '`jaxarch sweep` (the folder that holds results.jsonl)')
  found = read_results(workdir, torn='its run is left out of the fits until a sweep records '
                       'it again; ')
  records = usable_records(found, params, workdir / 'results.jsonl')
  if found and not records:  # not "run the sweep first": it ran
    raise fit_lib.FitError(f'fit: none of the {len(found)} runs in {workdir / "results.jsonl"} '
                           f'can be fitted with --params={params} (see the warnings above)')
  if not records:
    # A training run's workdir (its config.json beside checkpoints/) is one run, not a sweep.
    if (workdir / 'config.json').is_file():
      raise FileNotFoundError(f'no runs in {workdir / "results.jsonl"}: {workdir} is a '
                              'training run\'s workdir; give `jaxarch fit` the --workdir of '
                              'a `jaxarch sweep`, or training runs as --runs=DIR ... '
                              '--out=REPORT_DIR')
    raise FileNotFoundError(f'no runs in {workdir / "results.jsonl"}; run `jaxarch sweep '
                            f'--config=SWEEP_FILE.py[:ARG] --workdir={workdir}` first')
  return records


def _records_of_runs(runs: Sequence[str | Path], params: str) -> list[dict]:
  """The fittable records of training runs' workdirs, the others said and skipped; runs
  of one compute share a budget (`shared_budgets`)."""
  found = records_of_runs(runs)
  records = usable_records(found, params, '--runs')
  if not records:
    raise fit_lib.FitError(f'fit: none of the {len(found)} runs given by --runs can be '
                           f'fitted with --params={params} (see the warnings above)')
  return shared_budgets(records)


BUDGET_TOLERANCE = 0.02  # runs planned at one compute differ by their rounded steps


def shared_budgets(records: list[dict]) -> list[dict]:
  """Records without a budget (runs of no sweep), those whose FLOPs lie within 2% of the
  smallest of their group given one: its FLOPs, so that they make an IsoFLOP profile."""
  out, first = [], None
  for r in sorted(records, key=lambda r: r['flops']):
    if first is None or r['flops'] > first * (1 + BUDGET_TOLERANCE):
      first = r['flops']
    out.append(r if r.get('budget') is not None else dict(r, budget=first))
  return out
