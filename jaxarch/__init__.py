"""jaxarch: UltraMem, MoE, MEGABYTE and BiTA language models on JAX meshes, one trainer."""

__version__ = '0.1.0'


def load(workdir):
  """(config, model) of the latest checkpoint in `workdir`, or of the export directory
  that `jaxarch export` wrote there (safetensors or stablehlo: its model.safetensors): the
  `from_pretrained` of jaxarch."""
  # pylint: disable=g-import-not-at-top
  from pathlib import Path
  from jaxarch.export.weights import WEIGHTS, load_safetensors
  from jaxarch.train.checkpoint import Checkpointer
  from jaxarch.train.pretrained import load_model
  workdir = Path(workdir).expanduser()
  if not Checkpointer.exists(workdir) and (workdir / WEIGHTS).is_file():
    return load_safetensors(workdir)
  return load_model(workdir)
