"""Chat prompts of an instruct model: a conversation in the run's chat template
(`data.chat_template`, the checkpoint's, which `jaxarch import` keeps), as ids.

An instruct model (Llama 3 Instruct, Qwen2.5 / Qwen3 Instruct) answers well only when its
prompt is laid out as it was tuned: `<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`.
transformers' `apply_chat_template` (and vLLM's chat endpoint) render the template with
Jinja in a sandbox, with `messages`, `add_generation_prompt` and the tokenizer's named
special tokens (`bos_token`, `eos_token`, ...) as variables, then tokenize the text with
its special tokens read as those tokens and nothing added: a template writes the BOS
itself where its model wants one (Llama 3's `{{ bos_token }}`; a Qwen's writes none).
`chat_prompts` does the same, so `jaxarch generate --chat` reads the ids transformers
gives:

  jaxarch generate --workdir=/tmp/qwen --chat --prompt='What is 2+2?' [--system=TEXT]
"""

import datetime
import json
from pathlib import Path

from jaxarch.data.tokenizers import HFTokenizer, bos_id
from jaxarch.infer.sampling import GenerateError

# The tokenizer's named special tokens, which transformers passes to every template.
SPECIAL_NAMES = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token',
                 'cls_token', 'mask_token')


def _jinja():
  try:
    # pylint: disable=g-import-not-at-top  (for chat prompts only)
    import jinja2
    import jinja2.ext
    import jinja2.sandbox
  except ImportError as e:
    raise ImportError('generate --chat renders data.chat_template with Jinja: pip install '
                      'jinja2') from e
  return jinja2


def render(template: str, messages: list[dict], **variables) -> str:
  """The text of `messages` in a chat template, rendered as transformers renders it: in
  Jinja's immutable sandbox (a template is code from the checkpoint), blocks trimmed,
  loop controls on, with `raise_exception`, `strftime_now` (Llama 3.1 dates its system
  message), a `tojson` that leaves HTML characters alone and the `generation` block. No
  tools, no documents."""
  jinja2 = _jinja()

  def raise_exception(message):
    raise jinja2.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)

  class Generation(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}`, which marks an assistant's
    reply for its training masks: the text between, as it renders it."""
    tags = {'generation'}

    def parse(self, parser):
      next(parser.stream)
      return parser.parse_statements(('name:endgeneration',), drop_needle=True)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[jinja2.ext.loopcontrols, Generation])
  env.filters['tojson'] = tojson
  env.globals['raise_exception'] = raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template).render(
      messages=messages, tools=None, documents=None, **variables)


def template_variables(data_cfg, tokenizer) -> dict[str, str]:
  """The special tokens a template may write: the run's BOS (none under
  data.add_bos=False) and end of document, then those the checkpoint's
  tokenizer_config.json beside the template names (import keeps it there: a Qwen's
  `eos_token` is its end of turn, `<|im_end|>`; `bos_token: null` names none)."""
  names = {'eos_token': tokenizer.token(tokenizer.eod_id)}
  if (bos := bos_id(data_cfg, tokenizer)) is not None:
    names['bos_token'] = tokenizer.token(bos)
  settings = Path(data_cfg.chat_template).expanduser().with_name('tokenizer_config.json')
  if settings.is_file():
    try:
      tree = json.loads(settings.read_text(encoding='utf-8'))
    except (ValueError, UnicodeDecodeError) as e:
      raise GenerateError(f'generate: {settings} (beside data.chat_template) is not JSON: '
                          f'{e}') from None
    if not isinstance(tree, dict):
      raise GenerateError(f'generate: {settings} (beside data.chat_template) holds no JSON '
                          'object')
    for name in SPECIAL_NAMES:
      if name in tree:
        value = tree[name]
        if isinstance(value, dict):  # an AddedToken, as transformers 4 saved some
          value = value.get('content')
        names.pop(name, None)
        if isinstance(value, str):
          names[name] = value
  return names


def chat_prompts(data_cfg, tokenizer, prompts: list[str], system: str | None = None
                 ) -> list[list[int]]:
  """The ids of each prompt as the user's message of a conversation (after `system`, if
  given) in the run's chat template, with the assistant's turn opened
  (`add_generation_prompt`); its special tokens are those tokens, and nothing is added
  (`HFTokenizer.encode_chat`)."""
  path = data_cfg.get('chat_template')
  if path is None:
    raise GenerateError('generate: --chat needs a chat template and this run has none '
                        '(data.chat_template=None; `jaxarch import` keeps an instruct '
                        "checkpoint's); drop --chat to continue the text as it is")
  if not isinstance(tokenizer, HFTokenizer):
    kind = 'a SentencePiece model' if str(data_cfg.tokenizer).endswith('.model') else 'bytes'
    raise GenerateError(
        "generate: --chat reads the template's special tokens with a HF tokenizer.json "
        f'only, and data.tokenizer={data_cfg.tokenizer!r} is {kind} (text between special '
        "tokens splits as transformers' legacy or current Llama tokenizer does, which the "
        "run does not say); `jaxarch import` reads an instruct checkpoint's tokenizer.json")
  try:
    template = Path(path).expanduser().read_text(encoding='utf-8')  # '~/' as config checks it
  except (OSError, UnicodeDecodeError) as e:
    why = (f'it is not UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start})'
           if isinstance(e, UnicodeDecodeError) else e.strerror or str(e))
    raise GenerateError(f'generate: the chat template data.chat_template={path!r} cannot be '
                        f'read: {why}') from None
  variables = template_variables(data_cfg, tokenizer)
  ids = []
  for prompt in prompts:
    messages = [{'role': 'user', 'content': prompt}]
    if system is not None:
      messages.insert(0, {'role': 'system', 'content': system})
    try:
      text = render(template, messages, add_generation_prompt=True, **variables)
    except ImportError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (the template's own errors)
      line = f' (line {e.lineno})' if getattr(e, 'lineno', None) else ''
      why = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise GenerateError(f'generate: the chat template {path}{line} cannot render the '
                          f'conversation: {why}') from None
    ids.append(tokenizer.encode_chat(text))
    if not ids[-1]:
      raise GenerateError(f'generate: the chat template {path} renders the conversation of '
                          f'--prompt {prompt!r} as no text')
  return ids
