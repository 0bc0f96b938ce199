"""Damped least squares from sufficient statistics (METHOD.md section 4).

    W' = argmin ||X W - Y||^2 + lam ||W||^2 = (X^T X + lam I)^-1 X^T Y,
    lam = delta * mean(diag(X^T X)),

solved by Cholesky in float64 where the platform has it (CPU, GPU) and in
float32 elsewhere. A failed factorisation (non-finite result) is retried with
10x the damping, and every retry is reported, never silently skipped. With an
intercept the augmented system [X 1] is solved and the ones column is not
damped, so the fitted bias is the exact least-squares bias.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from jaxprune.sharding import local_copy, replicate_like
from jaxprune.stats.moments import Moments

log = logging.getLogger(__name__)

MAX_RETRIES = 6


@dataclasses.dataclass(frozen=True)
class SolveInfo:
  """What a solve did: the damping finally used and how many retries it took."""

  delta: float
  retries: int


def solve_dtype():
  return jnp.float32 if jax.default_backend() == "tpu" else jnp.float64


@functools.partial(jax.jit, static_argnames=("intercept",))
def _solve(xx, xy, delta, intercept: bool):
  """W (d[+1], e) for augmented sums xx (d+1, d+1), xy (d+1, e)."""
  d = xx.shape[0] - 1
  if not intercept:
    xx, xy = xx[:d, :d], xy[:d]
  lam = delta * jnp.mean(jnp.diagonal(xx)[:d])
  lam = jnp.where(lam > 0, lam, delta)  # an all-zero input still gets a positive ridge
  ridge = jnp.concatenate([jnp.full((d,), lam), jnp.zeros((xx.shape[0] - d,))]).astype(xx.dtype)
  a = xx + jnp.diag(ridge)
  c = jax.scipy.linalg.cho_factor(a, lower=True)
  return jax.scipy.linalg.cho_solve(c, xy)


def ridge_solve(m: Moments, xy: jax.Array, delta: float, intercept: bool, what: str = "") -> tuple[jax.Array,
                                                                                                  SolveInfo]:
  """Solves for W given Moments of X and X^T Y (augmented rows, (d+1, e)).

  Returns W with d rows (no intercept) or d+1 rows (the last row is the bias),
  in float32, and a SolveInfo.
  """
  dt = solve_dtype()
  with jax.enable_x64(dt == jnp.float64):
    xx, xy64 = jnp.asarray(local_copy(m.xx), dt), jnp.asarray(local_copy(xy), dt)
    for retry in range(MAX_RETRIES + 1):
      w = _solve(xx, xy64, jnp.asarray(delta, dt), intercept)
      if bool(jnp.all(jnp.isfinite(w))):
        break
      log.warning("Cholesky failed for %s at damping %.1e; retrying with %.1e", what or "a solve", delta, delta * 10)
      delta *= 10
    else:
      raise FloatingPointError(f"least-squares solve for {what} failed even at damping {delta:.1e}; the calibration "
                               "statistics are not finite (check the input data and model weights)")
    return replicate_like(jnp.asarray(w, jnp.float32), m.xx), SolveInfo(delta=float(delta), retries=retry)


@jax.jit
def _residual(g, c, yy, w):
  return jnp.maximum(jnp.sum(w * (g @ w)) - 2 * jnp.sum(w * c) + yy, 0.0)


def residual(m: Moments, xy: jax.Array, yy: jax.Array, w: jax.Array) -> jax.Array:
  """||[X 1] W - Y||^2 from sums: tr(W^T G W) - 2 tr(W^T X^T Y) + ||Y||^2.

  `w` has d rows (no intercept) or d+1 rows (last row = bias).
  """
  dt = solve_dtype()
  with jax.enable_x64(dt == jnp.float64):
    k = w.shape[0]
    g = jnp.asarray(local_copy(m.xx)[:k, :k], dt)
    c = jnp.asarray(local_copy(xy)[:k], dt)
    r = _residual(g, c, jnp.asarray(local_copy(yy), dt), jnp.asarray(local_copy(w), dt))
    return jnp.asarray(r, jnp.float32)
