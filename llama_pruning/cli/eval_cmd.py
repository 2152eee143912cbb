"""`llama-pruning eval MODEL_DIR`: parameters, per-layer shapes, MACs, speed and peak memory of a pruned
model next to its dense base, each measured in its own process; JSON with `--json FILE`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llama_pruning import atomic
from llama_pruning.cli.common import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the eval command."""
    parser.add_argument("model_dir", help="saved model folder (folders llama-pruning wrote load with its own code; "
                                          "no file of the folder is run)")
    parser.add_argument("--base_model", default=None,
                        help="dense model to compare with (default: base_model of MODEL_DIR/pruning_plan.json; "
                             "smollm2-135m, an HF id or a folder)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype both models are loaded and timed in")
    parser.add_argument("--batch_size", type=positive_int, default=1, help="sequences per forward pass")
    parser.add_argument("--prefill_len", type=positive_int, default=128, help="prompt tokens per sequence")
    parser.add_argument("--decode_tokens", type=positive_int, default=32, help="greedy decode steps after the prompt")
    parser.add_argument("--context_len", type=positive_int, default=None,
                        help="context length for the attention MACs per token (default: prefill_len)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs after one warm-up (the fastest is reported)")
    parser.add_argument("--in_process", action="store_true",
                        help="measure both models in this process (faster; peak memory then not separated)")
    parser.add_argument("--json", type=Path, default=None, help="write the full report to this JSON file")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow the models' own Python code to run (the folder's and its base model's)")


def run(args: argparse.Namespace) -> int:
    """Profile MODEL_DIR (and its dense base), print a table, optionally write JSON; 0 on success."""
    from llama_pruning.evaluation.speed import base_model_of, compare, format_report
    from llama_pruning.models.loading import check_device, check_model, context_limit, default_device

    if args.json is not None:  # refused now, not after minutes of timing
        atomic.check_file_target(args.json)
    args.device = args.device or default_device()
    check_device(args.device)
    base_model = args.base_model or base_model_of(args.model_dir)
    for name in (args.model_dir, base_model):  # both checked before either is loaded or timed
        if name is not None:
            context = context_limit(check_model(name, args.trust_remote_code))
            if context and args.prefill_len + args.decode_tokens > context:
                raise ValueError(f"--prefill_len {args.prefill_len} + --decode_tokens {args.decode_tokens} tokens are more "
                                 f"than {name}'s context ({context} tokens, max_position_embeddings)")
    report = compare(
        args.model_dir,
        base_model=base_model,
        trust_remote_code=args.trust_remote_code,
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
        atomic.write_text(args.json, json.dumps(report, indent=1))
        print(f"report written to {args.json}")
    return 0
