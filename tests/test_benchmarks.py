"""The benchmark scripts run and write the JSON they promise (no timing is asserted)."""

import argparse
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxarch import cli
from jaxarch import config as config_lib
from jaxarch import models
from jaxarch.sweep import plan
from jaxarch.train import flops, profile, throughput
from jaxarch.train.memory import OutOfMemoryError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'benchmarks'))

import accum_collectives  # pylint: disable=g-import-not-at-top,wrong-import-position
import attention  # pylint: disable=g-import-not-at-top,wrong-import-position
import bita  # pylint: disable=g-import-not-at-top,wrong-import-position
import compare_families  # pylint: disable=g-import-not-at-top,wrong-import-position
import data_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
import decode  # pylint: disable=g-import-not-at-top,wrong-import-position
import megabyte  # pylint: disable=g-import-not-at-top,wrong-import-position
import mfu  # pylint: disable=g-import-not-at-top,wrong-import-position
import moe  # pylint: disable=g-import-not-at-top,wrong-import-position
import relayout  # pylint: disable=g-import-not-at-top,wrong-import-position
import report  # pylint: disable=g-import-not-at-top,wrong-import-position
import scan_layers  # pylint: disable=g-import-not-at-top,wrong-import-position
import sparse_lookup  # pylint: disable=g-import-not-at-top,wrong-import-position
import table_split  # pylint: disable=g-import-not-at-top,wrong-import-position
import top_k  # pylint: disable=g-import-not-at-top,wrong-import-position
import window_decode  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position
import ultramem_aux  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.slow
def test_train_step_benchmark_writes_its_record(tmp_path):
  out = tmp_path / 'train_step.json'
  train_step.main(['--config=configs/dense.py:tiny', '--steps=2', '--warmup=1',
                   '--config.model.n_layers=2', '--config.data.seq_len=32',
                   '--config.train.batch_size=8', f'--out={out}'])
  record = json.loads(out.read_text())
  assert record['device_kind'] and record['tokens_per_s'] > 0
  assert record['params_total'] == record['params_active'] > 0
  assert record['opaque_kernels'] == {}  # XLA:CPU runs no kernel it cannot count


@pytest.mark.slow
def test_train_step_counts_each_microbatch_of_gradient_accumulation():
  """XLA's cost analysis counts a loop's body once: with the batch in two microbatches it
  gave half the FLOPs per model FLOP (0.55x against 1.09x), and the data-parallel
  gradient all-reduce, done in each microbatch, once."""
  records = {}
  for accum in (1, 2):
    cfg = config_lib.load('configs/dense.py:tiny', [
        'model.n_layers=1', 'data.seq_len=32', f'train.batch_size={8 * accum}',
        f'train.grad_accum_steps={accum}'])
    records[accum] = throughput.measure(cfg, steps=1, warmup=1)
  assert records[2]['xla_flops_over_model'] == pytest.approx(
      records[1]['xla_flops_over_model'], rel=0.02)
  one, two = (records[a]['collective_bytes_per_device']['all-reduce'] for a in (1, 2))
  assert two == pytest.approx(2 * one, rel=0.01)


@pytest.mark.parametrize('argv, says', [
    (['--steps=0'], 'argument --steps: 0 must be >= 1'),
    (['--config=configs/dense.py:nope'], "unknown preset 'nope'"),
    (['--config.model.nosuch=1'], "unknown key 'model.nosuch'"),
    (['--config.train.batch_size', '3'], 'train.batch_size=3 must be divisible by 8'),
])
def test_train_step_benchmark_says_a_bad_flag_in_one_line(argv, says, tmp_path, capsys):
  with pytest.raises(SystemExit):
    train_step.main([*argv, f'--out={tmp_path / "train_step.json"}'])
  assert says in capsys.readouterr().err


@pytest.mark.parametrize('script, argv, says', [
    (mfu, ['--steps=0'], 'argument --steps: 0 must be >= 1'),
    (moe, ['--iters=0'], 'argument --iters: 0 must be >= 1'),
    (moe, ['--tables=matmull'], "--tables: unknown ['matmull']"),  # ran nothing, exit 0
    (sparse_lookup, ['--iters=0'], 'argument --iters: 0 must be >= 1'),
    (decode, ['--repeats=0'], 'argument --repeats: 0 must be >= 1'),
    (decode, ['--new_tokens=0'], 'argument --new_tokens: 0 must be >= 1'),
    (window_decode, ['--window=0'], 'argument --window: 0 must be >= 1'),
    (attention, ['--seq_len=0'], 'argument --seq_len: 0 must be >= 1'),
    (accum_collectives, ['--meshes=data9'], "--meshes: unknown ['data9']"),
    (accum_collectives, ['--batch_size=36'], '--batch_size=36 must split into --accum=4'),
    (megabyte, ['--train_steps=0'], 'argument --train_steps: 0 must be >= 1'),
    (megabyte, ['--gen_context=64', '--new_tokens=64'], '--gen_context=64 must exceed'),
    (table_split, ['--steps=0'], 'argument --steps: 0 must be >= 1'),
    (compare_families, ['--steps=0'], 'argument --steps: 0 must be >= 1'),
    (data_pipeline, ['--tokenizers=bytes,wordpiece'], "--tokenizers: ['wordpiece'] not among"),
])
def test_benchmarks_say_a_bad_count_in_one_line(script, argv, says, tmp_path, capsys):
  # They used to fail every case after compiling it (mfu: a table of `failed` rows),
  # divide by an empty median, or run no table at all.
  with pytest.raises(SystemExit):
    script.main([*argv, f'--out={tmp_path / "out.json"}'])
  assert says in capsys.readouterr().err
  assert not (tmp_path / 'out.json').exists()


def test_opaque_kernels_are_the_custom_calls_xla_counts_no_flops_for():
  call = '%c = bf16[8,8] custom-call(%a, %b), custom_call_target="{}", backend_config={{}}\n'
  hlo = ''.join(call.format(t) for t in (
      '__gpu$xla.gpu.triton', '__gpu$xla.gpu.triton', '__cudnn$fmhaSoftmax',
      '__cublas$lt$matmul', '__cudnn$convForward', 'tpu_custom_call', '__gpu$TopK'))
  # cuBLAS calls included: on an H200 the dense step's XLA FLOPs were a quarter of the model's
  assert profile.opaque_kernels(hlo) == {
      '__gpu$xla.gpu.triton': 2, '__cudnn$fmhaSoftmax': 1, '__cublas$lt$matmul': 1,
      '__cudnn$convForward': 1, 'tpu_custom_call': 1}


def test_a_profile_that_names_little_of_the_step_says_so():
  # As an H200's MoE step was digested: 2.9 ms of a 306 ms step named (CUDA graphs)
  digest = {'op_s': 0.0029, 'busy_s': 0.0029, 'exposed_collective_s': 0.0, 'of_step': 0.0094,
            'kinds': {'gather/scatter/sort': 0.76, 'copy': 0.16, 'elementwise': 0.08}}
  assert 'only 1% of the step' in profile.summary(digest)
  assert '--xla_gpu_enable_command_buffer=' in profile.summary(digest)
  assert mfu.device_time(digest).endswith('copy 16%, elementwise 8% (of 1% of the step)')
  named = {**digest, 'of_step': 0.8}
  assert 'only' not in profile.summary(named) and 'of the step' not in mfu.device_time(named)
  assert mfu.device_time(None) == '–'


def test_bench_command_times_the_train_step_and_writes_a_profile(tmp_path, capsys):
  code = cli.main(['bench', 'train', '--config=configs/moe.py:tiny', f'--workdir={tmp_path}',
                   '--steps=2', '--warmup=1', '--profile', '--config.model.n_layers=2',
                   '--config.data.seq_len=32', '--config.train.batch_size=8'])
  assert code == 0
  record = json.loads((tmp_path / 'bench_train.json').read_text())
  assert record['family'] == 'moe' and record['tokens_per_s'] > 0
  assert record['params_active'] < record['params_total']  # MoE: top 2 of 8 experts
  assert record['model_tflops_per_device'] > 0 and record['step_time_s'] > 0
  # Back to back, as the trainer runs: the tokens/s; one by one, waited for: the gap.
  assert record['tokens_per_s'] == pytest.approx(8 * 32 / record['step_time_s'])
  assert record['step_time_waited_min_s'] <= record['step_time_waited_median_s']
  assert record['dispatch_gap_s'] >= 0
  assert record['mfu'] is None  # no peak FLOP/s known for a CPU
  traces = list((tmp_path / 'profile').rglob('*.xplane.pb'))
  assert traces and traces[0].stat().st_size > 0
  # The trace, digested: device time by kind, the expert matmuls among it.
  digest = record['profile']
  assert digest['op_s'] > 0 and digest['kinds']['matmul'] > 0
  assert sum(digest['kinds'].values()) == pytest.approx(1.0)
  assert digest['of_step'] == pytest.approx(digest['busy_s'] / record['step_time_s'])
  assert record['xla_flops_over_model'] > 1  # XLA:CPU's ragged_dot computes all 8 experts
  out = capsys.readouterr().out
  assert 'tokens/s' in out and 'device time' in out


def test_a_tied_head_costs_the_flops_of_an_untied_one():
  """Tied, the head's matmul reads the embedding table, which the active parameters
  count as an embedding: its d·V multiply-adds per token still count."""
  per_token = {}
  for tied in (False, True):
    cfg = config_lib.load('configs/dense.py:tiny', [f'model.tie_embeddings={tied}'])
    model = nnx.eval_shape(lambda: models.build(cfg.model, rngs=nnx.Rngs(0)))
    counts = models.param_counts(model)
    per_token[tied] = flops.train_flops_per_token(cfg.model, counts, cfg.data.seq_len)
  d, v = cfg.model.d_model, cfg.model.vocab_size
  assert flops.matmul_params(cfg.model, counts) == counts['active'] - counts['embedding'] + d * v
  assert per_token[True] == per_token[False]


@pytest.mark.parametrize('kind, tflops', [  # device kinds as jax reports them
    ('NVIDIA H100 80GB HBM3', 989.4), ('NVIDIA H100 PCIe', 756), ('NVIDIA H200', 989.4),
    ('NVIDIA GH200 480GB', 989.4), ('NVIDIA A100-SXM4-80GB', 312),
    ('NVIDIA A100-SXM4-40GB', 312), ('TPU v4', 275), ('TPU v5 lite', 197), ('TPU v5e', 197),
    ('TPU v5', 459), ('TPU v5p', 459), ('TPU v6 lite', 918), ('TPU v6e', 918),
    # Unknown: no MFU rather than another part's peak ('A100' is in 'RTX A1000').
    ('NVIDIA B200', None), ('NVIDIA RTX A1000', None), ('cpu', None)])
def test_peak_flops_is_the_datasheet_bf16_dense_peak_of_the_device_kind(kind, tflops):
  peak = flops.peak_flops(kind)
  if tflops is None:
    assert peak is None and flops.mfu(1e15, 4, kind) is None
  else:
    assert peak == pytest.approx(tflops * 1e12)
    assert flops.mfu(2 * peak, 4, kind) == pytest.approx(0.5)  # over all 4 devices' peaks


@pytest.mark.parametrize('argv', [
    ['memory', '--profile', '--state_only'], ['memory', '--steps=5', '--state_only'],
    ['train', '--state_only', '--steps=1', '--warmup=1'],
    ['train', '--device_memory_gib=80', '--steps=1', '--warmup=1']])
def test_bench_says_a_flag_of_its_other_subcommand_in_one_line(argv, tmp_path, capsys):
  # `bench memory --profile` planned the memory and wrote no trace, said nothing.
  code = cli.main(['bench', *argv, '--config=configs/dense.py:tiny', f'--workdir={tmp_path}',
                   '--config.model.n_layers=1', '--config.data.seq_len=32'])
  err = capsys.readouterr().err
  flag, other = argv[1].split('=')[0], 'memory' if argv[0] == 'train' else 'train'
  assert code == 2 and f'{flag} is a flag of `jaxarch bench {other}`' in err
  assert len(err.strip().splitlines()) == 1 and not list(tmp_path.glob('bench_*.json'))


@pytest.mark.slow
def test_a_trace_the_digest_cannot_read_costs_the_digest_only(tmp_path, monkeypatch):
  def digest(*_):  # as a GPU trace in a format the digest does not know
    raise ValueError('no instructions of the step in the trace')

  monkeypatch.setattr(profile, 'digest', digest)
  code = cli.main(['bench', 'train', '--config=configs/dense.py:tiny', f'--workdir={tmp_path}',
                   '--steps=1', '--warmup=1', '--profile', '--config.model.n_layers=1',
                   '--config.data.seq_len=32', '--config.train.batch_size=8'])
  record = json.loads((tmp_path / 'bench_train.json').read_text())
  assert code == 0 and record['step_time_s'] > 0 and 'profile' not in record
  assert record['profile_error'] == 'ValueError: no instructions of the step in the trace'
  assert list((tmp_path / 'profile').rglob('*.xplane.pb'))  # the trace is kept


@pytest.mark.slow
def test_mfu_benchmark_tables_each_case(tmp_path):
  out = tmp_path / 'mfu.json'
  cases = ['dense:tiny:8:none', 'ultramem:tiny:8:dots:model.ultramem.num_values=1024',
           'moe:tiny:8:none:model.n_layers=1']
  (tmp_path / 'moe.json').write_text(json.dumps(  # as benchmarks/moe.py writes it
      {'mfu_overrides': ['model.moe.kernel_tiling=(32, 64, 32, 8, 2)']}))
  mfu.main([f'--cases={",".join(cases)}', '--steps=1', f'--out={out}', '--profile',
            f'--profile_dir={tmp_path / "traces"}', f'--moe_kernels_from={tmp_path / "moe.json"}'])
  data = json.loads(out.read_text())
  assert [r['case'] for r in data['results']] == cases
  assert all(r['profile']['kinds']['matmul'] > 0 for r in data['results'])
  assert len(list((tmp_path / 'traces').rglob('*.xplane.pb'))) == 3
  tuned = 'model.moe.kernel_tiling=(32, 64, 32, 8, 2)'  # the MoE case only
  assert [tuned in r['overrides'] for r in data['results']] == [False, False, True]
  ceiling = data['matmul_ceiling']['tflops']  # measured in the same run
  for r in data['results']:
    assert r['of_matmul_ceiling'] == pytest.approx(r['model_tflops_per_device'] / ceiling)
  assert data['results'][1]['remat'] == 'dots' and data['device_kind']
  default = plan.param_counts(config_lib.load('configs/ultramem.py:tiny'))['total']
  assert data['results'][1]['params_total'] < default  # the case's smaller table
  assert all(r['tokens_per_s'] > 0 for r in data['results'])


@pytest.mark.parametrize('cases', [
    'dense:tiny', 'dense:tiny:8:none,moe:tiny:8:none:model.moe.top_k=99'])
def test_mfu_benchmark_refuses_a_bad_case_before_measuring_any(cases, tmp_path, monkeypatch,
                                                                capsys):
  def measured(*_, **__):
    raise AssertionError('measured before the cases were checked')
  monkeypatch.setattr(mfu, 'matmul_ceiling', measured)
  monkeypatch.setattr(mfu, 'measure', measured)
  with pytest.raises(SystemExit):
    mfu.main([f'--cases={cases}', f'--out={tmp_path / "mfu.json"}'])
  assert f'--cases: {cases.split(",")[-1]}: ' in capsys.readouterr().err


def test_mfu_benchmark_says_why_it_has_no_mfu_on_a_device_without_a_peak(tmp_path,
                                                                          monkeypatch, capsys):
  def measure(cfg, **_):  # the row of a case whose state does not fit: no step to run
    raise OutOfMemoryError(f'{cfg.model.family} does not fit')
  monkeypatch.setattr(mfu, 'measure', measure)
  mfu.main(['--cases=dense:tiny:8:none', '--steps=1', f'--out={tmp_path / "mfu.json"}'])
  # The MFU column is '–' on a CPU: the table says why (it said nothing).
  out = ' '.join(capsys.readouterr().out.split())  # the title, wrapped to the table
  assert "MFU –: no peak bf16 FLOP/s known for 'cpu'" in out
  with pytest.raises(SystemExit):  # it traced nothing, with no word
    mfu.main(['--cases=dense:tiny:8:none', f'--profile_dir={tmp_path / "traces"}',
              f'--out={tmp_path / "mfu.json"}'])
  assert '--profile_dir is where --profile writes its traces' in capsys.readouterr().err


@pytest.mark.slow
def test_sparse_lookup_benchmark_times_the_xla_path_on_cpu(tmp_path, monkeypatch):
  monkeypatch.setitem(sparse_lookup.GRIDS, 'cpu', [(40, 5, 64, 100, 'float32')])
  monkeypatch.setitem(sparse_lookup.BAG_GRIDS, 'cpu', [(40, 6, 64, 100, 'float32', 3)])
  out = tmp_path / 'sparse_lookup.json'
  sparse_lookup.main(['--iters=1', f'--out={out}'])
  data = json.loads(out.read_text())
  assert data['copy_bandwidth'] > 0 and not data['pallas_timed']
  (record,) = data['records']
  assert record['forward_bytes'] == 40 * 5 * 64 * 4 + 40 * 64 * 4 + 2 * 40 * 5 * 4
  assert record['xla_forward_s'] > 0 and record['xla_atomic_backward_s'] > 0
  assert record['xla_atomic_max_rel_error'] < 1e-5  # each path is checked against the first
  (ive,) = data['ive_read']  # the IVE read both ways, the same sums
  assert ive['xla_ratio'] == pytest.approx(ive['xla_each_bag_s'] / ive['xla_bags_s'])
  assert ive['xla_max_rel_error'] < 1e-5


@pytest.mark.slow
def test_sparse_lookup_kernels_that_fail_on_a_gpu_cost_their_cells_only(tmp_path, monkeypatch):
  # As on a GPU whose Triton kernels fail: here they fail for want of a GPU.
  monkeypatch.setattr(sparse_lookup.jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(sparse_lookup, 'copy_bandwidth', lambda iters, gib: 1e9)
  monkeypatch.setitem(sparse_lookup.GRIDS, 'cpu', [(40, 5, 64, 100, 'float32')])
  monkeypatch.setitem(sparse_lookup.BAG_GRIDS, 'cpu', [(40, 6, 64, 100, 'float32', 3)])
  out = tmp_path / 'sparse_lookup.json'
  sparse_lookup.main(['--iters=1', '--grid=cpu', f'--out={out}'])
  (record,) = json.loads(out.read_text())['records']
  assert record['xla_forward_s'] > 0 and 'pallas_sorted_error' in record
  assert 'forward_ratio' not in record and 'pallas_forward_s' not in record


def test_a_lookup_kernel_whose_forward_fails_costs_its_cells_only(tmp_path, monkeypatch):
  # As a GPU where the Pallas forward does not compile but the atomic backward (whose jit
  # drops the unused forward) does: its check, which calls the forward, fails.
  def fails(*_):
    raise RuntimeError('forward kernel does not compile here')
  lookup_fns = sparse_lookup.lookup_fns
  monkeypatch.setattr(sparse_lookup, 'lookup_fns', lambda impl, scatter: (
      lookup_fns(impl, scatter) if impl == 'xla' else (fails, lookup_fns('xla', scatter)[1])))
  monkeypatch.setattr(sparse_lookup.jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(sparse_lookup, 'copy_bandwidth', lambda iters, gib: 1e9)
  monkeypatch.setattr(sparse_lookup, 'ive_read_table', lambda grid, impls, iters: ([], []))
  monkeypatch.setitem(sparse_lookup.GRIDS, 'cpu', [(40, 5, 64, 100, 'float32')])
  out = tmp_path / 'sparse_lookup.json'
  sparse_lookup.main(['--iters=1', '--grid=cpu', f'--out={out}'])
  (record,) = json.loads(out.read_text())['records']
  assert 'does not compile' in record['pallas_sorted_error']
  assert 'does not compile' in record['pallas_atomic_error']
  assert 'pallas_atomic_backward_s' not in record and 'backward_ratio_atomic' not in record
  assert 'pallas_atomic_max_rel_error' not in record and record['xla_forward_s'] > 0


def test_ive_read_kernels_that_fail_cost_their_row_only(monkeypatch):
  def fails(*_):
    raise RuntimeError('no Triton here')
  monkeypatch.setattr(sparse_lookup, 'ive_read_fns', lambda impl, e: (fails, fails))
  records, rows = sparse_lookup.ive_read_table([(8, 4, 64, 16, 'float32', 2)], ['xla'], 1)
  assert 'no Triton here' in records[0]['xla_error'] and rows[0][-4:] == ['–'] * 4


def test_lookup_cells_that_run_out_of_memory_cost_their_cells_only(tmp_path, monkeypatch):
  # XLA's sorted path (its forward and backward) and the E-lookups read fail, as they
  # would when they do not fit; the table is still written with what ran.
  def out_of_memory(*_):
    raise RuntimeError('RESOURCE_EXHAUSTED: out of memory')
  lookup_fns, ive_read_fns = sparse_lookup.lookup_fns, sparse_lookup.ive_read_fns
  monkeypatch.setattr(sparse_lookup, 'lookup_fns', lambda impl, scatter: (
      (out_of_memory, out_of_memory) if scatter == 'sorted' else lookup_fns(impl, scatter)))
  monkeypatch.setattr(sparse_lookup, 'ive_read_fns',
                      lambda impl, e: (ive_read_fns(impl, e)[0], out_of_memory))
  monkeypatch.setitem(sparse_lookup.GRIDS, 'cpu', [(40, 5, 64, 100, 'float32')])
  monkeypatch.setitem(sparse_lookup.BAG_GRIDS, 'cpu', [(40, 6, 64, 100, 'float32', 3)])
  out = tmp_path / 'sparse_lookup.json'
  sparse_lookup.main(['--iters=1', f'--out={out}'])
  data = json.loads(out.read_text())
  (record,) = data['records']
  assert 'out of memory' in record['xla_sorted_error'] and 'xla_forward_s' not in record
  assert record['xla_backward_s'] == record['xla_atomic_backward_s'] > 0
  (ive,) = data['ive_read']
  assert ive['xla_bags_s'] > 0 and 'out of memory' in ive['xla_each_bag_error']


@pytest.mark.slow
def test_moe_benchmark_times_three_layers_per_case(tmp_path, monkeypatch):
  monkeypatch.setitem(moe.GRIDS, 'cpu', dict(
      d_model=16, expert_d_ff=8, top_k=2, experts=(4,), tokens=(32,), matmul_tokens=(32,),
      dtype='float32', impls=('xla', 'interpret'), tiling_experts=4,
      tilings={'interpret': ((16, 16, 16, 4, 3),)}))
  out = tmp_path / 'moe.json'
  moe.main(['--iters=1', f'--out={out}'])
  data = json.loads(out.read_text())
  (record,) = data['records']
  for layer in ('dense', 'dropless', 'capacity'):
    assert record[f'{layer}_tokens_per_s'] == pytest.approx(32 / record[f'{layer}_s'])
  (matmul,) = data['grouped_matmul']
  assert matmul['rows'] == 64 and matmul['real_flops'] == 6 * 64 * 16 * 8
  # XLA:CPU expands ragged_dot into every one of the 4 experts: 4 times the real FLOPs.
  assert 3.5 < matmul['xla_flops_over_real'] < 6  # the forward counts too: about 4
  assert matmul['interpret_s'] > 0 and matmul['interpret_max_rel_error'] < 1e-5
  assert matmul['xla_forward_tflops'] > 0 and matmul['interpret_forward_tflops'] > 0
  (tiled,) = matmul['interpret_tilings']  # the kernels again with other blocks
  assert tiled['block_m'] == 16 and tiled['tflops'] > 0 and tiled['max_rel_error'] < 1e-5
  best = matmul['interpret_best_tiling']  # what mfu.py --moe_kernels_from runs MoE with
  assert best['tflops'] == max(tiled['tflops'], matmul['interpret_tflops'])
  cfg = config_lib.load('configs/moe.py:tiny', mfu.moe_kernel_overrides(out))
  assert cfg.model.moe.kernel_tiling == (best['block_m'], best['block_n'], best['block_k'],
                                         best['num_warps'], best['num_stages'], best['order'])
  assert mfu.moe_kernel_overrides(tmp_path / 'missing.json') == []  # said, not raised
  wrong = [{**matmul, 'interpret_max_rel_error': 0.3}]  # wrong kernels: ragged_dot
  assert moe.mfu_overrides(wrong, ['interpret']) == ['model.moe.matmul_impl=xla']
  failed = [{**matmul, 'interpret_error': 'RuntimeError: no Triton here'}]
  assert moe.mfu_overrides(failed, ['interpret']) == ['model.moe.matmul_impl=xla']
  unchecked = [{k: v for k, v in matmul.items() if k != 'interpret_max_rel_error'}]
  assert moe.mfu_overrides(unchecked, ['interpret']) == ['model.moe.matmul_impl=xla']


def test_a_kernel_whose_outputs_or_gradients_are_nan_fails_its_check():
  ones, nan = np.ones(3, np.float32), np.array([np.nan, 1, 1], np.float32)
  assert report.max_rel_error((ones, nan), (ones, ones)) == np.inf  # max() skips a late NaN
  assert report.max_rel_error((nan, ones), (ones, ones)) == np.inf
  record = {'pallas_s': 1.0, 'pallas_max_rel_error': float('nan')}  # NaN > limit is False
  assert moe.mfu_overrides([record], ['pallas']) == ['model.moe.matmul_impl=xla']


def test_a_swept_tiling_that_differs_from_ragged_dot_is_never_chosen(monkeypatch):
  real = moe.grouped_matmul
  def grouped_matmul(x, w, sizes, *, impl, tiling=moe.Tiling()):  # 'pallas': wrong at 32 rows
    y = real(x, w, sizes, impl='xla')
    return 0 * y if impl == 'pallas' and tiling.block_m == 32 else y

  monkeypatch.setattr(moe, 'grouped_matmul', grouped_matmul)
  saved = []  # what a run cut off after each timing keeps
  record = moe.grouped_matmul_case(4, 64, 16, 8, jnp.float32, ('xla', 'pallas'), iters=1,
                                   tilings={'pallas': ((32, 64, 32, 4, 2), (16, 64, 32, 4, 2))},
                                   progress=lambda r: saved.append(json.loads(json.dumps(r))))
  assert ['pallas_s' in r for r in saved] == [False, True, True, True]
  assert [len(r.get('pallas_tilings', ())) for r in saved] == [0, 0, 1, 2]
  assert saved[2]['pallas_best_tiling'] and saved[-1] == json.loads(json.dumps(record))
  wrong, right = record['pallas_tilings']
  assert wrong['max_rel_error'] == pytest.approx(1.0) and right['max_rel_error'] < 1e-6
  unchecked = dict(right, block_m=128)
  del unchecked['max_rel_error']
  nan = dict(right, block_m=256, max_rel_error=float('nan'))
  for t in wrong, unchecked, nan:  # each the fastest: none of them may be chosen
    t['tflops'] = 1e3 * max(record['pallas_tflops'], right['tflops'])
  record['pallas_tilings'] += [unchecked, nan]
  best = moe.best_tiling(record, 'pallas')
  assert best['block_m'] in (16, moe.Tiling().block_m)
  record['pallas_best_tiling'] = best
  assert moe.mfu_overrides([record], ['pallas']) == [
      f'model.moe.kernel_tiling={tuple(best[f] for f in moe.Tiling._fields)}']


def test_mfu_runs_moe_with_the_fastest_kernel_family_that_matches_ragged_dot():
  """Mosaic faster and right: mfu.py runs it at its best tiling, with Triton's best for
  the weight gradient (Mosaic's takes Triton's); Mosaic wrong: Triton at its best."""
  triton = dict(moe.Tiling(128, 128, 64, 8, 3)._asdict(), tflops=246.0)
  mosaic = dict(moe.MosaicTiling(192, 128, 64, 3, 8)._asdict(), tflops=480.0)
  record = {'pallas_s': 1.0, 'pallas_max_rel_error': 0.0, 'pallas_best_tiling': triton,
            'mosaic_s': 0.5, 'mosaic_max_rel_error': 0.0, 'mosaic_best_tiling': mosaic}
  overrides = moe.mfu_overrides([record], ['pallas', 'mosaic'])
  assert overrides == ['model.moe.matmul_impl=mosaic',
                       'model.moe.mosaic_tiling=(192, 128, 64, 3, 8)',
                       'model.moe.kernel_tiling=(128, 128, 64, 8, 3, 0)']
  moe_cfg = config_lib.load('configs/moe.py:tiny', ['model.dtype=bfloat16', *overrides]).model.moe
  assert (moe_cfg.matmul_impl, moe_cfg.mosaic_tiling) == ('mosaic', (192, 128, 64, 3, 8))
  # jax's transposed Mosaic kernel: right and faster than Triton's weight gradient
  grads = dict(weight_grad_triton_tflops=250.0, weight_grad_mosaic_tflops=500.0,
               weight_grad_mosaic_max_rel_error=0.0)
  assert moe.mfu_overrides([{**record, **grads}], ['pallas', 'mosaic']) == [
      *overrides, 'model.moe.mosaic_weight_grad=mosaic']
  for worse in (dict(weight_grad_mosaic_max_rel_error=0.3), dict(weight_grad_mosaic_tflops=1.0),
                dict(weight_grad_mosaic_max_rel_error=None)):
    assert moe.mfu_overrides([{**record, **grads, **worse}], ['pallas', 'mosaic']) == overrides
  wrong = dict(record, mosaic_max_rel_error=0.3)
  assert moe.mfu_overrides([wrong], ['pallas', 'mosaic']) == [
      'model.moe.kernel_tiling=(128, 128, 64, 8, 3, 0)']
  slower = dict(record, mosaic_best_tiling=dict(mosaic, tflops=100.0))
  assert moe.mfu_overrides([slower], ['pallas', 'mosaic']) == [
      'model.moe.kernel_tiling=(128, 128, 64, 8, 3, 0)']
  failed = dict(wrong, pallas_error='RuntimeError: no Triton here')
  assert moe.mfu_overrides([failed], ['pallas', 'mosaic']) == ['model.moe.matmul_impl=xla']
  assert moe.tiling_name(mosaic) == '192x128x64 c3 g8'
  # A record of the H200's table (before the launch order): the order it ran, 0.
  old = {**record, 'pallas_best_tiling': {k: v for k, v in triton.items() if k != 'order'}}
  assert moe.mfu_overrides([old], ['pallas']) == [
      'model.moe.kernel_tiling=(128, 128, 64, 8, 3, 0)']
  assert moe.tiling_name(triton) == '128x128x64 w8 s3'
  assert moe.tiling_name(dict(triton, order=1)) == '128x128x64 w8 s3 cols'


def test_weight_gradient_kernels_that_cannot_run_here_are_cells_with_their_error():
  """On CPU neither compiled kernel runs (Triton's needs a GPU, Mosaic's a Hopper's SM
  count): each is a recorded error, not a failed benchmark."""
  x, dy = jnp.ones((64, 16), jnp.bfloat16), jnp.ones((64, 8), jnp.bfloat16)
  record = moe.weight_gradients(x, dy, jnp.asarray([30, 34]), 3 * 2 * 64 * 16 * 8, 1, None)
  assert set(record) == {'weight_grad_triton_error', 'weight_grad_mosaic_error'}


def test_benchmark_json_is_strict_json_with_nan_as_null(tmp_path):
  report.save({'max_rel_error': float('nan'), 'tflops': [1.0, float('inf')]},
              tmp_path / 'r.json')
  def refuse(token):
    raise ValueError(f'not standard JSON: {token}')
  assert json.loads((tmp_path / 'r.json').read_text(), parse_constant=refuse) == {
      'max_rel_error': None, 'tflops': [1.0, None]}


def test_an_mfu_case_whose_kernels_fail_is_measured_again_on_xla(monkeypatch):
  def measure(cfg, **_):  # as lookup kernels that do not compile on some device
    if cfg.model.family == 'dense' or cfg.model.ultramem.lookup_impl != 'xla':
      raise RuntimeError('Triton compile failed')
    return {'step_time_s': 1.0}

  monkeypatch.setattr(mfu, 'measure', measure)
  result = mfu.run_case('ultramem:tiny:4:none', steps=1)
  assert result['step_time_s'] == 1.0 and 'Triton compile failed' in result['kernels_failed']
  assert result['overrides'][-1] == 'model.ultramem.lookup_impl=xla'
  assert result['fallback'] == 'xla'
  failed = mfu.run_case('dense:tiny:4:none', steps=1)  # no other path: the error stays
  assert failed['error'] == 'failed: RuntimeError' and 'kernels_failed' not in failed


def test_an_mfu_moe_case_whose_mosaic_kernels_fail_is_measured_on_triton_then_xla(
    monkeypatch):
  ran = []
  def measure(cfg, **_):  # Mosaic fails; Triton too when asked to
    ran.append(cfg.model.moe.matmul_impl)
    if cfg.model.moe.matmul_impl == 'mosaic' or cfg.model.moe.matmul_impl in fail:
      raise RuntimeError(f'{cfg.model.moe.matmul_impl} failed')
    return {'step_time_s': 1.0}

  monkeypatch.setattr(mfu, 'measure', measure)
  case = 'moe:tiny:4:none:model.dtype=bfloat16'
  fail = ()
  result = mfu.run_case(case, steps=1, moe_overrides=(
      mfu.MOSAIC, 'model.moe.mosaic_weight_grad=mosaic'))  # which Triton's path drops
  assert ran == ['mosaic', 'pallas'] and result['fallback'] == 'pallas'
  assert 'mosaic failed' in result['kernels_failed']
  ran.clear()
  fail = ('pallas',)
  result = mfu.run_case(case, steps=1, moe_overrides=(mfu.MOSAIC,))
  assert ran == ['mosaic', 'pallas', 'xla'] and result['fallback'] == 'xla'
  assert 'mosaic failed' in result['kernels_failed']  # the first failure is the one kept
  bad = mfu.run_case('moe:tiny:4:none', steps=1, moe_overrides=('model.moe.top_k=0',))
  assert bad['error'] == 'config error' and 'model.moe.top_k' in bad['detail']  # one row


def test_a_moe_layer_that_fails_costs_its_cells_only(tmp_path, monkeypatch):
  class NoCapacity(moe.MoE):  # as a kernel that does not compile on some device
    def __call__(self, x):
      if self.capacity_factor is not None:
        raise RuntimeError('not on this device')
      return super().__call__(x)

  monkeypatch.setattr(moe, 'MoE', NoCapacity)
  monkeypatch.setitem(moe.GRIDS, 'cpu', dict(
      d_model=16, expert_d_ff=8, top_k=2, experts=(4,), tokens=(32,), dtype='float32'))
  out = tmp_path / 'moe.json'
  moe.main(['--iters=1', '--tables=layers', f'--out={out}'])
  (record,) = json.loads(out.read_text())['records']
  assert record['dropless_s'] > 0 and 'capacity_s' not in record
  assert record['capacity_error'] == 'RuntimeError: not on this device'


@pytest.mark.slow  # 14 s, a benchmark script's table
def test_moe_exchange_table_counts_the_padded_buffers_bytes(tmp_path, monkeypatch):
  """Experts over 8 CPU devices: the padded exchange's collectives move 8x the routed
  rows (from XLA's compiled program), which the ragged exchange sends alone on a GPU;
  with one expert per device, 4x (a token's 2 experts are never both on one device)."""
  monkeypatch.setitem(moe.GRIDS, 'cpu', dict(
      d_model=16, expert_d_ff=8, top_k=2, experts=(16, 8), tokens=(32,), dtype='float32'))
  out = tmp_path / 'moe.json'
  moe.main(['--iters=1', '--tables=exchange', f'--out={out}'])
  records = json.loads(out.read_text())['exchange']
  for record, times in zip(records, (8, 4)):
    assert record['devices'] == 8 and record['padded_s'] > 0
    assert record['ragged_emulated_s'] > 0
    assert record['routed_row_bytes'] == 4 * 32 * 2 * 16 * 4
    ratio = record['padded_collective_bytes'] / record['routed_row_bytes']
    assert times <= ratio < times * 1.03, (record['experts'], ratio)  # + the expert ids


@pytest.mark.slow
def test_decode_benchmark_times_each_family_and_moe_path(tmp_path):
  out = tmp_path / 'decode.json'
  decode.main(['--preset=tiny', '--batches=1', '--prompts=8', '--new_tokens=3',
               '--repeats=1', f'--out={out}'])
  records = json.loads(out.read_text())['records']
  assert [r['family'] for r in records] == ['dense', 'moe_dropless', 'moe_capacity',
                                            'ultramem']
  for r in records:
    assert r['tokens_per_s'] == pytest.approx(1e3 / r['decode_step_ms'])
    # One token reads its active parameters, minus the embedding rows it does not use.
    d_model, vocab = 128, 384
    assert r['param_bytes_per_step'] == pytest.approx(
        4 * (r['params_active'] - (vocab - 1) * d_model))
    assert r['kv_bytes_per_step'] == 4 * (8 + 1.5) * 4 * 2 * 2 * 32  # 4 layers, 2 kv heads
  assert records[0]['moe_over_ultramem'] > 0


def test_data_pipeline_benchmark_reads_each_tokenizer_with_and_without_threads(tmp_path,
                                                                              data_dir):
  out = tmp_path / 'data_pipeline.json'
  data_pipeline.main(['--tokenizers=bytes,bpe', '--threads=0,2,9999', '--batch=4',
                      '--seq_len=64', '--seconds=0.2', '--sample_documents=40',
                      f'--data_dir={data_dir}', f'--out={out}'])
  results = json.loads(out.read_text())
  threads = [0, 2] if results['cpu_cores'] >= 2 else [0]  # more than the cores: left out
  assert [(r['tokenizer'], r['threads']) for r in results['records']] == [
      ('bytes', 0)] + [('bpe', n) for n in threads]
  for r in results['records']:
    assert r['tokens_per_s'] == pytest.approx(r['batches'] * 4 * 64 / r['seconds'])
    assert r['h100s_fed_151m'] == pytest.approx(
        r['tokens_per_s'] / results['h100_151m_tokens_per_s'])
  assert results['records'][0]['over_no_threads'] == 1


@pytest.mark.slow  # 9 s; the ring caches' decoding: tests/test_infer.py
def test_window_decode_benchmark_measures_the_rings_cache_bytes(tmp_path):
  out = tmp_path / 'window_decode.json'
  window_decode.main(['--preset=tiny', '--window=8', '--batch=2', '--prompts=32',
                      '--new_tokens=3', '--repeats=1', f'--out={out}'])
  records = json.loads(out.read_text())['records']
  assert [r['pattern'] for r in records] == ['global', 'window', 'window 3:1 global']
  # Caches of 32 + 64 positions (the prompt bucket and the new tokens' room) in every
  # global layer, of 8 in a windowed one; tiny: 4 layers, 2 kv heads of 32, fp32, k and v.
  per_slot = 2 * 2 * 2 * 32 * 4
  assert [r['cache_bytes'] for r in records] == [
      4 * 96 * per_slot, 4 * 8 * per_slot, (3 * 8 + 96) * per_slot]
  assert records[1]['cache_over_global'] == pytest.approx(8 / 96)
  assert all(r['decode_step_ms'] > 0 and r['step_over_global'] > 0 for r in records)


def test_attention_benchmark_times_each_implementation_with_and_without_a_window(tmp_path):
  out = tmp_path / 'attention.json'
  attention.main(['--batch=1', '--seq_len=32', '--window=8', '--iters=1', f'--out={out}'])
  records = json.loads(out.read_text())['records']
  assert [(r['impl'], r['window']) for r in records] == [('xla', None), ('xla', 8)]
  assert records[1]['over_no_window'] == pytest.approx(records[1]['ms'] / records[0]['ms'])
  assert 'max_rel_error_vs_xla' not in records[1]  # cuDNN runs on GPUs only


def test_top_k_benchmark_times_one_top_k_against_chunks_and_checks_they_agree(tmp_path):
  out = tmp_path / 'top_k.json'
  top_k.main(['--rows=8', '--lengths=64,300', '--k=16', '--chunks=32,128', '--iters=1',
              f'--out={out}'])
  records = json.loads(out.read_text())['records']
  assert [(r['length'], r['chunk']) for r in records] == [
      (64, 0), (64, 32), (64, 128), (300, 0), (300, 32), (300, 128)]
  assert all(r['equal'] for r in records)
  assert records[4]['over_one_top_k'] == pytest.approx(records[4]['ms'] / records[3]['ms'])
  assert 'over_one_top_k' not in records[3]


@pytest.mark.slow  # 9 s; the gathers per microbatch: tests/test_train_step.py
def test_accum_collectives_counts_the_gradient_reductions_per_step(tmp_path):
  out = tmp_path / 'accum.json'
  accum_collectives.main(['--meshes=data8', '--accum=2', '--batch_size=16', f'--out={out}'])
  record, = json.loads(out.read_text())['records']
  reduced = record['all-reduce']
  # Replicated weights: the whole fp32 gradient is all-reduced (plus a few scalars), and
  # with 2 microbatches once per microbatch (XLA's CPU compiler keeps it in the loop; a
  # GPU's moves it out, x1) or once per step.
  model = models.build(config_lib.load('configs/dense.py:tiny').model, rngs=nnx.Rngs(0))
  grad_bytes = 4 * sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert grad_bytes <= reduced['bytes_accum_1'] < 1.01 * grad_bytes
  assert reduced['ratio'] == pytest.approx(2, rel=0.01) or reduced['ratio'] == pytest.approx(
      1, rel=0.01)
  assert record['temp_bytes_accum_a'] < record['temp_bytes_accum_1']  # half the activations


@pytest.mark.slow  # 16 s; the layouts' equal steps: tests/test_scan.py
def test_scan_layers_benchmark_compiles_and_runs_both_layouts(tmp_path):
  out = tmp_path / 'scan.json'
  scan_layers.main(['--config=configs/dense.py:tiny', '--steps=1', f'--out={out}',
                    '--config.train.batch_size=8', '--config.data.seq_len=32',
                    '--config.model.dtype=float32'])
  data = json.loads(out.read_text())
  unrolled, scanned = data['records']['unrolled'], data['records']['scanned']
  assert scanned['hlo_instructions'] < unrolled['hlo_instructions']  # one block, not every one
  assert scanned['loss'] == pytest.approx(unrolled['loss'], rel=1e-5)  # the same step
  assert data['ratios']['compile_s'] == pytest.approx(
      scanned['compile_s'] / unrolled['compile_s'])
  assert data['device_kind']


@pytest.mark.slow  # 25 s; the reads into either layout: tests/test_relayout.py
def test_relayout_benchmark_restores_both_ways_and_cleans_up(tmp_path):
  out = tmp_path / 'relayout.json'
  relayout.main(['--config=configs/dense.py:tiny', '--saved=scanned', f'--out={out}',
                 f'--dir={tmp_path / "run"}', '--config.model.n_layers=3'])
  data = json.loads(out.read_text())
  assert set(data['records']) == {'state:scanned', 'state:unrolled', 'model:scanned',
                                  'model:unrolled'}
  assert data['state_bytes'] > 0 and data['device_kind']
  assert data['ratios']['model']['restore_s'] == pytest.approx(
      data['records']['model:unrolled']['restore_s'] /
      data['records']['model:scanned']['restore_s'])
  assert not (tmp_path / 'run').exists()  # the checkpoint, gigabytes at 680m: deleted


def test_dense_baseline_is_widened_to_the_sparse_active_count():
  target = compare_families.counts(
      compare_families.config_lib.load('configs/ultramem.py:tiny'))['active']
  dense = compare_families.matched_dense(target, [])
  active = compare_families.counts(dense)['active']
  per_unit = 3 * dense.model.d_model * dense.model.n_layers * 8
  assert abs(active - target) <= per_unit / 2


def test_moe_is_widened_to_ultramem_active_count_and_small_stays_matched():
  ultramem = compare_families.config_lib.load('configs/ultramem.py:tiny')
  target = compare_families.counts(ultramem)['active']
  moe = compare_families.matched_moe(target, [])
  # top-2 of the 4 layers' experts: 3·d·2·4 active parameters per unit of expert_d_ff
  per_unit = 3 * moe.model.d_model * moe.model.moe.top_k * moe.model.n_layers * 8
  assert moe.model.moe.expert_d_ff > 192
  assert abs(compare_families.counts(moe)['active'] - target) <= per_unit / 2
  small = compare_families.config_lib.load('configs/ultramem.py:small')
  target = compare_families.counts(small)['active']
  preset = compare_families.config_lib.load('configs/moe.py:small').model.moe.expert_d_ff
  assert compare_families.matched_moe(target, [], 'small').model.moe.expert_d_ff == preset


@pytest.mark.slow
def test_compare_families_benchmark_writes_one_record_per_family(tmp_path, data_dir,
                                                                monkeypatch):
  monkeypatch.setenv('JAXARCH_DATA_DIR', data_dir)
  out = tmp_path / 'compare.json'
  compare_families.main(['--steps=20', f'--workdir={tmp_path / "runs"}', f'--out={out}'])
  data = json.loads(out.read_text())
  assert [r['family'] for r in data['results']] == ['dense', 'ultramem', 'moe']
  assert data['device_kind']


def test_compare_families_json_names_the_device(tmp_path, monkeypatch):
  monkeypatch.setattr(compare_families, 'counts', lambda cfg: {'total': 2, 'active': 1})
  monkeypatch.setattr(compare_families, 'train', lambda cfg, workdir: {
      'eval_bpb': 2.0, 'eval_loss': 1.4, 'loss': 1.5})
  out = tmp_path / 'compare.json'
  compare_families.main(['--steps=2', f'--workdir={tmp_path}', f'--out={out}'])
  data = json.loads(out.read_text())
  assert data['device_kind'] and data['jax_version']
  assert [r['family'] for r in data['results']] == ['dense', 'ultramem', 'moe']



def test_row_shard_imbalance_is_the_busiest_shards_reads_over_the_mean():
  counts = np.array([4, 0, 0, 0, 2, 2, 2, 2])
  assert table_split.imbalance(counts, 2) == pytest.approx(8 / 6)
  assert table_split.imbalance(np.ones(8), 4) == 1.0


def test_table_split_saves_the_device_with_each_finished_mesh(tmp_path, monkeypatch):
  def measure(cfg, steps):  # the second mesh is cut off, as by a time limit
    if cfg.mesh.ici.data == 2:
      raise KeyboardInterrupt
    return {'step_time_s': 1.0, 'collective_bytes_per_device': {'all-to-all': 2**20}}

  monkeypatch.setattr(table_split, 'measure', measure)
  out = tmp_path / 'table_split.json'
  with pytest.raises(KeyboardInterrupt):
    table_split.main(['--meshes=fsdp8,data2_fsdp4', '--train_steps=0', f'--out={out}'])
  saved = json.loads(out.read_text())
  assert saved['device'] and [r['mesh'] for r in saved['step']] == ['fsdp8']


@pytest.mark.slow  # two compiles and a short training run
def test_table_split_benchmark_measures_both_designs_and_the_load(tmp_path, data_dir,
                                                                  monkeypatch):
  monkeypatch.setenv('JAXARCH_DATA_DIR', data_dir)
  out = tmp_path / 'table_split.json'
  table_split.main(['--meshes=data2_fsdp2_tensor2', '--steps=1', '--batch_size=8',
                    '--train_steps=2', '--eval_batches=1', f'--workdir={tmp_path}',
                    f'--out={out}'])
  record = json.loads(out.read_text())
  (step,) = record['step']
  assert step['rows_step_s'] > 0 and step['width_step_s'] > 0
  assert step['width_collectives']['all-to-all'] > 0  # width's output exchange
  assert [(r['model'], r['layer']) for r in record['load']] == [
      ('init', 0), ('init', 1), ('step 2', 0), ('step 2', 1)]
  assert all(r[f'rows_{s}_shards'] >= 1 for r in record['load'] for s in (2, 4, 8))


def test_megabyte_baseline_is_a_byte_transformer_of_equal_parameters():
  mb = megabyte.config_lib.load('configs/megabyte.py:tiny')
  transformer = megabyte.byte_transformer(mb)
  assert transformer.model.family == 'dense' and transformer.data.pack_align == 1
  assert transformer.model.d_model == mb.model.d_model
  total = lambda c: compare_families.counts(c)['total']
  assert abs(total(transformer) - total(mb)) <= 3 * 128 * transformer.model.n_layers * 4


def _run_megabyte_benchmark(tmp_path, bpb_steps):
  out = tmp_path / 'megabyte.json'
  megabyte.main(['--seq_lens=64', '--batch_bytes=512', '--train_steps=1', '--gen_context=32',
                 '--gen_batches=1', '--new_tokens=4', f'--bpb_steps={bpb_steps}',
                 f'--workdir={tmp_path / "runs"}', f'--out={out}'])
  return json.loads(out.read_text())


def test_megabyte_quality_run_computes_in_the_speed_runs_dtype(tmp_path, monkeypatch):
  class Stop(Exception):
    pass
  def quality(*_):
    raise Stop
  calls = []
  def configs(preset, overrides):
    calls.append(overrides)
    return {}
  monkeypatch.setattr(megabyte, 'on_accelerator', lambda: True)  # bf16
  monkeypatch.setattr(megabyte, 'configs', configs)
  monkeypatch.setattr(megabyte, 'training_speed', lambda *_: [])
  monkeypatch.setattr(megabyte, 'generation_speed', lambda *_: [])
  monkeypatch.setattr(megabyte, 'equal_compute_quality', quality)
  with pytest.raises(Stop):
    megabyte.main(['--bpb_steps=1', f'--workdir={tmp_path}', f'--out={tmp_path / "mb.json"}'])
  speed, bpb = calls
  assert 'model.dtype=bfloat16' in speed and bpb == speed


@pytest.mark.slow
def test_megabyte_benchmark_times_training_and_generation(tmp_path):
  data = _run_megabyte_benchmark(tmp_path, bpb_steps=0)
  assert [r['model'] for r in data['training']] == ['megabyte', 'transformer']
  assert all(r['tokens_per_s'] > 0 and r['batch_size'] == 8 for r in data['training'])
  flops_per_byte = {r['model']: r['flops_per_byte'] for r in data['training']}
  assert flops_per_byte['megabyte'] < flops_per_byte['transformer']
  assert all(r['bytes_per_s'] > 0 and r['prompt'] == 28 for r in data['generation'])
  assert not data['quality']


@pytest.mark.slow
def test_megabyte_benchmark_trains_both_at_equal_compute(tmp_path, data_dir, monkeypatch):
  monkeypatch.setenv('JAXARCH_DATA_DIR', data_dir)
  quality = {r['model']: r for r in _run_megabyte_benchmark(tmp_path, bpb_steps=2)['quality']}
  assert quality['transformer']['steps'] == 2
  assert quality['megabyte']['steps'] > 2  # its cheaper bytes buy more steps
  flops = [r['train_flops'] for r in quality.values()]
  assert abs(flops[0] - flops[1]) / max(flops) < 0.5 / 2  # equal up to rounding one step


@pytest.mark.slow
def test_bita_benchmark_runs_every_stage_and_checks_equality(tmp_path, data_dir,
                                                             monkeypatch):
  monkeypatch.setenv('JAXARCH_DATA_DIR', data_dir)
  monkeypatch.setitem(bita.SCALES, 'cpu', dict(
      preset='tiny', base_steps=10, base_batch=8, bita_steps=10, num_prompts=16,
      prompt_len=8, distill_tokens=24, distill_batch=16, new_tokens=8))
  out = tmp_path / 'bita.json'
  bita.main([f'--workdir={tmp_path / "runs"}', '--eval_prompts=4', '--batches=1,2',
             '--trees=2-1,1-1-1', f'--out={out}'])
  record = json.loads(out.read_text())
  assert [(r['batch'], r['tree']) for r in record['decode']] == [
      (1, [2, 1]), (1, [1, 1, 1]), (2, [2, 1]), (2, [1, 1, 1])]
  for r in record['decode']:
    assert r['lossless'] and r['equal_sequences'] == r['prompts']
    assert r['accepted_per_pass'] >= 1 and r['speedup'] > 0
    assert 0 < r['new_tokens'] <= 4 * 8  # end-of-document may stop a prompt early
  assert record['distill']['sequences']['train'] == 16


def test_bita_refuses_batches_above_the_eval_prompts_before_training(tmp_path, monkeypatch,
                                                                     capsys):
  monkeypatch.setattr(bita, 'stage_base', lambda *_: pytest.fail('trained first'))
  with pytest.raises(SystemExit):
    bita.main([f'--workdir={tmp_path}', '--eval_prompts=4', '--batches=1,8'])
  assert '--batches=1,8' in capsys.readouterr().err


def test_attention_flops_count_the_keys_a_sliding_window_leaves():
  from jaxarch.train import flops  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load('configs/dense.py:tiny').model  # 4 layers, 4 heads x 32
  full = flops.attention_flops_per_token(cfg, 128)
  assert full == 6 * 4 * 128 * 4 * 32
  with cfg.unlocked():
    cfg.sliding_window = 32  # 32 - 32²/256 = 28 keys per query, not 64
  assert flops.attention_flops_per_token(cfg, 128) == 12 * 4 * 28 * 4 * 32
  with cfg.unlocked():
    cfg.attention_pattern = ('local', 'global')
  assert flops.attention_flops_per_token(cfg, 128) == 12 * 2 * (28 + 64) * 4 * 32
  with cfg.unlocked():
    cfg.sliding_window = 128  # as wide as the row: no saving
  assert flops.attention_flops_per_token(cfg, 128) == full


def test_peak_flops_tell_h100_and_h200_variants_apart():
  from jaxarch.train import flops  # pylint: disable=g-import-not-at-top
  assert flops.peak_flops('NVIDIA H100 80GB HBM3') == 989.4e12  # SXM
  assert flops.peak_flops('NVIDIA H100 PCIe') == 756e12
  assert flops.peak_flops('NVIDIA H100 NVL') == 835e12
  assert flops.peak_flops('NVIDIA H200') == 989.4e12 and flops.peak_flops('cpu') is None
  assert flops.peak_flops('NVIDIA H200 NVL') == 835e12  # was the SXM part's 989
  assert [flops.peak_flops(k) for k in ('NVIDIA A100-SXM4-80GB', 'TPU v4', 'TPU v4 lite',
                                        'TPU v5 lite', 'TPU v5', 'TPU v5p', 'TPU v6 lite')] == [
      312e12, 275e12, 138e12, 197e12, 459e12, 459e12, 918e12]


def test_the_aux_loss_sweep_differs_in_the_weight_only():
  from jaxarch.sweep import runner  # pylint: disable=g-import-not-at-top
  for scale in ('tiny', 'small'):
    runs = runner.load_sweep(f'configs/sweeps/ultramem_aux.py:{scale}')
    configs = [config_lib.to_dict(r.config()) for r in runs]
    assert [c['model']['ultramem']['aux_loss_weight'] for c in configs] == [0.0, 1e-3, 1e-2]
    for c in configs:
      c['model']['ultramem']['aux_loss_weight'] = 0.0
    assert configs[0] == configs[1] == configs[2]


def test_the_qk_norm_sweep_differs_in_the_rate_and_the_norm_only():
  from jaxarch.sweep import runner  # pylint: disable=g-import-not-at-top
  runs = runner.load_sweep('configs/sweeps/qk_norm.py:tiny')
  configs = [config_lib.to_dict(r.config()) for r in runs]
  assert [(c['train']['lr'], c['model']['qk_norm']) for c in configs] == [
      (lr, qk) for lr in (1e-2, 3e-2, 1e-1) for qk in (False, True)]
  assert len({r.name for r in runs}) == 6
  for c in configs:
    c['train']['lr'], c['model']['qk_norm'] = 0.0, False
  assert all(c == configs[0] for c in configs)
  assert configs[0]['train']['steps'] == 300


@pytest.mark.slow  # 32 s
def test_the_aux_loss_table_reads_each_runs_metrics_and_cores(tmp_path):
  """Two runs saved at init, as `jaxarch sweep` leaves them."""
  from jaxarch.parallel import make_mesh  # pylint: disable=g-import-not-at-top
  from jaxarch.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from jaxarch.train.state import init_state, make_setup  # pylint: disable=g-import-not-at-top
  for i, weight in enumerate((0.0, 0.01)):
    cfg = config_lib.load('configs/ultramem.py:tiny', [
        f'model.ultramem.aux_loss_weight={weight}', 'model.n_layers=4', 'mesh.ici.data=8',
        f'train.seed={i}'])
    run = tmp_path / 'runs' / f'aux_{weight:g}'
    setup = make_setup(cfg, make_mesh(cfg))
    checkpointer = Checkpointer(run, async_save=False)
    checkpointer.save(10, init_state(cfg, setup))
    checkpointer.close()
    config_lib.save(cfg, run / 'config.json')
    (run / 'metrics.jsonl').write_text(json.dumps(
        {'step': 10, 'loss': 2.0, 'side_layers/0/memory/tucker_aux': 0.5 * i,
         'side_layers/1/memory/tucker_aux': 0.25}) + '\n')
    with (tmp_path / 'results.jsonl').open('a') as f:
      f.write(json.dumps({'name': run.name, 'steps': 10, 'final_loss': 2.0,
                          'eval_loss': 2.1 + i, 'bpb': 3.0}) + '\n')
  ultramem_aux.main([f'--workdir={tmp_path}', f'--out={tmp_path / "aux.json"}'])
  record = json.loads((tmp_path / 'aux.json').read_text())
  assert record['device_kind']  # as every benchmark's JSON: the device it ran on
  results = record['results']
  assert [r['aux_loss_weight'] for r in results] == [0.0, 0.01]
  assert results[1]['tucker_aux'] == [0.5, 0.25] and results[1]['eval_loss'] == 3.1
  _, model = ultramem_aux.load_model(tmp_path / 'runs' / 'aux_0')
  s = np.linalg.svd(np.asarray(model.side_layers[0].memory.cores.get_value()).sum(1),
                    compute_uv=False)
  assert results[0]['sigma2_over_sigma1'][0] == pytest.approx((s[:, 1] / s[:, 0]).max(),
                                                              rel=1e-5)


class _Parsed(Exception):
  """Raised in place of running a benchmark whose flags were parsed."""


@pytest.mark.parametrize('part, budget, benchmarks', [
    ('1', 270, ['moe', 'mfu']),
    ('2', 250, ['mfu', 'mfu', 'top_k', 'attention', 'accum_collectives']),
    ('3', 250, ['decode', 'scan_layers', 'megabyte', 'moe']),
])
def test_each_gpu_checks_call_runs_its_benchmarks_with_flags_they_accept(
    part, budget, benchmarks, tmp_path, monkeypatch):
  """The device call runs once, on scarce time: a flag a benchmark refuses would cost its
  share. The script runs with a `python3` that records its arguments; each benchmark's own
  parser then reads them."""
  bin_dir, out = tmp_path / 'bin', tmp_path / 'out'
  bin_dir.mkdir()
  out.mkdir()
  calls = tmp_path / 'calls.jsonl'
  (bin_dir / 'python3').write_text(
      f'#!/bin/sh\nexec {sys.executable} -c "import json, os, sys; '
      f"open('{calls}', 'a').write(json.dumps([{{k: os.environ.get(k, '') for k in "
      f"('XLA_FLAGS', 'JAX_MOCK_GPU_TOPOLOGY')}}] + sys.argv[1:]) + '\\n')\" \"$@\"\n")
  (bin_dir / 'nvidia-smi').write_text('#!/bin/sh\necho "Test GPU, 1 MiB"\n')
  for stub in bin_dir.iterdir():
    stub.chmod(0o755)
  root = Path(__file__).resolve().parent.parent
  env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'OUT': str(out), 'TMPDIR': str(tmp_path)}
  done = subprocess.run(['bash', 'benchmarks/gpu_checks.sh', part], cwd=root, env=env,
                        capture_output=True, text=True, check=True)
  assert f'part {part}: {budget} s' in done.stdout
  seconds = [int(s) for s in re.findall(r'^== \w+ \((\d+) s\)$', done.stdout, re.M)]
  assert budget - len(seconds) <= sum(seconds) <= budget  # the shares fill the part
  # Each MFU target's family has a share of its own: one slow compile cannot cost another.
  mfu_cases = [a for _, *argv in map(json.loads, calls.read_text().splitlines())
               if argv[0] == 'benchmarks/mfu.py' for a in argv if a.startswith('--cases=')]
  families = [{case.split(':')[0] for case in c.removeprefix('--cases=').split(',')}
              for c in mfu_cases]
  assert all(len(f) == 1 for f in families)
  assert set().union(*families) == {'1': {'moe'}, '2': {'ultramem', 'megabyte'},
                                    '3': set()}[part]
  with tarfile.open(out / 'gpu_checks.tgz') as packed:
    assert './summary.txt' in packed.getnames()
  runs = [json.loads(line) for line in calls.read_text().splitlines()]
  env_of = {argv[0]: env for env, *argv in runs}
  flags = {script: env['XLA_FLAGS'] for script, env in env_of.items()}
  runs = [argv for _, *argv in runs if argv[0].startswith('benchmarks/')]
  assert [Path(argv[0]).stem for argv in runs] == benchmarks
  # MFU's profile names instructions only with XLA's command buffers (CUDA graphs) off
  assert ('--xla_gpu_enable_command_buffer=' in flags.get('benchmarks/mfu.py', '')
          ) == ('mfu' in benchmarks)
  # The accumulation count compiles for the one GPU posing as the 8 its meshes need.
  assert ({s: e['JAX_MOCK_GPU_TOPOLOGY'] for s, e in env_of.items() if e['JAX_MOCK_GPU_TOPOLOGY']}
          == ({'benchmarks/accum_collectives.py': '1x8x1'} if part == '2' else {}))
  if part == '1':  # the grouped-matmul table wrote nothing: the H200's record
    assert '--moe_kernels_from=benchmarks/records/grouped_matmul_h200.json' in runs[-1]
  real_parse = argparse.ArgumentParser.parse_args
  def parse_only(self, args=None, namespace=None):
    raise _Parsed(real_parse(self, args, namespace))
  monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', parse_only)
  scripts = {'moe': moe, 'mfu': mfu, 'decode': decode, 'sparse_lookup': sparse_lookup,
             'megabyte': megabyte, 'accum_collectives': accum_collectives,
             'attention': attention, 'top_k': top_k, 'scan_layers': scan_layers}
  for script, *argv in runs:
    with pytest.raises(_Parsed) as parsed:
      scripts[Path(script).stem].main(argv)
    assert parsed.value.args[0].out.startswith(str(tmp_path))


def test_gpu_checks_names_its_parts_when_given_another():
  done = subprocess.run(['bash', 'benchmarks/gpu_checks.sh', '4'], capture_output=True,
                        text=True, cwd=Path(__file__).resolve().parent.parent, check=False)
  assert done.returncode == 2 and 'gpu_checks.sh [1|2|3|all]' in done.stderr


def test_a_benchmark_whose_training_a_signal_stopped_ends_with_train_s_exit_code():
  """Ctrl-C during a benchmark's training tabled the partial run, or failed on its
  missing eval_bpb (compare_families: a KeyError)."""
  assert report.trained({'step': 5, 'eval_bpb': 2.0}) == {'step': 5, 'eval_bpb': 2.0}
  with pytest.raises(SystemExit) as stopped:
    report.trained({'step': 3, 'stopped': 'SIGINT'})
  assert stopped.value.code == 130
