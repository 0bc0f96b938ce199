"""The four figures of a pruning run, drawn with matplotlib's object API (Agg, no pyplot state).

Each `plot_*` returns a `matplotlib.figure.Figure`; `save_png` writes one
atomically and refuses to replace a file without `force`.
"""

from __future__ import annotations

import math

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from matplotlib.patches import Rectangle

from jaxprune.io.atomic import write_file
from jaxprune.report.data import ERRORS, HeadSimilarity

DPI = 100
KEPT, REMOVED, MARK = "#3b6ea8", "#d9d9d9", "#d62728"


def _figure(w: float, h: float) -> Figure:
  fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def save_png(fig: Figure, path: str, force: bool = False) -> str:
  """Writes `fig` as a PNG atomically; refuses to replace a file without `force`."""
  return write_file(path, lambda f: fig.savefig(f, format="png", dpi=DPI), force, binary=True)


def plot_kept(kept: dict[str, np.ndarray], title: str) -> Figure:
  """Two bar panels over layers: query heads and MLP channels kept (blue) of the dense count (grey)."""
  fig = _figure(9, 5)
  axes = fig.subplots(2, 1, sharex=True)
  x = np.arange(len(kept["heads_before"]))
  for ax, unit in zip(axes, ("heads", "channels")):
    before, after = kept[f"{unit}_before"], kept[f"{unit}_after"]
    ax.bar(x, before, color=REMOVED, width=0.8, label="removed")
    ax.bar(x, after, color=KEPT, width=0.8, label="kept")
    ax.set_ylabel("query heads" if unit == "heads" else "MLP channels")
    ax.set_ylim(0, before.max() * 1.12)
    frac = after.sum() / max(before.sum(), 1)
    ax.set_title(f"{unit}: {after.sum()} of {before.sum()} kept ({100 * frac:.1f}%)", fontsize=10, loc="left")
  axes[0].legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncols=2, frameon=False)
  axes[-1].set_xlabel("layer")
  axes[-1].set_xticks(x[::max(1, len(x) // 15)])
  fig.suptitle(title, fontsize=11)
  return fig


def plot_errors(errors: dict[str, dict[str, np.ndarray]], title: str) -> Figure:
  """Per module kind, the relative output error per layer: inherited / after reconstruction / after pruning."""
  fig = _figure(9, 5.5)
  axes = fig.subplots(2, 1, sharex=True)
  styles = {"error_inherited": ("#7f7f7f", "o", "--"), "error_reconstructed": ("#2ca02c", "s", "-"),
            "error_after": (MARK, "^", "-")}
  for ax, (name, label) in zip(axes, (("attn", "attention"), ("mlp", "MLP"))):
    e = errors[name]
    for key, desc in ERRORS:
      if key not in e:
        continue
      color, marker, ls = styles[key]
      y = np.maximum(e[key], 1e-12)  # a log axis cannot show an exact 0
      ax.plot(e["layer"], y, color=color, marker=marker, ls=ls, ms=4, lw=1.2, label=desc)
    ax.set_yscale("log")
    ax.set_ylabel(f"{label} output error")
    ax.grid(True, which="major", alpha=0.3)
  axes[0].legend(fontsize=8, loc="best")
  axes[-1].set_xlabel("layer")
  axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
  fig.suptitle(title + "\nrelative error ||Y_dense - Y||^2 / ||Y_dense||^2 of each module's output on the "
               "calibration windows", fontsize=10)
  return fig


def plot_head_similarity(hs: HeadSimilarity, title: str) -> Figure:
  """The Jensen-Shannon matrix of one layer; pairs under tau boxed, heads Algorithm 2 selects in red."""
  D = hs.D
  n = D.shape[0]
  fig = _figure(7.0, 5.9)
  ax = fig.subplots()
  # The diagonal (a head against itself, 0 by definition) is greyed out so it does not read as "similar".
  cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="#eeeeee")
  shown = np.ma.masked_where(np.eye(n, dtype=bool), D)
  im = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=max(float(D.max()), 1e-6))
  fig.colorbar(im, ax=ax, shrink=0.85, label="JS divergence (nats, max ln 2 = 0.693)")
  if n <= 16:
    for i in range(n):
      for j in range(n):
        if i != j:
          light = D[i, j] < 0.5 * D.max()  # viridis_r is light (yellow) at small values
          ax.text(j, i, f"{D[i, j]:.3g}", ha="center", va="center", fontsize=7, color="black" if light else "white")
  for i, j in hs.pairs:
    for a, b in ((i, j), (j, i)):
      ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor=MARK, lw=2.2))
  ax.set_xticks(range(n))
  ax.set_yticks(range(n))
  for lab in list(ax.get_xticklabels()) + list(ax.get_yticklabels()):
    if int(lab.get_text() or -1) in hs.selected:
      lab.set_color(MARK)
      lab.set_fontweight("bold")
  ax.set_xlabel("head j")
  ax.set_ylabel("head i")
  sel = ", ".join(str(h) for h in hs.selected) or "none"
  ax.set_title(f"{title}\nlayer {hs.layer}: {len(hs.pairs)} pairs with D < tau = {hs.tau:.4f} (boxed); "
               f"Algorithm 2 prunes heads {sel} (red)\ntau: {hs.tau_source}", fontsize=8)
  return fig


# One marker style per method family; hollow markers are data-free calibration.
FAMILIES = (  # (label, colour, marker), in legend order
    ("jaxprune default presets", "#d62728", "o"),
    ("earlier jaxprune defaults", "#f4a6a6", "o"),
    ("the paper's GOA forms", "#ff7f0e", "s"),
    ("FLAP", "#1f77b4", "^"),
    ("Wanda-sp", "#17becf", "v"),
    ("LLM-Pruner Taylor", "#2ca02c", "D"),
    ("random", "#7f7f7f", "X"),
    ("magnitude (L1, L2)", "#8c564b", "P"),
)
TEXTS = (("perplexity", "WikiText-2 test"), ("shakespeare_perplexity", "Tiny Shakespeare (never calibrated on)"))


def family(point: dict) -> str:
  """The legend entry of a quality row."""
  name, method, preset = point["name"], point.get("method", ""), point.get("preset") or ""
  if preset.startswith("recommended"):
    return FAMILIES[1][0] if "before" in name else FAMILIES[0][0]
  for prefix, fam in (("flap", 3), ("wanda", 4), ("taylor", 5), ("random", 6), ("l1", 7), ("l2", 7)):
    if method.startswith(prefix) or name.startswith(prefix):
      return FAMILIES[fam][0]
  return FAMILIES[2][0]


def _spread(ys: list[float], gap: float, lo: float, hi: float) -> list[float]:
  """Label heights (log10) at least `gap` apart, inside [lo, hi], as close to `ys` (ascending) as that allows."""
  out: list[float] = []
  for y in ys:
    out.append(max(y, lo, out[-1] + gap) if out else max(y, lo))
  over = out[-1] - hi if out else 0.0
  if over > 0:  # too tall: slide the stack down, but not below lo
    out = [max(y - over, lo + k * gap) for k, y in enumerate(out)]
  return out


def _groups(points: list[dict], ratio: float, key: str) -> list[dict]:
  """The rows of one ratio with a value for `key`, seeds merged: mean, sample std, n."""
  by: dict[str, list[dict]] = {}
  for p in points:
    if p["ratio"] == ratio and p.get(key) is not None:
      by.setdefault(p["name"], []).append(p)
  out = []
  for name, ps in by.items():
    v = np.asarray([p[key] for p in ps], np.float64)
    out.append({**ps[0], "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "n": len(v), "family": family(ps[0])})
  return sorted(out, key=lambda g: g["mean"])


def _labelled(groups: list[dict]) -> list[dict]:
  """The current defaults, and the best row of every other family: the rows a reader compares."""
  best: dict[str, dict] = {}
  for g in groups:
    if g["family"] != FAMILIES[1][0]:
      best.setdefault(g["family"], g)
  return sorted([g for g in groups if g["family"] == FAMILIES[0][0]] +
                [g for f, g in best.items() if f != FAMILIES[0][0]], key=lambda g: g["mean"])


def _panel(ax, groups: list[dict], dense: float | None, ymin: float, ymax: float) -> None:
  style = {label: (color, marker) for label, color, marker in FAMILIES}
  off = 0
  for g in groups:
    color, marker = style[g["family"]]
    x, y = g["params"] / 1e6, g["mean"]
    hollow = g["calibration"] not in ("valid", "")
    if y > ymax:  # drawn at the top edge, pointing up
      off += 1
      ax.scatter([x], [ymax], marker=10, s=60, color=color, clip_on=False, zorder=3)
      continue
    ax.errorbar([x], [y], yerr=[[min(g["std"], y - ymin)], [g["std"]]] if g["n"] > 1 else None, fmt=marker, ms=7,
                color=color, mfc="white" if hollow else color, mec=color, capsize=3, lw=1, zorder=3)
  labels = [g for g in _labelled(groups) if g["mean"] <= ymax]
  span = math.log10(ymax / ymin)
  ys = _spread([math.log10(g["mean"]) for g in labels], span / 22, math.log10(ymin) + span / 30,
               math.log10(ymax) - span / 12)
  for g, ly in zip(labels, ys):
    text = f"{g['name']} {g['mean']:.1f}" + (f" ± {g['std']:.1f}" if g["n"] > 1 else "")
    ax.annotate(text, (g["params"] / 1e6, g["mean"]), (0.58, 10**ly), textcoords=("axes fraction", "data"),
                fontsize=7.5, va="center", color=style[g["family"]][0],
                arrowprops=dict(arrowstyle="-", color="#999999", lw=0.5))
  if dense is not None:
    ax.axhline(dense, color="black", lw=1, ls=":")
    ax.text(0.99, dense * 1.02, f"dense {dense:.1f}", transform=ax.get_yaxis_transform(), fontsize=7, ha="right",
            va="bottom")
  if off:
    ax.text(0.01, 0.99, f"{off} rows above {ymax:g} (markers on the top edge)", transform=ax.transAxes,
            fontsize=7, va="top")


def plot_quality(points: list[dict], title: str, ymax: float = 1000.0, run: dict | None = None) -> Figure:
  """Perplexity (log) against parameters, one row of panels per text and one column per sparsity.

  Every configuration is one marker (its family's style; seeds merged into an error bar of one
  sample standard deviation); the current defaults and each family's best row are labelled.

  Args:
    points: from `data.quality_points`.
    run: optional {"params", "perplexity", "name", "ratio"} of the run being reported, drawn as a star.
  """
  dense = next((p for p in points if p["ratio"] is None), None)
  ratios = sorted({p["ratio"] for p in points if p["ratio"] is not None}) or [None]
  texts = [t for t in TEXTS if any(p.get(t[0]) is not None for p in points)]
  fig = _figure(5.5 * len(ratios) + 1.5, 4.2 * len(texts) + 1.4)
  axes = np.asarray(fig.subplots(len(texts), len(ratios), sharey="row", squeeze=False))
  for row, (key, text) in enumerate(texts):
    values = [p[key] for p in points if p.get(key) is not None]
    ymin = min(values + [ymax]) / 1.2
    for col, ratio in enumerate(ratios):
      ax = axes[row, col]
      groups = _groups(points, ratio, key)
      _panel(ax, groups, dense.get(key) if dense else None, ymin, ymax)
      if run is not None and key == "perplexity" and abs(run.get("ratio", -1) - (ratio or 0)) < 1e-6:
        ax.scatter([run["params"] / 1e6], [run["perplexity"]], marker="*", s=260, color="gold", edgecolors="black",
                   zorder=4)
      xs = [g["params"] / 1e6 for g in groups] or [0.0]
      ax.set_xlim(min(xs) - 2, max(xs) + 1.6 * (max(xs) - min(xs) + 4))
      ax.set_yscale("log")
      ax.set_ylim(ymin, ymax)
      ax.grid(True, which="both", alpha=0.2)
      if row == 0 and ratio is not None:
        ax.set_title(f"{100 * ratio:.0f}% of block parameters removed", fontsize=10)
      if row == len(texts) - 1:
        ax.set_xlabel("parameters after pruning (M)")
    axes[row, 0].set_ylabel(f"{text}\nperplexity (log)")
  handles = [Line2D([], [], ls="", marker=m, color=c, ms=7, label=l) for l, c, m in FAMILIES]
  handles += [Line2D([], [], ls="", marker="o", mfc="white", color="#555555", ms=7, label="hollow: data-free"),
              Line2D([], [], color="black", ls=":", label="dense model")]
  if run is not None:
    handles.append(Line2D([], [], ls="", marker="*", ms=14, color="gold", mec="black",
                          label=f"{run['name']}: {run['perplexity']:.2f}"))
  fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8, frameon=False)
  fig.suptitle(title, fontsize=11)
  return fig
