"""Grain pipeline: documents -> tokens -> rows of `seq_len` packed with segment ids -> batches.

Each document becomes `inputs = [eod] + ids` and `targets = ids + [eod]`: the leading eod
acts as BOS, and the last target of a document is its eod, so no target ever belongs to
another document. Concat-then-split packing fills every row completely; a document longer
than a row continues in the next one instead of being cut off. A batch is a dict of int32
arrays `[local_batch, seq_len]`:

  inputs, targets   token ids; pad_id where segment_ids == 0
  segment_ids       1, 2, ... for the document pieces of a row; 0 for padding
  positions         0-based position within each piece, restarting at every segment

The train iterator is a Grain `DatasetIterator`: `get_state()` is a small JSON-able dict
(document index plus the slice of the document being packed) and `set_state()` resumes
exactly, so the trainer can checkpoint it next to the model.
"""

import functools
import itertools

import grain
import numpy as np

from jaxarch.data import sources
from jaxarch.data import tokenizers

_FEATURES = ('inputs', 'targets', 'segment_ids', 'positions')


class _Tokenize(grain.transforms.Map):
  """Document text -> `{inputs: [eod] + ids, targets: ids + [eod]}`."""

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer

  def map(self, text: str) -> dict[str, np.ndarray]:
    ids = np.asarray(self._tokenizer.encode(text), np.int32)
    eod = np.array([self._tokenizer.eod_id], np.int32)
    return {'inputs': np.concatenate([eod, ids]), 'targets': np.concatenate([ids, eod])}


class _Finalize(grain.transforms.Map):
  """Names the packing outputs and writes pad_id where no document is (packing writes 0)."""

  def __init__(self, pad_id: int):
    self._pad_id = pad_id

  def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = row['inputs_segment_ids'].astype(np.int32)
    padding = segment_ids == 0
    return {
        'inputs': np.where(padding, self._pad_id, row['inputs']).astype(np.int32),
        'targets': np.where(padding, self._pad_id, row['targets']).astype(np.int32),
        'segment_ids': segment_ids,
        'positions': row['inputs_positions'].astype(np.int32),
    }


class _JsonStatePacking(grain.IterDataset):
  """Concat-then-split packing whose state survives JSON, as Grain's Orbax handler saves it.

  Grain 0.2.18 marks "no remainder" with the tuple (-1, -1) and compares against it with
  `!=`, so the list a JSON round trip returns reads as a remainder and restoring drops a
  document. Turning the lists back into tuples restores exactly.
  """

  def __init__(self, parent: grain.IterDataset, seq_len: int):
    super().__init__(grain.experimental.ConcatThenSplitIterDataset(
        parent, length_struct={'inputs': seq_len, 'targets': seq_len}))

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


def _packed_rows(docs: grain.MapDataset, tokenizer, seq_len: int,
                 num_threads: int) -> grain.IterDataset:
  # Tokenizing runs in the read threads; the iterator state stays a document index.
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * num_threads)
  ds = docs.map(_Tokenize(tokenizer)).to_iter_dataset(read)
  return _JsonStatePacking(ds, seq_len).map(_Finalize(tokenizer.pad_id))


def _local_batch_size(batch_size: int, process_count: int, key: str) -> int:
  if batch_size % process_count:
    raise ValueError(f'config error: {key}={batch_size} must be divisible by the number of '
                     f'processes ({process_count})')
  return batch_size // process_count


def _documents(data_cfg, split: str, process_index: int,
               process_count: int) -> grain.MapDataset:
  """This process's shard of the split's documents: every `process_count`-th one."""
  source = sources.open_source(data_cfg, split)
  return grain.MapDataset.source(source)[process_index::process_count]


def make_train_dataset(data_cfg, *, seed: int, global_batch_size: int,
                       process_index: int = 0, process_count: int = 1,
                       num_threads: int = 0, prefetch: int = 2) -> grain.IterDataset:
  """Endless packed training batches; each epoch is a new seeded shuffle of the documents.

  `num_threads` read and tokenize documents in parallel (0: inline, enough for local
  array_record files); `prefetch` batches are prepared ahead in a background thread.
  """
  local_batch = _local_batch_size(global_batch_size, process_count, 'train.batch_size')
  tokenizer = tokenizers.get_tokenizer(data_cfg.tokenizer)
  docs = _documents(data_cfg, 'train', process_index, process_count)
  if not len(docs):  # pylint: disable=g-explicit-length-test
    raise ValueError(f'config error: data.source={data_cfg.source!r} has no training '
                     f'documents for process {process_index} of {process_count}')
  window = data_cfg.get('shuffle_buffer_docs', 0)
  if window:  # Local shuffle, for corpora too large to read in random order.
    docs = grain.experimental.WindowShuffleMapDataset(docs, window_size=window,
                                                      seed=seed % 2**32)
  else:
    docs = docs.shuffle(seed=seed % 2**32)
  docs = docs.repeat()  # Reseeds the shuffle for each epoch.
  rows = _packed_rows(docs, tokenizer, data_cfg.seq_len, num_threads)
  batches = rows.batch(local_batch, drop_remainder=True)
  # A background thread prepares the next batches while the device runs a step; the state
  # it reports is still that of the last batch handed out.
  return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)


def _pad_batch(rows, *, batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
  """Stacks rows and fills the batch up with padding rows (pad_id tokens, segment 0)."""
  batch = {k: np.stack([r[k] for r in rows]) for k in _FEATURES}
  missing = batch_size - len(rows)
  if missing:
    fill = {'inputs': pad_id, 'targets': pad_id, 'segment_ids': 0, 'positions': 0}
    batch = {k: np.concatenate([v, np.full((missing, v.shape[1]), fill[k], np.int32)])
             for k, v in batch.items()}
  return batch


class EvalBatches:
  """At most `num_batches` validation batches, the same ones on every pass.

  With several processes every process yields exactly `num_batches` (all-padding batches
  once its shard runs out), so that no process leaves an eval step the others are in.
  """

  def __init__(self, batches: grain.IterDataset, num_batches: int, fill_batch):
    self._batches = batches
    self._num_batches = num_batches
    self._fill_batch = fill_batch

  def __iter__(self):
    count = 0
    for batch in itertools.islice(self._batches, self._num_batches):
      count += 1
      yield batch
    if self._fill_batch is not None:
      for _ in range(self._num_batches - count):
        yield {k: v.copy() for k, v in self._fill_batch.items()}


def make_eval_dataset(data_cfg, *, batch_size: int, num_batches: int,
                      process_index: int = 0, process_count: int = 1) -> EvalBatches:
  """Validation batches in file order, packed like training; the last may hold padding rows."""
  local_batch = _local_batch_size(batch_size, process_count, 'eval batch size')
  tokenizer = tokenizers.get_tokenizer(data_cfg.tokenizer)
  docs = _documents(data_cfg, 'validation', process_index, process_count)
  rows = _packed_rows(docs, tokenizer, data_cfg.seq_len, num_threads=0)
  batches = rows.batch(local_batch, batch_fn=functools.partial(
      _pad_batch, batch_size=local_batch, pad_id=tokenizer.pad_id))
  fill_batch = None
  if process_count > 1:
    empty = {'inputs': np.full(data_cfg.seq_len, tokenizer.pad_id, np.int32),
             'targets': np.full(data_cfg.seq_len, tokenizer.pad_id, np.int32),
             'segment_ids': np.zeros(data_cfg.seq_len, np.int32),
             'positions': np.zeros(data_cfg.seq_len, np.int32)}
    fill_batch = _pad_batch([empty], batch_size=local_batch, pad_id=tokenizer.pad_id)
  return EvalBatches(batches, num_batches, fill_batch)
