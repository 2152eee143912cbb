"""Training sequences for recovery: plain-text windows (loss on every token) or prompt/response pairs
(loss on response tokens only)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from llama_pruning.data.sources import json_lines
from llama_pruning.recovery.config import RecoveryError

IGNORE_INDEX = -100  # label value the losses skip (the Hugging Face convention)


class TokenDataset(Dataset):
    """Sequences of token ids with their labels; a label of IGNORE_INDEX carries no loss."""

    def __init__(self, input_ids: list[torch.Tensor], labels: list[torch.Tensor]):
        if len(input_ids) != len(labels) or any(a.shape != b.shape for a, b in zip(input_ids, labels, strict=True)):
            raise RecoveryError("every training sequence needs labels of its own length")
        if not input_ids:
            raise RecoveryError("no training sequences")
        self.input_ids, self.labels = input_ids, labels

    @classmethod
    def from_windows(cls, windows: torch.Tensor) -> TokenDataset:
        """Fixed-length windows `[N, L]` trained on every next token (the usual LM objective)."""
        if windows.dim() != 2 or windows.dtype != torch.long:
            raise RecoveryError(f"training windows must be a [N, seq_len] LongTensor (got {windows.dtype} "
                                f"{tuple(windows.shape)})")
        rows = list(windows.clone())
        return cls(rows, [row.clone() for row in rows])

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def collate(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad a batch: padded positions are masked out of attention and carry no loss.

    The causal mask keeps real tokens from seeing the padding after them, so the pad id is irrelevant.
    """
    ids = [f["input_ids"] for f in features]
    pad = torch.nn.utils.rnn.pad_sequence
    return {
        "input_ids": pad(ids, batch_first=True, padding_value=0),
        "labels": pad([f["labels"] for f in features], batch_first=True, padding_value=IGNORE_INDEX),
        "attention_mask": pad([torch.ones_like(x) for x in ids], batch_first=True, padding_value=0),
    }


def is_instruction_file(path: str | Path) -> bool:
    """True for a .jsonl file whose first record has both `prompt` and `response` fields."""
    path = Path(path)
    if not (path.suffix == ".jsonl" and path.is_file()):
        return False
    with open(path, encoding="utf-8-sig") as handle:
        for line in handle:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and "prompt" in record and "response" in record
    return False


def load_instruction_data(
    tokenizer: PreTrainedTokenizerBase, path: str | Path, num_samples: int, seq_len: int, seed: int = 0
) -> TokenDataset:
    """Up to `num_samples` prompt/response pairs (a seeded random choice), each cut to `seq_len` tokens.

    The prompt is tokenized with the tokenizer's special tokens (BOS), the response without them and
    followed by EOS; no chat template is applied (put one in the prompt text if the model needs it).
    Labels are IGNORE_INDEX on the prompt, so only response tokens are trained on.
    """
    records = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, record in json_lines(handle, path, RecoveryError):
            if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                    and isinstance(record.get("response"), str)):
                raise RecoveryError(f"{path}:{number} needs string fields 'prompt' and 'response'")
            records.append(record)
    random.Random(seed).shuffle(records)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    input_ids, labels = [], []
    for record in records[:num_samples]:
        prompt = tokenizer(record["prompt"])["input_ids"]
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + eos
        ids = torch.tensor(prompt + response, dtype=torch.long)[:seq_len]
        target = torch.tensor([IGNORE_INDEX] * len(prompt) + response, dtype=torch.long)[:seq_len]
        if (target[1:] != IGNORE_INDEX).any():  # a prompt filling the whole window teaches nothing
            input_ids.append(ids)
            labels.append(target)
    if not input_ids:
        raise RecoveryError(f"{path}: no prompt/response pair leaves a response token within {seq_len} tokens")
    return TokenDataset(input_ids, labels)


def load_training_data(
    tokenizer: PreTrainedTokenizerBase, dataset: str, num_samples: int, seq_len: int, seed: int = 0
) -> TokenDataset:
    """Training sequences from a prompt/response .jsonl, else windows of a corpus or text file
    (`llama_pruning.data.get_calibration_samples`: its calibration split, never the evaluation text)."""
    if num_samples < 1 or seq_len < 2:
        raise RecoveryError(f"need at least 1 sample of 2 tokens (got {num_samples} x {seq_len})")
    if is_instruction_file(dataset):
        return load_instruction_data(tokenizer, dataset, num_samples, seq_len, seed)
    from llama_pruning.data import get_calibration_samples

    return TokenDataset.from_windows(get_calibration_samples(tokenizer, dataset, num_samples, seq_len, seed))
