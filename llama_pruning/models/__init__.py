"""Model adapters, loading and export for the supported Llama-family architectures."""

from llama_pruning.models.arch import ModelSpec, UnsupportedModelError, model_spec
from llama_pruning.models.loading import DEFAULT_MODEL, load_model

__all__ = ["DEFAULT_MODEL", "ModelSpec", "UnsupportedModelError", "load_model", "model_spec"]
