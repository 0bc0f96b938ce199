"""Text generation on the KV-cache decoder: temperature, top-k, top-p, EOS stop.

`generate` prefills the prompt once, then samples one token per step through
`models.decode` (a jitted step that compiles once per cache length), so a
pruned model with layers of different widths generates as a dense one does.
Sampling is seeded with a `jax.random` key: the same seed, prompt and model
give the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import UsageError
from jaxprune.models import decode
from jaxprune.spec import ModelSpec, Params


def _field(default, help: str):
  return dataclasses.field(default=default, metadata=dict(help=help))


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """How tokens are drawn. Each field's help (in its `metadata`) is also the
  `jaxprune generate` option's, and its default the option's default."""

  max_new_tokens: int = _field(64, "tokens to generate at most")
  temperature: float = _field(0.7, "sampling temperature: logits are divided by it; 0 = greedy (argmax)")
  top_p: float = _field(0.9, "nucleus sampling: keep the most likely tokens whose mass reaches top_p, 1 = off")
  top_k: int = _field(0, "keep the k most likely tokens, 0 = off")
  seed: int = _field(0, "jax.random seed: the same seed, prompt and model give the same tokens")
  stop: tuple[int, ...] = _field((), "token ids that end a row (EOS); the stop token is included in the output")

  def check(self) -> "SampleConfig":
    if self.max_new_tokens < 1:
      raise UsageError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
    if not self.temperature >= 0:
      raise UsageError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise UsageError(f"top_p must lie in (0, 1] (1 keeps every token), got {self.top_p}")
    if self.top_k < 0:
      raise UsageError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
    return self


def filter_top_p(logits, top_p: float):
  """Sets to -inf every logit [B,V] outside the nucleus of mass top_p.

  Tokens are kept in order of probability while the mass *before* them is
  below top_p, so the most likely token always stays; ties at the cut stay too.
  """
  srt = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(srt, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  cut = jnp.min(jnp.where(before < top_p, srt, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cut, -jnp.inf, logits)


def filter_top_k(logits, top_k: int):
  """Sets to -inf every logit [B,V] below the k-th largest of its row."""
  kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


@functools.partial(jax.jit, static_argnames=("greedy", "top_p", "top_k"))
def pick(logits, key, temperature, greedy: bool, top_p: float, top_k: int):
  """Next tokens [B] int32 from logits [B,V] (temperature, then top-k, then top-p, as transformers orders them)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    logits = filter_top_k(logits, top_k)
  if top_p < 1:
    logits = filter_top_p(logits, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(spec: ModelSpec, params: Params, prompt, config: SampleConfig = SampleConfig()) -> np.ndarray:
  """New tokens [B, n] after prompt token ids [B, P] (rows of equal length), n <= max_new_tokens.

  Generation stops when every row has produced a stop token; rows that stopped
  earlier are filled with their stop token from there on.
  """
  config.check()
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise UsageError(f"prompt must be token ids [batch, length >= 1], got shape {prompt.shape}")
  B, P = prompt.shape
  length = P + config.max_new_tokens
  if length > spec.max_positions:
    raise UsageError(f"prompt ({P} tokens) + max_new_tokens ({config.max_new_tokens}) = {length} exceeds the model's "
                     f"{spec.max_positions} positions; shorten the prompt or lower --max-new-tokens")
  greedy = config.temperature == 0
  temperature = jnp.float32(config.temperature if not greedy else 1.0)
  top_p, top_k = float(config.top_p), int(config.top_k)
  stop = np.asarray(config.stop, np.int32)

  caches = decode.init_cache(spec, B, length, params["embed"]["embedding"].dtype)
  logits, caches = decode.prefill_jit(spec, params, caches, jnp.asarray(prompt), 0)
  last = logits[:, -1]
  key = jax.random.key(config.seed)
  out, done = [], np.zeros(B, bool)
  for t in range(config.max_new_tokens):
    key, sub = jax.random.split(key)
    tok = np.asarray(pick(last, sub, temperature, greedy, top_p, top_k))
    tok = np.where(done, out[-1] if out else tok, tok)  # finished rows repeat their stop token
    out.append(tok)
    done |= np.isin(tok, stop)
    if done.all() or t + 1 == config.max_new_tokens:
      break
    last, caches = decode.step_jit(spec, params, caches, jnp.asarray(tok), P + t)
  return np.stack(out, axis=1)
