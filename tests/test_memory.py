"""Memory per device, known before allocating: the state's shards under FSDP and expert
parallelism, the compiled step's buffers, a bf16 first moment, and the one-line error of
a state that does not fit."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_batch, mesh_config, tiny_config
from jaxarch import cli
from jaxarch import config as config_lib
from jaxarch.parallel import make_mesh
from jaxarch.train import memory
from jaxarch.train.state import init_state, make_setup
from jaxarch.train.workdir import state_bytes


def _setup(spec='configs/dense.py:tiny', *overrides, **mesh):
  cfg = mesh_config(config_lib.load(spec, list(overrides)), **mesh)
  return cfg, make_setup(cfg, make_mesh(cfg))


def _allocated_bytes_on_device_0(tree) -> int:
  """What the allocated arrays really hold on the first device."""
  device = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


@pytest.mark.parametrize('spec, mesh', [
    pytest.param('configs/dense.py:tiny', dict(fsdp=8), marks=pytest.mark.slow),
    pytest.param('configs/moe.py:tiny', dict(fsdp=4, expert=2), marks=pytest.mark.slow),
    ('configs/ultramem.py:tiny', dict(fsdp=2, tensor=4)),
])
def test_state_bytes_per_device_are_what_each_device_holds(spec, mesh):
  cfg, setup = _setup(spec, **mesh)
  planned = memory.state_bytes_per_device(setup)
  state = init_state(cfg, setup)
  assert planned['total'] == _allocated_bytes_on_device_0(state)
  assert planned['params'] == _allocated_bytes_on_device_0(state['params'])
  # Sharded 8 ways, each device holds little more than an eighth: norm scales, and
  # dimensions the axes do not divide (tiny's 2 KV heads on tensor=4), stay replicated.
  _, replicated = _setup(spec, data=8)
  whole = memory.state_bytes_per_device(replicated)['total']
  assert whole == state_bytes(replicated.abstract_state)
  assert whole / 8 <= planned['total'] < 0.25 * whole


def test_a_bf16_first_moment_saves_two_bytes_per_parameter():
  # (That it still trains: test_train_step's overfitting test.)
  def setup(mu_dtype):
    cfg = mesh_config(tiny_config(**{'train.mu_dtype': mu_dtype}), data=8)
    return make_setup(cfg, make_mesh(cfg))
  f32, bf16 = setup('float32'), setup('bfloat16')
  saved = (memory.state_bytes_per_device(f32)['opt_state']
           - memory.state_bytes_per_device(bf16)['opt_state'])
  assert saved == 2 * f32.param_counts['total']
  mu = bf16.abstract_state['opt_state'][1][0].mu  # clip, then adamw's scale_by_adam
  assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype('bfloat16')}
  with pytest.raises(config_lib.ConfigError, match="train.mu_dtype='float16' must be one of"):
    config_lib.load('configs/dense.py:tiny', ['train.mu_dtype=float16'])


def test_plan_compiles_the_sharded_step_without_allocating_it():
  cfg = mesh_config(tiny_config(), fsdp=4, data=2)
  result = memory.plan(cfg, device_memory=1 << 40)
  compiled, state = result['compiled_bytes'], result['state_bytes']
  batch_bytes = sum(v.nbytes for v in make_batch(8, cfg.data.seq_len).values()) // 8
  assert compiled['argument'] == state['total'] + batch_bytes  # per device, not in all
  assert compiled['alias'] == state['total']  # the donated state is updated in place
  assert compiled['peak'] >= state['total'] + compiled['temp'] and result['fits']
  assert not memory.plan(cfg, compile_step=False, device_memory=state['total'] - 1)['fits']


@pytest.mark.slow
def test_gradient_accumulation_shrinks_the_step_s_temporaries():
  temp = {}
  for accum in (1, 4):
    cfg = mesh_config(tiny_config(**{'train.batch_size': 64, 'train.grad_accum_steps': accum}),
                      data=8)
    temp[accum] = memory.plan(cfg)['compiled_bytes']['temp']
  assert temp[4] < 0.5 * temp[1], temp


def test_a_state_too_big_for_the_device_is_one_line_naming_the_fix(tmp_path, capsys,
                                                                   monkeypatch):
  monkeypatch.setattr(memory, 'device_memory_bytes', lambda: 4 << 20)  # 4 MiB devices
  code = cli.main(['train', '--config=configs/dense.py:tiny', f'--workdir={tmp_path / "run"}',
                   '--config.mesh.ici.data=8'])
  error = capsys.readouterr().err.strip()
  assert code == 2 and '\n' not in error, error
  assert error.startswith('jaxarch: the train state takes 10.1 MiB per device')
  assert 'shard it with --config.mesh.ici.fsdp=8 --config.mesh.ici.data=-1,' in error
  assert 'mu_dtype=bfloat16' in error
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  # Beside a tensor axis the hint is an fsdp that fits it (8 would need 16 devices).
  code = cli.main(['train', '--config=configs/dense.py:tiny', f'--workdir={tmp_path / "run"}',
                   '--config.mesh.ici.tensor=2'])
  hint = re.search(r'shard it with (.*?),', capsys.readouterr().err).group(1).split()
  assert code == 2 and hint == ['--config.mesh.ici.fsdp=4']
  config_lib.validate(config_lib.load('configs/dense.py:tiny', ['mesh.ici.tensor=2', *hint]),
                      jax.device_count())


def test_bench_refuses_a_workdir_that_is_a_file(tmp_path, capsys):
  (tmp_path / 'file').write_text('')
  args = ['bench', 'memory', '--config=configs/dense.py:tiny', f'--workdir={tmp_path}/file']
  assert cli.main(args) == 2
  assert 'is a file; give a directory' in capsys.readouterr().err


def test_bench_memory_plans_for_a_given_device_size(tmp_path, capsys):
  args = ['bench', 'memory', '--config=configs/moe.py:680m', f'--workdir={tmp_path}',
          '--state_only', '--device_memory_gib=80']
  assert cli.main([*args, '--config.mesh.ici.data=-1']) == 0
  alone = json.loads((tmp_path / 'bench_memory.json').read_text())
  assert cli.main([*args, '--config.mesh.ici.data=1', '--config.mesh.ici.fsdp=8']) == 0
  sharded = json.loads((tmp_path / 'bench_memory.json').read_text())
  # 8.7B parameters: 12 bytes each of fp32 weights and AdamW moments on one device.
  assert alone['state_bytes']['total'] == pytest.approx(12 * alone['params_total'], rel=1e-6)
  assert not alone['fits'] and sharded['fits'] and 'compiled_bytes' not in sharded
  assert np.isclose(sharded['state_bytes']['total'], alone['state_bytes']['total'] / 8,
                    rtol=0.01)
  assert 'DOES NOT FIT' in capsys.readouterr().out
