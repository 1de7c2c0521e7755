"""Shared fixtures. 8 fake CPU devices, so that sharding and mesh changes are exercised."""

import math
import os
import shutil
import subprocess
import sys
import tempfile

# Compiling is most of the suite's time, and its programs are tiny: XLA:CPU's LLVM
# backend without its optimisations compiles them about a third faster, and its preset
# for fast compiles, with the older emitters of fused loops (not the MLIR fusion
# emitters), a third faster again (a tiny train step: dense 2.4 -> 1.5 s, MoE 4.1 -> 2.9,
# UltraMem 6.3 -> 4.0). XLA's own passes (sharding, layout) run as always; the generated
# loops are simply not tuned (UltraMem's tiny step runs 0.9 -> 1.2 s).
_QUICK_COMPILE = {  # flag: (the suite's value, XLA:CPU's default)
    'xla_backend_optimization_level': (0, 3),
    'xla_llvm_disable_expensive_passes': (True, False),
    'xla_cpu_opt_preset': ('CPU_OPT_PRESET_FAST_COMPILE', 'CPU_OPT_PRESET_DEFAULT'),
    'xla_cpu_use_fusion_emitters': (False, True),
}
# Those whose loops round a float result by how a program fuses its ops (LLVM's level of
# optimisation changes no result: no fast math).
_ROUNDING_BY_FUSION = ('xla_cpu_opt_preset', 'xla_cpu_use_fusion_emitters')


def _flag(name: str, value) -> str:
  return f'--{name}={str(value).lower() if isinstance(value, bool) else value}'


def _known_to_xla(flags: dict) -> dict:
  """Those of `flags` the installed jaxlib knows (XLA aborts on a flag it does not know),
  tried once per run in a process of their own; xdist's workers inherit the answer."""
  if (known := os.environ.get('JAXARCH_TESTS_XLA_FLAGS')) is None:
    def starts(names):
      env = dict(os.environ, JAX_PLATFORMS='cpu',
                 XLA_FLAGS=' '.join(_flag(name, flags[name][0]) for name in names))
      return subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], env=env,
                            capture_output=True, check=False).returncode == 0
    known = ','.join(flags if starts(flags) else [name for name in flags if starts([name])])
    os.environ['JAXARCH_TESTS_XLA_FLAGS'] = known
  return {name: values for name, values in flags.items() if name in known.split(',')}


_QUICK_COMPILE = _known_to_xla(_QUICK_COMPILE)
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''),
                                    '--xla_force_host_platform_device_count=8',
                                    *(_flag(name, quick) for name, (quick, _)
                                      in _QUICK_COMPILE.items())]).strip()
# For a test of exact float results where programs fuse the same ops differently: XLA:CPU's
# default loops (`jit(f).lower(...).compile(compiler_options=USER_CPU_COMPILE)`).
USER_CPU_COMPILE = {name: default for name, (_, default) in _QUICK_COMPILE.items()
                    if name in _ROUNDING_BY_FUSION}
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
import threadpoolctl  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxarch import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


# Many tests compile the same small programs (a tiny train step, a decode step): one
# compilation cache shared by the run's workers and the trainers they start compiles each
# once, which saves about a fifth of the suite's time on 2 cores. One folder per run,
# made by the first process (the controller, under xdist) and removed at its end, so no
# run reads another's executables.
_CACHE_SETTINGS = {'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.1',
                   'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
_OWN_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
  # The suite's workers share the cores (`-n 2` on 2): OpenBLAS's threads in each would only
  # wait on each other (a scaling-law fit ran 10x slower beside a busy worker).
  threadpoolctl.threadpool_limits(1, user_api='blas')
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jaxarch-tests-jit-')
    os.environ.update(_CACHE_SETTINGS)
    config.stash[_OWN_CACHE] = os.environ['JAX_COMPILATION_CACHE_DIR']
  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  for name, value in _CACHE_SETTINGS.items():  # jax read the variables when imported
    kind = type(getattr(jax.config, name.lower()))  # float seconds, int bytes
    jax.config.update(name.lower(), kind(os.environ.get(name, value)))


def pytest_unconfigure(config):
  if _OWN_CACHE in config.stash:
    shutil.rmtree(config.stash[_OWN_CACHE], ignore_errors=True)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One prepared-data cache for the whole session (the default corpus is built once)."""
  path = os.environ.get('JAXARCH_TEST_DATA_DIR') or str(tmp_path_factory.mktemp('data'))
  return path


def tiny_config(data_dir=None, **overrides):
  """configs/dense.py:tiny shrunk further for unit tests; overrides as 'a.b': value."""
  cfg = config_lib.load('configs/dense.py:tiny')
  with cfg.unlocked():
    cfg.model.d_model = 64
    cfg.model.n_layers = 2
    cfg.model.n_heads = 4
    cfg.model.n_kv_heads = 2
    cfg.model.d_ff = 128
    cfg.model.max_len = 64
    cfg.data.seq_len = 32
    cfg.data.data_dir = data_dir
    cfg.train.batch_size = 8
    cfg.log.progress = False
    cfg.log.tensorboard = False
    for key, value in overrides.items():
      section, *rest = key.split('.')
      node = cfg[section]
      for k in rest[:-1]:
        node = node[k]
      node[rest[-1]] = value
  return cfg


def llama3_frequencies(freqs, factor, low_freq_factor, high_freq_factor, original_max_len):
  """Llama 3.1's rope scaling of inverse frequencies, in float64 numpy, one frequency at a
  time as Meta's reference (`apply_scaling` of llama-models) writes it."""
  out = []
  for freq in freqs:
    wavelength = 2 * math.pi / freq
    if wavelength < original_max_len / high_freq_factor:
      out.append(freq)
    elif wavelength > original_max_len / low_freq_factor:
      out.append(freq / factor)
    else:
      smooth = ((original_max_len / wavelength - low_freq_factor)
                / (high_freq_factor - low_freq_factor))
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


def make_batch(batch_size: int, seq_len: int, vocab: int = 258, seed: int = 0) -> dict:
  """A random batch in the trainer's format: one document per row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch_size, seq_len + 1)).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'segment_ids': np.ones((batch_size, seq_len), np.int32),
          'positions': np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1))}


def tight_moe_config(grad_accum_steps: int, n_layers: int = 1):
  """A 32-wide fp32 MoE whose experts drop (capacity 1.0), for 8 x 16-token batches on one
  device in `grad_accum_steps` microbatches (see `padded_batch`)."""
  return config_lib.load('configs/moe.py:tiny', [
      'model.d_model=32', 'model.n_heads=2', 'model.n_kv_heads=2',
      f'model.n_layers={n_layers}', 'model.moe.expert_d_ff=32',
      'model.moe.capacity_factor=1.0', 'data.seq_len=16', 'model.dtype=float32',
      'train.batch_size=8', f'train.grad_accum_steps={grad_accum_steps}'])


def padded_batch() -> dict:
  """8 x 16 tokens whose first 3 rows are padding from token 6: two microbatches of 2
  and 1 padded rows, so a mean per microbatch differs from the whole batch's."""
  batch = make_batch(8, 16, seed=0)
  batch['segment_ids'][:3, 6:] = 0
  return batch


def mesh_config(cfg, data=1, fsdp=1, tensor=1, expert=1):
  with cfg.unlocked():
    cfg.mesh.ici.update(dict(data=data, fsdp=fsdp, tensor=tensor, expert=expert))
  return cfg


# The generation tests' model of each family: its tiny preset, in fp32; the UltraMem one with its optional query conv, whose
# decoding needs a cache of its own, and memory layers in skip placement (0->2, 1->3);
# MEGABYTE (patches of 4) with an UltraMem layer in its global model.
FAMILIES = {  # family -> (config spec, overrides)
    'dense': ('configs/dense.py:tiny', ()),
    'moe': ('configs/moe.py:tiny', ()),
    'ultramem': ('configs/ultramem.py:tiny', ('model.ultramem.query_conv=3',)),
    'megabyte': ('configs/megabyte.py:tiny_ultramem', ()),
}


def with_random_query_convs(model, seed=0):
  """`model` with random UltraMem query-conv kernels: at init they are the identity, whose
  zero earlier taps would hide how a call reads the inputs before each token."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  for i, (_, layer) in enumerate(nnx.iter_graph(model)):
    if getattr(layer, 'query_conv', None) is not None:
      layer.query_conv[...] = jax.random.normal(jax.random.key(seed + i), layer.query_conv.shape)
  return model


def family_config(family, **mesh):
  """FAMILIES[family] in fp32 on a mesh of the given axis sizes."""
  spec, overrides = FAMILIES[family]
  return mesh_config(config_lib.load(spec, ['model.dtype=float32', *overrides]), **mesh)


@pytest.fixture
def triton_builds_for_an_h100(monkeypatch):
  """Pallas' Triton lowering of jax >= 0.11 builds for the GPU it runs on; tests that
  lower for CUDA here tell it an H100 (jax before 0.11 asks for none). jax's own way, an
  abstract mesh of abstract GPUs, cannot lower a program that needs concrete devices, such
  as the MoE layer's `shard_map`."""
  try:
    from jax._src.pallas.triton import gpu_info  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
  monkeypatch.setattr(gpu_info, 'get_gpu_info', lambda: h100)


@pytest.fixture
def traced_as_on_gpu(monkeypatch, triton_builds_for_an_h100):
  """This test's code is traced as on a GPU, to lower for CUDA (running needs a GPU):
  `auto` picks cuDNN attention and the Pallas kernels, and cuDNN's version checks pass."""
  del triton_builds_for_an_h100  # requested for its patch
  fused = pytest.importorskip('jax._src.cudnn.fused_attention_stablehlo')
  monkeypatch.setattr(fused, 'check_cudnn_version', lambda *a, **k: 90100)
  monkeypatch.setattr(fused, 'check_compute_capability', lambda *a, **k: True)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')


def devices(n: int):
  return jax.devices()[:n]


def jitted(fn):
  """fn(model, *args), compiled as a pure function of the model's state: the caches it
  writes are put back; what layers sow is dropped (nnx.jit would keep it, and retrace)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  @jax.jit(static_argnums=0)
  def run(graphdef, state, *args):
    model = nnx.merge(graphdef, state)
    return fn(model, *args), nnx.state(model, nnx.Cache)

  def call(model, *args):
    out, caches = run(*nnx.split(model), *args)
    nnx.update(model, caches)
    return out
  return call


# module(*args), compiled: called eagerly, each of a module's ops compiles a program of its
# own (a test of a tiny layer made 150). One jit for every test: modules built alike share
# their programs.
compiled_call = jitted(lambda module, *args: module(*args))


def sharded_copy(model, cfg):
  """(mesh, the model with its weights placed on the mesh as the trainer places them)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxarch.parallel import make_mesh, tree_shardings  # pylint: disable=g-import-not-at-top
  mesh = make_mesh(cfg)
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, tree_shardings(state, mesh, cfg.mesh.rules))
  return mesh, nnx.merge(graphdef, state)
