"""Pruning criteria behind one signature, looked up by name.

A criterion is `score(kind, module_params, stats) -> f32[units]`: one score per
query head (attention) or MLP channel; the lowest scores are removed first.
`needs` lists the statistics it reads (`jaxprune.stats.needs`: first_sq,
hidden_sq, hidden_var, hidden_gram, hidden_cross, inputs, grads, sq_grads), and
the engine computes exactly the union of what the criterion and the options
need; a criterion registered without `needs` gets the full input and X2
moments. `prepare(model, windows, config)`, if given, runs
once before the layer loop (e.g. language-model gradients for Taylor scores)
and returns {"grads": per-layer trees, "sq_grads": per-layer trees}; the
pipeline hands each module its part through `ModuleStats`.
"""

from __future__ import annotations

from jaxprune.criteria.head_similarity import algorithm2, budgeted, search_tau
from jaxprune.criteria.output_approx import refit_aware
from jaxprune.criteria.registry import REGISTRY, Criterion, register
from jaxprune.criteria.second_moment import output_energy, second_moment
from jaxprune.criteria.stats import ModuleStats
from jaxprune.errors import UsageError


def get(name: str) -> Criterion:
  if name not in REGISTRY:
    raise UsageError(f"unknown pruning method {name!r}; available: {', '.join(sorted(REGISTRY))}")
  return REGISTRY[name]


def names() -> list[str]:
  return sorted(REGISTRY)


register("goa", needs=("first_sq", "hidden_sq"), description="the paper's second-moment metric (gated FFN: product of up and gate forms)")(
    second_moment)
register("goa-energy", needs=("hidden_sq",), description="exact output energy ||b_j||^2 E[h_j^2] of each unit")(output_energy)
register("goa-obs", needs=("hidden_gram", "hidden_cross"), stream_costs=True,
         description="greedy removal order by the exact increase of the refit error (OBS; beyond the paper)")(
             refit_aware)

# The baselines register themselves on import, after the paper's criteria (registry order as before).
from jaxprune.criteria import baselines  # noqa: E402,F401

__all__ = ["Criterion", "ModuleStats", "REGISTRY", "algorithm2", "budgeted", "get", "names", "output_energy",
           "register", "search_tau", "second_moment"]
