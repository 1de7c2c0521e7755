"""Rotary position embeddings (RoFormer), applied to queries and keys.

Positions are explicit so that packed documents restart at 0 and cached decoding can
continue at any offset.

Llama 3.1 and 3.2 stretch the frequencies (`Llama3Scaling`, `model.rope_scaling`):
rotations slower than the pretraining context turn `factor` times slower still, so that
positions up to `factor` times further keep the angles the model knows; fast rotations
(local order) are kept; those between are interpolated. Gemma 3 4B, 12B and 27B's global
layers scale linearly (`LinearScaling`): every rotation `factor` times slower, position p
turned as p / factor.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Llama3Scaling(NamedTuple):
  """Llama 3.1's `rope_type: llama3` (hashable: a static attribute of a module)."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192


class LinearScaling(NamedTuple):
  """transformers' `rope_type: linear` (position interpolation)."""
  factor: float = 8.0


RopeScaling = Llama3Scaling | LinearScaling


def rope_frequencies(half: int, theta: float = 10_000.0,
                     scaling: RopeScaling | None = None) -> jax.Array:
  """The inverse frequencies [half] of a head of 2·half dimensions, in float32."""
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [h/2]
  if scaling is None:
    return freqs
  if isinstance(scaling, LinearScaling):  # `_compute_linear_scaling_rope_parameters`
    return freqs / scaling.factor
  # transformers' `_compute_llama3_parameters`: wavelengths past original_max_len /
  # low_freq_factor are divided by `factor`, those under original_max_len /
  # high_freq_factor kept, and those between interpolated on original_max_len / wavelength.
  factor, low, high, original = scaling
  wavelength = 2 * jnp.pi / freqs
  smooth = (original / wavelength - low) / (high - low)  # 0 at the long end, 1 at the short
  between = (1 - smooth) * freqs / factor + smooth * freqs
  return jnp.where(wavelength > original / low, freqs / factor,
                   jnp.where(wavelength < original / high, freqs, between))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10_000.0,
               scaling: RopeScaling | None = None) -> jax.Array:
  """x: [b, t, n, h] with h even; positions: [b, t] int."""
  freqs = rope_frequencies(x.shape[-1] // 2, theta, scaling)  # [h/2]
  angles = positions[..., None].astype(jnp.float32) * freqs  # [b, t, h/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
