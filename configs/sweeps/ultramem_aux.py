"""UltraMem's Tucker aux loss, on and off: the same run at weights 0, 1e-3 and 1e-2.

  jaxarch sweep --config=configs/sweeps/ultramem_aux.py:tiny --workdir=runs/aux-tiny
  python benchmarks/ultramem_aux.py --workdir=runs/aux-tiny   # the table: loss, tucker_aux

The paper's loss is the mean of relu(σ_i − τ)² over the non-leading singular values
σ_2..σ_r of the summed Tucker cores ΣC_i (τ = 0.15): it pulls ΣC_i towards rank one, the
approximation by which rows and columns are chosen before the exact scores. The authors'
release defines a weight of 0.001 and keeps it off; `model.ultramem.aux_loss_weight` is the
switch, and this sweep measures what it does.

  tiny    configs/ultramem.py:tiny, 500 steps of 16 x 128 tokens (CPU, a few minutes each)
  small   configs/ultramem.py:small, its 2000 steps of 32 x 256 tokens (GPU)
"""

WEIGHTS = (0.0, 1e-3, 1e-2)
SCALES = {
    'tiny': ('configs/ultramem.py:tiny', {'log.eval_every_steps': 500, 'log.eval_batches': 32,
                                          'log.every_steps': 50}),
    'small': ('configs/ultramem.py:small', {'log.eval_batches': 32}),
}


def get_sweep(arg=None):
  if arg not in SCALES:
    raise ValueError(f'config error: unknown sweep {arg!r} for configs/sweeps/'
                     f'ultramem_aux.py; expected one of {", ".join(SCALES)}')
  spec, common = SCALES[arg]
  return [{'config': spec, 'name': f'aux_{weight:g}', **common,
           'model.ultramem.aux_loss_weight': weight} for weight in WEIGHTS]
