"""What a Llama-family decoder layer looks like: module names, head geometry, biases, unit costs.

Everything is read from the model's config and weights; nothing about a particular checkpoint is
hard-coded. Llama (1/2/3/3.x, SmolLM/SmolLM2), Mistral and Qwen2/2.5 share this layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

from llama_pruning import placement

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
    """Raised for a model whose architecture this toolkit does not know how to cut."""


def check_supported(config: PretrainedConfig) -> None:
    """Refuse, in one line, any architecture outside the Llama family we support."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}: llama-pruning supports Llama (1/2/3, SmolLM), "
            f"Mistral and Qwen2/2.5 (model_type one of {', '.join(SUPPORTED_MODEL_TYPES)})"
        )


@dataclass(frozen=True)
class ModelSpec:
    """Geometry of the *original* (dense) model that pruning units and plans refer to."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    n_rep: int
    head_dim: int
    intermediate_size: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.n_rep

    @property
    def group_width(self) -> int:
        """o_proj input columns of one GQA group (its query heads' outputs): the width attention is cut in."""
        return self.n_rep * self.head_dim

    def attn_group_cost(self) -> int:
        """Parameters one GQA group removes: n_rep query heads, one K and one V head, and o_proj columns."""
        rows = (self.n_rep + 2) * self.head_dim
        cost = rows * self.hidden_size + self.group_width * self.hidden_size
        if self.qkv_bias:
            cost += rows
        return cost

    def mlp_channel_cost(self) -> int:
        """Parameters one MLP channel removes: a row of gate_proj and up_proj, a column of down_proj."""
        return 3 * self.hidden_size + (2 if self.mlp_bias else 0)

    def attn_block_params(self, groups: int) -> int:
        """Parameters of an attention block with `groups` GQA groups (o_proj bias only while groups > 0)."""
        if groups == 0:
            return 0
        return groups * self.attn_group_cost() + (self.hidden_size if self.o_bias else 0)

    def mlp_block_params(self, channels: int) -> int:
        """Parameters of an MLP block with `channels` intermediate channels."""
        if channels == 0:
            return 0
        return channels * self.mlp_channel_cost() + (self.hidden_size if self.mlp_bias else 0)

    def signature(self) -> dict:
        """The fields a plan records and must match to be applied to a model."""
        return asdict(self)


def config_geometry(config: PretrainedConfig) -> dict:
    """The ModelSpec fields a config alone determines (the biases need the modules): checks before loading weights."""
    check_supported(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return {
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_kv_heads": kv_heads,
        "n_rep": heads // kv_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "intermediate_size": config.intermediate_size,
    }


def model_spec(model: nn.Module) -> ModelSpec:
    """Read the dense geometry from a loaded (unpruned) model; raises for unsupported architectures."""
    geometry = config_geometry(model.config)
    layer = decoder_layers(model)[0]
    attn, mlp = layer.self_attn, layer.mlp
    return ModelSpec(
        **geometry,
        qkv_bias=attn.q_proj.bias is not None,
        o_bias=attn.o_proj.bias is not None,
        mlp_bias=mlp.gate_proj.bias is not None,
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (`model.model.layers`)."""
    return model.get_decoder().layers


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and the output head (`model.model.norm`)."""
    return model.get_decoder().norm


def count_params(model: nn.Module) -> int:
    """Parameters of a model, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in model.parameters())


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records its inputs and kwargs, passes hidden states through.

    Every recorder sees the embedding output (references, not copies); only the first one's is used.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        self.kwargs: list[dict] = []

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        self.inputs.append(hidden_states)
        self.kwargs.append(kwargs)
        return hidden_states


def capture_layer_inputs(
    model: nn.Module, samples: torch.LongTensor, batch_size: int
) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Hidden states entering layer 0 per batch, and the kwargs the model passes each layer per batch.

    The decoder layers are swapped for recorders, so only embeddings, rotary embeddings and masks are
    computed; the kwargs (causal mask, position embeddings, ...) are exactly what the model's own forward
    builds, per layer (mixed sliding/full attention models get each layer's own mask).
    """
    decoder = model.get_decoder()
    layers = decoder.layers
    recorders = nn.ModuleList(_Recorder() for _ in layers)
    device = placement.run_device(model)
    decoder.layers = recorders
    try:
        for batch in samples.split(batch_size):
            decoder(input_ids=batch.to(device), use_cache=False)
    finally:
        decoder.layers = layers
    return recorders[0].inputs, [r.kwargs for r in recorders]


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """A decoder layer's output hidden states, whether the transformers release returns a tensor or a tuple."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


MATMUL_ATTENTION = "llama_pruning_matmul"
MATMUL_ATTENTION_MAX_TOKENS = 512  # longer windows keep SDPA, whose memory does not grow with the length squared


def _matmul_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' eager attention (two batched matmuls around a float32 softmax; the Llama, Mistral and Qwen2 modules
    share it) on the masks SDPA builds, registered below as its masks: None is causal, bool marks what may be attended.

    On CPU, for windows of a few hundred tokens, its backward runs several times faster than SDPA's fused kernel.
    """
    if attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True):
        q_len, k_len = query.shape[2], key.shape[2]
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    if attention_mask is not None:  # eager adds its mask: 0 where allowed, else the lowest finite value (as eager's own)
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    out, _ = eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                     **kwargs)
    return out, None


AttentionInterface.register(MATMUL_ATTENTION, _matmul_attention)
AttentionMaskInterface.register(MATMUL_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the masks it reads


@contextlib.contextmanager
def matmul_attention(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside: `model`'s attention runs as `_matmul_attention` when `enabled`; its own implementation is restored after."""
    config = model.config
    previous = config._attn_implementation
    if enabled:
        config._attn_implementation = MATMUL_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
