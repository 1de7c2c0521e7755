"""Code of the user's own that the `jaxarch` command imports before it reads a config.

A package that registers blocks or families (`jaxarch.models.register_block`,
`register_family`), side layers or TFDS datasets names the module that does so as an
entry point of the group `jaxarch.plugins` in its pyproject.toml:

  [project.entry-points."jaxarch.plugins"]
  my_blocks = "my_package.blocks"

Once the package is installed, every `jaxarch` command (and the trainers `jaxarch sweep`
starts) imports it, so a run of those blocks trains, evaluates, generates and exports
like any other. In Python, import the module before `jaxarch.config.load` or
`jaxarch.load`.
"""

from importlib import metadata

GROUP = 'jaxarch.plugins'


class PluginError(ImportError):
  """A plugin that fails to import; one line naming it."""


def load_plugins() -> list[str]:
  """Imports the modules of every installed `jaxarch.plugins` entry point; their names."""
  names = []
  for entry in metadata.entry_points(group=GROUP):
    try:
      entry.load()
    except Exception as e:  # pylint: disable=broad-except  (the user's code: any error)
      where = f' of {entry.dist.name}' if entry.dist is not None else ''
      why = str(e).splitlines()[0] if str(e) else ''
      raise PluginError(f'plugin {entry.name} = {entry.value!r} (entry point group {GROUP}'
                        f'{where}) failed to import: {type(e).__name__}: {why}') from e
    names.append(entry.name)
  return names
