"""MEGABYTE: a global transformer over patches of bytes and a local one inside each patch.

  jaxarch train --config=configs/megabyte.py:tiny --workdir=/tmp/jaxarch/megabyte-tiny
  jaxarch train --config=configs/megabyte.py:1.5b --workdir=/gcs/BUCKET/megabyte-1.5b

`model.d_model` and the other top-level shape keys describe the global model (its width
is P·D_G, the concatenated byte embeddings of a patch); `model.megabyte.local` the local
one. The global model is built from `model.block_pattern` like any jaxarch transformer,
so it may hold `moe` blocks or `ultramem` memory layers: `tiny_ultramem` and `tiny_moe`
show them.

  preset        P  global d x layers (heads)  local d x layers (heads)  context  params
  tiny          4  128 x 2 (4)                64 x 2 (4)                128      0.57M
  tiny_ultramem 4  tiny + 1 memory layer of 32x32 values (0.64M active)  128      0.70M
  tiny_moe      4  tiny, block 2 of 4 experts x 192, top 2 (0.57M active) 128      0.72M
  small         8  512 x 4 (8)                256 x 2 (4)               1024     14.4M
  151m          8  1024 x 12 (8)              512 x 6 (8)               8192     171M
  1.5b          8  2048 x 24 (16)             1024 x 15 (16)            8192     1.40B
  text          8  2048 x 14 (16)             1024 x 18 (16)            8192     937M

`1.5b` is the paper's PG-19 ratio-study model (arXiv 2305.07185 §6: a 1.3B global model
of width 2048 x 24 layers and a 218M local model of 1024 x 15 layers, patch 8, 8192
bytes), the one reported at 0.991 bits per byte; with SwiGLU feed-forwards of 8/3 width
it has 1.40B parameters to the paper's 1.3B + 218M. `151m` puts the dense 151m preset's
stack (1024 x 12) in the global model and a local model of half its width, so that it
compares with the 151m presets of the other families. `text` is the paper's
compute-matched text model (§5: global 2048 x 14, local 1024 x 18, patch 8, 8192 bytes),
the one compared with a byte transformer at equal compute. The paper's init (normal, std
0.006 for every weight, residual writes included, truncated at 2σ) and Adam (0.9, 0.98,
no weight decay) are used at paper scale; the small presets keep the project's defaults,
which train faster at their width.

`model.megabyte.local.attention_impl` is the local model's attention, `xla` by default
whatever `model.attention_impl` says: its sequences are patches of P bytes, and cuDNN's
flash attention computes tiles of 64-128 query and key rows (at P = 8, about 64-256 times
the products the patch needs; not yet timed on a GPU, where `benchmarks/mfu.py` runs
MEGABYTE with both). `auto` or `cudnn` give it cuDNN's on a GPU.
"""

from pathlib import Path

import ml_collections

from jaxarch import config as config_lib

PRESETS = {
    'tiny': dict(patch_size=4, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=384,
                 local=dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=192)),
    'small': dict(patch_size=8, d_model=512, n_layers=4, n_heads=8, n_kv_heads=8, d_ff=1376,
                  local=dict(d_model=256, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=688),
                  seq_len=1024),
    '151m': dict(patch_size=8, d_model=1024, n_layers=12, n_heads=8, n_kv_heads=8, d_ff=2752,
                 local=dict(d_model=512, n_layers=6, n_heads=8, n_kv_heads=8, d_ff=1376),
                 seq_len=8192, paper_init=True),
    '1.5b': dict(patch_size=8, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16,
                 d_ff=5504, local=dict(d_model=1024, n_layers=15, n_heads=16, n_kv_heads=16,
                                       d_ff=2752), seq_len=8192, paper_init=True),
    'text': dict(patch_size=8, d_model=2048, n_layers=14, n_heads=16, n_kv_heads=16,
                 d_ff=5504, local=dict(d_model=1024, n_layers=18, n_heads=16, n_kv_heads=16,
                                       d_ff=2752), seq_len=8192, paper_init=True),
}


COMPOSED = ('tiny_ultramem', 'tiny_moe')  # tiny with memory layers or MoE blocks


def get_config(arg=None):
  arg = arg or '151m'  # no preset: the 151m one, as configs/dense.py's defaults
  preset = 'tiny' if arg in COMPOSED else arg
  if preset not in PRESETS:
    raise ValueError(f'config error: unknown preset {arg!r} for configs/megabyte.py; '
                     f'expected one of {sorted([*PRESETS, *COMPOSED])}')
  p = dict(PRESETS[preset])
  dense = 'tiny' if preset in ('tiny', 'small') else '151m'
  c = config_lib.load(f'{Path(__file__).with_name("dense.py")}:{dense}')
  c.unlock()
  c.model.family = 'megabyte'
  c.model.tie_embeddings = True  # the head is the local byte embedding's, as in the paper
  for key in ('d_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff'):
    c.model[key] = p[key]
  seq_len = p.get('seq_len', c.data.seq_len)
  c.data.seq_len = seq_len
  c.model.max_len = max(c.model.max_len, seq_len)
  c.data.pack_align = p['patch_size']  # every document starts on a patch boundary

  mb = ml_collections.ConfigDict()
  mb.patch_size = p['patch_size']
  mb.local = ml_collections.ConfigDict(p['local'])
  mb.local.attention_impl = 'xla'  # patches of P bytes: see above
  c.model.megabyte = mb

  if p.get('paper_init'):
    c.model.init_std = 0.006
    c.model.init_truncation = 2.0
    c.model.residual_init_scale = False  # one std for every weight, as in the paper
    c.train.b2 = 0.98
    c.train.weight_decay = 0.0  # Adam, as the paper trains, not AdamW
    c.train.warmup_steps = 500

  if arg == 'tiny_ultramem':  # the global model with UltraMem memory layers
    ultramem = config_lib.load(f'{Path(__file__).with_name("ultramem.py")}:tiny')
    u = ultramem.model.ultramem
    u.unlock()
    u.num_values = 32 * 32
    u.placement = ((0, 1),)
    c.model.ultramem = u
    c.train.groups = ultramem.train.groups  # the values' learning-rate multiplier
  if arg == 'tiny_moe':  # the global model's second block routes over 4 experts
    m = config_lib.load(f'{Path(__file__).with_name("moe.py")}:tiny').model.moe
    m.unlock()
    m.num_experts, m.top_k, m.expert_d_ff = 4, 2, 192
    c.model.moe = m
    c.model.block_pattern = ('dense', 'moe')
  c.lock()
  return c
