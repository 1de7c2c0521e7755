"""What a config's data holds, and how much of it a run reads: `jaxarch prepare`.

A pod job should not spend its first hours preparing a corpus on its GPU hosts, and a
mixture's weights are only known to be right once each source's epochs are: how many
times `train.steps` of `train.batch_size` rows read each source. `summarize` prepares
every source of `data.source` (as training would, into the data directory), counts its
documents and bytes exactly, estimates its tokens from a sample of documents run through
the run's tokenizer, and sets them against the tokens the run trains on.
"""

import numpy as np

from jaxarch.data import sources
from jaxarch.data import tokenizers

_READ = 1024  # documents read at once when counting bytes


def _bytes(documents: sources.TextSource) -> int:
  return sum(len(d) for lo in range(0, len(documents), _READ)
             for d in documents.__getitems__(range(lo, min(lo + _READ, len(documents)))))


def _tokens_per_byte(documents, tokenizer, sample: int) -> float | None:
  """Tokens per byte of up to `sample` documents spread over the split (None: no bytes)."""
  if not len(documents):  # pylint: disable=g-explicit-length-test
    return None
  picks = np.unique(np.linspace(0, len(documents) - 1, min(sample, len(documents))).astype(int))
  texts = documents.__getitems__(picks.tolist())
  size = sum(len(t) for t in texts)
  return sum(len(tokenizer.encode(t)) for t in texts) / size if size else None


def summarize(cfg, *, sample_documents: int = 1000) -> list[dict]:
  """One dict per source of `cfg.data.source` (a mixture's each; one for a single source):
  name, source, weight, and per split (`train`, `validation`) its documents, bytes and
  estimated tokens (a BOS or eod per document included); for the sources trained on,
  `train_tokens_read` (the run's tokens times the source's share) and `epochs` (those
  over its training tokens). Prepares each source that is not prepared yet."""
  data_cfg = cfg.data
  if data_cfg.source.startswith(sources.DISTILLED):
    raise ValueError(f'data.source={data_cfg.source!r} is written by `jaxarch distill`, '
                     'ready as it is; prepare the base run\'s data instead')
  tokenizer = tokenizers.get_tokenizer(data_cfg.tokenizer)
  run_tokens = cfg.train.steps * cfg.train.batch_size * data_cfg.seq_len
  rows = []
  for component, source_cfg in sources.mixture_configs(data_cfg):
    row = {'name': component.name or 'data', 'source': component.source,
           'weight': component.weight}
    for split in ('train', 'validation'):
      documents = sources.open_source(source_cfg, split)
      num_bytes = _bytes(documents)
      per_byte = _tokens_per_byte(documents, tokenizer, sample_documents)
      row[split] = {'documents': len(documents), 'bytes': num_bytes,
                    'tokens': round(num_bytes * (per_byte or 0)) + len(documents)}
    if component.weight > 0:
      row['train_tokens_read'] = round(run_tokens * component.weight)
      row['epochs'] = row['train_tokens_read'] / max(row['train']['tokens'], 1)
    rows.append(row)
  return rows


def table(rows: list[dict]) -> str:
  """`summarize`'s rows as a plain-text table, one line a source."""
  head = ('source', 'weight', 'train docs', 'train bytes', 'train tokens', 'val docs',
          'val tokens', 'run reads', 'epochs')
  cells = [head] + [(
      f'{r["name"]}: {r["source"]}', f'{r["weight"]:.3g}', f'{r["train"]["documents"]:,}',
      f'{r["train"]["bytes"]:,}', f'~{r["train"]["tokens"]:,}',
      f'{r["validation"]["documents"]:,}', f'~{r["validation"]["tokens"]:,}',
      f'{r["train_tokens_read"]:,}' if 'epochs' in r else 'eval only',
      f'{r["epochs"]:.3g}' if 'epochs' in r else '-') for r in rows]
  widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
  line = lambda c: '  '.join(v.ljust(w) if i == 0 else v.rjust(w)
                             for i, (v, w) in enumerate(zip(c, widths)))
  return '\n'.join(line(c) for c in cells)
