"""AdamW with warmup + cosine / WSD schedules, global-norm clipping and a decay mask.

Weights created with `frozen=True` metadata (BiTA's base model) are not trained.

Weights created with `weight_decay=False` metadata (norm scales, embeddings) are not
decayed. Weights with `optim_group=NAME` metadata (e.g. UltraMem's memory values) get the
learning-rate multiplier that `train.groups.NAME` configures:

  lr_multiplier    T: the group's learning rate is T times the schedule's
  multiplier_decay 'linear' (T decays linearly to 1 over training, as the UltraMem
                   release does: lr · (1 + (T−1)·max(0, 1 − step/steps))) or 'none'
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jaxarch.config import ConfigError


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
    cooldown = min(max(int(cfg.steps * cfg.decay_fraction), 1), decay_steps)  # ends on time
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


def frozen(params) -> dict:
  """True at the parameters created with `frozen=True` metadata (BiTA's base model)."""
  return _metadata(params, 'frozen', False)


def make_optimizer(cfg: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  """The optimizer for `params` (an nnx.State of Params, abstract or concrete)."""
  schedule = learning_rate_schedule(cfg)
  decay_mask = _metadata(params, 'weight_decay', True)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mu_dtype=jnp.dtype(cfg.mu_dtype),
                      mask=lambda p: jax.tree.map(lambda m, _: m, decay_mask, p))
  # Without clipping, identity keeps the place: the optimizer state has the same
  # structure either way, so a run can be resumed with clipping turned on or off.
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
  groups = _metadata(params, 'optim_group', 'default')
  configured = cfg.get('groups') or {}
  present = set(jax.tree.leaves(groups))
  if unknown := sorted(set(configured) - present):
    raise ConfigError(f'config error: train.groups.{unknown[0]} names no parameter group of '
                      f'this model (its groups: {", ".join(sorted(present))})')
  names = {g for g in present if g in configured}
  if names:
    group_labels = jax.tree.map(lambda g: g if g in names else 'default', groups)
    transforms = {g: group_multiplier(cfg, configured[g]) for g in names}
    transforms['default'] = optax.identity()
    adamw = optax.chain(adamw, optax.multi_transform(
        transforms, lambda p: jax.tree.map(lambda g, _: g, group_labels, p)))
  update = optax.chain(clip, adamw)
  is_frozen = frozen(params)
  if any(jax.tree.leaves(is_frozen)):
    # Frozen parameters get neither updates nor optimizer state; clipping sees only the
    # trained ones.
    # (Its own name: the group labels' function above reads its variable when called.)
    trained_labels = jax.tree.map(lambda f: 'frozen' if f else 'trained', is_frozen)
    update = optax.multi_transform(
        {'trained': update, 'frozen': optax.set_to_zero()},
        lambda p: jax.tree.map(lambda label, _: label, trained_labels, p))
  return update


def group_multiplier(cfg: ml_collections.ConfigDict,
                     group: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Scales a group's AdamW updates, i.e. its learning rate, by the configured factor (a
  constant one keeps no count: the optimizer state of runs saved so stays as it was)."""
  if group.get('multiplier_decay', 'none') == 'linear':
    return optax.scale_by_schedule(multiplier_schedule(cfg, group))
  return optax.scale(float(group.lr_multiplier))


def multiplier_schedule(cfg: ml_collections.ConfigDict,
                        group: ml_collections.ConfigDict) -> optax.Schedule:
  """A group's learning-rate multiplier at an update count (from 0, as optax counts)."""
  top = float(group.lr_multiplier)
  if group.get('multiplier_decay', 'none') == 'linear':
    steps = max(cfg.steps, 1)
    return lambda count: 1.0 + (top - 1.0) * jnp.maximum(0.0, 1.0 - count / steps)
  return lambda count: jnp.asarray(top)


def group_learning_rates(cfg: ml_collections.ConfigDict) -> dict[str, optax.Schedule]:
  """`train.groups.NAME` -> the group's learning rate at an update count: the schedule's
  times its multiplier (the trainer logs it as `lr/NAME`)."""
  schedule = learning_rate_schedule(cfg)
  return {name: (lambda count, m=multiplier_schedule(cfg, group): schedule(count) * m(count))
          for name, group in (cfg.get('groups') or {}).items()}
