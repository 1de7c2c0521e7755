"""Mixture-of-experts transformer: the dense model with routed SwiGLU experts.

  jaxarch train --config=configs/moe.py:tiny --workdir=/tmp/jaxarch/moe-tiny
  jaxarch train --config=configs/moe.py:151m --workdir=/gcs/BUCKET/moe-151m

The paper presets are the MoE baselines of configs/ultramem.py's presets, not the
paper's own: the UltraMem paper (arXiv 2411.12364) compares against top-2 MoEs
(MoE-1.6B-2in34: 2 of 34 experts). Here the dense preset of the same name has every FFN
replaced by 64 fine-grained experts, top-4, sized so that the activated parameters per
token match the UltraMem preset of the same name and the total is as close as 64
experts allow (E/k = 16 where UltraMem's total/active FFN ratio is 16.0-16.5):

  preset  experts x d_ff  top-k  MoE total / active       UltraMem total / active
  tiny    8 x 192         2      2.66M / 0.89M            (CPU quick test)
  small   16 x 508        2      26.23M / 4.39M           26.18M / 4.37M (CPU benchmarks)
  151m    64 x 848        4      2.05B / 177.0M           2.05B / 175.8M
  680m    64 x 1200       4      8.72B / 760.9M           8.95B / 761.6M
  1.6b    64 x 1616       4      20.88B / 1.81B           21.46B / 1.80B

Routing: softmax gates, renormalised top-k, Switch balance loss 0.01, z-loss 0.001,
dropless (sort + grouped matmul). `model.moe.capacity_factor=1.25` switches to the
capacity path; `model.moe.bias_update_rate=0.001` adds auxiliary-loss-free balancing
(set `aux_loss_weight=0` with it, as DeepSeek-V3 does).
"""

from pathlib import Path

import ml_collections

from jaxarch import config as config_lib
from jaxarch.kernels.gmm_mosaic import MosaicTiling
from jaxarch.kernels.gmm_triton import Tiling

PRESETS = {
    'tiny': dict(num_experts=8, top_k=2, expert_d_ff=192),
    'small': dict(num_experts=16, top_k=2, expert_d_ff=508),
    '151m': dict(num_experts=64, top_k=4, expert_d_ff=848),
    '680m': dict(num_experts=64, top_k=4, expert_d_ff=1200),
    '1.6b': dict(num_experts=64, top_k=4, expert_d_ff=1616),
}


def get_config(arg=None):
  arg = arg or '151m'  # no preset: the 151m one, as configs/dense.py's defaults
  if arg not in PRESETS:
    raise ValueError(f'config error: unknown preset {arg!r} for configs/moe.py; '
                     f'expected one of {sorted(PRESETS)}')
  c = config_lib.load(f'{Path(__file__).with_name("dense.py")}:{arg}')
  c.unlock()
  c.model.family = 'moe'
  c.model.block_pattern = ('moe',)  # e.g. ('dense', 'moe') for experts every other layer

  m = ml_collections.ConfigDict()
  m.num_experts = 8
  m.top_k = 2
  m.expert_d_ff = 512  # hidden width of each routed expert
  m.num_shared_experts = 0  # always-on experts of the same width
  m.gate = 'softmax'  # softmax | sigmoid
  m.renormalize = True  # the chosen gates sum to 1
  # None: dropless (sort + grouped matmul); c: each expert takes ceil(c·s·k/E) tokens of
  # each sequence (of length s), first come first served.
  m.capacity_factor = ml_collections.config_dict.placeholder(float)
  # Dropless across expert shards: None never drops; c bounds each sequence's rows in
  # each shard's padded buffer to ceil(c·s·k/shards) and drops the overflow, first come
  # first served.
  m.ep_capacity_factor = ml_collections.config_dict.placeholder(float)
  # How dropless expert parallelism exchanges rows: ragged sends only the real ones
  # (jax.lax.ragged_all_to_all, GPU and TPU); padded sends each shard a worst-case
  # buffer (any backend); auto = ragged on TPU, padded on GPU (where ragged is unproven:
  # layers/moe.py) and CPU; ragged_emulated = ragged through an all_gather (CPU tests).
  m.ep_exchange = 'auto'  # auto | ragged | padded | ragged_emulated
  m.aux_loss_weight = 0.01  # Switch/GShard balance loss
  m.z_loss_weight = 0.001  # router z-loss
  m.bias_update_rate = 0.0  # auxiliary-loss-free balancing step (DeepSeek-V3: 0.001)
  # Dropless grouped matmuls: auto = Pallas (Triton) kernels on GPU, where XLA's ragged dot
  # computes every expert for every row; jax.lax.ragged_dot elsewhere (native on TPU);
  # mosaic = jax's Mosaic GPU ragged dot (Hopper) for the product and the input gradient.
  m.matmul_impl = 'auto'  # auto | xla | pallas | mosaic | interpret | interpret_mosaic
  # The Triton kernels' (block_m, block_n, block_k, num_warps, num_stages); the same
  # function whatever the tiling. `benchmarks/moe.py --tables=matmul` times others on a GPU.
  m.kernel_tiling = tuple(Tiling())
  # The Mosaic GPU kernels' (block_m, block_n, block_k, max_concurrent_steps, grid_block_n).
  m.mosaic_tiling = tuple(MosaicTiling())
  # With mosaic, the weight gradient's kernel: triton, or mosaic (jax's transposed ragged
  # dot, GPU only; benchmarks/moe.py checks it against ragged_dot on the GPU). The other
  # impls ignore it.
  m.mosaic_weight_grad = 'triton'
  m.update(PRESETS[arg])
  c.model.moe = m
  c.lock()
  return c
