"""Checks of the workdir before any training work: a local path, writable, shared by all
processes, room for a checkpoint, not holding another family's run, and no other trainer
in it."""

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxarch import config as config_lib
from jaxarch import oserrors


# Where a run's checkpoints go, inside its workdir.
CHECKPOINTS = 'checkpoints'


class WorkdirError(RuntimeError):
  """The workdir cannot hold this run; one line for the user."""


def unwritable(what: str, error: OSError) -> WorkdirError:
  """A file of the run that could not be written (disk full, permissions): the run
  resumes from its last checkpoint once that is mended."""
  return WorkdirError(f'could not write {what} ({error.strerror or error}); free space (or '
                      'fix permissions) and rerun to resume from the last checkpoint')


def local_workdir(workdir: str | os.PathLike) -> Path:
  """The workdir as a path; a URL is refused, since the metrics, configs and locks are
  written with local file operations (`gs://b/x` would become the relative folder `gs:/b/x`)."""
  if '://' in str(workdir):
    raise WorkdirError(f'--workdir={workdir}: jaxarch writes runs to a filesystem path; mount '
                       'the bucket (gcsfuse, or the GCS FUSE CSI driver on GKE, e.g. at '
                       '/gcs/BUCKET) and give the mounted path')
  if Path(workdir).exists() and not Path(workdir).is_dir():
    raise WorkdirError(f'--workdir={workdir} is a file; give a directory (new or a run\'s)')
  return Path(workdir)


@contextlib.contextmanager
def held_alone(lock_file: Path, busy: Exception, guards: str):
  """Holds an exclusive lock on `lock_file` for the block; raises `busy` if another
  process holds it (the lock ends with the process, however it ends). `guards`: what
  goes unguarded on a filesystem without locks (`oserrors.lock`)."""
  with open(lock_file, 'w') as file:
    try:
      oserrors.lock(file, wait=False, guards=guards)
    except BlockingIOError:
      raise busy from None
    yield


def _trainer_lock(workdir: Path, process: int) -> Path:
  return workdir / f'.train.lock.{process}'


def only_trainer_in(workdir: Path):
  """Holds WORKDIR/.train.lock.<process> while training: two trainers in one workdir (a run
  started twice, or a sweep's orphan) would write each other's checkpoints and metrics."""
  return held_alone(_trainer_lock(workdir, jax.process_index()), WorkdirError(
      f'workdir {workdir} is in use by another jaxarch train; wait for it, stop it, or use '
      'another --workdir'), guards='a second jaxarch train in this workdir')


def trained_elsewhere(workdir: Path) -> bool:
  """Whether a trainer holds the workdir's lock (`only_trainer_in`, process 0's): one that
  a killed sweep left running (an orphan), or a `jaxarch train` started by hand."""
  lock = _trainer_lock(workdir, 0)
  if not lock.is_file():
    return False
  try:
    with held_alone(lock, BlockingIOError(), guards='a second jaxarch train in this workdir'):
      return False
  except BlockingIOError:
    return True


def is_sweep_workdir(workdir: str | os.PathLike) -> bool:
  """Whether `workdir` is a `jaxarch sweep`'s: its records, its lock, or its runs."""
  workdir = Path(workdir)
  return ((workdir / 'results.jsonl').is_file() or (workdir / '.sweep.lock').exists()
          or any(workdir.glob('runs/*/config.json')))


def sweep_runs_hint(workdir: str | os.PathLike) -> str:
  """'; DIR holds a sweep's runs: give one, e.g. --workdir=DIR/runs/d32 (...)' for a
  sweep's workdir given where a run's is wanted; '' for any other."""
  runs = sorted(p.parent.name for p in Path(workdir).glob('runs/*/config.json')
                if '.replaced-' not in p.parent.name)  # a sweep's runs of an edited config
  if not runs:
    return ''
  listed = ', '.join(runs[:4]) + (' ...' if len(runs) > 4 else '')
  return (f"; {workdir} holds a sweep's runs: give one, e.g. "
          f"--workdir={Path(workdir) / 'runs' / runs[0]} ({len(runs)}: {listed})")


def remove_unused(workdir: Path) -> None:
  """Removes a workdir that a failed start made and left holding only what the start
  made (its trainer's lock file, an empty checkpoints folder), so that it does not look
  like a run; anything else in it keeps it."""
  try:
    _trainer_lock(workdir, jax.process_index()).unlink(missing_ok=True)
    if (workdir / CHECKPOINTS).is_dir():
      (workdir / CHECKPOINTS).rmdir()  # only if empty
    workdir.rmdir()
  except OSError:
    pass  # not empty (another process's lock, a file written), or already gone


def readable_size(num_bytes: int) -> str:
  """'1.25 GiB', '12.0 MiB' below a tenth of a GiB and '36.0 KiB' below a tenth of a MiB (a
  small run's '0.01 GiB' or '0.0 MiB' says nothing)."""
  return (f'{num_bytes / 2**30:,.2f} GiB' if num_bytes >= 2**30 / 10 else
          f'{num_bytes / 2**20:,.1f} MiB' if num_bytes >= 2**20 / 10 else
          f'{num_bytes / 2**10:,.1f} KiB')


def state_bytes(abstract_state) -> int:
  """Bytes of one checkpoint of the train state (all shards together)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


# What jaxarch writes into a run's workdir before its trainer starts: a sweep's log of the
# run and the wall time it has spent (`sweep.runner`), `jaxarch launch`'s job.
RUN_LOG = 'train.log'
WALL_TIME = 'sweep_wall_s'
WRITTEN_BEFORE_TRAINING = ('launch', RUN_LOG, WALL_TIME)


def check_workdir(workdir: Path, cfg: ml_collections.ConfigDict, checkpoint_bytes: int,
                  has_checkpoints: bool) -> None:
  """Raises `WorkdirError` if training in `workdir` would fail or overwrite another run."""
  if not has_checkpoints and (workdir / 'model.safetensors').is_file():  # `jaxarch export`'s
    raise WorkdirError(f'{workdir} is a `jaxarch export` directory, not a run (its config.json '
                       'would be overwritten); choose another --workdir')
  if not has_checkpoints and is_sweep_workdir(workdir):
    raise WorkdirError(f"{workdir} is a sweep's workdir, not a run (its runs are in "
                       f'{workdir / "runs"}, and `jaxarch fit` would read this one among them); '
                       'choose another --workdir')
  _check_writable(workdir)
  _check_shared(workdir)
  if not has_checkpoints and not (workdir / 'config.json').exists():
    others = sorted(p.name for p in workdir.iterdir() if not p.name.startswith('.')
                    and p.name not in (CHECKPOINTS, *WRITTEN_BEFORE_TRAINING))
    if others:
      logging.getLogger(__name__).warning(
          'jaxarch: --workdir=%s holds %s of no jaxarch run (e.g. %s): the run writes its '
          'config, metrics and checkpoints among them; give a new --workdir to keep them '
          'apart', workdir, f'{len(others)} entr{"y" if len(others) == 1 else "ies"}',
          others[0])
  checkpoints = workdir / CHECKPOINTS  # found now, not at the first save hours later
  # Where the checkpoints are written: their folder may be a link to another disk.
  measured = checkpoints if checkpoints.is_dir() else workdir
  # The saves that a full disk (or a kill) cut short are deleted before this run saves.
  free = shutil.disk_usage(measured).free + sum(
      f.stat().st_size for save in interrupted_saves(checkpoints) for f in save.rglob('*')
      if f.is_file())
  needed = int(checkpoint_bytes * 1.1) + (16 << 20)  # arrays, metadata, data state
  if free < needed:
    where = f'workdir {workdir}' if measured == workdir else f'{checkpoints.resolve()}'
    raise WorkdirError(f'{where} has {readable_size(free)} free, but one checkpoint of '
                       f'this run takes about {readable_size(needed)}; free space or choose '
                       'another --workdir')
  saved = workdir / 'config.json'
  if has_checkpoints and saved.exists():
    check_same_model(saved, cfg)
  if checkpoints.exists() or checkpoints.is_symlink():  # else made in the writable workdir
    _check_writable(checkpoints)


def interrupted_saves(checkpoints: Path) -> list[Path]:
  """Orbax's temporary directories of the saves in `checkpoints` that were cut short (a
  kill, a full disk), each up to a checkpoint in size."""
  suffix = ocp.path.atomicity_types.TMP_DIR_SUFFIX
  return list(checkpoints.glob(f'*{suffix}*')) if checkpoints.is_dir() else []


def _check_writable(directory: Path) -> None:
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f'.write_test.{os.getpid()}.{jax.process_index()}'
    probe.write_bytes(b'0' * 4096)
    probe.unlink()
  except OSError as e:
    what = ('is a file, not a directory' if directory.exists() and not directory.is_dir()
            else f'is not writable ({e.strerror or e})')
    raise WorkdirError(f'{directory} {what}; choose another --workdir or fix it') from None


def _check_shared(workdir: Path) -> None:
  """Every process must see process 0's files: each writes its own checkpoint shards and
  process 0 the metadata, so a host-local workdir would leave no host a whole checkpoint."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # A name new to every host: no stale file or cached lookup can answer for it.
  token = np.asarray(multihost_utils.broadcast_one_to_all(
      np.frombuffer(os.urandom(8), np.uint8))).tobytes().hex()
  probe = workdir / f'.shared_check.{token}'
  if jax.process_index() == 0:
    probe.write_text(token)
  multihost_utils.sync_global_devices('jaxarch_shared_check_written')
  try:
    seen = probe.read_text() == token
  except OSError:
    seen = False
  seen_by = multihost_utils.process_allgather(np.int32(seen))
  if jax.process_index() == 0:
    probe.unlink()
  blind = [i for i, ok in enumerate(np.ravel(seen_by)) if not ok]
  if blind:
    raise WorkdirError(
        f'workdir {workdir} is not shared by the job\'s processes: process(es) '
        f'{", ".join(map(str, blind))} do not see a file process 0 wrote there; every process '
        'writes checkpoint shards into it, so give a path on a shared filesystem or a mounted '
        'bucket')


def check_same_model(saved: Path, cfg: ml_collections.ConfigDict) -> None:
  """Refuses a config that would read the run saved in `saved` (its config.json) as another
  model without its checkpoints saying so: another family, another tokenizer (or its file
  changed since), or UltraMem memory layers through other IVE permutations than they
  were trained with (which no array holds). A same-family model of other shapes is caught
  when its checkpoint is restored (settings such as `model.remat` may change on resume)."""
  try:
    old = json.loads(saved.read_text()).get('model', {}).get('family')
  except (OSError, json.JSONDecodeError, AttributeError):
    return
  if old != cfg.model.family:
    raise WorkdirError(f'workdir {saved.parent} holds checkpoints of a {old} model, and '
                       f'this config is {cfg.model.family}; use a new --workdir, or omit '
                       '--config to resume the saved run')
  config_lib.check_tokenizer(cfg, saved.parent)
  permutation = lambda model: model.get('ultramem', {}).get('permutation')
  try:
    before = permutation(config_lib.load_json(saved).model)
  except (config_lib.ConfigError, OSError, ValueError, AttributeError):
    return  # a config.json that does not load is said where the run reads it
  if None not in (before, now := permutation(cfg.model)) and before != now:
    raise WorkdirError(
        f"workdir {saved.parent} holds checkpoints whose memory layers were trained with "
        f'model.ultramem.permutation={before!r}, and this config says {now!r}, which would '
        f'look their values up elsewhere; add --config.model.ultramem.permutation={before} '
        '(or omit --config to take the saved run\'s)')
