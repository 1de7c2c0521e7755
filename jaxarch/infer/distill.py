"""Self-distillation data for BiTA: a trained model's greedy continuations of its own data.

BiTA's mask tokens learn to predict what the frozen model would generate, so they are
trained on the model's own greedy outputs (not on human text, whose next tokens the model
would often not choose). `distill` draws prompts of `prompt_len` tokens from random
places of random documents of the run's corpus (its train split for training, its
validation split for validation), continues them greedily in batches, and writes
`{'tokens': prompt + continuation, 'prompt_length'}` as an array_record dataset that
`data.source='distilled:<out>'` reads (see `data.sources.Distilled`).

  jaxarch distill --workdir=/tmp/base --out=/tmp/base-distilled
"""

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from jaxarch import config as config_lib
from jaxarch import data
from jaxarch.data import sources
from jaxarch.infer.generate import Generator
from jaxarch.infer.sampling import GenerateError
from jaxarch.oserrors import explained_write_errors
from jaxarch.parallel import make_mesh
from jaxarch.train.pretrained import load_checkpoint


def sample_prompts(data_cfg, split: str, num_prompts: int, prompt_len: int, seed: int,
                   tokenizer) -> list[list[int]]:
  """`num_prompts` windows of `prompt_len` tokens of `[bos] + document` (shorter when the
  document is), each from a random document (of a mixture: of a trained source drawn by
  weight) and start. With no BOS (data.add_bos=False) of the document alone, and an empty
  document gives no prompt: there may be fewer."""
  parts = [(component.weight, sources.open_component(component, cfg, split))
           for component, cfg in sources.mixture_configs(data_cfg) if component.weight > 0]
  parts = [(weight, documents) for weight, documents in parts if len(documents)]
  if not parts:
    return []
  rng = np.random.default_rng(seed)
  bos = data.bos_id(data_cfg, tokenizer)  # as the run's documents start
  if len(parts) == 1:
    drawn = [(parts[0][1], index) for index in rng.integers(0, len(parts[0][1]), num_prompts)]
  else:  # a mixture's: from each source in its share of the training tokens
    weights = np.array([weight for weight, _ in parts])
    drawn = [(parts[k][1], rng.integers(0, len(parts[k][1])))
             for k in rng.choice(len(parts), num_prompts, p=weights / weights.sum())]
  prompts = []
  for documents, index in drawn:
    tokens = ([] if bos is None else [bos]) + tokenizer.encode(documents[int(index)])
    start = int(rng.integers(0, max(len(tokens) - prompt_len, 0) + 1))
    if tokens:
      prompts.append(tokens[start:start + prompt_len])
  return prompts


def _warn_if_no_bita_trains_on(workdir, model_cfg, prompt_len: int) -> None:
  """Said before generating (hours, for a large run): continuations that a BiTA run over
  this base refuses (they still train other students, as any `distilled:` source does)."""
  why = config_lib.bita_base_refusal(model_cfg)
  if why is None and prompt_len + 2 > model_cfg.max_len:
    why = (f'--prompt_len={prompt_len} leaves no continuation in its rows of at most '
           f'model.max_len={model_cfg.max_len} tokens (a mask needs the token two past its '
           f'anchor); give --prompt_len={max(model_cfg.max_len - 2, 1)} or less, and the BiTA '
           'run a data.seq_len of at least --prompt_len + 2')
  if why is None:
    return
  logging.getLogger(__name__).warning(
      'distill: %s: %s; the continuations are written, but a BiTA run over this base is '
      'refused', workdir, why)


def distill(workdir: str | Path, out: str | Path, *, num_prompts: int = 2048,
            validation_prompts: int = 64, prompt_len: int = 32, max_new_tokens: int = 96,
            batch_size: int = 64, seed: int = 0) -> dict:
  """Writes the distilled dataset of the run in `workdir` to `out`; returns its summary."""
  for name, value, least in (('num_prompts', num_prompts, 1),
                             ('validation_prompts', validation_prompts, 0),
                             ('prompt_len', prompt_len, 1),
                             ('max_new_tokens', max_new_tokens, 1),
                             ('batch_size', batch_size, 1),
                             ('seed', seed, 0)):  # numpy's generators take no negative seed
    if value < least:
      raise GenerateError(f'distill: --{name}={value} must be >= {least}')
  sources.check_no_distilled(out)
  saved = Path(workdir) / 'config.json'
  if saved.is_file():  # before the model is loaded: prompts come from the run's text
    saved_cfg = config_lib.load_json(saved)
    source = saved_cfg.data.source
    if source.startswith(sources.DISTILLED):
      raise GenerateError(f'distill: {workdir} was trained on data.source={source!r}, which '
                          'has no text to draw prompts from; distill the base run, trained '
                          "on 'default', 'files:<glob>' or 'tfds:<name>'")
    _warn_if_no_bita_trains_on(workdir, saved_cfg.model, prompt_len)
  start = time.perf_counter()
  cfg, model, base_step = load_checkpoint(workdir, scan_layers=False)  # decoding: unrolled
  tokenizer = data.get_tokenizer(cfg.data.tokenizer)
  stops = data.stop_ids(cfg.data, tokenizer)  # the eod, and an instruct model's end of turn
  generator = Generator(model, mesh=make_mesh(cfg), rules=cfg.mesh.rules,
                        vocab_limit=tokenizer.vocab_size)
  splits, new_tokens = {}, 0
  for i, (split, count) in enumerate((('train', num_prompts),
                                      ('validation', validation_prompts))):
    prompts = sample_prompts(cfg.data, split, count, prompt_len, seed + i, tokenizer)
    splits[split] = []
    for first in range(0, len(prompts), batch_size):
      batch = prompts[first:first + batch_size]
      continuations, _ = generator(batch, max_new_tokens=max_new_tokens,
                                   stop_ids=stops)
      splits[split] += [(p + c, len(p)) for p, c in zip(batch, continuations)]
      new_tokens += sum(map(len, continuations))
  with explained_write_errors(lambda reason: GenerateError(
      f'distill: could not write {out} ({reason}); free space (or fix permissions) and '
      'rerun, or give another --out')):
    written = sources.write_distilled(out, splits)
    summary = {
        'base_workdir': str(Path(workdir).absolute()), 'base_step': base_step,
        'dataset': str(written), 'tokenizer': cfg.data.tokenizer, 'prompt_len': prompt_len,
        'max_new_tokens': max_new_tokens, 'seed': seed,
        'sequences': {k: len(v) for k, v in splits.items()}, 'new_tokens': new_tokens,
        'seconds': round(time.perf_counter() - start, 1),
    }
    tmp = Path(out) / 'distill.json.tmp'
    try:  # the dataset and its summary together, or neither: a rerun is not refused
      tmp.write_text(json.dumps(summary, indent=2) + '\n')
      tmp.replace(Path(out) / 'distill.json')
    except BaseException:
      tmp.unlink(missing_ok=True)
      shutil.rmtree(written, ignore_errors=True)
      raise
  return summary
