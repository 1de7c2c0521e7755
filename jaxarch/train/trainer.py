"""The training loop: mesh → data → sharded state → restore → {step, log, eval, save}.

Everything family-specific reaches this loop through the model (its sown `aux_loss`
values, its parameter metadata), never through branches on `model.family`.
"""

import contextlib
import hashlib
import json
import logging
import math
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxarch import config as config_lib
from jaxarch import data
from jaxarch.layers.moe import load_violations
from jaxarch.layers.signals import is_window_metric
from jaxarch.models.transformer import scanned_layers
from jaxarch.parallel import data_shard, global_batch, make_mesh
from jaxarch.train import flops
from jaxarch.train.checkpoint import Checkpointer, CheckpointError, sync_processes
from jaxarch.train.memory import check_state_fits
from jaxarch.train.metrics import (InputWait, MetricsWriter, ProgressBar, Stopwatch,
                                   final_metrics, standard_json)
from jaxarch.train.nonfinite import NonFiniteMonitor
from jaxarch.train.optimizer import group_learning_rates, learning_rate_schedule
from jaxarch.train.preemption import StopRequests
from jaxarch.train.pretrained import initial_state, mesh_here
from jaxarch.train.state import MODEL, TrainSetup, make_setup
from jaxarch.train.step import (leaf_names, make_eval_step, make_train_step,
                                make_window_reset, summarize_eval, summarize_mixture_eval)
from jaxarch.train.workdir import (CHECKPOINTS, check_same_model, check_workdir,
                                   local_workdir, only_trainer_in, remove_unused, state_bytes,
                                   unwritable)


def _eval_step(cfg: ml_collections.ConfigDict, setup: TrainSetup):
  """Eval step counting each target's bytes, for bits per byte under any tokenizer."""
  lengths = np.zeros(cfg.model.vocab_size, np.float32)
  tokenizer = data.model_tokenizer(cfg)
  n = min(tokenizer.vocab_size, cfg.model.vocab_size)  # special ids past the rows: no text
  lengths[:n] = tokenizer.byte_lengths[:n]
  return make_eval_step(setup, lengths)


# One file of each kind a run writes in its workdir, which its data must not take.
_RUN_FILES = ('config.json', 'metrics.jsonl', config_lib.TOKENIZER_SUM, 'eval_1.json',
              f'{CHECKPOINTS}/1/state/manifest.ocdbt', 'tensorboard/events.out.tfevents.1')


def eval_batches(cfg: ml_collections.ConfigDict, setup: TrainSetup):
  """The first `log.eval_batches` validation batches, the same on every pass: this
  process's rows of them."""
  index, count = data_shard(setup.batch_sharding, cfg.train.batch_size)
  return data.make_eval_dataset(
      cfg.data, batch_size=cfg.train.batch_size, num_batches=cfg.log.eval_batches,
      process_index=index, process_count=count, num_threads=cfg.data.get('num_threads', 0))


# What decides which documents go into which rows: if one changes, a saved data position
# means other documents (e.g. another batch size, another number of packing streams).
_DATA_LAYOUT = ('train.batch_size', 'train.seed',
                *(f'data.{k}' for k in data.pipeline.LAYOUT_KEYS))
# What a run saved before a key of the layout read as it (documents started with a BOS).
_LAYOUT_BEFORE = {'data.add_bos': True}


def data_changes(workdir: Path, cfg: ml_collections.ConfigDict) -> str | None:
  """What of `_DATA_LAYOUT` changed since the run in `workdir` was saved, e.g.
  'train.batch_size 32 -> 64', or None (same, or no saved run). The run's own files are
  compared by their names in the run (`config_lib.RUN_FILES`), which a move keeps. The
  same trained sources with new weights, or with eval sets added or dropped, or their text
  key given otherwise, are no change (`config.reweighted`)."""
  saved = workdir / 'config.json'
  if not saved.exists():
    return None
  try:
    old = json.loads(saved.read_text())
  except (OSError, ValueError):
    old = None
  if not isinstance(old, dict):  # its data position cannot be trusted either
    return f'the data layout (unknown: {saved} is unreadable)'
  new = json.loads(json.dumps(config_lib.to_dict(cfg)))
  old, new = (config_lib.run_files(tree, workdir, config_lib.run_file_name)
              for tree in (old, new))

  def get(tree, key):
    section, name = key.split('.')
    values = tree.get(section)
    return values.get(name, _LAYOUT_BEFORE.get(key)) if isinstance(values, dict) else None

  alike = config_lib.reweighted(get(old, 'data.source'), get(new, 'data.source'),
                                get(old, 'data.text_key'), get(new, 'data.text_key'))
  changes = [f'{k} {get(old, k)} -> {get(new, k)}' for k in _DATA_LAYOUT
             if get(old, k) != get(new, k) and not (
                 k in ('data.source', 'data.text_key') and alike)
             and not (k == 'data.tokenizer'
                      and config_lib.is_runs_tokenizer(cfg.data.tokenizer, workdir))]
  if changes and (hint := _source_hint(get(old, 'data.source'), get(new, 'data.source'))):
    changes.append(hint)
  return ', '.join(changes) or None


def _source_hint(old_source, new_source) -> str | None:
  """How the data position would have held under a `data.source` that no longer keeps it:
  the same trained sources in another order, or some of them no longer trained on."""
  try:
    old, new = (config_lib.trained_sources(s) for s in (old_source, new_source))
  except (config_lib.ConfigError, TypeError, AttributeError):  # (a hand-edited config.json)
    return None
  if old != new and sorted(old) == sorted(new):
    return ('(the same sources trained on, in another order: keep their order to keep the '
            'position)')
  gone = [s for s in old if s not in new]
  if gone and new and [s for s in old if s in new] == new:  # the others, in their order
    return (f'(no longer trained on: {", ".join(gone)}; at a tiny weight such as 1e-6 '
            'instead, each source would keep its position)')
  return None


def _saved_config(workdir: Path) -> ml_collections.ConfigDict | None:
  """The config the run in `workdir` was saved with, or None where it cannot be read
  (`data_changes` says so)."""
  try:
    return config_lib.load_json(workdir / 'config.json')
  except (config_lib.ConfigError, OSError, ValueError):
    return None


def _best_across_weights(workdir: Path, cfg: ml_collections.ConfigDict) -> str | None:
  """What keeping the best checkpoint means if the run resumes on its mixture's sources
  with new weights (`config.reweighted`), or None: the mixture's eval_loss weighs the
  sources by the weights of the day."""
  if (saved_cfg := _saved_config(workdir)) is None:
    return None
  saved = saved_cfg.data.source
  weights = lambda source: [c.weight for c in config_lib.data_mixture(source) or ()
                            if c.weight > 0] or [1.0]  # of the sources trained on
  if not config_lib.reweighted(saved, cfg.data.source) or (
      weights(saved) == weights(cfg.data.source)):
    return None
  return (f'data.source mixes its sources by new weights ({saved!r} -> '
          f'{cfg.data.source!r}): eval_loss now weighs their losses by the new shares, and '
          'checkpoint.keep_best ranks it with the evaluations before the change; compare '
          'the eval_loss/NAME of each source instead')


def _schedule_moved(workdir: Path, cfg: ml_collections.ConfigDict, step: int) -> str | None:
  """What resuming with other `train` keys does to the learning rate of the next step, or
  None (the same rate): a schedule spans `train.steps`, so a cosine run given more steps
  climbs back up its curve, which a user extending a run may not expect."""
  if (saved := _saved_config(workdir)) is None:
    return None
  # optax counts updates from 0: the next step's rate is the schedule's at `step`.
  before, after = (float(learning_rate_schedule(c.train)(step)) for c in (saved, cfg))
  changed = config_lib.differences(saved.train.to_dict(), cfg.train.to_dict(), 'train.')
  keys = [f'{k} {was} -> {now}' for k, was, now in changed]  # groups' lr_multiplier too
  since = f'{", ".join(keys) or "the train keys"} since the checkpoint: step {step + 1} trains'
  if not math.isclose(before, after, rel_tol=1e-3, abs_tol=1e-12):
    return (f'{since} at a learning rate of {after:.3g} where the run was at {before:.3g} (the '
            'schedule spans train.steps; a cosine run given more steps climbs back up its '
            "curve, while train.schedule='wsd' is made to be extended)")
  # A group's multiplier (UltraMem's values: 4x decaying to 1x) spans train.steps too,
  # whatever the schedule.
  groups = [group_learning_rates(c.train) for c in (saved, cfg)]
  for name in sorted(set(groups[0]) & set(groups[1])):
    before, after = (float(g[name](step)) for g in groups)
    if not math.isclose(before, after, rel_tol=1e-3, abs_tol=1e-12):
      why = (' (its lr_multiplier decays over train.steps, with any schedule)'
             if 'train.steps' in {k for k, *_ in changed} else '')
      return (f'{since} train.groups.{name} at a learning rate of {after:.3g} where the run '
              f'was at {before:.3g}{why}')
  return None


def no_validation_data(cfg: ml_collections.ConfigDict, batches) -> str | None:
  """Why the run has nothing to evaluate on, or None: its validation `batches`
  (`eval_batches`) are none (a corpus of few files, split by file, may put none in
  validation), and what would give it some: `data.validation_fraction` splits the files of
  `default` and `files:` sources, and the train records of a TFDS dataset that has no
  validation or test split."""
  if next(iter(batches), None) is not None:
    return None
  source = cfg.data.source
  if config_lib.data_mixture(source):
    why = ('none of its sources has any: data.validation_fraction='
           f'{cfg.data.get("validation_fraction")} of their files or records is none; raise '
           'the fraction')
  elif source.startswith('tfds:'):
    why = ("its TFDS splits include no 'validation' or 'test', and data.validation_fraction="
           f"{cfg.data.get('validation_fraction')} of its train records is none; raise the "
           'fraction')
  elif source.startswith(data.sources.DISTILLED):
    why = 'distill it again with --validation_prompts above 0'
  else:
    why = (f'data.validation_fraction={cfg.data.get("validation_fraction")} of its files; '
           'raise the fraction or add files')
  return f'data.source={source!r} has no validation data ({why})'


def no_trained_validation(batches) -> str | None:
  """Why a mixture's evaluation gives no eval_loss although it evaluates some source, or
  None: none of the sources it trains on has validation data, only sources of weight 0."""
  if not isinstance(batches, data.MixtureEvalBatches):
    return None
  trained = [name for name, weight in batches.weights.items() if weight > 0]
  if any(next(iter(batches.components[name]), None) is not None for name in trained):
    return None
  return (f'none of the sources data.source trains on ({", ".join(trained)}) has validation '
          'data: the run reports the eval_loss/NAME of the sources it evaluates only, and no '
          'eval_loss (checkpoint.keep_best keeps no best, sweeps fit the training loss); '
          'raise data.validation_fraction')


def run_eval(setup: TrainSetup, state: dict, eval_step, batches) -> dict:
  """Loss and bits per byte over the validation batches; of a mixture's, those of each
  source and of the mixture (`summarize_mixture_eval`)."""
  if isinstance(batches, data.MixtureEvalBatches):
    return summarize_mixture_eval(
        {name: _eval_totals(setup, state, eval_step, source)
         for name, source in batches.components.items()}, batches.weights)
  return summarize_eval(_eval_totals(setup, state, eval_step, batches))


def _eval_totals(setup: TrainSetup, state: dict, eval_step, batches) -> dict:
  """The eval step's sums over the batches, in float64 (a BiTA run's per mask too)."""
  totals = {'nll': 0.0, 'tokens': 0.0, 'bytes': 0.0}
  for batch in batches:
    out = jax.device_get(eval_step(state, global_batch(batch, setup.batch_sharding)))
    totals = {k: totals.get(k, 0.0) + np.asarray(v, np.float64) for k, v in out.items()}
  return {k: float(v) if np.ndim(v) == 0 else v for k, v in totals.items()}


def train(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final metrics.

  SIGTERM or SIGINT ends it after the current step with a checkpoint (the result then
  has `stopped`: the signal); the same call resumes it.
  """
  workdir = local_workdir(workdir)
  new = not workdir.exists()
  try:
    # From the start: a job preempted while it builds or restores its state (minutes for a
    # large one) stops once that is done, saying so, instead of dying of the signal.
    with StopRequests(sync_every=cfg.log.every_steps) as stop:
      return _train(cfg, workdir, stop)
  except BaseException:
    if new:  # a start that failed (a missing corpus) leaves no empty run behind
      remove_unused(workdir)
    raise


def _train(cfg: ml_collections.ConfigDict, workdir: Path, stop: StopRequests) -> dict:
  for warning in filter(None, [config_lib.check_train_precision(cfg.model),
                               *config_lib.unused_settings(cfg.model)]):
    logging.warning('jaxarch: %s', warning)
  setup = make_setup(cfg, make_mesh(cfg))
  had_checkpoints = Checkpointer.exists(workdir)
  check_workdir(workdir, cfg, state_bytes(setup.abstract_state),
                has_checkpoints=had_checkpoints)
  if taken := data.files_taken_from(cfg.data, workdir, _RUN_FILES):
    raise config_lib.ConfigError(
        f'config error: data.source {taken[0]!r} takes the files this run writes in its '
        f'workdir (e.g. {taken[1]}): its metrics, config and checkpoints would become '
        'training data; give a --workdir outside the glob, or narrow the glob')
  check_state_fits(cfg, setup)
  eval_step = _eval_step(cfg, setup)

  index, count = data_shard(setup.batch_sharding, cfg.train.batch_size)
  # Closed however the run ends (an unclosed iterator's read threads abort the interpreter
  # at exit); pending async saves complete even when the loop dies, so the last
  # checkpoint stands.
  with contextlib.ExitStack() as cleanup:
    cleanup.enter_context(only_trainer_in(workdir))
    data_iter = iter(data.make_train_dataset(
        cfg.data, seed=cfg.train.seed, global_batch_size=cfg.train.batch_size,
        process_index=index, process_count=count, run_dir=workdir,
        num_threads=cfg.data.get('num_threads', 0)))
    cleanup.callback(data_iter.close)
    checkpointer = Checkpointer(workdir, keep=cfg.checkpoint.keep,
                                keep_best=cfg.checkpoint.keep_best,
                                async_save=cfg.checkpoint.async_save,
                                remove_interrupted=True)  # the workdir's only trainer
    cleanup.callback(checkpointer.close)
    changed = data_changes(workdir, cfg)
    state, restored_step = checkpointer.restore(
        setup.abstract_state, None if changed else data_iter, move_aside=True)
    if state is None and had_checkpoints:
      raise CheckpointError(f'no checkpoint in {checkpointer.directory} could be restored '
                            f'(all moved to {workdir / "corrupt_checkpoints"}, see the warnings '
                            'above); run again to train from step 0, or restore one by hand')
    if restored_step is not None and restored_step > cfg.train.steps:
      raise config_lib.ConfigError(
          f'config error: train.steps={cfg.train.steps} is below the step of the run in '
          f'{workdir} ({restored_step}); raise it to train on, or use a new --workdir')
    if state is None:
      state = initial_state(cfg, setup)
      _save_config(cfg, workdir)  # a new run's now; a resumed run's with its first save
    # The steps logged after the checkpoint run again: their records are forgotten.
    writer = MetricsWriter(workdir, tensorboard=cfg.log.tensorboard,
                           after_step=restored_step or 0)
    cleanup.callback(writer.close)
    with ProgressBar(cfg.train.steps, int(state['step']), enabled=cfg.log.progress) as bar:
      c = setup.param_counts
      trained = ('' if c['trained'] == c['total'] else
                 f', {c["trained"]:,} trained ({c["trained"] / c["total"]:.3%})')
      bar.print(f'{cfg.model.family} model{_blocks_of(cfg.model)}: {c["total"]:,} parameters '
                f'({c["active"]:,} active per token{trained}{scanned_layers(cfg.model)}), '
                f'mesh {dict(setup.mesh.shape)}, {jax.device_count()} × '
                f'{jax.devices()[0].device_kind}')
      if restored_step is not None:
        bar.alert(f'resumed from {checkpointer.directory / str(restored_step)}')
        if checkpointer.relaid:
          saved, wanted = checkpointer.relaid
          bar.alert(f'its layers were saved {saved}: read {wanted}, as model.scan_layers='
                    f'{bool(cfg.model.get("scan_layers"))} says; the next checkpoints hold '
                    f'them {wanted}')
        if changed:
          bar.alert(f'{changed} since the checkpoint: its data position does not apply; '
                    'the data iterators start afresh')
        elif cfg.checkpoint.keep_best and (reweighted := _best_across_weights(workdir, cfg)):
          bar.alert(reweighted)
        if restored_step and (moved := _schedule_moved(workdir, cfg, restored_step)):
          bar.alert(moved)
      # A signal while starting: nothing trained, nothing to save. Asked at the step training
      # starts from, as the loop asks after each step from there.
      if stop.should_stop(int(state['step'])):
        kept = (f'checkpoint {checkpointer.directory / str(restored_step)} is unchanged'
                if restored_step is not None else 'no checkpoint was written yet')
        bar.alert(f'jaxarch: {stop.received}: stopped before training; {kept}; run the same '
                  'command to resume')
        return {'stopped': stop.received, 'step': int(state['step'])}
      return _loop(cfg, workdir, setup, state, data_iter, eval_step, checkpointer, writer,
                   bar, stop)


# The run state saved with each checkpoint: the non-finite steps in a row that end it.
_IN_A_ROW = 'nonfinite_steps_in_a_row'

# Per-step metrics that are read by the trainer itself, not logged.
_UNLOGGED = ('tokens', 'nonfinite', 'layer_grad_norms', 'layer_param_norms')


def _nonfinite_in_a_row(cfg, checkpointer: Checkpointer, step: int, bar) -> int:
  """The non-finite steps in a row that ended checkpoint `step` (a new run's: 0).

  Where the checkpoint's run state is lost (its _CHECKPOINT_METADATA is damaged; its
  arrays, verified by their checksums, and its data position are still restored), the
  count is unknown: it starts again from 0, and under train.nonfinite=skip, where it
  counts, the user is told. That is the safe choice: a skipped step leaves the weights as
  they were, so a diverging run skips at most train.max_consecutive_skips more steps
  before it stops; the previous checkpoint would lose every step since it, and assuming
  the worst count would stop a run whose next step is bad at each resume, for good.
  (Under `stop` the count saved is always 0: a non-finite step ends the run unsaved.)
  """
  if not step:
    return 0
  run_state = checkpointer.run_state(step)
  count = None if run_state is None else run_state.get(_IN_A_ROW, 0)
  if isinstance(count, int) and count >= 0:
    return count
  if cfg.train.nonfinite == 'skip':
    bar.alert(f'checkpoint {checkpointer.directory / str(step)}: its _CHECKPOINT_METADATA is '
              'missing, unreadable or damaged, and with it the count of non-finite steps in a row '
              'before it; counting them from 0 (a diverging run may skip up to '
              f'train.max_consecutive_skips={cfg.train.max_consecutive_skips} more steps '
              'before it stops)')
  return 0


def _window_metrics(pending: list[dict]) -> dict:
  """Step metrics of a logging window: averaged over its finite steps, except `window_*`
  counts (last value). Each MoE layer's `max_violation` is its steps' (`load_violations`),
  averaged: a max of the window's averaged loads would smooth away the busiest steps.

  Fetching them only once per window keeps the device queue full.
  """
  finite = [m for m in pending if not m['nonfinite']] or pending
  finite = [{**m, **load_violations(m)} for m in finite]
  def reduce(key):
    values = [m[key] for m in finite]
    return float(values[-1] if is_window_metric(key) else np.mean(values))
  return {k: reduce(k) for k in finite[0] if k not in _UNLOGGED}


def _save_config(cfg: ml_collections.ConfigDict, workdir: Path) -> None:
  """workdir/config.json, which `load`, `eval` and resumes read: the config of the run's
  newest checkpoints, so written only once they are known to be this model's, and by a
  resumed run (whose config may differ) only once its first checkpoint is written (a kill
  during that save leaves the previous checkpoint newest)."""
  if jax.process_index() != 0:
    return
  try:
    config_lib.save(cfg, workdir / 'config.json')
  except OSError as e:  # disk full, permissions: as for the metrics
    raise unwritable(str(workdir / 'config.json'), e) from None


# The share of a logging window's time the loop may wait for batches before it says so.
_INPUT_BOUND = 0.1


def _input_bound_message(cfg: ml_collections.ConfigDict, step: int, wait: float) -> str:
  threads, cores = cfg.data.get('num_threads', 0), data.cpu_cores()
  if not data.tokenizes_in_threads(cfg.data):
    remedy = ('these batches are read without threads; put data.data_dir on a faster disk '
              'or give each process more CPU cores')
  elif threads < cores:
    remedy = f'raise data.num_threads (now {threads}; {cores} CPU cores here)'
  else:
    remedy = (f'give each process more CPU cores (data.num_threads={threads} threads share '
              f'the {cores} here)')
  return (f'step {step}: the loop waited {wait:.0%} of the time for batches, so the input '
          f'pipeline limits training: {remedy}')


def _best_seldom_known(cfg: ml_collections.ConfigDict) -> str | None:
  """Why `checkpoint.keep_best` compares few checkpoints, or None: only a checkpoint written
  at an eval step has an eval_loss, and where neither interval is a multiple of the other,
  most evaluations have no checkpoint and most checkpoints no evaluation."""
  every, evals = cfg.checkpoint.every_steps, cfg.log.eval_every_steps
  if every % evals == 0 or evals % every == 0:
    return None
  return (f'checkpoint.keep_best keeps the best of the checkpoints written at an eval step: '
          f'with log.eval_every_steps={evals} and checkpoint.every_steps={every}, those of '
          f'every {math.lcm(every, evals)} steps and the last; set one to a multiple of the '
          'other')


def _paused(watch: Stopwatch | None):
  return contextlib.nullcontext() if watch is None else watch.paused()


def _loop(cfg, workdir, setup, state, data_iter, eval_step, checkpointer, writer, bar,
          stop) -> dict:
  if int(state['step']) >= cfg.train.steps:  # a finished run submitted again
    bar.alert(f'the run in {workdir} reached train.steps={cfg.train.steps} already; '
              'nothing to train (its last metrics follow)')
    return {**final_metrics(workdir), 'step': int(state['step'])}
  validation = eval_batches(cfg, setup)
  if (missing := no_validation_data(cfg, validation)) is not None:
    bar.alert(f'{missing}: the run reports no eval_loss')
    validation = None
  elif (untrained := no_trained_validation(validation)) is not None:
    bar.alert(untrained)
  elif cfg.checkpoint.keep_best and (unaligned := _best_seldom_known(cfg)):
    bar.alert(unaligned)
  train_step = make_train_step(setup)
  reset_windows = make_window_reset(setup)
  schedule = learning_rate_schedule(cfg.train)
  group_rates = group_learning_rates(cfg.train)  # logged as lr/NAME
  flops_per_token = flops.train_flops_per_token(cfg.model, setup.param_counts,
                                                cfg.data.seq_len)
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  device_kind = jax.devices()[0].device_kind
  start = int(state['step'])  # a resumed run's: that of its checkpoint
  monitor = NonFiniteMonitor(
      cfg.train.nonfinite, cfg.train.max_consecutive_skips,
      leaf_names(setup.abstract_state['params']), workdir, checkpointer=checkpointer,
      consecutive=_nonfinite_in_a_row(cfg, checkpointer, start, bar))
  final, pending, watch = {}, [], None
  data_wait, input_bound_told = InputWait(), False
  config_unsaved = start > 0  # resumed: `_save_config` with its first save
  for step in range(start + 1, cfg.train.steps + 1):
    batch = data_wait.next(data_iter, pending[-1] if pending else None)
    state, metrics = train_step(state, global_batch(batch, setup.batch_sharding))
    pending.append(metrics)
    stopping = stop.should_stop(step)  # no evaluation then: the grace period is short
    last = step == cfg.train.steps
    evaluating = validation is not None and (
        last or (step % cfg.log.eval_every_steps == 0 and not stopping))
    saving = step % cfg.checkpoint.every_steps == 0 or last or stopping

    # A checkpoint ends a logging window: its steps are checked for non-finite values
    # before they are saved, and a resumed run's windows are those of an uninterrupted one.
    if step % cfg.log.every_steps == 0 or saving or evaluating:
      window = jax.device_get(pending)
      skipped = monitor.check(step - len(window) + 1, window)
      logged = _window_metrics(window)
      if skipped:
        logged['skipped_steps'] = skipped
        bar.alert(f'step {step}: skipped {skipped} non-finite steps ({monitor.skipped} in '
                  'this run); the weights were not updated on them')
      state = reset_windows(state)
      waited = data_wait.take()  # (the first window's, compiling, is not logged)
      if watch is None:  # the first interval includes compilation: not timed
        watch = Stopwatch()
      else:
        seconds = watch.lap()
        logged['step_time_s'] = seconds / len(pending)
        logged['tokens_per_s'] = tokens_per_step * len(pending) / seconds
        logged['mfu'] = flops.mfu(logged['tokens_per_s'] * flops_per_token,
                                  jax.device_count(), device_kind)
        logged['data_wait'] = min(waited / seconds, 1.0)
        if logged['data_wait'] > _INPUT_BOUND and not input_bound_told:
          bar.alert(_input_bound_message(cfg, step, logged['data_wait']))
          input_bound_told = True
      logged['lr'] = float(schedule(step - 1))  # optax counts updates from 0
      logged.update({f'lr/{name}': float(rate(step - 1)) for name, rate in group_rates.items()})
      if hasattr(data_iter, 'epoch'):  # not on a wrapped iterator (e.g. a `.map` over it)
        logged['epoch'] = data_iter.epoch()
      pending = []
      if evaluating:
        with _paused(watch):  # evaluation is not training throughput
          logged.update(run_eval(setup, state, eval_step, validation))
      writer.write(step, {k: v for k, v in logged.items() if v is not None})
      bar.update(step, logged, keep='eval_loss' in logged)
      final.update(logged)

    if saving:
      with _paused(watch):  # nor is saving a checkpoint
        checkpointer.save(step, state, data_iter, force=True,
                          eval_loss=logged.get('eval_loss') if evaluating else None,
                          run_state={_IN_A_ROW: monitor.consecutive})
        if config_unsaved:  # once that checkpoint is on disk, not while it is written
          checkpointer.wait()
          _save_config(cfg, workdir)
          config_unsaved = False
    if stopping and not last:
      checkpointer.wait()
      # Every process's part of the checkpoint is written before any exits 128 + the
      # signal: `srun --kill-on-bad-exit` ends the other tasks at the first such exit.
      sync_processes(f'jaxarch_stopped_{step}')
      bar.alert(f'jaxarch: {stop.received}: stopped after step {step}, checkpoint saved in '
                f'{checkpointer.directory / str(step)}; run the same command to resume')
      final['stopped'] = stop.received
      break
  final['step'] = int(state['step'])
  return final


def _blocks_of(model: ml_collections.ConfigDict) -> str:
  """' of parallel/dense blocks' for the start line, where the blocks are not all the
  family's own kind (the user's, or a mix); ''."""
  kinds = tuple(dict.fromkeys(model.get('block_pattern', ())))
  return '' if kinds in ((), ('dense',), ('moe',)) else f' of {"/".join(kinds)} blocks'


def _evaluated_on(cfg: ml_collections.ConfigDict) -> dict:
  """The keys that choose what `evaluate` reads, and the expert shards where MoE's
  `ep_capacity_factor` drops assignments by them: its result file records them."""
  on = {'data.source': cfg.data.source,
        'data.validation_fraction': cfg.data.validation_fraction,
        'data.seq_len': cfg.data.seq_len, 'train.batch_size': cfg.train.batch_size,
        'log.eval_batches': cfg.log.eval_batches}
  if _drops_by_expert_shards(cfg):
    on['mesh.expert'] = f'ici {cfg.mesh.ici.expert} x dcn {cfg.mesh.dcn.expert}'
  return on


def _drops_by_expert_shards(cfg: ml_collections.ConfigDict) -> bool:
  moe = cfg.model.get('moe')
  return moe is not None and moe.get('ep_capacity_factor') is not None


def _run_config(workdir: Path) -> ml_collections.ConfigDict | None:
  """The run's own config (its config.json); None where there is none that loads (a run
  written by hand)."""
  try:
    return config_lib.load_json(workdir / 'config.json')
  except (config_lib.ConfigError, OSError, ValueError):
    return None


def eval_file(workdir: Path, step: int, evaluated_on: dict,
              run_cfg: ml_collections.ConfigDict | None = None) -> Path:
  """WORKDIR/eval_STEP.json over the run's own validation data; over other data (another
  source, more batches), eval_STEP_HASH.json, so that the evaluations of a step on
  several held-out sets are all kept. `run_cfg`: the run's config, where read already."""
  run_cfg = _run_config(workdir) if run_cfg is None else run_cfg
  own = evaluated_on if run_cfg is None else _evaluated_on(run_cfg)
  if evaluated_on == own:
    return workdir / f'eval_{step}.json'
  digest = hashlib.sha256(json.dumps(evaluated_on, sort_keys=True).encode()).hexdigest()
  return workdir / f'eval_{step}_{digest[:8]}.json'


def _say_if_replaced(out: Path, evaluated_on: dict) -> None:
  """An eval of the same step over other data (fewer batches, another source) is replaced
  by this one: said, with what differs."""
  try:
    before = json.loads(out.read_text()).get('evaluated_on')
  except (OSError, ValueError, AttributeError):
    return  # none yet (or unreadable: replaced as it is)
  if before is None or before == evaluated_on:
    return
  changed = ', '.join(f'{key} {before.get(key)} -> {value}' for key, value in
                      evaluated_on.items() if before.get(key) != value)
  logging.getLogger(__name__).warning('jaxarch: %s held an evaluation of this step over '
                                      'other data (%s); replaced', out, changed)


def evaluate(cfg: ml_collections.ConfigDict, workdir: str | Path, *,
             step: int | None = None) -> dict:
  """Validation loss and bits per byte of the run's latest (or given) checkpoint."""
  Checkpointer.require(workdir)  # before building anything
  if (saved := Path(workdir) / 'config.json').is_file():  # a --config given with the run
    check_same_model(saved, cfg)
  run_cfg = _run_config(Path(workdir))
  cfg, mesh = mesh_here(cfg)
  shards = lambda c: _evaluated_on(c).get('mesh.expert')
  if _drops_by_expert_shards(cfg) and (here := shards(cfg)) != (
      run := shards(cfg if run_cfg is None else run_cfg)):
    logging.getLogger(__name__).warning(
        'jaxarch: model.moe.ep_capacity_factor=%s drops assignments by the number of expert '
        'shards, and this eval runs on a mesh of these %d devices (expert: %s), not the '
        "run's (%s): its loss is not the one the run's evals saw; give it the devices of the "
        "run's mesh", cfg.model.moe.ep_capacity_factor, jax.device_count(), here, run)
  setup = make_setup(cfg, mesh)
  batches = eval_batches(cfg, setup)
  if (missing := no_validation_data(cfg, batches)) is not None:
    raise config_lib.ConfigError(f'config error: {missing}: nothing to evaluate on')
  state, restored = Checkpointer.read(workdir, setup.abstract_state, step=step, parts=MODEL)
  result = {'step': restored,
            **run_eval(setup, state, _eval_step(cfg, setup), batches),
            'evaluated_on': _evaluated_on(cfg)}
  parts = batches.components if isinstance(batches, data.MixtureEvalBatches) else {'': batches}
  for name, part in parts.items():
    if 0 < part.read < part.num_batches:  # (none: said by the mixture's warning)
      logging.getLogger(__name__).warning(
          'jaxarch: the validation data%s ended after %d of log.eval_batches=%d batches: '
          'all of it was evaluated (%s tokens)', f' of {name!r}' if name else '', part.read,
          part.num_batches, f"{result['eval_tokens' + (f'/{name}' if name else '')]:,}")
  out = eval_file(Path(workdir), restored, result['evaluated_on'], run_cfg)
  try:
    if jax.process_index() == 0:
      _say_if_replaced(out, result['evaluated_on'])
      out.write_text(standard_json(result, indent=2))
  except OSError as e:  # a read-only run: the result is still returned (and printed)
    logging.getLogger(__name__).warning('could not write %s: %s', out, e.strerror or e)
  return result
