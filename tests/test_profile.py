"""profile: a train step's device time by kind of instruction, from its trace and HLO."""

from types import SimpleNamespace

import jax
import pytest

from conftest import make_batch, mesh_config, tiny_config
from jaxarch.parallel import global_batch, make_mesh
from jaxarch.train import profile
from jaxarch.train.state import init_state, make_setup
from jaxarch.train.step import make_train_step

# Instructions as a GPU compiler writes them (cuBLAS, cuDNN, Triton, async collectives).
GPU_HLO = '''HloModule jit_train_step, is_scheduled=true

%fused_dot (p0: bf16[64,64], p1: bf16[64,64]) -> bf16[64,64] {
  %p0 = bf16[64,64]{1,0} parameter(0)
  %p1 = bf16[64,64]{1,0} parameter(1)
  ROOT %dot.1 = bf16[64,64]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_gather (p0: f32[64,8], p1: s32[4]) -> f32[4,8] {
  %p0 = f32[64,8]{1,0} parameter(0)
  %p1 = s32[4]{0} parameter(1)
  %gather.1 = f32[4,8]{1,0} gather(%p0, %p1), offset_dims={1}, slice_sizes={1,8}
  ROOT %exponential.1 = f32[4,8]{1,0} exponential(%gather.1)
}

%fused_add (p0: f32[8], p1: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  %p1 = f32[8]{0} parameter(1)
  ROOT %add.1 = f32[8]{0} add(%p0, %p1)
}

%fused_transpose (p0: f32[8,16]) -> f32[16,8] {
  %p0 = f32[8,16]{1,0} parameter(0)
  ROOT %transpose.1 = f32[16,8]{1,0} transpose(%p0), dimensions={1,0}
}

%async_computation (p0: f32[64]) -> f32[8] {
  %p0 = f32[64]{0} parameter(0)
  ROOT %reduce-scatter.1 = f32[8]{0} reduce-scatter(%p0), dimensions={0}, to_apply=%add
}

ENTRY %main (a: bf16[64,64], b: bf16[64,64], c: f32[8]) -> f32[8] {
  %a = bf16[64,64]{1,0} parameter(0)
  %b = bf16[64,64]{1,0} parameter(1)
  %c = f32[8]{0} parameter(2)
  %custom-call.1 = (bf16[64,64]{1,0}, s8[1024]{0}) custom-call(bf16[64,64]{1,0} %a, bf16[64,64]{1,0} %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(train_step)/btd,df->btf/dot_general"}
  %gemm_fusion_dot.2 = bf16[64,64]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot
  %custom-call.2 = (bf16[64,64]{1,0}, f32[64]{0}) custom-call(%a, %b, %b), custom_call_target="__cudnn$fmhaSoftmax"
  %custom-call.3 = bf16[64,64]{1,0} custom-call(%a, %b), custom_call_target="__gpu$xla.gpu.triton"
  %input_gather_fusion = f32[4,8]{1,0} fusion(%x, %i), kind=kInput, calls=%fused_gather
  %all-gather-start = (f32[8]{0}, f32[64]{0}) all-gather-start(f32[8]{0} %c), dimensions={0}
  %all-gather-done = f32[64]{0} all-gather-done(%all-gather-start)
  %reduce-scatter-start = ((f32[64]{0}), f32[8]{0}) async-start(f32[64]{0} %all-gather-done), calls=%async_computation
  %transpose_fusion = f32[16,8]{1,0} fusion(%y), kind=kLoop, calls=%fused_transpose
  %while.1 = (s32[], f32[8]{0}) while(%t), condition=%cond, body=%body
  ROOT %loop_add_fusion = f32[8]{0} fusion(%c, %c), kind=kLoop, calls=%fused_add
}
'''


def test_gpu_instructions_are_sorted_into_kinds():
  module, kinds = profile.op_kinds(GPU_HLO)
  assert module == 'jit_train_step'
  expected = {'custom-call.1': 'matmul', 'gemm_fusion_dot.2': 'matmul',
              'custom-call.2': 'attention', 'custom-call.3': 'kernel',
              'input_gather_fusion': 'gather/scatter/sort', 'all-gather-start': 'collective',
              'all-gather-done': 'collective', 'reduce-scatter-start': 'collective',
              'transpose_fusion': 'copy', 'while.1': 'control',
              'loop_add_fusion': 'elementwise'}
  assert {name: kinds[name]['kind'] for name in expected} == expected
  assert kinds['custom-call.1']['source'] == 'jit(train_step)/btd,df->btf/dot_general'


def test_collective_bytes_count_each_collective_once():
  """An asynchronous pair counts once (its -done), a wrapped one by its inner instruction."""
  assert profile.collective_bytes(GPU_HLO) == {'all-gather': 64 * 4, 'reduce-scatter': 8 * 4}


LOOP_HLO = '''HloModule jit_train_step

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%reduce_in_body (p0: f32[16]) -> f32[16] {
  %p0 = f32[16]{0} parameter(0)
  ROOT %all-reduce.2 = f32[16]{0} all-reduce(%p0), to_apply=%add
}

%body (t: (s32[], f32[16])) -> (s32[], f32[16]) {
  %t = (s32[], f32[16]{0}) parameter(0)
  %g = f32[16]{0} get-tuple-element(%t), index=1
  %all-reduce.1 = f32[16]{0} all-reduce(%g), to_apply=%add
  %fusion.1 = f32[16]{0} fusion(%all-reduce.1), kind=kLoop, calls=%reduce_in_body
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %next = (s32[], f32[16]{0}) tuple(%i, %fusion.1)
}

%cond (t: (s32[], f32[16])) -> pred[] {
  %t = (s32[], f32[16]{0}) parameter(0)
  ROOT %go = pred[] constant(true)
}

%unknown_body (t: (s32[], f32[16])) -> (s32[], f32[16]) {
  %t = (s32[], f32[16]{0}) parameter(0)
  %g = f32[16]{0} get-tuple-element(%t), index=1
  %all-gather.2 = f32[16]{0} all-gather(%g), dimensions={0}
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %next = (s32[], f32[16]{0}) tuple(%i, %all-gather.2)
}

ENTRY %main (a: (s32[], f32[16])) -> f32[16] {
  %a = (s32[], f32[16]{0}) parameter(0)
  %while.1 = (s32[], f32[16]{0}) while(%a), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %while.2 = (s32[], f32[16]{0}) while(%while.1), condition=%cond, body=%unknown_body
  %out = f32[16]{0} get-tuple-element(%while.2), index=1
  ROOT %all-gather.1 = f32[128]{0} all-gather(%out), dimensions={0}
}
'''


def test_collective_bytes_count_a_loop_body_as_often_as_it_runs():
  """Gradient accumulation's microbatch loop runs its body A times (XLA knows the trip
  count); what the body calls runs as often; a loop of unknown length counts once."""
  assert profile.collective_bytes(LOOP_HLO) == {'all-reduce': 3 * (16 + 16) * 4,
                                                'all-gather': (128 + 16) * 4}


@pytest.mark.slow
def test_digest_of_a_sharded_step_names_its_collectives(tmp_path):
  cfg = mesh_config(tiny_config(), data=1, fsdp=8)
  setup = make_setup(cfg, make_mesh(cfg))
  state = init_state(cfg, setup)
  step = make_train_step(setup)
  batch = global_batch(make_batch(8, cfg.data.seq_len), setup.batch_sharding)
  state, _ = step(state, batch)
  hlo = step.lower(state, batch).compile().as_text()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)

  digest = profile.digest(tmp_path, hlo, steps=2, num_devices=8)
  _, kinds = profile.op_kinds(hlo)
  assert {'matmul', 'collective', 'elementwise'} <= set(digest['kinds'])  # FSDP gathers
  assert sum(digest['kinds'].values()) == pytest.approx(1.0)
  assert 0 <= digest['exposed_collective_s'] <= digest['busy_s']
  for op in digest['top_ops']:
    assert kinds[op['op']]['kind'] == op['kind'] and op['calls_per_step'] > 0
  assert 'device time' in profile.summary(digest)
  assert profile.collective_bytes(hlo)['all-gather'] > 0  # FSDP gathers the weights


def test_digest_without_a_trace_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='no \\*.xplane.pb under'):
    profile.digest(tmp_path, GPU_HLO, steps=1)


def test_gpu_planes_count_each_instruction_once_and_only_the_step_s():
  """A GPU trace: kernels on stream lines (named by `hlo_op`), maybe the same
  instructions again on an "XLA Ops" line; other programs' kernels are left out."""
  event = lambda name, start, stats=(): SimpleNamespace(
      name=name, start_ns=start, duration_ns=10, stats=list(stats))
  kernel = lambda op, start, module='jit_train_step': event(
      'sm90_xmma_gemm_bf16', start, [('hlo_op', op), ('hlo_module', module)])
  line = lambda name, *events: SimpleNamespace(name=name, events=list(events))
  streams = [line('Stream #13', kernel('custom-call.1', 0), kernel('loop_add_fusion', 20),
                  kernel('custom-call.1', 40, module='jit_other'))]
  space = SimpleNamespace(planes=[
      SimpleNamespace(name='/device:GPU:0', lines=streams),
      SimpleNamespace(name='/device:GPU:1', lines=[
          *streams, line('XLA Ops', event('custom-call.1', 0), event('loop_add_fusion', 20))]),
  ])
  module, kinds = profile.op_kinds(GPU_HLO)
  events = profile.instruction_events(space, module, kinds)
  expected = [('custom-call.1', 0, 10), ('loop_add_fusion', 20, 30)]
  assert events == {'/device:GPU:0': expected, '/device:GPU:1': expected}
