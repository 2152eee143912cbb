"""Where Q4_1 costs PPL: each projection kind of the dense and a pruned SmolLM2 round-tripped through Q4_1 alone.

    python -m bench.gguf_q4_1                       # P20 of bench/gguf.py's --runs, 16 windows
    python -m bench.gguf_q4_1 --point P30 --windows 32

Weights go through the gguf package's Q4_1 quantizer and back (what a Q4_1 GGUF stores) in our float32 HF
model; PPL on the first --windows windows of 128 tokens of wiki.test.raw, as in bench/gguf.py. Models: the
dense one, the pruned run folder (lsq), and the same plan cut from the dense model without compensation.
`rel. error` = ||W - Q4_1(W)|| / ||W|| over all tensors of a kind.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import quants
from torch import nn

from bench.gguf import PROMPT, ROOT
from llama_pruning.data import load_text, split_windows, tokenize_text
from llama_pruning.evaluation.ppl import window_perplexity
from llama_pruning.models import DEFAULT_MODEL, load_model
from llama_pruning.plan import PLAN_FILENAME, PruningPlan
from llama_pruning.surgery import apply_plan

Q4_1 = gguf.GGMLQuantizationType.Q4_1
KINDS = {"q/k/v_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",), "gate/up_proj": ("gate_proj", "up_proj"),
         "down_proj": ("down_proj",)}


def round_trip(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a Q4_1 GGUF tensor holds it (blocks of 32 along each row)."""
    data = weight.detach().float().numpy()
    return torch.from_numpy(quants.dequantize(quants.quantize(data, Q4_1), Q4_1)).to(weight.dtype)


def linears(model: nn.Module, names: tuple[str, ...]) -> list[nn.Linear]:
    return [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names and m.weight.numel()]


def relative_error(model: nn.Module, names: tuple[str, ...]) -> float:
    err = sum(float((round_trip(m.weight) - m.weight).square().sum()) for m in linears(model, names))
    return float(np.sqrt(err / sum(float(m.weight.square().sum()) for m in linears(model, names))))


def quantized_ppl(model: nn.Module, names: tuple[str, ...], windows: torch.Tensor) -> float:
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for m in linears(copied, names):
            m.weight.copy_(round_trip(m.weight))
    return window_perplexity(copied, windows, desc=" ".join(names) or "float32")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "prune_log" / "bench_gguf", help="bench/gguf.py's --runs")
    parser.add_argument("--point", default="P20")
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dense, tokenizer = load_model(DEFAULT_MODEL, device="cpu")
    folder = args.runs / args.point
    models = {"dense": dense, f"{args.point} lsq": load_model(str(folder), device="cpu")[0],
              f"{args.point} no compensation": apply_plan(copy.deepcopy(dense), PruningPlan.load(folder / PLAN_FILENAME))}
    windows = split_windows(tokenize_text(tokenizer, load_text("wikitext2", "evaluation").text), PROMPT, args.windows)
    every = tuple(n for names in KINDS.values() for n in names)
    print(f"| model | float32 PPL | Q4_1 on all | {' | '.join(f'Q4_1 on {k} (rel. error)' for k in KINDS)} |")
    print("|" + " --- |" * (3 + len(KINDS)))
    for label, model in models.items():
        base = quantized_ppl(model, (), windows)
        cells = [f"{quantized_ppl(model, every, windows) / base - 1:+.2%}"]
        cells += [f"{quantized_ppl(model, names, windows) / base - 1:+.2%} ({relative_error(model, names):.4f})"
                  for names in KINDS.values()]
        print(f"| {label} | {base:.2f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
