"""Token windows for calibration and evaluation."""

from jaxprune.data.windows import (calibration_stream, check_seq_len, check_window_args, eval_windows, read_text,
                                   sample_windows, text_windows, tokenize)

__all__ = ["calibration_stream", "check_seq_len", "check_window_args", "eval_windows", "read_text",
           "sample_windows", "text_windows", "tokenize"]
