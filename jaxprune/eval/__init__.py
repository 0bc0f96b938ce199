"""Evaluation: perplexity (and zero-shot tasks through lm-eval-harness where installed)."""

from jaxprune.eval.perplexity import PerplexityResult, perplexity, window_nll

__all__ = ["PerplexityResult", "perplexity", "window_nll"]
