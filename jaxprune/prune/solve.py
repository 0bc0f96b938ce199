"""Least squares of one module: the sums a level's solve needs, the solve with its damping
choice, and the cuts that map kept units to the second level's input channels."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import placement, reconstruct
from jaxprune.models import adapter as A
from jaxprune.stats import moments


@dataclasses.dataclass(frozen=True)
class Part:
  """Least-squares sums of one group of windows: Moments of X, X^T Y and ||Y||^2; `kept`: the
  sums are a padded system's (`moments.subset_padded`) whose first `kept` features are real."""

  m: moments.Moments
  xty: jax.Array
  yy: jax.Array
  kept: int | None = None

  def __add__(self, other: "Part") -> "Part":
    return Part(self.m + other.m, self.xty + other.xty, self.yy + other.yy, self.kept)


def total(parts):
  """The parts summed left to right (the order the floating-point sums have always had)."""
  out = parts[0]
  for p in parts[1:]:
    out = out + p
  return out


def sum_stats(trees):
  """The sum of pytrees of statistics (Moments, Diag, dicts of them); None if there are none."""
  trees = [t for t in trees if t is not None]
  # `+`: numpy sums (host statistics) stay numpy.
  return functools.reduce(lambda a, b: jax.tree.map(lambda x, y: x + y, a, b), trees) if trees else None


def first_level_targets(kind, p, m_in: moments.Moments):
  """[W1; b1] and X^T Y1 (D+1, U1) for Y1 = [hd 1] [W1; b1], from the cross moment."""
  w1, b1 = A.first_level(kind, p)
  w1a = jnp.concatenate([w1, b1[None]], axis=0).astype(jnp.float32)
  cross = jnp.concatenate([m_in.xy, m_in.xx[:, -1:]], axis=1)  # [hp 1]^T [hd 1]
  return w1a, jnp.matmul(cross, w1a, precision="highest")


def has_bias(kind, p, level: str) -> bool:
  keys = kind.first_keys(p) if level == "first" else (kind.second_key,)
  return any("bias" in p[k] for k in keys)


def solve_level(parts: list[Part], w_orig_aug, delta, grid, intercept, what):
  """Solves one level on the sums of all groups of windows.

  With a damping `grid` and a held-out group (the last of `parts`), delta is
  the grid value whose solution from the other groups best fits the held-out
  windows; the final solution then uses every group.

  Returns (W, bias or None) -- or None when the damped solution fits the
  calibration targets no better than the original weights (as when the two
  streams still agree), in which case the original weights stay -- and a
  report entry with the residuals relative to ||Y||^2.
  """
  rep = {}
  if grid and len(parts) > 1:
    fit, held = total(parts[:-1]), parts[-1]
    errs = []
    for d in grid:
      w, _ = reconstruct.ridge_solve(fit.m, fit.xty, d, intercept, what, rows=fit.kept)
      errs.append(float(reconstruct.residual(held.m, held.xty, held.yy, w)))
    delta = float(grid[int(np.argmin(errs))])
    rep["heldout_residuals"] = {f"{d:g}": e / max(float(held.yy), 1e-30) for d, e in zip(grid, errs)}
  t = total(parts)
  w, info = reconstruct.ridge_solve(t.m, t.xty, delta, intercept, what, yy=t.yy, rows=t.kept)
  d = t.m.dim
  before = float(reconstruct.residual(t.m, t.xty, t.yy, w_orig_aug if intercept else w_orig_aug[:d]))
  after = info.residual
  scale = max(float(t.yy), 1e-30)
  # residual_after is the solve's own fit, stored raw so that a solve that fits
  # worse than the original weights shows; those weights are then kept.
  rep.update(residual_before=before / scale, residual_after=after / scale, damping=info.delta,
             retries=info.retries, kept_original=after >= before, intercept=bool(intercept))
  if after >= before:
    return None, rep
  # The solve comes back replicated on the statistics' mesh (or as numpy from host
  # statistics); the fitted weights go where the weights they replace live, so a module's
  # kernels see one placement (no retrace) and a model held on one device does not gain a
  # copy per device. They are cut on the host: slicing on the device compiles per width.
  if isinstance(w, np.ndarray) or len(w.sharding.device_set) == 1 or t.kept is not None or (
      isinstance(w_orig_aug, jax.Array) and len(w_orig_aug.sharding.device_set) == 1):
    w = placement.to_host(w)  # numpy: `A.with_*_level` shapes it on the host and puts it on the device uncommitted
  return (w[:d if t.kept is None else t.kept], w[d] if intercept else None), rep


def x2_index(kind, p, units: np.ndarray) -> np.ndarray:
  """Channels of X2 that belong to `units` (heads span head_dim channels each)."""
  w = A.unit_width(kind, p)
  return (units[:, None] * w + np.arange(w)[None]).reshape(-1)


def full_width_second(kind, p_pruned, idx: np.ndarray, width: int):
  """The pruned module's second level as a full-width [U2, D] kernel, zero rows for removed
  channels, and its bias: `second_apply` then advances every module of one shape with one compile."""
  w, b = A.second_level(kind, p_pruned)
  if placement.on_host(w):  # numpy: no scatter compiled per distinct kept count
    full = np.zeros((width, w.shape[1]), w.dtype)
    full[idx] = np.asarray(w)
    return jnp.asarray(full), b
  return jnp.zeros((width, w.shape[1]), w.dtype).at[jnp.asarray(idx)].set(w), b
