"""Language models built from `jaxarch.layers`; `build` is the one constructor users call."""

from collections.abc import Callable, Sequence

from flax import nnx
import jax
import ml_collections

from jaxarch import config as config_lib
from jaxarch.config import ConfigError
from jaxarch.kernels.grouped_matmul import kernels_for as matmul_kernels
from jaxarch.kernels.sparse_lookup import kernels_for as lookup_kernels
from jaxarch.models import moe  # registers the moe block
from jaxarch.models.bita import Bita
from jaxarch.models.megabyte import Megabyte
from jaxarch.models import ultramem  # registers the memory side layer
from jaxarch.layers import Embed
from jaxarch.models.transformer import (BLOCKS, SIDE_LAYERS, Transformer, check_called_as,
                                        check_new_name, register_block, register_side_layer,
                                        stacked_modules, unstacked_arrays)

# model.family -> constructor(model_cfg, rngs=...); `register_family` adds one.
FAMILIES: dict[str, Callable[..., nnx.Module]] = {
    'dense': Transformer,
    'ultramem': Transformer,  # with model.ultramem.placement memory layers
    'moe': Transformer,  # with 'moe' blocks in model.block_pattern
    'megabyte': Megabyte,  # global model over patches + local model inside each patch
    'bita': Bita,  # a frozen dense/moe/ultramem model with BiTA's prompt and mask tokens
}

# model.family -> {sub-model attribute: workdir of the run whose weights it starts from}.
# Fresh train states take those weights from the run's latest checkpoint.
PRETRAINED_PARTS: dict[str, Callable[[ml_collections.ConfigDict], dict[str, str]]] = {
    'bita': lambda model_cfg: {'base': model_cfg.bita.base_workdir},
}


def register_family(name: str, constructor: Callable[..., nnx.Module],
                    checks: Sequence[config_lib.Check] | None = None) -> None:
  """Makes `model.family=name` build `constructor(model_cfg, rngs=...)` and the config
  accept it; `checks` validate its config (raising `config.ConfigError`), by default those
  of the dense family (the decoder stack's shape)."""
  check_new_name(FAMILIES, 'family', name, constructor)
  check_called_as('family', name, constructor, 'constructor(model_cfg, rngs=rngs)', None,
                  rngs=None)
  FAMILIES[name] = constructor
  config_lib.FAMILY_CHECKS[name] = tuple(
      config_lib.FAMILY_CHECKS['dense'] if checks is None else checks)


def build(model_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  """The language model of `model_cfg.family`: `model(tokens, segment_ids=None,
  positions=None) -> logits [b, t, vocab]`, tokens int32 [b, t]; for packed rows,
  segment_ids [b, t] (0: padding; attention stays within a segment) and positions [b, t]
  (each document's from 0). The config is checked first (`config.check_model`), so that
  a key changed after `config.load` fails in one line."""
  if not isinstance(model_cfg, ml_collections.ConfigDict) or 'model' in model_cfg:
    given = 'the whole config' if isinstance(model_cfg, ml_collections.ConfigDict) else (
        f'a {type(model_cfg).__name__}')
    raise ConfigError(f'models.build takes the config\'s model section (cfg.model, a '
                      f'ConfigDict), not {given}')
  if not isinstance(rngs, nnx.Rngs):
    raise ConfigError(f'models.build takes rngs=nnx.Rngs(seed), not {rngs!r}')
  config_lib.check_model(model_cfg)
  if model_cfg.family not in FAMILIES:
    raise ValueError(f'config error: model.family={model_cfg.family!r} is not built yet; '
                     f'available: {sorted(FAMILIES)}')
  _check_runs_here(model_cfg)
  return FAMILIES[model_cfg.family](model_cfg, rngs=rngs)


# Kernel choices that depend on the platform the model runs on, so that they are checked
# here and not with the config (`jaxarch launch` renders a GPU job's config anywhere).
_KERNELS = {('ultramem', 'lookup_impl'): lookup_kernels, ('moe', 'matmul_impl'): matmul_kernels}


def _check_runs_here(model_cfg: ml_collections.ConfigDict) -> None:
  if model_cfg.dtype == 'float16' and jax.default_backend() != 'gpu':
    # jax.nn.dot_product_attention asks for float16 products summed in float32, which
    # only GPUs compile (XLA:CPU and TPUs refuse them at compile time).
    raise ConfigError(f"config error: model.dtype='float16' runs on GPUs, not on "
                      f'{jax.default_backend()}; use bfloat16 (or float32)')
  for (section, key), kernels_for in _KERNELS.items():
    if section in model_cfg and key in model_cfg[section]:
      try:
        kernels_for(model_cfg[section][key], key=f'model.{section}.{key}')
      except ValueError as e:
        raise ConfigError(str(e)) from None


def unscanned(cfg: ml_collections.ConfigDict, model: nnx.Module
              ) -> tuple[ml_collections.ConfigDict, nnx.Module]:
  """(cfg, model) with `model.scan_layers` off: the same model with each layer's weights
  its own (`blocks.i.*`), as exports hold them whatever the run's layout. Each layer's
  slice is a copy: while the caller keeps the scanned model (an export does), the blocks'
  weights are held twice (`jaxarch export` reads the run's layers unrolled instead). A
  model without scanned stacks is returned as it is, with the config that says so."""
  if cfg.model.get('scan_layers'):
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.model.scan_layers = False
  if not stacked_modules(model):
    return cfg, model
  abstract = nnx.eval_shape(lambda: build(cfg.model, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  arrays = unstacked_arrays(model)
  flat = nnx.to_flat_state(state)
  for path, variable in flat:
    variable.set_value(arrays[path])
  return cfg, nnx.merge(graphdef, nnx.from_flat_state(flat))


def param_counts(model: nnx.Module) -> dict[str, int]:
  """Total, active-per-token, embedding-table and trained parameter counts.

  Modules with parameters that only some tokens use (experts, memory values) report
  the inactive part through an `inactive_params()` method; dense models have none.
  Parameters with `frozen=True` metadata (BiTA's base model) are not trained.
  """
  params = nnx.state(model, nnx.Param)
  total = sum(x.size for x in jax.tree.leaves(params))
  frozen = sum(v.size for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(
      x, nnx.Variable)) if v.get_metadata().get('frozen', False))
  stacked = stacked_modules(model)  # a scanned stack's block counts once per layer
  inactive = sum(m.inactive_params() * stacked.get(id(m), 1) for _, m in nnx.iter_graph(model)
                 if hasattr(m, 'inactive_params'))
  embedding = sum(m.embedding.get_value().size for _, m in nnx.iter_graph(model)
                  if isinstance(m, Embed))
  return {'total': total, 'active': total - inactive, 'embedding': embedding,
          'trained': total - frozen}


def named_variables(state: nnx.State) -> dict[str, tuple]:
  """'blocks.3.attn.q_proj' -> (path, variable) for every variable of `state`: the names
  of exports and imports."""
  return {'.'.join(map(str, path)): (path, variable)
          for path, variable in nnx.to_flat_state(state)}
