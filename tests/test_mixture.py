"""Data mixtures (`data.source='NAME=SOURCE,WEIGHT;...'` mixes whole packed rows by weight),
and `jaxarch prepare`, which says what each source holds and how much of it a run reads."""

import json
import math
import re
import types

import numpy as np
import pytest

from conftest import mesh_config, tiny_config
from jaxarch import cli
from jaxarch import config as config_lib
from jaxarch import data
from jaxarch.config import ConfigError, data_mixture
from jaxarch.data import pipeline
from jaxarch.data import summary
from jaxarch.infer import distill
from jaxarch.train import evaluate, train
from jaxarch.train import trainer
from jaxarch.train.metrics import read_metrics
from jaxarch.train.step import summarize_eval, summarize_mixture_eval

A, B = ord('A'), ord('B')


def _letter_corpus(directory, letter, lengths):
  """Documents of one marker letter: every row a source packs is of that letter alone."""
  directory.mkdir(parents=True)
  for i, n in enumerate(lengths):
    (directory / f'{i:02d}.txt').write_text(letter * n)


@pytest.fixture
def mixture(tmp_path):
  """A data config mixing short 'A' documents (a quarter of the tokens) with long 'B'
  ones: by documents, A would be most of the mixture."""
  rng = np.random.default_rng(0)
  _letter_corpus(tmp_path / 'a', 'A', rng.integers(5, 60, 40))
  _letter_corpus(tmp_path / 'b', 'B', rng.integers(200, 900, 40))
  cfg = tiny_config(str(tmp_path / 'data')).data
  cfg.source = f'a=files:{tmp_path}/a/*.txt,1;b=files:{tmp_path}/b/*.txt,3'
  cfg.seq_len = 16
  cfg.validation_fraction = 0.25
  return cfg


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _rows_of_a(batch):
  """Per row: True if it packs 'A' documents, False if 'B' ones (never both)."""
  has_a = (batch['inputs'] == A).any(1)
  assert not (has_a & (batch['inputs'] == B).any(1)).any()
  return has_a


# The data.source syntax.


def test_a_mixture_names_its_sources_and_normalises_their_weights():
  mix = data_mixture('web=files:/d/year=2024/*.jsonl,3; default,1')
  assert [(c.name, c.source, c.weight) for c in mix] == [
      ('web', 'files:/d/year=2024/*.jsonl', 0.75), ('1', 'default', 0.25)]
  # The weight is after the last comma: a path may hold commas.
  assert [c.source for c in data_mixture('files:a,b/*.txt,1;tfds:x,1')] == [
      'files:a,b/*.txt', 'tfds:x']
  assert data_mixture('files:/data/*.txt') is None


def test_a_mixture_drops_spaces_and_takes_any_finite_weights():
  mix = data_mixture(' web = files:/x/*.txt , 1e308 ; tfds:lm1b ,1e308 ')
  assert [(c.name, c.source, c.weight) for c in mix] == [
      ('web', 'files:/x/*.txt', 0.5), ('1', 'tfds:lm1b', 0.5)]
  # The same mixture spelled otherwise, or other weights or names: a position holds.
  assert config_lib.reweighted('a=default,1;tfds:x,3', 'a=default , 2; b=tfds:x,6')
  assert not config_lib.reweighted('default,1;tfds:x,1', 'tfds:x,1;default,1')
  # Eval sets (weight 0) added or dropped: the same sources are trained on.
  assert config_lib.reweighted('default', 'default,1;wiki=tfds:x,0')
  assert config_lib.reweighted('a=default,1;tfds:x,1', 'tfds:y,0;a=default,1;tfds:x,1')
  assert not config_lib.reweighted('default,1;tfds:x,0', 'default,1;tfds:x,1')


@pytest.mark.parametrize('source, alone', [
    ('default,1', "give the source alone, 'default'"),
    ('a=files:/x/*.jsonl,1,body', "alone, 'files:/x/*.jsonl' and --config.data.text_key=body"),
])
def test_one_source_with_a_weight_says_to_give_it_alone(source, alone):
  with pytest.raises(ConfigError, match='is one source with a weight or a name.*' +
                     re.escape(alone)):
    config_lib.load('configs/dense.py:tiny', [f'data.source={source}'])


def test_a_glob_ending_in_a_weight_says_that_weights_are_for_mixtures(tmp_path):
  cfg = tiny_config(str(tmp_path / 'data')).data
  cfg.source = f'files:{tmp_path}/*.jsonl,1'
  with pytest.raises(ConfigError, match="no files match .*a weight belongs to a mixture"):
    data.open_source(cfg, 'train')


def test_a_mixture_of_weights_zero_is_evaluated_but_not_trained_on(mixture):
  untrained = mixture.copy_and_resolve_references()
  untrained.source = mixture.source.replace(',1;', ',0;').replace(',3', ',0')
  assert [c.weight for c in data_mixture(untrained.source)] == [0.0, 0.0]
  with pytest.raises(ConfigError, match='trains on none of its sources: give one a weight'):
    data.make_train_dataset(untrained, seed=0, global_batch_size=8)
  batches = data.make_eval_dataset(untrained, batch_size=4, num_batches=2)
  assert set(batches.components) == {'a', 'b'} and len(list(batches)) == 4
  totals = {'a': {'nll': 3.0, 'tokens': 1.0, 'bytes': 1.0}}
  assert summarize_mixture_eval(totals, {'a': 0.0}) == {  # no mixture's eval_loss
      'eval_loss/a': 3.0, 'eval_bpb/a': pytest.approx(3 / math.log(2)), 'eval_tokens/a': 1}


def test_a_source_of_a_mixture_may_name_its_own_text_key(tmp_path, mixture):
  (tmp_path / 'code').mkdir()
  (tmp_path / 'code' / 'stack.jsonl').write_text(''.join(
      json.dumps({'content': 'C' * (20 + i), 'text': 'never read'}) + '\n' for i in range(40)))
  a = data_mixture(mixture.source)[0].source
  code = mixture.copy_and_resolve_references()
  code.source = f'a={a},1;code=files:{tmp_path}/code/*.jsonl,1,content'
  assert data_mixture(code.source)[1].text_key == 'content'
  batches = _take(iter(data.make_train_dataset(code, seed=0, global_batch_size=8)), 20)
  inputs = np.concatenate([b['inputs'] for b in batches])
  assert (inputs == ord('C')).any() and not (inputs == ord('v')).any()
  assert (inputs == A).any()  # the other source keeps data.text_key (unread by .txt files)
  # A key the file lacks: the error names the source and how to give it its own key, not
  # data.text_key, which the other sources share.
  wrong = code.copy_and_resolve_references()
  wrong.source = code.source.replace(',content', ',body')
  with pytest.raises(ConfigError, match=(
      r"has no key 'body' .*give data.source component 'code' its own key after its "
      r"weight: 'code=SOURCE,WEIGHT,KEY'")):
    data.make_train_dataset(wrong, seed=0, global_batch_size=8)
  # A key given to plain text files, which have none, is a slip: one line naming it.
  keyed = code.copy_and_resolve_references()
  keyed.source = f'a={a},1,content;code=files:{tmp_path}/code/*.jsonl,1,content'
  with pytest.raises(ConfigError, match=(
      r"the text key of 'a', 'content' is not read: .* plain text files, which have no keys; "
      r'drop ",content" after its weight')):
    data.make_train_dataset(keyed, seed=0, global_batch_size=8)


@pytest.mark.parametrize('source, why', [
    ('default;files:/x/*.txt,1', r'component 1 .* must end in ",WEIGHT"'),
    ('default,1;files:/x/*.txt,-1', r'component 2 .* must end in ",WEIGHT"'),
    ('default,1;files:/x/*.txt,nan', r'component 2 .* must end in ",WEIGHT"'),
    ('default,1;', r'component 2 .* must end in ",WEIGHT"'),
    ('default,1;distilled:/d,1', r"component 2 .*'distilled:/d' must be 'default'"),
    ('default,1;wiki,1', r"component 2 .*'wiki' must be 'default'"),
    ('x=default,1;x=tfds:wiki,1', r"component 2 .*the name 'x' is taken"),
    ('0=default,1;tfds:wiki,1', r"component 1 .*the name '0' must start with a letter"),
    ('my web=default,1;tfds:wiki,1', r"the name 'my web' must start with a letter"),
])
def test_a_wrong_mixture_is_one_line_naming_its_component(source, why):
  with pytest.raises(ConfigError, match=why):
    data_mixture(source)
  # At load time too: a sweep's runs fail before any starts.
  with pytest.raises(ConfigError, match=why):
    config_lib.load('configs/dense.py:tiny', [f'data.source={source}'])


# Training batches.


def test_a_mixture_gives_each_source_its_share_of_the_tokens_in_every_batch(mixture):
  batches = _take(iter(data.make_train_dataset(mixture, seed=0, global_batch_size=8)), 300)
  tokens = np.array([[(b['inputs'] == letter).sum() for letter in (A, B)] for b in batches])
  share = tokens[:, 0].sum() / tokens.sum()
  assert share == pytest.approx(0.25, abs=0.005)  # of tokens, not of documents
  rows = np.array([_rows_of_a(b).sum() for b in batches])
  assert set(rows) <= {1, 2, 3} and np.mean(rows == 2) > 0.6  # 2 of 8 rows, give or take one
  assert all(b['segment_ids'].all() for b in batches)  # whole rows, packed full


def _single(cfg, name):
  """The data config of the mixture's source `name` alone."""
  return {c.name: single for c, single in data.sources.mixture_configs(cfg)}[name]


def test_the_mixtures_pick_of_rows_is_a_low_discrepancy_sequence():
  cumulative = np.cumsum([0.1, 0.6, 0.3])
  picks = np.array([pipeline.mixture_pick(g, cumulative, seed=5) for g in range(20_000)])
  for window in (100, 1000, 20_000):  # every window, not only the whole
    counts = np.array([np.bincount(picks[i:i + window], minlength=3)
                       for i in range(0, len(picks) - window + 1, window)])
    assert np.abs(counts - window * np.array([0.1, 0.6, 0.3])).max() <= 3
  other = [pipeline.mixture_pick(g, cumulative, seed=6) for g in range(100)]
  assert other != picks[:100].tolist()  # the seed moves the sequence


def test_row_r_of_step_t_is_of_the_source_mixture_pick_gives_global_row_t_b_plus_r(mixture):
  """The batch is the pick sequence read in global row order: stream r's row t is global
  row t·B + r. Numbering a stream's rows t + r instead keeps each batch's share but makes
  step t+1 repeat step t's picks shifted by one row (and the sum of the low-discrepancy
  windows no longer holds across steps)."""
  batches = _take(iter(data.make_train_dataset(mixture, seed=3, global_batch_size=8)), 6)
  cumulative = np.cumsum([0.25, 0.75])  # a: 1, b: 3
  for t, batch in enumerate(batches):
    picks = [pipeline.mixture_pick(t * 8 + r, cumulative, seed=3) for r in range(8)]
    np.testing.assert_array_equal(_rows_of_a(batch), np.array(picks) == 0,
                                  err_msg=f'step {t}')


def test_each_source_of_a_mixture_is_shuffled_with_its_own_seed(tmp_path):
  """Two sources of as many documents, of the same lengths, shuffled with one seed would
  read their documents in the same order (their rows' segments would line up); each has
  its own seed (the run's seed + its index), so their orders are independent."""
  lengths = np.random.default_rng(1).integers(3, 40, 24)
  _letter_corpus(tmp_path / 'a', 'A', lengths)
  _letter_corpus(tmp_path / 'b', 'B', lengths)
  cfg = tiny_config(str(tmp_path / 'data')).data
  cfg.source = f'a=files:{tmp_path}/a/*.txt,1;b=files:{tmp_path}/b/*.txt,1'
  cfg.seq_len = 16
  cfg.validation_fraction = 0.0
  it = iter(data.make_train_dataset(cfg, seed=0, global_batch_size=2, packing_streams=1))
  rows = [{k: v[i] for k, v in batch.items()} for batch in _take(it, 16) for i in range(2)]
  segments = {letter: np.concatenate([r['segment_ids'] for r in rows
                                      if (r['inputs'] == letter).any()])
              for letter in (A, B)}
  n = min(len(s) for s in segments.values())
  assert n >= 4 * 16
  assert not np.array_equal(segments[A][:n], segments[B][:n])


@pytest.mark.parametrize('saved_by, resumed_on', [(1, 1), (2, 1), (1, 4)])
def test_a_mixture_position_resumes_exactly_on_any_number_of_processes(mixture, saved_by,
                                                                       resumed_on):
  make = lambda index, count: iter(data.make_train_dataset(
      mixture, seed=0, global_batch_size=8, process_index=index, process_count=count))
  want = _global_batches([make(0, 1)], 8)
  before = [make(p, saved_by) for p in range(saved_by)]
  got = _global_batches(before, 4)
  states = [json.loads(json.dumps(it.get_state())) for it in before]  # as Orbax saves them
  after = [make(p, resumed_on) for p in range(resumed_on)]
  for it in after:
    if resumed_on == 1 and saved_by == 1:
      it.set_state(states[0])
    else:
      it.set_state_of_processes(states)
  got += _global_batches(after, 4)
  for expected, batch in zip(want, got):
    for key in expected:
      np.testing.assert_array_equal(batch[key], expected[key])


def _global_batches(iterators, n):
  return [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
          for parts in zip(*[_take(it, n) for it in iterators])]


def _source_rows(batches, letter):
  """Per stream (batch row), the rows it packed of the source of `letter`, in order."""
  return [[b['inputs'][i].tobytes() for b in batches if (b['inputs'][i] == letter).any()]
          for i in range(len(batches[0]['inputs']))]


def test_new_weights_keep_each_sources_position_and_new_sources_start_afresh(mixture, caplog):
  it = iter(data.make_train_dataset(mixture, seed=0, global_batch_size=8))
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  old_weights = _take(it, 30)  # how the run would have gone on
  annealed = mixture.copy_and_resolve_references()
  a, b = (c.source for c in data_mixture(mixture.source))
  annealed.source = f'short={a},3;{b},1'  # renamed too
  assert config_lib.reweighted(mixture.source, annealed.source)
  resumed = iter(data.make_train_dataset(annealed, seed=0, global_batch_size=8))
  resumed.set_state(state)
  new_weights = _take(resumed, 30)
  assert 'another data layout' not in caplog.text
  rows_of_a = np.mean([_rows_of_a(b).mean() for b in new_weights])
  assert 0.65 < rows_of_a < 0.85  # now 3:1 of the rows
  # Each stream's rows of each source go on from where they were, as under the old
  # weights, only interleaved otherwise.
  for letter in (A, B):
    for before, after in zip(_source_rows(old_weights, letter),
                             _source_rows(new_weights, letter)):
      n = min(len(before), len(after))
      assert n > 0 and before[:n] == after[:n]
  # Other sources (here one more) are another data layout: the data start afresh.
  other = mixture.copy_and_resolve_references()
  other.source = mixture.source + f';{mixture.source.split(";")[0][2:]}'
  assert not config_lib.reweighted(mixture.source, other.source)
  fresh = iter(data.make_train_dataset(other, seed=0, global_batch_size=8))
  first = next(iter(data.make_train_dataset(other, seed=0, global_batch_size=8)))
  fresh.set_state(state)
  assert 'another data layout (source' in caplog.text
  np.testing.assert_array_equal(next(fresh)['inputs'], first['inputs'])


def test_a_source_of_weight_zero_is_evaluated_only(mixture):
  a, b = (c.source for c in data_mixture(mixture.source))
  with_eval = mixture.copy_and_resolve_references()
  with_eval.source = f'b={b},0;a={a},1'
  alone = _single(mixture, 'a')
  make = lambda cfg: iter(data.make_train_dataset(cfg, seed=0, global_batch_size=8))
  # Trained on exactly the batches of its one trained source, and positions of either
  # resume the other: an eval set can be added to a run, or dropped.
  want, got = make(alone), make(with_eval)
  for expected, batch in zip(_take(want, 12), _take(got, 12)):
    for key in expected:
      np.testing.assert_array_equal(batch[key], expected[key])
  for saved, resumed in ((want, make(with_eval)), (got, make(alone))):
    resumed.set_state(json.loads(json.dumps(saved.get_state())))
    np.testing.assert_array_equal(next(resumed)['inputs'], next(saved)['inputs'])
  # Evaluated on both; the mixture's eval_loss is the trained source's.
  batches = data.make_eval_dataset(with_eval, batch_size=4, num_batches=3)
  assert batches.weights == {'b': 0.0, 'a': 1.0} and len(list(batches.components['b'])) == 3
  totals = {'a': {'nll': 30.0, 'tokens': 10.0, 'bytes': 20.0},
            'b': {'nll': 200.0, 'tokens': 100.0, 'bytes': 100.0}}
  summary = summarize_mixture_eval(totals, batches.weights)
  assert summary['eval_loss'] == summary['eval_loss/a'] == 3.0
  assert summary['eval_loss/b'] == 2.0
  # Distilled prompts come from the trained source only.
  prompts = distill.sample_prompts(with_eval, 'train', 50, 8, seed=0,
                                   tokenizer=data.get_tokenizer('bytes'))
  assert prompts and all(B not in p for p in prompts)


def test_threads_make_a_mixtures_batches_and_positions_as_one_thread_does(tmp_path, mixture):
  from test_data import _gpt2_style_tokenizer  # pylint: disable=g-import-not-at-top
  mixture.tokenizer = _gpt2_style_tokenizer(tmp_path / 'tokenizer.json')  # threads tokenize
  make = lambda threads: iter(data.make_train_dataset(mixture, seed=0, global_batch_size=8,
                                                      num_threads=threads))
  inline, threaded = make(0), make(3)
  for want, got in zip(_take(inline, 6), _take(threaded, 6)):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert threaded.get_state() == inline.get_state()
  resumed = make(0)
  resumed.set_state(json.loads(json.dumps(threaded.get_state())))
  np.testing.assert_array_equal(next(resumed)['inputs'], next(threaded)['inputs'])
  for it in (inline, threaded, resumed):
    it.close()


def test_a_mixtures_epoch_is_that_of_its_source_read_furthest(mixture):
  it = iter(data.make_train_dataset(mixture, seed=0, global_batch_size=8))
  num_a = len(data.open_source(_single(mixture, 'a'), 'train'))
  started = 0
  for _ in range(60):
    batch = next(it)
    started += int(((batch['inputs'] == data.ByteTokenizer.eod_id)
                    & _rows_of_a(batch)[:, None]).sum())  # each A document starts with eod
    # The short A documents repeat first; the count lags by a few documents a stream.
    assert abs(it.epoch() * num_a - started) <= 3 * 8
  assert it.epoch() > 1


# Evaluation.


def test_mixture_eval_batches_are_each_sources_own(mixture, caplog):
  batches = data.make_eval_dataset(mixture, batch_size=4, num_batches=50)
  assert isinstance(batches, data.MixtureEvalBatches)
  assert batches.weights == {'a': 0.25, 'b': 0.75}
  for name, letter in (('a', A), ('b', B)):
    alone = list(data.make_eval_dataset(_single(mixture, name), batch_size=4, num_batches=50))
    mine = list(batches.components[name])
    assert len(mine) == len(alone) > 0 and (mine[0]['inputs'] == letter).any()
    for want, got in zip(alone, mine):
      np.testing.assert_array_equal(got['inputs'], want['inputs'])
  assert len(list(batches)) == sum(len(list(b)) for b in batches.components.values())
  # A source with no validation documents is left out, and said once.
  none_held = mixture.copy_and_resolve_references()
  none_held.validation_fraction = 0.0
  assert not list(data.make_eval_dataset(none_held, batch_size=4, num_batches=5))
  assert "component 'a'" in caplog.text and "component 'b'" in caplog.text


def test_the_mixtures_eval_loss_weighs_each_sources_per_token_loss_by_its_share():
  totals = {'a': {'nll': 30.0, 'tokens': 10.0, 'bytes': 20.0},
            'b': {'nll': 200.0, 'tokens': 100.0, 'bytes': 100.0},
            'c': {'nll': 0.0, 'tokens': 0.0, 'bytes': 0.0}}  # no validation tokens
  summary = summarize_mixture_eval(totals, {'a': 0.2, 'b': 0.6, 'c': 0.2})
  assert summary['eval_loss/a'] == summarize_eval(totals['a'])['eval_loss'] == 3.0
  assert summary['eval_bpb/b'] == pytest.approx(2 / math.log(2))
  assert 'eval_loss/c' not in summary
  # Per token: 0.25·3 + 0.75·2 nats over 0.25·2 + 0.75·1 bytes (c left out, renormalised).
  assert summary['eval_loss'] == pytest.approx(2.25)
  assert summary['eval_bpb'] == pytest.approx(2.25 / math.log(2) / 1.25)


def test_training_on_a_mixture_logs_each_sources_eval_and_evaluates_alike(tmp_path, mixture):
  cfg = mesh_config(tiny_config(mixture.data_dir, **{
      'data.source': mixture.source, 'data.validation_fraction': 0.25, 'train.steps': 6,
      'train.warmup_steps': 1,
      'log.every_steps': 3, 'log.eval_every_steps': 3, 'log.eval_batches': 2,
      'checkpoint.every_steps': 3}), data=2, fsdp=2, tensor=2)
  result = train(cfg, tmp_path / 'run')
  logged = [m for m in read_metrics(tmp_path / 'run') if 'eval_loss' in m]
  assert [m['step'] for m in logged] == [3, 6]
  for m in logged:
    assert {'eval_loss/a', 'eval_loss/b', 'eval_bpb/a', 'eval_bpb/b'} <= set(m)
    # Bytes per token are 1 in both sources: the bpb is the loss weighted 1:3, in bits.
    assert m['eval_loss'] == pytest.approx(0.25 * m['eval_loss/a'] + 0.75 * m['eval_loss/b'])
  again = evaluate(cfg, tmp_path / 'run')
  for key in ('eval_loss', 'eval_bpb/a', 'eval_bpb/b'):
    assert again[key] == pytest.approx(result[key], rel=1e-5)
  # Evaluated on one more set after training: its metrics join, the mixture's stay.
  more = cfg.copy_and_resolve_references()
  more.data.source = f'{mixture.source};more={data_mixture(mixture.source)[0].source},0'
  extended = evaluate(more, tmp_path / 'run')
  assert extended['eval_loss/more'] == pytest.approx(again['eval_loss/a'], rel=1e-6)
  assert extended['eval_loss'] == pytest.approx(again['eval_loss'], rel=1e-6)
  # Resumed with new weights, its data position holds (keeping the best checkpoint is
  # said to rank across the change); with other sources, it does not.
  with cfg.unlocked():
    cfg.data.source = mixture.source.replace(',1', ',2').replace(',3', ',6')  # the same
    assert trainer.data_changes(tmp_path / 'run', cfg) is None
    cfg.checkpoint.keep_best = True
    assert trainer._best_across_weights(tmp_path / 'run', cfg) is None
    b = data_mixture(mixture.source)[1].source
    cfg.data.source = f'{mixture.source};eval_b={b},0'  # an eval set added
    assert trainer.data_changes(tmp_path / 'run', cfg) is None
    assert trainer._best_across_weights(tmp_path / 'run', cfg) is None
    cfg.data.source = mixture.source.replace(',3', ',1')
    assert trainer.data_changes(tmp_path / 'run', cfg) is None
    assert 'keep_best ranks it with the evaluations before' in (
        trainer._best_across_weights(tmp_path / 'run', cfg))
    cfg.data.source = mixture.source.split(';')[1][2:]
    assert trainer.data_changes(tmp_path / 'run', cfg).startswith('data.source a=files:')
    cfg.data.source = ';'.join(reversed(mixture.source.split(';')))
    assert 'in another order: keep their order' in trainer.data_changes(tmp_path / 'run', cfg)


def test_distilled_prompts_come_from_each_source_by_weight(mixture):
  tokenizer = data.get_tokenizer('bytes')
  prompts = distill.sample_prompts(mixture, 'train', 400, 8, seed=0, tokenizer=tokenizer)
  letters = [A if A in p else B for p in prompts]
  assert len(prompts) == 400 and 0.2 < letters.count(A) / 400 < 0.3


# `jaxarch prepare`: each source's size, and the epochs the run reads of it.


def test_prepare_counts_each_source_and_the_epochs_the_run_reads(tmp_path, mixture, capsys,
                                                                monkeypatch):
  monkeypatch.setattr(summary, '_READ', 7)  # documents read a few at a time
  a, b = (c.source for c in data_mixture(mixture.source))
  total = {name: sum(p.stat().st_size for p in (tmp_path / name).glob('*.txt'))
           for name in 'ab'}
  cfg = tiny_config(mixture.data_dir, **{
      'data.source': f'a={a},1;b={b},3;held={a},0', 'data.validation_fraction': 0.25,
      'train.steps': 100})
  rows = summary.summarize(cfg)
  assert [(r['name'], r['weight']) for r in rows] == [('a', 0.25), ('b', 0.75), ('held', 0.0)]
  run_tokens = 100 * cfg.train.batch_size * cfg.data.seq_len
  for row, letter in zip(rows[:2], 'ab'):
    splits = row['train'], row['validation']
    assert sum(s['bytes'] for s in splits) == total[letter]  # every byte, once
    assert sum(s['documents'] for s in splits) == 40
    for split in splits:  # bytes: a token a byte, and a BOS a document
      assert split['tokens'] == split['bytes'] + split['documents']
  assert rows[1]['train_tokens_read'] == round(0.75 * run_tokens)
  assert rows[1]['epochs'] == pytest.approx(0.75 * run_tokens / rows[1]['train']['tokens'])
  # Evaluated only: its validation split alone (a TFDS eval set may have no train split).
  assert 'train' not in rows[2] and 'epochs' not in rows[2]
  assert rows[2]['validation'] == rows[0]['validation']
  # Tokens as training packs the documents: without a BOS, or padded to a patch size.
  for overrides in ({'data.add_bos': False}, {'data.pack_align': 8}):
    packed = tiny_config(mixture.data_dir, **{
        'data.source': f'a={a},1;b={b},3', 'data.validation_fraction': 0.25, **overrides})
    tokenize = pipeline.tokenize(packed.data, data.get_tokenizer('bytes'))
    for row, (_, single) in zip(summary.summarize(packed),
                                data.sources.mixture_configs(packed.data)):
      documents = data.open_source(single, 'train')
      assert row['train']['tokens'] == sum(  # every document is in the sample here
          len(tokenize.map(documents[i])['inputs']) for i in range(len(documents)))
  # From the command line: the table, and the JSON.
  out = tmp_path / 'summary.json'
  assert cli.main(['prepare', '--config=configs/dense.py:tiny', f'--out={out}',
                   f'--data_dir={mixture.data_dir}',
                   f'--config.data.source=a={a},1;b={b},3;held={a},0',
                   '--config.data.validation_fraction=0.25']) == 0
  printed = capsys.readouterr().out
  assert 'held: files:' in printed and 'eval only' in printed
  assert [r['name'] for r in json.loads(out.read_text())] == ['a', 'b', 'held']
  assert cli.main(['prepare', '--config=configs/dense.py:tiny',
                   f'--config.data.source=distilled:{tmp_path}']) == 2
  assert 'written by `jaxarch distill`' in capsys.readouterr().err
  # Errors are one line, and a bad --out is said before anything is prepared.
  assert cli.main(['prepare', '--config=configs/dense.py:tiny',
                   f'--config.data.source=files:{tmp_path}/none/*.txt']) == 2
  err = capsys.readouterr().err
  assert err.startswith('jaxarch: config error: ') and err.count('config error') == 1
  assert cli.main(['prepare', '--config=configs/dense.py:tiny', f'--out={tmp_path}/no/x.json',
                   f'--data_dir={tmp_path}/unmade']) == 2
  assert 'cannot be written' in capsys.readouterr().err
  assert not (tmp_path / 'unmade').exists()
  from test_data import _gpt2_style_tokenizer  # pylint: disable=g-import-not-at-top
  assert cli.main(['prepare', '--config=configs/dense.py:tiny', f'--data_dir={tmp_path}/unmade',
                   f'--config.data.tokenizer={_gpt2_style_tokenizer(tmp_path / "t.json")}',
                   '--config.model.vocab_size=128']) == 2  # what train would refuse
  assert 'set --config.model.vocab_size=384' in capsys.readouterr().err
  assert not (tmp_path / 'unmade').exists()


def test_a_mixture_whose_trained_sources_have_no_validation_says_so(tmp_path, mixture,
                                                                    caplog):
  _letter_corpus(tmp_path / 'one', 'C', [300])  # one file: it trains, none validates
  b = data_mixture(mixture.source)[1].source
  only_eval = mixture.copy_and_resolve_references()
  only_eval.source = f'c=files:{tmp_path}/one/*.txt,1;b={b},0'
  batches = data.make_eval_dataset(only_eval, batch_size=4, num_batches=2)
  assert trainer.no_validation_data(types.SimpleNamespace(data=only_eval), batches) is None
  assert 'none of the sources data.source trains on (c) has validation data' in (
      trainer.no_trained_validation(batches))
  assert trainer.no_trained_validation(
      data.make_eval_dataset(mixture, batch_size=4, num_batches=2)) is None
  # `jaxarch prepare` says so too (the warning is said once a process: again here).
  pipeline.warn_no_validation.cache_clear()
  caplog.clear()
  summary.summarize(tiny_config(mixture.data_dir, **{'data.source': only_eval.source,
                                                     'data.validation_fraction': 0.25}))
  assert "component 'c' (files:" in caplog.text and 'has no validation documents' in caplog.text


def test_a_text_key_given_to_the_source_keeps_the_position(tmp_path, caplog):
  """One source read by data.text_key=content, then the same source with ',1,content' in a
  mixture that adds an eval set: the same documents, so the position holds; another key
  for it does not."""
  (tmp_path / 'c').mkdir()
  (tmp_path / 'c' / 'x.jsonl').write_text(''.join(
      json.dumps({'content': 'C' * n}) + '\n' for n in range(5, 65)))
  cfg = tiny_config(str(tmp_path / 'data')).data
  cfg.source, cfg.text_key, cfg.seq_len = f'files:{tmp_path}/c/*.jsonl', 'content', 16
  it = iter(data.make_train_dataset(cfg, seed=0, global_batch_size=4))
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  want = _take(it, 2)
  it.close()
  mixed = cfg.copy_and_resolve_references()
  mixed.source, mixed.text_key = f'c=files:{tmp_path}/c/*.jsonl,1,content;ev=default,0', None
  resumed = iter(data.make_train_dataset(mixed, seed=0, global_batch_size=4))
  resumed.set_state(state)
  got = _take(resumed, 2)
  resumed.close()
  assert 'another data layout' not in caplog.text
  for w, g in zip(want, got):
    np.testing.assert_array_equal(w['inputs'], g['inputs'])
