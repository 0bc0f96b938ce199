"""Jensen-Shannon divergences between the attention maps of a layer's heads.

D_ij = mean over (sample n, query s) of JS(P_i[n,s] || P_j[n,s]), natural log,
computed as sum p log(p/m) / 2 + sum q log(q/m) / 2 with the ratios formed
before the log (the entropy form H(m) - (H(p) + H(q)) / 2 cancels
catastrophically for similar heads). Accumulated as an f32 sum plus a count so
batches and devices add exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

F32 = jnp.float32


def _half_kl_to_mid(p, q):
  """sum_k p log(2p / (p + q)) / 2 over the last axis; zero where p is zero."""
  ratio = 2 * p / jnp.where(p > 0, p + q, 1.0)
  return 0.5 * jnp.sum(xlogy(p, jnp.where(p > 0, ratio, 1.0)), axis=-1)


def js_sums(probs) -> jax.Array:
  """Sum over (n, s) of JS(P_i || P_j) for probs [B,N,T,S]; returns [N,N] f32.

  Pairs are formed one head at a time (lax.map), so memory stays at one
  [B,N,T,S] block rather than [B,N,N,T,S].
  """
  p = probs.astype(F32)

  def row(i):
    pi = jax.lax.dynamic_index_in_dim(p, i, axis=1, keepdims=True)  # [B,1,T,S]
    js = _half_kl_to_mid(pi, p) + _half_kl_to_mid(p, pi)  # [B,N,T]
    return jnp.sum(jnp.maximum(js, 0.0), axis=(0, 2))

  d = jax.lax.map(row, jnp.arange(p.shape[1]))
  d = 0.5 * (d + d.T)  # exact symmetry despite rounding
  return d * (1.0 - jnp.eye(d.shape[0], dtype=F32))


def js_rows(probs) -> jax.Array:
  """Number of (n, s) rows that `js_sums` summed over."""
  return jnp.asarray(probs.shape[0] * probs.shape[2], F32)
