"""Calibration statistics: second moments and head divergences."""

from jaxprune.stats.heads import js_rows, js_sums
from jaxprune.stats.moments import Moments, init, subset, update

__all__ = ["Moments", "init", "js_rows", "js_sums", "subset", "update"]
