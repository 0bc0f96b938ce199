"""The greedy Optimal-Brain-Surgeon sweep of one least-squares system (`goa-obs`'s kernel).

For a ridge system G = X^T X + lam I with solution W = G^-1 X^T Y, removing a unit S (a
channel, or the H channels of a head) adds tr(W_S^T (G^-1_SS)^-1 W_S) to the refit error,
and afterwards W <- W - G^-1_{:,S} (G^-1_SS)^-1 W_S and
G^-1 <- G^-1 - G^-1_{:,S} (G^-1_SS)^-1 G^-1_{S,:}. The sweep removes the
`step_size(n)` = ceil(n / MAX_STEPS) cheapest units per step (one at a time for up to
MAX_STEPS units, as for attention heads), with the exact joint update for the removed group.
It never rewrites G^-1: after r removals it is the first inverse less a rank-r product
U U^T, and a step reads only the rows of the units it removes, so its memory traffic is U's
and W's, not the d^2 of G^-1 (`_sweep`). It stops where the caller stops (`n_remove`): the
removed units, their order and costs are the full sweep's.

Cost, for U2 channels of which r go: the inverse (U2^3 / 3 flops in float64 by Cholesky,
8 U2^2 bytes) and about U2 r^2 + 2 U2 r D for the sweep (D outputs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import placement
from jaxprune.placement import host64, local_copy
from jaxprune.reconstruct import ridge_lam, ridge_system

MAX_STEPS = 128
SWEEP_CHUNK = 256  # columns of the sweep's low-rank factor taken into one product


@jax.jit
def _inverse_xla(g):
  ginv = jnp.linalg.inv(g)
  return 0.5 * (ginv + ginv.T)


def ridge_inverse(xx, delta: float, intercept: bool) -> jax.Array:
  """G^-1 (float64, symmetric) of the ridge system. Where solves run on a CPU it is LAPACK's
  Cholesky inverse (potrf + potri: a third of the time of XLA's CPU LU inverse at
  SmolLM2's 1537 channels), on one float64 copy of the statistics, factored, inverted and
  mirrored in place (each further copy of a 4097-wide system is 134 MB of the run's peak);
  elsewhere XLA's."""
  if not placement.lapack_solves():
    return _inverse_xla(ridge_system(jnp.asarray(xx, jnp.float64), delta, intercept))
  import scipy.linalg  # SciPy's import is paid only where LAPACK solves

  xx = np.asarray(local_copy(xx))
  d = xx.shape[0] - 1
  k = d + 1 if intercept else d
  g = _aligned64(k)  # in LAPACK's own order: factored where it lies
  g[...] = xx[:k, :k]
  g[np.arange(d), np.arange(d)] += ridge_lam(np.diagonal(g)[:d], float(delta))
  chol, info = scipy.linalg.lapack.dpotrf(g, lower=1, clean=1, overwrite_a=1)
  if info == 0:
    ginv, info = scipy.linalg.lapack.dpotri(chol, lower=1, overwrite_c=1)
  if info != 0:  # not positive definite in floating point: the LU inverse, as XLA's
    return jax.device_put(np.linalg.inv(ridge_system(host64(xx), float(delta), intercept)))
  _mirror_lower(ginv)
  # Symmetric: its transpose is the same matrix in C order, which a CPU device takes as it is.
  return jax.device_put(ginv.T, may_alias=True)


def _aligned64(k: int) -> np.ndarray:
  """An uninitialised k x k float64 array in Fortran order on a 64-byte boundary, where
  XLA's CPU client can take its transpose without a copy."""
  buf = np.empty(8 * k * k + 64, np.uint8)
  start = -buf.ctypes.data % 64
  return buf[start:start + 8 * k * k].view(np.float64).reshape((k, k), order="F")


def _mirror_lower(a: np.ndarray, rows: int = 512) -> None:
  """Copies the lower triangle of square `a` onto its upper one, in place, a band of rows at a time."""
  n = a.shape[0]
  for lo in range(0, n, rows):
    hi = min(n, lo + rows)
    a[lo:hi, hi:] = a[hi:, lo:hi].T
    band = a[lo:hi, lo:hi]
    band[np.triu_indices(hi - lo, 1)] = band.T[np.triu_indices(hi - lo, 1)]


def _unit_cost(blocks, w, width: int, n: int):
  """What removing each unit would add to the refit error now ([n]), from the current
  G^-1's diagonal blocks [n, width, width] and solution W."""
  if width == 1:  # scalar blocks: ||w_j||^2 / G^-1_jj
    return jnp.sum(jnp.square(w[:n]), axis=-1) / blocks[:, 0, 0]
  ws = w[:n * width].reshape(n, width, -1)  # [n, width, D]
  return jnp.einsum("nwd,nwd->n", ws, jnp.linalg.solve(blocks, ws))


@functools.partial(jax.jit, static_argnames=("width", "intercept", "per_step", "u_columns"))
def _sweep(ginv, xy, n_remove, width: int, intercept: bool, per_step: int, u_columns: int):
  """The greedy OBS sweep from G^-1 = `ginv` and the cross moment `xy` (W = G^-1 xy): step t removes the `per_step`
  cheapest live units (fewer at the last step, so that `n_remove` go in all) at positions
  t * per_step + j; returns each unit's position and cost (`removal_order`).

  G^-1 itself is never rewritten. After the steps so far it is G^-1 - U U^T, U's columns
  appended by each step (`u_columns` of them, at least as many as the steps take, a
  multiple of SWEEP_CHUNK), so a step reads the k rows it removes (k x d' from U, a chunk at a time)
  and updates W (d' x k x D) and the diagonal blocks the costs need: no d' x d' array is
  formed or written after the first. With G^-1_SS = L L^T the update
  G^-1_{:,S} (G^-1_SS)^-1 G^-1_{S,:} is C C^T, C = G^-1_{:,S} L^-T, and W's is C L^-1 W_S.
  Products run over whole chunks of U, so a step's arithmetic is the same whatever the
  sweep's length: stopping early changes nothing about the units removed before.
  """
  d = ginv.shape[0] - (1 if intercept else 0)  # channels (the ones column is last)
  n = d // width
  kw = per_step * width
  chunk = SWEEP_CHUNK
  idx = jnp.arange(n)[:, None] * width + jnp.arange(width)[None]  # channels of each unit
  blocks = ginv[idx[:, :, None], idx[:, None, :]]  # [n, width, width]
  steps = (n_remove + per_step - 1) // per_step
  u = jnp.zeros((ginv.shape[0], u_columns), ginv.dtype)
  w = ginv @ xy[:ginv.shape[0]].astype(ginv.dtype)  # xy as stored: no float64 copy beside G^-1

  def step(t, state):
    u, blocks, w, alive, order, paid = state
    t = t.astype(jnp.int32)
    c = jnp.where(alive, _unit_cost(blocks, w, width, n), jnp.inf)
    take = jnp.minimum(per_step, n_remove - t * per_step)
    _, s = jax.lax.top_k(-c, per_step)  # the per_step cheapest live units (never the last survivor)
    valid = jnp.arange(per_step, dtype=jnp.int32) < take
    cols = (s[:, None] * width + jnp.arange(width, dtype=jnp.int32)[None]).reshape(-1)
    colmask = jnp.repeat(valid, width).astype(ginv.dtype)

    def less(j, r):  # r - U_j[S] U_j^T for chunk j of U's columns
      uj = jax.lax.dynamic_slice_in_dim(u, j * chunk, chunk, axis=1)
      return r - uj[cols] @ uj.T

    # G^-1_{S,:} now (its rows stand for its columns: symmetric), [k*width, d'].
    rows = jax.lax.fori_loop(0, (t * kw + chunk - 1) // chunk, less, ginv[cols]) * colmask[:, None]
    gss = rows[:, cols] * colmask[None, :] + jnp.diag(1.0 - colmask)  # padding rows solve to zero
    low = jnp.linalg.cholesky(gss)
    ct = jax.scipy.linalg.solve_triangular(low, rows, lower=True)  # C^T, [k*width, d']
    z = jax.scipy.linalg.solve_triangular(low, w[cols] * colmask[:, None], lower=True)
    u = jax.lax.dynamic_update_slice_in_dim(u, ct.T, t * kw, axis=1)
    cu = ct[:, :n * width].T.reshape(n, width, kw)
    blocks = blocks - jnp.einsum("nwk,nvk->nwv", cu, cu)
    w = w - ct.T @ z
    pos = t * per_step + jnp.arange(per_step, dtype=jnp.int32)
    alive = alive.at[s].set(jnp.where(valid, False, alive[s]))
    order = order.at[s].set(jnp.where(valid, pos, order[s]))
    paid = paid.at[s].set(jnp.where(valid, c[s], paid[s]))
    return u, blocks, w, alive, order, paid

  state = (u, blocks, w, jnp.ones((n,), bool), jnp.full((n,), n - 1, jnp.int32), jnp.full((n,), jnp.inf, ginv.dtype))
  _, blocks, w, alive, order, paid = jax.lax.fori_loop(0, steps, step, state)
  # Units the sweep left follow the removed ones in the order of what removing each would cost
  # now, and carry that cost.
  now = jnp.where(alive, _unit_cost(blocks, w, width, n), jnp.inf)
  rank = jnp.argsort(jnp.argsort(now, stable=True), stable=True).astype(jnp.int32)
  return jnp.where(alive, n_remove + rank, order), jnp.where(alive, now, paid)


def removal_order(ginv, xy, width: int, intercept: bool, per_step: int = 1, n_remove: int | None = None):
  """Position at which each unit is removed by the greedy OBS sweep ([units] int32) and the
  cost it had when removed ([units]), from the ridge system's inverse `ginv` (d[+1] square)
  and the cross moment `xy` (its rows).

  The sweep stops once `n_remove` units are gone (default: all but one); the units
  still there are ordered after them by what removing each would cost then, and
  carry that cost. Stopping early changes nothing about the units removed before.
  U's columns come in chunks of SWEEP_CHUNK, 2^k or 3 * 2^(k-1) of them (`_chunks`), so that
  stopping points share compiles and U is under half as wide again as the steps need (powers
  of two alone: up to twice).
  """
  d = ginv.shape[0] - (1 if intercept else 0)
  n = d // width
  n_remove = int(np.clip(n - 1 if n_remove is None else n_remove, 0, n - 1))
  columns = -(-n_remove // per_step) * per_step * width
  chunks = _chunks(max(1, -(-columns // SWEEP_CHUNK)))
  order, paid = _sweep(ginv, xy, jnp.asarray(n_remove, jnp.int32), width, intercept, per_step,
                       chunks * SWEEP_CHUNK)
  return np.asarray(order), np.asarray(paid)


def _chunks(c: int) -> int:
  """The least 2^k or 3 * 2^(k-1) at or above `c` (> 0)."""
  p = 1 << (c - 1).bit_length()
  return 3 * p // 4 if p >= 4 and 3 * p // 4 >= c else p


def step_size(n_units: int) -> int:
  """Units a sweep over `n_units` removes per step (MAX_STEPS steps for all of them)."""
  return -(-n_units // MAX_STEPS)
