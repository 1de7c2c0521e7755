"""Chat prompts: a template rendered as transformers renders it, read with its special
tokens and no BOS added, and `jaxarch generate --chat` on an imported instruct model."""

import datetime
import json
import sys

import pytest
from flax import nnx

from conftest import family_config
from jaxarch import cli, infer, models
from jaxarch import config as config_lib
from jaxarch.data import get_tokenizer
from jaxarch.export import write_hf
from jaxarch.export.hf_tokenizer import byte_tokenizer_json
from jaxarch.infer import chat
from jaxarch.train.pretrained import load_model

pytest.importorskip('tokenizers')
pytest.importorskip('jinja2')

# A Qwen's and a Llama 3's chat tokens, after the byte tokenizer's 258 ids.
SPECIALS = ('<|im_start|>', '<|im_end|>', '<|begin_of_text|>', '<|start_header_id|>',
            '<|end_header_id|>', '<|eot_id|>')
IM_START, IM_END, BEGIN, START_HEADER, END_HEADER, EOT = range(258, 258 + len(SPECIALS))

# Qwen2.5-style, written with block tags on lines of their own: trim_blocks drops the
# newline after each tag, lstrip_blocks the indentation before it.
QWEN = """{% if messages[0]['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{% for message in messages %}
  {% if message['role'] == 'system' and not loop.first %}
    {{ raise_exception('System role only first') }}
  {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

# Llama 3.1-style: the BOS first, today's date, tools only when some are given.
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{%- if tools is not none %}
    {{- "Tools: " + tools | tojson + "\\n\\n" }}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'
        + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""


def chat_tokenizer(path) -> str:
  """jaxarch's byte tokenizer as a tokenizer.json (ids are bytes) with the chat tokens
  after its ids as added special tokens, as a Qwen's and a Llama 3's have them."""
  tree = byte_tokenizer_json(bos=None)
  for i, text in enumerate(SPECIALS, start=258):
    tree['added_tokens'].append({'id': i, 'content': text, 'single_word': False,
                                 'lstrip': False, 'rstrip': False, 'normalized': False,
                                 'special': True})
  path.write_text(json.dumps(tree))
  return str(path)


def ids(*parts) -> list[int]:
  """The expected ids: a special token's id, or a text's bytes."""
  return [i for part in parts
          for i in ([part] if isinstance(part, int) else list(part.encode()))]


def data_config(tmp_path, template: str, *overrides):
  (tmp_path / 'chat_template.jinja').write_text(template)
  cfg = config_lib.load('configs/dense.py:tiny', [
      f'data.tokenizer={chat_tokenizer(tmp_path / "tokenizer.json")}',
      f'data.chat_template={tmp_path / "chat_template.jinja"}', *overrides])
  return cfg.data, get_tokenizer(cfg.data.tokenizer)


def test_a_qwen_template_gives_its_special_tokens_ids_and_no_bos(tmp_path):
  data_cfg, tokenizer = data_config(tmp_path, QWEN, 'data.add_bos=False')
  default_system = ids(IM_START, 'system\nYou are a helpful assistant.', IM_END, '\n')
  assert chat.chat_prompts(data_cfg, tokenizer, ['hi', 'a <b> & é']) == [
      ids(*default_system, IM_START, 'user\nhi', IM_END, '\n', IM_START, 'assistant\n'),
      ids(*default_system, IM_START, 'user\na <b> & é', IM_END, '\n', IM_START,
          'assistant\n')]
  assert chat.chat_prompts(data_cfg, tokenizer, ['hi'], system='Be brief.') == [
      ids(IM_START, 'system\nBe brief.', IM_END, '\n', IM_START, 'user\nhi', IM_END, '\n',
          IM_START, 'assistant\n')]
  # A document that spells a special token is text, as before.
  assert tokenizer.encode('<|im_start|>hi') == ids('<|im_start|>hi')


def test_a_llama3_template_writes_its_bos_once_and_its_date(tmp_path):
  """The template writes `bos_token` (the run's data.bos_id): the prompt starts with it
  once; tools are None, not undefined (`tools is not none` is false)."""
  data_cfg, tokenizer = data_config(tmp_path, LLAMA3, f'data.bos_id={BEGIN}')
  today = datetime.datetime.now().strftime('%d %b %Y')
  assert chat.chat_prompts(data_cfg, tokenizer, ['hi '], system=' Be brief.') == [
      ids(BEGIN, START_HEADER, 'system', END_HEADER, f'\n\nToday Date: {today}\n\nBe brief.',
          EOT, START_HEADER, 'user', END_HEADER, '\n\nhi', EOT, START_HEADER, 'assistant',
          END_HEADER, '\n\n')]


def test_templates_render_with_transformers_filters_and_globals():
  """tojson leaves HTML characters and non-ASCII alone (Jinja's own escapes them), loop
  controls work, raise_exception raises."""
  messages = [{'role': 'user', 'content': '<é> & "x"'}, {'role': 'assistant', 'content': 'y'}]
  assert chat.render('{{ messages | tojson }}', messages) == json.dumps(messages,
                                                                       ensure_ascii=False)
  assert chat.render('{{ messages[0] | tojson(indent=1) }}', messages) == json.dumps(
      messages[0], ensure_ascii=False, indent=1)
  assert chat.render('{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}'
                     '{{ m.role }}{% endfor %}', messages) == 'user'
  with pytest.raises(Exception, match='^no tools$'):
    chat.render("{{ raise_exception('no tools') }}", messages)


def test_a_generation_block_renders_its_text_as_transformers_does():
  """`{% generation %}` (transformers marks an assistant's reply with it for training
  masks) is its text; the strings are what transformers 5.25 renders."""
  messages = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'},
              {'role': 'user', 'content': 'q'}]
  assert chat.render("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
                     '{{ m.content }}{% endgeneration %}{% else %}<|im_start|>{{ m.content }}'
                     '<|im_end|>{% endif %}{% endfor %}', messages) == (
                         '<|im_start|>hi<|im_end|>yo<|im_start|>q<|im_end|>')
  assert chat.render('{% for m in messages %}{{ m.role }}\n{% generation %}\n{{ m.content }}\n'
                     '{% endgeneration %}\n{% endfor %}', messages) == (
                         'user\nhi\nassistant\nyo\nuser\nq\n')  # blocks trimmed


def test_a_chat_template_under_home_is_read_where_the_config_check_found_it(tmp_path,
                                                                           monkeypatch):
  """data.chat_template='~/...' passes the config's check, which expands '~': generate
  --chat reads that template and the tokenizer_config.json beside it, and the HF export
  writes it, as with its full path."""
  monkeypatch.setenv('HOME', str(tmp_path))
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<|im_end|>'}))
  full, tokenizer = data_config(tmp_path, QWEN, 'data.add_bos=False')
  cfg = config_lib.load('configs/dense.py:tiny', [
      f'data.tokenizer={full.tokenizer}', 'data.chat_template=~/chat_template.jinja',
      'data.add_bos=False'])
  assert chat.chat_prompts(cfg.data, tokenizer, ['hi']) == chat.chat_prompts(
      full, tokenizer, ['hi'])
  assert chat.template_variables(cfg.data, tokenizer)['eos_token'] == '<|im_end|>'
  write_hf(models.build(cfg.model, rngs=nnx.Rngs(0)), cfg, tmp_path / 'hf')
  settings = json.loads((tmp_path / 'hf' / 'tokenizer_config.json').read_text())
  assert settings['chat_template'] == QWEN


def test_rendering_without_jinja2_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, 'jinja2', None)
  with pytest.raises(ImportError, match='^generate --chat renders data.chat_template with '
                     'Jinja: pip install jinja2$'):
    chat.render('{{ messages }}', [])


def _imported_instruct_run(tmp_path, template: str | None, *settings) -> tuple:
  """A tiny dense model with the chat tokenizer exported as a Hugging Face checkpoint
  (with `template` in its tokenizer_config.json) and imported: (run, model)."""
  cfg = family_config('dense')
  with cfg.unlocked():
    cfg.data.tokenizer = chat_tokenizer(tmp_path / 'tokenizer.json')
    for setting in settings:
      config_lib.apply_override(cfg, setting)
    if template is not None:
      (tmp_path / 'chat_template.jinja').write_text(template)
      cfg.data.chat_template = str(tmp_path / 'chat_template.jinja')
  model = models.build(cfg.model, rngs=nnx.Rngs(0))
  write_hf(model, cfg, tmp_path / 'hf')
  assert cli.main(['import', f'--hf={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}']) == 0
  return tmp_path / 'run', model


def test_generate_chat_prompts_an_imported_instruct_model_and_prints_its_reply(
    tmp_path, monkeypatch, capsys):
  """Each --prompt is the user's message in the checkpoint's template (a Qwen's: no BOS),
  the model's greedy reply to those ids is printed alone; without --chat the prompt is
  the text as before."""
  run, model = _imported_instruct_run(tmp_path, QWEN, 'data.add_bos=False')
  prompts, replies, generate = [], [], infer.Generator.__call__

  def spy(self, batch, **kwargs):
    out = generate(self, batch, **kwargs)
    prompts.extend(batch)
    replies.extend(out[0])
    return out

  monkeypatch.setattr(infer.Generator, '__call__', spy)
  assert cli.main(['generate', f'--workdir={run}', '--chat', '--prompt=hi', '--prompt=yo',
                   '--system=Be brief.', '--max_new_tokens=5', '--ignore_eod']) == 0
  conversation = lambda text: ids(IM_START, 'system\nBe brief.', IM_END, '\n', IM_START,
                                  f'user\n{text}', IM_END, '\n', IM_START, 'assistant\n')
  assert prompts == [conversation('hi'), conversation('yo')]
  got = [list(r) for r in replies]
  want, _ = infer.generate(model, prompts, max_new_tokens=5, vocab_limit=258 + len(SPECIALS))
  assert got == [list(w) for w in want]
  tokenizer = get_tokenizer(load_model(run)[0].data.tokenizer)
  out = capsys.readouterr().out
  assert out == f'{tokenizer.decode(want[0])}\n{"-" * 40}\n{tokenizer.decode(want[1])}\n'

  assert cli.main(['generate', f'--workdir={run}', '--prompt=hi', '--max_new_tokens=2']) == 0
  assert prompts[-1] == ids('hi') and capsys.readouterr().out.startswith('hi')


def test_generate_chat_errors_are_one_line(tmp_path, capsys):
  """A run with no template, --system without --chat, a template that refuses the
  conversation or does not parse, and a tokenizer whose special tokens are not read."""
  run, _ = _imported_instruct_run(tmp_path, None)
  assert config_lib.load_json(run / 'config.json').data.chat_template is None
  generate = lambda *flags: cli.main(['generate', f'--workdir={run}', '--prompt=hi',
                                      '--max_new_tokens=2', *flags])
  capsys.readouterr()
  for flags, message in (
      (['--chat'], 'generate: --chat needs a chat template and this run has none '
                   '(data.chat_template=None;'),
      (['--system=x'], 'generate: --system is the system message of a --chat conversation; '
                       'add --chat')):
    assert generate(*flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1, err

  template = run / 'tokenizer' / 'chat_template.jinja'
  template.write_text(QWEN)
  saved = json.loads((run / 'config.json').read_text())
  saved['data']['chat_template'] = 'tokenizer/chat_template.jinja'
  (run / 'config.json').write_text(json.dumps(saved))
  assert generate('--chat', '--system=x') == 0
  capsys.readouterr()
  for text, message in (
      ("{{ raise_exception('System role not supported') }}",
       f'generate: the chat template {template} cannot render the conversation: System role '
       'not supported'),
      ('<|im_start|>\n{% for m in messages %}{{ m.content }',
       f'generate: the chat template {template} (line 2) cannot render the conversation: '),
      ('{{ "" }}', f'generate: the chat template {template} renders the conversation of '
                   "--prompt 'hi' as no text")):
    template.write_text(text)
    assert generate('--chat') == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1, err
  # Not UTF-8: a UnicodeDecodeError, or the tokenizer's TypeError, traceback before.
  template.write_bytes(QWEN.encode() + b'\xe9\xff')
  assert generate('--chat') == 2
  err = capsys.readouterr().err
  assert (f"generate: the chat template data.chat_template='{template}' cannot be read: it "
          f'is not UTF-8 (byte 0xe9 at byte {len(QWEN.encode())})' in err
          and err.count('\n') == 1), err
  template.write_text(QWEN)
  for flags, message in (
      (['--chat', '--prompt=h\udcffi'], "--prompt 'h\ufffdi' (prompt 1) is not UTF-8 (byte 0xff "
                                        'at character 1), and data.tokenizer='),
      (['--chat', '--system=\udcfe'], "--system '\ufffd' is not UTF-8 (byte 0xfe at character 0)"),
      (['--prompt=h\udcffi'], "--prompt 'h\ufffdi' (prompt 1) is not UTF-8")):
    assert generate(*flags) == 2
    err = capsys.readouterr().err
    assert message in err and 'reads text; give it as UTF-8' in err and err.count('\n') == 1, err

  data_cfg = config_lib.load('configs/dense.py:tiny',
                             [f'data.chat_template={template}']).data
  with pytest.raises(infer.GenerateError, match="data.tokenizer='bytes' is bytes") as e:
    chat.chat_prompts(data_cfg, get_tokenizer('bytes'), ['hi'])
  assert '\n' not in str(e.value)


def test_template_variables_are_the_checkpoints_special_token_names(tmp_path):
  """transformers passes the tokenizer's named special tokens: a Qwen's tokenizer_config
  names `<|im_end|>` its eos_token and no bos_token; without one, the run's own."""
  data_cfg, tokenizer = data_config(tmp_path, QWEN)
  assert chat.template_variables(data_cfg, tokenizer) == {'bos_token': '<|endoftext|>',
                                                          'eos_token': '<|endoftext|>'}
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
      {'bos_token': None, 'eos_token': '<|im_end|>', 'unk_token': None,
       'pad_token': {'content': '<pad>', 'special': True}, 'chat_template': QWEN}))
  assert chat.template_variables(data_cfg, tokenizer) == {'eos_token': '<|im_end|>',
                                                          'pad_token': '<pad>'}
