"""`jaxarch sweep`: every run of a sweep in its own sub-workdir, resumable, one record each.

  jaxarch sweep --config=configs/sweeps/isoflop.py:tiny --workdir=DIR [--parallel=N]

Run `name` trains in DIR/runs/<name> as `jaxarch train` would, in its own process (so one
run's crash, or its XLA memory, never touches another), N at a time. When it finishes, one
JSON line is appended to DIR/results.jsonl. A run whose name and config hash are already
there is skipped (also one recorded before jaxarch gained config keys whose defaults keep
its config); a run that was interrupted (or stopped by a signal: it is not recorded)
resumes from its last checkpoint, because `jaxarch train` does. A run whose config was
edited since its directory was trained starts afresh, the old directory moved aside.
Output of run `name` goes to DIR/runs/<name>/train.log. One sweep at a time runs in a
workdir (DIR/.sweep.lock).

`--launcher=NAME` renders one job per run through `LAUNCHERS[NAME]` (the cluster targets of
`jaxarch launch`: slurm, gke, tpu-vm, ray) into DIR/runs/<name>/launch instead of running
them here, and prints the command that submits each; the jobs run the same
`jaxarch train --config=... --workdir=DIR/runs/<name> --config.k=v` command, and
`jaxarch sweep --collect` then records the finished ones (those that ran under the
run's present config). SLURM's jobs are also written as array jobs in DIR/launch, one per
shape of job (nodes, time, queue), so that one `sbatch` queues the sweep, at most
`--parallel` tasks at a time.
"""

import concurrent.futures
import contextlib
import dataclasses
import fnmatch
import functools
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxarch import config as config_lib
from jaxarch.sweep import plan
from jaxarch.train.metrics import final_metrics
from jaxarch.train.nonfinite import DIVERGED, reported_steps
from jaxarch.train.preemption import SIGNALS, STOPPED_CODES, handled
from jaxarch.train.workdir import (RUN_LOG, WALL_TIME, held_alone, is_sweep_workdir,
                                   local_workdir, trained_elsewhere)

RESULTS = 'results.jsonl'


class SweepError(RuntimeError):
  """Runs of a sweep failed; the message says which and where their logs are."""

# Launcher name -> function(run, run_dir) that writes the run's job and returns the command
# that submits it. jaxarch.launch's targets are added when a sweep first renders jobs
# (imported then, as `jaxarch launch` itself needs nothing from sweeps).
LAUNCHERS: dict[str, Callable[[plan.Run, Path], str]] = {}


def launchers() -> dict[str, Callable[[plan.Run, Path], str]]:
  from jaxarch import launch  # pylint: disable=g-import-not-at-top
  for target in launch.TARGETS:
    LAUNCHERS.setdefault(target, functools.partial(launch.render_run, target))
  return LAUNCHERS


def load_sweep(spec: str) -> list[plan.Run]:
  """`configs/sweeps/x.py:arg` -> its runs, each config validated."""
  path, arg = config_lib._split_spec(spec)  # pylint: disable=protected-access
  module = config_lib._import_file(config_lib._resolve_path(path))  # pylint: disable=protected-access
  get_sweep = getattr(module, 'get_sweep', None)
  if not callable(get_sweep):
    raise config_lib.ConfigError(f'sweep file {path!r} does not define get_sweep(arg)')
  if arg and not inspect.signature(get_sweep).parameters:
    raise config_lib.ConfigError(f'sweep file {path!r}: get_sweep() takes no argument, and '
                                 f'{spec!r} passes {arg!r}; drop ":{arg}"')
  members = config_lib.call_config_function(module, get_sweep, arg)
  return plan.runs_from(members, spec)


def train_command(run: plan.Run, run_dir: Path) -> list[str]:
  return [sys.executable, '-m', 'jaxarch.cli', 'train', f'--config={run.spec}',
          f'--workdir={run_dir}', *[f'--config.{o}' for o in run.overrides]]


def read_results(workdir: Path, torn: str = 'its run is run or collected again; ') -> list[dict]:
  """The records of DIR/results.jsonl, the latest one of each run name (a run whose config
  changed is recorded again). A line that is not a record (a sweep killed while writing
  it) is skipped with a warning, which `torn` ends: what becomes of its run."""
  path = Path(workdir) / RESULTS
  if not path.exists():
    return []
  try:
    lines = path.read_bytes().splitlines()
  except OSError as e:  # e.g. a folder of that name
    raise SweepError(f'{path} cannot be read ({e.strerror or e}); move it aside to start '
                     'the records afresh') from None
  latest = {}
  for number, line in enumerate(lines, 1):
    try:  # decoded line by line: bytes that are not UTF-8 spoil only their own line
      record = json.loads(line.decode()) if line.strip() else None
      if record is not None:
        latest.pop(record['name'], None)  # the latest record goes last
        latest[record['name']] = record
    except (ValueError, KeyError, TypeError):  # JSONDecodeError, UnicodeDecodeError
      print(f'jaxarch: warning: {path}:{number} is not a run record; skipped ({torn}delete '
            'the line to end this warning)', file=sys.stderr)
  return list(latest.values())


def append_record(workdir: Path, record: dict) -> None:
  """Appends one line to DIR/results.jsonl, on a line of its own even after a torn one,
  and on disk before the next run starts."""
  with open(Path(workdir) / RESULTS, 'a+b') as results:
    results.seek(0, os.SEEK_END)
    if results.tell():
      results.seek(-1, os.SEEK_END)
      if results.read(1) != b'\n':
        results.write(b'\n')
    results.write(json.dumps(record).encode() + b'\n')
    results.flush()
    os.fsync(results.fileno())


def last_step(run_dir: Path) -> int | None:
  """The last step the run in `run_dir` logged (None: none yet)."""
  return final_metrics(run_dir).get('step')


def record(run: plan.Run, run_dir: Path, wall_s: float | None) -> dict:
  """The results line of a finished run: sizes, tokens, FLOPs and its final metrics
  (`wall_s` None: not timed here, e.g. a cluster job)."""
  return run_record(run.config(), run_dir, name=run.name, spec=run.spec,
                    overrides=run.overrides, budget=run.budget, wall_s=wall_s)


def run_record(cfg, run_dir: Path, *, name: str, spec: str, overrides: Sequence[str] = (),
               budget: float | None = None, wall_s: float | None = None) -> dict:
  """The results line of the run of `cfg` trained in `run_dir`, a sweep's or any other."""
  counts = plan.param_counts(cfg)
  last = final_metrics(run_dir).get
  tokens = (last('step') or 0) * cfg.train.batch_size * cfg.data.seq_len  # (0: diverged)
  return {
      'name': name, 'family': cfg.model.family, 'config': spec,
      'overrides': list(overrides), 'budget': budget,
      'params_total': counts['total'], 'params_active': counts['active'],
      'params_embedding': counts['embedding'], 'tokens': tokens,
      'flops': tokens * plan.flops_per_token(cfg), 'steps': last('step'),
      'final_loss': last('loss'), 'eval_loss': last('eval_loss'), 'bpb': last('eval_bpb'),
      'wall_s': None if wall_s is None else round(wall_s, 1),
      'config_hash': config_lib.config_hash(cfg),
  }


def diverged_record(run: plan.Run, run_dir: Path, wall_s: float | None,
                    at_step: int | None) -> dict:
  """The results line of a run that stopped on non-finite training at `at_step`
  (`diverged_at`): no loss, which the fits leave out."""
  return _diverged(record(run, run_dir, wall_s), at_step)


def _diverged(line: dict, at_step: int | None) -> dict:
  return {**line, 'final_loss': None, 'eval_loss': None, 'bpb': None,
          'diverged_at_step': at_step}


def records_of_runs(run_dirs: Sequence[str | Path]) -> list[dict]:
  """Results lines of training runs given by their workdirs (`jaxarch fit --runs`), named
  by them, each of its saved config: runs trained one by one, on clusters or by hand, fit
  as a sweep's do (with no budget: `report.shared_budgets` gives runs of one compute one)."""
  lines = []
  for run_dir in map(Path, run_dirs):
    saved = run_dir / 'config.json'
    if not saved.is_file():
      raise FileNotFoundError(f'fit: {run_dir} has no config.json: give the workdirs of '
                              '`jaxarch train` runs')
    line = run_record(config_lib.load_json(saved), run_dir, name=str(run_dir),
                      spec=str(saved))
    at_step = diverged_at(run_dir, line['steps'])
    lines.append(line if at_step is None else _diverged(line, at_step))
  return lines


def diverged_at(run_dir: Path, logged: int | None) -> int | None:
  """The step at which the run in `run_dir` last stopped on non-finite training (its
  `nonfinite_step_N.json`), when no step was logged after it (`logged`: its last logged
  step; a run resumed past it, e.g. with train.nonfinite=skip, has not diverged)."""
  steps = reported_steps(run_dir)
  return steps[-1] if steps and steps[-1] > (logged or 0) else None


def recorded_runs(runs: list[plan.Run], workdir: Path, echo=print) -> set[str]:
  """Names of the runs whose record in DIR/results.jsonl stands; records of runs the
  sweep no longer has are said (`_say_removed_runs`).

  A record stands when it was made under the run's present config hash, or under (or,
  without a hash, beside) the config its directory's config.json holds when that config
  is the run's present one with keys jaxarch gained since, at their defaults (what
  `config_changes` reads). Such a record is written again under the new hash, so that
  upgrading jaxarch does not restore every finished run of a sweep to learn that it is
  finished; and with the run's present `budget`, which may have been relabelled.
  """
  records = {r['name']: r for r in read_results(workdir)}
  _say_removed_runs(runs, records, echo)
  standing = set()
  for run in runs:
    old = records.get(run.name)
    if old is None:
      continue
    cfg = run.config()
    new_hash = config_lib.config_hash(cfg)
    old_hash = old.get('config_hash')  # None in a line written by hand
    if old_hash != new_hash:
      run_dir = workdir / 'runs' / run.name
      saved_hash = _saved_hash(run_dir)
      if not (saved_hash is not None and old_hash in (None, saved_hash)
              and last_step(run_dir) == cfg.train.steps
              and config_changes(run, run_dir) is None):
        continue
    # The budget is the fits' label of the run, not part of its config: a new one is
    # recorded without training again.
    if (now := {**old, 'config_hash': new_hash, 'budget': run.budget,
                'overrides': list(run.overrides)}) != old:
      append_record(workdir, now)
    standing.add(run.name)
  return standing


def _saved_hash(run_dir: Path) -> str | None:
  """The config hash of the config.json that `run_dir` was trained under."""
  try:
    return config_lib.tree_hash(json.loads((run_dir / 'config.json').read_text()))
  except (OSError, ValueError, AttributeError):  # none, or not a config
    return None


# `_run_one`'s exit code of a run that another process trains (an orphaned trainer).
BUSY = 'busy'


def _run_one(run: plan.Run, workdir: Path, echo, trainers: set,
             stop: threading.Event) -> tuple[plan.Run, float, int | str | None]:
  """Trains the run; exit code None: not started, as the sweep was told to stop; `BUSY`:
  not started, as another process trains it."""
  if stop.is_set():
    return run, 0.0, None
  run_dir = workdir / 'runs' / run.name
  if trained_elsewhere(run_dir):  # its time goes on counting for that attempt
    return run, 0.0, BUSY
  _move_aside_if_changed(run, run_dir, echo)
  run_dir.mkdir(parents=True, exist_ok=True)
  before = _wall_time_spent(run_dir)
  _write_wall_time(run_dir, before, started=time.time())
  start = time.perf_counter()
  with (open(run_dir / RUN_LOG, 'a') as log,
        subprocess.Popen(train_command(run, run_dir), stdout=log,
                         stderr=subprocess.STDOUT) as trainer):
    trainers.add(trainer)
    if stop.is_set():  # the stop came as it started, after the sweep signalled the others
      trainer.send_signal(signal.SIGTERM)
    code = trainer.wait()
    trainers.discard(trainer)
  total = before + time.perf_counter() - start
  _write_wall_time(run_dir, total)
  return run, total, code


# RUN_DIR/sweep_wall_s (`WALL_TIME`): {"wall_s": seconds of the attempts the sweep saw end,
# "started": unix time of the attempt under way, or null}; a bare number before 2026-12-07.


def _wall_time_spent(run_dir: Path) -> float:
  """Seconds the run has trained in earlier attempts. One whose sweep was killed (-9, a
  lost machine) was never added: it counts until the last line its trainer wrote to
  train.log, which an orphaned trainer goes on writing to until it ends."""
  try:
    saved = json.loads((run_dir / WALL_TIME).read_text())
  except (OSError, ValueError):  # none yet, or torn by a kill while it was written
    return 0.0
  if not isinstance(saved, dict):
    return float(saved) if isinstance(saved, (int, float)) else 0.0
  spent, started = saved.get('wall_s') or 0.0, saved.get('started')
  if isinstance(started, (int, float)):
    try:
      spent += max((run_dir / RUN_LOG).stat().st_mtime - started, 0.0)
    except OSError:
      pass
  return spent


def _write_wall_time(run_dir: Path, wall_s: float, started: float | None = None) -> None:
  tmp = run_dir / f'{WALL_TIME}.tmp'
  tmp.write_text(json.dumps({'wall_s': round(wall_s, 1), 'started': started}) + '\n')
  tmp.replace(run_dir / WALL_TIME)


def _move_aside_if_changed(run: plan.Run, run_dir: Path, echo) -> None:
  """A run directory trained under another config than the sweep's run now has (the sweep
  file was edited) is moved aside, so that the run trains afresh instead of resuming, or
  re-recording, the old one."""
  changed = config_changes(run, run_dir)
  if not changed:
    return
  stale = run_dir.with_name(f'{run.name}.replaced-{time.strftime("%Y%m%d-%H%M%S")}')
  run_dir.rename(stale)
  echo(f'sweep: {run.name}: its config changed since {run_dir} was trained ({changed}); '
       f'the old run is now {stale.name}, and this one trains from step 0')


# Keys that say how a run logs and saves, not what it trains: a sweep file edited in them
# keeps its runs (resumed, or recorded as they are) instead of training them again. The
# weights and eval_loss are the same; a record's final_loss is the mean of the last
# logging window, whose start these keys move (a window ends at each log, eval and
# checkpoint step), so a fit of final_loss (`jaxarch fit` where runs have no eval_loss)
# may mix windows of other lengths.
_BOOKKEEPING = ('log.every_steps', 'log.eval_every_steps', 'log.progress', 'log.tensorboard',
                'checkpoint.every_steps', 'checkpoint.keep', 'checkpoint.keep_best',
                'checkpoint.async_save')


def config_changes(run: plan.Run, run_dir: Path) -> str | None:
  """How the config `run_dir` was trained under differs from the run's, e.g.
  'train.lr 0.003 -> 0.3', or None (the same, or not trained yet; or only in how it logs
  and saves, `_BOOKKEEPING`)."""
  saved = run_dir / 'config.json'
  if not saved.exists():
    return None
  as_json = lambda cfg: json.loads(json.dumps(config_lib.to_dict(cfg)))
  try:  # read as jaxarch reads it: keys added since then take their defaults
    old = as_json(config_lib.load_json(saved))
  except config_lib.ConfigError:  # no longer a valid config: compared as it is
    try:
      old = json.loads(saved.read_text())
    except ValueError:
      old = None
    if not isinstance(old, dict):  # torn or hand-edited: not a config at all
      return f'{saved.name} is not a config'
  changed = [f'{k} {was} -> {now}' for k, was, now in config_lib.differences(
      old, as_json(run.config())) if k not in _BOOKKEEPING
             and k.split('.')[0] not in config_lib.UNHASHED_SECTIONS]
  return (', '.join(changed[:3]) + (' ...' if len(changed) > 3 else '')) or None


def selected(runs: list[plan.Run], only: Sequence[str]) -> set[str]:
  """The names of `runs` that `only` (names or shell patterns, e.g. 'd6*') picks; all
  of them if it is empty. A pattern that picks none is refused (a misspelt name would
  otherwise run nothing, and say so only in a count)."""
  names = [run.name for run in runs]
  if not only:
    return set(names)
  chosen = set()
  for pattern in only:
    if not (matched := fnmatch.filter(names, pattern)):
      raise SweepError(f'sweep: --only {pattern} names no run of the sweep file (runs: '
                       f'{", ".join(names[:8])}{" ..." if len(names) > 8 else ""})')
    chosen.update(matched)
  return chosen


def collect(runs: list[plan.Run], workdir: Path, echo=print,
            chosen: set[str] | None = None) -> list[dict]:
  """Records the runs that finished elsewhere (the jobs `--launcher` wrote): those whose
  metrics reached their last step; the others are left for a later collect. `chosen`:
  the names of the runs to look at (`selected`), all if None."""
  done = recorded_runs(runs, workdir, echo)
  collected, waiting = [], []
  for run in runs:
    cfg = run.config()
    if run.name in done or (chosen is not None and run.name not in chosen):
      continue
    run_dir = workdir / 'runs' / run.name
    logged = last_step(run_dir)
    diverged = diverged_at(run_dir, logged)
    if logged != cfg.train.steps and diverged is None:
      waiting.append(run.name)
      continue
    changed = config_changes(run, run_dir)
    if changed:  # the job that ran was rendered from an earlier version of the sweep
      waiting.append(run.name)
      echo(f'sweep: {run.name}: {run_dir} was trained under another config ({changed}); '
           'render and submit its job again')
      continue
    append_record(workdir, record(run, run_dir, None) if diverged is None else
                  diverged_record(run, run_dir, None, diverged))
    collected.append(run.name)
  echo(f'sweep: {runs_counted(len(collected))} collected, {len(waiting)} not finished'
       + (f' ({", ".join(waiting[:5])}{" ..." if len(waiting) > 5 else ""})' if waiting
          else ''))
  if not (workdir / 'runs').is_dir():
    echo(f'sweep: {workdir / "runs"} does not exist: --collect records the runs that the jobs '
         'rendered by --launcher trained there; run those jobs first, or drop --collect to '
         'train here')
  return read_results(workdir)


def run_sweep(spec: str, workdir: str | Path, *, parallel: int | None = None,
              launcher: str | None = None, launch_overrides: Sequence[str] = (),
              collect_only: bool = False, only: Sequence[str] = (),
              echo=print) -> list[dict]:
  """Runs the sweep's unfinished runs (launcher None or 'local') and returns all records of
  the workdir, or renders every run as a cluster job, its `launch_overrides` (launch.k=v)
  applied to each; `collect_only` records the rendered jobs that have finished. `only`:
  names or shell patterns of the runs to run, render or collect (all if empty); `parallel`:
  runs at a time here (None: 1), or tasks of SLURM's array jobs (None: as the queue allows)."""
  workdir = local_workdir(workdir)
  if (workdir / 'config.json').is_file():  # `jaxarch train`'s, or an export's
    if is_sweep_workdir(workdir):  # a run trained into the sweep's own workdir
      raise SweepError(f'sweep: {workdir} is this sweep\'s workdir, but a run was trained '
                       'into it (its config.json): move that run\'s files (config.json, '
                       'checkpoints, metrics.jsonl, tensorboard) out, then run the sweep again')
    raise SweepError(f'sweep: {workdir} holds a run (its config.json), not a sweep: a sweep '
                     'keeps its runs in WORKDIR/runs/NAME; choose another --workdir')
  runs = load_sweep(spec)
  if parallel is not None and parallel < 1:
    raise ValueError(f'sweep: parallel={parallel} must be >= 1')
  if parallel is not None and launcher not in (None, 'local', 'slurm') and not collect_only:
    raise config_lib.ConfigError(
        f'config error: --parallel={parallel} is how many runs train at a time here, or '
        f'tasks of a SLURM array job; {launcher} jobs run as their cluster schedules them: '
        'drop --parallel')
  chosen = selected(runs, only)
  if collect_only:
    return collect(runs, workdir, echo, chosen)
  if launcher not in (None, 'local'):
    _say_removed_runs(runs, {r['name']: r for r in read_results(workdir)}, echo)
    extra = tuple(o.removeprefix('--').removeprefix('config.') for o in launch_overrides)
    runs = [dataclasses.replace(r, overrides=r.overrides + extra)
            for r in runs if r.name in chosen]
    return render_jobs(runs, workdir, launcher, echo, at_once=parallel,
                       only=bool(only))
  parallel = parallel or 1
  workdir.mkdir(parents=True, exist_ok=True)
  with _only_sweep_in(workdir):
    done = recorded_runs(runs, workdir, echo)
    todo = [r for r in runs if r.name not in done and r.name in chosen]
    left_out = len(runs) - len(chosen)
    echo(f'sweep: {runs_counted(len(runs))}, {len(done & chosen)} finished already, '
         + (f'{left_out} left out by --only, ' if left_out else '')
         + f'{len(todo)} to run, {parallel} at a time')
    failed, unfinished, not_started, busy = [], [], [], []
    trainers, stop = set(), threading.Event()
    with (_stopping_trainers_on_signals(trainers, stop),
          concurrent.futures.ThreadPoolExecutor(parallel) as pool):
      running = [pool.submit(_run_one, r, workdir, echo, trainers, stop) for r in todo]
      try:
        for future in concurrent.futures.as_completed(running):  # recorded as they finish
          run, wall_s, code = future.result()
          if code is None:
            not_started.append(run.name)
            continue
          if code == BUSY:
            busy.append(run.name)
            echo(f'sweep: {run.name} is being trained by another process (a trainer left '
                 'running by a sweep that was killed, or a jaxarch train); left to it')
            continue
          if code == DIVERGED:  # an outcome, as an LR sweep's largest rates may have
            run_dir = workdir / 'runs' / run.name
            line = diverged_record(run, run_dir, wall_s,
                                   diverged_at(run_dir, last_step(run_dir)))
            append_record(workdir, line)
            echo(f'sweep: {run.name} diverged at step {line["diverged_at_step"]} (non-finite '
                 f'training, see {workdir / "runs" / run.name / RUN_LOG}): recorded '
                 'without a loss, which `jaxarch fit` leaves out')
            continue
          # Stopped by a signal, with its checkpoint (or, by the sweep's own stop, before it
          # had set up its handler: killed by the signal): unfinished, its step says so.
          if code in STOPPED_CODES or (stop.is_set() and -code in SIGNALS):
            code = 0
          run_dir = workdir / 'runs' / run.name
          step, steps = last_step(run_dir), run.config().train.steps
          # Its config file (a preset the sweep names) edited while it trained: the run is
          # not the sweep's run now, and a record would stand for the new config.
          changed = None if code or step != steps else config_changes(run, run_dir)
          if code or step != steps or changed:
            (failed if code else unfinished).append(run.name)
            why = (f'failed ({_exit(code)}): {_last_line(run_dir / RUN_LOG)}' if code else
                   f'stopped before its first logged step (of {steps})' if step is None else
                   f'stopped at step {step} of {steps}' if step != steps else
                   f'trained under a config that has changed since it started ({changed})')
            echo(f'sweep: {run.name} {why}; see {run_dir / RUN_LOG}')
            continue
          line = record(run, run_dir, wall_s)
          append_record(workdir, line)
          echo(f'sweep: {run.name} done: loss {_fmt(line["final_loss"])}, eval '
               f'{_fmt(line["eval_loss"])}, {line["wall_s"]:.0f}s')
      except BaseException:  # Ctrl-C: start no more runs, and stop the running ones
        stop.set()
        for future in running:
          future.cancel()
        for trainer in list(trainers):
          trainer.send_signal(signal.SIGTERM)  # a second SIGINT would stop them unsaved
        raise
  if failed or unfinished or not_started or busy:
    said = [f'{runs_counted(len(names))} {what}: {", ".join(names)}'
            for what, names in (('failed', failed), ('unfinished', unfinished),
                                ('trained by another process', busy)) if names]
    said += [f'{len(not_started)} not started, as the sweep was stopped'] if not_started else []
    again = ('run the sweep again to resume them' if not failed else
             "see why in each failed run's train.log (a config error fails again until "
             'mended), then run the sweep again'
             + (' to resume them all' if unfinished or not_started or busy else ''))
    if busy and not (failed or unfinished or not_started):
      again = 'run the sweep again once that process ends, to record them'
    raise SweepError(f'sweep: {"; ".join(said)}; {again}')
  return read_results(workdir)


def _say_removed_runs(runs: list[plan.Run], records: dict[str, dict], echo) -> None:
  """Records of runs that the sweep file no longer has stay in results.jsonl, and `jaxarch
  fit` reads them: said, so that an edit meant to drop them does not fit them still."""
  if gone := sorted(set(records) - {run.name for run in runs}):
    echo(f'sweep: results.jsonl holds {runs_counted(len(gone))} the sweep file no longer has '
         f'({", ".join(gone[:5])}{" ..." if len(gone) > 5 else ""}), which `jaxarch fit` '
         'still reads; delete their lines to leave them out')


def runs_counted(n: int) -> str:
  """'1 run', '2 runs'."""
  return f'{n} run{"s" * (n != 1)}'


def _exit(code: int) -> str:
  """'exit 1', or the signal that killed the run (Popen's -9: 'killed by SIGKILL', which
  the out-of-memory killer sends), which its log cannot say."""
  if code >= 0:
    return f'exit {code}'
  try:
    return f'killed by {signal.Signals(-code).name}'
  except ValueError:
    return f'killed by signal {-code}'


def _last_line(log: Path) -> str:
  """The last line a failed run wrote: its error (a config that does not fit the
  devices, say, which only the run itself can check, as it alone holds them)."""
  try:
    with open(log, 'rb') as f:
      f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
      lines = f.read().decode(errors='replace').strip().splitlines()
  except OSError:
    return '(no log)'
  return lines[-1].strip() if lines else '(an empty log)'


def _fmt(loss: float | None) -> str:
  return '–' if loss is None else f'{loss:.4f}'


@contextlib.contextmanager
def _stopping_trainers_on_signals(trainers: set, stopping: threading.Event | None = None):
  """SIGTERM (or SIGHUP) to the sweep goes on to its running trainers, which checkpoint and
  stop, and sets `stopping`, so that no other run starts: the sweep ends with its runs
  unrecorded and resumable. (Otherwise they would train on, orphaned, beside the trainers
  of the next sweep. Ctrl-C reaches them through the terminal's process group.)"""
  def stop(signum, frame):
    del frame
    if stopping is not None:
      stopping.set()
    for trainer in list(trainers):
      trainer.send_signal(signum)
  if threading.current_thread() is not threading.main_thread():  # signals need it
    yield
    return
  # SIGHUP too: the terminal or ssh session the sweep ran in gone (unless nohup ignores it).
  previous = {sig: signal.signal(sig, stop) for sig in handled() if sig != signal.SIGINT}
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _only_sweep_in(workdir: Path):
  """Holds DIR/.sweep.lock: two sweeps in one workdir would train the same run directories
  at once and record them twice."""
  return held_alone(workdir / '.sweep.lock', SweepError(
      f'sweep: another jaxarch sweep is running in {workdir}; wait for it or use another '
      '--workdir'), guards='a second jaxarch sweep in this workdir')


def render_jobs(runs, workdir: Path, launcher: str, echo=print,
                at_once: int | None = None, only: bool = False) -> list[dict]:
  """Writes one job per run with LAUNCHERS[launcher]; echoes the commands that submit them.
  SLURM's are also written as array jobs in DIR/launch (`launch.slurm_arrays`, replacing
  those of a render before), which queue them all with one command, each array `at_once`
  tasks at a time; `only`: some of the sweep's runs were chosen."""
  known = launchers()
  if launcher not in known:
    raise config_lib.ConfigError(f'config error: --launcher={launcher!r} is not available '
                                 f'(launchers: {", ".join(sorted(known))}, or local to run '
                                 'here)')
  from jaxarch import launch  # pylint: disable=g-import-not-at-top
  warned = set()
  for run in runs:
    _move_aside_if_changed(run, workdir / 'runs' / run.name, echo)
    try:
      submit = known[launcher](run, workdir / 'runs' / run.name)
    except config_lib.ConfigError as e:
      why = str(e).removeprefix('config error: ')  # said once, before the run's name
      raise config_lib.ConfigError(f'run {run.name!r}: {why}') from None
    echo(f'sweep: {run.name}: {submit}')
    if launcher in launch.TARGETS:  # what the jobs would trip on, said once for all runs
      for warning in launch.job_warnings(launcher, run.config()):
        if warning not in warned:
          warned.add(warning)
          echo(f'sweep: warning: {warning}')
  arrays = []
  if launcher == 'slurm' and len(runs) > 1:
    for stale in (workdir / 'launch').glob('sweep*.sbatch'):  # a render before: replaced
      stale.unlink()
    scripts = {run.name: workdir / 'runs' / run.name / 'launch' / 'train.sbatch' for run in runs}
    arrays = launch.slurm_arrays(scripts, workdir / 'launch', runs[0].config().launch.name,
                                 at_once)
    for names, job in arrays:
      launch.write(job)
      which = (f'all {len(names)} runs' if len(arrays) == 1 and not only else
               f'the {len(names)} runs rendered' if len(arrays) == 1 else ', '.join(names))
      echo(f'sweep: {which} as one array job: {job.submit}')
  written = f'{len(runs)} {launcher} job{"s" * (len(runs) != 1)}'
  if arrays:
    written += (' and 1 array job of them' if len(arrays) == 1 else
                f' and {len(arrays)} array jobs of them (one for each nodes, time and queue '
                'that the runs ask for)')
  echo(f'sweep: {written} written; nothing was submitted')
  return read_results(workdir)
