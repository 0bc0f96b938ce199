"""Perplexity over token windows: jit-compiled, batched, f32 log-softmax."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.models import layers as L
from jaxprune.models.forward import head, head_params, hidden_states
from jaxprune.spec import ModelSpec, Params


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  perplexity: float
  mean_nll: float
  windows: int
  tokens: int  # predicted tokens: windows * (seq_len - 1)
  seconds: float

  @property
  def tokens_per_second(self) -> float:
    """Throughput in tokens processed (windows * seq_len) per second."""
    return self.windows * (self.tokens // max(self.windows, 1) + 1) / max(self.seconds, 1e-9)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _nll(cfg: L.BlockConfig, hp: Params, x, tokens):
  """Summed next-token NLL per window [B] from final hidden states x [B,T,D]."""
  logits = head(cfg, hp, x[:, :-1])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return -jnp.sum(picked, axis=-1)


def window_nll(spec: ModelSpec, params: Params, tokens) -> jax.Array:
  """Summed NLL of each window [B] for token windows [B,T]."""
  tokens = jnp.asarray(tokens, jnp.int32)
  x, _ = hidden_states(spec, params, tokens)
  return _nll(L.block_config(spec, 0), head_params(params), x, tokens)


def perplexity(spec: ModelSpec, params: Params, windows: np.ndarray, batch_size: int = 8,
               progress: Callable[[int], None] | None = None) -> PerplexityResult:
  """exp(mean NLL over predicted positions) of `windows` [W, L].

  The last batch is padded with copies of the first window so every batch has
  the same shape (one compilation); padded rows are dropped before summing.
  """
  windows = np.asarray(windows, np.int32)
  W, T = windows.shape
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  total = 0.0
  start = time.perf_counter()
  for b in range(0, W, batch_size):
    chunk = windows[b:b + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.repeat(windows[:1], batch_size - n, axis=0)])
    nll = np.asarray(window_nll(spec, params, chunk), np.float64)[:n]
    total += float(nll.sum())
    if progress is not None:
      progress(n)
  seconds = time.perf_counter() - start
  tokens = W * (T - 1)
  mean = total / tokens
  return PerplexityResult(math.exp(mean), mean, W, tokens, seconds)
