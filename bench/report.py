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
    dense_macs = dense.get("linear_macs_per_token")
    lines = [
        "# Results on SmolLM2-135M",
        "",
        "Produced by `python -m bench.quality` (rows kept in `bench/results.jsonl`; rerun rows with `--rerun`).",
        "Calibration: 64 x 128 tokens of `wiki.valid.tokens`, seed 0, for importance and selection; the `lsq` solve",
        "(forward passes only) draws 256 x 128 by default, and the `64-window solve` rows restrict it to the same 64.",
        "PPL: wikitext-2 (`wiki.test.raw`), first 128 windows of 128 tokens. No fine-tuning in any row.",
        "P20 / P30 = 20% / 30% of decoder-layer parameters",
        "(`--pruning_ratio 0.158` / `0.2369` of the total). Pruning s = the command's pruning phase (load, importance,",
        "selection, cut and reconstruction); importance is cached, so only the first row of a method pays for it.",
        "Total s = the whole subprocess (adds PPL). MACs = linear multiply-accumulates per token, pruned / dense",
        "(exact); prefill = pruned / dense tokens/s, batch 1 x 128, fastest of 5 runs, the dense model timed right",
        "after each row's model (rows without that pairing are divided by the dense row's speed).",
        f"Machine: {machine}.",
        "",
        "| row | params total | layer params removed | wikitext-2 PPL | pruning s | total s | peak RSS MiB "
        "| MACs vs dense | prefill vs dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        layer_params = DENSE_LAYER_PARAMS if name == "dense" else row.get("layer_params_after")
        removed = None if layer_params is None else 1 - layer_params / DENSE_LAYER_PARAMS
        prefill = row.get("prefill_tokens_per_s")
        ratio = row.get("prefill ratio to dense") or (prefill / dense_prefill if prefill and dense_prefill else None)
        macs = row.get("linear_macs_per_token")
        macs_ratio = macs / dense_macs if macs and dense_macs else None
        cells = [name, f"{row['params_after']:,}", _fmt(removed, ".1%"), _fmt(row.get(PPL), ".2f"),
                 _fmt(row.get("pruning seconds"), ".0f"), _fmt(row.get("wall_seconds"), ".0f"),
                 _fmt(row.get("peak RSS MiB"), ".0f"), _fmt(macs_ratio, ".3f"), _fmt(ratio, ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## External reference rows (not run here)", "",
              "Measured by the issue authors on this model with the same calibration and evaluation protocol, using",
              "each tool's public code patched only to run on CPU. Quoted, not reproduced.", "", EXTERNAL]
    notes = docs / "RESULTS_NOTES.md"
    if notes.is_file():
        lines += [notes.read_text()]
    (docs / "RESULTS.md").write_text("\n".join(lines) + "\n")
    _plot(rows, docs / "results_p20.png")


# best external reference rows at each operating point (quoted from EXTERNAL; plotted for comparison)
REFERENCES = {"LLM-Pruner el. Taylor 2nd (ref.)": {"P20": 83.8},
              "LLM-Pruner el. Taylor 1st (ref.)": {"P20": 86.8, "P30": 362.9},
              "ShortGPT 6 / 9 layers (ref.)": {"P20": 122.4, "P30": 202.0}}
PLOT_CEILING = 2000.0  # rows above this PPL are listed as off scale instead of squashing the useful range


def _family(name: str) -> tuple[str, str]:
    """('P20' | 'P30', method family) of a row name; depth rows map 6 layers to P20 and 9 to P30."""
    if name.startswith("depth"):
        return ("P20" if name.endswith(" 6") else "P30"), "depth (block influence)"
    point, _, family = name.partition(" ")
    return point, family


def _plot(rows: dict[str, dict], path: Path) -> None:
    """PPL vs parameters: one line per method from its P20 to its P30 point, references as crosses."""
    fig, ax = plt.subplots(figsize=(11, 6))
    families: dict[str, dict[str, tuple[float, float]]] = {}
    for name, row in rows.items():
        if name != "dense" and row.get(PPL) is not None:
            point, family = _family(name)
            families.setdefault(family, {})[point] = (row["params_after"] / 1e6, row[PPL])
    params = {point: x for points in families.values() for point, (x, _) in points.items()}  # where references sit
    colors = plt.get_cmap("tab20").colors
    off_scale = []
    for i, (family, points) in enumerate(sorted(families.items(), key=lambda item: min(v[1] for v in item[1].values()))):
        if min(ppl for _, ppl in points.values()) > PLOT_CEILING:
            off_scale.append(family)
            continue
        xs, ys = zip(*(points[p] for p in ("P20", "P30") if p in points), strict=True)
        marker = "s" if family.startswith(("layer", "depth")) else "o"
        ax.plot(xs, ys, marker=marker, color=colors[i % len(colors)], label=family, linewidth=1, markersize=5)
    for j, (label, values) in enumerate(REFERENCES.items()):
        xs, ys = zip(*((params[p], v) for p, v in values.items() if p in params), strict=True)
        ax.plot(xs, ys, "x--", color=str(0.15 + 0.25 * j), label=label, markersize=8, linewidth=0.8)
    if "dense" in rows:
        ax.scatter(rows["dense"]["params_after"] / 1e6, rows["dense"][PPL], marker="*", s=120, color="black", label="dense")
    if off_scale:
        ax.text(0.01, 0.98, f"off scale (PPL > {PLOT_CEILING:,.0f}): " + ", ".join(off_scale), transform=ax.transAxes,
                fontsize=7, va="top")
    ax.set_yscale("log")
    ax.set_ylim(top=PLOT_CEILING)
    ax.set_xlabel("parameters (M)  —  P30 ≈ 102.6 M, P20 ≈ 113.3 M, dense 134.5 M")
    ax.set_ylabel("wikitext-2 PPL (log)")
    ax.set_title("SmolLM2-135M: perplexity vs size, no fine-tuning (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
