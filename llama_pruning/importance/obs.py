"""`obs`: unit scores that see compensation, from structured Optimal Brain Surgeon on each block's output projection.

Cutting units of a block only drops input columns S of its o_proj / down_proj (W: out x in), whose dense input
Gram matrix over the calibration tokens is H = X^T X (+ damping). After the best least-squares update of the
kept columns the output error is W_S (H^-1_SS)^-1 W_S^T per output row (OBS; structured as in SlimGPT/ZipLM).
Weighting output feature d by the Fisher diagonal F_d = sum_t (dL/dy_td)^2 of the block output (L: the mean
token NLL, its targets drawn from the model's own predictions: the true Fisher, sampled; or the text's next tokens: the
empirical one) turns it into a second-order loss estimate dL = 0.5 sum_d F_d E_d, comparable across blocks.
Units are removed greedily per block, cheapest first, W and H^-1 updated after each removal; a unit's score
is the loss increase at its step (running maximum), so the global knapsack takes each block in greedy order.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from llama_pruning.gram import add_gram_, mirror_
from llama_pruning.importance.runtime import layerwise_backward, on_output_gradient
from llama_pruning.importance.units import unit_linears
from llama_pruning.models.arch import ModelSpec
from llama_pruning.options import DEFAULT_OBS_FISHER, OBS_CHUNKS

DAMPING = 0.1  # relative ridge of H, as lsq's default (3000 tokens of 32768) leaves the compensation


class OBSAccumulator:
    """Per layer: the Gram matrix of o_proj / down_proj inputs (upper block triangle, mirrored when folded) and the
    squared output gradients, then greedy OBS."""

    def __init__(self, model: nn.Module, spec: ModelSpec, keep: list[torch.Tensor] | None = None):
        self.units = [unit for unit in unit_linears(model, spec) if unit.axis == 1]  # o_proj, down_proj: units = columns
        self.keep = keep  # per micro-batch, the tokens whose inputs enter the Gram matrices (None: all)
        self.batch = 0
        self.gram: dict[tuple[int, str], torch.Tensor] = {}
        self.fisher: dict[tuple[int, str], torch.Tensor] = {}
        self.importance: dict[tuple[int, str], torch.Tensor] = {}

    def attach(self) -> list:
        return [on_output_gradient(unit.linear, partial(self._consume, (unit.layer_idx, unit.group_type)))
                for unit in self.units]

    @torch.no_grad()
    def _consume(self, key: tuple[int, str], x: torch.Tensor, dy: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        if self.keep is not None:
            x = x[self.keep[self.batch].flatten().to(x.device)]
        dy = dy.reshape(-1, dy.shape[-1]).double()
        if key not in self.gram:
            self.gram[key] = x.new_zeros(x.shape[1], x.shape[1])
            self.fisher[key] = dy.new_zeros(dy.shape[1])
        add_gram_(self.gram[key], x)  # upper block triangle: mirrored in `fold_layer`
        self.fisher[key].add_(dy.square().sum(0))

    @torch.no_grad()
    def fold_layer(self, index: int) -> None:
        """Greedy OBS scores of one layer's two blocks; frees its statistics."""
        for unit in self.units:
            if unit.layer_idx == index:
                key = (index, unit.group_type)
                self.importance[key] = greedy_obs(unit.linear.weight.detach(), mirror_(self.gram.pop(key)),
                                                  self.fisher.pop(key), unit.linear.in_features // unit.n_units,
                                                  chunk=max(1, unit.n_units // OBS_CHUNKS))

    def finish(self) -> dict[str, dict]:
        return {"importance": self.importance}


def _inverses(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of each matrix of a batch, one LAPACK call each: after `torch.set_num_threads(n > 1)`, batched CPU
    `linalg.inv` runs MKL's getrf on several threads at once and fails (pytorch#142815; 192 rows failed here, 128 not)."""
    return torch.stack([torch.linalg.inv(b) for b in blocks])


def greedy_obs(weight: torch.Tensor, gram: torch.Tensor, fisher: torch.Tensor, group: int,
               damping: float = DAMPING, chunk: int = 1) -> torch.Tensor:
    """Per group of `group` consecutive input columns: the Fisher-weighted OBS loss increase at its greedy step.

    `weight` is out x in, `gram` in x in float64 (damped, factored and inverted in place: consumed), `fisher` per
    output feature; returns a float64 vector (one per group), increasing along the greedy order. `chunk` > 1
    removes that many cheapest groups per step (one rank-`chunk` update instead of as many rank-1 ones).
    Memory: H^-1 lives in `gram`'s storage and W in one float64 copy; removed columns are zeroed, not cut out.
    """
    n = weight.shape[1] // group
    gram.diagonal().add_(damping * gram.diagonal().mean().clamp_min(1e-12))
    hinv = gram.T  # the column-major view of a symmetric matrix: LAPACK factors and inverts it without a copy
    torch.linalg.cholesky(hinv, out=hinv)
    torch.cholesky_inverse(hinv, out=hinv)
    hinv = gram  # symmetric: the same matrix, row-major
    w = weight.to(torch.float64, copy=True)
    live = torch.arange(n)  # groups not yet removed, in column order
    offsets = torch.arange(group)
    scores = torch.empty(n, dtype=torch.float64)
    best = 0.0
    while live.numel():
        if group == 1:  # MLP channels: no batched inverses
            cost = 0.5 * (fisher @ w.square())[live] / hinv.diagonal()[live]
        else:
            blocks = hinv.reshape(n, group, n, group)[live, :, live, :]  # (live, group, group) diagonal blocks
            ws = w[:, (live[:, None] * group + offsets).flatten()].reshape(w.shape[0], live.numel(), group)
            cost = 0.5 * torch.einsum("d,dga,gab,dgb->g", fisher, ws, _inverses(blocks), ws)
        order = cost.argsort()
        picks, live = live[order[:chunk]], live[order[chunk:].sort().values]
        for g, c in zip(picks.tolist(), cost[order[:chunk]].tolist(), strict=True):
            best = max(c, best * (1 + 1e-12))  # strictly increasing: ties keep the greedy order
            scores[g] = best
        cut = (picks[:, None] * group + offsets).flatten()
        # W <- W - W_S B and H^-1 <- H^-1 - H^-1_:S B with B = (H^-1_SS)^-1 H^-1_S: : the best re-fit of the kept
        # weights and the inverse of H restricted to the kept columns; the cut rows and columns become zero
        b_rows = torch.linalg.solve(hinv[cut[:, None], cut], hinv[cut])
        w.addmm_(w[:, cut], b_rows, alpha=-1)
        hinv.addmm_(hinv[:, cut], b_rows, alpha=-1)
    return scores


def obs_scores(model: nn.Module, samples: torch.Tensor, spec: ModelSpec, device: torch.device, batch_size: int,
               progress: bool, ignore: torch.Tensor | None = None, fisher: str = DEFAULT_OBS_FISHER,
               seed: int = 0) -> dict[str, dict]:
    """Layer-by-layer gradient pass collecting what greedy OBS needs, then the scores of every block.

    `ignore`: tokens left out of the loss (as targets) and of the Gram matrices (as inputs); `fisher`: `sampled` draws
    the loss's targets from the model (seeded by `seed`), `labels` reads them from the text."""
    acc = OBSAccumulator(model, spec, None if ignore is None else list((~ignore).split(batch_size)))
    handles = acc.attach()
    try:
        layerwise_backward(model, samples, device, batch_size, acc.fold_layer, "obs", progress, ignore,
                           lambda b: setattr(acc, "batch", b), seed if fisher == "sampled" else None)
    finally:
        for handle in handles:
            handle.remove()
    return acc.finish()
