"""Quality/speed sweep on the embedded SmolLM2-135M: one command reproduces docs/RESULTS.md.

    python -m bench.quality                # full sweep (resumable: finished rows are kept)
    python -m bench.quality --only taylor  # rows whose name contains 'taylor'
    python -m bench.quality --quick        # smoke run: 2 rows, tiny calibration/evaluation (CI)

Every row runs in its own subprocess (clean peak RSS) through the real command line; importance tables
are cached across rows, so a method's importance is computed once per calibration set. Protocol:
calibration 64 x 128 tokens of wiki.valid.tokens (seed 0); wikitext-2 PPL over the first 128 windows of
128 tokens of wiki.test.raw; P20 / P30 / P50 = 20% / 30% / 50% of decoder-layer parameters (0.158 / 0.2369 / 0.3948 of total).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from llama_pruning.importance import METHODS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.jsonl"  # the rows docs/RESULTS.md renders
RATIOS = {"P20": 0.158, "P30": 0.2369}
POINTS = {**RATIOS, "P50": 0.3948}  # P50 (50 % of decoder-layer parameters): the reconstructed rows only


def configurations() -> list[tuple[str, list[str]]]:
    """(row name, CLI arguments) in priority order (the sweep is resumable, so the first rows land first)."""
    def global_row(point: str, method: str, reconstruct: str, *extra: str) -> tuple[str, list[str]]:
        suffix = "" if reconstruct == "none" else f" {reconstruct}"
        suffix += " remove_empty" if "--remove_empty_layers" in extra else ""
        return (f"{point} global {method}{suffix}", ["global", "--pruning_ratio", str(POINTS[point]),
                                                      "--importance_method", method, "--reconstruct", reconstruct, *extra])

    def layer_row(point: str, dist: str, strategy: str) -> tuple[str, list[str]]:
        return (f"{point} layer {dist} {strategy}", ["layer", "--pruning_ratio", str(RATIOS[point]), "--pruning_distribution",
                                                     dist, "--pruning_strategy", strategy, "--reconstruct", "none"])

    def obs_row(point: str, reconstruct: str, *extra: str, fisher: str = "labels") -> tuple[str, list[str]]:
        """An obs row; those of rounds before issue 17's twenty-first weighed by the text's labels' Fisher (spelled out)."""
        return global_row(point, "obs", reconstruct, *extra, "--obs_fisher", fisher)

    def kl_row(point: str, fisher: str, tokens: str = "1") -> list[str]:
        """Rows of rounds before issue 17's twenty-seventh read the head on every token of 128 kl steps (spelled out)."""
        return obs_row(point, "block", "--reconstruct_samples", "384", "--reconstruct_epochs", "1.3333",
                       "--reconstruct_last_loss", "kl", "--reconstruct_kl_tokens", tokens, "--reconstruct_autocast", "bf16",
                       fisher=fisher)[1]

    rows = [global_row(p, "taylor", r) for r in ("lsq", "none") for p in RATIOS]
    # the global command's defaults since issue 17's twenty-seventh round: the twenty-first round's, with the last
    # layer's kl steps twice as many, each reading the head on half the tokens
    rows += [(f"{p} global obs block sampled Fisher kl half-token steps bf16 autocast", kl_row(p, "sampled", "0.5"))
             for p in POINTS]
    # the twenty-first round's defaults: obs weighed by the Fisher of the model's own
    # predictions + block, 128 Adam steps on 384 windows, the last layer's toward the dense next-token distribution,
    # <unk> placeholders out of the fit, the knapsack's cut penalty 1; bf16 where native (this CPU has AVX512-BF16)
    rows += [(f"{p} global obs block sampled Fisher last_loss kl bf16 autocast", kl_row(p, "sampled")) for p in POINTS]
    # obs rows of earlier rounds ran before obs got its cut penalty (issue 17's eighth round): they spell out 0
    rows += [obs_row(p, "lsq", "--cut_penalty", "0") for p in POINTS]
    rows += [global_row("P50", "taylor", "lsq")]
    # the seventeenth round's defaults (obs weighed by the labels' Fisher)
    rows += [(f"{p} global obs block last_loss kl bf16 autocast", kl_row(p, "labels")) for p in POINTS]
    # the tenth round's defaults (the last layer's steps on the squared error like every other layer's); the ninth
    # round's are the same with the placeholders in, the sixth round's also without the penalty
    def default_row(point: str, *extra: str) -> list[str]:
        return obs_row(point, "block", "--reconstruct_samples", "384", "--reconstruct_epochs", "1.3333",
                       "--reconstruct_last_loss", "mse", *extra)[1]

    rows += [(f"{p} global obs block", default_row(p)) for p in POINTS]
    # the default where bfloat16 is native (`auto` picks it there; the rows above ran on a CPU where it keeps float32)
    rows += [(f"{p} global obs block bf16 autocast", default_row(p, "--reconstruct_autocast", "bf16")) for p in POINTS]
    # block rows of earlier rounds ran before block left wikitext-2's <unk> placeholders out of its fit (tenth round)
    rows += [(f"{p} global obs block reconstruct_ignore none", default_row(p, "--reconstruct_ignore", "none"))
             for p in POINTS]
    rows += [(f"{p} global obs block cut_penalty 0", default_row(p, "--cut_penalty", "0", "--reconstruct_ignore", "none"))
             for p in POINTS]
    # the fourth round's defaults: two Adam passes over 256 windows
    rows += [(f"{p} global obs block 256 windows 2 epochs", obs_row(p, "block", "--reconstruct_samples", "256",
                                                                    "--reconstruct_epochs", "2", "--cut_penalty", "0",
                                                                    "--reconstruct_ignore", "none",
                                                                    "--reconstruct_last_loss", "mse")[1])
             for p in POINTS]
    # the same with the solve on the 64 importance windows only (the default solve draws 256)
    rows += [(f"{p} global taylor lsq 64-window solve", global_row(p, "taylor", "lsq", "--reconstruct_samples", "64")[1])
             for p in RATIOS]
    rows += [(f"depth remove_layers {n}", ["layer", "--pruning_ratio", "0", "--remove_layers", str(n), "--reconstruct", "none"])
             for n in (6, 9)]
    rows += [layer_row(p, d, s) for p in RATIOS for d, s in (("2:8", "inverse"), ("2:8", "uniform"), ("0:10", "inverse"))]
    rows += [global_row(p, m, r) for m, r in (("wanda", "none"), ("wanda", "lsq"), ("taylor", "bias"), ("wanda", "bias"))
             for p in RATIOS]
    rows += [global_row(p, m, "none") for m in ("taylor_2nd", "magnitude", "random") for p in RATIOS]
    rows += [global_row(p, m, "none", "--remove_empty_layers") for m in METHODS for p in RATIOS]
    return rows


def run_row(name: str, cli: list[str], args: argparse.Namespace, runs: Path) -> dict:
    """Run one configuration in a subprocess and collect its metrics.json (+ speed of the saved model)."""
    folder = name.replace(" ", "_").replace(":", "-")
    cmd = [sys.executable, "-m", "llama_pruning.cli.main", *cli, "--output_root", str(runs),
           "--save_ckpt_log_name", folder, "--overwrite", "--test_after_prune",
           "--eval_max_windows", str(args.eval_windows), "--num_samples", str(args.num_samples),
           "--seq_len", str(args.seq_len), "--importance_cache", str(runs / ".importance_cache"),
           "--device", args.device]
    if args.speed:
        cmd.append("--save_model")
    if args.quick:
        cmd += ["--reconstruct_samples", str(args.num_samples)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((runs / folder / "metrics.json").read_text())
    row = {"name": name, "args": " ".join(cli), "wall_seconds": round(seconds, 1), "torch threads": torch.get_num_threads(),
           **metrics}
    if args.speed:
        row.update(speed_of(str(runs / folder), args))
        for file in (runs / folder).glob("model*.safetensors"):
            file.unlink()
    return row


def speed_of(source: str, args: argparse.Namespace) -> dict:
    """Speed of a saved row model, timed right after the dense model (each in its own process), so the ratios
    compare two measurements taken under the same machine load."""
    from llama_pruning.evaluation.speed import compare

    report = compare(source, base_model="smollm2-135m", device=args.device, batch_size=1, prefill_len=128,
                     decode_tokens=16, repeats=5)
    pruned, ratios = report["pruned"], report["ratios"]
    return {"prefill_tokens_per_s": pruned["prefill_tokens_per_s"], "decode_tokens_per_s": pruned["decode_tokens_per_s"],
            "linear_macs_per_token": pruned.get("linear_macs_per_token"),
            "prefill ratio to dense": ratios["prefill_tokens_per_s"], "decode ratio to dense": ratios["decode_tokens_per_s"]}


def dense_row(args: argparse.Namespace) -> dict:
    """The unpruned model through the same evaluation (in a subprocess like every other row)."""
    code = (
        "import json, sys\n"
        "from llama_pruning.models import load_model\n"
        "from llama_pruning.models.arch import count_params\n"
        "from llama_pruning.evaluation import PPLMetric\n"
        "from llama_pruning.evaluation.speed import peak_rss_bytes\n"
        f"m, t = load_model('smollm2-135m', device='{args.device}')\n"
        f"ppl = next(iter(PPLMetric(m, t, ['wikitext2'], 128, max_windows={args.eval_windows}).values()))\n"
        "json.dump({'params_after': count_params(m), 'wikitext2 PPL after pruning': ppl,\n"
        "           'peak RSS MiB': peak_rss_bytes() / 2**20}, sys.stdout)\n"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dense failed:\n{proc.stderr[-3000:]}")
    row = {"name": "dense", "args": "", "wall_seconds": round(time.perf_counter() - start, 1),
           **json.loads(proc.stdout.strip().splitlines()[-1])}
    row["params_before"] = row["params_after"]
    row["torch threads"] = torch.get_num_threads()
    if args.speed:
        row.update(speed_of("smollm2-135m", args))  # the dense model against itself: ratios near 1 show the noise
    return row


def load_rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {row["name"]: row for row in map(json.loads, path.read_text().splitlines()) if row}


def current_rows(rows: dict[str, dict], configs: list[tuple[str, list[str]]]) -> tuple[dict[str, dict], list[str]]:
    """The rows to report, in configuration order, and the names left out because their recorded args are not the
    configuration's: a row name kept across a change of its flags would otherwise show a measurement of other flags."""
    wanted = {"dense": ""} | {name: " ".join(cli) for name, cli in configs}
    current = {name: rows[name] for name, args in wanted.items() if name in rows and rows[name]["args"] == args}
    return current, [name for name in wanted if name in rows and name not in current]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rows, 4 x 32 calibration, 2 windows")
    parser.add_argument("--only", default=None, help="run only rows whose name matches this regular expression")
    parser.add_argument("--rerun", action="store_true", help="recompute rows already in the results file")
    parser.add_argument("--no_speed", dest="speed", action="store_false", help="skip the prefill/decode timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, default=None, help="results file (default bench/results.jsonl)")
    parser.add_argument("--report_only", action="store_true",
                        help="only re-render docs/RESULTS.md from the results file (the default one only)")
    args = parser.parse_args(argv)
    os.environ.setdefault("LLAMA_PRUNING_DATA", str(ROOT.parent / "shared" / "data"))
    if args.quick:
        args.num_samples, args.seq_len, args.eval_windows, args.speed = 4, 32, 2, False
        results = args.results or Path(os.environ.get("TMPDIR", "/tmp")) / "llama_pruning_quick.jsonl"
        rows = [r for r in configurations() if r[0] in ("P20 global taylor lsq", "P20 layer 2:8 inverse")]
    else:
        args.num_samples, args.seq_len, args.eval_windows = 64, 128, 128
        results = args.results or RESULTS
        rows = configurations()
    runs = results.parent / (results.stem + "_runs")
    done = {} if args.rerun else load_rows(results)
    todo = [] if args.report_only else [("dense", None)] + rows
    for name, cli in todo:
        if args.only and not re.search(args.only, name):
            continue
        if name in done:
            print(f"{name}: kept from {results}")
            continue
        row = dense_row(args) if cli is None else run_row(name, cli, args, runs)
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{name}: params {row['params_after']:,}  PPL {row.get('wikitext2 PPL after pruning', float('nan')):.2f}  "
              f"{row['wall_seconds']:.0f} s  peak RSS {row['peak RSS MiB']:.0f} MiB", flush=True)
    if args.quick:
        shutil.rmtree(runs, ignore_errors=True)
    elif results.resolve() != RESULTS.resolve():  # a scratch file's rows must not replace the committed table
        print(f"docs/RESULTS.md left as is: it renders {RESULTS.relative_to(ROOT)}, not {results}")
    else:
        from bench.report import write_report

        rows, stale = current_rows(load_rows(results), configurations())
        for name in stale:
            print(f"{name}: left out of the report, its recorded args differ from the configuration's (rerun it with --rerun)")
        # rows from before the thread count was recorded ran with this process's setting (OMP_NUM_THREADS)
        threads = sorted({row.get("torch threads", torch.get_num_threads()) for row in rows.values()})
        machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, {'/'.join(map(str, threads))} torch thread(s), "
                   f"device {args.device}")
        write_report(rows, ROOT / "docs", machine=machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
