"""Data-free calibration: text the model writes itself, and random token windows.

Sampling runs entirely under one `jax.jit`: a `lax.fori_loop` over positions
with the per-layer KV cache of `models.decode` (layers may differ in shape),
seeded with a `jax.random` key, so the same seed gives the same windows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import UsageError
from jaxprune.models import decode
from jaxprune.spec import ModelSpec, Params


# The decoder lives in models/decode.py (shared with `jaxprune generate`); the old name stays importable.
_decode_step = decode.decode_step


@functools.partial(jax.jit, static_argnames=("spec", "batch", "length", "top_k"))
def _sample(spec: ModelSpec, params: Params, key, first, batch: int, length: int, temperature, top_k: int):
  caches = decode.init_cache(spec, batch, length, params["embed"]["embedding"].dtype)
  out = jnp.zeros((batch, length), jnp.int32).at[:, 0].set(first)

  def body(pos, state):
    out, caches, key = state
    logits, caches = _decode_step(spec, params, caches, out[:, pos], pos)
    key, sub = jax.random.split(key)
    logits = logits / temperature
    if top_k:
      kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    nxt = jax.random.categorical(sub, logits, axis=-1).astype(jnp.int32)
    return out.at[:, pos + 1].set(nxt), caches, key

  out, _, _ = jax.lax.fori_loop(0, length - 1, body, (out, caches, key))
  return out


def self_generated(spec: ModelSpec, params: Params, n: int, seq_len: int, seed: int = 0, *, temperature: float = 1.0,
                   top_k: int = 50, batch_size: int = 32, first_token: int | None = None) -> np.ndarray:
  """`n` windows [n, seq_len] sampled by the model itself, each starting from BOS.

  Args:
    first_token: the token every window starts with (default: the model's BOS id).
  """
  first = spec.bos_token_id if first_token is None else first_token
  if first is None:
    raise UsageError("the model declares no BOS token id to start self-generated text from; pass first_token")
  if seq_len > spec.max_positions:
    raise UsageError(f"seq_len {seq_len} exceeds the model's {spec.max_positions} positions")
  if not temperature > 0:
    raise UsageError(f"temperature must be positive, got {temperature}")
  key = jax.random.key(seed)
  rows = []
  for start in range(0, n, batch_size):
    key, sub = jax.random.split(key)
    rows.append(np.asarray(_sample(spec, params, sub, jnp.int32(first), batch_size, seq_len,
                                   jnp.float32(temperature), int(top_k or 0))))
  return np.concatenate(rows)[:n]


def random_tokens(vocab_size: int, n: int, seq_len: int, seed: int = 0) -> np.ndarray:
  """Uniformly random token windows [n, seq_len] (data-free statistics, METHOD.md 2(b))."""
  return np.random.default_rng(seed).integers(0, vocab_size, size=(n, seq_len), dtype=np.int32)
