"""Which units of a module stay, from the criterion's scores and the shape the budget asks for."""

from __future__ import annotations

import numpy as np

from jaxprune import allocate, criteria, placement
from jaxprune.models import adapter as A


def _rank01(x) -> np.ndarray:
  """Scores mapped to [0, 1) by rank (a tie-breaker that cannot outweigh a +2 bonus)."""
  r = np.argsort(np.argsort(x, kind="stable"), kind="stable")
  return r / max(len(x), 1)


def select(c, kind, layer, scores, js, shape, tau) -> tuple[np.ndarray, dict]:
  """(the kept units, what the similarity rule decided: tau, the JS matrix and the similar
  heads, or {} when no rule of similarity ran)."""
  if kind is not A.ATTN:
    return allocate.choose_channels(scores, shape[0]), {}
  n_keep, n_kv = shape
  if c.heads != "similarity":
    return allocate.choose_heads(layer, scores, n_keep, c.free_groups, n_kv=n_kv), {}
  D = placement.to_host(js).astype(np.float64)
  if tau is not None:
    drop = criteria.algorithm2(D, tau)
    n_keep, n_kv = layer.num_heads - len(drop), None  # tau decides the count
  else:
    drop = criteria.budgeted(D, scores, layer.num_heads - n_keep)
  priority = _rank01(scores) + 2.0 * ~np.isin(np.arange(layer.num_heads), drop)
  info = dict(tau=tau, js=D.round(6).tolist(), similar_heads=[int(h) for h in drop])
  return allocate.choose_heads(layer, priority, n_keep, c.free_groups, n_kv=n_kv), info
