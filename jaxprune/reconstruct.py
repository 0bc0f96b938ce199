"""Damped least squares from sufficient statistics (METHOD.md section 4).

    W' = argmin ||X W - Y||^2 + lam ||W||^2 = (X^T X + lam I)^-1 X^T Y,
    lam = delta * mean(diag(X^T X)),

solved by Cholesky in float64: on the GPU, and with SciPy's LAPACK on the CPU
(the CPU backend, and the host of a TPU, which has no float64), since a float32
Cholesky of an ill-conditioned Gram matrix loses the small directions the fit
needs. A failed factorisation (non-finite result) is retried with
10x the damping, and every retry is reported, never silently skipped. With an
intercept the augmented system [X 1] is solved and the ones column is not
damped, so the fitted bias is the exact least-squares bias.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprune.sharding import MODEL, local_copy, replicate_like
from jaxprune.stats.moments import Moments

log = logging.getLogger(__name__)

MAX_RETRIES = 6


@dataclasses.dataclass(frozen=True)
class SolveInfo:
  """What a solve did: the damping finally used, how many retries it took and, when
  ||Y||^2 was given, the residual ||[X 1] W - Y||^2 of its (float64) solution."""

  delta: float
  retries: int
  residual: float | None = None


def solve_on_host() -> bool:
  """Platforms without float64 arithmetic (TPU) solve in float64 on the host CPU."""
  return jax.default_backend() == "tpu"


@contextlib.contextmanager
def float64_solves():
  """float64 enabled and, where the accelerator has none, the host CPU as the default device."""
  with jax.enable_x64(True):
    if solve_on_host():
      with jax.default_device(jax.devices("cpu")[0]):
        yield
    else:
      yield


def to_solve(x) -> jax.Array:
  """`x` as a float64 array where the solves run (inside `float64_solves`)."""
  x = local_copy(x)
  if solve_on_host():
    x = np.asarray(x)
  return jnp.asarray(x, jnp.float64)


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


def lapack_solves() -> bool:
  """Where the solves run on a CPU (the CPU backend, or the host of a TPU), they go to
  SciPy's LAPACK: its blocked, threaded Cholesky took a quarter of the time of XLA's
  CPU one on a 1537 x 1537 system (`benchmarks/README.md`). GPUs factor on the device."""
  return jax.default_backend() in ("cpu", "tpu")


def _ridge_lam(diag: np.ndarray, delta: float) -> float:
  """The ridge delta * mean(diag(X^T X)) over the d data rows (not the ones column), in float64."""
  lam = delta * np.mean(np.asarray(diag, np.float64))
  return lam if lam > 0 else delta


def _solve_lapack(xx: np.ndarray, xy: np.ndarray, delta: float, intercept: bool) -> np.ndarray | None:
  """`_solve` with SciPy in float64; None when the factorisation fails.

  `xx` may be the float32 statistics: the one float64 copy made of it gets the ridge on its
  diagonal and is factored in place (at a 4096-wide MLP each further copy would be 134 MB
  of a streamed run's peak).
  """
  import scipy.linalg

  d = xx.shape[0] - 1
  k = d + 1 if intercept else d
  a = np.array(xx[:k, :k], np.float64, order="F")
  a[np.arange(d), np.arange(d)] += _ridge_lam(np.diagonal(xx)[:d], delta)
  try:
    return scipy.linalg.cho_solve(scipy.linalg.cho_factor(a, lower=True, overwrite_a=True, check_finite=False),
                                  xy[:k], check_finite=False)
  except (np.linalg.LinAlgError, ValueError):
    return None


@functools.partial(jax.jit, static_argnames=("intercept",))
def _own_residual(xx, xy, yy, w, delta, intercept: bool):
  """||[X 1] W - Y||^2 of the ridge solution W: with (G + L) W = X^T Y (L the ridge, zero
  for the ones column) tr(W^T G W) = tr(W^T X^T Y) - tr(W^T L W), so the residual
  yy - 2 tr(W^T X^T Y) + tr(W^T G W) needs no product with G."""
  d = xx.shape[0] - 1
  lam = delta * jnp.mean(jnp.diagonal(xx)[:d])
  lam = jnp.where(lam > 0, lam, delta)
  k = w.shape[0]
  r = yy - jnp.sum(w * xy[:k]) - lam * jnp.sum(jnp.square(w[:d]))
  return jnp.maximum(r, 0.0)


def host64(x) -> np.ndarray:
  """`x` as a float64 numpy array on this host (gathered from a mesh if need be)."""
  return np.asarray(local_copy(x), np.float64)


def _own_residual_host(diag: np.ndarray, xy: np.ndarray, yy: float, w: np.ndarray, delta: float) -> float:
  """`_own_residual` in numpy float64 (the LAPACK path: no compile per system size), from the
  Gram matrix's diagonal over the data rows."""
  lam = _ridge_lam(diag, delta)
  k = w.shape[0]
  return max(float(yy - np.sum(w * xy[:k]) - lam * np.sum(np.square(w[:len(diag)]))), 0.0)


def ridge_solve(m: Moments, xy: jax.Array, delta: float, intercept: bool, what: str = "",
                yy=None) -> tuple[jax.Array, SolveInfo]:
  """Solves for W given Moments of X and X^T Y (augmented rows, (d+1, e)).

  Returns W with d rows (no intercept) or d+1 rows (the last row is the bias),
  in float32, and a SolveInfo (with the fit's residual when `yy` = ||Y||^2 is given).
  Where the solves run on a CPU (LAPACK), statistics held as numpy arrays give a
  numpy W, so a solve per kept width compiles nothing; otherwise W is a JAX array
  placed like `m.xx`.
  """
  if lapack_solves():
    xx, xy64 = np.asarray(local_copy(m.xx)), host64(xy)  # the statistics as stored; one float64 copy per try
    for retry in range(MAX_RETRIES + 1):
      w = _solve_lapack(xx, xy64, float(delta), intercept)
      if w is not None and np.all(np.isfinite(w)):
        break
      _warn_retry(what, delta)
      delta *= 10
    else:
      _fail(what, delta)
    res = None if yy is None else _own_residual_host(np.diagonal(xx)[:xx.shape[0] - 1], xy64, float(host64(yy)), w,
                                                     float(delta))
    w32 = w.astype(np.float32)
    if not isinstance(m.xx, np.ndarray):
      w32 = replicate_like(jax.device_put(w32), m.xx)
    return w32, SolveInfo(delta=float(delta), retries=retry, residual=res)
  with float64_solves():
    xx, xy64 = _by_columns(m.xx, xy)
    for retry in range(MAX_RETRIES + 1):
      w = _solve(xx, xy64, jnp.asarray(delta, jnp.float64), intercept)
      if bool(jnp.all(jnp.isfinite(w))):
        break
      _warn_retry(what, delta)
      delta *= 10
    else:
      _fail(what, delta)
    res = None
    if yy is not None:
      res = float(_own_residual(xx, xy64, host64(yy), w, np.float64(delta), intercept))
    return replicate_like(jnp.asarray(w, jnp.float32), m.xx), SolveInfo(delta=float(delta), retries=retry,
                                                                        residual=res)


def _by_columns(xx, xy):
  """float64 copies of the sums for a device solve. On a mesh with a `model` axis that divides
  the outputs, the (replicated) Gram matrix stays on every device and X^T Y is split by its
  columns, so each device solves for its own columns of W (the factorisation is repeated on
  each, in parallel); otherwise both go to one device."""
  sh = getattr(xx, "sharding", None)
  m = sh.mesh.shape.get(MODEL, 1) if isinstance(sh, NamedSharding) else 1
  if m == 1 or not xx.is_fully_replicated or xy.shape[1] % m:
    return to_solve(xx), to_solve(xy)
  cols = NamedSharding(sh.mesh, P(None, MODEL))
  return (jax.device_put(xx, sh).astype(jnp.float64),
          jax.device_put(xy, cols).astype(jnp.float64))


def _warn_retry(what: str, delta: float) -> None:
  log.warning("Cholesky failed for %s at damping %.1e; retrying with %.1e", what or "a solve", delta, delta * 10)


def _fail(what: str, delta: float):
  raise FloatingPointError(f"least-squares solve for {what} failed even at damping {delta:.1e}; the calibration "
                           "statistics are not finite (check the input data and model weights)")


@jax.jit
def _residual(g, c, yy, w):
  return jnp.maximum(jnp.sum(w * (g @ w)) - 2 * jnp.sum(w * c) + yy, 0.0)


def residual(m: Moments, xy: jax.Array, yy: jax.Array, w: jax.Array) -> jax.Array:
  """||[X 1] W - Y||^2 from sums: tr(W^T G W) - 2 tr(W^T X^T Y) + ||Y||^2.

  `w` has d rows (no intercept) or d+1 rows (last row = bias). In float64, on the
  host where the solves run on a CPU (numpy: nothing compiled per system size).
  """
  k = w.shape[0]
  if lapack_solves():
    g, c, w64 = host64(m.xx)[:k, :k], host64(xy)[:k], host64(w)
    return np.float32(max(float(np.sum(w64 * (g @ w64)) - 2 * np.sum(w64 * c) + float(host64(yy))), 0.0))
  with float64_solves():
    r = _residual(to_solve(m.xx)[:k, :k], to_solve(xy)[:k], to_solve(yy), to_solve(w))
    return jnp.asarray(r, jnp.float32)
