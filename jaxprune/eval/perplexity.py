"""Perplexity over token windows: jit-compiled, batched, f32 log-softmax.

Every position but the last predicts the next token, so a window [T] scores T - 1 tokens:
the N - 1 after the first of a plain N-token window, or all N of a window fed after BOS
(`[BOS] + N`, `jaxprune.data.bos_prefix`), whose first token is predicted from BOS.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import CheckpointError, UsageError
from jaxprune.io.lazy import is_lazy
from jaxprune.models import layers as L
from jaxprune.models.forward import block_step, embed, head, head_params, hidden_states, positions_for
from jaxprune.spec import ModelSpec, Params


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  perplexity: float
  mean_nll: float
  windows: int
  tokens: int  # predicted tokens: windows * (T - 1), T the fed length (with BOS: T - 1 = seq_len)
  seconds: float

  @property
  def tokens_per_second(self) -> float:
    """Throughput in tokens processed (windows * seq_len) per second."""
    return self.windows * (self.tokens // max(self.windows, 1) + 1) / max(self.seconds, 1e-9)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _nll(cfg: L.BlockConfig, hp: Params, x, tokens):
  """Summed next-token NLL per window [B] from final hidden states x [B,T,D]."""
  logits = head(cfg, hp, x[:, :-1]).astype(jnp.float32)
  # -log_softmax(logits)[target] = logsumexp(logits) - logits[target]: the same f32 log-softmax, without
  # writing a second [B,T,V] array of log-probabilities.
  picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - picked, axis=-1)


def window_nll(spec: ModelSpec, params: Params, tokens) -> jax.Array:
  """Summed NLL of each window [B] for token windows [B,T]."""
  tokens = jnp.asarray(tokens, jnp.int32)
  x, _ = hidden_states(spec, params, tokens)
  return _nll(L.block_config(spec, 0), head_params(params), x, tokens)


def perplexity(spec: ModelSpec, params: Params, windows: np.ndarray, batch_size: int = 8,
               progress: Callable[[int], None] | None = None, finite: bool = False) -> PerplexityResult:
  """exp(mean NLL over predicted positions) of `windows` [W, L].

  The last batch is padded with copies of the first window so every batch has
  the same shape (one compilation); padded rows are dropped before summing.

  Args:
    finite: raise CheckpointError at the first window whose NLL is not finite (NaN or
      infinite logits), instead of returning a perplexity of nan or inf (which a caller
      that must not lose the model it evaluates, e.g. after pruning or healing, reports).
  """
  windows = np.asarray(windows, np.int32)
  W, T = windows.shape
  if batch_size < 1:
    raise UsageError(f"batch_size must be positive, got {batch_size}; use 1 or more")
  if spec.fam.positions == "learned" and T > spec.max_positions:
    # jnp.take would silently clamp positions past the table.
    raise UsageError(f"windows of {T} tokens are longer than the model's {spec.max_positions} positions; "
                     f"use --seq-len {spec.max_positions} or less")
  start = time.perf_counter()
  if is_lazy(params):  # blocks read one at a time (jaxprune.io.lazy)
    total = _streamed_nll(spec, params, windows, batch_size, progress, finite)
    return _result(total, W, T, time.perf_counter() - start)
  total = 0.0
  for b in range(0, W, batch_size):
    chunk = windows[b:b + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.repeat(windows[:1], batch_size - n, axis=0)])
    nll = np.asarray(window_nll(spec, params, chunk), np.float64)[:n]
    if finite:
      _check_finite(nll, b, W, params)
    total += float(nll.sum())
    if progress is not None:
      progress(n)
  return _result(total, W, T, time.perf_counter() - start)


def _check_finite(nll: np.ndarray, first: int, W: int, params: Params) -> None:
  """Stops at the first window (of the batch starting at window `first`) with a non-finite NLL."""
  bad = np.flatnonzero(~np.isfinite(nll))
  if len(bad):
    dtype = params["embed"]["embedding"].dtype
    raise CheckpointError(f"the model produced non-finite logits (NaN or inf) in window {first + int(bad[0])} of "
                          f"{W}; check its weights for NaN or inf values, or for values that overflow in {dtype} "
                          "(evaluate with --dtype float32)")


def _result(total: float, W: int, T: int, seconds: float) -> PerplexityResult:
  tokens = W * (T - 1)
  mean = total / tokens
  # math.exp raises OverflowError past a mean NLL of ~709 nats; such a model's perplexity is inf.
  return PerplexityResult(math.inf if mean > 709 else math.exp(mean), mean, W, tokens, seconds)


def _streamed_nll(spec: ModelSpec, params: Params, windows: np.ndarray, batch_size: int, progress,
                  finite: bool) -> float:
  """The summed NLL of `windows` with the loops swapped: every batch through block i, then
  block i + 1, so each block is read once. The same per-batch kernels as the eager path,
  so the same numbers; the residual streams of all windows are held instead of the blocks."""
  W = len(windows)
  pad = (-W) % batch_size
  chunks = np.concatenate([windows, np.repeat(windows[:1], pad, axis=0)]).reshape(-1, batch_size, windows.shape[1])
  toks = [jnp.asarray(c) for c in chunks]
  pos = positions_for(toks[0])
  xs = [embed(spec, params, t, pos) for t in toks]
  for i in range(spec.num_layers):
    blk, cfg = params["layers"][i], L.block_config(spec, i)
    xs = [block_step(cfg, blk, x, pos)[0] for x in xs]
  total, hp = 0.0, head_params(params)
  for b, (x, t) in enumerate(zip(xs, toks)):
    n = min(batch_size, W - b * batch_size)
    nll = np.asarray(_nll(L.block_config(spec, 0), hp, x, t), np.float64)[:n]
    if finite:
      _check_finite(nll, b * batch_size, W, params)
    total += float(nll.sum())
    if progress is not None:
      progress(n)
  return total
