"""What a pruning run is asked to do: `PruneConfig`, and what it returns: `PruneResult`."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxprune import allocate, criteria
from jaxprune.errors import UsageError
from jaxprune.model import Model
from jaxprune.prune import presets
from jaxprune.spec import ModelSpec

HEAD_MODES = ("second-moment", "similarity")
ALLOCATIONS = ("uniform", "adaptive")
SCORE_DATA = ("calib", "random", "identity")
ROUNDINGS = ("once", "carry")
DAMPING_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _opt(name: str, default, help: str, kind: str = "str", choices=None, optional: bool = False):
  """A PruneConfig field: its default (the recommended preset's where it sets one) and,
  in `metadata`, what the CLI and the YAML reader need (help, type, allowed values)."""
  return dataclasses.field(default=presets.RECOMMENDED.get(name, default),
                           metadata=dict(help=help, kind=kind, choices=choices, optional=optional))


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """What to prune and how. Defaults are the `recommended` preset's (see
  `jaxprune.presets`); `PruneConfig.preset("paper")` gives the paper's method.

  Each field's help text (`dataclasses.fields(PruneConfig)[i].metadata["help"]`)
  is also the `jaxprune prune` option's help, and YAML config files use the
  field names as keys.
  """

  sparsity: float = _opt("sparsity", 0.2, "fraction of the attention + MLP parameters of the pruned blocks to "
                         "remove, in [0, 1)", "float")
  method: str = _opt("method", "goa", "criterion: goa (the paper's metric), goa-energy, goa-obs (greedy "
                     "output approximation with refit-aware costs) or a baseline", choices=lambda: criteria.names())
  heads: str = _opt("heads", "second-moment", "how heads are chosen: second-moment (ranked by the criterion) "
                    "or similarity (redundant heads by Jensen-Shannon divergence; MLP channels take the rest)",
                    choices=HEAD_MODES)
  tau: float | None = _opt("tau", None, "similarity threshold for heads=similarity (Algorithm 2). Unset: "
                           "with adaptive allocation the tau whose selections meet the plan's head budget is "
                           "searched; with uniform allocation every layer drops its uniform head count, most "
                           "similar pair first", "float", optional=True)
  reconstruct: bool = _opt("reconstruct", True, "two-step least-squares reconstruction before selection", "bool")
  refit: bool = _opt("refit", False, "refit the second level on the kept channels after selection", "bool")
  intercept: bool = _opt("intercept", False, "fit biases (a ones column) in the solves", "bool")
  damping: float = _opt("damping", 1e-3, "ridge delta: lam = delta * mean(diag(X^T X)); 'auto' chooses it per "
                        "solve on a held-out batch of calibration windows", "float")
  auto_damping: bool = _opt("auto_damping", False, "choose the damping of every solve from DAMPING_GRID by the "
                            "fit on a held-out batch of calibration windows (then solve on all windows)", "bool")
  layers: tuple[int, int] | None = _opt("layers", None, "half-open block range A:B to prune (default: all blocks)",
                                        "range", optional=True)
  allocation: str = _opt("allocation", "uniform", "uniform (every pruned layer keeps the same heads and channels) "
                         "or adaptive (FLAP-style global ranking)", choices=ALLOCATIONS)
  min_keep: float = _opt("min_keep", 0.0, "with adaptive allocation: the fraction of every module's heads and "
                         "channels that stays whatever the ranking says (0: at least one)", "float")
  attn_sparsity: float | None = _opt("attn_sparsity", None, "with uniform allocation: fraction of each attention "
                                     "module to remove, rounded to a head count the GQA groups allow (unset: "
                                     "sparsity); MLP channels take the rest of the budget", "float", optional=True)
  score_data: str = _opt("score_data", "calib", "statistics the criterion sees: calib (the calibration windows "
                         "through the pruned model), random (random-token windows) or identity (S = I)",
                         choices=SCORE_DATA)
  free_groups: bool = _opt("free_groups", False, "allow uneven query heads per KV head (JAX-only models)", "bool")
  shrink: float = _opt("shrink", 0.0, "shrink the second level's input covariance toward its diagonal by this "
                       "fraction in [0, 1] before its solves and the goa-obs ranking (0: as measured; 1: channels "
                       "taken as uncorrelated, FLAP's fluctuation and compensation)", "float")
  absorb: float = _opt("absorb", 0.0, "fraction in [0, 1] of the error the residual stream carries into each "
                       "module (dense minus pruned stream) that its second level's fits (refit, reconstruction, "
                       "goa-obs costs) also take back (0: each module fits its dense output alone; without such fits it "
                       "changes nothing)", "float")
  compensate: bool = _opt("compensate", False, "FLAP's bias compensation: the removed channels' mean "
                          "contribution is added to the second level's bias", "bool")
  rounding: str = _opt("rounding", "once", "with uniform allocation: once (one shape for every pruned layer, "
                       "the budget error reported) or carry (each layer's rounding carried to the next, so the "
                       "total lands on the budget but widths differ by a channel)", choices=ROUNDINGS)
  round_to: int = _opt("round_to", 1, "keep MLP channels in multiples of this (e.g. the mesh's model axis, so "
                       "pruned weights stay evenly sharded); what the rounding keeps beyond the budget is reported "
                       "(budget_error) or, with carry, taken from later blocks", "int")
  inherited_error: bool = _opt("inherited_error", False, "also measure each module's inherited error (its original "
                                "weights on the pruned stream against the dense outputs; a diagnostic for "
                                "`jaxprune report` that costs one more pass of every module)", "bool")
  skip_positions: int = _opt("skip_positions", 0, "leave each calibration window's first N positions out of the "
                             "statistics that rank units and fit weights (attention-sink tokens carry much of "
                             "early modules' output energy and steer the fits)", "int")
  selfgen_windows_per_text: int = _opt("selfgen_windows_per_text", 1, "with self-generated calibration (--calib "
                                       "selfgen): consecutive windows cut from each generated text (1: every window "
                                       "a text of its own, all starting at BOS, the paper's Self-Gen; more: longer "
                                       "texts, so most windows start mid-text as a corpus's windows do)", "int")
  selfgen_samples: int = _opt("selfgen_samples", 128, "with self-generated calibration: how many windows to "
                              "generate (the CLI's --calib-samples, when given, sets the count of any calibration)",
                              "int")
  selfgen_top_k: int = _opt("selfgen_top_k", 50, "with self-generated calibration: sample each token from the K "
                            "most likely (0: from the model's whole distribution)", "int")
  selfgen_temperature: float = _opt("selfgen_temperature", 1.0, "with self-generated calibration: divide the "
                                    "model's logits by this before sampling (above 1: more varied text)", "float")
  batch_size: int = _opt("batch_size", 16, "calibration windows per chunk (a multiple of the data-parallel "
                         "devices)", "int")
  seed: int = _opt("seed", 0, "seed for random choices (calibration windows, the random criterion, random-token "
                   "windows)", "int")

  @classmethod
  def preset(cls, name: str, **overrides) -> "PruneConfig":
    """The named preset (`jaxprune.presets.PRESETS`) with `overrides` on top.

    Example: `PruneConfig.preset("paper", sparsity=0.5)`; baselines:
    `PruneConfig.preset("baseline", method="flap")`.
    """
    return cls(**presets.values(name, overrides))

  def check(self, spec: ModelSpec) -> "PruneConfig":
    allocate.check_ratio(self.sparsity)
    if self.attn_sparsity is not None:
      allocate.check_ratio(self.attn_sparsity)
    crit = criteria.get(self.method)
    if "hidden_cross" in crit.needs and self.score_data == "identity":
      raise UsageError(f"method {self.method!r} solves against the calibration outputs, so score_data 'identity' "
                       "(no statistics) cannot serve it; use score_data 'calib' or another method")
    for name, value, allowed in (("heads", self.heads, HEAD_MODES), ("allocation", self.allocation, ALLOCATIONS),
                                 ("score_data", self.score_data, SCORE_DATA), ("rounding", self.rounding, ROUNDINGS)):
      if value not in allowed:
        raise UsageError(f"{name}={value!r} is not one of {', '.join(allowed)}")
    if self.tau is not None and not self.tau > 0:
      raise UsageError(f"tau must be positive (JS divergences lie in [0, ln 2 = 0.693]), got {self.tau}")
    if not 0 <= self.min_keep < 1:
      raise UsageError(f"min_keep must lie in [0, 1), got {self.min_keep}; e.g. 0.25 keeps a quarter of every module")
    if not 0 <= self.shrink <= 1:
      raise UsageError(f"shrink must lie in [0, 1], got {self.shrink}; 0 keeps the measured covariance")
    if not 0 <= self.absorb <= 1:
      raise UsageError(f"absorb must lie in [0, 1], got {self.absorb}; 0 fits each module to its dense output "
                       "alone, 1 also takes back all of the error the residual stream carries in")
    if not self.damping > 0:
      raise UsageError(f"damping must be positive, got {self.damping}; e.g. 1e-3 (the paper's) or 1e-5")
    if self.batch_size < 1:
      raise UsageError(f"batch_size must be positive, got {self.batch_size}")
    if self.skip_positions < 0:
      raise UsageError(f"skip_positions must be 0 or a positive number of positions, got {self.skip_positions}")
    if self.selfgen_windows_per_text < 1:
      raise UsageError(f"selfgen_windows_per_text must be a positive number of windows, got "
                       f"{self.selfgen_windows_per_text}; 1 samples every window as a text of its own")
    if not self.selfgen_temperature > 0:
      raise UsageError(f"selfgen_temperature must be positive, got {self.selfgen_temperature}; 1 samples the "
                       "model's own distribution")
    if self.selfgen_samples < 1:
      raise UsageError(f"selfgen_samples must be a positive number of windows, got {self.selfgen_samples}")
    if self.selfgen_top_k < 0:
      raise UsageError(f"selfgen_top_k must be 0 (the whole distribution) or a positive number of tokens, got "
                       f"{self.selfgen_top_k}")
    if self.round_to < 1:
      raise UsageError(f"round_to must be a positive number of channels, got {self.round_to}; 1 does not round")
    start, stop = self.block_range(spec)
    if not 0 <= start < stop <= spec.num_layers:
      raise UsageError(f"block range {start}:{stop} is outside the model's {spec.num_layers} blocks; "
                       f"pass --layers A:B with 0 <= A < B <= {spec.num_layers}")
    return self

  def block_range(self, spec: ModelSpec) -> tuple[int, int]:
    return tuple(self.layers) if self.layers is not None else (0, spec.num_layers)


@dataclasses.dataclass(frozen=True)
class PruneResult:
  model: Model
  report: dict[str, Any]
