"""Train-step throughput of a config: tokens/s, step time, TFLOP/s per device and MFU.

The jitted, sharded train step of the trainer runs on synthetic tokens (the data pipeline
is measured by its own tests): `warmup` steps that include compilation, then `steps`
timed ones dispatched back to back, as the trainer runs them (it waits for the device
only when it logs): the step time is their wall time over `steps`. The same steps are
also timed one by one, each waited for (min, median, max); the median's excess over the
step time, `dispatch_gap_s`, is the host's time between two steps (launching the program
with its hundreds of buffers), which back-to-back dispatch hides. FLOPs follow
`jaxarch.train.flops` (6·N_active per token plus causal attention at half), MFU is
against the peak bf16 FLOP/s of the device kind (None where unknown, e.g. CPU). XLA's
cost analysis of the compiled step gives the FLOPs it executes per device, over the model
FLOPs: above 1 by rematerialisation, elementwise work and any expansion (e.g.
`ragged_dot` computing every expert). It counts a loop's body once: with
`train.grad_accum_steps=A` its figure is taken A times, as the microbatch loop runs
(the update after the loop, a few FLOPs per parameter, then counts A times too). Of a
step whose layers are scanned (`model.scan_layers`) it would count one period of blocks:
there it is left out (None).
Collective bytes count each collective as often as it runs, in a loop too. The analysis
does not see inside kernels that XLA calls opaquely (Pallas' Triton or Mosaic kernels,
cuDNN attention, and on a GPU cuBLAS's matmuls too): `opaque_kernels` counts them, and
where there are some the ratio leaves their FLOPs out. With `profile_dir`, a
`jax.profiler` trace of `profile_steps` more steps is written there (open it with
TensorBoard's profile plugin or Perfetto) and digested by `jaxarch.train.profile`: the
device time per step by kind of instruction (matmul, attention, collective, ...), and
`of_step`, the share of the step it names.
"""

import statistics
import time
from pathlib import Path

import jax
import ml_collections

from jaxarch import config as config_lib
from jaxarch.data import synthetic_batch
from jaxarch.parallel import data_shard, global_batch, make_mesh
from jaxarch.train import flops, profile
from jaxarch.train.memory import check_state_fits
from jaxarch.train.state import describe, init_state, make_setup
from jaxarch.train.step import make_train_step


def measure(cfg: ml_collections.ConfigDict, *, steps: int = 10, warmup: int = 2,
            profile_dir: str | Path | None = None, profile_steps: int = 3) -> dict:
  """Times the train step of `cfg`; returns the numbers (and the trace's directory)."""
  if steps < 1 or warmup < 1:
    raise ValueError(f'throughput: steps={steps} and warmup={warmup} must be >= 1 (the '
                     'first warm-up step compiles)')
  config_lib.check_train_precision(cfg.model)  # a step `train` refuses is timed for none
  setup = make_setup(cfg, make_mesh(cfg))
  check_state_fits(cfg, setup)
  state = init_state(cfg, setup)
  step = make_train_step(setup)
  batches = [_global_synthetic_batch(cfg, setup, i) for i in range(2)]
  start = time.perf_counter()
  for i in range(warmup):
    state, metrics = step(state, batches[i % 2])
  jax.block_until_ready(metrics)
  warmup_s = time.perf_counter() - start
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batches[i % 2])
    jax.block_until_ready(metrics['loss'])
    times.append(time.perf_counter() - start)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, batches[i % 2])
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / steps
  compiled = step.lower(state, batches[0]).compile()  # the executable above, from the cache
  hlo = compiled.as_text()
  result = {}
  if profile_dir is not None:
    with jax.profiler.trace(str(profile_dir)):
      for i in range(profile_steps):
        with jax.profiler.StepTraceAnnotation('train', step_num=i):
          state, metrics = step(state, batches[i % 2])
      jax.block_until_ready(metrics['loss'])
    result['profile_dir'] = str(profile_dir)
    try:  # the trace is kept either way; a digest it cannot read costs the digest only
      result['profile'] = profile.digest(profile_dir, hlo, profile_steps)
    except Exception as e:  # pylint: disable=broad-except
      result['profile_error'] = f'{type(e).__name__}: {e}'
  if 'profile' in result:  # the share of the step that the trace names instructions for
    result['profile']['of_step'] = result['profile']['busy_s'] / step_s
  tokens = cfg.train.batch_size * cfg.data.seq_len
  per_token = flops.train_flops_per_token(cfg.model, setup.param_counts, cfg.data.seq_len)
  device = jax.devices()[0]
  achieved = per_token * tokens / step_s
  xla_flops = flops.compiled_flops(compiled)
  if xla_flops is not None:  # the analysis counts the microbatch loop's body once
    xla_flops *= cfg.train.grad_accum_steps
  if cfg.model.get('scan_layers'):  # and a scanned stack's body once: no figure, not a
    xla_flops = None                # fraction of one
  return {
      **describe(cfg, setup), 'warmup_s': warmup_s, 'step_time_s': step_s,
      'step_time_waited_min_s': min(times), 'step_time_waited_max_s': max(times),
      'step_time_waited_median_s': statistics.median(times),
      'dispatch_gap_s': max(0.0, statistics.median(times) - step_s),
      'tokens_per_s': tokens / step_s, 'flops_per_token': per_token,
      'model_tflops_per_device': achieved / jax.device_count() / 1e12,
      'mfu': flops.mfu(achieved, jax.device_count(), device.device_kind),
      'xla_flops_per_device': xla_flops,
      'collective_bytes_per_device': profile.collective_bytes(hlo),
      'xla_flops_over_model': (None if xla_flops is None else
                               xla_flops * jax.device_count() / (per_token * tokens)),
      'opaque_kernels': profile.opaque_kernels(hlo),
      'final_loss': float(metrics['loss']), **result,
  }


def _global_synthetic_batch(cfg: ml_collections.ConfigDict, setup, seed: int) -> dict:
  """A synthetic batch of train.batch_size rows over the whole job. Every process draws the
  same rows and passes on its share, as the trainer's data loader does: given all of them,
  `global_batch` would build a batch as many times larger as there are processes."""
  rows = synthetic_batch(cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size, seed)
  index, count = data_shard(setup.batch_sharding, cfg.train.batch_size)
  share = cfg.train.batch_size // count
  return global_batch({k: v[index * share:(index + 1) * share] for k, v in rows.items()},
                      setup.batch_sharding)


def summary(result: dict) -> str:
  """One line for the terminal (two with a profile)."""
  mfu, ratio = result['mfu'], result['xla_flops_over_model']
  line = (f'{result["family"]} {result["params_active"] / 1e6:,.1f}M active, batch '
          f'{result["batch_size"]} x {result["seq_len"]} on {result["num_devices"]} x '
          f'{result["device_kind"]}: {1e3 * result["step_time_s"]:,.1f} ms/step, '
          f'{result["tokens_per_s"]:,.0f} tokens/s, '
          f'{result["model_tflops_per_device"]:.2f} TFLOP/s per device, MFU '
          + ('n/a (no peak known for this device)' if mfu is None else f'{100 * mfu:.1f}%')
          + ('' if ratio is None else f'; XLA executes {ratio:.2f}x the model FLOPs')
          + (' (not counting its opaque kernels)' if ratio and result['opaque_kernels'] else ''))
  return line + (f'\n{profile.summary(result["profile"])}' if 'profile' in result else '')
