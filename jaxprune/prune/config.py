"""What a pruning run is asked to do: `PruneConfig`, and what it returns: `PruneResult`.

`PruneConfig`'s defaults, as written in its class body, are jaxprune's
recommended recipe; the named presets (`jaxprune.prune.presets`) are overrides
of them. Each field's type is its annotation and its help text is in its
`metadata`, which is all the command line and the YAML reader need
(`jaxprune.cli.fields`). Modes are `enum.StrEnum`s: a member equals its string,
so a config built from text, from strings or from members is the same config.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import typing
from typing import Any, Mapping

from jaxprune import allocate, criteria
from jaxprune.errors import UsageError
from jaxprune.model import Model
from jaxprune.prune import presets
from jaxprune.spec import ModelSpec


class HeadMode(enum.StrEnum):
  SECOND_MOMENT = "second-moment"  # heads ranked by the criterion
  SIMILARITY = "similarity"  # redundant heads by Jensen-Shannon divergence (Algorithm 2)


class Allocation(enum.StrEnum):
  UNIFORM = "uniform"  # every pruned layer keeps the same heads and channels
  ADAPTIVE = "adaptive"  # one ranking over all layers decides each layer's share (FLAP's AL-AM)


class ScoreData(enum.StrEnum):
  CALIB = "calib"  # the calibration windows through the pruned model
  RANDOM = "random"  # random-token windows
  IDENTITY = "identity"  # no statistics: S = I


class Rounding(enum.StrEnum):
  ONCE = "once"  # one shape for every pruned layer, the budget error reported
  CARRY = "carry"  # each layer's rounding carried to the next


class MatmulPrecision(enum.StrEnum):
  """The precision of the float32 matmuls of the passes that feed statistics, targets and solves
  (`jax.default_matmul_precision`). CPUs compute float32 dots in float32 whatever is asked; GPUs
  would otherwise use TF32 and TPUs bfloat16 passes, so the statistics would not be the ones
  validated on CPU."""

  HIGHEST = "highest"  # float32 products on every backend (TPU: six bfloat16 passes)
  HIGH = "high"  # TPU: three bfloat16 passes; GPU: TF32
  DEFAULT = "default"  # the backend's fastest: TPU one bfloat16 pass, GPU TF32


DAMPING_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _field(default, help: str, **meta):
  """A field whose default is written right here, with its help (and, for text input,
  `choices`: a callable giving a registry's names, or `words`: text that stands for
  other field values) in `metadata`."""
  return dataclasses.field(default=default, metadata=dict(help=help, **meta))


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """What to prune and how. The defaults are jaxprune's recommended recipe;
  `PruneConfig.preset("paper")` gives the paper's method.

  Each field's help text (`dataclasses.fields(PruneConfig)[i].metadata["help"]`)
  is also the `jaxprune prune` option's help, and YAML config files use the
  field names as keys. Modes accept their strings: `PruneConfig(heads="similarity")`.
  """

  sparsity: float = _field(0.2, "fraction of the attention + MLP parameters of the pruned blocks to remove, "
                           "in [0, 1)")
  method: str = _field("goa-obs", "criterion: goa (the paper's metric), goa-energy, goa-obs (greedy output "
                       "approximation with refit-aware costs) or a baseline", choices=criteria.names)
  heads: HeadMode = _field(HeadMode.SECOND_MOMENT, "how heads are chosen: second-moment (ranked by the criterion) "
                           "or similarity (redundant heads by Jensen-Shannon divergence; MLP channels take the "
                           "rest)")
  tau: float | None = _field(None, "similarity threshold for heads=similarity (Algorithm 2). Unset: with adaptive "
                             "allocation the tau whose selections meet the plan's head budget is searched; with "
                             "uniform allocation every layer drops its uniform head count, most similar pair first")
  reconstruct: bool = _field(False, "two-step least-squares reconstruction before selection")
  refit: bool = _field(True, "refit the second level on the kept channels after selection")
  intercept: bool = _field(True, "fit biases (a ones column) in the solves")
  damping: float = _field(1e-5, "ridge delta: lam = delta * mean(diag(X^T X)); 'auto' chooses it per solve on a "
                          "held-out batch of calibration windows", words={"auto": {"auto_damping": True}})
  auto_damping: bool = _field(False, "choose the damping of every solve from DAMPING_GRID by the fit on a held-out "
                              "batch of calibration windows (then solve on all windows)")
  layers: tuple[int, int] | None = _field(None, "half-open block range A:B to prune (default: all blocks)")
  allocation: Allocation = _field(Allocation.ADAPTIVE, "uniform (every pruned layer keeps the same heads and "
                                  "channels) or adaptive (FLAP-style global ranking)")
  min_keep: float = _field(0.25, "with adaptive allocation: the fraction of every module's heads and channels that "
                           "stays whatever the ranking says (0: at least one)")
  attn_sparsity: float | None = _field(0.0, "with uniform allocation: fraction of each attention module to remove, "
                                       "rounded to a head count the GQA groups allow (unset: sparsity); MLP "
                                       "channels take the rest of the budget")
  score_data: ScoreData = _field(ScoreData.CALIB, "statistics the criterion sees: calib (the calibration windows "
                                 "through the pruned model), random (random-token windows) or identity (S = I)")
  free_groups: bool = _field(False, "allow uneven query heads per KV head (JAX-only models)")
  shrink: float = _field(0.25, "shrink the second level's input covariance toward its diagonal by this fraction in "
                         "[0, 1] before its solves and the goa-obs ranking (0: as measured; 1: channels taken as "
                         "uncorrelated, FLAP's fluctuation and compensation)")
  absorb: float = _field(0.5, "fraction in [0, 1] of the error the residual stream carries into each module (dense "
                         "minus pruned stream) that its second level's fits (refit, reconstruction, goa-obs costs) "
                         "also take back (0: each module fits its dense output alone; without such fits it changes "
                         "nothing)")
  compensate: bool = _field(False, "FLAP's bias compensation: the removed channels' mean contribution is added to "
                            "the second level's bias")
  rounding: Rounding = _field(Rounding.ONCE, "with uniform allocation: once (one shape for every pruned layer, the "
                              "budget error reported) or carry (each layer's rounding carried to the next, so the "
                              "total lands on the budget but widths differ by a channel)")
  round_to: int = _field(1, "keep MLP channels in multiples of this (e.g. the mesh's model axis, so pruned weights "
                         "stay evenly sharded); what the rounding keeps beyond the budget is reported "
                         "(budget_error) or, with carry, taken from later blocks")
  inherited_error: bool = _field(False, "also measure each module's inherited error (its original weights on the "
                                 "pruned stream against the dense outputs; a diagnostic for `jaxprune report` that "
                                 "costs one more pass of every module)")
  skip_positions: int = _field(0, "leave each calibration window's first N positions out of the statistics that "
                               "rank units and fit weights (attention-sink tokens carry much of early modules' "
                               "output energy and steer the fits)")
  selfgen_share: float = _field(0.5, "with a calibration text (--calib FILE): windows of the model's own text "
                                "(sampled as the selfgen_* fields say) added per window of the text, rounded down "
                                "to whole batches, so the statistics also cover what the model serves beyond that "
                                "text (0: the text alone). Read where the calibration set is built: `jaxprune "
                                "prune` and `jaxprune.data.selfgen.with_own_text`")
  selfgen_windows_per_text: int = _field(4, "with self-generated calibration (--calib selfgen, or a text's "
                                         "selfgen_share): consecutive windows cut from each generated text (1: every "
                                         "window a text of its own, all starting at BOS, the paper's Self-Gen; more: "
                                         "longer texts, so most windows start mid-text as a corpus's windows do)")
  selfgen_samples: int = _field(128, "with self-generated calibration: how many windows to generate (the CLI's "
                                "--calib-samples, when given, sets the count of any calibration)")
  selfgen_top_k: int = _field(0, "with self-generated calibration: sample each token from the K most likely (0: "
                              "from the model's whole distribution)")
  selfgen_temperature: float = _field(1.0, "with self-generated calibration: divide the model's logits by this "
                                      "before sampling (above 1: more varied text)")
  batch_size: int = _field(16, "calibration windows per chunk (a multiple of the data-parallel devices)")
  seed: int = _field(0, "seed for random choices (calibration windows, the random criterion, random-token windows)")
  matmul_precision: MatmulPrecision = _field(MatmulPrecision.HIGHEST, "precision of the float32 matmuls of the "
                                             "passes that feed statistics, targets and solves: highest (float32 on "
                                             "every backend), high or default (GPU: TF32; TPU: bfloat16 passes). "
                                             "CPUs give the same bits for all three")

  def __post_init__(self):
    # Callers, YAML files and older code give modes as strings; stored as members, they are typed
    # and still equal those strings.
    for name, kind in _enum_fields().items():
      value = getattr(self, name)
      if not isinstance(value, kind):
        object.__setattr__(self, name, to_enum(kind, name, value))

  @classmethod
  def preset(cls, name: str, **overrides) -> "PruneConfig":
    """The named preset (`jaxprune.prune.presets.PRESETS`) with `overrides` on top.

    Example: `PruneConfig.preset("paper", sparsity=0.5)`; baselines:
    `PruneConfig.preset("baseline", method="flap")`.
    """
    check_names(overrides, f"preset {name!r} overrides")
    return cls(**presets.overrides(name, overrides))

  def check(self, spec: ModelSpec) -> "PruneConfig":
    """This config, once its values are in range and fit `spec` (else a one-line UsageError)."""
    allocate.check_ratio(self.sparsity)
    if self.attn_sparsity is not None:
      allocate.check_ratio(self.attn_sparsity)
    crit = criteria.get(self.method)
    if "hidden_cross" in crit.needs and self.score_data is ScoreData.IDENTITY:
      raise UsageError(f"method {self.method!r} solves against the calibration outputs, so score_data 'identity' "
                       "(no statistics) cannot serve it; use score_data 'calib' or another method")
    if self.tau is not None and not self.tau > 0:
      raise UsageError(f"tau must be positive (JS divergences lie in [0, ln 2 = 0.693]), got {self.tau}")
    if not 0 <= self.min_keep < 1:
      raise UsageError(f"min_keep must lie in [0, 1), got {self.min_keep}; e.g. 0.25 keeps a quarter of every module")
    if not 0 <= self.shrink <= 1:
      raise UsageError(f"shrink must lie in [0, 1], got {self.shrink}; 0 keeps the measured covariance")
    if not 0 <= self.absorb <= 1:
      raise UsageError(f"absorb must lie in [0, 1], got {self.absorb}; 0 fits each module to its dense output "
                       "alone, 1 also takes back all of the error the residual stream carries in")
    if not 0 < self.damping < float("inf"):
      raise UsageError(f"damping must be positive and finite, got {self.damping}; e.g. 1e-3 (the paper's) or 1e-5")
    if self.batch_size < 1:
      raise UsageError(f"batch_size must be positive, got {self.batch_size}")
    if self.seed < 0:  # numpy's generators take none
      raise UsageError(f"seed must be 0 or a positive integer, got {self.seed}")
    if self.skip_positions < 0:
      raise UsageError(f"skip_positions must be 0 or a positive number of positions, got {self.skip_positions}")
    if self.selfgen_windows_per_text < 1:
      raise UsageError(f"selfgen_windows_per_text must be a positive number of windows, got "
                       f"{self.selfgen_windows_per_text}; 1 samples every window as a text of its own")
    if not self.selfgen_temperature > 0:
      raise UsageError(f"selfgen_temperature must be positive, got {self.selfgen_temperature}; 1 samples the "
                       "model's own distribution")
    if not 0 <= self.selfgen_share < float("inf"):
      raise UsageError(f"selfgen_share must be 0 (the calibration text alone) or a positive number of self-generated "
                       f"windows per text window, got {self.selfgen_share}; e.g. 0.5")
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




def to_enum(kind: type[enum.Enum], name: str, value: Any) -> enum.Enum:
  """`value` as a member of mode `kind`, or a UsageError naming field `name`, the value and the choices."""
  try:
    return kind(value)
  except ValueError:
    raise UsageError(f"{name}={value!r} is not one of {', '.join(kind)}") from None


@functools.cache
def _enum_fields() -> dict[str, type[enum.Enum]]:
  hints = typing.get_type_hints(PruneConfig)
  return {f.name: hints[f.name] for f in dataclasses.fields(PruneConfig)
          if isinstance(hints[f.name], type) and issubclass(hints[f.name], enum.Enum)}


def check_names(values: Mapping[str, Any], where: str) -> None:
  """A UsageError naming any key of `values` that is not a PruneConfig field, and the fields."""
  names = [f.name for f in dataclasses.fields(PruneConfig)]
  unknown = [k for k in values if k not in names]
  if unknown:
    raise UsageError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                     f"allowed: {', '.join(names)}")


@dataclasses.dataclass(frozen=True)
class PruneResult:
  model: Model
  report: dict[str, Any]
