"""Recovery benchmark on the embedded SmolLM2-135M: one command writes bench/results_recovery.md.

    python -m bench.recovery                                  # full protocol, every method
    python -m bench.recovery --steps 20 --methods lora,full   # smaller budget / fewer rows

Protocol: plan = taylor importance on 64 x 128 tokens of wiki.valid.tokens (seed 0), global selection of
15.8% of total parameters (= 20% of decoder-layer parameters, 21.2M), no reconstruction. Each method
then trains the same pruned model with the same budget (`--steps` optimizer steps of `--batch` windows
of `--seq_len` tokens from wiki.valid.tokens, seed 0) and is evaluated by wikitext-2 perplexity over the
first 128 windows of 128 tokens of wiki.test.raw. Every method runs in its own subprocess, so its peak
memory (CUDA: max allocated; CPU: peak RSS of the process) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRUNING_RATIO = 0.158  # of total parameters: 20% of SmolLM2's decoder-layer parameters
METHODS = {  # row name -> (RecoveryConfig overrides, distill)
    "lora": ({"method": "lora"}, False),
    "full": ({"method": "full"}, False),
    "lora + distill": ({"method": "lora"}, True),
    "full + distill": ({"method": "full"}, True),
    "lora (bf16 + checkpointing)": ({"method": "lora", "bf16": True, "gradient_checkpointing": True}, False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per method")
    p.add_argument("--batch", type=int, default=4, help="windows per step")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per training window")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--eval_windows", type=int, default=128, help="wikitext-2 test windows of 128 tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="smollm2-135m", help="dense model (HF id, folder or the embedded alias)")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "results_runs" / "recovery",
                   help="scratch folder for the plan and per-method results")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results_recovery.md")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def perplexity(model, tokenizer, args) -> float:
    from llama_pruning.evaluation import PPLMetric

    return next(iter(PPLMetric(model, tokenizer, "wikitext2", seq_len=128, max_windows=args.eval_windows).values()))


def peak_memory_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(args) -> dict:
    """Plan (taylor, global, 15.8% of total parameters) and the dense / pruned perplexities."""
    from llama_pruning.data import get_calibration_samples
    from llama_pruning.importance import compute_importance
    from llama_pruning.models import load_model
    from llama_pruning.selection import global_plan
    from llama_pruning.surgery import apply_plan

    model, tokenizer = load_model(args.model, device=args.device)
    dense_ppl = perplexity(model, tokenizer, args)
    samples = get_calibration_samples(tokenizer, "wikitext2", 64, 128, seed=0)
    table = compute_importance(model, samples, "taylor", device=args.device)
    plan, _ = global_plan(model, table, PRUNING_RATIO)
    report = plan.param_report(model)
    plan.save(args.work / "plan.json")
    apply_plan(model, plan)
    return {"dense_ppl": dense_ppl, "pruned_ppl": perplexity(model, tokenizer, args),
            "layer_params_removed": report["layer_params_before"] - report["layer_params_after"],
            "layer_params_before": report["layer_params_before"], "params_after": report["params_after"]}


def run_method(args) -> dict:
    """Train one method on a freshly pruned model; returns its numbers (the subprocess's whole job)."""
    from llama_pruning.data import get_calibration_samples
    from llama_pruning.models import load_model
    from llama_pruning.plan import PruningPlan
    from llama_pruning.recovery import RecoveryConfig, finetune
    from llama_pruning.surgery import apply_plan

    overrides, distill = METHODS[args.worker]
    model, tokenizer = load_model(args.model, device=args.device)
    apply_plan(model, PruningPlan.load(args.work / "plan.json"))
    teacher = load_model(args.model, device=args.device)[0] if distill else None
    data = get_calibration_samples(tokenizer, "wikitext2", args.steps * args.batch, args.seq_len, seed=0)
    config = RecoveryConfig(max_steps=args.steps, batch_size=args.batch, seed=0, **overrides)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model, history = finetune(model, data, config, teacher=teacher, log=lambda _: None)
    seconds = time.perf_counter() - start
    memory = peak_memory_mib(args.device)
    del teacher
    losses = [h["loss"] for h in history]
    return {"ppl": perplexity(model, tokenizer, args), "seconds": seconds, "peak_mib": memory,
            "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def write_report(args, base: dict, rows: dict[str, dict]) -> None:
    import peft
    import transformers

    tokens = args.steps * args.batch * args.seq_len
    lines = [
        "# Recovery after pruning: SmolLM2-135M, 20% of decoder-layer parameters",
        "",
        f"Written by `python -m bench.recovery {' '.join(sys.argv[1:])}`. Device: {device_name(args.device)}; "
        f"transformers {transformers.__version__}, peft {peft.__version__}.",
        "",
        f"Plan: taylor importance (64 x 128 tokens of wiki.valid.tokens, seed 0), global selection, no reconstruction: "
        f"{base['layer_params_removed']:,} of {base['layer_params_before']:,} decoder-layer parameters removed "
        f"({base['layer_params_removed'] / base['layer_params_before']:.1%}), {base['params_after']:,} parameters left.",
        f"Budget per method: {args.steps} steps x {args.batch} windows x {args.seq_len} tokens = {tokens:,} tokens of "
        "wiki.valid.tokens (seed 0), AdamW, linear decay, no warmup, default learning rates (LoRA 1e-4, full 1e-5); "
        "LoRA r=8, alpha=16, dropout 0.05 on q,k,v,o,gate,up,down; distillation from the dense model, T=2, alpha=1.",
        f"PPL: wikitext-2 (wiki.test.raw), first {args.eval_windows} windows of 128 tokens.",
        "",
        f"Dense model PPL: **{base['dense_ppl']:.2f}**. Pruned, before recovery: **{base['pruned_ppl']:.2f}**.",
        "",
        "| method | PPL after | train loss (first step -> mean of last 10) | training seconds | peak memory MiB |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    memory_kind = "CUDA max allocated" if args.device.startswith("cuda") else "process peak RSS"
    for name, row in rows.items():
        lines.append(f"| {name} | {row['ppl']:.2f} | {row['first_loss']:.3f} -> {row['last_loss']:.3f} | "
                     f"{row['seconds']:.1f} | {row['peak_mib']:.0f} |")
    lines += ["", f"Peak memory is the {memory_kind} of the method's own process (model, teacher, optimizer and "
              "activations). Training seconds exclude loading and evaluation."]
    args.out.write_text("\n".join(lines) + "\n")


def result_path(args, name: str) -> Path:
    return args.work / ("".join(c if c.isalnum() else "_" for c in name) + ".json")


def worker_command(args, name: str) -> list[str]:
    """The subprocess that trains one method with this run's settings."""
    settings = ["--steps", args.steps, "--batch", args.batch, "--seq_len", args.seq_len, "--eval_windows",
                args.eval_windows, "--device", args.device, "--model", args.model, "--work", args.work]
    return [sys.executable, "-m", "bench.recovery", *map(str, settings), "--worker", name]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("LLAMA_PRUNING_DATA", str(ROOT.parent / "shared" / "data"))
    args.work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        result_path(args, args.worker).write_text(json.dumps(run_method(args)))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    base = prepare(args)
    print(f"dense PPL {base['dense_ppl']:.2f}, pruned PPL {base['pruned_ppl']:.2f}", flush=True)
    rows = {}
    for name in methods:
        subprocess.run(worker_command(args, name), cwd=ROOT, check=True)
        rows[name] = json.loads(result_path(args, name).read_text())
        print(f"{name}: PPL {rows[name]['ppl']:.2f} in {rows[name]['seconds']:.1f} s", flush=True)
        write_report(args, base, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
