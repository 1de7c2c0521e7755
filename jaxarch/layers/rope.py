"""Rotary position embeddings (RoFormer), applied to queries and keys.

Positions are explicit so that packed documents restart at 0 and cached decoding can
continue at any offset.
"""

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10_000.0) -> jax.Array:
  """x: [b, t, n, h] with h even; positions: [b, t] int."""
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [h/2]
  angles = positions[..., None].astype(jnp.float32) * freqs  # [b, t, h/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
