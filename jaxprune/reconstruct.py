"""Damped least squares from sufficient statistics (docs/method.md section 4).

    W' = argmin ||X W - Y||^2 + lam ||W||^2 = (X^T X + lam I)^-1 X^T Y,
    lam = delta * mean(diag(X^T X)),

solved by Cholesky in float64, by one of two solvers that `jaxprune.placement` chooses
(SciPy's LAPACK on the host, or XLA on the device; opt-in, a third: split over the mesh's
`model` axis on the devices, `placement.split_solves`) inside one retry loop: a failed
factorisation (non-finite result) is retried with 10x the damping, and every retry is
reported, never silently skipped. `ridge_lam` is the one ridge formula of every solve
(the `goa-obs` sweep's included). With an
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

from jax.sharding import NamedSharding

from jaxprune import placement, sharded_solve, sharding
from jaxprune.placement import host64, local_copy, replicate_like, to_host, to_solve
from jaxprune.sharding import MODEL
from jaxprune.stats import split
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


def ridge_lam(diag, delta, rows=None):
  """The ridge delta * mean(diag(X^T X)) over the d data rows (not the ones column), in
  float64 (numpy for a numpy `diag`, else jax.numpy, traced or not); an all-zero input still
  gets a positive ridge. With `rows`, `diag` is a padded system's (`moments.subset_padded`):
  its first `rows` entries are the data's, the rest zero, and the mean is over the data's."""
  xp = np if isinstance(diag, np.ndarray) else jnp
  d64 = xp.asarray(diag, xp.float64)
  lam = delta * (xp.mean(d64) if rows is None else xp.sum(d64) / xp.asarray(rows, xp.float64))
  return xp.where(lam > 0, lam, delta)


def ridge_system(xx, delta, intercept: bool, rows=None):
  """G = [X 1]^T [X 1] + lam I from augmented sums xx (d+1, d+1): the ones column undamped,
  and dropped without an intercept (`rows`: as in `ridge_lam`; the padding's rows then hold
  lam alone, so their weights solve to zero)."""
  xp = np if isinstance(xx, np.ndarray) else jnp
  d = xx.shape[0] - 1
  if not intercept:
    xx = xx[:d, :d]
  lam = ridge_lam(xp.diagonal(xx)[:d], delta, rows)
  return xx + xp.diag(xp.concatenate([xp.full((d,), lam), xp.zeros((xx.shape[0] - d,))]).astype(xx.dtype))


@functools.partial(jax.jit, static_argnames=("intercept",))
def _solve(xx, xy, delta, intercept: bool, rows=None):
  """W (d[+1], e) for augmented sums xx (d+1, d+1), xy (d+1, e)."""
  k = xx.shape[0] if intercept else xx.shape[0] - 1
  c = jax.scipy.linalg.cho_factor(ridge_system(xx, delta, intercept, rows), lower=True)
  return jax.scipy.linalg.cho_solve(c, xy[:k])


def _solve_lapack(xx: np.ndarray, xy: np.ndarray, delta: float, intercept: bool, rows=None) -> np.ndarray | None:
  """`_solve` with SciPy in float64; None when the factorisation fails.

  `xx` may be the float32 statistics: the one float64 copy made of it gets the ridge on its
  diagonal and is factored in place (at a 4096-wide MLP each further copy would be 134 MB
  of a streamed run's peak).
  """
  import scipy.linalg  # SciPy's import is paid only where LAPACK solves

  d = xx.shape[0] - 1
  k = d + 1 if intercept else d
  a = np.array(xx[:k, :k], np.float64, order="F")
  a[np.arange(d), np.arange(d)] += ridge_lam(np.diagonal(xx)[:d], delta, rows)
  try:
    return scipy.linalg.cho_solve(scipy.linalg.cho_factor(a, lower=True, overwrite_a=True, check_finite=False),
                                  xy[:k], check_finite=False)
  except (np.linalg.LinAlgError, ValueError):
    return None


@functools.partial(jax.jit, static_argnames=("intercept",))
def _own_residual(xx, xy, yy, w, delta, intercept: bool, rows=None):
  """`_own_residual_host` on the device."""
  d = xx.shape[0] - 1
  lam = ridge_lam(jnp.diagonal(xx)[:d], delta, rows)
  k = w.shape[0]
  r = yy - jnp.sum(w * xy[:k]) - lam * jnp.sum(jnp.square(w[:d]))
  return jnp.maximum(r, 0.0)


def _own_residual_host(diag: np.ndarray, xy: np.ndarray, yy: float, w: np.ndarray, delta: float,
                       rows=None) -> float:
  """||[X 1] W - Y||^2 of the ridge solution W, from the Gram matrix's diagonal over the data
  rows: with (G + L) W = X^T Y (L the ridge, zero for the ones column) tr(W^T G W) =
  tr(W^T X^T Y) - tr(W^T L W), so the residual yy - 2 tr(W^T X^T Y) + tr(W^T G W) needs no
  product with G. numpy float64 (the LAPACK path: no compile per system size)."""
  lam = ridge_lam(diag, delta, rows)
  k = w.shape[0]
  return max(float(yy - np.sum(w * xy[:k]) - lam * np.sum(np.square(w[:len(diag)]))), 0.0)


class _HostSolver:
  """SciPy's LAPACK in float64 on numpy arrays (where `placement.lapack_solves`)."""

  def __init__(self, xx, xy, intercept: bool, rows=None):
    self.xx, self.xy, self.intercept = np.asarray(local_copy(xx)), host64(xy), intercept  # xx as stored
    self.rows = rows

  def __call__(self, delta) -> np.ndarray | None:
    w = _solve_lapack(self.xx, self.xy, float(delta), self.intercept, self.rows)
    return w if w is not None and np.all(np.isfinite(w)) else None

  def residual(self, yy, w, delta) -> float:
    return _own_residual_host(np.diagonal(self.xx)[:self.xx.shape[0] - 1], self.xy, float(host64(yy)), w,
                              float(delta), self.rows)

  def weights(self, w, like):
    """Numpy statistics give a numpy W, so a solve per kept width compiles nothing."""
    w32 = w.astype(np.float32)
    return w32 if isinstance(like, np.ndarray) else replicate_like(jax.device_put(w32), like)


class _DeviceSolver:
  """XLA's Cholesky in float64 on the device (inside `placement.float64_solves`)."""

  def __init__(self, xx, xy, intercept: bool, rows=None):
    (self.xx, self.xy), self.intercept = _by_columns(xx, xy), intercept
    self.rows = None if rows is None else np.int32(rows)  # an argument, not a constant: one compile per width

  def __call__(self, delta):
    w = _solve(self.xx, self.xy, jnp.asarray(delta, jnp.float64), self.intercept, self.rows)
    return w if bool(jnp.all(jnp.isfinite(w))) else None

  def residual(self, yy, w, delta) -> float:
    return float(_own_residual(self.xx, self.xy, host64(yy), w, np.float64(delta), self.intercept, self.rows))

  def weights(self, w, like):
    return replicate_like(jnp.asarray(w, jnp.float32), like)


class _SplitSolver:
  """`jaxprune.sharded_solve` on the mesh `placement.split_solves` names: the Gram matrix and X^T Y
  go to the devices as row blocks over `model` (d padded to a multiple of the axis with zero
  rows, which the ridge alone then fixes at zero without touching the others), float64 where
  the backend has it, float32 with refinement where it has not (TPU)."""

  def __init__(self, xx, xy, intercept: bool, mesh, rows=None):
    xx, xy, self.rows = local_copy(xx), local_copy(xy), rows
    xp = np if isinstance(xx, np.ndarray) else jnp
    self.d, self.mesh, e = xx.shape[0] - 1, mesh, xy.shape[1]
    pad = -self.d % mesh.shape[MODEL]
    self.diag, self.xy = np.asarray(xp.diagonal(xx)[:self.d]), host64(xy)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # each device gets its rows only
    self.g = put(xp.pad(xx[:self.d, :self.d], ((0, pad), (0, pad))), sharded_solve.row_spec(mesh))
    self.c = put(xp.pad(xy[:self.d], ((0, pad), (0, 0))), sharded_solve.row_spec(mesh, e))
    self.icpt = sharded_solve.Intercept(xp.pad(xx[self.d, :self.d], (0, pad)), xx[self.d, self.d],
                                        xy[self.d]) if intercept else None
    self.dtype = jnp.float32 if placement.solve_on_host() else jnp.float64  # no float64 there

  def __call__(self, delta) -> np.ndarray | None:
    sol = sharded_solve.solve(self.g, self.c, float(ridge_lam(self.diag, delta, self.rows)), self.mesh, self.dtype,
                              self.icpt)
    if sol is None:
      return None
    w = to_host(sol.w).astype(np.float64)[:self.d]
    w = w if sol.bias is None else np.concatenate([w, to_host(sol.bias).astype(np.float64)[None]])
    return w if np.all(np.isfinite(w)) else None

  def residual(self, yy, w, delta) -> float:
    return _own_residual_host(self.diag, self.xy, float(host64(yy)), w, float(delta), self.rows)

  weights = _HostSolver.weights

  @classmethod
  def of_split(cls, rs, intercept: bool, rows=None) -> "_SplitSolver":
    """The solver of statistics already split by rows (`stats.split`): nothing is gathered or
    re-placed; padding features (beyond `rows`) are zero, which the ridge fixes at zero."""
    self = cls.__new__(cls)
    self.mesh, self.rows, self.rs = split.mesh_of(rs), rows, rs
    self.d = rs.gram.shape[0]
    self.diag = split.diagonal(rs) if rows is None else split.diagonal(rs)[:rows]
    self.g, self.c = rs.gram, rs.xy
    self.icpt = sharded_solve.Intercept(rs.xsum, rs.count, rs.ysum) if intercept else None
    self.dtype = jnp.float32 if placement.solve_on_host() else jnp.float64
    return self

  def split_residual(self, yy, w, delta) -> float:
    """`_own_residual_host` with tr(W^T X^T Y) from the split cross moment."""
    lam = float(ridge_lam(self.diag, delta, self.rows))
    return max(float(host64(yy)) - split.inner(self.rs, w) - lam * float(np.sum(np.square(w[:self.d]))), 0.0)


def ridge_solve(m: Moments, xy: jax.Array, delta: float, intercept: bool, what: str = "",
                yy=None, rows: int | None = None) -> tuple[jax.Array, SolveInfo]:
  """Solves for W given Moments of X and X^T Y (augmented rows, (d+1, e)).

  With `rows`, the sums are a padded system's (`moments.subset_padded`): W's padding rows come
  back zero and the ridge is the unpadded system's.

  Returns W with d rows (no intercept) or d+1 rows (the last row is the bias),
  in float32, and a SolveInfo (with the fit's residual when `yy` = ||Y||^2 is given).
  Where the solves run on a CPU (LAPACK), statistics held as numpy arrays give a
  numpy W; otherwise W is a JAX array placed like `m.xx`.
  """
  host, mesh, held_split = placement.lapack_solves(), placement.split_solve_mesh(), split.is_split(m)
  with contextlib.nullcontext() if host or mesh is not None or held_split else placement.float64_solves():
    if held_split:
      solver = _SplitSolver.of_split(m, intercept, rows)
    else:
      solver = _SplitSolver(m.xx, xy, intercept, mesh, rows) if mesh is not None else (
          (_HostSolver if host else _DeviceSolver)(m.xx, xy, intercept, rows))
    for retry in range(MAX_RETRIES + 1):
      w = solver(delta)
      if w is not None:
        break
      log.warning("Cholesky failed for %s at damping %.1e; retrying with %.1e", what or "a solve", delta, delta * 10)
      delta *= 10
    else:
      raise FloatingPointError(f"least-squares solve for {what} failed even at damping {delta:.1e}; the calibration "
                               "statistics are not finite (check the input data and model weights)")
    res = None if yy is None else (solver.split_residual if held_split else solver.residual)(yy, w, delta)
    return solver.weights(w, m.gram if held_split else m.xx), SolveInfo(delta=float(delta), retries=retry, residual=res)


def _by_columns(xx, xy):
  """float64 copies of the sums for a device solve. On a mesh with a `model` axis that divides
  the outputs, the (replicated) Gram matrix stays on every device and X^T Y is split by its
  columns, so each device solves for its own columns of W (the factorisation is repeated on
  each, in parallel); otherwise both go to one device."""
  sh = getattr(xx, "sharding", None)
  m = sh.mesh.shape.get(MODEL, 1) if isinstance(sh, NamedSharding) else 1
  if m == 1 or not xx.is_fully_replicated or xy.shape[1] % m:
    return to_solve(xx), to_solve(xy)
  cols = NamedSharding(sh.mesh, sharding.activation_spec("solution", sh.mesh))
  return (jax.device_put(xx, sh).astype(jnp.float64),
          jax.device_put(xy, cols).astype(jnp.float64))


@jax.jit
def _residual(g, c, yy, w):
  return jnp.maximum(jnp.sum(w * (g @ w)) - 2 * jnp.sum(w * c) + yy, 0.0)


RESIDUAL_ROWS = 512  # rows of G taken to float64 at a time by `_residual_host`


def _residual_host(xx: np.ndarray, c: np.ndarray, yy: float, w: np.ndarray) -> float:
  """tr(W^T G W) - 2 tr(W^T C) + yy in float64 with G = xx[:k, :k] (k = W's rows), a band of
  RESIDUAL_ROWS rows of `xx` (as stored, float32) taken to float64 at a time: no float64 copy
  of G, which at a 4096-wide module would be 134 MB of a streamed run's peak."""
  k = w.shape[0]
  quad = 0.0
  for lo in range(0, k, RESIDUAL_ROWS):
    hi = min(k, lo + RESIDUAL_ROWS)
    quad += float(np.sum(w[lo:hi] * (np.asarray(xx[lo:hi, :k], np.float64) @ w)))
  return max(quad - 2 * float(np.sum(w * c)) + yy, 0.0)


def residual(m: Moments, xy: jax.Array, yy: jax.Array, w: jax.Array) -> jax.Array:
  """||[X 1] W - Y||^2 from sums: tr(W^T G W) - 2 tr(W^T X^T Y) + ||Y||^2.

  `w` has d rows (no intercept) or d+1 rows (last row = bias). In float64, on the
  host where the solves run on a CPU (numpy: nothing compiled per system size).
  """
  k = w.shape[0]
  if split.is_split(m):  # `xy` is m's own cross moment
    return np.float32(split.residual(m, yy, w))
  if placement.lapack_solves():
    return np.float32(_residual_host(np.asarray(local_copy(m.xx)), host64(xy)[:k], float(host64(yy)), host64(w)))
  with placement.float64_solves():
    r = _residual(to_solve(m.xx)[:k, :k], to_solve(xy)[:k], to_solve(yy), to_solve(w))
    return jnp.asarray(r, jnp.float32)
