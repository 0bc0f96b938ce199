"""`jaxprune generate MODEL --prompt TEXT`: sample a continuation with the KV-cache decoder.

The prompt is tokenized by the model's own tokenizer; with --chat it is first
wrapped as one user turn by the tokenizer's chat template (SmolLM2-Instruct has
one). Generation stops at the tokenizer's or the model's EOS token or after
--max-new-tokens. The continuation goes to stdout, timing to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from jaxprune.cli import fields
from jaxprune.errors import UsageError
from jaxprune.generate import SampleConfig

_NOT_OPTIONS = ("stop",)  # set from the tokenizer and the model, not by the user


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """What `jaxprune generate` does, independent of argparse."""

  model: str
  prompt: str
  chat: bool = False
  dtype: str = "float32"
  sample: SampleConfig = SampleConfig()


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser("generate", help="sample text from a model (KV-cache decoder)", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", help="built-in name (smollm2-135m), Hugging Face or pruned directory, .gguf file or Hub id")
  p.add_argument("--prompt", required=True, help="text to continue (or, with --chat, the user's message)")
  p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to the prompt")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="parameter dtype")
  fields.add_options(p.add_argument_group("sampling (SampleConfig fields)"), SampleConfig, skip=_NOT_OPTIONS)
  return p


def config_from_args(args) -> GenerateConfig:
  given = fields.given(args, SampleConfig, skip=_NOT_OPTIONS)
  sample = SampleConfig(**fields.parse_all(SampleConfig, given, lambda name: f"option {fields.flag(name)}"))
  return GenerateConfig(model=args.model, prompt=args.prompt, chat=args.chat, dtype=args.dtype, sample=sample)


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
  """Token ids of the prompt, as one user turn of the chat template when `chat`."""
  if chat:
    if not getattr(tokenizer, "chat_template", None):
      raise UsageError("--chat was given but the model's tokenizer has no chat template; drop --chat to continue "
                       "the prompt as plain text")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
  return list(tokenizer(prompt)["input_ids"])


def stop_ids(tokenizer, spec) -> tuple[int, ...]:
  """EOS ids of the tokenizer and of the model config (they differ for some chat models)."""
  ids = {getattr(tokenizer, "eos_token_id", None), spec.eos_token_id}
  return tuple(sorted(int(i) for i in ids if i is not None))


def run_generate(cfg: GenerateConfig):
  """Returns (continuation text, number of new tokens, seconds)."""
  import jaxprune
  from jaxprune.cli.eval_cmd import load_model
  from jaxprune.generate import generate

  sample = cfg.sample.check()  # before the (slower) model load
  if not cfg.prompt:
    raise UsageError("--prompt is empty; give the text to continue")
  tokenizer = jaxprune.load_tokenizer(cfg.model)  # the prompt's problems show before the slower model load
  ids = prompt_ids(tokenizer, cfg.prompt, cfg.chat)
  if not ids:
    raise UsageError(f"the prompt {cfg.prompt!r} tokenizes to no tokens; give a longer prompt")
  model = load_model(cfg.model, cfg.dtype, sys.stderr.isatty())
  sample = dataclasses.replace(sample, stop=stop_ids(tokenizer, model.spec))
  t0 = time.perf_counter()
  new = generate(model.spec, model.params, [ids], sample)[0]
  seconds = time.perf_counter() - t0
  return tokenizer.decode(new.tolist(), skip_special_tokens=True), len(new), seconds


def run(args) -> int:
  text, n, seconds = run_generate(config_from_args(args))
  print(text.strip())
  print(f"{n} tokens in {seconds:.1f}s ({n / seconds:.1f} tokens/s, including compilation)", file=sys.stderr)
  return 0
