"""A non-editable install (`pip install .`, a wheel) ships configs/ and launch/ inside the
package, and jaxarch finds them there from any working directory."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ('configs', 'launch')  # folders at the repository's root -> jaxarch/_repo/<name>
_SKIP = shutil.ignore_patterns('__pycache__')

# Run in a fresh Python with only the installed package on its path, from a folder without
# configs/: what a user of a wheel does.
_FROM_ELSEWHERE = r'''
import json, sys
from jaxarch import cli, config
from jaxarch.sweep import runner

assert config._REPO_ROOT.is_relative_to(sys.argv[1]), config._REPO_ROOT
assert config.load('configs/dense.py:tiny').model.d_model == 128
assert config.load('ultramem.py:tiny').model.family == 'ultramem'
assert runner.load_sweep('configs/sweeps/qk_norm.py:tiny')
assert cli.main(['launch', '--config=configs/dense.py:tiny', '--target=slurm',
                 '--workdir=/shared/run', '--dry-run']) == 0
# A run saved before model.qk_norm existed: the key is filled from the shipped configs.
config.save(config.load('configs/dense.py:tiny'), 'config.json')
tree = json.load(open('config.json'))
del tree['model']['qk_norm']
json.dump(tree, open('config.json', 'w'))
assert config.load('config.json').model.qk_norm is False
print('ok')
'''


def _run_from_elsewhere(site: Path, cwd: Path):
  cwd.mkdir()
  env = {**os.environ, 'PYTHONPATH': str(site)}
  done = subprocess.run([sys.executable, '-c', _FROM_ELSEWHERE, str(site.resolve())],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0 and done.stdout.endswith('ok\n'), done.stderr[-3000:]


def _shipped(kind: str) -> list[Path]:
  """The files or folders of configs/ and launch/, relative to the repository's root."""
  paths = [ROOT / name for name in SHIPPED] + [p for n in SHIPPED for p in (ROOT / n).rglob('*')]
  return [p.relative_to(ROOT) for p in paths if '__pycache__' not in p.parts
          and (p.is_file() if kind == 'files' else p.is_dir())]


def test_pyproject_lists_every_package_and_maps_configs_and_launch_into_it():
  setuptools = tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools']
  code = ['.'.join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob('jaxarch/**/__init__.py')]
  shipped = ['.'.join(('jaxarch', '_repo', *folder.parts)) for folder in _shipped('folders')]
  assert sorted(setuptools['packages']) == sorted(code + shipped)
  assert setuptools['package-dir'] == {f'jaxarch._repo.{name}': name for name in SHIPPED}


def test_the_lock_jax_needs_for_the_capped_compile_cache_is_a_dependency():
  """The commands cap jaxarch's compile cache (`cli._compilation_cache`); jax evicts from a
  capped cache under a `filelock` lock, a package that neither jax nor jaxarch's other
  dependencies require: without it (`pip install .`, no extras) the cache was off for the
  whole run, with one warning ('Please install the `filelock` package ...')."""
  dependencies = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['dependencies']
  assert any(re.match(r'filelock\b', d) for d in dependencies), dependencies


def test_an_installed_package_finds_its_configs_and_launch_templates(tmp_path):
  # The layout pyproject.toml gives a wheel (checked above), made by hand: fast.
  site = tmp_path / 'site'
  shutil.copytree(ROOT / 'jaxarch', site / 'jaxarch', ignore=_SKIP)
  for name in SHIPPED:
    shutil.copytree(ROOT / name, site / 'jaxarch' / '_repo' / name, ignore=_SKIP)
  _run_from_elsewhere(site, tmp_path / 'elsewhere')


@pytest.mark.slow
def test_the_built_wheel_ships_configs_and_launch_and_runs_from_anywhere(tmp_path):
  source = tmp_path / 'source'  # a copy, so that the build leaves nothing in the checkout
  for name in ('jaxarch', *SHIPPED):
    shutil.copytree(ROOT / name, source / name, ignore=_SKIP)
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(ROOT / name, source / name)
  built = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q', '-w',
                          str(tmp_path / 'dist'), str(source)], capture_output=True, text=True,
                         timeout=600)
  assert built.returncode == 0, built.stderr[-3000:]
  [wheel] = (tmp_path / 'dist').glob('jaxarch-*.whl')
  with zipfile.ZipFile(wheel) as archive:
    assert {f'jaxarch/_repo/{p}' for p in _shipped('files')} <= set(archive.namelist())
    archive.extractall(tmp_path / 'site')  # what pip install puts in site-packages
  _run_from_elsewhere(tmp_path / 'site', tmp_path / 'elsewhere')


def test_import_jaxarch_reads_its_submodules_on_first_use_and_loads_no_jax_before():
  """DESIGN writes the API as `jaxarch.config.load`, `jaxarch.infer.generate`: after
  `import jaxarch` alone each was an AttributeError."""
  script = '''
import sys
import jaxarch
assert 'jax' not in sys.modules and 'jaxarch.config' not in sys.modules
assert {'config', 'data', 'export', 'infer', 'models', 'sweep', 'train'} <= set(dir(jaxarch))
assert jaxarch.config.load('configs/dense.py:tiny').model.d_model == 128
assert callable(jaxarch.infer.generate) and callable(jaxarch.export.write_hf)
try:
  jaxarch.infrence
except AttributeError as e:
  assert str(e) == "module 'jaxarch' has no attribute 'infrence'", e
else:
  raise AssertionError('no error')
print('ok')
'''
  done = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert done.returncode == 0 and done.stdout.endswith('ok\n'), done.stderr[-3000:]
