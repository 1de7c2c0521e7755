"""`jaxarch launch`: rendered cluster jobs are valid, add up with the mesh, and submit nothing."""

import json
import os
import py_compile
import shlex
import subprocess
import sys

import pytest
import yaml

from jaxarch import cli
from jaxarch import config as config_lib
from jaxarch.sweep import runner
from jaxarch import launch

SPEC = 'configs/dense.py:151m'
# 4 nodes x 8 H100s = 32 GPUs: FSDP inside a node, data parallel across the 4 nodes.
H100_4x8 = ['--config.launch.nodes=4', '--config.mesh.ici.fsdp=8', '--config.mesh.dcn.data=4']
# 2 slices of v5p-32 (4 hosts x 4 chips each) = 32 chips: FSDP inside a slice.
V5P_2x32 = ['--config.launch.accelerator=tpu-v5p-slice', '--config.launch.tpu_type=v5p-32',
            '--config.launch.tpu_topology=2x2x4', '--config.launch.slices=2',
            '--config.launch.nodes=8', '--config.launch.devices_per_node=4',
            '--config.mesh.ici.fsdp=16', '--config.mesh.dcn.data=2']


def _launch(capsys, target, out, *flags):
  code = cli.main(['launch', f'--config={SPEC}', f'--target={target}',
                   '--workdir=/gcs/bucket/runs/151m', f'--out={out}', *flags])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _bash_syntax_ok(path):
  result = subprocess.run(['bash', '-n', str(path)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def _flags(script_text):
  """The --key=value arguments of the shell command in a rendered script."""
  words = shlex.split(script_text, comments=True)
  return dict(w[2:].split('=', 1) for w in words if w.startswith('--') and '=' in w)


def test_slurm_job_runs_one_process_per_node_and_is_valid_bash(tmp_path, capsys):
  code, out, err = _launch(capsys, 'slurm', tmp_path, *H100_4x8,
                           '--config.launch.partition=gpu', '--config.train.steps=5000')
  assert code == 0 and 'warning: launch.setup is empty' in err
  path = tmp_path / 'train.sbatch'
  assert out.strip() == f'sbatch {path}'
  _bash_syntax_ok(path)
  assert os.access(path, os.X_OK)
  text = path.read_text()
  for directive in ('--nodes=4', '--ntasks-per-node=1', '--gpus-per-node=8', '--exclusive',
                    '--mem=0',  # all of each node's memory: --exclusive alone gives a share
                    '--partition=gpu', '--signal=TERM@300',  # time to stop with a checkpoint
                    '--requeue', '--open-mode=append',  # preempted: resumed, log kept
                    f'--output={tmp_path}/%x-%j.out'):  # beside the script, not in the cwd
    assert f'#SBATCH {directive}\n' in text
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in text
  assert 'export NCCL_DEBUG=WARN' in text
  # No port of its own: JAX takes one of the job's id, so two jobs whose first node is the
  # same (launch.exclusive=False) do not both serve on 1234; a port given is exported.
  assert 'JAX_COORDINATOR_PORT' not in text.replace('# (none set', '')
  assert _launch(capsys, 'slurm', tmp_path, *H100_4x8,
                 '--config.launch.coordinator_port=7000')[0] == 0
  assert 'export JAX_COORDINATOR_PORT=7000\n' in path.read_text()
  (srun,) = [line for line in text.splitlines() if line.startswith('srun ')]
  assert shlex.split(srun)[2:] == [
      'jaxarch', 'train', f'--config={SPEC}', '--workdir=/gcs/bucket/runs/151m',
      '--config.mesh.ici.fsdp=8', '--config.mesh.dcn.data=4', '--config.train.steps=5000']


def test_slurm_paths_with_spaces_are_double_quoted_as_sbatch_reads_them(tmp_path, capsys,
                                                                         monkeypatch):
  """sbatch reads double quotes in an #SBATCH line, not a shell's single quotes: a folder
  with a space became the path "'/a" and the option "b'"."""
  out = tmp_path / 'my jobs'
  monkeypatch.chdir(tmp_path)
  assert _launch(capsys, 'slurm', out)[0] == 0
  text = (out / 'train.sbatch').read_text()
  assert f'#SBATCH --output="{out}/%x-%j.out"\n' in text
  assert f'#SBATCH --chdir={tmp_path}\n' in text  # without a space: as it is
  code, _, err = _launch(capsys, 'slurm', tmp_path / 'a"b')
  assert code == 2 and 'holds a double quote, a backslash or a newline' in err


def test_slurm_jobs_can_share_nodes_and_take_the_sites_options(tmp_path, capsys):
  code, _, _ = _launch(capsys, 'slurm', tmp_path, '--config.launch.devices_per_node=1',
                       '--config.launch.exclusive=False',
                       '--config.launch.slurm_options=--qos=high --mem-per-gpu=200G --hold')
  text = (tmp_path / 'train.sbatch').read_text()
  assert code == 0 and '--exclusive' not in text
  _bash_syntax_ok(tmp_path / 'train.sbatch')
  for directive in ('--gpus-per-node=1', '--qos=high', '--mem-per-gpu=200G', '--hold'):
    assert f'#SBATCH {directive}\n' in text
  assert '--mem=0' not in text
  # Whole nodes take all their memory (--mem=0), unless the site's options say how much.
  code, _, _ = _launch(capsys, 'slurm', tmp_path, '--config.launch.slurm_options=--mem=500G')
  text = (tmp_path / 'train.sbatch').read_text()
  assert code == 0 and '#SBATCH --exclusive\n' in text and '--mem=0' not in text
  assert '#SBATCH --mem=500G\n' in text
  code, _, _ = _launch(capsys, 'slurm', tmp_path,  # --mem-bind asks for no memory
                       '--config.launch.slurm_options=--mem-bind=local')
  assert code == 0 and '#SBATCH --mem=0\n' in (tmp_path / 'train.sbatch').read_text()


def _disruptions_restart_without_counting(jobset, job):
  """A pod that the cluster disrupted (preempted, drained) fails its job by the job's
  podFailurePolicy, and the set restarts without using one of maxRestarts."""
  policy = jobset['spec']['failurePolicy']
  assert policy['maxRestarts'] == 3
  assert policy['rules'] == [{'name': 'disruptedPods',
                              'action': 'RestartJobSetAndIgnoreMaxRestarts',
                              'onJobFailureReasons': ['PodFailurePolicy']}]
  assert job['podFailurePolicy'] == {'rules': [{
      'action': 'FailJob', 'onPodConditions': [{'type': 'DisruptionTarget', 'status': 'True'}]}]}
  assert job['template']['spec']['restartPolicy'] == 'Never'  # as podFailurePolicy needs


def test_gke_gpu_jobset_has_one_pod_per_node_and_their_gpus(tmp_path, capsys):
  code, out, err = _launch(capsys, 'gke', tmp_path, *H100_4x8, '--config.launch.name=dense',
                           '--config.launch.cluster=train', '--config.launch.zone=us-east5-a')
  assert code == 0 and out.strip() == f'kubectl apply -f {tmp_path / "jobset.yaml"}'
  jobset = yaml.safe_load((tmp_path / 'jobset.yaml').read_text())
  assert jobset['kind'] == 'JobSet' and jobset['metadata']['name'] == 'dense'
  (workers,) = jobset['spec']['replicatedJobs']
  job = workers['template']['spec']
  assert workers['replicas'] == 1 and job['parallelism'] == job['completions'] == 4
  pod = job['template']['spec']
  (container,) = pod['containers']
  gpus = container['resources']['limits']['nvidia.com/gpu']
  assert gpus == 8 and workers['replicas'] * job['parallelism'] * gpus == 32
  assert pod['nodeSelector'] == {'cloud.google.com/gke-accelerator': 'nvidia-h100-80gb'}
  assert pod['terminationGracePeriodSeconds'] == 300  # Kubernetes' 30 s is too short to stop
  _disruptions_restart_without_counting(jobset, job)
  assert container['command'][:4] == ['jaxarch', 'train', f'--config={SPEC}',
                                      '--workdir=/gcs/bucket/runs/151m']
  env = {e['name']: e for e in container['env']}
  # Pod 0 of the JobSet, by its headless-service name.
  assert env['JAX_COORDINATOR_ADDRESS']['value'] == f'dense-{workers["name"]}-0-0.dense:1234'
  assert env['JAX_NUM_PROCESSES']['value'] == '4'
  assert env['JAX_PROCESS_ID']['valueFrom']['fieldRef']['fieldPath'] == (
      "metadata.annotations['batch.kubernetes.io/job-completion-index']")
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in env['XLA_FLAGS']['value']
  _mounts_the_bucket(job['template'], host_network=False)
  # The same job through xpk.
  xpk = tmp_path / 'xpk.sh'
  _bash_syntax_ok(xpk)
  flags = _flags(xpk.read_text())
  assert flags['device-type'] == 'h100-80gb-8' and flags['num-nodes'] == '4'
  assert flags['cluster'] == 'train' and flags['zone'] == 'us-east5-a'
  assert flags['max-restarts'] == '3'  # as the JobSet's maxRestarts
  assert flags['env-file'] == '$(dirname $0)/gpu.env'  # next to the script, from anywhere
  assert 'JAX_PROCESS_ID=$NODE_RANK jaxarch train' in flags['command']
  assert f'bash {xpk}' in err
  # xpk names its GPU device types; a node shape it does not know is refused.
  code, _, err = _launch(capsys, 'gke', tmp_path, '--config.launch.nodes=8',
                         '--config.launch.devices_per_node=4', '--config.mesh.ici.fsdp=4',
                         '--config.mesh.dcn.data=8', '--config.launch.cluster=train')
  assert code == 2 and "'nvidia-h100-80gb' with launch.devices_per_node=4 is not an xpk" in err
  # A pod of more GPUs than any node has would wait forever.
  code, _, err = _launch(capsys, 'gke', tmp_path, '--config.launch.nodes=2',
                         '--config.launch.devices_per_node=16', '--config.mesh.ici.fsdp=16',
                         '--config.mesh.dcn.data=2')
  assert code == 2 and ('launch.devices_per_node=16: a GKE node of nvidia-h100-80gb has at '
                        'most 8 GPUs') in err, err


def _mounts_the_bucket(pod_template, host_network):
  """The workdir's bucket (/gcs/bucket/runs/151m) is mounted at /gcs/bucket by the GCS
  FUSE CSI driver: it was in each pod's own container, lost with it (a single pod's job,
  which the check that the processes share the workdir passes, lost all its work)."""
  assert pod_template['metadata']['annotations'] == {'gke-gcsfuse/volumes': 'true'}
  (container,) = pod_template['spec']['containers']
  assert {'name': 'gcs-0', 'mountPath': '/gcs/bucket'} in container['volumeMounts']
  (volume,) = [v for v in pod_template['spec']['volumes'] if v['name'] == 'gcs-0']
  attributes = {'bucketName': 'bucket', 'mountOptions': 'implicit-dirs'}
  if host_network:  # its sidecar takes the pod's service account's token
    attributes['hostNetworkPodKSA'] = 'true'
  assert volume['csi'] == {'driver': 'gcsfuse.csi.storage.gke.io',
                           'volumeAttributes': attributes}


def test_gke_mounts_the_buckets_of_workdir_and_data_and_warns_of_other_paths(tmp_path, capsys):
  code, _, err = _launch(capsys, 'gke', tmp_path, *H100_4x8,
                         '--config.data.data_dir=/gcs/corpora/prepared')
  assert code == 0 and 'mounts only buckets' not in err
  pod = yaml.safe_load((tmp_path / 'jobset.yaml').read_text())['spec']['replicatedJobs'][0][
      'template']['spec']['template']['spec']
  assert [m['mountPath'] for m in pod['containers'][0]['volumeMounts']] == [
      '/dev/shm', '/gcs/bucket', '/gcs/corpora']
  assert [v['csi']['volumeAttributes']['bucketName'] for v in pod['volumes'] if 'csi' in v] == [
      'bucket', 'corpora']
  # A bucket named by digits stays a string in the YAML; a path that names no bucket is told.
  assert _launch(capsys, 'gke', tmp_path, *H100_4x8, '--config.data.data_dir=/gcs/12345/p')[0] == 0
  pod = yaml.safe_load((tmp_path / 'jobset.yaml').read_text())['spec']['replicatedJobs'][0][
      'template']['spec']['template']['spec']
  assert pod['volumes'][-1]['csi']['volumeAttributes']['bucketName'] == '12345'
  code, _, err = _launch(capsys, 'gke', tmp_path, *H100_4x8, '--config.data.data_dir=/gcs/A b/p')
  assert code == 2 and ("data.data_dir=/gcs/A b/p: 'A b' is no Cloud Storage bucket name"
                        in err), err
  code = cli.main(['launch', f'--config={SPEC}', '--target=gke', '--workdir=/mnt/fs/runs/a',
                   f'--out={tmp_path}', *H100_4x8, '--config.data.data_dir=/gcs/corpora/p'])
  err = capsys.readouterr().err
  assert code == 0 and ('warning: the JobSet mounts only buckets, at /gcs/BUCKET, and not '
                        '--workdir=/mnt/fs/runs/a: add its volume') in err, err


def test_gke_warns_of_an_image_without_registry_and_data_in_each_pod(tmp_path, capsys):
  """The defaults render a job that the cluster then cannot pull, and whose pods each
  prepare the data into their own container after every restart; a relative workdir would
  be the container's, lost with the pod."""
  _, _, err = _launch(capsys, 'gke', tmp_path, *H100_4x8)
  assert ("warning: launch.image='jaxarch:latest' names no registry, so the nodes would pull "
          'docker.io/library/jaxarch:latest') in err
  assert 'warning: data.data_dir is unset, so every pod prepares the data' in err
  code, _, err = _launch(capsys, 'gke', tmp_path, *H100_4x8,
                         '--config.launch.image=us-docker.pkg.dev/p/jaxarch:gpu',
                         '--config.data.data_dir=/gcs/bucket/data')
  assert code == 0 and 'warning' not in err, err
  code = cli.main(['launch', f'--config={SPEC}', '--target=gke', '--workdir=runs/151m',
                   f'--out={tmp_path}', *H100_4x8])
  assert code == 2 and ("--workdir='runs/151m': a pod writes a relative path into its own "
                        'container') in capsys.readouterr().err


def test_a_config_file_the_pods_or_workers_lack_and_a_default_out_off_the_bucket_are_said(
    tmp_path, capsys):
  """Every pod or TPU VM worker runs `jaxarch train --config=SPEC`: a file of the user's is
  not in the image nor on the workers (Ray's job carries it). A /gcs/ workdir unmounted
  here put the job files on this machine's disk."""
  mine = tmp_path / 'my.py'
  mine.write_text((config_lib.SHIPPED_CONFIGS / 'dense.py').read_text())
  for target, flags, said in [
      ('gke', H100_4x8, 'put the file in a bucket the JobSet mounts'),
      ('tpu-vm', [*V5P_2x32[:3], '--config.launch.nodes=4', '--config.launch.setup=true',
                  '--config.launch.devices_per_node=4', '--config.mesh.ici.fsdp=16'],
       'copy it to that path on each')]:
    for spec, warned in ((f'{mine}:151m', True), (SPEC, False)):
      assert cli.main(['launch', f'--config={spec}', f'--target={target}',
                       '--workdir=/gcs/bucket/runs/x', f'--out={tmp_path / "job"}',
                       '--config.launch.image=us-docker.pkg.dev/p/j:gpu', *flags,
                       '--config.data.data_dir=/gcs/bucket/data']) == 0
      err = capsys.readouterr().err
      assert (f'warning: --config={spec} is not one of the configs jaxarch installs' in err
              and said in err) == warned, err
  assert cli.main(['launch', f'--config={SPEC}', '--target=slurm', '--workdir=/gcs/b/runs/x',
                   *H100_4x8, '--config.launch.setup=true', '--dry-run']) == 0
  assert ("warning: the job files go to /gcs/b/runs/x/launch on this machine's disk (/gcs/b "
          'is no mounted bucket here); give --out=DIR') in capsys.readouterr().err


def test_gke_tpu_jobset_and_xpk_command_have_the_slices_and_chips(tmp_path, capsys):
  code, _, _ = _launch(capsys, 'gke', tmp_path, *V5P_2x32, '--config.launch.cluster=train')
  assert code == 0
  jobset = yaml.safe_load((tmp_path / 'jobset.yaml').read_text())
  (slices,) = jobset['spec']['replicatedJobs']
  job = slices['template']['spec']
  assert slices['replicas'] == 2 and job['parallelism'] == job['completions'] == 4
  pod = job['template']['spec']
  chips = pod['containers'][0]['resources']['limits']['google.com/tpu']
  assert chips == 4 and slices['replicas'] * job['parallelism'] * chips == 32
  assert pod['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': 'tpu-v5p-slice',
                                 'cloud.google.com/gke-tpu-topology': '2x2x4'}
  _disruptions_restart_without_counting(jobset, job)
  _mounts_the_bucket(job['template'], host_network=True)
  assert 'env' not in pod['containers'][0]  # JAX's own coordinator port (8482)
  assert _launch(capsys, 'gke', tmp_path, *V5P_2x32,
                 '--config.launch.coordinator_port=7000')[0] == 0
  (slices,) = yaml.safe_load((tmp_path / 'jobset.yaml').read_text())['spec']['replicatedJobs']
  (container,) = slices['template']['spec']['template']['spec']['containers']
  assert container['env'] == [{'name': 'JAX_COORDINATOR_PORT', 'value': '7000'}]
  xpk = tmp_path / 'xpk.sh'
  _bash_syntax_ok(xpk)
  flags = _flags(xpk.read_text())
  assert flags['tpu-type'] == 'v5p-32' and flags['num-slices'] == '2'
  assert shlex.split(flags['command'])[:3] == ['jaxarch', 'train', f'--config={SPEC}']


def _kubernetes_expand(text, env):
  """What the kubelet runs for a container command word: $(NAME) of a defined variable is
  its value, $$ is $, anything else stays (Kubernetes' third_party/forked expansion)."""
  out, i = [], 0
  while i < len(text):
    if text[i] == '$' and text[i + 1:i + 2] == '$':
      out.append('$')
      i += 2
    elif text[i] == '$' and text[i + 1:i + 2] == '(' and ')' in text[i:]:
      end = text.index(')', i)
      name = text[i + 2:end]
      out.append(env.get(name, text[i:end + 1]))
      i = end + 1
    else:
      out.append(text[i])
      i += 1
  return ''.join(out)


@pytest.mark.parametrize('flags', [H100_4x8, V5P_2x32])
def test_gke_pods_run_overrides_with_dollars_as_given(tmp_path, capsys, flags):
  source = 'files:/data/a$$b/$(JAX_NUM_PROCESSES)/$x/*.txt'
  code, _, _ = _launch(capsys, 'gke', tmp_path, *flags, f'--config.data.source={source}')
  assert code == 0
  jobset = yaml.safe_load((tmp_path / 'jobset.yaml').read_text())
  (container,) = jobset['spec']['replicatedJobs'][0]['template']['spec']['template'][
      'spec']['containers']
  env = {e['name']: e.get('value', '0') for e in container.get('env', [])}
  env.setdefault('JAX_NUM_PROCESSES', '8')  # a TPU pod's: GKE sets its own variables
  command = [_kubernetes_expand(word, env) for word in container['command']]
  assert f'--config.data.source={source}' in command


def test_tpu_vm_script_runs_the_job_on_every_worker(tmp_path, capsys):
  code, out, err = _launch(capsys, 'tpu-vm', tmp_path, *V5P_2x32[:3],
                           '--config.launch.nodes=4', '--config.launch.devices_per_node=4',
                           '--config.mesh.ici.fsdp=16', '--config.launch.name=pod',
                           '--config.launch.zone=us-east5-a',
                           '--config.launch.setup=cd ~/jaxarch && source .venv/bin/activate')
  assert code == 0 and 'warning' not in err  # a setup given: nothing to warn of
  path = tmp_path / 'run.sh'
  assert out.strip() == f'bash {path}'
  _bash_syntax_ok(path)
  words = shlex.split(path.read_text(), comments=True)
  assert words[:6] == ['set', '-euo', 'pipefail', 'gcloud', 'compute', 'tpus']
  assert words[6:9] == ['tpu-vm', 'ssh', 'pod'] and '--worker=all' in words
  flags = _flags(path.read_text())
  assert flags['zone'] == 'us-east5-a'
  assert flags['batch-size'] == '4'  # every worker at once: gcloud's default is 64
  setup, train = flags['command'].split(' && JAXARCH_DISTRIBUTED=1 ')
  assert setup == 'cd ~/jaxarch && source .venv/bin/activate'
  assert shlex.split(train)[:3] == ['jaxarch', 'train', f'--config={SPEC}']
  assert _launch(capsys, 'tpu-vm', tmp_path, *V5P_2x32[:3], '--config.launch.nodes=4',
                 '--config.launch.devices_per_node=4', '--config.mesh.ici.fsdp=16',
                 '--config.launch.coordinator_port=7000')[0] == 0
  assert _flags(path.read_text())['command'].startswith(  # no setup this time
      'JAXARCH_DISTRIBUTED=1 JAX_COORDINATOR_PORT=7000 jaxarch train ')


def test_ray_entrypoint_compiles_and_the_submit_command_starts_it(tmp_path, capsys):
  code, out, _ = _launch(capsys, 'ray', tmp_path, '--config.launch.nodes=2',
                         '--config.mesh.ici.fsdp=8', '--config.mesh.dcn.data=2')
  assert code == 0
  py_compile.compile(str(tmp_path / 'entrypoint.py'), doraise=True)
  assert shlex.split(out) == [
      'ray', 'job', 'submit', f'--working-dir={tmp_path}', '--', 'python', 'entrypoint.py',
      '--nodes=2', '--gpus_per_node=8', '--port=1234', '--env_file=gpu.env',
      '--command_file=command.json']
  # The command goes as JSON (no shell re-splits it), its config in the job's folder.
  assert json.loads((tmp_path / 'command.json').read_text()) == [
      'jaxarch', 'train', f'--config={SPEC}', '--workdir=/gcs/bucket/runs/151m',
      '--config.mesh.ici.fsdp=8', '--config.mesh.dcn.data=2']
  assert (tmp_path / 'configs' / 'dense.py').read_text() == open('configs/dense.py').read()
  _bash_syntax_ok(tmp_path / 'submit.sh')
  lines = (tmp_path / 'gpu.env').read_text().splitlines()
  assert dict(l.split('=', 1) for l in lines if not l.startswith('#')) == launch.gpu_env()


def test_a_ray_job_from_a_runs_config_json_carries_that_file(tmp_path, capsys):
  config_lib.save(config_lib.load(SPEC), tmp_path / 'run' / 'config.json')
  code = cli.main(['launch', f'--config={tmp_path}/run/config.json', '--target=ray',
                   '--workdir=/gcs/bucket/runs/again', f'--out={tmp_path}/job'])
  assert code == 0, capsys.readouterr().err
  command = json.loads((tmp_path / 'job' / 'command.json').read_text())
  assert command[2] == '--config=configs/config.json'
  assert [p.name for p in (tmp_path / 'job' / 'configs').iterdir()] == ['config.json']
  assert config_lib.load_json(tmp_path / 'job' / 'configs' / 'config.json').to_dict() == (
      config_lib.load(SPEC).to_dict())
  # A run's own tokenizer, named relative to the run in its config.json: by its path in
  # the file that travels without the run.
  from test_data import _gpt2_style_tokenizer  # pylint: disable=g-import-not-at-top
  (tmp_path / 'imported' / 'tokenizer').mkdir(parents=True)
  tokenizer = _gpt2_style_tokenizer(tmp_path / 'imported' / 'tokenizer' / 'tokenizer.json')
  config_lib.save(config_lib.load(SPEC, [f'data.tokenizer={tokenizer}']),
                  tmp_path / 'imported' / 'config.json')
  assert cli.main(['launch', f'--config={tmp_path}/imported/config.json', '--target=ray',
                   '--workdir=/gcs/bucket/runs/again', f'--out={tmp_path}/job2']) == 0
  carried = tmp_path / 'job2' / 'configs' / 'config.json'
  assert json.loads(carried.read_text())['data']['tokenizer'] == tokenizer
  assert config_lib.load_json(carried).data.tokenizer == tokenizer


def test_a_job_that_cannot_be_written_says_to_give_out(tmp_path, capsys):
  (tmp_path / 'file').write_text('')
  code = cli.main(['launch', f'--config={SPEC}', '--target=slurm',
                   f'--workdir={tmp_path}/file/runs/151m'])  # WORKDIR/launch: not a folder
  assert code == 2
  assert 'the job cannot be written to' in capsys.readouterr().err


def test_ray_and_multi_host_tpu_vm_jobs_refuse_a_workdir_their_nodes_do_not_share(tmp_path,
                                                                                   capsys):
  code = cli.main(['launch', f'--config={SPEC}', '--target=ray', '--workdir=runs/151m',
                   f'--out={tmp_path}'])
  assert code == 2
  assert "--workdir='runs/151m': a Ray job runs in a temporary copy" in capsys.readouterr().err
  tpu_vm = ['launch', f'--config={SPEC}', '--target=tpu-vm', '--workdir=runs/151m',
            f'--out={tmp_path}', *V5P_2x32[:3], '--config.launch.devices_per_node=4']
  assert cli.main(tpu_vm + ['--config.launch.nodes=4', '--config.mesh.ici.fsdp=16']) == 2
  assert ("--workdir='runs/151m': each TPU VM worker runs the command in its own home "
          'directory; give an absolute path') in capsys.readouterr().err
  assert cli.main(tpu_vm + ['--config.launch.nodes=1', '--config.launch.tpu_type=v5p-8',
                            '--config.launch.tpu_topology=2x2x1',
                            '--config.mesh.ici.fsdp=4']) == 0  # one host: its own folder


@pytest.mark.parametrize('flags, words', [
    (['--config.launch.nodes=4', '--config.mesh.ici.data=2', '--config.mesh.ici.fsdp=8'],
     'the mesh needs 16 devices (mesh.ici data=2 fsdp=8, mesh.dcn 1) but launch.nodes=4 x '
     'launch.devices_per_node=8 = 32'),
    (['--config.launch.nodes=4', '--config.mesh.ici.fsdp=3'],
     'the mesh needs a multiple of 3 devices'),
    (['--config.launch.nodes=4', '--config.mesh.ici.fsdp=8', '--config.mesh.dcn.data=2'],
     'mesh.dcn data=2 spans 2 processes but there are launch.nodes=4'),
    (['--config.launch.nodes=64', '--config.mesh.ici.fsdp=8'],
     'train.batch_size=256 must be divisible by 512'),
    (['--config.launch.accelerator=tpu-v5p-slice'], "'tpu-v5p-slice' is a TPU; --target=slurm"),
    (['--config.launch.slices=2'], 'launch.slices=2 is for TPU multislice'),
    (['--config.launch.time_limit=1:00:00\nrm -rf ~'],  # a second line of the script
     "launch.time_limit='1:00:00\\nrm -rf ~' must be one line"),
    (['--config.launch.time_limit=forever'], "launch.time_limit='forever' must be a SLURM time"),
    (['--config.launch.max_restarts=-1'], 'launch.max_restarts=-1 must be >= 0'),
    (['--config.launch.stop_grace_s=0'], 'launch.stop_grace_s=0 must be'),
    (['--config.launch.time_limit=10', '--config.launch.stop_grace_s=600'],
     "launch.stop_grace_s=600 must be shorter than launch.time_limit='10' (600 s)"),
    (['--config.launch.time_limit=UNLIMITED', '--config.launch.stop_grace_s=70000'],
     "launch.stop_grace_s=70000 is past the 65535 seconds that SLURM's --signal"),
    (['--config.launch.exclusive=maybe'], "launch.exclusive='maybe' must be a bool"),
    (['--config.launch.slurm_options=--qos=high --nodes=2'],
     'launch.slurm_options: --nodes is set from launch.nodes; set that instead'),
    (['--config.launch.slurm_options=--requeue'],
     'launch.slurm_options: --requeue is set by the job script'),
    (['--config.launch.slurm_options=-q high'],
     "launch.slurm_options: '-q' must be a long sbatch option, --key=value or --flag"),
    (['--config.launch.slurm_options=--comment="two words"'],
     "launch.slurm_options: '--comment=two words' holds a space, a quote, a # or a backslash"),
    (['--config.launch.slurm_options=--comment=a#b'], "'--comment=a#b' holds a space, a quote"),
    (['--config.launch.slurm_options=--part=x'],  # sbatch's abbreviation of --partition
     'launch.slurm_options: --partition is set from launch.partition'),
    (['--config.launch.slurm_options=--gpus=8'],
     'launch.slurm_options: --gpus is set from launch.devices_per_node'),
    (['--config.launch.slurm_options=--comment="open'],
     "launch.slurm_options='--comment=\"open': No closing quotation"),
])
def test_a_cluster_that_does_not_fit_the_mesh_is_a_one_line_error(tmp_path, capsys, flags,
                                                                   words):
  code, out, err = _launch(capsys, 'slurm', tmp_path / 'jobs', *flags)
  assert code == 2 and not out and not (tmp_path / 'jobs').exists()
  assert err.count('\n') == 1 and words in err, err


def test_slurm_time_limits_in_every_form_sbatch_takes():
  for ok in ('90', '90:30', '24:00:00', '2-0', '2-12:00', '2-12:00:00', 'UNLIMITED'):
    assert launch.SLURM_TIME.fullmatch(ok), ok
  for bad in ('forever', '1h', '24:00:00:00', '-1', ''):
    assert not launch.SLURM_TIME.fullmatch(bad), bad
  seconds = [launch._slurm_seconds(t)  # pylint: disable=protected-access
             for t in ('90', '90:30', '24:00:00', '2-0', '2-12:00', '2-12:00:30', 'UNLIMITED')]
  assert seconds == [5400, 5430, 86400, 172800, 216000, 216030, None]


def test_tpu_slices_must_match_their_type_and_topology(tmp_path, capsys):
  code, _, err = _launch(capsys, 'gke', tmp_path, *V5P_2x32, '--config.launch.tpu_type=v5p-16')
  assert code == 2 and 'launch.tpu_type=v5p-16 has 8 chips' in err and '16 chips per slice' in err
  code, _, err = _launch(capsys, 'gke', tmp_path, *V5P_2x32, '--config.mesh.dcn.data=1',
                         '--config.mesh.ici.fsdp=32')
  assert code == 2 and 'spans 1 slices but launch.slices=2' in err
  code, _, err = _launch(capsys, 'gke', tmp_path, *V5P_2x32, '--config.launch.tpu_type=v4-32')
  assert code == 2 and ("launch.accelerator='tpu-v5p-slice' does not label v4 nodes, which "
                        "launch.tpu_type=v4-32 asks for; set launch.accelerator="
                        "'tpu-v4-podslice'") in err


V5E = ['--config.launch.accelerator=tpu-v5-lite-podslice', '--config.launch.slices=1',
       '--config.mesh.dcn.data=1']


@pytest.mark.parametrize('flags, words', [
    # v5p hosts have 4 chips: 2 of 8 rendered `google.com/tpu: 8`, a node no pool has.
    ([*V5P_2x32, '--config.launch.nodes=4', '--config.launch.devices_per_node=8'],
     'launch.devices_per_node=8: each host of a v5p slice of several has 4 chips; for 16 '
     'chips per slice set launch.devices_per_node=4 and launch.nodes=8'),
    ([*V5P_2x32, '--config.launch.tpu_topology=4x4'],
     'launch.tpu_topology=4x4 has 2 dimensions, and v5p slices have 3 (e.g. 2x2x4)'),
    ([*V5E, '--config.launch.tpu_type=v5litepod-16', '--config.launch.tpu_topology=4x4',
      '--config.launch.nodes=2', '--config.mesh.ici.fsdp=16'],
     'each host of a v5litepod slice of several has 4 chips'),
    ([*V5E, '--config.launch.tpu_type=v5litepod-8', '--config.launch.tpu_topology=2x2x2',
      '--config.mesh.ici.fsdp=8'],
     'launch.tpu_topology=2x2x2 has 3 dimensions, and v5litepod slices have 2 (e.g. 4x4)'),
    ([*V5E, '--config.launch.tpu_type=v5litepod-2', '--config.launch.tpu_topology=1x2',
      '--config.launch.devices_per_node=2', '--config.mesh.ici.fsdp=2'],
     'launch.devices_per_node=2: a v5litepod slice of one host has 1 or 4 or 8 chips'),
])
def test_tpu_jobs_of_a_shape_no_node_pool_has_are_refused(tmp_path, capsys, flags, words):
  code, out, err = _launch(capsys, 'gke', tmp_path / 'jobs', *flags)
  error = err.splitlines()[-1]  # after the warnings that a flag of V5P_2x32 is given again
  assert code == 2 and not out and error.startswith('jaxarch: config error: ') and words in error


def test_tpu_slices_of_each_generation_s_shapes_render(tmp_path, capsys):
  for flags in ([*V5E, '--config.launch.tpu_type=v5litepod-8', '--config.launch.tpu_topology=2x4',
                 '--config.mesh.ici.fsdp=8'],
                [*V5E, '--config.launch.tpu_type=v5litepod-16', '--config.launch.tpu_topology=4x4',
                 '--config.launch.nodes=4', '--config.launch.devices_per_node=4',
                 '--config.mesh.ici.fsdp=16']):
    code, _, err = _launch(capsys, 'gke', tmp_path / 'jobs', *flags)
    assert code == 0, err
  # Slices of one host: GKE's Multislice joins multi-host slices only.
  code, _, err = _launch(capsys, 'gke', tmp_path / 'jobs', *V5E, '--config.launch.slices=2',
                         '--config.launch.tpu_type=v5litepod-8', '--config.launch.nodes=2',
                         '--config.launch.tpu_topology=2x4', '--config.mesh.dcn.data=2',
                         '--config.mesh.ici.fsdp=8')
  assert code == 2 and 'slices of one host each: GKE joins multi-host slices only' in err


def test_dry_run_prints_the_job_and_writes_nothing(tmp_path, capsys):
  workdir = tmp_path / 'run'
  code = cli.main(['launch', f'--config={SPEC}', '--target=slurm', f'--workdir={workdir}',
                   *H100_4x8, '--dry-run'])
  captured = capsys.readouterr()
  assert code == 0 and not list(tmp_path.iterdir())
  path = workdir / 'launch' / 'train.sbatch'
  assert captured.out.startswith(f'==> {path} <==\n#!/bin/bash\n')
  assert '#SBATCH --nodes=4' in captured.out
  assert f'nothing written; submit with: sbatch {path}' in captured.err


def test_a_tilde_in_workdir_or_out_writes_the_job_under_this_home(tmp_path, capsys,
                                                                    monkeypatch):
  """The shell leaves `--workdir=~/run` alone: the job files go to this machine's home (not
  to a folder named `~` here), while the job keeps the workdir as written, for its hosts'
  home."""
  config = f'--config={os.path.abspath(SPEC)}'
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.chdir(tmp_path)
  assert cli.main(['launch', config, '--target=slurm', '--workdir=~/runs/a', *H100_4x8]) == 0
  path = tmp_path / 'home' / 'runs' / 'a' / 'launch' / 'train.sbatch'
  assert capsys.readouterr().out.strip() == f'sbatch {path}'
  (srun,) = [line for line in path.read_text().splitlines() if line.startswith('srun ')]
  assert '--workdir=~/runs/a' in shlex.split(srun)
  assert cli.main(['launch', config, '--target=slurm', '--workdir=/shared/b', '--out=~/jobs/b',
                   *H100_4x8]) == 0
  assert (tmp_path / 'home' / 'jobs' / 'b' / 'train.sbatch').is_file()
  assert not (tmp_path / '~').exists()


def test_launch_keys_leave_the_config_hash_alone():
  base = config_lib.load(SPEC)
  assert config_lib.config_hash(config_lib.load(SPEC, ['launch.nodes=4'])) == (
      config_lib.config_hash(base))
  assert config_lib.config_hash(config_lib.load(SPEC, ['train.seed=1'])) != (
      config_lib.config_hash(base))


def test_gpu_recipe_flags_are_known_to_the_installed_jaxlib():
  # XLA aborts at start-up on a flag it does not know; the control shows that it would.
  def starts(flags):
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu')
    return subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], env=env,
                          capture_output=True).returncode == 0

  assert starts(launch.gpu_env()['XLA_FLAGS'])
  assert not starts('--xla_gpu_no_such_flag=true')


# Sweeps render one job per run through the same targets.

def _sweep_file(tmp_path, widths=(32, 64), **run_keys):
  """A sweep of `widths`; run_keys: {width: {key: value}} for some runs."""
  members = [{'config': 'configs/dense.py:tiny', 'name': f'd{width}', 'model.d_model': width,
              'model.d_ff': 2 * width, 'model.n_layers': 2, **run_keys.get(f'd{width}', {})}
             for width in widths]
  path = tmp_path / 'sweep.py'
  path.write_text(f'def get_sweep(arg=None):\n  return {members!r}\n')
  return str(path)


def test_sweep_renders_one_slurm_job_per_run(tmp_path, capsys):
  workdir = tmp_path / 'sweep'
  code = cli.main(['sweep', f'--config={_sweep_file(tmp_path)}', f'--workdir={workdir}',
                   '--launcher=slurm', '--config.launch.partition=gpu'])
  out = capsys.readouterr().out
  assert code == 0
  assert out.count('sweep: warning: launch.setup is empty') == 1  # once for all the jobs
  for width in (32, 64):
    run_dir = workdir / 'runs' / f'd{width}'
    path = run_dir / 'launch' / 'train.sbatch'
    assert f'sweep: d{width}: sbatch {path}' in out
    _bash_syntax_ok(path)
    text = path.read_text()
    assert f'#SBATCH --job-name=jaxarch-d{width}\n' in text
    assert '#SBATCH --partition=gpu\n' in text
    (srun,) = [line for line in text.splitlines() if line.startswith('srun ')]
    assert shlex.split(srun)[2:] == [
        'jaxarch', 'train', '--config=configs/dense.py:tiny', f'--workdir={run_dir}',
        f'--config.model.d_model={width}', f'--config.model.d_ff={2 * width}',
        '--config.model.n_layers=2']
  assert sorted(p.name for p in (workdir / 'runs').iterdir()) == ['d32', 'd64']


def test_sweep_slurm_jobs_are_also_array_jobs_whose_tasks_run_each_runs_script(tmp_path,
                                                                                capsys):
  """One array per nodes, time and queue; task i runs run i's own train.sbatch, its log
  appended in that run's launch folder; --parallel throttles the tasks."""
  workdir = tmp_path / 'sweep'
  spec = _sweep_file(tmp_path, (32, 64, 96), d96={'launch.time_limit': '1:00:00'})
  assert cli.main(['sweep', f'--config={spec}', f'--workdir={workdir}', '--launcher=slurm',
                   '--parallel=1', '--config.launch.setup=echo setup ran']) == 0
  out = capsys.readouterr().out
  first, second = workdir / 'launch' / 'sweep-1.sbatch', workdir / 'launch' / 'sweep-2.sbatch'
  assert f'sweep: d32, d64 as one array job: sbatch {first}\n' in out
  assert f'sweep: d96 as one array job: sbatch {second}\n' in out
  assert 'sweep: 3 slurm jobs and 2 array jobs of them (one for each nodes' in out
  text = first.read_text()
  _bash_syntax_ok(first)
  for directive in ('--job-name=jaxarch-sweep-1', '--array=0-1%1', '--time=24:00:00',
                    '--nodes=1', '--requeue', f'--output={workdir}/launch/%x-%A_%a.out'):
    assert f'#SBATCH {directive}\n' in text
  assert '#SBATCH --time=1:00:00\n' in second.read_text()
  assert '#SBATCH --array=0-0\n' in second.read_text()  # --parallel=1 throttles no one task

  (tmp_path / 'bin').mkdir()
  srun = tmp_path / 'bin' / 'srun'
  srun.write_text('#!/bin/sh\necho "srun $*"\n')
  srun.chmod(0o755)
  env = dict(os.environ, PATH=f'{tmp_path / "bin"}:{os.environ["PATH"]}',
             SLURM_ARRAY_TASK_ID='1', SLURM_ARRAY_JOB_ID='77', SLURM_JOB_NAME='jaxarch-sweep-1')
  done = subprocess.run(['bash', str(first)], env=env, capture_output=True, text=True)
  log = workdir / 'runs' / 'd64' / 'launch' / 'jaxarch-sweep-1-77_1.out'
  assert done.returncode == 0, done.stderr
  assert done.stdout == (f'jaxarch sweep: array task 1 runs {log.parent}/train.sbatch; its '
                         f'log is {log}\n')
  setup, srun_line = log.read_text().splitlines()
  assert setup == 'setup ran'
  assert shlex.split(srun_line)[2:] == [
      'jaxarch', 'train', '--config=configs/dense.py:tiny', f'--workdir={workdir}/runs/d64',
      '--config.model.d_model=64', '--config.model.d_ff=128', '--config.model.n_layers=2']
  env['SLURM_ARRAY_TASK_ID'] = '2'  # (`sbatch --array=0-5 FILE`)
  done = subprocess.run(['bash', str(first)], env=env, capture_output=True, text=True)
  assert done.returncode == 1 and 'array task 2, but this array holds 2 runs (0 to 1)' in (
      done.stderr)
  del env['SLURM_ARRAY_TASK_ID']  # run by hand, not by sbatch
  done = subprocess.run(['bash', str(first)], env=env, capture_output=True, text=True)
  assert done.returncode != 0 and 'submit it with sbatch, not bash' in done.stderr

  # Rendered again for two runs alike: one array replaces the two of before.
  assert cli.main(['sweep', f'--config={spec}', f'--workdir={workdir}', '--launcher=slurm',
                   '--only=d32,d64']) == 0
  assert f'sweep: the 2 runs rendered as one array job: sbatch {workdir}/launch/sweep.sbatch' in (
      capsys.readouterr().out)
  assert sorted(p.name for p in (workdir / 'launch').iterdir()) == ['sweep.sbatch']

  assert cli.main(['sweep', f'--config={spec}', f'--workdir={tmp_path}/one', '--only=d32',
                   '--launcher=slurm']) == 0
  assert 'array' not in capsys.readouterr().out and not (tmp_path / 'one' / 'launch').exists()
  assert cli.main(['sweep', f'--config={spec}', f'--workdir={tmp_path}/gke', '--parallel=2',
                   '--launcher=gke']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'gke jobs run as their cluster schedules them' in err


def test_sweep_renders_and_collects_only_the_runs_named(tmp_path, capsys):
  spec, workdir = _sweep_file(tmp_path), tmp_path / 'sweep'
  assert cli.main(['sweep', f'--config={spec}', f'--workdir={workdir}', '--launcher=slurm',
                   '--only=d64']) == 0
  assert sorted(p.name for p in (workdir / 'runs').iterdir()) == ['d64']
  assert 'sweep: 1 slurm job written; nothing was submitted' in capsys.readouterr().out
  runner.append_record(workdir, {'name': 'd16', 'final_loss': 3.0})  # a run since dropped
  assert cli.main(['sweep', f'--config={spec}', f'--workdir={workdir}', '--launcher=slurm',
                   '--only=d64']) == 0
  assert 'results.jsonl holds 1 run the sweep file no longer has (d16)' in (
      capsys.readouterr().out)
  steps = config_lib.load('configs/dense.py:tiny').train.steps
  for name in ('d32', 'd64'):  # both finished, d32 by a job rendered before
    (workdir / 'runs' / name).mkdir(exist_ok=True)
    (workdir / 'runs' / name / 'metrics.jsonl').write_text(
        json.dumps(dict(step=steps, loss=2.0, eval_loss=2.5, eval_bpb=3.0)) + '\n')
  assert cli.main(['sweep', f'--config={spec}', f'--workdir={workdir}', '--collect',
                   '--only=d64']) == 0
  assert [r['name'] for r in runner.read_results(workdir)] == ['d16', 'd64']  # not d32


def test_sweep_tpu_vm_jobs_run_on_the_named_vm(tmp_path, capsys):
  workdir = tmp_path / 'sweep'
  assert cli.main(['sweep', f'--config={_sweep_file(tmp_path)}', f'--workdir={workdir}',
                   '--launcher=tpu-vm', '--config.launch.name=pod',
                   '--config.launch.accelerator=tpu-v5p-slice',
                   '--config.launch.tpu_type=v5p-8', '--config.launch.tpu_topology=2x2x1',
                   '--config.launch.nodes=1', '--config.launch.devices_per_node=4']) == 0
  for width in (32, 64):  # launch.name is the VM's name here, not a job's
    text = (workdir / 'runs' / f'd{width}' / 'launch' / 'run.sh').read_text()
    assert 'tpu-vm ssh pod ' in text and f'pod-d{width}' not in text


def test_sweep_collect_records_the_jobs_that_finished(tmp_path, capsys):
  spec, workdir = _sweep_file(tmp_path), tmp_path / 'sweep'
  assert cli.main(['sweep', f'--config={spec}', f'--workdir={workdir}',
                   '--launcher=slurm']) == 0
  # The d32 job has finished on the cluster (its metrics reach train.steps); d64 has not.
  steps = config_lib.load('configs/dense.py:tiny').train.steps
  (workdir / 'runs' / 'd32' / 'metrics.jsonl').write_text(
      json.dumps(dict(step=steps, loss=2.0, eval_loss=2.5, eval_bpb=3.0)) + '\n')
  (workdir / 'runs' / 'd64' / 'metrics.jsonl').write_text(json.dumps(dict(step=3)) + '\n')
  capsys.readouterr()
  assert cli.main(['sweep', f'--config={spec}', f'--workdir={workdir}', '--collect']) == 0
  captured = capsys.readouterr()
  assert '1 run collected, 1 not finished (d64)' in captured.out
  assert f'1 run recorded in {workdir / "results.jsonl"}; fit them' in captured.err
  (record,) = [json.loads(l) for l in (workdir / 'results.jsonl').read_text().splitlines()]
  assert record['name'] == 'd32' and record['eval_loss'] == 2.5 and record['wall_s'] is None
  cli.main(['sweep', f'--config={spec}', f'--workdir={workdir}', '--collect'])
  out = capsys.readouterr().out
  assert '0 runs collected, 1 not finished' in out and 'does not exist' not in out
  cli.main(['sweep', f'--config={spec}', f'--workdir={tmp_path}/fresh', '--collect'])
  captured = capsys.readouterr()
  assert 'runs does not exist: --collect records the runs' in captured.out
  assert f'no runs recorded in {tmp_path}/fresh/results.jsonl yet' in captured.err


def test_sweep_launcher_errors_are_one_line(tmp_path, capsys):
  spec, workdir = _sweep_file(tmp_path), tmp_path / 'sweep'
  assert cli.main(['sweep', f'--config={spec}', f'--workdir={workdir}', '--launcher=pbs']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1
  assert "--launcher='pbs' is not available (launchers: gke, ray, slurm, tpu-vm" in err
  assert cli.main(['sweep', f'--config={spec}', f'--workdir={workdir}', '--launcher=slurm',
                   '--config.train.steps=5']) == 2
  assert 'drop --config.train.steps' in capsys.readouterr().err
  assert cli.main(['sweep', f'--config={spec}', f'--workdir={workdir}', '--launcher=slurm',
                   '--config.launch.devices_per_node=3']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1
  # 'config error:' once, before the run's name, as a bad sweep file says it.
  assert "config error: run 'd32': train.batch_size=16 must be divisible by 3" in err
  assert err.count('config error') == 1
  assert not workdir.exists()


def test_sweep_run_names_become_job_names_that_check_takes(tmp_path):
  """launch.name-RUN, lowercased: a run name ending in '.' or making it longer than 40
  failed as a bad launch.name; long ones are cut, with a hash that keeps them apart."""
  import types  # pylint: disable=g-import-not-at-top
  names = {}
  for name in ('Run_1.', 'ultramem-151m-values-2m-1.5e18-a', 'ultramem-151m-values-2m-1.5e18-b'):
    run = types.SimpleNamespace(name=name, spec='configs/dense.py:tiny', overrides=[],
                                config=lambda: config_lib.load('configs/dense.py:tiny'))
    launch.render_run('gke', run, tmp_path / name)
    names[name] = yaml.safe_load((tmp_path / name / 'launch' / 'jobset.yaml').read_text())[
        'metadata']['name']
  assert names['Run_1.'] == 'jaxarch-run-1'
  long_a, long_b = names['ultramem-151m-values-2m-1.5e18-a'], names[
      'ultramem-151m-values-2m-1.5e18-b']
  assert long_a != long_b and launch.NAME.fullmatch(long_a) and launch.NAME.fullmatch(long_b)


def _run_sbatch_with_setup(tmp_path, capsys, setup: str) -> subprocess.CompletedProcess:
  """Renders the SLURM job with `launch.setup`, then runs it with an `srun` that prints
  the XLA_FLAGS it was started with."""
  assert _launch(capsys, 'slurm', tmp_path, *H100_4x8, f'--config.launch.setup={setup}')[0] == 0
  (tmp_path / 'bin').mkdir()
  srun = tmp_path / 'bin' / 'srun'
  srun.write_text('#!/bin/sh\necho "srun ran with $XLA_FLAGS"\n')
  srun.chmod(0o755)
  env = dict(os.environ, PATH=f'{tmp_path / "bin"}:{os.environ["PATH"]}')
  return subprocess.run(['bash', str(tmp_path / 'train.sbatch')], env=env,
                        capture_output=True, text=True)


def test_slurm_setup_can_add_xla_flags_to_the_gpu_recipe(tmp_path, capsys):
  """launch.setup ran before the recipe's `export XLA_FLAGS=...`, which dropped any flag
  it set (a dump folder, a tuning flag); it now runs after, with the recipe's in place."""
  done = _run_sbatch_with_setup(
      tmp_path, capsys, 'export XLA_FLAGS="$XLA_FLAGS --xla_dump_to=/tmp/dump"')
  flags = done.stdout.split()
  assert done.returncode == 0 and '--xla_dump_to=/tmp/dump' in flags
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in flags


def test_slurm_stops_when_setup_fails(tmp_path, capsys):
  """launch.setup ran before `set -e`, so a venv that was not there let srun start the
  job with whatever python the node had; a failing setup now ends the script."""
  done = _run_sbatch_with_setup(tmp_path, capsys, 'source /no/such/venv/bin/activate')
  assert done.returncode != 0 and 'srun ran' not in done.stdout
