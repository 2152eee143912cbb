"""Token windows: the one tokenization used by calibration and perplexity, and calibration sampling.

Text is tokenized once, as a whole, without special tokens (SmolLM2's tokenizer adds none anyway; for
tokenizers that add a BOS, windows cut from the middle of a text would not start with one either).
Calibration windows are non-overlapping slices of exactly `seq_len` tokens, so they are unpadded and
never overlap; a seeded permutation picks which ones, skipping any whose tokens repeat an earlier pick.
"""

from __future__ import annotations

import bisect
import itertools
import re

import torch
from transformers import PreTrainedTokenizerBase

from llama_pruning.data.sources import DataError, load_text


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.LongTensor:
    """1-D token ids of `text`, tokenized in one call with no special tokens added."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def split_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.LongTensor:
    """Consecutive non-overlapping windows of `seq_len` tokens from the start (`[n, seq_len]`, remainder dropped)."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2 (got {seq_len})")
    count = ids.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seq_len].view(count, seq_len)


def calibration_indices(windows: torch.Tensor, num_samples: int, seed: int) -> list[int]:
    """Indices of the windows a calibration draw of `num_samples` with `seed` uses, in draw order.

    A seeded permutation, skipping windows whose tokens repeat an earlier pick; a smaller draw with the
    same seed is a prefix of a larger one. Fewer indices come back when the windows run out.
    """
    chosen: list[int] = []
    seen: set[tuple[int, ...]] = set()
    for index in torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed)).tolist():
        key = tuple(windows[index].tolist())
        if key not in seen:
            seen.add(key)
            chosen.append(index)
            if len(chosen) == num_samples:
                break
    return chosen


def get_calibration_samples(
    tokenizer: PreTrainedTokenizerBase,
    dataset: str,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
) -> torch.LongTensor:
    """`[num_samples, seq_len]` distinct, unpadded calibration windows of `dataset`'s calibration split.

    `dataset` is a corpus name (wikitext2, ptb, c4) or a local .txt/.jsonl file; the same seed always gives
    the same windows. Raises DataError when the text holds fewer than `num_samples` distinct windows.
    """
    if num_samples < 1:
        raise DataError(f"num_samples must be at least 1 (got {num_samples})")
    source = load_text(dataset, "calibration")
    ids = tokenize_text(tokenizer, source.text)
    windows = split_windows(ids, seq_len)
    chosen = calibration_indices(windows, num_samples, seed)
    if len(chosen) == num_samples:
        return windows[chosen].clone()
    raise DataError(
        f"{source.origin} has {ids.numel()} tokens, {len(chosen)} distinct windows of {seq_len}: too few for "
        f"{num_samples} samples; lower num_samples or seq_len, or use a larger text"
    )


def text_mask(tokenizer: PreTrainedTokenizerBase, windows: torch.Tensor, text: str) -> torch.BoolTensor:
    """True for the tokens of `windows` whose decoded text overlaps an occurrence of `text` (e.g. the `<unk>`
    placeholders of wikitext-2's tokenized release: their pieces, a piece merged with the next punctuation included)."""
    mask = torch.zeros(windows.shape, dtype=torch.bool)
    for i, ids in enumerate(windows.tolist()):
        pieces = [tokenizer.decode([t]) for t in ids]
        ends = list(itertools.accumulate(len(p) for p in pieces))
        for match in re.finditer(re.escape(text), "".join(pieces)):
            mask[i, bisect.bisect_right(ends, match.start()):bisect.bisect_left(ends, match.end()) + 1] = True
    return mask
