"""Surgery: apply a PruningPlan by physically slicing weights (no masks).

Query head q belongs to KV head q // n_rep (the order of HF's `repeat_kv`), so GQA group g owns query
heads g*n_rep .. g*n_rep+n_rep-1. Keeping whole groups keeps every layer's Q:KV ratio, which is what
lets the stock attention forward run unchanged on pruned shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from llama_pruning.models.arch import decoder_layers, model_spec
from llama_pruning.models.modeling_pruned import remove_attention, remove_mlp, renumber_attention
from llama_pruning.plan import PlanError, PruningPlan


def head_rows(heads: list[int], head_dim: int, device: torch.device) -> torch.Tensor:
    """Row indices of the given heads in a (heads*head_dim, ...) projection."""
    idx = torch.tensor(heads, dtype=torch.long, device=device)
    return (idx[:, None] * head_dim + torch.arange(head_dim, device=device)[None, :]).reshape(-1)


def group_query_heads(groups: list[int], n_rep: int) -> list[int]:
    """Query heads owned by the given GQA groups (KV heads)."""
    return [g * n_rep + r for g in groups for r in range(n_rep)]


def slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep only `rows` (output features) and/or `cols` (input features) of a Linear, in place."""
    weight = linear.weight.data
    if rows is not None:
        weight = weight.index_select(0, rows)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, rows).clone(),
                                       requires_grad=linear.bias.requires_grad)
    if cols is not None:
        weight = weight.index_select(1, cols)
    linear.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = weight.shape


def pad_linear(linear: nn.Linear, size: int, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Undo `slice_linear` with zeros, in place: the sliced axis grows back to `size`, the kept `rows` / `cols` in place."""
    out_features, in_features = (size, linear.in_features) if rows is not None else (linear.out_features, size)
    weight = linear.weight.data.new_zeros(out_features, in_features)
    weight[(rows if rows is not None else slice(None), cols if cols is not None else slice(None))] = linear.weight.data
    if rows is not None and linear.bias is not None:
        bias = linear.bias.data.new_zeros(size)
        bias[rows] = linear.bias.data
        linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = out_features, in_features


def add_zero_bias(layer: nn.Module) -> None:
    """Give a layer's surviving o_proj and down_proj a zero bias, to be filled by bias compensation."""
    for block, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
        linear = getattr(block, name, None)
        if linear is not None and linear.bias is None:
            w = linear.weight
            linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))


def _partial_cuts(layer: nn.Module, plan: PruningPlan, index: int) -> list[tuple[nn.Linear, str, torch.Tensor, int]]:
    """(projection, sliced axis `rows`/`cols`, kept indices, dense size of that axis) for every projection of a
    partly cut block of dense layer `index` (whole and emptied blocks have none)."""
    spec = plan.model_spec()
    groups, channels = sorted(plan.attn_groups[index]), sorted(plan.mlp_channels[index])
    attn, mlp = layer.self_attn, layer.mlp
    cuts = []
    if 0 < len(groups) < spec.num_kv_heads:
        device = attn.q_proj.weight.device
        q_rows = head_rows(group_query_heads(groups, spec.n_rep), spec.head_dim, device)
        kv_rows = head_rows(groups, spec.head_dim, device)
        q_width, kv_width = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        cuts += [(attn.q_proj, "rows", q_rows, q_width), (attn.k_proj, "rows", kv_rows, kv_width),
                 (attn.v_proj, "rows", kv_rows, kv_width), (attn.o_proj, "cols", q_rows, q_width)]
    if 0 < len(channels) < spec.intermediate_size:
        rows = torch.tensor(channels, dtype=torch.long, device=mlp.gate_proj.weight.device)
        width = spec.intermediate_size
        cuts += [(mlp.gate_proj, "rows", rows, width), (mlp.up_proj, "rows", rows, width),
                 (mlp.down_proj, "cols", rows, width)]
    return cuts


def prune_layer(layer: nn.Module, plan: PruningPlan, index: int) -> None:
    """Cut one decoder layer (dense index `index`) to the plan, in place; empty blocks leave the computation."""
    for linear, axis, kept, _ in _partial_cuts(layer, plan, index):
        slice_linear(linear, **{axis: kept})
        if linear is layer.mlp.down_proj:
            layer.mlp.intermediate_size = len(kept)
    if not plan.attn_groups[index]:
        remove_attention(layer)
    if not plan.mlp_channels[index]:
        remove_mlp(layer)
    if plan.has_bias(index):
        add_zero_bias(layer)


def expand_to_dense(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Undo `apply_plan`'s shapes with zeros, in place: a cut model dense-shaped again, to be scored and cut again.

    It computes what the cut model computes: a removed unit's zero rows give it zero activations (silu(0) * 0,
    v = 0) and its zero o_proj / down_proj columns add nothing. Plans that empty a block have nothing to pad.
    """
    if getattr(model, "pruning_plan", None) is not plan:
        raise PlanError("expand_to_dense takes the plan the model was cut to")
    if plan.removed_layers or any(not g for g in plan.attn_groups) or any(not c for c in plan.mlp_channels):
        raise PlanError("a plan that empties a block or deletes a layer cannot be padded back to the dense shapes")
    for index, layer in enumerate(decoder_layers(model)):
        for linear, axis, kept, size in _partial_cuts(layer, plan, index):
            pad_linear(linear, size, **{axis: kept})
            if linear is layer.mlp.down_proj:
                layer.mlp.intermediate_size = size
    del model.config.pruned_layout
    del model.pruning_plan
    return model


def check_plan(model: nn.Module, plan: PruningPlan) -> None:
    """Raise PlanError unless `plan` can be applied to this dense model."""
    if getattr(model.config, "pruned_layout", None) is not None:
        raise PlanError("this model is already pruned; apply plans to the dense model they were made for")
    plan.validate(model_spec(model))
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1 and any(not g for g in plan.attn_groups):
        raise PlanError("removing attention blocks from a model with mixed sliding/full layers is unsupported")


def finalize(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """After every layer is cut: delete emptied layers, renumber cache indices, record the layout in the config."""
    kept = plan.kept_layers
    layers = decoder_layers(model)
    model.get_decoder().layers = nn.ModuleList([layers[i] for i in kept])
    renumber_attention(model)
    _update_config(model.config, plan, kept)
    model.pruning_plan = plan
    return model


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Cut `model` (dense, in place) to the plan and return it.

    Empty blocks leave the computation (the residual passes through), layers with both blocks empty are
    deleted, and config fields read by the forward pass and generation are updated.
    """
    check_plan(model, plan)
    for i, layer in enumerate(decoder_layers(model)):
        prune_layer(layer, plan, i)
    return finalize(model, plan)


def _update_config(config, plan: PruningPlan, kept: list[int]) -> None:
    """Record the pruned geometry: per-layer layout, layer count; global head fields stay the dense ones.

    Keeping the dense head counts keeps the config valid (transformers checks hidden_size % heads) and
    preserves n_rep; the modeling code and export read the per-layer sizes from `pruned_layout`.
    """
    config.head_dim = plan.model_spec().head_dim
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    config.pruned_layout = plan.layout()
