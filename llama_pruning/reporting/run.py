"""The run folder `prune_log/<name>/`: refusal to clobber, swap-in when finished, a timestamped training.log,
description.txt."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from llama_pruning import atomic
from llama_pruning.models.arch import ModelSpec

LOGGER_NAME = "llama_pruning"


class RunExistsError(ValueError):
    """The run name is already used and --overwrite was not given."""


RUN_FILES = ("description.txt", "pruning_plan.json", "metrics.json")  # what every finished run folder holds


def _is_stamp(path: Path) -> bool:
    """A run's `<YYYYMMDD_HHMMSS>/` log folder."""
    return path.is_dir() and path.name[:8].isdigit()


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` was written by a pruning run (finished, or failed early with only its log)."""
    return (any((folder / name).is_file() for name in RUN_FILES)
            or any(_is_stamp(p) and (p / "training.log").is_file() for p in folder.iterdir()))


class RunDir:
    """Owns `root/name/`; everything the run prints also goes to `<YYYYMMDD_HHMMSS>/training.log`.

    The run writes into a temporary sibling (`path`) that `commit` swaps in place of `final` once every
    output exists, so an earlier run of the same name survives any failing rerun. A failed run keeps only
    its log, in `root/<name>.failed-<YYYYMMDD_HHMMSS>/`; a killed run leaves a temporary folder that the next
    run in `root` removes (with a log line).
    """

    @staticmethod
    def check(root: str | Path, name: str, overwrite: bool = False) -> Path:
        """The run's final folder; ValueError for a bad name or one already used without `overwrite` (checked first)."""
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"--save_ckpt_log_name must be a plain folder name, got {name!r}")
        if Path(root).exists() and not Path(root).is_dir():
            raise ValueError(f"--output_root {root} is a file, not a folder")
        final = Path(root) / name
        if final.is_symlink() or (final.exists() and not final.is_dir()):
            raise RunExistsError(f"{final} exists and is not a folder; choose another --save_ckpt_log_name")
        # only a folder a run wrote is ever replaced, and without --overwrite only one that failed early (logs alone)
        if final.is_dir() and any(final.iterdir()) and not is_run_folder(final):
            raise RunExistsError(f"{final} holds files but no llama-pruning run (none of {', '.join(RUN_FILES)}, no "
                                 "training log), and a run replaces only runs: choose another --save_ckpt_log_name or "
                                 "--output_root")
        if final.is_dir() and not overwrite and any(not _is_stamp(p) for p in final.iterdir()):
            raise RunExistsError(f"{final} already exists; choose another --save_ckpt_log_name or pass --overwrite")
        return final

    def __init__(self, root: str | Path, name: str, overwrite: bool = False):
        self.final = self.check(root, name, overwrite)
        self.stamp = time.strftime("%Y%m%d_%H%M%S")
        cleaned: list[str] = []
        atomic.remove_stale(root, cleaned.append)
        self.path = atomic.temp_sibling(self.final, directory=True)
        self.log_dir = self.path / self.stamp
        self.log_dir.mkdir()
        self.logger = logging.getLogger(LOGGER_NAME)
        self.logger.setLevel(logging.INFO)
        self._handlers = [logging.FileHandler(self.log_dir / "training.log"), logging.StreamHandler(sys.stdout)]
        for handler in self._handlers:
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            self.logger.addHandler(handler)
        for line in cleaned:
            self.log(line)

    def log(self, message: str) -> None:
        self.logger.info(message)

    def check_space(self, needed_bytes: int) -> None:
        """Refuse to go on when the disk cannot hold the new run next to the earlier one (kept until commit)."""
        free = shutil.disk_usage(self.path).free
        if free < needed_bytes:
            raise OSError(f"not enough disk space in {self.path.parent}: the run needs about "
                          f"{needed_bytes / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB are free")

    def commit(self) -> None:
        """Put the finished run in place of `final`; an earlier run there is deleted only now."""
        if self.final.is_dir():
            self.log(f"replacing the earlier run in {self.final}")
        atomic.replace(self.path, self.final)
        self.path, self.log_dir = self.final, self.final / self.stamp

    def fail(self) -> Path:
        """Keep only the log of a failed run, out of the way in `root/<name>.failed-<stamp>/`; returns that folder."""
        if self.path == self.final:  # already committed: the outputs are complete and stay
            return self.final
        for child in self.path.iterdir():
            if child != self.log_dir:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        failed = self.final.parent / f"{self.final.name}.failed-{self.stamp}"
        atomic.replace(self.path, failed)
        self.path, self.log_dir = failed, failed / self.stamp
        return failed

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
    lines += [f"{key}: {value}" for key, value in sorted(vars(args).items()) if key not in ("func", "run_path")]
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
    atomic.write_text(path, "\n".join(lines) + "\n")
