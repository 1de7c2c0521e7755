"""The training input pipeline's tokens/s per process, by tokenizer and `data.num_threads`.

  python benchmarks/data_pipeline.py [--tokenizers=bytes,bpe,sentencepiece]
      [--threads=0,2,4,8,16] [--batch=32] [--seq_len=1024] [--seconds=10]
      [--sample_documents=1500] [--data_dir=DIR] [--out=...]

Each case reads the batches of `jaxarch.data.make_train_dataset` over the built-in corpus
(the Python standard library's source files) as the trainer does, one process, and counts
the tokens per second after a warm-up batch. `bytes` is the byte tokenizer of the shipped
presets; `bpe` a byte-level BPE of 32,000 pieces (GPT-2's scheme, as Llama 3's and Qwen's
tokenizer.json) and `sentencepiece` a SentencePiece BPE of 8,000 pieces, both trained here
on a sample of the corpus, so nothing is downloaded. The ratio is to the same tokenizer
read with no threads (`data.num_threads=0`); the byte tokenizer, which holds the GIL, is
always read without. `H100s fed` is the tokens/s over the rate at
which one H100 trains the dense 151m preset (batch 32 of 1024; the record named in the
JSON): how many such GPUs the process keeps busy. A `jaxarch launch` job runs one process
per node, which feeds all of its GPUs. Thread counts above the CPU cores this process may
use are left out: the pipeline would use no more.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from report import emit, ints, save

from jaxarch import config as config_lib
from jaxarch import data
from jaxarch.cli import at_least_one

TOKENIZERS = ('bytes', 'bpe', 'sentencepiece')
# One H100 training the dense 151m preset at batch 32 x 1024 (bf16, cuDNN attention).
H100_RECORD = Path(__file__).parent / 'records' / 'train_step_h100_151m_b32_none_auto.json'


def _sample(data_cfg, count: int) -> list[str]:
  """`count` documents spread over the corpus, to train the tokenizers on."""
  source = data.open_source(data_cfg, 'train')
  step = max(len(source) // count, 1)
  return [source[i].decode('utf-8', errors='replace') for i in range(0, len(source), step)]


def _train_bpe(texts: list[str], directory: Path) -> str:
  """A GPT-2-style byte-level BPE tokenizer.json of 32,000 pieces."""
  import tokenizers as hf  # pylint: disable=g-import-not-at-top
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  tok.train_from_iterator(texts, hf.trainers.BpeTrainer(
      vocab_size=32000, special_tokens=['<|endoftext|>'],
      initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet()))
  path = directory / 'tokenizer.json'
  tok.save(str(path))
  return str(path)


def _train_sentencepiece(texts: list[str], directory: Path) -> str:
  """A SentencePiece BPE model of 8,000 pieces with byte fallback (Llama 2's kind)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  lines = (line for text in texts for line in text.splitlines() if line.strip())
  prefix = directory / 'sp'
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines, model_prefix=str(prefix), vocab_size=8000, model_type='bpe',
      byte_fallback=True, input_sentence_size=200_000, shuffle_input_sentence=True,
      minloglevel=2)
  return f'{prefix}.model'


def tokens_per_s(data_cfg, *, batch: int, threads: int, seconds: float) -> dict:
  """Batches read for `seconds` after one warm-up batch."""
  it = iter(data.make_train_dataset(data_cfg, seed=0, global_batch_size=batch,
                                    num_threads=threads))
  try:
    next(it)
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
      next(it)
      count += 1
  finally:
    it.close()
  return dict(batches=count, seconds=elapsed,
              tokens_per_s=count * batch * data_cfg.seq_len / elapsed)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tokenizers', default=','.join(TOKENIZERS))
  parser.add_argument('--threads', type=ints, default=(0, 2, 4, 8, 16))
  parser.add_argument('--batch', type=at_least_one, default=32)
  parser.add_argument('--seq_len', type=at_least_one, default=1024)
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--sample_documents', type=at_least_one, default=1500)
  parser.add_argument('--data_dir', help="the prepared corpus' folder (default: data.data_dir)")
  parser.add_argument('--out', default='benchmarks/results/data_pipeline.json')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  names = args.tokenizers.split(',')
  if unknown := sorted(set(names) - set(TOKENIZERS)):
    parser.error(f'argument --tokenizers: {unknown} not among {",".join(TOKENIZERS)}')
  cores = data.cpu_cores()
  threads = sorted({t for t in args.threads if 0 <= t <= cores} | {0})
  overrides = [f'data.seq_len={args.seq_len}'] + (
      [f'data.data_dir={args.data_dir}'] if args.data_dir else [])
  cfg = config_lib.load('configs/dense.py:151m', overrides)
  h100 = json.loads(H100_RECORD.read_text())

  records, rows = [], []
  results = dict(cpu_cores=cores, batch=args.batch, seq_len=args.seq_len,
                 h100_151m_tokens_per_s=h100['tokens_per_s'], h100_record=H100_RECORD.name,
                 records=records)
  with tempfile.TemporaryDirectory() as tmp:
    sample = _sample(cfg.data, args.sample_documents) if set(names) - {'bytes'} else []
    for name in names:
      spec = {'bytes': lambda: 'bytes', 'bpe': lambda: _train_bpe(sample, Path(tmp)),
              'sentencepiece': lambda: _train_sentencepiece(sample, Path(tmp))}[name]()
      data_cfg = config_lib.load('configs/dense.py:151m',
                                 overrides + [f'data.tokenizer={spec}']).data
      inline = None
      for n in threads if name != 'bytes' else (0,):  # (bytes are always read inline)
        record = dict(tokenizer=name, threads=n, **tokens_per_s(
            data_cfg, batch=args.batch, threads=n, seconds=args.seconds))
        inline = inline or record['tokens_per_s']
        record['over_no_threads'] = record['tokens_per_s'] / inline
        record['h100s_fed_151m'] = record['tokens_per_s'] / h100['tokens_per_s']
        records.append(record)
        rows.append([name, str(n), f'{record["tokens_per_s"] / 1e3:,.0f}k',
                     f'{record["over_no_threads"]:.2f}', f'{record["h100s_fed_151m"]:.1f}'])
        save(results, args.out)  # a run cut off keeps the cases it finished
  emit(f'Training input pipeline, one process on {cores} CPU cores: batch {args.batch} x '
       f'{args.seq_len}', ['tokenizer', 'threads', 'tokens/s', 'over no threads',
                           'H100s fed (151m)'], rows, results, args.out)
  return results


if __name__ == '__main__':
  main()
