"""Evaluation: perplexity (`PPLMetric`), speed / memory / MACs profiles, and the zero-shot harness."""

from llama_pruning.evaluation.ppl import PPLMetric, window_nll, window_perplexity

__all__ = ["PPLMetric", "window_nll", "window_perplexity"]
