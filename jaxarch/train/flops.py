"""FLOPs accounting and model FLOPs utilisation (MFU): the one place for the convention.

Convention (PaLM appendix B / Chinchilla): a training step costs, per token,

  6 · N_matmul  +  6 · n_layers · seq_len · n_heads · head_dim

- N_matmul is the number of parameters a token multiplies against: active parameters
  minus the embedding table (a lookup, not a matmul), plus d_model·vocab when the output
  head is tied to the embedding (then it is a matmul again). 6 = 2 (multiply-add) × 3
  (forward, backward w.r.t. activations, backward w.r.t. weights).
- Attention scores and the weighted sum of values cost 2·2·T·n_heads·head_dim per token
  and layer in the forward pass for full attention; causal attention is counted at half
  (only the lower triangle is useful work), hence 2·T·n·h forward and 6·T·n·h per step.
  A sliding window of w < T positions leaves each query w − w²/2T keys on average
  (`model.sliding_window`, in the blocks `model.attention_pattern` marks 'local').
- Not counted: activations, softmax, RoPE, the norms' arithmetic, optimizer update (all
  O(N) or O(T·d)). The norms' scales are parameters and sit in N_matmul (2·n_layers + 1
  vectors of d_model: 0.13% of the dense `tiny`'s count, less at scale).
- MEGABYTE counts per byte (`megabyte_flops_per_byte`): its global model per patch.
- BiTA counts per sequence token (`bita_flops_per_token`): the frozen model runs forward
  over the T tokens of a row only to fill its caches (nothing trainable lies behind them,
  so their backward pass is no useful work): 2 · N each less what no cache needs, the
  output head and the last block but its key and value projections (with any side layer
  written after it); then forward and backward w.r.t. activations over its g·M mask
  tokens (4 · N each, no weight gradients; g = `bita.train_groups` groups, one per token
  when 0). A mask token sees its anchor's past, as much as a causal token sees.

MFU = achieved model FLOPs per second / peak dense bf16 FLOPs of the devices; remat
recomputation is *not* counted as model FLOPs (that would be hardware FLOPs utilisation).
"""

import re

from flax import nnx
import ml_collections

from jaxarch import models
from jaxarch.models.bita import base_config, mask_groups
from jaxarch.models.transformer import (BLOCKS, SIDE_LAYERS, block_plan, layer_windows,
                                        side_placement)

# Peak dense bf16 FLOP/s per device, from the vendors' datasheets (half the sparse figure:
# 1,978.9 TFLOP/s on an H100 or H200 SXM). The longest name found in the device kind as
# whole words wins ('NVIDIA H100 80GB HBM3' is an H100, 'NVIDIA RTX A1000' no A100).
PEAK_BF16_FLOPS = {
    'H100': 989.4e12,  # SXM
    'H100 PCIe': 756e12,
    'H100 NVL': 835e12,
    'H200': 989.4e12,  # SXM
    'H200 NVL': 835e12,  # not the SXM part's peak
    'GH200': 989.4e12,  # Grace Hopper: an H100 SXM's GPU
    'A100': 312e12,
    'TPU v4': 275e12,
    'TPU v4 lite': 138e12,  # v4i, the inference part
    'TPU v5 lite': 197e12,  # v5e
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,  # v6e (Trillium)
    'TPU v6e': 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s for a `jax.Device.device_kind`, or None when unknown (e.g. CPU)."""
  for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if re.search(rf'(?<!\w){re.escape(name)}(?!\w)', device_kind, re.IGNORECASE):
      return PEAK_BF16_FLOPS[name]
  return None


def matmul_params(model_cfg: ml_collections.ConfigDict, counts: dict[str, int]) -> int:
  n = counts['active'] - counts['embedding']
  if model_cfg.tie_embeddings:
    n += model_cfg.d_model * model_cfg.vocab_size
  return n


def attention_flops_per_token(model_cfg: ml_collections.ConfigDict, seq_len: int) -> int:
  """6 · T · n · h per layer: 12 · n · h per key a query sees, T/2 on average when it
  sees every earlier one; w − w²/2T under a sliding window of w < T positions."""
  head_dim = model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads
  keys = 0.0  # keys seen per query, summed over the layers
  for w in layer_windows(model_cfg):
    keys += seq_len / 2 if w is None or w >= seq_len else w - w * w / (2 * seq_len)
  return round(12 * keys * model_cfg.n_heads * head_dim)


def train_flops_per_token(model_cfg: ml_collections.ConfigDict, counts: dict[str, int],
                          seq_len: int) -> float:
  if model_cfg.family == 'megabyte':
    return megabyte_flops_per_byte(model_cfg, counts, seq_len)
  if model_cfg.family == 'bita':
    return bita_flops_per_token(model_cfg, counts, seq_len)
  return 6 * matmul_params(model_cfg, counts) + attention_flops_per_token(model_cfg, seq_len)


def bita_flops_per_token(model_cfg: ml_collections.ConfigDict, counts: dict[str, int],
                         seq_len: int) -> float:
  """BiTA training: a forward pass per token that fills the caches, and g·M/T mask tokens
  per token forward and backward through the frozen model."""
  n = matmul_params(model_cfg, counts)
  attention = attention_flops_per_token(model_cfg, seq_len)  # forward 1/3, backward 2/3
  groups = mask_groups(model_cfg.bita.train_groups, seq_len)
  masks_per_token = groups * model_cfg.bita.num_mask_tokens / seq_len
  tokens = (2 * (n - _cache_free_params(model_cfg))
            + attention / 3 * (model_cfg.n_layers - 1) / model_cfg.n_layers)
  return tokens + masks_per_token * (4 * n + attention)


def _cache_free_params(model_cfg: ml_collections.ConfigDict) -> int:
  """Active parameters of BiTA's frozen model that its tokens' pass leaves unused (XLA
  drops them): the output head, and the last block (with the side layers written after
  it) but for the key and value projections that fill its cache."""
  base = base_config(model_cfg)
  last = base.n_layers - 1

  def build():
    rngs = nnx.Rngs(0)
    return [BLOCKS[block_plan(base)[last]](base, last, rngs),
            *(SIDE_LAYERS[kind](base, i, rngs)
              for i, (kind, _, write) in enumerate(side_placement(base)) if write == last)]

  block, *sides = nnx.eval_shape(build)
  used = block.attn.k_proj.size + block.attn.v_proj.size
  return (base.d_model * base.vocab_size
          + sum(models.param_counts(m)['active'] for m in (block, *sides)) - used)


def _dense_block_params(d: int, n_heads: int, n_kv_heads: int, d_ff: int) -> int:
  head_dim = d // n_heads
  return 2 * d * n_heads * head_dim + 2 * d * n_kv_heads * head_dim + 3 * d * d_ff


def megabyte_flops_per_byte(model_cfg: ml_collections.ConfigDict, counts: dict[str, int],
                            seq_len: int) -> float:
  """MEGABYTE per byte: the global model runs once per patch of P bytes over T/P patches,
  the local model (with the global->local projection and the tied head) once per byte
  over P positions."""
  p, local = model_cfg.megabyte.patch_size, model_cfg.megabyte.local
  d_g = model_cfg.d_model // p
  local_matmul = (local.n_layers * _dense_block_params(local.d_model, local.n_heads,
                                                      local.n_kv_heads, local.d_ff)
                  + d_g * local.d_model)  # + the global->local projection
  global_matmul = counts['active'] - counts['embedding'] - local_matmul
  head = local.d_model * model_cfg.vocab_size  # tied to the local embedding
  global_attention = attention_flops_per_token(model_cfg, seq_len // p) / p
  local_attention = 6 * local.n_layers * p * local.d_model
  return 6 * (global_matmul / p + local_matmul + head) + global_attention + local_attention


def mfu(flops_per_second: float, num_devices: int, device_kind: str) -> float | None:
  peak = peak_flops(device_kind)
  return None if peak is None else flops_per_second / (peak * num_devices)


def compiled_flops(compiled) -> float | None:
  """FLOPs of one device's program by XLA's cost analysis of a `jax.stages.Compiled`
  (None where it gives none), to set against the model FLOPs above."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops']) if cost and cost.get('flops', 0) > 0 else None
