"""Redundant heads from the Jensen-Shannon divergence of their attention maps (docs/method.md section 3)."""

from __future__ import annotations

import numpy as np

from jaxprune.errors import UsageError


def algorithm2(D: np.ndarray, tau: float) -> list[int]:
  """The paper's Algorithm 2: heads to prune at threshold tau.

  Pairs (i, j), i != j, are scanned in row-major order; when D[i, j] < tau and
  neither i nor j is already selected, i is selected.
  """
  if tau <= 0:
    raise UsageError(f"tau must be positive (JS divergences lie in [0, ln 2]), got {tau}")
  D = np.asarray(D)
  n = D.shape[0]
  selected: list[int] = []
  chosen = np.zeros(n, bool)
  for i in range(n):
    for j in range(n):
      if i != j and D[i, j] < tau and not chosen[i] and not chosen[j]:
        chosen[i] = True
        selected.append(i)
  return sorted(selected)


def budgeted(D: np.ndarray, scores: np.ndarray, k: int) -> list[int]:
  """Exactly k heads to prune: repeatedly take the most similar pair among the
  heads still kept and drop the one with the lower score."""
  D = np.asarray(D, np.float64)
  scores = np.asarray(scores, np.float64)
  n = D.shape[0]
  if not 0 <= k < n:
    raise UsageError(f"cannot prune {k} of {n} heads; at least one head must stay")
  kept = list(range(n))
  pruned: list[int] = []
  for _ in range(k):
    sub = D[np.ix_(kept, kept)] + np.diag(np.full(len(kept), np.inf))
    a, b = np.unravel_index(np.argmin(sub), sub.shape)
    i, j = kept[a], kept[b]
    drop = i if scores[i] < scores[j] or (scores[i] == scores[j] and i > j) else j
    kept.remove(drop)
    pruned.append(drop)
  return sorted(pruned)


def search_tau(Ds: list[np.ndarray], budget: int) -> float:
  """The tau whose Algorithm-2 selections over all layers come closest to `budget` heads.

  Candidates are the midpoints between the distinct divergences, so every
  attainable count is tried; ties go to the smaller tau.
  """
  values = np.unique(np.concatenate([np.asarray(D)[~np.eye(len(D), dtype=bool)] for D in Ds]))
  cands = np.concatenate([[values[0] / 2], (values[:-1] + values[1:]) / 2, [values[-1] * 1.01 + 1e-9]])
  cands = cands[cands > 0]
  best_tau, best_gap = None, None
  for tau in cands:
    gap = abs(sum(len(algorithm2(D, tau)) for D in Ds) - budget)
    if best_gap is None or gap < best_gap:
      best_tau, best_gap = float(tau), gap
  return best_tau
