"""Document sources: TFDS builders that write array_record once, read back by index.

`data.source` picks one of these corpora:

  default          the `.py` files of the running interpreter's standard library, so
                   that training works with no download (about 30 MB of real text);
  files:<glob>     local text files; a `.jsonl` (or `.jsonl.gz`) file is one document a
                   line, the line's `data.text_key` (default `text`), a `.parquet` or
                   `.arrow` file (a Hugging Face dataset's) one a row, its `data.text_key`
                   column;
  tfds:<name>      any TFDS dataset already prepared (as array_record) in the data dir;
                   `tfds:huggingface:<owner>__<repo>` is read from its files offline;
  distilled:<dir>  token sequences (a prompt and a model's greedy continuation) written
                   by `jaxarch distill` into <dir> (`Distilled`); BiTA trains on them.

A mixture of the first three (`SOURCE,WEIGHT;SOURCE,WEIGHT`) opens each source on its own
(`mixture_configs`); the pipeline mixes them.

The first two are `GeneratorBasedBuilder`s that TFDS prepares without TensorFlow into the
data directory (`data.data_dir`, else $JAXARCH_DATA_DIR, else the user's cache dir). TFDS
writes into an `incomplete.*` directory and renames it when done, so an interrupted build
leaves nothing that looks finished, and a finished one is never built again. A file is one
document (a JSON lines file one a line, a Parquet or Arrow file one a row); a file over
`DOCUMENT_BYTES` is several, cut just after a newline, so that a corpus of one big file
(enwik8, a book) shuffles, gives the rows of a batch different text, has a validation
split, and is never held in memory whole. Documents are split into train and validation by
a hash of the file's relative path (with `#i` for piece i of a big file, `:n` for record n
of a JSON lines, Parquet or Arrow file), so the split is stable across machines and runs.
Other compressed files are refused: their bytes are not text. The builder config name
carries everything the content depends on (interpreter version, or a hash of the glob and
the files' sizes and mtimes, and the validation fraction), so a change gets a fresh cache
entry.
"""

import contextlib
import dataclasses
import difflib
import fnmatch
import functools
import glob as globlib
import gzip
import hashlib
import importlib
import itertools
import json
import logging
import os
import pathlib
import platform
import re
import sys
import sysconfig
import zlib
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxarch.config import (DATA_SOURCE_ERROR, ConfigError, MixtureComponent, data_mixture,
                            distill_summary)
from jaxarch import oserrors
from jaxarch.oserrors import explained_write_errors

log = logging.getLogger(__name__)

_NOT_STDLIB = ('site-packages', 'dist-packages', '__pycache__')
# Files longer than this are read as pieces of about this size (the stdlib has none).
DOCUMENT_BYTES = 1 << 20
# How far past a piece's nominal start a newline is looked for; without one it starts on
# the UTF-8 character there.
_NEWLINE_SEARCH = 1 << 16
DISTILLED = 'distilled:'
HUGGINGFACE = 'huggingface:'  # a TFDS namespace: tfds:huggingface:<owner>__<repo>
# JSON lines (Levanter's, Dolma's corpora): a document a line, the line's `data.text_key`;
# Parquet and Arrow (Hugging Face datasets': FineWeb's, ...): a document a row, that column.
JSONL = ('.jsonl', '.jsonl.gz')
PARQUET = ('.parquet',)
TABLES = PARQUET + ('.arrow',)  # and Arrow stream files (`datasets`' save_to_disk, cache)
RECORDS = JSONL + TABLES
# Compressed files that are not JSON lines: read as text, they would train on their bytes.
_COMPRESSED = ('.gz', '.bz2', '.xz', '.zst', '.zip', '.lz4', '.7z', '.tgz')



def resolve_data_dir(cfg_value: str | None) -> pathlib.Path:
  """`data.data_dir`, else $JAXARCH_DATA_DIR, else ($XDG_CACHE_HOME or ~/.cache)/jaxarch/data."""
  if cfg_value:
    return pathlib.Path(cfg_value).expanduser()
  if os.environ.get('JAXARCH_DATA_DIR'):
    return pathlib.Path(os.environ['JAXARCH_DATA_DIR']).expanduser()
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache')
  return pathlib.Path(cache).expanduser() / 'jaxarch' / 'data'


# A `validation_fraction` above this that draws every document of a corpus leaves them all
# in validation; at or below it, such a corpus (a file or two) trains on them instead.
EVAL_SET_FRACTION = 0.5


def is_validation(relative_path: str, validation_fraction: float) -> bool:
  """Whether a document belongs to the validation split; depends only on its name (the
  file's relative path, and `#i` for piece i of a file over `DOCUMENT_BYTES`)."""
  return zlib.crc32(relative_path.encode('utf-8')) / 2**32 < validation_fraction


def num_pieces(size: int) -> int:
  """The documents a file of `size` bytes is read as."""
  return max(1, -(-size // DOCUMENT_BYTES))


def _piece_start(file, index: int, size: int) -> int:
  """Where piece `index` of a file starts: just after the first newline from its nominal
  start `index · DOCUMENT_BYTES` on (within `_NEWLINE_SEARCH` bytes), else on the first
  byte of the UTF-8 character that holds the nominal start (looking back, so that a
  character ending the file is never cut). Never past the nominal start's byte, so no
  piece is empty, and the pieces are in order."""
  if index == 0:
    return 0
  nominal = index * DOCUMENT_BYTES
  file.seek(nominal - 1)
  window = file.read(min(_NEWLINE_SEARCH, size - nominal))  # up to the last byte but one
  newline = window.find(b'\n')
  if newline >= 0:
    return nominal + newline
  file.seek(nominal - 3)
  head = file.read(4)  # the nominal start's byte and the 3 before it
  back = 0  # bytes 10xxxxxx continue the character before them
  while back < 3 and head[3 - back] & 0xC0 == 0x80:
    back += 1
  return nominal - back


@dataclasses.dataclass(eq=False, repr=False)
class FilesConfig(tfds.core.BuilderConfig):
  """The files of one corpus: their common root and paths relative to it."""

  root: str = ''
  files: tuple[str, ...] = ()
  validation_fraction: float = 0.05
  text_key: str = 'text'  # of a JSON lines file's records, a Parquet or Arrow file's column

  def __repr__(self) -> str:  # TFDS logs it on every open; keep thousands of paths out.
    return f'FilesConfig({self.name!r}, root={self.root!r})'


def _json_lines(path: pathlib.Path, name: str):
  """(line number, bytes) of each non-blank line of a JSON lines file (gzip'd if `.gz`);
  a file that cannot be read (a damaged gzip) is a config error naming the line."""
  n = 0
  try:
    with gzip.open(path, 'rb') if name.endswith('.gz') else open(path, 'rb') as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          yield n, line
  except (OSError, EOFError, zlib.error) as e:  # a damaged gzip file
    raise ConfigError(f'config error: data.source file {str(path)!r}, line {n + 1} cannot be '
                      f'read ({e})') from None


def _a(noun: str) -> str:
  """'an int', 'a float'."""
  return f'{"an" if noun[:1] in "aeiou" else "a"} {noun}'


def _json_text(path: pathlib.Path, n: int, line: bytes, text_key: str) -> str:
  """Line n's `text_key`; a line that is not an object with a string there is a config
  error naming it."""
  where = f'config error: data.source file {str(path)!r}, line {n}'
  try:
    record = json.loads(line)
  except ValueError as e:  # a UnicodeDecodeError is one too
    raise ConfigError(f'{where} is not JSON ({str(e).splitlines()[0]})') from None
  if not isinstance(record, dict):
    raise ConfigError(f'{where} is a JSON {type(record).__name__}, not an object')
  if text_key not in record:
    raise ConfigError(f'{where} has no key {text_key!r} (it has {list(record)[:8]}); '
                      'name the key of the text with --config.data.text_key=KEY')
  if not isinstance(record[text_key], str):
    raise ConfigError(f'{where}: {text_key!r} is {_a(type(record[text_key]).__name__)}, not '
                      'a string')
  return record[text_key]


def _table_batches(path: pathlib.Path, text_key: str, text: bool = True):
  """The record batches of a Parquet file or an Arrow file (the stream format `datasets`'
  save_to_disk and cache write, or the file format, Feather v2, that begins with ARROW1),
  a batch of rows of the column `text_key` at a time (without `text`, of no column: a
  Parquet file then decompresses nothing); a file without that string column is a config
  error naming it."""
  import pyarrow  # pylint: disable=g-import-not-at-top  (tensorflow-datasets needs it too)
  import pyarrow.ipc  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet  # pylint: disable=g-import-not-at-top
  kind = 'Parquet' if path.name.endswith(PARQUET) else 'Arrow'
  where = f'config error: data.source file {str(path)!r}'
  try:
    with contextlib.ExitStack() as stack:
      if kind == 'Parquet':
        table = pyarrow.parquet.ParquetFile(path)
        schema = table.schema_arrow
        batches = lambda: table.iter_batches(batch_size=1024,
                                             columns=[text_key] if text else [])
      else:
        source = stack.enter_context(pyarrow.memory_map(str(path)))
        if source.read(6) == b'ARROW1':  # the file format's magic; a stream has none
          reader = pyarrow.ipc.open_file(source)
          stream = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
          source.seek(0)
          reader = stack.enter_context(pyarrow.ipc.open_stream(source))
          stream = iter(reader)
        schema = reader.schema
        batches = lambda: (batch.select([text_key] if text else []) for batch in stream)
      if text_key not in schema.names:
        raise ConfigError(f'{where} has no column {text_key!r} (it has {schema.names[:8]}); '
                          'name the column of the text with --config.data.text_key=KEY')
      column = schema.field(text_key).type
      if not (pyarrow.types.is_string(column) or pyarrow.types.is_large_string(column)):
        raise ConfigError(f'{where}: column {text_key!r} is {column}, not a string')
      yield from batches()
  except (OSError, pyarrow.ArrowException) as e:  # not that format, or damaged
    raise ConfigError(f'{where} cannot be read as {kind} ({str(e).splitlines()[0]})'
                      ) from None


def _record_numbers(path: pathlib.Path, name: str, text_key: str) -> np.ndarray:
  """The numbers of a JSON lines, Parquet or Arrow file's records (`RECORDS`): its
  non-blank lines, or its rows 1..n; their text is not read."""
  if name.endswith(TABLES):
    return np.arange(1, sum(b.num_rows for b in _table_batches(path, text_key, text=False))
                     + 1)
  return np.fromiter((n for n, _ in _json_lines(path, name)), np.int64)


def _records(path: pathlib.Path, name: str, text_key: str, wanted: np.ndarray):
  """(number, text) of the records of a JSON lines, Parquet or Arrow file numbered
  `wanted` (`_record_numbers`, sorted): each split reads only its own, so preparing a
  corpus parses each record once. A null row, or a line without a string `text_key`, is
  a config error naming it."""
  if name.endswith(TABLES):
    n = 0  # rows before this batch
    for batch in _table_batches(path, text_key):
      lo, hi = np.searchsorted(wanted, [n + 1, n + batch.num_rows + 1])
      numbers = wanted[lo:hi]  # this batch's wanted rows
      rows = numbers - (n + 1)
      n += batch.num_rows
      if rows.size:
        for number, text in zip(numbers.tolist(), batch.column(0).take(rows).to_pylist()):
          if text is None:
            raise ConfigError(f'config error: data.source file {str(path)!r}, row {number}: '
                              f'{text_key!r} is null, not a string')
          yield number, text
    return
  i = 0  # the next wanted number's place in `wanted`
  for n, line in _json_lines(path, name):
    if i < wanted.size and n == wanted[i]:
      i += 1
      yield n, _json_text(path, n, line, text_key)


class _TextFilesBuilder(tfds.core.GeneratorBasedBuilder):
  """One example per file, per piece of a file over `DOCUMENT_BYTES`, per line of a JSON
  lines file or per row of a Parquet or Arrow file: `{'text': raw bytes}`, split into
  train/validation by name (`is_validation`)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'One document per file.',
                   '1.1.0': 'Files over DOCUMENT_BYTES are read as pieces, cut at newlines.'}
  # Nothing is downloaded, so there is no checksums file to look up next to the code; TFDS
  # 4.9.10 would otherwise need the undeclared `importlib_resources` package to find it.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _files(self) -> list[str]:
    """Paths relative to `builder_config.root` of the files to read."""
    return list(self.builder_config.files)

  # TFDS's own lines say 'Downloading and preparing dataset Unknown size (download:
  # Unknown size, ...)': nothing is downloaded here. (Its methods; a TFDS without them
  # prints nothing.)
  def _log_download_bytes(self) -> None:
    print(f'jaxarch: preparing the documents under {self.builder_config.root} into '
          f'{self.data_dir} (once; later runs read them there)')

  def _log_download_done(self) -> None:
    print(f'jaxarch: prepared {self.data_dir}')

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    fraction = self.builder_config.validation_fraction
    root = pathlib.Path(self.builder_config.root)
    documents = []  # (name, file, its size, piece index); of a file of records (RECORDS),
    lines = {}  # its records: file -> (numbers [n], validation [n]), listed unparsed here
    for f in self._files():
      if f.endswith(RECORDS):
        numbers = _record_numbers(root / f, f, self.builder_config.text_key)
        lines[f] = (numbers, np.array([is_validation(f'{f}:{n}', fraction)
                                       for n in numbers.tolist()], bool))
        continue
      size = (root / f).stat().st_size
      pieces = num_pieces(size)
      documents += [(f if pieces == 1 else f'{f}#{i}', f, size, i) for i in range(pieces)]
    val = [d for d in documents if is_validation(d[0], fraction)]
    train = [d for d in documents if not is_validation(d[0], fraction)]
    val += [(None, f, None, n[held]) for f, (n, held) in lines.items() if held.any()]
    train += [(None, f, None, n[~held]) for f, (n, held) in lines.items() if (~held).any()]
    # A corpus of one or two small files must still be trainable; above half, the fraction
    # asks for an eval set (a source of weight 0), which keeps every document it drew.
    if not train and fraction <= EVAL_SET_FRACTION:
      train, val = val, []
    # TFDS refuses to write an empty split; open_source reads a missing one as empty.
    splits = {'train': train, 'validation': val}
    return {k: self._generate_examples(v) for k, v in splits.items() if v}

  def _generate_examples(self, documents):
    root = pathlib.Path(self.builder_config.root)
    for name, f, size, index in documents:
      if name is None:  # these records of a JSON lines, Parquet or Arrow file
        for n, text in _records(root / f, f, self.builder_config.text_key, index):
          # A lone surrogate (JSON's "\ud800") is no character: '?'.
          yield f'{f}:{n}', {'text': text.encode('utf-8', errors='replace')}
        continue
      try:
        with open(root / f, 'rb') as file:
          start = _piece_start(file, index, size)
          end = size if index + 1 == num_pieces(size) else _piece_start(file, index + 1, size)
          file.seek(start)
          text = file.read(end - start)
      except OSError as e:  # made unreadable, or removed, since the corpus was listed
        raise ConfigError(f'config error: data.source file {str(root / f)!r} cannot be read '
                          f'({e.strerror or e})') from None
      yield name, {'text': text}


class PythonStdlib(_TextFilesBuilder):
  """The `.py` files of the running interpreter's standard library."""

  def _files(self) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(self.builder_config.root):
      dirnames[:] = sorted(d for d in dirnames if d not in _NOT_STDLIB)
      rel = os.path.relpath(dirpath, self.builder_config.root)
      files += [os.path.normpath(os.path.join(rel, f)) for f in sorted(filenames)
                if f.endswith('.py')]
    return files


class TextFiles(_TextFilesBuilder):
  """Local text files matched by a glob."""


def _stdlib_config(validation_fraction: float) -> FilesConfig:
  """Names the corpus by interpreter version; the files are listed only when building."""
  name = (f'{platform.python_implementation().lower()}{platform.python_version()}'
          f'-val{validation_fraction:g}')
  return FilesConfig(name=name, root=sysconfig.get_paths()['stdlib'],
                     validation_fraction=validation_fraction)


def _files_config(source: str, pattern: str, validation_fraction: float,
                  text_key: str | None = None) -> FilesConfig:
  # A set: a symlink into the glob, or a second `**`, lists a file again.
  paths = sorted({pathlib.Path(p).resolve()
                  for p in globlib.glob(os.path.expanduser(pattern), recursive=True)})
  paths = [p for p in paths if p.is_file()]
  if not paths:
    hint = ''
    if os.path.isdir(os.path.expanduser(pattern)):
      hint = f"; for the files under that directory use 'files:{pattern.rstrip('/')}/**/*'"
    elif re.search(r',\s*[\d.]+\s*(,\s*\w+\s*)?$', pattern):
      hint = ("; a weight belongs to a mixture of two or more sources joined by ';' "
              "('SOURCE,WEIGHT;SOURCE,WEIGHT'): give one source alone, without it")
    raise ConfigError(f'config error: data.source={source!r}: no files match the glob '
                     f'{pattern!r}{hint}')
  unreadable = [p for p in paths if not os.access(p, os.R_OK)]
  if unreadable:
    raise ConfigError(f'config error: data.source={source!r}: {len(unreadable)} of the '
                      f'files cannot be read (permission denied), e.g. {str(unreadable[0])!r}; '
                      'make them readable or narrow the glob')
  for p in paths:
    try:
      str(p).encode('utf-8')
    except UnicodeEncodeError:
      raise ConfigError(f'config error: data.source={source!r}: the file name {str(p)!r} is '
                        'not UTF-8 (documents are named by their paths); rename it or '
                        'narrow the glob') from None
  compressed = [p for p in paths if p.name.endswith(_COMPRESSED) and
                not p.name.endswith(RECORDS)]
  if compressed:
    raise ConfigError(f'config error: data.source={source!r}: {len(compressed)} of the files '
                      f'{"is" if len(compressed) == 1 else "are"} compressed, e.g. '
                      f'{str(compressed[0])!r}, and would be read as their compressed bytes; '
                      "decompress them (JSON lines may stay gzip'd as .jsonl.gz) or narrow the "
                      'glob')
  stats = [p.stat() for p in paths]  # once: a corpus may be a million files
  if not any(st.st_size for st in stats):
    raise ConfigError(f'config error: data.source={source!r}: '
                      + (f'the file matching {pattern!r} is empty' if len(paths) == 1 else
                         f'the {len(paths)} files matching {pattern!r} are all empty')
                      + '; there is nothing to train on')
  root = _glob_root(pattern, paths)
  files = tuple(str(p.relative_to(root)) for p in paths)
  _check_piece_names(source, {f: st.st_size for f, st in zip(files, stats)})
  rule = 'split by path from the glob\'s root'
  if validation_fraction > EVAL_SET_FRACTION:  # (below, the names of before stand)
    rule += ', a corpus all in validation kept so'
  key = hashlib.sha256(repr((pattern, validation_fraction, rule)).encode())
  for p, st in zip(paths, stats):
    key.update(f'{p}\0{st.st_size}\0{st.st_mtime_ns}\0'.encode())
  text_key = text_key or 'text'
  if any(f.endswith(RECORDS) for f in files):  # (a corpus without them keeps its name)
    key.update(f'text_key\0{text_key}'.encode())
  return FilesConfig(name=f'files-{key.hexdigest()[:16]}', root=str(root), files=files,
                     validation_fraction=validation_fraction, text_key=text_key)


def _check_piece_names(source: str, sizes: dict[str, int]) -> None:
  """Refuses a corpus where a piece of a big file (`name#i`) or a record of a JSON lines,
  Parquet or Arrow file (`name:n`) is named like another file: both would be one document
  name (TFDS refuses duplicate keys with a traceback)."""
  for name in sizes:
    if (m := re.fullmatch(r'(.*):\d+', name)) and m[1] in sizes and m[1].endswith(RECORDS):
      raise ConfigError(f'config error: data.source={source!r}: the records of {m[1]!r} are '
                        f'named {m[1]}:1, {m[1]}:2, ...; the file {name} has one of those '
                        'names: rename it or narrow the glob')
  for name, size in sizes.items():
    for i in range(num_pieces(size) if size > DOCUMENT_BYTES and not name.endswith(RECORDS)
                   else 0):  # (a file of records is not cut into pieces)
      if f'{name}#{i}' in sizes:
        raise ConfigError(f'config error: data.source={source!r}: the file {name!r} is over '
                          f'{DOCUMENT_BYTES} bytes, so its pieces are named {name}#0, '
                          f'{name}#1, ...; the file {name}#{i} has one of those names: '
                          'rename it or narrow the glob')


def files_taken_from(data_cfg, folder: str | os.PathLike, names: Sequence[str]
                     ) -> tuple[str, pathlib.Path] | None:
  """(a source, a path) where a `files:` glob of `data.source` takes one of `names` in
  `folder`, as it would once they are written (a run's own files in its workdir); else
  None."""
  for component, _ in mixture_configs(data_cfg):
    if not component.source.startswith('files:'):
      continue
    pattern = os.path.abspath(os.path.expanduser(component.source[len('files:'):]))
    for name in names:
      for path in dict.fromkeys([pathlib.Path(folder).absolute() / name,  # as given, then
                                 pathlib.Path(folder).resolve() / name]):  # links followed
        if _glob_matches(pathlib.PurePath(pattern).parts, path.parts):
          return component.source, path
  return None


def _glob_matches(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
  """Whether `glob.glob(pattern, recursive=True)` lists `path` (both split in parts) once
  it exists: `**` is any number of names, none hidden; another part matches one name,
  which starts with '.' only where the part does."""
  if not pattern:
    return not path
  if pattern[0] == '**':  # no hidden folder or file among the names it stands for
    ends = itertools.takewhile(lambda i: i == 0 or not path[i - 1].startswith('.'),
                               range(len(path) + 1))
    return any(_glob_matches(pattern[1:], path[i:]) for i in ends)
  return bool(path) and (not path[0].startswith('.') or pattern[0].startswith('.')) and (
      fnmatch.fnmatchcase(path[0], pattern[0])) and _glob_matches(pattern[1:], path[1:])


def _glob_root(pattern: str, paths: list[pathlib.Path]) -> pathlib.Path:
  """The folder a glob starts from (`a/b` of `a/b/**/*.txt`), which files added later share:
  paths relative to it, and so the validation split, stay as they are when a new
  subfolder appears (the files' common folder would move). Their common folder if they
  are not all under it (symlinks resolved elsewhere)."""
  fixed = []
  for part in pathlib.Path(os.path.expanduser(pattern)).parts[:-1]:
    if globlib.has_magic(part):
      break
    fixed.append(part)
  root = pathlib.Path(*fixed).resolve() if fixed else pathlib.Path.cwd()
  if all(p.is_relative_to(root) for p in paths):
    return root
  return pathlib.Path(os.path.commonpath([p.parent for p in paths]))


class TextSource:
  """Random access to documents as the `bytes` stored (text features UTF-8 encoded), over
  a TFDS array_record data source: a byte model reads files as they are, even those that
  are not UTF-8; other tokenizers decode them (`tokenizers.as_text`)."""

  def __init__(self, source, key: str, damaged: str = ''):
    self._source = source
    self._key = key
    self._damaged = damaged  # what to do when the prepared files cannot be read

  def __len__(self) -> int:
    return len(self._source)

  def _document(self, record) -> bytes:
    text = record[self._key]
    return text if isinstance(text, bytes) else str(text).encode('utf-8')

  def __getitem__(self, index: int) -> bytes:
    with self._reading():
      return self._document(self._source[index])

  def __getitems__(self, indices) -> list[bytes]:
    if hasattr(self._source, '__getitems__'):
      with self._reading():
        return [self._document(r) for r in self._source.__getitems__(indices)]
    return [self[i] for i in indices]

  @contextlib.contextmanager
  def _reading(self):
    """array_record reads lazily: a truncated or deleted file shows at the first read."""
    try:
      yield
    except (RuntimeError, OSError) as e:
      raise ConfigError(f'the prepared dataset cannot be read ({str(e).splitlines()[0]}); '
                        f'{self._damaged}') from None

  def __repr__(self) -> str:
    return f'TextSource({self._source!r}, key={self._key!r})'


class RecordSource(TextSource):
  """The records as they are (a `distilled:` source's sequences), read as `TextSource`
  reads: a damaged or deleted file is one line that says what to do."""

  def _document(self, record):
    return record


def _text_key(builder, source: str, text_key: str | None) -> str:
  """The feature of a TFDS dataset's examples to read: `data.text_key`, else `text`, else
  its only text feature (a dataset with a title and a body must say which)."""
  features = builder.info.features
  texts = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
  if text_key is not None:
    if text_key not in features:
      raise ConfigError(f'config error: data.text_key={text_key!r} is not a feature of '
                        f'data.source={source!r}; its features are {list(features)}')
    if text_key not in texts:  # token ids or numbers would be read as their str()
      raise ConfigError(f'config error: data.text_key={text_key!r} of data.source={source!r} '
                        f'is a {type(features[text_key]).__name__} feature, not text; its '
                        f'text features are {texts}')
    return text_key
  if 'text' in features:
    return 'text'
  if len(texts) == 1:
    return texts[0]
  what = f'has text features {texts}, none named' if texts else 'has no feature'
  raise ConfigError(f"config error: data.source={source!r} {what} 'text'; its features are "
                    f'{list(features)}: name the one to read with --config.data.text_key=NAME')


@dataclasses.dataclass(eq=False, repr=False)
class SequencesConfig(tfds.core.BuilderConfig):
  """Token sequences per split, held in memory while the dataset is written."""

  splits: dict | None = None  # split -> list of (tokens [n] int32, prompt_length)

  def __repr__(self) -> str:
    return f'SequencesConfig({self.name!r})'


class Distilled(tfds.core.GeneratorBasedBuilder):
  """A model's greedy continuations of prompts from its data: `{'tokens': prompt then
  continuation, 'prompt_length'}`, one example per prompt."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = None  # see _TextFilesBuilder

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=tfds.features.FeaturesDict({
            'tokens': tfds.features.Tensor(shape=(None,), dtype=np.int32),
            'prompt_length': np.int32}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {k: self._generate_examples(v) for k, v in self.builder_config.splits.items()
            if v}

  def _generate_examples(self, sequences):
    for i, (tokens, prompt_length) in enumerate(sequences):
      yield i, {'tokens': np.asarray(tokens, np.int32), 'prompt_length': prompt_length}

  def _log_download_bytes(self) -> None:  # see _TextFilesBuilder
    print(f'jaxarch: writing the distilled sequences into {self.data_dir}')

  def _log_download_done(self) -> None:
    pass  # `jaxarch distill` says what it wrote


def write_distilled(directory: str | os.PathLike, splits: dict) -> pathlib.Path:
  """Writes `splits` (split -> [(tokens, prompt_length)]) as the array_record dataset that
  `data.source='distilled:<directory>'` reads; TFDS makes it appear only when complete."""
  check_no_distilled(directory)
  builder = _distilled_builder(directory, splits)
  with _tfds_output_on_stderr():
    builder.download_and_prepare()
  return pathlib.Path(builder.data_dir)


def _distilled_builder(directory, splits: dict) -> 'Distilled':
  with _without_custom_config_note():
    return Distilled(config=SequencesConfig(name='greedy', splits=splits),
                     data_dir=str(directory), file_format='array_record')


def check_no_distilled(directory: str | os.PathLike) -> None:
  """Raises FileExistsError if `directory` holds a distilled dataset already (checked
  before the generation that would fill it, which may take hours)."""
  if pathlib.Path(directory).exists() and not pathlib.Path(directory).is_dir():
    raise FileExistsError(f'{directory} is a file; distill into a new directory')
  builder = _distilled_builder(directory, {})
  if builder.is_prepared():
    raise FileExistsError(f'{builder.data_dir} exists already; distill into a new directory')


def _check_room_for_continuations(data_cfg) -> None:
  """Rows keep a sequence's first `seq_len` tokens: prompts that fill them leave no
  continuation to train on (BiTA's first mask needs the token two past its anchor)."""
  try:
    prompt_len = int(distill_summary(data_cfg.source)['prompt_len'])
  except (ValueError, KeyError, TypeError):
    return  # written by hand, without a summary: nothing to check against
  if prompt_len + 2 > data_cfg.seq_len:
    raise ConfigError(f'config error: data.source={data_cfg.source!r} holds prompts of up to '
                      f'{prompt_len} tokens (its distill.json), which leave no continuation '
                      f'in rows of data.seq_len={data_cfg.seq_len}; raise data.seq_len above '
                      f'{prompt_len + 1} or distill with a shorter --prompt_len')


def open_sequences(data_cfg, split: str):
  """`split` of a `distilled:<dir>` source: records `{'tokens', 'prompt_length'}`."""
  source = data_cfg.source
  directory = pathlib.Path(source[len(DISTILLED):]).expanduser()
  prepared = directory / 'distilled' / 'greedy' / str(Distilled.VERSION)
  if not (prepared / 'dataset_info.json').is_file():
    raise ConfigError(f'config error: data.source={source!r}: no distilled dataset in '
                      f'{directory}; write one with `jaxarch distill --workdir=BASE '
                      f'--out={directory}`')
  _check_room_for_continuations(data_cfg)
  builder = tfds.builder_from_directory(str(prepared))
  if split not in builder.info.splits:
    return []
  return RecordSource(builder.as_data_source(split=split), '',
                      f'data.source={source!r} is damaged in {prepared}; delete {directory} '
                      'and distill it again')


def _prepared_in_tfds_dirs(name: str, data_dir: pathlib.Path) -> str | None:
  """TFDS's own data dir ($TFDS_DATA_DIR, else ~/tensorflow_datasets, and those added) in
  which `name` is prepared, if any: where TFDS downloads put a dataset, not jaxarch's."""
  for other in tfds.core.utils.file_utils.list_data_dirs():
    if pathlib.Path(other).expanduser().resolve() == data_dir.expanduser().resolve():
      continue
    try:
      builder = _builder(name, pathlib.Path(other))
      if builder is not None and builder.is_prepared():
        return str(other)
    except Exception:  # pylint: disable=broad-except  (not there, or unreadable: no hint)
      continue
  return None


# TFDS imports its datasets' modules in one block when it is imported, which stops at the
# first that fails: `nearest_neighbors` needs h5py, which TFDS does not install, so c4,
# wikipedia, wiki40b and the other text datasets after it were never registered ("TFDS has
# no dataset 'c4/en'"). Each is imported here on its own; one whose packages are missing
# is left out.
_TFDS_DATASET_MODULES = (
    'audio', 'graphs', 'image', 'image_classification', 'object_detection',
    'nearest_neighbors', 'question_answering', 'd4rl', 'ranking', 'recommendation',
    'rl_unplugged', 'rlds.datasets', 'robotics', 'robomimic', 'structured', 'summarization',
    'text', 'text_simplification', 'time_series', 'translate', 'video', 'vision_language')


@functools.cache
def _register_tfds_datasets() -> None:
  for module in _TFDS_DATASET_MODULES:
    try:
      importlib.import_module(f'tensorflow_datasets.{module}')
    except Exception:  # pylint: disable=broad-except  (its own packages missing)
      continue


def _builder(name: str, data_dir: pathlib.Path):
  """TFDS's builder of `name` in `data_dir`; for a `huggingface:` dataset, its prepared copy
  there, or None. TFDS's own builder of a Hugging Face dataset asks the Hub for the
  repository's metadata before it looks at the disk (and needs the `datasets` package), so
  where there is no network, as on most pods, it fails even for a copy prepared already.
  The copy is where that builder writes it: `<data_dir>/<name>[/<config>]/<version>`."""
  if not name.startswith(HUGGINGFACE):
    _register_tfds_datasets()
    return tfds.builder(name, data_dir=str(data_dir))
  try:
    return tfds.core.read_only_builder.builder_from_files(name[len(HUGGINGFACE):],
                                                          data_dir=str(data_dir))
  except tfds.core.registered.DatasetNotFoundError:
    return None


def _how_to_prepare(name: str, data_dir: pathlib.Path, builder=None) -> str:
  """The command that prepares `name`; it imports the module of its builder (`builder`),
  which a bare `import tensorflow_datasets` may not have registered (c4's, or a plugin's)."""
  module = getattr(type(builder), '__module__', '__main__')
  also = f', {module}' if module not in ('__main__', 'builtins') else ''
  command = (f"python -c \"import tensorflow_datasets as tfds{also}; tfds.builder('{name}', "
             f"data_dir='{data_dir}', file_format='array_record').download_and_prepare()\"")
  if not name.startswith(HUGGINGFACE):
    return f'prepare it once as array_record with: {command}'
  return (f'prepare it once as array_record, where the Hugging Face Hub can be reached and '
          f'with `pip install datasets` (a repo owner/name is named owner__name), by: '
          f'{command}; then copy '
          f'{_huggingface_folder(name, data_dir)} here if that was another machine')


def _huggingface_folder(name: str, data_dir: pathlib.Path) -> pathlib.Path:
  return data_dir / re.split('[/:]', name[len(HUGGINGFACE):])[0]


def _prepared_elsewhere_in(name: str, data_dir: pathlib.Path) -> str:
  """The configs and versions of a `huggingface:` dataset that are prepared, when the one
  named is not: TFDS finds a copy only at the config and version asked for (or the only
  config's latest version)."""
  if not name.startswith(HUGGINGFACE):
    return ''
  folder = _huggingface_folder(name, data_dir)
  found = sorted(str(info.parent.relative_to(folder))
                 for info in folder.glob('**/dataset_info.json'))
  return (f' ({folder} holds {", ".join(found)}: name the one to read as '
          'tfds:huggingface:<dataset>[/<config>][:<version>])') if found else ''


class _Records:
  """The records of a data source at `indices` (a split carved out of another)."""

  def __init__(self, source, indices: np.ndarray):
    self._source = source
    self._indices = indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    return self._source[int(self._indices[index])]

  def __getitems__(self, indices):
    wanted = [int(self._indices[i]) for i in indices]
    if hasattr(self._source, '__getitems__'):
      return self._source.__getitems__(wanted)
    return [self._source[i] for i in wanted]

  def __repr__(self) -> str:
    return f'_Records({self._source!r}, {len(self)} of {len(self._source)})'


def _held_out(records, split: str, fraction: float) -> _Records:
  """`split` ('train' or 'validation') of records that come as one split, by a hash of
  each record's index (splitmix64, vectorized: millions of records in well under a
  second), so the split stays put across runs."""
  x = np.arange(len(records), dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  x ^= x >> np.uint64(31)
  held_out = (x >> np.uint64(11)).astype(np.float64) / 2**53 < fraction
  return _Records(records, np.flatnonzero(held_out == (split == 'validation')))


def _tfds_source(source: str, name: str, data_dir: pathlib.Path, split: str,
                 text_key: str | None, validation_fraction: float) -> TextSource:
  try:
    builder = _builder(name, data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    if (other := _prepared_in_tfds_dirs(name, data_dir)) is not None:
      raise ConfigError(f'config error: data.source={source!r} is not in the data directory '
                        f'{data_dir} but in TFDS\'s {other}: set '
                        f'--config.data.data_dir={other}') from None
    close = difflib.get_close_matches(name.split('/')[0].split(':')[0],
                                      tfds.list_builders(with_community_datasets=False), n=3)
    hint = f' (did you mean {", ".join(close)}?)' if close else ''
    raise ConfigError(f'config error: data.source={source!r}: TFDS has no dataset {name!r}'
                      f'{hint}; see `tfds.list_builders()`') from e
  except (ValueError, AssertionError) as e:  # a config or version it lacks, a malformed name
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    why = re.sub(r'^Failed to construct dataset .*?builder_kwargs ".*?": ', '', why)
    raise ConfigError(f'config error: data.source={source!r}: TFDS cannot open {name!r}: '
                      f'{why.split(" Here are ")[0].strip()} (the form is '
                      'tfds:<dataset>[/<config>][:<version>])') from None
  how = _how_to_prepare(name, data_dir, builder)
  if builder is None or not builder.is_prepared():
    if (other := _prepared_in_tfds_dirs(name, data_dir)) is not None:
      how = f'it is prepared in TFDS\'s {other}: set --config.data.data_dir={other}'
    raise ConfigError(f'config error: data.source={source!r} is not prepared in {data_dir}; '
                     f'{how}{_prepared_elsewhere_in(name, data_dir)}')
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ConfigError(f'config error: data.source={source!r} is prepared as '
                     f'{builder.info.file_format.value} in {data_dir}, not array_record; '
                     f'{how}')
  splits = builder.info.splits
  key = _text_key(builder, source, text_key)
  damaged = f'data.source={source!r} is damaged in {builder.data_dir}; {how}'
  if split not in splits and split == 'validation' and 'test' in splits:
    log.info('data.source=%r has no validation split; its test split validates', source)
    split = 'test'
  if 'validation' not in splits and 'test' not in splits and split in ('train', 'validation'):
    if 'train' in splits and validation_fraction > 0:
      _log_held_out(source, validation_fraction)
      return TextSource(_held_out(builder.as_data_source(split='train'), split,
                                  validation_fraction), key, damaged)
    if split == 'validation':  # the run trains on all of it, without evaluating
      return TextSource([], key)
  if split not in splits:
    raise ConfigError(f'config error: data.source={source!r} has no split {split!r}; it has '
                     f'{list(splits)}')
  return TextSource(builder.as_data_source(split=split), key, damaged)


@functools.cache  # once, not for every split opened
def _log_held_out(source: str, fraction: float) -> None:
  log.info('data.source=%r has no validation or test split: data.validation_fraction=%g of '
           'its train records (by index) validate, the rest train', source, fraction)


def mixture_configs(data_cfg) -> list[tuple[MixtureComponent, object]]:
  """Each source that `data.source` mixes (`config.data_mixture`), with the data config
  that reads it alone (the other `data` keys are shared; the text key unless the source
  names its own); a single source is one component of weight 1."""
  components = data_mixture(data_cfg.source) or (MixtureComponent('', data_cfg.source, 1.0),)
  configs = []
  for component in components:
    cfg = data_cfg.copy_and_resolve_references()
    cfg.source = component.source
    if component.text_key is not None:
      cfg.text_key = component.text_key
    configs.append((component, cfg))
  return configs


def open_component(component: MixtureComponent, data_cfg, split: str) -> TextSource:
  """`open_source` of one source of `mixture_configs`. An error of a mixture's source that
  names `data.text_key`, which its other sources share, names the source's own key and
  how to give it one instead."""
  try:
    return open_source(data_cfg, split, own_text_key=component.text_key is not None)
  except ConfigError as e:
    if not component.name or 'data.text_key' not in str(e):
      raise
    own = (f"give data.source component {component.name!r} its own key after its weight: "
           f"'{component.name}=SOURCE,WEIGHT,KEY'")
    message = re.sub(r'name the (key|column|one)[a-z ]* with --config\.data\.text_key='
                     r'(KEY|NAME)', own, str(e))
    message = message.replace('data.text_key=', f'the text key of {component.name!r}, ')
    raise ConfigError(message) from None


def open_source(data_cfg, split: str, own_text_key: bool = False) -> TextSource:
  """Opens `split` ('train' or 'validation') of `data.source`, building it once if needed;
  a mixture's sources open one by one (`mixture_configs`, `open_component`). A text key
  that plain text files do not read is a warning (a saved run's config may hold one),
  unless it is a mixture's source's `own_text_key`."""
  source = data_cfg.source
  if data_mixture(source) is not None:
    raise ValueError(f'data.source={source!r} is a mixture: open each of its sources '
                     '(sources.mixture_configs)')
  data_dir = resolve_data_dir(data_cfg.get('data_dir'))
  fraction = float(data_cfg.get('validation_fraction', 0.05))
  if source.startswith('tfds:') and source[len('tfds:'):]:
    return _tfds_source(source, source[len('tfds:'):], data_dir, split,
                        data_cfg.get('text_key'), fraction)
  if source == 'default':
    builder_cls, config = PythonStdlib, _stdlib_config(fraction)
  elif source.startswith('files:') and source[len('files:'):]:
    builder_cls, config = TextFiles, _files_config(source, source[len('files:'):], fraction,
                                                   data_cfg.get('text_key'))
  else:
    raise ConfigError('config error: ' + DATA_SOURCE_ERROR.format(source))
  if data_cfg.get('text_key') is not None and not any(f.endswith(RECORDS)
                                                      for f in config.files):
    if own_text_key:  # a mixture's source given its own key: a slip, not an old run's key
      raise ConfigError(f'config error: data.text_key={data_cfg.text_key!r} is not read: '
                        f'data.source={source!r} is read as plain text files, which have no '
                        f'keys; drop ",{data_cfg.text_key}" after its weight')
    _warn_text_key_unread(source, data_cfg.text_key)
  builder = _prepared(builder_cls, config, data_dir, source)
  if split not in builder.info.splits:
    return TextSource([], 'text')
  return TextSource(builder.as_data_source(split=split), 'text',
                    f'delete {builder.data_dir} and it is prepared again from '
                    f'data.source={source!r}')


@functools.cache  # once, not for every split opened
def _warn_text_key_unread(source: str, text_key: str) -> None:
  # A warning, not an error: a run saved with the key resumes with its data position.
  log.warning('data.text_key=%r is not read: it names a feature of a tfds: source or the '
              'text of .jsonl records and .parquet or .arrow rows, and data.source=%r is '
              'read as plain text files; drop the key', text_key, source)


@contextlib.contextmanager
def _tfds_output_on_stderr():
  """TFDS prints its preparing lines to stdout, where a command's result goes (`jaxarch
  prepare`'s table, `train`'s final metrics), and its progress bars would fill a log file
  with carriage returns: the lines go to stderr, and the bars to a terminal only."""
  tfds.display_progress_bar(sys.stderr.isatty())
  try:
    with contextlib.redirect_stdout(sys.stderr):
      yield
  finally:
    tfds.display_progress_bar(True)  # TFDS's default


class _CustomConfigNote(logging.Filter):
  def filter(self, record):
    return not record.getMessage().startswith('Using custom data configuration')


@contextlib.contextmanager
def _without_custom_config_note():
  """TFDS warns 'Using custom data configuration: ...' for each builder made from a config,
  which every jaxarch source is: a WARNING line on each run in Python (the command keeps
  absl's to errors), with nothing to act on."""
  note = _CustomConfigNote()
  logging.getLogger('absl').addFilter(note)
  try:
    yield
  finally:
    logging.getLogger('absl').removeFilter(note)


def _prepared(builder_cls, config, data_dir: pathlib.Path, source: str):
  """The builder of `config`, its dataset written once: the processes of a run that start
  together wait for the one that writes it (a lock file in the data dir), and one that
  lost a race on storage without locks reads what the winner wrote. A dataset written
  already is read without the lock: a shared data dir may be read-only."""
  def make():
    with _without_custom_config_note():
      return builder_cls(config=config, data_dir=str(data_dir), file_format='array_record')
  if (builder := make()).is_prepared():  # TFDS renames a finished dataset into place
    return builder
  try:
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir / f'.{config.name}.lock', 'a')  # 'a': leaves it as it is
  except OSError as e:
    raise ConfigError(f'config error: the data directory {data_dir} cannot be made or '
                      f'written to ({e.strerror or e}), where data.source={source!r} is '
                      'prepared once; set data.data_dir (or --data_dir, or $JAXARCH_DATA_DIR) '
                      'to a writable folder') from None
  full = lambda reason: ConfigError(
      f'config error: data.source={source!r} could not be prepared in the data directory '
      f'{data_dir} ({reason}); free space there, or set data.data_dir (or --data_dir, or '
      '$JAXARCH_DATA_DIR) to a folder with room')
  with lock, explained_write_errors(full):
    oserrors.lock(lock, wait=True, guards='two processes preparing it at once')
    try:
      with _tfds_output_on_stderr():
        make().download_and_prepare()  # a no-op once the version directory exists
    except FileExistsError:  # TFDS's final rename found the version directory written
      if not make().is_prepared():
        raise
    except BaseException:  # a bad record, a full disk: no empty folders left to puzzle over
      _remove_empty(pathlib.Path(make().data_dir).parent, data_dir)
      raise
    finally:
      _remove_empty(data_dir / 'downloads' / 'extracted', data_dir)  # nothing is downloaded
  return make()


def _remove_empty(folder: pathlib.Path, data_dir: pathlib.Path) -> None:
  """Removes `folder` and the folders above it up to `data_dir` while they are empty."""
  while folder != data_dir and folder.is_relative_to(data_dir):
    try:
      folder.rmdir()  # only if empty: another version, or another process's, stays
    except OSError:
      return
    folder = folder.parent
