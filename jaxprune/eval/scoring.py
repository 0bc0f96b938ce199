"""Batched scoring and greedy decoding of token requests, as lm-eval's `hf` backend does them.

Pure JAX on a model's spec and parameters (no lm-eval import): `continuation_logprobs` for
log-likelihood requests, `greedy_generate` for generation requests. Requests are sorted by
length and run in batches padded to power-of-two lengths, so a task compiles a handful of
shapes; `jaxprune.eval.lm_eval` adapts them to the harness.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import UsageError
from jaxprune.models import decode
from jaxprune.models import layers as L
from jaxprune.models.forward import head, head_params, hidden_states
from jaxprune.spec import ModelSpec, Params

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
    logits, caches = decode.decode_step(spec, params, caches, buf[:, pos], pos)
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
  caches = decode.init_cache(spec, R, S, params["embed"]["embedding"].dtype)
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
