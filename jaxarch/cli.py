"""`jaxarch` command line: train, evaluate and generate from language models.

  jaxarch train --config=configs/dense.py:tiny --workdir=/tmp/run [--config.train.steps=50]
  jaxarch eval  --workdir=/tmp/run            (config from the run, or --config=...)
  jaxarch bench train --config=configs/dense.py:151m --workdir=/tmp/bench [--profile]
  jaxarch bench memory --config=configs/moe.py:680m --workdir=/tmp/bench [--state_only]
  jaxarch generate --workdir=/tmp/run --prompt="def " [--max_new_tokens=200 --top_p=0.9]
  jaxarch generate --workdir=/tmp/qwen --chat --prompt="What is 2+2?"   (an instruct model)
  jaxarch distill --workdir=/tmp/run --out=/tmp/run-distilled   (BiTA's training data)
  jaxarch prepare --config=configs/dense.py:151m   (the data, ahead of a job; epochs read)
  jaxarch export --workdir=/tmp/run --out=/tmp/run-export [--format=hf|stablehlo]
  jaxarch import --hf=/models/llama --workdir=/tmp/llama   (a Hugging Face Llama as a run)
  jaxarch sweep --config=configs/sweeps/isoflop.py:tiny --workdir=/tmp/sweep [--parallel=2]
  jaxarch fit   --workdir=/tmp/sweep                 (scaling-law fits, plots, report.md)
  jaxarch launch --config=configs/dense.py:1.6b --target=slurm|gke|tpu-vm|ray --workdir=DIR
                [--out=DIR] [--dry-run]             (a cluster job and its submit command)
"""

import argparse
from collections.abc import Sequence
import contextlib
import functools
import glob
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path

from jaxarch import config as config_lib
from jaxarch import launch as launch_lib
from jaxarch import oserrors
from jaxarch.export.weights import ExportError
from jaxarch.infer.sampling import GenerateError
from jaxarch.plugins import load_plugins
from jaxarch.sweep.fit import FitError
from jaxarch.sweep.runner import SweepError, runs_counted
from jaxarch.train.checkpoint import CheckpointError
from jaxarch.train.memory import OutOfMemoryError
from jaxarch.train.metrics import standard_json
from jaxarch.train.nonfinite import DIVERGED, NonFiniteError
from jaxarch.train.preemption import exit_code
from jaxarch.train.workdir import (WorkdirError, local_workdir, readable_size,
                                   sweep_runs_hint)


def _config(args, overrides):
  if args.config:
    try:
      cfg = config_lib.load(args.config, overrides)
    except config_lib.ConfigError as e:
      if not (Path(args.workdir) / 'config.json').is_file():
        raise
      # A rerun of the first command line, after something it named moved (a BiTA run's
      # base): the run's own config.json still holds all it needs.
      raise config_lib.ConfigError(
          f'{e} ({args.workdir} holds a run: `jaxarch {args.command} '
          f'--workdir={args.workdir}` without --config reads its config.json)') from None
  else:
    saved = Path(args.workdir) / 'config.json'
    if not saved.exists():
      raise config_lib.ConfigError(
          f'config error: no --config, and {args.workdir} holds no run to take it from '
          f'(no {saved}): pass --config, or the --workdir of a training run'
          f'{sweep_runs_hint(args.workdir)}')
    cfg = config_lib.load_json(saved, overrides)
  if args.data_dir:
    with cfg.unlocked():
      cfg.data.data_dir = args.data_dir
  return cfg


def _no_overrides(command: str, overrides) -> None:
  """Commands that run a trained model take its saved config as it is."""
  if overrides:
    raise config_lib.ConfigError(f'config error: {command} takes the config of its '
                                 f'workdir; drop {overrides[0].split("=")[0]}')


def _count(text: str, least: int = 0) -> int:
  """An argparse type: a count of at least `least`."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
  if value < least:
    raise argparse.ArgumentTypeError(f'{value} must be >= {least}')
  return value


def at_least_one(text: str) -> int:
  """An argparse type: a count of at least 1 (the benchmarks take it too)."""
  return _count(text, least=1)


def _widths(text: str) -> tuple[int, ...]:
  """An argparse type: a draft tree's candidates per level, `5,4,3`."""
  try:
    return tuple(at_least_one(width) for width in text.split(','))
  except argparse.ArgumentTypeError as e:
    raise argparse.ArgumentTypeError(f'{text!r}: {e}; give candidates per level, e.g. '
                                     '5,4,3') from None


def _stop_text(text: str) -> str:
  """An argparse type: a `generate --stop` text, which an empty one would match at once
  and one that is not UTF-8 never (Python keeps such bytes of an argument as lone
  surrogates, which no decoded completion holds)."""
  if not text:
    raise argparse.ArgumentTypeError("'' would end every completion before its first "
                                     "token; give the text to stop at (a newline: $'\\n')")
  try:
    text.encode('utf-8')
  except UnicodeEncodeError as e:
    shown = text.encode('utf-8', 'backslashreplace').decode('utf-8')
    raise argparse.ArgumentTypeError(
        f"'{shown}' is not UTF-8 (at character {e.start}); completions are matched as "
        'decoded text, where it never appears: give it as UTF-8 (iconv -t UTF-8)') from None
  return text


def _positive(text: str) -> float:
  """An argparse type: a finite number > 0."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
  if not 0 < value < float('inf'):
    raise argparse.ArgumentTypeError(f'{value} must be > 0')
  return value


class DeviceError(RuntimeError):
  """The devices cannot be started, or a step does not fit them; one line for the user."""


def _check_backend() -> None:
  """A JAX_PLATFORMS that names a platform jax cannot start here (`gpu` on a CPU host, or
  `cuda` without its plugin) fails inside jax as a traceback; call after `_join_job`'s
  distributed initialization, which must come first."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.devices()
  except (RuntimeError, AssertionError) as e:  # jax asserts where no backend came up
    reason = str(e).split(' (set JAX_PLATFORMS')[0] or 'no backend started'
    platforms = os.environ.get('JAX_PLATFORMS')
    raise DeviceError(
        (f'JAX_PLATFORMS={platforms!r} names a platform jax cannot start here ({reason}); '
         'unset it to use the devices present, or install jax for that platform, e.g. '
         "pip install 'jax[cuda12]'") if platforms else
        f'jax could not start a device backend ({reason})') from None


def _step_memory(cfg):
  """XLA running out of device memory in a step (on CPU, or past the trainer's check of
  the state) is a traceback from deep inside jax; this says what to change."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxarch.train.memory import explained_out_of_memory  # pylint: disable=g-import-not-at-top
  return explained_out_of_memory(lambda detail: DeviceError(
      f'out of device memory ({detail}) with train.batch_size={cfg.train.batch_size} x '
      f'data.seq_len={cfg.data.seq_len} on {jax.device_count()} '
      f'{jax.devices()[0].platform} devices: lower --config.train.batch_size (or raise '
      '--config.train.grad_accum_steps), set --config.model.remat=full, or shard with '
      '--config.mesh.ici.fsdp; `jaxarch bench memory` plans it without allocating'))


def _log_to_stderr() -> None:
  """'WARNING jaxarch.infer.generate: ...' on stderr. Orbax logs through absl at import,
  whose first line gave the root logger Python's default handler ('WARNING:name:...'),
  and `basicConfig` leaves a configured logger as it is: that handler gets the format."""
  form = '%(levelname)s %(name)s: %(message)s'
  logging.basicConfig(level=logging.WARNING, format=form)
  for handler in logging.root.handlers:
    if type(handler) is logging.StreamHandler:  # pylint: disable=unidiomatic-typecheck
      handler.setFormatter(logging.Formatter(form))  # not a test runner's capture handler


class _StdoutRefused(Exception):
  """stdout took no more text; the OSError is its cause."""


# Control characters but the newline and the tab (C0, DEL, C1): a byte model's output may
# hold any byte, and an escape sequence sent to a terminal moves its cursor, clears it,
# retitles the window or is read back as input.
_CONTROL = re.compile('[\x00-\x08\x0b-\x1f\x7f-\x9f]')


def _shown(text: str, terminal: bool | None = None) -> str:
  """`text` to print: on a terminal (`terminal`, by default whether stdout is one), its
  control characters written as escapes (`\\x1b`), not sent; into a pipe or a file, as it
  is (`generate --json` keeps the ids too)."""
  if terminal is None:
    terminal = sys.stdout.isatty()
  return _CONTROL.sub(lambda m: f'\\x{ord(m[0]):02x}', text) if terminal else text


def _say(text: str) -> None:
  """print to stdout, flushed now: a refused write stops the command with one line (main),
  where it was a traceback, or Python's "Exception ignored" at exit."""
  try:
    print(text, flush=True)
  except OSError as e:
    raise _StdoutRefused() from e


def _join_job(args) -> bool:
  """Joins a multi-process job if this process is one (flags or cluster environment);
  True on the process that reports."""
  from jaxarch.parallel import distributed  # pylint: disable=g-import-not-at-top
  launch = distributed.initialize(distributed.detect(
      args.coordinator_address, args.num_processes, args.process_id))
  if launch.source != 'single':
    print(f'jaxarch: process {launch.process_id} of {launch.num_processes} '
          f'({launch.source})', file=sys.stderr)
  _check_backend()
  return not launch.process_id


def _train(args, overrides):
  cfg = _config(args, overrides)
  reports = _join_job(args)
  _check_saved_mesh(cfg, args, overrides)
  from jaxarch.train import train  # pylint: disable=g-import-not-at-top
  with _step_memory(cfg):
    result = train(cfg, args.workdir)
  if reports:
    _say(standard_json(result, indent=2))
  return exit_code(result.get('stopped'))


def _check_saved_mesh(cfg, args, overrides) -> None:
  """A run resumed as saved keeps config.json's mesh, which may be of other devices (a pool
  come back smaller, one GPU): the error then says which overrides fit these."""
  # pylint: disable=g-import-not-at-top
  import jax
  from jaxarch.train.pretrained import data_parallel_mesh
  if args.config or any(o.startswith('--config.mesh.') for o in overrides):
    return
  n = jax.device_count()
  try:
    config_lib.mesh_shape(cfg, n)
  except config_lib.ConfigError as e:
    sizes = data_parallel_mesh(cfg, n)
    flags = [f'--config.mesh.ici.{a}={s}' for a, s in sizes.items()]
    flags += [f'--config.mesh.dcn.{a}=1' for a in sizes if cfg.mesh.dcn[a] != 1]
    raise config_lib.ConfigError(
        f'{e} (the mesh of {Path(args.workdir) / "config.json"}); to resume on these {n} '
        f'devices, pass e.g. {" ".join(flags)} (the checkpoint is resharded onto them and '
        'the data position carries over)') from None


def _eval(args, overrides):
  cfg = _config(args, overrides)
  reports = _join_job(args)
  from jaxarch.train import evaluate  # pylint: disable=g-import-not-at-top
  from jaxarch.train.trainer import eval_file  # pylint: disable=g-import-not-at-top
  with _step_memory(cfg):
    result = evaluate(cfg, args.workdir, step=args.step)
  if reports:
    _say(standard_json(result, indent=2))
    if (out := eval_file(Path(args.workdir), result['step'], result['evaluated_on'])).is_file():
      print(f'jaxarch: wrote {out}', file=sys.stderr)


def _bench(args, overrides):
  cfg = _config(args, overrides)
  reports = _join_job(args)
  # pylint: disable=g-import-not-at-top
  import jax
  from jaxarch.train import memory, throughput
  workdir = local_workdir(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if args.what == 'memory':
    gib = args.device_memory_gib
    result = memory.plan(cfg, compile_step=not args.state_only,
                         device_memory=None if gib is None else int(gib * 2**30))
    summary = memory.summary
  else:
    with _step_memory(cfg):
      result = throughput.measure(cfg, steps=args.steps or 10, warmup=args.warmup or 2,
                                  profile_dir=workdir / 'profile' if args.profile else None)
    summary = throughput.summary
  result = {'config': args.config, 'overrides': overrides, 'jax': jax.__version__, **result}
  if reports:
    out = workdir / f'bench_{args.what}.json'
    out.write_text(standard_json(result, indent=2) + '\n')
    _say(summary(result))
    print(f'jaxarch: wrote {out}' + (f' and a profile trace in {result["profile_dir"]}'
                                    if 'profile_dir' in result else ''), file=sys.stderr)


def _generate(args, overrides):
  # pylint: disable=g-import-not-at-top
  from jaxarch import infer
  from jaxarch.data import bos_id, get_tokenizer, stop_ids
  from jaxarch.data.tokenizers import (ByteTokenizer, as_text, cut_at_stop_text,
                                       decode_continuation)
  from jaxarch.infer.chat import chat_prompts
  from jaxarch.parallel import make_mesh
  _no_overrides('generate', overrides)
  if args.system is not None and not args.chat:
    raise GenerateError('generate: --system is the system message of a --chat conversation; '
                        'add --chat')
  sampled = (args.temperature, args.top_k, args.top_p) != (None, None, None)
  method = args.method or ('sample' if sampled else
                           'bita' if args.draft_tree is not None else 'greedy')
  # Greedy and BiTA take the most likely token: a sampling flag would be ignored, even one
  # whose value keeps every token (--temperature=1). A temperature of 0 is greedy (vLLM's).
  given = [f'--{name}' for name in ('temperature', 'top_k', 'top_p')
           if getattr(args, name) is not None and (name, getattr(args, name)) != (
               'temperature', 0)]
  if method != 'sample' and given:
    raise GenerateError(f'generate: {", ".join(given)} choose among tokens for '
                        f'--method=sample; --method={method} takes the most likely ones: '
                        f'drop {", ".join(given)} or use --method=sample')
  if args.seed is not None and method != 'sample':  # it would be ignored
    raise GenerateError(f'generate: --seed draws sampled tokens; --method={method} takes the '
                        'most likely ones: add --method=sample (or a --temperature, --top_k '
                        'or --top_p), or drop --seed')
  if args.draft_tree is not None and method != 'bita':
    raise GenerateError(f"generate: --draft_tree is BiTA's; --method={method} drafts nothing: "
                        'add --method=bita, or drop --draft_tree')
  _check_backend()
  if method == 'bita':
    _check_draft_tree_before_loading(args.workdir, args.draft_tree)
  cfg, model = _run_or_export(args.workdir, args.step)
  tokenizer = get_tokenizer(cfg.data.tokenizer)
  # Documents were trained as [bos] + text (bos: data.bos_id, by default the eod id), or
  # as the text alone (data.add_bos=False: an imported Qwen's). A chat prompt is the
  # template's text, which writes the BOS itself where the model wants one.
  bos = bos_id(cfg.data, tokenizer)
  start = [] if bos is None else [bos]
  reads_bytes = isinstance(tokenizer, ByteTokenizer) and not args.chat
  texts = [_prompt_text(p, '--prompt', cfg.data.tokenizer, reads_bytes, f' (prompt {i})')
           for i, p in enumerate(args.prompt)]
  if args.chat:
    system = args.system and _prompt_text(args.system, '--system', cfg.data.tokenizer, False)
    prompts = chat_prompts(cfg.data, tokenizer, texts, system=system)
  else:
    prompts = [start + tokenizer.encode(p) for p in texts]
  for i, prompt in enumerate(prompts):
    if not prompt:  # nothing to continue: no BOS is made up for it
      raise GenerateError(f'generate: --prompt {args.prompt[i]!r} (prompt {i}) is no tokens '
                          'and the run starts prompts with no BOS (data.add_bos=False); '
                          'give some text')
  # Past model.max_len the Generator warns (before compiling), as in Python.
  generator = infer.Generator(model, mesh=make_mesh(cfg), rules=cfg.mesh.rules,
                              vocab_limit=tokenizer.vocab_size)
  outputs, stats = generator(
      prompts, max_new_tokens=args.max_new_tokens, method=method,
      temperature=1.0 if args.temperature is None else args.temperature,
      top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p,
      # The eod, and an imported instruct model's end of turn (data.stop_ids).
      stop_ids=() if args.ignore_eod else stop_ids(cfg.data, tokenizer),
      seed=args.seed or 0, draft_tree=args.draft_tree)
  for i, (text, ids, new) in enumerate(zip(map(as_text, texts), prompts, outputs)):
    # The assistant's reply alone, or the prompt's continuation.
    decode = (tokenizer.decode if args.chat else
              functools.partial(decode_continuation, tokenizer, ids[len(start):]))
    new, added = cut_at_stop_text(decode, new, args.stop or ())
    if args.json:  # the ids too: text decoding loses what is not valid UTF-8 (a byte model's)
      _say(json.dumps({'prompt': text, 'completion': added, 'ids': [int(t) for t in new]}))
      continue
    if i:
      _say('-' * 40)
    _say(_shown(added if args.chat else text + added))
  print(f'jaxarch: {stats["new_tokens"]} new tokens in {stats["prefill_s"] + stats["decode_s"]:.2f}s, '
        f'{stats["tokens_per_s"]:.1f} tokens/s ({stats["decode_step_s"] * 1e3:.1f} ms per '
        f'decode step, batch {stats["batch"]}, KV caches {readable_size(stats["cache_bytes"])}'
        f'; compiled in {stats["compile_s"]:.1f}s)'
        + _bita_acceptance(stats), file=sys.stderr)


def _bita_acceptance(stats: dict) -> str:
  if 'accepted_per_pass' not in stats:
    return ''
  if not stats['tree_passes']:
    return '; BiTA ran no tree pass (each prompt stopped at its first token)'
  return f'; BiTA accepted {stats["accepted_per_pass"]:.2f} tokens per tree pass'


def _prompt_text(text: str, flag: str, tokenizer: str, reads_bytes: bool, which: str = ''
                 ) -> str | bytes:
  """A command-line text as the tokenizer reads it. Python keeps the bytes of an argument
  that are not UTF-8 as lone surrogates, which no text tokenizer encodes: a byte model
  (`reads_bytes`) reads the argument's bytes as given, the others are told."""
  try:
    text.encode('utf-8')
    return text
  except UnicodeEncodeError as e:
    try:
      raw = os.fsencode(text)  # the argument's bytes, as the command line gave them
    except UnicodeEncodeError:  # a surrogate of no byte (given from Python)
      raw = None
    if reads_bytes and raw is not None:
      return raw
    shown = (raw or text.encode('utf-8', 'replace')).decode('utf-8', 'replace')
    at = (f'byte 0x{raw[len(text[:e.start].encode()):][0]:02x}' if raw is not None
          else repr(text[e.start]))
    raise GenerateError(
        f'generate: {flag} {shown!r}{which} is not UTF-8 ({at} at character {e.start}), '
        f'and data.tokenizer={tokenizer!r} reads text; give it as UTF-8 '
        '(iconv -t UTF-8)') from None


def _check_draft_tree_before_loading(workdir: str, widths) -> None:
  """A run that drafts no such tree (or none) is refused before its weights load (minutes,
  for a large base); the Generator checks again against the tokenizer's vocabulary."""
  from jaxarch.infer.generate import draft_tree  # pylint: disable=g-import-not-at-top
  saved = Path(workdir).expanduser() / 'config.json'  # a run's, or an export's
  if not saved.is_file():
    return  # loading says what is missing
  model = config_lib.load_json(saved).model
  if model.family != 'bita':  # named by the flag given (--draft_tree implies the method)
    flag = '--method=bita' if widths is None else '--draft_tree'
    hint = ('train BiTA on it: configs/bita.py' if model.family in config_lib.BITA_BASES else
            f'BiTA wraps {", ".join(config_lib.BITA_BASES)} models')
    raise GenerateError(f'generate: {flag} drafts with a BiTA model, and {workdir} holds a '
                        f'{model.family!r} one ({hint})')
  bita = model.bita
  draft_tree(widths, default=bita.draft_tree, num_mask_tokens=bita.num_mask_tokens,
             vocab=model.vocab_size)


def _run_or_export(workdir: str, step: int | None):
  """(config, model) of a run's checkpoint (the latest, or `step`), or of the weights of a
  `jaxarch export` directory (safetensors or stablehlo), on a mesh of the devices here."""
  # pylint: disable=g-import-not-at-top
  from jaxarch.export.weights import WEIGHTS, load_safetensors
  from jaxarch.train.checkpoint import Checkpointer
  from jaxarch.train.pretrained import load_model
  path = Path(workdir).expanduser()
  if step is None and not Checkpointer.exists(path) and (path / WEIGHTS).is_file():
    return load_safetensors(path)
  return load_model(path, step=step, scan_layers=False)  # decoding runs unrolled


def _distill(args, overrides):
  from jaxarch.infer.distill import distill  # pylint: disable=g-import-not-at-top
  _no_overrides('distill', overrides)
  _check_backend()
  summary = distill(args.workdir, args.out, num_prompts=args.num_prompts,
                    validation_prompts=args.validation_prompts, prompt_len=args.prompt_len,
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    seed=args.seed)
  _say(json.dumps(summary, indent=2))


def _prepare(args, overrides):
  from jaxarch.data import model_tokenizer, summary  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load(args.config, overrides)
  if args.data_dir:
    with cfg.unlocked():
      cfg.data.data_dir = args.data_dir
  out = Path(args.out) if args.out else None
  if out is not None and (out.is_dir() or not os.access(out.parent, os.W_OK)):
    # Said now, not after preparing the data (hours for a large corpus).
    raise FileNotFoundError(f'--out={args.out} cannot be written: give a file in a '
                            'folder that exists and is writable')
  model_tokenizer(cfg)  # a vocabulary the model cannot hold: said before preparing
  rows = summary.summarize(cfg, sample_documents=args.sample_documents)
  _say(summary.table(rows))
  if out is not None:
    try:
      out.write_text(standard_json(rows, indent=2) + '\n')
    except OSError as e:
      raise FileNotFoundError(f'--out={args.out} could not be written '
                              f'({oserrors.reason(e)})') from None
    print(f'jaxarch: wrote {args.out}', file=sys.stderr)


def _import(args, overrides):
  from jaxarch.export.hf_import import import_hf  # pylint: disable=g-import-not-at-top
  for override in overrides:  # the model's keys are the checkpoint's, but its layout
    if override.startswith('--config.model.') and not override.startswith(
        '--config.model.scan_layers='):
      raise config_lib.ConfigError(f'config error: {override.split("=")[0]} is set by the '
                                   'checkpoint; import sets train, data and mesh keys only '
                                   '(and model.scan_layers)')
  _check_backend()
  workdir = import_hf(args.hf, args.workdir,
                      [o.removeprefix('--config.') for o in overrides])
  source = config_lib.load_json(Path(workdir) / 'config.json').data.source
  corpus = (' (the Python standard library; import again with --config.data.source=... for '
            'your corpus)' if source == 'default' else '')
  print(f'jaxarch: {args.hf} is the run {workdir} at step 0; continue it with `jaxarch train '
        f'--workdir={workdir}` (raise --config.train.steps), which reads data.source='
        f'{source!r}{corpus}, or generate from it', file=sys.stderr)


def _export(args, overrides):
  # pylint: disable=g-import-not-at-top
  from jaxarch.export import all_or_nothing, export_stablehlo, write_hf, write_model
  from jaxarch.export.huggingface import check_exportable
  from jaxarch.export.stablehlo import check_platforms
  from jaxarch.export.weights import free_out
  from jaxarch.train.pretrained import load_checkpoint
  _no_overrides('export', overrides)
  only_stablehlo = [f'--{k}' for k in ('batch_size', 'prompt_len', 'max_len', 'platforms')
                    if getattr(args, k) is not None]
  if args.format != 'stablehlo' and only_stablehlo:
    raise ExportError(f'export: {", ".join(only_stablehlo)} '
                      f'{"is" if len(only_stablehlo) == 1 else "are"} for --format=stablehlo only')
  # What needs no model is checked before the checkpoint is read (minutes for a big one).
  free_out(args.out)
  platforms = tuple(args.platforms.split(',')) if args.platforms else None
  check_platforms(platforms)
  _check_backend()
  # The run's config as saved: load_checkpoint's has the mesh of the devices here.
  saved = Path(args.workdir) / 'config.json'
  if args.format == 'hf' and saved.is_file():  # (else load_checkpoint says what is amiss)
    check_exportable(config_lib.load_json(saved))
  _, model, step = load_checkpoint(args.workdir, step=args.step,
                                   scan_layers=False)  # exports hold each layer's own
  cfg = config_lib.load_json(saved)
  source = f'{args.workdir} (checkpoint {step})'
  with all_or_nothing(args.out) as partial:
    if args.format == 'safetensors':
      write_model(model, cfg, partial, source=source, final=args.out)
    elif args.format == 'hf':
      write_hf(model, cfg, partial, source=source, final=args.out)
    else:
      max_len = cfg.model.max_len if args.max_len is None else args.max_len
      export_stablehlo(model, cfg, partial, batch_size=args.batch_size or 1,
                       prompt_len=args.prompt_len, max_len=max_len,
                       platforms=platforms, source=source, final=args.out)
  out = Path(args.out)
  print(f'jaxarch: wrote {", ".join(sorted(p.name for p in out.iterdir()))} to {out}',
        file=sys.stderr)


def _sweep(args, overrides):
  from jaxarch.sweep.runner import run_sweep  # pylint: disable=g-import-not-at-top
  # Rendered jobs may take the cluster's keys (launch.*) for every run; nothing else.
  cluster = bool(args.launcher) and args.launcher != 'local'
  for override in overrides:
    if not (cluster and override.startswith('--config.launch.')):
      raise config_lib.ConfigError('config error: a sweep sets its runs\' keys in its sweep '
                                   f'file; drop {override.split("=")[0]}')
  records = run_sweep(args.config, args.workdir, parallel=args.parallel,
                      launcher=args.launcher, launch_overrides=overrides,
                      collect_only=args.collect, only=args.only)
  results = Path(args.workdir) / 'results.jsonl'
  if not cluster and not records:
    print(f'jaxarch: no runs recorded in {results} yet', file=sys.stderr)
  elif not cluster:
    print(f'jaxarch: {runs_counted(len(records))} recorded in {results}; '
          f'fit them with `jaxarch fit --workdir={args.workdir}`', file=sys.stderr)


def _fit(args, overrides):
  from jaxarch.sweep.report import report_dir, write_report  # pylint: disable=g-import-not-at-top
  _no_overrides('fit', overrides)
  if (args.workdir is None) == (not args.runs):
    raise FitError("fit: give a sweep's --workdir, or training runs' workdirs as "
                   '--runs DIR ... with --out=REPORT_DIR')
  fits = write_report(args.workdir, args.out, runs=_run_dirs(args.runs or ()),
                      params=args.params, bootstrap=args.bootstrap,
                      validation_only=args.validation_only)
  out = report_dir(args.workdir, args.out)
  for family, entry in fits.items():
    law = entry['law']
    text = law.get('error') or (f'L = {law["E"]:.3f} + {law["A"]:.3g}/N^{law["alpha"]:.3f} + '
                                f'{law["B"]:.3g}/D^{law["beta"]:.3f}')
    _say(f'{family}: {text}')
  print(f'jaxarch: wrote {out / "report.md"} and its plots', file=sys.stderr)


def _run_dirs(patterns: Sequence[str]) -> list[Path]:
  """`fit --runs`: each a workdir, or a glob (quoted, as the shell leaves it) of which the
  training runs' workdirs count (those with a config.json: not a report beside them)."""
  dirs = []
  for pattern in patterns:
    path = Path(pattern).expanduser()
    found = [path] if path.exists() else sorted(  # a name with [ ] is a path first
        run for run in map(Path, glob.glob(str(path))) if (run / 'config.json').is_file())
    if not found:
      raise FileNotFoundError(f'fit: --runs {pattern}: no such training run')
    dirs += [d for d in found if d not in dirs]
  return dirs


def _launch(args, overrides):
  cfg = config_lib.load(args.config, overrides)
  out = Path(args.out) if args.out else local_workdir(args.workdir) / 'launch'
  out = out.expanduser()  # written here, where `~` is this home (the job's paths stay as given)
  job = launch_lib.render(args.target, cfg, spec=args.config, workdir=args.workdir,
                          overrides=overrides, out=out)
  if args.dry_run:
    for path, text in job.files.items():
      _say(f'==> {path} <==\n{text}')
    print(f'jaxarch: dry run, nothing written; submit with: {job.submit}', file=sys.stderr)
  else:
    launch_lib.write(job)
    print(f'jaxarch: wrote {", ".join(map(str, job.files))}; submit with:', file=sys.stderr)
    _say(job.submit)
  for alternative in job.alternatives:
    print(f'jaxarch: or: {alternative}', file=sys.stderr)
  bucket = Path(*out.parts[:3])  # /gcs/BUCKET: mounted in the pods, maybe not here
  if not args.out and str(out).startswith(launch_lib.GCS_MOUNTS) and not bucket.is_mount():
    job.warnings += (f'the job files go to {out} on this machine\'s disk ({bucket} is no '
                     'mounted bucket here); give --out=DIR to keep them elsewhere',)
  for warning in job.warnings:
    print(f'jaxarch: warning: {warning}', file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='jaxarch', description='Train and evaluate jaxarch language models from config '
      'files. Override any config key with --config.KEY=VALUE.')
  commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  def command(name, func, help_text, workdir='checkpoints, metrics and logs go here',
              config='config file and preset, e.g. configs/dense.py:tiny'):
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.add_argument('--config', help=config)
    sub.add_argument('--workdir', required=True, help=workdir)
    sub.add_argument('--data_dir', help='prepared-data cache (default: $JAXARCH_DATA_DIR '
                     'or ~/.cache/jaxarch/data)')
    job = sub.add_argument_group('multi-process jobs (default: from SLURM, Open MPI, TPU '
                                 'or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/'
                                 'JAX_PROCESS_ID; else one process)')
    job.add_argument('--coordinator_address', help="HOST:PORT of process 0's coordinator")
    job.add_argument('--num_processes', type=int)
    job.add_argument('--process_id', type=int)
    sub.set_defaults(func=func)
    return sub

  command('train', _train, 'train a model, resuming from the workdir if it has checkpoints')
  command('eval', _eval, 'validation loss and bits per byte of a checkpoint',
          workdir='the run to evaluate; the result is also written to WORKDIR/eval_STEP.json',
          config="config file and preset (default: the run's config.json); "
          '--config.KEY=VALUE overrides apply to either, e.g. --config.log.eval_batches=64'
          ).add_argument(
              '--step', type=int, help='checkpoint step (default: latest)')
  bench = command('bench', _bench, 'train-step throughput (tokens/s, step time, TFLOP/s '
                  'per device, MFU) or memory per device, on synthetic tokens')
  bench.add_argument('what', choices=('train', 'memory'),
                     help='train: time the train step; memory: bytes per device of the '
                     'train state and the compiled step, without allocating them')
  bench.add_argument('--steps', type=at_least_one, help='train: timed steps (default 10)')
  bench.add_argument('--warmup', type=at_least_one,
                     help='train: untimed steps, the first compiles (default 2)')
  bench.add_argument('--profile', action='store_true',
                     help='train: also write a jax.profiler trace of 3 steps to '
                     'WORKDIR/profile')
  bench.add_argument('--state_only', action='store_true',
                     help='memory: only the train state (exact, instant), not the compiled '
                     'step')
  bench.add_argument('--device_memory_gib', type=_positive,
                     help="memory: plan for devices of this size (default: the present "
                     "device's allocator limit; unknown on CPU)")
  gen = commands.add_parser('generate', help='continue prompts with the latest checkpoint',
                            description='Continue prompts with a trained model (KV-cached '
                            'decoding), or with --chat answer them as an instruct model; '
                            'greedy unless a sampling option is given.')
  gen.add_argument('--workdir', required=True, help='the run to load (config and checkpoint)')
  gen.add_argument('--prompt', action='append', required=True,
                   help='text to continue (with --chat, the user\'s message); repeat for a '
                   'batch of prompts')
  gen.add_argument('--chat', action='store_true',
                   help="an instruct model's answer: each prompt is the user's message of a "
                   "conversation in the run's chat template (data.chat_template, which import "
                   "keeps), and only the assistant's reply is printed")
  gen.add_argument('--system', help='with --chat: a system message before each prompt')
  gen.add_argument('--max_new_tokens', type=int, default=128)
  gen.add_argument('--method', choices=('greedy', 'sample', 'bita'),
                   help='default: sample if --temperature/--top_k/--top_p is given')
  gen.add_argument('--temperature', type=float)
  gen.add_argument('--top_k', type=int, help='sample from the k most likely tokens')
  gen.add_argument('--top_p', type=float, help='nucleus: the most likely tokens up to p')
  gen.add_argument('--seed', type=int, help='with sampling (default 0)')
  gen.add_argument('--draft_tree', type=_widths,
                   help="BiTA's draft candidates per level, e.g. 5,4,3 (implies --method=bita; "
                   "default: the run's model.bita.draft_tree)")
  gen.add_argument('--ignore_eod', action='store_true',
                   help='keep generating past the end-of-document token and the '
                   'data.stop_ids (an instruct model\'s end of turn), up to --max_new_tokens')
  gen.add_argument('--stop', action='append', type=_stop_text, metavar='TEXT',
                   help='end each completion before the first of these texts to appear, '
                   'as vLLM\'s stop does (repeat for several; the tokens generated past it, '
                   'up to a stop id or --max_new_tokens, are dropped)')
  gen.add_argument('--step', type=int, help='checkpoint step (default: latest)')
  gen.add_argument('--json', action='store_true',
                   help='one JSON line per prompt on stdout: prompt, completion (its text) '
                   'and ids (the new token ids, stop id included: a byte model\'s bytes, '
                   'which the text cannot hold where they are not UTF-8)')
  gen.set_defaults(func=_generate)
  dis = commands.add_parser(
      'distill', help="write a run's greedy continuations of its data (BiTA training data)",
      description="Continue prompts drawn from a trained run's corpus greedily and write "
      "prompt + continuation as an array_record dataset, read by data.source='distilled:OUT'.")
  dis.add_argument('--workdir', required=True, help='the trained run (config and checkpoint)')
  dis.add_argument('--out', required=True, help='a new directory for the dataset')
  dis.add_argument('--num_prompts', type=int, default=2048, help='training sequences')
  dis.add_argument('--validation_prompts', type=int, default=64)
  dis.add_argument('--prompt_len', type=int, default=32, help='prompt tokens per sequence')
  dis.add_argument('--max_new_tokens', type=int, default=96, help='continuation length')
  dis.add_argument('--batch_size', type=int, default=64, help='prompts generated together')
  dis.add_argument('--seed', type=int, default=0)
  dis.set_defaults(func=_distill)
  exp = commands.add_parser(
      'export', help="write a run's model as safetensors (+ config, tokenizer), Hugging "
      "Face's format or StableHLO",
      description="Export the latest (or --step) checkpoint of a run: safetensors weights "
      'with config.json and tokenizer.json; for --format=hf a dense or MoE model in '
      "Hugging Face's Llama (Qwen2 with q/k/v biases, Qwen3 with QK-norm, Gemma 3 with "
      "Gemma 3's keys) or Mixtral (Qwen3-MoE with QK-norm) format; for "
      '--format=stablehlo also the prefill and decode step serialized with jax.export and '
      'a loader that needs no jaxarch.')
  exp.add_argument('--workdir', required=True, help='the trained run')
  exp.add_argument('--out', required=True, help='a new directory')
  exp.add_argument('--format', choices=('safetensors', 'hf', 'stablehlo'), default='safetensors',
                   help="hf: a dense or MoE model as Hugging Face's Llama, Qwen2, Qwen3, "
                   'Gemma 3, Mixtral or Qwen3-MoE (transformers, vLLM)')
  exp.add_argument('--step', type=int, help='checkpoint step (default: latest)')
  exp.add_argument('--batch_size', type=at_least_one,
                   help='stablehlo: sequences per call (default: 1)')
  exp.add_argument('--prompt_len', type=at_least_one, help='stablehlo: prompt length '
                   '(default: max_len // 2)')
  exp.add_argument('--max_len', type=at_least_one, help='stablehlo: cache positions '
                   '(default: model.max_len)')
  exp.add_argument('--platforms', help='stablehlo: e.g. cpu,cuda,tpu (default: this one)')
  exp.set_defaults(func=_export)
  imp = commands.add_parser(
      'import', help='make a run of a Hugging Face Llama, Mistral, Ministral, Qwen2, Qwen3, '
      'Gemma 3 (text), Mixtral or Qwen3-MoE checkpoint',
      description='Write a new workdir holding a Hugging Face LlamaForCausalLM, '
      'MistralForCausalLM, MinistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, '
      'Gemma3ForCausalLM, MixtralForCausalLM or Qwen3MoeForCausalLM checkpoint '
      '(safetensors) as a jaxarch run at step 0: its config (train, data and mesh keys '
      'from the 151m preset and --config.KEY=VALUE), tokenizer and weights, for generate, '
      'eval, distill, BiTA, or train to go on from.')
  imp.add_argument('--hf', required=True, help='the Hugging Face checkpoint directory')
  imp.add_argument('--workdir', required=True, help='a new directory for the run')
  imp.set_defaults(func=_import)
  prep = commands.add_parser(
      'prepare', help="prepare a config's data ahead of a job; each source's documents, "
      'bytes, tokens and the epochs the run reads of it',
      description='Prepare every source of data.source into the data directory (as '
      'training would at its start), then print for each its documents and bytes (exact), '
      'tokens (estimated with the run\'s tokenizer on a sample of documents) and, for the '
      'sources trained on, the tokens the run reads of it (train.steps x batch x seq_len x '
      'its weight) and the epochs they make. Run it on a CPU box before a pod job.')
  prep.add_argument('--config', required=True, help='e.g. configs/dense.py:151m')
  prep.add_argument('--data_dir', help='prepared-data cache (default: data.data_dir, '
                    '$JAXARCH_DATA_DIR or ~/.cache/jaxarch/data)')
  prep.add_argument('--sample_documents', type=at_least_one, default=1000,
                    help='documents per split whose tokens estimate tokens per byte')
  prep.add_argument('--out', help='also write the summary as JSON to this file')
  prep.set_defaults(func=_prepare)
  sweep = commands.add_parser(
      'sweep', help='run every run of a sweep config (resumable), recording results.jsonl',
      description='Train each run of a sweep file in WORKDIR/runs/NAME, N at a time; '
      'finished runs are skipped and interrupted ones resume from their checkpoint.')
  sweep.add_argument('--config', required=True,
                     help='sweep file and argument, e.g. configs/sweeps/isoflop.py:tiny')
  sweep.add_argument('--workdir', required=True)
  sweep.add_argument('--parallel', type=at_least_one,
                     help='runs at a time (default 1); with --launcher=slurm, tasks of each '
                     'of its array jobs at a time (default: as the queue allows)')
  sweep.add_argument('--launcher', help='render one cluster job per run instead of running: '
                     f'{", ".join(launch_lib.TARGETS)} (their keys: --config.launch.KEY=VALUE)')
  sweep.add_argument('--collect', action='store_true',
                     help='record the runs whose cluster jobs have finished, run nothing')
  sweep.add_argument('--only', type=lambda s: [p for p in s.split(',') if p], default=[],
                     help='run (or render, or collect) only these runs, the others left as '
                     'they are: names or shell patterns, comma-separated, e.g. d32,d6*')
  sweep.set_defaults(func=_sweep)
  fit = commands.add_parser(
      'fit', help="fit scaling laws to a sweep's results; plots and a markdown report",
      description="Fit each family of a sweep's results.jsonl (IsoFLOP parabolas and "
      'L(N, D) = E + A/N^alpha + B/D^beta), plot them and write report.md and fits.json.')
  fit.add_argument('--workdir', help='the sweep workdir (results.jsonl)')
  fit.add_argument('--runs', nargs='+', metavar='DIR',
                   help='or: the workdirs of training runs to fit (globs too, e.g. '
                   "'runs/dense-*'), each at its last logged step")
  fit.add_argument('--out', help='default: WORKDIR/report (with --runs: required)')
  fit.add_argument('--params', choices=('active', 'total'), default='active',
                   help='N in the fits: active (per token) or total parameters')
  fit.add_argument('--validation_only', action='store_true',
                   help='fit only the runs with a validation loss (the others are fitted on '
                   'their final training loss, and said so)')
  fit.add_argument('--bootstrap', type=_count, default=100,
                   help='resamples for the intervals of the exponents (0: none)')
  fit.set_defaults(func=_fit)
  launch = commands.add_parser(
      'launch', help='render a training job for a cluster (SLURM, GKE, TPU VM, Ray)',
      description='Render the training job of a config for a cluster from the templates in '
      'launch/, after checking that launch.nodes x launch.devices_per_node matches the mesh; '
      'write it under --out and print the command that submits it. Nothing is submitted.')
  launch.add_argument('--config', required=True, help='e.g. configs/dense.py:1.6b')
  launch.add_argument('--target', required=True, choices=launch_lib.TARGETS)
  launch.add_argument('--workdir', required=True,
                      help="the job's workdir as the cluster sees it (a shared or mounted path)")
  launch.add_argument('--out', help='where the job files go (default: WORKDIR/launch)')
  launch.add_argument('--dry-run', action='store_true',
                      help='print the job files and the submit command; write nothing')
  launch.set_defaults(func=_launch)
  return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(config overrides '--config.K=V', the other arguments); '--config.K V' (the absl flags
  form) counts as '--config.K=V'."""
  overrides, rest, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.') and '=' not in arg and i + 1 < len(argv) and (
        not argv[i + 1].startswith('--')):
      overrides.append(f'{arg}={argv[i + 1]}')
      i += 2
      continue
    (overrides if arg.startswith('--config.') else rest).append(arg)
    i += 1
  return overrides, rest


def _given_twice(overrides: list[str]) -> list[str]:
  """What to say of each key given more than once with other values: the last is taken
  (as absl takes it), which a long command line edited in place hides."""
  values = {}
  for override in overrides:
    key, _, value = override.partition('=')
    values.setdefault(key, []).append(value)
  return [f'{key} is given {len(given)} times ({", ".join(given)}); the last, {given[-1]}, '
          'is taken' for key, given in values.items() if len(set(given)) > 1]


_PATH_FLAGS = ('workdir', 'out', 'data_dir', 'config', 'hf')  # the flags that name paths


def _expand_home(args) -> None:
  """`~` in the paths of a command that runs here: the shell leaves `--workdir=~/run`
  alone (a tilde is expanded only at the start of a word), which would make a folder
  named `~`. A launched job's paths are the cluster's, and stay as written."""
  if args.command == 'launch':
    return
  for name in _PATH_FLAGS:
    if isinstance(getattr(args, name, None), str):
      setattr(args, name, os.path.expanduser(getattr(args, name)))


# The flags of one `bench` subcommand, which the other one would silently ignore.
_BENCH_FLAGS = {'train': ('steps', 'warmup', 'profile'),
                'memory': ('state_only', 'device_memory_gib')}


def _other_bench_flag(args) -> str | None:
  """`bench memory --profile` would write no trace, `bench train --state_only` time the
  whole step: a flag of the other subcommand is an error, not ignored."""
  for what, names in _BENCH_FLAGS.items():
    for name in names:
      if args.command == 'bench' and args.what != what and getattr(args, name) not in (
          None, False):
        return f'--{name} is a flag of `jaxarch bench {what}`, not of `bench {args.what}`'
  return None


def _empty_path(args) -> str | None:
  """`--workdir=$RUN` with RUN unset passes an empty path, which would be the current
  directory: a run's checkpoints written into it, or a run resumed from its config.json."""
  for name in _PATH_FLAGS:
    value = getattr(args, name, None)
    if isinstance(value, str) and not value.strip():
      return f'--{name} is empty (an unset shell variable?); give a path'
  return None


def _closest_key(spec: str | None, key: str) -> str | None:
  """The key of config `spec` that `key` probably means, if the config loads."""
  try:
    return config_lib.closest_key(config_lib.load(spec), key) if spec else None
  except config_lib.ConfigError:
    return None


def _misplaced(command: str, config: str | None, unknown: list[str],
               options: Sequence[str] = ()) -> str | None:
  """What an argument argparse does not know was probably meant as: a config override
  without its `--config.` (`steps=5`, MaxText's form, `--train.steps=5`, or
  `-config.train.steps=5`), the config without `--config=`, `--config` for a command that
  takes its workdir's, or one of the command's `options` spelled with '-' for '_'."""
  for arg in unknown:
    name, eq, value = arg.lstrip('-').partition('=')
    if name == 'config':
      if '--config' in options:  # `-config=...`, `config=...`
        return f'{arg}: give the config as --config={value}'
      return f'{command} takes the config of its --workdir; drop {arg}'
    meant = [f for f in ('--' + name.replace('-', '_'), '--' + name.replace('_', '-'))
             if f in options and f != '--' + name]
    if meant:  # --data-dir for --data_dir, --dry_run for --dry-run
      return f'{arg}: did you mean {meant[0]}{eq}{value}?'
    if not eq and ('.py' in arg or arg.endswith('.json')):
      return f'{arg}: give the config as --config={arg}'
    name = name.removeprefix('config.')
    if eq and name and all(part.isidentifier() for part in name.split('.')):
      key = _closest_key(config, name) or name
      return (f'{arg}: config overrides are --config.KEY=VALUE, e.g. '
              f'--config.{key}={value}')
  return None


def _raised_outside(error: Exception) -> str:
  """' (raised at FILE:LINE; ...)' for an ImportError or FileNotFoundError that code
  outside jaxarch raised (a plugin's block importing a module not installed), whose one
  line would not say where; '' for jaxarch's own, which say what to do."""
  if not isinstance(error, (ImportError, FileNotFoundError)) or error.__traceback__ is None:
    return ''
  frame = traceback.extract_tb(error.__traceback__)[-1]
  if Path(frame.filename).resolve().is_relative_to(Path(__file__).resolve().parent):
    return ''
  return (f' (raised at {frame.filename}:{frame.lineno}; JAXARCH_TRACEBACK=1 shows the '
          'traceback)')


def _options(parser: argparse.ArgumentParser, command: str) -> list[str]:
  """The option strings of `command`'s subparser ('--data_dir', ...)."""
  # pylint: disable=protected-access
  for action in parser._subparsers._group_actions:
    if command in action.choices:
      return list(action.choices[command]._option_string_actions)
  return []


_COMPILATION_CACHE_BYTES = 2 * 2**30


def _compilation_cache() -> None:
  """Keeps what XLA compiles in ($XDG_CACHE_HOME or ~/.cache)/jaxarch/jit, unless
  $JAX_COMPILATION_CACHE_DIR names another place: a resumed or repeated run then loads its
  init and train step instead of compiling them again (dense tiny on 2 CPU cores: 4.5 s
  each; its resume's first step came 5.1 s after the restore, now 1.5 s)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir:  # the user's own
    return
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache')
  jax.config.update('jax_compilation_cache_dir',
                    str(Path(cache).expanduser() / 'jaxarch' / 'jit'))
  # Every config and mesh of a sweep adds its programs (tens of MB each for a large model
  # on a GPU): the least recently used go past the cap, unless the user set one.
  if 'JAX_COMPILATION_CACHE_MAX_SIZE' not in os.environ:
    jax.config.update('jax_compilation_cache_max_size', _COMPILATION_CACHE_BYTES)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  overrides, rest = split_overrides(list(argv))
  parser = _parser()
  args, unknown = parser.parse_known_args(rest)
  if unknown:
    if (hint := _misplaced(args.command, getattr(args, 'config', None), unknown,
                           _options(parser, args.command))) is None:
      parser.error(f'unrecognized arguments: {" ".join(unknown)}')
    print(f'jaxarch: {hint}', file=sys.stderr)
    return 2
  if (problem := _empty_path(args) or _other_bench_flag(args)) is not None:
    print(f'jaxarch: {problem}', file=sys.stderr)
    return 2
  _expand_home(args)
  for said in _given_twice(overrides):
    print(f'jaxarch: warning: {said}', file=sys.stderr)
  _log_to_stderr()
  # TFDS and Orbax chat through absl at WARNING about routine things; jaxarch's own
  # warnings (e.g. an unreadable checkpoint skipped) use their module loggers.
  logging.getLogger('absl').setLevel(logging.ERROR)
  _compilation_cache()
  try:
    load_plugins()  # the user's blocks and families, before any config is read
    code = args.func(args, overrides) or 0
  except (config_lib.ConfigError, FileNotFoundError, FileExistsError, ImportError,
          GenerateError, FitError, SweepError, WorkdirError, CheckpointError,
          NonFiniteError, ExportError, OutOfMemoryError, DeviceError) as e:
    if os.environ.get('JAXARCH_TRACEBACK'):  # the whole story, for a bug in one's own code
      raise
    print(f'jaxarch: {e}{_raised_outside(e)}', file=sys.stderr)
    return DIVERGED if isinstance(e, NonFiniteError) else 2
  except KeyboardInterrupt:
    print('jaxarch: interrupted', file=sys.stderr)
    return 130
  except _StdoutRefused as e:  # a full disk under `> file`; a closed pipe (`... | head`)
    with contextlib.suppress(OSError, ValueError):  # what is left in its buffer, at exit
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if not isinstance(e.__cause__, BrokenPipeError):  # quiet, as other tools are
      print(f'jaxarch: could not write to stdout ({oserrors.reason(e.__cause__)})',
            file=sys.stderr)
    return 1
  return code


if __name__ == '__main__':
  sys.exit(main())
