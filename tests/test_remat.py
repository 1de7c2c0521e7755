"""model.remat=dots keeps every matmul's output: the backward runs no matmul forward again."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name, print_saved_residuals

from jaxarch import config as config_lib
from jaxarch import models
from jaxarch.layers import remat
from jaxarch.train.flops import compiled_flops

SMALL_MOE = ['model.d_model=32', 'model.n_heads=2', 'model.n_kv_heads=2', 'model.n_layers=2',
             'model.moe.expert_d_ff=48', 'data.seq_len=32', 'model.dtype=float32']


def _moe_grads(remat_mode: str):
  """(gradients, XLA's FLOPs of the compiled gradient) of a small MoE model."""
  cfg = config_lib.load('configs/moe.py:tiny', [*SMALL_MOE, f'model.remat={remat_mode}'])
  graphdef, state = nnx.split(models.build(cfg.model, rngs=nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 256)

  def loss(params):
    logits = nnx.merge(graphdef, params)(tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  compiled = jax.jit(jax.grad(loss)).lower(state).compile()
  return compiled(state), compiled_flops(compiled)


def test_dots_recomputes_no_expert_matmul():
  (plain, none), (dots, saved), (full, everything) = map(_moe_grads, ('none', 'dots', 'full'))
  # The grouped matmuls (ragged_dot here, 8 experts) are most of the FLOPs: run again in
  # the backward they add a third (measured: 1.33x, with the dots policy of jax alone);
  # kept, only attention's scores and the elementwise work are redone (1.04x).
  assert saved <= 1.1 * none, (saved, none)
  assert everything >= 1.2 * none, (everything, none)  # full remat does redo them
  for other in (dots, full):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, other)


def _saved(fn, *args) -> str:
  """What `jax.checkpoint(fn, policy=dots)` keeps for the backward, as jax prints it."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(jax.checkpoint(fn, policy=remat.POLICIES['dots']), *args)
  return out.getvalue()


def test_dots_keeps_the_attention_output_but_not_its_scores():
  cfg = config_lib.load('configs/dense.py:tiny', ['model.dtype=float32', 'model.n_layers=1'])
  layer = models.build(cfg.model, rngs=nnx.Rngs(0)).blocks[0].attn
  graphdef, state = nnx.split(layer)
  b, t, d = 2, 16, cfg.model.d_model
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))

  def fn(x, state):
    return jnp.sum(nnx.merge(graphdef, state)(x, positions, jnp.ones((b, t), jnp.int32)))

  saved = _saved(fn, jnp.ones((b, t, d)), state)
  heads, head_dim = cfg.model.n_heads, d // cfg.model.n_heads
  assert f"f32[{b},{t},{heads},{head_dim}] named '{remat.ATTENTION}'" in saved
  assert f'[{b},{heads},{t},{t}]' not in saved  # the scores are recomputed


def test_dots_keeps_cudnn_attention_forward_outputs(traced_as_on_gpu):
  # cuDNN's attention can be traced (not run) on a CPU once its version checks pass.
  # If jax renames the forward's primitive, `dots` would silently run it twice: this fails.
  del traced_as_on_gpu
  b, t, heads, head_dim = 2, 128, 4, 64
  q = jnp.ones((b, t, heads, head_dim), jnp.bfloat16)

  def fn(q, k, v):
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')
    return jnp.sum(checkpoint_name(out, remat.ATTENTION).astype(jnp.float32))

  forward = remat._CUDNN_ATTENTION_FORWARD  # pylint: disable=protected-access
  assert f'f32[{b},{heads},{t}] output of {forward}' in _saved(fn, q, q, q)  # statistics
