"""The paper's second-moment metric and the exact output energy (docs/method.md section 2).

For a depth-2 module f(x) = act(x A + a0) B with first-level column a_j and
second-level row b_j:

  second moment  M_j = 1/2 ||b_j||^2 E[(x a_j + a0_j)^2]   (gated: M(up) * M(gate))
  output energy  E_j = ||b_j||^2 E[h_j^2]                  (h_j: the channel's value in X2)

For an attention head i with value output v_i = A_i X W_V^i, both forms are
sum_c ||row c of W_O^i||^2 E[v_ic^2] (times 1/2 for the metric); the expectation
is measured from the head outputs, or taken as ||W_V column||^2 with S = I.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxprune.criteria.stats import ModuleStats, augmented_S
from jaxprune.models.adapter import ATTN, ModuleKind
from jaxprune.spec import Params

F32 = jnp.float32


def _row_norms2(w):
  return jnp.sum(jnp.square(w.astype(F32)), axis=-1)


def _first_level_energy(p: Params, key: str, stats: ModuleStats):
  """E[(x a_j + a0_j)^2] for every column j of the [D, F] kernel p[key] (bias optional).

  Measured directly from the pre-activations' sums of squares when the run took
  them (`first_sq`, O(F) per token), else as a_j^T S a_j from the input moments.
  """
  if stats.first is not None and not stats.identity:
    return stats.first[key].sq_mean
  p_lin = p[key]
  S_aug = augmented_S(stats, p_lin["kernel"].shape[0])
  a = p_lin["kernel"].astype(F32)
  a0 = p_lin["bias"].astype(F32) if "bias" in p_lin else jnp.zeros((a.shape[1],), F32)
  aa = jnp.concatenate([a, a0[None]], axis=0)  # [D+1, F]
  return jnp.einsum("if,ij,jf->f", aa, S_aug, aa)


def _head_energy(p: Params, stats: ModuleStats):
  """sum_c ||row c of W_O^i||^2 E[v_ic^2] per query head i."""
  o = _row_norms2(p["o"]["kernel"])  # [N, H]
  if stats.identity:
    # S = I: E[v_ic^2] -> ||W_V column||^2 of the KV head that head i reads.
    v = jnp.sum(jnp.square(p["v"]["kernel"].astype(F32)), axis=0)[jnp.asarray(stats.kv_index)]
  else:
    v = stats.hidden.sq_mean.reshape(o.shape)
  return jnp.sum(o * v, axis=-1)


def second_moment(kind: ModuleKind, p: Params, stats: ModuleStats):
  """The paper's metric M per unit (heads or channels); low = removed first."""
  if kind is ATTN:
    return 0.5 * _head_energy(p, stats)
  b2 = _row_norms2(p["down"]["kernel"])
  m = 0.5 * b2 * _first_level_energy(p, "up", stats)
  if "gate" in p:
    m = m * (0.5 * b2 * _first_level_energy(p, "gate", stats))
  return m


def output_energy(kind: ModuleKind, p: Params, stats: ModuleStats):
  """Exact output energy ||b_j||^2 E[h_j^2] per unit."""
  if kind is ATTN:
    return _head_energy(p, stats)
  b2 = _row_norms2(p["down"]["kernel"])
  if stats.identity:
    return second_moment(kind, p, stats)
  return b2 * stats.hidden.sq_mean
