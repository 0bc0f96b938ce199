"""Named pruning recipes, and turning text (command line, YAML) into `PruneConfig` values.

A preset is a plain dict of `PruneConfig` field values. `PruneConfig()`'s
defaults are the `recommended` preset's, so the API, the CLI and the notebook
agree; `PruneConfig.preset(name, **overrides)` starts from any of them.

  recommended           jaxprune's recipe (docs/results.md; chosen on held-out
                        WikiText-2 valid windows by benchmarks/selection.py and
                        checked on Shakespeare): the greedy output-approximation
                        order (`goa-obs`) on statistics whose covariance is
                        shrunk a quarter of the way to its diagonal, adaptive
                        allocation by those costs (every module keeps at least
                        a quarter of its units), refit of the kept channels
                        with an intercept, small damping, no reconstruction
                        before selection. Layers differ in width, so the
                        Hugging Face export is a per-layer config with
                        its modeling file (`from_pretrained(...,
                        trust_remote_code=True)` or `jaxprune.pytorch.load_pruned`).
                        Each refit also fits half the error the residual
                        stream carries into its module (absorb 0.5), so
                        modules take back what earlier ones lost instead of
                        passing it on.
  recommended-uniform   the same criterion with one shape in every layer (MLP
                        channels only; shrink 0.5, held-out best for uniform;
                        no absorb, which lost on Shakespeare here):
                        an export that stock `from_pretrained` loads, at some
                        cost off the calibration domain.
  recommended-datafree  the recipe on self-generated text, with the statistics
                        taken from that text itself (the default of
                        `jaxprune prune --calib selfgen`). The text is sampled
                        from the model's whole distribution (no top-k) in
                        texts of 4 windows, so most windows start mid-text as
                        a corpus's do; 1024 windows of it (eight times a
                        calibration set's: more text kept gaining up to
                        there) with the covariance shrunk half way to its
                        diagonal; every module keeps at least half its heads
                        and channels, which spreads the budget over more
                        layers than the recipe's quarter does; and each
                        module's refit fits all of the error the residual
                        stream carries in (absorb 1, where the recipe's
                        held-out best is 0.5)
                        (benchmarks/results/selection_datafree.md).
  paper                 the paper as METHOD.md states it: gated second-moment
                        metric, uniform allocation, two-step reconstruction
                        before selection, damping 1e-3.
  paper-datafree        the paper's Self-Gen: as `paper`, calibrated on
                        self-generated text (each window a text from BOS, top-50
                        sampling), statistics from random tokens.
  baseline              a published tool as it runs itself: no
                        reconstruction, refit or intercept; FLAP with its bias
                        compensation. `jaxprune prune --method M` for a
                        baseline M starts here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxprune.errors import UsageError

# jaxprune's recommended recipe: the one place that says what the default is.
RECOMMENDED = dict(method="goa-obs", heads="second-moment", allocation="adaptive", min_keep=0.25, shrink=0.25,
                   attn_sparsity=0.0, reconstruct=False, refit=True, intercept=True, damping=1e-5,
                   auto_damping=False, score_data="calib", compensate=False, absorb=0.5)
# One shape in every pruned layer (a stock Hugging Face config); held-out best shrink for it.
# No absorb: it gained on held-out valid but lost on Shakespeare with this structure.
RECOMMENDED_UNIFORM = dict(RECOMMENDED, allocation="uniform", min_keep=0.0, shrink=0.5, absorb=0.0)

# The paper's method (METHOD.md sections 2-6); also what PruneConfig's defaults
# were before the presets, so results made with those defaults are this preset.
PAPER = dict(method="goa", heads="second-moment", allocation="uniform", attn_sparsity=None, reconstruct=True,
             refit=False, intercept=False, damping=1e-3, auto_damping=False, score_data="calib", compensate=False,
             shrink=0.0, min_keep=0.0, absorb=0.0)

# Published tools run without any of jaxprune's least-squares steps.
BASELINE = dict(heads="second-moment", allocation="uniform", attn_sparsity=None, reconstruct=False, refit=False,
                intercept=False, damping=1e-3, auto_damping=False, score_data="calib", compensate=False, shrink=0.0,
                min_keep=0.0, absorb=0.0)

PRESETS: dict[str, dict[str, Any]] = {
    "recommended": RECOMMENDED,
    "recommended-uniform": RECOMMENDED_UNIFORM,
    # Statistics from the self-generated text itself, not from random tokens; that text drawn
    # from the model's whole distribution, four windows a text, 1024 windows (data costs nothing
    # here but generation; 2048 gained no more); every module keeps half its units; the refits
    # take back all of the stream's inherited error (absorb 0.25-1 gained 3-5.6 on held-out
    # WikiText-2 valid, 1 the most, and about 1.3 on Shakespeare).
    "recommended-datafree": dict(RECOMMENDED, score_data="calib", selfgen_top_k=0, selfgen_windows_per_text=4,
                                 selfgen_samples=1024, shrink=0.5, min_keep=0.5, absorb=1.0),
    "paper": PAPER,
    "paper-datafree": dict(PAPER, score_data="random", selfgen_top_k=50, selfgen_windows_per_text=1),
    "baseline": BASELINE,
}

# Presets meant for self-generated calibration: the CLI generates it unless --calib says otherwise.
DATAFREE = ("recommended-datafree", "paper-datafree")

# Criteria that stand for published tools (METHOD.md section 7).
BASELINE_METHODS = ("flap", "wanda-sp", "l1", "l2", "random", "taylor-element1", "taylor-element2", "taylor-vector")


def names() -> list[str]:
  return list(PRESETS)


def default_preset(method: str | None, calib: str | None) -> str:
  """The preset a run starts from when none is named: `baseline` for a baseline
  method, `recommended-datafree` on self-generated text, else `recommended`."""
  if method in BASELINE_METHODS:
    return "baseline"
  return "recommended-datafree" if calib == "selfgen" else "recommended"


def values(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The preset's field values with `overrides` on top (names checked against PruneConfig)."""
  if name not in PRESETS:
    raise UsageError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
  overrides = dict(overrides or {})
  check_names(overrides, f"preset {name!r} overrides")
  out = {**PRESETS[name], **overrides}
  if name == "baseline":
    if "method" not in out:
      raise UsageError(f"preset 'baseline' needs a method; pass one of {', '.join(BASELINE_METHODS)}")
    # FLAP's published form includes its bias compensation.
    if "compensate" not in overrides:
      out["compensate"] = out["method"] == "flap"
  return out


# ---------------------------------------------------------------------------
# Field values from text or YAML


def _fields() -> dict[str, dataclasses.Field]:
  from jaxprune.prune.config import PruneConfig
  return {f.name: f for f in dataclasses.fields(PruneConfig)}


def check_names(d: Mapping[str, Any], where: str) -> None:
  fields = _fields()
  unknown = [k for k in d if k not in fields]
  if unknown:
    raise UsageError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                     f"allowed: {', '.join(fields)}")


def choices(name: str) -> tuple[str, ...] | None:
  """The allowed values of a string field, or None when any value of its type goes."""
  c = _fields()[name].metadata.get("choices")
  return tuple(c()) if callable(c) else c


def coerce(name: str, value: Any, where: str) -> Any:
  """`value` (a command-line string or a YAML scalar) as field `name`'s type, checked.

  Raises UsageError naming the key, the bad value and what is allowed.
  """
  fields = _fields()
  if name not in fields:
    check_names({name: value}, where)
  kind = fields[name].metadata.get("kind", "str")
  bad = f"{where}: {name}={value!r}"
  if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
    if fields[name].metadata.get("optional"):
      return None
    raise UsageError(f"{bad} is not allowed; {name} needs a value ({_describe(name, kind)})")
  if kind == "bool":
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
      return value.lower() in ("true", "yes", "on", "1")
    raise UsageError(f"{bad} is not a boolean; use true or false")
  if kind in ("int", "float"):
    if isinstance(value, bool):
      raise UsageError(f"{bad} is not a number; {name} takes {_describe(name, kind)}")
    try:
      out = int(value) if kind == "int" else float(value)
    except (TypeError, ValueError):
      raise UsageError(f"{bad} is not a number; {name} takes {_describe(name, kind)}") from None
    if kind == "int" and isinstance(value, float) and out != value:
      raise UsageError(f"{bad} is not an integer")
    return out
  if kind == "range":
    if isinstance(value, str):
      try:
        a, b = value.split(":")
        return int(a), int(b)
      except ValueError:
        pass
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
      return int(value[0]), int(value[1])
    raise UsageError(f"{bad} is not a block range; use A:B (a half-open range such as 4:28) or [A, B]")
  if not isinstance(value, str):
    raise UsageError(f"{bad} is not a string; {name} takes {_describe(name, kind)}")
  allowed = choices(name)
  if allowed is not None and value not in allowed:
    raise UsageError(f"{bad} is not one of {', '.join(allowed)}")
  return value


def _describe(name: str, kind: str) -> str:
  allowed = choices(name)
  if allowed is not None:
    return "one of " + ", ".join(allowed)
  return {"int": "an integer", "float": "a number", "bool": "true or false", "range": "a block range A:B"}.get(
      kind, "a string")


def _yaml_problem(e, text: str) -> str:
  """PyYAML's problem on one line, with the byte offset and line of the place it names."""
  what = " ".join(str(getattr(e, "problem", None) or e).split())
  mark = getattr(e, "problem_mark", None)
  if mark is None:
    return what
  offset = len(text[:mark.index].encode("utf-8"))
  return f"{what} at byte offset {offset} (line {mark.line + 1}, column {mark.column + 1})"


def from_yaml(path: str) -> dict[str, Any]:
  """PruneConfig field values from a YAML mapping of field names (checked and typed)."""
  import yaml

  from jaxprune.data.stream import decode

  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    raise UsageError(f"config file {path} does not exist; pass a YAML file of PruneConfig fields") from None
  except IsADirectoryError:
    raise UsageError(f"config file {path} is a directory; pass a YAML file of PruneConfig fields") from None
  text = decode(raw, path, what="config file")
  try:
    data = yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise UsageError(f"config file {path} is not valid YAML: {_yaml_problem(e, text)}; fix the file (one "
                     "'field: value' per line, e.g. 'sparsity: 0.2')") from None
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise UsageError(f"config file {path} must hold a mapping of PruneConfig fields (e.g. 'sparsity: 0.2'), "
                     f"got a {type(data).__name__}")
  where = f"config file {path}"
  check_names(data, where)
  out = {}
  for k, v in data.items():
    if k == "damping" and isinstance(v, str) and v == "auto":
      out["auto_damping"] = True
      continue
    out[k] = coerce(k, v, where)
  return out
