"""Grouped-query self-attention with RoPE, causal and segment (packing) masks, KV cache.

The attention itself is `jax.nn.dot_product_attention`, which handles grouped KV heads
natively and dispatches to cuDNN flash attention on GPU when asked (`impl='cudnn'`).

For generation (`jaxarch.infer`), `init_cache(batch, length)` preallocates the keys and
values of `length` positions as `nnx.Cache` variables, sharded by the logical axes
(batch, length, kv_heads, head_dim). With a cache, a call of several tokens is a prefill
that starts every sequence at position 0 (it attends within itself, like training, and
writes its keys and values to slots 0..t-1); a call of one token is a decode step that
writes slot `positions[b]` of each sequence and attends to its slots `<= positions[b]` (the
one-token `Layout`, below).
Slots past a sequence's own position may hold a longer neighbour's padding from the
prefill; they are never read before being overwritten.

A sliding `window` (Mistral's) lets a query see only the keys less than `window`
positions before it, in training, prefill and decode alike. Its cache is a ring of
min(length, window) slots: position p lives in slot p mod slots, so a decode step reads
and keeps the window, not the whole context (Mistral 7B's 4096 of 32k positions).

A `Layout` (BiTA's mask groups and draft trees, `layers.layout`) replaces the causal and
document masks by its own visibility; with a cache, the call is written after each
sequence's cached slots and `keep_path` keeps the accepted tokens. A `prefix` of learned
keys and values (BiTA's deep prompt) is seen by the tokens the layout marks.
"""

import logging

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxarch.config import ConfigError
from jaxarch.layers import layout as layout_lib
from jaxarch.layers import remat
from jaxarch.layers.norms import RMSNorm
from jaxarch.layers.params import normal, param
from jaxarch.layers.rope import RopeScaling, apply_rope

log = logging.getLogger(__name__)

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # a hidden key's logit, as jax.nn uses


def document_mask(segment_ids: jax.Array) -> jax.Array:
  """[b, t] segment ids -> [b, 1, t, t] bool: query and key in the same document.

  Causality is added by the attention kernel itself (`is_causal`), which lets cuDNN use
  its native causal mask.
  """
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def _implementation(impl: str, dtype) -> str | None:
  """'auto' is cuDNN flash attention where it runs (GPU, 16-bit), XLA elsewhere. 'cudnn'
  off a GPU is XLA too (the same function: a GPU run loads anywhere), with a warning."""
  on_gpu = jax.default_backend() == 'gpu'
  sixteen_bit = dtype in (jnp.bfloat16, jnp.float16)
  if impl == 'auto':
    impl = 'cudnn' if on_gpu and sixteen_bit else 'xla'
  elif impl == 'cudnn' and not on_gpu:
    log.warning("model.attention_impl='cudnn' runs on GPUs; attention runs on XLA on %s",
                jax.default_backend())
    impl = 'xla'
  elif impl == 'cudnn' and not sixteen_bit:
    raise ConfigError(f"model.attention_impl='cudnn' needs model.dtype "
                      f'bfloat16 or float16 (cuDNN flash attention), not '
                      f'{jnp.dtype(dtype).name}; use auto or xla')
  return None if impl == 'xla' else impl


class Attention(nnx.Module):

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
               rope_theta: float = 10_000.0, rope_scaling: RopeScaling | None = None,
               init_std: float = 0.02,
               out_std: float | None = None, init_truncation: float = 0.0, impl: str = 'xla',
               qkv_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6,
               window: int | None = None, dtype=jnp.bfloat16, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.rope_theta, self.rope_scaling = rope_theta, rope_scaling
    self.window = window
    self.impl = _implementation(impl, dtype)
    self.dtype = dtype
    init = normal(init_std, init_truncation)
    self.q_proj = param(rngs, init, (d_model, n_heads, head_dim),
                        ('embed', 'heads', 'head_dim'), param_dtype)
    self.k_proj = param(rngs, init, (d_model, n_kv_heads, head_dim),
                        ('embed', 'kv_heads', 'head_dim'), param_dtype)
    self.v_proj = param(rngs, init, (d_model, n_kv_heads, head_dim),
                        ('embed', 'kv_heads', 'head_dim'), param_dtype)
    self.o_proj = param(rngs, normal(out_std or init_std, init_truncation),
                        (n_heads, head_dim, d_model), ('heads', 'head_dim', 'embed'),
                        param_dtype)
    # Qwen2's biases on q, k and v (none on o), added before the rotation; sharded as the
    # projections' heads, not decayed, as norms and embeddings.
    bias = lambda heads, axis: param(rngs, jax.nn.initializers.zeros, (heads, head_dim),
                                     (axis, 'head_dim'), param_dtype, weight_decay=False)
    self.q_bias = bias(n_heads, 'heads') if qkv_bias else None
    self.k_bias = bias(n_kv_heads, 'kv_heads') if qkv_bias else None
    self.v_bias = bias(n_kv_heads, 'kv_heads') if qkv_bias else None
    # QK-norm (Qwen3's): an RMSNorm over each head's query and key, one scale [head_dim]
    # shared by the heads, before the rotation. It bounds the attention logits by the
    # scales, whatever the projections' size.
    norm = lambda: RMSNorm(head_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
    self.q_norm = norm() if qk_norm else None
    self.k_norm = norm() if qk_norm else None
    self.drop_cache()

  def init_cache(self, batch: int, length: int):
    """Zeroed keys and values [batch, slots, kv_heads, head_dim] for cached decoding:
    `length` slots, or a windowed layer's ring of at most `window`."""
    slots = length if self.window is None else min(length, self.window)
    shape = (batch, slots) + tuple(self.k_proj.shape[1:])
    cache = lambda: nnx.Cache(jnp.zeros(shape, self.dtype), eager_sharding=False,
                              out_sharding=('batch', 'length', 'kv_heads', 'head_dim'))
    self.cache_k, self.cache_v = cache(), cache()

  def drop_cache(self):
    self.cache_k = self.cache_v = nnx.data(None)  # Cache variables once decoding

  def keep_path(self, path: jax.Array, cached: jax.Array):
    """After a tree call: keep the keys and values of its accepted path (see `Layout`)."""
    self.cache_k[...] = layout_lib.keep_path(self.cache_k[...], path, cached)
    self.cache_v[...] = layout_lib.keep_path(self.cache_v[...], path, cached)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               layout: layout_lib.Layout | None = None, prefix=None) -> jax.Array:
    """`prefix`: (keys, values) [p, kv_heads, head_dim], with a `layout` only."""
    cast = lambda p: p[...].astype(self.dtype)
    q = jnp.einsum('btd,dnh->btnh', x, cast(self.q_proj))
    k = jnp.einsum('btd,dkh->btkh', x, cast(self.k_proj))
    v = jnp.einsum('btd,dkh->btkh', x, cast(self.v_proj))
    if self.q_bias is not None:  # added in fp32: the biases' gradients sum in fp32 (params.py)
      q, k, v = ((a + bias[...]).astype(self.dtype)
                 for a, bias in ((q, self.q_bias), (k, self.k_bias), (v, self.v_bias)))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, self.rope_theta, self.rope_scaling)
    k = apply_rope(k, positions, self.rope_theta, self.rope_scaling)
    if layout is None and self.cache_k is not None and x.shape[1] == 1:
      layout = layout_lib.one_token(positions[:, 0])  # a decode step
    if layout is not None:
      out = self._with_layout(q, k, v, layout, prefix, positions)
    else:
      if self.cache_k is not None:  # prefill from position 0
        self._prefill_cache(k, v, segment_ids)
      # A document's positions run with the row's indices, so a window over indices is
      # one over positions (and the document mask keeps other documents out).
      window = None if self.window is None else (self.window - 1, 0)
      out = jax.nn.dot_product_attention(q, k, v, mask=document_mask(segment_ids),
                                         is_causal=True, local_window_size=window,
                                         implementation=self.impl)  # btnh
    out = checkpoint_name(out, remat.ATTENTION)
    return jnp.einsum('btnh,nhd->btd', out, cast(self.o_proj))

  def _prefill_cache(self, k, v, segment_ids):
    """Writes a prefill's keys and values k, v [b, t, kv, h] from slot 0; a windowed
    layer's ring takes each slot's last position before the prompt's padding
    (`segment_ids` 0), which would otherwise overwrite positions still in the window."""
    if self.window is None:
      self.cache_k[...] = jax.lax.dynamic_update_slice_in_dim(self.cache_k[...], k, 0, 1)
      self.cache_v[...] = jax.lax.dynamic_update_slice_in_dim(self.cache_v[...], v, 0, 1)
      return
    slots = self.cache_k.shape[1]
    lengths = (segment_ids != 0).sum(axis=1)  # b: a prompt is right-padded
    behind = lengths[:, None] - 1 - jnp.arange(slots)  # b S: last position - slot
    written = behind >= 0
    source = jnp.where(written, jnp.arange(slots) + behind // slots * slots, 0)[..., None, None]
    for cache, x in ((self.cache_k, k), (self.cache_v, v)):
      kept = jnp.take_along_axis(x, source, axis=1)
      cache[...] = jnp.where(written[..., None, None], kept.astype(cache.dtype), cache[...])

  def _decode_ring(self, q, k, v, positions):
    """A windowed layer's decode step, q, k, v [b, 1, ., h] at `positions` [b, 1], on its
    ring of S slots (S <= window) -> [b, 1, n, h]. Slot s holds position
    p - ((p - s) mod S), within the window by construction; it is seen once written (>= 0)."""
    slots = self.cache_k.shape[1]
    slot = positions[:, 0] % slots
    self.cache_k[...] = layout_lib.write_call(self.cache_k[...], k, slot)
    self.cache_v[...] = layout_lib.write_call(self.cache_v[...], v, slot)
    held = positions[:, :, None] - (positions[:, :, None] - jnp.arange(slots)) % slots  # b 1 S
    return jax.nn.dot_product_attention(q, self.cache_k[...], self.cache_v[...],
                                        mask=(held >= 0)[:, None])

  def _with_layout(self, q, k, v, layout, prefix, positions):
    """q, k, v [b, t, ., h] of a call laid out by `layout` -> [b, t, n, h]."""
    b = q.shape[0]
    if self.window is not None:
      if layout.cached is None or layout.context is not None or prefix is not None or (
          q.shape[1] != 1):
        raise ValueError('a sliding window is for training and decoding one token at a '
                         "time, not BiTA's layouts")
      return self._decode_ring(q, k, v, positions)
    if layout.context is not None:  # the caches hold whole rows, which the call reads
      return self._groups_after_context(q, k, v, layout, prefix)
    if layout.cached is None:  # the call is the whole context
      keys, values = k, v
      mask = layout.visible_rows(b)
    else:
      keys = layout_lib.write_call(self.cache_k[...], k, layout.cached)
      values = layout_lib.write_call(self.cache_v[...], v, layout.cached)
      self.cache_k[...], self.cache_v[...] = keys, values
      mask = layout_lib.cache_mask(layout, keys.shape[1])
    keys, values, mask = self._with_prefix(keys, values, mask, layout, prefix)
    return jax.nn.dot_product_attention(q, keys, values, mask=mask[:, None])

  def _with_prefix(self, keys, values, mask, layout, prefix):
    """keys, values [b, S, k, h] and mask [b, t, S] with the prefix's keys and values put
    first, seen by the tokens `layout.sees_prefix` marks (unchanged without a prefix)."""
    if prefix is None:
      return keys, values, mask
    b, t = mask.shape[:2]
    # Broadcast, then cast: the prefix's gradient sums over the rows in fp32 (params.py).
    prefix_k, prefix_v = (jnp.broadcast_to(p, (b, *p.shape)).astype(self.dtype)
                          for p in prefix)
    sees = jnp.broadcast_to(layout.sees_prefix[None, :, None], (b, t, prefix_k.shape[1]))
    return (jnp.concatenate([prefix_k, keys], axis=1),
            jnp.concatenate([prefix_v, values], axis=1),
            jnp.concatenate([sees, mask], axis=2))

  def _groups_after_context(self, q, k, v, layout, prefix):
    """q, k, v [b, g·M, ., h] of groups of M tokens that each see the cached slots
    `layout.context` marks, the prefix, and their own group (`visible` [M, M]) ->
    [b, g·M, n, h]: one softmax over the three. Written out so that a token's logits over
    the call span its own group only: g·M² of them, not the (g·M)² of one masked call."""
    b, t, n, h = q.shape
    kv, m = k.shape[2], layout.visible.shape[-1]
    g = t // m
    cached = layout.context.shape[-1]
    shared_k, shared_v, sees = self._with_prefix(
        self.cache_k[...][:, :cached], self.cache_v[...][:, :cached], layout.context, layout,
        prefix)
    s = shared_k.shape[1]
    q = q.reshape(b, g, m, kv, n // kv, h)  # query heads grouped by their kv head: k r
    own_k, own_v = (x.reshape(b, g, m, kv, h) for x in (k, v))
    logits = jnp.concatenate([
        jnp.einsum('bgmkrh,bskh->bgmkrs', q, shared_k, preferred_element_type=jnp.float32),
        jnp.einsum('bgmkrh,bgjkh->bgmkrj', q, own_k, preferred_element_type=jnp.float32)],
        axis=-1) * h ** -0.5
    mask = jnp.concatenate([
        sees.reshape(b, g, m, 1, 1, s),
        jnp.broadcast_to(layout.visible[:, None, None, :], (b, g, m, 1, 1, m))], axis=-1)
    probs = jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1).astype(self.dtype)
    out = (jnp.einsum('bgmkrs,bskh->bgmkrh', probs[..., :s], shared_v)
           + jnp.einsum('bgmkrj,bgjkh->bgmkrh', probs[..., s:], own_v))
    return out.reshape(b, t, n, h)
