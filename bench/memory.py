"""Benchmark: peak memory per phase of the default global command on random Llama-3-8B-shaped models.

A model with the exact Llama-3-8B layer shape (hidden 4096, 32/8 heads of 128, MLP 14336, vocab 128256, untied)
but k decoder layers is written to disk, then one subprocess per k runs the phases of `global_pruning.py`
with its defaults (load, taylor importance, global selection at 20 %, lsq reconstruction with drift 0.5, save).
Per phase it reports:

- peak live tensor bytes: the bytes of every tensor alive when the phase starts (counted by walking the
  garbage collector's objects, each storage once) plus the highest running balance of the CPU allocator
  during the phase (every allocation and free, from torch's profiler with `profile_memory=True`);
- peak RSS of the process during the phase (VmHWM, reset at the phase start through /proc/self/clear_refs).

`report` fits peak = a + b*k per phase and compares with `llama_pruning.memory` (the analytic model that
`--dry_run` uses) before projecting to 32 layers. CPU runs use float32 and few calibration windows (bf16
matmuls are ~100x slower on this CPU); the projection to bf16 and to the default 64 x 128 / 256 x 128 tokens is
made by the analytic model, whose terms are checked against the measurements. Usage:

    python bench/memory.py run --layers 1 2 4        # one subprocess at a time, appends to bench/memory_runs.jsonl
    python bench/memory.py report                    # writes bench/results_memory.md and .json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RUNS = HERE / "memory_runs.jsonl"
PHASES = ("load", "taylor", "selection", "lsq", "save")
GIB = 2**30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def live_tensor_bytes() -> int:
    """Bytes of all storages reachable from Python tensors, each storage counted once."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@contextmanager
def measured(name: str, results: dict):
    """Record the phase's peak live tensor bytes and peak RSS into `results[name]`."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    entry = live_tensor_bytes()
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield
    seconds = time.perf_counter() - start
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    balance = peak = 0
    for event in events:
        balance += event.nbytes()
        peak = max(peak, balance)
    results[name] = {"live_peak_bytes": entry + peak, "entry_bytes": entry, "rss_peak_bytes": _status_kib("VmHWM") * 1024,
                     "seconds": round(seconds, 1)}
    print(f"{name}: live peak {(entry + peak) / GIB:.2f} GiB (entry {entry / GIB:.2f}), "
          f"RSS peak {_status_kib('VmHWM') / 2**20:.2f} GiB, {seconds:.0f} s", flush=True)


def llama3_config(width: str, layers: int):
    from transformers import LlamaConfig

    from llama_pruning.memory import SHAPES

    shape = SHAPES[width]
    return LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                       intermediate_size=shape["intermediate_size"], num_hidden_layers=layers,
                       num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_key_value_heads"],
                       head_dim=shape["head_dim"], max_position_embeddings=8192, rope_theta=500000.0,
                       tie_word_embeddings=False)


def write_random_model(width: str, layers: int, dtype: torch.dtype, folder: Path) -> None:
    """Random weights (normal 0.02, norms 1) built on the meta device and materialised once, in `dtype`.

    The rotary buffers left empty by `to_empty` are not saved: loading recomputes them."""
    from transformers import LlamaForCausalLM

    config = llama3_config(width, layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.config.name_or_path = f"random-llama3-{width}-{layers}l"
    model.save_pretrained(folder)


def run_phases(args: argparse.Namespace) -> dict:
    """All phases of the default global command in this process, each measured."""
    from llama_pruning.importance import compute_importance
    from llama_pruning.models import load_model
    from llama_pruning.models.export import save_pruned_model
    from llama_pruning.reconstruct import prune_with_reconstruction
    from llama_pruning.selection import global_plan

    torch.set_num_threads(1)
    results: dict = {}
    folder = Path(args.workdir) / "model"
    write_random_model(args.width, args.layer_count, torch.float32, folder)
    gc.collect()
    vocab = llama3_config(args.width, 1).vocab_size
    generator = torch.Generator().manual_seed(0)
    samples = torch.randint(0, vocab, (args.num_samples, args.seq_len), generator=generator)
    recon = torch.randint(0, vocab, (args.reconstruct_samples, args.seq_len), generator=generator)
    with measured("load", results):
        model, _ = load_model(str(folder), dtype="float32", device="cpu")
    with measured("taylor", results):
        table = compute_importance(model, samples, "taylor", gradient_batch_size=args.batch_size, progress=False)
    with measured("selection", results):
        plan, _ = global_plan(model, table, 0.2)
    del table
    with measured("lsq", results):
        prune_with_reconstruction(model, plan, recon, mode="lsq", batch_size=args.batch_size, progress=False)
    with measured("save", results):
        save_pruned_model(model, None, Path(args.workdir) / "pruned", plan=model.pruning_plan)
    return results


def main_run(args: argparse.Namespace) -> None:
    for layers in args.layers:
        workdir = Path(args.workdir) / f"{args.width}-{layers}"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        command = [sys.executable, __file__, "phases", "--width", args.width, "--layer_count", str(layers),
                   "--workdir", str(workdir), "--num_samples", str(args.num_samples), "--seq_len", str(args.seq_len),
                   "--reconstruct_samples", str(args.reconstruct_samples), "--batch_size", str(args.batch_size)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
        out = subprocess.run(command, env=env, capture_output=True, text=True)
        shutil.rmtree(workdir, ignore_errors=True)
        if out.returncode != 0:
            sys.exit(f"k={layers} failed:\n{out.stderr[-3000:]}")
        record = json.loads(out.stdout.strip().splitlines()[-1])
        with RUNS.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def main_phases(args: argparse.Namespace) -> None:
    results = run_phases(args)
    record = {"width": args.width, "layers": args.layer_count, "dtype": "float32", "num_samples": args.num_samples,
              "seq_len": args.seq_len, "reconstruct_samples": args.reconstruct_samples, "batch_size": args.batch_size,
              "load_avg": os.getloadavg()[0], "phases": results}
    print(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "phases"):
        p = sub.add_parser(name)
        p.add_argument("--width", choices=["8b", "70b"], default="8b")
        p.add_argument("--workdir", default="/tmp/llama_pruning_memory")
        p.add_argument("--num_samples", type=int, default=2)
        p.add_argument("--seq_len", type=int, default=128)
        p.add_argument("--reconstruct_samples", type=int, default=2)
        p.add_argument("--batch_size", type=int, default=2)
        if name == "run":
            p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
        else:
            p.add_argument("--layer_count", type=int, required=True)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "run":
        main_run(args)
    elif args.command == "phases":
        main_phases(args)
    else:
        from bench.memory_report import write_report

        write_report(RUNS, HERE / "results_memory.md", HERE / "results_memory.json")


if __name__ == "__main__":
    main()
