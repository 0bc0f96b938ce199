"""Nothing non-finite goes in or out: each input block is checked for NaN and Inf on its
devices as it is read, and each module's pruned stream after it is pruned (a NaN or Inf
weight, or degenerate statistics, shows there), so that a run fails with one line naming
the tensor instead of publishing NaNs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import placement
from jaxprune.errors import UsageError

BAD_WEIGHTS = ("pruning needs finite weights: check the model file (a broken download or conversion) or use "
               "another checkpoint")
_DEGENERATE = ("its statistics are degenerate (e.g. too few or repeated calibration windows): use more or other "
               "calibration windows, or a larger --damping (nothing of this block was saved)")


@jax.jit
def _all_finite(tree):
  """Whether each leaf holds only finite values (one compile per tree structure and shapes)."""
  return jax.tree.map(lambda x: jnp.isfinite(x).all(), tree)


def check_finite(tree, what: str, fix: str, error=UsageError) -> None:
  """Raises `error` naming the first leaf of `tree` that holds NaN or Inf (checked where the
  leaves live: one boolean per leaf comes back, and a leaf only when it is bad)."""
  flags = jax.tree_util.tree_flatten_with_path(_all_finite(tree))[0]
  for (path, ok), leaf in zip(flags, jax.tree_util.tree_leaves(tree)):
    if not bool(placement.to_host(ok)):
      kind = "NaN" if np.isnan(np.asarray(placement.to_host(leaf), np.float32)).any() else "Inf"
      name = jax.tree_util.keystr(path, simple=True, separator="/")
      raise error(f"{what} holds {kind} values in {name}; {fix}")


def check_module(out, kind, i: int) -> None:
  """Refuses a module whose pruned stream (and so its weights or statistics) is not finite,
  naming the pruned tensor that is not, if one is: nothing of it is saved or published.
  `out` is the step's `step.ModuleOut`."""
  streams = {f"group_{g}": grp.xp for g, grp in enumerate(out.groups)}
  try:
    check_finite({**streams, **({"scoring": out.xs} if out.xs is not None else {})},
                 f"the pruned stream after block {i}'s {kind.name}", _DEGENERATE)
  except UsageError:
    check_finite(out.block, f"block {i}'s pruned {kind.name}", _DEGENERATE)
    raise
