"""Preemption of real `jaxarch train` processes: SIGTERM ends one cleanly with a
checkpoint, kill -9 loses only the steps since the last one, and either resumes onto the
loss curve of a run that was never interrupted."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxarch import config as config_lib
from jaxarch.train import train
from jaxarch.train.metrics import read_metrics

OVERRIDES = ['model.d_model=64', 'model.n_layers=2', 'model.d_ff=128', 'model.max_len=64',
             'data.seq_len=32', 'train.batch_size=8', 'train.steps=40',
             'train.warmup_steps=4', 'checkpoint.every_steps=10', 'log.every_steps=1',
             'log.eval_every_steps=40', 'log.eval_batches=1', 'log.progress=false',
             'log.tensorboard=false']


def _overrides(data_dir):
  return OVERRIDES + [f'data.data_dir={data_dir}']


def _start(workdir, data_dir) -> subprocess.Popen:
  command = [sys.executable, '-m', 'jaxarch.cli', 'train', '--config=configs/dense.py:tiny',
             f'--workdir={workdir}', *[f'--config.{o}' for o in _overrides(data_dir)]]
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=os.environ.copy())


def _wait_for_step(process, workdir, step, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    records = read_metrics(workdir) if (workdir / 'metrics.jsonl').exists() else []
    if records and records[-1]['step'] >= step:
      return records[-1]['step']
    assert process.poll() is None, process.communicate()
    time.sleep(0.05)
  raise TimeoutError(f'step {step} not reached')


def _losses(workdir):
  return {r['step']: r['loss'] for r in read_metrics(workdir)}  # the last logged wins


def _reference(tmp_path, data_dir):
  cfg = config_lib.load('configs/dense.py:tiny', _overrides(data_dir))
  train(cfg, tmp_path / 'reference')
  return _losses(tmp_path / 'reference')


def _finish(workdir, data_dir):
  process = _start(workdir, data_dir)
  _, err = process.communicate(timeout=300)
  assert process.returncode == 0, err
  return err


def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_exactly(tmp_path, data_dir):
  """143 (128 + SIGTERM): a scheduler counts the run unfinished (a GKE pod that exited 0
  on its node's drain counted as Succeeded, and its JobSet completed)."""
  workdir = tmp_path / 'run'
  process = _start(workdir, data_dir)
  _wait_for_step(process, workdir, 13)
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 143, err
  assert 'jaxarch: SIGTERM: stopping after this step, with a checkpoint\n' in err
  stopped = int(err.split('stopped after step ')[1].split(',')[0])
  assert 13 <= stopped < 40 and 'run the same command to resume' in err
  assert (workdir / 'checkpoints' / str(stopped)).is_dir()

  assert f'resumed from {workdir / "checkpoints" / str(stopped)}' in _finish(workdir, data_dir)
  want, got = _reference(tmp_path, data_dir), _losses(workdir)
  assert sorted(got) == list(range(1, 41))
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('seed', [0, 1])
def test_kill_9_at_a_random_moment_loses_only_the_steps_since_the_checkpoint(
    tmp_path, data_dir, seed):
  workdir = tmp_path / 'run'
  process = _start(workdir, data_dir)
  at = random.Random(seed).randint(11, 35)  # after the first checkpoint, any phase
  _wait_for_step(process, workdir, at)
  time.sleep(random.Random(seed).random() * 0.2)
  process.kill()
  process.communicate()
  killed_at = max(_losses(workdir))
  _finish(workdir, data_dir)
  want, got = _reference(tmp_path, data_dir), _losses(workdir)
  assert sorted(got) == list(range(1, 41)) and killed_at < 40
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-6)


# A process that sends itself SIGTERM as it starts to restore its checkpoint (a job
# preempted while it restarts: restoring a large state takes minutes).
_SIGTERM_WHILE_RESTORING = '''
import os, signal, sys
from jaxarch.train import checkpoint
restore = checkpoint.Checkpointer.restore
def restore_after_sigterm(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGTERM)
  return restore(*args, **kwargs)
checkpoint.Checkpointer.restore = restore_after_sigterm
from jaxarch import cli
sys.exit(cli.main(sys.argv[1:]))
'''


def test_sigterm_before_the_first_step_exits_143_saying_so(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  train(config_lib.load('configs/dense.py:tiny', _overrides(data_dir) + ['train.steps=4']),
        workdir)
  process = subprocess.run(
      [sys.executable, '-c', _SIGTERM_WHILE_RESTORING, 'train', '--config=configs/dense.py:tiny',
       f'--workdir={workdir}', *[f'--config.{o}' for o in _overrides(data_dir)]],
      capture_output=True, text=True, timeout=300, env=os.environ.copy())
  assert process.returncode == 143, process.stderr
  assert 'SIGTERM' in process.stderr and 'run the same command to resume' in process.stderr
  assert max(_losses(workdir)) == 4  # nothing trained, nothing lost
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['4']


def test_a_terminal_gone_stops_with_a_checkpoint_past_its_closed_stderr(tmp_path, data_dir):
  """SIGHUP (an ssh session dropped, as a TPU VM's `gcloud ... ssh` is) ended the process
  unsaved, and a closed stderr (`2>&1 | head`) did at its next line: rich's Console raised
  SystemExit(1) on the broken pipe."""
  workdir = tmp_path / 'run'
  process = _start(workdir, data_dir)
  _wait_for_step(process, workdir, 3)
  process.stderr.close()  # the reader gone: every later line the process writes fails
  process.send_signal(signal.SIGHUP)
  process.wait(timeout=120)
  assert process.returncode == 128 + signal.SIGHUP
  (saved,) = [int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()]
  assert 3 <= saved < 40 and read_metrics(workdir)[-1]['step'] == saved


def test_the_progress_display_gives_way_when_stderr_cannot_be_written(caplog):
  """A closed pipe under stderr stopped training (rich's SystemExit(1)); the display now
  stops, once, and says so in the log, and training goes on."""
  from jaxarch.train.metrics import ProgressBar  # pylint: disable=g-import-not-at-top
  read, write = os.pipe()
  os.close(read)
  bar = ProgressBar(10, 0)
  bar.progress.console.file = os.fdopen(write, 'w')
  with caplog.at_level('WARNING'):
    for step in (1, 2):
      bar.update(step, {'loss': 1.0})
      bar.alert('what the user must know')
  assert isinstance(bar.lost, BrokenPipeError) and not bar.enabled
  assert [r.getMessage() for r in caplog.records] == [
      'jaxarch: stderr cannot be written (the pipe stderr writes to is closed): training '
      'goes on without the progress display; metrics.jsonl has the metrics']


def test_processes_agree_on_a_stop_every_few_seconds_not_every_logging_window(monkeypatch):
  """They agreed at the logging steps alone (50 by default): a Spot VM's 30 s notice could
  pass before the stop. Every process computes the same next step to agree at from what
  all gathered (the slowest's seconds per step)."""
  from jaxarch.train import preemption  # pylint: disable=g-import-not-at-top
  clock, gathers, at = [100.0], [], [0]
  monkeypatch.setattr(preemption.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(preemption.time, 'monotonic', lambda: clock[0])

  def allgather(x):  # this process's row, and another's 1.5 times slower
    gathers.append(at[0])
    return np.stack([x, x * np.array([1, 1.5], np.float32)])
  monkeypatch.setattr(preemption.multihost_utils, 'process_allgather', allgather)
  stop = preemption.StopRequests(sync_every=50)
  assert not stop.should_stop(0)  # before training: they agree at once
  for step in range(1, 120):
    at[0] = step
    clock[0] += 60.0 if step == 1 else 0.5  # the first step compiles
    if step == 90:
      stop.received = 'SIGTERM'
    if stop.should_stop(step):
      break
  # A step apart until a window past the compile is timed (each gather shares the window
  # before it); then every 5 s of the slowest (0.75 s a step): 6 steps.
  assert gathers[:6] == [0, 1, 2, 3, 9, 15] and step - 6 <= 90 <= step == gathers[-1]
  # Resumed at step 1000: the same, from there (the window was divided by 1000 before).
  gathers.clear()
  stop = preemption.StopRequests(sync_every=50)
  for step in range(1000, 1020):
    at[0] = step
    clock[0] += 60.0 if step == 1001 else 0.5
    stop.should_stop(step)
  assert gathers == [1000, 1001, 1002, 1003, 1009, 1015]


def test_nohup_keeps_its_hold_on_sighup():
  """`nohup jaxarch train ... &`: the terminal's hangup was turned into a stop."""
  from jaxarch.train import preemption  # pylint: disable=g-import-not-at-top
  before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
  try:
    assert signal.SIGHUP not in preemption.handled()
    with preemption.StopRequests(sync_every=5):
      assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    with preemption.StopRequests(sync_every=5) as stop:
      assert signal.getsignal(signal.SIGHUP) == stop._handle  # pylint: disable=protected-access
  finally:
    signal.signal(signal.SIGHUP, before)


def test_the_stop_is_kept_when_its_message_cannot_be_written(monkeypatch):
  """The handler said the stop before it kept it: with stderr a closed pipe (`| tee` gone)
  the write's error left the loop at any point, unsaved, and the signal forgotten."""
  from jaxarch.train import preemption  # pylint: disable=g-import-not-at-top
  written = []
  monkeypatch.setattr(preemption.os, 'write', lambda fd, data: written.append(data))
  stop = preemption.StopRequests(sync_every=5)
  stop._handle(signal.SIGINT, None)  # pylint: disable=protected-access
  assert stop.received == 'SIGINT' and written == [
      b'\njaxarch: SIGINT: stopping after this step, with a checkpoint; Ctrl-C again stops '
      b'at once, unsaved\n']

  def broken(fd, data):
    raise BrokenPipeError(32, 'Broken pipe')
  monkeypatch.setattr(preemption.os, 'write', broken)
  stop = preemption.StopRequests(sync_every=5)
  stop._handle(signal.SIGTERM, None)  # pylint: disable=protected-access
  assert stop.received == 'SIGTERM' and stop.should_stop(3)
