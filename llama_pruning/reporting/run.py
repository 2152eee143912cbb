"""The run folder `prune_log/<name>/`: refusal to clobber, a timestamped training.log, description.txt."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from llama_pruning.models.arch import ModelSpec

LOGGER_NAME = "llama_pruning"


class RunExistsError(ValueError):
    """The run name is already used and --overwrite was not given."""


class RunDir:
    """Owns `root/name/`; everything the run prints also goes to `<YYYYMMDD_HHMMSS>/training.log`."""

    def __init__(self, root: str | Path, name: str, overwrite: bool = False):
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"--save_ckpt_log_name must be a plain folder name, got {name!r}")
        self.path = Path(root) / name
        # a folder holding only timestamped logs is a run that failed early: reusing its name is fine
        if self.path.exists() and any(not (p.is_dir() and p.name[:8].isdigit()) for p in self.path.iterdir()):
            if not overwrite:
                raise RunExistsError(
                    f"{self.path} already exists; choose another --save_ckpt_log_name or pass --overwrite"
                )
            for child in self.path.iterdir():
                if not child.name.startswith("."):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.stamp = time.strftime("%Y%m%d_%H%M%S")
        self.log_dir = self.path / self.stamp
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.logger = logging.getLogger(LOGGER_NAME)
        self.logger.setLevel(logging.INFO)
        self._handlers = [logging.FileHandler(self.log_dir / "training.log"), logging.StreamHandler(sys.stdout)]
        for handler in self._handlers:
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            self.logger.addHandler(handler)

    def log(self, message: str) -> None:
        self.logger.info(message)

    def close(self) -> None:
        for handler in self._handlers:
            self.logger.removeHandler(handler)
            handler.close()


def block_counts(layout: list[dict]) -> dict:
    """Layers, attention blocks, heads and MLP channels of a layout (list of per-layer entries)."""
    return {
        "layers": len(layout),
        "attention_blocks": sum(e["num_key_value_heads"] > 0 for e in layout),
        "kv_heads": sum(e["num_key_value_heads"] for e in layout),
        "mlp_blocks": sum(e["intermediate_size"] > 0 for e in layout),
        "mlp_channels": sum(e["intermediate_size"] for e in layout),
    }


def dense_layout(spec: ModelSpec) -> list[dict]:
    return [{"num_key_value_heads": spec.num_kv_heads, "intermediate_size": spec.intermediate_size}] * spec.num_layers


def write_description(path: Path, args: argparse.Namespace, report: dict, spec: ModelSpec, layout: list[dict],
                      metrics: dict) -> None:
    """description.txt: arguments, model, parameters and block counts before/after, measured metrics."""
    before, after = block_counts(dense_layout(spec)), block_counts(layout)
    lines = ["# llama-pruning run", "", "## arguments"]
    lines += [f"{key}: {value}" for key, value in sorted(vars(args).items()) if key != "func"]
    lines += ["", "## model", f"base_model: {args.base_model}", f"model_type: {spec.model_type}",
              f"query heads per KV head (kept in every layer): {spec.n_rep}", "", "## size"]
    pb, pa = report["params_before"], report["params_after"]
    lines.append(f"parameters: {pb:,} -> {pa:,} ({1 - pa / pb:.2%} removed)")
    lb, la = report["layer_params_before"], report["layer_params_after"]
    lines.append(f"decoder-layer parameters: {lb:,} -> {la:,} ({1 - la / lb:.2%} removed)")
    for key in before:
        lines.append(f"{key.replace('_', ' ')}: {before[key]} -> {after[key]}")
    lines.append(f"removed layers (dense indices): {report['removed_layers']}")
    if metrics:
        lines += ["", "## metrics"] + [f"{key}: {value}" for key, value in metrics.items()]
    path.write_text("\n".join(lines) + "\n")
