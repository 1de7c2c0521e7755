"""QK-norm on and off over learning rates: the same dense run with and without
`model.qk_norm` at three peak rates.

  jaxarch sweep --config=configs/sweeps/qk_norm.py:tiny --workdir=runs/qk-norm-tiny

QK-norm (Qwen3's) normalises each head's query and key before the rotation, so the
attention logits are bounded by the norms' scales whatever the projections' size; the
claim to test is that it widens the range of learning rates that train well.
`results.jsonl` holds each run's final eval loss.

  tiny    configs/dense.py:tiny, 300 steps (30 of warmup) of 16 x 128 bytes (CPU, about
          a minute each on 2 cores)
"""

LEARNING_RATES = (1e-2, 3e-2, 1e-1)


def get_sweep(arg=None):
  if arg != 'tiny':
    raise ValueError(f'config error: unknown sweep {arg!r} for configs/sweeps/qk_norm.py; '
                     'expected tiny')
  return [{'config': 'configs/dense.py:tiny', 'name': f'lr{lr:g}_qk_{"on" if qk else "off"}',
           'train.steps': 300, 'train.warmup_steps': 30, 'log.every_steps': 50,
           'log.eval_every_steps': 300, 'train.lr': lr, 'model.qk_norm': qk}
          for lr in LEARNING_RATES for qk in (False, True)]
