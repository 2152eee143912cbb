"""Benchmark: wall time and peak RSS of each importance method against plain forward / forward+backward passes.

Each measurement runs in its own subprocess, so its peak RSS is its own. Peak RSS is read twice: for the
whole process (model load and one warm-up micro-batch included) and for the measured phase alone (the kernel's high-water mark is
reset after loading, through /proc/self/clear_refs). Usage:

    python bench/importance.py                      # SmolLM2-135M, 64 x 128 wikitext2 tokens -> results file
    python bench/importance.py --num-samples 8      # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

CASES = ("forward", "forward_backward", "taylor", "taylor_2nd:mix", "taylor_2nd:second", "taylor_2nd:sum",
         "wanda", "magnitude", "random")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _plain_pass(model, samples: torch.Tensor, batch_size: int, backward: bool) -> None:
    """What a user would run: HF loss on micro-batches; with backward, every parameter gets a .grad."""
    with torch.set_grad_enabled(backward):
        for start in range(0, samples.shape[0], batch_size):
            ids = samples[start:start + batch_size].to(model.device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if backward:
                (loss * ids.shape[0] / samples.shape[0]).backward()
    model.zero_grad(set_to_none=True)


def _load(args: argparse.Namespace):
    """The model as users load it; with --random-weights only its config and tokenizer are read (timings do
    not depend on weight values, and a machine without the checkpoint can still run the benchmark)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llama_pruning.models import load_model
    from llama_pruning.models.loading import default_device, resolve_dtype

    if not args.random_weights:
        return load_model(args.model, dtype=args.dtype, device=args.device)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(args.dtype))
    return model.to(args.device or default_device()).eval(), AutoTokenizer.from_pretrained(args.model)


def worker(args: argparse.Namespace) -> dict:
    """Load the model and samples, then time one case; returns the measurements."""
    from llama_pruning.data import get_calibration_samples
    from llama_pruning.importance import compute_importance

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = _load(args)
    samples = get_calibration_samples(tokenizer, args.dataset, args.num_samples, args.seq_len, seed=0)
    _plain_pass(model, samples[:args.batch_size], args.batch_size, backward=True)  # warm-up: kernels, allocator
    load_peak = _rss_kib("VmHWM")
    reset = _reset_peak_rss()
    before = _rss_kib("VmRSS")
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    if args.worker in ("forward", "forward_backward"):
        _plain_pass(model, samples, args.batch_size, backward=args.worker == "forward_backward")
    else:
        method, _, variant = args.worker.partition(":")
        compute_importance(model, samples, method, gradient_batch_size=args.batch_size, progress=False,
                           **({"taylor_2nd_variant": variant} if variant else {}))
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = {
        "case": args.worker,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "rss_before_mib": before / 1024,
        "peak_rss_phase_mib": _rss_kib("VmHWM") / 1024 if reset else None,
        "peak_rss_process_mib": max(load_peak, _rss_kib("VmHWM")) / 1024,
        "device": str(model.device),
        "threads": torch.get_num_threads(),
    }
    if model.device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_case(case: str, args: argparse.Namespace) -> dict:
    """One case in a fresh interpreter, with the load average around it."""
    cmd = [sys.executable, __file__, "--worker", case, "--model", args.model, "--dtype", args.dtype,
           "--dataset", args.dataset, "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size)]
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--random-weights"] if args.random_weights else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    load_before = os.getloadavg()[0]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["load_avg"] = (load_before, os.getloadavg()[0])
    print(json.dumps(result), flush=True)
    return result


def report(results: list[dict], args: argparse.Namespace) -> str:
    """Markdown table; ratios (wall time, and process CPU time) against the plain passes the targets refer to."""
    base = {r["case"]: r for r in results}
    targets = {"taylor": ("forward_backward", 1.3), "taylor_2nd:mix": ("forward_backward", 2.0),
               "wanda": ("forward", 1.3)}
    lines = [
        "| case | wall s | CPU s | wall / fwd | wall / fwd+bwd | CPU / fwd | CPU / fwd+bwd | target: wall, CPU "
        "| peak RSS phase (MiB) | phase peak - RSS before | peak RSS process (MiB) | load avg (start, end) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in results:
        ratios = {(ref, key): r[key] / base[ref][key] for ref in ("forward", "forward_backward")
                  for key in ("seconds", "cpu_seconds")}
        target = ""
        if r["case"] in targets:
            ref, limit = targets[r["case"]]
            verdicts = ["met" if ratios[(ref, key)] <= limit else "NOT met" for key in ("seconds", "cpu_seconds")]
            target = f"<= {limit}x {'fwd' if ref == 'forward' else 'fwd+bwd'}: {', '.join(verdicts)}"
        phase, growth = "n/a", "n/a"
        if r["peak_rss_phase_mib"] is not None:
            phase, growth = f"{r['peak_rss_phase_mib']:.0f}", f"{r['peak_rss_phase_mib'] - r['rss_before_mib']:.0f}"
        cuda = f" (CUDA peak {r['peak_cuda_mib']:.0f})" if "peak_cuda_mib" in r else ""
        lines.append(
            f"| {r['case']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} "
            f"| {ratios[('forward', 'seconds')]:.2f} | {ratios[('forward_backward', 'seconds')]:.2f} "
            f"| {ratios[('forward', 'cpu_seconds')]:.2f} | {ratios[('forward_backward', 'cpu_seconds')]:.2f} "
            f"| {target} | {phase}{cuda} | {growth} | {r['peak_rss_process_mib']:.0f} "
            f"| {r['load_avg'][0]:.1f}, {r['load_avg'][1]:.1f} |"
        )
    head = (f"Model {args.model}{' (random weights)' if args.random_weights else ''} ({args.dtype}), "
            f"{args.num_samples} samples x {args.seq_len} tokens of {args.dataset}, micro-batch {args.batch_size}; "
            f"device {results[0]['device']}, {results[0]['threads']} torch threads on {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}.")
    return head + "\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--dataset", default="wikitext2")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--random-weights", action="store_true",
                        help="build --model (a local folder) from its config.json with random weights")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "LLAMA_PRUNING_DATA" not in os.environ and SHARED_DATA.is_dir():  # the developers' offline folder
        os.environ["LLAMA_PRUNING_DATA"] = str(SHARED_DATA)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    cases = ["forward", "forward_backward"] + [c for c in args.cases if c not in ("forward", "forward_backward")]
    text = report([run_case(case, args) for case in cases], args)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
