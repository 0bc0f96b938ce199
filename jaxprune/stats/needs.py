"""What a run must measure, derived from the criterion's declared needs and the options.

The engine computes exactly the union of what the criterion reads and what the
options use, so a metric-only run (FLAP, wanda-sp, the paper's metric without
reconstruction) advances one activation stream and forms no Gram matrix, and
only runs that solve against the dense model's outputs carry the dense stream.

Statistics a criterion can declare (`criteria.register(needs=...)`):

  first_sq      per-column sums of squares of the first level's pre-activations
                (the paper's MLP metric E[(x a_j + a0_j)^2])
  hidden_sq     per-channel E[x2^2] of the second level's input X2
  hidden_var    per-channel mean and variance of X2 (FLAP's fluctuation)
  hidden_gram   the full Gram matrix of X2
  hidden_cross  X2's Gram and its cross moment with the dense module output
  inputs        the full Gram matrix of the normalized module input
  grads, sq_grads  language-model gradients from the criterion's `prepare`

A criterion registered without `needs` gets the full `inputs` and
`hidden_gram` moments (what every criterion saw before needs were declared).
"""

from __future__ import annotations

import dataclasses

from jaxprune.models import adapter as A

STATS = frozenset({"first_sq", "hidden_sq", "hidden_var", "hidden_gram", "hidden_cross", "inputs"})
EXTRA = frozenset({"grads", "sq_grads"})
KNOWN = STATS | EXTRA
LEGACY = frozenset({"inputs", "hidden_gram"})

HIDDEN_LEVELS = ("none", "diag", "gram")


@dataclasses.dataclass(frozen=True)
class StreamNeeds:
  """What one pass over one activation stream must accumulate for one module."""

  hidden: str = "none"  # X2 statistics: none, diag (Diag sums) or gram (full Moments)
  cross: bool = False  # with hidden="gram": X2^T Y against the dense module output
  first_sq: bool = False  # pre-activation sums of squares (MLP first level)
  inputs: bool = False  # full Moments of the normalized input
  js: bool = False  # Jensen-Shannon sums between heads
  # Each window's first `skip` positions are left out of the moments (not of the JS sums):
  # attention-sink tokens carry much of early modules' output energy and would steer the fits.
  skip: int = 0

  def union(self, other: "StreamNeeds") -> "StreamNeeds":
    level = max(self.hidden, other.hidden, key=HIDDEN_LEVELS.index)
    return StreamNeeds(level, self.cross or other.cross, self.first_sq or other.first_sq,
                       self.inputs or other.inputs, self.js or other.js, max(self.skip, other.skip))


@dataclasses.dataclass(frozen=True)
class ModuleNeeds:
  """One module's work: the dense stream and what each stream's pass accumulates.

  Attributes:
    dense: advance the dense model's stream (targets of the solves, errors).
    first_moments: the first level's input moments with the cross moment to the
      dense stream (the first step of the reconstruction).
    inherited_error: measure ||f(x_pruned) - f(x_dense)|| with the original weights
      (a diagnostic: one more pass of the module over the pruned stream).
    calib: what the pass over the calibration windows' pruned stream accumulates.
    score: what the pass over the random-token scoring stream accumulates (or None).
  """

  dense: bool
  first_moments: bool
  inherited_error: bool
  calib: StreamNeeds
  score: StreamNeeds | None


def criterion_stats(needs: frozenset | None, kind: A.ModuleKind, skip: int = 0) -> StreamNeeds:
  """The statistics a criterion with declared `needs` reads for a module of `kind` (each
  window's first `skip` positions left out)."""
  needs = LEGACY if needs is None else needs
  if "hidden_gram" in needs or "hidden_cross" in needs:
    hidden = "gram"
  elif "hidden_sq" in needs or "hidden_var" in needs:
    hidden = "diag"
  else:
    hidden = "none"
  return StreamNeeds(hidden=hidden, cross="hidden_cross" in needs, first_sq="first_sq" in needs and kind is A.MLP,
                     inputs="inputs" in needs, skip=skip)


def module_needs(config, crit_needs: frozenset | None, kind: A.ModuleKind, scores: bool, js: bool) -> ModuleNeeds:
  """The union of what the criterion (when `scores`: the module has units to choose) and the options use.

  Args:
    config: a PruneConfig.
    crit_needs: the criterion's declared needs (None: undeclared).
    scores: whether the criterion is called for this module.
    js: whether the module's heads are chosen by similarity (JS matrices).
  """
  solves = config.reconstruct or config.refit
  skip = config.skip_positions
  crit = criterion_stats(crit_needs, kind, skip) if scores and config.score_data != "identity" else StreamNeeds()
  own = StreamNeeds(hidden="gram" if solves else ("diag" if config.compensate else "none"), cross=solves, js=js,
                    skip=skip)
  if crit.cross or not scores or config.score_data != "random":
    # Criteria that solve against the dense outputs (goa-obs) read the calibration windows, which have them.
    calib, score = own.union(crit), None
  else:
    calib, score = own, crit
  dense = solves or calib.cross or config.inherited_error
  return ModuleNeeds(dense=dense, first_moments=config.reconstruct, inherited_error=config.inherited_error,
                     calib=calib, score=score)
