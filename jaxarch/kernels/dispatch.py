"""Which kernels an op's `impl` runs on this platform: one rule for every custom op.

`'xla'` is the op's pure-JAX reference; `'pallas'` the compiled Pallas kernels of this
platform (an error where the op has none); `'mosaic'` an op's Mosaic GPU kernels (Hopper
or newer); `'interpret'` / `'interpret_tpu'` / `'interpret_mosaic'` the Triton / TPU /
Mosaic GPU kernels in Pallas' interpreter, on any backend (the CPU tests); `'auto'` the
compiled kernels where the op has them, else `'xla'`.
"""

import jax


def kernels_for(op: str, impl: str, impls: tuple[str, ...], compiled: dict[str, str],
                key: str = 'impl') -> str:
  """impl -> 'xla', a kernel family of `compiled` (platform -> family, e.g. {'gpu':
  'triton'}), 'mosaic', or '<family>_interpret'. Errors name `impl` as `key` (a config
  key)."""
  if impl not in impls:
    raise ValueError(f'{op}: {key}={impl!r}; expected one of {impls}')
  interpreted = {'interpret': 'triton_interpret', 'interpret_tpu': 'tpu_interpret',
                 'interpret_mosaic': 'mosaic_interpret', 'xla': 'xla'}
  if impl in interpreted:
    return interpreted[impl]
  platform = jax.default_backend()
  if impl == 'mosaic':
    _check_hopper(op, key, platform)
    return 'mosaic'
  kernels = compiled.get(platform)
  if impl == 'pallas' and kernels is None:
    needs = ' or '.join(p.upper() for p in compiled)
    raise ValueError(f"{op}: {key}='pallas' needs a {needs}, and this process runs on "
                     f"{platform}; use {key}='interpret' (the kernels in Pallas' "
                     f"interpreter) or {key}='xla'")
  return kernels or 'xla'  # 'pallas', or 'auto' (XLA where no kernel compiles)


def _check_hopper(op: str, key: str, platform: str) -> None:
  """Mosaic GPU kernels multiply with `wgmma` and copy with TMA: sm_90 (Hopper) or newer."""
  capability = getattr(jax.devices()[0], 'compute_capability', None) if platform == 'gpu' else None
  if platform != 'gpu' or (capability and float(capability) < 9.0):
    where = platform if platform != 'gpu' else f'a GPU of compute capability {capability}'
    raise ValueError(f"{op}: {key}='mosaic' needs a Hopper GPU (compute capability 9.0 or "
                     f"more), and this process runs on {where}; use {key}='pallas' (Triton), "
                     f"'interpret_mosaic' (the kernels in Pallas' interpreter) or 'xla'")
