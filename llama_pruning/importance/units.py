"""Which weights belong to which pruning unit, and how per-weight scores add up to per-unit scores.

Attention group g of a layer is KV head g with its n_rep query heads (query head q belongs to KV head
q // n_rep): rows of q_proj / k_proj / v_proj (and their biases) and the matching input columns of
o_proj. MLP channel c is row c of gate_proj and up_proj (and their biases) and column c of down_proj.
In every one of these tensors a unit's slices are contiguous and equally sized along one axis, so a
per-weight score becomes a per-unit score by summing the other axis and folding into `n_units` chunks.
The o_proj / down_proj biases belong to no unit (they survive any cut).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from llama_pruning.models.arch import ModelSpec, decoder_layers

GROUP_TYPES = ("attn", "mlp")
UNIT_COLUMNS = ("layer_idx", "group_type", "group_idx")


@dataclass(frozen=True)
class UnitLinear:
    """One projection of one layer and the axis along which its pruning units are laid out."""

    layer_idx: int
    group_type: str
    name: str
    linear: nn.Linear
    axis: int  # 0: units own rows (output features), 1: units own columns (input features)
    n_units: int

    def params(self) -> Iterator[tuple[str, torch.Tensor, int]]:
        """(kind, tensor, axis) of the weights this projection gives its units: the weight, plus the bias for rows."""
        yield "weight", self.linear.weight, self.axis
        if self.axis == 0 and self.linear.bias is not None:
            yield "bias", self.linear.bias, 0


def unit_sum(scores: torch.Tensor, axis: int, n_units: int) -> torch.Tensor:
    """Per-unit sums of a per-weight score tensor whose units are contiguous chunks along `axis`."""
    if scores.dim() == 2:
        scores = scores.sum(dim=1 - axis)
    return scores.reshape(n_units, -1).sum(dim=1)


def unit_sum_squares(scores: torch.Tensor, axis: int, n_units: int) -> torch.Tensor:
    """`unit_sum(scores ** 2, ...)` through a fused norm reduction, without a squared copy of the tensor."""
    if scores.dim() == 2:
        sums = torch.linalg.vector_norm(scores, dim=1 - axis).square_()
    else:
        sums = scores.square()
    return sums.reshape(n_units, -1).sum(dim=1)


def unit_linears(model: nn.Module, spec: ModelSpec) -> list[UnitLinear]:
    """Every projection that carries pruning units, layer by layer, attention before MLP."""
    out = []
    for idx, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        for name, axis in (("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("o_proj", 1)):
            out.append(UnitLinear(idx, "attn", name, getattr(attn, name), axis, spec.num_kv_heads))
        for name, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            out.append(UnitLinear(idx, "mlp", name, getattr(mlp, name), axis, spec.intermediate_size))
    return out


def unit_counts(spec: ModelSpec) -> dict[str, int]:
    """Number of units of each group type in one layer."""
    return {"attn": spec.num_kv_heads, "mlp": spec.intermediate_size}


def table_problem(table: pd.DataFrame, spec: ModelSpec) -> str | None:
    """Why `table` is not a unit importance table of the model `spec` describes (one row per unit, with a numeric
    `importance`), in words that follow "the table", or None: a unit missing from it would be taken as removable."""
    missing = [c for c in (*UNIT_COLUMNS, "importance") if c not in table.columns]
    if missing:
        return f"lacks the column(s) {', '.join(missing)}"
    if not all(pd.api.types.is_integer_dtype(table[c]) for c in ("layer_idx", "group_idx")):
        return "has layer_idx / group_idx values that are not all integers"
    if not pd.api.types.is_numeric_dtype(table["importance"]) or pd.api.types.is_bool_dtype(table["importance"]):
        return "has a non-numeric importance column"
    if table["importance"].isna().any():
        return f"has {int(table['importance'].isna().sum())} missing importance value(s)"
    size = table["group_type"].map(unit_counts(spec))  # NaN for an unknown group type
    valid = table["layer_idx"].between(0, spec.num_layers - 1) & table["group_idx"].ge(0) & table["group_idx"].lt(size)
    if not valid.all():
        row = table[~valid].iloc[0]
        return f"names units the model does not have (layer {row.layer_idx} {row.group_type} {row.group_idx})"
    repeated = table.duplicated(list(UNIT_COLUMNS))
    if repeated.any():
        row = table[repeated].iloc[0]
        return f"lists a unit more than once (layer {row.layer_idx} {row.group_type} {row.group_idx})"
    units = spec.num_layers * sum(unit_counts(spec).values())
    if len(table) != units:  # every row a distinct unit of the model: fewer rows means units are missing
        return (f"has {len(table):,} rows for the model's {units:,} units "
                "(every attention group and MLP channel of every layer)")
    return None
