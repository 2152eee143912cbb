"""Tiny random Llama-family models and plans for fast unit tests."""

from __future__ import annotations

import random

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from llama_pruning.models.arch import model_spec
from llama_pruning.plan import PruningPlan

_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def tiny_model(
    n_rep: int = 2,
    kv_heads: int = 4,
    head_dim: int = 8,
    layers: int = 4,
    intermediate: int = 48,
    model_type: str = "llama",
    bias: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tie: bool = False,
    hidden: int | None = None,
    vocab_size: int = 97,
    **config_fields,
):
    """A randomly initialised model of the given family; `bias` adds q/k/v(/o) biases where the family allows;
    `config_fields` are passed on to the config (e.g. sliding-window settings)."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden or kv_heads * n_rep * head_dim,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=kv_heads * n_rep,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        **config_fields,
    )
    if model_type == "llama":
        kwargs["attention_bias"] = bias
    config = _CONFIGS[model_type](**kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if bias:  # random init leaves biases at zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    model.config.name_or_path = f"tiny-{model_type}"
    return model.eval()


def random_plan(model, seed: int = 0, remove_blocks: bool = True) -> PruningPlan:
    """A random plan; with `remove_blocks` it also empties one attention block, one MLP block and one layer."""
    rng = random.Random(seed)
    spec = model_spec(model)
    plan = PruningPlan.dense(spec, model.config.name_or_path)
    for i in range(spec.num_layers):
        plan.attn_groups[i] = sorted(rng.sample(range(spec.num_kv_heads), rng.randint(1, spec.num_kv_heads)))
        k = rng.randint(1, spec.intermediate_size)
        plan.mlp_channels[i] = sorted(rng.sample(range(spec.intermediate_size), k))
    if remove_blocks and spec.num_layers >= 3:
        plan.attn_groups[0] = []
        plan.mlp_channels[1] = []
        plan.attn_groups[2] = []
        plan.mlp_channels[2] = []
    return plan
