"""Loading a trained model back from its workdir (config.json + latest checkpoint)."""

from pathlib import Path

from jaxarch import config as config_lib
from jaxarch.parallel import make_mesh
from jaxarch.train.checkpoint import Checkpointer
from jaxarch.train.state import make_setup, merge_model


def load_model(workdir: str | Path, *, step: int | None = None, mesh_overrides=()):
  """(config, model) restored from `workdir`.

  The run's own mesh is used when it fits the devices here; otherwise the weights are
  resharded onto a data-parallel mesh of the local devices (e.g. a pod checkpoint
  loaded on one GPU).
  """
  workdir = Path(workdir)
  saved = workdir / 'config.json'
  if not saved.exists():
    raise FileNotFoundError(f'{saved} not found: is {workdir} a jaxarch workdir?')
  cfg = config_lib.load_json(saved, mesh_overrides)
  try:
    mesh = make_mesh(cfg)
  except config_lib.ConfigError:
    cfg = config_lib.load_json(saved, ['mesh.ici.data=-1', 'mesh.ici.fsdp=1',
                                       'mesh.ici.tensor=1', 'mesh.ici.expert=1',
                                       'mesh.dcn.data=1', 'mesh.dcn.fsdp=1',
                                       'mesh.dcn.tensor=1', 'mesh.dcn.expert=1'])
    mesh = make_mesh(cfg)
  setup = make_setup(cfg, mesh)
  checkpointer = Checkpointer(workdir, async_save=False)
  state, _ = checkpointer.restore(setup.abstract_state, step=step)
  checkpointer.close()
  if state is None:
    raise FileNotFoundError(f'no checkpoint in {checkpointer.directory}')
  return cfg, merge_model(setup, state)
