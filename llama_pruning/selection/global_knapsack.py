"""Global selection: every unit of every layer in one table, pruned cheapest-per-importance first.

score = importance / cost (exact parameters the unit removes). Units are taken in ascending score
order while they fit in the remaining parameter budget (greedy fractional knapsack), so the target is
met to within one MLP channel and the attention/MLP balance falls out of the scores.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pandas as pd
from torch import nn

from llama_pruning.importance.units import table_problem
from llama_pruning.models.arch import ModelSpec, count_params, model_spec
from llama_pruning.options import NORMALIZATIONS
from llama_pruning.plan import PruningPlan

_AUTO_NORMALIZATION = {"taylor": "none", "taylor_2nd": "none", "random": "none", "wanda": "layer", "magnitude": "layer"}
_AUTO_CUT_PENALTY = {"obs": 1.0}  # chosen on dev for obs (docs/RESULTS_NOTES.md); the other methods were not measured


class SelectionError(ValueError):
    """A pruning target that cannot be met with the given constraints."""


def resolve_normalization(normalization: str, method: str) -> str:
    """`auto` -> per-layer normalisation for activation/weight-scale methods (wanda, magnitude), none otherwise."""
    if normalization not in NORMALIZATIONS:
        raise SelectionError(f"unknown normalization {normalization!r}; choose one of {', '.join(NORMALIZATIONS)}")
    return _AUTO_NORMALIZATION.get(method, "none") if normalization == "auto" else normalization


def resolve_cut_penalty(cut_penalty: float | str, method: str) -> float:
    """`auto` -> 1 for obs (its per-block estimates miss the compounding of deep cuts), 0 (off) otherwise."""
    return _AUTO_CUT_PENALTY.get(method, 0.0) if cut_penalty == "auto" else float(cut_penalty)


def group_table(table: pd.DataFrame, spec: ModelSpec, normalization: str = "none", cut_penalty: float = 0.0) -> pd.DataFrame:
    """Add `cost` (exact parameters) and `score` = importance / cost to an importance table.

    `layer` normalisation divides a layer's importances by its mean importance per parameter, so every
    layer has the same average score: Wanda's and magnitude's raw scales grow with depth and would
    otherwise strip the first layers; the attention/MLP balance inside a layer is kept.
    `cut_penalty` a multiplies a unit's score by 1 + a r / n (r: its rank by score among its block's n units, 1 the
    cheapest), so deep cuts of one block cost more than the sum of its per-unit estimates (dev: RESULTS_NOTES).
    SelectionError unless the table has one row per unit of the model: a missing unit would read as removable.
    """
    problem = table_problem(table, spec)
    if problem is not None:
        raise SelectionError(f"the importance table {problem}")
    out = table.copy()
    out["cost"] = np.where(out["group_type"] == "attn", spec.attn_group_cost(), spec.mlp_channel_cost())
    importance = out["importance"].astype(float)
    if normalization == "layer":
        per_layer = out.assign(importance=importance).groupby("layer_idx")[["importance", "cost"]].transform("sum")
        density = per_layer["importance"] / per_layer["cost"]
        importance = importance / density.where(density > 0, 1.0)
        out["importance_normalized"] = importance
    out["score"] = importance / out["cost"]
    if cut_penalty:
        block = out.groupby(["layer_idx", "group_type"])["score"]
        out["score"] *= 1 + cut_penalty * (block.rank(method="first") / block.transform("size"))
    return out


def _block_overhead(spec: ModelSpec, group_type: str) -> int:
    """Parameters freed on top of the units when a whole block empties (its norm and output bias)."""
    bias = spec.o_bias if group_type == "attn" else spec.mlp_bias
    return spec.hidden_size * (1 + bias)


def check_layer_range(num_layers: int, layer_start: int, layer_end: int | None) -> int:
    """The end of the layer range (default: all layers); SelectionError unless 0 <= start < end <= num_layers."""
    layer_end = num_layers if layer_end is None else layer_end
    if not 0 <= layer_start < layer_end <= num_layers:
        raise SelectionError(f"layer range [{layer_start}, {layer_end}) is not inside [0, {num_layers}]")
    return layer_end


def global_plan(
    model: nn.Module,
    table: pd.DataFrame,
    pruning_ratio: float,
    *,
    remove_empty_layers: bool = False,
    layer_start: int = 0,
    layer_end: int | None = None,
    normalization: str = "none",
    round_to: int = 1,
    previous: PruningPlan | None = None,
    cut_penalty: float = 0.0,
) -> tuple[PruningPlan, pd.DataFrame]:
    """Select units globally until `pruning_ratio` of the model's total parameters are removed.

    Returns the plan and the group table (with `cost`, `score`, `pruned`). Without
    `remove_empty_layers` every block keeps its best unit; with it blocks may empty and layers whose
    two blocks empty are deleted. `round_to` keeps each MLP width a multiple of N. Units a `previous`
    plan removed (an iterative schedule's earlier steps) score -inf, so they are removed first. `cut_penalty`:
    see `group_table`.
    """
    spec = model_spec(model)
    if not 0 <= pruning_ratio < 1:
        raise SelectionError(f"--pruning_ratio must be in [0, 1), got {pruning_ratio}")
    layer_end = check_layer_range(spec.num_layers, layer_start, layer_end)
    if round_to < 1:
        raise SelectionError(f"--round_to must be >= 1, got {round_to}")
    if not (cut_penalty >= 0 and np.isfinite(cut_penalty)):
        raise SelectionError(f"--cut_penalty must be >= 0 and finite, got {cut_penalty}")
    groups = group_table(table, spec, normalization, cut_penalty)
    total = count_params(model)
    budget = int(round(pruning_ratio * total))
    if previous is not None:
        forced = removed_by(previous, groups)
        if groups.loc[forced, "cost"].sum() > budget:
            raise SelectionError("the previous plan already removes more than --pruning_ratio allows")
        groups.loc[forced, "score"] = -np.inf

    in_range = groups["layer_idx"].between(layer_start, layer_end - 1)
    candidates = groups[in_range]
    if not remove_empty_layers:  # protect the best unit of every block
        best = candidates.groupby(["layer_idx", "group_type"])["score"].idxmax()
        candidates = candidates.drop(index=best.values)
    order = candidates.sort_values(["score", "layer_idx", "group_type", "group_idx"], kind="stable")

    block_size = {"attn": spec.num_kv_heads, "mlp": spec.intermediate_size}
    left = {key: block_size[key[1]] for key in groups.groupby(["layer_idx", "group_type"]).groups}
    pruned = np.zeros(len(groups), dtype=bool)
    position = {label: pos for pos, label in enumerate(groups.index)}
    removed = 0
    rows = zip(order.index, order["layer_idx"], order["group_type"], order["cost"], strict=True)
    for label, layer, kind, cost in rows:
        extra = _block_overhead(spec, kind) if left[(layer, kind)] == 1 else 0
        if removed + cost + extra > budget:
            continue
        removed += cost + extra
        left[(layer, kind)] -= 1
        pruned[position[label]] = True
        if budget - removed < spec.mlp_channel_cost():
            break
    groups["pruned"] = pruned
    if round_to > 1:
        round_mlp(groups, round_to, keep_one=not remove_empty_layers)

    return plan_from_table(spec, str(model.config.name_or_path), groups), groups


def removed_by(plan: PruningPlan, groups: pd.DataFrame) -> np.ndarray:
    """Which rows of a unit table name units the plan does not keep."""
    kept = {"attn": [set(g) for g in plan.attn_groups], "mlp": [set(c) for c in plan.mlp_channels]}
    rows = zip(groups["group_type"], groups["layer_idx"], groups["group_idx"], strict=True)
    return np.array([int(unit) not in kept[kind][int(layer)] for kind, layer, unit in rows], dtype=bool)


def plan_from_table(spec: ModelSpec, base_model: str, groups: pd.DataFrame) -> PruningPlan:
    """The plan keeping every unit of `groups` whose `pruned` flag is False."""
    plan = PruningPlan.dense(spec, base_model)
    plan.attn_groups = [[] for _ in range(spec.num_layers)]
    plan.mlp_channels = [[] for _ in range(spec.num_layers)]
    kept = groups[~groups["pruned"]]
    for (layer, kind), idx in kept.groupby(["layer_idx", "group_type"])["group_idx"]:
        target = plan.attn_groups if kind == "attn" else plan.mlp_channels
        target[int(layer)] = sorted(int(i) for i in idx)
    return plan


def round_mlp(groups: pd.DataFrame, multiple: int, keep_one: bool, layers: Collection[int] | None = None) -> None:
    """Re-decide each layer's MLP channels (of `layers`, default all) so the kept width is the nearest multiple of `multiple`.

    Each layer is rounded on its own (both commands' --round_to), so the removed total can move by up to
    `multiple` / 2 channels per layer, more where `keep_one` lifts a block rounded to zero to one multiple.
    """
    mlp = groups[groups["group_type"] == "mlp"]
    if layers is not None:
        mlp = mlp[mlp["layer_idx"].isin(list(layers))]
    for _, rows in mlp.groupby("layer_idx"):
        width = int((~rows["pruned"]).sum())
        rounded = int(round(width / multiple)) * multiple
        if keep_one and rounded == 0:
            rounded = multiple
        rounded = min(rounded, len(rows))
        keep = rows.sort_values("score", ascending=False, kind="stable").index[:rounded]
        groups.loc[rows.index, "pruned"] = True
        groups.loc[keep, "pruned"] = False
