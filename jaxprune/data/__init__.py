"""Token windows for calibration and evaluation."""

from jaxprune.data.windows import (bos_prefix, calibration_stream, check_seq_len, check_window_args, eval_windows,
                                   prefixed, read_text, sample_windows, text_windows, tokenize)

__all__ = ["bos_prefix", "calibration_stream", "check_seq_len", "check_window_args", "eval_windows", "prefixed",
           "read_text", "sample_windows", "text_windows", "tokenize"]
