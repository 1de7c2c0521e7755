"""What UltraMem's Tucker aux loss does: the table of a `configs/sweeps/ultramem_aux.py` sweep.

  jaxarch sweep --config=configs/sweeps/ultramem_aux.py:tiny --workdir=runs/aux-tiny
  python benchmarks/ultramem_aux.py --workdir=runs/aux-tiny \
      [--out=benchmarks/results/ultramem_aux.json]

Per aux-loss weight (the sweep's runs, the same model, data and seed otherwise): the final
train and validation losses, bits per byte, and per memory layer the unweighted
`tucker_aux` (the mean of relu(σ_i − τ)² over the non-leading singular values of ΣC_i) and
the leading singular-value ratio σ_2/σ_1 of the summed cores, read from the run's last
checkpoint: how far the rows and columns are chosen by an exact rank-one picture.
"""

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp

from report import device_info, emit

from jaxarch.sweep.runner import read_results
from jaxarch.train.metrics import read_metrics
from jaxarch.train.pretrained import load_model


def singular_ratios(model) -> list[float]:
  """σ_2/σ_1 of ΣC_i (summed over cores, per head, the worst head) of each memory layer."""
  ratios = []
  for layer in model.side_layers:
    cores = layer.memory.cores.get_value().sum(axis=1)  # h r r
    s = jnp.linalg.svd(cores, compute_uv=False)  # h r, descending
    ratios.append(float((s[:, 1] / s[:, 0]).max()))
  return ratios


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='the sweep directory')
  parser.add_argument('--out', default='benchmarks/results/ultramem_aux.json')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  root = Path(args.workdir)
  records = read_results(root)
  if not records:
    raise SystemExit(f'no finished runs in {root}: run the sweep first')
  rows, results = [], []
  for record in sorted(records, key=lambda r: r['name']):
    run = root / 'runs' / record['name']
    last = read_metrics(run)[-1]
    aux = [v for k, v in sorted(last.items()) if k.endswith('/tucker_aux')]
    cfg, model = load_model(run)
    ratios = singular_ratios(model)
    result = {**record, 'aux_loss_weight': cfg.model.ultramem.aux_loss_weight,
              'tucker_aux': aux, 'sigma2_over_sigma1': ratios}
    results.append(result)
    rows.append([f'{result["aux_loss_weight"]:g}', str(record['steps']),
                 f'{record["final_loss"]:.4f}', f'{record["eval_loss"]:.4f}',
                 f'{record["bpb"]:.4f}', ' '.join(f'{a:.2e}' for a in aux),
                 ' '.join(f'{r:.3f}' for r in ratios)])
  emit('UltraMem Tucker aux loss', ['weight', 'steps', 'train loss', 'eval loss', 'bpb',
                                    'tucker_aux per layer', 'σ2/σ1 per layer'],
       rows, {**device_info(), 'workdir': str(root), 'results': results}, args.out)


if __name__ == '__main__':
  main()
