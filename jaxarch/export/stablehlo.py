"""A model's prefill and decode step as StableHLO (`jax.export`), run without jaxarch.

  OUT/prefill.stablehlo   (weights, tokens [b, p], lengths [b]) -> (logits [b, V], caches)
  OUT/decode.stablehlo    (weights, caches, tokens [b], positions [b]) -> (logits, caches)
                          (V: the model's padded vocabulary; ids from the tokenizer's
                          `vocab_size` on have logit -inf, so they are never chosen)
  OUT/model.safetensors   the weights both take, by name (as `export.weights` writes them)
  OUT/stablehlo.json      batch size, prompt and cache lengths, vocabulary, special ids
                          (stop_ids: the eod and any end of turn, where generation stops)
  OUT/run_stablehlo.py    the loader: greedy generation with jax, numpy and safetensors only

`weights` and `caches` are dicts of arrays keyed by name. Prompts are right-padded to p
tokens (a multiple of MEGABYTE's patch size), caches hold `max_len` positions, so a
prompt of n tokens can be continued by up to `max_len + 1 - n` tokens (the last new
token is not written to them). The functions are
serialized for the platforms asked for (default: the one exporting), with XLA's attention
and kernels (the TPU lookup kernels for TPUs alone) and the batch size fixed: `jax.export`
bakes the shapes in.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxarch.export import run_stablehlo
from jaxarch.export.weights import ExportError, flat_arrays, write_model
from jaxarch.infer.decoding import cannot_decode, for_inference
from jaxarch.infer.sampling import within_vocab
from jaxarch.layers.signals import WindowCounter
from jaxarch.models import named_variables, unscanned


def _state(template: dict[str, tuple], arrays: dict[str, jax.Array]) -> nnx.State:
  """The State of `template` (`named_variables`) holding `arrays` instead."""
  return nnx.from_flat_state([(path, variable.replace(arrays[name]))
                              for name, (path, variable) in template.items()])


PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # jax.export's lowering platforms
_BACKENDS = {'cpu': 'cpu', 'cuda': 'gpu', 'rocm': 'gpu', 'tpu': 'tpu'}  # -> jax's backend


def check_platforms(platforms: tuple[str, ...] | None) -> None:
  """Refuses a platform `jax.export` cannot lower for, in one line."""
  unknown = [p for p in platforms or () if p not in PLATFORMS]
  if unknown:
    raise ExportError(f'export: platform {unknown[0]!r} is not one of {", ".join(PLATFORMS)} '
                      '(jax.export\'s names: cuda for NVIDIA GPUs)')


def export_stablehlo(model: nnx.Module, cfg: ml_collections.ConfigDict, out: str | Path, *,
                     batch_size: int, max_len: int, prompt_len: int | None = None,
                     platforms: tuple[str, ...] | None = None, source: str = '',
                     final: str | Path | None = None) -> Path:
  """Writes OUT as above for `model` (built from `cfg`); `final`: as for `write_model`.
  `prompt_len` None: half of `max_len`, in whole patches for MEGABYTE."""
  patch = getattr(model, 'patch_size', 1)  # MEGABYTE prefills whole patches
  if prompt_len is None:
    prompt_len = max(max_len // 2 // patch, 1) * patch
  if batch_size < 1 or prompt_len < 1 or prompt_len % patch:
    raise ExportError(f'export: batch_size={batch_size} and prompt_len={prompt_len} must be '
                      f'positive, prompt_len a multiple of the patch size {patch}')
  if not prompt_len < max_len <= cfg.model.max_len:
    raise ExportError(f'export: need prompt_len={prompt_len} < max_len={max_len} <= '
                      f'model.max_len={cfg.model.max_len}')
  check_platforms(platforms)
  if (why := cannot_decode(model)) is not None:  # before anything is written
    raise ExportError(f'export: --format=stablehlo writes a cached decoder: {why}; use '
                      '--format=safetensors')
  cfg, model = unscanned(cfg, model)  # the program reads the weights as written, unrolled
  out = write_model(model, cfg, out, source=source, final=final)
  model = for_inference(model)
  targets = {_BACKENDS[p] for p in platforms} if platforms else {jax.default_backend()}
  if targets != {'tpu'} or jax.default_backend() != 'tpu':
    # The kernels chosen when traced here lower for this platform alone, and jax.export
    # refuses to serialize cuDNN attention and Triton kernels (custom calls without
    # compatibility guarantees): XLA's attention, lookups and matmuls, save the TPU
    # lookup kernels for TPUs alone (a stable custom call).
    model.set_attributes(impl=None, lookup_impl='xla', matmul_impl='xla',
                         raise_if_not_found=False)
  graphdef, counters, weights_state = nnx.split(model, WindowCounter, ...)
  weights_template = named_variables(weights_state)
  weights = flat_arrays(model)
  vocab_size = json.loads((out / 'tokenizer.json').read_text())['vocab_size']

  def with_caches(weights):
    # Training statistics are built as zeros inside: neither inputs nor constants.
    zeros = jax.tree.map(jnp.zeros_like, counters)
    model = nnx.merge(graphdef, zeros, _state(weights_template, weights))
    model.init_cache(batch_size, max_len)
    return model

  def caches_of(model) -> dict[str, jax.Array]:
    caches = named_variables(nnx.state(model, nnx.Cache))
    return {name: variable.get_value() for name, (_, variable) in caches.items()}

  def prefill(weights, tokens, lengths):
    model = with_caches(weights)
    logits = model.prefill(tokens, lengths)
    return within_vocab(logits.astype(jnp.float32), vocab_size), caches_of(model)

  def decode(weights, caches, tokens, positions):
    model = with_caches(weights)
    nnx.update(model, _state(named_variables(nnx.state(model, nnx.Cache)), caches))
    logits = model.decode_step(tokens, positions)
    return within_vocab(logits.astype(jnp.float32), vocab_size), caches_of(model)

  spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  weight_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
  kwargs = {} if platforms is None else {'platforms': platforms}
  exported_prefill = jax.export.export(jax.jit(prefill), **kwargs)(
      weight_specs, spec((batch_size, prompt_len)), spec((batch_size,)))
  _, cache_specs = jax.eval_shape(prefill, weight_specs, spec((batch_size, prompt_len)),
                                  spec((batch_size,)))
  exported_decode = jax.export.export(jax.jit(decode), **kwargs)(
      weight_specs, cache_specs, spec((batch_size,)), spec((batch_size,)))
  (out / 'prefill.stablehlo').write_bytes(exported_prefill.serialize())
  (out / 'decode.stablehlo').write_bytes(exported_decode.serialize())
  tokenizer = json.loads((out / 'tokenizer.json').read_text())
  (out / 'stablehlo.json').write_text(json.dumps({
      'batch_size': batch_size, 'prompt_len': prompt_len, 'max_len': max_len,
      'vocab_size': tokenizer['vocab_size'], 'eod_id': tokenizer['eod_id'],
      'bos_id': tokenizer['bos_id'], 'pad_id': tokenizer['pad_id'],
      'stop_ids': tokenizer['stop_ids'],  # run_stablehlo.py's default stops
      'platforms': list(exported_prefill.platforms),
  }, indent=2) + '\n')
  shutil.copy(run_stablehlo.__file__, out / 'run_stablehlo.py')
  bos = tokenizer['bos_id']  # None: the model reads no BOS
  prompt = ([] if bos is None else [bos]) + [100, 101, 102]
  with open(out / 'README.md', 'a') as readme:
    readme.write(_README.format(batch=batch_size, prompt_len=prompt_len, max_len=max_len,
                                platforms=', '.join(exported_prefill.platforms),
                                out=final or out, prompt=','.join(map(str, prompt))))
  return out


_README = """
## StableHLO

`prefill.stablehlo` and `decode.stablehlo` are the model's prefill and decode step
serialized with `jax.export` for {platforms}: batch {batch}, prompts right-padded to
{prompt_len} tokens, room for {max_len} positions (a sliding-window layer's cache holds its
window alone). `run_stablehlo.py` generates with them
using only jax, numpy and safetensors (no jaxarch):

```bash
python {out}/run_stablehlo.py {out} {prompt} --max_new_tokens=32
```
"""
