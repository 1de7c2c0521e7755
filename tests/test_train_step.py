"""The jitted train step: same numbers on 1 device and on a (data=2, fsdp=2, tensor=2) mesh."""

from flax import nnx
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import make_batch, mesh_config, padded_batch, tight_moe_config, tiny_config
from jaxarch import config as config_lib
from jaxarch.parallel import global_batch, make_mesh
from jaxarch.train import profile
from jaxarch.train.memory import compiled_train_step
from jaxarch.train.optimizer import group_learning_rates, learning_rate_schedule, make_optimizer
from jaxarch.train.state import init_state, make_setup
from jaxarch.train.step import make_train_step


def _steps(cfg, devices, n=2, metrics_of=None):
  mesh = make_mesh(cfg, devices=devices)
  setup = make_setup(cfg, mesh)
  state = init_state(cfg, setup)
  step = make_train_step(setup)
  losses = []
  for i in range(n):
    batch = make_batch(cfg.train.batch_size, cfg.data.seq_len, seed=i)
    if i == 0:
      batch['segment_ids'][:3, 20:] = 0  # microbatches of unequal token counts
    state, metrics = step(state, global_batch(batch, setup.batch_sharding))
    losses.append(float(metrics['loss']))
    if metrics_of is not None:
      metrics_of.append(jax.device_get(metrics))
  return losses, jax.device_get(state['params'])


def test_eight_device_step_equals_one_device_step():
  base = tiny_config(**{'model.dtype': 'float32'})
  one_losses, one_params = _steps(mesh_config(base, data=1), jax.devices()[:1])
  sharded = tiny_config(**{'model.dtype': 'float32'})
  eight_losses, eight_params = _steps(mesh_config(sharded, data=2, fsdp=2, tensor=2),
                                      jax.devices())
  np.testing.assert_allclose(one_losses, eight_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               one_params, eight_params)


@pytest.mark.parametrize('cause', ['corrupt data', 'overflowing weights'])
def test_a_skipped_nonfinite_step_keeps_the_weights_and_moments_but_counts_the_step(cause):
  overrides = {'train.lr': 1e30, 'train.grad_clip': 0.0} if 'weights' in cause else {}
  cfg = mesh_config(tiny_config(**overrides), data=8)
  setup = make_setup(cfg, make_mesh(cfg))
  state = init_state(cfg, setup)
  before = jax.device_get(state)
  batch = make_batch(cfg.train.batch_size, cfg.data.seq_len)
  if cause == 'corrupt data':
    batch['inputs'][0, 0] = 10**6  # past the vocabulary: a NaN embedding
  state, metrics = make_train_step(setup)(state, global_batch(batch, setup.batch_sharding))
  after = jax.device_get(state)
  assert float(metrics['nonfinite']) == 1 and int(after['step']) == 1
  assert np.isfinite(metrics['param_norm'])  # the norm of the weights kept
  jax.tree.map(np.testing.assert_array_equal, after['params'], before['params'])
  adam, schedule = [], []
  def check(new, old):
    if isinstance(new, optax.ScaleByAdamState):
      adam.append(int(new.count))  # its bias correction stays with the moments it holds
      jax.tree.map(np.testing.assert_array_equal, new, old)  # the moments are untouched
    elif isinstance(new, optax.ScaleByScheduleState):
      schedule.append(int(new.count))  # the learning rate moves on with the step
  jax.tree.map(check, after['opt_state'], before['opt_state'],
               is_leaf=lambda x: isinstance(x, (optax.ScaleByAdamState,
                                                optax.ScaleByScheduleState)))
  assert adam == [0] and schedule == [1]


def test_accumulated_microbatches_give_the_full_batch_step():
  # Dense: the same loss and update to float precision, whatever the microbatches' tokens.
  full = tiny_config(**{'model.dtype': 'float32', 'train.batch_size': 16})
  want_losses, want_params = _steps(mesh_config(full, data=2, fsdp=2), jax.devices()[:4])
  accum = tiny_config(**{'model.dtype': 'float32', 'train.batch_size': 16,
                         'train.grad_accum_steps': 4})
  losses, params = _steps(mesh_config(accum, data=2, fsdp=2), jax.devices()[:4])
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params, want_params)


@pytest.mark.parametrize('spec', ['configs/moe.py:tiny', 'configs/ultramem.py:tiny'])
def test_a_data_parallel_step_of_routed_families_all_reduces_its_gradients_and_no_more(spec):
  """Under data=8 every weight is whole on every device and each device's rows are its
  own: a step all-reduces the gradients once and gathers nothing. The MoE router's top-k
  gathered the whole batch's gates; UltraMem's top-k its key scores and its lookup's
  backward (one sort of the whole batch's entries) 36 MiB of all-reduce, for 6 MiB of
  parameters."""
  cfg = mesh_config(config_lib.load(spec, ['train.batch_size=8', 'data.seq_len=64']), data=8)
  setup = make_setup(cfg, make_mesh(cfg))
  param_bytes = sum(x.size * x.dtype.itemsize
                    for x in jax.tree.leaves(setup.abstract_state['params']))
  found = profile.collective_bytes(compiled_train_step(cfg, setup).as_text())
  assert set(found) == {'all-reduce'}, found
  assert found['all-reduce'] < 1.05 * param_bytes, (found, param_bytes)


def test_fsdp_weights_are_gathered_in_each_microbatch_not_held_whole_through_the_step():
  """XLA's while-loop invariant code motion moved FSDP's weight all-gathers out of the
  microbatch loop: every weight was held whole, gathered, through the whole step (dense
  680m, fsdp=8, batch 32 x 128 on CPU: 10.5 GiB of step temporaries per device at A=4,
  4.1 GiB at A=1; now 5.5 GiB)."""
  gathered, temp = {}, {}
  for accum in (1, 2):
    cfg = mesh_config(tiny_config(**{'train.batch_size': 16, 'train.grad_accum_steps': accum}),
                      fsdp=8)
    compiled = compiled_train_step(cfg)
    gathered[accum] = profile.collective_bytes(compiled.as_text())['all-gather']
    temp[accum] = compiled.memory_analysis().temp_size_in_bytes
  assert gathered[2] == 2 * gathered[1]  # once per microbatch, as PyTorch's FSDP does
  # Half the activations; the hoisted whole weights took that back (0.99x, now 0.68x).
  assert temp[2] < 0.8 * temp[1], temp


def test_fsdp_weights_are_gathered_in_each_microbatch_of_an_evaluation_too():
  """The eval step's microbatch scan let XLA hoist the gathers as the train step's did:
  every weight whole through the evaluation, which then fit only where the whole model
  fits a device (the train step gathers per microbatch)."""
  from jaxarch.train.step import make_eval_step  # pylint: disable=g-import-not-at-top
  gathered = {}
  for accum in (1, 2):
    cfg = mesh_config(tiny_config(**{'train.batch_size': 16, 'train.grad_accum_steps': accum}),
                      fsdp=8)
    setup = make_setup(cfg, make_mesh(cfg))
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=setup.batch_sharding),
        make_batch(cfg.train.batch_size, cfg.data.seq_len))
    step = make_eval_step(setup, np.ones(cfg.model.vocab_size, np.float32))
    compiled = step.lower(setup.abstract_state, batch).compile()
    gathered[accum] = profile.collective_bytes(compiled.as_text())['all-gather']
  assert gathered[2] == 2 * gathered[1], gathered


@pytest.mark.slow
def test_accumulated_moe_steps_report_the_batch_s_tokens_and_aux_losses():
  cfg = config_lib.load('configs/moe.py:tiny', [
      'model.n_layers=2', 'data.seq_len=32', 'train.batch_size=16', 'model.dtype=float32'])
  want = []
  _steps(mesh_config(cfg, data=8), jax.devices(), n=1, metrics_of=want)
  with cfg.unlocked():
    cfg.train.grad_accum_steps = 2
  got = []
  _steps(mesh_config(cfg, data=8), jax.devices(), n=1, metrics_of=got)
  assert got[0]['tokens'] == want[0]['tokens'] == 16 * 32 - 3 * 12
  assert got[0]['loss'] == pytest.approx(want[0]['loss'], rel=1e-5)
  aux = [k for k in want[0] if k.startswith('aux_loss/')]
  assert aux and aux == [k for k in got[0] if k.startswith('aux_loss/')]
  # Balance losses are nonlinear in the routed fractions: close, not equal.
  for k in aux:
    assert got[0][k] == pytest.approx(want[0][k], rel=0.2)
  with pytest.raises(config_lib.ConfigError, match=r'batch_size=16 must be divisible by 32: '
                     r'train.grad_accum_steps=4 microbatches of 8'):
    config_lib.validate(mesh_config(config_lib.load('configs/moe.py:tiny', [
        'train.batch_size=16', 'train.grad_accum_steps=4']), data=8), num_devices=8)


def test_accumulated_moe_metrics_are_the_whole_batch_s():
  """The layers' metrics of a step with microbatches of unequal padding are the whole
  batch's: each microbatch's mean over its real tokens weighted by their count (the plain
  mean of the microbatches' values was 2% off in the experts' loads). The balance loss
  multiplies two of them: close, not equal."""
  batch = padded_batch()
  metrics = {}
  for accum in (1, 2):
    cfg = tight_moe_config(accum)
    setup = make_setup(cfg, make_mesh(cfg, devices=jax.devices()[:1]))
    _, out = make_train_step(setup)(init_state(cfg, setup),
                                    global_batch(batch, setup.batch_sharding))
    metrics[accum] = {k: float(v) for k, v in out.items() if k.startswith('blocks/')}
  assert metrics[2].keys() == metrics[1].keys()
  assert metrics[1]['blocks/0/mlp/dropped_fraction'] > 0
  for k, want in metrics[1].items():
    assert metrics[2][k] == pytest.approx(want, rel=0.05 if 'balance' in k else 1e-5), k


@pytest.mark.parametrize('mu_dtype', [  # Adam's first moment; float32 is the default
    'float32', pytest.param('bfloat16', marks=pytest.mark.slow)])
def test_loss_decreases_when_overfitting_one_batch(mu_dtype):
  cfg = mesh_config(tiny_config(**{'train.lr': 1e-2, 'train.warmup_steps': 1,
                                   'train.mu_dtype': mu_dtype}), data=8)
  setup = make_setup(cfg, make_mesh(cfg))
  state = init_state(cfg, setup)
  step = make_train_step(setup)
  batch = global_batch(make_batch(8, cfg.data.seq_len), setup.batch_sharding)
  losses = []
  for _ in range(20):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.5 * losses[0]


def test_padding_tokens_carry_no_loss():
  cfg = mesh_config(tiny_config(), data=8)
  setup = make_setup(cfg, make_mesh(cfg))
  step = make_train_step(setup)
  batch = make_batch(8, cfg.data.seq_len)
  padded = {k: v.copy() for k, v in batch.items()}
  padded['segment_ids'][:, 20:] = 0
  padded['targets'][:, 20:] = 3  # garbage under the padding must not matter
  other = {k: v.copy() for k, v in padded.items()}
  other['targets'][:, 20:] = 200
  loss = lambda b: float(step(init_state(cfg, setup), global_batch(b, setup.batch_sharding))[1]['loss'])
  assert loss(padded) == pytest.approx(loss(other), rel=1e-6)


def test_logged_grad_norm_is_the_gradient_s_before_clipping():
  """`grad_norm` says how large the gradient was, not what clipping left of it."""
  def grad_norm(clip):
    cfg = mesh_config(tiny_config(**{'train.grad_clip': clip}), data=8)
    setup = make_setup(cfg, make_mesh(cfg))
    batch = global_batch(make_batch(8, cfg.data.seq_len), setup.batch_sharding)
    return float(make_train_step(setup)(init_state(cfg, setup), batch)[1]['grad_norm'])
  clipped = grad_norm(1e-3)
  assert clipped > 0.1 and clipped == pytest.approx(grad_norm(0.0), rel=1e-6)


def test_no_weight_decay_on_norms_embeddings_and_biases():
  cfg = tiny_config(**{'train.lr': 1e-2, 'train.weight_decay': 0.5, 'model.qkv_bias': True,
                       'model.qk_norm': True})
  setup = make_setup(cfg, make_mesh(cfg, jax.devices()[:1]))
  state = init_state(cfg, setup)
  bias = state['params']['blocks'][0]['attn']['q_bias']
  bias.set_value(bias.get_value() + 1)  # they start at zero, which decay leaves
  # With zero gradients only weight decay moves a parameter.
  zeros = jax.tree.map(np.zeros_like, state['params'])
  updates, _ = jax.jit(setup.tx.update)(zeros, setup.tx.init(state['params']), state['params'])
  moved = lambda p: float(np.abs(np.asarray(p.get_value())).max())
  assert moved(updates['embed']['embedding']) == 0.0
  assert moved(updates['final_norm']['scale']) == 0.0
  assert moved(updates['blocks'][0]['attn']['q_bias']) == 0.0
  assert moved(updates['blocks'][0]['attn']['k_norm']['scale']) == 0.0
  assert moved(updates['blocks'][0]['mlp']['gate']) > 0.0


def test_cross_entropy_sums_the_nll_and_the_z_loss_of_the_unmasked_tokens():
  """Uniform logits over 8 ids: each token's NLL and log Z are ln 8; the z-loss is
  w·log(Z)² per token (PaLM); the masked tokens add neither."""
  from jaxarch.train.step import cross_entropy  # pylint: disable=g-import-not-at-top
  nll, z = cross_entropy(jnp.zeros((1, 4, 8)), jnp.zeros((1, 4), jnp.int32),
                         jnp.array([[1.0, 1.0, 0.0, 0.0]]), z_loss=1e-4)
  assert float(nll) == pytest.approx(2 * np.log(8))
  assert float(z) == pytest.approx(2e-4 * np.log(8) ** 2)


def test_an_evaluation_counts_the_bytes_of_the_targets_that_carry_loss():
  from jaxarch.train.step import make_eval_step  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(**{'model.dtype': 'float32'})
  setup = make_setup(cfg, make_mesh(cfg, devices=jax.devices()[:1]))
  byte_lengths = np.arange(cfg.model.vocab_size, dtype=np.float32) % 3
  batch = make_batch(cfg.train.batch_size, cfg.data.seq_len)
  batch['loss_mask'] = np.ones_like(batch['segment_ids'])
  batch['loss_mask'][:, :10] = 0  # a prompt's targets
  out = make_eval_step(setup, byte_lengths)(init_state(cfg, setup),
                                            global_batch(batch, setup.batch_sharding))
  assert float(out['tokens']) == cfg.train.batch_size * (cfg.data.seq_len - 10)
  assert float(out['bytes']) == byte_lengths[batch['targets'][:, 10:]].sum()


@pytest.mark.parametrize('kind', ['sentencepiece', 'sentencepiece_unknowns', 'llama'])
def test_bits_per_byte_counts_the_bytes_of_the_text(tmp_path, kind):
  """Over documents packed across rows, an evaluation counts the bytes of their text,
  whatever the tokenizer did to it: SentencePiece's normaliser collapses runs of spaces
  and drops those at the ends, an unknown character is one `<unk>` (a model without byte
  fallback), the '▁' in front of a document's text stands for no byte of it (while a
  continuation's '▁the' holds its space). Counted by token, the 237 bytes would be 231
  (SentencePiece: 12 prefixes, 18 spaces collapsed or dropped), 216 (also unknowns, of 0
  bytes) and 249 (Llama-style: the 12 prefixes)."""
  from test_data import _llama_style_tokenizer, _sentencepiece_model  # pylint: disable=g-import-not-at-top
  from jaxarch import data  # pylint: disable=g-import-not-at-top
  from jaxarch.data.pipeline import _pad_batch, _packed_rows  # pylint: disable=g-import-not-at-top
  from jaxarch.train.trainer import _eval_step  # pylint: disable=g-import-not-at-top
  path = (_llama_style_tokenizer(tmp_path / 'tokenizer.json') if kind == 'llama' else
          _sentencepiece_model(tmp_path / 'sp.model', **(
              dict(vocab_size=40, byte_fallback=False, character_coverage=0.98)
              if kind == 'sentencepiece_unknowns' else {})))
  cfg = tiny_config(**{'model.dtype': 'float32', 'data.tokenizer': path})
  tokenizer = data.model_tokenizer(cfg)
  texts = ['the café is open', '', '  a ∑ of\tbytes ü  the cat\n', 'the cat   sat on the mat',
           '(the) cat'] * 3
  # Packed as training packs them: a document goes on in the next row, the last row pads.
  rows = list(_packed_rows(grain.MapDataset.source([text.encode() for text in texts]),
                           tokenizer, cfg.data, count_bytes=True))
  assert 1 < len(rows) < cfg.train.batch_size
  batch = _pad_batch(rows, batch_size=cfg.train.batch_size, pad_id=tokenizer.pad_id)
  setup = make_setup(cfg, make_mesh(cfg, devices=jax.devices()[:1]))
  eval_step = _eval_step(cfg, setup)
  out = eval_step(init_state(cfg, setup), global_batch(batch, setup.batch_sharding))
  assert float(out['bytes']) == sum(len(text.encode()) for text in texts) == 237
  by_token = dict(batch, target_bytes=None)  # the batch without its text's counts
  out = eval_step(init_state(cfg, setup), global_batch(by_token, setup.batch_sharding))
  assert float(out['bytes']) == {'sentencepiece': 231, 'sentencepiece_unknowns': 216,
                                 'llama': 249}[kind]


def test_gradients_are_clipped_to_the_global_norm_before_adam():
  """A gradient of norm 100, clipped to 1, then one of norm 1: Adam moves each step by
  lr. Unclipped, the large one would dominate the second moment (0.69 lr)."""
  cfg = tiny_config(**{'train.grad_clip': 1.0, 'train.warmup_steps': 0, 'train.lr': 1e-2,
                       'train.schedule': 'constant', 'train.weight_decay': 0.0})
  params = nnx.State({'w': nnx.Param(jnp.zeros(2))})
  tx = make_optimizer(cfg.train, params)
  opt_state = tx.init(params)
  for g in (100.0, 1.0):
    grads = nnx.State({'w': nnx.Param(jnp.array([g, 0.0]))})
    updates, opt_state = tx.update(grads, opt_state, params)
  np.testing.assert_allclose(updates['w'].get_value(), [-1e-2, 0.0], rtol=1e-5)


@pytest.mark.parametrize('schedule', ['cosine', 'wsd', 'constant'])
def test_schedules_warm_up_then_reach_their_final_rate(schedule):
  cfg = tiny_config(**{'train.schedule': schedule, 'train.steps': 100,
                       'train.warmup_steps': 10, 'train.lr': 1.0,
                       'train.min_lr_ratio': 0.1, 'train.decay_fraction': 0.2})
  lr = learning_rate_schedule(cfg.train)
  assert float(lr(0)) == pytest.approx(0.1)
  assert float(lr(10)) == pytest.approx(1.0)
  final = {'cosine': 0.1, 'wsd': 0.1, 'constant': 1.0}[schedule]
  assert float(lr(100)) == pytest.approx(final, abs=1e-6)
  if schedule == 'wsd':
    assert float(lr(75)) == pytest.approx(1.0)  # still in the stable phase
    # A cool-down longer than the steps after warm-up ends on time all the same.
    late = learning_rate_schedule(ml_collections.ConfigDict(dict(cfg.train, decay_fraction=0.95)))
    assert float(late(100)) == pytest.approx(0.1, abs=1e-6)


def _values_group_ratios(schedule: str, warmup_steps: int, steps: int):
  """(config, the ratio of a `values` group's updates (4x decaying to 1x) to the others' at
  each update count), over AdamW steps on unit gradients."""
  cfg = tiny_config(**{'train.steps': steps, 'train.warmup_steps': warmup_steps,
                       'train.lr': 1e-2, 'train.schedule': schedule, 'train.grad_clip': 0.0,
                       'train.weight_decay': 0.0})
  with cfg.unlocked():
    cfg.train.groups.values = dict(lr_multiplier=4.0, multiplier_decay='linear')
  params = nnx.State({'v': nnx.Param(jnp.zeros(3), optim_group='values'),
                      'w': nnx.Param(jnp.zeros(3))})
  tx = make_optimizer(cfg.train, params)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  ratios = []
  for _ in range(steps):
    updates, opt_state = tx.update(grads, opt_state, params)
    ratios.append(float(updates['v'].get_value()[0] / updates['w'].get_value()[0]))
  return cfg, ratios


def test_parameter_group_multiplier_decays_linearly_to_one():
  _, ratios = _values_group_ratios('constant', 0, 100)
  assert ratios[0] == pytest.approx(4.0)
  assert ratios[50] == pytest.approx(2.5)
  assert ratios[-1] == pytest.approx(1.03)


def test_logged_group_learning_rate_is_the_rate_its_updates_take():
  """`lr/values` (`group_learning_rates`) is the schedule's rate times the multiplier that
  the optimizer applies at the same update count, through warmup and cosine decay."""
  cfg, ratios = _values_group_ratios('cosine', 5, 40)
  schedule = learning_rate_schedule(cfg.train)
  rate = group_learning_rates(cfg.train)['values']
  for count, ratio in enumerate(ratios):
    assert float(rate(count)) == pytest.approx(float(schedule(count)) * ratio, rel=1e-5)
  assert float(rate(0)) == pytest.approx(4.0 * float(schedule(0)))


def test_parameter_groups_and_frozen_parameters_together():
  """A model with frozen weights and a configured group (BiTA over an UltraMem base with
  `train.groups.values`): the frozen stay put, the group keeps its multiplier."""
  cfg = tiny_config(**{'train.steps': 100, 'train.warmup_steps': 0, 'train.lr': 1e-2,
                       'train.schedule': 'constant', 'train.grad_clip': 0.0,
                       'train.weight_decay': 0.0})
  with cfg.unlocked():
    cfg.train.groups.values = dict(lr_multiplier=4.0, multiplier_decay='none')
  params = nnx.State({'base': nnx.Param(jnp.zeros(3), frozen=True),
                      'v': nnx.Param(jnp.zeros(3), optim_group='values'),
                      'w': nnx.Param(jnp.zeros(3))})
  tx = make_optimizer(cfg.train, params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  update = lambda name: float(updates[name].get_value()[0])
  assert update('base') == 0.0
  assert update('w') == pytest.approx(-1e-2)
  assert update('v') == pytest.approx(-4e-2)


@pytest.mark.parametrize('spec', ['configs/ultramem.py:tiny', 'configs/ultramem.py:680m',
                                  'configs/megabyte.py:tiny_ultramem'])
def test_shipped_presets_configure_every_parameter_group_of_their_model(spec):
  """UltraMem's values learn T=4 times faster at first (its paper); a preset whose model
  has them but not `train.groups.values` trains them at 1x, silently."""
  from jaxarch import models  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load(spec)
  model = nnx.eval_shape(lambda: models.build(cfg.model, rngs=nnx.Rngs(0)))
  groups = {v.get_metadata().get('optim_group', 'default')
            for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
  assert groups - {'default'} == set(cfg.train.groups) == {'values'}


def test_given_weights_start_the_state_in_their_shards_and_their_memory():
  """`init_state(given=...)` (an import): the given arrays are the state's, sharded as
  the state is, with the optimizer state made from them; their device buffers become
  the state's (donated) and the rest of the state is initialised as without them."""
  cfg = mesh_config(tiny_config(), fsdp=4, tensor=2)
  setup = make_setup(cfg, make_mesh(cfg))
  fresh = init_state(cfg, setup)
  rng = np.random.default_rng(0)
  embedding = rng.normal(size=fresh['params']['embed']['embedding'].shape).astype(np.float32)
  q_proj = jax.device_put(
      rng.normal(size=fresh['params']['blocks'][0]['attn']['q_proj'].shape).astype(np.float32),
      fresh['params']['blocks'][0]['attn']['q_proj'].sharding)
  state = init_state(cfg, setup, given={'embed.embedding': embedding,
                                        'blocks.0.attn.q_proj': q_proj})
  assert q_proj.is_deleted()  # its buffer is the state's
  got = state['params']['embed']['embedding']
  np.testing.assert_array_equal(got, embedding)
  assert got.sharding == setup.shardings['params']['embed']['embedding'].get_value()
  assert state['params']['blocks'][0]['attn']['q_proj'].sharding == (
      setup.shardings['params']['blocks'][0]['attn']['q_proj'].get_value())
  unchanged = lambda s: jax.tree.map(np.asarray, (s['params']['blocks'][1], s['model_state'],
                                                  s['opt_state'], s['rng'], s['step']))
  jax.tree.map(np.testing.assert_array_equal, unchanged(state), unchanged(fresh))
  with pytest.raises(ValueError, match='has no variable blocks.9.attn.q_proj'):
    init_state(cfg, setup, given={'blocks.9.attn.q_proj': embedding})


def test_optimizer_state_has_one_structure_with_or_without_clipping():
  cfg = mesh_config(tiny_config(), data=8)
  params = make_setup(cfg, make_mesh(cfg)).abstract_state['params']
  structure = lambda clip: jax.tree.structure(jax.eval_shape(make_optimizer(
      ml_collections.ConfigDict(dict(cfg.train, grad_clip=clip)), params).init, params))
  assert structure(0.0) == structure(1.0)  # a run resumes with clipping turned on


def test_sown_aux_losses_and_metrics_reach_the_step_metrics(monkeypatch):
  from jaxarch.layers import signals  # pylint: disable=g-import-not-at-top
  from jaxarch.models import transformer  # pylint: disable=g-import-not-at-top

  class Reporter(nnx.Module):
    def __init__(self, cfg, index, rngs):
      del cfg, index, rngs
      self.calls = signals.WindowCounter(jnp.zeros((), jnp.int32))

    def __call__(self, x, positions, segment_ids):
      del positions, segment_ids
      signals.add_aux_loss(self, jnp.float32(0.25))
      signals.add_metric(self, 'mean_input', jnp.mean(x))
      self.calls.set_value(self.calls.get_value() + 1)
      signals.add_metric(self, 'window_calls', self.calls.get_value())
      return jnp.zeros_like(x)

  monkeypatch.setitem(transformer.SIDE_LAYERS, 'reporter', Reporter)
  cfg = mesh_config(tiny_config(), data=8)
  with cfg.unlocked():
    cfg.model.reporter = {'placement': ((0, 1),)}
  setup = make_setup(cfg, make_mesh(cfg))
  state = init_state(cfg, setup)
  step = make_train_step(setup)
  batch = global_batch(make_batch(8, cfg.data.seq_len), setup.batch_sharding)
  state, m1 = step(state, batch)
  state, m2 = step(state, batch)
  assert float(m1['aux_loss/side_layers/0']) == pytest.approx(0.25)
  assert float(m1['total_loss']) == pytest.approx(float(m1['loss']) + 0.25, rel=1e-6)
  assert 'side_layers/0/mean_input' in m1
  assert float(m2['side_layers/0/window_calls']) == 2
  from jaxarch.train.step import make_window_reset  # pylint: disable=g-import-not-at-top
  state = make_window_reset(setup)(state)
  _, m3 = step(state, batch)
  assert float(m3['side_layers/0/window_calls']) == 1


@pytest.mark.slow
@pytest.mark.parametrize('spec', ['configs/moe.py:tiny', 'configs/moe.py:tiny:mosaic',
                                  'configs/ultramem.py:tiny', 'configs/megabyte.py:tiny_ultramem'])
def test_gpu_train_step_lowers_for_cuda_on_a_mesh(spec, traced_as_on_gpu):
  """The train step as `auto` builds it on a GPU (cuDNN attention, the Pallas kernels of
  MoE and UltraMem), on 8 devices with experts split 4 ways, lowers for CUDA: running it
  needs a GPU, lowering does not. (It found the kernels failing inside MoE's shard_map.)
  MoE's experts exchange their rows by `ragged_all_to_all` (`ep_exchange=ragged`). `:mosaic`: MoE with `matmul_impl=mosaic` (jax's Mosaic GPU ragged dot)."""
  del traced_as_on_gpu
  spec, mosaic = spec.removesuffix(':mosaic'), spec.endswith(':mosaic')
  cfg = config_lib.load(spec, ['model.dtype=bfloat16', 'model.remat=dots', 'data.seq_len=64',
                               'train.batch_size=8', 'mesh.ici.data=2', 'mesh.ici.expert=4',
                               *(['model.moe.matmul_impl=mosaic'] if mosaic else []),
                               *(['model.moe.ep_exchange=ragged'] if 'moe' in spec else [])])
  setup = make_setup(cfg, make_mesh(cfg))
  batch = global_batch(make_batch(8, 64), setup.batch_sharding)
  lowered = make_train_step(setup).trace(init_state(cfg, setup), batch).lower(
      lowering_platforms=('cuda',))
  hlo = lowered.as_text()
  assert 'xla.gpu.triton' in hlo  # the grouped matmuls / the value lookup
  assert 'CustomSPMDPartitioning' in hlo  # cuDNN attention, partitioned when compiled
  assert ('custom_call @mosaic_gpu' in hlo) == mosaic
  assert ('custom_call @ragged_all_to_all' in hlo) == ('moe' in spec)  # ep_exchange=ragged


def test_evaluation_runs_in_the_train_steps_microbatches_with_the_same_sums():
  from jaxarch.train.step import make_eval_step  # pylint: disable=g-import-not-at-top
  batch = make_batch(8, 32, seed=2)
  batch['segment_ids'][:3, 20:] = 0  # microbatches of unequal token counts
  totals = []
  for accum in (1, 2):
    cfg = mesh_config(tiny_config(**{'model.dtype': 'float32',
                                     'train.grad_accum_steps': accum}), data=4)
    setup = make_setup(cfg, make_mesh(cfg, devices=jax.devices()[:4]))
    step = make_eval_step(setup, np.ones(cfg.model.vocab_size, np.float32))
    out = step(init_state(cfg, setup), global_batch(batch, setup.batch_sharding))
    totals.append({k: float(v) for k, v in out.items()})
  assert totals[0]['tokens'] == totals[1]['tokens'] == 8 * 32 - 3 * 12
  assert totals[0]['nll'] == pytest.approx(totals[1]['nll'], rel=1e-5)


@pytest.mark.slow  # 60 s: UltraMem's step compiled twice
def test_a_window_count_over_microbatches_is_the_whole_batch_s():
  """`window_values_hit` counts the memory values read so far in the window: over
  microbatches its step value is the last one's (the mean would miss the later reads)."""
  cfg = config_lib.load('configs/ultramem.py:tiny', [
      'data.seq_len=32', 'train.batch_size=16', 'model.dtype=float32'])
  hit = {}
  for accum in (1, 4):
    with cfg.unlocked():
      cfg.train.grad_accum_steps = accum
    metrics = []
    _steps(mesh_config(cfg, data=4), jax.devices()[:4], n=1, metrics_of=metrics)
    hit[accum] = {k: float(v) for k, v in metrics[0].items() if 'window_values_hit' in k}
  assert hit[1] and 0 < min(hit[1].values()) < 1
  assert hit[4] == pytest.approx(hit[1], rel=1e-6)


def test_microbatched_evaluation_runs_with_remat():
  """The eval step's microbatch scan closes over the parameters: remat's merge of them
  inside the scan raised TraceContextError (train.grad_accum_steps=2 with model.remat)."""
  from jaxarch.train.step import make_eval_step  # pylint: disable=g-import-not-at-top
  batch = make_batch(8, 32, seed=2)
  totals = []
  for accum, policy in ((1, 'none'), (2, 'dots')):
    cfg = mesh_config(tiny_config(**{'model.dtype': 'float32', 'model.remat': policy,
                                     'train.grad_accum_steps': accum}), data=2)
    setup = make_setup(cfg, make_mesh(cfg, devices=jax.devices()[:2]))
    step = make_eval_step(setup, np.ones(cfg.model.vocab_size, np.float32))
    out = step(init_state(cfg, setup), global_batch(batch, setup.batch_sharding))
    totals.append({k: float(v) for k, v in out.items()})
  assert totals[1]['nll'] == pytest.approx(totals[0]['nll'], rel=1e-5)
