"""lm-evaluation-harness backend: `--model jaxprune` runs the JAX model, whatever its per-layer shapes.

Importing this module registers the model type "jaxprune" with lm-eval's model
registry. lm-eval (0.4.x) finds model types only through imports (its registry
scans no plugin entry points), so the harness must run with this module
imported:

    python -m jaxprune.eval.lm_eval --model jaxprune --model_args pretrained=DIR,batch_size=8 --tasks piqa

is lm-eval's own command line (every option of `lm_eval`) with the registration
done first; `jaxprune eval MODEL --tasks piqa` runs the harness in-process, and
from Python `import jaxprune.eval.lm_eval` makes `lm_eval.simple_evaluate(model="jaxprune", ...)` work.

The numerics follow lm-eval's `hf` backend: the same tokenization rules
(`tok_encode`, empty contexts scored after the prefix token, left truncation to
`max_length + 1` tokens, rolling windows from `lm_eval.utils`), float32
log-softmax, and greedy decoding cut at the first stop string; the batched JAX
scoring and decoding are in `jaxprune.eval.scoring`. One difference, for tokenizers
that add BOS: a rolling document is its text's tokens after the prefix token (BOS),
all of them scored, as perplexity windows are; `hf` encodes the document with its
BOS and then scores that BOS after the prefix BOS.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Sequence

import jax

# Built-in model types first: lm-eval fills its registry lazily only while it is
# empty, so registering "jaxprune" first would hide "hf" and the others.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jaxprune.data.windows import bos_prefix
from jaxprune.errors import UsageError
from jaxprune.eval.scoring import continuation_logprobs, greedy_generate

log = logging.getLogger(__name__)


def _register(cls):
  # `python -m jaxprune.eval.lm_eval` executes this file as __main__ and then
  # imports it under its real name (see the end of the file); only that copy
  # registers, so the registry holds one importable class.
  return cls if __name__ == "__main__" else register_model("jaxprune")(cls)


def _positive_int(name: str, value) -> int:
  try:
    v = int(value)
  except (TypeError, ValueError):
    v = 0
  if v < 1 or (isinstance(value, float) and value != v):
    raise UsageError(f"{name} must be a positive integer, got {value!r}; jaxprune does not pick batch sizes "
                     f"automatically, pass e.g. {name}=8")
  return v


@_register
class JaxpruneLM(TemplateLM):
  """lm-eval's `LM` over a jaxprune model: loglikelihood, loglikelihood_rolling, generate_until.

  Args:
    pretrained: what `jaxprune.load` accepts (smollm2-135m, a Hugging Face or
      jaxprune directory, a .gguf file, an Orbax checkpoint).
    model: an in-memory `jaxprune.Model` instead of `pretrained` (e.g. straight after pruning).
    tokenizer: a transformers tokenizer or a path/name for `jaxprune.load_tokenizer`
      (default: the model's own, from its directory or GGUF).
    batch_size: requests per forward pass.
    dtype: parameter dtype when loading (float32 or bfloat16; log-softmax is float32 either way).
    max_length: the longest input (default: the model's `max_positions`, as lm-eval's `hf` backend).
    max_gen_toks: default generation budget of `generate_until` (256, as `hf`).
    add_bos_token: whether requests are encoded with the tokenizer's special tokens, as in
      lm-eval's `hf` backend; default: whether the tokenizer adds BOS (`data.bos_prefix`), so a
      model like Gemma sees BOS before every context, as its perplexity windows do.
    prefix_token_id: as in lm-eval's `hf` backend.
    device, max_batch_size: accepted for command-line compatibility; JAX places
      the computation on its default device (set JAX_PLATFORMS to choose).
  """

  def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, batch_size=8,
               max_batch_size=None, device=None, dtype: str = "float32", max_length: int | None = None,
               max_gen_toks: int = 256, add_bos_token: bool | None = None, prefix_token_id: int | None = None,
               **unknown):
    super().__init__()
    import jaxprune

    if unknown:
      raise UsageError(f"unknown model_args for --model jaxprune: {', '.join(sorted(unknown))}; accepted: "
                       "pretrained, tokenizer, batch_size, dtype, max_length, max_gen_toks, add_bos_token, "
                       "prefix_token_id")
    if (model is None) == (pretrained is None):
      raise UsageError("pass exactly one of pretrained=NAME_OR_DIR (model_args) and model= (a jaxprune.Model)")
    if device is not None:
      log.info("device=%s is not used: JAX runs on its default device %s (JAX_PLATFORMS chooses)", device,
               jax.devices()[0])
    self.model = jaxprune.load(pretrained, dtype=dtype) if model is None else model
    if tokenizer is None or isinstance(tokenizer, str):
      tokenizer = jaxprune.load_tokenizer(tokenizer or self.model.source or pretrained)
    self.tokenizer = tokenizer
    self._batch_size = _positive_int("batch_size", batch_size)
    spec = self.model.spec
    self._max_length = _positive_int("max_length", max_length) if max_length is not None else spec.max_positions
    if spec.fam.positions == "learned" and self._max_length > spec.max_positions:
      raise UsageError(f"max_length {self._max_length} exceeds the model's {spec.max_positions} learned positions; "
                       f"use max_length={spec.max_positions} or less")
    self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
    self.add_bos_token = bool(bos_prefix(tokenizer)) if add_bos_token is None else add_bos_token
    self.custom_prefix_token_id = prefix_token_id
    self.pretrained = pretrained

  # Properties lm-eval reads.
  @property
  def eot_token_id(self) -> int:
    eos = self.tokenizer.eos_token_id
    return self.model.spec.eos_token_id if eos is None else eos

  @property
  def prefix_token_id(self) -> int:
    if self.custom_prefix_token_id is not None:
      return self.custom_prefix_token_id
    if self.tokenizer.bos_token_id is not None:
      return self.tokenizer.bos_token_id
    return self.eot_token_id

  # What lm-eval reads of a model: fixed when it is built.
  max_length = property(lambda self: self._max_length)
  max_gen_toks = property(lambda self: self._max_gen_toks)
  batch_size = property(lambda self: self._batch_size)

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tokenizer, "name_or_path", "jaxprune")).replace("/", "__")

  def get_model_info(self) -> dict:
    spec = self.model.spec
    return {"model_num_parameters": self.model.num_params, "model_dtype": str(self.model.params["embed"]["embedding"].dtype),
            "model_family": spec.family, "model_layers": spec.num_layers, "model_source": self.model.source}

  # Tokenization, as lm-eval's `hf` backend does it.
  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                 **kwargs) -> list[int]:
    kw = {}
    if add_special_tokens is not None:
      kw["add_special_tokens"] = add_special_tokens
    elif self.add_bos_token is not None:
      kw["add_special_tokens"] = self.add_bos_token
    if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
      kw["add_special_tokens"] = False  # the string already starts with BOS
    ids = self.tokenizer.encode(string, **kw)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                              continue_final_message=not add_generation_prompt)

  # Requests.
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    from tqdm import tqdm

    with tqdm(total=len(requests), disable=disable_tqdm, desc="jaxprune loglikelihood") as bar:
      res = continuation_logprobs(self.model.spec, self.model.params, [(c, t) for _, c, t in requests],
                                  batch_size=self.batch_size, max_length=self.max_length, progress=bar.update)
    for (key, _, _), answer in zip(requests, res):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
    return res

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
          # The prefix token is the BOS a BOS-adding tokenizer would put first: the text goes without it.
          token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((None, ctx, cont))
        owner.append(i)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for i, (lp, _) in zip(owner, scores):
      totals[i] += lp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    from tqdm import tqdm

    eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    out: list[str | None] = [None] * len(requests)
    with tqdm(total=len(requests), disable=disable_tqdm, desc="jaxprune generate_until") as bar:
      for idx in groups.values():
        until, max_gen = self._generation_settings(requests[idx[0]].args[1])
        stops = until + ([eos] if eos and eos not in until else [])
        prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen) for i in idx}
        order = sorted(idx, key=lambda i: -len(prompts[i]))
        for b in range(0, len(order), self.batch_size):
          chunk = order[b:b + self.batch_size]
          gen = greedy_generate(self.model.spec, self.model.params, [prompts[i] for i in chunk], max_gen,
                                eos_token_id=self.eot_token_id, max_length=self.max_length,
                                should_stop=lambda t: any(s in self.tok_decode(t) for s in until))
          for i, toks in zip(chunk, gen):
            text = self.tok_decode(toks)
            for s in stops:
              if s:
                text = text.split(s)[0]
            out[i] = text
            self.cache_hook.add_partial("generate_until", requests[i].args, text)
          bar.update(len(chunk))
    return out

  def _generation_settings(self, kwargs: dict) -> tuple[list[str], int]:
    """(stop strings, new-token budget) of a request's generation kwargs; only greedy decoding is offered."""
    kwargs = dict(kwargs or {})
    until = kwargs.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    max_gen = self.max_gen_toks
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
      if kwargs.get(key) is not None:
        max_gen = _positive_int(key, kwargs.pop(key))
        break
    sampling = kwargs.pop("do_sample", False)
    temperature = kwargs.pop("temperature", 0.0)
    if sampling and (temperature is None or temperature > 0):
      raise UsageError(f"the task asks for sampling (do_sample={sampling}, temperature={temperature}); the jaxprune "
                       "backend decodes greedily; pass --gen_kwargs do_sample=false")
    if max_gen >= self.max_length:
      raise UsageError(f"max_gen_toks {max_gen} leaves no room for a prompt within max_length {self.max_length}; "
                       "generate fewer tokens")
    return until, max_gen


def main(argv: Sequence[str] | None = None) -> int:
  """lm-eval's command line with the "jaxprune" model type registered."""
  from lm_eval.__main__ import cli_evaluate

  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  cli_evaluate()
  return 0


if __name__ == "__main__":
  from jaxprune.eval.lm_eval import main as _main  # registers the importable JaxpruneLM

  sys.exit(_main())
