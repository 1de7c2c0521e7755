"""The `moe` block: attention + a routed mixture of SwiGLU experts (`layers.moe`), whose
routing statistics (load, balance and z-losses, the bias update) skip padding tokens.

Placed by `model.block_pattern`, e.g. ('moe',) for experts in every layer or
('dense', 'moe') for every other layer; `model.moe` configures the experts.
"""

import ml_collections
from flax import nnx

from jaxarch.layers.moe import MoE
from jaxarch.models.transformer import (DTYPES, DenseBlock, make_attention, post_norm,
                                        register_block, residual_init_std)


class MoEBlock(DenseBlock):
  """A `DenseBlock` whose FFN is a `layers.moe.MoE`, told which tokens are padding."""

  def ffn(self, x, normed, segment_ids):
    return x + post_norm(self.mlp_post_norm,
                         self.mlp(normed, real=segment_ids > 0))  # padding: segment 0


@register_block('moe')
def moe_block(cfg: ml_collections.ConfigDict, layer: int, rngs: nnx.Rngs) -> MoEBlock:
  m = cfg.moe
  dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
  experts = MoE(cfg.d_model, num_experts=m.num_experts, top_k=m.top_k,
                expert_d_ff=m.expert_d_ff, num_shared_experts=m.num_shared_experts,
                capacity_factor=m.capacity_factor, ep_capacity_factor=m.ep_capacity_factor,
                gate=m.gate, renormalize=m.renormalize, aux_loss_weight=m.aux_loss_weight,
                z_loss_weight=m.z_loss_weight, bias_update_rate=m.bias_update_rate,
                matmul_impl=m.matmul_impl, kernel_tiling=m.kernel_tiling,
                mosaic_tiling=m.mosaic_tiling, mosaic_weight_grad=m.mosaic_weight_grad,
                ep_exchange=m.ep_exchange,
                init_std=cfg.init_std, out_std=residual_init_std(cfg),
                init_truncation=cfg.init_truncation, dtype=dtype,
                param_dtype=param_dtype, rngs=rngs)
  return MoEBlock(make_attention(cfg, layer, rngs), experts, cfg.d_model, eps=cfg.norm_eps,
                  post_norms=cfg.post_norms, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
