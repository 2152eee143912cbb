"""`global_pruning.py` / `llama-pruning global`: one table of every unit, pruned cheapest-per-importance first."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from llama_pruning.cli.common import add_common_arguments, run_pruning
from llama_pruning.options import NORMALIZATIONS

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # chosen on dev (docs/RESULTS_NOTES.md); the layer-wise command keeps Taylor + lsq
    add_common_arguments(parser, default_name="global_pruning", default_importance="obs", default_reconstruct="block")
    p = parser.add_argument_group("global selection")
    p.add_argument("--remove_empty_layers", action="store_true",
                   help="let blocks empty: drop emptied blocks and delete layers with both emptied (depth pruning)")
    p.add_argument("--layer_start", type=int, default=0, help="first layer considered for pruning")
    p.add_argument("--layer_end", type=int, default=None, help="one past the last layer considered (default: all)")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default="auto",
                   help="per-layer score normalisation (auto: on for wanda/magnitude, off for taylor/obs/random)")


def select(model: nn.Module, args: argparse.Namespace, samples: torch.Tensor, table: pd.DataFrame) -> tuple:
    from llama_pruning.selection import global_plan
    from llama_pruning.selection.global_knapsack import resolve_normalization

    plan, groups = global_plan(
        model, table, args.pruning_ratio, remove_empty_layers=args.remove_empty_layers,
        layer_start=args.layer_start, layer_end=args.layer_end,
        normalization=resolve_normalization(args.normalization, args.importance_method), round_to=args.round_to,
    )
    return plan, groups, None


def check(args: argparse.Namespace, num_layers: int) -> None:
    from llama_pruning.selection.global_knapsack import check_layer_range

    check_layer_range(num_layers, args.layer_start, args.layer_end)


def run(args: argparse.Namespace) -> int:
    return run_pruning(args, select, "global pruning", check)
