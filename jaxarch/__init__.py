"""jaxarch: UltraMem, MoE, MEGABYTE and BiTA language models on JAX meshes, one trainer."""

import importlib
import pkgutil

__version__ = '0.1.0'


# Submodules are read on first use (`jaxarch.config.load(...)` after `import jaxarch`, as
# DESIGN writes the API), so that `import jaxarch` stays light: jax loads with the first.
def __getattr__(name: str):
  if name in __dir__():
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted([*globals(), *(m.name for m in pkgutil.iter_modules(__path__))])


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
