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

import dataclasses
from typing import Callable

from jaxprune.criteria.output_approx import refit_aware
from jaxprune.criteria.head_similarity import algorithm2, budgeted, search_tau
from jaxprune.criteria.second_moment import output_energy, second_moment
from jaxprune.criteria.stats import ModuleStats
from jaxprune.errors import UsageError
from jaxprune.stats.needs import KNOWN


@dataclasses.dataclass(frozen=True)
class Criterion:
  name: str
  score: Callable
  needs: frozenset | None = None
  description: str = ""
  prepare: Callable | None = None
  # True when scores of different layers and of heads vs channels are already
  # on one scale, so adaptive allocation must not standardize them again.
  prescaled: bool = False
  # True when scores are what removing a unit adds to the module's squared output error
  # (summed over tokens): adaptive allocation divides them by the residual stream's
  # energy entering the module and ranks units by that per parameter removed.
  stream_costs: bool = False


REGISTRY: dict[str, Criterion] = {}


def register(name: str, needs=None, description: str = "", prepare: Callable | None = None, prescaled: bool = False,
             stream_costs: bool = False):
  """Registers `score` under `name`. `needs`: an iterable of `jaxprune.stats.needs.KNOWN`
  names (() for a criterion that reads no statistics); None: the full moments."""
  if needs is not None:
    needs = frozenset(needs)
    if needs - KNOWN:
      raise UsageError(f"criterion {name!r} declares unknown needs {sorted(needs - KNOWN)}; "
                       f"choose from {', '.join(sorted(KNOWN))}")

  def deco(fn):
    REGISTRY[name] = Criterion(name, fn, needs, description or (fn.__doc__ or "").split("\n")[0],
                               prepare, prescaled, stream_costs)
    return fn
  return deco


def get(name: str) -> Criterion:
  _load_baselines()
  if name not in REGISTRY:
    raise UsageError(f"unknown pruning method {name!r}; available: {', '.join(sorted(REGISTRY))}")
  return REGISTRY[name]


def names() -> list[str]:
  _load_baselines()
  return sorted(REGISTRY)


def _load_baselines():
  try:
    import jaxprune.criteria.baselines  # noqa: F401  (registers on import)
  except ModuleNotFoundError as e:
    if e.name != "jaxprune.criteria.baselines":
      raise


register("goa", needs=("first_sq", "hidden_sq"), description="the paper's second-moment metric (gated FFN: product of up and gate forms)")(
    second_moment)
register("goa-energy", needs=("hidden_sq",), description="exact output energy ||b_j||^2 E[h_j^2] of each unit")(output_energy)
register("goa-obs", needs=("hidden_gram", "hidden_cross"), stream_costs=True,
         description="greedy removal order by the exact increase of the refit error (OBS; beyond the paper)")(
             refit_aware)

__all__ = ["Criterion", "ModuleStats", "REGISTRY", "algorithm2", "budgeted", "get", "names", "output_energy",
           "register", "search_tau", "second_moment"]
