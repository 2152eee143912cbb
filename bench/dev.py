"""The dev split on which pruning defaults are chosen, never the wikitext-2 test split (docs/RESULTS_NOTES.md).

    python -m bench.dev split                              # (re)write bench/dev_split.json
    python -m bench.dev run NAME --point P20 --seeds 0 1 2 -- [flags of `llama-pruning global`]
    python -m bench.dev report                             # bench/results_dev.md from bench/results_dev.jsonl

Dev windows: the 128-token windows of wiki.valid.tokens (the calibration file, tokenized as calibration
tokenizes it) that no calibration draw of seeds 0-2 uses, up to 512 samples; the file is not cut, so
calibration is unchanged. Dev PPL: the evaluation protocol's PPL over 128 of them spread evenly through
the file. Two more figures, because the test text differs from the calibration file in two ways (RESULTS_NOTES):
clean dev PPL leaves out the targets that are pieces of the file's `<unk>` placeholders (13 % of its tokens; the raw
test text has none), and copy NLL is the mean NLL of the 2nd-4th copy of 64 shuffled 32-token dev snippets repeated
4 times (in-context copying, which repeated rare names in the test text need and `<unk>` text barely exercises).
Each run is the real `global` command in a subprocess (its defaults unless flags are given)
with calibration seed s; its saved model is scored on the dev windows, then deleted.
A run whose calibration draws more than 512 windows (or `--dev_draw N`) is scored on another 128 windows,
spread evenly over those no seed draws within that many: its row names the draw, and it compares only with
rows scored the same way. A run whose own draw would hold a scored window is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.quality import POINTS as RATIOS  # 20 / 30 / 50 % of SmolLM2's decoder-layer parameters

ROOT = Path(__file__).resolve().parents[1]
SPLIT = ROOT / "bench" / "dev_split.json"
RESULTS = ROOT / "bench" / "results_dev.jsonl"
CACHE = ROOT / "bench" / "results_dev_runs" / ".importance_cache"
SEQ_LEN, SEEDS, MAX_SAMPLES, EVAL_WINDOWS = 128, (0, 1, 2), 512, 128
PLACEHOLDER, COPY_SNIPPETS, COPY_LEN, COPIES = "<unk>", 64, 32, 4


def calibration_windows(tokenizer) -> torch.Tensor:
    """Every 128-token window of the calibration text, as `get_calibration_samples` cuts it."""
    from llama_pruning.data import load_text, split_windows, tokenize_text

    return split_windows(tokenize_text(tokenizer, load_text("wikitext2", "calibration").text), SEQ_LEN)


def windows_sha256(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.numpy().astype("<i8").tobytes()).hexdigest()


def _split(windows: torch.Tensor, draw: int) -> tuple[list[int], list[int]]:
    """Dev window indices (those no seed in SEEDS draws within `draw` windows) and the evenly spread ones scored."""
    from llama_pruning.data import calibration_indices

    used = set().union(*(calibration_indices(windows, draw, seed) for seed in SEEDS))
    dev = [i for i in range(len(windows)) if i not in used]
    if len(dev) < EVAL_WINDOWS:
        raise SystemExit(f"bench.dev: draws of {draw} windows leave {len(dev)} dev windows, fewer than {EVAL_WINDOWS}")
    step = len(dev) / EVAL_WINDOWS
    return dev, [dev[int(k * step)] for k in range(EVAL_WINDOWS)]


def make_split(tokenizer) -> dict:
    """The committed split: dev windows outside every draw of MAX_SAMPLES, and the 128 of them scored."""
    windows = calibration_windows(tokenizer)
    dev, scored = _split(windows, MAX_SAMPLES)
    return {"text": "wikitext2 calibration split (wiki.valid.tokens)", "tokenizer": "smollm2-135m", "seq_len": SEQ_LEN,
            "windows": len(windows), "excluded_seeds": list(SEEDS), "excluded_samples": MAX_SAMPLES,
            "dev": dev, "scored": scored, "scored_sha256": windows_sha256(windows[scored])}


def dev_windows(windows: torch.Tensor, draw: int = MAX_SAMPLES) -> tuple[torch.Tensor, list[int]]:
    """The scored dev windows (tokens, indices) among the calibration `windows`, outside every seed's draw of `draw`
    windows; the committed ones (checked against their recorded token hash) up to MAX_SAMPLES."""
    if draw > MAX_SAMPLES:
        scored = _split(windows, draw)[1]
        return windows[scored], scored
    split = json.loads(SPLIT.read_text())
    if windows_sha256(windows[split["scored"]]) != split["scored_sha256"]:
        raise SystemExit(f"{SPLIT}: the dev windows' tokens changed (another text or tokenizer?)")
    return windows[split["scored"]], split["scored"]


def calibration_draw(flags: list[str]) -> int:
    """Windows of wikitext-2's calibration file a `global` run with `flags` draws: its importance's or its
    reconstruction's, whichever is more (both are prefixes of its seed's permutation); 0 for another dataset."""
    from llama_pruning.cli.main import build_parser
    from llama_pruning.options import reconstruct_windows

    args = build_parser("global").parse_args(["--pruning_ratio", "0.2", *flags])
    if args.dataset != "wikitext2":
        return 0
    solve = 0 if args.reconstruct == "none" else reconstruct_windows(args.reconstruct, args.reconstruct_samples,
                                                                      args.num_samples)
    return max(args.num_samples, solve)


def check_disjoint(windows: torch.Tensor, scored: list[int], draw: int, seeds: list[int]) -> None:
    """Refuse (one line) a run whose draw of `draw` calibration `windows` at one of `seeds` holds a scored window."""
    from llama_pruning.data import calibration_indices

    for seed in seeds:
        seen = set(calibration_indices(windows, draw, seed)).intersection(scored)
        if seen:
            raise SystemExit(f"bench.dev: seed {seed}'s calibration ({draw} windows) holds {len(seen)} of the "
                             f"{len(scored)} scored dev windows; use seeds {list(SEEDS)} (larger draws are scored "
                             "outside them by themselves)")


def copy_snippets(windows: torch.Tensor) -> torch.Tensor:
    """COPY_SNIPPETS rows of COPY_LEN shuffled dev tokens, each repeated COPIES times (fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    base = windows[:COPY_SNIPPETS, :COPY_LEN]
    shuffled = torch.stack([row[torch.randperm(COPY_LEN, generator=generator)] for row in base])
    return shuffled.repeat(1, COPIES)


def dev_scores(model, windows: torch.Tensor, placeholders: torch.Tensor) -> dict:
    """Dev PPL, clean dev PPL (targets outside placeholders) and copy NLL (targets in copies 2..COPIES)."""
    from llama_pruning.evaluation import window_nll

    nll = window_nll(model, windows, device="cpu", desc="dev")
    copies = window_nll(model, copy_snippets(windows), device="cpu", desc="copies")[:, COPY_LEN - 1:]
    return {"dev PPL": round(math.exp(nll.mean().item()), 4),
            "clean dev PPL": round(math.exp(nll[~placeholders[:, 1:]].mean().item()), 4),
            "copy NLL": round(copies.mean().item(), 4)}


def run_seed(name: str, point: str, seed: int, flags: list[str], windows: torch.Tensor,
             placeholders: torch.Tensor, draw: int = MAX_SAMPLES) -> dict:
    """One `global` run at calibration `seed`, scored on the dev windows (those outside every seed's draw of `draw`)."""
    from llama_pruning.models import load_model

    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE.parent) as root:
        cmd = [sys.executable, "-m", "llama_pruning.cli.main", "global", "--pruning_ratio", str(RATIOS[point]),
               "--seed", str(seed), "--output_root", root, "--save_ckpt_log_name", "run", "--save_model",
               "--importance_cache", str(CACHE), *flags]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads((Path(root) / "run" / "metrics.json").read_text())
        model, _ = load_model(str(Path(root) / "run"), device="cpu")
        scores = dev_scores(model, windows, placeholders)
    scored_on = {} if draw <= MAX_SAMPLES else {"dev draw": draw}
    return {"name": name, "point": point, "seed": seed, "flags": " ".join(flags), **scored_on, **scores,
            "params_after": metrics["params_after"], "pruning seconds": metrics["pruning seconds"],
            "peak RSS MiB": metrics["peak RSS MiB"], "torch threads": int(os.environ.get("OMP_NUM_THREADS", "0")),
            "load average": round(os.getloadavg()[0], 1)}


def _mean(group: list[dict], key: str, digits: int) -> str:
    """Mean of `key` over the rows that have it ('—' when none does: rows recorded before it existed)."""
    values = [r[key] for r in group if r.get(key) is not None]
    return f"{statistics.mean(values):.{digits}f}" if values else "—"


def report(rows: list[dict]) -> str:
    """Mean dev PPL over seeds per (name, point), with the spread, the other dev scores, seconds and memory."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        name = row["name"]
        if "dev draw" in row:
            name += f" [scored outside every {row['dev draw']}-window draw]"
        if row.get("dev overlap"):
            name += " [its calibration held some of the scored windows: not a dev figure]"
        groups.setdefault((row["point"], name), []).append(row)
    lines = ["# Dev-split rows (never the test split)", "",
             f"Generated by `python -m bench.dev report` from {RESULTS.name}; protocol in bench/dev.py and "
             "docs/RESULTS_NOTES.md. PPL: mean over calibration seeds (min-max in brackets); clean dev PPL and copy "
             "NLL (bench/dev.py) exist from issue 17's ninth round on. Flags are as given when "
             "the row ran: rows without `--cut_penalty` ran with 0, the default before issue 17's eighth round "
             "(`auto`, 1 for obs, since). Rows scored outside larger draws compare only with each other; rows marked "
             "not a dev figure drew scored windows into their calibration (`dev overlap` in the jsonl: how many).", "",
             "| point | row | flags | seeds | dev PPL | clean dev PPL | copy NLL | pruning s | peak RSS MiB | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (point, name), group in sorted(groups.items()):
        ppls = [r["dev PPL"] for r in group]
        spread = f" [{min(ppls):.2f}-{max(ppls):.2f}]" if len(group) > 1 else ""
        lines.append(f"| {point} | {name} | {group[0]['flags'] or '(defaults)'} | {','.join(str(r['seed']) for r in group)} | "
                     f"{statistics.mean(ppls):.2f}{spread} | {_mean(group, 'clean dev PPL', 2)} | "
                     f"{_mean(group, 'copy NLL', 3)} | {statistics.mean(r['pruning seconds'] for r in group):.0f} | "
                     f"{max(r['peak RSS MiB'] for r in group):.0f} | {max(r['load average'] for r in group)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["split", "run", "report"])
    parser.add_argument("name", nargs="?", help="row name (run)")
    parser.add_argument("--point", choices=RATIOS, default="P20")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--dev_draw", type=int, default=MAX_SAMPLES,
                        help="score outside every seed's draw of this many windows (at least the run's own draw)")
    args = parser.parse_args(argv)
    if args.action == "report":
        rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line]
        (ROOT / "bench" / "results_dev.md").write_text(report(rows))
        return 0
    from transformers import AutoTokenizer

    from llama_pruning.data import text_mask
    from llama_pruning.models.loading import smollm2_hf_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir())  # the tokenizer alone, not the model
    if args.action == "split":
        SPLIT.write_text(json.dumps(make_split(tokenizer)) + "\n")
        return 0
    if not args.name:
        parser.error("run needs a row NAME")
    own = calibration_draw(flags)
    draw = max(args.dev_draw, own, MAX_SAMPLES)
    every = calibration_windows(tokenizer)  # tokenized once for the split and the check
    windows, scored = dev_windows(every, draw)
    check_disjoint(every, scored, own, args.seeds)
    placeholders = text_mask(tokenizer, windows, PLACEHOLDER)
    for seed in args.seeds:
        row = run_seed(args.name, args.point, seed, flags, windows, placeholders, draw)
        with RESULTS.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
