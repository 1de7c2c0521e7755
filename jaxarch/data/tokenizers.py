"""Tokenizers: raw bytes by default, SentencePiece or HF `tokenizer.json` files on request.

Every tokenizer exposes the same small surface the pipeline and trainer need: `encode`
(of `str`, or of a document's stored `bytes`), `decode`, `vocab_size`, `pad_id`, `eod_id`
(end of document, also the BOS unless `data.bos_id` names another or `data.add_bos` is
False: `bos_id`; generation stops at it and at `data.stop_ids`: `stop_ids`), and for bits
per byte = total_nats / ln 2 / total_bytes under any tokenizer:

- `encode_counting_bytes(text)`: the ids and the bytes of the text each one stands for,
  from the tokenizer's offsets into the text it was given. So they add up to the text's
  UTF-8 bytes whatever the tokenizer did to it: whitespace SentencePiece's normaliser
  collapsed, an unknown character read as one `<unk>`, the space put in front of the
  text, a lowercased word. Evaluation batches carry them (`pipeline`).
- `byte_lengths[id]`: the bytes a token stands for where it follows other text
  (SentencePiece's '▁the' is ' the'): what a sequence without its text counts (BiTA's
  distilled continuations), close but not exact.
"""

import bisect
import functools
import json
import os
import re
import unicodedata

import numpy as np

from jaxarch.config import ConfigError, is_token_id

_SPEC_ERROR = ("config error: data.tokenizer={!r} must be 'bytes' or a path to a "
               "SentencePiece .model or a Hugging Face tokenizers .json file (tokenizer.json)")


def as_text(text: str | bytes) -> str:
  """A document for a tokenizer of text: stored bytes decoded as UTF-8 (invalid bytes
  become U+FFFD)."""
  return text.decode('utf-8', errors='replace') if isinstance(text, bytes) else text


def ids_past_model(tokenizer, vocab_size: int) -> list[int]:
  """The tokenizer's ids at or past a model's `vocab_size` that a run would feed it. Special
  tokens are left out, but for the end of document and padding: text never encodes to them
  (`encode` reads their spellings as text), as to Gemma 3's `<image_soft_token>`, id 262144,
  one past its text models' 262144 rows."""
  special = getattr(tokenizer, 'special_ids', frozenset())
  named = {tokenizer.eod_id, tokenizer.pad_id}
  return [i for i in range(vocab_size, tokenizer.vocab_size) if i not in special or i in named]


def model_tokenizer(cfg):
  """`data.tokenizer` of a run's config, whose ids `model.vocab_size` must hold (checked
  by `prepare` too, before hours of preparing data for a run that cannot start)."""
  tokenizer = get_tokenizer(cfg.data.tokenizer)
  if past := ids_past_model(tokenizer, cfg.model.vocab_size):
    need = -(-(max(past) + 1) // 128) * 128  # the ids it feeds, padded as the presets are
    raise ConfigError(
        f'config error: model.vocab_size={cfg.model.vocab_size} is smaller than the '
        f'vocabulary of data.tokenizer={cfg.data.tokenizer!r} ({tokenizer.vocab_size}); '
        f'set --config.model.vocab_size={need} (a multiple of 128 shards over `tensor`)')
  return tokenizer


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; byte 0 is real text, so the specials come after 255."""

  pad_id = 256
  eod_id = 257
  vocab_size = 258

  def __init__(self):
    self.byte_lengths = np.zeros(self.vocab_size, np.int32)
    self.byte_lengths[:256] = 1

  def encode(self, text: str | bytes) -> list[int]:
    return list(text if isinstance(text, bytes) else text.encode('utf-8'))

  def encode_counting_bytes(self, text: str | bytes) -> tuple[list[int], np.ndarray]:
    ids = self.encode(text)
    return ids, np.append(np.ones(len(ids), np.int32), 0)

  def decode(self, ids) -> str:
    data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < 256)
    return data.decode('utf-8', errors='replace')


def tiled_bytes(ends, text: str) -> np.ndarray:
  """The bytes of `text` each token stands for, from the tokens' `ends` (byte offsets into
  it, in token order): a token takes the text from the furthest end before it to its own
  (so the text a normaliser dropped goes to the token after it), and the last entry, one
  past the tokens, the rest (dropped at the end). They add up to the text's bytes."""
  total = len(text.encode('utf-8'))
  ends = np.maximum.accumulate(np.append(np.clip(np.asarray(ends, np.int64), 0, total), total))
  return np.diff(ends, prepend=0).astype(np.int32)


def _load(path: str, load):
  """The tokenizer `load()` reads from `path`; a missing or unreadable file is a config
  error (the libraries raise bare Exceptions and OSErrors)."""
  if not os.path.isfile(path):
    raise ConfigError(f'config error: data.tokenizer={path!r}: no such file')
  try:
    return load()
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'config error: data.tokenizer={path!r} cannot be read as a tokenizer '
                      f'file: {str(e).splitlines()[0] if str(e) else type(e).__name__}') from None


class SentencePieceTokenizer:
  """A SentencePiece `.model`; its eos id ends documents, pad falls back to eos."""

  def __init__(self, path: str):
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'data.tokenizer={path!r} needs SentencePiece: '
                        'pip install sentencepiece') from e
    self._sp = _load(path, lambda: sentencepiece.SentencePieceProcessor(model_file=path))
    self.vocab_size = self._sp.get_piece_size()
    self.eod_id = self._sp.eos_id()
    if self.eod_id < 0:
      raise ConfigError(f'config error: data.tokenizer={path!r} has no eos piece to end '
                       'documents with')
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod_id
    lengths = []
    for i in range(self.vocab_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        lengths.append(0)
      elif self._sp.is_byte(i):
        lengths.append(1)
      else:
        lengths.append(len(self._sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8')))
    self.byte_lengths = np.asarray(lengths, np.int32)

  def token(self, i: int) -> str:
    return self._sp.id_to_piece(i)

  def encode(self, text: str | bytes) -> list[int]:
    return self._sp.encode(as_text(text))

  def encode_counting_bytes(self, text: str | bytes) -> tuple[list[int], np.ndarray]:
    text = as_text(text)
    try:  # the pieces with their byte offsets into the text
      pieces = self._sp.encode(text, return_type='proto').pieces
    except (TypeError, ValueError):  # sentencepiece 0.2.0
      pieces = self._sp.encode(text, out_type='immutable_proto').pieces
    return [p.id for p in pieces], tiled_bytes([p.end for p in pieces], text)

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if self.byte_lengths[i] > 0]
    return self._sp.decode(ids)


def gpt2_byte_chars() -> dict[int, str]:
  """Byte -> the printable character byte-level BPE spells it with (GPT-2's scheme): a
  printable byte is itself, the others take characters from 256 on, in byte order."""
  printable = {*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)}
  extra = iter(range(256, 512))
  return {b: chr(b if b in printable else next(extra)) for b in range(256)}


_GPT2_BYTE_CHARS = set(gpt2_byte_chars().values())
_BYTE_FALLBACK = re.compile(r'<0x[0-9A-Fa-f]{2}>')


def _is_punctuation(char: str) -> bool:
  """As BERT's pre-tokenizer decides: Unicode punctuation, or ASCII that is not a letter,
  a digit or a space."""
  return unicodedata.category(char).startswith('P') or (
      char.isascii() and not char.isalnum() and not char.isspace())


class HFTokenizer:
  """A HF `tokenizer.json`; eos-like special token ends documents, pad falls back to it."""

  _EOS_NAMES = ('</s>', '<|endoftext|>', '<|end_of_text|>', '<eos>', '<|eos|>', '[SEP]')
  _PAD_NAMES = ('<pad>', '<|pad|>', '[PAD]')

  def __init__(self, path: str):
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'data.tokenizer={path!r} needs HF tokenizers: '
                        'pip install tokenizers') from e
    self._tok = _load(path, lambda: tokenizers.Tokenizer.from_file(path))
    # The largest id + 1: a vocabulary may leave ids unused, which its size would not count.
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
    self.eod_id = self._first_id(self._EOS_NAMES)
    if self.eod_id is None:
      raise ConfigError(f'config error: data.tokenizer={path!r} has none of the end-of-text '
                        f'tokens {self._EOS_NAMES}, which end every document; add one when '
                        "you build it (tokenizer.add_special_tokens(['<|endoftext|>']), or "
                        "the trainer's special_tokens) and save it again")
    pad_id = self._first_id(self._PAD_NAMES)
    self.pad_id = self.eod_id if pad_id is None else pad_id
    # Text that spells a special token (e.g. "<|endoftext|>" in a code file) is text, not
    # the end of a document.
    self._tok.encode_special_tokens = True
    special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    self.special_ids = frozenset(special)
    self.byte_lengths = np.asarray([0 if i in special else self._piece_bytes(i)
                                    for i in range(self.vocab_size)], np.int32)

  @functools.cached_property
  def _tree(self) -> dict:
    return json.loads(self._tok.to_str())

  @functools.cached_property
  def _byte_level(self) -> bool:
    """GPT-2-style byte-level BPE, whose pieces spell each byte as one character."""
    return 'ByteLevel' in json.dumps([self._tree.get('pre_tokenizer'),
                                      self._tree.get('decoder')])

  @functools.cached_property
  def _wordpiece_prefix(self) -> str | None:
    """BERT-style WordPiece's prefix of the pieces that continue a word ('##')."""
    model = self._tree.get('model') or {}
    return model.get('continuing_subword_prefix') if model.get('type') == 'WordPiece' else None

  def _piece_bytes(self, i: int) -> int:
    """The UTF-8 bytes token i stands for."""
    piece = self._tok.id_to_token(i)
    if piece is None:
      return 0
    if (prefix := self._wordpiece_prefix) is not None:
      # WordPiece pieces hold no spaces: a piece that continues a word stands for its text
      # after the prefix; one that starts a word, also for the space before it, unless it is
      # punctuation (split off words, usually with no space before). So its bits per byte
      # are close, not exact (like the text its normaliser may have lowercased).
      if prefix and piece.startswith(prefix) and piece != prefix:
        return len(piece[len(prefix):].encode('utf-8'))
      return len(piece.encode('utf-8')) + (not all(map(_is_punctuation, piece)))
    if self._byte_level and set(piece) <= _GPT2_BYTE_CHARS:
      return len(piece)
    if _BYTE_FALLBACK.fullmatch(piece):  # SentencePiece-style byte fallback: <0xE2>
      return 1
    if '\u2581' in piece:  # SentencePiece-style word start: a space (stripped on decode)
      return len(piece.replace('\u2581', ' ').encode('utf-8'))
    return len(self._tok.decode([i], skip_special_tokens=False).encode('utf-8'))

  def _first_id(self, names):
    for name in names:
      i = self._tok.token_to_id(name)
      if i is not None:
        return i
    return None

  def token(self, i: int) -> str:
    return self._tok.id_to_token(i)

  def encode(self, text: str | bytes) -> list[int]:
    # `encode_batch` releases the GIL where `encode` holds it: the training pipeline's
    # threads (`data.num_threads`) then tokenize in parallel. The ids are the same.
    return self._tok.encode_batch([as_text(text)], add_special_tokens=False)[0].ids

  def encode_counting_bytes(self, text: str | bytes) -> tuple[list[int], np.ndarray]:
    text = as_text(text)
    encoding = self._tok.encode_batch([text], add_special_tokens=False)[0]
    ends = np.asarray([end for _, end in encoding.offsets], np.int64)  # in characters
    if not text.isascii():
      points = np.frombuffer(text.encode('utf-32-le'), np.uint32)
      widths = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)
      ends = np.concatenate([[0], np.cumsum(widths)])[ends]
    return encoding.ids, tiled_bytes(ends, text)

  @functools.cached_property
  def _reading_specials(self):
    """A copy of the tokenizer that reads a special token's spelling as that token."""
    tok = type(self._tok).from_str(self._tok.to_str())
    tok.encode_special_tokens = False
    return tok

  def encode_chat(self, text: str) -> list[int]:
    """The ids of a rendered chat template, whose special tokens' spellings
    ('<|im_start|>', '<|begin_of_text|>') are those tokens; nothing added (no BOS), as
    transformers' `apply_chat_template` tokenizes. `encode` reads them as text."""
    return self._reading_specials.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=True)


def decode_continuation(tokenizer, prompt_ids, new_ids) -> str:
  """The text `new_ids` add to `prompt_ids`. Decoded alone, a continuation would lose its
  first word's space with SentencePiece-style decoders, which strip the text's leading one."""
  prompt_ids, new_ids = list(prompt_ids), list(new_ids)
  before, whole = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + new_ids)
  if whole.startswith(before):
    return whole[len(before):]
  return tokenizer.decode(new_ids)  # the prompt's end merged with the continuation


def cut_at_stop_text(decode, new_ids, stops) -> tuple[list[int], str]:
  """A continuation ended at the first of the `stops` texts to appear in it, as vLLM's
  `stop` does: (the fewest of `new_ids` whose text completes that stop, the text before
  it); all of them and their text where none appears. `decode(ids)`: the text ids add."""
  new_ids = list(new_ids)
  text = decode(new_ids)
  found = [(start + len(stop), start) for stop in stops if (start := text.find(stop)) >= 0]
  if not found:
    return new_ids, text
  end, start = min(found)  # the stop whose text is complete first, token by token
  # The first prefix of the ids whose text holds it (by its length, a character cut
  # between two tokens, decoded as U+FFFD, would count as complete).
  stop = text[start:end]
  n = bisect.bisect_left(range(len(new_ids) + 1), True,
                         key=lambda n: stop in decode(new_ids[:n]))
  return new_ids[:n], text[:start]


def bos_id(data_cfg, tokenizer) -> int | None:
  """The id every document and prompt starts with: `data.bos_id`, or (None, the default)
  the tokenizer's eod id, which jaxarch's own models train with. An imported Llama reads
  its own BOS (`<s>`, `<|begin_of_text|>`), which `jaxarch import` sets. None under
  `data.add_bos=False`: no BOS, documents and prompts are the text's ids alone (an
  imported Qwen's, as its tokenizer encodes)."""
  if not data_cfg.get('add_bos', True):
    return None
  bos = data_cfg.get('bos_id')
  if bos is None:
    return tokenizer.eod_id
  if not is_token_id(bos, tokenizer.vocab_size):
    raise ConfigError(f'config error: data.bos_id={bos!r} must be an id of data.tokenizer='
                      f'{data_cfg.get("tokenizer")!r}, in [0, {tokenizer.vocab_size}), or None '
                      f'(its end-of-document id, {tokenizer.eod_id})')
  return bos


def stop_ids(data_cfg, tokenizer) -> tuple[int, ...]:
  """The ids at which generation stops: the tokenizer's eod first, then `data.stop_ids`
  (an imported instruct model's end of turn: Llama 3's `<|eot_id|>`, Qwen2.5's
  `<|im_end|>`, which `jaxarch import` sets), each once. A run saved before the key
  stops at the eod alone, as it did."""
  ids = [tokenizer.eod_id]
  for i in data_cfg.get('stop_ids') or ():
    if not is_token_id(i, tokenizer.vocab_size):
      raise ConfigError(f'config error: data.stop_ids={tuple(data_cfg.stop_ids)!r} must be ids '
                        f'of data.tokenizer={data_cfg.get("tokenizer")!r}, in [0, '
                        f'{tokenizer.vocab_size}); {i!r} is not')
    if i not in ids:
      ids.append(i)
  return tuple(ids)


def get_tokenizer(spec: str):
  """Returns the tokenizer named by `data.tokenizer`.

  A run asks for it several times (training data, evaluation data, bits per byte); a file
  is read once while it is unchanged, as building a large vocabulary's byte lengths takes
  about a second (128k tokens)."""
  if spec == 'bytes':
    return ByteTokenizer()
  spec = os.path.expanduser(spec)
  if not spec.endswith(('.model', '.json')):
    raise ConfigError(_SPEC_ERROR.format(spec))
  try:
    stat = os.stat(spec)
  except OSError:
    stat = None  # reading it says why
  return _tokenizer_file(spec, stat and (stat.st_mtime_ns, stat.st_size, stat.st_ino))


@functools.lru_cache(maxsize=4)
def _tokenizer_file(path: str, version):
  del version  # the cache's key: a file changed in place is read again
  if path.endswith('.model'):
    return SentencePieceTokenizer(path)
  return HFTokenizer(path)  # tokenizers' `Tokenizer.save` takes any name (bpe-32k.json)
