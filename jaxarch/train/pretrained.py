"""Loading trained weights back from a workdir (config.json + latest checkpoint): a whole
model (`load_model`), or the sub-models a new run starts from (`initial_state`)."""

import copy
import logging
import math
from pathlib import Path

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from jaxarch import config as config_lib
from jaxarch import models
from jaxarch.layers.signals import WindowCounter
from jaxarch.parallel import make_mesh
from jaxarch.train.checkpoint import Checkpointer
from jaxarch.train.memory import device_memory_bytes, shard_bytes
from jaxarch.models import named_variables
from jaxarch.train.state import MODEL, TrainSetup, init_state, make_setup, merge_model
from jaxarch.train.workdir import readable_size, sweep_runs_hint


def mesh_here(cfg: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, Mesh]:
  """(config, mesh) to run a trained model on these devices: the run's own mesh when it
  fits them, else a data-parallel one (e.g. a pod checkpoint evaluated on one GPU), with
  the devices the batch does not divide over on `tensor` (a batch of 12 on 8 devices:
  data=4, tensor=2). Where the weights, whole on each data-parallel device, would take
  over half of one (a 70B model on a host's eight GPUs), the same sizes go on `fsdp`,
  which splits them over the devices; decoding then gathers them at each step."""
  try:
    return cfg, make_mesh(cfg)
  except config_lib.ConfigError:
    sizes = data_parallel_mesh(cfg, jax.device_count())
    here = _with_mesh(cfg, sizes)
    limit = device_memory_bytes()
    if limit is not None and sizes['data'] > 1:
      weights = _weight_bytes_per_device(here)
      if weights > limit / 2:
        logging.getLogger(__name__).info(
            'the weights take %s per device replicated over data=%d, over half of a '
            "device's %s: split over fsdp instead", readable_size(weights), sizes['data'],
            readable_size(limit))
        here = _with_mesh(cfg, {**sizes, 'data': 1, 'fsdp': sizes['data']})
    return here, make_mesh(here)


def _with_mesh(cfg: ml_collections.ConfigDict, sizes: dict[str, int]
               ) -> ml_collections.ConfigDict:
  """`cfg` with mesh.ici `sizes` and mesh.dcn all 1."""
  cfg = copy.deepcopy(cfg)
  for axis, size in sizes.items():
    config_lib.apply_override(cfg, f'mesh.ici.{axis}={size}')
    config_lib.apply_override(cfg, f'mesh.dcn.{axis}=1')
  return config_lib.validate(cfg)


def _weight_bytes_per_device(cfg: ml_collections.ConfigDict) -> int:
  """Bytes of the model's variables one device holds under `cfg`'s mesh."""
  state = make_setup(cfg, make_mesh(cfg)).abstract_state
  return sum(shard_bytes(state[part]) for part in MODEL)


def data_parallel_mesh(cfg: ml_collections.ConfigDict, n: int) -> dict[str, int]:
  """`mesh_here`'s mesh.ici sizes on `n` devices (mesh.dcn all 1): data-parallel as far as
  the batch divides, the rest on `tensor`."""
  data = math.gcd(cfg.train.batch_size // cfg.train.grad_accum_steps, n)
  return dict(data=data, fsdp=1, tensor=n // data, expert=1)


def load_model(workdir: str | Path, *, step: int | None = None, mesh_overrides=(),
               scan_layers: bool | None = None):
  """(config, model) restored from `workdir`.

  The run's own mesh is used when it fits the devices here; otherwise the weights are
  resharded onto a data-parallel mesh of the local devices (e.g. a pod checkpoint
  loaded on one GPU). `scan_layers`: the layout to read the layers into
  (`model.scan_layers`; None: the run's own). Decoding reads them unrolled: a scanned
  stack copies its caches at every step.
  """
  cfg, model, _ = load_checkpoint(workdir, step=step, mesh_overrides=mesh_overrides,
                                  scan_layers=scan_layers)
  return cfg, model


def load_checkpoint(workdir: str | Path, *, step: int | None = None, mesh_overrides=(),
                    scan_layers: bool | None = None):
  """`load_model`, and the step of the checkpoint restored: the latest readable one (an
  unreadable newer one is skipped, with a warning) when `step` is None."""
  workdir = Path(workdir).expanduser()
  saved = workdir / 'config.json'
  if not saved.exists():
    raise FileNotFoundError(f'{saved} not found' + (
        sweep_runs_hint(workdir) or f': is {workdir} a jaxarch workdir?'))
  layout = () if scan_layers is None else (f'model.scan_layers={scan_layers}',)
  cfg, mesh = mesh_here(config_lib.load_json(saved, (*mesh_overrides, *layout)))
  config_lib.check_tokenizer(cfg, workdir)  # its file edited since: the ids mean other text
  setup = make_setup(cfg, mesh)
  state, restored = Checkpointer.read(workdir, setup.abstract_state, step=step, parts=MODEL)
  return cfg, merge_model(setup, state), restored


def _restored_model(workdir: Path, mesh: Mesh, mesh_cfg: ml_collections.ConfigDict,
                    scan_layers: bool, step: int | None = None
                    ) -> tuple[dict, int, ml_collections.ConfigDict]:
  """The params and model state of `workdir`'s latest checkpoint (or `step`'s), sharded over
  `mesh` as `mesh_cfg` says, its layers laid out as `scan_layers` says; its step and model
  section."""
  tree = config_lib.load_json(workdir / 'config.json').to_dict()
  tree['mesh'] = mesh_cfg.to_dict()
  tree['model']['scan_layers'] = scan_layers
  cfg = config_lib.validate(ml_collections.ConfigDict(tree))
  setup = make_setup(cfg, mesh)
  return *Checkpointer.read(workdir, setup.abstract_state, step=step, parts=MODEL), cfg.model


def _check_distilled_step(source: str, workdir: Path, step: int) -> None:
  """Continuations distilled from another checkpoint of the base teach drafts that the
  weights restored now may reject: the run trains without a sign of it."""
  distilled_at = config_lib.distill_summary(source).get('base_step')
  if distilled_at is not None and distilled_at != step:  # None: before it was recorded
    logging.getLogger(__name__).warning(
        'data.source=%r was distilled from step %s of %s, whose latest checkpoint is now '
        'step %d; distill it again (jaxarch distill) so that the drafts learn what it '
        'generates now', source, distilled_at, workdir, step)


def _difference(fresh, old) -> str | None:
  """The first difference of two flattened (path, variable) lists, or None: an array
  saved and not here, one here and not saved, or one of another shape."""
  here = {jax.tree_util.keystr(path): v.shape for path, v in fresh}
  saved = {jax.tree_util.keystr(path): v.shape for path, v in old}
  for name, side, others in ((saved, 'saved, not here', here), (here, 'here, not saved', saved)):
    if missing := [path for path in name if path not in others]:
      more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
      return f'{missing[0]} {side}{more}'
  for path, shape in here.items():
    if shape != saved[path]:
      return f'{path} is {shape} here, {saved[path]} saved'
  return None


def _keys_changed(ours: ml_collections.ConfigDict, theirs: ml_collections.ConfigDict) -> str:
  """The model keys whose values differ between two model sections (`n_layers=3 (4
  there)`), or ''."""
  ours, theirs = config_lib.flat(ours.to_dict()), config_lib.flat(theirs.to_dict())
  changed = [f'{k}={ours[k]!r} ({theirs[k]!r} there)' for k in sorted(theirs)
             if k != 'family' and k in ours and ours[k] != theirs[k]]
  return f"; this config's model keys that differ from that run's: {', '.join(changed)}" if (
      changed) else ''


def initial_state(cfg: ml_collections.ConfigDict, setup: TrainSetup) -> dict:
  """A fresh train state whose model is another run's (`train.init_from`), or whose
  sub-models (`models.PRETRAINED_PARTS`, e.g. BiTA's frozen base) are the models of the
  runs they come from, resharded onto this run's mesh: their weights and their other
  state, which the function depends on too (UltraMem's Tucker vectors, the MoE router's
  bias). They go straight into the state (`init_state`'s `given`): no random copy of them
  is made beside them. The optimizer state is new."""
  if cfg.train.get('init_from'):
    parts = {'': cfg.train.init_from}  # '': the whole model
  else:
    parts = models.PRETRAINED_PARTS.get(cfg.model.family, lambda _: {})(cfg.model)
  is_variable = lambda x: isinstance(x, nnx.Variable)
  given = {}
  for name, workdir in parts.items():
    workdir = Path(workdir).expanduser()
    if not name:
      _check_init_from(cfg, workdir)
    restored, step, base = _restored_model(workdir, setup.mesh, cfg.mesh,
                                           bool(cfg.model.get('scan_layers')),
                                           None if name else cfg.train.get('init_from_step'))
    if name:
      _check_distilled_step(cfg.data.source, workdir, step)
    else:
      logging.getLogger(__name__).info('the model starts as step %d of %s', step, workdir)
    for collection in ('params', 'model_state'):
      ours = setup.abstract_state[collection]
      if name and name not in ours:  # e.g. a dense model keeps no state
        continue
      fresh = jax.tree_util.tree_flatten_with_path(ours[name] if name else ours,
                                                   is_leaf=is_variable)[0]
      old = jax.tree_util.tree_flatten_with_path(restored[collection], is_leaf=is_variable)[0]
      if why := _difference(fresh, old):
        what, to = ((f'model part {name!r} of this config', 'a pretrained part') if name else
                    ("this config's model", 'weights read from another run'))
        raise config_lib.ConfigError(
            f'the checkpoint in {workdir} does not fit {what} ({collection}: {why}); an '
            f'override of a model key that sets its shapes cannot apply to {to}'
            f'{_keys_changed(cfg.model, base)}')
      # The read counts of the last logging window are the base run's metrics, not state.
      given.update({f'{name}.{key}' if name else key: variable.get_value()
                    for key, (_, variable) in named_variables(restored[collection]).items()
                    if not isinstance(variable, WindowCounter)})
  return init_state(cfg, setup, given=given)


def _check_init_from(cfg: ml_collections.ConfigDict, workdir: Path) -> None:
  """`train.init_from` is a run of the same family and tokenizer."""
  saved = workdir / 'config.json'
  if not saved.is_file():
    raise config_lib.ConfigError(
        f'config error: train.init_from={str(cfg.train.init_from)!r} has no config.json: is '
        'it the workdir of a jaxarch run?')
  family = config_lib.load_json(saved).model.family
  if family != cfg.model.family:
    raise config_lib.ConfigError(
        f'config error: train.init_from={str(cfg.train.init_from)!r} is a {family} run; this '
        f'config trains a {cfg.model.family} model')
  config_lib.check_tokenizer(cfg, workdir)  # its ids are the embeddings' rows
