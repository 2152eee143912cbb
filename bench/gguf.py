"""Benchmark: the P20 / P30 default pruned SmolLM2-135M and the dense model as GGUF files, run by llama.cpp.

    python -m bench.gguf                                  # -> bench/results_gguf.md
    python -m bench.gguf --types f16,q8_0 --ppl_windows 32

P20 / P30 = `global --pruning_ratio 0.158 / 0.2369 --reconstruct lsq --round_to 32` (the defaults of
bench/quality.py, MLP widths rounded for 32-element quant blocks), pruned into --runs when missing.
Each type is exported for the dense and the pruned model (k-quants with --allow_fallback: the tensor
counts show what fell back). Speed: llama.cpp through llama-cpp-python, single-threaded, prefill of one
128-token wikitext-2 window and 32 single-token decode steps over the next window's tokens; the pruned and the dense file are
loaded in the same process and timed alternately, best of --repeats. PPL: llama.cpp's logits (default
F16 KV cache) on the first --ppl_windows windows of 128 tokens of wiki.test.raw, the protocol of
docs/RESULTS.md; `HF PPL` is our float32 model on the same windows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from llama_pruning.cli.gguf_cmd import export_saved_model, format_counts
from llama_pruning.data import load_text, split_windows, tokenize_text
from llama_pruning.evaluation.ppl import window_perplexity
from llama_pruning.evaluation.speed import model_profile
from llama_pruning.models import DEFAULT_MODEL, load_model
from llama_pruning.models.gguf_export import LLAMA_CPP_TYPES, tensor_type_counts

ROOT = Path(__file__).resolve().parents[1]
POINTS = {"P20": 0.158, "P30": 0.2369}
PROMPT, DECODE = 128, 32


def prune(runs: Path, name: str, ratio: float) -> Path:
    """The pruned model folder, made with the command line when missing."""
    folder = runs / name
    if not (folder / "config.json").is_file():
        cmd = [sys.executable, "-m", "llama_pruning.cli.main", "global", "--pruning_ratio", str(ratio), "--reconstruct",
               "lsq", "--round_to", "32", "--save_model", "--output_root", str(runs), "--save_ckpt_log_name", name,
               "--overwrite", "--device", "cpu"]
        subprocess.run(cmd, cwd=ROOT, check=True)
    return folder


def llama(path: Path, logits_all: bool = False):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=PROMPT + DECODE, n_batch=PROMPT, n_threads=1, n_threads_batch=1,
                           logits_all=logits_all, verbose=False)


def timings(llm, prompt: list[int], continuation: list[int]) -> tuple[float, float]:
    """(prefill seconds for the prompt, seconds per single-token decode step over `continuation`) of one run."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for token in continuation:
        llm.eval([token])
    return prefill, (time.perf_counter() - start) / len(continuation)


def paired_speed(pruned: Path, dense: Path, tokens: list[int], repeats: int) -> dict:
    """Best prefill / decode times of both files, measured alternately in this process."""
    models = {"pruned": llama(pruned), "dense": llama(dense)}
    best = {k: [math.inf, math.inf] for k in models}
    for _ in range(repeats):
        for key, llm in models.items():
            p, d = timings(llm, tokens[:PROMPT], tokens[PROMPT:PROMPT + DECODE])
            best[key] = [min(best[key][0], p), min(best[key][1], d)]
    return best


def llama_cpp_ppl(path: Path, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) from llama.cpp's logits, one fresh context per window."""
    llm = llama(path, logits_all=True)
    total, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= logp[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    return math.exp(total / count)


def prefill_macs(model, length: int) -> float:
    """Prefill MACs per token: every linear plus attention over the causal average of (L + 1) / 2 keys."""
    profile = model_profile(model, length)
    return profile["linear_macs_per_token"] + profile["attention_macs_per_token"] / length * (length + 1) / 2


def export(folder: str, name: str, outtype: str, runs: Path) -> dict:
    """The GGUF file of one model and type (reused when already in --runs): path, MiB, tensors per type."""
    out = runs / f"{name}-{outtype}.gguf"
    path, counts = (out, tensor_type_counts(out)) if out.is_file() else export_saved_model(
        folder, outtype, out, allow_fallback=outtype in LLAMA_CPP_TYPES)
    print(f"{name} {outtype}: {path.stat().st_size / 2**20:.1f} MiB, {format_counts(counts)}", flush=True)
    return {"path": str(path), "mib": path.stat().st_size / 2**20, "counts": counts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "prune_log" / "bench_gguf",
                        help="pruned models, GGUF files and the rows measured so far (rerun per point to add rows)")
    parser.add_argument("--points", default="P20,P30")
    parser.add_argument("--types", default="f16,q8_0,q4_1,q4_k_m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ppl_windows", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results_gguf.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    store = args.runs / "gguf_rows.json"
    rows = json.loads(store.read_text()) if store.is_file() else []
    dense_model, tokenizer = load_model(DEFAULT_MODEL, device="cpu")
    windows = split_windows(tokenize_text(tokenizer, load_text("wikitext2", "evaluation").text), PROMPT, args.ppl_windows)
    tokens = windows[:2].flatten().tolist()  # prompt, then the decoded continuation
    dense_hf = {"ppl": window_perplexity(dense_model, windows, desc="HF dense"), "macs": prefill_macs(dense_model, PROMPT)}
    measured: dict[str, float] = {}  # llama.cpp PPL per GGUF file: the dense files are shared by every point
    for name in args.points.split(","):
        folder = str(prune(args.runs, name, POINTS[name]))
        model = load_model(folder, device="cpu")[0]
        hf = {"dense": dense_hf, name: {"ppl": window_perplexity(model, windows, desc=f"HF {name}"),
                                        "macs": prefill_macs(model, PROMPT)}}
        for outtype in args.types.split(","):
            files = {"dense": export(DEFAULT_MODEL, "dense", outtype, args.runs), name: export(folder, name, outtype, args.runs)}
            for f in files.values():
                if f["path"] not in measured:
                    measured[f["path"]] = llama_cpp_ppl(Path(f["path"]), windows)
            ppl = {who: measured[f["path"]] for who, f in files.items()}
            speed = paired_speed(Path(files[name]["path"]), Path(files["dense"]["path"]), tokens, args.repeats)
            row = {"type": outtype, "model": name, "files": files, "ppl": ppl, "speed": speed, "hf": hf,
                   "ppl_windows": args.ppl_windows, "repeats": args.repeats, "load": os.getloadavg()[0]}
            rows = [r for r in rows if (r["type"], r["model"]) != (outtype, name)] + [row]
            store.write_text(json.dumps(rows, indent=1))
            print(row["speed"], ppl, flush=True)
    args.out.write_text(report(rows))
    print(f"written {args.out}")


def report(rows: list[dict]) -> str:
    """The markdown table: each pruned row next to the dense file timed in the same process."""
    loads = [r["load"] for r in rows]
    lines = [
        "# GGUF benchmark: pruned SmolLM2-135M in llama.cpp", "",
        "`python -m bench.gguf` (" + __doc__.split("\n\n")[2].strip().replace("\n", " ") + ")", "",
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs, load average {min(loads):.1f}-{max(loads):.1f} "
        "during the rows (absolute speeds are noisy, the paired ratios less so). llama.cpp single-threaded. "
        f"PPL windows: {sorted({r['ppl_windows'] for r in rows})} x 128 tokens; best of {sorted({r['repeats'] for r in rows})} "
        "timed runs.", "",
        "| type | model | file MiB | tensors per type | prefill tok/s | decode tok/s | prefill speed-up | MACs ratio "
        "| >= 0.9 x MACs | llama.cpp PPL | HF float32 PPL | PPL vs HF |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {t: i for i, t in enumerate(dict.fromkeys(r["type"] for r in rows))}
    for row in sorted(rows, key=lambda r: (order[r["type"]], r["model"])):
        name, speed, hf = row["model"], row["speed"], row["hf"]
        macs = hf["dense"]["macs"] / hf[name]["macs"]
        speedup = speed["dense"][0] / speed["pruned"][0]
        for who, key in (("dense", "dense"), (name, "pruned")):
            f = row["files"][who]
            pruned = who != "dense"
            lines.append(
                f"| {row['type']} | {who} | {f['mib']:.1f} | {format_counts(f['counts'])} | {PROMPT / speed[key][0]:.0f} "
                f"| {1 / speed[key][1]:.1f} | {f'{speedup:.2f}' if pruned else ''} | {f'{macs:.3f}' if pruned else ''} "
                f"| {('yes' if speedup >= 0.9 * macs else 'no') if pruned else ''} | {row['ppl'][who]:.2f} "
                f"| {hf[who]['ppl']:.2f} | {row['ppl'][who] / hf[who]['ppl'] - 1:+.2%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
