"""Config loading, overrides, validation and the JSON round trip (`jaxarch.config`)."""

import json
import sys
from pathlib import Path

import ml_collections
import pytest
from flax import nnx

from jaxarch import config as config_lib
from jaxarch import models
from jaxarch.train.workdir import WorkdirError, check_same_model

DENSE = 'configs/dense.py'


def tiny(*overrides):
  return config_lib.load(f'{DENSE}:tiny', overrides)


def error_of(fn, *args) -> str:
  with pytest.raises(config_lib.ConfigError) as info:
    fn(*args)
  return str(info.value)


# Loading.


@pytest.mark.parametrize('preset, d_model, n_layers', [
    ('tiny', 128, 4), ('151m', 1024, 12), ('680m', 1536, 24), ('1.6b', 2048, 32),
])
def test_preset_loads_with_its_shape_and_validates_on_8_devices(preset, d_model, n_layers):
  cfg = config_lib.load(f'{DENSE}:{preset}')
  assert (cfg.model.d_model, cfg.model.n_layers) == (d_model, n_layers)
  config_lib.validate(cfg, num_devices=8)


def test_preset_is_text_after_last_colon(tmp_path):
  folder = tmp_path / 'runs:v2'  # a colon in the path itself
  folder.mkdir()
  (folder / 'dense.py').write_text((config_lib._REPO_ROOT / DENSE).read_text())
  cfg = config_lib.load(f'{folder}/dense.py:1.6b')
  assert cfg.model.d_model == 2048


def test_spec_without_preset_gives_the_base_config():
  cfg = config_lib.load(DENSE)
  assert cfg.model.d_model == 1024 and cfg.data.seq_len == 1024


def test_relative_path_falls_back_to_the_checkout(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert config_lib.load(f'{DENSE}:tiny').model.d_model == 128
  assert config_lib.load('dense.py:tiny').model.d_model == 128


def test_loaded_config_is_locked_but_not_frozen():
  cfg = tiny()
  cfg.train.steps = 7
  with pytest.raises(AttributeError):
    cfg.train.new_key = 1


def test_unknown_preset_is_a_config_error():
  message = error_of(config_lib.load, f'{DENSE}:huge')
  assert message.startswith("config error: unknown preset 'huge'")


def test_missing_file_is_a_config_error():
  message = error_of(config_lib.load, 'nowhere/x.py:tiny')
  assert message.startswith("config error: config file 'nowhere/x.py' not found")


def test_file_without_get_config_is_a_config_error(tmp_path):
  (tmp_path / 'empty.py').write_text('X = 1\n')
  message = error_of(config_lib.load, str(tmp_path / 'empty.py'))
  assert 'does not define get_config' in message



def test_a_saved_config_json_loads_and_other_files_are_config_errors(tmp_path):
  config_lib.save(tiny(), tmp_path / 'config.json')
  again = config_lib.load(str(tmp_path / 'config.json'), ['train.steps=700'])
  assert again.train.steps == 700 and again.model.to_dict() == tiny().model.to_dict()
  assert 'takes no preset' in error_of(config_lib.load, f'{tmp_path / "config.json"}:tiny')
  (tmp_path / 'notes.txt').write_text('steps: 7\n')
  assert "neither a Python file defining get_config(arg) nor a run's saved config.json" in (
      error_of(config_lib.load, str(tmp_path / 'notes.txt')))
  # Hand-edited or damaged saved configs: one line naming the file or the key.
  for text, message in (('[]', 'holds a JSON list, not a config'),
                        ('null', 'holds a JSON NoneType, not a config'),
                        ('{"model": ', 'is not valid JSON')):
    (tmp_path / 'bad.json').write_text(text)
    assert message in error_of(config_lib.load_json, tmp_path / 'bad.json')
  edited = json.loads((tmp_path / 'config.json').read_text())
  edited['data']['tokenizer'] = 7
  (tmp_path / 'edited.json').write_text(json.dumps(edited))
  assert "data.tokenizer=7 must be a string, e.g. 'bytes'" in error_of(
      config_lib.load_json, tmp_path / 'edited.json')


def test_a_saved_config_takes_new_keys_from_the_shipped_configs_not_the_working_dir(
    tmp_path, monkeypatch):
  saved = config_lib.to_dict(tiny())
  del saved['checkpoint']['keep_best']  # saved before the key existed
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'dense.py').write_text('raise RuntimeError("a user\'s own")\n')
  monkeypatch.chdir(tmp_path)
  assert config_lib.load_json(tmp_path / 'config.json').checkpoint.keep_best is True


# Overrides.


@pytest.mark.parametrize('override, key, expected', [
    ('train.steps=50', 'train.steps', 50),
    ('train.lr=0.01', 'train.lr', 0.01),
    ('train.lr=1', 'train.lr', 1.0),  # an int is a valid float
    ('model.tie_embeddings=true', 'model.tie_embeddings', True),
    ('checkpoint.async_save=0', 'checkpoint.async_save', False),
    ("model.block_pattern=('dense', 'dense')", 'model.block_pattern', ('dense', 'dense')),
    ("mesh.rules=[['batch', 'data'], ['length', None]]", 'mesh.rules',
     (('batch', 'data'), ('length', None))),
    ('model.head_dim=16', 'model.head_dim', 16),  # placeholder(int) parses as int
    ('data.data_dir=none', 'data.data_dir', None),
    ('model.remat=none', 'model.remat', 'none'),  # a str field keeps the word 'none'
    ('mesh.ici.data=-1', 'mesh.ici.data', -1),
])
def test_override_is_parsed_by_field_type(override, key, expected):
  value = config_lib._get(tiny(override), key)
  assert value == expected and type(value) is type(expected)


def test_placeholder_override_can_be_reset_to_none():
  cfg = tiny('model.head_dim=16', 'model.head_dim=None')
  assert cfg.model.head_dim is None


@pytest.mark.parametrize('override', [
    '--config.train.steps=50', 'config.train.steps=50', 'train.steps=50',
    'train.steps = 50',  # written in Python: was unknown key 'train.steps '
])
def test_override_accepts_all_three_prefix_forms(override):
  assert tiny(override).train.steps == 50


def test_a_config_file_is_given_as_a_path_too():
  """As `jaxarch.load` takes a Path: was an AttributeError ('endswith')."""
  cfg = config_lib.load(Path('configs/dense.py'), ['train.warmup_steps=0', 'train.steps=5'])
  assert cfg.model.family == 'dense' and cfg.train.steps == 5


def test_unknown_key_suggests_the_closest():
  assert error_of(tiny, 'train.stpes=5') == (
      "config error: unknown key 'train.stpes' (did you mean 'train.steps'?)")
  assert "did you mean 'train.steps'" in error_of(tiny, 'trian.steps=5')


def test_unknown_key_names_ours_for_maxtexts_and_a_key_without_its_section():
  # Before: 'learning_rate' had no suggestion and 'train.learning_rate' 'train.min_lr_ratio'.
  assert error_of(tiny, 'train.learning_rate=1e-3') == (
      "config error: unknown key 'train.learning_rate' (MaxText's learning_rate is "
      "'train.lr' here)")
  assert "MaxText's learning_rate is 'train.lr'" in error_of(tiny, 'learning_rate=1e-3')
  assert "MaxText's ici_fsdp_parallelism is 'mesh.ici.fsdp'" in error_of(
      tiny, 'ici_fsdp_parallelism=4')
  assert 'the global batch in sequences' in error_of(tiny, 'per_device_batch_size=4')
  assert "did you mean 'train.warmup_steps'" in error_of(tiny, 'warmup_steps=0')
  # The UltraMem release calls top_k knn: was "did you mean 'model.ultramem'?".
  ultramem = lambda override: config_lib.load('configs/ultramem.py:tiny', [override])
  assert error_of(ultramem, 'model.ultramem.knn=32') == (
      "config error: unknown key 'model.ultramem.knn' (the UltraMem release's knn is "
      "'model.ultramem.top_k' here)")
  assert "mem_knn is 'model.ultramem.top_k'" in error_of(ultramem, 'mem_knn=32')


def test_unknown_section_is_named_not_matched_to_a_key_of_another_depth():
  # Before: "unknown key 'model.moe.top_k' (did you mean 'model.d_model'?)".
  # Another family's section names that family's config (model.moe.capacity_factor
  # suggested 'model.rope_scaling.factor').
  assert error_of(tiny, 'model.moe.top_k=2') == (
      "config error: unknown key 'model.moe.top_k': model.moe belongs to the moe family's "
      "config (configs/moe.py), and this one is model.family='dense'")
  assert 'configs/moe.py' in error_of(tiny, 'model.moe.capacity_factor=1.0')
  assert 'configs/ultramem.py' in error_of(tiny, 'model.ultramem.top_k=2')
  assert error_of(tiny, 'model.qqq.www=1') == (
      "config error: unknown key 'model.qqq.www': model has no section 'qqq' (its "
      'sections: rope_scaling)')
  assert error_of(tiny, 'nosection.x=1') == (
      "config error: unknown key 'nosection.x': the config has no section 'nosection' (its "
      'sections: checkpoint, data, launch, log, mesh, model, train)')
  # A parameter group is a section of its own, which an override cannot add.
  assert error_of(tiny, 'train.groups.values.lr_multiplier=2') == (
      "config error: unknown key 'train.groups.values.lr_multiplier': train.groups has no "
      "group 'values'; a new one is made in a config file (c.train.groups.values = "
      'ml_collections.ConfigDict(dict(lr_multiplier=...))), whose keys '
      '--config.train.groups.NAME.KEY then override')


def test_override_cannot_add_a_key_below_a_leaf():
  assert "unknown key 'train.steps.x'" in error_of(tiny, 'train.steps.x=1')


@pytest.mark.parametrize('override, message', [
    ('train.steps=abc', "config error: train.steps='abc' must be an int"),
    ('train.steps=2.5', "config error: train.steps='2.5' must be an int"),
    ('train.lr=fast', "config error: train.lr='fast' must be a float"),
    ('model.tie_embeddings=maybe', "config error: model.tie_embeddings='maybe' must be a bool"),
    ('model.block_pattern=dense', "config error: model.block_pattern='dense' must be a tuple"),
    ('model.head_dim=wide', "config error: model.head_dim='wide' must be an int"),
    ('train.steps=none', "config error: train.steps='none' must be an int"),
])
def test_wrong_type_names_key_and_expected_type(override, message):
  assert error_of(tiny, override).startswith(message)


def test_override_of_a_whole_section_is_refused():
  assert 'mesh.ici is a section' in error_of(tiny, 'mesh.ici=4')


# Validation.


@pytest.mark.parametrize('key', config_lib.POSITIVE_INTS)
def test_non_positive_int_is_refused(key):
  assert error_of(tiny, f'{key}=0') == f'config error: {key}=0 must be a positive int'
  assert error_of(tiny, f'{key}={2**40}') == (f'config error: {key}={2**40} must be below '
                                              '2^31: jax counts steps and sizes in int32')


def test_d_model_must_divide_by_n_heads_unless_head_dim_is_set():
  message = error_of(tiny, 'model.d_model=130')
  assert message.startswith('config error: model.d_model=130 must be divisible by '
                            'model.n_heads=4')
  assert tiny('model.d_model=130', 'model.head_dim=32').model.d_model == 130


def test_n_heads_must_divide_by_n_kv_heads():
  assert error_of(tiny, 'model.n_kv_heads=3').startswith(
      'config error: model.n_heads=4 must be divisible by model.n_kv_heads=3')


def test_rope_needs_an_even_head_dimension():
  assert error_of(tiny, 'model.d_model=12').startswith(
      'config error: model: the head dimension 3 (d_model=12 / n_heads=4) must be even')
  # A head_dim that is set is named (it said 'the head dimension 5 (d_model=128 /
  # n_heads=4)', a division that is 32, and named no key).
  assert error_of(tiny, 'model.head_dim=5') == (
      'config error: model.head_dim=5 must be even for rotary position embeddings')


@pytest.mark.parametrize('overrides, message', [
    (['model.init_truncation=-1.0'], 'model.init_truncation=-1.0 must be >= 0'),
    (['model.init_std=0.0'], 'model.init_std=0.0 must be > 0'),
    (['model.init_std=inf'], 'model.init_std=inf must be > 0 and finite'),
    (['model.rope_theta=0.0'], 'model.rope_theta=0.0 must be > 0'),
    (['model.rope_scaling.type=yarn'], "model.rope_scaling.type='yarn' must be one of none, "
     'llama3'),
    (['model.rope_scaling.type=llama3', 'model.rope_scaling.factor=0.5'],
     'model.rope_scaling.factor=0.5 must be >= 1 and finite'),
    (['model.rope_scaling.type=llama3', 'model.rope_scaling.low_freq_factor=4.0'],
     'model.rope_scaling.low_freq_factor=4.0 and high_freq_factor=4.0 must be 0 < '
     'low_freq_factor < high_freq_factor'),
    (['model.rope_scaling.type=llama3', 'model.rope_scaling.low_freq_factor=0.0'],
     'model.rope_scaling.low_freq_factor=0.0 and high_freq_factor=4.0 must be 0 <'),
    (['model.rope_scaling.type=llama3', 'model.rope_scaling.original_max_len=0'],
     'model.rope_scaling.original_max_len=0 must be a positive int'),
    (['model.rope_scaling.type=linear', 'model.rope_scaling.factor=0.0'],
     'model.rope_scaling.factor=0.0 must be > 0 and finite (positions are divided by it'),
    (['model.rope_scaling.type=linear', 'model.rope_scaling.factor=inf'],
     'model.rope_scaling.factor=inf must be > 0 and finite'),
    (['model.norm_eps=-1.0'], 'model.norm_eps=-1.0 must be >= 0'),
    (['train.b2=1.0'], 'train.b2=1.0 must be in [0, 1)'),
    (['train.steps=30'], 'train.warmup_steps=50 must be in [0, train.steps=30]; for a short '
     'run set --config.train.warmup_steps=3'),
    (['train.eps=0.0'], 'train.eps=0.0 must be > 0'),
    (['train.weight_decay=-0.1'], 'train.weight_decay=-0.1 must be >= 0'),
    (['data.validation_fraction=2.0'], 'data.validation_fraction=2.0 must be in [0, 1]'),
    (['data.num_threads=-1'], 'data.num_threads=-1 must be an int >= 0: threads that read '
     'and tokenize the training documents'),
    (['data.pack_align=5'], 'data.seq_len=128 must be a multiple of data.pack_align=5'),
    (['data.bos_id=-1'], "data.bos_id=-1 must be a token id in [0, model.vocab_size=384), "
     "or None (the tokenizer's end-of-document id)"),
    (['data.bos_id=384'], 'data.bos_id=384 must be a token id in [0, model.vocab_size=384)'),
    (['data.stop_ids=(5, 384)'], 'data.stop_ids=(5, 384) must be a tuple of token ids in '
     '[0, model.vocab_size=384), e.g. (128009,): where generation stops besides the '
     'end-of-document id'),
    (['data.stop_ids=(-1,)'], 'data.stop_ids=(-1,) must be a tuple of token ids'),
    (['data.stop_ids=(True,)'], 'data.stop_ids=(True,) must be a tuple of token ids'),
    (['data.stop_ids=5'], "data.stop_ids='5' must be a tuple"),
])
def test_init_adam_and_data_settings_are_checked(overrides, message):
  assert error_of(tiny, *overrides).startswith(f'config error: {message}')


@pytest.mark.parametrize('source', ['None', 'nope:x', 'files:', 'tfds:', 'distilled:'])
def test_a_data_source_of_no_known_form_is_refused_at_load(source):
  # Found before a sweep's runs start, not in each run's train.log (or cluster job).
  assert error_of(tiny, f'data.source={source}') == (
      f"config error: data.source='{source}' must be 'default', 'files:<glob>', "
      "'tfds:<name>', 'distilled:<dir>' or a mixture 'SOURCE,WEIGHT;SOURCE,WEIGHT'")
  for good in ('default', 'files:/corpus/*.txt', 'tfds:lm1b'):
    assert tiny(f'data.source={good}').data.source == good

def test_parameter_group_settings_are_checked():
  load = lambda *o: config_lib.load('configs/ultramem.py:tiny', list(o))
  assert 'lr_multiplier=0.0 must be a number > 0' in error_of(
      load, 'train.groups.values.lr_multiplier=0.0')
  for bad in ('nan', 'inf'):  # every step non-finite
    assert f'lr_multiplier={bad} must be a number > 0 and finite' in error_of(
        load, f'train.groups.values.lr_multiplier={bad}')
  assert "multiplier_decay='Linear' must be one of none, linear" in error_of(
      load, 'train.groups.values.multiplier_decay=Linear')
  cfg = load()
  with cfg.unlocked():
    cfg.train.groups['values'].warmup = 10
  assert 'train.groups.values.warmup is not a group setting' in error_of(
      config_lib.validate, cfg)
  with cfg.unlocked():
    del cfg.train.groups['values']['warmup']
    cfg.train.groups.valuse = cfg.train.groups['values']  # a typo: no such parameter group
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxarch import models  # pylint: disable=g-import-not-at-top
  from jaxarch.train.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  params = nnx.state(nnx.eval_shape(lambda: models.build(cfg.model, rngs=nnx.Rngs(0))),
                     nnx.Param)
  assert 'train.groups.valuse names no parameter group of this model' in error_of(
      make_optimizer, cfg.train, params)


def test_seq_len_must_fit_max_len():
  assert error_of(tiny, 'data.seq_len=512') == (
      'config error: data.seq_len=512 must be <= model.max_len=256')


@pytest.mark.parametrize('override, key', [
    ('model.dtype=fp8', 'model.dtype'),
    ('model.param_dtype=int8', 'model.param_dtype'),
    ('model.remat=some', 'model.remat'),
    ('model.attention_impl=flash', 'model.attention_impl'),
    ('model.family=mamba', 'model.family'),
    ('train.schedule=linear', 'train.schedule'),
])
def test_unknown_choice_lists_the_options(override, key):
  message = error_of(tiny, override)
  assert message.startswith(f'config error: {key}=') and 'must be one of' in message


@pytest.mark.parametrize('placement', ['(1, 2)', "((1, 'a'),)", '((2, 1),)', '((0, 4),)'])
def test_an_ultramem_placement_must_be_pairs_of_block_indices(placement):
  with pytest.raises(config_lib.ConfigError, match=r'model.ultramem.placement\[0\]=.* must '
                     r'be \(read, write\) with 0 <= read <= write < model.n_layers=4'):
    config_lib.load('configs/ultramem.py:tiny', [f'model.ultramem.placement={placement}'])


def test_unknown_table_split_lists_the_designs():
  load = lambda *o: config_lib.load('configs/ultramem.py:tiny', list(o))
  assert load().model.ultramem.table_split == 'rows'
  assert error_of(load, 'model.ultramem.table_split=cols') == (
      "config error: model.ultramem.table_split='cols' must be one of rows, width")


def test_block_pattern_must_name_known_blocks():
  message = error_of(tiny, "model.block_pattern=('dense', 'mamba')")
  assert message.startswith("config error: model.block_pattern[1]='mamba' must be one of")
  assert 'non-empty' in error_of(tiny, 'model.block_pattern=()')
  assert "(model.moe) this config lacks; start from a config that has them (--config=" \
      'configs/moe.py:<preset>)' in error_of(tiny, "model.block_pattern=('dense', 'moe')")
  megabyte = config_lib.load('configs/megabyte.py:tiny')
  with pytest.raises(config_lib.ConfigError, match=r'--config=configs/megabyte.py:tiny_moe'):
    config_lib.apply_override(megabyte, "model.block_pattern=('dense', 'moe')")
    config_lib.validate(megabyte)


@pytest.mark.parametrize('overrides, key', [
    (('train.warmup_steps=600',), 'train.warmup_steps'),  # tiny trains 500 steps
    (('train.warmup_steps=-1',), 'train.warmup_steps'),
    (('train.lr=0',), 'train.lr'),
    (('train.lr=inf',), 'train.lr'),
    (('train.min_lr_ratio=1.5',), 'train.min_lr_ratio'),
    (('train.grad_clip=-1',), 'train.grad_clip'),
    # Each was accepted, and every step was then non-finite (advice: lower train.lr).
    (('train.weight_decay=inf',), 'train.weight_decay'),
    (('train.z_loss=inf',), 'train.z_loss'),
    # Accepted; the initialiser then raised OverflowError (2^63), or took 2^32 as seed 0.
    (('train.seed=9223372036854775808',), 'train.seed'),
    (('train.seed=4294967296',), 'train.seed'),
])
def test_train_values_out_of_range_are_refused(overrides, key):
  assert error_of(tiny, *overrides).startswith(f'config error: {key}=')


@pytest.mark.parametrize('spec, override', [
    # Each was accepted (NaN and inf passed `<= 0` and `< 0`): the capacities then raised
    # ValueError or OverflowError deep in the MoE layer, the weights made every loss NaN.
    ('configs/moe.py:tiny', 'model.moe.capacity_factor=nan'),
    ('configs/moe.py:tiny', 'model.moe.capacity_factor=inf'),
    ('configs/moe.py:tiny', 'model.moe.ep_capacity_factor=nan'),
    ('configs/moe.py:tiny', 'model.moe.ep_capacity_factor=inf'),
    ('configs/moe.py:tiny', 'model.moe.aux_loss_weight=nan'),
    ('configs/moe.py:tiny', 'model.moe.z_loss_weight=inf'),
    ('configs/moe.py:tiny', 'model.moe.bias_update_rate=nan'),
    ('configs/ultramem.py:tiny', 'model.ultramem.aux_loss_weight=inf'),
    ('configs/ultramem.py:tiny', 'model.ultramem.aux_tau=nan'),
])
def test_nan_or_inf_loss_weights_and_capacities_are_refused(spec, override):
  message = error_of(config_lib.load, spec, [override])
  assert message.startswith(f'config error: {override.split("=")[0]}=')
  assert 'finite' in message


def test_every_family_shares_the_transformer_checks():
  for family in set(config_lib.FAMILY_CHECKS) - {'bita'}:  # bita: those of its base
    assert config_lib._check_transformer in config_lib.FAMILY_CHECKS[family]
  assert 'model.d_model=130' in error_of(tiny, 'model.d_model=130')
  assert "model.family='mamba' must be one of dense" in error_of(tiny, 'model.family=mamba')
  assert 'needs its settings (model.bita)' in error_of(tiny, 'model.family=bita')
  assert 'needs its settings (model.megabyte)' in error_of(tiny, 'model.family=megabyte')
  assert "model.block_pattern=('dense',) holds no 'moe' block" in error_of(
      tiny, 'model.family=moe')


# Mesh.


def test_mesh_that_does_not_divide_the_devices_is_refused():
  cfg = tiny('mesh.ici.fsdp=3')
  assert error_of(config_lib.validate, cfg, 8) == (
      'config error: mesh.ici (data=-1, fsdp=3, tensor=1, expert=1) does not divide the '
      '8 devices (fsdp*tensor*expert=3)')


def test_fixed_mesh_must_use_every_device():
  cfg = tiny('mesh.ici.data=2', 'mesh.ici.fsdp=2')
  message = error_of(config_lib.validate, cfg, 8)
  assert message.startswith('config error: mesh.ici (data=2, fsdp=2, tensor=1, expert=1) '
                            'uses 4 devices but there are 8')
  config_lib.validate(tiny('mesh.ici.data=2', 'mesh.ici.fsdp=4'), 8)


def test_two_minus_ones_in_ici_are_refused():
  assert 'more than one -1' in error_of(tiny, 'mesh.ici.fsdp=-1')


def test_minus_one_in_both_ici_and_dcn_is_refused():
  assert 'both have a -1' in error_of(tiny, 'mesh.dcn.data=-1')


@pytest.mark.parametrize('override', ['mesh.ici.tensor=0', 'mesh.dcn.fsdp=-2'])
def test_mesh_size_must_be_positive_or_minus_one(override):
  assert 'must be a positive int or -1' in error_of(tiny, override)


def test_batch_must_divide_by_its_data_parallel_size():
  cfg = tiny('train.batch_size=12')
  config_lib.validate(cfg)  # no devices given: nothing to divide by
  message = error_of(config_lib.validate, cfg, 8)
  assert message.startswith('config error: train.batch_size=12 must be divisible by 8')
  # The same batch fits when only 4 of the 8 devices split it.
  config_lib.validate(tiny('train.batch_size=12', 'mesh.ici.tensor=2'), 8)


def test_experts_split_as_resolved_must_divide_and_split_the_batch_too():
  moe = lambda *o: config_lib.load('configs/moe.py:tiny', overrides=list(o))
  cfg = moe('mesh.ici.data=1', 'mesh.ici.expert=-1', 'model.moe.num_experts=12')
  assert error_of(config_lib.validate, cfg, 8) == (
      'config error: model.moe.num_experts=12 must be divisible by 8, the mesh axes experts '
      'are split over (expert=8)')
  cfg = moe('mesh.ici.data=2', 'mesh.ici.expert=4', "mesh.rules=(('batch', ('data', "
            "'fsdp')), ('expert', 'expert'))")
  assert error_of(config_lib.validate, cfg, 8) == (
      "config error: mesh.rules: 'batch' -> ('data', 'fsdp') must include the mesh axes "
      'experts are split over (expert=4); expert is missing')
  config_lib.validate(moe('mesh.ici.data=1', 'mesh.ici.expert=-1'), 8)


def test_mesh_shape_resolves_minus_one():
  cfg = tiny('mesh.ici.fsdp=2', 'mesh.ici.tensor=2')
  assert config_lib.mesh_shape(cfg, 8) == dict(data=2, fsdp=2, tensor=2, expert=1)


def test_mesh_shape_multiplies_ici_by_dcn():
  cfg = tiny('mesh.ici.fsdp=2', 'mesh.dcn.data=2')
  assert config_lib.mesh_shape(cfg, 8) == dict(data=4, fsdp=2, tensor=1, expert=1)
  cfg = tiny('mesh.ici.data=4', 'mesh.dcn.data=-1')
  assert config_lib.mesh_shape(cfg, 8) == dict(data=8, fsdp=1, tensor=1, expert=1)


@pytest.mark.parametrize('rules, fragment', [
    ("(('batch', 'model'),)", "mesh axes must be None"),
    ("(('batch',),)", 'must be a (logical, mesh_axes) pair'),
    ("(('length', None),)", "no entry for logical axis 'batch'"),
    ("(('batch', 'data'), ('batch', 'fsdp'))", 'a second time'),
])
def test_mesh_rules_must_be_pairs_of_known_axes(rules, fragment):
  assert fragment in error_of(tiny, f'mesh.rules={rules}')


# Errors are for people.


@pytest.mark.parametrize('spec, overrides, key', [
    (f'{DENSE}:tiny', ['train.stpes=1'], 'train.stpes'),
    (f'{DENSE}:tiny', ['train.steps=abc'], 'train.steps'),
    (f'{DENSE}:tiny', ['model.n_heads=3'], 'model.n_heads'),
    (f'{DENSE}:tiny', ['mesh.ici.fsdp=-1'], 'mesh.ici'),
    (f'{DENSE}:tiny', ['checkpoint.keep=0'], 'checkpoint.keep'),
    (f'{DENSE}:nope', [], 'nope'),
    ('missing.py', [], 'missing.py'),
    (f'{DENSE}:tiny', ['model.family=ultramem'], 'configs/ultramem.py'),  # no model.ultramem
])
def test_error_is_one_line_starting_with_config_error_and_naming_the_key(spec, overrides, key):
  message = error_of(config_lib.load, spec, overrides)
  assert message.startswith('config error: ') and '\n' not in message and key in message


def test_overrides_given_as_one_string_are_one_line_not_one_per_character(tmp_path):
  message = error_of(config_lib.load, f'{DENSE}:tiny', 'train.steps=5')
  assert message == ("config error: overrides='train.steps=5' is one string; give a list of "
                     "overrides, e.g. ['train.steps=5']")
  config_lib.save(tiny(), tmp_path / 'config.json')
  assert 'is one string' in error_of(config_lib.load_json, tmp_path / 'config.json',
                                     'train.steps=5')


def test_a_bita_config_that_did_not_come_through_load_says_to_load_it():
  """configs/bita.py's get_config() alone has no model: `load` takes it from the base run."""
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=protected-access
  cfg = config_lib._import_file(Path('configs/bita.py')).get_config('tiny')
  message = error_of(config_lib.validate, cfg)
  assert message.startswith("config error: model.family='bita' takes its model from the "
                            'base run') and 'config.load(' in message and '\n' not in message


def test_config_error_is_a_value_error():
  assert issubclass(config_lib.ConfigError, ValueError)


def test_validate_names_a_missing_key():
  cfg = tiny()
  cfg.unlock()
  del cfg.train['lr']
  assert error_of(config_lib.validate, cfg) == "config error: missing key 'train.lr'"


# Saving.


def test_json_round_trip_restores_the_same_config(tmp_path):
  cfg = tiny('model.head_dim=32', "model.block_pattern=('dense', 'dense')")
  config_lib.save(cfg, tmp_path / 'run' / 'config.json')
  restored = config_lib.load_json(tmp_path / 'run' / 'config.json')
  assert isinstance(restored, ml_collections.ConfigDict)
  assert config_lib.to_dict(restored) == config_lib.to_dict(cfg)
  assert isinstance(restored.mesh.rules[0], tuple)
  assert config_lib.config_hash(restored) == config_lib.config_hash(cfg)
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['train']['steps'] == 500


def test_a_saved_config_keeps_its_optional_keys_optional(tmp_path):
  cfg = config_lib.load('configs/moe.py:tiny', ['model.moe.capacity_factor=1.25',
                                                'launch.partition=gpu'])
  config_lib.save(cfg, tmp_path / 'config.json')
  restored = config_lib.load_json(tmp_path / 'config.json', [
      'model.moe.capacity_factor=none', 'launch.partition=none', 'model.head_dim=16'])
  assert restored.model.moe.capacity_factor is None and restored.launch.partition is None
  assert restored.model.head_dim == 16  # saved as None: still an int
  with pytest.raises(config_lib.ConfigError, match='model.head_dim=.*must be an int'):
    config_lib.load_json(tmp_path / 'config.json', ['model.head_dim=1.5'])
  assert config_lib.config_hash(config_lib.load_json(tmp_path / 'config.json')) == (
      config_lib.config_hash(cfg))


def test_a_run_saved_before_newer_run_keys_resumes_with_their_defaults(tmp_path):
  cfg = tiny()
  path = tmp_path / 'config.json'
  config_lib.save(cfg, path)
  old = json.loads(path.read_text())
  del old['train']['mu_dtype'], old['train']['nonfinite'], old['launch']  # not yet in jaxarch
  old['train']['lr'] = 0.5  # the run's own values stay
  path.write_text(json.dumps(old))
  restored = config_lib.load_json(path)
  assert (restored.train.mu_dtype, restored.train.nonfinite) == ('float32', 'stop')
  assert restored.launch.nodes == 1 and restored.train.lr == 0.5
  del old['model']['d_ff']  # what was trained is never guessed
  path.write_text(json.dumps(old))
  assert error_of(config_lib.load_json, path) == (
      f"config error: {path}: missing key 'model.d_ff' (an older or edited saved config)")


def test_data_bos_id_defaults_to_none_and_a_run_saved_without_it_loads(tmp_path):
  """None: documents start with the tokenizer's eod, as before the key (an imported Llama
  sets its own BOS); a saved config keeps the key optional, an older one lacks it."""
  assert tiny().data.bos_id is None and tiny('data.bos_id=1').data.bos_id == 1
  path = tmp_path / 'config.json'
  config_lib.save(tiny('data.bos_id=1'), path)
  assert config_lib.load_json(path).data.bos_id == 1
  assert config_lib.load_json(path, ['data.bos_id=none']).data.bos_id is None
  old = json.loads(path.read_text())
  del old['data']['bos_id']
  path.write_text(json.dumps(old))
  assert config_lib.load_json(path).data.get('bos_id') is None


def test_a_bita_config_takes_the_base_runs_bos(tmp_path):
  """BiTA's prompts start as its base run's documents did (an imported Llama's <s>)."""
  (tmp_path / 'base').mkdir()
  config_lib.save(tiny('data.bos_id=65'), tmp_path / 'base' / 'config.json')
  load = lambda *overrides: config_lib.load('configs/bita.py:tiny', [
      f'model.bita.base_workdir={tmp_path / "base"}', 'data.source=distilled:/data',
      *overrides])
  assert load().data.bos_id == 65 and load('data.bos_id=65').data.bos_id == 65
  config_lib.save(load(), tmp_path / 'bita.json')  # what `generate` of the BiTA run reads
  assert config_lib.load_json(tmp_path / 'bita.json').data.bos_id == 65
  assert error_of(load, 'data.bos_id=1') == (
      "config error: data.bos_id=1 differs from the base run's 65; leave it unset")


def test_a_run_saved_before_data_num_threads_reads_with_threads_and_takes_the_override(
    tmp_path):
  """The threads only say how to read the same batches: a run saved before the key gets
  the shipped default, and `--config.data.num_threads` is a key it knows."""
  path = tmp_path / 'config.json'
  config_lib.save(tiny(), path)
  old = json.loads(path.read_text())
  del old['data']['num_threads']
  path.write_text(json.dumps(old))
  assert config_lib.load_json(path).data.num_threads == 16
  assert config_lib.load_json(path, ['data.num_threads=4']).data.num_threads == 4


def test_data_add_bos_defaults_to_true_and_a_run_saved_without_it_loads(tmp_path):
  """True: documents and prompts start with a BOS, as before the key; False (an imported
  Qwen's) with a data.bos_id, or not a bool, is one line."""
  assert tiny().data.add_bos is True and tiny('data.add_bos=False').data.add_bos is False
  path = tmp_path / 'config.json'
  config_lib.save(tiny('data.add_bos=False'), path)
  assert config_lib.load_json(path).data.add_bos is False
  old = json.loads(path.read_text())
  del old['data']['add_bos']
  path.write_text(json.dumps(old))
  assert config_lib.load_json(path).data.add_bos is True
  assert error_of(tiny, 'data.add_bos=False', 'data.bos_id=1') == (
      'config error: data.bos_id=1 names a BOS, but data.add_bos=False adds none; unset '
      'data.bos_id or set data.add_bos=True')
  path.write_text(json.dumps({**old, 'data': {**old['data'], 'add_bos': 'no'}}))
  assert error_of(config_lib.load_json, path) == (
      "config error: data.add_bos='no' must be True or False (False: documents and prompts "
      'start with no BOS)')
  assert error_of(config_lib.load, 'configs/megabyte.py:tiny', ['data.add_bos=False']) == (
      "config error: data.add_bos=False: MEGABYTE never reads a document's first input (the "
      'pad patch stands in before it), which without a BOS is its first byte; keep '
      'data.add_bos=True')


def test_data_stop_ids_default_to_empty_and_a_run_saved_without_them_loads(tmp_path):
  """(): generation stops at the eod alone, as before the key (an imported instruct model
  sets its end of turn); an older saved config lacks the key and loads with the default."""
  assert tiny().data.stop_ids == ()
  assert tiny('data.stop_ids=[7, 9]').data.stop_ids == (7, 9)
  path = tmp_path / 'config.json'
  config_lib.save(tiny('data.stop_ids=(7, 9)'), path)
  assert config_lib.load_json(path).data.stop_ids == (7, 9)
  old = json.loads(path.read_text())
  del old['data']['stop_ids']
  path.write_text(json.dumps(old))
  assert config_lib.load_json(path).data.stop_ids == ()
  # A hand-edited one is checked as an override is.
  path.write_text(json.dumps({**old, 'data': {**old['data'], 'stop_ids': [7, 'x']}}))
  assert error_of(config_lib.load_json, path).startswith(
      "config error: data.stop_ids=(7, 'x') must be a tuple of token ids")


def test_data_chat_template_names_a_file_of_the_run_and_defaults_to_none(tmp_path):
  """None: no template, as before the key (an older saved run loads with it); a file that
  is not there is one line; one in the run is named relative to it (`RUN_FILES`), so a
  moved run keeps it; a BiTA run over the base chats with the base's."""
  assert tiny().data.chat_template is None
  template = tmp_path / 'run' / 'tokenizer' / 'chat_template.jinja'
  assert error_of(tiny, f'data.chat_template={template}') == (
      f"config error: data.chat_template='{template}': no such file (a Jinja chat template, "
      "as `jaxarch import` keeps in the run's tokenizer/; None: no template)")
  template.parent.mkdir(parents=True)
  template.write_text('{{ messages }}')
  config_lib.save(tiny(f'data.chat_template={template}'), tmp_path / 'run' / 'config.json')
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert saved['data']['chat_template'] == 'tokenizer/chat_template.jinja'
  (tmp_path / 'run').rename(tmp_path / 'moved')
  moved = tmp_path / 'moved' / 'tokenizer' / 'chat_template.jinja'
  assert config_lib.load_json(tmp_path / 'moved' / 'config.json').data.chat_template == (
      str(moved))
  bita = config_lib.load('configs/bita.py:tiny', [
      f'model.bita.base_workdir={tmp_path / "moved"}', 'data.source=distilled:/data'])
  assert bita.data.chat_template == str(moved)
  del saved['data']['chat_template']
  (tmp_path / 'old.json').write_text(json.dumps(saved))
  assert config_lib.load_json(tmp_path / 'old.json').data.chat_template is None
  moved.unlink()
  assert error_of(config_lib.load_json, tmp_path / 'moved' / 'config.json').startswith(
      "config error: data.chat_template='tokenizer/chat_template.jinja': no such file")


def test_a_bita_config_takes_the_base_runs_bos_setting_and_stop_ids(tmp_path):
  """BiTA's prompts start as its base run's documents did (with no BOS for a Qwen's), and
  its generation stops where the base's does (an imported model's end of turn)."""
  (tmp_path / 'base').mkdir()
  config_lib.save(tiny('data.stop_ids=(65, 66)', 'data.add_bos=False'),
                  tmp_path / 'base' / 'config.json')
  load = lambda *overrides: config_lib.load('configs/bita.py:tiny', [
      f'model.bita.base_workdir={tmp_path / "base"}', 'data.source=distilled:/data',
      *overrides])
  assert load().data.stop_ids == (65, 66) == load('data.stop_ids=(65, 66)').data.stop_ids
  assert load().data.add_bos is False and load('data.add_bos=False').data.add_bos is False
  config_lib.save(load(), tmp_path / 'bita.json')  # what `generate` of the BiTA run reads
  saved = config_lib.load_json(tmp_path / 'bita.json').data
  assert (saved.stop_ids, saved.add_bos) == ((65, 66), False)
  assert error_of(load, 'data.add_bos=True') == (
      "config error: data.add_bos=True differs from the base run's False; leave it unset")
  assert error_of(load, 'data.stop_ids=(1,)') == (
      "config error: data.stop_ids=(1,) differs from the base run's (65, 66); leave it unset")
  # A base saved before the keys starts with a BOS and stops at the eod alone, as its BiTA.
  base = json.loads((tmp_path / 'base' / 'config.json').read_text())
  del base['data']['stop_ids'], base['data']['add_bos']
  (tmp_path / 'base' / 'config.json').write_text(json.dumps(base))
  assert (load().data.stop_ids, load().data.add_bos) == ((), True)


def test_a_megabyte_run_saved_with_the_retired_pad_id_loads_as_the_same_model(tmp_path):
  """model.megabyte.pad_id filled a partial last patch, after every real byte: no
  prediction ever read it, so it is gone, and a run that saved it loads without it."""
  path = tmp_path / 'config.json'
  config_lib.save(config_lib.load('configs/megabyte.py:tiny', []), path)
  old = json.loads(path.read_text())
  assert 'pad_id' not in old['model']['megabyte']
  old['model']['megabyte']['pad_id'] = 256
  path.write_text(json.dumps(old))
  restored = config_lib.load_json(path)
  assert 'pad_id' not in restored.model.megabyte
  assert config_lib.config_hash(restored) == config_lib.config_hash(
      config_lib.load('configs/megabyte.py:tiny', []))


def test_a_moe_run_saved_before_the_kernel_choice_resumes_with_auto(tmp_path):
  path = tmp_path / 'config.json'
  config_lib.save(config_lib.load('configs/moe.py:tiny', []), path)
  old = json.loads(path.read_text())
  del old['model']['moe']['matmul_impl']  # kernel choices: the same function either way
  del old['model']['moe']['kernel_tiling']
  del old['model']['moe']['mosaic_tiling']
  del old['model']['moe']['mosaic_weight_grad']
  old['model']['moe']['top_k'] = 3
  path.write_text(json.dumps(old))
  restored = config_lib.load_json(path)
  assert (restored.model.moe.matmul_impl, restored.model.moe.top_k) == ('auto', 3)
  assert restored.model.moe.kernel_tiling == (64, 128, 64, 4, 3, 0)
  assert restored.model.moe.mosaic_tiling == (128, 128, 64, 4, 8)
  assert restored.model.moe.mosaic_weight_grad == 'triton'
  del old['model']['init_truncation']  # shapes only the initial weights
  path.write_text(json.dumps(old))
  assert config_lib.load_json(path).model.init_truncation == 0.0


def test_a_run_saved_before_rope_scaling_loads_without_it(tmp_path):
  path = tmp_path / 'config.json'
  config_lib.save(config_lib.load('configs/dense.py:tiny'), path)
  old = json.loads(path.read_text())
  del old['model']['rope_scaling']  # added for Llama 3.1's; older runs computed none
  path.write_text(json.dumps(old))
  assert config_lib.load_json(path).model.rope_scaling.type == 'none'


@pytest.mark.parametrize('key', ['qkv_bias', 'qk_norm'])  # added for Qwen2's and Qwen3's
@pytest.mark.parametrize('spec', ['configs/dense.py:tiny', 'configs/moe.py:tiny',
                                  'configs/megabyte.py:tiny'])
def test_a_run_saved_before_qkv_bias_or_qk_norm_loads_without_them(tmp_path, spec, key):
  path = tmp_path / 'config.json'
  config_lib.save(config_lib.load(spec), path)
  old = json.loads(path.read_text())
  del old['model'][key]  # older runs had none
  path.write_text(json.dumps(old))
  assert config_lib.load_json(path).model[key] is False
  old['model'][key] = 'yes'  # hand-edited
  path.write_text(json.dumps(old))
  with pytest.raises(config_lib.ConfigError,
                     match=f"model.{key}='yes' must be one of True, False"):
    config_lib.load_json(path)


def test_an_ultramem_run_saved_before_its_kernel_and_query_keys_resumes(tmp_path):
  path = tmp_path / 'config.json'
  config_lib.save(config_lib.load('configs/ultramem.py:tiny'), path)
  old = json.loads(path.read_text())
  for key in ('lookup_impl', 'lookup_scatter', 'table_split', 'heads_per_query',
              'top_k_chunk'):
    del old['model']['ultramem'][key]  # added after the first UltraMem runs
  path.write_text(json.dumps(old))
  u = config_lib.load_json(path).model.ultramem
  assert (u.lookup_impl, u.lookup_scatter, u.table_split, u.heads_per_query,
          u.top_k_chunk) == ('auto', 'sorted', 'rows', 1, 0)


def test_an_ultramem_run_saved_before_the_shared_permutation_keeps_each_layer_s_own(tmp_path):
  """Its memory layers were trained through permutations drawn from their indices: a new
  run's shared one would read other values for the same keys."""
  path = tmp_path / 'config.json'
  config_lib.save(config_lib.load('configs/ultramem.py:tiny'), path)
  old = json.loads(path.read_text())
  del old['model']['ultramem']['permutation']
  path.write_text(json.dumps(old))
  cfg = config_lib.load_json(path)
  assert cfg.model.ultramem.permutation == 'per_layer'
  permutations = lambda cfg: [side.memory.permutation for side in models.build(
      cfg.model, rngs=nnx.Rngs(0)).side_layers]
  first, second = permutations(cfg)
  assert first != second and first == permutations(config_lib.load('configs/ultramem.py:tiny'))[1]
  # Resumed or evaluated with a config that says otherwise (the shipped preset's 'shared'):
  # refused, since no checkpoint array holds the permutation to catch it.
  with pytest.raises(WorkdirError, match=(
      r"trained with model.ultramem.permutation='per_layer', and this config says 'shared', "
      r'which would look their values up elsewhere; add '
      r'--config.model.ultramem.permutation=per_layer')):
    check_same_model(path, config_lib.load('configs/ultramem.py:tiny'))
  check_same_model(path, config_lib.load('configs/ultramem.py:tiny',
                                         ['model.ultramem.permutation=per_layer']))


@pytest.mark.parametrize('spec, section, key', [
    ('configs/dense.py:tiny', ('model',), 'tie_embeddings'),
    ('configs/moe.py:tiny', ('model', 'moe'), 'renormalize'),
    ('configs/ultramem.py:tiny', ('model', 'ultramem'), 'num_cores'),
    ('configs/ultramem.py:tiny', ('model', 'ultramem'), 'rank_by_magnitude'),
    ('configs/megabyte.py:tiny', ('data',), 'tokenizer'),
])
def test_a_saved_config_lacking_a_key_the_model_reads_is_one_line(tmp_path, spec, section, key):
  # Before: these loaded (or raised AttributeError) and the model build failed with a traceback.
  path = tmp_path / 'config.json'
  config_lib.save(config_lib.load(spec), path)
  old = json.loads(path.read_text())
  parent = old
  for name in section:
    parent = parent[name]
  del parent[key]
  path.write_text(json.dumps(old))
  assert error_of(config_lib.load_json, path) == (
      f"config error: {path}: missing key '{'.'.join((*section, key))}' (an older or edited "
      'saved config)')


def test_a_megabyte_head_is_tied_and_runs_saved_saying_otherwise_still_load(tmp_path):
  # The head was always the local byte embedding's; configs said False until 2026-12-03.
  assert config_lib.load('configs/megabyte.py:tiny').model.tie_embeddings
  assert 'a MEGABYTE head is always tied' in error_of(
      config_lib.load, 'configs/megabyte.py:tiny', ['model.tie_embeddings=false'])
  path = tmp_path / 'config.json'
  config_lib.save(config_lib.load('configs/megabyte.py:tiny'), path)
  old = json.loads(path.read_text())
  old['model']['tie_embeddings'] = False
  path.write_text(json.dumps(old))
  assert config_lib.load_json(path).model.tie_embeddings


def test_hash_depends_on_values_only():
  assert config_lib.config_hash(tiny()) == config_lib.config_hash(tiny())
  assert config_lib.config_hash(tiny()) != config_lib.config_hash(tiny('train.seed=1'))


@pytest.mark.parametrize('family', ['dense', 'moe', 'ultramem', 'megabyte'])
def test_a_config_file_without_a_preset_gives_its_151m_preset(family):
  default = config_lib.to_dict(config_lib.load(f'configs/{family}.py'))
  assert default['model']['family'] == family
  if family != 'dense':  # dense's defaults are its 151m shape, with the base run settings
    assert default == config_lib.to_dict(config_lib.load(f'configs/{family}.py:151m'))


def test_command_line_overrides_take_both_flag_forms():
  from jaxarch.cli import split_overrides  # pylint: disable=g-import-not-at-top
  overrides, rest = split_overrides(['train', '--config=configs/dense.py:tiny',
                                     '--config.train.steps', '3', '--config.mesh.ici.data',
                                     '-1', '--config.model.remat=full', '--workdir=w'])
  assert overrides == ['--config.train.steps=3', '--config.mesh.ici.data=-1',
                       '--config.model.remat=full']
  assert rest == ['train', '--config=configs/dense.py:tiny', '--workdir=w']


@pytest.mark.parametrize('source, spec, message', [
    ('def get_config(arg=None)\n  return 1\n', 'c.py',
     "c.py:1: expected ':' (def get_config(arg=None))"),
    ('PRESETS = {}\ndef get_config(arg):\n  return PRESETS[arg]\n', 'c.py:big',
     "c.py:3: get_config('big') raised KeyError: 'big'"),
    ('x = undefined_name\n', 'c.py', "c.py:1: importing it raised NameError: name"),
])
def test_a_broken_config_file_is_one_line_at_its_line(tmp_path, source, spec, message):
  (tmp_path / 'c.py').write_text(source)
  assert error_of(config_lib.load, f'{tmp_path}/{spec}').startswith(
      f'config error: {tmp_path}/{message}')


def test_a_config_file_rewritten_within_a_second_is_read_anew(tmp_path, monkeypatch):
  """Python's bytecode cache keys a file by its mtime in whole seconds and its size: a
  sweep file a script rewrote at once, to the same length, ran its old code."""
  monkeypatch.setattr(sys, 'dont_write_bytecode', False)  # as outside this test setup
  path = tmp_path / 'sweep.py'
  for budget in ('1e17', '3e17'):
    path.write_text(f'def get_sweep(arg=None):\n  return [{budget}]\n')
    module = config_lib._import_file(path)  # pylint: disable=protected-access
    assert module.get_sweep() == [float(budget)]
  assert not (tmp_path / '__pycache__').exists()


def test_sliding_window_settings_are_checked_in_one_line(tmp_path):
  assert tiny().model.sliding_window is None and tiny().model.attention_pattern == ('local',)
  for overrides, message in [
      (['model.sliding_window=0'], 'model.sliding_window=0 must be'),
      (["model.attention_pattern=('local', 'near')"],
       "model.attention_pattern=('local', 'near') must be a non-empty tuple of 'local'"),
      (['model.attention_pattern=()'], 'model.attention_pattern=() must be')]:
    assert error_of(tiny, *overrides).startswith(f'config error: {message}'), overrides
  assert error_of(config_lib.load, 'configs/megabyte.py:tiny', ['model.sliding_window=64']) == (
      "config error: model.sliding_window=64: MEGABYTE's global model attends over patches; "
      'unset it')
  (tmp_path / 'base').mkdir()  # BiTA's draft trees attend without one: its base neither
  config_lib.save(tiny('model.sliding_window=8'), tmp_path / 'base' / 'config.json')
  assert error_of(config_lib.load, 'configs/bita.py:tiny', [
      f'model.bita.base_workdir={tmp_path / "base"}', 'data.source=distilled:/data']) == (
      f"config error: model.bita.base_workdir='{tmp_path / 'base'}': it attends through a "
      'sliding window (model.sliding_window=8), which BiTA cannot train over (its draft trees '
      'attend without one)')
  path = tmp_path / 'config.json'  # a run saved before the keys: no window
  config_lib.save(tiny('model.sliding_window=8'), path)
  old = json.loads(path.read_text())
  del old['model']['sliding_window'], old['model']['attention_pattern']
  path.write_text(json.dumps(old))
  cfg = config_lib.load_json(path)
  assert (cfg.model.sliding_window, cfg.model.attention_pattern) == (None, ('local',))


def test_gemma_keys_are_checked_in_one_line_and_runs_saved_before_them_load(tmp_path):
  assert error_of(tiny, 'model.mlp_activation=relu') == (
      "config error: model.mlp_activation='relu' must be one of silu, gelu_tanh")
  assert error_of(tiny, 'model.local_rope_theta=100.0') == (
      'config error: model.local_rope_theta=100.0 turns the sliding-window blocks, and '
      'model.sliding_window is unset; set it or unset local_rope_theta')
  assert error_of(tiny, 'model.sliding_window=4', 'model.local_rope_theta=-1.0').startswith(
      'config error: model.local_rope_theta=-1.0 must be > 0')
  assert error_of(config_lib.load, 'configs/moe.py:tiny', ['model.mlp_activation=gelu_tanh']) == (
      "config error: model.mlp_activation='gelu_tanh': MoE experts are SwiGLUs; use 'silu' "
      "with 'moe' blocks")
  assert error_of(config_lib.load, 'configs/megabyte.py:tiny', ['model.embed_scale=True']) == (
      'config error: model.embed_scale=True: MEGABYTE embeds patches of bytes; unset it')
  keys = ('post_norms', 'embed_scale', 'mlp_activation', 'local_rope_theta')
  for spec in ('configs/dense.py:tiny', 'configs/moe.py:tiny', 'configs/megabyte.py:tiny'):
    path = tmp_path / 'config.json'
    config_lib.save(config_lib.load(spec), path)
    old = json.loads(path.read_text())
    for key in keys:
      del old['model'][key]
    path.write_text(json.dumps(old))
    cfg = config_lib.load_json(path)
    assert tuple(cfg.model[key] for key in keys) == (False, False, 'silu', None), spec
    old['model']['post_norms'] = 'yes'  # hand-edited
    path.write_text(json.dumps(old))
    assert error_of(config_lib.load_json, path) == (
        "config error: model.post_norms='yes' must be one of True, False")


def test_a_hugging_face_config_is_not_read_as_a_run_s(tmp_path):
  """`jaxarch generate --workdir=` an `export --format=hf` directory: its config.json is
  transformers'; the message says how to make a run of it."""
  (tmp_path / 'config.json').write_text(json.dumps(
      {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_size': 64}))
  with pytest.raises(config_lib.ConfigError, match=(
      rf"is a Hugging Face config \(model_type 'llama'\), not a jaxarch run's: make a run of "
      rf'its checkpoint with `jaxarch import --hf={tmp_path} --workdir=NEW_DIR`')):
    config_lib.load_json(tmp_path / 'config.json')
