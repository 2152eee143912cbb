"""`layer_pruning.py` / `llama-pruning layer`: per-layer ratios from layer importance, A:M split."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from llama_pruning.cli.common import add_common_arguments, run_pruning
from llama_pruning.options import LAYER_METHODS, STRATEGIES

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, default_name="layer_pruning", default_importance="taylor")
    p = parser.add_argument_group("layer-wise selection")
    p.add_argument("--pruning_distribution", default="2:8",
                   help="attention:MLP split of the removed parameters, e.g. 2:8, 0:10 (MLP only), 10:0")
    p.add_argument("--pruning_strategy", choices=STRATEGIES, default="inverse",
                   help="inverse: less important layers pruned more (share ~ 1/importance); uniform: same ratio")
    p.add_argument("--layer_importance_method", choices=LAYER_METHODS, default="block_influence",
                   help="how layer importance is measured")
    p.add_argument("--freeze_top_n_layers", type=int, default=0, help="leave the N most important layers untouched")
    p.add_argument("--remove_layers", type=int, default=0,
                   help="first delete the N least important layers (depth pruning, ShortGPT-style with block_influence)")
    p.add_argument("--remove_empty_layers", action="store_true", help=argparse.SUPPRESS)


def select(model: nn.Module, args: argparse.Namespace, samples: torch.Tensor, table: pd.DataFrame) -> tuple:
    from llama_pruning.importance import layer_importance
    from llama_pruning.selection import layerwise_plan, parse_distribution

    scores = layer_importance(model, samples, args.layer_importance_method, batch_size=args.gradient_batch_size,
                              device=args.device, table=table if args.importance_method == "taylor" else None)
    plan, groups, config = layerwise_plan(
        model, table, scores, args.pruning_ratio, distribution=parse_distribution(args.pruning_distribution),
        strategy=args.pruning_strategy, freeze_top_n_layers=args.freeze_top_n_layers, remove_layers=args.remove_layers,
        round_to=args.round_to,
    )
    path = args.run_path / "layer_importance_config.json"
    path.write_text(json.dumps({"method": args.layer_importance_method, "layers": config.to_dict("records")}, indent=1))
    return plan, groups, scores


def check(args: argparse.Namespace, num_layers: int) -> None:
    from llama_pruning.selection.layerwise import check_layer_counts

    check_layer_counts(num_layers, args.remove_layers, args.freeze_top_n_layers)


def run(args: argparse.Namespace) -> int:
    from llama_pruning.selection import parse_distribution
    from llama_pruning.selection.global_knapsack import SelectionError

    if args.remove_empty_layers:
        raise SelectionError("--remove_empty_layers applies to global pruning only; "
                             "use --remove_layers N for depth pruning here")
    parse_distribution(args.pruning_distribution)  # fail before loading anything
    return run_pruning(args, select, "layer-wise pruning", check)
