"""jaxarch: UltraMem, MoE, MEGABYTE and BiTA language models on JAX meshes, one trainer."""

__version__ = '0.1.0'


def load(workdir):
  """(config, model) of the latest checkpoint in `workdir`: the `from_pretrained` of jaxarch."""
  from jaxarch.train.pretrained import load_model  # pylint: disable=g-import-not-at-top
  return load_model(workdir)
