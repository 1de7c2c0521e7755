"""A dense or MoE model as a Hugging Face checkpoint (`jaxarch export --format=hf`), the
format that `transformers`, vLLM, TGI, SGLang and llama.cpp's converter read.

jaxarch's dense transformer is Llama's architecture: pre-norm RMSNorm blocks, grouped-query
attention with rotary embeddings over the two halves of each head (`rotate_half`), a
SwiGLU feed-forward and no biases. With biases on the query, key and value projections
(model.qkv_bias), added before the rotation, it is Qwen2's (Qwen2.5's), exported as
`Qwen2ForCausalLM` with its sliding window off; with an RMSNorm over each head's query and
key before the rotation (model.qk_norm) it is Qwen3's. Its MoE model with experts in every
block, softmax gates renormalised over the top k, no shared experts and no router bias is
Mixtral's; with QK-norm, Qwen3-MoE's (whose `norm_topk_prob` may also leave the top k's
gates as the softmax gave them). So the export renames and transposes (torch's `Linear`
keeps [out, in]):

  embed.embedding        [V, d]     -> model.embed_tokens.weight        [V, d]
  blocks.i.attn.q_proj   [d, n, h]  -> model.layers.i.self_attn.q_proj.weight [n·h, d]
  blocks.i.attn.k_proj, v_proj      -> ...k_proj.weight, v_proj.weight  [kv·h, d]
  blocks.i.attn.q_bias   [n, h]     -> ...q_proj.bias                   [n·h]
  blocks.i.attn.k_bias, v_bias      -> ...k_proj.bias, v_proj.bias      [kv·h]
  blocks.i.attn.o_proj   [n, h, d]  -> ...self_attn.o_proj.weight       [d, n·h]
  blocks.i.attn.q_norm.scale, k_norm.scale [h]
                                    -> ...self_attn.q_norm.weight, k_norm.weight [h]
  blocks.i.mlp.gate, up  [d, f]     -> ...mlp.gate_proj.weight, up_proj.weight [f, d]
  blocks.i.mlp.down      [f, d]     -> ...mlp.down_proj.weight          [d, f]
  blocks.i.mlp.router    [d, E]     -> ...block_sparse_moe.gate.weight  [E, d]
  blocks.i.mlp.w_gate, w_up, w_down [E, ...]
                                    -> ...block_sparse_moe.experts.j.w1, w3, w2 .weight
                                       (Qwen3-MoE: ...mlp.gate.weight and
                                        ...mlp.experts.j.gate_proj, up_proj, down_proj)
  blocks.i.attn_norm, mlp_norm      -> ...input_layernorm, post_attention_layernorm
  final_norm, head       [d, V]     -> model.norm.weight, lm_head.weight [V, d]

A dense model with Gemma 3's keys (model.embed_scale, model.post_norms,
model.mlp_activation='gelu_tanh', with model.qk_norm; model.local_rope_theta for its
sliding layers) is a Gemma3ForCausalLM (model_type gemma3_text), whose block norms are

  blocks.i.attn_norm, attn_post_norm -> ...input_layernorm, post_attention_layernorm
  blocks.i.mlp_norm, mlp_post_norm   -> ...pre_feedforward_layernorm, post_feedforward_layernorm

and whose RMSNorms (all of them) scale by 1 + weight: theirs = ours - 1. Its queries are
scaled by query_pre_attn_scalar**-0.5, ours by head_dim**-0.5: import folds the ratio into
the query norm's scale, export writes head_dim. Gemma 3 4B's, 12B's and 27B's global layers
scale RoPE linearly (model.rope_scaling type 'linear'); its sliding layers are unscaled. A
multimodal Gemma3ForConditionalGeneration (model_type gemma3) imports as its language model
(`_text_config`, `_language_model`), which exports as a Gemma3ForCausalLM.

`hf_import` goes the other way (`jaxarch import`). The export writes back what it reads:
a window in some layers only as `layer_types`, which transformers 5 reads (a transformers
4 that reads only `max_window_layers`, the layers from it on, reads a Qwen's right only
where the windowed layers are the last ones): a dense model with a window and no biases
or QK-norm is a `MistralForCausalLM`, a `MinistralForCausalLM` where some layers have none
(Mistral's attention gives every layer the window); a MoE model's window must be every
layer's (Mixtral's and Qwen3-MoE's attention). Rope scalings are Llama 3.1's `llama3` and
`linear` (model.rope_scaling). A MoE model's balance loss (model.moe.aux_loss_weight, one
per layer) is transformers' `router_aux_loss_coef` (one over the layers' pooled statistics)
times n_layers / top_k; `output_router_logits` is false, as in Mixtral's own config
(transformers then returns no router logits and adds the loss only where asked).

The vocabulary keeps its padding to a multiple of 128 (the tokenizer's ids come first);
generation_config.json's `suppress_tokens` lists the padding ids, which transformers'
`generate` then never draws, as jaxarch's does not.
The weights are stored in their training dtype (float32); `torch_dtype` names the compute
dtype the model trained in. The tokenizer comes along in Hugging Face's form
(`hf_tokenizer`): every text starts with the BOS the model trained with (`data.bos_id`:
by default the end-of-document id; an imported Llama's own `<s>`, which import reads from
config.json's `bos_token_id`), and the tokenizer adds it; a run with no BOS
(`data.add_bos=False`) gets a tokenizer that adds nothing and config.json's
`bos_token_id` null. generation_config.json's
`eos_token_id` lists the end-of-document id and `data.stop_ids` (when there are any),
at all of which transformers' `generate` stops; config.json's is the end of document.
"""

import json
import logging
import math
from pathlib import Path

import ml_collections
import numpy as np
from flax import nnx

from jaxarch.data import bos_id, get_tokenizer, stop_ids
from jaxarch.export.hf_tokenizer import write_tokenizer
from jaxarch.export.weights import (Deferred, ExportError, flat_arrays, readable,
                                    save_safetensors)
from jaxarch.models import unscanned
from jaxarch.models.transformer import head_dim, layer_windows

ARCHITECTURES = {'dense': 'LlamaForCausalLM', 'moe': 'MixtralForCausalLM'}
MODEL_TYPES = {'dense': 'llama', 'moe': 'mixtral'}  # config.json's `model_type`
# Where a MoE block's router and experts are: (module, {ours: theirs}).
MOE_NAMES = {'mixtral': ('block_sparse_moe', {'w_gate': 'w1', 'w_down': 'w2', 'w_up': 'w3'}),
             'qwen3_moe': ('mlp', {'w_gate': 'gate_proj', 'w_down': 'down_proj',
                                   'w_up': 'up_proj'})}
# Model types whose `sliding_window` is used only with `use_sliding_window: true`.
WINDOW_SWITCHED = ('qwen2', 'qwen3', 'qwen3_moe')
# Model types whose attention slides in the layers `layer_types` names (transformers 5;
# Mistral's and Mixtral's modeling give every layer the window, Qwen3-MoE's too).
LAYER_TYPED = ('qwen2', 'qwen3', 'ministral', 'gemma3_text')
# Gemma 3's model keys: all four make a dense model a Gemma3ForCausalLM (with model.qk_norm
# and model.local_rope_theta for its sliding layers' RoPE).
GEMMA_KEYS = {'embed_scale': True, 'post_norms': True, 'mlp_activation': 'gelu_tanh'}
# Our block norms -> theirs: Llama's pre-norms, Gemma 3's pre- and post-norms.
BLOCK_NORMS = {'attn_norm': 'input_layernorm', 'mlp_norm': 'post_attention_layernorm'}
GEMMA_NORMS = {'attn_norm': 'input_layernorm', 'attn_post_norm': 'post_attention_layernorm',
               'mlp_norm': 'pre_feedforward_layernorm',
               'mlp_post_norm': 'post_feedforward_layernorm'}


def _is_gemma(m: ml_collections.ConfigDict) -> bool:
  """Whether a model section has any of Gemma 3's keys (it must have all to export)."""
  return any(m[key] == value for key, value in GEMMA_KEYS.items())


def architecture(m: ml_collections.ConfigDict) -> tuple[str, str]:
  """config.json's (architecture, model_type) of a model section: a dense model with
  q/k/v biases is a Qwen2, one with QK-norm a Qwen3, one with neither and a sliding window
  a Mistral (a Ministral, whose attention reads layer_types, with the window in some
  layers only), a MoE model with QK-norm a Qwen3-MoE; one with Gemma 3's keys a Gemma 3."""
  if m.family == 'dense' and _is_gemma(m):
    return 'Gemma3ForCausalLM', 'gemma3_text'
  if m.family == 'dense' and m.qkv_bias:
    return 'Qwen2ForCausalLM', 'qwen2'
  if m.qk_norm:
    return {'dense': ('Qwen3ForCausalLM', 'qwen3'),
            'moe': ('Qwen3MoeForCausalLM', 'qwen3_moe')}.get(m.family, ('', ''))
  if m.family == 'dense' and _window(m) is not None:  # a Llama with a window
    if 'global' in _layer_kinds(m):  # in some layers: a Mistral would slide in all
      return 'MinistralForCausalLM', 'ministral'
    return 'MistralForCausalLM', 'mistral'
  return ARCHITECTURES[m.family], MODEL_TYPES[m.family]


def check_exportable(cfg: ml_collections.ConfigDict) -> None:
  """A dense model is a Llama (a Qwen2 with q/k/v biases, a Qwen3 with QK-norm), a MoE
  model of Mixtral's routing a Mixtral (a Qwen3-MoE with QK-norm, whose gates may skip the
  renormalisation); the other families and routings have no such equivalent."""
  m = cfg.model
  kinds = set(m.block_pattern)
  why = None
  own = sorted(kinds - {'dense', 'moe'})  # blocks registered by the user's code
  if m.family not in ARCHITECTURES:
    why = 'it is ' + _NO_HF.get(
        m.family, f'a {m.family} model, a family of your own that transformers has no model for')
  elif own:
    why = f'its {own[0]!r} blocks are of your own, which transformers has no layer for'
  elif kinds != ({'dense'} if m.family == 'dense' else {'moe'}):
    why = f'its blocks {tuple(m.block_pattern)} mix dense and moe layers'
  elif m.qkv_bias and m.qk_norm:
    why = 'a Qwen2 has no QK-norm and a Qwen3 no q/k/v biases (model.qkv_bias)'
  elif _is_gemma(m) or m.local_rope_theta is not None:
    why = _gemma_mismatch(m)
  elif m.family == 'moe' and _window(m) is not None and 'global' in _layer_kinds(m):
    why = (f'model.attention_pattern={tuple(m.attention_pattern)!r} leaves blocks without '
           'the sliding window, which a Mixtral and a Qwen3-MoE give every layer')
  elif m.family == 'moe':
    moe = m.moe
    why = ('a Mixtral has no shared experts' if moe.num_shared_experts else
           "a Mixtral's gates are a softmax" if moe.gate != 'softmax' else
           "a Mixtral's gates are renormalised over the top k (a Qwen3-MoE's may not be: "
           'with model.qk_norm)' if not (moe.renormalize or m.qk_norm) else
           'a Mixtral has no router bias (model.moe.bias_update_rate)'
           if moe.bias_update_rate else
           'a Mixtral has no attention biases (model.qkv_bias)' if m.qkv_bias else None)
  if why is not None:
    # A BiTA's base run (dense or MoE) may be one: its tokens are the BiTA's.
    base = (m.family == 'bita' and m.bita.base_family in ARCHITECTURES)
    raise ExportError(f'export: --format=hf cannot write this run: {why}; use '
                      '--format=safetensors or stablehlo'
                      + (', or export its base run (model.bita.base_workdir) with '
                         '--format=hf' if base else '')
                      + '. (--format=hf writes dense models as LlamaForCausalLM, with a '
                      'sliding window as MistralForCausalLM, or MinistralForCausalLM where '
                      'some layers have none, with model.qkv_bias as Qwen2ForCausalLM, with '
                      "model.qk_norm as Qwen3ForCausalLM, with Gemma 3's keys as "
                      'Gemma3ForCausalLM; and MoE models with experts in every block, softmax '
                      'gates renormalised over the top k and no shared experts as '
                      'MixtralForCausalLM, with model.qk_norm as Qwen3MoeForCausalLM.)')


# The families transformers has no model for, and why.
_NO_HF = {'ultramem': 'an UltraMem model, whose memory layers transformers has no layer for',
          'megabyte': 'a MEGABYTE model: transformers has no model of a global and a local '
                      'transformer over patches of bytes',
          'bita': 'a BiTA model, whose prompt and mask tokens (its drafts) transformers has '
                  'no place for'}


def _gemma_mismatch(m: ml_collections.ConfigDict) -> str | None:
  """Why a model with some of Gemma 3's keys is no Gemma3ForCausalLM (None: it is one)."""
  want = {**GEMMA_KEYS, 'qk_norm': True}
  missing = [f'model.{k}={v!r}' for k, v in want.items() if m[k] != v]
  if m.family != 'dense':
    return f"a Gemma 3 is dense, and this is a {m.family} model with some of Gemma 3's keys"
  if missing:
    return f"a Gemma 3 has all of Gemma 3's keys, and this model lacks {', '.join(missing)}"
  if m.qkv_bias:
    return 'a Gemma 3 has no q/k/v biases (model.qkv_bias)'
  if m.rope_scaling.type not in ('none', 'linear'):
    return f"a Gemma 3's RoPE is not scaled {m.rope_scaling.type!r} (model.rope_scaling)"
  if (m.rope_scaling.type != 'none' and _window(m) is not None
      and m.local_rope_theta is None):
    return ("a Gemma 3's sliding layers turn unscaled, and model.rope_scaling scales them "
            'while model.local_rope_theta is unset; set it (e.g. to model.rope_theta)')
  return None


def _layer_kinds(m: ml_collections.ConfigDict) -> list[str]:
  """'local' (with the sliding window) or 'global', per layer."""
  return ['global' if w is None else 'local' for w in layer_windows(m)]


def _window(m: ml_collections.ConfigDict) -> int | None:
  """The sliding window some layer has: None without one, or with every block 'global'."""
  return next((w for w in layer_windows(m) if w is not None), None)


def hf_config(cfg: ml_collections.ConfigDict, tokenizer) -> dict:
  """config.json of `transformers.LlamaConfig`, `MistralConfig`, `MinistralConfig`,
  `Qwen2Config`, `Qwen3Config`, `MixtralConfig` or `Qwen3MoeConfig` for the run's model."""
  m = cfg.model
  name, model_type = architecture(m)
  config = {
      'architectures': [name], 'model_type': model_type,
      'vocab_size': m.vocab_size, 'hidden_size': m.d_model, 'intermediate_size': m.d_ff,
      'num_hidden_layers': m.n_layers, 'num_attention_heads': m.n_heads,
      'num_key_value_heads': m.n_kv_heads, 'head_dim': head_dim(m),
      'hidden_act': 'silu', 'max_position_embeddings': m.max_len,
      'rms_norm_eps': m.norm_eps, 'rope_theta': m.rope_theta,
      'rope_scaling': hf_rope_scaling(m),
      'rope_parameters': {**(hf_rope_scaling(m) or {'rope_type': 'default'}),
                          'rope_theta': m.rope_theta},
      'tie_word_embeddings': bool(m.tie_embeddings), 'attention_bias': False,
      'mlp_bias': False, 'attention_dropout': 0.0, 'initializer_range': m.init_std,
      'bos_token_id': bos_id(cfg.data, tokenizer), 'eos_token_id': tokenizer.eod_id,
      'pad_token_id': tokenizer.pad_id, 'torch_dtype': m.dtype, 'dtype': m.dtype,
      'use_cache': True,
  }
  if m.family == 'moe':
    config.update({'intermediate_size': m.moe.expert_d_ff,
                   'num_local_experts': m.moe.num_experts,
                   'num_experts_per_tok': m.moe.top_k, 'sliding_window': None,
                   # transformers' balance loss, pooled over the layers (`hf_import._moe_losses`)
                   'output_router_logits': False,
                   'router_aux_loss_coef': m.moe.aux_loss_weight * m.n_layers / m.moe.top_k})
  if model_type == 'qwen3_moe':  # Qwen3MoeConfig's names; d_ff is its dense layers' width
    del config['num_local_experts']
    config.update({'intermediate_size': m.d_ff, 'moe_intermediate_size': m.moe.expert_d_ff,
                   'num_experts': m.moe.num_experts, 'norm_topk_prob': m.moe.renormalize,
                   'decoder_sparse_step': 1, 'mlp_only_layers': []})
  if model_type not in ('llama', 'mixtral'):  # Qwens have no MLP biases to name
    del config['mlp_bias']
  if model_type == 'qwen2':  # its biases are fixed (q, k, v)
    del config['attention_bias']
  # The window is every layer's (a Mistral's, a Mixtral's, a Qwen3-MoE's), or in the
  # layers layer_types names: transformers 5 reads them, 4 read a Qwen's max_window_layers
  # (the layers from it on), right only where the windowed layers are the last ones.
  window = _window(m)
  kinds = _layer_kinds(m)
  if model_type in ('mistral', 'ministral', 'mixtral'):
    config['sliding_window'] = window
  if model_type in WINDOW_SWITCHED:  # as transformers 5.25 writes it
    config.update({'use_sliding_window': window is not None, 'sliding_window': window,
                   'max_window_layers': kinds.count('global')})
  if model_type in LAYER_TYPED:
    config['layer_types'] = [{'global': 'full_attention', 'local': 'sliding_attention'}[k]
                             for k in kinds]
  if model_type == 'gemma3_text':
    config.update(_gemma_config(m, window, kinds))
    del config['hidden_act']  # hidden_activation
    if config['rope_scaling'] is None:  # transformers 4.50's spelling of a scaled one
      del config['rope_scaling']
  return config


def _gemma_config(m: ml_collections.ConfigDict, window: int | None, kinds: list[str]
                  ) -> dict:
  """A Gemma 3's own config.json keys: its queries scaled by head_dim**-0.5 as ours (its
  query_pre_attn_scalar), the sliding layers' RoPE as transformers 5 (rope_parameters per
  layer type, the global layers' scaling too) and 4 (rope_local_base_freq; the scaling is
  rope_scaling) read it, and the windowed layers as layer_types
  and, where they are every p-th layer's complement, transformers 4.50's
  sliding_window_pattern p."""
  local = m.local_rope_theta or m.rope_theta
  config = {'hidden_activation': 'gelu_pytorch_tanh', 'query_pre_attn_scalar': head_dim(m),
            'attn_logit_softcapping': None, 'final_logit_softcapping': None,
            'use_bidirectional_attention': False,
            'sliding_window': window or m.max_len,  # no layer has it: any
            'rope_local_base_freq': local,
            'rope_parameters': {
                'full_attention': {**(hf_rope_scaling(m) or {'rope_type': 'default'}),
                                   'rope_theta': m.rope_theta},
                'sliding_attention': {'rope_type': 'default', 'rope_theta': local}}}
  period = next((p for p in range(1, len(kinds) + 2)
                 if kinds == ['local' if (i + 1) % p else 'global'
                              for i in range(len(kinds))]), None)
  if period is not None:
    config['sliding_window_pattern'] = period
  return config


def hf_rope_scaling(m: ml_collections.ConfigDict) -> dict | None:
  """model.rope_scaling as config.json's `rope_scaling` (transformers 4; 5 reads it as
  `rope_parameters` with the theta): None when there is none."""
  s = m.rope_scaling
  if s.type == 'none':
    return None
  if s.type == 'linear':
    return {'rope_type': 'linear', 'factor': s.factor}
  return {'rope_type': s.type, 'factor': s.factor, 'low_freq_factor': s.low_freq_factor,
          'high_freq_factor': s.high_freq_factor,
          'original_max_position_embeddings': s.original_max_len}


def hf_arrays(model: nnx.Module, cfg: ml_collections.ConfigDict) -> dict[str, Deferred]:
  """The model's weights under Llama's, Mixtral's or the Qwens' names and layouts (module
  docstring), each laid out on the devices and fetched only when it is written
  (`save_safetensors`)."""
  ours = flat_arrays(model)
  d = cfg.model.d_model
  kind = architecture(cfg.model)[1]
  moe_module, expert_names = MOE_NAMES.get(kind, (None, {}))
  if kind == 'gemma3_text':  # a Gemma's RMSNorm scales by 1 + its weight
    ours = {k: v - 1 if k.endswith('norm.scale') else v for k, v in ours.items()}
  transposed = lambda x: x.T
  out = {'model.embed_tokens.weight': Deferred(ours.pop('embed.embedding')),
         'model.norm.weight': Deferred(ours.pop('final_norm.scale'))}
  if 'head' in ours:
    out['lm_head.weight'] = Deferred(ours.pop('head'), transposed)
  for i in range(cfg.model.n_layers):
    def ours_i(name, make=lambda x: x):
      return Deferred(ours.pop(f'blocks.{i}.{name}'), make)  # pylint: disable=cell-var-from-loop

    at = f'model.layers.{i}.'
    for name in ('q_proj', 'k_proj', 'v_proj'):
      out[f'{at}self_attn.{name}.weight'] = ours_i(f'attn.{name}', lambda x: x.reshape(d, -1).T)
      if cfg.model.qkv_bias:  # [heads, h] -> [heads·h]
        out[f'{at}self_attn.{name}.bias'] = ours_i(f'attn.{name[0]}_bias',
                                                   lambda x: x.reshape(-1))
    out[f'{at}self_attn.o_proj.weight'] = ours_i('attn.o_proj', lambda x: x.reshape(-1, d).T)
    if cfg.model.qk_norm:  # [head_dim], shared by the heads
      for name in ('q_norm', 'k_norm'):
        out[f'{at}self_attn.{name}.weight'] = ours_i(f'attn.{name}.scale')
    if cfg.model.family == 'dense':
      out[f'{at}mlp.gate_proj.weight'] = ours_i('mlp.gate', transposed)
      out[f'{at}mlp.up_proj.weight'] = ours_i('mlp.up', transposed)
      out[f'{at}mlp.down_proj.weight'] = ours_i('mlp.down', transposed)
    else:
      if np.asarray(ours_i('mlp.bias')).any():  # selection bias: Mixtral and Qwen3-MoE have none
        raise ExportError(f'export: block {i} routes with a bias, which a Mixtral lacks')
      out[f'{at}{moe_module}.gate.weight'] = ours_i('mlp.router', transposed)
      for name, hf in expert_names.items():
        weights = ours.pop(f'blocks.{i}.mlp.{name}')  # [E, d, f] or [E, f, d]
        for j in range(weights.shape[0]):
          out[f'{at}{moe_module}.experts.{j}.{hf}.weight'] = Deferred(
              weights, lambda x, j=j: x[j].T)
    for name, hf in (GEMMA_NORMS if kind == 'gemma3_text' else BLOCK_NORMS).items():
      out[f'{at}{hf}.weight'] = ours_i(f'{name}.scale')
  if ours:  # weights these architectures lack: refuse rather than drop them
    raise ExportError(f'export: --format=hf has no Hugging Face name for {sorted(ours)[:3]}')
  return out


def write_hf(model: nnx.Module, cfg: ml_collections.ConfigDict, out: str | Path, *,
             source: str = '', final: str | Path | None = None) -> Path:
  """Writes `model` as OUT/{config.json, model.safetensors, tokenizer files,
  generation_config.json, README.md}, for `AutoModelForCausalLM.from_pretrained(OUT)`."""
  check_exportable(cfg)
  if cfg.model.family == 'moe' and (dropping := [
      f'model.moe.{key}={cfg.model.moe[key]}' for key in ('capacity_factor', 'ep_capacity_factor')
      if cfg.model.moe.get(key) is not None]):
    logging.getLogger(__name__).warning(
        'export: the run routes with %s in training and eval, dropping assignments past an '
        "expert's capacity; a %s routes every token to its experts, as `jaxarch generate` "
        "does: its logits differ from the run's eval where the run dropped",
        ' and '.join(dropping), architecture(cfg.model)[0])
  cfg, model = unscanned(cfg, model)  # transformers' layers are unrolled
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tokenizer = get_tokenizer(cfg.data.tokenizer)
  arrays = hf_arrays(model, cfg)
  # transformers reads a safetensors file only if it says it holds torch tensors.
  save_safetensors(arrays, out / 'model.safetensors', metadata={'format': 'pt'})
  readable(out / 'model.safetensors')
  (out / 'config.json').write_text(json.dumps(hf_config(cfg, tokenizer), indent=2) + '\n')
  bos, stops = bos_id(cfg.data, tokenizer), list(stop_ids(cfg.data, tokenizer))
  # transformers' generate stops at any of a list (an instruct model's end of turn too);
  # config.json's eos_token_id stays the end of document.
  generation = {'bos_token_id': bos, 'eos_token_id': stops if len(stops) > 1 else stops[0],
                'pad_token_id': tokenizer.pad_id}
  if tokenizer.vocab_size < cfg.model.vocab_size:  # the padding rows: never generated, as
    generation['suppress_tokens'] = list(range(tokenizer.vocab_size,  # in jaxarch's generate
                                               cfg.model.vocab_size))
  (out / 'generation_config.json').write_text(json.dumps(generation, indent=2) + '\n')
  template = cfg.data.get('chat_template')
  write_tokenizer(cfg.data.tokenizer, tokenizer, out, cfg.model.max_len, bos,
                  None if template is None else
                  Path(template).expanduser().read_text(encoding='utf-8'))
  count = sum(math.prod(a.shape) for a in arrays.values())
  (out / 'README.md').write_text(_README.format(
      source=source or 'a jaxarch run', count=count, out=final or out,
      vocab=tokenizer.vocab_size, family=cfg.model.family,
      architecture=architecture(cfg.model)[0]))
  return out


_README = """# A jaxarch {family} model in Hugging Face's format

Exported from {source}: {count:,} numbers (float32), `{architecture}`.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained('{out}')
tokenizer = AutoTokenizer.from_pretrained('{out}')
ids = tokenizer('def main(', return_tensors='pt').input_ids  # with the BOS it trained with, if any
out = model.generate(ids, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(out[0], skip_special_tokens=True))
```

or serve it with vLLM (`vllm serve {out}`). The vocabulary is padded past the tokenizer's
{vocab} ids. transformers' `generate` never draws the padding ids (generation_config.json
suppresses them, as jaxarch's `generate` does); no text holds them, so training made them
unlikely, but another sampler may still draw one; decoding skips them.
"""
