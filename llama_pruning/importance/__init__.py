"""Importance estimation: per-unit scores (attention groups, MLP channels) and per-layer scores."""

from llama_pruning.importance.cache import cached_importance, importance_cache_key
from llama_pruning.importance.layer import LAYER_METHODS, layer_importance
from llama_pruning.importance.unit import (
    DEFAULT_TAYLOR_2ND_VARIANT,
    METHODS,
    TAYLOR_2ND_VARIANTS,
    compute_importance,
)

__all__ = [
    "DEFAULT_TAYLOR_2ND_VARIANT",
    "LAYER_METHODS",
    "METHODS",
    "TAYLOR_2ND_VARIANTS",
    "cached_importance",
    "compute_importance",
    "importance_cache_key",
    "layer_importance",
]
