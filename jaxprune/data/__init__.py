"""Token windows for calibration and evaluation."""

from jaxprune.data.windows import eval_windows, read_text, sample_windows, tokenize

__all__ = ["eval_windows", "read_text", "sample_windows", "tokenize"]
