"""UltraMem: the dense transformer of configs/dense.py plus skip-placed memory layers.

  jaxarch train --config=configs/ultramem.py:tiny --workdir=/tmp/jaxarch/ultramem-tiny
  jaxarch train --config=configs/ultramem.py:151m --workdir=/gcs/BUCKET/ultramem-151m

The paper (arXiv 2411.12364, Table 1) pairs each dense baseline with an UltraMem model of
about 13x its parameters ("x12" memory) at the dense model's compute: 151M -> 2.03B,
680M -> 8.93B, 1.6B -> 21.41B total parameters. The paper does not list every shape, so
the presets below fix the layer mechanics to the authors' release (d_model 768, 20 layers:
4 memory layers 2:5/6:9/10:13/14:17, d_k 192, d_v 384, top-k 80, 2 heads, Tucker rank 2,
2 cores, IVE E=4, value lr multiplier 4 decaying to 1) scaled to each width
(d_k = d_model/4, d_v = d_model/2), place one memory layer every four blocks with a read
-> write distance of three blocks as the release does, and choose n (values per side) so
that the total parameter count matches the paper's:

  preset  dense  memory layers (read:write)      n     values/layer  d_v   total (paper)  active
  small   3.36M  0:2 1:3 (2)                     292   85,264        128   26.18M (-)     4.37M
  151m    151M   2:5 6:9 10:11 (3)               1104  1,218,816     512   2.05B (2.03B)  176M
  680m    680M   2:5 6:9 10:13 14:17 18:21 (5)   1460  2,131,600     768   8.95B (8.93B)  762M
  1.6b    1.62B  2:5 6:9 ... 26:29 (7)           1656  2,742,336     1024  21.46B (21.41B) 1.80B

Active parameters per token (what a token multiplies or reads) stay close to the dense
model: each memory layer adds its query, keys, output projection and the heads·k·d_v
values it reads (counted by `models.param_counts`; `jaxarch train` prints both counts).
"""

from pathlib import Path

import ml_collections

from jaxarch import config as config_lib


def _placement(n_memory: int, n_layers: int, first: int = 2, every: int = 4,
               distance: int = 3) -> tuple[tuple[int, int], ...]:
  """(read, write) pairs every `every` blocks, writing `distance` blocks after reading."""
  pairs = []
  for i in range(n_memory):
    read = first + every * i
    pairs.append((read, min(read + distance, n_layers - 1)))
  return tuple(pairs)


PRESETS = {
    # CPU: 2 memory layers of 64x64 values on the tiny dense model.
    'tiny': dict(num_values=64 * 64, key_dim=32, value_dim=64, top_k=16, num_heads=2,
                 placement=((0, 2), (1, 3))),
    # CPU benchmarks: 292x292 values in each of 2 layers on the small dense model,
    # matched to configs/moe.py:small in total (26.18M) and active (4.37M) parameters.
    'small': dict(num_values=292 * 292, key_dim=64, value_dim=128, top_k=32, num_heads=2,
                  placement=((0, 2), (1, 3))),
    '151m': dict(num_values=1104 * 1104, key_dim=256, value_dim=512,
                 placement=_placement(3, 12)),
    '680m': dict(num_values=1460 * 1460, key_dim=384, value_dim=768,
                 placement=_placement(5, 24)),
    '1.6b': dict(num_values=1656 * 1656, key_dim=512, value_dim=1024,
                 placement=_placement(7, 32)),
}


def get_config(arg=None):
  arg = arg or '151m'  # no preset: the 151m one, as configs/dense.py's defaults
  if arg not in PRESETS:
    raise ValueError(f'config error: unknown preset {arg!r} for configs/ultramem.py; '
                     f'expected one of {sorted(PRESETS)}')
  c = config_lib.load(f'{Path(__file__).with_name("dense.py")}:{arg}')
  c.unlock()
  c.model.family = 'ultramem'

  # Memory section: the authors' release unless a preset says otherwise.
  u = ml_collections.ConfigDict()
  u.num_values = 808 * 808  # physical values per layer, n x n
  u.key_dim = 192
  u.value_dim = 384
  u.top_k = 80  # values read per token and head
  # Rows and columns kept per side; None means top_k (the release's choice).
  u.top_m = ml_collections.config_dict.placeholder(int)
  u.num_heads = 2
  u.tucker_rank = 2
  u.num_cores = 2
  u.ive_expansion = 4  # virtual values per physical one (a perfect square)
  u.aux_loss_weight = 0.0  # the release defines 0.001 but keeps it off
  u.aux_tau = 0.15
  # Rank candidate rows/columns by |score·u| rather than score·u: the signed ranking never
  # pairs two negative side scores, whose product is large (recall 0.98 vs 0.49 at init).
  u.rank_by_magnitude = True
  u.query_conv = 0  # kernel of the optional causal depthwise conv on the query input
  u.heads_per_query = 1  # 2: pairs of heads share one query (an option of the release)
  # Value lookup kernels: 'auto' is Pallas on GPU/TPU, XLA on CPU (kernels.sparse_lookup).
  # The table gradient is summed 'sorted' (deterministic) or 'atomic' (GPU fp32 atomics).
  u.lookup_impl = 'auto'
  u.lookup_scatter = 'sorted'
  # Ranking keys: 0 is one jax.lax.top_k per ranking; N ranks rows longer than N in chunks
  # of N scores and then the chunks' best (the same result; kernels/top_k.py: on a GPU a
  # top-k of k > 16 is a sort of the whole row, which shared memory holds in chunks).
  u.top_k_chunk = 0
  # A sharded table is split by 'rows' over the mesh axes of `values` (each device sums
  # the reads of its rows) or along its 'width' (every device reads its columns of
  # every row: balanced whatever rows are popular). kernels/sharded_lookup.py.
  u.table_split = 'rows'
  u.placement = ((2, 5), (6, 9), (10, 13), (14, 17))
  # The IVE permutation: one for every memory layer ('shared'), so that the layers stack
  # into a scan (`model.scan_layers`), or each layer's own ('per_layer', older runs). Each
  # layer's keys and values are its own either way.
  u.permutation = 'shared'
  u.update(PRESETS[arg])
  c.model.ultramem = u

  # Optimizer section: values learn T=4 times faster at first, decaying to 1x.
  c.train.groups.values = ml_collections.ConfigDict(
      dict(lr_multiplier=4.0, multiplier_decay='linear'))
  c.lock()
  return c
