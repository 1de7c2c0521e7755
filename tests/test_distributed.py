"""Multi-process jobs: where a process learns its place, and two CPU processes on
localhost training together onto the losses of one process with the same global batch."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxarch import config as config_lib
from jaxarch.config import ConfigError
from jaxarch.parallel.distributed import Launch, detect
from jaxarch.train import evaluate, train
from jaxarch.train.metrics import read_metrics


def test_flags_come_first_then_jax_variables_then_the_cluster():
  slurm = {'SLURM_NTASKS': '4', 'SLURM_PROCID': '2', 'SLURM_JOB_ID': '7',  # a task of srun
           'SLURM_STEP_NODELIST': 'node[01-03,07]', 'SLURM_LOCALID': '0'}
  assert detect('h:1', 2, 1, environ=slurm) == Launch('flags', 'h:1', 2, 1)
  jax_env = {'JAX_COORDINATOR_ADDRESS': 'h0:1234', 'JAX_NUM_PROCESSES': '8',
             'JAX_PROCESS_ID': '3'}
  assert detect(environ={**slurm, **jax_env}) == Launch('env', 'h0:1234', 8, 3)
  assert detect(environ=slurm) == Launch('slurm', num_processes=4, process_id=2)
  # One task per node: every GPU of the node, not only GPU SLURM_LOCALID.
  per_node = {**slurm, 'SLURM_NTASKS_PER_NODE': '1', 'SLURM_GPUS_ON_NODE': '8'}
  assert detect(environ=per_node).local_device_ids == tuple(range(8))
  per_gpu = {**slurm, 'SLURM_NTASKS_PER_NODE': '8', 'SLURM_GPUS_ON_NODE': '8'}
  assert detect(environ=per_gpu).local_device_ids is None
  # The step's tasks count, not the job's: `srun -n 16` in a job of one task per node runs
  # 8 per node, each on its own GPU (each took all 8).
  step = {**per_node, 'SLURM_STEP_TASKS_PER_NODE': '8(x2)'}
  assert detect(environ=step).local_device_ids is None
  # GPUs not given as such (no --gpus-per-node): the node's, not GPU SLURM_LOCALID alone.
  no_gres = {**slurm, 'SLURM_STEP_TASKS_PER_NODE': '1(x4)', 'CUDA_VISIBLE_DEVICES': '0,1,2,3'}
  assert detect(environ=no_gres).local_device_ids == (0, 1, 2, 3)
  ompi = {'OMPI_COMM_WORLD_SIZE': '2', 'OMPI_COMM_WORLD_RANK': '1',  # mpirun of Open MPI 4
          'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.96.0.1:34911'}
  assert detect(environ={**ompi, 'CUDA_VISIBLE_DEVICES': ''}) == (
      Launch('ompi', num_processes=2, process_id=1))
  # mpirun --npernode 1: every GPU of the node, as for SLURM.
  gpus = {'CUDA_VISIBLE_DEVICES': '0,1,2,3'}
  assert detect(environ={**ompi, **gpus, 'OMPI_COMM_WORLD_LOCAL_SIZE': '1'}
                ).local_device_ids == (0, 1, 2, 3)
  assert detect(environ={**ompi, **gpus, 'OMPI_COMM_WORLD_LOCAL_SIZE': '4'}
                ).local_device_ids is None
  assert detect(environ={'TPU_WORKER_HOSTNAMES': 'a,b'}).source == 'tpu'
  # JAX reads TPU_PROCESS_ADDRESSES first; slices of one host join over DCN all the same.
  assert detect(environ={'TPU_PROCESS_ADDRESSES': 'a:8476,b:8476'}).source == 'tpu'
  assert detect(environ={'TPU_WORKER_HOSTNAMES': 'a', 'MEGASCALE_NUM_SLICES': '2'}
                ).source == 'tpu'
  assert detect(environ={'JAXARCH_DISTRIBUTED': '1'}).source == 'auto'
  # One task, one TPU host, nothing: a single process.
  for environ in ({'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'}, {'TPU_WORKER_HOSTNAMES': 'a'},
                  {}):
    assert detect(environ=environ).source == 'single'


def test_mpirun_of_open_mpi_5_takes_the_coordinator_from_jax_coordinator_address():
  """Open MPI 5's mpirun (PRRTE) sets OMPI_COMM_WORLD_* but not OMPI_MCA_orte_hnp_uri, the
  only place JAX looks for the coordinator: `jaxarch train` under it ended in a
  `ValueError: coordinator_address should be defined` traceback."""
  ompi5 = {'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_COMM_WORLD_RANK': '3',
           'OMPI_COMM_WORLD_LOCAL_RANK': '1', 'OMPI_COMM_WORLD_LOCAL_SIZE': '2',
           'CUDA_VISIBLE_DEVICES': '0,1'}
  with pytest.raises(ConfigError, match='^config error: mpirun of Open MPI 5 .*'
                     'set JAX_COORDINATOR_ADDRESS=HOST:PORT'):
    detect(environ=ompi5)
  # mpirun -x JAX_COORDINATOR_ADDRESS: rank and size from mpirun, a GPU per process.
  assert detect(environ={**ompi5, 'JAX_COORDINATOR_ADDRESS': 'node0:1234'}) == Launch(
      'ompi', 'node0:1234', 4, 3, (1,))
  assert detect(environ={**ompi5, 'JAX_COORDINATOR_ADDRESS': 'node0:1234',
                         'OMPI_COMM_WORLD_LOCAL_SIZE': '1'}).local_device_ids == (0, 1)


# What a multi-node batch script's own shell has (sbatch --nodes=2 --ntasks-per-node=1):
# the job's task count and SLURM_PROCID=0, but no job step (SLURM_STEP_*).
SBATCH_SHELL = {'SLURM_JOB_ID': '77', 'SLURM_NTASKS': '2', 'SLURM_NTASKS_PER_NODE': '1',
                'SLURM_TASKS_PER_NODE': '1(x2)', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0',
                'SLURM_NODEID': '0', 'SLURM_JOB_NODELIST': 'node[01-02]',
                'SLURM_GPUS_ON_NODE': '8'}


def test_the_batch_script_without_srun_is_a_one_line_error(tmp_path):
  """`jaxarch train` run in the sbatch script itself, not under srun, was taken for task 0
  of 2; jax.distributed found no SLURM step and ended in a `ValueError: coordinator_address
  should be defined` traceback (or, where it found one, waited for a task that never came)."""
  with pytest.raises(ConfigError, match='SLURM_NTASKS=2 with no SLURM_STEP_NODELIST: .*'
                     'start it with `srun`'):
    detect(environ=SBATCH_SHELL)
  env = dict(os.environ, JAX_PLATFORMS='cpu', **SBATCH_SHELL)
  result = subprocess.run([sys.executable, '-m', 'jaxarch.cli', 'train',
                           '--config=configs/dense.py:tiny', f'--workdir={tmp_path}'],
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'start it with `srun`' in result.stderr and 'Traceback' not in result.stderr
  # The same variables under srun, with its step: task 0 of 2, all GPUs of its node.
  step = {**SBATCH_SHELL, 'SLURM_STEP_NODELIST': 'node[01-02]', 'SLURM_STEP_ID': '0'}
  assert detect(environ=step) == Launch('slurm', num_processes=2, process_id=0,
                                        local_device_ids=tuple(range(8)))


def test_mpirun_inside_a_slurm_job_is_placed_by_mpirun():
  """mpirun's ranks inherit the SLURM variables of the batch script (or of the srun step
  that starts mpirun's daemons, one per node), which count nodes, not ranks: they were read
  as SLURM tasks, and with a task per node each of a node's 8 ranks claimed all 8 GPUs."""
  ompi = {'OMPI_COMM_WORLD_SIZE': '16', 'OMPI_COMM_WORLD_RANK': '9',
          'OMPI_COMM_WORLD_LOCAL_RANK': '1', 'OMPI_COMM_WORLD_LOCAL_SIZE': '8',
          'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.96.0.1:34911',
          'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7'}
  daemon_step = {**SBATCH_SHELL, 'SLURM_PROCID': '1', 'SLURM_NODEID': '1',
                 'SLURM_STEP_NODELIST': 'node[01-02]', 'SLURM_STEP_ID': '0'}
  for slurm in (SBATCH_SHELL, daemon_step):
    assert detect(environ={**slurm, **ompi}) == Launch('ompi', num_processes=16,
                                                       process_id=9)


@pytest.mark.parametrize('args, environ, message', [
    (('h:1', None, None), {}, 'go together'),
    (('h:1', 2, 2), {}, r'process_id=2 must be in \[0, num_processes=2\)'),
    (('h', 2, 0), {}, "'h' must be HOST:PORT"),
    ((None, None, None), {'JAX_COORDINATOR_ADDRESS': 'h:1'}, 'JAX_NUM_PROCESSES'),
    ((None, None, None), {'SLURM_NTASKS': 'two', 'SLURM_PROCID': '0'}, 'SLURM_NTASKS'),
])
def test_inconsistent_launch_settings_are_one_line(args, environ, message):
  with pytest.raises(ConfigError, match=message):
    detect(*args, environ=environ)


OVERRIDES = ['model.d_model=64', 'model.n_layers=2', 'model.d_ff=128', 'model.max_len=64',
             'model.dtype=float32', 'data.seq_len=32', 'train.batch_size=8',
             'train.steps=6', 'train.warmup_steps=2', 'checkpoint.every_steps=3',
             'log.every_steps=1', 'log.eval_every_steps=6', 'log.eval_batches=2',
             'log.progress=false', 'log.tensorboard=false', 'mesh.ici.data=2',
             'mesh.ici.fsdp=2', 'mesh.ici.tensor=2']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _in_two_processes(args, workdir, environ_of, *, expect_code=0):
  """`jaxarch ARGS` as processes 0 and 1 of a job, 4 CPU devices each, -> (stdout, stderr)
  of each; `workdir` may be one per process."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  workdirs = workdir if isinstance(workdir, list) else [workdir] * 2
  command = [sys.executable, '-m', 'jaxarch.cli', *args]
  processes = [subprocess.Popen(command + [f'--workdir={workdirs[i]}'] + extra,
                                env={**env, **variables},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i, (extra, variables) in enumerate(map(environ_of, range(2)))]
  outputs = [p.communicate(timeout=300) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == expect_code, err[-3000:]
  return outputs


def _train_in_two_processes(workdir, data_dir, environ_of, *, expect_code=0, extra=()):
  """`jaxarch train` as processes 0 and 1 of a job; -> the stderr of each."""
  args = ['train', '--config=configs/dense.py:tiny', f'--data_dir={data_dir}',
          *[f'--config.{o}' for o in OVERRIDES + list(extra)]]
  return [err for _, err in _in_two_processes(args, workdir, environ_of,
                                              expect_code=expect_code)]


def _flags(port):
  return lambda i: ([f'--coordinator_address=localhost:{port}', '--num_processes=2',
                     f'--process_id={i}'], {})


def _one_process(tmp_path, data_dir, workdir='one', extra=()) -> dict:
  """Metrics by step of the run in one process with 8 devices, the same mesh (this also
  prepares the data, which the two processes then only read)."""
  cfg = config_lib.load('configs/dense.py:tiny',
                        OVERRIDES + list(extra) + [f'data.data_dir={data_dir}'])
  train(cfg, tmp_path / workdir)
  return {r['step']: r for r in read_metrics(tmp_path / workdir)}


def _assert_same_run(want, workdir):
  got = {r['step']: r for r in read_metrics(workdir)}
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s]['loss'] for s in got], [want[s]['loss'] for s in got],
                             rtol=1e-5)
  np.testing.assert_allclose(got[6]['eval_loss'], want[6]['eval_loss'], rtol=1e-5)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']


@pytest.mark.slow
def test_two_processes_train_together_onto_the_one_process_losses(tmp_path, data_dir,
                                                                  caplog):
  want = _one_process(tmp_path, data_dir)
  errs = _train_in_two_processes(tmp_path / 'two', data_dir, _flags(_free_port()))
  assert 'process 1 of 2 (flags)' in errs[1]
  _assert_same_run(want, tmp_path / 'two')
  assert not list((tmp_path / 'two').glob('.shared_check.*'))
  # Evaluated by both processes, each restoring only the weights' shards it holds (the
  # partial restore), the checkpoint gives what one process evaluates.
  (out, _), (quiet, _) = _in_two_processes(['eval', f'--data_dir={data_dir}'],
                                           tmp_path / 'two', _flags(_free_port()))
  got = json.loads(out[out.index('{'):])  # after Gloo's lines (the CPU's collectives)
  assert '{' not in quiet  # process 1 reports nothing
  cfg = config_lib.load('configs/dense.py:tiny', OVERRIDES + [f'data.data_dir={data_dir}'])
  one = evaluate(cfg, tmp_path / 'two')
  assert got['step'] == one['step'] == 6
  np.testing.assert_allclose(got['eval_bpb'], one['eval_bpb'], rtol=1e-5)
  np.testing.assert_allclose(got['eval_loss'], want[6]['eval_loss'], rtol=1e-5)
  # Resumed from step 3 in one process, the two processes' data positions are shared out
  # again: steps 4-6 read the batches they would have read, onto the same losses.
  shutil.copytree(tmp_path / 'two', tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '6')
  (tmp_path / 'resumed' / 'metrics.jsonl').unlink()  # so the records read are the new ones
  with caplog.at_level('INFO'):
    resumed = _one_process(tmp_path, data_dir, 'resumed')
  assert 'data positions of 2 processes shared out over 1' in caplog.text
  assert 'start afresh' not in caplog.text
  assert sorted(resumed) == [4, 5, 6]
  np.testing.assert_allclose([resumed[s]['loss'] for s in (4, 5, 6)],
                             [want[s]['loss'] for s in (4, 5, 6)], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_resume_a_one_process_run_in_the_other_layout(tmp_path, data_dir):
  """Each process reads its shards of the unrolled checkpoint and gathers them into the
  scanned layout (`train.relayout`, jitted over the global arrays): steps 4-6 go on as
  the unrolled run's."""
  want = _one_process(tmp_path, data_dir)
  shutil.copytree(tmp_path / 'one', tmp_path / 'two')
  shutil.rmtree(tmp_path / 'two' / 'checkpoints' / '6')
  (tmp_path / 'two' / 'metrics.jsonl').unlink()
  errs = _train_in_two_processes(tmp_path / 'two', data_dir, _flags(_free_port()),
                                 extra=['model.scan_layers=True'])
  assert 'its layers were saved unrolled: read scanned (period 1)' in errs[0] + errs[1]
  got = {r['step']: r for r in read_metrics(tmp_path / 'two')}
  assert sorted(got) == [4, 5, 6]
  np.testing.assert_allclose([got[s]['loss'] for s in (4, 5, 6)],
                             [want[s]['loss'] for s in (4, 5, 6)], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_train_on_a_mixture_onto_the_one_process_losses(tmp_path, data_dir):
  # Each process packs its own streams of each source; the global batches, and so the
  # losses and each source's evaluation, are those of one process.
  mixture = ['data.source=py=default,1;again=default,3']
  want = _one_process(tmp_path, data_dir, extra=mixture)
  _train_in_two_processes(tmp_path / 'two', data_dir, _flags(_free_port()), extra=mixture)
  _assert_same_run(want, tmp_path / 'two')
  got = {r['step']: r for r in read_metrics(tmp_path / 'two')}
  for key in ('eval_loss/py', 'eval_bpb/again'):
    np.testing.assert_allclose(got[6][key], want[6][key], rtol=1e-5)


@pytest.mark.slow
def test_a_workdir_the_processes_do_not_share_is_one_line_on_each(tmp_path, data_dir):
  """Host-local workdirs (here: one folder per process) would leave each host a part of
  every checkpoint; both processes stop before training."""
  errs = _train_in_two_processes([tmp_path / 'host0', tmp_path / 'host1'], data_dir,
                                 _flags(_free_port()), expect_code=2)
  for err in errs:
    assert 'is not shared by the job\'s processes: process(es) 1 do not see' in err, err[-3000:]
    assert 'Traceback' not in err
  assert not (tmp_path / 'host0' / 'checkpoints').exists()


@pytest.mark.slow
def test_two_processes_started_as_slurm_tasks(tmp_path, data_dir):
  want = _one_process(tmp_path, data_dir)
  port = _free_port()
  slurm = lambda i: ([], {'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'localhost',
                          'SLURM_NTASKS': '2', 'SLURM_PROCID': str(i),
                          'SLURM_LOCALID': str(i), 'SLURM_STEP_NUM_NODES': '1',
                          'JAX_COORDINATOR_PORT': str(port)})
  errs = _train_in_two_processes(tmp_path / 'slurm', data_dir, slurm)
  assert 'process 0 of 2 (slurm)' in errs[0]
  _assert_same_run(want, tmp_path / 'slurm')


_BENCH_BATCH = '''
import sys
from jaxarch.parallel import distributed
distributed.initialize(distributed.detect(sys.argv[1], 2, int(sys.argv[2])))
from jaxarch import config as config_lib
from jaxarch.train import throughput
class Stepped(Exception):
  pass
def first_step(setup):
  def step(state, batch):
    raise Stepped(batch['inputs'].shape)
  return step
throughput.make_train_step = first_step
cfg = config_lib.load('configs/dense.py:tiny', sys.argv[3:])
try:
  throughput.measure(cfg, steps=1, warmup=1)
except Stepped as e:
  print('global batch', e.args[0])
'''


@pytest.mark.slow
def test_bench_in_two_processes_steps_the_configured_global_batch():
  """Each process of `jaxarch bench train` passes on its share of the synthetic batch: all
  of it made a batch of 2 x train.batch_size rows, while tokens/s and MFU counted one."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  overrides = ['model.d_model=64', 'model.n_layers=1', 'model.d_ff=128', 'data.seq_len=32',
               'train.batch_size=8', 'mesh.ici.data=-1']
  processes = [subprocess.Popen([sys.executable, '-c', _BENCH_BATCH, f'localhost:{port}',
                                 str(i), *overrides], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in processes:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert 'global batch (8, 32)' in out, out + err[-3000:]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_one_step_with_one_checkpoint(tmp_path,
                                                                              data_dir):
  """A drained node's process is told first: both stop after the same step, write their
  parts of one checkpoint and exit 143 (not 0: a scheduler would count the job finished),
  the one told second only once the checkpoint is whole."""
  _one_process(tmp_path, data_dir)  # prepares the data the two then only read
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  workdir = tmp_path / 'two'
  port = _free_port()
  command = [sys.executable, '-m', 'jaxarch.cli', 'train', '--config=configs/dense.py:tiny',
             f'--data_dir={data_dir}', f'--workdir={workdir}',
             *[f'--config.{o}' for o in OVERRIDES + ['train.steps=400', 'log.every_steps=2',
                                                     'checkpoint.every_steps=400']]]
  processes = [subprocess.Popen(command + flags, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
               for flags, _ in map(_flags(port), range(2))]
  deadline = time.time() + 240
  while not ((workdir / 'metrics.jsonl').exists() and read_metrics(workdir)):
    assert time.time() < deadline and all(p.poll() is None for p in processes)
    time.sleep(0.1)
  processes[1].send_signal(signal.SIGTERM)
  errs = [p.communicate(timeout=240)[1] for p in processes]
  assert [p.returncode for p in processes] == [143, 143], [e[-2000:] for e in errs]
  assert 'SIGTERM (another process): stopped after step' in errs[0], errs[0][-2000:]
  assert ('jaxarch: SIGTERM: stopping within about 5 s, after the step all processes agree '
          'on') in errs[1], errs[1][-2000:]
  step = int(errs[0].split('stopped after step ')[1].split(',')[0])
  assert step < 400  # process 0 says it; both wrote their parts of that step's checkpoint
  assert sorted(os.listdir(workdir / 'checkpoints')) == [str(step)]
