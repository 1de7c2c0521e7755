"""A run's tokenizer in Hugging Face's form, for `jaxarch export --format=hf`: a
`tokenizer.json` that `AutoTokenizer` reads and that gives jaxarch's ids.

The byte tokenizer goes as a byte-level BPE without merges (ids 0-255 are the bytes, as
in jaxarch), a `tokenizer.json` as it is, a SentencePiece model as a `tokenizer.json`
converted from it (and the `.model` beside it as `tokenizer.model`, for llama.cpp's
converter). Every text
starts with the BOS the model trained with (`data.bos_id`, by default the end-of-document
id): the tokenizer adds it. A run with no BOS (`data.add_bos=False`, an imported Qwen's)
gets a tokenizer that adds nothing (`bos_token` null, `add_bos_token` false), so
`AutoTokenizer` gives the text's ids alone, as jaxarch does.

transformers' LlamaTokenizer reads a `.model` without its normaliser, so runs of spaces,
tabs, newlines and NFKC text got other ids than `sp.encode`. The conversion
(`sentencepiece_tokenizer_json`) encodes as SentencePiece does: its normaliser's steps in
its order (the rule's precompiled charsmap, extra spaces removed, spaces as '▁', the dummy
prefix), its UNIGRAM pieces with scores that keep control, unknown and byte pieces out of
the text ('</s>' in a text is text) or its BPE merges ranked by the merged piece's score,
byte fallback, and a decoder that undoes it. Checked against SentencePiece on 6.6 MB of
Python source and on random text of spaces, tabs, CR LF, NFKC characters, emoji and
special tokens' spellings: BPE models give its ids exactly. What differs:
- with a normalisation rule (nmt_nfkc, the default), `tokenizers` maps a grapheme of
  several characters as a whole, where SentencePiece goes by its longest rules: a
  character the rule changes followed by combining marks ('Ａ' + U+0301, a second mark,
  with nfkc_cf any capital), decomposed Hangul, Bengali two-part vowels and half-width
  kana with a voiced mark may get other ids (CR LF is handled);
- UNIGRAM cuts of equal score (a run of 27 spaces as 16 + 11 or 11 + 16 spaces) or within
  float rounding: SentencePiece picks by its float32 sums, `tokenizers` the first: 30 of
  3.4M ids there with spaces kept (whitespace-only pieces), 6 of 2.2M with the defaults;
- with remove_extra_whitespaces=false, a text the rule deletes whole (control
  characters) is no ids, not SentencePiece's '▁'.
A model no tokenizer.json can match (WORD or CHAR, whitespace as a suffix, a
denormaliser, a one-character special piece, a user-defined piece the normaliser would
change, BPE with unused pieces) goes as `tokenizer.model` alone, for transformers'
LlamaTokenizer, with a warning that says why: the weights export all the same.
"""

import base64
import json
import logging
import re
import shutil
from pathlib import Path

from jaxarch.data.tokenizers import ByteTokenizer, gpt2_byte_chars

PAD, EOD = '<pad>', '<|endoftext|>'  # the byte tokenizer's specials, 256 and 257


def _byte_token(i: int) -> str:
  """The byte tokenizer's id `i` as `byte_tokenizer_json` spells it."""
  return {ByteTokenizer.pad_id: PAD, ByteTokenizer.eod_id: EOD}.get(i) or gpt2_byte_chars()[i]


def byte_tokenizer_json(bos: int | None = ByteTokenizer.eod_id) -> dict:
  """jaxarch's byte tokenizer in `tokenizers`' format: byte-level BPE with no merges, so
  each byte is one token whose id is the byte (ids in byte order, not GPT-2's); 256 is
  <pad> and 257 <|endoftext|>, which starts every text unless `bos` is another id (None:
  nothing starts it)."""
  char = gpt2_byte_chars()
  return {
      'version': '1.0', 'truncation': None, 'padding': None,
      'added_tokens': [_special(ByteTokenizer.pad_id, PAD), _special(ByteTokenizer.eod_id, EOD)],
      'normalizer': None,
      'pre_tokenizer': {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': False,
                        'use_regex': False},
      'post_processor': None if bos is None else _bos_template(_byte_token(bos), bos),
      'decoder': {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': False,
                  'use_regex': False},
      'model': {'type': 'BPE', 'dropout': None, 'unk_token': None,
                'continuing_subword_prefix': None, 'end_of_word_suffix': None,
                'fuse_unk': False, 'byte_fallback': False, 'ignore_merges': False,
                'vocab': {**{char[b]: b for b in range(256)}, PAD: ByteTokenizer.pad_id,
                          EOD: ByteTokenizer.eod_id},
                'merges': []},
  }


def _special(i: int, text: str) -> dict:
  """A special token of `tokenizers`' added_tokens: never read from text (the exports set
  `split_special_tokens`), skipped in decoding."""
  return {'id': i, 'content': text, 'single_word': False, 'lstrip': False, 'rstrip': False,
          'normalized': False, 'special': True}


def _replace(pattern: str, content: str, regex: bool = False) -> dict:
  return {'type': 'Replace', 'pattern': {'Regex' if regex else 'String': pattern},
          'content': content}


SPACE = '\u2581'  # SentencePiece's escaped space
# ModelProto.SentencePiece.Type, and TrainerSpec.ModelType's names.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
SP_MODELS = {1: 'UNIGRAM', 2: 'BPE', 3: 'WORD', 4: 'CHAR'}


def _read_sentencepiece(path: str):
  """The ModelProto of a SentencePiece `.model` file."""
  # pylint: disable=g-import-not-at-top  (runs with a SentencePiece tokenizer only)
  from sentencepiece import sentencepiece_model_pb2
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(Path(path).expanduser().read_bytes())
  return proto


def _sentencepiece_rule(proto):
  """str -> str: the model's normalisation rule alone (no dummy prefix, no whitespace
  handling), as SentencePiece applies it."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  return sentencepiece.SentencePieceNormalizer(
      model_proto=proto.SerializeToString(), add_dummy_prefix=False,
      escape_whitespaces=False, remove_extra_whitespaces=False).normalize


def unconvertible(proto) -> str | None:
  """Why no tokenizer.json encodes as this SentencePiece model does, or None."""
  kind, pieces = proto.trainer_spec.model_type, proto.pieces
  rule = _sentencepiece_rule(proto)
  # `tokenizers` finds these in the text when they are one character.
  one_char = [p.piece for p in pieces if p.type not in (NORMAL, USER_DEFINED)
              and len(p.piece) == 1]
  # SentencePiece reads a user-defined piece before its normaliser: not mapped, its spaces
  # not removed.
  spec = proto.normalizer_spec
  changed = [p.piece for p in pieces if p.type == USER_DEFINED and (
      rule(p.piece) != p.piece or spec.remove_extra_whitespaces and ' ' in p.piece)]
  if kind not in (UNIGRAM, BPE):
    return f'its model_type is {SP_MODELS.get(kind, kind)}'
  if proto.trainer_spec.treat_whitespace_as_suffix:
    return 'it treats whitespace as a suffix'
  if proto.denormalizer_spec.precompiled_charsmap:
    return 'it has a denormalisation rule'
  if one_char:
    return f'its special piece {one_char[0]!r} is one character'
  if changed:
    return f'its normaliser changes its user-defined piece {changed[0]!r}'
  if kind == BPE and any(p.type == UNUSED for p in pieces):
    return 'it is a BPE model with unused pieces'
  return None


def _unigram_scores(pieces) -> list[float]:
  """Scores with which `tokenizers`' Unigram picks SentencePiece's pieces.

  `tokenizers` looks for every piece in the text, so '</s>' in a text would be the eos
  piece, where SentencePiece matches its normal and user-defined pieces only. Adding
  `shift` per character to every score adds the same to each way of cutting a text, so the
  text's pieces still win as they did; the other pieces get the lowest score,
  lowest + shift, which keeps an unknown character's score (the lowest - 10, counted as one
  character) and makes a piece of n >= 2 characters count lowest - (n - 1) * shift, less
  than n unknown characters, the worst other way to cut its text (shift > 20 - lowest).
  A user-defined piece scores as SentencePiece's unigram gives it: bytes * max(0, best)
  - 0.1 (its max starts at FLT_MIN), which beats any other way to cut its text.
  """
  normal = [p.score for p in pieces if p.type == NORMAL]
  lowest, best = min(normal), max(0.0, max(normal))
  shift = 30.0 + abs(lowest)
  scores = []
  for p in pieces:
    n = len(p.piece)
    scores.append(p.score + shift * n if p.type == NORMAL else
                  len(p.piece.encode()) * best - 0.1 + shift * n if p.type == USER_DEFINED
                  else lowest + shift)
  return scores


def sentencepiece_tokenizer_json(proto) -> dict:
  """A SentencePiece model (its ModelProto, not `unconvertible`) in `tokenizers`' format,
  which encodes as `sp.encode` does (module docstring): the normaliser's steps in
  SentencePiece's order, the pieces with their ids, and control, unknown and byte pieces
  only where SentencePiece puts them."""
  trainer, spec, pieces = proto.trainer_spec, proto.normalizer_spec, proto.pieces
  space = SPACE if spec.escape_whitespaces else ' '
  steps = []
  if spec.precompiled_charsmap:  # the normalisation rule (nmt_nfkc, nfkc, ...)
    # `tokenizers` maps a grapheme of several characters by its first one's rule, if it has
    # one: CR LF would be one space, not two.
    rule = _sentencepiece_rule(proto)
    if (crlf := rule('\r\n')) != '\r\n' and rule(crlf) == crlf:
      steps.append(_replace('\r\n', crlf))
    steps.append({'type': 'Precompiled', 'precompiled_charsmap':
                  base64.b64encode(spec.precompiled_charsmap).decode()})
  if spec.remove_extra_whitespaces:  # spaces, after the rule (which maps tabs, newlines)
    steps += [_replace(r'\A +', '', regex=True), _replace(' {2,}', ' ', regex=True)]
  if spec.escape_whitespaces:
    steps.append(_replace(' ', SPACE))
  if spec.remove_extra_whitespaces:  # SentencePiece strips every trailing '▁', the text's too
    steps.append(_replace(re.escape(space) + r'+\z', '', regex=True))
  if spec.add_dummy_prefix:  # to a text the rule left empty, no prefix (SentencePiece: '▁')
    steps.append({'type': 'Prepend', 'prepend': space})
  user = [p.piece for p in pieces if p.type == USER_DEFINED]
  pre_tokenizer = None
  if trainer.model_type == UNIGRAM:
    model = {'type': 'Unigram', 'unk_id': trainer.unk_id,
             'byte_fallback': trainer.byte_fallback,
             'vocab': [[p.piece, score] for p, score in zip(pieces, _unigram_scores(pieces))]}
  else:
    # SentencePiece's BPE merges the neighbours that make the best-scored piece, as
    # `tokenizers` does with merges ranked so; user-defined pieces stand alone, unmerged.
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == NORMAL}
    ranked = sorted((-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
                    for k in range(1, len(piece))
                    if piece[:k] in normal and piece[k:] in normal)
    # 'a b', which every reader parses, unless a piece holds a space (tokenizers >= 0.20).
    spaced = any(' ' in p.piece for p in pieces)
    model = {'type': 'BPE', 'dropout': None, 'unk_token': pieces[trainer.unk_id].piece,
             'continuing_subword_prefix': None, 'end_of_word_suffix': None, 'fuse_unk': True,
             'byte_fallback': trainer.byte_fallback, 'ignore_merges': bool(user),
             'vocab': {p.piece: i for i, p in enumerate(pieces)},
             'merges': [[left, right] if spaced else f'{left} {right}'
                        for *_, left, right in ranked]}
    if user:
      pre_tokenizer = {'type': 'Split', 'behavior': 'Isolated', 'invert': False, 'pattern': {
          'Regex': '|'.join(map(re.escape, sorted(user, key=len, reverse=True)))}}
  decoders = [_replace(SPACE, ' ')]
  if trainer.byte_fallback:
    decoders.append({'type': 'ByteFallback'})
  decoders.append({'type': 'Fuse'})  # then the text's start, as SentencePiece decodes it:
  if spec.escape_whitespaces and spec.remove_extra_whitespaces:  # no space
    decoders.append(_replace(r'\A +', '', regex=True))
  elif spec.escape_whitespaces and spec.add_dummy_prefix:  # the dummy prefix's space
    decoders.append({'type': 'Strip', 'content': ' ', 'start': 1, 'stop': 0})
  return {
      'version': '1.0', 'truncation': None, 'padding': None,
      'added_tokens': [_special(i, p.piece) for i, p in enumerate(pieces)
                       if p.type in (UNKNOWN, CONTROL)],
      'normalizer': {'type': 'Sequence', 'normalizers': steps},
      'pre_tokenizer': pre_tokenizer, 'post_processor': None,
      'decoder': {'type': 'Sequence', 'decoders': decoders},
      'model': model,
  }


def _bos_template(token: str, token_id: int) -> dict:
  """A post-processor that starts every text with `token` (the model's BOS)."""
  piece = lambda kind: {kind: {'id': 'A' if kind == 'Sequence' else token, 'type_id': 0}}
  return {'type': 'TemplateProcessing',
          'single': [piece('SpecialToken'), piece('Sequence')],
          'pair': [piece('SpecialToken'), piece('Sequence'),
                   {'Sequence': {'id': 'B', 'type_id': 0}}],
          'special_tokens': {token: {'id': token, 'ids': [token_id], 'tokens': [token]}}}


def write_tokenizer(spec: str, tokenizer, out: Path, max_len: int, bos: int | None,
                    chat_template: str | None = None) -> None:
  """tokenizer.json (+ tokenizer.model) and tokenizer_config.json in Hugging Face's form;
  texts start with `bos` (the run's `data.bos_id`: `jaxarch.data.bos_id`), or with nothing
  where it is None (`data.add_bos=False`). An instruct model's `chat_template` goes into
  tokenizer_config.json, whose tokenizer then reads special tokens' spellings as those
  tokens, as the checkpoint's did: `apply_chat_template` tokenizes the rendered template
  so, and would read '<|im_start|>' as text under `split_special_tokens`."""
  if spec == 'bytes':
    (out / 'tokenizer.json').write_text(json.dumps(byte_tokenizer_json(bos), indent=1) + '\n')
    names = {'bos_token': None if bos is None else _byte_token(bos), 'eos_token': EOD,
             'pad_token': PAD}
    extra = {'tokenizer_class': 'PreTrainedTokenizerFast'}
  else:  # a tokenizer file
    eod = tokenizer.token(tokenizer.eod_id)
    names = {'bos_token': None if bos is None else tokenizer.token(bos), 'eos_token': eod,
             'pad_token': tokenizer.token(tokenizer.pad_id)}
    extra = {'tokenizer_class': 'PreTrainedTokenizerFast'}
    tree = None
    if spec.endswith('.model'):  # SentencePiece: converted, and the file beside it
      shutil.copy(Path(spec).expanduser(), out / 'tokenizer.model')  # for llama.cpp & co
      proto = _read_sentencepiece(spec)
      if why := unconvertible(proto):
        logging.getLogger(__name__).warning(
            'export: %s goes as tokenizer.model alone, for transformers\' LlamaTokenizer, '
            'which may give other ids than jaxarch\'s for some texts: no tokenizer.json '
            'encodes as it does, since %s', spec, why)
        extra = {'tokenizer_class': 'LlamaTokenizer', 'add_bos_token': bos is not None,
                 'add_eos_token': False, 'legacy': False}
      else:
        tree = sentencepiece_tokenizer_json(proto)
    else:  # a tokenizer.json: as it is
      tree = json.loads(Path(spec).expanduser().read_text())
    if tree is not None:  # the BOS before every text, or nothing
      tree['post_processor'] = None if bos is None else _bos_template(names['bos_token'], bos)
      (out / 'tokenizer.json').write_text(json.dumps(tree, ensure_ascii=False) + '\n')
  if bos is None:  # as a Qwen's: no BOS, said twice, for transformers and for import
    extra.setdefault('add_bos_token', False)
  if chat_template is not None:
    extra['chat_template'] = chat_template
  # Text that spells a special token is text, as jaxarch trained on it ('<pad>' in a file);
  # but a chat template's special tokens are tokens.
  (out / 'tokenizer_config.json').write_text(json.dumps(
      {**names, **extra, 'model_max_length': max_len, 'clean_up_tokenization_spaces': False,
       'split_special_tokens': chat_template is None}, indent=2) + '\n')
  (out / 'special_tokens_map.json').write_text(json.dumps(
      {k: v for k, v in names.items() if v is not None}, indent=2) + '\n')

