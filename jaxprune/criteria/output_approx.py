"""Greedy output approximation with refit-aware removal costs (beyond the paper).

The second level of a module is refit by least squares on the kept channels
(METHOD.md section 4, "refit"). The exact increase of that refit error when a
unit S (a channel, or the H channels of a head) is removed is the
Optimal-Brain-Surgeon cost

    dE_S = tr(W_S^T (G^-1_SS)^-1 W_S),      G = X2^T X2 + lam I,  W = G^-1 X2^T Y,

and after removing S the solution and the inverse update in closed form:
W <- W - G^-1_{:,S} (G^-1_SS)^-1 W_S,  G^-1 <- G^-1 - G^-1_{:,S} (G^-1_SS)^-1 G^-1_{S,:}.
Removing the cheapest unit, updating, and repeating gives a removal order;
the score of a unit is the step at which it goes (later = more important), so
the criterion keeps the one signature `score(kind, params, stats)`. It needs
the full Gram matrix of X2 and its cross moment with the dense output, which
the pipeline accumulates anyway.

Each step rewrites the whole inverse, so with thousands of channels the sweep
is bound by memory traffic; it therefore removes the `ceil(n / MAX_STEPS)`
cheapest units per step (one at a time for up to MAX_STEPS units, as for
attention heads), with the exact joint update for the removed group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxprune.criteria.stats import ModuleStats
from jaxprune.models import adapter as A
from jaxprune.reconstruct import solve_dtype
from jaxprune.sharding import local_copy
from jaxprune.spec import Params


MAX_STEPS = 128


@functools.partial(jax.jit, static_argnames=("width", "intercept", "per_step"))
def _removal_order(xx, xy, delta, width: int, intercept: bool, per_step: int = 1):
  """Position at which each unit is removed by the greedy OBS sweep; [units] int32."""
  d = xx.shape[0] - 1
  if not intercept:
    xx, xy = xx[:d, :d], xy[:d]
  lam = delta * jnp.mean(jnp.diagonal(xx)[:d])
  lam = jnp.where(lam > 0, lam, delta)
  g = xx + jnp.diag(jnp.concatenate([jnp.full((d,), lam), jnp.zeros((xx.shape[0] - d,))]).astype(xx.dtype))
  ginv = jnp.linalg.inv(g)
  w = ginv @ xy
  n = d // width
  idx = jnp.arange(n)[:, None] * width + jnp.arange(width)[None]  # channels of each unit

  def cost(ginv, w):
    if width == 1:  # scalar blocks: ||w_j||^2 / G^-1_jj
      return jnp.sum(jnp.square(w[:n * width]), axis=-1) / jnp.diagonal(ginv)[:n]
    blocks = ginv[idx[:, :, None], idx[:, None, :]]  # [n, width, width]
    ws = w[idx]  # [n, width, D]
    return jnp.einsum("nwd,nwd->n", ws, jnp.linalg.solve(blocks, ws))

  steps = -(-(n - 1) // per_step)

  def step(t, state):
    ginv, w, alive, order = state
    t = t.astype(jnp.int32)
    c = jnp.where(alive, cost(ginv, w), jnp.inf)
    # The per_step cheapest live units (never the last survivor).
    take = jnp.minimum(per_step, n - 1 - t * per_step)
    _, s = jax.lax.top_k(-c, per_step)
    valid = jnp.arange(per_step, dtype=jnp.int32) < take
    cols = (s[:, None] * width + jnp.arange(width, dtype=jnp.int32)[None]).reshape(-1)
    colmask = jnp.repeat(valid, width).astype(ginv.dtype)
    gss = ginv[cols[:, None], cols[None, :]] * colmask[:, None] * colmask[None, :]
    gss = gss + jnp.diag(1.0 - colmask)  # padding rows solve to zero
    gs = ginv[:, cols] * colmask[None]  # [d', k*width]
    # (G^-1_SS)^-1 [G^-1_{S,:} | W_S] in one solve.
    k = jnp.linalg.solve(gss, jnp.concatenate([gs.T, w[cols] * colmask[:, None]], axis=1))
    ginv = ginv - gs @ k[:, :ginv.shape[0]]
    w = w - gs @ k[:, ginv.shape[0]:]
    pos = t * per_step + jnp.arange(per_step, dtype=jnp.int32)
    alive = alive.at[s].set(jnp.where(valid, False, alive[s]))
    order = order.at[s].set(jnp.where(valid, pos, order[s]))
    return ginv, w, alive, order

  order = jnp.full((n,), n - 1, jnp.int32)
  state = (ginv, w, jnp.ones((n,), bool), order)
  _, _, _, order = jax.lax.fori_loop(0, steps, step, state)
  return order


def refit_aware(kind: A.ModuleKind, p: Params, stats: ModuleStats):
  """Later-removed units score higher; the last survivor scores highest."""
  width = A.unit_width(kind, p)
  dt = solve_dtype()
  with jax.enable_x64(dt == jnp.float64):
    n = (stats.hidden.xx.shape[0] - 1) // width
    order = _removal_order(jnp.asarray(local_copy(stats.hidden.xx), dt), jnp.asarray(local_copy(stats.hidden.xy), dt),
                           jnp.asarray(stats.damping, dt), width, stats.intercept, -(-n // MAX_STEPS))
  return jnp.asarray(order, jnp.float32)
