"""Export: safetensors round trips for every family, StableHLO that generates the same
tokens as jaxarch without jaxarch, and the command line."""

import errno
import functools
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
import safetensors.flax
import safetensors.numpy
from flax import nnx

from conftest import FAMILIES, compiled_call, family_config, llama3_frequencies
import jaxarch
from jaxarch import cli
from jaxarch import config as config_lib
from jaxarch import infer, models
from jaxarch.export import (ExportError, all_or_nothing, export_stablehlo, load_safetensors,
                            write_hf, write_model)
from jaxarch.data import get_tokenizer, model_tokenizer
from jaxarch.export import hf_import, hf_tokenizer, run_stablehlo, weights
from jaxarch.export import huggingface as hf_export
from jaxarch.export.run_stablehlo import StableHLOModel
from jaxarch.layers.attention import Attention
from jaxarch.layers.signals import WindowCounter
from jaxarch.parallel import make_mesh
from jaxarch.train.checkpoint import Checkpointer
from jaxarch.train import pretrained
from jaxarch.train import state as state_lib
from jaxarch.train.pretrained import load_model
from jaxarch.export.weights import flat_arrays
from jaxarch.train.state import init_state, make_setup, merge_model
from jaxarch.train.workdir import CHECKPOINTS

TOKENS = np.array([[257, 100, 101, 102, 103, 104, 105, 106]], np.int32)


def logits(model, tokens):
  """The model's logits on one device. A copy loaded back lies replicated or sharded over
  the 8 devices, which would compile a program of its own; gathered, it runs the model's.
  test_an_export_loads_sharded_over_the_run_s_mesh_or_one_that_fits computes sharded."""
  graphdef, state = nnx.split(model)
  return compiled_call(nnx.merge(graphdef, jax.device_put(state, jax.devices()[0])), tokens)


def _bita_config():
  cfg = family_config('dense')
  with cfg.unlocked():
    cfg.model = config_lib.bita_model(cfg.model, dict(
        num_prompt_tokens=4, num_mask_tokens=3, draft_tree=(2, 2, 2), train_groups=0,
        init_std=0.02))
    cfg.data.source = 'distilled:/data/of/the/base/run'
  return config_lib.validate(cfg)


def _config(family):
  return _bita_config() if family == 'bita' else family_config(family)


def _model(cfg, seed=0):
  return models.build(cfg.model, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize('family', [
    *(pytest.param(f, marks=pytest.mark.slow) if f == 'megabyte' else f for f in FAMILIES),
    'bita'])
def test_safetensors_round_trip_gives_identical_logits(tmp_path, family):
  cfg = _config(family)
  model = _model(cfg)
  write_model(model, cfg, tmp_path / 'out')
  loaded_cfg, loaded = load_safetensors(tmp_path / 'out')
  assert loaded_cfg.model.to_dict() == cfg.model.to_dict()
  np.testing.assert_array_equal(np.asarray(logits(loaded, TOKENS)),
                                np.asarray(logits(model, TOKENS)))
  names = set(safetensors.flax.load_file(tmp_path / 'out' / 'model.safetensors'))
  assert all(not n.endswith('.value') and '/' not in n for n in names)
  assert not any(n.endswith('.hits') for n in names)  # training statistics stay behind
  for _, counter in nnx.iter_graph(loaded):  # ... and start at zero, as device arrays
    if isinstance(counter, WindowCounter):
      assert isinstance(counter.get_value(), jax.Array) and not counter.get_value().any()
  if family == 'bita':  # the prompt parameters beside the frozen base
    assert {'prompt_k', 'prompt_v', 'mask_embed'} <= names
    assert 'base.blocks.0.attn.q_proj' in names
  else:
    assert 'blocks.0.attn.q_proj' in names or 'global_model.blocks.0.attn.q_proj' in names
  tokenizer = json.loads((tmp_path / 'out' / 'tokenizer.json').read_text())
  assert tokenizer == {**tokenizer, 'spec': 'bytes', 'vocab_size': 258, 'eod_id': 257}


def test_safetensors_are_written_byte_for_byte_as_safetensors_writes_them(tmp_path):
  arrays = {'b.weight': np.arange(6, dtype=np.float32).reshape(2, 3),
            'a.weight': np.full((3, 2), 1.5, jax.numpy.bfloat16),
            'ids': np.arange(5, dtype=np.int32), 'scale': np.array(3.0, np.float32),
            'mask': np.array([True, False]), 'empty': np.zeros((0, 4), np.float32)}
  safetensors.numpy.save_file(arrays, tmp_path / 'theirs', metadata={'format': 'pt'})
  sharded = {k: jax.device_put(v) for k, v in arrays.items()}
  weights.save_safetensors({k: weights.Deferred(v) for k, v in sharded.items()},
                           tmp_path / 'ours', metadata={'format': 'pt'})
  assert (tmp_path / 'ours').read_bytes() == (tmp_path / 'theirs').read_bytes()


def _host_peak(fn) -> int:
  """The most bytes that Python and numpy held at once while `fn` ran, over those held
  before."""
  tracemalloc.start()
  try:
    fn()
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_an_export_fetches_one_tensor_at_a_time_to_the_host(tmp_path):
  """A model's weights were fetched to the host all at once (in Hugging Face's layouts,
  transposed beside them): host memory for the whole model, or twice that. They are
  fetched and written one at a time, and jax keeps no host copy of them behind."""
  cfg = family_config('dense', fsdp=8)
  setup = make_setup(cfg, make_mesh(cfg))
  model = merge_model(setup, init_state(cfg, setup))
  arrays = flat_arrays(model)
  total = sum(a.nbytes for a in arrays.values())
  assert max(a.nbytes for a in arrays.values()) < total / 16
  for fmt, write in (('safetensors', write_model), ('hf', hf_export.write_hf)):
    assert _host_peak(functools.partial(write, model, cfg, tmp_path / fmt)) < total / 2, fmt
  loaded = dict(nnx.to_flat_state(nnx.state(load_safetensors(tmp_path / 'safetensors')[1])))
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    np.testing.assert_array_equal(loaded[path].get_value(), variable.get_value())


def test_loading_weights_of_another_shape_names_the_array(tmp_path):
  cfg = family_config('dense')
  write_model(_model(cfg), cfg, tmp_path / 'out')
  saved = json.loads((tmp_path / 'out' / 'config.json').read_text())
  saved['model']['d_ff'] = 2 * saved['model']['d_ff']
  (tmp_path / 'out' / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(ExportError, match=r'blocks\.0\.mlp\.\w+ is float32\[\d+, \d+\]'):
    load_safetensors(tmp_path / 'out')
  with pytest.raises(ExportError, match='exists and is not empty'):
    write_model(_model(cfg), cfg, tmp_path / 'out')


def test_an_export_loads_sharded_over_the_run_s_mesh_or_one_that_fits(tmp_path):
  # It loaded onto one device (safetensors.flax): a model larger than a device's memory
  # could not be loaded at all, where the run's checkpoint loads sharded.
  cfg = family_config('dense', fsdp=4, tensor=2)
  model = _model(cfg)
  write_model(model, cfg, tmp_path / 'out')
  loaded_cfg, loaded = load_safetensors(tmp_path / 'out')
  q_proj = loaded.blocks[0].attn.q_proj.get_value()
  assert len(q_proj.sharding.device_set) == 8 and not q_proj.sharding.is_fully_replicated
  assert q_proj.addressable_shards[0].data.size == q_proj.size // 8  # fsdp × tensor
  np.testing.assert_allclose(np.asarray(compiled_call(loaded, TOKENS)),
                             np.asarray(logits(model, TOKENS)), rtol=2e-5, atol=2e-5)
  saved = json.loads((tmp_path / 'out' / 'config.json').read_text())
  saved['mesh']['ici'].update(data=1, fsdp=16, tensor=1)  # a pod's, on the 8 devices here
  (tmp_path / 'out' / 'config.json').write_text(json.dumps(saved))
  loaded_cfg, loaded = load_safetensors(tmp_path / 'out')
  assert dict(loaded_cfg.mesh.ici) == dict(data=8, fsdp=1, tensor=1, expert=1)
  np.testing.assert_allclose(np.asarray(compiled_call(loaded, TOKENS)),
                             np.asarray(logits(model, TOKENS)), rtol=2e-5, atol=2e-5)


def test_the_same_model_exports_to_the_same_bytes(tmp_path):
  cfg = family_config('dense')
  model = _model(cfg)
  files = set()
  for i in range(6):  # a header written in a random key order differed 1 time in 2
    write_model(model, cfg, tmp_path / str(i))
    files.add(tuple((p.name, p.read_bytes()) for p in sorted((tmp_path / str(i)).iterdir())
                    if p.name != 'README.md'))  # which names the folder
  assert len(files) == 1


# Every check of 'dense' is made on 'dense_windowed' too (ring caches in its local layers,
# whole ones in its global layers), and the other StableHLO tests export plain dense
# models: 'dense' runs in the slow suite.
@pytest.mark.parametrize('family', [pytest.param('dense', marks=pytest.mark.slow),
                                    'dense_windowed',
                                    pytest.param('megabyte', marks=pytest.mark.slow)])
def test_stablehlo_generates_the_tokens_of_jaxarch_generate(tmp_path, family):
  cfg = _config(family.removesuffix('_windowed'))
  if family.endswith('_windowed'):  # its caches of the local layers: rings of 3 slots
    config_lib.apply_override(cfg, 'model.sliding_window=3')
    config_lib.apply_override(cfg, "model.attention_pattern=('local', 'global')")
  model = _model(cfg, seed=1)
  prompts = [[257, 100, 101, 102], [257, 50]]
  export_stablehlo(model, cfg, tmp_path / 'out', batch_size=2, max_len=20)
  want, _ = infer.generate(model, prompts, max_new_tokens=12, stop_ids=(257,), vocab_limit=258)
  exported = StableHLOModel(tmp_path / 'out')
  # By default half the positions hold the prompt: whole patches of MEGABYTE's 4 bytes.
  assert exported.spec['prompt_len'] == (8 if family == 'megabyte' else 10)
  assert exported.bos_id == exported.spec['bos_id'] == 257  # the eod: the default BOS
  got = exported.generate(prompts, max_new_tokens=12)
  assert got == want and len(got[0]) >= 1
  # The untrained model prefers some of the padding ids (258-383): never generated.
  free, _ = infer.generate(model, prompts, max_new_tokens=12, stop_ids=(257,))
  assert max(map(max, free)) >= 258 > max(map(max, got))
  # As many new tokens as the caches hold: the last is never written to them.
  most = 20 + 1 - len(prompts[0])
  want, _ = infer.generate(model, prompts, max_new_tokens=most, stop_ids=(), vocab_limit=258)
  assert exported.generate(prompts, max_new_tokens=most, stop_ids=()) == want
  with pytest.raises(ValueError, match=f'does not fit {most + 1} new tokens after a prompt of '
                     f'4: its 20 cache positions hold {most}; .* larger --max_len'):
    exported.generate(prompts, max_new_tokens=most + 1)
  # A prompt longer than the exported one, or more prompts than its batch: the flag to raise.
  longest = exported.spec['prompt_len']
  with pytest.raises(ValueError, match=f'does not fit a prompt of {longest + 1} tokens: it takes '
                     f'up to {longest}; ask for less or export the run again with a larger '
                     '--prompt_len'):
    exported.generate([[257] * (longest + 1), [257]], max_new_tokens=2)
  with pytest.raises(ValueError, match='does not fit 3 prompts: it takes 2 at once; .* '
                     'larger --batch_size'):
    exported.generate([[257]] * 3, max_new_tokens=2)
  with pytest.raises(ValueError, match='one or more token ids'):
    exported.generate([[257], []], max_new_tokens=4)


def test_stablehlo_stops_at_the_runs_stop_ids_by_default(tmp_path, monkeypatch, capsys):
  """The exports carry data.stop_ids (an instruct model's end of turn) after the eod:
  tokenizer.json and stablehlo.json list them, and run_stablehlo.py stops at each unless
  told otherwise; an export written before the list stops at its eod alone."""
  cfg = family_config('dense')
  model = _model(cfg, seed=1)
  prompts = [[257, 100, 101, 102], [257, 50]]
  free, _ = infer.generate(model, prompts, max_new_tokens=8, stop_ids=(257,), vocab_limit=258)
  assert len(free[0]) == 8 and 257 not in free[0][:3]
  stop = free[0][2]  # the model's third greedy token of the first prompt, as an end of turn
  with cfg.unlocked():
    cfg.data.stop_ids = (stop, 257)
  export_stablehlo(model, cfg, tmp_path / 'out', batch_size=2, max_len=16)
  read = lambda name: json.loads((tmp_path / 'out' / name).read_text())
  assert read('tokenizer.json')['stop_ids'] == read('stablehlo.json')['stop_ids'] == [257, stop]
  want, _ = infer.generate(model, prompts, max_new_tokens=8, stop_ids=(257, stop),
                           vocab_limit=258)
  assert want[0] == free[0][:free[0].index(stop) + 1]
  assert StableHLOModel(tmp_path / 'out').generate(prompts, max_new_tokens=8) == want
  for flags, row in (([], want[0]), (['--ignore_eod'], free[0])):  # no 257 in free[0]
    monkeypatch.setattr(sys, 'argv', ['run_stablehlo.py', str(tmp_path / 'out'),
                                      '257,100,101,102', '--max_new_tokens=8', *flags])
    capsys.readouterr()
    run_stablehlo.main()
    assert capsys.readouterr().out == ','.join(map(str, row)) + '\n'
  spec = read('stablehlo.json')
  del spec['stop_ids']  # as exports before the list were written
  (tmp_path / 'out' / 'stablehlo.json').write_text(json.dumps(spec))
  assert StableHLOModel(tmp_path / 'out').generate(prompts, max_new_tokens=8) == free


@pytest.mark.parametrize('family', ['dense', pytest.param('moe', marks=pytest.mark.slow),
                                    pytest.param('ultramem', marks=pytest.mark.slow)])
def test_stablehlo_exports_from_a_gpu_for_it_and_for_other_platforms(
    tmp_path, monkeypatch, family, traced_as_on_gpu):
  # On a GPU, `auto` traces cuDNN attention (bf16) and the Triton lookups and matmuls:
  # custom calls that jax.export refuses to serialize, and that lower for CUDA alone.
  del traced_as_on_gpu
  spec, overrides = FAMILIES[family]
  cfg = config_lib.load(spec, ['model.dtype=bfloat16', *overrides])
  model = _model(cfg)
  for platforms in (('cuda',), ('cpu',)):
    out = export_stablehlo(model, cfg, tmp_path / platforms[0], batch_size=1, prompt_len=8,
                           max_len=16, platforms=platforms)
    assert json.loads((out / 'stablehlo.json').read_text())['platforms'] == list(platforms)
  monkeypatch.undo()  # back on the CPU: the CPU program generates the model's tokens
  want, _ = infer.generate(_model(cfg), [[257, 72, 105]], max_new_tokens=6, stop_ids=(),
                           vocab_limit=258)
  got = StableHLOModel(tmp_path / 'cpu').generate([[257, 72, 105]], max_new_tokens=6,
                                                   stop_ids=())
  assert got == want


def test_stablehlo_loader_runs_without_jaxarch(tmp_path):
  cfg = family_config('dense')
  model = _model(cfg, seed=2)
  out = export_stablehlo(model, cfg, tmp_path / 'out', batch_size=1, prompt_len=8,
                         max_len=24)
  want, _ = infer.generate(model, [[257, 72, 105]], max_new_tokens=10, stop_ids=(),
                           vocab_limit=258)
  # A fresh interpreter in which importing jaxarch fails.
  code = ('import sys, runpy; sys.modules["jaxarch"] = None; '
          f'sys.argv = ["run", "{out}", "257,72,105", "--max_new_tokens=10", "--ignore_eod"]; '
          f'runpy.run_path("{out / "run_stablehlo.py"}", run_name="__main__")')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=tmp_path, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == [','.join(map(str, want[0]))]


def test_stablehlo_loader_refuses_bad_ids_lengths_and_folders_in_one_line(
    tmp_path, monkeypatch, capsys):
  cfg = family_config('dense')
  out = export_stablehlo(_model(cfg), cfg, tmp_path / 'out', batch_size=1, prompt_len=8,
                         max_len=24)
  # Ids past the tokenizer's vocabulary read garbage in the exported gather, silently.
  with pytest.raises(ValueError, match=r'token ids \[300\] are outside the vocabulary'):
    StableHLOModel(out).generate([[257, 300]], max_new_tokens=2)
  for argv, message in (([str(out), '257,x'], "'257,x' is not comma-separated token ids"),
                        ([str(out), '257,1', '--max_new_tokens=99'], 'larger --max_len'),
                        ([str(out), '257,1', '--max_new_tokens=0'], 'must be >= 1'),
                        ([str(tmp_path), '257'], 'has no stablehlo.json')):
    monkeypatch.setattr(sys, 'argv', ['run_stablehlo.py', *argv])
    with pytest.raises(SystemExit) as exited:
      run_stablehlo.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and 'Traceback' not in err, err


def _workdir(tmp_path, family):
  """A run's workdir: config.json and a checkpoint, as `jaxarch train` leaves them."""
  cfg = family_config(family, data=8)
  setup = make_setup(cfg, make_mesh(cfg))
  checkpointer = Checkpointer(tmp_path / 'run', async_save=False)
  checkpointer.save(1, init_state(cfg, setup))
  checkpointer.close()
  config_lib.save(cfg, tmp_path / 'run' / 'config.json')
  return tmp_path / 'run'


@pytest.fixture(scope='module')
def dense_run(tmp_path_factory):
  """`_workdir` of the dense model, made once (an initial state takes seconds to compile)
  for the tests that only read it; a test that changes it takes `_copy` of it."""
  return _workdir(tmp_path_factory.mktemp('dense'), 'dense')


def _copy(run, tmp_path):
  """tmp_path/run, a copy of `run` for a test that changes it (or lists tmp_path)."""
  return Path(shutil.copytree(run, tmp_path / 'run'))


def test_jaxarch_load_takes_a_run_or_its_export_directory(tmp_path, dense_run):
  """`jaxarch.load` is the from_pretrained of jaxarch: an export directory (no checkpoints)
  loads with the run's logits, instead of saying to train in it."""
  workdir = dense_run
  _, model = jaxarch.load(workdir)
  write_model(model, config_lib.load_json(workdir / 'config.json'), tmp_path / 'export')
  cfg, exported = jaxarch.load(tmp_path / 'export')
  assert cfg.model.family == 'dense'
  np.testing.assert_array_equal(np.asarray(logits(exported, TOKENS)),
                                np.asarray(logits(model, TOKENS)))
  with pytest.raises(FileNotFoundError, match='config.json not found'):
    jaxarch.load(tmp_path / 'missing')


def test_generate_reads_an_export_directory_and_eval_says_it_needs_the_run(tmp_path, capsys,
                                                                           dense_run):
  """`generate` takes an export's weights as `jaxarch.load` does (it said to train inside
  the export); a command that needs the run says so."""
  workdir = dense_run
  _, model = jaxarch.load(workdir)
  cfg = config_lib.load_json(workdir / 'config.json')
  write_model(model, cfg, tmp_path / 'export')
  generate = lambda path: cli.main(['generate', f'--workdir={path}', '--prompt=ab',
                                    '--max_new_tokens=6', '--ignore_eod'])
  assert generate(workdir) == 0
  from_run = capsys.readouterr().out
  assert generate(tmp_path / 'export') == 0
  assert capsys.readouterr().out == from_run
  assert cli.main(['eval', f'--workdir={tmp_path / "export"}']) == 2
  assert ('export, which `jaxarch generate` and `jaxarch.load` read; this command needs the '
          'run it was exported from') in capsys.readouterr().err
  config_lib.save(cfg, tmp_path / 'dense.json')
  assert cli.main(['train', f'--config={tmp_path / "dense.json"}',
                   f'--workdir={tmp_path / "export"}']) == 2  # it started a run in it
  assert 'is a `jaxarch export` directory, not a run' in capsys.readouterr().err
  assert not (tmp_path / 'export' / 'checkpoints').exists()


@pytest.mark.slow  # the command; the formats themselves are tested through the API above
@pytest.mark.parametrize('fmt', ['safetensors', 'stablehlo'])
def test_export_command_writes_the_run_s_latest_checkpoint(tmp_path, capsys, fmt):
  workdir = _workdir(tmp_path, 'ultramem')
  _, trained = load_model(workdir)
  (workdir / 'checkpoints' / '2').mkdir()  # a newer checkpoint that cannot be read
  out = tmp_path / fmt
  sizes = ['--max_len=32', '--prompt_len=16'] if fmt == 'stablehlo' else []
  code = cli.main(['export', f'--workdir={workdir}', f'--out={out}', f'--format={fmt}', *sizes])
  assert code == 0, capsys.readouterr().err
  _, model = load_safetensors(out)  # both formats write the weights
  np.testing.assert_array_equal(np.asarray(logits(model, TOKENS)),
                                np.asarray(logits(trained, TOKENS)))
  if fmt == 'safetensors':
    assert not (out / 'prefill.stablehlo').exists()
    assert oct((out / 'model.safetensors').stat().st_mode)[-3:] == oct(
        (out / 'config.json').stat().st_mode)[-3:]
    assert 'checkpoint 1)' in (out / 'README.md').read_text()
    assert cli.main(['export', f'--workdir={tmp_path / "nothing"}',
                     f'--out={tmp_path / "out2"}']) == 2
    assert 'config.json not found' in capsys.readouterr().err
    # A failed export leaves nothing behind that blocks the next try.
    assert cli.main(['export', f'--workdir={workdir}', f'--out={tmp_path / "out3"}',
                     '--format=stablehlo', '--platforms=gpu']) == 2
    assert "platform 'gpu' is not one of cpu, cuda" in capsys.readouterr().err
    assert not (tmp_path / 'out3').exists()
    assert not [p for p in tmp_path.iterdir() if 'partial' in p.name]
  else:
    want, _ = infer.generate(trained, [[257, 80, 81]], max_new_tokens=8, stop_ids=(),
                             vocab_limit=258)
    got = StableHLOModel(out).generate([[257, 80, 81]], max_new_tokens=8, stop_ids=())
    assert got == want


def test_export_checks_out_and_platforms_before_reading_the_checkpoint(tmp_path, capsys,
                                                                     monkeypatch):
  def never(*args, **kwargs):
    raise AssertionError('the checkpoint was read (minutes for a big model) before --out')
  monkeypatch.setattr(pretrained, 'load_checkpoint', never)
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'weights').write_text('')
  run = ['export', f'--workdir={tmp_path}/run']
  assert cli.main([*run, f'--out={tmp_path}/out']) == 2
  assert 'exists and is not empty' in capsys.readouterr().err
  assert cli.main([*run, f'--out={tmp_path}/out/weights']) == 2
  assert f'--out={tmp_path}/out/weights is a file' in capsys.readouterr().err
  # A file where a folder above --out should be: one line, not [Errno 17] after the read.
  assert cli.main([*run, f'--out={tmp_path}/out/weights/new']) == 2
  assert (f'export: --out={tmp_path}/out/weights/new is under {tmp_path}/out/weights, a file'
          in capsys.readouterr().err)
  assert cli.main([*run, f'--out={tmp_path}/new', '--format=stablehlo', '--platforms=gpu']) == 2
  assert "platform 'gpu' is not one of" in capsys.readouterr().err


def test_exported_config_is_the_run_s_own_when_exported_on_other_devices(tmp_path, capsys,
                                                                        dense_run):
  workdir = _copy(dense_run, tmp_path)
  saved = json.loads((workdir / 'config.json').read_text())
  saved['mesh']['dcn']['data'] = 2  # trained on two hosts of 8: 16 devices, not the 8 here
  (workdir / 'config.json').write_text(json.dumps(saved))
  assert cli.main(['export', f'--workdir={workdir}', f'--out={tmp_path / "out"}']) == 0, (
      capsys.readouterr().err)
  exported = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert exported['mesh'] == saved['mesh']  # was the mesh of the devices it was loaded on


def test_a_damaged_export_directory_is_one_line(tmp_path):
  cfg = family_config('dense')
  out = export_stablehlo(_model(cfg), cfg, tmp_path / 'out', batch_size=1, prompt_len=8,
                         max_len=24)
  weights = (out / 'model.safetensors').read_bytes()
  (out / 'model.safetensors').write_bytes(weights[:100])  # cut short
  with pytest.raises(ExportError, match='model.safetensors cannot be read'):
    load_safetensors(out)
  with pytest.raises(ValueError, match='is not a whole `jaxarch export'):
    StableHLOModel(out)
  (out / 'model.safetensors').write_bytes(weights)
  (out / 'decode.stablehlo').unlink()
  with pytest.raises(ValueError, match='is not a whole `jaxarch export'):
    StableHLOModel(out)


def test_unexportable_shapes_are_one_line(tmp_path):
  cfg = family_config('megabyte')
  # The sizes are checked before a weight is read: an abstract model will do (a real
  # MEGABYTE takes seconds of eager compilations to build).
  model = nnx.eval_shape(lambda: _model(cfg))
  with pytest.raises(ExportError, match='multiple of the patch size 4'):
    export_stablehlo(model, cfg, tmp_path / 'a', batch_size=1, prompt_len=6, max_len=20)
  with pytest.raises(ExportError, match='max_len=999 <= model.max_len'):
    export_stablehlo(model, cfg, tmp_path / 'b', batch_size=1, prompt_len=8, max_len=999)


def test_an_hf_tokenizer_json_keeps_its_file_and_the_readme_names_the_final_folder(tmp_path):
  from test_data import _gpt2_style_tokenizer  # pylint: disable=g-import-not-at-top
  (tmp_path / 'hf').mkdir()
  cfg = family_config('dense')
  with cfg.unlocked():
    cfg.data.tokenizer = _gpt2_style_tokenizer(tmp_path / 'hf' / 'tokenizer.json')
  write_model(_model(cfg), cfg, tmp_path / 'partial', final=tmp_path / 'out')
  loaded_cfg, _ = load_safetensors(tmp_path / 'partial')
  tokenizer = get_tokenizer(loaded_cfg.data.tokenizer)  # the copy, not the export's spec
  assert tokenizer.encode('hi')
  assert loaded_cfg.data.tokenizer.endswith('tokenizer/tokenizer.json')
  assert json.loads((tmp_path / 'partial' / 'tokenizer.json').read_text())['eod_id'] == 256
  readme = (tmp_path / 'partial' / 'README.md').read_text()
  assert f"load_safetensors('{tmp_path / 'out'}')" in readme and 'partial' not in readme


def test_export_options_of_the_other_format_or_out_of_range_are_one_line(tmp_path, capsys):
  run = ['export', f'--workdir={tmp_path}/run', f'--out={tmp_path}/out']
  assert cli.main([*run, '--max_len=99']) == 2  # safetensors has no max_len: not ignored
  assert 'jaxarch: export: --max_len is for --format=stablehlo only' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main([*run, '--format=stablehlo', '--max_len=-4'])
  assert 'argument --max_len: -4 must be >= 1' in capsys.readouterr().err


# Hugging Face's Llama format (--format=hf).

LAYER_TYPED = ('qwen2', 'qwen3', 'ministral', 'mistral', 'gemma3_text')


def _llama_logits(arrays: dict, config: dict, ids: list[int]) -> np.ndarray:
  """LlamaForCausalLM's forward as transformers computes it, in float64 numpy from the
  exported names and config.json: rotate_half rotary embeddings (with Llama 3.1's or linear
  scaling when rope_parameters name it), key/value heads repeated for their query heads, torch's
  [out, in] weights; Qwen2's q, k and v biases, when there are some, added before the
  rotation, and Qwen3's RMSNorm of each head's query and key (q_norm, k_norm) before it
  too. MoE blocks are Mixtral's or, under Qwen3-MoE's names, with its gates renormalised
  over the top k only when norm_topk_prob says so. A Gemma 3 (gemma3_text) is a Qwen3
  whose RMSNorms scale by 1 + weight, whose embeddings are scaled by sqrt(hidden_size),
  queries by query_pre_attn_scalar**-0.5, whose sliding layers turn at their own theta,
  whose attention and MLP outputs are normed again before they are added, with a tanh
  GELU gate."""
  w = lambda name: arrays[name].astype(np.float64)
  h, n, kv = (config[k] for k in ('head_dim', 'num_attention_heads', 'num_key_value_heads'))
  gemma = config['model_type'] == 'gemma3_text'
  norm = lambda x, weight: x / np.sqrt((x * x).mean(-1, keepdims=True)
                                       + config['rms_norm_eps']) * (gemma + weight)
  t = len(ids)

  def rotation(rope):  # rope_parameters -> x [t, heads, h] rotated
    freqs = 1 / rope['rope_theta'] ** (np.arange(0, h, 2) / h)
    if rope['rope_type'] == 'llama3':
      freqs = llama3_frequencies(freqs, rope['factor'], rope['low_freq_factor'],
                                 rope['high_freq_factor'],
                                 rope['original_max_position_embeddings'])
    if rope['rope_type'] == 'linear':  # positions over the factor
      freqs = freqs / rope['factor']
    angles = np.arange(t)[:, None] * freqs
    cos, sin = (f(np.concatenate([angles, angles], -1))[:, None] for f in (np.cos, np.sin))
    return lambda x: x * cos + np.concatenate([-x[..., h // 2:], x[..., :h // 2]], -1) * sin

  ropes = config['rope_parameters']
  global_rope, local_rope = ((rotation(ropes['full_attention']),
                              rotation(ropes['sliding_attention'])) if gemma else
                             (rotation({**ropes, 'rope_theta': config['rope_theta']}),) * 2)
  gelu = lambda u: 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
  act = gelu if gemma else lambda u: u / (1 + np.exp(-u))
  causal = np.tril(np.ones((t, t), bool))
  # A query sees the keys less than the window before it, in the layers that have one.
  kind, window = config['model_type'], config.get('sliding_window')
  if kind.startswith('qwen') and not config.get('use_sliding_window'):
    window = None
  # The layers config.json's layer_types names (a Qwen2's, a Qwen3's, a Ministral's; a
  # Mistral's too, which AutoConfig reads as a Ministral's), else every one.
  layer_types = config.get('layer_types') if kind in LAYER_TYPED else None
  near = np.subtract.outer(np.arange(t), np.arange(t)) < (window or t)
  x = w('model.embed_tokens.weight')[ids] * (np.sqrt(config['hidden_size']) if gemma else 1)
  for i in range(config['num_hidden_layers']):
    sliding = window and (layer_types is None or layer_types[i] == 'sliding_attention')
    visible = causal & near if sliding else causal
    rope = local_rope if sliding else global_rope
    at = lambda name: w(f'model.layers.{i}.{name}.weight')  # pylint: disable=cell-var-from-loop
    a = norm(x, at('input_layernorm'))
    # pylint: disable=cell-var-from-loop
    bias = lambda name: (w(f'model.layers.{i}.self_attn.{name}.bias')
                         if f'model.layers.{i}.self_attn.{name}.bias' in arrays else 0)
    proj = lambda name: a @ at(f'self_attn.{name}').T + bias(name)
    qk_norm = lambda x, name: (norm(x, at(f'self_attn.{name}'))
                               if f'model.layers.{i}.self_attn.{name}.weight' in arrays else x)
    q = rope(qk_norm(proj('q_proj').reshape(t, n, h), 'q_norm'))
    k = np.repeat(rope(qk_norm(proj('k_proj').reshape(t, kv, h), 'k_norm')), n // kv, axis=1)
    v = np.repeat(proj('v_proj').reshape(t, kv, h), n // kv, axis=1)
    scale = config.get('query_pre_attn_scalar', h) ** -0.5
    scores = np.where(visible, np.einsum('qnh,knh->nqk', q, k) * scale, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum('nqk,knh->qnh', probs, v).reshape(t, n * h) @ at('self_attn.o_proj').T
    if gemma:  # normed again before it is added, and the MLP's input normed by another
      out = norm(out, at('post_attention_layernorm'))
    x = x + out
    m = norm(x, at('pre_feedforward_layernorm' if gemma else 'post_attention_layernorm'))
    swiglu = lambda m, gate, up, down: (act(gate) * (m @ up.T)) @ down.T
    if f'model.layers.{i}.mlp.gate_proj.weight' in arrays:  # Llama
      out = swiglu(m, m @ at('mlp.gate_proj').T, at('mlp.up_proj'), at('mlp.down_proj'))
      x = x + (norm(out, at('post_feedforward_layernorm')) if gemma else out)
      continue
    # Mixtral: softmax over the experts, the top k renormalised, their SwiGLUs summed.
    qwen = config['model_type'] == 'qwen3_moe'
    module, (w_gate, w_up, w_down) = (('mlp', ('gate_proj', 'up_proj', 'down_proj')) if qwen
                                      else ('block_sparse_moe', ('w1', 'w3', 'w2')))
    renormalize = config['norm_topk_prob'] if qwen else True
    probs = np.exp(m @ at(f'{module}.gate').T)
    probs /= probs.sum(-1, keepdims=True)
    for row, token_probs in enumerate(probs):
      chosen = np.argsort(-token_probs)[:config['num_experts_per_tok']]
      total = token_probs[chosen].sum() if renormalize else 1.0
      for j in chosen:
        expert = lambda name: at(f'{module}.experts.{j}.{name}')  # pylint: disable=cell-var-from-loop
        x[row] += token_probs[j] / total * swiglu(
            m[row], m[row] @ expert(w_gate).T, expert(w_up), expert(w_down))
  head = w('lm_head.weight') if 'lm_head.weight' in arrays else w('model.embed_tokens.weight')
  return norm(x, w('model.norm.weight')) @ head.T


@pytest.mark.parametrize('family, tied', [('dense', False), ('dense', True), ('moe', False)])
def test_hf_export_is_a_llama_or_mixtral_with_the_models_logits(tmp_path, family, tied):
  """Checked once against transformers 5.25 itself (from_pretrained: logits within 3e-6,
  the same token ids from its tokenizer); here against a numpy Llama and Mixtral."""
  cfg = family_config(family)
  with cfg.unlocked():
    cfg.model.tie_embeddings = tied
  model = _model(cfg)
  write_hf(model, cfg, tmp_path / 'out')
  config = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert config['architectures'] == [{'dense': 'LlamaForCausalLM',
                                      'moe': 'MixtralForCausalLM'}[family]]
  assert config['tie_word_embeddings'] == tied
  assert (config['bos_token_id'], config['eos_token_id'], config['pad_token_id']) == (257, 257, 256)
  arrays = safetensors.numpy.load_file(tmp_path / 'out' / 'model.safetensors')
  assert ('lm_head.weight' in arrays) != tied
  np.testing.assert_allclose(_llama_logits(arrays, config, TOKENS[0]),
                             np.asarray(logits(model, TOKENS))[0], atol=2e-5, rtol=1e-5)


def test_hf_export_of_a_capacity_routed_moe_says_mixtral_routes_every_token(tmp_path, caplog):
  """A Mixtral drops no assignment: the export of a run that trains and evaluates with a
  capacity is the function `jaxarch generate` serves, not its eval's (0.35 off in logits,
  found by a user's round trip), and said nothing."""
  cfg = family_config('moe')
  with caplog.at_level(logging.WARNING):
    write_hf(_model(cfg), cfg, tmp_path / 'dropless')
  assert 'capacity' not in caplog.text
  with cfg.unlocked():
    cfg.model.moe.capacity_factor = 1.25
  with caplog.at_level(logging.WARNING):
    write_hf(_model(cfg), cfg, tmp_path / 'out')
  assert ('export: the run routes with model.moe.capacity_factor=1.25 in training and eval, '
          "dropping assignments past an expert's capacity; a MixtralForCausalLM routes every "
          'token to its experts, as `jaxarch generate` does') in caplog.text


def test_hf_export_of_the_byte_tokenizer_reads_text_as_jaxarch_does(tmp_path):
  hf = pytest.importorskip('tokenizers')
  cfg = family_config('dense')
  write_hf(_model(cfg), cfg, tmp_path / 'out')
  tokenizer = hf.Tokenizer.from_file(str(tmp_path / 'out' / 'tokenizer.json'))
  tokenizer.encode_special_tokens = True  # what split_special_tokens asks of transformers
  text = 'déf main():\n\t\x00 ∑ <pad>'  # every byte its own id, specials' text as text
  ids = tokenizer.encode(text).ids
  assert ids == [257, *text.encode()]  # the BOS it trained with, then the bytes
  assert tokenizer.decode(ids) == text  # the BOS skipped
  config = json.loads((tmp_path / 'out' / 'tokenizer_config.json').read_text())
  assert (config['bos_token'], config['eos_token'], config['pad_token']) == (
      '<|endoftext|>', '<|endoftext|>', '<pad>')
  assert config['split_special_tokens']
  # transformers' generate draws none of the vocabulary's padding rows, as jaxarch's.
  generation = json.loads((tmp_path / 'out' / 'generation_config.json').read_text())
  assert generation['suppress_tokens'] == list(range(tokenizer.get_vocab_size(),
                                                     cfg.model.vocab_size))
  # jaxarch reads it as a tokenizer.json too: the same ids, pad and end of document.
  again = get_tokenizer(str(tmp_path / 'out' / 'tokenizer.json'))
  assert (again.encode(text), again.eod_id, again.pad_id) == (list(text.encode()), 257, 256)
  assert again.byte_lengths[:256].tolist() == [1] * 256


# Llama's SentencePiece settings (identity rule, spaces kept, byte fallback) and the
# defaults (nmt_nfkc, extra spaces removed, unknown characters as <unk>).
LLAMA_BPE = dict(model_type='bpe', normalization_rule_name='identity',
                 remove_extra_whitespaces=False)
DEFAULT_UNIGRAM = dict(model_type='unigram', byte_fallback=False)


@pytest.mark.parametrize('options', [LLAMA_BPE, DEFAULT_UNIGRAM], ids=['bpe', 'unigram'])
def test_hf_export_of_a_sentencepiece_model_reads_text_as_jaxarch_does(tmp_path, options,
                                                                      capsys):
  """transformers' LlamaTokenizer read the copied .model without its normaliser: spaces,
  tabs and NFKC text got other ids. Checked by hand with transformers 5.25's AutoTokenizer
  too."""
  from test_data import _sentencepiece_model  # pylint: disable=g-import-not-at-top
  hf = pytest.importorskip('tokenizers')
  source = Path(hf_tokenizer.__file__).read_text()
  cfg = family_config('dense')
  with cfg.unlocked():
    cfg.data.tokenizer = _sentencepiece_model(
        tmp_path / 'sp.model', lines=source.splitlines()[:300], vocab_size=400, **options)
    cfg.model.vocab_size = 512  # room for the tokenizer's 400 ids
  write_hf(_model(cfg), cfg, tmp_path / 'out')
  assert (tmp_path / 'out' / 'tokenizer.model').read_bytes() == (
      Path(cfg.data.tokenizer).read_bytes())  # beside it, for llama.cpp's converter
  ours = get_tokenizer(cfg.data.tokenizer)
  tokenizer = hf.Tokenizer.from_file(str(tmp_path / 'out' / 'tokenizer.json'))
  tokenizer.encode_special_tokens = True  # what split_special_tokens asks of transformers
  texts = ['', ' ', '  two  leading, three   inside, trailing  ', 'a\r\nb\r',
           '\tdef f( x ):\n\n\treturn x\n', 'ﬁne ＡＢＣ ｆｕｌｌ ① ㍿', 'emoji 😀 and ☃', '😀',
           'x = "</s>" + "<unk>" + "<pad>" + "<0x41>"', '▁a ▁', source[4000:8000]]
  for text in texts:
    ids = ours.encode(text)
    assert tokenizer.encode(text).ids == [ours.eod_id, *ids], text  # the BOS, then jaxarch's
    assert tokenizer.decode([ours.eod_id, *ids]) == ours.decode(ids), text
    if options is LLAMA_BPE and '▁' not in text:  # every character kept, unknown as bytes
      assert ours.decode(ids) == text
  # Imported back, the run reads the SentencePiece model, not the conversion of it.
  capsys.readouterr()
  assert cli.main(['import', f'--hf={tmp_path / "out"}', f'--workdir={tmp_path / "run"}']) == 0
  # Its data is the preset's: said, so a continued run does not train on it unawares.
  assert ("which reads data.source='default' (the Python standard library; import again "
          'with --config.data.source=') in capsys.readouterr().err
  imported = config_lib.load_json(tmp_path / 'run' / 'config.json').data.tokenizer
  assert imported == str(tmp_path / 'run' / 'tokenizer' / 'tokenizer.model')


def test_hf_export_of_a_sentencepiece_model_no_tokenizer_json_reads_alike(tmp_path, caplog):
  """A CHAR model goes as tokenizer.model for LlamaTokenizer, with a warning saying why: the
  weights export all the same."""
  from test_data import _sentencepiece_model  # pylint: disable=g-import-not-at-top
  cfg = family_config('dense')
  with cfg.unlocked():
    cfg.data.tokenizer = _sentencepiece_model(tmp_path / 'sp.model', model_type='char',
                                              vocab_size=40, byte_fallback=False)
  with caplog.at_level('WARNING', logger='jaxarch.export.hf_tokenizer'):
    write_hf(_model(cfg), cfg, tmp_path / 'out')
  assert 'goes as tokenizer.model alone' in caplog.text
  assert 'since its model_type is CHAR' in caplog.text
  assert not (tmp_path / 'out' / 'tokenizer.json').exists()
  assert (tmp_path / 'out' / 'tokenizer.model').is_file()
  settings = json.loads((tmp_path / 'out' / 'tokenizer_config.json').read_text())
  assert settings['tokenizer_class'] == 'LlamaTokenizer'


@pytest.mark.parametrize('family, overrides, why', [
    ('ultramem', [], 'it is an UltraMem model, whose memory layers transformers has no '
     'layer for'),
    ('moe', ["model.block_pattern=('dense', 'moe')"], 'mix dense and moe layers'),
    ('moe', ['model.moe.num_shared_experts=1'], 'a Mixtral has no shared experts'),
    ('moe', ['model.moe.renormalize=False'], 'renormalised over the top k'),
    ('dense', ['model.qkv_bias=True', 'model.qk_norm=True'], 'a Qwen3 no q/k/v biases'),
    ('moe', ['model.moe.gate=sigmoid'], "a Mixtral's gates are a softmax"),
    ('moe', ['model.moe.bias_update_rate=0.001'], 'no router bias'),
    ('moe', ['model.qkv_bias=True'], 'a Mixtral has no attention biases'),
])
def test_hf_export_refuses_what_llama_and_mixtral_are_not(tmp_path, family, overrides, why):
  cfg = family_config(family)
  for override in overrides:
    config_lib.apply_override(cfg, override)
  with pytest.raises(ExportError, match=f'^export: --format=hf cannot write this run: .*{why}'
                     r'.*; use --format=safetensors or stablehlo\. \(--format=hf writes dense '
                     'models as LlamaForCausalLM'):
    write_hf(_model(config_lib.validate(cfg)), cfg, tmp_path / 'out')


def test_hf_export_of_a_bita_model_names_its_base_run(tmp_path):
  cfg = _bita_config()  # on a dense base: a Llama
  with pytest.raises(ExportError, match='cannot write this run: it is a BiTA model, whose '
                     r'prompt and mask tokens .*; use --format=safetensors or stablehlo, or '
                     r'export its base run \(model.bita.base_workdir\) with --format=hf\. \('):
    write_hf(_model(cfg), cfg, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_an_export_interrupted_midway_leaves_no_out_directory(tmp_path, capsys, monkeypatch,
                                                              dense_run):
  workdir = dense_run
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(weights, 'save_safetensors', interrupted)  # once config.json is read
  assert cli.main(['export', f'--workdir={workdir}', f'--out={tmp_path / "out"}']) == 130
  assert 'interrupted' in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()
  assert not [p for p in tmp_path.iterdir() if 'partial' in p.name]


def test_a_retry_removes_what_a_killed_export_left_and_nothing_else(tmp_path, caplog):
  ended = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                         capture_output=True, text=True, check=True)
  host = socket.gethostname()
  left = {name: tmp_path / f'.out.partial-{name}-abc' for name in (
      f'{host}-{ended.stdout.strip()}',  # killed: its process is gone
      f'{host}-{os.getppid()}',  # still writing
      f'other-host-{ended.stdout.strip()}')}  # cannot be told from here
  for path in left.values():
    (path / 'model.safetensors').parent.mkdir()
    (path / 'model.safetensors').write_bytes(b'half')
  cfg = family_config('dense')
  with all_or_nothing(tmp_path / 'out') as partial:
    write_model(_model(cfg), cfg, partial)
  assert load_safetensors(tmp_path / 'out')[0].model.to_dict() == cfg.model.to_dict()
  assert [p.exists() for p in left.values()] == [False, True, True]
  assert 'left by an earlier try that was killed' in caplog.text


def test_an_export_or_import_onto_a_full_disk_is_one_line_and_can_be_retried(
    tmp_path, capsys, monkeypatch, dense_run):
  # The export's writes fail with an OSError, TensorStore says "[os_error_code='28']" inside
  # Orbax's errors: both were tracebacks, and an import's named its temporary directory.
  workdir = _copy(dense_run, tmp_path)
  def full(arrays, path, metadata):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
  for module in (weights, hf_export):  # under both formats' writers
    monkeypatch.setattr(module, 'save_safetensors', full)
  for fmt in ('safetensors', 'hf'):
    out = tmp_path / fmt
    assert cli.main(['export', f'--workdir={workdir}', f'--out={out}', f'--format={fmt}']) == 2
    err = capsys.readouterr().err
    assert err == (f'jaxarch: export: could not write {out} (no space left on device); '
                   'nothing was left there: free space (or fix permissions) and rerun\n')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['run']
  monkeypatch.undo()  # space freed
  assert cli.main(['export', f'--workdir={workdir}', f'--out={tmp_path / "hf"}',
                   '--format=hf']) == 0
  capsys.readouterr()

  def full_checkpoint(*args, **kwargs):
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database: '
                     "No space left on device [os_error_code='28']")
  monkeypatch.setattr(ocp.CheckpointManager, 'save', full_checkpoint)
  run = tmp_path / 'imported'
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={run}']) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'jaxarch: import: could not write {run} (no space left on device); '
                        'nothing was left there') and err.count('\n') == 1
  assert not run.exists() and not [p for p in tmp_path.iterdir() if 'partial' in p.name]


def test_a_distill_onto_a_full_disk_is_one_line_and_can_be_retried(tmp_path, capsys,
                                                                  monkeypatch, dense_run):
  (tmp_path / 'corpus').mkdir()
  for i in range(8):
    (tmp_path / 'corpus' / f'{i}.txt').write_text(f'document {i} ' * 20)
  cfg = family_config('dense', data=8)
  with cfg.unlocked():
    cfg.data.source = f'files:{tmp_path}/corpus/*.txt'
    cfg.data.data_dir = str(tmp_path / 'data')
    cfg.data.validation_fraction = 0.25
  shutil.copytree(dense_run / CHECKPOINTS, tmp_path / 'run' / CHECKPOINTS)  # its model's
  config_lib.save(cfg, tmp_path / 'run' / 'config.json')
  # array_record says so in a RuntimeError's text alone: a traceback from deep inside TFDS.
  write = tfds.core.writer.ExampleWriter.write
  def full(self, path, examples):
    raise RuntimeError(f'write() failed: No space left on device; writing {path}')
  out = tmp_path / 'distilled'
  args = ['distill', f'--workdir={tmp_path / "run"}', f'--out={out}', '--num_prompts=2',
          '--validation_prompts=1', '--prompt_len=4', '--max_new_tokens=2']
  cli.main(['eval', f'--workdir={tmp_path / "run"}'])  # the corpus prepared: room for it
  capsys.readouterr()
  monkeypatch.setattr(tfds.core.writer.ExampleWriter, 'write', full)
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert f'jaxarch: distill: could not write {out} (no space left on device)' in err
  assert 'Traceback' not in err
  monkeypatch.setattr(tfds.core.writer.ExampleWriter, 'write', write)  # space freed
  # The disk fills again after the sequences, on their summary: neither stays.
  write_text = Path.write_text
  def full_for_summary(path, *a, **kw):
    if path.name.startswith('distill.json'):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write_text(path, *a, **kw)
  monkeypatch.setattr(Path, 'write_text', full_for_summary)
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert f'jaxarch: distill: could not write {out} (no space left on device)' in err
  assert 'Traceback' not in err and not (out / 'distill.json').exists()
  monkeypatch.setattr(Path, 'write_text', write_text)
  assert cli.main(args) == 0
  assert json.loads((out / 'distill.json').read_text())['sequences'] == {
      'train': 2, 'validation': 1}
  # stdout: the summary alone; TFDS's 'Downloading and preparing' said as what it is.
  said = capsys.readouterr()
  assert json.loads(said.out)['sequences'] == {'train': 2, 'validation': 1}
  assert 'jaxarch: writing the distilled sequences into' in said.err
  assert 'Downloading' not in said.out + said.err


def test_hf_export_command_refuses_before_it_writes(tmp_path, capsys, dense_run,
                                                    monkeypatch):
  """A run that transformers has no model for is refused in one line and leaves no --out,
  before its weights are read (minutes for a big one): here the dense run with one of
  Gemma 3's keys (which changes no weight) in its config.json; a run of another family is
  refused by the same check of its config."""
  workdir = _copy(dense_run, tmp_path)
  saved = json.loads((workdir / 'config.json').read_text())
  saved['model']['embed_scale'] = True
  (workdir / 'config.json').write_text(json.dumps(saved))
  monkeypatch.setattr(pretrained, 'load_checkpoint', lambda *a, **k: pytest.fail('read'))
  assert cli.main(['export', f'--workdir={workdir}', f'--out={tmp_path / "out"}',
                   '--format=hf']) == 2
  assert "a Gemma 3 has all of Gemma 3's keys, and this model lacks" in (
      capsys.readouterr().err)
  assert not (tmp_path / 'out').exists()
  with pytest.raises(ExportError, match='cannot write this run: it is a MEGABYTE model'):
    hf_export.check_exportable(family_config('megabyte'))


def test_an_export_directory_gets_the_permissions_of_the_umask(tmp_path):
  umask = os.umask(0o022)
  try:
    with all_or_nothing(tmp_path / 'out') as partial:
      (partial / 'file').write_text('x')
  finally:
    os.umask(umask)
  assert oct((tmp_path / 'out').stat().st_mode)[-3:] == '755'  # mkdtemp made it 700


@pytest.mark.parametrize('family, tied', [('dense', True), ('moe', False)])
def test_an_hf_checkpoint_imports_as_a_run_with_its_logits(tmp_path, family, tied):
  """Exported as Llama or Mixtral (checked against numpy above and transformers once),
  imported back: the same logits from `jaxarch.load`. Checked once against checkpoints
  transformers 5.25 wrote itself (a tied Llama and a Mixtral, rope_theta 500000):
  logits within 2.4e-7, and exported again, transformers' logits exactly."""
  cfg = family_config(family)
  with cfg.unlocked():
    cfg.model.tie_embeddings = tied
    cfg.model.rope_theta = 500_000.0
  model = _model(cfg)
  write_hf(model, cfg, tmp_path / 'hf')
  if family == 'moe':  # Mixtral configs may name a window: one of all positions is none
    config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    (tmp_path / 'hf' / 'config.json').write_text(json.dumps(
        {**config, 'sliding_window': config['max_position_embeddings']}))
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}',
                   '--config.train.steps=7', '--config.train.warmup_steps=1']) == 0
  imported_cfg, imported = load_model(tmp_path / 'run')
  for key in ('d_model', 'n_layers', 'n_heads', 'n_kv_heads', 'vocab_size',
              'tie_embeddings', 'rope_theta', 'norm_eps', 'family'):
    assert imported_cfg.model[key] == cfg.model[key], key
  if family == 'moe':  # a Mixtral has no dense feed-forward: d_ff is unused
    for key in ('num_experts', 'top_k', 'expert_d_ff'):
      assert imported_cfg.model.moe[key] == cfg.model.moe[key], key
  else:
    assert imported_cfg.model.d_ff == cfg.model.d_ff
  assert imported_cfg.train.steps == 7 and imported_cfg.model.dtype == 'float32'
  np.testing.assert_array_equal(np.asarray(logits(imported, TOKENS)),
                                np.asarray(logits(model, TOKENS)))
  tokenizer = get_tokenizer(imported_cfg.data.tokenizer)  # the export's, copied into the run
  assert (tokenizer.eod_id, tokenizer.encode('hi')) == (257, [104, 105])


def test_a_sharded_hf_checkpoint_imports_with_its_logits_and_a_missing_shard_is_named(
    tmp_path, capsys, dense_run):
  """Large checkpoints come as shards that model.safetensors.index.json lists; one that a
  download left out is named as such. A jaxarch run or export given for one is said."""
  cfg = family_config('dense')
  model = _model(cfg)
  write_hf(model, cfg, tmp_path / 'hf')
  arrays = safetensors.numpy.load_file(tmp_path / 'hf' / 'model.safetensors')
  (tmp_path / 'hf' / 'model.safetensors').unlink()
  names = sorted(arrays)
  shards = {f'model-0000{i + 1}-of-00002.safetensors': names[i::2] for i in range(2)}
  for shard, keys in shards.items():
    safetensors.numpy.save_file({k: arrays[k] for k in keys}, tmp_path / 'hf' / shard,
                                metadata={'format': 'pt'})
  (tmp_path / 'hf' / 'model.safetensors.index.json').write_text(json.dumps(
      {'metadata': {}, 'weight_map': {k: shard for shard, keys in shards.items()
                                      for k in keys}}))
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']) == 0
  np.testing.assert_array_equal(np.asarray(logits(load_model(tmp_path / 'run')[1], TOKENS)),
                                np.asarray(logits(model, TOKENS)))
  (tmp_path / 'hf' / 'model-00002-of-00002.safetensors').unlink()
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "a"}']) == 2
  assert ('model-00002-of-00002.safetensors, a shard that model.safetensors.index.json '
          'lists, is missing (a download cut short?)') in capsys.readouterr().err
  assert cli.main(['import', f'--hf={dense_run}', f'--workdir={tmp_path / "b"}']) == 2
  assert (f'{dense_run} is a jaxarch run, not a Hugging Face checkpoint: every command reads '
          f'it as it is (a new run starts from its model with --config.train.init_from='
          f'{dense_run})') in capsys.readouterr().err
  _, trained = jaxarch.load(dense_run)
  write_model(trained, config_lib.load_json(dense_run / 'config.json'), tmp_path / 'export')
  assert cli.main(['import', f'--hf={tmp_path / "export"}', f'--workdir={tmp_path / "c"}']) == 2
  assert 'export is a jaxarch export, not a Hugging Face checkpoint' in capsys.readouterr().err
  assert not any((tmp_path / name).exists() for name in 'abc')


@pytest.mark.parametrize('family, change, said', [
    ('dense', {'intermediate_size': 416}, "model.layers.0.mlp.gate_proj.weight [384, 128] "
     'does not fit blocks.0.mlp.gate [128, 416]'),
    ('dense', {'num_attention_heads': 8}, 'model.layers.0.self_attn.q_proj.weight [128, 128] '
     'does not fit blocks.0.attn.q_proj [128, 8, 32]'),
    # 128 does not split into heads of 32 three at a time: was numpy's reshape error.
    ('dense', {'num_attention_heads': 3, 'num_key_value_heads': 3},
     'model.layers.0.self_attn.q_proj.weight [128, 128] does not split into 3 heads of 32'),
    ('moe', {'intermediate_size': 40}, "8 arrays, as model.layers.0.block_sparse_moe.experts.6"
     ".w1.weight [192, 128] and model.layers.0.block_sparse_moe.experts.7.w1.weight "
     "[192, 128], do not fit blocks.0.mlp.w_gate [8, 128, 40]")],
    ids=['d_ff', 'heads', 'heads_that_do_not_split', 'experts'])
def test_an_import_whose_config_json_is_not_its_weights_names_the_checkpoint_s_arrays(
    tmp_path, capsys, family, change, said):
  """Said in jaxarch's names and layouts ('blocks.0.attn.q_proj is [64, 8, 32] in the
  checkpoint': a shape no file held), or a numpy error from inside the import."""
  cfg = family_config(family)
  write_hf(_model(cfg), cfg, tmp_path / 'hf')
  hf_config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps({**hf_config, **change}))
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and f"import: the checkpoint's {said} of the model its " \
      'config.json describes: is config.json the one saved with these weights?' in err, err
  assert not (tmp_path / 'run').exists()


def test_an_import_reads_one_tensor_at_a_time_into_its_shards(tmp_path, monkeypatch):
  """Import read the whole checkpoint into host memory, made it float32 and laid it out in
  copies: twice a model's float32 weights and more, before any went to the devices. Each
  tensor is now read, laid out and put in its shards in turn."""
  cfg = family_config('dense')
  model = _model(cfg)
  write_hf(model, cfg, tmp_path / 'hf')
  total = sum(a.nbytes for a in flat_arrays(model).values())
  seen = {}
  def spied(cfg, setup, given=None):  # once every weight is read (and placed)
    seen.update(given=given, peak=tracemalloc.get_traced_memory()[1])
    return init_state(cfg, setup, given=given)
  monkeypatch.setattr(state_lib, 'init_state', spied)
  tracemalloc.start()
  try:
    hf_import.import_hf(tmp_path / 'hf', tmp_path / 'run', ['mesh.ici.fsdp=8'])
  finally:
    tracemalloc.stop()
  assert seen['peak'] < total / 2
  assert all(isinstance(a, jax.Array) and len(a.sharding.device_set) == 8
             for a in seen['given'].values())


def test_an_imported_run_works_moved_or_copied_with_its_original_deleted(tmp_path, capsys):
  """Its config.json names its copy of the tokenizer relative to the run, which was its
  path at import: every command stopped on the run moved ('data.tokenizer=...: no such
  file'). Each command that reads a run on it moved; on a copy of it, the reads by path
  (`jaxarch.load`, generate and eval: each command finds the tokenizer as they do)."""
  from test_data import _write_corpus  # pylint: disable=g-import-not-at-top
  cfg = family_config('dense')
  model = _model(cfg)
  write_hf(model, cfg, tmp_path / 'hf')
  _write_corpus(tmp_path / 'corpus', num_docs=8)
  run = tmp_path / 'run'
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={run}',
                   f'--config.data.source=files:{tmp_path}/corpus/*.txt',
                   '--config.data.validation_fraction=0.25', '--config.data.seq_len=16',
                   f'--config.data.data_dir={tmp_path / "data"}', '--config.train.batch_size=8',
                   '--config.log.eval_batches=1']) == 0
  said = capsys.readouterr().err
  assert f"`jaxarch train --workdir={run}`" in said and 'standard library' not in said
  assert f"which reads data.source='files:{tmp_path}/corpus/*.txt'" in said
  shutil.copytree(run, tmp_path / 'copied')
  run.rename(tmp_path / 'moved')  # gone for both
  for name in ('moved', 'copied'):
    workdir = tmp_path / name
    loaded_cfg, loaded = jaxarch.load(workdir)
    assert loaded_cfg.data.tokenizer == str(workdir / 'tokenizer' / 'tokenizer.json')
    np.testing.assert_array_equal(np.asarray(logits(loaded, TOKENS)),
                                  np.asarray(logits(model, TOKENS)))
    capsys.readouterr()
    for command in (['generate', '--prompt=hi', '--max_new_tokens=2'], ['eval']):
      assert cli.main([command[0], f'--workdir={workdir}', *command[1:]]) == 0, (
          command, capsys.readouterr().err)
  workdir = tmp_path / 'moved'
  for command in (['export', f'--out={tmp_path}/weights'],
                  ['export', f'--out={tmp_path}/hf-export', '--format=hf'],
                  ['distill', f'--out={tmp_path}/distilled', '--num_prompts=2',
                   '--validation_prompts=1', '--prompt_len=4', '--max_new_tokens=2']):
    assert cli.main([command[0], f'--workdir={workdir}', *command[1:]]) == 0, (
        command, capsys.readouterr().err)
  _, exported = load_safetensors(tmp_path / 'weights')
  np.testing.assert_array_equal(np.asarray(logits(exported, TOKENS)),
                                np.asarray(logits(model, TOKENS)))
  assert (tmp_path / 'hf-export' / 'tokenizer.json').is_file()
  # BiTA over the moved base: its tokenizer is the base's copy, named by its path.
  bita = config_lib.load('configs/bita.py:tiny', [
      f'model.bita.base_workdir={workdir}', f'data.source=distilled:{tmp_path}/distilled'])
  assert bita.data.tokenizer == str(workdir / 'tokenizer' / 'tokenizer.json')
  config_lib.save(bita, tmp_path / 'bita' / 'config.json')
  assert config_lib.load_json(tmp_path / 'bita' / 'config.json').to_dict() == bita.to_dict()
  for name in ('moved', 'copied'):
    assert json.loads((tmp_path / name / 'config.json').read_text())['data']['tokenizer'] == (
        'tokenizer/tokenizer.json')


def test_a_mistral_imports_as_a_llama_with_its_window_unless_the_window_masks_nothing(
    tmp_path):
  """MistralForCausalLM has Llama's names and layout; its config.json may give head_dim
  (Mistral-Nemo: 128, not 5120 / 32) and a sliding_window. A window of at least
  max_position_embeddings (the run's model.max_len) masks nothing the run reaches; a
  narrower one is model.sliding_window. Checked once against transformers 5.25's own tiny
  Mistrals (window null or 256 of 256 positions, head_dim 32 of 64 / 4 heads; float32 and
  bfloat16 safetensors): logits within 5e-6; one with a window of 8: logits on 60
  positions within 4.2e-5 (of logits up to 10.4), its 40 greedy tokens, re-export exact."""
  cfg = family_config('dense')
  with cfg.unlocked():
    cfg.model.head_dim = 48  # d_model=128 / 4 heads would be 32
    cfg.model.rope_theta = 1e6
  model = _model(config_lib.validate(cfg))
  write_hf(model, cfg, tmp_path / 'hf')
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  config.update(model_type='mistral', architectures=['MistralForCausalLM'])
  max_len = config['max_position_embeddings']
  for window in (None, max_len):
    (tmp_path / 'hf' / 'config.json').write_text(json.dumps({**config, 'sliding_window': window}))
    run = tmp_path / f'window{window}'
    assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={run}']) == 0
    imported_cfg, imported = load_model(run)
    assert (imported_cfg.model.head_dim, imported_cfg.model.max_len) == (48, max_len)
    np.testing.assert_array_equal(np.asarray(logits(imported, TOKENS)),
                                  np.asarray(logits(model, TOKENS)))
    assert imported_cfg.model.sliding_window is None
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps({**config, 'sliding_window': 3}))
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "narrow"}']) == 0
  imported_cfg, imported = load_model(tmp_path / 'narrow')
  assert (imported_cfg.model.sliding_window, imported_cfg.model.attention_pattern) == (
      3, ('local',))
  arrays = safetensors.numpy.load_file(tmp_path / 'hf' / 'model.safetensors')
  got = np.asarray(logits(imported, TOKENS))[0]
  np.testing.assert_allclose(_llama_logits(arrays, {**config, 'sliding_window': 3},
                                           TOKENS[0]), got, atol=2e-5, rtol=1e-5)
  assert np.abs(got - np.asarray(logits(model, TOKENS))[0]).max() > 0.1  # it masks


@pytest.mark.parametrize('family, overrides, kind, layer_types', [
    ('dense', [], 'mistral', None), ('moe', [], 'mixtral', None),
    ('dense', ['model.qk_norm=True', "model.attention_pattern=('global', 'local', 'local', "
               "'local')"], 'qwen3', 'FSSS'),
    ('dense', ['model.qk_norm=True', "model.attention_pattern=('local', 'local', 'global')"],
     'qwen3', 'SSFS'),
    ('dense', ['model.qkv_bias=True', "model.attention_pattern=('local', 'global')"], 'qwen2',
     'SFSF'),
    ('dense', ["model.attention_pattern=('global', 'local')"], 'ministral', 'FSFS')])
def test_a_sliding_window_exports_as_a_mistral_mixtral_or_qwen_and_imports_back(
    tmp_path, family, overrides, kind, layer_types):
  """A window in some layers only is config.json's layer_types (S: sliding_attention, F:
  full_attention), which transformers 5 reads for a Qwen2, a Qwen3 and a Ministral.
  Checked once with transformers 5.25: a tiny windowed Mistral and a Qwen3 with windows
  from its second layer on (max_window_layers 1), imported and exported again, give its
  logits exactly; so do Qwen3s, a Qwen2 and a Ministral with windows in the layers of
  ('local', 'local', 'global') or ('local', 'global') (README)."""
  cfg = family_config(family)
  for override in ['model.sliding_window=3', *overrides]:
    config_lib.apply_override(cfg, override)
  model = _model(config_lib.validate(cfg))
  write_hf(model, cfg, tmp_path / 'hf')
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert (config['model_type'], config['sliding_window']) == (kind, 3)
  names = {'S': 'sliding_attention', 'F': 'full_attention'}
  assert config.get('layer_types') == (layer_types and [names[c] for c in layer_types])
  if kind.startswith('qwen'):
    assert config['use_sliding_window']
  if kind.startswith('qwen') and layer_types == ''.join(sorted(layer_types)):  # a suffix
    assert config['max_window_layers'] == layer_types.count('F')  # as transformers 4 reads
  arrays = safetensors.numpy.load_file(tmp_path / 'hf' / 'model.safetensors')
  want = np.asarray(logits(model, TOKENS))[0]
  np.testing.assert_allclose(_llama_logits(arrays, config, TOKENS[0]), want, atol=2e-5,
                             rtol=1e-5)
  off = lambda **change: np.abs(_llama_logits(arrays, {**config, **change}, TOKENS[0])
                                - want).max()
  assert off(sliding_window=None) > 0.1  # the window masks
  if layer_types:
    assert off(layer_types=None) > 0.1  # in the layers layer_types names only
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']) == 0
  imported_cfg, imported = load_model(tmp_path / 'run')
  assert imported_cfg.model.sliding_window == 3
  assert imported_cfg.model.attention_pattern == tuple(cfg.model.attention_pattern)
  np.testing.assert_array_equal(np.asarray(logits(imported, TOKENS)), want[None])
  write_hf(imported, imported_cfg, tmp_path / 'again')
  again = json.loads((tmp_path / 'again' / 'config.json').read_text())
  assert (again['model_type'], again.get('layer_types')) == (kind, config.get('layer_types'))


def test_windows_of_some_moe_layers_only_are_refused_in_one_line(tmp_path):
  """A Mixtral's and a Qwen3-MoE's attention give every layer the window."""
  cfg = family_config('dense')  # a window in no block is none: a Llama
  for override in ['model.sliding_window=3', "model.attention_pattern=('global',)"]:
    config_lib.apply_override(cfg, override)
  write_hf(_model(config_lib.validate(cfg)), cfg, tmp_path / 'llama')
  config = json.loads((tmp_path / 'llama' / 'config.json').read_text())
  assert config['model_type'] == 'llama' and 'sliding_window' not in config
  for qk_norm in (False, True):
    cfg = family_config('moe')
    for override in ['model.sliding_window=3', "model.attention_pattern=('local', 'global')",
                     f'model.qk_norm={qk_norm}']:
      config_lib.apply_override(cfg, override)
    with pytest.raises(ExportError, match=r"leaves blocks without the sliding window, which "
                       r"a Mixtral and a Qwen3-MoE give every layer; use") as e:
      write_hf(_model(config_lib.validate(cfg)), cfg, tmp_path / 'out')
    assert '\n' not in str(e.value)


def test_an_hf_checkpoint_of_another_kind_or_a_used_workdir_is_one_line(tmp_path, capsys):
  cfg = family_config('dense')
  write_hf(_model(cfg), cfg, tmp_path / 'hf')
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  (tmp_path / 'used').mkdir()
  (tmp_path / 'used' / 'file').write_text('x')
  for change, message in [
      ({'model_type': 'gemma2'}, "model_type='gemma2' (jaxarch reads 'llama', 'mistral', "
                                 "'ministral', 'mixtral', 'qwen2', 'qwen3', 'qwen3_moe', "
                                 "'gemma3_text', 'gemma3')"),
      ({'model_type': 'mistral', 'sliding_window': 0}, 'sliding_window=0; expected a '
       'positive integer or null'),
      ({'rope_scaling': {'rope_type': 'dynamic', 'factor': 8.0}}, "rope scaling {'rope_type'"),
      ({'rope_scaling': None, 'rope_parameters': {'rope_type': 'yarn', 'factor': 4.0}},
       "rope scaling {'rope_type': 'yarn'"),
      ({'attention_bias': True}, 'attention_bias=true')]:
    (tmp_path / 'hf' / 'config.json').write_text(json.dumps({**config, **change}))
    assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "a"}']) == 2
    assert f'{message}' in capsys.readouterr().err
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps(config))
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "used"}']) == 2
  assert 'import: ' + str(tmp_path / 'used') + ' exists and is not empty; choose a new ' \
      '--workdir' in capsys.readouterr().err  # not export's --out
  assert cli.main(['import', f'--hf={tmp_path / "hf"}',
                   f'--workdir={tmp_path / "used" / "file"}']) == 2
  assert 'import: --workdir=' in capsys.readouterr().err
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "b"}',
                   '--config.model.d_model=64']) == 2
  assert 'model.d_model is set by the checkpoint' in capsys.readouterr().err
  assert cli.main(['import', f'--hf={tmp_path}', f'--workdir={tmp_path / "c"}']) == 2
  assert 'is it a Hugging Face checkpoint' in capsys.readouterr().err.replace('is ' + str(
      tmp_path) + ' a', 'is it a')
  assert not any((tmp_path / name).exists() for name in 'abc')


def _random_qkv_biases(model, seed=0):
  """The model with non-zero q, k and v biases (they start at zero)."""
  rng = np.random.default_rng(seed)
  for _, layer in nnx.iter_graph(model):
    if isinstance(layer, Attention):
      for bias in (layer.q_bias, layer.k_bias, layer.v_bias):
        bias[...] = rng.normal(0, 0.5, bias.shape).astype(np.float32)
  return model


@pytest.mark.parametrize('tied', [False, True])
def test_qkv_biases_export_as_a_qwen2_and_import_back_with_the_same_logits(tmp_path, tied):
  """A dense model with q/k/v biases is a Qwen2ForCausalLM: its logits those of a numpy
  Qwen2, imported back the same run and logits. Checked once with transformers 5.25: tiny
  Qwen2s it wrote with random biases, tied and untied, give its logits within 5.1e-6, its
  greedy tokens, and exported again, its logits exactly (README)."""
  cfg = family_config('dense')
  with cfg.unlocked():
    cfg.model.qkv_bias = True
    cfg.model.tie_embeddings = tied
  model = _random_qkv_biases(_model(config_lib.validate(cfg)))
  write_hf(model, cfg, tmp_path / 'hf')
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert (config['architectures'], config['model_type']) == (['Qwen2ForCausalLM'], 'qwen2')
  assert config['use_sliding_window'] is False and 'attention_bias' not in config
  arrays = safetensors.numpy.load_file(tmp_path / 'hf' / 'model.safetensors')
  assert sorted(k for k in arrays if k.startswith('model.layers.0.') and 'bias' in k) == [
      f'model.layers.0.self_attn.{p}_proj.bias' for p in 'kqv']
  assert arrays['model.layers.0.self_attn.q_proj.bias'].shape == (4 * 32,)
  assert arrays['model.layers.0.self_attn.k_proj.bias'].shape == (2 * 32,)
  want = np.asarray(logits(model, TOKENS))[0]
  np.testing.assert_allclose(_llama_logits(arrays, config, TOKENS[0]), want, atol=2e-5,
                             rtol=1e-5)
  without = {k: v for k, v in arrays.items() if not k.endswith('.bias')}
  assert np.abs(_llama_logits(without, config, TOKENS[0]) - want).max() > 0.1
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']) == 0
  imported_cfg, imported = load_model(tmp_path / 'run')
  assert imported_cfg.model.qkv_bias and imported_cfg.model.tie_embeddings == tied
  np.testing.assert_array_equal(np.asarray(logits(imported, TOKENS)),
                                np.asarray(logits(model, TOKENS)))


# Qwen2.5's config.json as transformers 4 wrote it, shrunk, with a window (Qwen2Config's
# default 4096) narrower than its positions beside use_sliding_window false.
QWEN25 = {'architectures': ['Qwen2ForCausalLM'], 'model_type': 'qwen2', 'hidden_size': 64,
          'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2,
          'intermediate_size': 128, 'vocab_size': 384, 'max_position_embeddings': 32768,
          'max_window_layers': 21, 'rope_theta': 1000000.0, 'sliding_window': 4096,
          'use_sliding_window': False, 'tie_word_embeddings': True,
          'torch_dtype': 'bfloat16', 'rms_norm_eps': 1e-06, 'hidden_act': 'silu'}


@pytest.mark.parametrize('spelling', ['transformers4', 'transformers5', 'no_use_key',
                                      'window_used_but_wide'])
def test_a_qwen2_config_imports_as_a_dense_model_with_qkv_biases(spelling):
  """transformers 5.25 writes rope_parameters, layer_types and a null window; a window
  is unused unless use_sliding_window is true (Qwen2Config's default: false)."""
  config = dict(QWEN25)
  if spelling == 'transformers5':
    del config['rope_theta'], config['torch_dtype']
    config.update(sliding_window=None, dtype='bfloat16', layer_types=['full_attention'] * 2,
                  rope_parameters={'rope_type': 'default', 'rope_theta': 1000000.0})
  elif spelling == 'no_use_key':
    del config['use_sliding_window']
  elif spelling == 'window_used_but_wide':
    config.update(use_sliding_window=True, sliding_window=32768)
  model = hf_import.run_config(config, 'bytes').model
  assert (model.family, model.qkv_bias, model.tie_embeddings) == ('dense', True, True)
  assert (model.rope_theta, model.max_len, model.dtype) == (1e6, 32768, 'bfloat16')


def test_import_builds_on_jaxarch_s_preset_not_a_configs_folder_where_it_runs(
    tmp_path, monkeypatch):
  (tmp_path / 'configs').mkdir()  # a user's own, in the folder the command runs in
  (tmp_path / 'configs' / 'dense.py').write_text('raise RuntimeError("not jaxarch\'s")\n')
  monkeypatch.chdir(tmp_path)
  model = hf_import.run_config(dict(QWEN25), 'bytes').model
  assert (model.family, model.d_model) == ('dense', QWEN25['hidden_size'])


def test_a_used_qwen2_window_covers_the_layers_from_max_window_layers_on():
  """transformers 4 named no layer_types: the layers from max_window_layers on slide;
  5 lists them, in any order; use_sliding_window is a Qwen's key only."""
  window = lambda **change: (lambda m: (m.sliding_window, m.attention_pattern))(
      hf_import.run_config({**QWEN25, **change}, 'bytes').model)
  assert window(use_sliding_window=True) == (None, ('local',))  # max_window_layers 21 of 2
  assert window(use_sliding_window=True, max_window_layers=1) == (4096, ('global', 'local'))
  assert window(use_sliding_window=True, layer_types=['sliding_attention', 'full_attention']
                ) == (4096, ('local', 'global'))
  assert window(use_sliding_window=True, max_window_layers=0) == (4096, ('local',))
  assert window(model_type='mistral', use_sliding_window=False) == (4096, ('local',))
  # transformers 5.25's AutoConfig reads a Mistral with layer_types as a Ministral.
  for kind in ('mistral', 'ministral'):
    assert window(model_type=kind, layer_types=['full_attention', 'sliding_attention']
                  ) == (4096, ('global', 'local'))
    assert window(model_type=kind, layer_types=None) == (4096, ('local',))
  moe = hf_import.run_config({**QWEN3_MOE, 'use_sliding_window': True,  # every layer
                                'sliding_window': 4096, 'max_window_layers': 48}, 'bytes')
  assert (moe.model.sliding_window, moe.model.attention_pattern) == (4096, ('local',))


def test_bad_qwen2_layer_types_and_other_biases_are_refused_in_one_line():
  for change, message in [
      ({'use_sliding_window': True, 'layer_types': ['sliding_attention']},
       "layer_types=['sliding_attention']; expected one of 'sliding_attention', "
       "'full_attention' per layer (2)"),
      ({'mlp_bias': True}, 'mlp_bias=true')]:
    with pytest.raises(ExportError) as e:
      hf_import.run_config({**QWEN25, **change}, 'bytes')
    assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_a_qwen2_checkpoint_with_an_o_proj_bias_or_without_a_qkv_bias_is_one_line(
    tmp_path, capsys):
  cfg = family_config('dense')
  with cfg.unlocked():
    cfg.model.qkv_bias = True
  write_hf(_model(config_lib.validate(cfg)), cfg, tmp_path / 'hf')
  path = tmp_path / 'hf' / 'model.safetensors'
  arrays = safetensors.numpy.load_file(path)
  o_bias = 'model.layers.1.self_attn.o_proj.bias'
  for changed, message in [
      ({**arrays, o_bias: np.ones(128, np.float32)},
       f"1 arrays have no place in a dense model, e.g. ['{o_bias}']"),
      ({k: v for k, v in arrays.items() if k != 'model.layers.1.self_attn.v_proj.bias'},
       'the checkpoint has no model.layers.1.self_attn.v_proj.bias')]:
    safetensors.numpy.save_file(changed, path, metadata={'format': 'pt'})
    assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']) == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1, err
    assert not (tmp_path / 'run').exists()


def _random_qk_norms(model, seed=0):
  """The model with QK-norm scales other than their initial ones."""
  rng = np.random.default_rng(seed)
  for _, layer in nnx.iter_graph(model):
    if isinstance(layer, Attention):
      for norm in (layer.q_norm, layer.k_norm):
        norm.scale[...] = rng.normal(1, 0.5, norm.scale.shape).astype(np.float32)
  return model


@pytest.mark.parametrize('family, renormalize', [('dense', True), ('moe', True),
                                                 ('moe', False)])
def test_qk_norm_exports_as_a_qwen3_or_qwen3_moe_and_imports_back_with_the_same_logits(
    tmp_path, family, renormalize):
  """QK-norm makes a dense model a Qwen3ForCausalLM and a MoE model a Qwen3MoeForCausalLM,
  whose gates may skip the renormalisation (norm_topk_prob): logits those of a numpy
  Qwen3, imported back the same run and logits. Checked once with transformers 5.25: tiny
  Qwen3 and Qwen3-MoE models it wrote (random norms, head_dim 32 of 64 / 4 heads,
  norm_topk_prob true and false) give its logits within 1.7e-5, its 40 greedy tokens, and
  exported again, its logits exactly (README)."""
  cfg = family_config(family)
  with cfg.unlocked():
    cfg.model.qk_norm = True
    if family == 'moe':
      cfg.model.moe.renormalize = renormalize
  model = _random_qk_norms(_model(config_lib.validate(cfg)))
  write_hf(model, cfg, tmp_path / 'hf')
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  want_kind = {'dense': ('Qwen3ForCausalLM', 'qwen3'),
               'moe': ('Qwen3MoeForCausalLM', 'qwen3_moe')}[family]
  assert (config['architectures'], config['model_type']) == ([want_kind[0]], want_kind[1])
  assert config['use_sliding_window'] is False and 'mlp_bias' not in config
  if family == 'moe':  # the names of Qwen3-MoE's checkpoints, not transformers 5's
    assert 'num_local_experts' not in config
    assert (config['num_experts'], config['moe_intermediate_size'], config['norm_topk_prob'],
            config['intermediate_size']) == (cfg.model.moe.num_experts,
                                             cfg.model.moe.expert_d_ff, renormalize,
                                             cfg.model.d_ff)
  arrays = safetensors.numpy.load_file(tmp_path / 'hf' / 'model.safetensors')
  h = config['head_dim']
  assert arrays['model.layers.1.self_attn.k_norm.weight'].shape == (h,)
  assert (family == 'moe') == ('model.layers.0.mlp.experts.3.up_proj.weight' in arrays)
  want = np.asarray(logits(model, TOKENS))[0]
  np.testing.assert_allclose(_llama_logits(arrays, config, TOKENS[0]), want, atol=2e-5,
                             rtol=1e-5)
  without = {k: v for k, v in arrays.items() if '_norm.' not in k or 'layernorm' in k}
  assert np.abs(_llama_logits(without, config, TOKENS[0]) - want).max() > 0.1
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']) == 0
  imported_cfg, imported = load_model(tmp_path / 'run')
  assert imported_cfg.model.qk_norm and not imported_cfg.model.qkv_bias
  if family == 'moe':
    assert imported_cfg.model.moe.renormalize == renormalize
    assert imported_cfg.model.moe.expert_d_ff == cfg.model.moe.expert_d_ff
  np.testing.assert_array_equal(np.asarray(logits(imported, TOKENS)),
                                np.asarray(logits(model, TOKENS)))


# Qwen3-30B-A3B's config.json (transformers 4.51), shrunk.
QWEN3_MOE = {'architectures': ['Qwen3MoeForCausalLM'], 'model_type': 'qwen3_moe',
             'hidden_size': 64, 'intermediate_size': 192, 'moe_intermediate_size': 48,
             'num_experts': 8, 'num_experts_per_tok': 2, 'norm_topk_prob': True,
             'decoder_sparse_step': 1, 'mlp_only_layers': [], 'num_hidden_layers': 2,
             'num_attention_heads': 4, 'num_key_value_heads': 2, 'head_dim': 32,
             'vocab_size': 384, 'max_position_embeddings': 40960, 'max_window_layers': 48,
             'rope_theta': 1000000.0, 'sliding_window': None, 'use_sliding_window': False,
             'attention_bias': False, 'tie_word_embeddings': False,
             'torch_dtype': 'bfloat16', 'rms_norm_eps': 1e-06, 'hidden_act': 'silu'}


@pytest.mark.parametrize('spelling', ['transformers4', 'transformers5', 'no_norm_key'])
def test_a_qwen3_moe_config_imports_as_a_moe_model_with_qk_norm(spelling):
  """transformers 5.25 writes num_local_experts where the Hub's configs say num_experts;
  Qwen3MoeConfig's norm_topk_prob defaults to false."""
  config = dict(QWEN3_MOE)
  if spelling == 'transformers5':
    config['num_local_experts'] = config.pop('num_experts')
  elif spelling == 'no_norm_key':
    del config['norm_topk_prob']
  model = hf_import.run_config(config, 'bytes').model
  assert (model.family, model.qk_norm, model.qkv_bias) == ('moe', True, False)
  assert (model.moe.num_experts, model.moe.top_k, model.moe.expert_d_ff) == (8, 2, 48)
  assert (model.d_ff, model.head_dim, model.max_len) == (192, 32, 40960)
  assert model.moe.renormalize == (spelling != 'no_norm_key')
  dense = hf_import.run_config({**QWEN3_MOE, 'model_type': 'qwen3',
                                  'architectures': ['Qwen3ForCausalLM']}, 'bytes').model
  assert (dense.family, dense.qk_norm, dense.d_ff) == ('dense', True, 192)


def test_qwen3_moe_dense_blocks_are_refused_in_one_line():
  for change, message in [
      ({'decoder_sparse_step': 2}, 'decoder_sparse_step=2 (dense blocks between the MoE ones)'),
      ({'mlp_only_layers': [1]}, 'mlp_only_layers=[1] (dense blocks among the MoE ones)'),
      ({'num_experts': None}, 'no integer num_experts'),
      ({'attention_bias': True}, 'attention_bias=true')]:
    with pytest.raises(ExportError) as e:
      hf_import.run_config({**QWEN3_MOE, **change}, 'bytes')
    assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_a_top_1_mixtral_is_refused_in_one_line_and_an_unnormalised_top_1_imports():
  """A Mixtral's top-1 gate renormalised is 1, which model.moe.renormalize refuses at
  top_k=1 (its advice, renormalize=False, is a key import does not set and another model);
  a Qwen3-MoE's without norm_topk_prob is the softmax gate, which jaxarch computes."""
  for config in ({**MIXTRAL, 'num_experts_per_tok': 1},
                 {**QWEN3_MOE, 'num_experts_per_tok': 1, 'norm_topk_prob': True}):
    with pytest.raises(ExportError) as e:
      hf_import.run_config(config, 'bytes')
    assert 'num_experts_per_tok=1 with the gate renormalised to 1' in str(e.value), str(e.value)
    assert '\n' not in str(e.value)
  model = hf_import.run_config({**QWEN3_MOE, 'num_experts_per_tok': 1, 'norm_topk_prob': False},
                               'bytes').model
  assert (model.moe.top_k, model.moe.renormalize) == (1, False)


LLAMA3 = {'rope_type': 'llama3', 'factor': 32.0, 'low_freq_factor': 1.0,
          'high_freq_factor': 4.0, 'original_max_position_embeddings': 64}


def test_llama3_rope_scaling_exports_in_both_spellings_and_imports_back(tmp_path):
  """Llama 3.1's and 3.2's scaling: written as transformers 4's rope_scaling and 5's
  rope_parameters, logits those of a numpy Llama with Meta's scaling on positions past the
  original context of 64, and imported back the same setting and logits. Checked once with
  transformers 5.25: a tiny Llama 3.2-style model it wrote gives its logits within 8.3e-7
  and greedy tokens, and this export read back by it its logits exactly (README)."""
  cfg = family_config('dense')  # head_dim 32: its 16 frequencies span the three bands
  with cfg.unlocked():
    cfg.model.rope_scaling.update(type='llama3', factor=32.0, original_max_len=64)
  model = _model(config_lib.validate(cfg))
  write_hf(model, cfg, tmp_path / 'hf')
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert config['rope_scaling'] == LLAMA3
  assert config['rope_parameters'] == {**LLAMA3, 'rope_theta': 10_000.0}
  tokens = np.random.default_rng(0).integers(0, 256, (1, 96)).astype(np.int32)
  arrays = safetensors.numpy.load_file(tmp_path / 'hf' / 'model.safetensors')
  np.testing.assert_allclose(_llama_logits(arrays, config, tokens[0]),
                             np.asarray(logits(model, tokens))[0], atol=2e-5, rtol=1e-5)
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']) == 0
  imported_cfg, imported = load_model(tmp_path / 'run')
  assert imported_cfg.model.rope_scaling == cfg.model.rope_scaling
  np.testing.assert_array_equal(np.asarray(logits(imported, tokens)),
                                np.asarray(logits(model, tokens)))


def test_linear_rope_scaling_exports_in_both_spellings_and_imports_back(tmp_path):
  """transformers' `linear` on a Llama: rope_scaling and rope_parameters {rope_type, factor},
  logits those of a numpy Llama turning positions over the factor, imported back the same.
  Checked once with transformers 5.25: this export read back by it gives the model's
  logits (README)."""
  cfg = family_config('dense')
  config_lib.apply_override(cfg, 'model.rope_scaling.type=linear')
  config_lib.apply_override(cfg, 'model.rope_scaling.factor=4.0')
  model = _model(config_lib.validate(cfg))
  write_hf(model, cfg, tmp_path / 'hf')
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert config['rope_scaling'] == {'rope_type': 'linear', 'factor': 4.0}
  assert config['rope_parameters'] == {'rope_type': 'linear', 'factor': 4.0,
                                       'rope_theta': 10_000.0}
  tokens = np.random.default_rng(0).integers(0, 256, (1, 40)).astype(np.int32)
  arrays = safetensors.numpy.load_file(tmp_path / 'hf' / 'model.safetensors')
  want = np.asarray(logits(model, tokens))[0]
  np.testing.assert_allclose(_llama_logits(arrays, config, tokens[0]), want, atol=2e-5,
                             rtol=1e-5)
  unscaled = {**config, 'rope_parameters': {'rope_type': 'default'}}
  assert np.abs(_llama_logits(arrays, unscaled, tokens[0]) - want).max() > 0.01
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']) == 0
  imported_cfg, imported = load_model(tmp_path / 'run')
  assert (imported_cfg.model.rope_scaling.type, imported_cfg.model.rope_scaling.factor) == (
      'linear', 4.0)
  np.testing.assert_array_equal(np.asarray(logits(imported, tokens))[0], want)


# Llama 3.1 8B's config.json as transformers 4.43 wrote it, shrunk.
LLAMA31 = {'model_type': 'llama', 'hidden_size': 64, 'num_hidden_layers': 2,
           'num_attention_heads': 4, 'num_key_value_heads': 2, 'intermediate_size': 128,
           'vocab_size': 384, 'max_position_embeddings': 131072, 'rope_theta': 500000.0,
           'rope_scaling': {'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                            'original_max_position_embeddings': 8192,
                            'rope_type': 'llama3'}}


@pytest.mark.parametrize('spelling', ['transformers4', 'type', 'transformers5', 'no_original'])
def test_an_hf_config_with_llama3_rope_scaling_sets_model_rope_scaling(spelling):
  """transformers 4 writes `rope_scaling` beside `rope_theta` (4.4x also `type`), 5.25
  `rope_parameters` holding both; without original_max_position_embeddings transformers
  takes max_position_embeddings."""
  config, scaling = dict(LLAMA31), dict(LLAMA31['rope_scaling'])
  original = 8192
  if spelling == 'type':
    scaling['type'] = scaling.pop('rope_type')
  elif spelling == 'no_original':
    del scaling['original_max_position_embeddings']
    config['max_position_embeddings'] = original = 2048
  if spelling == 'transformers5':
    del config['rope_scaling'], config['rope_theta']
    config['rope_parameters'] = {**scaling, 'factor': 8, 'rope_theta': 500000.0}
  else:
    config['rope_scaling'] = scaling
  model = hf_import.run_config(config, 'bytes').model
  assert model.rope_theta == 500000.0
  assert model.rope_scaling.to_dict() == {
      'type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
      'original_max_len': original}


@pytest.mark.parametrize('scaling, message', [
    *(({'rope_type': kind, 'factor': 4.0}, f"rope scaling {{'rope_type': '{kind}'")
      for kind in ('yarn', 'dynamic', 'longrope')),
    ({'type': 'yarn', 'factor': 4.0}, "rope scaling {'type': 'yarn'"),
    ({'rope_type': 'linear', 'factor': 0}, "rope scaling {'rope_type': 'linear', 'factor': 0} "
     'has no positive number factor'),
    ({'rope_type': 'linear', 'factor': math.inf}, 'model.rope_scaling.factor=inf must be > 0'),
    ({**LLAMA3, 'low_freq_factor': None}, 'has no number low_freq_factor, which rope_type '
     'llama3 needs'),
    ({**LLAMA3, 'original_max_position_embeddings': 64.5},
     'has no integer original_max_position_embeddings'),
    ({**LLAMA3, 'factor': 0.5}, 'model.rope_scaling.factor=0.5 must be >= 1'),
    ({**LLAMA3, 'high_freq_factor': 1.0}, 'model.rope_scaling.low_freq_factor=1.0 and '
     'high_freq_factor=1.0 must be 0 < low_freq_factor < high_freq_factor'),
    ('llama3', "='llama3'; expected an object such as"),  # an AttributeError before
    ([LLAMA3], '; expected an object such as'),
])
def test_other_or_bad_rope_scalings_are_refused_in_one_line(scaling, message):
  for spelling in ('rope_scaling', 'rope_parameters'):
    config = {**{k: v for k, v in LLAMA31.items() if k != 'rope_scaling'}, spelling: scaling}
    with pytest.raises((ExportError, config_lib.ConfigError)) as e:
      hf_import.run_config(config, 'bytes')
    assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_a_damaged_hf_checkpoint_or_tokenizer_is_one_line_and_makes_no_run(tmp_path, capsys):
  """Each was a traceback (KeyError, JSONDecodeError, SafetensorError), or, for the
  tokenizer, a run that `generate` and `train` then refused. Checked with transformers
  5.25 that a checkpoint missing a tensor or a key is not one it reads either."""
  cfg = family_config('dense')
  write_hf(_model(cfg), cfg, tmp_path / 'hf')
  good = {p.name: p.read_bytes() for p in (tmp_path / 'hf').iterdir()}
  config = json.loads(good['config.json'])
  arrays = safetensors.numpy.load_file(tmp_path / 'hf' / 'model.safetensors')
  without = {k: v for k, v in arrays.items() if k != 'model.layers.1.mlp.up_proj.weight'}
  damages = [
      ('model.safetensors', lambda: safetensors.numpy.save_file(without, tmp_path / 'x.st'),
       'the checkpoint has no model.layers.1.mlp.up_proj.weight'),
      ('model.safetensors', lambda: good['model.safetensors'][:100],
       'model.safetensors cannot be read as safetensors'),
      ('config.json', lambda: b'{not json', 'config.json is not JSON'),
      ('config.json', lambda: json.dumps({k: v for k, v in config.items()
                                          if k != 'intermediate_size'}).encode(),
       'config.json has no integer intermediate_size'),
      ('tokenizer.json', lambda: b'{garbage', 'cannot be read as a tokenizer file'),
      ('tokenizer.json', lambda: good['tokenizer.json'].replace(b'<|endoftext|>', b'<|x|>'),
       'has none of the end-of-text tokens'),
  ]
  for i, (name, damaged, message) in enumerate(damages):
    data = damaged()
    if data is None:  # written to x.st
      data = (tmp_path / 'x.st').read_bytes()
    (tmp_path / 'hf' / name).write_bytes(data)
    assert cli.main(['import', f'--hf={tmp_path / "hf"}',
                     f'--workdir={tmp_path / f"run{i}"}']) == 2, message
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1 and 'Traceback' not in err, err
    assert not (tmp_path / f'run{i}').exists()
    (tmp_path / 'hf' / name).write_bytes(good[name])


def test_an_hf_checkpoint_imports_with_its_own_bos_and_exports_it_again(tmp_path, capsys):
  """A Llama reads `<s> text </s>`: config.json's bos_token_id, when not the tokenizer's
  eod, becomes data.bos_id, and the export names it again (config.json,
  generation_config.json, the tokenizer's BOS). Checked once with transformers 5.25: a tiny
  LlamaForCausalLM it wrote (<s> 1, </s> 2) imports and `jaxarch generate` gives its
  greedy `model.generate` tokens for the same prompt, which it tokenizes as [1, ...]."""
  from test_data import _llama_style_tokenizer  # pylint: disable=g-import-not-at-top
  hf = pytest.importorskip('tokenizers')
  (tmp_path / 'tok').mkdir()
  cfg = family_config('dense')
  with cfg.unlocked():
    cfg.data.tokenizer = _llama_style_tokenizer(tmp_path / 'tok' / 'tokenizer.json')
  write_hf(_model(cfg), cfg, tmp_path / 'hf')
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert (config['bos_token_id'], config['eos_token_id']) == (2, 2)  # the run's default
  imported = {}
  for name, bos in (('own', 1), ('eod', 2), ('none', None)):
    change = {} if bos is None else {'bos_token_id': bos}
    (tmp_path / 'hf' / 'config.json').write_text(json.dumps(
        {**{k: v for k, v in config.items() if k != 'bos_token_id'}, **change}))
    assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / name}']) == 0
    imported[name] = config_lib.load_json(tmp_path / name / 'config.json').data.bos_id
  assert imported == {'own': 1, 'eod': None, 'none': None}

  cfg, model = load_model(tmp_path / 'own')
  write_hf(model, cfg, tmp_path / 'again')
  read = lambda name: json.loads((tmp_path / 'again' / name).read_text())
  assert (read('config.json')['bos_token_id'], read('config.json')['eos_token_id']) == (1, 2)
  assert read('generation_config.json')['bos_token_id'] == 1
  assert (read('tokenizer_config.json')['bos_token'],
          read('tokenizer_config.json')['eos_token']) == ('<s>', '</s>')
  tokenizer = hf.Tokenizer.from_file(str(tmp_path / 'again' / 'tokenizer.json'))
  ours = get_tokenizer(cfg.data.tokenizer)
  assert tokenizer.encode('the café').ids == [1, *ours.encode('the café')]
  write_model(model, cfg, tmp_path / 'weights')  # and the safetensors export's spec
  assert json.loads((tmp_path / 'weights' / 'tokenizer.json').read_text())['bos_id'] == 1

  capsys.readouterr()
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps({**config, 'bos_token_id': 999}))
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "bad"}']) == 2
  err = capsys.readouterr().err
  assert 'config.json has bos_token_id=999, which is no id of' in err, err
  assert err.count('\n') == 1 and not (tmp_path / 'bad').exists()


def _hf_with_tokenizer_files(tmp_path, settings: dict | None, post_processor):
  """A Llama-style checkpoint (<s> 1, </s> 2; config.json's bos_token_id 1) in tmp_path/hf
  whose tokenizer_config.json is `settings` (None: no such file) and whose
  tokenizer.json's post-processor is `post_processor` ('bos': one that adds <s>)."""
  from test_data import _llama_style_tokenizer  # pylint: disable=g-import-not-at-top
  (tmp_path / 'tok').mkdir(exist_ok=True)
  cfg = family_config('dense')
  with cfg.unlocked():
    cfg.data.tokenizer = _llama_style_tokenizer(tmp_path / 'tok' / 'tokenizer.json')
    cfg.data.bos_id = 1
  hf_dir = tmp_path / 'hf'
  write_hf(_model(cfg), cfg, hf_dir)
  tree = json.loads((hf_dir / 'tokenizer.json').read_text())
  assert tree['post_processor']['type'] == 'TemplateProcessing'  # the export adds <s>
  if post_processor != 'bos':
    (hf_dir / 'tokenizer.json').write_text(json.dumps({**tree, 'post_processor': post_processor}))
  (hf_dir / 'tokenizer_config.json').unlink()
  if settings is not None:
    (hf_dir / 'tokenizer_config.json').write_text(json.dumps(settings))
  return hf_dir


# A Qwen's tokenizer.json post-processor: offsets only, no token added.
BYTE_LEVEL = {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': False,
              'use_regex': False}


@pytest.mark.parametrize('settings, post_processor, adds', [
    # Qwen2.5 and Qwen3: add_bos_token false, bos_token null.
    ({'add_bos_token': False, 'bos_token': None, 'eos_token': '</s>'}, BYTE_LEVEL, False),
    ({'bos_token': None, 'eos_token': '</s>'}, BYTE_LEVEL, False),  # Qwen2: bos_token null
    ({'eos_token': '</s>'}, None, False),  # no config says: the tokenizer.json adds nothing
    ({'add_bos_token': False, 'bos_token': '<s>'}, 'bos', False),  # its setting wins
    # Llama 2, Mistral, Mixtral: add_bos_token true.
    ({'add_bos_token': True, 'bos_token': '<s>', 'eos_token': '</s>'}, 'bos', True),
    ({'bos_token': '<s>', 'eos_token': '</s>'}, 'bos', True),  # Llama 3: its post-processor
    (None, 'bos', True),
], ids=['qwen3', 'qwen2', 'post_processor', 'add_bos_token_first', 'llama2', 'llama3',
        'no_tokenizer_config'])
def test_import_reads_whether_the_checkpoints_tokenizer_adds_a_bos(tmp_path, settings,
                                                                   post_processor, adds):
  """A Qwen's tokenizer adds no BOS, though its config.json names one (<|endoftext|>):
  import sets data.add_bos=False, so its documents and prompts are transformers' ids; a
  Llama's adds its <s> (data.bos_id=1). A directory that does not say keeps that too."""
  hf_dir = _hf_with_tokenizer_files(tmp_path, settings, post_processor)
  assert hf_import._adds_bos(hf_dir) is adds  # pylint: disable=protected-access
  assert cli.main(['import', f'--hf={hf_dir}', f'--workdir={tmp_path / "run"}']) == 0
  data_cfg = config_lib.load_json(tmp_path / 'run' / 'config.json').data
  assert (data_cfg.add_bos, data_cfg.bos_id) == ((True, 1) if adds else (False, None))


def test_import_without_tokenizer_files_that_say_keeps_config_jsons_bos(tmp_path):
  """Only a tokenizer.model beside config.json (an older Llama 2 directory): as before,
  config.json's bos_token_id."""
  from test_data import _llama_style_tokenizer  # pylint: disable=g-import-not-at-top
  (tmp_path / 'hf').mkdir()
  tokenizer = get_tokenizer(_llama_style_tokenizer(tmp_path / 'tokenizer.json'))
  assert hf_import._adds_bos(tmp_path / 'hf') is None  # pylint: disable=protected-access
  setting = hf_import._bos_setting(  # pylint: disable=protected-access
      tmp_path / 'hf', {'bos_token_id': 1}, tokenizer, tmp_path / 'hf' / 'tokenizer.model')
  assert setting == ['data.bos_id=1']


def test_a_run_without_a_bos_exports_a_tokenizer_that_adds_none_and_imports_back(tmp_path):
  """An imported Qwen (data.add_bos=False) exported again: transformers' tokenizer gives
  the text's ids alone, as jaxarch reads them (no BOS in config.json, tokenizer_config.json
  or the tokenizer.json post-processor), and it imports back without one; the safetensors
  and StableHLO exports name no BOS either."""
  hf = pytest.importorskip('tokenizers')
  hf_dir = _hf_with_tokenizer_files(
      tmp_path, {'add_bos_token': False, 'bos_token': None, 'eos_token': '</s>'}, BYTE_LEVEL)
  config = json.loads((hf_dir / 'config.json').read_text())
  (hf_dir / 'config.json').write_text(json.dumps({**config, 'bos_token_id': 2}))  # as Qwen's
  assert cli.main(['import', f'--hf={hf_dir}', f'--workdir={tmp_path / "run"}']) == 0
  cfg, model = load_model(tmp_path / 'run')
  assert (cfg.data.add_bos, cfg.data.bos_id) == (False, None)
  write_hf(model, cfg, tmp_path / 'again')
  read = lambda name: json.loads((tmp_path / 'again' / name).read_text())
  assert read('config.json')['bos_token_id'] is None
  assert read('generation_config.json')['bos_token_id'] is None
  assert (read('tokenizer_config.json')['bos_token'],
          read('tokenizer_config.json')['add_bos_token']) == (None, False)
  assert 'bos_token' not in read('special_tokens_map.json')
  tokenizer = hf.Tokenizer.from_file(str(tmp_path / 'again' / 'tokenizer.json'))
  ours = get_tokenizer(cfg.data.tokenizer)
  assert tokenizer.encode('the café').ids == ours.encode('the café')
  assert cli.main(['import', f'--hf={tmp_path / "again"}', f'--workdir={tmp_path / "run2"}']) == 0
  assert config_lib.load_json(tmp_path / 'run2' / 'config.json').data.add_bos is False

  write_model(model, cfg, tmp_path / 'weights')
  assert json.loads((tmp_path / 'weights' / 'tokenizer.json').read_text())['bos_id'] is None


def test_hf_export_of_the_byte_tokenizer_without_a_bos_adds_none(tmp_path):
  hf = pytest.importorskip('tokenizers')
  cfg = family_config('dense')
  with cfg.unlocked():
    cfg.data.add_bos = False
  write_hf(_model(cfg), cfg, tmp_path / 'out')
  tokenizer = hf.Tokenizer.from_file(str(tmp_path / 'out' / 'tokenizer.json'))
  text = 'déf main():'
  assert tokenizer.encode(text).ids == list(text.encode())
  assert hf_import._adds_bos(tmp_path / 'out') is False  # pylint: disable=protected-access


def test_stablehlo_export_of_a_run_without_a_bos_names_none(tmp_path, monkeypatch, capsys):
  """stablehlo.json's bos_id is null and run_stablehlo.py's prompts are the text's ids:
  the README's example has no BOS, an empty prompt's message says so."""
  cfg = family_config('dense')
  with cfg.unlocked():
    cfg.data.add_bos = False
  model = _model(cfg, seed=1)
  out = export_stablehlo(model, cfg, tmp_path / 'out', batch_size=1, prompt_len=8, max_len=16)
  exported = StableHLOModel(out)
  assert exported.spec['bos_id'] is None and exported.bos_id is None
  assert f'run_stablehlo.py {out} 100,101,102 --max_new_tokens' in (out / 'README.md').read_text()
  want, _ = infer.generate(model, [[100, 101, 102]], max_new_tokens=6, stop_ids=(257,),
                           vocab_limit=258)
  assert exported.generate([[100, 101, 102]], max_new_tokens=6) == want
  with pytest.raises(ValueError, match=r"one or more token ids \(the model reads no BOS"):
    exported.generate([[]], max_new_tokens=4)


def _instruct_tokenizer(path) -> tuple[str, int]:
  """A Llama-style tokenizer.json with an end-of-turn token after its pieces (as Llama 3
  Instruct's `<|eot_id|>` 128009 beside `<|end_of_text|>`): its path and that id."""
  from test_data import _llama_style_tokenizer  # pylint: disable=g-import-not-at-top
  hf = pytest.importorskip('tokenizers')
  tok = hf.Tokenizer.from_file(_llama_style_tokenizer(path))
  tok.add_special_tokens([hf.AddedToken('<|eot_id|>', special=True)])
  tok.save(str(path))
  return str(path), tok.token_to_id('<|eot_id|>')


def test_an_hf_checkpoint_imports_its_end_of_turn_as_stop_ids_and_exports_it_again(
    tmp_path, capsys):
  """An instruct model ends its turn with another token than the eod: the eos_token_ids of
  generation_config.json and config.json (an id or a list) besides the eod become
  data.stop_ids, and the export lists them after the eod in generation_config.json, where
  transformers' generate stops at each (config.json keeps the eod). Checked once with
  transformers 5.25: a tiny LlamaForCausalLM with eos_token_id [</s>, <|eot_id|>] that
  greedily emits <|eot_id|> stops there in `model.generate` and, imported, in `jaxarch
  generate` (which ran on to --max_new_tokens before)."""
  (tmp_path / 'tok').mkdir()
  path, eot = _instruct_tokenizer(tmp_path / 'tok' / 'tokenizer.json')
  cfg = family_config('dense')
  with cfg.unlocked():
    cfg.data.tokenizer = path
  hf_dir = tmp_path / 'hf'
  write_hf(_model(cfg), cfg, hf_dir)
  read = lambda directory, name: json.loads((directory / name).read_text())
  assert read(hf_dir, 'generation_config.json')['eos_token_id'] == 2  # the eod alone
  config = read(hf_dir, 'config.json')
  assert config['eos_token_id'] == 2

  def stops(generation, eos=2):
    """data.stop_ids import sets for generation_config.json's and config.json's ids."""
    (hf_dir / 'generation_config.json').unlink(missing_ok=True)
    if generation is not None:
      (hf_dir / 'generation_config.json').write_text(json.dumps({'eos_token_id': generation}))
    # pylint: disable-next=protected-access
    setting = hf_import._stop_setting(hf_dir, {**config, 'eos_token_id': eos},
                                        get_tokenizer(path), Path(path))
    return config_lib.load('configs/dense.py:tiny', setting).data.stop_ids

  assert stops(None) == stops(2) == stops([2]) == ()  # a base model's: the eod alone
  assert stops(eot) == stops([2, eot]) == stops(None, [2, eot]) == stops(None, eot) == (eot,)
  assert stops([eot, 2], [2, 5, eot]) == (eot, 5)  # both files, each id once

  (hf_dir / 'generation_config.json').write_text(json.dumps({'eos_token_id': [2, eot]}))
  assert cli.main(['import', f'--hf={hf_dir}', f'--workdir={tmp_path / "run"}']) == 0
  cfg, model = load_model(tmp_path / 'run')
  assert cfg.data.stop_ids == (eot,)
  write_hf(model, cfg, tmp_path / 'again')
  assert read(tmp_path / 'again', 'generation_config.json')['eos_token_id'] == [2, eot]
  assert read(tmp_path / 'again', 'config.json')['eos_token_id'] == 2

  capsys.readouterr()
  for name, eos, unknown in (('generation_config.json', [2, 999], 999),
                             ('config.json', True, True)):
    (hf_dir / 'generation_config.json').write_text(json.dumps(
        {'eos_token_id': eos if name == 'generation_config.json' else 2}))
    (hf_dir / 'config.json').write_text(json.dumps(
        {**config, 'eos_token_id': eos if name == 'config.json' else 2}))
    assert cli.main(['import', f'--hf={hf_dir}', f'--workdir={tmp_path / "bad"}']) == 2
    err = capsys.readouterr().err
    assert f'{name} has eos_token_id={eos!r}, and {unknown!r} is no id of' in err, err
    assert err.count('\n') == 1 and not (tmp_path / 'bad').exists()


def test_an_hf_config_with_default_rope_scaling_imports(tmp_path):
  """transformers 4.4x configs may say rope_scaling={'rope_type': 'default'} (or 'type'),
  which transformers 5.25 reads as plain rotary embeddings (rope_parameters' default):
  imported with the same logits, not refused as a scaling."""
  cfg = family_config('dense')
  model = _model(cfg)
  write_hf(model, cfg, tmp_path / 'hf')
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  for i, scaling in enumerate([{'rope_type': 'default'}, {'type': 'default'}]):
    (tmp_path / 'hf' / 'config.json').write_text(json.dumps({**config, 'rope_scaling': scaling}))
    assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / str(i)}']) == 0
    _, imported = load_model(tmp_path / str(i))
    np.testing.assert_array_equal(np.asarray(logits(imported, TOKENS)),
                                  np.asarray(logits(model, TOKENS)))


@pytest.mark.parametrize('form', ['string', 'named_list', 'jinja_file'])
def test_import_keeps_the_chat_template_and_the_hf_export_writes_it_back(tmp_path, form):
  """An instruct checkpoint's template (tokenizer_config.json's string, the 'default' of
  its list, or chat_template.jinja, which wins as in transformers) becomes the run's
  tokenizer/chat_template.jinja, named relative to the run (a moved run keeps it), the
  safetensors export copies it, and the HF export writes it back into
  tokenizer_config.json with special tokens read as tokens (as `apply_chat_template`
  needs), so the export imports with it again."""
  from test_chat import QWEN, chat_tokenizer  # pylint: disable=g-import-not-at-top
  cfg = family_config('dense')
  with cfg.unlocked():
    cfg.data.tokenizer = chat_tokenizer(tmp_path / 'tokenizer.json')
    cfg.data.add_bos = False
  hf_dir = tmp_path / 'hf'
  write_hf(_model(cfg), cfg, hf_dir)
  settings = json.loads((hf_dir / 'tokenizer_config.json').read_text())
  assert 'chat_template' not in settings and settings['split_special_tokens'] is True
  settings['eos_token'] = '<|im_end|>'  # as a Qwen's
  if form == 'string':
    settings['chat_template'] = QWEN
  elif form == 'named_list':
    settings['chat_template'] = [{'name': 'tool_use', 'template': 'tools'},
                                 {'name': 'default', 'template': QWEN}]
  else:
    settings['chat_template'] = 'an older one'
    (hf_dir / 'chat_template.jinja').write_text(QWEN)
  (hf_dir / 'tokenizer_config.json').write_text(json.dumps(settings))
  run = tmp_path / 'run'
  assert cli.main(['import', f'--hf={hf_dir}', f'--workdir={run}']) == 0
  assert json.loads((run / 'config.json').read_text())['data']['chat_template'] == (
      'tokenizer/chat_template.jinja')
  assert (run / 'tokenizer' / 'chat_template.jinja').read_text() == QWEN
  assert json.loads((run / 'tokenizer' / 'tokenizer_config.json').read_text())[
      'eos_token'] == '<|im_end|>'  # the names the template may write
  run = run.rename(tmp_path / 'moved')
  cfg, model = load_model(run)
  assert cfg.data.chat_template == str(run / 'tokenizer' / 'chat_template.jinja')

  write_model(model, cfg, tmp_path / 'weights')
  exported = config_lib.load_json(tmp_path / 'weights' / 'config.json').data.chat_template
  assert exported == str(tmp_path / 'weights' / 'tokenizer' / 'chat_template.jinja')
  assert Path(exported).read_text() == QWEN
  assert (tmp_path / 'weights' / 'tokenizer' / 'tokenizer_config.json').is_file()

  write_hf(model, cfg, tmp_path / 'again')
  again = json.loads((tmp_path / 'again' / 'tokenizer_config.json').read_text())
  assert again['chat_template'] == QWEN and again['split_special_tokens'] is False
  assert cli.main(['import', f'--hf={tmp_path / "again"}', f'--workdir={tmp_path / "run2"}']) == 0
  assert (tmp_path / 'run2' / 'tokenizer' / 'chat_template.jinja').read_text() == QWEN


def test_a_chat_template_of_another_type_is_one_line_and_a_list_without_default_none(
    tmp_path, capsys, caplog):
  """A list of named templates with no 'default' imports with none (transformers would
  ask which), with a warning; a template that is no string is refused in one line."""
  hf_dir = tmp_path / 'hf'
  write_hf(_model(family_config('dense')), family_config('dense'), hf_dir)
  settings = json.loads((hf_dir / 'tokenizer_config.json').read_text())
  (hf_dir / 'tokenizer_config.json').write_text(json.dumps(
      {**settings, 'chat_template': [{'name': 'tool_use', 'template': 'x'}]}))
  assert cli.main(['import', f'--hf={hf_dir}', f'--workdir={tmp_path / "run"}']) == 0
  assert config_lib.load_json(tmp_path / 'run' / 'config.json').data.chat_template is None
  assert "chat templates ['tool_use'] have none named 'default'" in caplog.text
  assert not (tmp_path / 'run' / 'tokenizer' / 'chat_template.jinja').exists()
  capsys.readouterr()
  for template in (7, [{'name': 'default', 'template': 7}]):
    (hf_dir / 'tokenizer_config.json').write_text(json.dumps(
        {**settings, 'chat_template': template}))
    assert cli.main(['import', f'--hf={hf_dir}', f'--workdir={tmp_path / "bad"}']) == 2
    err = capsys.readouterr().err
    assert 'has chat_template=7; expected a Jinja template string' in err, err
    assert err.count('\n') == 1 and not (tmp_path / 'bad').exists()


# Gemma 3 (Gemma3ForCausalLM, model_type gemma3_text).

GEMMA = ['model.qk_norm=True', 'model.post_norms=True', 'model.embed_scale=True',
         'model.mlp_activation=gelu_tanh', 'model.sliding_window=3',
         "model.attention_pattern=('local', 'local', 'global')", 'model.n_layers=4',
         'model.local_rope_theta=100.0', 'model.rope_theta=1000000.0']


def _gemma(tied=True, overrides=()):
  """A tiny model with Gemma 3's keys, all its RMSNorm scales random in [0.5, 2): there
  a Gemma's weight, scale - 1, and back are exact in float32 (Sterbenz)."""
  cfg = family_config('dense')
  for override in [*GEMMA, f'model.tie_embeddings={tied}', *overrides]:
    config_lib.apply_override(cfg, override)
  model = _model(config_lib.validate(cfg))
  rng = np.random.default_rng(0)
  for path, scale in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == 'scale':
      scale.set_value(rng.uniform(0.5, 2, scale.get_value().shape).astype(np.float32))
  return cfg, model


@pytest.mark.parametrize('tied', [True, False])
def test_gemma_keys_export_as_a_gemma3_and_import_back_with_the_same_logits(tmp_path, tied):
  """Checked once with transformers 5.25: tiny Gemma3ForCausalLMs it wrote (random norms,
  windows in 3 of 4 layers, query_pre_attn_scalar 32 and 48 beside head_dim 32, tied and
  not, both config spellings) give its logits within 6.7e-6, its 40 greedy tokens, and
  exported again, its logits (README)."""
  cfg, model = _gemma(tied)
  write_hf(model, cfg, tmp_path / 'hf')
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert (config['architectures'], config['model_type']) == (['Gemma3ForCausalLM'],
                                                             'gemma3_text')
  assert config['layer_types'] == ['sliding_attention'] * 2 + ['full_attention'] + [
      'sliding_attention']
  assert config['sliding_window_pattern'] == 3  # transformers 4.50's: F where (i + 1) % 3 = 0
  assert (config['sliding_window'], config['query_pre_attn_scalar'], config['head_dim'],
          config['hidden_activation'], config['rope_local_base_freq']) == (
              3, 32, 32, 'gelu_pytorch_tanh', 100.0)
  assert config['rope_parameters'] == {
      'full_attention': {'rope_type': 'default', 'rope_theta': 1e6},
      'sliding_attention': {'rope_type': 'default', 'rope_theta': 100.0}}
  assert 'hidden_act' not in config and 'rope_scaling' not in config
  arrays = safetensors.numpy.load_file(tmp_path / 'hf' / 'model.safetensors')
  np.testing.assert_array_equal(arrays['model.layers.1.pre_feedforward_layernorm.weight'],
                                np.asarray(model.blocks[1].mlp_norm.scale[...]) - 1)
  want = np.asarray(logits(model, TOKENS))[0]
  np.testing.assert_allclose(_llama_logits(arrays, config, TOKENS[0]), want, atol=2e-5,
                             rtol=1e-5)
  off = lambda **change: np.abs(_llama_logits(arrays, {**config, **change}, TOKENS[0])
                                - want).max()
  assert off(rope_parameters={k: {'rope_type': 'default', 'rope_theta': 1e6}
                              for k in ('full_attention', 'sliding_attention')}) > 0.1
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']) == 0
  imported_cfg, imported = load_model(tmp_path / 'run')
  for key in ('qk_norm', 'post_norms', 'embed_scale', 'mlp_activation', 'sliding_window',
              'attention_pattern', 'local_rope_theta', 'rope_theta', 'tie_embeddings'):
    assert imported_cfg.model[key] == cfg.model[key], key
  np.testing.assert_array_equal(np.asarray(logits(imported, TOKENS))[0], want)
  write_hf(imported, imported_cfg, tmp_path / 'again')
  assert json.loads((tmp_path / 'again' / 'config.json').read_text()) == config


def test_a_gemma3_imports_with_its_tokenizer_json_before_its_sentencepiece_model(tmp_path):
  """transformers reads a Gemma's text with tokenizer.json (GemmaTokenizerFast), and
  `generate --chat` needs one; a Llama 2 directory's tokenizer.model stays first (above)."""
  from test_data import _sentencepiece_model  # pylint: disable=g-import-not-at-top
  pytest.importorskip('tokenizers')
  lines = Path(hf_tokenizer.__file__).read_text().splitlines()[:300]
  sp = _sentencepiece_model(tmp_path / 'sp.model', lines=lines, vocab_size=400, **LLAMA_BPE)
  cfg, model = _gemma(overrides=[f'data.tokenizer={sp}', 'model.vocab_size=512'])
  write_hf(model, cfg, tmp_path / 'hf')
  assert {'tokenizer.model', 'tokenizer.json'} <= {f.name for f in (tmp_path / 'hf').iterdir()}
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']) == 0
  imported = config_lib.load_json(tmp_path / 'run' / 'config.json').data
  assert imported.tokenizer == str(tmp_path / 'run' / 'tokenizer' / 'tokenizer.json')
  text = 'def gemma(x):\n  return x  # ok'
  assert get_tokenizer(imported.tokenizer).encode(text) == get_tokenizer(sp).encode(text)


def test_an_instruct_llama_imports_with_its_tokenizer_json_so_that_it_chats(tmp_path):
  """Llama 2 chat and Mistral Instruct hold a tokenizer.model and a tokenizer.json: with a
  chat template the run reads the tokenizer.json, as transformers does, so that
  `generate --chat` reads the template's `<s>` as the BOS token (a SentencePiece run
  refuses --chat); the text between encodes as the SentencePiece model does."""
  from jaxarch.infer import chat  # pylint: disable=g-import-not-at-top
  from test_data import _sentencepiece_model  # pylint: disable=g-import-not-at-top
  pytest.importorskip('tokenizers')
  pytest.importorskip('jinja2')
  lines = Path(hf_tokenizer.__file__).read_text().splitlines()[:300]
  sp = _sentencepiece_model(tmp_path / 'sp.model', lines=lines, vocab_size=400, **LLAMA_BPE)
  cfg = family_config('dense')
  with cfg.unlocked():
    cfg.data.tokenizer, cfg.model.vocab_size = sp, 512
  write_hf(_model(cfg), cfg, tmp_path / 'hf')
  settings = json.loads((tmp_path / 'hf' / 'tokenizer_config.json').read_text())
  settings['chat_template'] = ("{% for m in messages %}{{ bos_token + '[INST] ' + "
                               "m['content'] + ' [/INST]' }}{% endfor %}")
  (tmp_path / 'hf' / 'tokenizer_config.json').write_text(json.dumps(settings))
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']) == 0
  imported = config_lib.load_json(tmp_path / 'run' / 'config.json').data
  assert imported.tokenizer == str(tmp_path / 'run' / 'tokenizer' / 'tokenizer.json')
  ours, theirs = get_tokenizer(sp), get_tokenizer(imported.tokenizer)
  text = 'def llama(x):\n  return x  # ok'
  assert theirs.encode(text) == ours.encode(text)
  ids = chat.chat_prompts(imported, theirs, ['return x'])[0]
  assert ids[0] == chat.bos_id(imported, theirs) != ours.encode('<s>')[0]
  assert ids[1:] == ours.encode('[INST] return x [/INST]')


@pytest.mark.parametrize('special', [True, False])
def test_a_special_token_past_the_models_rows_imports_and_passes_the_trainers_check(tmp_path, special):
  """Gemma 3's tokenizers hold <image_soft_token> at id 262144, one past the 262144 rows
  of its text models (1B, 270M): text never encodes to a special token, so the run takes
  it, as transformers does; an ordinary token there is still refused."""
  from jaxarch.train import trainer  # pylint: disable=g-import-not-at-top
  pytest.importorskip('tokenizers')
  cfg, model = _gemma()
  write_hf(model, cfg, tmp_path / 'hf')
  path = tmp_path / 'hf' / 'tokenizer.json'
  tree = json.loads(path.read_text())
  rows = cfg.model.vocab_size
  tree['added_tokens'].append({'id': rows, 'content': '<image_soft_token>', 'single_word': False,
                               'lstrip': False, 'rstrip': False, 'normalized': False,
                               'special': special})
  tree['model']['vocab']['<image_soft_token>'] = rows  # as Gemma's: in the BPE's vocab too
  path.write_text(json.dumps(tree))
  argv = ['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']
  if not special:
    with pytest.raises(ExportError, match=f'more than the model.s vocab_size={rows} '
                       fr'\(e.g. id {rows}\)'):
      hf_import.import_hf(tmp_path / 'hf', tmp_path / 'run')
    return
  assert cli.main(argv) == 0
  imported_cfg, imported = load_model(tmp_path / 'run')
  assert get_tokenizer(imported_cfg.data.tokenizer).vocab_size == rows + 1
  assert model_tokenizer(imported_cfg)
  setup = make_setup(imported_cfg, make_mesh(imported_cfg))
  assert trainer._eval_step(imported_cfg, setup)  # pylint: disable=protected-access
  np.testing.assert_array_equal(logits(imported, TOKENS), logits(model, TOKENS))


def test_a_gemma3_query_pre_attn_scalar_is_folded_into_the_query_norm(tmp_path):
  """Gemma 3 27B scales its queries by 168**-0.5 beside head_dim 128: its q_norm scales,
  times sqrt(head_dim / 168), give our head_dim**-0.5 the same logits."""
  cfg, model = _gemma(overrides=["model.attention_pattern=('local', 'local', 'local', "
                                 "'global')"])
  write_hf(model, cfg, tmp_path / 'hf')
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert config['sliding_window_pattern'] == 4  # transformers 4.50's spelling too
  config['query_pre_attn_scalar'] = 7
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps(config))
  arrays = safetensors.numpy.load_file(tmp_path / 'hf' / 'model.safetensors')
  want = _llama_logits(arrays, config, TOKENS[0])
  assert np.abs(want - np.asarray(logits(model, TOKENS))[0]).max() > 0.1
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']) == 0
  _, imported = load_model(tmp_path / 'run')
  np.testing.assert_allclose(np.asarray(logits(imported, TOKENS))[0], want, atol=2e-5,
                             rtol=1e-5)


LINEAR = ['model.rope_scaling.type=linear', 'model.rope_scaling.factor=8.0']


def test_a_gemma3_with_linear_rope_scaling_in_its_global_layers_exports_and_imports(tmp_path):
  """Gemma 3 4B's, 12B's and 27B's global layers turn positions over 8, its sliding layers
  unscaled: written as transformers 5's rope_parameters and 4.50's rope_scaling, read back
  from either. Checked once with transformers 5.25: a tiny Gemma3ForCausalLM with factor 8
  it wrote gives its logits within 6.7e-6 and its 40 greedy tokens (README)."""
  cfg, model = _gemma(False, LINEAR)
  write_hf(model, cfg, tmp_path / 'hf')
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert config['rope_parameters'] == {
      'full_attention': {'rope_type': 'linear', 'factor': 8.0, 'rope_theta': 1e6},
      'sliding_attention': {'rope_type': 'default', 'rope_theta': 100.0}}
  assert config['rope_scaling'] == {'rope_type': 'linear', 'factor': 8.0}
  tokens = np.random.default_rng(0).integers(0, 256, (1, 24)).astype(np.int32)
  arrays = safetensors.numpy.load_file(tmp_path / 'hf' / 'model.safetensors')
  want = np.asarray(logits(model, tokens))[0]
  np.testing.assert_allclose(_llama_logits(arrays, config, tokens[0]), want, atol=2e-5,
                             rtol=1e-5)
  ropes = config['rope_parameters']
  for changed in ({**ropes, 'full_attention': {'rope_type': 'default', 'rope_theta': 1e6}},
                  {**ropes, 'sliding_attention': {**ropes['full_attention'],
                                                  'rope_theta': 100.0}}):
    assert np.abs(_llama_logits(arrays, {**config, 'rope_parameters': changed}, tokens[0])
                  - want).max() > 0.01
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']) == 0
  imported_cfg, imported = load_model(tmp_path / 'run')
  assert imported_cfg.model.rope_scaling == cfg.model.rope_scaling
  np.testing.assert_array_equal(np.asarray(logits(imported, tokens))[0], want)
  write_hf(imported, imported_cfg, tmp_path / 'again')
  assert json.loads((tmp_path / 'again' / 'config.json').read_text()) == config
  for key in ('rope_parameters', 'layer_types'):  # transformers 4.50's spelling alone
    del config[key]
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps(config))
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "t4"}']) == 0
  np.testing.assert_array_equal(np.asarray(logits(load_model(tmp_path / 't4')[1], tokens))[0],
                                want)


@pytest.mark.parametrize('names, tied', [('transformers', True), ('modules', False)])
def test_a_gemma3_multimodal_checkpoint_imports_as_its_language_model(tmp_path, caplog, names,
                                                                      tied):
  """A Gemma3ForConditionalGeneration (Gemma 3 4B, 12B, 27B): text_config, the wrapper's
  dtype and tying, the language model's weights under language_model.model.* (as
  transformers 4.50 to 5.25 save them; lm_head under language_model.lm_head) or its
  modules' model.language_model.*; the vision tower and projector left out, said in a
  line. The run exports as a Gemma3ForCausalLM. Checked once with transformers 5.25: a
  tiny one it wrote gives its logits on text ids within 8.3e-6 (README)."""
  cfg, model = _gemma(tied, LINEAR)
  write_hf(model, cfg, tmp_path / 'text')
  text = json.loads((tmp_path / 'text' / 'config.json').read_text())
  top = ('architectures', 'dtype', 'torch_dtype', 'tie_word_embeddings', 'eos_token_id')
  (tmp_path / 'hf').mkdir()
  for name in ('tokenizer.json', 'tokenizer_config.json', 'generation_config.json'):
    shutil.copy(tmp_path / 'text' / name, tmp_path / 'hf' / name)
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps({
      **{k: text[k] for k in top}, 'architectures': ['Gemma3ForConditionalGeneration'],
      'model_type': 'gemma3', 'mm_tokens_per_image': 4, 'image_token_index': 300,
      'text_config': {k: v for k, v in text.items() if k not in top},
      'vision_config': {'model_type': 'siglip_vision_model', 'hidden_size': 8}}))
  prefix = {'transformers': {'model.': 'language_model.model.',
                             'lm_head.': 'language_model.lm_head.', '': ''},
            'modules': {'model.': 'model.language_model.', 'lm_head.': 'lm_head.',
                        '': 'model.'}}[names]
  arrays = safetensors.numpy.load_file(tmp_path / 'text' / 'model.safetensors')
  arrays = {prefix[k.split('.')[0] + '.'] + k.split('.', 1)[1]: v for k, v in arrays.items()}
  arrays.update({prefix[''] + 'vision_tower.encoder.layers.0.mlp.fc1.weight':
                 np.ones((16, 8), np.float32),
                 prefix[''] + 'multi_modal_projector.mm_input_projection_weight':
                 np.ones((8, 64), np.float32)})
  safetensors.numpy.save_file(arrays, tmp_path / 'hf' / 'model.safetensors')
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']) == 0
  assert ('its vision tower and multimodal projector (2 arrays, 640 numbers) are left out'
          in caplog.text)
  imported_cfg, imported = load_model(tmp_path / 'run')
  for key in ('tie_embeddings', 'rope_scaling', 'dtype', 'vocab_size', 'max_len',
              'local_rope_theta', 'attention_pattern', 'embed_scale'):
    assert imported_cfg.model[key] == cfg.model[key], key
  np.testing.assert_array_equal(np.asarray(logits(imported, TOKENS)),
                                np.asarray(logits(model, TOKENS)))
  write_hf(imported, imported_cfg, tmp_path / 'again')
  assert json.loads((tmp_path / 'again' / 'config.json').read_text()) == text


# Gemma 3 4B's config.json as the Hub has it (transformers 4.50 wrote text_config's keys that
# differ from Gemma3TextConfig's defaults only), its vision_config left out.
GEMMA3_4B = {'architectures': ['Gemma3ForConditionalGeneration'], 'boi_token_index': 255999,
             'eoi_token_index': 256000, 'eos_token_id': [1, 106],
             'image_token_index': 262144, 'initializer_range': 0.02,
             'mm_tokens_per_image': 256, 'model_type': 'gemma3',
             'text_config': {'hidden_size': 2560, 'intermediate_size': 10240,
                             'model_type': 'gemma3_text', 'num_hidden_layers': 34,
                             'rope_scaling': {'factor': 8.0, 'rope_type': 'linear'},
                             'sliding_window': 1024},
             'torch_dtype': 'bfloat16', 'transformers_version': '4.50.0.dev0'}


def test_a_gemma3_multimodal_config_of_the_hub_is_its_text_config_with_the_defaults():
  model = hf_import.run_config(GEMMA3_4B, 'bytes').model
  assert (model.d_model, model.d_ff, model.n_layers, model.n_heads, model.n_kv_heads,
          model.head_dim, model.vocab_size, model.max_len) == (
              2560, 10240, 34, 8, 4, 256, 262208, 131072)
  assert (model.rope_scaling.type, model.rope_scaling.factor, model.rope_theta,
          model.local_rope_theta) == ('linear', 8.0, 1e6, 1e4)
  assert (model.sliding_window, model.attention_pattern) == (1024, ('local',) * 5 + ('global',))
  assert (model.tie_embeddings, model.dtype, model.embed_scale, model.qk_norm) == (
      True, 'bfloat16', True, True)


# Gemma 3 1B's config.json (transformers 4.50), shrunk: its rope_theta, rope_local_base_freq
# and sliding_window_pattern where transformers 5 writes rope_parameters and layer_types.
GEMMA3_1B = {'architectures': ['Gemma3ForCausalLM'], 'model_type': 'gemma3_text',
             'attention_bias': False, 'attn_logit_softcapping': None, 'bos_token_id': 2,
             'eos_token_id': [1, 106], 'final_logit_softcapping': None, 'head_dim': 32,
             'hidden_activation': 'gelu_pytorch_tanh', 'hidden_size': 64,
             'intermediate_size': 128, 'max_position_embeddings': 256,
             'num_attention_heads': 4, 'num_hidden_layers': 7, 'num_key_value_heads': 1,
             'pad_token_id': 0, 'query_pre_attn_scalar': 32, 'rms_norm_eps': 1e-06,
             'rope_local_base_freq': 10000, 'rope_scaling': None, 'rope_theta': 1000000,
             'sliding_window': 512, 'sliding_window_pattern': 6, 'torch_dtype': 'bfloat16',
             'vocab_size': 384}


def test_a_gemma3_config_of_transformers_4_or_left_to_defaults_imports():
  """Its window, even of more than max_len positions, is kept: the sliding layers turn at
  their own theta. What config.json leaves out is Gemma3TextConfig's default (tied, a
  window of 4096 in all but every 6th layer, head_dim 256)."""
  model = hf_import.run_config(GEMMA3_1B, 'bytes').model
  assert (model.sliding_window, model.attention_pattern) == (512, ('local',) * 5 + ('global',))
  assert (model.local_rope_theta, model.rope_theta, model.tie_embeddings) == (1e4, 1e6, True)
  assert (model.qk_norm, model.post_norms, model.embed_scale, model.mlp_activation,
          model.head_dim) == (True, True, True, 'gelu_tanh', 32)
  bare = {k: v for k, v in GEMMA3_1B.items() if k not in (
      'sliding_window', 'sliding_window_pattern', 'head_dim', 'rope_theta',
      'rope_local_base_freq', 'max_position_embeddings')}
  model = hf_import.run_config(bare, 'bytes').model
  assert (model.sliding_window, model.attention_pattern, model.head_dim, model.rope_theta,
          model.local_rope_theta) == (4096, ('local',) * 5 + ('global',), 256, 1e6, 1e4)


@pytest.mark.parametrize('change, message', [
    ({'final_logit_softcapping': 30.0}, "final_logit_softcapping=30.0 (Gemma 2's)"),
    ({'attn_logit_softcapping': 50.0}, "attn_logit_softcapping=50.0 (Gemma 2's)"),
    ({'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}},
     "rope scaling {'rope_type': 'llama3', 'factor': 8.0}"),
    ({'rope_scaling': {'rope_type': 'linear'}}, "rope scaling {'rope_type': 'linear'} has no "
     'positive number factor, which rope_type linear needs'),
    ({'rope_scaling': None, 'rope_parameters': {
        'full_attention': {'rope_type': 'default'},
        'sliding_attention': {'rope_type': 'linear', 'factor': 2.0}}},
     "rope scaling {'rope_type': 'linear', 'factor': 2.0} in its sliding layers"),
    ({'hidden_activation': 'gelu'}, "hidden_activation='gelu'"),
    ({'use_bidirectional_attention': True}, 'use_bidirectional_attention=true'),
    ({'model_type': 'gemma3', 'text_config': 7}, 'config.json has text_config=7; a Gemma 3 '
     'multimodal model (model_type gemma3) needs a gemma3_text one'),
    ({'model_type': 'gemma3', 'text_config': {'model_type': 'llama'}},
     "text_config={'model_type': 'llama'}; a Gemma 3 multimodal model"),
    ({'sliding_window': None}, "config.json has sliding_window=null; a Gemma 3's sliding "
     'layers need a positive integer')])
def test_what_gemma3_has_and_jaxarch_does_not_compute_is_refused_in_one_line(change, message):
  with pytest.raises(ExportError) as e:
    hf_import.run_config({**GEMMA3_1B, **change}, 'bytes')
  assert message in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('family, overrides, why', [
    ('dense', ['model.post_norms=True'], "a Gemma 3 has all of Gemma 3's keys, and this "
     "model lacks model.embed_scale=True, model.mlp_activation='gelu_tanh', "
     'model.qk_norm=True'),
    ('dense', [*GEMMA, 'model.rope_scaling.type=llama3'],
     "a Gemma 3's RoPE is not scaled 'llama3'"),
    ('dense', [*GEMMA[:7], *GEMMA[8:], *LINEAR], "a Gemma 3's sliding layers turn unscaled, "
     'and model.rope_scaling scales them while model.local_rope_theta is unset'),
    ('dense', ['model.qk_norm=True', 'model.sliding_window=3', 'model.local_rope_theta=10.0'],
     "this model lacks model.embed_scale=True"),
    ('moe', ['model.post_norms=True'], 'a Gemma 3 is dense, and this is a moe model')])
def test_hf_export_refuses_some_of_gemma3s_keys_in_one_line(tmp_path, family, overrides, why):
  cfg = family_config(family)
  for override in overrides:
    config_lib.apply_override(cfg, override)
  with pytest.raises(ExportError) as e:
    write_hf(_model(config_lib.validate(cfg)), cfg, tmp_path / 'out')
  assert why in str(e.value) and '\n' not in str(e.value)


# Mixtral-8x7B's config.json (transformers 4.36), shrunk.
MIXTRAL = {'architectures': ['MixtralForCausalLM'], 'model_type': 'mixtral',
           'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 4,
           'num_attention_heads': 8, 'num_key_value_heads': 2, 'num_local_experts': 8,
           'num_experts_per_tok': 2, 'vocab_size': 384, 'max_position_embeddings': 32768,
           'rms_norm_eps': 1e-05, 'rope_theta': 1000000.0, 'sliding_window': None,
           'output_router_logits': False, 'router_aux_loss_coef': 0.02,
           'tie_word_embeddings': False, 'torch_dtype': 'bfloat16', 'hidden_act': 'silu'}


def test_what_config_json_leaves_out_is_its_config_classs_default():
  """As transformers reads it: a Mixtral without rms_norm_eps or rope_theta is 1e-5 and 1e6
  (checked once with transformers 5.25: a tiny Mixtral without them imported with logits
  1.3 off, now within 3e-6), a Mistral without a sliding_window slides over 4096 (logits on
  4200 positions 0.46 off, now within 1e-5), a Qwen3 without head_dim has 128 (refused
  before as a shape mismatch, now within 3e-6)."""
  bare = lambda config, *keys: {k: v for k, v in config.items() if k not in keys}
  moe = hf_import.run_config(bare(MIXTRAL, 'rms_norm_eps', 'rope_theta', 'num_key_value_heads',
                                  'max_position_embeddings'), 'bytes').model
  assert (moe.norm_eps, moe.rope_theta, moe.n_kv_heads, moe.max_len) == (1e-5, 1e6, 8, 131072)
  mistral = hf_import.run_config({**bare(MIXTRAL, 'sliding_window'), 'model_type': 'mistral'},
                                 'bytes').model
  assert (mistral.family, mistral.sliding_window, mistral.norm_eps, mistral.rope_theta) == (
      'dense', 4096, 1e-5, 1e6)
  qwen3 = hf_import.run_config({**bare(QWEN3_MOE, 'head_dim'), 'model_type': 'qwen3'},
                               'bytes').model
  assert qwen3.head_dim == 128
  llama = hf_import.run_config(bare(LLAMA31, 'max_position_embeddings', 'rope_theta',
                                    'rope_scaling'), 'bytes').model
  assert (llama.rope_theta, llama.max_len, llama.n_kv_heads, llama.head_dim) == (
      10_000.0, 2048, 2, 16)


def test_a_config_json_without_rms_norm_eps_is_1e_6_but_a_mixtrals():
  """LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config and Qwen3MoeConfig default
  rms_norm_eps to 1e-6 (MixtralConfig alone to 1e-5, above): a Llama without the key
  imported with 1e-5 would norm its activations otherwise than transformers does."""
  bare = {k: v for k, v in QWEN3_MOE.items() if k != 'rms_norm_eps'}
  for kind in ('llama', 'mistral', 'qwen2', 'qwen3', 'qwen3_moe'):
    config = bare if kind == 'qwen3_moe' else {**LLAMA31, 'model_type': kind}
    assert hf_import.run_config(config, 'bytes').model.norm_eps == 1e-6, kind
  mixtral = {k: v for k, v in MIXTRAL.items() if k != 'rms_norm_eps'}
  assert hf_import.run_config(mixtral, 'bytes').model.norm_eps == 1e-5


def test_a_llamas_sliding_window_is_unread_as_in_transformers():
  """LlamaForCausalLM's attention reads no sliding_window (checked once with transformers
  5.25: a tiny Llama with sliding_window 3 imported with a window, logits 3.7 off; now
  within 3e-6); a Mistral's, the same config.json else, slides."""
  config = {**LLAMA31, 'sliding_window': 3, 'layer_types': ['sliding_attention'] * 2}
  assert hf_import.run_config(config, 'bytes').model.sliding_window is None
  mistral = hf_import.run_config({**config, 'model_type': 'mistral'}, 'bytes').model
  assert (mistral.sliding_window, mistral.attention_pattern) == (3, ('local',))


def test_swish_is_silu_and_other_activations_are_refused():
  assert hf_import.run_config({**LLAMA31, 'hidden_act': 'swish'}, 'bytes').model.family == (
      'dense')
  with pytest.raises(ExportError) as e:
    hf_import.run_config({**LLAMA31, 'hidden_act': 'gelu'}, 'bytes')
  assert "the checkpoint has hidden_act='gelu'" in str(e.value)


@pytest.mark.parametrize('config, message', [
    ({**LLAMA31, 'rope_scaling': None, 'rope_theta': 1e6,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': 10000.0}},
     'config.json has rope_theta=1000000.0 and rope_parameters.rope_theta=10000.0; '
     'transformers 5 reads the second, 4 the first'),
    ({**GEMMA3_1B, 'rope_parameters': {'full_attention': {'rope_type': 'default'},
                                       'sliding_attention': {'rope_type': 'default',
                                                             'rope_theta': 100.0}}},
     'rope_local_base_freq=10000 and rope_parameters.sliding_attention.rope_theta=100.0'),
    ({**GEMMA3_1B, 'rope_theta': 'many'}, "config.json has rope_theta='many'; expected a "
     'positive number')], ids=['llama', 'gemma_sliding', 'not_a_number'])
def test_a_rope_theta_named_twice_and_differently_is_refused_in_one_line(config, message):
  """transformers 5.25 reads rope_parameters' theta, 4 the top-level one (checked once: a
  tiny Llama with rope_theta 1e6 beside rope_parameters' 1e4 imported at 1e6, logits 0.92
  off transformers 5.25's)."""
  with pytest.raises(ExportError) as e:
    hf_import.run_config(config, 'bytes')
  assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_moe_losses_are_the_checkpoints_training_objective_and_export_back():
  """router_aux_loss_coef weighs one balance loss pooled over the layers (top_k at a
  balanced load), and transformers has no z-loss; jaxarch one per layer (1 at a balanced
  load): coef · top_k / n_layers. Import left jaxarch's preset weights (0.01, 0.001)."""
  moe = lambda **change: hf_import.run_config({**MIXTRAL, **change}, 'bytes').model.moe
  assert moe().aux_loss_weight == pytest.approx(0.02 * 2 / 4) and moe().z_loss_weight == 0
  qwen = hf_import.run_config(QWEN3_MOE, 'bytes').model.moe
  assert qwen.aux_loss_weight == pytest.approx(0.001 * 2 / 2)  # Qwen3MoeConfig's default
  with pytest.raises(ExportError) as e:
    moe(router_aux_loss_coef=-1)
  assert 'router_aux_loss_coef=-1; expected a number >= 0' in str(e.value)
  assert '\n' not in str(e.value)
  cfg = family_config('moe')
  tokenizer = get_tokenizer(cfg.data.tokenizer)
  for weight in (0.01, 0.0):
    with cfg.unlocked():
      cfg.model.moe.aux_loss_weight = weight
    config = hf_export.hf_config(cfg, tokenizer)
    assert config['output_router_logits'] is False  # as Mixtral's own config
    assert config['router_aux_loss_coef'] == pytest.approx(
        weight * cfg.model.n_layers / cfg.model.moe.top_k)
    assert moe(**{k: config[k] for k in ('router_aux_loss_coef', 'num_hidden_layers',
                                         'num_experts_per_tok')}
               ).aux_loss_weight == pytest.approx(weight)


@pytest.mark.parametrize('family, overrides', [
    ('dense', []), ('moe', []), ('dense', ['model.qk_norm=True']),
    ('moe', ['model.qk_norm=True']), ('dense', ['model.qkv_bias=True']), ('dense', GEMMA)])
def test_rms_norm_eps_and_rope_theta_export_and_import_back(family, overrides):
  """Each architecture's config.json, other than its config class's defaults."""
  cfg = family_config(family)
  for override in [*overrides, 'model.norm_eps=3e-5', 'model.rope_theta=123456.0']:
    config_lib.apply_override(cfg, override)
  cfg = config_lib.validate(cfg)
  config = hf_export.hf_config(cfg, get_tokenizer(cfg.data.tokenizer))
  model = hf_import.run_config(config, 'bytes').model
  assert (model.norm_eps, model.rope_theta, model.local_rope_theta) == (
      3e-5, 123456.0, cfg.model.local_rope_theta)
