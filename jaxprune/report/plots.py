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


def _family(name: str) -> str:
  for fam in ("goa-obs", "goa-energy", "goa", "flap", "wanda", "taylor", "random", "l1", "l2", "dense"):
    if name.startswith(fam):
      return fam
  return "other"


COLORS = {"goa-obs": "#d62728", "goa-energy": "#ff7f0e", "goa": "#e377c2", "flap": "#1f77b4", "wanda": "#17becf",
          "taylor": "#2ca02c", "random": "#7f7f7f", "l1": "#8c564b", "l2": "#8c564b", "dense": "black",
          "other": "#9467bd"}


def _spread(ys: list[float], gap: float) -> list[float]:
  """Label heights (log10) at least `gap` apart, as close to `ys` (sorted ascending) as that allows."""
  out: list[float] = []
  for y in ys:
    out.append(max(y, out[-1] + gap) if out else y)
  shift = (sum(out) - sum(ys)) / max(len(ys), 1)  # re-centre the stack on the points
  return [y - shift for y in out] if out and out[0] - shift >= ys[0] - 4 * gap else out


def plot_quality(points: list[dict], title: str, ymax: float = 1000.0, run: dict | None = None) -> Figure:
  """Perplexity (log) against parameters for every run, one panel per sparsity; off-scale runs listed.

  Args:
    points: from `data.quality_points`.
    run: optional {"params", "perplexity", "name"} of the run being reported, drawn as a star.
  """
  dense = [p for p in points if p["ratio"] is None]
  ratios = sorted({p["ratio"] for p in points if p["ratio"] is not None})
  fig = _figure(6.0 * max(len(ratios), 1) + 1, 6.5)
  axes = np.atleast_1d(fig.subplots(1, max(len(ratios), 1), sharey=True))
  ymin = min([p["perplexity"] for p in points] + [ymax]) / 1.15
  for ax, ratio in zip(axes, ratios):
    pts = sorted((p for p in points if p["ratio"] == ratio), key=lambda p: p["perplexity"])
    on = [p for p in pts if p["perplexity"] <= ymax]
    off = [p for p in pts if p["perplexity"] > ymax]
    xs = [p["params"] / 1e6 for p in pts]
    lo, hi = min(xs), max(xs)
    # The points fill the middle 16% of the panel; their labels stack in columns beside them.
    width = max(hi - lo, 1.0) / 0.16
    x0 = lo - 0.42 * width
    for d in dense:
      ax.axhline(d["perplexity"], color="black", lw=1, ls=":")
      ax.text(0.98, d["perplexity"] / 1.02, f"dense {d['perplexity']:.1f} ({d['params'] / 1e6:.1f}M)", fontsize=7,
              ha="right", va="top", transform=ax.get_yaxis_transform())
    cols = {-1: [], 1: []}
    for p in on:
      cols[-1 if p["params"] / 1e6 < (lo + hi) / 2 else 1].append(p)
    for side, col in cols.items():
      ys = _spread([math.log10(p["perplexity"]) for p in col], gap=math.log10(ymax / ymin) / 38)
      for p, ly in zip(col, ys):
        x, y = p["params"] / 1e6, p["perplexity"]
        c = COLORS[_family(p["name"])]
        marker = "o" if p["calibration"] in ("valid", "") else "D"
        ax.scatter([x], [y], color=c, s=30, marker=marker, zorder=3, edgecolors="white", linewidths=0.5)
        ax.annotate(f"{p['name']} {y:.1f}", (x, y), (0.38 if side < 0 else 0.62, 10**ly),
                    textcoords=("axes fraction", "data"), fontsize=6.5, color=c, va="center",
                    ha="right" if side < 0 else "left", arrowprops=dict(arrowstyle="-", color=c, lw=0.4, alpha=0.6))
    if run is not None and run.get("perplexity") and abs(run.get("ratio", ratio) - ratio) < 1e-6:
      ax.scatter([run["params"] / 1e6], [run["perplexity"]], marker="*", s=220, color="gold", edgecolors="black",
                 zorder=4, label=f"{run['name']} {run['perplexity']:.2f}")
      ax.legend(fontsize=7, loc="center right")
    if off:
      ax.text(0.98, 0.98, "off scale (> %g):\n" % ymax + "\n".join(f"{p['name']} {p['perplexity']:.4g}" for p in off),
              transform=ax.transAxes, fontsize=6.5, va="top", ha="right",
              bbox=dict(boxstyle="round", fc="white", ec="#bbbbbb"))
    ax.set_xlim(x0, x0 + width)
    ax.set_yscale("log")
    ax.set_ylim(ymin, ymax)
    ax.set_xlabel("parameters after pruning (M)")
    ax.set_title(f"{100 * ratio:.0f}% of block parameters removed", fontsize=10)
    ax.grid(True, which="both", alpha=0.2)
  axes[0].set_ylabel("perplexity (log scale)")
  fig.suptitle(title, fontsize=10)
  return fig
