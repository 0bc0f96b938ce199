"""Named pruning recipes: each a plain dict of the `PruneConfig` fields it changes.

`PruneConfig`'s written defaults ARE the `recommended` recipe, so that preset
is empty, and every other one names only the fields where it differs from
those defaults. This module holds plain data and imports no config, so that
`jaxprune.prune.config` can build on it (field names are checked there);
`PruneConfig.preset(name, **overrides)` starts from any of them.

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
                        passing it on. A calibration text is joined by half
                        as many windows of the model's own text (sampled from
                        its whole distribution in texts of 4 windows;
                        selfgen_share 0.5), so the statistics cover what the
                        model serves beyond that text
                        (benchmarks/results/selection_mixture.md).
  recommended-uniform   the same criterion with one shape in every layer (MLP
                        channels only; shrink 0.5, held-out best for uniform;
                        no absorb, which lost on Shakespeare here; the text
                        alone, its self-generated share not measured here):
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
  paper                 the paper as docs/method.md states it: gated second-moment
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

from typing import Any, Mapping

from jaxprune.errors import UsageError

# The recommended recipe is PruneConfig's defaults: nothing to override.
RECOMMENDED: dict[str, Any] = {}
# One shape in every pruned layer (a stock Hugging Face config); held-out best shrink for it.
# No absorb: it gained on held-out valid but lost on Shakespeare with this structure.
# Calibrated on the text alone: the self-generated share was chosen with the adaptive recipe only.
RECOMMENDED_UNIFORM = dict(allocation="uniform", min_keep=0.0, shrink=0.5, absorb=0.0, selfgen_share=0.0)
# Statistics from the self-generated text itself, not from random tokens; that text drawn as
# the recipe draws its share (the whole distribution, four windows a text), 1024 windows (data
# costs nothing here but generation; 2048 gained no more); every module keeps half its units;
# the refits take back all of the stream's inherited error (absorb 0.25-1 gained 3-5.6 on
# held-out WikiText-2 valid, 1 the most, and about 1.3 on Shakespeare).
RECOMMENDED_DATAFREE = dict(selfgen_samples=1024, shrink=0.5, min_keep=0.5, absorb=1.0)

# The paper's method (docs/method.md sections 2-6); also what PruneConfig's defaults
# were before the presets, so results made with those defaults are this preset.
# Its text alone; its Self-Gen samples each window as a text of its own from BOS, top-50.
PAPER = dict(method="goa", allocation="uniform", attn_sparsity=None, reconstruct=True, refit=False, intercept=False,
             damping=1e-3, shrink=0.0, min_keep=0.0, absorb=0.0, selfgen_share=0.0, selfgen_windows_per_text=1,
             selfgen_top_k=50)

# Published tools run without any of jaxprune's least-squares steps (the method is the caller's).
BASELINE = dict(allocation="uniform", attn_sparsity=None, refit=False, intercept=False, damping=1e-3, shrink=0.0,
                min_keep=0.0, absorb=0.0, selfgen_share=0.0)

PRESETS: dict[str, dict[str, Any]] = {
    "recommended": RECOMMENDED,
    "recommended-uniform": RECOMMENDED_UNIFORM,
    "recommended-datafree": RECOMMENDED_DATAFREE,
    "paper": PAPER,
    # The paper's Self-Gen: statistics from random tokens (each window a text from BOS, top-50: the paper's).
    "paper-datafree": dict(PAPER, score_data="random"),
    "baseline": BASELINE,
}

# Presets meant for self-generated calibration: the CLI generates it unless --calib says otherwise.
DATAFREE = ("recommended-datafree", "paper-datafree")

# Criteria that stand for published tools (docs/method.md section 7).
BASELINE_METHODS = ("flap", "wanda-sp", "l1", "l2", "random", "taylor-element1", "taylor-element2", "taylor-vector")


def names() -> list[str]:
  return list(PRESETS)


def default_preset(method: str | None, calib: str | None) -> str:
  """The preset a run starts from when none is named: `baseline` for a baseline
  method, `recommended-datafree` on self-generated text, else `recommended`."""
  if method in BASELINE_METHODS:
    return "baseline"
  return "recommended-datafree" if calib == "selfgen" else "recommended"


def overrides(name: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The fields preset `name` changes from PruneConfig's defaults, with `given` on top
  (field names are the caller's to check)."""
  if name not in PRESETS:
    raise UsageError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
  given = dict(given or {})
  out = {**PRESETS[name], **given}
  if name == "baseline":
    if "method" not in given:
      raise UsageError(f"preset 'baseline' needs a method; pass one of {', '.join(BASELINE_METHODS)}")
    # FLAP's published form includes its bias compensation.
    if "compensate" not in given:
      out["compensate"] = out["method"] == "flap"
  return out
