"""`llama-pruning export-gguf RUN_OR_MODEL_DIR`: write a GGUF file that llama.cpp, Ollama and LM Studio load."""

from __future__ import annotations

import argparse
from pathlib import Path

from llama_pruning.options import DEFAULT_MODEL, DEFAULT_OUTTYPE, GGUF_WRITER_TYPES, OUTTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the export-gguf command."""
    parser.add_argument("model", metavar="RUN_OR_MODEL_DIR",
                        help=f"run folder pruned with --save_model, a saved model folder, {DEFAULT_MODEL} or an HF id")
    parser.add_argument("--outtype", default=DEFAULT_OUTTYPE, choices=OUTTYPES,
                        help=f"tensor type: {', '.join(GGUF_WRITER_TYPES)} are written by the gguf package; k-quants "
                             "(q4_k_m...) by llama.cpp's quantizer (pip install 'llama-pruning[gguf]')")
    parser.add_argument("--out", type=Path, default=None,
                        help="output file (default: model-<outtype>.gguf in a model folder; for an alias or HF id "
                             "<name with / as -->-<outtype>.gguf in the current folder)")
    parser.add_argument("--allow_fallback", action="store_true",
                        help="write quantized types even where pruned widths fall back to a wider type than the dense model's")


def source_gguf(base_model: str) -> Path | None:
    """The GGUF a base model was loaded from (its tokenizer metadata is copied verbatim), if any."""
    from llama_pruning.models.loading import SMOLLM2_GGUF, smollm2_dir

    return smollm2_dir() / SMOLLM2_GGUF if base_model == DEFAULT_MODEL else None


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))


def export_saved_model(model_ref: str, outtype: str, out: Path | None, allow_fallback: bool = False) -> tuple[Path, dict]:
    """Load a saved (pruned) model folder, an alias or an HF id and export it; returns (file, tensors per type)."""
    from llama_pruning.atomic import check_file_target
    from llama_pruning.models.gguf_export import check_outtype, export_gguf
    from llama_pruning.models.loading import load_model
    from llama_pruning.plan import PLAN_FILENAME, PruningPlan

    check_outtype(outtype)
    folder = Path(model_ref)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no saved model (no config.json): prune with --save_model")
    plan = PruningPlan.load(folder / PLAN_FILENAME) if (folder / PLAN_FILENAME).is_file() else None
    if out is None:
        out = folder / f"model-{outtype}.gguf" if folder.is_dir() else Path(f"{model_ref.replace('/', '--')}-{outtype}.gguf")
    check_file_target(out)  # before the model is loaded and converted
    model, tokenizer = load_model(model_ref, dtype="float32", device="cpu")
    base = plan.base_model if plan is not None else model_ref
    counts = export_gguf(model, tokenizer, out, outtype, source_gguf=source_gguf(base),
                         dense_spec=plan.model_spec() if plan is not None else None, allow_fallback=allow_fallback)
    return out, counts


def run(args: argparse.Namespace) -> int:
    """Export and print what was written; 0 on success."""
    path, counts = export_saved_model(args.model, args.outtype, args.out, args.allow_fallback)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): tensors {format_counts(counts)}")
    return 0
