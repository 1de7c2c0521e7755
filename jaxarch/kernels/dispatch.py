"""Which kernels an op's `impl` runs on this platform: one rule for every custom op.

`'xla'` is the op's pure-JAX reference; `'pallas'` the compiled Pallas kernels of this
platform (an error where the op has none); `'interpret'` / `'interpret_tpu'` the GPU /
TPU kernels in Pallas' interpreter, on any backend (the CPU tests); `'auto'` the compiled
kernels where the op has them, else `'xla'`.
"""

import jax


def kernels_for(op: str, impl: str, impls: tuple[str, ...], compiled: dict[str, str],
                key: str = 'impl') -> str:
  """impl -> 'xla', a kernel family of `compiled` (platform -> family, e.g. {'gpu':
  'triton'}), or '<family>_interpret'. Errors name `impl` as `key` (a config key)."""
  if impl not in impls:
    raise ValueError(f'{op}: {key}={impl!r}; expected one of {impls}')
  if impl == 'interpret':
    return 'triton_interpret'
  if impl == 'interpret_tpu':
    return 'tpu_interpret'
  if impl == 'xla':
    return 'xla'
  platform = jax.default_backend()
  kernels = compiled.get(platform)
  if impl == 'pallas' and kernels is None:
    needs = ' or '.join(p.upper() for p in compiled)
    raise ValueError(f"{op}: {key}='pallas' needs a {needs}, and this process runs on "
                     f"{platform}; use {key}='interpret' (the kernels in Pallas' "
                     f"interpreter) or {key}='xla'")
  return kernels or 'xla'  # 'pallas', or 'auto' (XLA where no kernel compiles)
