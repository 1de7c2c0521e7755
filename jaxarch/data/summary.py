"""What a config's data holds, and how much of it a run reads: `jaxarch prepare`.

A pod job should not spend its first hours preparing a corpus on its GPU hosts, and a
mixture's weights are only known to be right once each source's epochs are: how many
times `train.steps` of `train.batch_size` rows read each source. `summarize` prepares
every source of `data.source` (as training would, into the data directory), counts its
documents and bytes exactly, estimates its tokens from a sample of documents run through
the run's tokenizer, and sets them against the tokens the run trains on.
"""

import logging

import numpy as np

from jaxarch.config import ConfigError
from jaxarch.data import pipeline
from jaxarch.data import sources
from jaxarch.data import tokenizers

_READ = 1024  # documents read at once when counting bytes
log = logging.getLogger(__name__)


def _bytes(documents: sources.TextSource, text: bool) -> tuple[int, int]:
  """The documents' bytes, and (for a tokenizer of `text`, which decodes them) how many of
  them are not UTF-8."""
  num_bytes = not_text = 0
  for lo in range(0, len(documents), _READ):
    for d in documents.__getitems__(range(lo, min(lo + _READ, len(documents)))):
      num_bytes += len(d)
      if text and isinstance(d, bytes):
        try:
          d.decode('utf-8')
        except UnicodeDecodeError:
          not_text += 1
  return num_bytes, not_text


def _tokens(documents, num_bytes: int, tokenizer, tokenize, sample: int) -> int:
  """The row positions a split's documents take as training packs them: their ids, and
  each document's BOS, eod and `data.pack_align` padding (`pipeline.tokenize`); ids per
  byte and positions per document besides its ids are measured on up to `sample`
  documents spread over the split."""
  if not len(documents):  # pylint: disable=g-explicit-length-test
    return 0
  picks = np.unique(np.linspace(0, len(documents) - 1, min(sample, len(documents))).astype(int))
  texts = documents.__getitems__(picks.tolist())
  ids = [len(tokenizer.encode(t)) for t in texts]
  extra = sum(len(tokenize.map(t)['inputs']) - n for t, n in zip(texts, ids)) / len(texts)
  size = sum(len(t) for t in texts)
  return round(num_bytes * sum(ids) / size if size else 0) + round(len(documents) * extra)


def summarize(cfg, *, sample_documents: int = 1000) -> list[dict]:
  """One dict per source of `cfg.data.source` (a mixture's each; one for a single source):
  name, source, weight, and per split its documents, bytes and estimated tokens (`_tokens`):
  `train` and `validation` of a source trained on, `validation` alone of one evaluated
  only (weight 0). A source trained on also has `train_tokens_read` (the run's tokens
  times its share) and `epochs` (those over its training tokens; None without any).
  Prepares each `default` and `files:` source that is not prepared yet (a `tfds:` one
  must be prepared already, as for training)."""
  data_cfg = cfg.data
  if data_cfg.source.startswith(sources.DISTILLED):
    raise ConfigError(f'config error: data.source={data_cfg.source!r} is written by '
                      "`jaxarch distill`, ready as it is; prepare the base run's data instead")
  tokenizer = tokenizers.get_tokenizer(data_cfg.tokenizer)
  tokenize = pipeline.tokenize(data_cfg, tokenizer)
  text = not isinstance(tokenizer, tokenizers.ByteTokenizer)  # (bytes: read as they are)
  run_tokens = cfg.train.steps * cfg.train.batch_size * data_cfg.seq_len
  rows = []
  for component, source_cfg in sources.mixture_configs(data_cfg):
    trained = component.weight > 0
    row = {'name': component.name or 'data', 'source': component.source,
           'weight': component.weight, 'text_key': source_cfg.get('text_key')}
    for split in ('train', 'validation') if trained else ('validation',):
      documents = sources.open_component(component, source_cfg, split)
      num_bytes, not_text = _bytes(documents, text)
      row[split] = {'documents': len(documents), 'bytes': num_bytes,
                    'tokens': _tokens(documents, num_bytes, tokenizer, tokenize,
                                      sample_documents)}
      if not_text:
        row[split]['not_utf8_documents'] = not_text
        log.warning('%s (%s): %d of its %s documents %s not UTF-8, which data.tokenizer=%r '
                    'reads with U+FFFD in place of each bad byte (the byte tokenizer reads '
                    'them as they are)', f'data.source component {component.name!r}'
                    if component.name else 'data.source', component.source, not_text, split,
                    'is' if not_text == 1 else 'are', data_cfg.tokenizer)
    if not row['validation']['documents']:
      pipeline.warn_no_validation(component)
    if trained:
      row['train_tokens_read'] = round(run_tokens * component.weight)
      tokens = row['train']['tokens']
      row['epochs'] = row['train_tokens_read'] / tokens if tokens else None
    rows.append(row)
  return rows


def table(rows: list[dict]) -> str:
  """`summarize`'s rows as a plain-text table, one line a source."""
  head = ('source', 'weight', 'train docs', 'train bytes', 'train tokens', 'val docs',
          'val tokens', 'run reads', 'epochs')
  def cells_of(r):
    train = r.get('train')
    return (f'{r["name"]}: {r["source"]}', f'{r["weight"]:.3g}',
            *((f'{train["documents"]:,}', f'{train["bytes"]:,}', f'~{train["tokens"]:,}')
              if train else ('-', '-', '-')),
            f'{r["validation"]["documents"]:,}', f'~{r["validation"]["tokens"]:,}',
            f'{r["train_tokens_read"]:,}' if train else 'eval only',
            '-' if not train else 'no data' if r['epochs'] is None else f'{r["epochs"]:.3g}')
  cells = [head] + [cells_of(r) for r in rows]
  widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
  line = lambda c: '  '.join(v.ljust(w) if i == 0 else v.rjust(w)
                             for i, (v, w) in enumerate(zip(c, widths)))
  return '\n'.join(line(c) for c in cells)
