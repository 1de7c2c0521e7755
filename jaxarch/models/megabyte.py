"""MEGABYTE (Yu et al., arXiv 2305.07185): a global transformer over patches of P bytes and
a local transformer inside each patch.

The model reads the pipeline's `inputs` u (a document is `[bos] + bytes`) and predicts
`targets`, the next byte: position t predicts x[t] = u[t+1] from u[1..t]. With K = T/P
patches, in the paper's terms on the byte stream x:

- **global** (width P·D_G = `model.d_model`, the `model` blocks: `dense`, `moe` or
  `ultramem`): the input of patch k is the concatenation of the global embeddings
  (+ a learned per-slot embedding) of the bytes of patch k-1 of x, which are
  u[(k-1)P+1 .. kP]; a learned pad patch stands in at k = 0 and at the first patch of
  every document, so that patch k sees only bytes before it;
- **local** (width D_L, dense blocks of `model.megabyte.local`): run on each patch
  separately; its input at byte p is the global output of the patch, split into P slices
  of D_G and projected to D_L, plus the local embedding of x[kP+p-1] = u[kP+p], or a
  learned pad byte at p = 0; the output head is tied to the local embedding.

Sequences whose length is not a multiple of P are padded at the end (and the padding cut
from the logits). Packed rows must start every document on a patch boundary
(`data.pack_align`, which configs/megabyte.py sets to P): a patch then never mixes two
documents, the global model masks attention across documents, and the first patch of a
document gets the pad patch instead of the previous document's bytes.

A row's first input u[0] is never read: the model sees only the stream x it predicts,
and the pad patch and pad byte stand in before x[0]. At a document's start u[0] is the
BOS (by default the eod; so `data.add_bos=False` is refused), so nothing is lost; a row
that continues a document from the previous row starts with a real byte, the previous
row's last target, which a byte transformer reads and MEGABYTE does not: one byte less
context per continuation row (its first prediction has none), most rows when documents
are longer than `data.seq_len`.

Generation (`jaxarch.infer`) keeps two KV caches: the global model steps once per patch,
when a sequence reaches a patch boundary, and the local model once per byte.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxarch.layers import Embed, RMSNorm
from jaxarch.layers.params import normal, param
from jaxarch.models.transformer import DTYPES, Stack, model_inputs, prompt_rows


def local_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The local model's config: the model section with `megabyte.local`'s shape, dense blocks
  (rotary embeddings as the global model's)."""
  local = ml_collections.ConfigDict({k: v for k, v in cfg.items()
                                     if not isinstance(v, ml_collections.ConfigDict)
                                     or k == 'rope_scaling'})
  local.update(cfg.megabyte.local.to_dict())  # with its own attention_impl
  local.block_pattern = ('dense',)
  local.head_dim = None
  return local


def _next_bytes(tokens: jax.Array) -> jax.Array:
  """u [b, T] -> x [b, T], x[t] = u[t+1]: the bytes the positions predict. The last one is
  unknown and filled with u's last; its patch is never a global input."""
  return jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)


class PatchCache(nnx.Cache):
  """Per-sequence decoding state of MEGABYTE outside its attention caches."""


class Megabyte(nnx.Module):
  """tokens [b, t] -> logits [b, t, vocab] (fp32)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    local = local_config(cfg)
    p = self.patch_size = cfg.megabyte.patch_size
    self.max_len = cfg.max_len  # bytes it is built for: `generate` warns past them
    d_g, d_l = cfg.d_model // p, local.d_model
    self.dtype = dtype
    init = normal(cfg.init_std, cfg.init_truncation)
    embed = lambda dim: Embed(cfg.vocab_size, dim, init_std=cfg.init_std,
                              init_truncation=cfg.init_truncation, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
    self.global_embed = embed(d_g)
    self.slot_embed = param(rngs, init, (p, d_g), (None, 'embed'), param_dtype,
                            weight_decay=False)
    self.pad_patch = param(rngs, init, (cfg.d_model,), ('embed',), param_dtype,
                           weight_decay=False)
    self.global_model = Stack(cfg, rngs=rngs)
    self.global_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
    self.to_local = param(rngs, init, (d_g, d_l), (None, 'embed'), param_dtype)
    self.local_embed = embed(d_l)
    self.local_pad = param(rngs, init, (d_l,), ('embed',), param_dtype, weight_decay=False)
    self.local_model = Stack(local, rngs=rngs)
    self.final_norm = RMSNorm(d_l, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
    # Decoding state (init_cache): the global model's output for the current patch of each
    # sequence, projected to the local width, and the bytes of that patch so far.
    self.patch_out = self.patch_bytes = nnx.data(None)

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    tokens, segment_ids, positions = model_inputs(tokens, segment_ids, positions)
    b, t = tokens.shape
    p = self.patch_size
    pad = -t % p
    if pad:  # a partial last patch: padding after it (any id) changes no earlier prediction
      tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
      segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
      positions = jnp.pad(positions, ((0, 0), (0, pad)), mode='edge')
    k = tokens.shape[1] // p
    patches = self.global_inputs(tokens, segment_ids)  # b K P·D_G
    out = self.global_outputs(patches, positions[:, ::p] // p, segment_ids[:, ::p])
    x = self.local_inputs(tokens.reshape(b, k, p)) + out  # b K P D_L
    local_positions = jnp.broadcast_to(jnp.arange(p), (b * k, p))
    x = self.local_model(x.reshape(b * k, p, -1), local_positions, jnp.ones_like(local_positions))
    return self.logits(x.reshape(b, k * p, -1))[:, :t]

  def global_inputs(self, tokens, segment_ids):
    """u [b, T] -> global input of every patch [b, K, P·D_G] (shifted by one patch)."""
    b, t = tokens.shape
    p = self.patch_size
    patches = self.embed_patch(_next_bytes(tokens).reshape(b, t // p, p))
    first = segment_ids[:, ::p]
    starts = jnp.concatenate([jnp.ones_like(first[:, :1], bool), first[:, 1:] != first[:, :-1]], 1)
    shifted = jnp.concatenate([patches[:, :1], patches[:, :-1]], axis=1)
    # Selected in fp32, then cast: the pad's gradient sums over the patches in fp32
    # (layers/params.py); `shifted` passes through unchanged.
    return jnp.where(starts[..., None], self.pad_patch[...], shifted).astype(self.dtype)

  def embed_patch(self, x):
    """Bytes [..., P] -> the concatenation of their global embeddings [..., P·D_G]."""
    # Added in fp32, then cast: the slot embeddings' gradient sums over the patches in
    # fp32 (layers/params.py).
    e = (self.global_embed(x) + self.slot_embed[...]).astype(self.dtype)
    return e.reshape(*x.shape[:-1], -1)

  def global_outputs(self, patches, positions, segment_ids):
    """Global inputs [b, K, P·D_G] -> per-byte contexts for the local model [b, K, P, D_L]."""
    h = self.global_norm(self.global_model(patches, positions, segment_ids))
    h = h.reshape(*h.shape[:2], self.patch_size, -1)
    return jnp.einsum('bkpg,gl->bkpl', h, self.to_local[...].astype(self.dtype))

  def local_inputs(self, tokens):
    """u as patches [b, K, P] -> local embeddings of the previous byte [b, K, P, D_L]."""
    e = self.local_embed(tokens)
    # Broadcast, then cast: the pad's gradient sums over the patches in fp32 (params.py).
    pad = jnp.broadcast_to(self.local_pad[...], e[:, :, :1].shape).astype(self.dtype)
    return jnp.concatenate([pad, e[:, :, 1:]], axis=2)

  def logits(self, x):
    return self.local_embed.attend(self.final_norm(x)).astype(jnp.float32)

  # Cached generation: see jaxarch.infer.decoding for the protocol.

  def init_cache(self, batch: int, length: int):
    p = self.patch_size
    self.global_model.init_cache(batch, -(-length // p) + 1)  # + a scratch slot, see below
    self.local_model.init_cache(batch, p)
    d_l = self.to_local.shape[1]
    self.patch_out = PatchCache(jnp.zeros((batch, p, d_l), self.dtype),
                                out_sharding=('batch', None, 'embed'), eager_sharding=False)
    self.patch_bytes = PatchCache(jnp.zeros((batch, p), jnp.int32),
                                  out_sharding=('batch', None), eager_sharding=False)

  def prefill(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """Prompts [b, T] (T a multiple of P) -> logits [b, vocab] at each prompt's last byte.

    Runs the global model over every patch (filling its cache), then the local model
    over each sequence's current patch only (filling the local cache).
    """
    b, t = tokens.shape
    p = self.patch_size
    if t % p:  # else a reshape fails deep inside JAX
      raise ValueError(f'MEGABYTE prefill takes prompts padded to whole patches of {p} bytes, '
                       f'not {t}: pad them on the right (lengths says where each ends)')
    positions, segment_ids = prompt_rows(tokens, lengths)
    patches = self.global_inputs(tokens, jnp.ones_like(tokens))  # one document per row
    out = self.global_outputs(patches, positions[:, ::p] // p, segment_ids[:, ::p])
    last = lengths - 1
    current = (last // p)[:, None]  # the patch of each prompt's last byte
    rows = jnp.arange(b)[:, None]
    patch_tokens = tokens.reshape(b, t // p, p)[rows, current][:, 0]  # u's patch [b, P]
    self.patch_bytes[...] = _next_bytes(tokens).reshape(b, t // p, p)[rows, current][:, 0]
    self.patch_out[...] = out[rows, current][:, 0]
    x = self.local_inputs(patch_tokens[:, None])[:, 0] + self.patch_out[...]
    local_positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    x = self.local_model(x, local_positions, jnp.ones_like(local_positions))
    x = jnp.take_along_axis(x, (last % p)[:, None, None], axis=1)
    return self.logits(x)[:, 0]

  def decode_step(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """`tokens` [b] at `positions` [b] -> logits [b, vocab].

    A sequence whose position starts a patch first runs the global model on the patch
    that just ended; the step runs the global model only when some sequence needs it.
    Sequences not at a boundary then write a scratch cache slot (their next patch's, to
    be overwritten before it is read) and keep their patch output.
    """
    p = self.patch_size
    slot = positions % p
    rows = jnp.arange(tokens.shape[0])
    # Bytes of the current patch of x, u[kP+1 .. kP+P]: the new byte lands in slot p-1 of
    # the previous patch when it starts a patch, else in slot (position - 1) % P.
    patch_bytes = self.patch_bytes[...].at[rows, (positions - 1) % p].set(tokens)
    due = slot == 0

    graphdef, state = nnx.split(self)
    caches = nnx.state(self, nnx.Cache)

    def global_step(state):  # a pure function of the state: what layers sow is dropped
      model = nnx.merge(graphdef, state)
      patch_index = positions // p
      index = jnp.where(due, patch_index, patch_index + 1)
      inputs = model.embed_patch(patch_bytes)[:, None]  # b 1 P·D_G
      out = model.global_outputs(inputs, index[:, None], jnp.ones_like(index)[:, None])[:, 0]
      out = jnp.where(due[:, None, None], out, model.patch_out[...])
      return out, nnx.state(model, nnx.Cache)

    out, caches = jax.lax.cond(jnp.any(due), global_step,
                               lambda _: (self.patch_out[...], caches), state)
    nnx.update(self, caches)
    self.patch_out[...] = out
    self.patch_bytes[...] = patch_bytes
    e = self.local_embed(tokens)
    x = jnp.where(due[:, None], self.local_pad[...].astype(self.dtype), e)
    x = x + self.patch_out[...][rows, slot]
    x = self.local_model(x[:, None], slot[:, None], jnp.ones_like(slot)[:, None])
    return self.logits(x)[:, 0]
