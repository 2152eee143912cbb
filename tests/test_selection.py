"""Selection: global knapsack and layer-wise allocation meet their targets exactly as promised."""

from __future__ import annotations

import copy
import re

import numpy as np
import pandas as pd
import pytest
import torch

from llama_pruning.importance import compute_importance
from llama_pruning.models.arch import count_params, model_spec
from llama_pruning.selection import SelectionError, global_plan, layerwise_plan, parse_distribution
from llama_pruning.selection.global_knapsack import group_table
from llama_pruning.selection.layerwise import allocate
from llama_pruning.surgery import apply_plan
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def smol_table(smollm2):
    model, _ = smollm2
    return compute_importance(model, torch.zeros(1, 4, dtype=torch.long), "magnitude", progress=False)


def removed_fraction(model, plan) -> float:
    report = plan.param_report(model)
    return 1 - report["params_after"] / report["params_before"]


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.4])
@pytest.mark.parametrize("remove_empty", [False, True])
def test_global_target_met(smollm2, smol_table, ratio, remove_empty):
    model, _ = smollm2
    plan, groups = global_plan(model, smol_table, ratio, remove_empty_layers=remove_empty, normalization="layer")
    assert abs(removed_fraction(model, plan) - ratio) < 0.002
    assert {"cost", "score", "pruned"} <= set(groups.columns)
    if not remove_empty:
        assert all(plan.attn_groups) and all(plan.mlp_channels)


@pytest.mark.slow
def test_global_layer_range_and_round_to(smollm2, smol_table):
    model, _ = smollm2
    plan, _ = global_plan(model, smol_table, 0.1, layer_start=3, layer_end=27, round_to=64)
    dense = list(range(1536))
    assert all(plan.mlp_channels[i] == dense and len(plan.attn_groups[i]) == 3 for i in (0, 1, 2, 27, 28, 29))
    assert all(len(c) % 64 == 0 for c in plan.mlp_channels)
    assert abs(removed_fraction(model, plan) - 0.1) < 0.01


def rigged_table(model, worthless_layer: int) -> pd.DataFrame:
    table = compute_importance(model, torch.zeros(1, 4, dtype=torch.long), "random", seed=0, progress=False)
    table["importance"] = table["importance"] + 1.0
    table.loc[table["layer_idx"] == worthless_layer, "importance"] = 0.0
    return table


def test_remove_empty_layers_deletes_worthless_layer(tmp_path):
    from transformers import AutoModelForCausalLM

    from llama_pruning.models.export import save_pruned_model

    model = tiny_model(n_rep=2, kv_heads=2, layers=4)
    spec = model_spec(model)
    layer_params = count_params(model.model.layers[1])
    ratio = (layer_params + 0.5 * spec.mlp_channel_cost()) / count_params(model)
    plan, _ = global_plan(model, rigged_table(model, 1), ratio, remove_empty_layers=True)
    assert plan.removed_layers == [1]
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert pruned.config.num_hidden_layers == 3
    save_pruned_model(pruned, None, tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    x = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert torch.equal(again(x).logits, pruned(x).logits)
    # without the flag the worthless layer keeps one unit per block
    plan, _ = global_plan(model, rigged_table(model, 1), ratio)
    assert plan.removed_layers == [] and len(plan.attn_groups[1]) == 1 and len(plan.mlp_channels[1]) == 1


def test_global_rejects_bad_arguments():
    model = tiny_model()
    table = rigged_table(model, 0)
    with pytest.raises(SelectionError, match="pruning_ratio"):
        global_plan(model, table, 1.5)
    with pytest.raises(SelectionError, match="layer range"):
        global_plan(model, table, 0.1, layer_start=3, layer_end=2)


def test_selection_rejects_a_table_that_is_not_one_row_per_unit():
    """A unit missing from the table would read as removable: both selections refuse it, in one line."""
    model = tiny_model(layers=3, intermediate=16)
    table = rigged_table(model, -1)
    repeated = table.copy()
    repeated.loc[5, "group_idx"] = 0  # as many rows as units, one of them twice and one missing
    blank = table.copy()
    blank.loc[[3, 9], "importance"] = np.nan  # blank cells of a cached CSV read back as NaN
    bad = {
        "has 40 rows for the model's 60 units": table[table.layer_idx < 2],  # a truncated table: layer 2 missing
        "has 59 rows": table.drop(index=7),
        "lists a unit more than once (layer 0 mlp 0)": repeated,
        "names units the model does not have (layer 3 attn 0)": rigged_table(tiny_model(layers=4, intermediate=16), -1),
        "lacks the column(s) group_type, importance": table.drop(columns=["group_type", "importance"]),
        "has layer_idx / group_idx values that are not all integers": table.astype({"layer_idx": float}),
        "has a non-numeric importance column": table.astype({"importance": str}),
        "has 2 missing importance value(s)": blank,
    }
    for reason, incomplete in bad.items():
        for select in (lambda t: global_plan(model, t, 0.2, remove_empty_layers=True),
                       lambda t: layerwise_plan(model, t, [1.0, 2.0, 3.0], 0.2)):
            with pytest.raises(SelectionError, match=re.escape(f"the importance table {reason}")) as err:
                select(incomplete)
            assert "\n" not in str(err.value)


def test_cut_penalty_scales_scores_by_rank_in_block_and_spreads_the_cut():
    """Score x (1 + a r/n) exactly, the order inside a block unchanged; a deep cut of one block moves to others."""
    model = tiny_model(layers=4, intermediate=48)
    spec = model_spec(model)
    table = rigged_table(model, 0)  # importances 1 + U(0, 1); attention kept out of the way; layer 0's MLP cheapest
    table.loc[table["group_type"] == "attn", "importance"] = 1e6
    cheap = (table["layer_idx"] == 0) & (table["group_type"] == "mlp")
    table.loc[cheap, "importance"] = np.linspace(0.2, 0.9, cheap.sum())
    plain = group_table(table, spec)
    penalised = group_table(table, spec, cut_penalty=2.0)
    for _, rows in plain.groupby(["layer_idx", "group_type"]):
        rank = np.empty(len(rows))
        rank[rows["score"].argsort(kind="stable").to_numpy()] = np.arange(1, len(rows) + 1)
        np.testing.assert_array_equal(penalised.loc[rows.index, "score"], rows["score"] * (1 + 2.0 * (rank / len(rows))))
    base, _ = global_plan(model, table, 0.05)
    spread, _ = global_plan(model, table, 0.05, cut_penalty=2.0)
    assert [len(c) for c in base.mlp_channels] == [23, 48, 48, 48]  # only the cheap layer is cut, deeply
    assert [len(c) for c in spread.mlp_channels] == [25, 47, 48, 47]  # two of its cuts move to other layers
    assert spread.param_report(model)["params_after"] == base.param_report(model)["params_after"]
    with pytest.raises(SelectionError, match="cut_penalty"):
        global_plan(model, table, 0.1, cut_penalty=-1.0)


def test_global_previous_plan_is_removed_first():
    """An iterative step removes everything the previous step removed, then the cheapest of the rest, to the target."""
    model = tiny_model(layers=4, intermediate=48)
    first, _ = global_plan(model, rigged_table(model, 0), 0.1)
    table = compute_importance(model, torch.zeros(1, 4, dtype=torch.long), "random", seed=5, progress=False)
    fresh, _ = global_plan(model, table, 0.2)
    second, groups = global_plan(model, table, 0.2, previous=first)
    for i in range(4):
        assert set(second.attn_groups[i]) <= set(first.attn_groups[i])
        assert set(second.mlp_channels[i]) <= set(first.mlp_channels[i])
    assert fresh != second  # without `previous` the new scores alone would keep some of the removed units
    spec = model_spec(model)
    assert 0 <= 0.2 * count_params(model) - (count_params(model) - second.param_report(model)["params_after"]) \
        < spec.mlp_channel_cost() + 1
    removed_first = sum(spec.num_kv_heads - len(g) + spec.intermediate_size - len(c)
                        for g, c in zip(first.attn_groups, first.mlp_channels, strict=True))
    assert np.isneginf(groups.loc[groups["pruned"], "score"]).sum() == removed_first
    with pytest.raises(SelectionError, match="already removes more"):
        global_plan(model, table, 0.05, previous=first)


def attn_share(model, plan) -> float:
    spec = model_spec(model)
    report = plan.param_report(model)
    removed = report["params_before"] - report["params_after"]
    attn = sum(spec.num_kv_heads - len(g) for g in plan.attn_groups) * spec.attn_group_cost()
    return attn / removed


SCORES = list(np.linspace(0.05, 0.6, 30) ** 2)  # a typical rising importance profile; layer 0 least important


@pytest.mark.slow
@pytest.mark.parametrize("dist,ratio", [("2:8", 0.2), ("0:10", 0.2), ("5:5", 0.2), ("10:0", 0.1)])
@pytest.mark.parametrize("strategy", ["inverse", "uniform"])
def test_layerwise_targets(smollm2, smol_table, dist, ratio, strategy):
    model, _ = smollm2
    plan, _, config = layerwise_plan(model, smol_table, SCORES, ratio, distribution=parse_distribution(dist),
                                     strategy=strategy)
    assert abs(removed_fraction(model, plan) - ratio) < 0.002
    want = parse_distribution(dist)[0]
    assert abs(attn_share(model, plan) - want) < 0.02
    assert all(plan.attn_groups) and all(plan.mlp_channels)
    assert list(config.columns) == ["layer", "importance", "attn_ratio", "mlp_ratio", "frozen", "removed"]


@pytest.mark.slow
def test_layerwise_infeasible_attention_only(smollm2, smol_table):
    model, _ = smollm2
    with pytest.raises(SelectionError, match="infeasible: attn"):
        layerwise_plan(model, smol_table, SCORES, 0.2, distribution=(1.0, 0.0))


def test_layerwise_freeze_and_inverse_order():
    model = tiny_model(n_rep=2, kv_heads=4, layers=6, intermediate=64)
    scores = [0.3, 0.1, 0.5, 0.9, 0.2, 0.7]
    table = rigged_table(model, -1)
    plan, _, config = layerwise_plan(model, table, scores, 0.25, distribution=(0.2, 0.8), strategy="inverse",
                                     freeze_top_n_layers=2)
    assert config["frozen"].tolist() == [False, False, False, True, False, True]
    pruned = apply_plan(copy.deepcopy(model), plan)
    for i in (3, 5):  # frozen layers: bit-identical
        for (name, p), (_, q) in zip(model.model.layers[i].named_parameters(), pruned.model.layers[i].named_parameters(),
                                     strict=True):
            assert torch.equal(p, q), name
    removed = [config["mlp_ratio"][i] for i in range(6)]
    unfrozen = [i for i in range(6) if i not in (3, 5)]
    least, most = min(unfrozen, key=lambda i: scores[i]), max(unfrozen, key=lambda i: scores[i])
    assert removed[least] >= removed[most] > 0


def test_remove_layers_depth_only():
    model = tiny_model(layers=6)
    scores = [0.5, 0.1, 0.4, 0.05, 0.9, 0.3]
    plan, _, config = layerwise_plan(model, rigged_table(model, -1), scores, 0.0, remove_layers=2)
    assert plan.removed_layers == [1, 3]
    assert config["removed"].tolist() == [False, True, False, True, False, False]
    assert all(len(plan.mlp_channels[i]) == 48 for i in (0, 2, 4, 5))


def test_layerwise_round_to_rounds_only_pruned_layers():
    """Pruned layers' MLP widths become the nearest multiple of 32 (best channels kept); frozen and deleted ones don't move."""
    model = tiny_model(layers=6, intermediate=100)  # 100 is not a multiple of 32: rounding the frozen layer would cut it
    scores = [0.5, 0.1, 0.4, 0.05, 0.9, 0.3]
    table = rigged_table(model, -1)
    args = dict(distribution=(0.2, 0.8), freeze_top_n_layers=1, remove_layers=1)
    exact, _, _ = layerwise_plan(model, table, scores, 0.3, **args)
    plan, groups, config = layerwise_plan(model, table, scores, 0.3, round_to=32, **args)
    assert plan.removed_layers == [3] and config["frozen"].tolist() == [False, False, False, False, True, False]
    assert plan.mlp_channels[3] == [] and plan.mlp_channels[4] == list(range(100))
    mlp = groups[groups["group_type"] == "mlp"]
    for i in (0, 1, 2, 5):
        width = len(exact.mlp_channels[i])
        assert len(plan.mlp_channels[i]) == max(32, round(width / 32) * 32)
        best = mlp[mlp["layer_idx"] == i].sort_values("score", ascending=False).head(len(plan.mlp_channels[i]))
        assert plan.mlp_channels[i] == sorted(best["group_idx"].tolist())
        assert config["mlp_ratio"][i] == (100 - len(plan.mlp_channels[i])) / 100
    assert plan.mlp_channels != exact.mlp_channels and plan.attn_groups == exact.attn_groups
    with pytest.raises(SelectionError, match="--round_to must be >= 1"):
        layerwise_plan(model, table, scores, 0.3, round_to=0)


def test_allocate_respects_caps_and_total():
    got = allocate(10, np.array([0.7, 0.2, 0.1]), np.array([3, 5, 5]))
    assert got.sum() == 10 and got[0] == 3 and (got <= [3, 5, 5]).all()


def test_parse_distribution_errors():
    assert parse_distribution("2:8") == (0.2, 0.8)
    for bad in ("2-8", "0:0", "a:b", "-1:3", "nan:1", "1:nan", "inf:1", "1:-inf", "1e308:1e308"):
        with pytest.raises(SelectionError, match="--pruning_distribution"):
            parse_distribution(bad)
