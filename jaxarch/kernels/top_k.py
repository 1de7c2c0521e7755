"""An exact top-k that ranks long rows in chunks, for UltraMem's key ranking on a GPU.

XLA's GPU top-k kernel takes k <= 16 (`TopkSpecializer`); a larger k becomes a sort of
each whole row and a slice. UltraMem ranks k = 80 of a 6,400-score grid per token and
head, and a bitonic sort of rows longer than a block's shared memory holds runs some of
its passes through global memory. Cut into chunks of `chunk` scores, each chunk is
ranked on its own (a short row, sorted in shared memory) and the chunks' top k are
ranked again: the same k values and indices as `jax.lax.top_k`, ties included (the
lower index first), since every element of the top k is in its chunk's top k. Which
is faster on a GPU is `benchmarks/top_k.py`'s to say; on CPU one top-k is 4.3x faster
(XLA:CPU's is a partial sort), so `model.ultramem.top_k_chunk` is 0 unless set.
"""

import jax
import jax.numpy as jnp


def chunked_top_k(x: jax.Array, k: int, chunk: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k(x, k)` of x [..., n], ranked in chunks of `chunk` along the last
  axis (one `jax.lax.top_k` when chunk is 0, n <= chunk or k > chunk)."""
  n = x.shape[-1]
  if not chunk or n <= chunk or k > chunk:
    return jax.lax.top_k(x, k)
  chunks = -(-n // chunk)
  lowest = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
  # Padding last: where it ties a real value, the real one has the lower index.
  padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, chunks * chunk - n)],
                   constant_values=lowest)
  values, index = jax.lax.top_k(padded.reshape(*x.shape[:-1], chunks, chunk), k)  # ... c k
  index = index + chunk * jnp.arange(chunks, dtype=index.dtype)[:, None]
  flat = lambda a: a.reshape(*x.shape[:-1], chunks * k)  # chunk by chunk: index order kept
  values, best = jax.lax.top_k(flat(values), k)
  return values, jnp.take_along_axis(flat(index), best, axis=-1)
