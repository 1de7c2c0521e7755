"""UltraMem's key ranking: one `jax.lax.top_k` against the same ranked in chunks.

  python benchmarks/top_k.py [--rows=32768] [--lengths=1024,6400] [--k=80]
                             [--chunks=512,1024,2048] [--iters=10] [--out=...]

Each memory layer ranks, per token and head, its row and column keys (`--lengths`' first:
1024 for the one-GPU UltraMem 680m case, a 512² table with IVE expansion 4) and then the
k × k grid of their products (6,400 at k = 80), keeping k. XLA's GPU top-k kernel takes
k <= 16; a larger k sorts each whole row. `kernels.top_k.chunked_top_k` ranks chunks of
a row and then their best, the same values and indices (checked here on every case):
`model.ultramem.top_k_chunk` picks it. Rows: batch 16 × 1024 tokens × 2 heads. Reported:
milliseconds per ranking of fp32 scores and the ratio to one top-k.
"""

import functools
import sys

import jax
import numpy as np

from report import device_info, emit, ints, or_error, save, scaled_parser, timed

from jaxarch.cli import at_least_one
from jaxarch.kernels.top_k import chunked_top_k

SCALES = {
    'gpu': dict(rows=32768, lengths=(1024, 6400), k=80, chunks=(512, 1024, 2048)),
    'cpu': dict(rows=2048, lengths=(1024, 6400), k=80, chunks=(1024,)),
}


def main(argv=None):
  parser, scale = scaled_parser(__doc__, SCALES)
  parser.add_argument('--rows', type=at_least_one, default=scale['rows'])
  parser.add_argument('--lengths', type=ints, default=scale['lengths'])
  parser.add_argument('--k', type=at_least_one, default=scale['k'])
  parser.add_argument('--chunks', type=ints, default=scale['chunks'])
  parser.add_argument('--iters', type=at_least_one, default=10)
  parser.add_argument('--out', default='benchmarks/results/top_k.json')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  records, rows = [], []
  data = dict(**device_info(), rows=args.rows, k=args.k, records=records)
  for n in args.lengths:
    x = jax.random.normal(jax.random.key(n), (args.rows, n))
    want = jax.jit(jax.lax.top_k, static_argnums=1)(x, args.k)
    one = None  # ms of one top-k
    for chunk in (0, *args.chunks):
      fn = jax.jit(functools.partial(chunked_top_k, k=args.k, chunk=chunk))
      record = dict(length=n, chunk=chunk)
      seconds = or_error(timed, fn, x, iters=args.iters)
      if isinstance(seconds, str):
        record['error'] = seconds
      else:
        record['ms'] = 1e3 * seconds
        record['equal'] = all(np.array_equal(a, b) for a, b in zip(fn(x), want))
        if not chunk:
          one = record['ms']
        elif one:
          record['over_one_top_k'] = record['ms'] / one
      records.append(record)
      rows.append([str(n), str(chunk or 'one top-k'),
                   record['error'][:60] if 'error' in record else f'{record["ms"]:.3f}',
                   '-' if record.get('over_one_top_k') is None else
                   f'{record["over_one_top_k"]:.2f}', str(record.get('equal', '-'))])
      save(data, args.out)  # a run cut off keeps the cases it timed
  emit(f'top-{args.k} of {args.rows:,} fp32 rows on {jax.devices()[0].device_kind}',
       ['length', 'chunk', 'ms', 'over one top-k', 'equal'], rows, data, args.out)
  return data


if __name__ == '__main__':
  main()
