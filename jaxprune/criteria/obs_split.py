"""The greedy OBS sweep (`obs_sweep`) on statistics split by rows over the mesh's `model` axis.

The same sweep, the same removals: step t removes the `per_step` cheapest live units, with the
exact joint update of W and of G^-1 (kept as the first inverse less U U^T). What differs is
where the arrays live. Device i holds rows b_i of everything d'-tall: G^-1 (b x d', from one
split solve, `sharded_solve`, whose right-hand side is [X^T Y | I]), W (b x e), the low-rank
factor U (b x its columns) and the diagonal blocks of its own units; units never straddle two
devices (d' is padded to a multiple of the axis times the unit's width, the padding's units
dead from the start). A step gathers only what is small: every unit's cost (one number each),
and the k removed channels' rows of U, of G^-1 and of W (k x u, k x k, k x e, by psums of the
rows each device owns); C = G^-1_{:,S} is formed on each device for its own rows, as
G^-1[rows, S] - U_rows U_S^T (G^-1 is symmetric), and W and U update in place.

With an intercept the ones column is eliminated first (the solve's Schur complement): the
channel block of the augmented system's inverse is the inverse of G - s s^T / n, and W's
channel rows are its solution, so the costs and updates, which read only channel rows and
columns, are the augmented sweep's.

Arithmetic: float64 where the backend has it; on a TPU the inverse is float32 with iterative
refinement and the sweep float32 (`placement.solve_on_host` names that case).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxprune import placement, sharded_solve
from jaxprune.criteria import obs_sweep
from jaxprune.reconstruct import ridge_lam
from jaxprune.sharding import MODEL, shard_map
from jaxprune.stats import split
from jaxprune.stats.moments import RowSplit


def removal_order(rs: RowSplit, width: int, delta: float, intercept: bool, per_step: int = 1,
                  n_remove: int | None = None, rows: int | None = None):
  """`obs_sweep.removal_order` of the ridge system of split statistics `rs` (the first `rows`
  of its features real, default all, the rest zero padding as `split.cut` makes it): each
  unit's removal position and cost ([units])."""
  mesh = split.mesh_of(rs)
  real = rs.gram.shape[0] if rows is None else rows
  n = real // width
  n_remove = int(np.clip(n - 1 if n_remove is None else n_remove, 0, n - 1))
  d = split.padded_width(real, mesh, width)
  if d != rs.gram.shape[0]:  # laid out again, so that no unit straddles two devices
    rs = split.cut(rs, np.arange(real), d)
  lam = float(ridge_lam(split.diagonal(rs)[:real], delta))
  e = rs.xy.shape[1]
  dtype = jnp.float32 if placement.solve_on_host() else jnp.float64
  with jax.enable_x64(dtype == jnp.float64):
    rhs, ysum = _rhs(rs, mesh=mesh)
    icpt = sharded_solve.Intercept(rs.xsum, rs.count, ysum) if intercept else None
    sol = sharded_solve.solve(rs.gram, rhs, lam, mesh, dtype, icpt)
    if sol is None:
      raise FloatingPointError(f"the goa-obs inverse of a {real}-channel system failed at damping {delta:.1e}")
    x = sol.w  # its columns over `data` where they divide: the sweep's kernel gathers them
    columns = -(-n_remove // per_step) * per_step * width
    u_columns = obs_sweep._chunks(max(1, -(-columns // obs_sweep.SWEEP_CHUNK))) * obs_sweep.SWEEP_CHUNK
    order, paid = _sweep(x, np.int32(n_remove), np.int32(n), mesh=mesh, width=width,
                         e=e, per_step=per_step, u_columns=u_columns)
    return np.asarray(order)[:n], np.asarray(paid, np.float64)[:n]


@functools.partial(jax.jit, static_argnames=("mesh",))
def _rhs(rs: RowSplit, *, mesh: Mesh):
  """[X^T Y | I] split by rows, and its column sums' [y | 0] for the intercept."""
  d = rs.gram.shape[0]

  def local(xy):
    b = xy.shape[0]
    # This device's rows of I, made as they are: no d x d identity on any device.
    rows = jax.lax.axis_index(MODEL) * b + jnp.arange(b, dtype=jnp.int32)
    eye = (rows[:, None] == jnp.arange(d, dtype=jnp.int32)[None]).astype(xy.dtype)
    return jnp.concatenate([xy, eye], axis=1)

  rhs = shard_map(local, mesh=mesh, in_specs=P(MODEL, None), out_specs=P(MODEL, None),
                                 check_vma=False)(rs.xy)
  return rhs, jnp.concatenate([rs.ysum, jnp.zeros((d,), rs.ysum.dtype)])


def _unit_cost(blocks, w, width: int, n: int):
  """`obs_sweep._unit_cost` with the units' block solves one after another (`lax.map`): XLA's CPU
  runtime spreads a batched LAPACK solve over its thread pool, where on forced host devices the
  other devices' threads wait in the next collective, and the sweep waited forever."""
  if width == 1:
    return obs_sweep._unit_cost(blocks, w, width, n)
  ws = w[:n * width].reshape(n, width, -1)
  return jax.lax.map(lambda bw: jnp.sum(bw[1] * jnp.linalg.solve(bw[0], bw[1])), (blocks, ws))


@functools.partial(jax.jit, static_argnames=("mesh", "width", "e", "per_step", "u_columns"))
def _sweep(x, n_remove, n_real, *, mesh: Mesh, width: int, e: int, per_step: int, u_columns: int):
  d = x.shape[0]
  n = d // width

  def local(x, n_remove, n_real):
    i, b = jax.lax.axis_index(MODEL), x.shape[0]
    nb, kw = b // width, per_step * width
    w, ginv = x[:, :e], x[:, e:]
    first = i * nb  # this device's first unit
    mine_units = first + jnp.arange(nb, dtype=jnp.int32)
    blocks = jax.vmap(lambda r, g: jax.lax.dynamic_slice_in_dim(r, g * width, width, axis=1))(
        ginv.reshape(nb, width, d), mine_units)  # [nb, width, width]: its units' diagonal blocks
    u = jnp.zeros((b, u_columns), ginv.dtype)

    def costs(blocks, w):
      return jax.lax.all_gather(_unit_cost(blocks, w, width, nb), MODEL, tiled=True)  # [n]

    def gather_rows(a, cols, owned, local_rows):  # rows `cols` of a row-split array, on every device
      return jax.lax.psum(jnp.where(owned[:, None], jnp.take(a, local_rows, axis=0), 0), MODEL)

    def step(t, state):
      u, blocks, w, alive, order, paid = state
      c = jnp.where(alive, costs(blocks, w), jnp.inf)
      take = jnp.minimum(per_step, n_remove - t * per_step)
      _, s = jax.lax.top_k(-c, per_step)
      valid = jnp.arange(per_step, dtype=jnp.int32) < take
      cols = (s[:, None] * width + jnp.arange(width, dtype=jnp.int32)[None]).reshape(-1)
      colmask = jnp.repeat(valid, width).astype(ginv.dtype)
      owned = cols // b == i
      local_rows = jnp.where(owned, cols - i * b, 0)
      us = gather_rows(u, cols, owned, local_rows)  # [kw, u_columns]
      ci = (jnp.take(ginv, cols, axis=1) - jnp.matmul(u, us.T, precision=sharded_solve.HIGHEST)) * colmask[None]
      gss = gather_rows(ci, cols, owned, local_rows) * colmask[None] + jnp.diag(1.0 - colmask)
      low = jnp.linalg.cholesky(gss)
      ct = jax.scipy.linalg.solve_triangular(low, ci.T, lower=True)  # [kw, b]: this device's columns of C^T
      z = jax.scipy.linalg.solve_triangular(low, gather_rows(w, cols, owned, local_rows) * colmask[:, None],
                                            lower=True)
      u = jax.lax.dynamic_update_slice_in_dim(u, ct.T, t * kw, axis=1)
      cu = ct.T.reshape(nb, width, kw)
      blocks = blocks - jnp.einsum("nwk,nvk->nwv", cu, cu, precision=sharded_solve.HIGHEST)
      w = w - jnp.matmul(ct.T, z, precision=sharded_solve.HIGHEST)
      pos = t * per_step + jnp.arange(per_step, dtype=jnp.int32)
      alive = alive.at[s].set(jnp.where(valid, False, alive[s]))
      order = order.at[s].set(jnp.where(valid, pos, order[s]))
      paid = paid.at[s].set(jnp.where(valid, c[s], paid[s]))
      return u, blocks, w, alive, order, paid

    steps = (n_remove + per_step - 1) // per_step
    real = jnp.arange(n, dtype=jnp.int32) < n_real
    state = (u, blocks, w, real, jnp.full((n,), n - 1, jnp.int32), jnp.full((n,), jnp.inf, ginv.dtype))
    _, blocks, w, alive, order, paid = jax.lax.fori_loop(0, steps, step, state)
    now = jnp.where(alive, costs(blocks, w), jnp.inf)
    rank = jnp.argsort(jnp.argsort(now, stable=True), stable=True).astype(jnp.int32)
    return jnp.where(alive, n_remove + rank, order), jnp.where(alive, now, paid)

  return shard_map(local, mesh=mesh, in_specs=(P(MODEL, None), P(), P()), out_specs=(P(), P()),
                                  check_vma=False)(x, n_remove, n_real)
