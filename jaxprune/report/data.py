"""What the figures show, taken from a run's report.json (or recomputed from its dense model).

Everything here returns plain numpy arrays and dicts; `plots.py` draws them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxprune import allocate, criteria
from jaxprune.errors import UsageError
from jaxprune.models.forward import hidden_states
from jaxprune.spec import LayerSpec, ModelSpec, Params
from jaxprune.stats.heads import js_rows, js_sums


def _modules(report: dict, name: str) -> dict[int, dict]:
  return {m["layer"]: m for m in report.get("modules", []) if m["module"] == name}


def kept_per_layer(report: dict) -> dict[str, np.ndarray]:
  """Heads and MLP channels per layer before and after pruning, each [num_layers].

  Layers outside the pruned block range keep everything (their sizes come
  from the pruned spec in report["layers"]).
  """
  layers = report["layers"]
  attn, mlp = _modules(report, "attn"), _modules(report, "mlp")
  out = {k: np.zeros(len(layers), np.int64) for k in ("heads_before", "heads_after", "channels_before",
                                                      "channels_after")}
  for i, l in enumerate(layers):
    out["heads_after"][i] = l["num_heads"]
    out["heads_before"][i] = attn[i]["units_before"] if i in attn else l["num_heads"]
    out["channels_after"][i] = l["ffn_dim"]
    out["channels_before"][i] = mlp[i]["units_before"] if i in mlp else l["ffn_dim"]
  return out


ERRORS = (("error_inherited", "inherited (original weights, pruned-stream input)"),
          ("error_reconstructed", "after reconstruction"),
          ("error_after", "after pruning"))


def module_errors(report: dict) -> dict[str, dict[str, np.ndarray]]:
  """Per module kind ("attn", "mlp"): layer indices and the relative output errors ||Y - Y'||^2 / ||Y||^2.

  Keys of each entry: "layer" and those of ERRORS present in the report
  (error_reconstructed only when the run reconstructed).
  """
  out = {}
  for name in ("attn", "mlp"):
    mods = sorted(_modules(report, name).values(), key=lambda m: m["layer"])
    entry = {"layer": np.asarray([m["layer"] for m in mods], np.int64)}
    for key, _ in ERRORS:
      if mods and all(key in m for m in mods):
        entry[key] = np.asarray([m[key] for m in mods], np.float64)
    out[name] = entry
  return out


def layer_js(spec: ModelSpec, params: Params, windows, layer: int, batch_size: int = 8) -> np.ndarray:
  """D [N,N]: the mean Jensen-Shannon divergence between the attention maps of `layer`'s heads.

  The same statistic as the pipeline's (`stats.js_sums` / `js_rows`, docs/method.md
  section 3), taken on the model's own residual stream over windows [S,T].
  """
  if not 0 <= layer < spec.num_layers:
    raise UsageError(f"layer {layer} is outside the model's {spec.num_layers} blocks; choose 0..{spec.num_layers - 1}")
  windows = np.asarray(windows, np.int32)
  total, rows = None, 0.0
  for s in range(0, len(windows), batch_size):
    toks = jnp.asarray(windows[s:s + batch_size])
    x, _ = hidden_states(spec, params, toks, layers=range(layer))
    _, caps = hidden_states(spec, params, toks, layers=[layer], capture=("probs",), x=x)
    d = np.asarray(js_sums(caps[0]["probs"]), np.float64)
    total = d if total is None else total + d
    rows += float(js_rows(caps[0]["probs"]))
  return total / rows


def pairs_under(D: np.ndarray, tau: float) -> list[tuple[int, int]]:
  """Head pairs (i < j) with D_ij < tau."""
  n = D.shape[0]
  return [(i, j) for i in range(n) for j in range(i + 1, n) if D[i, j] < tau]


@dataclasses.dataclass(frozen=True)
class HeadSimilarity:
  """One layer's head divergences and what Algorithm 2 does with them at tau."""

  layer: int
  D: np.ndarray  # [N,N]
  tau: float
  tau_source: str  # how tau was chosen, in words
  selected: list[int]  # heads Algorithm 2 selects (prunes) at tau
  pairs: list[tuple[int, int]]  # pairs under tau
  from_run: bool  # D is the one the run used (--heads similarity), not recomputed

  def to_json(self) -> dict[str, Any]:
    return {"layer": self.layer, "js": np.round(self.D, 6).tolist(), "tau": self.tau, "tau_source": self.tau_source,
            "selected": self.selected, "pairs_under_tau": [list(p) for p in self.pairs], "from_run": self.from_run}


def head_similarity(D: np.ndarray, layer: int, tau: float, tau_source: str, from_run: bool) -> HeadSimilarity:
  D = np.asarray(D, np.float64)
  return HeadSimilarity(layer, D, float(tau), tau_source, criteria.algorithm2(D, tau), pairs_under(D, tau), from_run)


def tau_for_layer(D: np.ndarray, report: dict, layer: int, spec: ModelSpec | None = None,
                  layer_spec: LayerSpec | None = None) -> tuple[float, str]:
  """The tau to mark when the user gives none: the run's, else one that meets a head budget.

  The budget is what the run removed from this layer's heads, or when it
  removed none (e.g. `--attn-sparsity 0`), what `--heads similarity` would
  remove at the run's sparsity under the uniform allocation (needs the dense
  `spec` and `layer_spec`; without them, round(sparsity * heads)).

  Returns:
    (tau, how it was chosen, in words)
  """
  if report.get("tau") is not None:
    return float(report["tau"]), "the run's tau"
  mod = _modules(report, "attn").get(layer)
  removed = mod["units_before"] - mod["units_after"] if mod else 0
  if removed > 0:
    how = f"chosen so that Algorithm 2 selects the {removed} heads the run removed here"
  else:
    sparsity = float(report.get("config", {}).get("sparsity", 0.0))
    n = D.shape[0]
    if spec is not None and layer_spec is not None:
      keep = allocate.uniform_heads(layer_spec, allocate.Costs.of(spec, layer_spec), sparsity)
    else:
      keep = n - round(sparsity * n)
    removed = min(max(n - keep, 1), n - 1)
    how = f"chosen so that Algorithm 2 selects {removed} heads, as --heads similarity at sparsity {sparsity:g}"
  return criteria.search_tau([D], removed), how


def run_js(report: dict, layer: int) -> tuple[np.ndarray, float | None] | None:
  """The divergences and tau the run itself used for `layer` (runs with --heads similarity), else None."""
  mod = _modules(report, "attn").get(layer)
  if mod is None or "js" not in mod:
    return None
  tau = mod.get("tau", report.get("tau"))
  return np.asarray(mod["js"], np.float64), tau


def quality_points(quality: dict) -> list[dict[str, Any]]:
  """One point per run of benchmarks/results/quality.json: name, ratio, params, perplexity, calibration."""
  pts = []
  for r in quality.get("runs", []):
    if r.get("perplexity") is None or r.get("params_after") is None or not math.isfinite(r["perplexity"]):
      continue
    shakespeare = r.get("shakespeare_perplexity")
    pts.append({"name": r["name"], "method": r.get("method", r["name"]), "preset": r.get("preset"),
                "ratio": r.get("ratio"), "params": int(r["params_after"]), "perplexity": float(r["perplexity"]),
                "shakespeare_perplexity": float(shakespeare) if shakespeare is not None else None,
                "calibration": r.get("calibration", "")})
  return pts
