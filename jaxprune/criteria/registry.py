"""The criteria's registry: a criterion's name, its score function and what it needs.

Criterion modules (`jaxprune.criteria.baselines`) register into it at import; the package
(`jaxprune.criteria`) looks criteria up by name.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

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
