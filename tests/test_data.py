"""Tests of the data package: tokenizer, TFDS sources and cache, Grain packing pipeline."""

import errno
import functools
import gzip
import importlib.util
import io
import itertools
import json
import logging
import os
import pathlib
import platform
import re
import subprocess
import sys
import sysconfig
import threading
import time
import types

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxarch import data
from jaxarch.config import ConfigError
from jaxarch.data import pipeline
from jaxarch.data import sources
from jaxarch.data import tokenizers

ROOT = pathlib.Path(__file__).resolve().parents[1]
EOD = data.ByteTokenizer.eod_id
PAD = data.ByteTokenizer.pad_id


def _dense_data_config():
  spec = importlib.util.spec_from_file_location('dense_config', ROOT / 'configs' / 'dense.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config('tiny').data


def _data_config(tmp_path, source, **overrides):
  cfg = _dense_data_config()
  cfg.source = source
  cfg.data_dir = str(tmp_path / 'data')
  cfg.seq_len = 16
  cfg.validation_fraction = 0.25
  cfg.update(overrides)
  return cfg


def _write_corpus(directory, num_docs=40, max_len=70, seed=0):
  """Distinct documents of 0..max_len characters, with NUL bytes and non-ASCII."""
  rng = np.random.default_rng(seed)
  alphabet = list('abc \n\x00é€')
  directory.mkdir(parents=True, exist_ok=True)
  docs = {}
  for i in range(num_docs):
    text = f'{i}:' + ''.join(rng.choice(alphabet, size=rng.integers(0, max_len)))
    (directory / f'doc_{i:02d}.txt').write_bytes(text.encode('utf-8'))
    docs[f'doc_{i:02d}.txt'] = text
  return docs


@pytest.fixture
def corpus(tmp_path):
  """A `files:` config over 40 short documents, and the documents by relative path."""
  docs = _write_corpus(tmp_path / 'corpus')
  return _data_config(tmp_path, f'files:{tmp_path}/corpus/*.txt'), docs


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _stream(batches, key):
  """The non-padding tokens of all rows, in order: packing's view of the document stream."""
  return np.concatenate([b[key][b['segment_ids'] > 0] for b in batches])


def _row_streams(batches, key):
  """`_stream` of each batch row: with one packing stream per row, each is one stream."""
  return [_stream([{k: v[r:r + 1] for k, v in b.items()} for b in batches], key)
          for r in range(len(batches[0][key]))]


def _documents(inputs):
  """Complete documents of an inputs stream `eod d1 eod d2 ...`, as text."""
  starts = np.flatnonzero(inputs == EOD)
  return [bytes(inputs[a + 1:b].astype(np.uint8)).decode('utf-8')
          for a, b in zip(starts[:-1], starts[1:])]


def _shuffled_documents(batches):
  """The packed documents in the order of the shuffled sequence they were read from.

  Row `r` packs documents `r, r + S, r + 2S, ...` of that sequence (S = rows per batch);
  the result ends where a row's next complete document is still missing.
  """
  if not batches:
    return []
  per_row = [_documents(inputs) for inputs in _row_streams(batches, 'inputs')]
  docs = []
  for j in itertools.count():
    for row in per_row:
      if j >= len(row):
        return docs
      docs.append(row[j])


def _take_documents(iterator, num_docs):
  """The first `num_docs` documents of the shuffled sequence, read from the batches."""
  batches = []
  while len(docs := _shuffled_documents(batches)) < num_docs:
    batches += _take(iterator, 8)
  return docs[:num_docs]


# Tokenizers.


def test_byte_tokenizer_roundtrips_zero_byte_and_non_ascii():
  tok = data.ByteTokenizer()
  text = 'a\x00b é€ 🙂'
  ids = tok.encode(text)
  assert ids[1] == 0 and len(ids) == len(text.encode('utf-8'))
  assert tok.decode(ids) == text
  assert tok.decode([tok.eod_id, *ids, tok.pad_id]) == text


def test_byte_lengths_count_bytes_and_not_specials():
  tok = data.get_tokenizer('bytes')
  text = 'x\x00é€'
  ids = tok.encode(text) + [tok.eod_id, tok.pad_id]
  assert tok.vocab_size == 258 and len(tok.byte_lengths) == tok.vocab_size
  assert tok.byte_lengths[ids].sum() == len(text.encode('utf-8'))
  assert tok.pad_id >= 256 and tok.eod_id >= 256
  counts_the_text(tok, text)


def counts_the_text(tokenizer, text: str):
  """`encode_counting_bytes` gives `encode`'s ids, and the text's bytes among them (and
  after the last: the text a normaliser dropped at the end), whatever the tokenizer did."""
  ids, counted = tokenizer.encode_counting_bytes(text)
  assert list(ids) == list(tokenizer.encode(text)) and len(counted) == len(ids) + 1
  assert int(counted.sum()) == len(text.encode()) and counted.min() >= 0, (text, counted)


def test_unknown_tokenizer_spec_is_config_error():
  with pytest.raises(ValueError, match=r"config error: data.tokenizer='gpt9'"):
    data.get_tokenizer('gpt9')


# Sources.


@pytest.mark.parametrize('source', ['xyz', 'files:', 'tfds:'])
def test_bad_source_spec_is_config_error(tmp_path, source):
  cfg = _data_config(tmp_path, source)
  with pytest.raises(ValueError, match=(
      rf"config error: data.source='{source}' must be 'default', 'files:<glob>', "
      r"'tfds:<name>', 'distilled:<dir>' or a mixture 'SOURCE,WEIGHT;SOURCE,WEIGHT'")):
    data.open_source(cfg, 'train')


def test_files_glob_without_matches_names_the_glob(tmp_path):
  cfg = _data_config(tmp_path, f'files:{tmp_path}/nothing/*.txt')
  with pytest.raises(ValueError, match='no files match the glob .*nothing'):
    data.open_source(cfg, 'train')
  (tmp_path / 'docs').mkdir()
  cfg = _data_config(tmp_path, f'files:{tmp_path}/docs')  # a directory, not a glob
  with pytest.raises(ValueError, match=r"use 'files:.*/docs/\*\*/\*'"):
    data.open_source(cfg, 'train')


def test_a_file_reached_twice_by_the_glob_is_read_once(tmp_path):
  (tmp_path / 'c' / 'v1').mkdir(parents=True)
  (tmp_path / 'c' / 'v1' / 'a.txt').write_text('only once')
  (tmp_path / 'c' / 'latest').symlink_to(tmp_path / 'c' / 'v1')
  source = data.open_source(_data_config(tmp_path, f'files:{tmp_path}/c/**/*.txt',
                                         validation_fraction=0.0), 'train')
  assert [source[i] for i in range(len(source))] == [b'only once']


def test_a_text_key_given_to_a_files_source_is_said_to_be_unread(corpus, caplog):
  cfg, _ = corpus
  cfg.text_key = 'body'
  sources._warn_text_key_unread.cache_clear()  # pylint: disable=protected-access
  for split in ('train', 'validation'):
    assert len(data.open_source(cfg, split))
  assert caplog.text.count("data.text_key='body' is not read") == 1


def test_unreadable_files_and_names_are_config_errors_naming_the_file(tmp_path, monkeypatch):
  (tmp_path / 'c').mkdir()
  (tmp_path / 'c' / 'a.txt').write_text('text')
  (tmp_path / 'c' / 'b.txt').write_text('text')
  cfg = _data_config(tmp_path, f'files:{tmp_path}/c/*.txt')
  real_access = sources.os.access  # root reads any file: a refused read is simulated
  monkeypatch.setattr(sources.os, 'access',
                      lambda p, mode: not str(p).endswith('b.txt') and real_access(p, mode))
  with pytest.raises(ConfigError, match=r"1 of the files cannot be read .*b\.txt"):
    data.open_source(cfg, 'train')
  monkeypatch.undo()
  (tmp_path / 'c' / os.fsdecode(b'caf\xe9.txt')).write_text('latin-1 name')
  with pytest.raises(ConfigError, match='is not UTF-8.*rename it'):
    data.open_source(cfg, 'train')


@pytest.mark.parametrize('damage', ['truncate', 'delete'])
def test_a_damaged_prepared_dataset_says_which_folder_to_delete(corpus, damage):
  cfg, _ = corpus
  source = data.open_source(cfg, 'train')
  assert source[0]
  record = next(pathlib.Path(cfg.data_dir).rglob('*-train.array_record-*'))
  if damage == 'truncate':
    record.write_bytes(record.read_bytes()[:50])
  else:
    record.unlink()
  with pytest.raises(ConfigError, match=f'cannot be read .*delete {record.parent} and '
                     'it is prepared again'):
    data.open_source(cfg, 'train')[0]


@pytest.mark.parametrize('damage', ['truncate', 'delete'])
def test_a_damaged_distilled_dataset_says_what_to_do(tmp_path, damage):
  sequences = [(np.arange(i, i + 20) % 256, 5) for i in range(12)]
  written = sources.write_distilled(tmp_path / 'distilled', {'train': sequences})
  cfg = _data_config(tmp_path, f'distilled:{tmp_path}/distilled')
  batches = iter(pipeline.make_train_dataset(cfg, seed=0, global_batch_size=4))
  assert next(batches)['loss_mask'].sum() == 4 * (16 - 4)  # targets 4..15 of each row
  batches.close()
  record = next(pathlib.Path(written).rglob('*-train.array_record-*'))
  if damage == 'truncate':
    record.write_bytes(record.read_bytes()[:50])
  else:
    record.unlink()
  batches = iter(pipeline.make_train_dataset(cfg, seed=0, global_batch_size=4))
  try:
    with pytest.raises(ConfigError, match=f'cannot be read .*damaged in {written}; delete '
                       f'{tmp_path}/distilled and distill it again'):
      next(batches)
  finally:
    batches.close()


def test_data_dir_is_config_then_env_then_user_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXARCH_DATA_DIR', str(tmp_path / 'env'))
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert data.resolve_data_dir(str(tmp_path / 'cfg')) == tmp_path / 'cfg'
  assert data.resolve_data_dir(None) == tmp_path / 'env'
  monkeypatch.delenv('JAXARCH_DATA_DIR')
  assert data.resolve_data_dir(None) == tmp_path / 'xdg' / 'jaxarch' / 'data'
  monkeypatch.delenv('XDG_CACHE_HOME')
  assert data.resolve_data_dir(None) == pathlib.Path.home() / '.cache' / 'jaxarch' / 'data'


def test_split_by_file_is_deterministic_and_disjoint(tmp_path, corpus):
  cfg, docs = corpus
  splits = {}
  for data_dir in ('a', 'b'):  # Two independent builds.
    cfg.data_dir = str(tmp_path / data_dir)
    for split in ('train', 'validation'):
      source = data.open_source(cfg, split)
      splits[data_dir, split] = sorted(source[i].decode() for i in range(len(source)))
  assert splits['a', 'train'] == splits['b', 'train']
  assert splits['a', 'validation'] == splits['b', 'validation']
  train, val = set(splits['a', 'train']), set(splits['a', 'validation'])
  assert val and not train & val and train | val == set(docs.values())
  assert val == {t for f, t in docs.items() if sources.is_validation(f, 0.25)}


def test_a_file_keeps_its_split_when_the_corpus_gains_a_folder(tmp_path):
  docs = _write_corpus(tmp_path / 'corpus' / 'wiki')
  cfg = _data_config(tmp_path, f'files:{tmp_path}/corpus/**/*.txt')

  def validation():
    source = data.open_source(cfg, 'validation')
    return {source[i].decode() for i in range(len(source))}

  before = validation()
  assert before == {t for f, t in docs.items() if sources.is_validation(f'wiki/{f}', 0.25)}
  # Under the files' common folder, which moves from corpus/wiki to corpus here, every
  # path would change, and with it the split (all 10 validation files moved).
  (tmp_path / 'corpus' / 'code').mkdir()
  (tmp_path / 'corpus' / 'code' / 'new.txt').write_text('new')
  assert validation() - {'new'} == before


def test_a_fraction_above_half_that_draws_every_document_keeps_them_for_validation(
    tmp_path, capsys):
  """A corpus of a file or two drawn all into validation trains on them; above half, the
  fraction asks for an eval set, which kept none of its documents (they were swapped into
  training, and `eval` then said to raise the fraction)."""
  lines = '\n'.join(json.dumps({'text': f'line {i}'}) for i in range(50))
  (tmp_path / 'eval.jsonl').write_text(lines + '\n')
  (tmp_path / 'one.txt').write_text('a single small file')
  assert sources.is_validation('one.txt', 0.5)  # drawn at both fractions
  for fraction, name, train, val in ((0.9999, 'eval.jsonl', 0, 50),
                                     (0.9999, 'one.txt', 0, 1), (0.5, 'one.txt', 1, 0)):
    cfg = _data_config(tmp_path, f'files:{tmp_path}/{name}', validation_fraction=fraction)
    assert [len(data.open_source(cfg, split)) for split in ('train', 'validation')] == [
        train, val], (fraction, name)
  cfg = _data_config(tmp_path, f'files:{tmp_path}/*', validation_fraction=1.0)  # all held out
  capsys.readouterr()
  assert len(data.open_source(cfg, 'validation')) == 51
  err = capsys.readouterr().err  # (TFDS's 'Downloading ... Unknown size': nothing is)
  assert f'jaxarch: preparing the documents under {tmp_path} into ' in err
  assert 'Downloading' not in err
  with pytest.raises(ConfigError, match=r'has no training documents \(data.validation_fraction'
                     r'=1.0 holds them out: it makes an eval set; train with a lower one\)'):
    next(iter(pipeline.make_train_dataset(cfg, seed=0, global_batch_size=4)))


def test_a_big_file_is_read_as_pieces_cut_after_newlines(tmp_path, monkeypatch):
  """One file of ~11 pieces: they tile it in order, start after a newline (or, in a line
  longer than the search, on a UTF-8 character), fall in both splits, and fill the rows
  of a batch with different text (read whole, every stream packed the same document)."""
  monkeypatch.setattr(sources, 'DOCUMENT_BYTES', 1000)
  monkeypatch.setattr(sources, '_NEWLINE_SEARCH', 100)
  rng = np.random.default_rng(0)
  lines = [''.join(rng.choice(list('abcdé€ '), size=rng.integers(0, 90))) for _ in range(200)]
  lines[60] = 'é' * 700  # 1400 bytes without a newline: a cut inside it
  text = ('\n'.join(lines) + '\n').encode()
  (tmp_path / 'docs').mkdir()
  (tmp_path / 'docs' / 'one.txt').write_bytes(text)
  cfg = _data_config(tmp_path, f'files:{tmp_path}/docs/one.txt')
  splits = [data.open_source(cfg, split) for split in ('train', 'validation')]
  assert all(len(s) for s in splits)
  pieces = sorted((p for s in splits for p in (s[i] for i in range(len(s)))), key=text.find)
  assert len(pieces) == sources.num_pieces(len(text)) == -(-len(text) // 1000)
  assert b''.join(pieces) == text
  starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
  for i, (piece, start) in enumerate(zip(pieces, starts)):
    piece.decode('utf-8')  # never cut inside a character
    assert i * 1000 <= start < i * 1000 + 100 and len(piece) <= 1100
    assert start == 0 or text[start - 1:start] == b'\n' or (
        'é' * 50).encode() in text[start - 100:start + 100]
  batch = next(iter(data.make_train_dataset(cfg, seed=0, global_batch_size=4)))
  assert len({bytes(row) for row in batch['inputs']}) == 4


def test_fewer_documents_than_rows_is_warned(tmp_path, caplog):
  (tmp_path / 'docs').mkdir()
  (tmp_path / 'docs' / 'small.txt').write_text('one small file\n' * 20)
  cfg = _data_config(tmp_path, f'files:{tmp_path}/docs/*.txt')
  with caplog.at_level('WARNING', logger=pipeline.__name__):
    next(iter(data.make_train_dataset(cfg, seed=0, global_batch_size=4)))
  assert '1 training documents for 4 packing streams' in caplog.text


@pytest.mark.parametrize('content, starts', [
    (b'a' * 999 + b'\n' + b'b', [0, 1000]),  # the newline just before the nominal start
    (b'a' * 1000 + b'\n', [0, 1000]),  # the last byte is never a piece's start
    (b'a' * 1010 + b'\nb', [0, 1011]),
    (b'a' * 999 + 'é'.encode() + b'a' * 200, [0, 999]),  # 0xc3 0xa9 across the cut
    # The file ends inside the character across the cut: the last piece is that character
    # (it used to start on its last byte, 0xac, which is not UTF-8).
    (b'a' * 999 + '€'.encode(), [0, 999]),
    (b'a' * 998 + '𝄞'.encode(), [0, 998]),  # four bytes, three of them past the cut
])
def test_pieces_start_after_a_newline_and_are_never_empty(monkeypatch, content, starts):
  monkeypatch.setattr(sources, 'DOCUMENT_BYTES', 1000)
  monkeypatch.setattr(sources, '_NEWLINE_SEARCH', 100)
  file = io.BytesIO(content)
  assert [sources._piece_start(file, i, len(content))  # pylint: disable=protected-access
          for i in range(sources.num_pieces(len(content)))] == starts


def test_a_byte_model_reads_files_that_are_not_utf8_as_they_are(tmp_path):
  (tmp_path / 'docs').mkdir()
  raw = {'latin1.txt': b'caf\xe9 cr\xe8me\n', 'nul.txt': b'a\x00b\xff'}
  for name, content in raw.items():
    (tmp_path / 'docs' / name).write_bytes(content)
  cfg = _data_config(tmp_path, f'files:{tmp_path}/docs/*.txt')
  read = [s[i] for split in ('train', 'validation')
          for s in [data.open_source(cfg, split)] for i in range(len(s))]
  assert sorted(read) == sorted(raw.values())
  tokenizer = data.get_tokenizer('bytes')
  assert tokenizer.encode(raw['latin1.txt']) == list(raw['latin1.txt'])  # 0xe9 is one id


def _read_all(cfg):
  """The documents of both splits, split by split."""
  return {split: [s[i] for i in range(len(s))]
          for split in ('train', 'validation') for s in [data.open_source(cfg, split)]}


@pytest.mark.parametrize('text_key', [None, 'body'])
def test_json_lines_are_a_document_a_line_of_their_text_key(tmp_path, caplog, text_key):
  # Levanter's and Dolma's corpora: read as text, they would train on the JSON syntax.
  (tmp_path / 'docs').mkdir()
  records = [{'text': f'doc {i} é', 'body': f'body {i}', 'id': i} for i in range(40)]
  lines = [json.dumps(r) for r in records]
  (tmp_path / 'docs' / 'a.jsonl').write_text('\n'.join(lines[:20]) + '\n\n')  # a blank line
  with gzip.open(tmp_path / 'docs' / 'b.jsonl.gz', 'wt') as f:
    f.write('\n'.join(lines[20:]))
  cfg = _data_config(tmp_path, f'files:{tmp_path}/docs/*', text_key=text_key)
  with caplog.at_level('WARNING'):
    read = _read_all(cfg)
  want = [r[text_key or 'text'].encode() for r in records]
  assert sorted(read['train'] + read['validation']) == sorted(want)
  assert read['train'] and read['validation']  # split by line, not by file
  assert 'is not read' not in caplog.text


def test_preparing_json_lines_parses_each_record_once(tmp_path, monkeypatch):
  """Listing a corpus's records reads their numbers, not their JSON; each split then
  parses its own (it parsed every line three times: the listing and both splits)."""
  (tmp_path / 'docs').mkdir()
  (tmp_path / 'docs' / 'a.jsonl').write_text(''.join(
      json.dumps({'text': f'record {i}'}) + '\n' for i in range(60)))
  parsed = []
  real_loads = json.loads
  def counting_loads(text, *args, **kwargs):
    if isinstance(text, bytes) and text.startswith(b'{"text": "record '):
      parsed.append(text)
    return real_loads(text, *args, **kwargs)
  monkeypatch.setattr(json, 'loads', counting_loads)
  read = _read_all(_data_config(tmp_path, f'files:{tmp_path}/docs/*'))
  assert sorted(read['train'] + read['validation']) == sorted(
      f'record {i}'.encode() for i in range(60))
  assert read['train'] and read['validation']
  assert len(parsed) == 60


@pytest.mark.parametrize('line, why', [
    ('{"txt": "a"}', r"line 2 has no key 'text' \(it has \['txt'\]\).*data.text_key"),
    ('{"text": 5}', "line 2: 'text' is an int, not a string"),
    ('{"text": "a"', 'line 2 is not JSON'),
    ('["a"]', 'line 2 is a JSON list, not an object'),
    (b'{"text": "\xff"}', 'line 2 is not JSON .*utf-8'),
])
def test_a_bad_json_line_is_one_line_naming_its_file_and_line(tmp_path, line, why):
  (tmp_path / 'docs').mkdir()
  line = line if isinstance(line, bytes) else line.encode()
  (tmp_path / 'docs' / 'x.jsonl').write_bytes(b'{"text": "ok"}\n' + line + b'\n')
  cfg = _data_config(tmp_path, f'files:{tmp_path}/docs/*')
  with pytest.raises(ConfigError, match=f"file '{tmp_path}/docs/x.jsonl', {why}") as e:
    data.open_source(cfg, 'train')
  assert '\n' not in str(e.value)
  # No empty dataset folders left behind (TFDS's), only the hidden lock file.
  assert [p.suffix for p in (tmp_path / 'data').iterdir()] == ['.lock']


def test_a_damaged_gzip_json_lines_file_is_one_line_naming_it(tmp_path):
  (tmp_path / 'docs').mkdir()
  lines = b''.join(json.dumps({'text': f'document {i}'}).encode() + b'\n' for i in range(200))
  raw = bytearray(gzip.compress(lines, mtime=0))
  raw[12] ^= 0xFF  # its Huffman table: zlib's error, neither OSError nor EOFError
  (tmp_path / 'docs' / 'x.jsonl.gz').write_bytes(bytes(raw))
  cfg = _data_config(tmp_path, f'files:{tmp_path}/docs/*')
  with pytest.raises(ConfigError, match=f"file '{tmp_path}/docs/x.jsonl.gz', line 1 cannot "
                     'be read .*decompressing'):
    data.open_source(cfg, 'train')
  # gzip's BadGzipFile is an OSError, one of no refused write: not "free space there".
  (tmp_path / 'docs' / 'x.jsonl.gz').write_bytes(b'not gzip at all')
  with pytest.raises(ConfigError, match=f"file '{tmp_path}/docs/x.jsonl.gz', line 1 cannot "
                     r'be read \(Not a gzipped file'):
    data.open_source(cfg, 'train')


@pytest.mark.parametrize('name', ['x.jsonl', 'x.txt'])
def test_a_file_unreadable_since_listed_is_its_read_error_not_a_full_data_dir(
    tmp_path, monkeypatch, name):
  """Made unreadable between the listing (which checks permissions) and its reading: the
  reader's error, not "could not be prepared in the data directory ... free space there"."""
  (tmp_path / 'docs').mkdir()
  (tmp_path / 'docs' / name).write_text(json.dumps({'text': 'some text'}) + '\n')
  (tmp_path / 'docs' / 'y.txt').write_text('another document\n' * 50)
  real_open = open
  def refusing_open(path, *args, **kwargs):
    if str(path).endswith(name):
      raise PermissionError(errno.EACCES, 'Permission denied', str(path))
    return real_open(path, *args, **kwargs)
  monkeypatch.setattr(sources, 'open', refusing_open, raising=False)
  cfg = _data_config(tmp_path, f'files:{tmp_path}/docs/*')
  with pytest.raises(ConfigError, match=f"file '{tmp_path}/docs/{name}'.* cannot be read "
                     r'.*Permission denied') as e:
    data.open_source(cfg, 'train')
  assert 'free space' not in str(e.value)


def test_a_json_lines_text_with_a_lone_surrogate_is_read(tmp_path):
  # json.dumps writes a str holding half a surrogate pair as its escape; not UTF-8 text.
  (tmp_path / 'docs').mkdir()
  (tmp_path / 'docs' / 'x.jsonl').write_text(
      json.dumps({'text': 'half \ud83d pair'}) + '\n' + json.dumps({'text': 'fine'}) + '\n')
  read = _read_all(_data_config(tmp_path, f'files:{tmp_path}/docs/*'))
  assert sorted(read['train'] + read['validation']) == [b'fine', b'half ? pair']


def test_a_file_named_as_a_record_of_another_is_refused(tmp_path):
  # Both would be the document x.jsonl:1 (TFDS: a duplicate key, then a traceback).
  (tmp_path / 'docs').mkdir()
  (tmp_path / 'docs' / 'x.jsonl').write_text(json.dumps({'text': 'a'}) + '\n')
  (tmp_path / 'docs' / 'x.jsonl:1').write_text('b')
  cfg = _data_config(tmp_path, f'files:{tmp_path}/docs/*')
  with pytest.raises(ConfigError, match="the records of 'x.jsonl' are named .*the file "
                     'x.jsonl:1 has one of those names'):
    data.open_source(cfg, 'train')
  # A big file of records is read by record, not cut into pieces: x.jsonl#0 is no piece.
  (tmp_path / 'docs' / 'x.jsonl:1').unlink()
  (tmp_path / 'docs' / 'x.jsonl').write_text(''.join(  # over DOCUMENT_BYTES
      json.dumps({'text': f'{i} ' + 'a' * 1000}) + '\n' for i in range(1100)))
  (tmp_path / 'docs' / 'x.jsonl#0').write_text('b')
  read = _read_all(cfg)
  assert len(read['train'] + read['validation']) == 1101


def test_parquet_and_arrow_files_are_a_document_a_row_of_their_text_column(tmp_path, caplog,
                                                                           monkeypatch):
  # Hugging Face datasets' files (FineWeb's): read as text, they trained on Parquet's bytes.
  pq = pytest.importorskip('pyarrow.parquet')
  import pyarrow  # pylint: disable=g-import-not-at-top
  read_columns, iter_batches = [], pq.ParquetFile.iter_batches
  monkeypatch.setattr(pq.ParquetFile, 'iter_batches', lambda self, *a, **kw: (
      read_columns.append(kw['columns']) or iter_batches(self, *a, **kw)))
  (tmp_path / 'docs').mkdir()
  texts = [f'row {i} é' * (i % 3 + 1) for i in range(50)]
  table = pyarrow.table({'id': list(range(50)), 'content': texts})
  pq.write_table(table.slice(0, 30), tmp_path / 'docs' / 'a.parquet', row_group_size=7)
  pq.write_table(table.slice(30, 10), tmp_path / 'docs' / 'b.parquet')
  with pyarrow.OSFile(str(tmp_path / 'docs' / 'c.arrow'), 'wb') as sink:  # save_to_disk's
    with pyarrow.ipc.new_stream(sink, table.schema) as writer:
      for batch in table.slice(40, 5).to_batches(max_chunksize=4):
        writer.write_batch(batch)
  with pyarrow.OSFile(str(tmp_path / 'docs' / 'd.arrow'), 'wb') as sink:  # Feather v2's
    with pyarrow.ipc.new_file(sink, table.schema) as writer:
      for batch in table.slice(45).to_batches(max_chunksize=2):
        writer.write_batch(batch)
  cfg = _data_config(tmp_path, f'files:{tmp_path}/docs/*', text_key='content')
  with caplog.at_level('WARNING'):
    read = _read_all(cfg)
  assert sorted(read['train'] + read['validation']) == sorted(t.encode() for t in texts)
  assert read['train'] and read['validation']  # split by row, not by file
  assert 'is not read' not in caplog.text
  # Listing a Parquet file counts its rows without decompressing its text; each split
  # then reads the text column once (a and b each hold both splits' rows).
  assert sorted(map(tuple, read_columns)) == [()] * 2 + [('content',)] * 4


@pytest.mark.parametrize('columns, why', [
    ({'body': ['a', 'b']}, r"has no column 'text' \(it has \['body'\]\).*data.text_key"),
    ({'text': [1, 2]}, "column 'text' is int64, not a string"),
    ({'text': ['a', None]}, "row 2: 'text' is null, not a string"),
])
def test_a_parquet_file_without_its_text_is_one_line_naming_it(tmp_path, columns, why):
  pq = pytest.importorskip('pyarrow.parquet')
  import pyarrow  # pylint: disable=g-import-not-at-top
  (tmp_path / 'docs').mkdir()
  pq.write_table(pyarrow.table(columns), tmp_path / 'docs' / 'x.parquet')
  cfg = _data_config(tmp_path, f'files:{tmp_path}/docs/*')
  with pytest.raises(ConfigError, match=f"file '{tmp_path}/docs/x.parquet'.*{why}") as e:
    data.open_source(cfg, 'train')
  assert '\n' not in str(e.value)
  (tmp_path / 'docs' / 'x.parquet').write_bytes(b'not parquet at all')
  with pytest.raises(ConfigError, match='cannot be read as Parquet'):
    data.open_source(_data_config(tmp_path, f'files:{tmp_path}/docs/*'), 'train')
  (tmp_path / 'docs' / 'x.parquet').unlink()
  table = pyarrow.table(columns)
  with pyarrow.OSFile(str(tmp_path / 'docs' / 'x.arrow'), 'wb') as sink:
    with pyarrow.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table)
  with pytest.raises(ConfigError, match=f"file '{tmp_path}/docs/x.arrow'.*{why}"):
    data.open_source(_data_config(tmp_path, f'files:{tmp_path}/docs/*'), 'train')


def test_compressed_files_that_are_not_json_lines_are_refused(tmp_path):
  (tmp_path / 'docs').mkdir()
  (tmp_path / 'docs' / 'a.txt').write_text('text')
  with gzip.open(tmp_path / 'docs' / 'b.txt.gz', 'wt') as f:
    f.write('text')  # read as it is, a byte model would train on gzip's bytes
  cfg = _data_config(tmp_path, f'files:{tmp_path}/docs/*')
  with pytest.raises(ConfigError, match=r"1 of the files is compressed, e.g. '.*b.txt.gz'"):
    data.open_source(cfg, 'train')


def test_preparing_writes_nothing_to_stdout_and_no_progress_bars_to_a_log(corpus, capfd):
  # stdout holds a command's result (`jaxarch prepare`'s table, `train`'s metrics); TFDS
  # prints its preparing lines there, and its bars would fill a log file with \r.
  cfg, _ = corpus
  data.open_source(cfg, 'train')
  out, err = capfd.readouterr()
  assert out == '' and 'jaxarch: prepared ' in err and '\r' not in err


def test_cache_is_built_once(corpus, monkeypatch):
  cfg, _ = corpus
  first = data.open_source(cfg, 'train')
  files = {p: p.stat().st_mtime_ns for p in pathlib.Path(cfg.data_dir).rglob('*')}

  def fail(*args):
    raise AssertionError('rebuilt a prepared dataset')

  monkeypatch.setattr(sources.TextFiles, '_generate_examples', fail)
  second = data.open_source(cfg, 'train')
  assert [second[i] for i in range(len(second))] == [first[i] for i in range(len(first))]
  assert {p: p.stat().st_mtime_ns for p in pathlib.Path(cfg.data_dir).rglob('*')} == files


def test_changed_files_are_rebuilt(tmp_path, corpus):
  cfg, docs = corpus
  before = data.open_source(cfg, 'train')
  name = next(f for f in docs if not sources.is_validation(f, 0.25))
  (tmp_path / 'corpus' / name).write_text('changed')
  after = data.open_source(cfg, 'train')
  assert b'changed' in {after[i] for i in range(len(after))}
  assert b'changed' not in {before[i] for i in range(len(before))}


def test_a_file_named_like_a_piece_of_a_big_file_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, 'DOCUMENT_BYTES', 64)
  monkeypatch.setattr(sources, '_NEWLINE_SEARCH', 16)
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  (corpus / 'a').write_text('line\n' * 30)  # 150 bytes: pieces a#0, a#1, a#2
  (corpus / 'a#1').write_text('hello')
  cfg = _data_config(tmp_path, f'files:{corpus}/*')
  with pytest.raises(ConfigError, match=r"the file 'a' is over 64 bytes.*a#1 has one"):
    sources.open_source(cfg, 'train')


def test_tfds_source_reads_a_prepared_array_record_dataset(corpus):
  cfg, _ = corpus
  built = data.open_source(cfg, 'train')
  (config_dir,) = (pathlib.Path(cfg.data_dir) / 'text_files').iterdir()
  cfg.source = f'tfds:text_files/{config_dir.name}'
  source = data.open_source(cfg, 'train')
  assert [source[i] for i in range(len(source))] == [built[i] for i in range(len(built))]


class ArticlesForTest(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset as many are: a title before the text, and only a train split."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = None  # as jaxarch's own builders: no checksums file to look for

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'title': tfds.features.Text(), 'text': tfds.features.Text(),
         'body': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  num_examples = 3

  def _generate_examples(self):
    for i in range(self.num_examples):
      yield i, {'title': f'title {i}', 'text': f'text {i}', 'body': f'body {i}'}


class ManyArticlesForTest(ArticlesForTest):
  num_examples = 200


def test_tfds_source_reads_its_text_feature_and_may_lack_validation(tmp_path):
  cfg = _data_config(tmp_path, 'tfds:articles_for_test', validation_fraction=0.0)
  ArticlesForTest(data_dir=cfg.data_dir, file_format='array_record').download_and_prepare()
  train = data.open_source(cfg, 'train')
  assert sorted(train[i] for i in range(len(train))) == [b'text 0', b'text 1', b'text 2']
  assert not len(data.open_source(cfg, 'validation'))  # pylint: disable=g-explicit-length-test
  cfg.text_key = 'body'
  assert data.open_source(cfg, 'train')[0].startswith(b'body ')
  cfg.text_key = 'summary'
  with pytest.raises(ValueError, match=r"data.text_key='summary' is not a feature .*'body'"):
    data.open_source(cfg, 'train')
  # Without a `text` feature, two text features are a choice the config must make.
  two = types.SimpleNamespace(info=types.SimpleNamespace(features={
      'title': tfds.features.Text(), 'body': tfds.features.Text()}))
  with pytest.raises(ValueError, match=r"text features \['title', 'body'\].*data.text_key"):
    sources._text_key(two, 'tfds:x', None)  # pylint: disable=protected-access
  ids = types.SimpleNamespace(info=types.SimpleNamespace(features={
      'text': tfds.features.Text(), 'tokens': tfds.features.Sequence(np.int32)}))
  with pytest.raises(ValueError, match=r"'tokens' .* is a Sequence feature, not text"):
    sources._text_key(ids, 'tfds:x', 'tokens')  # pylint: disable=protected-access


def test_a_tfds_source_with_only_a_train_split_holds_out_a_fraction_of_it(tmp_path, caplog):
  cfg = _data_config(tmp_path, 'tfds:many_articles_for_test', validation_fraction=0.1)
  ManyArticlesForTest(data_dir=cfg.data_dir, file_format='array_record').download_and_prepare()
  texts = lambda split: [source[i] for source in [data.open_source(cfg, split)]
                         for i in range(len(source))]
  with caplog.at_level('INFO'):
    train, val = texts('train'), texts('validation')
  assert 'data.validation_fraction=0.1 of its train records (by index) validate' in caplog.text
  assert 10 <= len(val) <= 30 and not set(train) & set(val)
  assert sorted(train + val) == sorted(f'text {i}'.encode() for i in range(200))
  assert (train, val) == (texts('train'), texts('validation'))  # the same on every open
  cfg.validation_fraction = 0.0  # all of it trains, nothing validates
  assert sorted(texts('train')) == sorted(train + val) and not texts('validation')


def test_a_tfds_source_without_validation_is_told_to_raise_the_fraction(tmp_path):
  """3 records and data.validation_fraction=0.01: by their hashes, none held out."""
  from jaxarch.train import trainer  # pylint: disable=g-import-not-at-top
  cfg = _data_config(tmp_path, 'tfds:articles_for_test', validation_fraction=0.01)
  ArticlesForTest(data_dir=cfg.data_dir, file_format='array_record').download_and_prepare()
  batches = pipeline.make_eval_dataset(cfg, batch_size=2, num_batches=1)
  why = trainer.no_validation_data(ml_collections.ConfigDict({'data': cfg}), batches)
  assert why == ("data.source='tfds:articles_for_test' has no validation data (its TFDS "
                 "splits include no 'validation' or 'test', and data.validation_fraction=0.01 "
                 "of its train records is none; raise the fraction)")


def test_a_data_dir_that_cannot_be_made_is_a_config_error(tmp_path, corpus):
  cfg, _ = corpus
  (tmp_path / 'file').write_text('not a folder')
  cfg.data_dir = str(tmp_path / 'file' / 'data')
  with pytest.raises(ValueError, match=r'data directory .*/file/data cannot be made .*'
                     'data.data_dir'):
    data.open_source(cfg, 'train')


def test_a_prepared_corpus_is_read_where_nothing_can_be_written(corpus):
  """A shared, read-only data dir: no lock is taken for a dataset written already, and one
  that is not written yet is a config error naming the folder."""
  cfg, _ = corpus
  first = data.open_source(cfg, 'train')
  for lock in pathlib.Path(cfg.data_dir).glob('.*.lock'):  # opening it now fails, as root too
    lock.unlink()
    lock.mkdir()
  second = data.open_source(cfg, 'train')
  assert [second[i] for i in range(len(second))] == [first[i] for i in range(len(first))]
  cfg.validation_fraction = 0.5  # another corpus, not written yet, under an unwritable lock
  glob = cfg.source[len('files:'):]
  name = sources._files_config(cfg.source, glob, 0.5).name  # pylint: disable=protected-access
  (pathlib.Path(cfg.data_dir) / f'.{name}.lock').mkdir()
  with pytest.raises(ConfigError, match=r'data directory .* cannot be made or written to .*'
                     'data.source=.*data.data_dir'):
    data.open_source(cfg, 'train')


def test_preparing_a_corpus_onto_a_full_disk_is_a_config_error_and_can_be_retried(
    corpus, monkeypatch):
  # array_record says so in a RuntimeError's text alone, which was a traceback from TFDS.
  cfg, _ = corpus
  write = tfds.core.writer.ExampleWriter.write
  def full(self, path, examples):
    raise RuntimeError(f'write() failed: No space left on device; writing {path}; at byte '
                       '3145728; Failed to close chunk_writer')
  monkeypatch.setattr(tfds.core.writer.ExampleWriter, 'write', full)
  with pytest.raises(ConfigError, match=r"^config error: data.source='files:.*' could not be "
                     r'prepared in the data directory .* \(no space left on device\); free '
                     'space there, or set data.data_dir'):
    data.open_source(cfg, 'train')
  monkeypatch.setattr(tfds.core.writer.ExampleWriter, 'write', write)  # space freed
  assert len(data.open_source(cfg, 'train')) > 0


def test_unprepared_tfds_source_says_how_to_prepare(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds.core.constants, 'DATA_DIR', str(tmp_path / 'tfds'))  # not a home's
  cfg = _data_config(tmp_path, 'tfds:mnist')
  with pytest.raises(ValueError, match='is not prepared in .*download_and_prepare'):
    data.open_source(cfg, 'train')


def test_a_tfds_source_prepared_in_tfds_own_data_dir_names_it(tmp_path, monkeypatch):
  """Not a re-download (the hint above) when TFDS's own data dir holds it already."""
  tfds_home = tmp_path / 'tensorflow_datasets'
  ArticlesForTest(data_dir=str(tfds_home), file_format='array_record').download_and_prepare()
  monkeypatch.setattr(tfds.core.constants, 'DATA_DIR', str(tfds_home))  # $TFDS_DATA_DIR
  cfg = _data_config(tmp_path, 'tfds:articles_for_test', validation_fraction=0.0)
  with pytest.raises(ConfigError, match=f'is not prepared in .*; it is prepared in TFDS\'s '
                     f'{tfds_home}: set --config.data.data_dir={tfds_home}$'):
    data.open_source(cfg, 'train')
  cfg.data_dir = str(tfds_home)
  assert len(data.open_source(cfg, 'train')) == 3


class HubStoriesForTest(ArticlesForTest, skip_registration=True):
  """Written as TFDS's Hugging Face builder writes `huggingface:acme__stories`: a folder
  named after the repo, and no builder code of that name."""
  name = 'acme__stories'


def test_a_prepared_hugging_face_dataset_is_read_without_the_hub(tmp_path, monkeypatch):
  """TFDS's own builder asks the Hub before it looks at the disk: offline, as on a pod,
  that failed after a minute of retries even with the copy prepared."""
  def hub(*args, **kwargs):
    raise AssertionError(f'the Hugging Face builder was asked for: {args} {kwargs}')
  monkeypatch.setattr(tfds.core.dataset_builders.huggingface_dataset_builder, 'builder', hub)
  monkeypatch.setattr(tfds.core.constants, 'DATA_DIR', str(tmp_path / 'tfds'))  # not a home's
  cfg = _data_config(tmp_path, 'tfds:huggingface:acme__stories', validation_fraction=0.0)
  with pytest.raises(ConfigError, match=r"'tfds:huggingface:acme__stories' is not prepared in "
                     r".*where the Hugging Face Hub can be reached .*pip install datasets.*"
                     r"tfds.builder\('huggingface:acme__stories'.*then copy .*acme__stories "
                     r"here if that was another machine$"):
    data.open_source(cfg, 'train')
  HubStoriesForTest(data_dir=cfg.data_dir, file_format='array_record').download_and_prepare()
  assert (pathlib.Path(cfg.data_dir) / 'acme__stories' / '1.0.0' / 'features.json').is_file()
  train = data.open_source(cfg, 'train')
  assert sorted(train[i] for i in range(len(train))) == [b'text 0', b'text 1', b'text 2']
  cfg.source = 'tfds:huggingface:acme__stories:1.0.0'
  assert len(data.open_source(cfg, 'train')) == 3
  cfg.source = 'tfds:huggingface:acme__stories/default'  # a config that was not prepared
  with pytest.raises(ConfigError, match=r"is not prepared in .*acme__stories holds 1.0.0: "
                     r"name the one to read as tfds:huggingface:<dataset>"):
    data.open_source(cfg, 'train')


@pytest.mark.parametrize('name, why', [
    ('mnist:9.9.9', 'Dataset mnist cannot be loaded at version 9.9.9, only: '),
    ('mnist/foo', 'BuilderConfig foo not found with version '),
    ('mnist ', 'Parsing builder name string mnist  failed.')])
def test_a_tfds_version_or_config_it_lacks_is_one_line(tmp_path, name, why):
  """Not TFDS's AssertionError or many-line ValueError, which the CLI would not catch."""
  with pytest.raises(ConfigError) as error:
    data.open_source(_data_config(tmp_path, f'tfds:{name}'), 'train')
  message = str(error.value)
  assert message.startswith(f"config error: data.source='tfds:{name}': TFDS cannot open "
                            f"'{name}': {why}")
  assert message.endswith(' (the form is tfds:<dataset>[/<config>][:<version>])')
  assert '\n' not in message and 'Here are' not in message


@pytest.mark.parametrize('name', ['c4/en', 'wikipedia/20230601.en', 'wiki40b/en'])
def test_tfds_text_datasets_are_known_without_their_packages(tmp_path, monkeypatch, name):
  """TFDS registered none of its datasets after one whose package is missing (h5py): the
  text ones said "TFDS has no dataset 'c4/en'", prepared or not."""
  monkeypatch.setattr(tfds.core.constants, 'DATA_DIR', str(tmp_path / 'tfds'))
  with pytest.raises(ConfigError, match=f"data.source='tfds:{re.escape(name)}' is not "
                     'prepared in .*download_and_prepare') as e:
    data.open_source(_data_config(tmp_path, f'tfds:{name}'), 'train')
  # Its command imports the builder's module, which a bare import of TFDS may not register.
  module = f'tensorflow_datasets.text.{name.split("/")[0]}'
  assert f'python -c "import tensorflow_datasets as tfds, {module}; tfds.builder(' in str(e.value)


def test_an_unknown_tfds_dataset_is_one_line_with_close_names(tmp_path):
  with pytest.raises(ValueError, match=r"TFDS has no dataset 'mnis' \(did you mean .*mnist"):
    data.open_source(_data_config(tmp_path, 'tfds:mnis'), 'train')


# Pipeline.


def test_train_batches_are_int32_with_local_batch_shape(corpus):
  cfg, _ = corpus
  ds = data.make_train_dataset(cfg, seed=0, global_batch_size=8, process_index=1,
                               process_count=2)
  batch = next(iter(ds))
  assert set(batch) == {'inputs', 'targets', 'segment_ids', 'positions'}
  for value in batch.values():
    assert value.shape == (4, 16) and value.dtype == np.int32


def test_packed_rows_have_consistent_segments_positions_and_targets(corpus):
  cfg, _ = corpus
  batches = _take(iter(data.make_train_dataset(cfg, seed=0, global_batch_size=4)), 30)
  for b in batches:
    for inputs, targets, seg, pos in zip(b['inputs'], b['targets'], b['segment_ids'],
                                         b['positions']):
      starts = np.flatnonzero(np.diff(seg, prepend=0) != 0)
      ends = np.append(starts[1:], len(seg)) - 1
      assert list(seg[starts]) == list(range(1, len(starts) + 1))
      np.testing.assert_array_equal(pos, np.arange(len(seg)) - np.repeat(starts, np.diff(
          np.append(starts, len(seg)))))
      for s, e in zip(starts, ends):
        np.testing.assert_array_equal(targets[s:e], inputs[s + 1:e + 1])
        # A document's eod may only open a piece (as BOS) or close it (as last target).
        assert EOD not in inputs[s + 1:e + 1] and EOD not in targets[s:e]
  # Across rows too: each row continues the same row of the previous batch.
  for inputs, targets in zip(_row_streams(batches, 'inputs'),
                             _row_streams(batches, 'targets')):
    np.testing.assert_array_equal(targets[:-1], inputs[1:])


def test_documents_longer_than_seq_len_are_split_with_all_bytes(tmp_path):
  docs = _write_corpus(tmp_path / 'corpus', num_docs=6, max_len=200)
  cfg = _data_config(tmp_path, f'files:{tmp_path}/corpus/*.txt', validation_fraction=0.0)
  ds = data.make_train_dataset(cfg, seed=3, global_batch_size=2)
  assert max(len(t.encode()) for t in docs.values()) > 4 * 16
  assert sorted(_take_documents(iter(ds), 6)) == sorted(docs.values())


def test_shuffle_is_deterministic_given_the_seed(corpus):
  cfg, _ = corpus

  def first(seed):
    ds = data.make_train_dataset(cfg, seed=seed, global_batch_size=4)
    return _stream(_take(iter(ds), 20), 'inputs')

  np.testing.assert_array_equal(first(0), first(0))
  assert not np.array_equal(first(0), first(1))


def test_each_epoch_is_a_new_order_of_the_same_documents(corpus):
  cfg, _ = corpus
  num_docs = len(data.open_source(cfg, 'train'))
  ds = data.make_train_dataset(cfg, seed=0, global_batch_size=4)
  docs = _take_documents(iter(ds), 2 * num_docs)
  epoch1, epoch2 = docs[:num_docs], docs[num_docs:2 * num_docs]
  assert sorted(epoch1) == sorted(epoch2) and epoch1 != epoch2


@pytest.mark.parametrize('process_index, process_count', [(0, 1), (1, 2)])
def test_epoch_counts_the_documents_read(corpus, process_index, process_count):
  cfg, _ = corpus
  num_docs = len(data.open_source(cfg, 'train'))
  it = iter(data.make_train_dataset(cfg, seed=0, global_batch_size=4,
                                    process_index=process_index, process_count=process_count))
  started, epochs = 0, []
  for _ in range(40):
    batch = next(it)
    started += int((batch['inputs'] == EOD).sum())  # every document starts with eod
    epochs.append(it.epoch())
    # This process's streams stand for all 4; the count lags by a few documents a stream.
    assert abs(epochs[-1] * num_docs - started * process_count) <= 3 * 4
  assert epochs == sorted(epochs) and epochs[-1] > 1.5
  resumed = iter(data.make_train_dataset(cfg, seed=0, global_batch_size=4,
                                         process_index=process_index,
                                         process_count=process_count))
  resumed.set_state(json.loads(json.dumps(it.get_state())))
  assert resumed.epoch() == epochs[-1]


def _assert_rows_of(global_batches, process_batches):
  """Each global batch is the processes' batches stacked in process order."""
  assert len(global_batches) == len(process_batches[0]) == len(process_batches[1])
  for want, *parts in zip(global_batches, *process_batches):
    for key in want:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])


def test_processes_read_their_own_rows_of_the_one_process_batches(corpus):
  cfg, _ = corpus
  make = lambda **kw: _take(iter(data.make_train_dataset(cfg, seed=0, global_batch_size=4,
                                                          **kw)), 40)
  alone = make()
  shards = [make(process_index=p, process_count=2) for p in range(2)]
  _assert_rows_of(alone, shards)
  # Each process packs its own streams, i.e. its own documents (in the first epoch).
  documents = [{d for row in _row_streams(shard[:4], 'inputs') for d in _documents(row)}
               for shard in shards]
  assert documents[0] and documents[1] and not documents[0] & documents[1]


def test_global_batch_must_divide_over_processes(corpus):
  cfg, _ = corpus
  with pytest.raises(ValueError, match='train.batch_size=6 must be divisible.*4'):
    data.make_train_dataset(cfg, seed=0, global_batch_size=6, process_count=4)


def test_rows_of_a_batch_come_from_different_documents(tmp_path):
  # Four long documents of one marker letter each: ~30 rows per document.
  directory = tmp_path / 'corpus'
  directory.mkdir()
  for letter in 'ABCD':
    (directory / f'{letter}.txt').write_text(letter * 479)
  cfg = _data_config(tmp_path, f'files:{directory}/*.txt', validation_fraction=0.0)

  def letters_per_batch(**kwargs):
    ds = data.make_train_dataset(cfg, seed=0, global_batch_size=4, **kwargs)
    return [len(set(np.unique(b['inputs'])) & set(b'ABCD')) for b in _take(iter(ds), 100)]

  assert min(letters_per_batch()) >= 3
  assert np.mean(letters_per_batch(packing_streams=1)) < 1.5  # One document at a time.


@pytest.mark.parametrize('through_json', [False, True])
@pytest.mark.parametrize('skip', [0, 5])
def test_iterator_state_resumes_exactly(corpus, skip, through_json):
  cfg, _ = corpus
  ds = data.make_train_dataset(cfg, seed=0, global_batch_size=4)
  it = iter(ds)
  _take(it, skip)
  state = it.get_state()
  if through_json:  # How Grain's Orbax handler stores it.
    state = json.loads(json.dumps(state))
  expected = _take(it, 3)
  resumed = iter(data.make_train_dataset(cfg, seed=0, global_batch_size=4))
  resumed.set_state(state)
  for want, got in zip(expected, _take(resumed, 3)):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_threads_make_the_same_batches_and_positions(tmp_path):
  """`num_threads` make the streams' rows at once: the batches and the saved positions are
  those of one stream after another, and a position of either resumes the other."""
  _write_corpus(tmp_path / 'corpus', num_docs=60, max_len=200)
  cfg = _data_config(tmp_path, f'files:{tmp_path}/corpus/*.txt',
                     tokenizer=_gpt2_style_tokenizer(tmp_path / 'tokenizer.json'))
  make = lambda threads: iter(data.make_train_dataset(cfg, seed=0, global_batch_size=8,
                                                      num_threads=threads))
  inline, threaded = make(0), make(3)
  for _ in range(6):
    want, got = next(inline), next(threaded)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert threaded.get_state() == inline.get_state()
  resumed = make(0)
  resumed.set_state(json.loads(json.dumps(threaded.get_state())))
  for want, got in zip(_take(threaded, 3), _take(resumed, 3)):
    np.testing.assert_array_equal(got['inputs'], want['inputs'])
  for it in (inline, threaded, resumed):
    it.close()


def test_eval_batches_are_the_same_with_read_threads(tmp_path):
  """Evaluation's one stream tokenizes its next documents in `num_threads` threads, in
  order: the same batches on every pass, and a pass leaves no read threads behind."""
  _write_corpus(tmp_path / 'corpus', num_docs=80, max_len=200)
  cfg = _data_config(tmp_path, f'files:{tmp_path}/corpus/*.txt', validation_fraction=0.5,
                     tokenizer=_gpt2_style_tokenizer(tmp_path / 'tokenizer.json'))
  make = lambda threads: data.make_eval_dataset(cfg, batch_size=4, num_batches=5,
                                                num_threads=threads)
  inline, threaded = list(make(0)), make(3)
  assert len(inline) == 5
  before = threading.active_count()
  for _ in range(4):  # every pass the same
    for want, got in zip(inline, threaded, strict=True):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
  time.sleep(0.5)
  assert threading.active_count() <= before + 2  # not 3 more per pass


def test_threads_tokenize_the_streams_documents_at_once(corpus, tmp_path, monkeypatch):
  """Up to `num_threads` documents are tokenized at once (as many as the cores allow);
  the byte tokenizer, which holds the GIL, tokenizes one after another."""
  cfg, _ = corpus
  byte_cfg = cfg.copy_and_resolve_references()
  cfg.tokenizer = _gpt2_style_tokenizer(tmp_path / 'tokenizer.json')
  lock = threading.Lock()
  running, most = [0], [0]

  def slow(encode):
    def slow_encode(self, text):  # as if tokenizing took a while, the GIL released
      with lock:
        running[0] += 1
        most[0] = max(most[0], running[0])
      time.sleep(0.02)
      with lock:
        running[0] -= 1
      return encode(self, text)
    return slow_encode

  for kind in (tokenizers.HFTokenizer, tokenizers.ByteTokenizer):
    monkeypatch.setattr(kind, 'encode', slow(kind.encode))
  for data_cfg, threads, expected in ((cfg, 0, 1), (cfg, 1, 1), (cfg, 4, 4), (byte_cfg, 4, 1)):
    most[0] = 0
    it = iter(data.make_train_dataset(data_cfg, seed=0, global_batch_size=8,
                                      num_threads=threads, prefetch=0))
    _take(it, 2)
    it.close()
    assert most[0] == min(expected, data.cpu_cores()), (data_cfg.tokenizer, threads)


def test_a_position_saved_under_another_layout_is_refused(corpus, caplog):
  # Batch 4 saved a position; restored into batch 8 (4 -> 8 streams) it would name other
  # documents: the iterator warns and starts afresh instead.
  cfg, _ = corpus
  it = iter(data.make_train_dataset(cfg, seed=0, global_batch_size=4))
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  fresh = _take(iter(data.make_train_dataset(cfg, seed=0, global_batch_size=8)), 2)
  resumed = iter(data.make_train_dataset(cfg, seed=0, global_batch_size=8))
  with caplog.at_level('WARNING'):
    resumed.set_state(state)
  assert 'batch_size 4 -> 8' in caplog.text and 'streams 4 -> 8' in caplog.text
  for want, got in zip(fresh, _take(resumed, 2)):
    np.testing.assert_array_equal(got['inputs'], want['inputs'])


def test_a_position_holds_in_its_run_moved_and_one_saved_with_the_tokenizer_path_too(
    corpus, tmp_path, caplog):
  """A run's own tokenizer (an import's copy) is a layout key: named relative to the run
  (`run_dir`), a saved position holds once the run is moved, where its path changed; one
  saved with the file's path (before such names) holds in the run where it is."""
  cfg, _ = corpus
  run = tmp_path / 'run'
  (run / 'tokenizer').mkdir(parents=True)
  cfg.tokenizer = _gpt2_style_tokenizer(run / 'tokenizer' / 'tokenizer.json')
  make = lambda **kw: iter(data.make_train_dataset(cfg, seed=0, global_batch_size=4, **kw))
  positions = {}
  for name, kw in (('by path', {}), ('in the run', {'run_dir': run})):
    it = make(**kw)
    _take(it, 5)
    positions[name] = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 2)
  assert positions['by path']['layout']['tokenizer'] == cfg.tokenizer
  assert positions['in the run']['layout']['tokenizer'] == 'tokenizer/tokenizer.json'
  resumed = make(run_dir=run)
  with caplog.at_level('WARNING'):
    resumed.set_state(positions['by path'])
  got = _take(resumed, 2)
  run.rename(tmp_path / 'moved')
  cfg.tokenizer = str(tmp_path / 'moved' / 'tokenizer' / 'tokenizer.json')
  resumed = make(run_dir=tmp_path / 'moved')
  with caplog.at_level('WARNING'):
    resumed.set_state(positions['in the run'])
  assert 'another data layout' not in caplog.text
  for batches in (got, _take(resumed, 2)):
    for want, batch in zip(expected, batches):
      np.testing.assert_array_equal(batch['inputs'], want['inputs'])


def test_a_position_in_a_corpus_that_gained_files_is_refused(corpus, tmp_path, caplog):
  cfg, _ = corpus
  it = iter(data.make_train_dataset(cfg, seed=0, global_batch_size=4))
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  for i in range(8):  # some of them are training files
    (tmp_path / 'corpus' / f'new_{i}.txt').write_text(f'new document {i}')
  grown = data.make_train_dataset(cfg, seed=0, global_batch_size=4)
  fresh = _take(iter(grown), 2)
  resumed = iter(grown)
  with caplog.at_level('WARNING'):
    resumed.set_state(state)
  assert 'documents 30 -> ' in caplog.text
  for want, got in zip(fresh, _take(resumed, 2)):
    np.testing.assert_array_equal(got['inputs'], want['inputs'])


def _global_batches(iterators, n):
  """n global batches: each process's rows, in process order."""
  return [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
          for parts in zip(*[_take(it, n) for it in iterators])]


@pytest.mark.parametrize('saved_by, resumed_on', [(2, 1), (1, 4), (4, 2)])
def test_a_position_resumes_exactly_on_another_number_of_processes(corpus, saved_by,
                                                                   resumed_on):
  # A pod restarted on fewer or more hosts: the processes' saved positions, put end to
  # end and shared out again, go on with the batches the old process count would read.
  cfg, _ = corpus
  make = lambda index, count: iter(data.make_train_dataset(
      cfg, seed=0, global_batch_size=8, process_index=index, process_count=count))
  want = _global_batches([make(0, 1)], 6)
  before = [make(p, saved_by) for p in range(saved_by)]
  _global_batches(before, 3)
  states = [json.loads(json.dumps(it.get_state())) for it in before]
  after = [make(p, resumed_on) for p in range(resumed_on)]
  for it in after:
    it.set_state_of_processes(states)
  for expected, got in zip(want[3:], _global_batches(after, 3)):
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


def test_positions_of_processes_sharing_or_swapping_their_streams_resume_exactly(corpus):
  # Four processes in pairs on two data shards (a `tensor` axis across hosts), the second
  # pair reading the first shard: their positions name the streams they read.
  cfg, _ = corpus
  make = lambda index, count: iter(data.make_train_dataset(
      cfg, seed=0, global_batch_size=8, process_index=index, process_count=count))
  want = _global_batches([make(0, 1)], 4)
  shards = [make(p, 2) for p in range(2)]
  _global_batches(shards, 2)
  first, second = (json.loads(json.dumps(it.get_state())) for it in shards)
  resumed = make(0, 1)
  resumed.set_state_of_processes([second, second, first, first])
  for expected, got in zip(want[2:], _global_batches([resumed], 2)):
    np.testing.assert_array_equal(got['inputs'], expected['inputs'])
  with pytest.raises(ValueError, match=r'hold streams \[4, 5, 6, 7\]\.\.\., not the 8'):
    make(0, 1).set_state_of_processes([second, second])
  # Saved before positions named their streams: one shard per process, in process order.
  legacy = make(0, 1)
  legacy.set_state_of_processes([{k: v for k, v in state.items() if k != 'streams'}
                                 for state in (first, second)])
  np.testing.assert_array_equal(_take(legacy, 1)[0]['inputs'], want[2]['inputs'])


def test_positions_that_cannot_be_shared_out_again_say_why(corpus, caplog):
  cfg, _ = corpus
  make = lambda index, count, **kw: iter(data.make_train_dataset(
      cfg, seed=0, process_index=index, process_count=count, **kw))
  # 3 rows per process from 2 streams each: a batch ends inside a round of the streams.
  odd = [make(p, 2, global_batch_size=6, packing_streams=4) for p in range(2)]
  _global_batches(odd, 1)
  with pytest.raises(ValueError, match='inside a round of the streams'):
    make(0, 1, global_batch_size=6, packing_streams=4).set_state_of_processes(
        [it.get_state() for it in odd])
  # The seed of a process's position differs from the other's.
  mixed = [make(0, 2, global_batch_size=8), iter(data.make_train_dataset(
      cfg, seed=1, global_batch_size=8, process_index=1, process_count=2))]
  _global_batches(mixed, 1)
  with pytest.raises(ValueError, match='different or unnamed layouts'):
    make(0, 1, global_batch_size=8).set_state_of_processes([it.get_state() for it in mixed])
  # Another batch size resuming: refused with the changed keys, reading afresh.
  saved = [make(p, 2, global_batch_size=8) for p in range(2)]
  _global_batches(saved, 2)
  fresh = _take(make(0, 1, global_batch_size=4), 1)
  resumed = make(0, 1, global_batch_size=4)
  with caplog.at_level('WARNING'):
    resumed.set_state_of_processes([it.get_state() for it in saved])
  assert 'batch_size 8 -> 4' in caplog.text
  np.testing.assert_array_equal(_take(resumed, 1)[0]['inputs'], fresh[0]['inputs'])


def test_eval_batches_are_deterministic_finite_and_cover_validation(corpus):
  cfg, _ = corpus
  ds = data.make_eval_dataset(cfg, batch_size=4, num_batches=1000)
  first, second = list(ds), list(ds)
  assert 0 < len(first) < 1000 and len(first) == len(second)
  for a, b in zip(first, second):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  source = data.open_source(cfg, 'validation')
  inputs = np.append(_stream(first, 'inputs'), EOD)
  assert _documents(inputs) == [source[i].decode() for i in range(len(source))]
  last = first[-1]
  assert last['inputs'].shape == (4, 16)
  assert np.all(last['inputs'][last['segment_ids'] == 0] == PAD)
  assert len(list(data.make_eval_dataset(cfg, batch_size=4, num_batches=2))) == 2


def test_eval_batches_of_processes_are_their_rows_of_the_one_process_batches(corpus):
  cfg, _ = corpus
  make = lambda **kw: list(data.make_eval_dataset(cfg, batch_size=8, num_batches=500, **kw))
  shards = [make(process_index=p, process_count=2) for p in range(2)]
  _assert_rows_of(make(), shards)
  assert shards[1][-1]['inputs'].shape == (4, 16)


def test_default_corpus_is_the_stdlib_split_by_file(tmp_path):
  cfg = _data_config(tmp_path, 'default', validation_fraction=0.05)
  start = time.time()
  train = data.open_source(cfg, 'train')
  build_seconds = time.time() - start
  val = data.open_source(cfg, 'validation')
  stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  num_documents = sum(sources.num_pieces(p.stat().st_size) for p in stdlib.rglob('*.py')
                      if not {'site-packages', 'dist-packages', '__pycache__'}
                      & set(p.relative_to(stdlib).parts))
  assert len(train) + len(val) == num_documents and 0 < len(val) < len(train) / 10
  assert sum(len(train[i]) for i in range(len(train))) > 10_000_000
  os_py = (stdlib / 'os.py').read_text('utf-8')
  assert sources.is_validation('os.py', 0.05) == (os_py in {val[i] for i in range(len(val))})
  (config_dir,) = (pathlib.Path(cfg.data_dir) / 'python_stdlib').iterdir()
  assert platform.python_version() in config_dir.name  # One cache entry per interpreter.
  batch = next(iter(data.make_train_dataset(cfg, seed=0, global_batch_size=16)))
  assert batch['inputs'].shape == (16, 16)
  print(f'default corpus: built in {build_seconds:.1f}s, {len(train)} train and '
        f'{len(val)} validation documents')


def test_a_tokenizer_that_pads_with_eod_keeps_each_documents_bos():
  """Without a pad token (Llama-2's SentencePiece, GPT-2's tokenizer.json) pad == eod,
  which is also every document's first input: it stays in its document."""
  eod = 9
  row = {'inputs': np.array([eod, 1, 2, eod, 5, eod, 0, 0]),  # a doc, a doc, a cut doc, end
         'targets': np.array([1, 2, eod, 5, eod, 7, 0, 0]),
         'inputs_segment_ids': np.array([1, 1, 1, 2, 2, 3, 0, 0]),
         'inputs_positions': np.array([0, 1, 2, 0, 1, 0, 0, 0])}
  out = pipeline._Finalize(pad_id=eod).map(row)  # pylint: disable=protected-access
  np.testing.assert_array_equal(out['segment_ids'], [1, 1, 1, 2, 2, 3, 0, 0])
  np.testing.assert_array_equal(out['inputs'], [eod, 1, 2, eod, 5, eod, eod, eod])
  np.testing.assert_array_equal(out['targets'], [1, 2, eod, 5, eod, 7, eod, eod])
  aligned = dict(row, inputs=np.array([eod, 1, 2, 256, eod, 5, 0, 0]),  # pad 256 != eod:
                 targets=np.array([1, 2, eod, 256, 5, eod, 0, 0]),  # alignment padding
                 inputs_segment_ids=np.array([1, 1, 1, 1, 2, 2, 0, 0]))
  out = pipeline._Finalize(pad_id=256).map(aligned)  # pylint: disable=protected-access
  np.testing.assert_array_equal(out['segment_ids'], [1, 1, 1, 0, 2, 2, 0, 0])


def test_an_empty_document_keeps_its_target_when_pad_is_eod(tmp_path):
  """An empty document is the input eod (its BOS) with the target eod; with a tokenizer
  that pads with eod (GPT-2's), that is not padding: the target carries loss."""
  cfg, tokenizer = _half_empty_corpus(
      tmp_path, _gpt2_style_tokenizer(tmp_path / 'tokenizer.json'), 'doc {} text')
  assert tokenizer.pad_id == tokenizer.eod_id
  source = data.open_source(cfg, 'validation')
  documents = [tokenizer.encode(source[i]) for i in range(len(source))]
  assert [] in documents and any(documents)
  batches = list(data.make_eval_dataset(cfg, batch_size=2, num_batches=100))
  # Every document's targets (its ids, then eod) carry loss, the empty ones' eod too.
  assert sum(int((b['segment_ids'] > 0).sum()) for b in batches) == sum(
      len(ids) + 1 for ids in documents)
  np.testing.assert_array_equal(
      _stream(batches, 'targets'),
      np.concatenate([ids + [tokenizer.eod_id] for ids in documents]))


def _half_empty_corpus(tmp_path, tokenizer_path, text, **overrides):
  """(config, tokenizer) of 12 documents, every second one empty, the others `text` with
  their number, half of them held out."""
  directory = tmp_path / 'corpus'
  directory.mkdir()
  for i in range(12):
    (directory / f'doc_{i:02d}.txt').write_text('' if i % 2 else text.format(i))
  cfg = _data_config(tmp_path, f'files:{directory}/*.txt', tokenizer=tokenizer_path,
                     **{'validation_fraction': 0.5, **overrides})
  return cfg, data.get_tokenizer(tokenizer_path)


def _llama_corpus(tmp_path, **overrides):
  """Documents (every second one empty) read with a Llama-style tokenizer: <s> 1, </s> 2,
  no pad token (pad = eod = 2)."""
  return _half_empty_corpus(tmp_path, _llama_style_tokenizer(tmp_path / 'tokenizer.json'),
                            'the café {}', **overrides)


@pytest.mark.parametrize('bos', [None, 1])
def test_documents_start_with_data_bos_id_and_end_with_eod(tmp_path, bos):
  """Llama's `<s> doc </s>`: inputs [bos] + ids, targets ids + [eod]; the default BOS is the
  eod, as jaxarch's own models train. An empty document is <s> -> </s>, not padding."""
  cfg, tokenizer = _llama_corpus(tmp_path, bos_id=bos)
  source = data.open_source(cfg, 'validation')
  documents = [tokenizer.encode(source[i]) for i in range(len(source))]
  assert [] in documents and any(documents)
  batches = list(data.make_eval_dataset(cfg, batch_size=2, num_batches=100))
  first = 2 if bos is None else bos
  np.testing.assert_array_equal(_stream(batches, 'inputs'),
                                np.concatenate([[first] + ids for ids in documents]))
  np.testing.assert_array_equal(_stream(batches, 'targets'),
                                np.concatenate([ids + [2] for ids in documents]))


def test_a_train_position_holds_under_another_bos(tmp_path):
  """A document is one token longer under any BOS: a position saved under the eod as BOS
  goes on with the same documents, and rows, under `<s>` (an imported run set right)."""
  cfg, _ = _llama_corpus(tmp_path, validation_fraction=0.0)
  iterator = iter(data.make_train_dataset(cfg, seed=0, global_batch_size=2))
  _take(iterator, 3)
  state = iterator.get_state()
  want = _take(iterator, 4)
  cfg.bos_id = 1
  resumed = iter(data.make_train_dataset(cfg, seed=0, global_batch_size=2))
  resumed.set_state(json.loads(json.dumps(state)))
  for a, b in zip(want, _take(resumed, 4)):
    np.testing.assert_array_equal(b['segment_ids'], a['segment_ids'])
    np.testing.assert_array_equal(b['targets'], a['targets'])
    starts = (a['positions'] == 0) & (a['segment_ids'] > 0) & (a['inputs'] == 2)
    np.testing.assert_array_equal(b['inputs'], np.where(starts, 1, a['inputs']))
    assert starts.any()


def test_documents_without_a_bos_are_their_ids_and_empty_ones_are_left_out(tmp_path):
  """data.add_bos=False (an imported Qwen's tokenizer adds none): inputs ids, targets
  ids[1:] + [eod], as transformers reads the text; an empty document has nothing to
  predict from and no segment of its own."""
  cfg, tokenizer = _llama_corpus(tmp_path, add_bos=False)
  source = data.open_source(cfg, 'validation')
  documents = [tokenizer.encode(source[i]) for i in range(len(source))]
  assert [] in documents and any(documents)
  batches = list(data.make_eval_dataset(cfg, batch_size=2, num_batches=100))
  kept = [ids for ids in documents if ids]
  np.testing.assert_array_equal(_stream(batches, 'inputs'), np.concatenate(kept))
  np.testing.assert_array_equal(_stream(batches, 'targets'),
                                np.concatenate([ids[1:] + [2] for ids in kept]))
  for b in batches:  # segments 1, 2, ... of each row: none skipped for an empty document
    for row, positions in zip(b['segment_ids'], b['positions']):
      used = row[row > 0]
      np.testing.assert_array_equal(np.unique(used), np.arange(1, len(np.unique(used)) + 1))
      assert (positions[row > 0][np.flatnonzero(np.diff(used)) + 1] == 0).all()


def test_aligned_documents_without_a_bos_keep_their_padding_apart(tmp_path):
  """MEGABYTE's alignment (data.pack_align) with no BOS: a document of n bytes fills n
  positions, then pad up to the patch, which alone is padding."""
  cfg, tokenizer = _half_empty_corpus(tmp_path, 'bytes', 'doc {} text', add_bos=False,
                                      pack_align=4)
  source = data.open_source(cfg, 'validation')
  kept = [tokenizer.encode(source[i]) for i in range(len(source)) if source[i]]
  batches = list(data.make_eval_dataset(cfg, batch_size=2, num_batches=100))
  np.testing.assert_array_equal(_stream(batches, 'inputs'), np.concatenate(kept))
  np.testing.assert_array_equal(_stream(batches, 'targets'),
                                np.concatenate([ids[1:] + [257] for ids in kept]))
  starts = np.flatnonzero((batches[0]['positions'][0] == 0) & (batches[0]['segment_ids'][0] > 0))
  assert len(starts) > 1 and (starts % 4 == 0).all()


def test_a_train_position_is_refused_under_another_add_bos(tmp_path, caplog):
  """Without a BOS a document is one token shorter: a position's slice of the document
  being packed would be off by one, so it is of another layout and the data start afresh."""
  cfg, _ = _llama_corpus(tmp_path, validation_fraction=0.0)
  iterator = iter(data.make_train_dataset(cfg, seed=0, global_batch_size=2))
  _take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  cfg.add_bos = False
  fresh = _take(iter(data.make_train_dataset(cfg, seed=0, global_batch_size=2)), 2)
  resumed = iter(data.make_train_dataset(cfg, seed=0, global_batch_size=2))
  with caplog.at_level('WARNING'):
    resumed.set_state(state)
  assert 'add_bos True -> False' in caplog.text
  for want, got in zip(fresh, _take(resumed, 2)):
    np.testing.assert_array_equal(got['inputs'], want['inputs'])


@pytest.mark.parametrize('bos', [258, -1, True])
def test_a_bos_id_outside_the_tokenizer_is_one_line(bos):
  cfg = _dense_data_config()  # model.vocab_size 384 takes 258; the byte tokenizer has 258
  cfg.bos_id = bos
  with pytest.raises(ConfigError) as error:
    data.bos_id(cfg, data.ByteTokenizer())
  assert str(error.value) == (f"config error: data.bos_id={bos!r} must be an id of "
                              "data.tokenizer='bytes', in [0, 258), or None (its "
                              "end-of-document id, 257)")


def test_stop_ids_are_the_eod_then_data_stop_ids_each_once():
  """Generation stops at the eod and at an instruct model's end of turn; the eod comes
  first, as the only stop of a run without the key (a config saved before it)."""
  cfg = _dense_data_config()
  assert data.stop_ids(cfg, data.ByteTokenizer()) == (257,)
  cfg.stop_ids = (10, 257, 3, 10)
  assert data.stop_ids(cfg, data.ByteTokenizer()) == (257, 10, 3)
  del cfg['stop_ids']
  assert data.stop_ids(cfg, data.ByteTokenizer()) == (257,)


@pytest.mark.parametrize('stop', [258, -1, True])
def test_a_stop_id_outside_the_tokenizer_is_one_line(stop):
  cfg = _dense_data_config()  # model.vocab_size 384 takes 258; the byte tokenizer has 258
  cfg.stop_ids = (10, stop)
  with pytest.raises(ConfigError) as error:
    data.stop_ids(cfg, data.ByteTokenizer())
  assert str(error.value) == (f"config error: data.stop_ids=(10, {stop!r}) must be ids of "
                              f"data.tokenizer='bytes', in [0, 258); {stop!r} is not")


# HF tokenizer.json files: bits per byte needs each token's UTF-8 bytes.

def _gpt2_style_tokenizer(path):
  """Byte-level BPE (GPT-2): every byte a character of its own alphabet, no merges."""
  hf = pytest.importorskip('tokenizers')
  alphabet = sorted(tokenizers.gpt2_byte_chars().values())
  tok = hf.Tokenizer(hf.models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  tok.add_special_tokens([hf.AddedToken('<|endoftext|>', special=True)])
  tok.save(str(path))
  return str(path)


def _llama_style_tokenizer(path):
  """SentencePiece-style BPE (Llama-2): '▁' for spaces, bytes as <0xNN> pieces."""
  hf = pytest.importorskip('tokenizers')
  vocab = {'<unk>': 0, '<s>': 1, '</s>': 2, **{f'<0x{b:02X}>': 3 + b for b in range(256)}}
  for piece in ['▁', 't', 'h', 'e', 'c', 'a', 'f', 'é', '▁t', '▁th', '▁the', '▁c', '▁ca',
                '▁caf', '▁café']:
    vocab[piece] = len(vocab)
  merges = [('▁', 't'), ('▁t', 'h'), ('▁th', 'e'), ('▁', 'c'), ('▁c', 'a'), ('▁ca', 'f'),
            ('▁caf', 'é')]
  tok = hf.Tokenizer(hf.models.BPE(vocab=vocab, merges=merges, byte_fallback=True,
                                   unk_token='<unk>', fuse_unk=True))
  tok.normalizer = hf.normalizers.Sequence([hf.normalizers.Prepend('▁'),
                                            hf.normalizers.Replace(' ', '▁')])
  tok.decoder = hf.decoders.Sequence([
      hf.decoders.Replace('▁', ' '), hf.decoders.ByteFallback(), hf.decoders.Fuse(),
      hf.decoders.Strip(' ', 1, 0)])
  tok.add_special_tokens([hf.AddedToken(t, special=True) for t in ('<unk>', '<s>', '</s>')])
  tok.save(str(path))
  return str(path)


@pytest.mark.parametrize('style', ['gpt2', 'llama'])
def test_hf_tokenizer_counts_the_bytes_of_its_tokens(tmp_path, style):
  make = _gpt2_style_tokenizer if style == 'gpt2' else _llama_style_tokenizer
  tokenizer = data.get_tokenizer(make(tmp_path / 'tokenizer.json'))
  for text in ['the café the', 'the ∑', 'a\x00b ü']:
    ids = tokenizer.encode(text)
    # Llama's decoder drops the space its normalizer adds in front: counted, as a byte
    # of the first word ('▁the'), like SentencePiece files.
    expected = len(text.encode()) + (style == 'llama')
    assert int(tokenizer.byte_lengths[ids].sum()) == expected, (text, ids)
    assert tokenizer.decode(ids) == text
  for text in ['the café the', '  the ∑  ☃\n\t', '', 'é<|endoftext|></s>']:
    counts_the_text(tokenizer, text)  # bits per byte's count, the leading '▁' too


def test_hf_tokenizer_encodes_as_tokenizers_encode(tmp_path):
  """`encode` goes through `encode_batch` (which releases the GIL): the same ids."""
  hf = pytest.importorskip('tokenizers')
  path = _llama_style_tokenizer(tmp_path / 'tokenizer.json')
  reference = hf.Tokenizer.from_file(path)
  reference.encode_special_tokens = True
  tokenizer = data.get_tokenizer(path)
  for text in ['the café the', '', 'a</s>b <s> the\x00', 'é' * 50]:
    assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False).ids


def test_wordpiece_pieces_count_the_text_they_stand_for(tmp_path):
  """BERT-style WordPiece: '##s' is one byte of a word, 'the' three and the space before
  it (the first word's too, as with SentencePiece), ',' one; decoded alone, a piece would
  count '##' and no space."""
  hf = pytest.importorskip('tokenizers')
  pieces = ['[PAD]', '[UNK]', '[SEP]', 'the', 'caf', '##é', '##s', ',', '.', 'cat']
  tok = hf.Tokenizer(hf.models.WordPiece({t: i for i, t in enumerate(pieces)},
                                         unk_token='[UNK]'))
  tok.pre_tokenizer = hf.pre_tokenizers.BertPreTokenizer()
  tok.decoder = hf.decoders.WordPiece()
  tok.add_special_tokens([hf.AddedToken(t, special=True) for t in ('[PAD]', '[UNK]', '[SEP]')])
  tok.save(str(tmp_path / 'tokenizer.json'))
  tokenizer = data.get_tokenizer(str(tmp_path / 'tokenizer.json'))
  for text in ['the cafés, the cat.', 'cat', 'the café.']:
    ids = tokenizer.encode(text)
    assert int(tokenizer.byte_lengths[ids].sum()) == len(text.encode()) + 1, (text, ids)
  for text in ['the cafés, the cat.', ', the CAFÉ  dog', '']:  # lowercased, unknown, ','
    counts_the_text(tokenizer, text)


def test_a_tokenizers_file_of_any_json_name_is_a_hf_tokenizer(tmp_path):
  """`Tokenizer.save` takes any name (the tokenizers quicktour's tokenizer-wiki.json)."""
  path = _gpt2_style_tokenizer(tmp_path / 'bpe-32k.json')
  tokenizer = data.get_tokenizer(path)
  assert tokenizer.decode(tokenizer.encode('def f():')) == 'def f():'
  assert tokenizer.eod_id == 256  # '<|endoftext|>', after the 256 byte characters


def test_a_tokenizer_file_is_read_once_while_it_is_unchanged(tmp_path):
  """A run asks for its tokenizer for its training data, its evaluation data and bits per
  byte; a 128k vocabulary takes about a second to read."""
  path = _gpt2_style_tokenizer(tmp_path / 'tokenizer.json')
  first = data.get_tokenizer(path)
  assert data.get_tokenizer(path) is first
  _llama_style_tokenizer(tmp_path / 'tokenizer.json')  # another tokenizer in its place
  changed = data.get_tokenizer(path)
  assert changed is not first and changed.vocab_size != first.vocab_size


def test_hf_vocab_size_covers_its_largest_id_and_a_home_path_is_expanded(tmp_path,
                                                                         monkeypatch):
  hf = pytest.importorskip('tokenizers')
  tok = hf.Tokenizer(hf.models.WordLevel({'a': 0, 'b': 1, '<unk>': 2, 'c': 7, '</s>': 9},
                                         unk_token='<unk>'))
  tok.pre_tokenizer = hf.pre_tokenizers.Whitespace()
  (tmp_path / 'tok').mkdir()
  tok.save(str(tmp_path / 'tok' / 'tokenizer.json'))
  monkeypatch.setenv('HOME', str(tmp_path))
  tokenizer = data.get_tokenizer('~/tok/tokenizer.json')
  assert tokenizer.encode('a b c') == [0, 1, 7] and tokenizer.eod_id == 9
  assert tokenizer.vocab_size == 10 and len(tokenizer.byte_lengths) == 10


@pytest.mark.parametrize('style', ['gpt2', 'llama'])
def test_a_continuation_keeps_its_first_words_space(tmp_path, style):
  make = _gpt2_style_tokenizer if style == 'gpt2' else _llama_style_tokenizer
  tokenizer = data.get_tokenizer(make(tmp_path / 'tokenizer.json'))
  prompt = tokenizer.encode('the')
  if style == 'llama':  # '▁the ▁café' (the normalizer puts ▁ in front): decoded alone,
    new = tokenizer.encode('the café')  # the decoder strips the space it stands for
    assert tokenizer.decode(new) == 'the café'
  else:
    new = tokenizer.encode(' the café')
  assert tokenizers.decode_continuation(tokenizer, prompt, new) == ' the café'


def _sentencepiece_model(path, lines=None, **options):
  """A small BPE model with byte fallback, eos and pad, trained here on a few lines (or on
  `lines`, with trainer `options` changed)."""
  spm = pytest.importorskip('sentencepiece')
  lines = lines or ['the café is open', 'the cat sat on the mat', 'a ∑ of bytes ü'] * 50
  options = dict(dict(vocab_size=300, model_type='bpe', byte_fallback=True,
                      character_coverage=1.0, unk_id=0, eos_id=1, pad_id=2, bos_id=-1),
                 **options)
  with open(path, 'wb') as f:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f,
                                   minloglevel=2, **options)
  return str(path)


def test_sentencepiece_model_counts_bytes_and_decodes_continuations(tmp_path):
  tokenizer = data.get_tokenizer(_sentencepiece_model(tmp_path / 'sp.model'))
  assert (tokenizer.vocab_size, tokenizer.eod_id, tokenizer.pad_id) == (300, 1, 2)
  for text in ['the café the', 'the ∑', 'a\x00b ü', 'zebra ☃']:  # ☃, z: byte fallback
    ids = tokenizer.encode(text)
    # The '▁' SentencePiece puts in front of the text is counted, as with Llama's files.
    assert int(tokenizer.byte_lengths[ids].sum()) == len(text.encode()) + 1, (text, ids)
    assert tokenizer.decode(ids) == text
  # Its normaliser collapses runs of spaces and drops those at the ends: still counted.
  for text in ['the café the', '  the   cat\n\tsat ☃  ', ' ', '']:
    counts_the_text(tokenizer, text)
  assert tokenizer.decode(tokenizer.encode('the cat') + [tokenizer.eod_id]) == 'the cat'
  new = tokenizer.encode('cat sat')
  assert tokenizer.decode(new) == 'cat sat'  # decoded alone, the first word loses its space
  assert tokenizers.decode_continuation(tokenizer, tokenizer.encode('the'), new) == ' cat sat'


def test_a_continuation_ends_where_a_stop_text_is_first_complete(tmp_path):
  """`generate --stop`, as vLLM's: the text before the stop, and the ids up to the one that
  completes it (a stop text may end inside a token, or span tokens)."""
  tokenizer = data.get_tokenizer(_sentencepiece_model(tmp_path / 'sp.model'))
  prompt, new = tokenizer.encode('the'), tokenizer.encode('the cat sat on the mat')
  decode = functools.partial(tokenizers.decode_continuation, tokenizer, prompt)
  assert decode(new) == ' the cat sat on the mat'
  for stops, text in [(['sat'], ' the cat '), ([' on', 'at'], ' the c'),
                      # 'at s' is complete first, token by token, though it starts later
                      (['cat sat on', 'at s'], ' the c'),
                      (['dog'], ' the cat sat on the mat'), ([], ' the cat sat on the mat')]:
    ids, got = tokenizers.cut_at_stop_text(decode, new, stops)
    assert got == text, stops
    if len(ids) < len(new):  # the fewest ids whose text holds the stop
      assert any(stop in decode(ids) for stop in stops), stops
      assert not any(stop in decode(ids[:-1]) for stop in stops), stops
    else:
      assert ids == new
  # A stop that ends in a character of several bytes ends at that character's last byte:
  # its first decodes as U+FFFD, as long as the whole character (it was cut one id short).
  byte_level = tokenizers.ByteTokenizer()
  for text, stop, kept in (('xé', 'é', 3), ('a€b', '€', 4)):
    ids, got = tokenizers.cut_at_stop_text(byte_level.decode, list(text.encode()), [stop])
    assert (ids, got) == (list(text.encode())[:kept], text[:text.index(stop)]), text


def test_missing_or_garbled_tokenizer_files_are_config_errors(tmp_path):
  with pytest.raises(ValueError, match=r"data.tokenizer='/nowhere/tokenizer.json': no such"):
    data.get_tokenizer('/nowhere/tokenizer.json')
  (tmp_path / 'tokenizer.json').write_text('{"not": "a tokenizer"}')
  with pytest.raises(ValueError, match='cannot be read as a tokenizer file'):
    data.get_tokenizer(str(tmp_path / 'tokenizer.json'))


def test_hf_tokenizer_reads_special_token_text_as_text(tmp_path):
  tokenizer = data.get_tokenizer(_gpt2_style_tokenizer(tmp_path / 'tokenizer.json'))
  text = 'x = "<|endoftext|>"'  # as in many code files
  ids = tokenizer.encode(text)
  assert tokenizer.eod_id not in ids and tokenizer.decode(ids) == text


def test_processes_that_start_together_build_the_corpus_once(tmp_path):
  # Each process of a run opens the data; on a fresh data dir they all find it unbuilt.
  _write_corpus(tmp_path / 'corpus', num_docs=400, max_len=2000)
  script = ('import sys, json; from jaxarch import data; import ml_collections; '
            'cfg = ml_collections.ConfigDict(json.loads(sys.argv[1])); '
            "print(len(data.open_source(cfg, 'train')))")
  cfg = json.dumps(dict(source=f'files:{tmp_path}/corpus/*.txt', seq_len=16,
                        data_dir=str(tmp_path / 'data'), tokenizer='bytes',
                        validation_fraction=0.25, pack_align=1))
  runs = [subprocess.Popen([sys.executable, '-c', script, cfg], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for _ in range(3)]
  outputs = [run.communicate(timeout=300) for run in runs]
  assert [run.returncode for run in runs] == [0, 0, 0], [err[-500:] for _, err in outputs]
  assert len({out.split()[-1] for out, _ in outputs}) == 1  # the same documents


def test_building_a_source_in_python_logs_no_custom_configuration_warning(corpus, caplog):
  """TFDS's 'Using custom data configuration: FilesConfig(...)' came on every Python run;
  the command keeps absl's lines to errors, a notebook saw it each time."""
  cfg, _ = corpus
  with caplog.at_level('WARNING'):
    for _ in range(2):  # preparing, then reading what was prepared
      next(iter(data.make_train_dataset(cfg, seed=0, global_batch_size=4)))
  assert 'Using custom data configuration' not in caplog.text
  # The filter goes with the builder (a checkpoint manager's own filter, which any earlier
  # test that saved one leaves on the logger for the process, stays).
  assert not any(isinstance(f, sources._CustomConfigNote)  # pylint: disable=protected-access
                 for f in logging.getLogger('absl').filters)


def test_prepare_counts_the_documents_a_text_tokenizer_reads_with_replacement_characters(
    tmp_path, caplog):
  """A BPE or SentencePiece tokenizer reads stored bytes as UTF-8, each bad byte a U+FFFD:
  `prepare` says how many documents that is (the byte tokenizer reads them as they are)."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from jaxarch.data import summary  # pylint: disable=g-import-not-at-top
  (tmp_path / 'docs').mkdir()
  (tmp_path / 'docs' / 'latin1.txt').write_bytes('café au lait'.encode('latin-1'))
  (tmp_path / 'docs' / 'utf8.txt').write_text('café au lait')
  cfg = tiny_config(**{'data.source': f'files:{tmp_path}/docs/*',
                       'data.data_dir': str(tmp_path / 'data'),
                       'data.validation_fraction': 0.0,
                       'data.tokenizer': _gpt2_style_tokenizer(tmp_path / 'bpe.json')})
  (row,) = summary.summarize(cfg)
  assert row['train']['not_utf8_documents'] == 1
  assert '1 of its train documents is not UTF-8' in caplog.text
  caplog.clear()
  with cfg.unlocked():
    cfg.data.tokenizer = 'bytes'
  (row,) = summary.summarize(cfg)
  assert 'not_utf8_documents' not in row['train'] and 'UTF-8' not in caplog.text


def test_the_glob_matcher_takes_what_glob_lists(tmp_path):
  """`files_taken_from` asks of files not yet written whether a `files:` glob would list
  them: the same answer as `glob.glob(recursive=True)` gives once they exist (hidden names
  only where a part starts with '.', `**` through no hidden folder)."""
  import glob  # pylint: disable=g-import-not-at-top
  from jaxarch.data.sources import _glob_matches  # pylint: disable=g-import-not-at-top
  files = ['a.txt', 'b.py', '.h.txt', 'sub/c.txt', 'sub/deep/d.json', 'sub/.hid/e.txt',
           'run/config.json', 'run/checkpoints/1/state/m', '.hd/f.txt', 'sub/deep/.g']
  for name in files:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text('x')
  for pattern in ['*', '*.txt', '**/*', '**/*.txt', '**', 'sub/*', 'sub/**/*.json', '*/*.json',
                  '**/config.json', '.*', '**/.*/*', 's?b/*.txt', '[ab].*', '.hd/**', '**/.g',
                  'sub/**', '**/**/*.txt']:
    listed = {p for p in glob.glob(str(tmp_path / pattern), recursive=True)
              if os.path.isfile(p)}
    assert listed == {str(tmp_path / name) for name in files if _glob_matches(
        (tmp_path / pattern).parts, (tmp_path / name).parts)}, pattern
