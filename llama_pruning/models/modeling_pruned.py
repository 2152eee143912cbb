"""Modeling code for pruned Llama / Mistral / Qwen2 checkpoints with per-layer shapes.

This file is copied next to a saved non-uniform checkpoint and named in its config's `auto_map`, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works with only transformers
installed. It must therefore import nothing from llama_pruning.

Because every surviving layer keeps the model's Q:KV ratio, the stock attention and MLP forward passes
already work on pruned shapes; only construction differs. `config.pruned_layout` holds one entry per
decoder layer: `num_key_value_heads` (0 = attention block removed), `intermediate_size` (0 = MLP block
removed), and whether `o_proj` / `down_proj` carry a bias (added by bias compensation).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM


class RemovedAttention(nn.Module):
    """Stands in for a deleted attention block: contributes nothing, so the residual passes through."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    """Stands in for a deleted MLP block: contributes nothing, so the residual passes through."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _linear(in_features: int, out_features: int, bias: bool, like: nn.Linear) -> nn.Linear:
    """An uninitialised-shape Linear on the same device and dtype as `like` (meta during from_pretrained)."""
    return nn.Linear(in_features, out_features, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def remove_attention(layer: nn.Module) -> None:
    """Take the attention block (and its input norm) out of a decoder layer."""
    layer.self_attn = RemovedAttention()
    layer.input_layernorm = nn.Identity()


def remove_mlp(layer: nn.Module) -> None:
    """Take the MLP block (and its input norm) out of a decoder layer."""
    layer.mlp = RemovedMLP()
    layer.post_attention_layernorm = nn.Identity()


def renumber_attention(model: nn.Module) -> None:
    """Give surviving attention blocks consecutive cache indices 0..n-1.

    The KV cache measures the past length on its first layer; a removed attention block never writes
    there, so indices must skip removed blocks and deleted layers.
    """
    index = 0
    for layer in model.get_decoder().layers:
        if not isinstance(layer.self_attn, RemovedAttention):
            layer.self_attn.layer_idx = index
            index += 1


def apply_layout(model: nn.Module, layout: list[dict]) -> None:
    """Rebuild each decoder layer's linears with the shapes recorded in `layout` (weights loaded later)."""
    config = model.config
    n_rep = config.num_attention_heads // config.num_key_value_heads
    head_dim = config.head_dim
    hidden = config.hidden_size
    for layer, entry in zip(model.get_decoder().layers, layout, strict=True):
        kv, inter = entry["num_key_value_heads"], entry["intermediate_size"]
        if kv == 0:
            remove_attention(layer)
        else:
            attn = layer.self_attn
            for name, heads in (("q_proj", kv * n_rep), ("k_proj", kv), ("v_proj", kv)):
                old = getattr(attn, name)
                setattr(attn, name, _linear(hidden, heads * head_dim, old.bias is not None, old))
            attn.o_proj = _linear(kv * n_rep * head_dim, hidden, entry["o_proj_bias"], attn.o_proj)
        if inter == 0:
            remove_mlp(layer)
        else:
            mlp = layer.mlp
            for name in ("gate_proj", "up_proj"):
                old = getattr(mlp, name)
                setattr(mlp, name, _linear(hidden, inter, old.bias is not None, old))
            mlp.down_proj = _linear(inter, hidden, entry["down_proj_bias"], mlp.down_proj)
            mlp.intermediate_size = inter
    renumber_attention(model)


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose layers take their shapes from `config.pruned_layout`."""

    def __init__(self, config):
        super().__init__(config)
        apply_layout(self, config.pruned_layout)


class PrunedMistralForCausalLM(MistralForCausalLM):
    """MistralForCausalLM whose layers take their shapes from `config.pruned_layout`."""

    def __init__(self, config):
        super().__init__(config)
        apply_layout(self, config.pruned_layout)


class PrunedQwen2ForCausalLM(Qwen2ForCausalLM):
    """Qwen2ForCausalLM whose layers take their shapes from `config.pruned_layout`."""

    def __init__(self, config):
        super().__init__(config)
        apply_layout(self, config.pruned_layout)


PRUNED_CLASSES = {
    "llama": PrunedLlamaForCausalLM,
    "mistral": PrunedMistralForCausalLM,
    "qwen2": PrunedQwen2ForCausalLM,
}
