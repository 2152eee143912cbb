"""Perplexity on the evaluation split of one or more corpora, with one protocol for every source.

Protocol: rows = the split's non-empty rows without trailing newline; text = rows joined by the corpus'
joiner ("\\n\\n" for wikitext2 and local files, " " for ptb and c4); tokenized once without special tokens;
non-overlapping windows of `seq_len` tokens from the start (the remainder is dropped; `max_windows`
keeps a prefix); PPL = exp(mean next-token NLL over every predicted token of every window).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from llama_pruning import placement
from llama_pruning.data import DataError, load_text, split_windows, tokenize_text


def window_nll(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    desc: str = "perplexity",
) -> torch.Tensor:
    """Next-token NLL of every target of a `[n, seq_len]` tensor of token windows, `[n, seq_len - 1]` float64."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
    if len(windows) == 0:
        raise DataError(f"{desc}: no window to evaluate")
    device = placement.run_device(model, device)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch"):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
                out.append(nll.view(len(batch), -1).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def window_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                      device: torch.device | str | None = None, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) of a `[n, seq_len]` tensor of token windows, NLL summed in float64."""
    return math.exp(window_nll(model, windows, batch_size, device, desc).mean().item())


def PPLMetric(  # noqa: N802 - the name users of LLM-Pruner know
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    datasets: Sequence[str] | str = ("wikitext2",),
    seq_len: int = 128,
    device: torch.device | str | None = None,
    batch_size: int = 4,
    max_windows: int | None = None,
) -> dict[str, float]:
    """Perplexity of `model` on the evaluation split of each dataset, keyed by its label.

    `datasets` holds corpus names (wikitext2, ptb, c4) or local text files. `device` None runs where the
    model's weights are; a device given moves the model there (a model dispatched with a device map stays
    where it is). `max_windows` evaluates only the first windows. Returns e.g. `{'wikitext2 (wikitext-2-raw-v1)': 52.1}`.
    """
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1 or None (got {max_windows})")
    device = placement.prepare(model, device)
    results = {}
    for name in [datasets] if isinstance(datasets, str) else datasets:
        source = load_text(name, "evaluation")
        windows = split_windows(tokenize_text(tokenizer, source.text), seq_len, max_windows)
        results[source.label] = window_perplexity(model, windows, batch_size, device, desc=source.label)
    return results
