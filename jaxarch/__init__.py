"""jaxarch: UltraMem, MoE, MEGABYTE and BiTA language models on JAX meshes, one trainer."""

__version__ = '0.1.0'


def load(workdir, *, scan_layers=None):
  """(config, model) of the latest checkpoint in `workdir`, or of the export directory
  that `jaxarch export` wrote there (safetensors or stablehlo: its model.safetensors): the
  `from_pretrained` of jaxarch. `scan_layers`: a run's layers read scanned (True) or
  unrolled (False, as decoding wants them), whatever its layout; None: as saved. An
  export's are unrolled, and stay so."""
  # pylint: disable=g-import-not-at-top
  from pathlib import Path
  from jaxarch.export.weights import WEIGHTS, load_safetensors
  from jaxarch.train.checkpoint import Checkpointer
  from jaxarch.train.pretrained import load_model
  workdir = Path(workdir).expanduser()
  if not Checkpointer.exists(workdir) and (workdir / WEIGHTS).is_file():
    if scan_layers:
      raise ValueError(f'{workdir} is an export, whose layers are unrolled: load the run it '
                       'was exported from to read them scanned')
    return load_safetensors(workdir)
  return load_model(workdir, scan_layers=scan_layers)
