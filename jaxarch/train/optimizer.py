"""AdamW with warmup + cosine / WSD schedules, global-norm clipping and a decay mask.

Weights created with `weight_decay=False` metadata (norm scales, embeddings) are not
decayed. Families that want their own parameter groups (e.g. a learning-rate multiplier
for memory values) mark their weights with `optim_group` metadata and register a
transform in `GROUP_TRANSFORMS`.
"""

from collections.abc import Callable

import jax
import ml_collections
import optax
from flax import nnx

# optim_group metadata value -> factory(train_cfg, schedule) -> extra optax transform
# applied after AdamW to the weights of that group (identity for the default group).
GROUP_TRANSFORMS: dict[str, Callable[..., optax.GradientTransformation]] = {}


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """`train` section -> lr(step). Warmup is linear from lr/warmup_steps in all three."""
  warmup = optax.linear_schedule(cfg.lr / max(cfg.warmup_steps, 1), cfg.lr,
                                 max(cfg.warmup_steps, 1))
  decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
  final = cfg.lr * cfg.min_lr_ratio
  if cfg.schedule == 'cosine':
    main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
  elif cfg.schedule == 'wsd':
    # Warmup-stable-decay (MiniCPM): constant, then a linear cool-down at the end, so a
    # run can be extended or branched from any stable-phase checkpoint.
    cooldown = max(int(cfg.steps * cfg.decay_fraction), 1)
    stable = max(decay_steps - cooldown, 0)
    main = optax.join_schedules(
        [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, final, cooldown)],
        [stable])
  elif cfg.schedule == 'constant':
    main = optax.constant_schedule(cfg.lr)
  else:
    raise ValueError(f'config error: train.schedule={cfg.schedule!r} must be cosine, wsd '
                     'or constant')
  return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def _metadata(tree, key, default):
  return jax.tree.map(lambda v: v.get_metadata().get(key, default), tree,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  """The optimizer for `params` (an nnx.State of Params, abstract or concrete)."""
  schedule = learning_rate_schedule(cfg)
  decay_mask = _metadata(params, 'weight_decay', True)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay,
                      mask=lambda p: jax.tree.map(lambda m, _: m, decay_mask, p))
  chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  groups = _metadata(params, 'optim_group', 'default')
  names = set(jax.tree.leaves(groups))
  if names - {'default'}:
    transforms = {g: GROUP_TRANSFORMS[g](cfg, schedule) if g != 'default'
                  else optax.identity() for g in names}
    adamw = optax.chain(adamw, optax.multi_transform(
        transforms, lambda p: jax.tree.map(lambda g, _: g, groups, p)))
  return optax.chain(*chain, adamw)
