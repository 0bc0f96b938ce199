"""Figures of a pruning run: kept units, per-module error, head similarity, quality against size."""

from jaxprune.report.data import HeadSimilarity, head_similarity, kept_per_layer, layer_js, module_errors, \
    pairs_under, quality_points, run_js, tau_for_layer
from jaxprune.report.plots import plot_errors, plot_head_similarity, plot_kept, plot_quality, save_png

__all__ = ["HeadSimilarity", "head_similarity", "kept_per_layer", "layer_js", "module_errors", "pairs_under",
           "plot_errors", "plot_head_similarity", "plot_kept", "plot_quality", "quality_points", "run_js", "save_png",
           "tau_for_layer"]
