"""What a profiled train step spends its device time on, from its trace and its HLO.

`jax.profiler.trace` writes an XSpace (`*.xplane.pb`) whose events are the compiled
program's HLO instructions: on a GPU one kernel event per instruction on the device planes
(the instruction in the event's `hlo_op` stat), on a CPU thunk events named after the
instruction on the host's XLA threads. The optimised HLO text (`compiled.as_text()`) says
what each instruction is, so the time sums by kind: matmul (dots, cuBLAS/Triton GEMMs),
attention (cuDNN flash attention), kernel (Pallas/Triton custom calls such as UltraMem's
lookup), gather/scatter/sort (MoE dispatch, top-k), collective, copy, elementwise (every
other fusion: norms, RoPE, activations, the optimizer update). That names what limits a
step: MFU is bounded by the matmul share of the busy time.

Times are per step and per device. Collectives may overlap compute (asynchronous on a GPU),
so `exposed_collective_s` counts only the time when nothing else ran.
"""

import collections
import functools
import math
import re
from pathlib import Path

import jax

CATEGORIES = ('matmul', 'attention', 'kernel', 'gather/scatter/sort', 'collective', 'copy',
              'elementwise', 'control')
_COLLECTIVES = {'all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all',
                'ragged-all-to-all', 'collective-permute', 'collective-broadcast', 'send',
                'recv'}
_LAYOUT = {'copy', 'transpose', 'bitcast', 'reshape', 'broadcast', 'slice', 'concatenate',
           'dynamic-slice', 'dynamic-update-slice', 'pad', 'tuple', 'get-tuple-element',
           'parameter', 'constant', 'iota', 'copy-start', 'copy-done', 'reverse'}
_CONTROL = {'while', 'conditional', 'call'}  # their bodies' instructions are traced
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.-]+) .*\{$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.-]+) = (.*)$')
_OPCODE = re.compile(r' ([a-z][a-z0-9-]*)\(')
_CALLS = re.compile(r'(?:calls|to_apply|body)=%?([\w.-]+)')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _custom_call_kind(target: str) -> str:
  target = target.lower()
  if 'fmha' in target or 'flash' in target or 'attention' in target:
    return 'attention'
  if 'gemm' in target or 'matmul' in target or 'cublas' in target or 'conv' in target:
    return 'matmul'  # as the `dot` and `convolution` instructions
  if 'topk' in target or 'sort' in target:
    return 'gather/scatter/sort'
  return 'kernel'  # Pallas (Triton, Mosaic) and other hand-written kernels


def opaque_kernels(hlo_text: str) -> dict[str, int]:
  """{custom-call target: count} of the kernels whose FLOPs XLA's cost analysis cannot
  see: every custom call but sorts and top-k (which do no FLOPs), i.e. Pallas kernels
  (Triton, Mosaic), cuDNN's fused attention and also cuBLAS gemms and cuDNN convolutions
  (on an H200 under jax 0.11.2 the dense 1.6b step, whose matmuls are cuBLAS calls, read
  0.25 XLA / model FLOPs)."""
  return dict(collections.Counter(t for t in _TARGET.findall(hlo_text)
                                  if _custom_call_kind(t) != 'gather/scatter/sort'))


def _kind(opcode: str, rest: str) -> str:
  base = opcode.removesuffix('-start').removesuffix('-done')
  if opcode in ('dot', 'convolution', 'ragged-dot'):
    return 'matmul'
  if opcode == 'custom-call':
    target = _TARGET.search(rest)
    return _custom_call_kind(target.group(1) if target else '')
  if opcode in ('gather', 'scatter', 'sort', 'topk'):
    return 'gather/scatter/sort'
  if base in _COLLECTIVES:
    return 'collective'
  if opcode in _CONTROL:
    return 'control'
  if opcode in _LAYOUT:
    return 'copy'
  return 'elementwise'


def _computations(hlo_text: str) -> tuple[str, str | None, dict[str, list]]:
  """The module's name, its entry computation's, and per computation its instructions as
  (name, opcode, the text after ' = ')."""
  module = re.match(r'HloModule ([\w.-]+)', hlo_text)
  computations, current, entry = collections.defaultdict(list), None, None
  for line in hlo_text.splitlines():
    if (m := _COMPUTATION.match(line)) and ' = ' not in line:
      current = m.group(1)
      entry = current if line.startswith('ENTRY ') else entry
    elif current and (m := _INSTRUCTION.match(line)):
      rest = m.group(2)
      opcode = _OPCODE.search(' ' + rest.split(', metadata=')[0])
      computations[current].append((m.group(1), opcode.group(1) if opcode else '', rest))
  return (module.group(1) if module else ''), entry, computations


def _runs_per_program(entry: str | None, computations: dict[str, list]) -> dict[str, int]:
  """How many times each computation runs in one run of the program: a while loop's body
  as many times as its known trip count (e.g. the microbatches of gradient accumulation),
  what a computation calls as often as it runs. One not reached from the entry (or a
  loop whose trip count XLA does not know) counts once."""
  callers = collections.defaultdict(list)
  for caller, body in computations.items():
    for _, opcode, rest in body:
      if opcode in ('async-update', 'async-done'):
        continue  # the async-start's call stands for the pair
      times = 1
      if opcode == 'while' and (trips := _TRIP_COUNT.search(rest)):
        times = int(trips.group(1))
      for called in _CALLS.findall(rest):
        callers[called].append((caller, times))

  @functools.cache
  def runs(name: str) -> int:
    if name == entry or not callers[name]:
      return 1
    return sum(runs(caller) * times for caller, times in callers[name])
  return {name: runs(name) for name in computations}


def op_kinds(hlo_text: str) -> tuple[str, dict[str, dict]]:
  """The module's name and, per instruction name, its kind and source (`op_name`).

  A fusion or async wrapper takes the most telling kind among the instructions of the
  computations it calls: matmul, attention, kernel, gather/scatter/sort, collective, then
  elementwise, and copy only when it does nothing but move data.
  """
  module, _, computations = _computations(hlo_text)
  order = ('matmul', 'attention', 'kernel', 'gather/scatter/sort', 'collective',
           'elementwise', 'copy')

  def kind_of(opcode, rest, depth=0):
    if opcode not in ('fusion', 'async-start', 'async-update', 'async-done') or depth > 8:
      return _kind(opcode, rest)
    kinds = {kind_of(inner_opcode, inner_rest, depth + 1)
             for called in _CALLS.findall(rest)
             for _, inner_opcode, inner_rest in computations.get(called, ())}
    return next((k for k in order if k in kinds), 'copy')

  instructions = {}
  for body in computations.values():
    for name, opcode, rest in body:
      source = _OP_NAME.search(rest)
      instructions[name] = {'kind': kind_of(opcode, rest),
                            'source': source.group(1) if source else opcode}
  return module, instructions


_SHAPE = re.compile(r'\b([a-z]+\d*)\[([\d,]*)\]')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
          'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
          'c64': 8, 'c128': 16}


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes each device's collectives produce per run of the program, by opcode.

  Counted from the compiled (per-device) HLO: the result of each collective instruction
  (of an asynchronous pair, its `-done`), an instruction in a loop body as many times as
  the loop runs. What crosses the links follows from it: about (n-1)/n of an all-gather's
  result over n devices, twice that for an all-reduce, (n-1)× a reduce-scatter's result.
  """
  _, entry, computations = _computations(hlo_text)
  runs = _runs_per_program(entry, computations)
  total = collections.Counter()
  for computation, body in computations.items():
    for _, opcode, rest in body:
      base = opcode.removesuffix('-done')
      if base not in _COLLECTIVES or opcode.endswith('-start') or base in ('send', 'recv'):
        continue
      head = ' ' + rest.split(', metadata=')[0]
      result = head[:_OPCODE.search(head).start()]
      total[base] += runs[computation] * sum(
          _BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(',') if d)
          for dtype, dims in _SHAPE.findall(result))
  return dict(sorted(total.items()))


def _trace_file(trace_dir: str | Path) -> Path:
  files = sorted(Path(trace_dir).glob('**/*.xplane.pb'), key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f'no *.xplane.pb under {trace_dir}: was it written by '
                            'jax.profiler.trace?')
  return files[-1]


def _union(intervals: list[tuple[int, int]]) -> int:
  total, end = 0, None
  for start, stop in sorted(intervals):
    if end is None or start > end:
      total, end = total + stop - start, stop
    elif stop > end:
      total, end = total + stop - end, stop
  return total


def instruction_events(space, module: str, kinds: dict) -> dict[str, list]:
  """Per trace plane, the (instruction, start_ns, end_ns) of `module`'s instructions."""
  per_plane = collections.defaultdict(list)
  for plane in space.planes:
    lines = list(plane.lines)
    # A device plane may hold both the kernels (per stream) and, derived from them, one
    # event per instruction on its "XLA Ops" line: count the instructions once.
    ops_lines = [line for line in lines if line.name == 'XLA Ops']
    for line in ops_lines or lines:
      for event in line.events:
        stats = dict(event.stats)
        if stats.get('hlo_module', module) != module:
          continue
        name = stats.get('hlo_op', event.name)
        if name in kinds and kinds[name]['kind'] != 'control':
          start = int(event.start_ns)
          per_plane[plane.name].append((name, start, start + int(event.duration_ns)))
  return per_plane


def digest(trace_dir: str | Path, hlo_text: str, steps: int, *, top: int = 10,
           num_devices: int | None = None) -> dict:
  """Device time per step of the program `hlo_text` in the newest trace under `trace_dir`.

  Returns `op_s` (summed instruction time per device and step), `busy_s` (the time any
  instruction ran), `exposed_collective_s`, `kinds` (share of `op_s` per kind) and the
  `top` instructions with their share, kind and source.
  """
  module, kinds = op_kinds(hlo_text)
  space = jax.profiler.ProfileData.from_file(str(_trace_file(trace_dir)))
  per_plane = instruction_events(space, module, kinds)
  # A GPU's kernels are on its device planes; host planes then only hold launches.
  device_planes = [p for p in per_plane if p.startswith('/device:')]
  planes = device_planes or list(per_plane)
  if not planes:
    raise ValueError(f'the trace under {trace_dir} holds no instruction of {module}')
  num_devices = num_devices or (len(device_planes) or jax.local_device_count())
  per_op = collections.Counter()
  calls = collections.Counter()
  busy = exposed = 0
  for plane in planes:
    events = per_plane[plane]
    for name, start, stop in events:
      per_op[name] += stop - start
      calls[name] += 1
    everything = _union([(s, e) for _, s, e in events])
    busy += everything
    exposed += everything - _union(
        [(s, e) for n, s, e in events if kinds[n]['kind'] != 'collective'])
  total = sum(per_op.values())
  by_kind = collections.Counter()
  for name, ns in per_op.items():
    by_kind[kinds[name]['kind']] += ns
  per_step = lambda ns, over: ns / 1e9 / steps / over
  return {
      'steps': steps, 'devices': num_devices,
      'op_s': per_step(total, num_devices),
      'busy_s': per_step(busy, len(planes)),
      'exposed_collective_s': per_step(exposed, len(planes)),
      'kinds': {k: by_kind[k] / total for k in CATEGORIES if by_kind[k]},
      'top_ops': [{'op': name, 'kind': kinds[name]['kind'], 'share': ns / total,
                   'calls_per_step': calls[name] / steps / num_devices,
                   'source': kinds[name]['source'][:120]}
                  for name, ns in per_op.most_common(top)],
  }


def kind_shares(result: dict, *, top: int | None = None, least: float = 0.0) -> str:
  """The kinds by their share of device time, largest first: 'matmul 61%, copy 9%'."""
  kinds = sorted(result['kinds'].items(), key=lambda kv: -kv[1])[:top]
  return ', '.join(f'{k} {100 * v:.0f}%' for k, v in kinds if v >= least)


# Below this share of the step named, the digest describes too little of it to say what
# limits the step. Seen on an H200: 1% of a MoE step, the rest run as XLA's command buffers
# (CUDA graphs), whose kernels the trace does not attribute to instructions.
LEAST_NAMED = 0.5


def named_too_little(result: dict) -> float | None:
  """The share of the step a digest names, where it is below `LEAST_NAMED` (else None)."""
  named = result.get('of_step', 1.0)
  return named if named < LEAST_NAMED else None


def summary(result: dict) -> str:
  """One line: the kinds by their share of device time."""
  named = named_too_little(result)
  return (f'device time {1e3 * result["op_s"]:,.1f} ms per step and device: '
          + kind_shares(result, least=0.005)
          + (f'; collectives exposed {1e3 * result["exposed_collective_s"]:,.1f} ms'
             if result['exposed_collective_s'] > 0 else '')
          + (f'; only {100 * named:.0f}% of the step is named by instruction (on a GPU '
             'profile with XLA_FLAGS=--xla_gpu_enable_command_buffer= : CUDA graphs hide '
             'the instructions in them)' if named is not None else ''))
