"""The training loop: mesh → data → sharded state → restore → {step, log, eval, save}.

Everything family-specific reaches this loop through the model (its sown `aux_loss`
values, its parameter metadata), never through branches on `model.family`.
"""

import json
import logging
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxarch import config as config_lib
from jaxarch import data
from jaxarch.parallel import global_batch, make_mesh
from jaxarch.train import flops
from jaxarch.train.checkpoint import Checkpointer
from jaxarch.train.optimizer import learning_rate_schedule
from jaxarch.train.metrics import MetricsWriter, ProgressBar, Stopwatch, format_metrics
from jaxarch.train.state import TrainSetup, init_state, make_setup
from jaxarch.train.step import make_eval_step, make_train_step, summarize_eval

log = logging.getLogger(__name__)


def _tokenizer(cfg: ml_collections.ConfigDict):
  tokenizer = data.get_tokenizer(cfg.data.tokenizer)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise config_lib.ConfigError(
        f'config error: model.vocab_size={cfg.model.vocab_size} is smaller than the '
        f'vocabulary of data.tokenizer={cfg.data.tokenizer!r} ({tokenizer.vocab_size})')
  return tokenizer


def _byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
  lengths = np.zeros(vocab_size, np.float32)
  lengths[:tokenizer.vocab_size] = tokenizer.byte_lengths
  return lengths


def run_eval(cfg, setup: TrainSetup, state: dict, eval_step) -> dict:
  """Loss and bits per byte over `log.eval_batches` batches of the validation split."""
  batches = data.make_eval_dataset(
      cfg.data, batch_size=cfg.train.batch_size, num_batches=cfg.log.eval_batches,
      process_index=jax.process_index(), process_count=jax.process_count())
  totals = {'nll': 0.0, 'tokens': 0.0, 'bytes': 0.0}
  for batch in batches:
    out = jax.device_get(eval_step(state, global_batch(batch, setup.batch_sharding)))
    totals = {k: totals[k] + float(out[k]) for k in totals}
  return summarize_eval(totals)


def train(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final metrics."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = make_mesh(cfg)
  tokenizer = _tokenizer(cfg)
  setup = make_setup(cfg, mesh)
  config_lib.save(cfg, workdir / 'config.json')

  train_data = data.make_train_dataset(
      cfg.data, seed=cfg.train.seed, global_batch_size=cfg.train.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  data_iter = iter(train_data)
  checkpointer = Checkpointer(workdir, keep=cfg.checkpoint.keep,
                              async_save=cfg.checkpoint.async_save)
  state, restored_step = checkpointer.restore(setup.abstract_state, data_iter)
  if state is None:
    state = init_state(cfg, setup)
  start = int(state['step'])

  train_step = make_train_step(setup, z_loss=cfg.train.z_loss)
  eval_step = make_eval_step(setup, _byte_lengths(tokenizer, cfg.model.vocab_size))
  writer = MetricsWriter(workdir, tensorboard=cfg.log.tensorboard)
  flops_per_token = flops.train_flops_per_token(cfg.model, setup.param_counts,
                                                cfg.data.seq_len)
  device_kind = jax.devices()[0].device_kind
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  schedule = learning_rate_schedule(cfg.train)

  final = {}
  with ProgressBar(cfg.train.steps, start, enabled=cfg.log.progress) as bar:
    c = setup.param_counts
    bar.print(f'{cfg.model.family} model: {c["total"]:,} parameters ({c["active"]:,} active '
              f'per token), mesh {dict(mesh.shape)}, {jax.device_count()} × {device_kind}')
    if restored_step is not None:
      bar.print(f'resumed from {checkpointer.directory / str(restored_step)}')
    pending, watch, steps_timed = [], None, 0
    for step in range(start + 1, cfg.train.steps + 1):
      batch = global_batch(next(data_iter), setup.batch_sharding)
      state, metrics = train_step(state, batch)
      pending.append(metrics)

      if step % cfg.log.every_steps == 0 or step == cfg.train.steps:
        averaged = {k: float(np.mean([m[k] for m in jax.device_get(pending)]))
                    for k in pending[0]}
        averaged.pop('tokens', None)
        if watch is None:  # the first interval includes compilation: not timed
          watch = Stopwatch()
        else:
          seconds = watch.lap()
          steps_timed = len(pending)
          averaged['step_time_s'] = seconds / steps_timed
          averaged['tokens_per_s'] = tokens_per_step * steps_timed / seconds
          averaged['mfu'] = flops.mfu(averaged['tokens_per_s'] * flops_per_token,
                                      jax.device_count(), device_kind)
        averaged['lr'] = float(schedule(step - 1))  # optax counts updates from 0
        pending = []
        final.update(averaged)
        if step % cfg.log.eval_every_steps == 0 or step == cfg.train.steps:
          averaged.update(run_eval(cfg, setup, state, eval_step))
          final.update(averaged)
          bar.print(f'step {step}: {format_metrics(averaged)}')
          if watch is not None:
            watch.lap()  # eval time is not training throughput
        writer.write(step, {k: v for k, v in averaged.items() if v is not None})
        bar.update(step, averaged)

      if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.steps:
        checkpointer.save(step, state, data_iter, force=True)
  checkpointer.close()
  writer.close()
  final['step'] = int(state['step'])
  return final


def evaluate(cfg: ml_collections.ConfigDict, workdir: str | Path, *,
             step: int | None = None) -> dict:
  """Validation loss and bits per byte of the run's latest (or given) checkpoint."""
  mesh = make_mesh(cfg)
  tokenizer = _tokenizer(cfg)
  setup = make_setup(cfg, mesh)
  checkpointer = Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=False)
  state, restored = checkpointer.restore(setup.abstract_state, step=step)
  checkpointer.close()
  if state is None:
    raise FileNotFoundError(f'no checkpoint in {Path(workdir) / "checkpoints"}; train first '
                            f'with `jaxarch train --workdir={workdir}`')
  eval_step = make_eval_step(setup, _byte_lengths(tokenizer, cfg.model.vocab_size))
  result = {'step': restored, **run_eval(cfg, setup, state, eval_step)}
  (Path(workdir) / f'eval_{restored}.json').write_text(json.dumps(result, indent=2))
  return result
