"""`llama-pruning eval MODEL_DIR`: parameters, per-layer shapes, MACs, speed and peak memory of a pruned
model next to its dense base, each measured in its own process; JSON with `--json FILE`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the eval command."""
    parser.add_argument("model_dir", help="saved model folder (pruned folders load with trust_remote_code)")
    parser.add_argument("--base_model", default=None,
                        help="dense model to compare with (default: base_model of MODEL_DIR/pruning_plan.json; "
                             "smollm2-135m, an HF id or a folder)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch_size", type=int, default=1, help="sequences per forward pass")
    parser.add_argument("--prefill_len", type=int, default=128, help="prompt tokens per sequence")
    parser.add_argument("--decode_tokens", type=int, default=32, help="greedy decode steps after the prompt")
    parser.add_argument("--context_len", type=int, default=None,
                        help="context length for the attention MACs per token (default: prefill_len)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (the fastest is reported)")
    parser.add_argument("--in_process", action="store_true",
                        help="measure both models in this process (faster; peak memory then not separated)")
    parser.add_argument("--json", type=Path, default=None, help="write the full report to this JSON file")


def run(args: argparse.Namespace) -> int:
    """Profile MODEL_DIR (and its dense base), print a table, optionally write JSON; 0 on success."""
    from llama_pruning.evaluation.speed import compare, format_report

    report = compare(
        args.model_dir,
        base_model=args.base_model,
        isolate=not args.in_process,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        prefill_len=args.prefill_len,
        decode_tokens=args.decode_tokens,
        context_len=args.context_len,
        repeats=args.repeats,
    )
    if "dense" not in report:
        print(f"no dense base known for {args.model_dir} (no {args.model_dir}/pruning_plan.json, no --base_model): "
              "profiling the model alone")
    print(format_report(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"report written to {args.json}")
    return 0
