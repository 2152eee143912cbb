"""Layer-wise selection: per-layer ratios from layer importance, split between attention and MLP.

The parameters to remove (`pruning_ratio` of the total) are split A:M between attention and MLP, then
across layers. `uniform` gives every unfrozen layer the same share; `inverse` gives layer i a share
proportional to 1 / s_i (s_i = layer importance, floored at 1e-3 * max s so a near-zero score cannot
take everything), so less important layers are pruned harder. Shares are turned into whole units by
water-filling with per-layer caps (every block keeps at least one unit) and largest remainders.
Within a layer the least important units (by the unit importance table) go first. `round_to` then
rounds each pruned layer's MLP width to the nearest multiple, as global selection does.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from torch import nn

from llama_pruning.models.arch import count_params, model_spec
from llama_pruning.options import STRATEGIES
from llama_pruning.plan import PruningPlan
from llama_pruning.selection.global_knapsack import SelectionError, group_table, plan_from_table, round_mlp


def parse_distribution(text: str) -> tuple[float, float]:
    """Parse `A:M` (e.g. `2:8`) into attention and MLP fractions summing to 1."""
    try:
        attn, mlp = (float(part) for part in text.split(":"))
    except ValueError:
        raise SelectionError(f"--pruning_distribution must look like A:M (e.g. 2:8), got {text!r}") from None
    if not (attn >= 0 and mlp >= 0 and 0 < attn + mlp < math.inf):  # also false for nan, inf and an overflowing sum
        raise SelectionError(f"--pruning_distribution needs finite, non-negative parts, not both zero: {text!r}")
    return attn / (attn + mlp), mlp / (attn + mlp)


def layer_weights(scores: list[float], strategy: str, active: list[int]) -> np.ndarray:
    """Relative pruning share of each active layer (sums to 1)."""
    if strategy not in STRATEGIES:
        raise SelectionError(f"unknown --pruning_strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "uniform":
        weights = np.ones(len(active))
    else:
        s = np.asarray([scores[i] for i in active], dtype=float)
        weights = 1.0 / np.maximum(s, 1e-3 * max(s.max(), 1e-12))
    return weights / weights.sum()


def allocate(units_total: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Whole units per layer, proportional to `weights`, never above `caps`, summing to `units_total`."""
    alloc = np.zeros(len(weights))
    free = caps > 0
    remaining = float(units_total)
    while remaining > 1e-9 and free.any():  # water-filling: clamp at caps, hand the excess to the others
        share = weights * free
        share = share / share.sum() * remaining
        over = (alloc + share > caps) & free
        if not over.any():
            alloc += share
            break
        remaining -= (caps[over] - alloc[over]).sum()
        alloc[over] = caps[over]
        free &= ~over
    whole = np.floor(alloc + 1e-9).astype(int)
    short = units_total - whole.sum()
    order = np.argsort(-(alloc - whole), kind="stable")
    for i in order:
        if short <= 0:
            break
        if whole[i] < caps[i]:
            whole[i] += 1
            short -= 1
    return whole


def check_layer_counts(num_layers: int, remove_layers: int, freeze_top_n_layers: int) -> None:
    """--remove_layers in [0, n) and --freeze_top_n_layers in [0, n - removed] (checked before any work)."""
    if not 0 <= remove_layers < num_layers:
        raise SelectionError(f"--remove_layers must be in [0, {num_layers}), got {remove_layers}")
    if not 0 <= freeze_top_n_layers <= num_layers - remove_layers:
        raise SelectionError(f"--freeze_top_n_layers must be in [0, {num_layers - remove_layers}], "
                             f"got {freeze_top_n_layers}")


def layerwise_plan(
    model: nn.Module,
    table: pd.DataFrame,
    layer_scores: list[float],
    pruning_ratio: float,
    *,
    distribution: tuple[float, float] = (0.2, 0.8),
    strategy: str = "inverse",
    freeze_top_n_layers: int = 0,
    remove_layers: int = 0,
    round_to: int = 1,
) -> tuple[PruningPlan, pd.DataFrame, pd.DataFrame]:
    """Plan per-layer pruning; returns (plan, group table, per-layer config table).

    `remove_layers` first deletes the N least important layers (ShortGPT-style depth pruning); width
    pruning then removes whatever is left of `pruning_ratio` (nothing if depth alone reaches it).
    """
    spec = model_spec(model)
    n = spec.num_layers
    if len(layer_scores) != n:
        raise SelectionError(f"need one layer score per layer ({n}), got {len(layer_scores)}")
    if not 0 <= pruning_ratio < 1:
        raise SelectionError(f"--pruning_ratio must be in [0, 1), got {pruning_ratio}")
    check_layer_counts(n, remove_layers, freeze_top_n_layers)
    if round_to < 1:
        raise SelectionError(f"--round_to must be >= 1, got {round_to}")
    ranked = sorted(range(n), key=lambda i: (layer_scores[i], i))  # least important first
    deleted = set(ranked[:remove_layers])
    frozen = set(ranked[::-1][:freeze_top_n_layers])
    active = [i for i in range(n) if i not in deleted and i not in frozen]

    groups = group_table(table, spec)
    groups["pruned"] = groups["layer_idx"].isin(deleted)
    total = count_params(model)
    layer_params = spec.attn_block_params(spec.num_kv_heads) + spec.mlp_block_params(spec.intermediate_size)
    layer_params += 2 * spec.hidden_size
    budget = pruning_ratio * total - len(deleted) * layer_params
    attn_share, mlp_share = distribution
    weights = layer_weights(layer_scores, strategy, active) if active else np.zeros(0)
    counts = {}
    for kind, share, size, cost in (
        ("attn", attn_share, spec.num_kv_heads, spec.attn_group_cost()),
        ("mlp", mlp_share, spec.intermediate_size, spec.mlp_channel_cost()),
    ):
        units = int(round(max(budget, 0) * share / cost))
        caps = np.full(len(active), size - 1)
        if units > caps.sum():
            raise SelectionError(
                f"infeasible: {kind} would need {units} units removed but only {int(caps.sum())} can go while every "
                f"block keeps one unit (at most {caps.sum() * cost / total:.1%} of the model); lower --pruning_ratio "
                f"or give {kind} a smaller part of --pruning_distribution"
            )
        counts[kind] = dict(zip(active, allocate(units, weights, caps), strict=True))
        for layer, k in counts[kind].items():
            rows = groups[(groups["layer_idx"] == layer) & (groups["group_type"] == kind)]
            drop = rows.sort_values(["score", "group_idx"], kind="stable").index[:k]
            groups.loc[drop, "pruned"] = True
    if round_to > 1:  # frozen and deleted layers keep their width
        round_mlp(groups, round_to, keep_one=True, layers=active)
    ratios = groups.groupby(["group_type", "layer_idx"])["pruned"].mean()
    plan = plan_from_table(spec, str(model.config.name_or_path), groups)
    config = pd.DataFrame(
        {
            "layer": range(n),
            "importance": layer_scores,
            "attn_ratio": [float(ratios["attn", i]) for i in range(n)],
            "mlp_ratio": [float(ratios["mlp", i]) for i in range(n)],
            "frozen": [i in frozen for i in range(n)],
            "removed": [i in deleted for i in range(n)],
        }
    )
    return plan, groups, config
