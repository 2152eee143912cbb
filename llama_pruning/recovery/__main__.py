"""Recover a saved pruned model: `python -m llama_pruning.recovery --model DIR --output OUT --finetune ...`.

Pruning is a one-process job; recovery is the part worth spreading over GPUs. This command reads a
folder written by `--save_model` (or `save_pruned_model`), trains it, and saves the merged result, so
it can be started unchanged with `accelerate launch -m llama_pruning.recovery ...` or `torchrun`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from accelerate import PartialState

from llama_pruning.cli import OneLineParser
from llama_pruning.models.export import save_pruned_model
from llama_pruning.models.loading import check_model, load_model
from llama_pruning.plan import PLAN_FILENAME, PruningPlan
from llama_pruning.recovery.config import add_arguments
from llama_pruning.recovery.train import recover


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m llama_pruning.recovery", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder of a saved pruned model")
    parser.add_argument("--output", required=True, type=Path, help="folder for the recovered model and loss curve")
    parser.add_argument("--teacher", default=None,
                        help="dense teacher for --distill (default: the base_model recorded in the pruning plan)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype the models are loaded in")
    parser.add_argument("--save_dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the saved weights (default: as trained)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the training data, LoRA init and data order")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow the models' own Python code to run (never needed for folders llama-pruning wrote)")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Load, recover, save (main process only); returns the exit code (2 and one line for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.finetune or args.distill):
        parser.error("nothing to do: pass --finetune and/or --distill")
    try:
        return recover_folder(args, parser)
    except (ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def recover_folder(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Check both models before loading either, then load, recover and save (main process only)."""
    plan_file = Path(args.model) / PLAN_FILENAME
    plan = PruningPlan.load(plan_file) if plan_file.is_file() else None
    teacher_name = args.teacher or (plan.base_model if plan else None)
    if args.distill and teacher_name is None:
        parser.error("--distill needs --teacher: the model folder records no base model")
    for name in (args.model, teacher_name if args.distill else None):
        if name is not None:
            check_model(name, args.trust_remote_code)
    state = PartialState()  # one per process under accelerate launch / torchrun: each trains on its own device
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=str(state.device),
                                  trust_remote_code=args.trust_remote_code)

    def teacher_factory():
        return load_model(teacher_name, dtype=args.dtype, device=str(state.device),
                          trust_remote_code=args.trust_remote_code)[0]

    model = recover(model, tokenizer, args, args.output, teacher_factory if args.distill else None)
    if state.is_main_process:
        save_pruned_model(model, tokenizer, args.output, plan=plan, dtype=args.save_dtype)
        print(f"recovered model saved to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
