"""BiTA: prompt and mask tokens that let a frozen model draft several tokens per pass.

A BiTA run starts from a trained dense, MoE or UltraMem run (its "base"): the model
section and tokenizer come from the base run's config.json, its weights from the base's
latest checkpoint, and only BiTA's prompt and mask tokens train (0.96% of the tiny
preset's parameters, 0.26% of 151m's, 0.06% of a 7B model's). The data are the base
model's own greedy continuations:

  jaxarch train --config=configs/dense.py:tiny --workdir=/tmp/base
  jaxarch distill --workdir=/tmp/base --out=/tmp/base-distilled
  jaxarch train --config=configs/bita.py:tiny --workdir=/tmp/bita \
      --config.model.bita.base_workdir=/tmp/base --config.data.source=distilled:/tmp/base-distilled
  jaxarch generate --workdir=/tmp/bita --method=bita --prompt="def "

The defaults are those of the authors' release (arXiv 2401.12522; linfeng93/BiTA): 16
prompt tokens as per-layer key/value prefixes, 3 mask tokens, learning rate 3e-2 with a
cosine schedule, and a draft tree of the top 5, 4 and 3 tokens of the three masks. Keys of
the base model's section (e.g. `model.remat`) can be overridden like any other.

  preset  for base runs of   rows (prompt + continuation)  steps x batch
  tiny    dense.py:tiny etc  128 (32 + 96)                 600 x 16   (CPU, ~5 minutes on 2 cores)
  151m    the 151m presets   512 (64 + 448)                4000 x 32
"""

from pathlib import Path

import ml_collections

from jaxarch import config as config_lib

PRESETS = {
    'tiny': dict(seq_len=128, train_groups=32, steps=600, batch_size=16, warmup_steps=30,
                 checkpoint_every=300, log_every=20, eval_every=200),
    '151m': dict(seq_len=512, train_groups=64, steps=4000, batch_size=32, warmup_steps=200,
                 checkpoint_every=1000, log_every=50, eval_every=500),
}


def get_config(arg=None):
  arg = arg or '151m'  # no preset: the 151m one, as configs/dense.py's defaults
  if arg not in PRESETS:
    raise ValueError(f'config error: unknown preset {arg!r} for configs/bita.py; '
                     f'expected one of {sorted(PRESETS)}')
  p = PRESETS[arg]
  # Mesh, checkpoint and logging sections as for any run; the model section is replaced.
  c = config_lib.load(f'{Path(__file__).with_name("dense.py")}:{arg}')
  c.unlock()

  c.model = ml_collections.ConfigDict()
  c.model.family = 'bita'
  b = c.model.bita = ml_collections.ConfigDict()
  b.base_workdir = ml_collections.config_dict.placeholder(str)  # the trained base run
  b.num_prompt_tokens = 16  # per-layer key/value prefixes seen only by mask tokens
  b.num_mask_tokens = 3  # M: each pass drafts M tokens after every candidate
  b.draft_tree = (5, 4, 3)  # candidates per level: top-k of mask 0, 1, 2
  b.train_groups = p['train_groups']  # mask groups per training row; 0: after every token
  b.init_std = 0.02

  c.data.source = ml_collections.config_dict.placeholder(str)  # distilled:<dir>
  c.data.tokenizer = ml_collections.config_dict.placeholder(str)  # None: the base run's
  c.data.add_bos = ml_collections.config_dict.placeholder(bool)  # None: the base run's
  c.data.seq_len = p['seq_len']

  c.train.steps = p['steps']
  c.train.batch_size = p['batch_size']
  c.train.lr = 3e-2
  c.train.schedule = 'cosine'
  c.train.warmup_steps = p['warmup_steps']
  c.train.min_lr_ratio = 0.0
  c.train.weight_decay = 0.0
  c.checkpoint.every_steps = p['checkpoint_every']
  c.log.every_steps = p['log_every']
  c.log.eval_every_steps = p['eval_every']
  c.lock()
  return c
