"""The train state: a dict of (step, params, model_state, opt_state, rng), sharded.

`params` are the model's `nnx.Param`s as an `nnx.State`; `model_state` is every other
variable (buffers that families update outside the gradient). The model's structure
(`graphdef`) is static and kept beside the state, never inside it.
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxarch import models
from jaxarch.layers.params import grouped_draws
from jaxarch.models import named_variables
from jaxarch.parallel import batch_sharding, tree_shardings
from jaxarch.train.optimizer import make_optimizer


# The parts of the train state that make the model: what evaluation, generation and export
# read back from a checkpoint (not the optimizer state, twice the weights under Adam).
MODEL = ('params', 'model_state')


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """What the step functions close over: the model structure, optimizer, shardings, and
  the loss and batching settings of `train`."""
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  abstract_state: dict  # ShapeDtypeStructs carrying their shardings
  shardings: dict
  batch_sharding: jax.sharding.NamedSharding  # of every [batch, length] input
  param_counts: dict
  mesh: Mesh
  rules: tuple  # mesh.rules: logical axis -> mesh axes
  z_loss: float  # train.z_loss
  grad_accum_steps: int  # train.grad_accum_steps: microbatches per step


def _split(model: nnx.Module):
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  return graphdef, params, model_state


def _warn_unsharded(params: nnx.State, devices: int) -> None:
  """Weights made without logical axes (a family of the user's own built from nnx.Linear,
  say) are replicated on every device, whatever the mesh: said, as they may not fit."""
  bare = [('/'.join(map(str, path)), v.get_value().shape)
          for path, v in nnx.to_flat_state(params)
          if v.get_metadata().get('out_sharding') is None and v.get_value().ndim]
  if bare:
    named = ', '.join(f'{name} {list(shape)}' for name, shape in bare[:3])
    logging.warning('jaxarch: %d weight%s of this model %s no logical axes (%s%s) and %s '
                    'whole on each of the %d devices; make them with jaxarch.layers.param('
                    'rngs, init, shape, axes) to shard them by mesh.rules', len(bare),
                    's' * (len(bare) > 1), 'have' if len(bare) > 1 else 'has', named,
                    ', ...' if len(bare) > 3 else '', 'are' if len(bare) > 1 else 'is', devices)


def make_setup(cfg: ml_collections.ConfigDict, mesh: Mesh) -> TrainSetup:
  """Shapes, shardings and optimizer of the train state, without allocating it."""
  abstract_model = nnx.eval_shape(lambda: models.build(cfg.model, rngs=nnx.Rngs(0)))
  counts = models.param_counts(abstract_model)
  graphdef, abstract_params, _ = _split(abstract_model)
  if mesh.size > 1:
    _warn_unsharded(abstract_params, mesh.size)
  tx = make_optimizer(cfg.train, abstract_params)
  abstract = jax.eval_shape(lambda: _init_state(cfg, tx))
  shardings = tree_shardings(abstract, mesh, cfg.mesh.rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return TrainSetup(graphdef, tx, abstract, shardings,
                    batch_sharding(mesh, cfg.mesh.rules), counts, mesh, tuple(cfg.mesh.rules),
                    cfg.train.z_loss, cfg.train.grad_accum_steps)


def describe(cfg: ml_collections.ConfigDict, setup: TrainSetup) -> dict:
  """What a benchmark's record says about the run it measured: model, devices, mesh, batch
  and the settings that change speed or memory."""
  device = jax.devices()[0]
  return {'family': cfg.model.family, 'device_kind': device.device_kind,
          'platform': device.platform, 'num_devices': jax.device_count(),
          'mesh': dict(setup.mesh.shape), 'params_total': setup.param_counts['total'],
          'params_active': setup.param_counts['active'],
          'batch_size': cfg.train.batch_size, 'seq_len': cfg.data.seq_len,
          'grad_accum_steps': setup.grad_accum_steps, 'dtype': cfg.model.dtype,
          'remat': cfg.model.remat, 'attention_impl': cfg.model.attention_impl,
          'scan_layers': bool(cfg.model.get('scan_layers')), 'mu_dtype': cfg.train.mu_dtype}


def _with_values(state: nnx.State, values: dict) -> nnx.State:
  """`state` with the variables that `values` names (`named_variables`) holding its arrays."""
  named = named_variables(state)
  for name, value in values.items():
    if name in named:
      variable = named[name][1]
      variable.set_value(value.astype(variable.get_value().dtype))
  return state


def _init_state(cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                given: dict | None = None) -> dict:
  key = jax.random.PRNGKey(cfg.train.seed)
  init_key, train_key = jax.random.split(key)
  with grouped_draws():
    model = models.build(cfg.model, rngs=nnx.Rngs(init_key))
  _, params, model_state = _split(model)
  if given:
    params, model_state = _with_values(params, given), _with_values(model_state, given)
  return {
      'step': jnp.zeros((), jnp.int32),
      'params': params,
      'model_state': model_state,
      'opt_state': tx.init(params),
      'rng': train_key,
  }


def init_state(cfg: ml_collections.ConfigDict, setup: TrainSetup,
               given: dict | None = None) -> dict:
  """A fresh train state, each array created directly in its shards.

  `given` (name -> array, names of `named_variables` of the params and model state; an
  imported checkpoint's weights) replaces those initial values before the optimizer state
  is made from them. Each given array goes straight to its own shards and becomes the
  state's (its device buffer is donated), and the random values it replaces are never
  made (XLA drops what no output reads; a group of `grouped_draws` is drawn whole unless
  every weight in it is given, as in an import): a model is imported in its train
  state's memory.
  """
  if not given:
    return jax.jit(lambda: _init_state(cfg, setup.tx), out_shardings=setup.shardings)()
  shardings = {**named_variables(setup.shardings['params']),
               **named_variables(setup.shardings['model_state'])}
  unknown = sorted(set(given) - set(shardings))
  if unknown:
    raise ValueError(f'init_state: the model has no variable {unknown[0]}')
  given = jax.device_put(given, {name: shardings[name][1].get_value() for name in given})
  return jax.jit(lambda given: _init_state(cfg, setup.tx, given),
                 out_shardings=setup.shardings, donate_argnums=0)(given)


def merge_model(setup: TrainSetup, state: dict) -> nnx.Module:
  return nnx.merge(setup.graphdef, state['params'], state['model_state'])
