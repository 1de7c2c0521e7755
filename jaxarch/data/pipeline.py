"""Grain pipeline: documents -> tokens -> rows of `seq_len` packed with segment ids -> batches.

Each document becomes `inputs = [bos] + ids` and `targets = ids + [eod]`: the BOS is the
tokenizer's eod unless `data.bos_id` names another (an imported Llama's `<s>`: Llama's
`<s> doc </s>`), and the last target of a document is its eod, so no target ever belongs
to another document. With `data.add_bos=False` (an imported Qwen's, whose tokenizer adds
no BOS) a document is `inputs = ids`, `targets = ids[1:] + [eod]`, and an empty one is
left out. Concat-then-split packing fills every row completely; a document longer
than a row continues in the next one instead of being cut off. A batch is a dict of int32
arrays `[local_batch, seq_len]`:

  inputs, targets   token ids; pad_id where segment_ids == 0
  segment_ids       1, 2, ... for the document pieces of a row; 0 for padding
  positions         0-based position within each piece, restarting at every segment
  target_bytes      evaluation's only: the bytes of the document's text each target
                    stands for (`tokenizers`' `encode_counting_bytes`; the eod, the
                    text a normaliser dropped at its end), 0 on padding: bits per byte

Training packs `S` streams side by side (default: one per row of the global batch).
Stream `i` packs documents `i, i + S, i + 2S, ...` of the shuffled, endlessly repeated
document sequence, and a batch takes its rows from the streams in turn, so it holds
pieces of `S` documents. Each process reads only its own share of the streams, so the
global batch does not depend on the number of processes. With one stream, a long document
(the stdlib averages ~140 rows of 128 bytes) fills whole batches by itself: their rows are
highly correlated and the loss jumps from step to step. With fewer documents than
streams, streams start on the same document (a warning says so). The streams are zipped
as `ZipIterDataset` zips, whose state is just the list of the stream states, the rows of
the streams made in `data.num_threads` threads at once (`_ZipStreams`);
`InterleaveIterDataset` would add a prefetch thread per stream and bookkeeping for finite
inputs, and a window shuffle of rows only mixes documents that are close in the sequence,
so it would need thousands of rows in memory to do the same.

A mixture (`data.source='SOURCE,WEIGHT;SOURCE,WEIGHT'`, `config.data_mixture`) packs each
source's documents into rows of its own in every stream, with its own shuffle, and mixes
whole rows (`_MixedRows`): a weight is a share of the tokens, and a stream's state is its
row count and its sources' packing states. Evaluation keeps the sources apart
(`MixtureEvalBatches`).

A `distilled:<dir>` source (prompts and a model's greedy continuations, for BiTA) is not
packed: each sequence becomes one right-padded row, cut at `seq_len`, and the batch gains
`loss_mask` (1 on the targets of the continuation, which alone carry loss).

The train iterator is a Grain `DatasetIterator`: `get_state()` is a small JSON-able dict
(per stream: document index plus the slice of the document being packed, and the layout:
batch size, seed, streams, source, ...) and `set_state()` resumes exactly, so the trainer
can checkpoint it next to the model; a position of another layout is refused. The
processes' positions together are those of all the streams, so a job resumed on another
number of processes shares them out again (`set_state_of_processes`).
"""

import concurrent.futures
import functools
import itertools
import json
import logging
import os

import grain
import numpy as np

from jaxarch.config import ConfigError, is_runs_tokenizer, reweighted, run_file_name
from jaxarch.data import sources
from jaxarch.data import tokenizers

log = logging.getLogger(__name__)

_FEATURES = ('inputs', 'targets', 'segment_ids', 'positions')
# The `data` keys that decide which documents go into which rows, with the batch size,
# seed and streams: a saved train position is a position under these values only. Not
# `bos_id`: a document is one token longer under any BOS, so its position holds; but
# `add_bos`: without a BOS it is one token shorter, and the slice of a document being
# packed that a position holds would be off by one.
LAYOUT_KEYS = ('source', 'text_key', 'tokenizer', 'seq_len', 'pack_align',
               'validation_fraction', 'add_bos')


class _Tokenize(grain.transforms.Map):
  """Document text -> `{inputs: [bos] + ids, targets: ids + [eod]}`, padded with pad_id to
  a multiple of `align` tokens (so that every document starts on a multiple of `align`).
  With no BOS (`bos` None): `{inputs: ids, targets: ids[1:] + [eod]}`, one token shorter;
  an empty document is then no tokens at all (nothing to predict the eod from), which
  `_packed_rows` leaves out. `count_bytes`: also `target_bytes`, the text's bytes of each
  target (with no BOS the first token's are no target's)."""

  def __init__(self, tokenizer, align: int, bos: int | None, count_bytes: bool = False):
    self._tokenizer = tokenizer
    self._align = align
    self._bos = bos
    self._count_bytes = count_bytes

  def map(self, text: bytes) -> dict[str, np.ndarray]:
    if self._count_bytes:
      ids, token_bytes = self._tokenizer.encode_counting_bytes(text)  # [n], [n + 1]
    else:
      ids, token_bytes = self._tokenizer.encode(text), None
    ids = np.asarray(ids, np.int32)
    eod = np.array([self._tokenizer.eod_id], np.int32)
    if self._bos is None:
      inputs, targets = ids, np.concatenate([ids, eod])[1:len(ids) + 1]
    else:
      inputs = np.concatenate([np.array([self._bos], np.int32), ids])
      targets = np.concatenate([ids, eod])
    row = {'inputs': inputs, 'targets': targets}
    if token_bytes is not None:
      row['target_bytes'] = np.asarray(token_bytes, np.int32)[-len(targets):] if len(
          targets) else np.zeros(0, np.int32)
    pad = -len(inputs) % self._align
    if pad:
      row = {k: np.concatenate([v, np.full(pad, 0 if k == 'target_bytes' else
                                           self._tokenizer.pad_id, np.int32)])
             for k, v in row.items()}
    return row


class _Finalize(grain.transforms.Map):
  """Names the packing outputs and marks padding: segment 0 (packing writes 0 after the
  last document) and, when documents are `aligned` (`data.pack_align` > 1), alignment
  padding inside a document, where input and target are both pad_id. (Not every pad_id
  input: a tokenizer without a pad token pads with its eod, which is each document's last
  target and, by default, its first input, its BOS; and an empty document is the single
  input BOS with the target eod, which is why only aligned documents, whose tokenizer must
  have a pad token, look for alignment padding. A `data.bos_id` that is the pad id is
  never padding either: its target is the document's first id or its eod. With no BOS a
  document's inputs are its text's ids (the spelling of a special token in a text is
  text), and an empty document has no tokens at all.)"""

  def __init__(self, pad_id: int, aligned: bool = True):
    self._pad_id = pad_id
    self._aligned = aligned

  def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = row['inputs_segment_ids'].astype(np.int32)
    padding = segment_ids == 0
    if self._aligned:
      padding |= (row['inputs'] == self._pad_id) & (row['targets'] == self._pad_id)
    segment_ids = np.where(padding, 0, segment_ids)
    out = {
        'inputs': np.where(padding, self._pad_id, row['inputs']).astype(np.int32),
        'targets': np.where(padding, self._pad_id, row['targets']).astype(np.int32),
        'segment_ids': segment_ids,
        'positions': row['inputs_positions'].astype(np.int32),
    }
    if 'target_bytes' in row:
      out['target_bytes'] = np.where(padding, 0, row['target_bytes']).astype(np.int32)
    return out


class _JsonStatePacking(grain.IterDataset):
  """Concat-then-split packing whose state survives JSON, as Grain's Orbax handler saves it.

  Grain 0.2.18 marks "no remainder" with the tuple (-1, -1) and compares against it with
  `!=`, so the list a JSON round trip returns reads as a remainder and restoring drops a
  document. Turning the lists back into tuples restores exactly.
  """

  def __init__(self, parent: grain.IterDataset, seq_len: int, features=('inputs', 'targets')):
    super().__init__(grain.experimental.ConcatThenSplitIterDataset(
        parent, length_struct={k: seq_len for k in features}))

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonStateIterator(self._parent.__iter__())


class _JsonStateIterator(grain.DatasetIterator):

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    slices = {k: tuple(v) for k, v in state['remainder_slices'].items()}
    self._parent.set_state(dict(state, remainder_slices=slices))


def tokenize(data_cfg, tokenizer, count_bytes: bool = False) -> _Tokenize:
  """The map from a document's text to the tokens it packs into rows (`_Tokenize`): its
  BOS (`data.bos_id`, `data.add_bos`) and eod, padded to `data.pack_align`."""
  return _Tokenize(tokenizer, data_cfg.get('pack_align', 1),
                   tokenizers.bos_id(data_cfg, tokenizer), count_bytes)


def _packed_rows(docs: grain.MapDataset, tokenizer, data_cfg, read_threads: int = 0,
                 count_bytes: bool = False) -> grain.IterDataset:
  """Rows of `data.seq_len` tokens; with `data.pack_align = n` every document starts at a
  multiple of n (MEGABYTE: on a patch boundary), the gaps being padding. `read_threads`
  read and tokenize the next documents in order (0: where the row is made).
  `count_bytes`: rows with `target_bytes` too (evaluation's)."""
  align = data_cfg.get('pack_align', 1)
  if align > 1 and tokenizer.pad_id == tokenizer.eod_id:
    raise ConfigError(f'config error: data.pack_align={align} needs a tokenizer whose pad id '
                      f'differs from its eod id; data.tokenizer={data_cfg.tokenizer!r} pads '
                      'with eod')
  # Training's streams are read and tokenized where the row is made (`_ZipStreams`'
  # threads), evaluation's one stream in read threads; the iterator state stays a document
  # index.
  ds = docs.map(tokenize(data_cfg, tokenizer, count_bytes)).to_iter_dataset(
      _reading(read_threads))
  if tokenizers.bos_id(data_cfg, tokenizer) is None:
    # An empty document is no tokens: packing would skip a segment id for it.
    ds = ds.filter(lambda doc: len(doc['inputs']) > 0)
  features = ('inputs', 'targets', 'target_bytes') if count_bytes else ('inputs', 'targets')
  return _JsonStatePacking(ds, data_cfg.seq_len, features).map(
      _Finalize(tokenizer.pad_id, align > 1))


class _SequenceRow(grain.transforms.Map):
  """A distilled record -> one row of `seq_len`: a single segment, right-padded, with
  `loss_mask` on the continuation's targets."""

  def __init__(self, seq_len: int, pad_id: int):
    self._seq_len = seq_len
    self._pad_id = pad_id

  def map(self, record) -> dict[str, np.ndarray]:
    tokens = np.asarray(record['tokens'], np.int32)[:self._seq_len + 1]
    n = len(tokens) - 1
    row = _padding_rows(1, self._seq_len, self._pad_id)
    row = {k: v[0] for k, v in row.items()}
    row['inputs'][:n], row['targets'][:n] = tokens[:-1], tokens[1:]
    row['segment_ids'][:n] = 1
    row['positions'][:n] = np.arange(n)
    row['loss_mask'] = np.zeros(self._seq_len, np.int32)
    row['loss_mask'][max(int(record['prompt_length']) - 1, 0):n] = 1
    return row


def _reading(threads: int) -> grain.ReadOptions:
  """`threads` read ahead, 4 items each (0: read where asked). Never grain's default, 16
  threads and 500 items ahead per dataset: one per packing stream, that was 1,024 threads
  for a batch of 64 distilled rows (and 15 s to the first batch of 8 on 2 cores)."""
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads)


def _sequence_rows(data_cfg, split: str):
  """A distilled split's sequences, and the map that makes each one a row."""
  tokenizer = tokenizers.get_tokenizer(data_cfg.tokenizer)
  sequences = grain.MapDataset.source(sources.open_sequences(data_cfg, split))
  return sequences, _SequenceRow(data_cfg.seq_len, tokenizer.pad_id)


class _Unzip(grain.experimental.FlatMapTransform):
  """One row from each stream -> the rows one by one."""

  def __init__(self, num_streams: int):
    self.max_fan_out = num_streams

  def flat_map(self, rows):
    return rows


def cpu_cores() -> int:
  """The CPU cores this process may run on (a SLURM or container limit, not the host's)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def tokenizes_in_threads(data_cfg) -> bool:
  """Whether `data.num_threads` speed up reading this data: HF tokenizers and SentencePiece
  release the GIL while they work. Bytes are split in Python, holding it (2 threads on 2
  cores read 8.3M tokens/s, none 10.1M; benchmarks/data_pipeline.py), and distilled
  sequences are not tokenized at all."""
  return data_cfg.tokenizer != 'bytes' and not data_cfg.source.startswith(sources.DISTILLED)


def _read_threads(data_cfg, num_threads: int) -> int:
  """The threads to read `data_cfg`'s documents with: `num_threads`, at most the cores."""
  return min(num_threads, cpu_cores()) if tokenizes_in_threads(data_cfg) else 0


def _local_batch_size(batch_size: int, process_count: int, key: str) -> int:
  if batch_size % process_count:
    raise ConfigError(f'config error: {key}={batch_size} must be divisible by the number of '
                     f'processes ({process_count})')
  return batch_size // process_count


def _process_streams(num_streams: int, process_index: int, process_count: int) -> range:
  """The streams this process reads: its contiguous share of all of them."""
  if num_streams % process_count:
    raise ConfigError(f'config error: {num_streams} packing streams cannot be shared out '
                      f'evenly over {process_count} processes')
  share = num_streams // process_count
  return range(process_index * share, (process_index + 1) * share)


class _ZipStreams(grain.IterDataset):
  """One row from each stream, as `ZipIterDataset` gives them and with its state (the list
  of the stream states), the streams' next rows made by `num_threads` threads at once
  (0 or 1: one stream after another, in the calling thread). Making a row tokenizes documents,
  which HF tokenizers and SentencePiece do with the GIL released, so the threads multiply
  a host's tokens/s where one core alone would starve a GPU. The rows are the same
  whatever the number of threads."""

  def __init__(self, streams: list[grain.IterDataset], num_threads: int):
    super().__init__(streams)
    self._num_threads = min(num_threads, len(streams))

  def __iter__(self) -> grain.DatasetIterator:
    return _ZipStreamsIterator([s.__iter__() for s in self._parents], self._num_threads)


class _ZipStreamsIterator(grain.DatasetIterator):

  def __init__(self, streams: list[grain.DatasetIterator], num_threads: int):
    super().__init__(streams)
    # One thread would only hand the rows over from the prefetch thread to itself.
    self._pool = (concurrent.futures.ThreadPoolExecutor(num_threads, 'jaxarch-data')
                  if num_threads > 1 else None)

  def __next__(self) -> tuple:
    if self._pool is None:
      return tuple([next(s) for s in self._parents])
    rows = [self._pool.submit(next, s) for s in self._parents]
    return tuple([row.result() for row in rows])  # (a list: StopIteration passes through)

  def get_state(self):
    return {'parents': [s.get_state() for s in self._parents]}

  def set_state(self, state):
    for stream, place in zip(self._parents, state['parents']):
      stream.set_state(place)

  def close(self):
    if self._pool is not None:
      self._pool.shutdown(cancel_futures=True)
    super().close()


def _zip_rows(streams: list[grain.IterDataset], num_threads: int = 0) -> grain.IterDataset:
  """Rows from the streams in turn (the state is just the list of the stream states)."""
  return grain.experimental.FlatMapIterDataset(_ZipStreams(streams, num_threads),
                                               _Unzip(len(streams)))


def _warn_if_fewer_than_streams(data_cfg, count: int, num_streams: int, what: str):
  if count < num_streams:
    log.warning('data.source=%r has %d training %s for %d packing streams (one per row of '
                'the global batch): streams start on the same %s, so rows of a batch '
                'repeat each other%s', data_cfg.source, count, what, num_streams, what,
                f'; a file over {sources.DOCUMENT_BYTES} bytes is read as several documents'
                if what == 'documents' else '')


def make_train_dataset(data_cfg, *, seed: int, global_batch_size: int,
                       process_index: int = 0, process_count: int = 1,
                       packing_streams: int | None = None, num_threads: int = 0,
                       prefetch: int = 2, run_dir=None) -> grain.IterDataset:
  """Endless packed training batches of this process; each epoch is a new seeded shuffle.

  There are `packing_streams` streams in all (default: one per row of the global batch),
  and process `p` of `P` reads streams `p·S/P … (p+1)·S/P − 1` only. So each process
  reads its own documents, and with the default the global batch (the processes' rows in
  process order) is the same batch that one process would read: a run gives the same
  losses on any number of processes. `num_threads` make the streams' rows in parallel,
  reading and tokenizing their documents (0 or 1: one stream after another in the prefetch
  thread, as always with the byte tokenizer and distilled sequences, which hold the GIL);
  the batches are the same for any number.
  `prefetch` batches are prepared ahead in a background thread. `run_dir`: the run that
  saves the positions, whose own files (its tokenizer) the layout names relative to it,
  so that a position holds in the run moved or copied. Close the iterator when done with
  it (`it.close()`): one left open at exit aborts the interpreter (Grain's read threads).
  """
  local_batch = _local_batch_size(global_batch_size, process_count, 'train.batch_size')
  num_streams = global_batch_size if packing_streams is None else packing_streams
  if num_streams < 1:
    raise ValueError(f'packing_streams={packing_streams} must be positive')
  mine = _process_streams(num_streams, process_index, process_count)
  if data_cfg.source.startswith(sources.DISTILLED):
    sequences, to_row = _sequence_rows(data_cfg, 'train')
    if not len(sequences):  # pylint: disable=g-explicit-length-test
      raise ConfigError(f'config error: data.source={data_cfg.source!r} has no training '
                        'sequences')
    num_documents = len(sequences)
    _warn_if_fewer_than_streams(data_cfg, num_documents, num_streams, 'sequences')
    sequences = sequences.shuffle(seed=seed % 2**32).repeat()
    rows = _zip_rows([sequences[i::num_streams].map(to_row).to_iter_dataset(_reading(0))
                      for i in mine])
  else:
    tokenizer = tokenizers.get_tokenizer(data_cfg.tokenizer)
    parts = [(c, cfg) for c, cfg in sources.mixture_configs(data_cfg) if c.weight > 0]
    # Each source's documents, shuffled and endlessly repeated (its own seed in a mixture;
    # a mixture's sources of weight 0 are evaluated only, and one trained source reads as
    # that source alone, so that adding eval sets to a run keeps its batches).
    if not parts:
      raise ConfigError(f'config error: data.source={data_cfg.source!r} trains on none of '
                        'its sources: give one a weight above 0 (a weight of 0 evaluates a '
                        'source only)')
    num_documents, docs = map(list, zip(*[_train_documents(*part, seed + k, num_streams)
                                          for k, part in enumerate(parts)]))
    packed = lambda d, i: _packed_rows(d[i::num_streams], tokenizer, data_cfg)
    if len(parts) == 1:
      num_documents, = num_documents  # pylint: disable=unbalanced-tuple-unpacking
      streams = [packed(docs[0], i) for i in mine]
    else:
      weights = [component.weight for component, _ in parts]
      streams = [_MixedRows([packed(d, i) for d in docs], weights, i, num_streams, seed)
                 for i in mine]
    rows = _zip_rows(streams, _read_threads(data_cfg, num_threads))
  batches = rows.batch(local_batch, drop_remainder=True)
  # A background thread prepares the next batches while the device runs a step; the state
  # it reports is still that of the last batch handed out.
  batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
  # The documents' count: a corpus that gained or lost files is shuffled into another order.
  layout = {**{k: data_cfg.get(k) for k in LAYOUT_KEYS}, 'batch_size': global_batch_size,
            'seed': seed, 'streams': num_streams, 'documents': num_documents}
  # This process's streams read at the pace of all of them: they stand for the whole.
  documents_per_epoch = (np.asarray(num_documents) * len(mine) / num_streams).tolist()
  return _WithLayout(batches, _in_run(layout, run_dir), documents_per_epoch, mine, run_dir)


def _train_documents(component, data_cfg, seed: int,
                     num_streams: int) -> tuple[int, grain.MapDataset]:
  """The number of training documents of one source, and the documents shuffled and
  endlessly repeated.

  Repeat reseeds the shuffle each epoch; slicing the endless sequence (not the epoch)
  keeps every stream endless. Each stream reads its share of every epoch once, at the
  pace of its documents' lengths: at a given step some streams are further on than
  others, so an epoch's worth of tokens holds some documents of the next epoch and misses
  some of this one (with one stream, `packing_streams=1`, none)."""
  docs = grain.MapDataset.source(sources.open_component(component, data_cfg, 'train'))
  if not len(docs):  # pylint: disable=g-explicit-length-test
    held = data_cfg.get('validation_fraction', 0)
    raise ConfigError(f'config error: data.source={data_cfg.source!r} has no training '
                      'documents' + (f' (data.validation_fraction={held} holds them out: it '
                                     'makes an eval set; train with a lower one)'
                                     if held > sources.EVAL_SET_FRACTION else ''))
  _warn_if_fewer_than_streams(data_cfg, len(docs), num_streams, 'documents')
  return len(docs), docs.shuffle(seed=seed % 2**32).repeat()


# The mixture's pick of global row g is the Weyl sequence frac(g / golden ratio): any run
# of n rows holds each source's share of them to within O(log n) rows, so every batch has
# about its share of each source, and no source comes in bursts.
_WEYL = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd


def mixture_pick(row: int, cumulative_weights, seed: int) -> int:
  """The source of global row `row` (`t · streams + stream` for a stream's row t: with
  the default stream per batch row, `step · rows per batch + row in the batch`):
  `cumulative_weights` are the sources' shares summed, the last 1."""
  u = ((row + seed) * _WEYL % 2**64) / 2**64
  return min(int(np.searchsorted(cumulative_weights, u, side='right')),
             len(cumulative_weights) - 1)


class _MixedRows(grain.IterDataset):
  """Packing stream `stream` of `num_streams` over a mixture: each source packs its own
  rows (its documents `stream, stream + S, ...`), and the stream's row t is the next row
  of the source `mixture_pick` gives global row t·S + stream. Whole rows are mixed, so
  the weights are shares of the training tokens, whatever the sources' document lengths,
  and the global batches do not depend on the number of processes. The state is the row
  count and the sources' packing states."""

  def __init__(self, sources_rows: list[grain.IterDataset], weights: list[float],
               stream: int, num_streams: int, seed: int):
    super().__init__(sources_rows)
    self._cumulative = np.cumsum(weights) / sum(weights)
    self._stream, self._num_streams, self._seed = stream, num_streams, seed

  def __iter__(self) -> grain.DatasetIterator:
    return _MixedRowsIterator([p.__iter__() for p in self._parents], self._cumulative,
                              self._stream, self._num_streams, self._seed)


class _MixedRowsIterator(grain.DatasetIterator):
  """The state holds the weights each row was picked by, as (first row, cumulative
  weights) pairs: a position saved under other weights of the same sources goes on with
  the new ones from the first row it had not made (`config.reweighted`). Restoring
  remakes the rows of the last zip of the streams (`_zip_rows`'s flat map); they are
  picked by the weights they were made with, so no source skips a row."""

  def __init__(self, sources_rows: list[grain.DatasetIterator], cumulative, stream: int,
               num_streams: int, seed: int):
    super().__init__(sources_rows)
    self._cumulative = cumulative
    self._weights = [(0, cumulative)]  # (first row, cumulative weights), in row order
    self._stream, self._num_streams, self._seed = stream, num_streams, seed
    self._row = 0  # rows handed out

  def __next__(self):
    cumulative = next(c for first, c in reversed(self._weights) if first <= self._row)
    source = mixture_pick(self._row * self._num_streams + self._stream, cumulative,
                          self._seed)
    row = next(self._parents[source])
    self._row += 1
    return row

  def get_state(self):
    return {'row': self._row, 'sources': [p.get_state() for p in self._parents],
            'weights': [[first, c.tolist()] for first, c in self._weights]}

  def set_state(self, state):
    self._row = state['row']
    for parent, place in zip(self._parents, state['sources']):
      parent.set_state(place)
    self._weights = [(first, np.asarray(c)) for first, c in state['weights']]
    if not np.array_equal(self._weights[-1][1], self._cumulative):
      self._weights.append((self._row + 1, self._cumulative))


def _in_run(layout: dict, run_dir) -> dict:
  """`layout` with the run's own files named as its config.json names them (relative to
  `run_dir`): positions saved before, with the file's path, compare equal too."""
  if run_dir is None or 'tokenizer' not in layout:
    return layout
  return {**layout, 'tokenizer': run_file_name(layout['tokenizer'], run_dir)}


class _WithLayout(grain.IterDataset):
  """Batches whose saved position names the layout it is a position in (`_LayoutIterator`)."""

  def __init__(self, parent: grain.IterDataset, layout: dict,
               documents_per_epoch: float | list[float], streams: range, run_dir=None):
    super().__init__(parent)
    self._layout = layout
    self._documents_per_epoch = documents_per_epoch
    self._streams = streams
    self._run_dir = run_dir

  def __iter__(self) -> grain.DatasetIterator:
    return _LayoutIterator(self._parent.__iter__(), self._layout, self._documents_per_epoch,
                           self._streams, self._run_dir)


def _documents_started(position) -> int:
  """The documents the streams of a saved position have taken up: the sum of the
  `next_index` of each stream's document reader (the only indices in the position)."""
  if isinstance(position, dict):
    return sum(v if k == 'next_index' else _documents_started(v) for k, v in position.items())
  if isinstance(position, (list, tuple)):
    return sum(_documents_started(v) for v in position)
  return 0


class _LayoutIterator(grain.DatasetIterator):
  """A saved data position means other documents under another layout (batch size, seed,
  streams, source, number of documents, ...): restored into a different one it would
  repeat or skip documents silently, so such a position is refused with a warning and
  reading starts afresh."""

  def __init__(self, parent: grain.DatasetIterator, layout: dict,
               documents_per_epoch: float | list[float], streams: range, run_dir=None):
    super().__init__(parent)
    self._layout = layout
    self._documents_per_epoch = documents_per_epoch
    self._streams = streams  # the streams this process reads, of all `layout['streams']`
    self._run_dir = run_dir

  def __next__(self):
    return next(self._parent)

  def epoch(self) -> float:
    """Epochs of the training documents read so far (0.5: half of them), as the position
    counts them: it lags the batches by the few documents per stream the packing holds.
    Of a mixture, those of the source read furthest (the first to repeat documents)."""
    position = self._parent.get_state()
    if not isinstance(self._documents_per_epoch, list):
      return _documents_started(position) / self._documents_per_epoch
    streams = position['parent']['parents']  # `_MixedRows` states (see `_zip_rows`)
    return max(sum(_documents_started(s['sources'][k]) for s in streams) / documents
               for k, documents in enumerate(self._documents_per_epoch))

  def get_state(self):
    return {'layout': self._layout, 'streams': [self._streams.start, self._streams.stop],
            'position': self._parent.get_state()}

  def set_state(self, state):
    if 'layout' not in state:  # saved before positions named their layout
      self._parent.set_state(state)
      return
    saved = _in_run(state['layout'], self._run_dir)
    changed = [f'{k} {saved[k]} -> {v}' for k, v in self._layout.items()
               if k in saved and saved[k] != v]  # (keys added since are not compared)
    source = [c for c in changed if c.startswith('source ')]
    key = self._layout.get('text_key')
    if reweighted(saved.get('source'), self._layout['source'], saved.get('text_key', key),
                  key):
      if source:
        log.info('data.source trains on the same sources (%s): each goes on from its saved '
                 'position', source[0][len('source '):])
      changed = [c for c in changed if not c.startswith(('source ', 'text_key '))]
    if self._run_dir is not None and is_runs_tokenizer(self._layout['tokenizer'],
                                                       self._run_dir):
      changed = [c for c in changed if not c.startswith('tokenizer ')]  # a copy of it
    if changed:
      log.warning('the saved data position is of another data layout (%s): the data start '
                  'afresh', ', '.join(changed))
      return
    self._parent.set_state(state['position'])

  def reads_streams_of(self, state: dict) -> bool:
    """Whether `state` was saved by a process that read this one's streams (so far as it
    says: saved before 2026-12-04, it does not)."""
    mine = [self._streams.start, self._streams.stop]
    return list(state.get('streams', mine)) == mine

  def set_state_of_processes(self, states: list[dict]):
    """Resumes from the positions that another number of processes saved (`states`, in
    process order). Each saved the places of the streams it read (`streams`: their
    range); together they are the places of all the streams, and this process takes its
    own share of them. With one stream per row of the global batch (the default) the
    global batches then go on exactly as on the old process count. Raises ValueError
    saying why when the positions do not add up."""
    layouts = {json.dumps(s.get('layout'), sort_keys=True) for s in states}
    if len(layouts) != 1 or 'layout' not in states[0]:
      raise ValueError('the processes saved positions of different or unnamed layouts')
    places, taken, start = {}, set(), 0
    for state in states:
      try:  # a FlatMap's state over the zip of the streams (`_zip_rows`), through the
        # batching and the prefetch, which keep their parent's state
        own, consumed = state['position']['parent']['parents'], state['position'][
            'next_index_in_buffer']
      except (KeyError, TypeError):
        raise ValueError('a saved position is not one of packing streams') from None
      # Processes that read the same streams (a mesh axis that does not split the batch
      # spans processes) saved the same places; saved before 2026-12-04: in process order.
      first = state.get('streams', (start, start + len(own)))[0]
      places.update({first + i: place for i, place in enumerate(own)})
      start = first + len(own)
      taken.add('none' if consumed == 0 else 'all' if consumed == len(own) else 'some')
    num_streams = states[0]['layout']['streams']
    if sorted(places) != list(range(num_streams)):
      raise ValueError(f'the positions hold streams {sorted(places)[:8]}..., not the '
                       f'{num_streams} of their layout')
    if len(taken) != 1 or 'some' in taken:
      raise ValueError('a batch ended inside a round of the streams (the streams are not '
                       'the rows of the batch), so some rows read are not in the positions')
    if num_streams != self._layout['streams']:  # set_state says which layout key changed
      self.set_state(states[0])
      return
    mine = [places[i] for i in self._streams]
    self.set_state({'layout': states[0]['layout'], 'position': {
        'parent': {'parents': mine},
        'next_index_in_buffer': len(mine) if taken == {'all'} else 0}})


def _padding_rows(num_rows: int, seq_len: int, pad_id: int,
                  features=_FEATURES) -> dict[str, np.ndarray]:
  """Rows with no document: pad_id tokens in segment 0 (and no `loss_mask`)."""
  def fill(key):
    value = pad_id if key in ('inputs', 'targets') else 0
    return np.full((num_rows, seq_len), value, np.int32)
  return {k: fill(k) for k in features}


def _pad_batch(rows, *, batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
  """Stacks rows and fills the batch up to `batch_size` with padding rows."""
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  if len(rows) == batch_size:
    return batch
  padding = _padding_rows(batch_size - len(rows), batch['inputs'].shape[1], pad_id,
                          tuple(batch))
  return {k: np.concatenate([v, padding[k]]) for k, v in batch.items()}


class EvalBatches:
  """At most `num_batches` validation batches, the same ones on every pass.

  Every process reads the same global batches and keeps its own rows of each, so all
  processes run the same number of eval steps and the totals equal one process's.
  """

  def __init__(self, batches: grain.IterDataset, num_batches: int, rows: slice):
    self._batches = batches
    self.num_batches = num_batches
    self._rows = rows
    self.read = 0  # batches the last pass gave: fewer than num_batches where the data ended

  def __iter__(self):
    batches = iter(self._batches)
    self.read = 0
    try:
      for batch in itertools.islice(batches, self.num_batches):
        self.read += 1
        yield {k: v[self._rows] for k, v in batch.items()}
    finally:  # its read threads, when it has some
      batches.close()


def make_eval_dataset(data_cfg, *, batch_size: int, num_batches: int,
                      process_index: int = 0, process_count: int = 1,
                      num_threads: int = 0) -> 'EvalBatches | MixtureEvalBatches':
  """Validation batches in stored order, packed like training, with each target's bytes of
  text (`target_bytes`); the last may end in padding. A mixture's are each source's
  (`MixtureEvalBatches`), `num_batches` of each. `num_threads` (at most the CPU cores
  here; none with the byte tokenizer, which holds the GIL) tokenize the next documents
  while a batch is packed: the same batches."""
  local_batch = _local_batch_size(batch_size, process_count, 'eval batch size')
  tokenizer = tokenizers.get_tokenizer(data_cfg.tokenizer)
  mine = slice(process_index * local_batch, (process_index + 1) * local_batch)
  batched = lambda rows: EvalBatches(rows.batch(batch_size, batch_fn=functools.partial(
      _pad_batch, batch_size=batch_size, pad_id=tokenizer.pad_id)), num_batches, mine)
  if data_cfg.source.startswith(sources.DISTILLED):
    sequences, to_row = _sequence_rows(data_cfg, 'validation')
    return batched(sequences.map(to_row).to_iter_dataset(_reading(0)))
  configs, parts = sources.mixture_configs(data_cfg), {}
  for component, cfg in configs:
    docs = grain.MapDataset.source(sources.open_component(component, cfg, 'validation'))
    parts[component.name] = (component.weight, batched(_packed_rows(
        docs, tokenizer, data_cfg, _read_threads(data_cfg, num_threads), count_bytes=True)))
    if len(configs) > 1 and not len(docs):  # pylint: disable=g-explicit-length-test
      warn_no_validation(component)
  if len(parts) == 1:
    return next(iter(parts.values()))[1]
  return MixtureEvalBatches({name: b for name, (_, b) in parts.items()},
                            {name: w for name, (w, _) in parts.items()})


@functools.cache  # once, not for every evaluation
def warn_no_validation(component) -> None:
  """Says that a source of `sources.mixture_configs` (a mixture's, or the one source) has
  no validation documents, and what would give it some."""
  name = f'data.source component {component.name!r} ' if component.name else 'data.source '
  log.warning('%s(%s) has no validation documents, so it is not evaluated%s; raise '
              'data.validation_fraction to evaluate it (all sources share it: their splits '
              'move too)', name, component.source,
              " (the mixture's eval_loss leaves it out)"
              if component.name and component.weight > 0 else '')


class MixtureEvalBatches:
  """The eval batches of each source of a mixture (`components`: name -> `EvalBatches`)
  and the sources' `weights` (name -> share of the training tokens), which weigh each
  source's loss in the mixture's (`train.step.summarize_mixture_eval`). Iterating it
  gives all the batches, source after source."""

  def __init__(self, components: dict[str, EvalBatches], weights: dict[str, float]):
    self.components = components
    self.weights = weights

  def __iter__(self):
    return itertools.chain.from_iterable(self.components.values())


def synthetic_batch(batch_size: int, seq_len: int, vocab: int, seed: int) -> dict:
  """Random byte tokens, one document per row, in the batch format above: what the
  throughput benchmark and the memory plan feed the train step."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, min(vocab, 256), (batch_size, seq_len + 1), dtype=np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'segment_ids': np.ones((batch_size, seq_len), np.int32),
          'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                       (batch_size, seq_len)).copy()}
