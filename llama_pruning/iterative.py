"""Iterative schedule (`--iterative_steps K`): reach the target in K steps, re-scoring what survives each re-fit.

Step k plans k/K of the target: everything step k-1 removed (scored -inf by the selection), plus the lowest
scores of the rest, where the scores come from the model as steps 1..k-1 left it. Between steps the plan is
cut with reconstruction, then padded back to dense shapes with zeros (`surgery.expand_to_dense`), which
computes exactly what the cut model does, so every plan stays in the dense model's indices. The last plan is
returned uncut: the caller cuts it like any other. Cost: about K times the importance and reconstruction time.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
from torch import nn

from llama_pruning.plan import PruningPlan
from llama_pruning.surgery import expand_to_dense

# (importance table, fraction of the target, plan of the previous step or None) -> (plan, anything else selection returns)
Select = Callable[[pd.DataFrame, float, PruningPlan | None], tuple]


def iterative_plan(model: nn.Module, steps: int, score: Callable[[int], pd.DataFrame], select: Select,
                   cut: Callable[[PruningPlan], object], log: Callable[[str], object] = print) -> tuple:
    """The last step's (plan, ...) from `select`; steps 1..K-1 are cut by `cut` (in place) and padded back.

    `score(k)` is the importance table of the model as it is at step k (k = 1: the dense model).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    previous = None
    for k in range(1, steps):
        plan = select(score(k), k / steps, previous)[0]
        log(f"iterative step {k}/{steps}: cutting to {k}/{steps} of the target, then re-scoring the rest")
        cut(plan)
        expand_to_dense(model, plan)
        previous = plan
    return select(score(steps), 1.0, previous)
