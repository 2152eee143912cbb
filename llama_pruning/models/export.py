"""Save a pruned model as a Hugging Face folder that loads anywhere transformers does.

Uniform layers -> a vanilla checkpoint (no custom code). Per-layer shapes, removed blocks or added
biases -> the config records `pruned_layout` and the format version, and the folder carries
`modeling_pruned.py` named in `auto_map` (for plain-transformers users; `load_model` never runs it).
Files are written to a temporary folder and moved in with config.json last, so a crash never leaves
something that looks like a complete model.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from llama_pruning import atomic
from llama_pruning.models import modeling_pruned
from llama_pruning.models.arch import ModelSpec
from llama_pruning.models.loading import FORMAT_KEY, FORMAT_VERSION, MODELING_FILE, resolve_dtype
from llama_pruning.plan import PLAN_FILENAME, PruningPlan

_STOCK = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def is_vanilla(layout: list[dict], spec: ModelSpec) -> bool:
    """True when every layer has the same non-empty shape that a stock config can express."""
    first = layout[0]
    return (
        all(entry == first for entry in layout)
        and first["num_key_value_heads"] > 0
        and first["intermediate_size"] > 0
        and first["o_proj_bias"] == spec.o_bias
        and first["down_proj_bias"] == spec.mlp_bias
        and spec.hidden_size % (first["num_key_value_heads"] * spec.n_rep) == 0
    )


def pruned_summary(layout: list[dict], spec: ModelSpec) -> dict:
    """The real per-layer shapes in brief, for readers of config.json: its top-level head counts and
    intermediate_size stay the base model's (the modeling code builds each layer from `pruned_layout`)."""
    kv_heads = [entry["num_key_value_heads"] for entry in layout]
    widths = [entry["intermediate_size"] for entry in layout]
    return {
        "note": "per-layer shapes are in pruned_layout; num_attention_heads, num_key_value_heads and "
                "intermediate_size above are the base model's",
        "num_key_value_heads": {"min": min(kv_heads), "max": max(kv_heads), "total": sum(kv_heads)},
        "num_attention_heads": {"min": min(kv_heads) * spec.n_rep, "max": max(kv_heads) * spec.n_rep,
                                "total": sum(kv_heads) * spec.n_rep},
        "intermediate_size": {"min": min(widths), "max": max(widths), "total": sum(widths)},
        "layers_without_attention": [i for i, n in enumerate(kv_heads) if n == 0],
        "layers_without_mlp": [i for i, n in enumerate(widths) if n == 0],
    }


def export_config(model: nn.Module, plan: PruningPlan | None):
    """The config to write: vanilla fields when the shapes allow it, else pruned layout + auto_map."""
    config = copy.deepcopy(model.config)
    for key in ("quantization_config", "auto_map", FORMAT_KEY):
        if hasattr(config, key):
            delattr(config, key)
    layout = getattr(config, "pruned_layout", None)
    if layout is None:
        return config
    spec = plan.model_spec()
    if is_vanilla(layout, spec):
        del config.pruned_layout
        config.num_key_value_heads = layout[0]["num_key_value_heads"]
        config.num_attention_heads = layout[0]["num_key_value_heads"] * spec.n_rep
        config.intermediate_size = layout[0]["intermediate_size"]
        config.architectures = [_STOCK[config.model_type]]
        return config
    config.pruned_summary = pruned_summary(layout, spec)
    name = modeling_pruned.PRUNED_CLASSES[config.model_type].__name__
    config.architectures = [name]
    setattr(config, FORMAT_KEY, FORMAT_VERSION)
    config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{name}"}
    return config


def save_pruned_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | Path,
    plan: PruningPlan | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write safetensors, config.json, tokenizer and pruning_plan.json into `out_dir` atomically.

    `out_dir` may already hold other run outputs; only the model's own files are added, config.json last.
    """
    out_dir = Path(out_dir)
    plan = plan or getattr(model, "pruning_plan", None)
    config = export_config(model, plan)
    state = None
    if dtype is not None:
        torch_dtype = resolve_dtype(dtype)
        state = {k: v.to(torch_dtype) for k, v in model.state_dict().items()}
        config.dtype = torch_dtype
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale(out_dir)
    tmp = atomic.temp_sibling(out_dir / "model", directory=True)
    try:
        original = model.config
        model.config = config
        try:
            model.save_pretrained(tmp, state_dict=state)
        finally:
            model.config = original
        atomic.pause_point(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            atomic.pause_point(tmp)
        if getattr(config, "auto_map", None):
            shutil.copyfile(modeling_pruned.__file__, tmp / MODELING_FILE)
        if plan is not None:
            plan.save(tmp / PLAN_FILENAME)
        atomic.pause_point(tmp)
        atomic.fix_modes(tmp)
        files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
        for path in files:
            path.replace(out_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
