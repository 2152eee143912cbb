"""Iterative schedule (--iterative_steps): each step keeps what the last one removed out, and the result cuts exactly."""

from __future__ import annotations

import torch

from llama_pruning.importance import compute_importance
from llama_pruning.iterative import iterative_plan
from llama_pruning.models.arch import count_params
from llama_pruning.reconstruct import prune_with_reconstruction
from llama_pruning.selection import global_plan
from llama_pruning.selection.global_knapsack import removed_by
from tests.tiny import tiny_model


def test_three_steps_nest_and_cut_exactly():
    model = tiny_model(layers=3, intermediate=32, dtype=torch.float64)
    dense_params = count_params(model)
    samples = torch.randint(0, 97, (8, 16))
    tables, plans = [], []

    def score(k: int):
        tables.append(compute_importance(model, samples, "taylor", progress=False))
        return tables[-1]

    def select(table, fraction, previous):
        return global_plan(model, table, 0.2 * fraction, previous=previous)

    def cut(plan):
        plans.append(plan)
        prune_with_reconstruction(model, plan, samples, mode="lsq", progress=False)

    final, _ = iterative_plan(model, 3, score, select, cut, log=lambda line: None)
    assert len(tables) == 3 and len(plans) == 2
    for earlier, later in zip(plans, [*plans[1:], final], strict=True):
        assert all(set(b) <= set(a) for a, b in zip(earlier.mlp_channels, later.mlp_channels, strict=True))
        assert all(set(b) <= set(a) for a, b in zip(earlier.attn_groups, later.attn_groups, strict=True))
    # the padded model's removed units are exact zeros: no gradient reaches them, so their Taylor importance is 0
    for table, plan in zip(tables[1:], plans, strict=True):
        assert (table.loc[removed_by(plan, table), "importance"] == 0).all()
    report = final.param_report(model)
    assert report["params_before"] == dense_params
    prune_with_reconstruction(model, final, samples, mode="lsq", progress=False)
    assert count_params(model) == report["params_after"]
    assert abs(1 - report["params_after"] / dense_params - 0.2) < 0.005
