"""Render bench/results.jsonl into docs/RESULTS.md and docs/results_p20.png (PPL vs parameters)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PPL = "wikitext2 PPL after pruning"
DENSE_LAYER_PARAMS = 106_202_880  # SmolLM2-135M decoder layers (30 x 3,540,096)

EXTERNAL = """\
| tool, setting | P20 wikitext-2 PPL | P30 wikitext-2 PPL |
|---|---|---|
| dense | 52.1 | 52.1 |
| LLM-Pruner, element-wise Taylor 2nd order (MLP only, layers 3-27) | 83.8 | — |
| LLM-Pruner, element-wise Taylor 1st order | 86.8 | 362.9 |
| LLM-Pruner, vector Taylor / L2 / random | 117.1 / 1115 / 233 | — |
| FLAP (fluctuation metric + bias compensation, MLP only) | 86.8 | — |
| original seed toolkit, global Taylor | 101.8 | — |
| original seed toolkit, layer-wise 2:8 inverse (18.7% of layer params) | 118.4 | — |
| ShortGPT block-influence depth pruning (6 / 9 layers) | 122.4 | 202.0 |
| SliceGPT 25% slicing (only 14.2% of layer params removed) | 132.7 at P14 | — |
| Torch-Pruning LLM recipe (L2 magnitude, no calibration) | ~760,000 | ~620,000 |
"""


def _fmt(value, spec: str = ".1f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def write_report(rows: dict[str, dict], docs: Path, machine: str) -> None:
    """Write the results table, reference rows and notes to docs/RESULTS.md, and the P20 plot."""
    dense = rows.get("dense", {})
    dense_prefill = dense.get("prefill_tokens_per_s")
    lines = [
        "# Results on SmolLM2-135M",
        "",
        "Produced by `python -m bench.quality` (rows kept in `bench/results.jsonl`; rerun rows with `--rerun`).",
        "Calibration: 64 x 128 tokens of `wiki.valid.tokens`, seed 0, for importance and selection; the `lsq` solve",
        "(forward passes only) draws 256 x 128 by default, and the `64-window solve` rows restrict it to the same 64.",
        "PPL: wikitext-2 (`wiki.test.raw`), first 128 windows of 128 tokens. No fine-tuning in any row.",
        "P20 / P30 = 20% / 30% of decoder-layer parameters",
        "(`--pruning_ratio 0.158` / `0.2369` of the total). Seconds = the whole subprocess (load, importance —",
        "cached after the first row of a method —, cut, PPL). Prefill ratio = pruned / dense tokens/s, batch 1 x 128.",
        f"Machine: {machine}.",
        "",
        "| row | params total | layer params removed | wikitext-2 PPL | seconds | peak RSS MiB | prefill speed vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        removed = 1 - row.get("layer_params_after", DENSE_LAYER_PARAMS) / DENSE_LAYER_PARAMS
        prefill = row.get("prefill_tokens_per_s")
        ratio = prefill / dense_prefill if prefill and dense_prefill else None
        lines.append(f"| {name} | {row['params_after']:,} | {removed:.1%} | {_fmt(row.get(PPL), '.2f')} | "
                     f"{_fmt(row.get('wall_seconds'), '.0f')} | {_fmt(row.get('peak RSS MiB'), '.0f')} | {_fmt(ratio, '.2f')} |")
    lines += ["", "## External reference rows (not run here)", "",
              "Measured by the issue authors on this model with the same calibration and evaluation protocol, using",
              "each tool's public code patched only to run on CPU. Quoted, not reproduced.", "", EXTERNAL]
    notes = docs / "RESULTS_NOTES.md"
    if notes.is_file():
        lines += [notes.read_text()]
    (docs / "RESULTS.md").write_text("\n".join(lines) + "\n")
    _plot(rows, docs / "results_p20.png")


def _plot(rows: dict[str, dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, row in rows.items():
        if row.get(PPL) is None or not (name == "dense" or name.startswith(("P20", "P30", "depth"))):
            continue
        marker = "*" if name == "dense" else ("s" if "layer" in name or "depth" in name else "o")
        ax.scatter(row["params_after"] / 1e6, row[PPL], marker=marker, s=60 if marker == "*" else 30)
        ax.annotate(name, (row["params_after"] / 1e6, row[PPL]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("wikitext-2 PPL (log)")
    ax.set_title("SmolLM2-135M: perplexity vs size, no fine-tuning")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
