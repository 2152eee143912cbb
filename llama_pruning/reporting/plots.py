"""pruning_strategy.png: what was kept in each layer, readable at a glance."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llama_pruning.plan import PruningPlan  # noqa: E402


def plot_pruning_strategy(plan: PruningPlan, report: dict, path: str | Path, title: str,
                          layer_scores: list[float] | None = None, layer_score_label: str = "layer importance") -> None:
    """Per layer: kept attention groups and MLP channels (fraction), parameters before/after, layer importance."""
    spec = plan.model_spec()
    layers = list(range(plan.num_layers))
    rows = 3 if layer_scores is not None else 2
    fig, axes = plt.subplots(rows, 1, figsize=(max(8, plan.num_layers * 0.35), 2.6 * rows), sharex=True)
    ax = axes[0]
    width = 0.4
    attn = [len(g) / spec.num_kv_heads for g in plan.attn_groups]
    mlp = [len(c) / spec.intermediate_size for c in plan.mlp_channels]
    ax.bar([i - width / 2 for i in layers], attn, width, label=f"attention groups kept (of {spec.num_kv_heads})")
    ax.bar([i + width / 2 for i in layers], mlp, width, label=f"MLP channels kept (of {spec.intermediate_size})")
    for i in plan.removed_layers:
        ax.axvspan(i - 0.5, i + 0.5, color="red", alpha=0.15)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction kept")
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
    ax.set_title(title)
    ax = axes[1]
    ax.plot(layers, [r["params_before"] / 1e6 for r in report["layers"]], "k--", label="before")
    ax.bar(layers, [r["params_after"] / 1e6 for r in report["layers"]], color="tab:green", label="after")
    ax.set_ylabel("parameters (M)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
    if layer_scores is not None:
        axes[2].plot(layers, layer_scores, "o-", color="tab:purple")
        axes[2].set_ylabel(layer_score_label)
    axes[-1].set_xlabel("layer (red: deleted)" if plan.removed_layers else "layer")
    axes[-1].set_xticks(layers)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
