"""Selection: turn importance tables into a PruningPlan (global knapsack or layer-wise allocation)."""

from llama_pruning.selection.global_knapsack import NORMALIZATIONS, SelectionError, global_plan, group_table
from llama_pruning.selection.layerwise import STRATEGIES, layerwise_plan, parse_distribution

__all__ = [
    "NORMALIZATIONS",
    "STRATEGIES",
    "SelectionError",
    "global_plan",
    "group_table",
    "layerwise_plan",
    "parse_distribution",
]
