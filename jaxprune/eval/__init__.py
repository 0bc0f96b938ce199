"""Evaluation: perplexity, and zero-shot tasks through lm-evaluation-harness.

`jaxprune.eval.lm_eval` (needs `pip install jaxprune[eval]`) holds the lm-eval
backend `JaxpruneLM` and registers it as `--model jaxprune`; it is imported on
first use of `JaxpruneLM`, so `import jaxprune` never imports lm-eval.
"""

from jaxprune.eval.perplexity import PerplexityResult, perplexity, window_nll

__all__ = ["JaxpruneLM", "PerplexityResult", "perplexity", "window_nll"]


def __getattr__(name):
  if name == "JaxpruneLM":
    from jaxprune.eval.lm_eval import JaxpruneLM
    return JaxpruneLM
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
