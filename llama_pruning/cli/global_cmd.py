"""`global_pruning.py` / `llama-pruning global`: one table of every unit, pruned cheapest-per-importance first."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from llama_pruning.cli.common import add_common_arguments, non_negative_or_auto, positive_int, run_pruning
from llama_pruning.options import NORMALIZATIONS

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from llama_pruning.plan import PruningPlan


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
    p.add_argument("--cut_penalty", type=non_negative_or_auto, default="auto",
                   help="multiply a unit's score by 1 + A r/n (r: its rank among its block's n units), so deep cuts of "
                        "one block cost more than the sum of their estimates (0: off; auto: 1 for obs, 0 otherwise)")
    p.add_argument("--iterative_steps", type=positive_int, default=1,
                   help="reach the target in K steps: cut k/K of it, reconstruct, re-score the survivors on the "
                        "re-fitted model (about K x the importance and reconstruction time)")


def select(model: nn.Module, args: argparse.Namespace, samples: torch.Tensor, table: pd.DataFrame,
           fraction: float = 1.0, previous: PruningPlan | None = None) -> tuple:
    """The plan removing `fraction` of the target, on top of what `previous` removed (--iterative_steps)."""
    from llama_pruning.selection import global_plan
    from llama_pruning.selection.global_knapsack import resolve_cut_penalty, resolve_normalization

    cut_penalty = resolve_cut_penalty(args.cut_penalty, args.importance_method)
    plan, groups = global_plan(
        model, table, args.pruning_ratio * fraction, remove_empty_layers=args.remove_empty_layers,
        layer_start=args.layer_start, layer_end=args.layer_end,
        normalization=resolve_normalization(args.normalization, args.importance_method), round_to=args.round_to,
        previous=previous, cut_penalty=cut_penalty,
    )
    if cut_penalty:
        plan.metadata["cut_penalty"] = cut_penalty
    return plan, groups, None


def check(args: argparse.Namespace, num_layers: int) -> None:
    from llama_pruning.selection.global_knapsack import SelectionError, check_layer_range

    check_layer_range(num_layers, args.layer_start, args.layer_end)
    if args.iterative_steps > 1 and args.remove_empty_layers:
        raise SelectionError("--iterative_steps pads each step's cut model back to dense shapes, which an emptied block "
                             "does not have: drop --remove_empty_layers or --iterative_steps")


def run(args: argparse.Namespace) -> int:
    return run_pruning(args, select, "global pruning", check)
