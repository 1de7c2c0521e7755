"""What a rematerialised block keeps for its backward pass (`model.remat`).

- `none`: no remat; the backward reads everything the forward made.
- `full`: only the block's input; the backward runs the whole block's forward again.
- `dots`: the outputs of the matmuls; the backward recomputes only the elementwise work
  between them (norms, RoPE, activations), which is cheap in FLOPs and dear in memory.

A matmul here is every op that does a matmul's work, not only a `dot_general` without
batch dimensions (`jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims`, which
keeps the projections). Three other kinds would otherwise run twice, once more in the
backward: attention's output (its einsums have batch dimensions), MoE's grouped matmuls
(`ragged_dot` or Pallas kernels; on XLA:CPU the dots policy alone took `moe:tiny` from
5.7× to 7.5× its model FLOPs) and cuDNN flash attention's forward (a custom call, whose
backward needs its output and softmax statistics). Layers name the first two outputs
with `checkpoint_name(x, ATTENTION | EXPERT_MATMUL)`; cuDNN's forward is kept by its
primitive. Attention's score matrix ([b, heads, t, t]) is never kept: recomputing it is
the point of flash attention and of remat.
"""

import jax

ATTENTION = 'attention'  # attention's output per head, before the output projection
EXPERT_MATMUL = 'expert_matmul'  # each grouped matmul of the routed experts

# jax's primitive for cuDNN flash attention's forward (jax._src.cudnn); if a jax release
# renames it, `dots` recomputes that forward again: slower, never wrong.
_CUDNN_ATTENTION_FORWARD = 'dot_product_attention_fwd_wrapper'

_dots = jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
_named = jax.checkpoint_policies.save_only_these_names(ATTENTION, EXPERT_MATMUL)


def save_matmuls(prim, *avals, **params) -> bool:
  """The `dots` policy: keep the output of every op that does a matmul's work."""
  return (prim.name == _CUDNN_ATTENTION_FORWARD or _dots(prim, *avals, **params)
          or _named(prim, *avals, **params))


# model.remat -> the policy of `jax.checkpoint` (None: keep only the block's input).
POLICIES = {'full': None, 'dots': save_matmuls}
