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
log-softmax, and greedy decoding cut at the first stop string. Requests are
sorted by length and run in batches padded to power-of-two lengths, so a task
compiles a handful of shapes.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Built-in model types first: lm-eval fills its registry lazily only while it is
# empty, so registering "jaxprune" first would hide "hf" and the others.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jaxprune.data.selfgen import _decode_step  # the KV-cache step of self-generated calibration
from jaxprune.errors import UsageError
from jaxprune.models import layers as L
from jaxprune.models.forward import head, head_params, hidden_states
from jaxprune.spec import ModelSpec, Params

log = logging.getLogger(__name__)

F32 = jnp.float32
MIN_LENGTH_BUCKET = 16  # shortest padded length: below it, more compiles cost more than padding
DECODE_CHUNK = 32  # greedy steps per jitted call between host checks of the stop strings


def length_bucket(n: int, cap: int | None = None) -> int:
  """The padded length for `n` tokens: the next power of two (at least 16), at most `cap`."""
  b = max(MIN_LENGTH_BUCKET, 1 << max(n - 1, 0).bit_length())
  return min(b, cap) if cap else b


def _row_bucket(n: int, batch_size: int) -> int:
  """Rows a batch of `n` requests is padded to: a power of two, at most `batch_size`."""
  return min(batch_size, 1 << max(n - 1, 0).bit_length())


@functools.partial(jax.jit, static_argnames=("cfg",))
def _target_logprobs(cfg: L.BlockConfig, hp: Params, x, targets):
  """log p(target) [B,T] (f32) and whether the target is the argmax [B,T], from final hidden states x [B,T,D]."""
  logits = head(cfg, hp, x).astype(F32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  # log_softmax(logits)[target] without a second [B,T,V] array.
  return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets


def target_logprobs(spec: ModelSpec, params: Params, inputs, targets) -> tuple[jax.Array, jax.Array]:
  """Per-position log-probabilities of `targets` [B,T] after `inputs` [B,T], and greedy matches [B,T]."""
  inputs = jnp.asarray(inputs, jnp.int32)
  x, _ = hidden_states(spec, params, inputs)
  return _target_logprobs(L.block_config(spec, 0), head_params(params), x, jnp.asarray(targets, jnp.int32))


def continuation_logprobs(spec: ModelSpec, params: Params, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                          *, batch_size: int = 8, max_length: int | None = None,
                          progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
  """log p(continuation | context) and "greedy decoding gives the continuation", per request.

  A request is scored on `(context + continuation)[-(max_length + 1):]` (lm-eval's
  left truncation): the model reads all but its last token and the last
  `len(continuation)` predictions are summed. Requests run longest first in
  batches of `batch_size` rows, right-padded to `length_bucket` tokens; causal
  attention keeps the padding out of every real position.

  Args:
    requests: (context ids, continuation ids) pairs; both non-empty.
    max_length: the longest input the model reads (default: `spec.max_positions`).

  Returns:
    (summed log-probability, all continuation tokens are the argmax) per request, in order.
  """
  max_length = max_length or spec.max_positions
  if batch_size < 1:
    raise UsageError(f"batch_size must be positive, got {batch_size}; use 1 or more")
  rows = []
  for i, (ctx, cont) in enumerate(requests):
    if not len(ctx) or not len(cont):
      raise UsageError(f"request {i} has {len(ctx)} context and {len(cont)} continuation tokens; both must be "
                       "non-empty (score an empty context after a BOS/EOS prefix token)")
    if len(cont) > max_length:
      raise UsageError(f"request {i}'s continuation has {len(cont)} tokens, more than max_length {max_length}; "
                       "raise max_length or shorten the continuation")
    full = (list(ctx) + list(cont))[-(max_length + 1):]
    rows.append((full, len(cont)))
  out: list[tuple[float, bool] | None] = [None] * len(rows)
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  R = _row_bucket(len(rows), batch_size)  # one row count per call: the last, short batch compiles nothing new
  for b in range(0, len(order), batch_size):
    chunk = order[b:b + batch_size]
    T = length_bucket(len(rows[chunk[0]][0]) - 1, max_length)
    inputs = np.zeros((R, T), np.int32)
    targets = np.zeros((R, T), np.int32)
    for r, i in enumerate(chunk):
      full = rows[i][0]
      inputs[r, :len(full) - 1] = full[:-1]
      targets[r, :len(full) - 1] = full[1:]
    logp, greedy = (np.asarray(a) for a in target_logprobs(spec, params, inputs, targets))
    for r, i in enumerate(chunk):
      full, n = rows[i]
      end = len(full) - 1
      out[i] = (float(logp[r, end - n:end].sum(dtype=np.float64)), bool(greedy[r, end - n:end].all()))
    if progress is not None:
      progress(len(chunk))
  return out


@functools.partial(jax.jit, static_argnames=("spec",))
def _greedy_range(spec: ModelSpec, params: Params, caches, buf, lens, start, stop):
  """Runs positions [start, stop): reads buf[:, p], writes buf[:, p+1] (the prompt's token while p+1 < lens, else the argmax)."""
  def body(pos, state):
    buf, caches = state
    logits, caches = _decode_step(spec, params, caches, buf[:, pos], pos)
    nxt = jnp.where(pos + 1 < lens, buf[:, pos + 1], jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return buf.at[:, pos + 1].set(nxt), caches

  return jax.lax.fori_loop(start, stop, body, (buf, caches))


def greedy_generate(spec: ModelSpec, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    eos_token_id: int | None = None, max_length: int | None = None,
                    should_stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
  """Greedy continuations of a batch of prompts, with a per-layer KV cache.

  All rows share positions: row i reads its own prompt while the position is
  inside it (teacher forcing through the cache) and its argmax after, so prompts
  of different lengths need no padding masks. Decoding runs `DECODE_CHUNK` steps
  per jitted call; between calls the host stops rows that produced
  `eos_token_id`, `max_new_tokens` tokens, or for which `should_stop(tokens)`
  holds (e.g. a stop string appeared), and ends when every row has stopped.

  Returns:
    The generated ids of each prompt (without the EOS token), at most `max_new_tokens` each.
  """
  max_length = max_length or spec.max_positions
  lens = [len(p) for p in prompts]
  if not prompts or min(lens) < 1:
    raise UsageError("greedy_generate needs at least one prompt and no empty prompt; start empty prompts with BOS")
  if max(lens) + max_new_tokens > max_length:
    raise UsageError(f"a {max(lens)}-token prompt plus {max_new_tokens} new tokens exceeds max_length {max_length}; "
                     "truncate the prompts from the left or generate fewer tokens")
  n, Lmax = len(prompts), max(lens)
  R = _row_bucket(n, n)
  S = length_bucket(Lmax + max_new_tokens, max_length)
  buf = np.zeros((R, S), np.int32)
  row_lens = np.full((R,), lens[0], np.int32)
  for r in range(R):  # padding rows repeat the first prompt
    p = prompts[r] if r < n else prompts[0]
    buf[r, :len(p)] = p
    row_lens[r] = len(p)
  dtype = params["embed"]["embedding"].dtype
  caches = tuple((jnp.zeros((R, S, l.num_kv_heads, l.head_dim), dtype),
                  jnp.zeros((R, S, l.num_kv_heads, l.head_dim), dtype)) for l in spec.layers)
  buf, lens_d = jnp.asarray(buf), jnp.asarray(row_lens)
  end = Lmax - 1 + max_new_tokens  # the last row's last new token is written from position end - 1
  gen: list[list[int]] = [[] for _ in range(n)]
  done = [False] * n
  pos = 0
  while pos < end and not all(done):
    stop = min(end, max(pos + DECODE_CHUNK, min(lens) - 1 + DECODE_CHUNK))
    buf, caches = _greedy_range(spec, params, caches, buf, lens_d, jnp.int32(pos), jnp.int32(stop))
    host = np.asarray(buf)
    for i in range(n):
      if done[i]:
        continue
      toks = host[i, lens[i]:min(stop + 1, lens[i] + max_new_tokens)].tolist()
      if eos_token_id is not None and eos_token_id in toks:
        toks, done[i] = toks[:toks.index(eos_token_id)], True
      gen[i] = toks
      if len(toks) >= max_new_tokens or (should_stop is not None and should_stop(toks)):
        done[i] = True
    pos = stop
  return gen


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
    add_bos_token, prefix_token_id: as in lm-eval's `hf` backend.
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
    self.add_bos_token = add_bos_token
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

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

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
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)):
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
