"""A Hugging Face checkpoint as a jaxarch run (`jaxarch import --hf=DIR --workdir=NEW`),
the way back from `huggingface` (`jaxarch export --format=hf`), whose names and tables it
shares: `import_hf` makes a Llama, Mistral, Ministral, Qwen2, Qwen3, Gemma 3, Mixtral or
Qwen3-MoE checkpoint a jaxarch run at step 0, which
`generate`, `eval`, `distill` and BiTA read as any run, and `jaxarch train` continues
(fine-tuning, continued pretraining), its documents and prompts starting with the
checkpoint's own BOS (config.json's `bos_token_id`, as `data.bos_id`), its generation
stopping at its own end-of-turn ids too (generation_config.json's and config.json's
`eos_token_id`s besides the tokenizer's end of document, as `data.stop_ids`: Llama 3's
`<|eot_id|>`). Where the checkpoint's tokenizer adds no BOS (a Qwen2's, Qwen2.5's,
Qwen3's: tokenizer_config.json's `add_bos_token` false or `bos_token` null, or else a
tokenizer.json post-processor that puts nothing first), documents and prompts start with
none (`data.add_bos=False`): the ids transformers gives the same text. An instruct
model's chat template (chat_template.jinja, else tokenizer_config.json's `chat_template`:
a string, or a list whose 'default' one it is) goes into the run as
tokenizer/chat_template.jinja (`data.chat_template`, for `generate --chat`), with the
checkpoint's tokenizer_config.json beside it (the special tokens' names the template
writes); the export writes it back into tokenizer_config.json. A Mistral
is a Llama's names and layouts (an explicit `head_dim`, as Mistral-Nemo's 128 for 5120 /
32 heads, becomes model.head_dim). A Qwen2 (model_type qwen2: Qwen2, Qwen2.5) is a Llama
with biases on q_proj, k_proj and v_proj (model.qkv_bias; one on o_proj is refused). A
Qwen3 is a Llama with q_norm and k_norm (model.qk_norm), a Qwen3-MoE a Mixtral with them,
its experts `moe_intermediate_size` wide; one with dense blocks among the MoE ones
(decoder_sparse_step > 1, mlp_only_layers) is refused. A sliding window is
model.sliding_window (`_window_settings`: a Mixtral's and a Qwen3-MoE's in every layer, a
Mistral's and a Ministral's in the layers `layer_types` names (every layer without it), a
Qwen2's and a Qwen3's only with `use_sliding_window` and in the layers `layer_types`
names, as model.attention_pattern); one of at least `max_position_embeddings` masks
nothing and is left out. The export writes it back, a window in some layers only as
`layer_types`, which transformers 5 reads (a transformers 4 that reads only
`max_window_layers`, the layers from it on, reads a Qwen's right only where the windowed
layers are the last ones): a dense model with a window and no biases or QK-norm is a
`MistralForCausalLM`, a `MinistralForCausalLM` where some layers have none (Mistral's
attention gives every layer the window); a MoE model's window must be every layer's
(Mixtral's and Qwen3-MoE's attention). Other biases (attention_bias, mlp_bias), other
architectures and rope scalings other than Llama 3.1's `llama3` and `linear`
(model.rope_scaling), which the export writes back, are refused.

What config.json leaves out is its config class's default (HF_DEFAULTS: a Mixtral's
rms_norm_eps 1e-5 and rope_theta 1e6, a Mistral's window of 4096, a Qwen3's head_dim 128),
as transformers reads it. A theta both at the top (transformers 4) and in rope_parameters
(5) is refused where they differ. A Mixtral's and a Qwen3-MoE's balance loss is its
`router_aux_loss_coef` scaled to jaxarch's per-layer one (`_moe_losses`), with no z-loss;
`--config.model.moe.*` overrides set others. `router_jitter_noise` and `attention_dropout`,
which change training only, are not read.
"""

from collections.abc import Mapping
import functools
import json
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxarch import config as config_lib
from jaxarch.data import get_tokenizer, ids_past_model
from jaxarch.export.huggingface import (BLOCK_NORMS, GEMMA_KEYS, GEMMA_NORMS, LAYER_TYPED,
                                        MOE_NAMES, WINDOW_SWITCHED, architecture)
from jaxarch.export.weights import (ExportError, all_or_nothing, copy_tokenizer, free_out,
                                    keep_chat_template)
from jaxarch.models import named_variables
from jaxarch.models.transformer import head_dim, layer_slot, scan_layout

# What import reads: a Mistral is a Llama's names and layout with a sliding window (a
# Ministral one whose window is in the layers `layer_types` names), a Qwen2 a Llama with
# biases on q, k and v (model.qkv_bias), a Qwen3 one with QK-norm (model.qk_norm), a
# Qwen3-MoE a Mixtral with QK-norm and its own names; of a Gemma 3 multimodal model (gemma3)
# its language model, a gemma3_text.
IMPORTS = {'llama': 'dense', 'mistral': 'dense', 'ministral': 'dense', 'mixtral': 'moe',
           'qwen2': 'dense', 'qwen3': 'dense', 'qwen3_moe': 'moe', 'gemma3_text': 'dense',
           'gemma3': 'dense'}
# The config classes' defaults (transformers 5.25; 4's alike) of the keys `run_config`
# reads, where config.json leaves a key out and they are not run_config's own fallbacks (an
# eps of 1e-6, max_position_embeddings 2048, a key/value head per query head, head_dim
# hidden_size / heads, no window): a Mixtral's eps of 1e-5, a Mistral's window of 4096, a
# Qwen3's head_dim of 128. transformers 4.50 wrote a Gemma3ForConditionalGeneration's
# text_config (Gemma 3 4B's, 12B's, 27B's) with only the keys that differ from
# Gemma3TextConfig's (4B's has no num_attention_heads).
MISTRAL_DEFAULTS = {'max_position_embeddings': 131_072, 'num_key_value_heads': 8,
                    'sliding_window': 4096}
QWEN_DEFAULTS = {'max_position_embeddings': 32_768, 'num_key_value_heads': 32,
                 'sliding_window': 4096}
HF_DEFAULTS = {
    'mistral': MISTRAL_DEFAULTS, 'ministral': MISTRAL_DEFAULTS,
    'mixtral': {**MISTRAL_DEFAULTS, 'sliding_window': None, 'rms_norm_eps': 1e-5},
    'qwen2': QWEN_DEFAULTS, 'qwen3': {**QWEN_DEFAULTS, 'head_dim': 128},
    'qwen3_moe': {**QWEN_DEFAULTS, 'num_key_value_heads': 4},
    'gemma3_text': {'vocab_size': 262_208, 'hidden_size': 2304, 'intermediate_size': 9216,
                    'num_hidden_layers': 26, 'num_attention_heads': 8,
                    'num_key_value_heads': 4, 'head_dim': 256,
                    'max_position_embeddings': 131_072, 'rms_norm_eps': 1e-6,
                    'sliding_window': 4096, 'bos_token_id': 2, 'eos_token_id': 1,
                    'pad_token_id': 0, 'tie_word_embeddings': True}}
# Their `default_theta`, where config.json names no rope_theta (10000 for the others); a
# Gemma 3's global layers' (its sliding ones': 10000).
DEFAULT_THETA = {'mixtral': 1e6, 'gemma3_text': 1e6}
# A Gemma3ForConditionalGeneration's language model's weights -> a Gemma3ForCausalLM's names
# (transformers 4.50 to 5.25 save them under the first two, its modules are named as the
# last two); its vision tower's and multimodal projector's are left out.
GEMMA3_PREFIXES = {'language_model.model.': 'model.', 'language_model.lm_head.': 'lm_head.',
                   'model.language_model.': 'model.', 'lm_head.': 'lm_head.'}
GEMMA3_VISION = ('vision_tower.', 'multi_modal_projector.', 'model.vision_tower.',
                 'model.multi_modal_projector.')


def our_arrays(hf: Mapping[str, np.ndarray], cfg: ml_collections.ConfigDict,
               query_scale: float = 1.0, place=lambda name, array: array) -> dict:
  """`huggingface.hf_arrays` undone: Hugging Face's names and layouts -> jaxarch's. `query_scale`
  multiplies the QK-norm's query scales: a Gemma 3's query_pre_attn_scalar**-0.5 over our
  head_dim**-0.5 (the same logits: the rotation and the dot product are linear in q).
  Each array is taken from `hf` when it is needed (`read_hf`'s are read from disk only
  then), laid out and handed to `place` (which puts it on the devices) in turn, so that the
  host holds about one at a time; the result holds what `place` returned."""
  m = cfg.model
  n, kv, h = m.n_heads, m.n_kv_heads, head_dim(m)
  kind = architecture(m)[1]
  moe_module, expert_names = MOE_NAMES.get(kind, (None, {}))
  left = set(hf)
  taken = []  # (name, shape) of the checkpoint's arrays read for the variable at hand

  def take(name):
    if name not in left:
      raise ExportError(f'import: the checkpoint has no {name}, which a {m.family} model of '
                        'its config.json needs')
    left.remove(name)
    array = hf[name]
    taken.append((name, array.shape))
    if kind == 'gemma3_text' and name.endswith('norm.weight'):
      return array + 1  # a Gemma's RMSNorm scales by 1 + its weight
    return array

  ours = {}
  def put(name, array):
    try:
      ours[name] = place(name, array)
    except ShapeMismatch as e:
      raise ExportError(_mismatch(taken, f'fit {name} {list(e.expected)}')) from None
    taken.clear()

  def heads(array, count, *shape):  # [..., count·h] -> [..., count, h]
    try:
      return array.reshape(*shape)
    except ValueError:
      raise ExportError(_mismatch(taken, f'split into {count} heads of {h}')) from None

  put('embed.embedding', take('model.embed_tokens.weight'))
  put('final_norm.scale', take('model.norm.weight'))
  if not m.tie_embeddings:
    put('head', take('lm_head.weight').T)
  for i in range(m.n_layers):
    at, to = f'model.layers.{i}.', f'blocks.{i}.'
    for name, count in (('q_proj', n), ('k_proj', kv), ('v_proj', kv)):
      put(f'{to}attn.{name}', heads(take(f'{at}self_attn.{name}.weight').T, count, -1, count, h))
      if m.qkv_bias:
        put(f'{to}attn.{name[0]}_bias', heads(take(f'{at}self_attn.{name}.bias'), count, count, h))
    put(f'{to}attn.o_proj', heads(take(f'{at}self_attn.o_proj.weight').T, n, n, h, -1))
    if m.qk_norm:
      for name in ('q_norm', 'k_norm'):
        scale = take(f'{at}self_attn.{name}.weight')
        if name == 'q_norm' and query_scale != 1.0:
          scale = scale * np.float32(query_scale)
        put(f'{to}attn.{name}.scale', scale)
    if m.family == 'dense':
      for name, hf_name in (('gate', 'gate_proj'), ('up', 'up_proj'), ('down', 'down_proj')):
        put(f'{to}mlp.{name}', take(f'{at}mlp.{hf_name}.weight').T)
    else:
      put(f'{to}mlp.router', take(f'{at}{moe_module}.gate.weight').T)
      put(f'{to}mlp.bias', np.zeros((m.moe.num_experts,), np.float32))
      for name, hf_name in expert_names.items():
        put(f'{to}mlp.{name}', np.stack([
            take(f'{at}{moe_module}.experts.{j}.{hf_name}.weight').T
            for j in range(m.moe.num_experts)]))
    for name, hf_name in (GEMMA_NORMS if kind == 'gemma3_text' else BLOCK_NORMS).items():
      put(f'{to}{name}.scale', take(f'{at}{hf_name}.weight'))
  left.discard('lm_head.weight')  # a tied head saved anyway
  if left:
    raise ExportError(f'import: {len(left)} arrays have no place in a {m.family} model, e.g. '
                      f'{sorted(left)[:2]}')
  return ours


class ShapeMismatch(ExportError):
  """A checkpoint array whose shape is not the config's (`our_arrays` names it)."""

  def __init__(self, name: str, shape: tuple, expected: tuple):
    super().__init__(f'import: {name} is {list(shape)}, the config expects {list(expected)}')
    self.expected = expected


def _mismatch(taken: list, fit: str) -> str:
  """What `our_arrays` says of checkpoint arrays (`taken`: (name, shape)) that do not `fit`."""
  arrays = ' and '.join(f'{name} {list(shape)}' for name, shape in taken[-2:])
  if len(taken) > 2:  # a MoE layer's experts, stacked
    arrays = f'{len(taken)} arrays, as {arrays},'
  return (f"import: the checkpoint's {arrays} {'does' if len(taken) == 1 else 'do'} not "
          f'{fit} of the model its config.json describes: is config.json the one saved with '
          'these weights?')


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer: jax.Array, index) -> jax.Array:
  """stacked [layers, ...] with `layer` [...] at `index`, written in place."""
  return stacked.at[index].set(layer.astype(stacked.dtype))


def run_config(hf_config: dict, tokenizer: str, overrides=()) -> ml_collections.ConfigDict:
  """The jaxarch config of a Llama, Mistral, Ministral, Qwen2, Qwen3, Gemma 3, Mixtral or
  Qwen3-MoE `config.json` (train, data and mesh keys: the preset's, then `overrides`), a
  Gemma 3 multimodal one's language model's; refuses what jaxarch's models do not compute."""
  hf_config = _text_config(hf_config)
  kind = hf_config.get('model_type')
  family = IMPORTS.get(kind)
  max_len = hf_config.get('max_position_embeddings', 2048)  # the run's model.max_len
  # transformers 5 writes `rope_parameters` and `dtype` where 4 wrote `rope_theta`,
  # `rope_scaling` and `torch_dtype`.
  # A scaling of type 'default' (transformers 4.4x wrote {'rope_type': 'default'}) is none.
  # Llama 3.1's and 3.2's `llama3` and `linear` are model.rope_scaling; the other types are
  # refused. A Gemma 3's (transformers 5) is one per layer type: its sliding layers' own
  # theta, unscaled; the global layers' (transformers 4.50: rope_scaling) linear or none.
  rope = hf_config.get('rope_parameters') or {}
  gemma = kind == 'gemma3_text'
  per_type = gemma and isinstance(rope, dict) and 'full_attention' in rope
  ropes = {'rope_scaling': hf_config.get('rope_scaling'),
           **({f'rope_parameters.{k}': v for k, v in rope.items()} if per_type else
              {'rope_parameters': rope})}
  for key, value in ropes.items():
    if not isinstance(value or {}, dict):
      raise ExportError(f'import: config.json has {key}={value!r}; expected an '
                        'object such as {"rope_type": "llama3", "factor": 8.0, ...} or null')
  local_rope = (rope.get('sliding_attention') or {}) if per_type else {}
  rope = (rope.get('full_attention') or {}) if per_type else rope
  rope_type = lambda r: r.get('rope_type', r.get('type', 'default'))
  scaling = next((r for r in (hf_config.get('rope_scaling') or {}, rope)
                  if rope_type(r) != 'default'), None)
  # transformers' 'swish' is its 'silu'.
  activation = (('hidden_activation', ('gelu_pytorch_tanh',)) if gemma else
                ('hidden_act', ('silu', 'swish')))
  gemma_only = _gemma_unsupported(hf_config) if gemma else None
  # Qwen3-MoE's gates are renormalised over the top k only when asked.
  renormalize = kind != 'qwen3_moe' or bool(hf_config.get('norm_topk_prob', False))
  unsupported = (
      f"model_type={kind!r} (jaxarch reads {', '.join(map(repr, IMPORTS))})"
      if family is None else
      f'rope scaling {scaling!r}' if scaling and rope_type(scaling) not in (
          ('linear',) if gemma else ('llama3', 'linear')) else
      f'rope scaling {local_rope!r} in its sliding layers'
      if rope_type(local_rope) != 'default' else
      'attention_bias=true' if hf_config.get('attention_bias') else
      'mlp_bias=true' if hf_config.get('mlp_bias') else
      f'{activation[0]}={hf_config.get(activation[0])!r}'
      if hf_config.get(activation[0], activation[1][0]) not in activation[1] else
      gemma_only if gemma_only else
      f"decoder_sparse_step={hf_config['decoder_sparse_step']!r} (dense blocks between "
      'the MoE ones)' if hf_config.get('decoder_sparse_step', 1) != 1 else
      f"mlp_only_layers={hf_config['mlp_only_layers']!r} (dense blocks among the MoE ones)"
      if hf_config.get('mlp_only_layers') else
      # A top-1 gate renormalised is 1 (model.moe.renormalize refuses it at top_k=1).
      'num_experts_per_tok=1 with the gate renormalised to 1'
      if family == 'moe' and hf_config.get('num_experts_per_tok') == 1 and renormalize else
      None)
  if unsupported:
    raise ExportError(f'import: the checkpoint has {unsupported}, which jaxarch\'s models do '
                      'not compute')
  required = ['hidden_size', 'num_hidden_layers', 'num_attention_heads',
              'intermediate_size', 'vocab_size']
  experts = 'num_local_experts'  # Qwen3-MoE's checkpoints name it num_experts
  if kind == 'qwen3_moe':
    experts = 'num_experts' if 'num_experts' in hf_config else experts
    required += ['moe_intermediate_size']
  if family == 'moe':
    required += [experts, 'num_experts_per_tok']
  missing = [k for k in required if not isinstance(hf_config.get(k), int)]
  if missing:
    raise ExportError(f'import: config.json has no integer {missing[0]}, which a '
                      f'{kind} checkpoint\'s config.json holds')
  # jaxarch's preset, not a ./configs/ of the user's in the folder the command runs in.
  cfg = config_lib.load(f'{config_lib.SHIPPED_CONFIGS / family}.py:151m')
  n = hf_config['num_attention_heads']
  model = {
      'd_model': hf_config['hidden_size'], 'n_layers': hf_config['num_hidden_layers'],
      'n_heads': n, 'n_kv_heads': hf_config.get('num_key_value_heads') or n,
      'head_dim': hf_config.get('head_dim') or (256 if gemma  # Gemma3TextConfig's default
                                                else hf_config['hidden_size'] // n),
      'd_ff': hf_config['intermediate_size'], 'vocab_size': hf_config['vocab_size'],
      'max_len': max_len,
      'tie_embeddings': bool(hf_config.get('tie_word_embeddings', gemma)),
      'qkv_bias': kind == 'qwen2', 'qk_norm': kind in ('qwen3', 'qwen3_moe', 'gemma3_text'),
      'rope_theta': _rope_theta(hf_config, 'rope_theta', rope,
                                'rope_parameters.full_attention' if per_type else
                                'rope_parameters', DEFAULT_THETA.get(kind, 10_000.0)),
      'norm_eps': float(hf_config.get('rms_norm_eps', 1e-6)),
      'dtype': ('float32' if (hf_config.get('dtype') or hf_config.get('torch_dtype'))
                == 'float32' else 'bfloat16')}
  if scaling:
    model.update(_llama3_settings(hf_config, scaling, max_len)
                 if rope_type(scaling) == 'llama3' else _linear_settings(scaling))
  model.update(_window_settings(hf_config, max_len))
  if gemma:  # Gemma3TextConfig's defaults where its config.json leaves them out
    model.update(GEMMA_KEYS)
    if 'sliding_window' in model:
      model['local_rope_theta'] = _rope_theta(hf_config, 'rope_local_base_freq', local_rope,
                                              'rope_parameters.sliding_attention', 10_000.0)
  if family == 'moe':
    model.update({'moe.num_experts': hf_config[experts],
                  'moe.top_k': hf_config['num_experts_per_tok'],
                  'moe.expert_d_ff': hf_config.get('moe_intermediate_size',
                                                   hf_config['intermediate_size']),
                  'moe.renormalize': renormalize,
                  **_moe_losses(hf_config)})
  settings = [f'model.{k}={v}' for k, v in model.items()]
  settings += [f'data.tokenizer={tokenizer}',
               f'data.seq_len={min(cfg.data.seq_len, model["max_len"])}', *overrides]
  for setting in settings:
    config_lib.apply_override(cfg, setting)
  return config_lib.validate(cfg)


def _text_config(hf_config: dict) -> dict:
  """The language model's config.json: a Gemma3ForConditionalGeneration's (model_type
  gemma3) text_config as a gemma3_text's, with the wrapper's dtype and tying (its head is
  tied as the wrapper says) and its token ids where text_config has none; with its config
  class's defaults (HF_DEFAULTS) where it leaves keys out."""
  kind = hf_config.get('model_type')
  if kind == 'gemma3':
    text = hf_config.get('text_config') or {}  # none: Gemma3TextConfig's defaults
    if not isinstance(text, dict) or text.get('model_type', 'gemma3_text') != 'gemma3_text':
      raise ExportError(f'import: config.json has text_config={text!r:.60}; a Gemma 3 '
                        'multimodal model (model_type gemma3) needs a gemma3_text one')
    ids = {k: hf_config[k] for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')
           if k in hf_config}
    wrapper = {k: hf_config[k] for k in ('dtype', 'torch_dtype') if k in hf_config}
    hf_config = {**ids, **text, **wrapper, 'model_type': 'gemma3_text',
                 'tie_word_embeddings': hf_config.get('tie_word_embeddings', True)}
  return {**HF_DEFAULTS.get(hf_config.get('model_type'), {}), **hf_config}


def _language_model(hf: 'Tensors') -> 'Tensors':
  """A Gemma3ForConditionalGeneration's language model's arrays under a Gemma3ForCausalLM's
  names (GEMMA3_PREFIXES); those of its vision tower and projector are left out, in a
  logged line. Others keep their name, for `our_arrays` to refuse."""
  out, skipped = {}, []
  for name in hf:
    prefix = next((p for p in GEMMA3_PREFIXES if name.startswith(p)), None)
    if prefix is not None:
      out[GEMMA3_PREFIXES[prefix] + name[len(prefix):]] = hf.where(name)
    elif name.startswith(GEMMA3_VISION):
      skipped.append(hf.size(name))
    else:
      out[name] = hf.where(name)
  logging.getLogger(__name__).warning(
      'import: a Gemma 3 multimodal model: its language model is the run, its vision tower '
      'and multimodal projector (%d arrays, %d numbers) are left out', len(skipped),
      sum(skipped))
  return Tensors(out)


def _rope_theta(hf_config: dict, key: str, rope: dict, where: str, default: float) -> float:
  """A RoPE theta: transformers 5 reads the one in `rope` (config.json's `where`), 4 the
  top-level `key`; refused where both are there and differ (the same checkpoint would turn
  at one theta in one version and at another in the other)."""
  top, nested = hf_config.get(key), rope.get('rope_theta')
  if top is not None and nested is not None and top != nested:
    raise ExportError(f'import: config.json has {key}={top!r} and {where}.rope_theta='
                      f'{nested!r}; transformers 5 reads the second, 4 the first: make them '
                      'agree')
  theta = next((t for t in (nested, top) if t is not None), default)
  if isinstance(theta, bool) or not isinstance(theta, (int, float)):
    raise ExportError(f'import: config.json has {key}={theta!r}; expected a positive number')
  return float(theta)


def _moe_losses(hf_config: dict) -> dict:
  """model.moe's loss weights of a Mixtral's or a Qwen3-MoE's training objective:
  `router_aux_loss_coef` (the coefficient the checkpoint was trained with; transformers
  applies it only with `output_router_logits`, an inference-time default of false, which
  is not read), and no z-loss, as transformers has none. transformers' coefficient weighs
  one balance loss of the statistics pooled over the layers, whose value at a balanced
  load is top_k; jaxarch sums one per layer, each 1 at a balanced load: coef · top_k /
  n_layers gives each router the same gradient (where its layer's load is the pooled
  one). `huggingface.hf_config` writes it back."""
  coef = hf_config.get('router_aux_loss_coef', 0.001)  # MixtralConfig's, Qwen3MoeConfig's
  if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0 <= coef < math.inf:
    raise ExportError(f'import: config.json has router_aux_loss_coef={coef!r}; expected a '
                      'number >= 0')
  weight = coef * hf_config['num_experts_per_tok'] / hf_config['num_hidden_layers']
  return {'moe.aux_loss_weight': float(weight), 'moe.z_loss_weight': 0.0}


def _query_scale(hf_config: dict, m: ml_collections.ConfigDict) -> float:
  """A Gemma 3 scales its queries by query_pre_attn_scalar**-0.5 (256 by default; Gemma 3
  27B's 168 beside head_dim 128), ours by head_dim**-0.5: the ratio, for `our_arrays`."""
  if hf_config.get('model_type') != 'gemma3_text':
    return 1.0
  scalar = hf_config.get('query_pre_attn_scalar', 256)
  if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or not scalar > 0:
    raise ExportError(f'import: config.json has query_pre_attn_scalar={scalar!r}; expected '
                      'a positive number')
  return math.sqrt(head_dim(m) / scalar)


def _gemma_unsupported(hf_config: dict) -> str | None:
  """What of a Gemma 3's config.json jaxarch does not compute: Gemma 2's soft-capping, the
  embedding models' bidirectional attention."""
  for key in ('attn_logit_softcapping', 'final_logit_softcapping'):
    if hf_config.get(key) is not None:
      return f"{key}={hf_config[key]!r} (Gemma 2's)"
  if hf_config.get('use_bidirectional_attention'):
    return 'use_bidirectional_attention=true'
  return None


def _window_settings(hf_config: dict, max_len) -> dict:
  """model.sliding_window and model.attention_pattern of the checkpoint's windows. A
  Mixtral's is every layer's, a Mistral's and a Ministral's is in the layers `layer_types`
  names 'sliding_attention' (every layer without one; transformers 5's AutoConfig reads a
  Mistral with layer_types as a Ministral), a Qwen's is used only with
  `use_sliding_window` (Qwen2.5 writes false beside 131072) in the layers `layer_types`
  names (transformers 4: those from `max_window_layers` on), a Qwen3-MoE's in every
  layer, a Llama's in none (LlamaForCausalLM reads no sliding_window), a Gemma 3's in the
  layers `layer_types` names (transformers 4.50: all but every `sliding_window_pattern`-th).
  A query sees the keys less than the window before it, as in transformers; a window of
  at least max_len positions (the run's model.max_len) masks nothing and is left out, but
  a Gemma 3's, whose layers also turn at their own theta."""
  kind, n = hf_config.get('model_type'), hf_config['num_hidden_layers']
  gemma = kind == 'gemma3_text'
  if kind == 'llama':  # LlamaForCausalLM's attention reads no sliding_window
    return {}
  window = hf_config.get('sliding_window')
  if window is None or (kind in WINDOW_SWITCHED
                        and not hf_config.get('use_sliding_window', False)):
    if gemma:
      raise ExportError("import: config.json has sliding_window=null; a Gemma 3's sliding "
                        'layers need a positive integer')
    return {}
  if isinstance(window, bool) or not isinstance(window, int) or window < 1:
    raise ExportError(f'import: config.json has sliding_window={window!r}; expected a '
                      'positive integer or null')
  if isinstance(max_len, int) and window >= max_len and not gemma:
    return {}
  local = [True] * n
  types = hf_config.get('layer_types') if kind in (*LAYER_TYPED, 'mistral') else None
  if kind in ('qwen2', 'qwen3') and not types:  # transformers 4's
    first = hf_config.get('max_window_layers', 28)  # Qwen2Config's default
    types = ['sliding_attention' if i >= first else 'full_attention' for i in range(n)]
  if gemma and not types:  # transformers 4.50's
    every = hf_config.get('sliding_window_pattern', 6)  # Gemma3TextConfig's default
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
      raise ExportError(f'import: config.json has sliding_window_pattern={every!r}; '
                        'expected a positive integer')
    types = ['sliding_attention' if (i + 1) % every else 'full_attention' for i in range(n)]
  if types is not None:
    if (not isinstance(types, list) or len(types) != n
        or not set(types) <= {'sliding_attention', 'full_attention'}):
      raise ExportError(f'import: config.json has layer_types={types!r}; expected one of '
                        f"'sliding_attention', 'full_attention' per layer ({n})")
    local = [t == 'sliding_attention' for t in types]
  if not any(local):
    return {}
  kinds = ['local' if x else 'global' for x in local]
  period = next(p for p in range(1, n + 1)  # the shortest pattern that cycles to them
                if all(kinds[i] == kinds[i % p] for i in range(n)))
  return {'sliding_window': window, 'attention_pattern': tuple(kinds[:period])}


def _linear_settings(scaling: dict) -> dict:
  """model.rope_scaling.* of a `rope_type: linear` scaling (Gemma 3 4B's, 12B's and 27B's
  global layers: factor 8)."""
  factor = scaling.get('factor')
  if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
    raise ExportError(f"import: config.json's rope scaling {scaling!r} has no positive "
                      'number factor, which rope_type linear needs')
  return {'rope_scaling.type': 'linear', 'rope_scaling.factor': float(factor)}


def _llama3_settings(hf_config: dict, scaling: dict, max_len) -> dict:
  """model.rope_scaling.* of a `rope_type: llama3` scaling. As transformers, the original
  context is a top-level original_max_position_embeddings, else the scaling's, else
  max_position_embeddings."""
  def fail(what):
    raise ExportError(f"import: config.json's rope scaling {scaling!r} has no {what}, which "
                      'rope_type llama3 needs')

  factors = ('factor', 'low_freq_factor', 'high_freq_factor')
  for key in factors:
    if isinstance(scaling.get(key), bool) or not isinstance(scaling.get(key), (int, float)):
      fail(f'number {key}')
  original = hf_config.get('original_max_position_embeddings',
                           scaling.get('original_max_position_embeddings', max_len))
  if isinstance(original, bool) or not isinstance(original, int):
    fail('integer original_max_position_embeddings')
  return {'rope_scaling.type': 'llama3', 'rope_scaling.original_max_len': original,
          **{f'rope_scaling.{key}': scaling[key] for key in factors}}


def _read_json_if_any(path: Path) -> dict:
  """A checkpoint's optional JSON file (tokenizer_config.json, generation_config.json):
  {} when it has none."""
  return _read_json(path) if path.is_file() else {}


def _read_json(path: Path) -> dict:
  try:
    tree = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ExportError(f'import: {path} is not JSON: {e}') from None
  if not isinstance(tree, dict):
    raise ExportError(f'import: {path} holds no JSON object')
  return tree


class Tensors(Mapping):
  """A checkpoint's arrays by name, each read from its safetensors file (as float32) only
  when it is asked for and not kept: host memory for the array at hand, not for the whole
  checkpoint (and a bf16 one's float32 copy beside it)."""

  def __init__(self, where: dict[str, tuple[Path, str]]):
    self._where = where  # name -> (file, name in the file)

  def where(self, name: str) -> tuple[Path, str]:
    return self._where[name]

  def _read(self, name: str, read):
    path, stored = self._where[name]
    return _read_safetensors(path, lambda f: read(f, stored))

  def __getitem__(self, name: str) -> np.ndarray:
    return self._read(name, lambda f, key: np.asarray(f.get_tensor(key), np.float32))

  def size(self, name: str) -> int:
    """Its number of elements, without reading it."""
    return self._read(name, lambda f, key: math.prod(f.get_slice(key).get_shape()))

  def __contains__(self, name) -> bool:  # (Mapping's would read the array)
    return name in self._where

  def __iter__(self):
    return iter(self._where)

  def __len__(self):
    return len(self._where)


def read_hf(directory: str | Path) -> tuple[dict, Tensors]:
  """(config.json, arrays) of a Hugging Face checkpoint: one safetensors file, or the
  shards its index names; the files' headers are read now, each array when it is used."""
  directory = Path(directory).expanduser()
  if not (directory / 'config.json').is_file():
    raise ExportError(f'import: {directory / "config.json"} not found; is {directory} a '
                      'Hugging Face checkpoint (save_pretrained)?')
  hf_config = _read_json(directory / 'config.json')
  if 'model_type' not in hf_config and isinstance(hf_config.get('model'), dict):
    if (directory / 'checkpoints').is_dir():
      raise ExportError(f'import: {directory} is a jaxarch run, not a Hugging Face checkpoint: '
                        'every command reads it as it is (a new run starts from its model '
                        f'with --config.train.init_from={directory})')
    raise ExportError(f'import: {directory} is a jaxarch export, not a Hugging Face '
                      'checkpoint: `jaxarch generate --workdir=DIR` and `jaxarch.load` read it; '
                      '`jaxarch export --format=hf` of its run writes one transformers reads')
  index = directory / 'model.safetensors.index.json'
  if index.is_file():
    weight_map = _read_json(index).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ExportError(f'import: {index} has no weight_map')
    files = sorted(set(map(str, weight_map.values())))
  else:
    files = ['model.safetensors']
  where = {}
  for name in files:
    if index.is_file() and not (directory / name).is_file():
      raise ExportError(f'import: {directory / name}, a shard that {index.name} lists, is '
                        'missing (a download cut short?)')
    if not (directory / name).is_file():
      raise ExportError(f'import: {directory / name} not found (only safetensors weights '
                        'are read; convert a pytorch_model.bin with save_pretrained)')
    keys = _read_safetensors(directory / name, lambda f: list(f.keys()))
    where.update({key: (directory / name, key) for key in keys})
  return hf_config, Tensors(where)


def _read_safetensors(path: Path, read):
  """`read(file)` of the safetensors file at `path`; a file it cannot read (cut short,
  garbled, a dtype numpy lacks) is one ExportError line naming it."""
  try:
    with safetensors.safe_open(path, framework='numpy') as f:
      return read(f)
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError, a bad dtype)
    raise ExportError(f'import: {path} cannot be read as safetensors: '
                      f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None


def _adds_bos(directory: Path) -> bool | None:
  """Whether the checkpoint's own tokenizer starts every text with a BOS, as its files
  say: tokenizer_config.json's `add_bos_token` (Llama 2, Mistral, Mixtral: true; Qwen2.5,
  Qwen3: false), else its `bos_token: null` (Qwen2), else whether tokenizer.json's
  post-processor puts a token before a text (Llama 3's `<|begin_of_text|>`; a Qwen's,
  ByteLevel, puts none). None: the files do not say."""
  settings = _read_json_if_any(directory / 'tokenizer_config.json')
  if isinstance(settings.get('add_bos_token'), bool):
    return settings['add_bos_token']
  if 'bos_token' in settings and settings['bos_token'] is None:
    return False
  if not (directory / 'tokenizer.json').is_file():
    return None
  try:  # as transformers encodes: with the special tokens, then without
    import tokenizers  # pylint: disable=g-import-not-at-top
    tok = tokenizers.Tokenizer.from_file(str(directory / 'tokenizer.json'))
    plain, special = (tok.encode('a', add_special_tokens=add).ids for add in (False, True))
  except Exception:  # pylint: disable=broad-except  (not installed, unreadable: unsaid)
    return None
  return special[:1] != plain[:1]


def _bos_setting(directory: Path, hf_config: dict, tokenizer, path: Path) -> list[str]:
  """`data.add_bos=False` when the checkpoint's tokenizer adds no BOS (`_adds_bos`: a
  Qwen's, whose config.json names `<|endoftext|>` all the same); else `data.bos_id=N` when
  config.json's `bos_token_id` is not the tokenizer's eod: the token the checkpoint was
  pretrained to read first (Llama 2's and Mistral's `<s>`, 1; Llama 3's
  `<|begin_of_text|>`, 128000). None named: the default, the eod id."""
  if _adds_bos(directory) is False:
    return ['data.add_bos=False']
  bos = hf_config.get('bos_token_id')
  if bos is None or bos == tokenizer.eod_id:
    return []
  if not config_lib.is_token_id(bos, tokenizer.vocab_size) or tokenizer.token(bos) is None:
    raise ExportError(f'import: config.json has bos_token_id={bos!r}, which is no id of '
                      f'{path} (ids 0 to {tokenizer.vocab_size - 1})')
  return [f'data.bos_id={bos}']


def _stop_setting(directory: Path, hf_config: dict, tokenizer, path: Path) -> list[str]:
  """`data.stop_ids=(...)` of the `eos_token_id`s (an id or a list) of
  generation_config.json and config.json besides the tokenizer's eod: where an instruct
  model ends its turn (Llama 3's `<|eot_id|>` 128009 beside `<|end_of_text|>`, Qwen2.5's
  `<|im_end|>` 151645 beside `<|endoftext|>`), at which its generation stops."""
  found = []
  for name, config in (('generation_config.json',
                        _read_json_if_any(directory / 'generation_config.json')),
                       ('config.json', hf_config)):
    eos = config.get('eos_token_id')
    for i in eos if isinstance(eos, list) else [] if eos is None else [eos]:
      if not config_lib.is_token_id(i, tokenizer.vocab_size) or tokenizer.token(i) is None:
        raise ExportError(f'import: {name} has eos_token_id={eos!r}, and {i!r} is no id of '
                          f'{path} (ids 0 to {tokenizer.vocab_size - 1})')
      if i != tokenizer.eod_id and i not in found:
        found.append(i)
  return [f'data.stop_ids={tuple(found)!r}'] if found else []


def _chat_template(directory: Path) -> str | None:
  """An instruct checkpoint's chat template: chat_template.jinja (transformers >= 4.50
  saves it there; it wins, as in transformers), else tokenizer_config.json's
  `chat_template`, a string or a list of {name, template} of which the 'default' one is
  the template. None: a base model's, which has none."""
  jinja = directory / 'chat_template.jinja'
  if jinja.is_file():
    try:
      return jinja.read_text(encoding='utf-8')
    except UnicodeDecodeError as e:
      raise ExportError(f'import: {jinja} is not UTF-8 text: {e}') from None
  config = directory / 'tokenizer_config.json'
  template = _read_json_if_any(config).get('chat_template')
  if isinstance(template, list) and all(isinstance(t, dict) for t in template):
    named = {t.get('name'): t.get('template') for t in template}
    if 'default' not in named:
      logging.getLogger(__name__).warning(
          "import: %s's chat templates %s have none named 'default'; the run keeps none "
          "(`generate --chat` needs one)", config, sorted(map(str, named)))
      return None
    template = named['default']
  if template is not None and not isinstance(template, str):
    raise ExportError(f"import: {config} has chat_template={template!r:.60}; expected a Jinja "
                      "template string or a list of {name, template} with a 'default' one")
  return template


def import_hf(directory: str | Path, workdir: str | Path, overrides=()) -> Path:
  """A jaxarch run at step 0 in a new `workdir` from a Hugging Face Llama, Mistral, Qwen2,
  Qwen3, Gemma 3, Mixtral or Qwen3-MoE checkpoint: config.json (with the checkpoint's BOS
  as data.bos_id, or data.add_bos=False where its tokenizer adds none, and its end-of-turn
  ids as data.stop_ids), the tokenizer (copied into workdir/tokenizer/, with an instruct model's
  chat template as data.chat_template, its tokenizer_config.json beside it) and a
  checkpoint holding its weights (with a fresh optimizer state)."""
  # pylint: disable=g-import-not-at-top  (the trainer's modules, for this command only)
  from jaxarch.train.checkpoint import Checkpointer
  from jaxarch.train.pretrained import mesh_here
  from jaxarch.train.state import init_state, make_setup
  directory, workdir = Path(directory).expanduser(), Path(workdir).expanduser().absolute()
  free_out(workdir, command='import', flag='--workdir')
  hf_config, hf = read_hf(directory)
  if hf_config.get('model_type') == 'gemma3':  # multimodal: its language model
    hf = _language_model(hf)
  hf_config = _text_config(hf_config)
  # A SentencePiece model before a tokenizer.json converted from it (Llama 2 has both),
  # but a Gemma's or an instruct model's tokenizer.json first: transformers reads text
  # through it (GemmaTokenizerFast, LlamaTokenizerFast), and only through one does
  # `generate --chat` read the turns' special tokens in text (Llama 2 chat's <s>,
  # Mistral Instruct v0.3's [INST]).
  template = _chat_template(directory)
  order = ('tokenizer.model', 'tokenizer.json')
  if hf_config.get('model_type') == 'gemma3_text' or template is not None:
    order = order[::-1]
  tokenizer = next((directory / f for f in order if (directory / f).is_file()), None)
  if tokenizer is None:
    raise ExportError(f'import: {directory} holds no tokenizer.json or tokenizer.model')
  # Read now, as the run will read it: an unreadable tokenizer, or one without an
  # end-of-document token, is refused before a run that cannot train or generate is made.
  reader = get_tokenizer(str(tokenizer))
  cfg = run_config(hf_config, str(tokenizer),
                   [*_bos_setting(directory, hf_config, reader, tokenizer),
                    *_stop_setting(directory, hf_config, reader, tokenizer), *overrides])
  # Special tokens past the model's rows (Gemma 3's <image_soft_token>) are never fed to it.
  if past := ids_past_model(reader, cfg.model.vocab_size):
    raise ExportError(f'import: {tokenizer} has {reader.vocab_size} ids, more than the '
                      f"model's vocab_size={cfg.model.vocab_size} (e.g. id {past[0]})")
  cfg, mesh = mesh_here(cfg)
  setup = make_setup(cfg, mesh)
  expected = {name: variable.get_value() for collection in ('params', 'model_state')
              for name, (_, variable) in named_variables(setup.abstract_state[collection]
                                                         ).items()}

  blocks = scan_layout(cfg.model).blocks
  stacked = {}  # with model.scan_layers: stacked name -> its layers placed so far

  def place(name, array):  # our_arrays names model variables; window counters and the
    slot = layer_slot(name, blocks)  # like start at zero
    want = expected[name if slot is None else slot[0]]
    shape = tuple(want.shape) if slot is None else tuple(want.shape[1:])
    if shape != array.shape:
      raise ShapeMismatch(name, array.shape, shape)
    if slot is None:
      return jax.device_put(array, want.sharding)  # its host copy is dropped
    # A layer of a stacked weight: put in its shards, then into its slice, in place.
    sharding = want.sharding
    layer = jax.device_put(array, NamedSharding(sharding.mesh, P(*sharding.spec[1:])))
    if slot[0] not in stacked:
      stacked[slot[0]] = jnp.zeros(want.shape, want.dtype, device=sharding)
    stacked[slot[0]] = _set_layer(stacked[slot[0]], layer, slot[1])
    return None

  # Each array read, laid out and put in its shards in turn: host memory for one.
  arrays = our_arrays(hf, cfg, _query_scale(hf_config, cfg.model), place)
  arrays = {**{k: v for k, v in arrays.items() if v is not None}, **stacked}
  state = init_state(cfg, setup, given=arrays)  # no random weights made to be replaced
  del arrays
  # A failed import leaves no half-made run.
  with all_or_nothing(workdir, command='import', flag='--workdir') as partial:
    # Named relative to the run in its config.json: the run can be moved or copied.
    run_cfg = copy_tokenizer(cfg, partial)
    if template is not None:
      run_cfg = keep_chat_template(run_cfg, partial, template,
                                   directory / 'tokenizer_config.json')
    config_lib.save(run_cfg, partial / 'config.json')
    checkpointer = Checkpointer(partial, async_save=False)
    checkpointer.save(0, state, force=True)
    checkpointer.close()
  return workdir
