"""Layer-level importance: one score per decoder layer (higher = more important), for depth pruning.

- `block_influence` (ShortGPT): 1 - mean over all calibration tokens of cos(h_in, h_out), the cosine
  similarity between a layer's input and output hidden states; one forward pass, read by layer hooks.
- `removal`: calibration loss (mean token NLL) with the layer skipped minus the loss of the full model;
  one forward pass per layer plus one for the reference.
- `taylor`: sum of the layer's unit importances (attention groups and MLP channels) in a `taylor` table.
"""

from __future__ import annotations

from functools import partial

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llama_pruning.importance.runtime import (
    calibration_session,
    check_batch_size,
    check_dense,
    check_samples,
    forward_by_layer,
    micro_batches,
    nll_sum,
)
from llama_pruning.importance.unit import compute_importance
from llama_pruning.importance.units import table_problem
from llama_pruning.models.arch import decoder_layers, model_spec
from llama_pruning.options import LAYER_METHODS


@torch.no_grad()
def _block_influence(model: nn.Module, samples: torch.Tensor, device: torch.device, batch_size: int,
                     progress: bool) -> list[float]:
    layers = decoder_layers(model)
    cos_sums = torch.zeros(len(layers), dtype=torch.float64, device=device)

    def record(index: int, _module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        h_in = args[0] if args else kwargs["hidden_states"]
        h_out = output[0] if isinstance(output, tuple) else output
        cos = F.cosine_similarity(h_in.to(h_out.device).float(), h_out.float(), dim=-1)  # a device map may move h
        cos_sums[index] += cos.sum().double().to(cos_sums.device)

    handles = [layer.register_forward_hook(partial(record, i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with tqdm(total=len(layers), desc="block influence", unit="layer", disable=not progress) as bar:
            forward_by_layer(model, samples, batch_size, bar.update)  # hidden states only: no lm_head
    finally:
        for handle in handles:
            handle.remove()
    return (1.0 - cos_sums / samples.numel()).tolist()


@torch.no_grad()
def _mean_nll(model: nn.Module, samples: torch.Tensor, device: torch.device, batch_size: int) -> float:
    total = sum(nll_sum(model, ids).double() for ids in micro_batches(samples, batch_size, device, "", False))
    return float(total / (samples.shape[0] * (samples.shape[1] - 1)))


def _removal(model: nn.Module, samples: torch.Tensor, device: torch.device, batch_size: int,
             progress: bool) -> list[float]:
    """Skip each layer in turn by handing the decoder a layer list without it (restored afterwards)."""
    decoder = model.get_decoder()
    layers = decoder.layers
    scores = []
    try:
        base = _mean_nll(model, samples, device, batch_size)
        for skip in tqdm(range(len(layers)), desc="layer removal", unit="layer", disable=not progress):
            decoder.layers = nn.ModuleList([layer for i, layer in enumerate(layers) if i != skip])
            scores.append(_mean_nll(model, samples, device, batch_size) - base)
    finally:
        decoder.layers = layers
    return scores


def layer_scores_from_table(table: pd.DataFrame, num_layers: int) -> list[float]:
    """Sum of the unit importances of each layer (attention and MLP together)."""
    sums = table.groupby("layer_idx")["importance"].sum()
    return [float(sums.get(i, 0.0)) for i in range(num_layers)]


def layer_importance(
    model: nn.Module,
    samples: torch.Tensor,
    method: str = "block_influence",
    *,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    table: pd.DataFrame | None = None,
    progress: bool = True,
) -> list[float]:
    """One score per decoder layer of a dense model, higher = more important.

    For `taylor`, pass the unit `table` from `compute_importance(..., "taylor")` (or a cached one) to
    avoid a second gradient pass (ValueError unless it has one row per unit); without it one is computed with
    `batch_size` as micro-batch.
    """
    if method not in LAYER_METHODS:
        raise ValueError(f"unknown layer importance method {method!r}; choose one of {', '.join(LAYER_METHODS)}")
    check_samples(samples)
    check_batch_size(batch_size)
    check_dense(model)
    spec = model_spec(model)
    if method == "taylor":
        if table is None:
            table = compute_importance(model, samples, "taylor", gradient_batch_size=batch_size, device=device,
                                       progress=progress)
        elif (problem := table_problem(table, spec)) is not None:  # a layer missing from it would score 0, cut first
            raise ValueError(f"the importance table {problem}")
        return layer_scores_from_table(table, spec.num_layers)
    with calibration_session(model, device) as dev:
        if method == "removal":
            return _removal(model, samples, dev, batch_size, progress)
        return _block_influence(model, samples, dev, batch_size, progress)
