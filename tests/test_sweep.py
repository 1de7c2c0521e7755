"""Scaling-law sweeps: the fits recover known laws, the runner resumes, the report is written."""

import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import tiny_config
from jaxarch import cli
from jaxarch import config as config_lib
from jaxarch.sweep import (FitError, fit_scaling_law, isoflop_fits, isoflop_minimum,
                           predict_loss)
from jaxarch.sweep import plan, report, runner
from jaxarch.train import train

CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def _law_records(law, budgets, sizes, noise, seed=0):
  rng = np.random.default_rng(seed)
  records = []
  for budget in budgets:
    for n in sizes:
      d = budget / (6 * n)
      loss = law['E'] + law['A'] / n ** law['alpha'] + law['B'] / d ** law['beta']
      records.append(dict(params=n, tokens=d, budget=budget,
                          loss=loss * math.exp(rng.normal(0, noise))))
  return records


def test_parametric_fit_recovers_a_known_law_from_noisy_runs():
  records = _law_records(CHINCHILLA, [1e17, 1e18, 1e19, 1e20], np.geomspace(1e7, 1e10, 8),
                         noise=0.005)
  fit = fit_scaling_law(records, bootstrap=10)
  assert fit['alpha'] == pytest.approx(0.34, abs=0.02)
  assert fit['beta'] == pytest.approx(0.28, abs=0.02)
  assert fit['E'] == pytest.approx(1.69, rel=0.03)
  low, high = fit['intervals']['alpha']
  assert low <= fit['alpha'] <= high


def test_bootstrap_intervals_reach_out_on_both_sides_of_the_fit():
  """`intervals` are the 5th and 95th percentiles of the bootstrap fits: on noisy runs the
  fit lies well inside, with room on each side (an upper end at the median would sit on
  the fit, and a 90% interval would claim a certainty it lacks)."""
  records = _law_records(CHINCHILLA, [1e17, 1e18, 1e19], np.geomspace(1e7, 1e10, 6),
                         noise=0.01, seed=1)
  fit = fit_scaling_law(records, bootstrap=20, seed=2)
  for key in ('alpha', 'beta'):
    low, high = fit['intervals'][key]
    width = high - low
    assert width > 0.005
    assert low + width / 5 < fit[key] < high - width / 5, (key, low, fit[key], high)


def test_parametric_fit_runs_to_the_minimum_of_a_small_huber_loss():
  # A law whose A/N^alpha term is small: scipy's default tolerances stopped L-BFGS-B at
  # alpha = 1.03 on these noise-free runs (its Huber loss ~1e-4 looked converged).
  law = dict(E=0.8, A=50.0, B=200.0, alpha=0.5, beta=0.35)
  fit = fit_scaling_law(_law_records(law, [1e17, 1e18, 1e19, 1e20],
                                     np.geomspace(1e7, 1e10, 8), noise=0.0))
  assert fit['alpha'] == pytest.approx(0.5, abs=1e-3)
  assert fit['beta'] == pytest.approx(0.35, abs=1e-3)
  assert fit['E'] == pytest.approx(0.8, rel=1e-3) and fit['huber_loss'] < 1e-12
  assert fit['at_bound'] == []
  # No floor in reach of the runs: E goes to the search's bound e^-5, which is said.
  law = dict(E=1e-4, A=50.0, B=200.0, alpha=0.5, beta=0.35)
  fit = fit_scaling_law(_law_records(law, [1e17, 1e18, 1e19, 1e20],
                                     np.geomspace(1e7, 1e10, 8), noise=0.0))
  assert fit['E'] == pytest.approx(math.exp(-5)) and fit['at_bound'] == ['E']


def test_predict_loss_is_the_law_with_each_exponent_on_its_own_term():
  """L(N, D) = E + A/N^alpha + B/D^beta: Chinchilla's alpha and beta differ, so an
  exponent on the wrong term shows (the two terms at 1e9 params, 2e10 tokens)."""
  n, d = np.array([1e9, 7e7]), np.array([2e10, 1.4e9])
  expected = 1.69 + 406.4 / n ** 0.34 + 410.7 / d ** 0.28
  np.testing.assert_allclose(predict_loss(CHINCHILLA, n, d), expected, rtol=1e-12)
  assert predict_loss(CHINCHILLA, 1e9, 2e10) == pytest.approx(expected[0], rel=1e-12)


def test_isoflop_profiles_find_the_known_optimum():
  # A parabola in log N with its vertex at N = 3e8: found exactly, inside the sizes run.
  sizes = np.geomspace(1e7, 1e10, 9)
  vertex = isoflop_minimum(sizes, [2.0 + 0.05 * (math.log(n) - math.log(3e8)) ** 2
                                   for n in sizes])
  assert vertex['params'] == pytest.approx(3e8, rel=1e-6) and vertex['inside']
  assert vertex['loss'] == pytest.approx(2.0)
  # Under L(N, D) with D = C / 6N, N* grows as C^(beta / (alpha + beta)).
  records = _law_records(CHINCHILLA, [1e18, 1e19, 1e20, 1e21], np.geomspace(1e7, 1e11, 13),
                         noise=0.0)
  iso = isoflop_fits(records)
  expected = CHINCHILLA['beta'] / (CHINCHILLA['alpha'] + CHINCHILLA['beta'])
  assert iso['params_exponent'] == pytest.approx(expected, abs=0.03)
  assert iso['params_exponent'] + iso['tokens_exponent'] == pytest.approx(1.0, abs=1e-6)


def test_a_budgets_optimal_tokens_are_read_off_the_least_squares_line_of_log_d_on_log_n():
  """Runs' tokens scatter around C / 6N (whole steps, FLOPs per token beyond 6N): D* is the
  least-squares prediction of log D from log N at N*. The line of log N on log D is
  another one (the two agree only when the points lie on a line)."""
  sizes = np.geomspace(1e7, 1e10, 7)
  scatter = [1.2, 0.8, 1.1, 0.9, 1.15, 0.85, 1.0]
  records = [dict(params=n, tokens=1e18 / (6 * n) * s, budget=1e18,
                  loss=2.0 + 0.05 * (math.log(n) - math.log(3e8)) ** 2)
             for n, s in zip(sizes, scatter)]
  (profile,) = isoflop_fits(records)['profiles']
  x, y = np.log(sizes), np.log([r['tokens'] for r in records])
  slope = np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2)
  assert profile['params'] == pytest.approx(3e8, rel=1e-6)
  assert profile['tokens'] == pytest.approx(
      math.exp(y.mean() + slope * (math.log(3e8) - x.mean())), rel=1e-6)


def test_a_profile_whose_runs_bracket_the_optimum_is_not_called_a_bound():
  """The best run has a worse one on each side, yet the parabola through all five sizes
  put its vertex below the smallest: the report said the smallest size was best."""
  sizes = [1.56e8, 3.12e8, 6.24e8, 1.25e9, 2.50e9]
  losses = [2.133, 2.125, 2.284, 2.481, 2.701]  # a noisy Chinchilla profile
  vertex = isoflop_minimum(sizes, losses)
  assert vertex['inside'] and vertex['side'] is None
  assert 1.56e8 < vertex['params'] < 6.24e8 and vertex['loss'] <= 2.125
  c2, c1, c0 = vertex['coefficients']  # the parabola through the best size and its two
  for n, loss in zip(sizes[:3], losses[:3]):  # neighbours, which the plot draws
    assert c2 * math.log(n) ** 2 + c1 * math.log(n) + c0 == pytest.approx(loss)


def test_fits_refuse_too_few_or_concave_runs():
  with pytest.raises(FitError, match='at least 5 runs'):
    fit_scaling_law([dict(params=1e6, tokens=1e9, loss=3.0)] * 4)
  with pytest.raises(FitError, match='no minimum'):
    isoflop_minimum([1e6, 1e7, 1e8], [3.0, 3.5, 3.0])
  # Loss rising with N all the way, and concave: the optimum is below the sizes run.
  bound = isoflop_minimum([1e8, 1e6, 1e7], [3.6, 3.0, 3.5])
  assert bound == {**bound, 'params': pytest.approx(1e6), 'loss': 3.0, 'inside': False,
                   'side': 'below'}
  assert isoflop_minimum([1e6, 1e7, 1e8], [3.0, 2.9, 2.3])['side'] == 'above'
  # Linear in log N: the fitted curvature is rounding noise, its vertex at exp(±huge).
  linear = [dict(params=n, tokens=1e17 / n, loss=loss, budget=1e17)
            for n, loss in zip([1e5, 2e5, 4e5], [3.0, 3.1, 3.2])]
  (profile,) = isoflop_fits(linear)['profiles']
  assert profile == {**profile, 'params': pytest.approx(1e5), 'tokens': pytest.approx(1e12),
                     'inside': False, 'side': 'below'}
  with pytest.raises(FitError, match='3 or more model sizes'):
    isoflop_minimum([1e6, 1e7], [3.0, 2.9])
  # One model size (or one token count) leaves A and alpha undetermined.
  with pytest.raises(FitError, match='3 or more distinct params'):
    fit_scaling_law([dict(params=1e7, tokens=t, loss=2 + 1e3 / t ** 0.3)
                     for t in np.geomspace(1e8, 1e10, 8)])
  # A size of 0 (a foreign record) is this budget's error, not numpy's.
  (profile,) = isoflop_fits([dict(params=n, tokens=1e8, loss=loss, budget=1e15)
                             for n, loss in ((0, 2.0), (1e6, 1.5), (2e6, 1.8))])['profiles']
  assert 'params must be positive' in profile['error']


def test_a_law_with_an_exponent_at_zero_is_refused_not_reported():
  # Flat losses: alpha = 0 fitted best, and E = 1, A = 1 came back as if they were measured
  # (any E + A = 2 fits as well).
  grid = [(n, d) for n in (1e6, 2e6, 4e6) for d in (1e8, 2e8, 4e8)]
  with pytest.raises(FitError, match='does not fall with params'):
    fit_scaling_law([dict(params=n, tokens=d, loss=2.0) for n, d in grid])
  # Loss that grows with the tokens: beta = 0 at best.
  with pytest.raises(FitError, match='does not fall with tokens'):
    fit_scaling_law([dict(params=n, tokens=d, loss=2 + 300 / n ** 0.3 + d / 1e9)
                     for n, d in grid])


def test_an_interval_that_reaches_a_bound_of_the_search_is_named():
  """One budget with noise: E's bootstrap interval sits on the search's floor (e^-5), which
  the runs do not set; the report says so beside the point estimate at a bound."""
  records = _law_records(CHINCHILLA, [1e19], np.geomspace(1e7, 1e10, 6), noise=0.02, seed=1)
  law = fit_scaling_law(records, bootstrap=20)
  assert law['bootstrap'] == 20 and law['intervals_at_bound'] == ['E']
  assert law['intervals']['E'][0] == pytest.approx(math.exp(-5))


def test_the_fits_given_results_records_say_how_to_make_them_points():
  record = {'name': 'd32', 'family': 'dense', 'params_active': 10**6, 'params_total': 10**6,
            'tokens': 10**8, 'flops': 6e14, 'budget': 6e14, 'eval_loss': 2.0}
  with pytest.raises(FitError, match=r"lacks 'params': the records of results.jsonl become "
                     r'fit points by jaxarch.sweep.report.fit_points'):
    fit_scaling_law([record] * 6)
  (point,) = report.fit_points([record])
  assert (point['params'], point['tokens'], point['loss']) == (10**6, 10**8, 2.0)


def test_isoflop_fits_name_a_missing_or_bad_budget():
  runs = [dict(params=n, tokens=1e17 / (6 * n), loss=3.0 + (math.log(n) - 14) ** 2)
          for n in (1e5, 1e6, 1e7)]
  for bad in ({}, {'budget': None}, {'budget': math.nan}):
    broken = [{k: v for k, v in r.items() if k != 'budget'} | bad for r in runs]
    with pytest.raises(FitError, match='budget'):
      isoflop_fits(broken)
  with pytest.raises(FitError, match='budget must be positive'):
    isoflop_fits([dict(r, budget=-1e17) for r in runs])

def test_a_size_run_twice_is_an_end_whichever_record_comes_first():
  runs = [(1e6, 2.0), (1e6, 1.5), (2e6, 1.6), (4e6, 1.9)]  # the smallest size is best
  for records in (runs, runs[1::-1] + runs[2:]):
    vertex = isoflop_minimum(*zip(*records))
    assert not vertex['inside'] and vertex['side'] == 'below'
    assert vertex['bound'] == pytest.approx(2e6)  # the next size in, not the same one


def test_a_vertex_between_the_sizes_whose_best_run_is_an_end_one_is_not_inside():
  # Convex in log N, but falling all the way (docs/scaling's UltraMem at 7.5e10): the
  # vertex lies between the sizes, yet nothing brackets it.
  vertex = isoflop_minimum([1.25e5, 2.5e5, 6.9e5], [2.549, 2.569, 2.803])
  assert vertex['params'] < 6.9e5 and not vertex['inside'] and vertex['side'] == 'below'
  assert vertex['bound'] == pytest.approx(2.5e5)  # the optimum lies below the second size
  # Chinchilla's L(N, D) at one budget, the sizes stopping at N*: the best run is the
  # largest, and the fitted vertex must not feed the power law.
  a, b = CHINCHILLA['alpha'], CHINCHILLA['beta']
  g = (a * CHINCHILLA['A'] / (b * CHINCHILLA['B'])) ** (1 / (a + b))
  optimum = g * (1e20 / 6) ** (b / (a + b))  # N* at C = 1e20
  records = _law_records(CHINCHILLA, [1e20], np.geomspace(optimum / 30, optimum, 5),
                         noise=0.0)
  losses = [r['loss'] for r in records]
  assert np.argmin(losses) == 4  # the largest size is best
  vertex = isoflop_minimum([r['params'] for r in records], losses)
  assert vertex['params'] < optimum  # a vertex between the sizes run, too small
  assert not vertex['inside'] and vertex['side'] == 'above'


# The runner on tiny runs.

def _sweep_file(tmp_path, data_dir, steps=(6, 6, 6)):
  """A sweep of three dense widths at one budget."""
  members = []
  for width, n in zip((32, 48, 64), steps):
    members.append({'config': 'configs/dense.py:tiny', 'name': f'd{width}', 'budget': 1e9,
                    'model.d_model': width, 'model.d_ff': 2 * width, 'model.n_layers': 2,
                    'data.seq_len': 32, 'train.batch_size': 8, 'train.steps': n,
                    'train.warmup_steps': 1, 'log.every_steps': 3, 'log.eval_batches': 1,
                    'log.eval_every_steps': n, 'checkpoint.every_steps': 3,
                    'checkpoint.async_save': False, 'log.tensorboard': False,
                    'data.data_dir': data_dir})
  path = tmp_path / 'sweep.py'
  path.write_text(f'def get_sweep(arg=None):\n  return {members!r}\n')
  return str(path)


def _stand_in_training(monkeypatch):
  """Training processes that write the metrics a run leaves: d32 has no validation data;
  d48 fails and d64 stops at step 3 of 6 (a signal), until a `retry` file is there."""
  script = (
      'import json, sys, pathlib; d = pathlib.Path(sys.argv[1]); retry = (d / "retry").exists()\n'
      'if d.name == "d48" and not retry: sys.exit("jaxarch: config error: train.batch_size")\n'
      'step = 3 if d.name == "d64" and not retry else 6\n'
      'line = dict(step=step, loss=2.0) if d.name == "d32" else dict(step=step, loss=2.0, '
      'eval_loss=2.5, eval_bpb=3.0)\n'
      '(d / "metrics.jsonl").write_text(json.dumps(line) + "\\n")\n'
      'sys.exit(143 if step == 3 else 0)\n')  # `jaxarch train` stopped by SIGTERM
  monkeypatch.setattr(runner, 'train_command',
                      lambda run, run_dir: [sys.executable, '-c', script, str(run_dir)])


def test_only_runs_the_runs_it_names_and_leaves_the_others(tmp_path, data_dir, monkeypatch):
  _stand_in_training(monkeypatch)
  spec, workdir = _sweep_file(tmp_path, data_dir), tmp_path / 'sweep'
  messages = []
  records = runner.run_sweep(spec, workdir, only=['d3*'], echo=messages.append)
  assert [r['name'] for r in records] == ['d32']
  assert messages[0] == ('sweep: 3 runs, 0 finished already, 2 left out by --only, 1 to run, '
                         '1 at a time')
  assert sorted(p.name for p in (workdir / 'runs').iterdir()) == ['d32']
  with pytest.raises(runner.SweepError, match=r'--only d96 names no run of the sweep file '
                     r'\(runs: d32, d48, d64\)'):
    runner.run_sweep(spec, workdir, only=['d32', 'd96'], echo=messages.append)
  assert cli.main(['sweep', f'--config={spec}', f'--workdir={workdir}', '--only=d32,d6*']) == 2
  assert not (workdir / 'runs' / 'd48').exists()  # d64 stopped at step 3: unfinished


def test_sweep_records_finished_runs_once_and_reports_failed_and_stopped_ones(
    tmp_path, data_dir, monkeypatch, capsys):
  _stand_in_training(monkeypatch)
  spec, workdir = _sweep_file(tmp_path, data_dir), tmp_path / 'sweep'
  messages = []
  with pytest.raises(runner.SweepError, match=(
      r"1 run failed: d48; 1 run unfinished: d64; see why in each failed run's train.log "
      r'\(a config error fails again until mended\), then run the sweep again to resume '
      'them all$')):
    runner.run_sweep(spec, workdir, parallel=2, echo=messages.append)
  assert 'sweep: d64 stopped at step 3 of 6' in ' '.join(messages)
  assert 'sweep: d48 failed (exit 1): jaxarch: config error: train.batch_size; see' in (
      ' '.join(messages))  # the run's own error, as only the run checks the mesh
  (d32,) = runner.read_results(workdir)
  assert d32['name'] == 'd32' and d32['eval_loss'] is None and d32['final_loss'] == 2.0
  # A sweep killed while writing a record leaves a torn line: skipped, with a warning.
  with open(workdir / runner.RESULTS, 'a') as results:
    results.write('{"name": "d48", "fam')
  for name in ('d48', 'd64'):
    (workdir / 'runs' / name / 'retry').write_text('')
  messages = []
  records = runner.run_sweep(spec, workdir, echo=messages.append)
  assert '1 finished already, 2 to run' in messages[0]
  # Said as the sweep starts and as it returns the records; not once more per read.
  assert capsys.readouterr().err.count('results.jsonl:2 is not a run record') == 2
  assert [r['name'] for r in records] == ['d32', 'd48', 'd64']
  d48 = records[1]
  assert d48['final_loss'] == 2.0 and d48['eval_loss'] == 2.5 and d48['bpb'] == 3.0
  assert d48['tokens'] == 6 * 8 * 32 and d48['flops'] == pytest.approx(
      d48['tokens'] * plan.flops_per_token(runner.load_sweep(spec)[1].config()))


def test_a_run_killed_by_a_signal_is_named_so_and_resumed(tmp_path, data_dir, monkeypatch):
  # 'failed (exit -9): (an empty log)' before, for a trainer the OOM killer stopped.
  script = ('import os, signal, sys, pathlib; d = pathlib.Path(sys.argv[1])\n'
            'if not (d / "retry").exists(): os.kill(os.getpid(), signal.SIGKILL)\n'
            '(d / "metrics.jsonl").write_text(\'{"step": 6, "loss": 2.0}\\n\')\n')
  monkeypatch.setattr(runner, 'train_command',
                      lambda run, run_dir: [sys.executable, '-c', script, str(run_dir)])
  spec, workdir = _sweep_file(tmp_path, data_dir), tmp_path / 'sweep'
  messages = []
  with pytest.raises(runner.SweepError, match='3 runs failed: '):
    runner.run_sweep(spec, workdir, echo=messages.append)
  assert 'sweep: d32 failed (killed by SIGKILL): (an empty log); see' in ' '.join(messages)
  (workdir / 'runs' / 'd32' / 'retry').write_text('')
  with pytest.raises(runner.SweepError,
                     match='2 runs failed: (d48, d64|d64, d48); see why .* sweep again$'):
    runner.run_sweep(spec, workdir, echo=lambda _: None)
  assert [r['name'] for r in runner.read_results(workdir)] == ['d32']


def test_sweep_moves_aside_a_run_trained_under_an_edited_config(tmp_path, data_dir,
                                                                monkeypatch):
  _stand_in_training(monkeypatch)
  spec, workdir = _sweep_file(tmp_path, data_dir), tmp_path / 'sweep'
  (run,) = [r for r in runner.load_sweep(spec) if r.name == 'd32']
  old = run.config()
  with old.unlocked():
    old.train.lr = 0.3  # the sweep file said 0.3 when d32 was trained
  old_dir = workdir / 'runs' / 'd32'
  config_lib.save(old, old_dir / 'config.json')
  (old_dir / 'metrics.jsonl').write_text(json.dumps(dict(step=6, loss=9.0)) + '\n')
  # d48's was saved by a jaxarch that had no train.grad_accum_steps yet: the same config.
  (d48,) = [r for r in runner.load_sweep(spec) if r.name == 'd48']
  saved = json.loads(json.dumps(config_lib.to_dict(d48.config())))
  del saved['train']['grad_accum_steps']
  # ... and it logged and saved otherwise, which the weights do not see: resumed, not
  # trained again (a sweep file's log.every_steps edit threw runs away).
  saved['log']['every_steps'], saved['checkpoint']['keep'] = 1, 7
  (workdir / 'runs' / 'd48').mkdir()
  (workdir / 'runs' / 'd48' / 'config.json').write_text(json.dumps(saved))
  messages = []
  with pytest.raises(runner.SweepError):  # d48 and d64 fail and stop, as above
    runner.run_sweep(spec, workdir, echo=messages.append)
  assert any('d32: its config changed' in m and 'train.lr 0.3 -> ' in m for m in messages)
  assert not any('d48: its config changed' in m for m in messages)
  assert not list(workdir.glob('runs/d48.replaced-*'))
  (moved,) = workdir.glob('runs/d32.replaced-*')
  assert json.loads((moved / 'metrics.jsonl').read_text())['loss'] == 9.0
  assert runner.read_results(workdir)[0]['final_loss'] == 2.0  # trained afresh


def test_a_run_directory_with_a_torn_config_json_or_wall_time_is_trained_again(
    tmp_path, data_dir, monkeypatch):
  # A JSONDecodeError traceback from the sweep's worker thread before.
  _stand_in_training(monkeypatch)
  spec, workdir = _sweep_file(tmp_path, data_dir), tmp_path / 'sweep'
  for name, text in (('d32', '{"model": {"d_mod'), ('d48', '[1, 2]')):
    (workdir / 'runs' / name).mkdir(parents=True)
    (workdir / 'runs' / name / 'config.json').write_text(text)
  (workdir / 'runs' / 'd64').mkdir()
  (workdir / 'runs' / 'd64' / 'sweep_wall_s').write_text('')  # a ValueError, too
  messages = []
  with pytest.raises(runner.SweepError):  # d48 and d64 fail and stop, as above
    runner.run_sweep(spec, workdir, echo=messages.append)
  assert any('d32: its config changed' in m and 'config.json is not a config' in m
             for m in messages)
  assert len(list(workdir.glob('runs/d*.replaced-*'))) == 2
  assert [r['name'] for r in runner.read_results(workdir)] == ['d32']
  wall = json.loads((workdir / 'runs' / 'd64' / 'sweep_wall_s').read_text())
  assert wall['wall_s'] < 60 and wall['started'] is None


def test_a_run_finished_by_an_orphaned_trainer_is_recorded_with_its_wall_time(
    tmp_path, data_dir, monkeypatch):
  """A sweep killed -9 never added the time of the attempt it had started; its trainer,
  orphaned, went on training and writing train.log. That time counts up to the log's last
  line, so the record's wall_s is the run's, not the few seconds of the next attempt."""
  _stand_in_training(monkeypatch)
  spec, workdir = _sweep_file(tmp_path, data_dir), tmp_path / 'sweep'
  now = time.time()
  for name, wall in (('d32', {'wall_s': 10.0, 'started': now - 1000}),
                     ('d48', 25.0)):  # a bare number: an earlier jaxarch's, added up
    run_dir = workdir / 'runs' / name
    run_dir.mkdir(parents=True)
    (run_dir / 'retry').touch()
    (run_dir / 'sweep_wall_s').write_text(json.dumps(wall))
    (run_dir / 'train.log').write_text('an attempt\n')
  os.utime(workdir / 'runs' / 'd32' / 'train.log', (now - 400, now - 400))
  with pytest.raises(runner.SweepError):  # d64 stops, as above
    runner.run_sweep(spec, workdir, echo=lambda _: None)
  walls = {r['name']: r['wall_s'] for r in runner.read_results(workdir)}
  assert 610 <= walls['d32'] < 660  # 10 s, then 600 s to the orphan's last line, then this
  assert 25 <= walls['d48'] < 75


def test_a_run_another_process_trains_is_left_to_it_and_its_time_still_counts(
    tmp_path, data_dir, monkeypatch):
  """The trainer of a killed sweep (an orphan) still holds its run: the next sweep's
  attempt failed on the run's lock and wrote the wall time as if the orphan had ended."""
  from jaxarch.train.workdir import held_alone  # pylint: disable=g-import-not-at-top
  _stand_in_training(monkeypatch)
  spec, workdir = _sweep_file(tmp_path, data_dir), tmp_path / 'sweep'
  run_dir = workdir / 'runs' / 'd32'
  run_dir.mkdir(parents=True)
  wall = json.dumps({'wall_s': 10.0, 'started': time.time() - 100})
  (run_dir / 'sweep_wall_s').write_text(wall)
  messages = []
  with held_alone(run_dir / '.train.lock.0', RuntimeError('held'), guards='the test'):
    with pytest.raises(runner.SweepError, match='1 run trained by another process: d32'):
      runner.run_sweep(spec, workdir, only=['d32'], echo=messages.append)
  assert any('d32 is being trained by another process' in m for m in messages)
  assert (run_dir / 'sweep_wall_s').read_text() == wall  # the orphan's attempt goes on
  assert not (run_dir / 'metrics.jsonl').exists()
  assert [r['name'] for r in runner.run_sweep(spec, workdir, only=['d32'],
                                              echo=messages.append)] == ['d32']


def test_a_run_that_diverges_is_recorded_without_a_loss_and_not_trained_again(
    tmp_path, data_dir, monkeypatch):
  """An LR sweep's largest rate may diverge: `jaxarch train` stops on non-finite training
  with exit code 3, and the sweep records the run as diverged (the fits leave it out)
  instead of failing it and training it again on every rerun."""
  script = (
      'import json, sys, pathlib; d = pathlib.Path(sys.argv[1])\n'
      'if d.name == "d48":\n'
      '  (d / "metrics.jsonl").write_text(json.dumps(dict(step=3, loss=9.0)) + "\\n")\n'
      '  (d / "nonfinite_step_5.json").write_text("{}")\n'
      '  sys.exit(3)\n'
      '(d / "metrics.jsonl").write_text(json.dumps(dict(step=6, loss=2.0, eval_loss=2.5, '
      'eval_bpb=3.0)) + "\\n")\n')
  launched = []
  monkeypatch.setattr(runner, 'train_command', lambda run, run_dir: (
      launched.append(run.name), [sys.executable, '-c', script, str(run_dir)])[1])
  spec, workdir = _sweep_file(tmp_path, data_dir), tmp_path / 'sweep'
  messages = []
  records = {r['name']: r for r in runner.run_sweep(spec, workdir, echo=messages.append)}
  assert any('d48 diverged at step 5 (non-finite training' in m for m in messages)
  assert records['d48']['diverged_at_step'] == 5 and records['d48']['eval_loss'] is None
  assert records['d48']['steps'] == 3 and records['d32']['eval_loss'] == 2.5
  assert len(report.fit_points(list(records.values()))) == 2  # d48 left out
  launched.clear()
  runner.run_sweep(spec, workdir, echo=messages.append)
  assert launched == []  # all three recorded
  # A cluster job that diverged is collected as such.
  cluster = tmp_path / 'cluster'
  runner.run_sweep(spec, cluster, launcher='slurm', echo=lambda _: None)
  for name in ('d32', 'd48', 'd64'):
    shutil.copy(workdir / 'runs' / name / 'metrics.jsonl', cluster / 'runs' / name)
  (cluster / 'runs' / 'd48' / 'nonfinite_step_5.json').write_text('{}')
  collected = {r['name']: r for r in runner.run_sweep(spec, cluster, collect_only=True,
                                                        echo=lambda _: None)}
  assert collected['d48']['diverged_at_step'] == 5 and collected['d48']['final_loss'] is None
  assert collected['d64']['eval_loss'] == 2.5


def test_a_run_recorded_before_jaxarch_gained_a_config_key_is_not_run_again(
    tmp_path, data_dir, monkeypatch):
  _stand_in_training(monkeypatch)
  spec, workdir = _sweep_file(tmp_path, data_dir), tmp_path / 'sweep'
  with pytest.raises(runner.SweepError):  # d48 fails and d64 stops; d32 is recorded
    runner.run_sweep(spec, workdir, echo=lambda _: None)
  launched = []
  run_one = runner._run_one  # pylint: disable=protected-access
  monkeypatch.setattr(runner, '_run_one',
                      lambda run, *args: (launched.append(run.name), run_one(run, *args))[1])
  (d32,) = [r for r in runner.load_sweep(spec) if r.name == 'd32']
  (record,) = runner.read_results(workdir)

  def recorded_by_an_earlier_jaxarch(hashed=True, **changes):
    saved = json.loads(json.dumps(config_lib.to_dict(d32.config())))
    del saved['train']['grad_accum_steps']  # keys that jaxarch did not have yet
    del saved['data']['stop_ids']
    saved['train'].update(changes)
    (workdir / 'runs' / 'd32' / 'config.json').write_text(json.dumps(saved))
    line = {**record, 'config_hash': config_lib.tree_hash(saved)}
    runner.append_record(workdir, line if hashed else
                         {k: v for k, v in line.items() if k != 'config_hash'})

  recorded_by_an_earlier_jaxarch()
  messages = []
  with pytest.raises(runner.SweepError):
    runner.run_sweep(spec, workdir, echo=messages.append)
  assert '1 finished already, 2 to run' in messages[0] and 'd32' not in launched
  (again,) = [r for r in runner.read_results(workdir) if r['name'] == 'd32']
  assert again == {**record, 'config_hash': config_lib.config_hash(d32.config())}
  recorded_by_an_earlier_jaxarch(hashed=False)  # a line written by hand stands as well
  with pytest.raises(runner.SweepError):
    runner.run_sweep(spec, workdir, echo=lambda _: None)
  assert 'd32' not in launched
  # A record of d32 logging every step: the sweep file's log.every_steps since is not a
  # reason to train it again.
  saved = json.loads(json.dumps(config_lib.to_dict(d32.config())))
  saved['log']['every_steps'] = 1
  (workdir / 'runs' / 'd32' / 'config.json').write_text(json.dumps(saved))
  runner.append_record(workdir, {**record, 'config_hash': config_lib.tree_hash(saved),
                                 'overrides': [*record['overrides'], 'log.every_steps=1']})
  with pytest.raises(runner.SweepError):
    runner.run_sweep(spec, workdir, echo=lambda _: None)
  assert 'd32' not in launched
  (again,) = [r for r in runner.read_results(workdir) if r['name'] == 'd32']
  assert again['overrides'] == record['overrides']  # those of the hash it is recorded under
  # Another config, not only a key gained: d32 trains again.
  recorded_by_an_earlier_jaxarch(lr=0.3)
  with pytest.raises(runner.SweepError):
    runner.run_sweep(spec, workdir, echo=lambda _: None)
  assert 'd32' in launched


def test_a_finished_run_given_another_budget_is_relabelled_not_trained(
    tmp_path, data_dir, monkeypatch):
  """The budget labels a run for the IsoFLOP fits and is not part of its config: a sweep
  file that corrects it left the old one in results.jsonl, and the fits used it."""
  _stand_in_training(monkeypatch)
  spec, workdir = _sweep_file(tmp_path, data_dir), tmp_path / 'sweep'
  with pytest.raises(runner.SweepError):  # d48 fails and d64 stops; d32 is recorded
    runner.run_sweep(spec, workdir, echo=lambda _: None)
  text = pathlib.Path(spec).read_text()
  pathlib.Path(spec).write_text(text.replace("'budget': 1000000000.0", "'budget': 2e9"))
  messages = []
  with pytest.raises(runner.SweepError):
    runner.run_sweep(spec, workdir, echo=messages.append)
  assert '1 finished already, 2 to run' in messages[0]
  (d32,) = [r for r in runner.read_results(workdir) if r['name'] == 'd32']
  assert d32['budget'] == 2e9


def test_a_results_jsonl_with_bytes_that_are_not_text_is_read_past_them(tmp_path, capsys):
  record = {'name': 'd32', 'family': 'dense', 'params_active': 1000, 'tokens': 10**5,
            'flops': 10**12, 'eval_loss': 2.0}
  (tmp_path / 'results.jsonl').write_bytes(json.dumps(record).encode() + b'\n\xff\xfe\x00\n')
  assert [r['name'] for r in runner.read_results(tmp_path)] == ['d32']
  assert 'results.jsonl:2 is not a run record; skipped' in capsys.readouterr().err
  (tmp_path / 'other' / 'results.jsonl').mkdir(parents=True)  # not a file at all
  assert cli.main(['fit', f'--workdir={tmp_path / "other"}']) == 2
  assert 'results.jsonl cannot be read' in capsys.readouterr().err
  for where, what in ((tmp_path / 'results.jsonl', 'is a file'),
                      (tmp_path / 'typo', 'does not exist')):
    assert cli.main(['fit', f'--workdir={where}']) == 2
    assert f'fit: --workdir={where} {what}; give the workdir of a `jaxarch sweep`' in (
        capsys.readouterr().err)


def test_training_runs_fit_as_a_sweeps_do(tmp_path, capsys):
  """`fit --runs`: runs trained one by one (on clusters, by hand) rather than by a sweep.
  Each is read from its workdir (its config's sizes, its last logged step's tokens and
  losses): here 12 dense runs whose validation losses follow a known law, 4 sizes at each
  of 3 computes (their steps rounded: FLOPs within 1%, which share a budget)."""
  law = dict(CHINCHILLA, A=40.0, B=40.0)
  for d_model in (32, 64, 128, 256):
    for budget in (3e12, 3e13, 3e14):
      cfg = config_lib.load('configs/dense.py:tiny', [f'model.d_model={d_model}',
                                                      f'model.d_ff={4 * d_model}'])
      steps = round(budget / plan.train_flops(cfg, steps=1))
      run = tmp_path / 'runs' / f'd{d_model}-{budget:.0e}'
      run.mkdir(parents=True)
      config_lib.save(cfg, run / 'config.json')
      n = plan.param_counts(cfg)['active']
      d = steps * cfg.train.batch_size * cfg.data.seq_len
      loss = law['E'] + law['A'] / n ** law['alpha'] + law['B'] / d ** law['beta']
      (run / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in (
          {'step': steps // 2, 'loss': 9.0},
          {'step': steps, 'loss': loss + 0.1, 'eval_loss': loss, 'eval_bpb': 1.0})))
  out = tmp_path / 'runs' / 'report'  # beside the runs: a glob over them leaves it out
  out.mkdir()
  (tmp_path / 'runs' / 'lr[3]').mkdir()  # a name that is a glob: taken as the path it is
  config_lib.save(cfg, tmp_path / 'runs' / 'lr[3]' / 'config.json')
  shutil.copy(run / 'metrics.jsonl', tmp_path / 'runs' / 'lr[3]')
  assert cli.main(['fit', '--runs', str(tmp_path / 'runs' / 'd32-*'),
                   str(tmp_path / 'runs' / '*'), str(tmp_path / 'runs' / 'lr[3]'),
                   f'--out={out}', '--bootstrap=0']) == 0
  fits = json.loads((out / 'fits.json').read_text())
  assert fits['dense']['runs'] == 13  # d32's runs matched twice, fitted once
  assert fits['dense']['law']['alpha'] == pytest.approx(law['alpha'], abs=0.02)
  assert fits['dense']['law']['beta'] == pytest.approx(law['beta'], abs=0.02)
  profiles = fits['dense']['isoflop']['profiles']
  assert len(profiles) == 3 and all('error' not in p for p in profiles), profiles
  assert (out / 'report.md').read_text().startswith('# Scaling-law report for 13 training runs')
  assert 'dense: L = ' in capsys.readouterr().out
  (tmp_path / 'not_a_run').mkdir()
  for flags, said in [
      (['--runs', str(tmp_path / 'runs' / 'd32-3e+12')], '--runs needs --out'),
      ([f'--workdir={tmp_path}', '--runs', str(tmp_path / 'runs' / 'd32-3e+12'),
        f'--out={out}'],
       "give a sweep's --workdir, or training runs' workdirs"),
      (['--runs', str(tmp_path / 'runs' / 'x*'), f'--out={out}'], 'no such training run'),
      (['--runs', str(tmp_path / 'not_a*'), f'--out={out}'], 'no such training run'),
      (['--runs', str(tmp_path / 'not_a_run'), f'--out={out}'], 'has no config.json')]:
    assert cli.main(['fit', *flags]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count('\n') == 1, err
  # A run's own workdir given as a sweep's says how to fit it.
  assert cli.main(['fit', f'--workdir={tmp_path / "runs" / "d32-3e+12"}']) == 2
  assert 'or training runs as --runs=DIR ... --out=REPORT_DIR' in capsys.readouterr().err


def test_one_sweep_at_a_time_in_a_workdir(tmp_path, data_dir):
  spec, workdir = _sweep_file(tmp_path, data_dir), tmp_path / 'sweep'
  workdir.mkdir()
  with runner._only_sweep_in(workdir):  # pylint: disable=protected-access
    with pytest.raises(runner.SweepError, match='another jaxarch sweep is running'):
      runner.run_sweep(spec, workdir, echo=lambda _: None)


def test_sigterm_to_the_sweep_goes_on_to_its_trainers():
  trainers = {subprocess.Popen(['sleep', '60']) for _ in range(2)}
  with runner._stopping_trainers_on_signals(trainers):  # pylint: disable=protected-access
    os.kill(os.getpid(), signal.SIGTERM)
    codes = [t.wait(timeout=10) for t in trainers]
  assert codes == [-signal.SIGTERM] * 2  # and the sweep itself lives on to report them


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_sweep_starts_no_more_runs(tmp_path, data_dir, signum):
  """SIGTERM (or Ctrl-C) stopped the running trainers, and the sweep then started every
  run still queued; after Ctrl-C they trained unrecorded, the sweep blocked until the last.
  The sweep runs in a process of its own, as `jaxarch sweep` does, with SIGINT as at a
  terminal: deep into a run of the whole suite (2026-12-05) a SIGINT sent to the pytest
  process, or to a process it started, raised no KeyboardInterrupt (file by file it did)."""
  trainer = ('import json, os, sys, time, pathlib; d = pathlib.Path(sys.argv[1])\n'
             '(d / "started").write_text("")\n'
             f'if d.name == "d32": os.kill(os.getppid(), {int(signum)})\n'
             'time.sleep(2)\n'
             '(d / "metrics.jsonl").write_text(json.dumps(dict(step=6, loss=2.0)) + "\\n")\n')
  spec, workdir = _sweep_file(tmp_path, data_dir), tmp_path / 'sweep'
  # Ctrl-C as at a terminal: a process inherits an ignored or blocked SIGINT (found deep
  # into a run of the whole suite under pytest-xdist), and Python then raises nothing.
  sweep = ('import signal, sys\n'
           'signal.signal(signal.SIGINT, signal.default_int_handler)\n'
           'signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n'
           'from jaxarch.sweep import runner\n'
           f'runner.train_command = lambda run, run_dir: [sys.executable, "-c", {trainer!r}, '
           'str(run_dir)]\n'
           'try:\n'
           f'  runner.run_sweep({spec!r}, {str(workdir)!r}, echo=lambda _: None)\n'
           'except BaseException as e:\n'
           '  print(type(e).__name__, e)\n')
  done = subprocess.run([sys.executable, '-c', sweep], capture_output=True, text=True,
                        timeout=120, cwd=pathlib.Path(__file__).parents[1], check=True)
  expected = 'KeyboardInterrupt' if signum == signal.SIGINT else 'SweepError'
  assert done.stdout.startswith(expected), (done.stdout, done.stderr[-2000:])
  assert sorted(p.parent.name for p in workdir.glob('runs/*/started')) == ['d32']
  if signum == signal.SIGTERM:
    # Killed by the sweep's SIGTERM (a trainer still starting, before its handler): not a
    # failure that its train.log explains.
    assert '1 run unfinished: d32; 2 not started, as the sweep was stopped' in done.stdout
  assert runner.read_results(workdir) == []


def test_a_run_whose_preset_was_edited_while_it_trained_is_not_recorded(
    tmp_path, data_dir, monkeypatch):
  """The record took the config hash of the edited preset, so the next sweep skipped a
  run that had trained under the old one."""
  preset = tmp_path / 'preset.py'
  preset.write_text("from jaxarch import config as c\n"
                    "def get_config(arg=None):\n"
                    "  cfg = c.load('configs/dense.py:tiny')\n"
                    "  cfg.train.lr = 0.001\n"
                    "  return cfg\n")
  sweep = tmp_path / 'sweep.py'
  sweep.write_text('def get_sweep(arg=None):\n  return [%r]\n' % {
      'config': str(preset), 'name': 'a', 'train.steps': 6, 'train.warmup_steps': 1,
      'data.data_dir': data_dir})
  # A trainer that saves its config, as `jaxarch train` does; the user edits the preset
  # for the next experiment while it trains.
  script = ('import json, sys, pathlib\n'
            'from jaxarch import config as c\n'
            'd = pathlib.Path(sys.argv[1]); c.save(c.load(sys.argv[2], sys.argv[3:]), '
            'd / "config.json")\n'
            f'p = pathlib.Path({str(preset)!r}); p.write_text(p.read_text().replace('
            '"0.001", "0.003"))\n'
            '(d / "metrics.jsonl").write_text(json.dumps(dict(step=6, loss=2.0)) + "\\n")\n')
  monkeypatch.setattr(runner, 'train_command', lambda run, run_dir: [
      sys.executable, '-c', script, str(run_dir), run.spec, *run.overrides])
  workdir = tmp_path / 'w'
  messages = []
  with pytest.raises(runner.SweepError,
                     match='1 run unfinished: a; run the sweep again to resume them'):
    runner.run_sweep(str(sweep), workdir, echo=messages.append)
  assert any('train.lr 0.001 -> 0.003' in m for m in messages)
  assert runner.read_results(workdir) == []
  # The next sweep trains it afresh, under the config it has now (the edit is done).
  (record,) = runner.run_sweep(str(sweep), workdir, echo=messages.append)
  assert record['config_hash'] == config_lib.tree_hash(
      json.loads((workdir / 'runs' / 'a' / 'config.json').read_text()))
  assert len(list(workdir.glob('runs/a.replaced-*'))) == 1


@pytest.mark.slow
def test_sweep_runs_records_skips_finished_and_resumes_interrupted(tmp_path, data_dir):
  workdir = tmp_path / 'sweep'
  spec = _sweep_file(tmp_path, data_dir)
  # An interrupted run: d48 got to its step-3 checkpoint before the sweep started.
  (run,) = [r for r in runner.load_sweep(spec) if r.name == 'd48']
  partial = run.config()
  with partial.unlocked():
    partial.train.steps = 3
  train(partial, workdir / 'runs' / 'd48')
  # ... under the run's own config (a run stopped at step 3 of 6 would have saved it).
  config_lib.save(run.config(), workdir / 'runs' / 'd48' / 'config.json')
  messages = []
  records = runner.run_sweep(spec, workdir, parallel=2, echo=messages.append)
  assert sorted(r['name'] for r in records) == ['d32', 'd48', 'd64']
  assert '3 to run' in messages[0]
  log = (workdir / 'runs' / 'd48' / 'train.log').read_text()
  assert 'resumed from' in log
  steps = [json.loads(l)['step'] for l in (workdir / 'runs' / 'd48' / 'metrics.jsonl').open()]
  assert steps == [3, 6]  # the first 3 steps were not trained again
  for r in records:
    assert r['family'] == 'dense' and r['tokens'] == 6 * 8 * 32 and r['budget'] == 1e9
    assert r['params_total'] == r['params_active'] > 0 and r['flops'] > 0
    assert np.isfinite(r['final_loss']) and np.isfinite(r['eval_loss']) and r['bpb'] > 0
  again = []
  runner.run_sweep(spec, workdir, echo=again.append)
  assert '3 finished already, 0 to run' in again[0]
  assert len(runner.read_results(workdir)) == 3


def test_report_writes_plots_and_tables(tmp_path, capsys):
  workdir = tmp_path / 'sweep'
  workdir.mkdir()
  lines = []
  for family, shift in (('dense', 0.0), ('moe', -0.05)):
    for i, r in enumerate(_law_records(CHINCHILLA, [1e18, 1e19, 1e20],
                                       np.geomspace(1e7, 1e10, 5), noise=0.002, seed=1)):
      lines.append(dict(name=f'{family}-{i}', family=family, budget=r['budget'],
                        params_total=r['params'], params_active=r['params'],
                        tokens=r['tokens'], flops=6 * r['params'] * r['tokens'],
                        final_loss=r['loss'], eval_loss=r['loss'] + shift,
                        bpb=(r['loss'] + shift) / math.log(2)))  # byte-level
  for i in range(3):  # a family whose every run diverged
    lines.append(dict(lines[i], name=f'ultramem-{i}', family='ultramem', eval_loss=math.nan))
  lines.append(dict(lines[-4], name='moe-no-validation', budget=1e21, eval_loss=None))
  # Hand-edited records: skipped, each with a warning.
  broken = [{k: v for k, v in lines[0].items() if k != 'family'} | {'name': 'no-family'},
            dict(lines[0], name='text-loss', eval_loss='nan')]
  (workdir / 'results.jsonl').write_text(''.join(json.dumps(l) + '\n'
                                                 for l in lines + broken))
  assert cli.main(['fit', f'--workdir={workdir}', '--bootstrap=5']) == 0
  err = capsys.readouterr().err
  assert "run 'no-family' lacks 'family'; skipped" in err
  assert "run 'text-loss' has eval_loss='nan', not a number; skipped" in err
  out = workdir / 'report'
  for name in ('loss_vs_compute.png', 'isoflop.png', 'frontier.png'):
    assert (out / name).read_bytes()[:4] == b'\x89PNG'
  text = (out / 'report.md').read_text()
  assert '| dense |' in text and '| moe |' in text and 'N* ∝ C^a' in text
  assert '| ultramem | 0 of 3 with a finite loss |' in text
  assert 'moe: 1 run had no validation data; its loss is the final training loss' in text
  # MoE is 0.05 better at every budget in this made-up sweep.
  rows = [row for row in text.split('## Families at equal compute')[1].splitlines()
          if row.startswith('| 1e+')]
  assert len(rows) == 3 and all(row.endswith('| moe |') for row in rows)
  fits = json.loads((out / 'fits.json').read_text())
  assert fits['dense']['law']['alpha'] == pytest.approx(0.34, abs=0.05)
  assert fits['dense']['law']['at_bound'] == [] and 'held at a bound' not in text
  assert 'over 5 bootstrap resamples of the runs' in text and fits['dense']['law']['bootstrap'] == 5
  assert fits['dense']['law']['intervals_at_bound'] == []
  assert '| dense | a = ' in text and text.split('| dense | a = ')[1].split('\n')[0].endswith(
      '| 3 |')  # vertices
  assert 'one budget' not in text

  # --validation_only: the run fitted on its training loss left out, and said so.
  assert cli.main(['fit', f'--workdir={workdir}', '--validation_only', '--bootstrap=0',
                   '--out=' + str(tmp_path / 'valonly')]) == 0
  text = (tmp_path / 'valonly' / 'report.md').read_text()
  assert 'moe: 1 run without validation data is left out (--validation_only)' in text
  assert 'had no validation data' not in text and '| ultramem | 0 of 3 with a finite loss |' in text

  # The runs of one budget: a law the report fits, but says the runs barely determine.
  (workdir / 'results.jsonl').write_text(''.join(
      json.dumps(l) + '\n' for l in lines if l['budget'] == 1e19))
  assert cli.main(['fit', f'--workdir={workdir}', '--out=' + str(tmp_path / 'one')]) == 0
  text = (tmp_path / 'one' / 'report.md').read_text()
  assert 'dense: every run has one budget' in text and 'moe: every run has one budget' in text

  # No run names its budget: one line, not an IsoFLOP profile of one size per run.
  (workdir / 'results.jsonl').write_text(''.join(
      json.dumps(dict(l, budget=None)) + '\n' for l in lines if l['family'] == 'dense'))
  assert cli.main(['fit', f'--workdir={workdir}', '--out=' + str(tmp_path / 'unnamed')]) == 0
  text = (tmp_path / 'unnamed' / 'report.md').read_text()
  assert '| dense | no run names its `budget`' in text and 'got 1' not in text

  # Every run diverged, in two families: a report that says so, not a matplotlib traceback.
  (workdir / 'results.jsonl').write_text(''.join(
      json.dumps(dict(l, eval_loss=math.nan, final_loss=math.nan)) + '\n' for l in lines))
  assert cli.main(['fit', f'--workdir={workdir}', '--out=' + str(tmp_path / 'nan')]) == 0
  assert '| dense | 0 of 15 with a finite loss |' in (tmp_path / 'nan' / 'report.md').read_text()


def test_families_of_other_tokenizers_are_compared_per_byte(tmp_path):
  """A BPE dense model (3.0 nats per token of about 4 bytes: 0.75 per byte) against a
  byte-level MEGABYTE (1.0 per byte): the report named MEGABYTE the better at equal
  compute, comparing nats per token with nats per byte."""
  lines = []
  for family, loss, bytes_per_token in (('dense', 3.0, 4.0), ('megabyte', 1.0, 1.0)):
    for i, n in enumerate((1e6, 2e6, 4e6)):
      eval_loss = loss + 0.01 * i
      lines.append(dict(name=f'{family}-{i}', family=family, budget=1e17, params_active=n,
                        tokens=1e17 / (6 * n), flops=1e17, eval_loss=eval_loss,
                        bpb=eval_loss / bytes_per_token / math.log(2)))
  (tmp_path / 'results.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
  report.write_report(tmp_path, bootstrap=0)
  table = (tmp_path / 'report' / 'report.md').read_text().split('at equal compute')[1]
  assert 'Best validation nats per byte per family' in table
  assert '| 1e+17 | 0.7500 (N=1e+06) | 1.0000 (N=1e+06) | dense |' in table
  # A run without validation bits per byte: losses as they are, and said so.
  lines[0]['bpb'] = None
  (tmp_path / 'results.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
  report.write_report(tmp_path, bootstrap=0)
  table = (tmp_path / 'report' / 'report.md').read_text().split('at equal compute')[1]
  assert 'compare only between families of one tokenizer' in table
  assert '| 1e+17 | 3.0000 (N=1e+06) | 1.0000 (N=1e+06) | megabyte |' in table


def test_report_reads_records_without_flops_and_skips_bad_sizes(tmp_path, capsys):
  # Records written by another tool: the planned budget but no 'flops' (a KeyError
  # traceback before), a negative budget or a zero size (numpy's LinAlgError) and no family.
  lines = [dict(name=f'd-{i}', family='dense', budget=r['budget'], params_active=r['params'],
                tokens=r['tokens'], eval_loss=r['loss'])
           for i, r in enumerate(_law_records(CHINCHILLA, [1e18, 1e19, 1e20],
                                              np.geomspace(1e7, 1e10, 5), noise=0.0))]
  lines += [dict(lines[0], name='minus', budget=-1.0), dict(lines[1], name='zero', tokens=0),
            dict(lines[2], name='null', family=None),  # a TypeError, sorting the families
            dict(lines[3], name='drafts', family='bita')]  # a loss of no language model
  (tmp_path / 'results.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
  assert cli.main(['fit', f'--workdir={tmp_path}', '--bootstrap=0']) == 0
  err = capsys.readouterr().err
  assert "run 'drafts' is a BiTA run, whose eval_loss is its mask tokens'" in err
  assert "run 'minus' has budget=-1.0, not a positive finite number; skipped" in err
  assert "run 'zero' has tokens=0, not a positive finite number; skipped" in err
  assert "run 'null' has family=None, not a family name; skipped" in err
  fits = json.loads((tmp_path / 'report' / 'fits.json').read_text())
  assert fits['dense']['law']['alpha'] == pytest.approx(0.34, abs=1e-3)
  assert fits['dense']['isoflop']['params_exponent'] > 0 and 'bita' not in fits
  # Every record unusable: not 'no runs ...; run `jaxarch sweep` first'.
  assert cli.main(['fit', f'--workdir={tmp_path}', '--params=total', '--bootstrap=0']) == 2
  err = capsys.readouterr().err
  assert 'none of the 19 runs in' in err and 'run `jaxarch sweep' not in err
  # A training run's workdir given for a sweep's: said so, not "run the sweep first".
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text('{}')
  assert cli.main(['fit', f'--workdir={tmp_path / "run"}']) == 2
  assert f"{tmp_path / 'run'} is a training run's workdir" in capsys.readouterr().err

def test_fits_take_records_from_a_generator_and_name_records_that_are_not_dicts():
  records = _law_records(CHINCHILLA, [1e17, 1e18, 1e19], np.geomspace(1e7, 1e10, 5), noise=0.0)
  assert fit_scaling_law(r for r in records)['alpha'] == pytest.approx(
      fit_scaling_law(records)['alpha'])
  assert len(isoflop_fits(r for r in records)['profiles']) == 3
  with pytest.raises(FitError, match='records must be a list of dicts'):
    fit_scaling_law(records[0])
  with pytest.raises(FitError, match='records must be dicts .* one is list'):
    fit_scaling_law([list(r.values()) for r in records])


def test_fits_refuse_losses_that_are_not_finite_numbers():
  records = _law_records(CHINCHILLA, [1e18, 1e19], np.geomspace(1e7, 1e10, 4), noise=0.0)
  for bad in (math.nan, None, math.inf):
    broken = [dict(records[0], loss=bad), *records[1:]]
    with pytest.raises(FitError, match='loss must be'):
      fit_scaling_law(broken)
    with pytest.raises(FitError, match='loss must be'):
      isoflop_minimum([r['params'] for r in broken[:4]], [r['loss'] for r in broken[:4]])


def test_a_hand_written_budget_its_steps_do_not_spend_is_warned(caplog):
  run = {'config': 'configs/dense.py:tiny', 'name': 'a', 'train.warmup_steps': 1}
  cfg = config_lib.load('configs/dense.py:tiny', ['train.steps=10', 'train.warmup_steps=1'])
  spent = plan.train_flops(cfg)
  with caplog.at_level('WARNING'):
    plan.runs_from([dict(run, budget=spent * 1.05, **{'train.steps': 10})], 'sweep.py')
  assert not caplog.text  # within 10%
  plan.runs_from([dict(run, budget=spent * 2, **{'train.steps': 10})], 'sweep.py')
  assert ("sweep.py: run 'a': 10 steps spend" in caplog.text
          and '0.50x its budget' in caplog.text and '; 20 steps would spend it' in caplog.text)


def test_bad_sweep_configs_give_one_line_errors(tmp_path):
  def error(body):
    path = tmp_path / 'bad.py'
    path.write_text(body)
    with pytest.raises(config_lib.ConfigError) as info:
      runner.load_sweep(str(path))
    assert '\n' not in str(info.value)
    return str(info.value)

  assert 'does not define get_sweep' in error('x = 1\n')
  assert 'non-empty list' in error('def get_sweep(arg=None):\n  return []\n')
  assert "'config' and 'name'" in error("def get_sweep(arg=None):\n  return [{'name': 'a'}]\n")
  assert "run 'a': unknown key 'model.width'" in error(
      "def get_sweep(arg=None):\n  return [{'config': 'configs/dense.py:tiny', 'name': 'a',"
      " 'model.width': 3}]\n")
  assert 'names must be unique' in error(
      "def get_sweep(arg=None):\n  return [{'config': 'configs/dense.py:tiny', 'name': 'a'}]"
      " * 2\n")
  assert 'not "." or ".."' in error(  # '..' would train in the sweep's workdir itself
      "def get_sweep(arg=None):\n  return [{'config': 'configs/dense.py:tiny', 'name': '..'}]\n")
  assert "budget='1e17 FLOPs' must be a positive number" in error(
      "def get_sweep(arg=None):\n  return [{'config': 'configs/dense.py:tiny', 'name': 'a',"
      " 'budget': '1e17 FLOPs'}]\n")
  assert 'budget=0 must be a positive' in error(
      "def get_sweep(arg=None):\n  return [{'config': 'configs/dense.py:tiny', 'name': 'a',"
      " 'budget': 0}]\n")
  path = tmp_path / 'no_arg.py'
  path.write_text("def get_sweep():\n  return [{'config': 'configs/dense.py:tiny', 'name': 'a'}]\n")
  assert "takes no argument" in str(pytest.raises(
      config_lib.ConfigError, runner.load_sweep, f'{path}:small').value)
  assert 'unknown sweep' in str(pytest.raises(
      config_lib.ConfigError, runner.load_sweep, 'configs/sweeps/isoflop.py:nope').value)


def test_sweep_files_may_hold_numpy_values_and_misspelt_reserved_keys_are_named(tmp_path):
  path = tmp_path / 'np_sweep.py'
  path.write_text(
      'import numpy as np\n'
      'def get_sweep(arg=None):\n'
      "  return [{'config': 'configs/dense.py:tiny', 'name': f'lr{i}', 'train.lr': lr,\n"
      "           'model.d_model': np.int64(64),\n"
      "           'mesh.rules': (('batch', (np.str_('data'), 'fsdp')), ('embed', None))}\n"
      '          for i, lr in enumerate(np.geomspace(1e-4, 1e-2, 3).astype(np.float32))]\n')
  runs = runner.load_sweep(str(path))  # np.str_ in a tuple: "must be a tuple" before
  cfg = runs[2].config()
  assert cfg.train.lr == 0.01 and cfg.model.d_model == 64
  assert cfg.mesh.rules[0] == ('batch', ('data', 'fsdp'))
  path.write_text("def get_sweep(arg=None):\n  return [{'config': 'configs/dense.py:tiny', "
                  "'name': 'a', 'budegt': 1e17}]\n")
  with pytest.raises(config_lib.ConfigError, match=r"run 'a': unknown key 'budegt' \(did "
                     r"you mean 'budget'\?\)"):
    runner.load_sweep(str(path))

def test_isoflop_sweep_spends_each_budget():
  runs = runner.load_sweep('configs/sweeps/isoflop.py:tiny')
  assert len(runs) == 36 and len({r.name for r in runs}) == 36
  for r in runs:
    cfg = r.config()
    spent = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len * plan.flops_per_token(cfg)
    assert spent == pytest.approx(r.budget, rel=0.05)


def test_near_optimum_keeps_the_sizes_around_a_budgets_chinchilla_optimum():
  flops = {'a': 6e6, 'b': 6e7, 'c': 6e8, 'd': 6e9, 'e': 6e10}  # 6·N per token
  budget = 120 * 1e8 ** 2  # C = 6·N·(20·N): the optimum is c's N = 1e8
  assert plan.near_optimum(flops, budget, 3) == ['b', 'c', 'd']
  assert plan.near_optimum(flops, budget, 1) == ['c']
  assert plan.near_optimum(flops, budget * 100, 2) == ['c', 'd']  # N* 10x: between c and d
  assert plan.near_optimum(flops, budget, 5) == list(flops)
  # 80 tokens per parameter halve the optimum's N: 'b' is then nearer than 'd'.
  assert plan.near_optimum(flops, budget, 2, tokens_per_param=80) == ['b', 'c']


def test_steps_for_budget_round_to_the_nearest_whole_step():
  """A budget of 2.6 steps' FLOPs trains 3 steps: truncated to 2 it would spend 23% less
  than the budget its IsoFLOP point is plotted at."""
  cfg = config_lib.load('configs/dense.py:tiny')
  per_step = plan.train_flops(cfg, 1)
  assert plan.steps_for_budget(cfg, 2.6 * per_step) == 3
  assert plan.steps_for_budget(cfg, 2.4 * per_step) == 2
  assert plan.steps_for_budget(cfg, 0.3 * per_step) == 1  # at least one


def test_near_optimum_is_6n_per_token_at_chinchillas_n_not_off_by_a_constant():
  """Sizes a factor 2 apart in FLOPs per token: the optimum's 6·N = sqrt(6·C / 20) (C =
  6·N·20·N) picks exactly one of them. A slip of sqrt(6) in it (sqrt(C / 20)) passes the
  decade-spaced test above but picks the size below here."""
  flops = {'a': 1.5e8, 'b': 3e8, 'c': 6e8, 'd': 1.2e9, 'e': 2.4e9}  # 6·N per token
  budget = 120 * 1e8 ** 2  # N* = 1e8: 6·N* = 6e8 ('c')
  assert plan.near_optimum(flops, budget, 1) == ['c']
  assert plan.near_optimum(flops, budget * 4, 1) == ['d']  # N* doubles
  assert plan.near_optimum(flops, budget / 4, 1) == ['b']


def test_isoflop_grid_per_budget_trains_each_budget_near_its_optimum():
  sizes = {'s': {'model.d_model': 32, 'model.d_ff': 64, 'model.n_layers': 2},
           'l': {'model.d_model': 128, 'model.d_ff': 256, 'model.n_layers': 2}}
  per_token = {k: plan.flops_per_token(config_lib.load(
      'configs/dense.py:tiny', [f'{key}={value}' for key, value in v.items()]))
      for k, v in sizes.items()}
  budgets = [per_token[k] ** 2 / 0.3 for k in ('s', 'l')]  # each size's own optimum
  grid = plan.isoflop_grid('dense', 'configs/dense.py:tiny', sizes, budgets, per_budget=1)
  assert [(m['name'].split('-')[1], m['budget']) for m in grid] == list(zip('sl', budgets))
  assert len(plan.isoflop_grid('dense', 'configs/dense.py:tiny', sizes, budgets)) == 4


@pytest.mark.slow
def test_the_gpu_isoflop_grids_bracket_each_budgets_likely_optimum():
  """Each budget's sizes lie on both sides of the optimum it is centred on (the earlier
  grid's largest size was about the optimum at 3e18; 80 bytes per parameter, as every
  family reads bytes: dense's grid took Chinchilla's 20 BPE tokens), in bf16, with lr
  falling as 1/width."""
  runs = runner.load_sweep('configs/sweeps/isoflop.py:cross_family')
  by_budget = {}
  for run in runs:
    cfg = run.config()
    by_budget.setdefault((cfg.model.family, run.budget), []).append(cfg)
  assert len(by_budget) == 16 and all(len(c) == 5 for c in by_budget.values())
  for (family, budget), configs in by_budget.items():
    per_param = 80
    optimum = math.sqrt(6 * budget / per_param)
    per_token = sorted(plan.flops_per_token(c) for c in configs)
    assert per_token[0] < optimum < per_token[-1], (family, budget)
    nearest = min(per_token, key=lambda f: abs(math.log(f / optimum)))
    assert nearest in per_token[1:4], (family, budget)  # centred on it, not just around it
    for c in configs:
      assert c.model.dtype == 'bfloat16' and c.data.seq_len == 1024
      assert c.train.lr == pytest.approx(2e-3 * 256 / c.model.d_model)


def test_isoflop_grid_names_tell_close_budgets_apart():
  # Both were 'dense-s-1.2e11' before: a duplicate-name error for names the user never wrote.
  sizes = {'s': {'model.d_model': 32, 'model.d_ff': 64, 'model.n_layers': 2}}
  grid = plan.isoflop_grid('dense', 'configs/dense.py:tiny', sizes, [1e11, 1.2e11, 1.24e11])
  assert [m['name'] for m in grid] == ['dense-s-1e11', 'dense-s-1.2e11', 'dense-s-1.24e11']
  assert plan.isoflop_grid('dense', 'configs/dense.py:tiny', sizes, [2.5e11])[0]['name'] == (
      'dense-s-2.5e11')  # the names of sweeps run before are kept

def test_isoflop_grid_refuses_a_budget_its_step_rounding_misses():
  sizes = {'s': {'model.d_model': 32, 'model.d_ff': 64, 'model.n_layers': 2}}
  (run,) = plan.isoflop_grid('dense', 'configs/dense.py:tiny', sizes, [1e9])
  one_step = 1e9 / run['train.steps']
  with pytest.raises(config_lib.ConfigError, match=r"size 's' at budget .*: 1 steps spend "
                     r'.*x the budget; raise the budget'):
    plan.isoflop_grid('dense', 'configs/dense.py:tiny', sizes, [one_step / 3])


@pytest.mark.parametrize('command', [['generate', '--prompt=x'], ['eval']])
def test_a_sweep_workdir_given_for_a_run_names_its_runs(tmp_path, capsys, command):
  """'config.json not found: is DIR a jaxarch workdir?' before: it is, a sweep's."""
  for name in ('d64', 'd32', 'd32.replaced-20261206-120000'):
    (tmp_path / 'runs' / name).mkdir(parents=True)
    (tmp_path / 'runs' / name / 'config.json').write_text('{}')
  assert cli.main([*command, f'--workdir={tmp_path}']) == 2
  assert (f"{tmp_path} holds a sweep's runs: give one, e.g. --workdir={tmp_path}/runs/d32 "
          '(2: d32, d64)') in capsys.readouterr().err


def test_a_sweep_and_a_run_do_not_share_a_workdir(tmp_path, data_dir, capsys):
  """Each went ahead in the other's workdir, and `fit` then read a sweep with a run in it."""
  spec = _sweep_file(tmp_path, data_dir)
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text('{}')
  with pytest.raises(runner.SweepError, match=r"holds a run \(its config.json\), not a sweep"):
    runner.run_sweep(spec, tmp_path / 'run', echo=lambda _: None)
  (tmp_path / 'sweep').mkdir()
  (tmp_path / 'sweep' / 'results.jsonl').write_text('')
  assert cli.main(['train', '--config=configs/dense.py:tiny', f'--workdir={tmp_path}/sweep',
                   f'--data_dir={data_dir}']) == 2
  assert "sweep's workdir, not a run" in capsys.readouterr().err
  assert sorted(p.name for p in (tmp_path / 'sweep').iterdir()) == ['results.jsonl']
  # Before its first record, a sweep's workdir is its lock and its runs.
  (tmp_path / 'sweep' / 'results.jsonl').unlink()
  (tmp_path / 'sweep' / 'runs' / 'd32').mkdir(parents=True)
  (tmp_path / 'sweep' / 'runs' / 'd32' / 'config.json').write_text('{}')
  assert cli.main(['train', '--config=configs/dense.py:tiny', f'--workdir={tmp_path}/sweep',
                   f'--data_dir={data_dir}']) == 2
  assert "sweep's workdir, not a run" in capsys.readouterr().err
  # A run trained into a sweep's workdir all the same (an earlier jaxarch): the sweep says
  # to move it out, not to leave the sweep's runs for another workdir.
  (tmp_path / 'sweep' / 'config.json').write_text('{}')
  with pytest.raises(runner.SweepError, match="is this sweep's workdir, but a run was trained "
                     "into it .*: move that run's files"):
    runner.run_sweep(spec, tmp_path / 'sweep', echo=lambda _: None)


def test_records_of_runs_dropped_from_the_sweep_file_are_said_to_be_fitted_still(
    tmp_path, data_dir, monkeypatch):
  _stand_in_training(monkeypatch)
  spec, workdir = _sweep_file(tmp_path, data_dir), tmp_path / 'sweep'
  workdir.mkdir()
  runner.append_record(workdir, {'name': 'd16', 'final_loss': 3.0})  # a run since dropped
  messages = []
  with pytest.raises(runner.SweepError):  # d48 and d64 fail and stop, as above
    runner.run_sweep(spec, workdir, echo=messages.append)
  assert ('sweep: results.jsonl holds 1 run the sweep file no longer has (d16), which '
          '`jaxarch fit` still reads; delete their lines to leave them out') in messages
