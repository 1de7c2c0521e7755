"""Greedy generation from a `jaxarch export --format=stablehlo` directory.

Needs only jax, numpy and safetensors: the model is the serialized StableHLO, not jaxarch
code. This file is copied into every such directory.

  python run_stablehlo.py DIR 257,100,101 [257,50 ...] [--max_new_tokens=32] [--ignore_eod]

Prompts are token ids (the tokenizer is described in DIR/tokenizer.json; prompts start
with its bos_id, the eod id unless the run set another, or with the text's first id where
bos_id is null: a model that reads no BOS). Generation stops at the
stop_ids of DIR/stablehlo.json (the eod id, and an instruct model's end of turn) unless
--ignore_eod. Prints one line of new ids per prompt.
"""

import argparse
import json
from pathlib import Path

import jax
import numpy as np
import safetensors.flax
from jax import export


class StableHLOModel:
  """The exported prefill and decode step with their weights."""

  def __init__(self, directory):
    directory = Path(directory)
    if not (directory / 'stablehlo.json').is_file():
      raise ValueError(f'{directory} has no stablehlo.json: give a directory written by '
                       '`jaxarch export --format=stablehlo`')
    try:
      self.spec = json.loads((directory / 'stablehlo.json').read_text())
      self.weights = safetensors.flax.load_file(directory / 'model.safetensors')
      self.prefill = export.deserialize((directory / 'prefill.stablehlo').read_bytes())
      self.decode = export.deserialize((directory / 'decode.stablehlo').read_bytes())
    except Exception as e:  # pylint: disable=broad-except  # a file missing, cut short, garbled
      raise ValueError(f'{directory} is not a whole `jaxarch export --format=stablehlo` '
                       f'directory ({type(e).__name__}: {e}); export it again') from None
    # The id prompts start with (exports before 2026-12-05 name none: their eod id); None:
    # no BOS, a prompt is its text's ids alone.
    self.bos_id = self.spec.get('bos_id', self.spec['eod_id'])
    # Where generation stops (older exports name none: their eod id alone).
    self.stop_ids = list(self.spec.get('stop_ids', [self.spec['eod_id']]))

  def generate(self, prompts, *, max_new_tokens: int, stop_ids=None) -> list[list[int]]:
    """New tokens of each prompt (a list of ids), ending with a stop id if one came
    (default: the export's stop_ids, the eod id first), greedy."""
    batch, prompt_len = self.spec['batch_size'], self.spec['prompt_len']
    if not prompts or not all(prompts):
      raise ValueError('give one or more prompts, each of one or more token ids ' + (
          f'(start with the BOS id, {self.bos_id})' if self.bos_id is not None else
          '(the model reads no BOS: the text\'s ids alone)'))
    vocab = self.spec['vocab_size']
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:  # the exported gather would read garbage for them, silently
      raise ValueError(f'token ids {bad[:5]} are outside the vocabulary [0, {vocab})')
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
    # jax.export baked the shapes in: what does not fit needs another export.
    longest, max_len = max(map(len, prompts)), self.spec['max_len']
    room = max_len + 1 - longest  # the last new token is never written to the caches
    misfit = (('batch_size', f'{len(prompts)} prompts: it takes {batch} at once')
              if len(prompts) > batch else
              ('prompt_len', f'a prompt of {longest} tokens: it takes up to {prompt_len}')
              if longest > prompt_len else
              ('max_len', f'{max_new_tokens} new tokens after a prompt of {longest}: its '
               f'{max_len} cache positions hold {room}') if max_new_tokens > room else None)
    if misfit:
      raise ValueError(f'the export does not fit {misfit[1]}; ask for less or export the '
                       f'run again with a larger --{misfit[0]}')
    stops = set(self.stop_ids if stop_ids is None else stop_ids)
    tokens = np.zeros((batch, prompt_len), np.int32)
    lengths = np.ones(batch, np.int32)  # unused rows: one-token dummy prompts
    for i, prompt in enumerate(prompts):
      tokens[i, :len(prompt)], lengths[i] = prompt, len(prompt)
    logits, caches = self.prefill.call(self.weights, tokens, lengths)
    out = [[] for _ in prompts]
    for step in range(max_new_tokens):
      new = np.asarray(jax.numpy.argmax(logits, axis=-1), np.int32)
      for i, row in enumerate(out):
        if not (row and row[-1] in stops):
          row.append(int(new[i]))
      if step + 1 == max_new_tokens or all(row[-1] in stops for row in out):
        break
      logits, caches = self.decode.call(self.weights, caches, new, lengths + step)
    return out


def _ids(text: str) -> list[int]:
  try:
    return [int(t) for t in text.split(',')]
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not comma-separated token ids') from None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('directory')
  parser.add_argument('prompts', nargs='+', type=_ids, help='comma-separated token ids')
  parser.add_argument('--max_new_tokens', type=int, default=32)
  parser.add_argument('--ignore_eod', action='store_true',
                      help='generate --max_new_tokens, past the eod id and the stop_ids')
  args = parser.parse_args()
  try:  # a bad directory, prompt or length: one line, as argparse's own errors
    rows = StableHLOModel(args.directory).generate(
        args.prompts, max_new_tokens=args.max_new_tokens,
        stop_ids=() if args.ignore_eod else None)
  except ValueError as e:
    parser.error(str(e))
  for row in rows:
    print(','.join(map(str, row)))


if __name__ == '__main__':
  main()
