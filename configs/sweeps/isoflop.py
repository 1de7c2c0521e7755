"""IsoFLOP sweeps: several model sizes at each of several compute budgets, per family.

  jaxarch sweep --config=configs/sweeps/isoflop.py:tiny --workdir=runs/sweep-tiny
  jaxarch fit --workdir=runs/sweep-tiny

`get_sweep(arg)`:

  dense | moe | ultramem | megabyte   one family's grid at GPU scale: at each of the
                                      budgets 1e17, 3e17, 1e18, 3e18 FLOPs, the 5 of 8
                                      sizes (4M to 1.3B dense) nearest its optimum
  cross_family                        the four grids together, for the family comparison
  tiny                                the cross-family design at CPU scale: 3 widths
                                      (24, 48, 96) x 3 budgets (2.5e10 to 2.5e11) x 4
                                      families = 36 runs of 12 to 6502 steps, 21 minutes
                                      on 2 cores with --parallel=2 (docs/scaling)

Each size sets the width (and depth at GPU scale) of the family's preset; the sparse
families keep their sparse part in proportion: MoE's experts are d_model·3/2 wide (top 2
of 8: an active feed-forward like dense's 3·d_model), UltraMem's values are d_model wide
and MEGABYTE's local model is half the global width. Tokens follow from each budget and
size by the FLOPs convention of `jaxarch.train.flops` (`sweep.plan.isoflop_grid`).

At GPU scale a budget trains only the sizes around its likely optimum (Chinchilla's 20
tokens per parameter are BPE tokens of about 4 bytes of English: 80 per parameter where a
token is a byte, as in every family's preset, MEGABYTE's and the byte tokenizer's), so
that each IsoFLOP profile has sizes on both sides of its minimum and no budget is spent on
a model far from it. The runs are bf16 on sequences of 1024, and the learning rate falls
as 1/width from 2e-3 at width 256 (as GPT-3's table does with model size).
"""

from jaxarch import config as config_lib
from jaxarch.sweep.plan import TOKENS_PER_PARAM, isoflop_grid

FAMILIES = ('dense', 'moe', 'ultramem', 'megabyte')
SPECS = {  # family -> (CPU preset, GPU preset)
    'dense': ('configs/dense.py:tiny', 'configs/dense.py:small'),
    'moe': ('configs/moe.py:tiny', 'configs/moe.py:small'),
    'ultramem': ('configs/ultramem.py:tiny', 'configs/ultramem.py:small'),
    'megabyte': ('configs/megabyte.py:tiny', 'configs/megabyte.py:small'),
}


def size(family: str, d_model: int, n_layers: int | None = None) -> dict:
  """Overrides that give `family` a model of width `d_model` (and `n_layers`)."""
  values = {'model.d_model': d_model, 'model.d_ff': 3 * d_model}
  if n_layers is not None:
    values['model.n_layers'] = n_layers
  if family == 'moe':
    values['model.moe.expert_d_ff'] = 3 * d_model // 2
  elif family == 'ultramem':
    values['model.ultramem.value_dim'] = d_model
  elif family == 'megabyte':
    local = d_model // 2
    heads = 4 if local % 8 == 0 else 2  # an even head dimension, for RoPE
    values.update({'model.megabyte.local.d_model': local,
                   'model.megabyte.local.d_ff': 3 * local,
                   'model.megabyte.local.n_heads': heads,
                   'model.megabyte.local.n_kv_heads': heads})
  return values


# CPU scale: 4 layers (UltraMem's tiny placement needs them), sequences of 64 tokens,
# 32 evaluation batches (16k bytes) so that families compare on more than noise.
TINY_WIDTHS = {'s': 24, 'm': 48, 'l': 96}
TINY_BUDGETS = (2.5e10, 7.5e10, 2.5e11)
TINY_COMMON = {'data.seq_len': 64, 'train.batch_size': 8, 'log.every_steps': 25,
               'log.eval_batches': 32, 'model.n_layers': 4}

# GPU scale: a ladder of (width, depth), each budget taking the 5 nearest its optimum.
SHAPES = {'xs': (256, 4), 's': (384, 6), 'm': (512, 8), 'l': (768, 10), 'xl': (1024, 12),
          '2xl': (1280, 16), '3xl': (1536, 20), '4xl': (2048, 24)}
BUDGETS = (1e17, 3e17, 1e18, 3e18)
PER_BUDGET = 5
COMMON = {'train.batch_size': 64, 'data.seq_len': 1024, 'model.dtype': 'bfloat16'}
LR_AT_256 = 2e-3  # the `small` presets' rate, at their width
BYTES_PER_PARAM = 4 * TOKENS_PER_PARAM  # a BPE token holds about 4 bytes


def _tokens_per_param(spec: str) -> float:
  """The compute-optimal tokens per parameter of a preset's tokens: bytes (MEGABYTE, the
  byte tokenizer) carry less each than Chinchilla's BPE tokens."""
  cfg = config_lib.load(spec)
  byte_level = cfg.model.family == 'megabyte' or cfg.data.tokenizer == 'bytes'
  return BYTES_PER_PARAM if byte_level else TOKENS_PER_PARAM


def _family(family: str, tiny: bool) -> list[dict]:
  spec = SPECS[family][0 if tiny else 1]
  if tiny:
    common = dict(TINY_COMMON)
    if family == 'megabyte':
      common['model.n_layers'] = 2  # its global model; the local one has 2 more
    sizes = {k: size(family, d) for k, d in TINY_WIDTHS.items()}
    return isoflop_grid(family, spec, sizes, TINY_BUDGETS, common)
  sizes = {k: {**size(family, d, n), 'train.lr': LR_AT_256 * 256 / d}
           for k, (d, n) in SHAPES.items()}
  return isoflop_grid(family, spec, sizes, BUDGETS, COMMON, per_budget=PER_BUDGET,
                      tokens_per_param=_tokens_per_param(spec))


def get_sweep(arg=None):
  if arg in FAMILIES:
    return _family(arg, tiny=False)
  if arg == 'cross_family':
    return [run for family in FAMILIES for run in _family(family, tiny=False)]
  if arg == 'tiny':
    return [run for family in FAMILIES for run in _family(family, tiny=True)]
  raise ValueError(f'config error: unknown sweep {arg!r} for configs/sweeps/isoflop.py; '
                   f'expected one of {", ".join(FAMILIES)}, cross_family, tiny')
