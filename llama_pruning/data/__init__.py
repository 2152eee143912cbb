"""Text sources (named corpora, local files, the offline folder) and token windows for calibration and PPL."""

from llama_pruning.data.calibration import (
    calibration_indices,
    get_calibration_samples,
    split_windows,
    text_mask,
    tokenize_text,
)
from llama_pruning.data.sources import (
    DATA_ENV,
    DATASETS,
    DataError,
    TextSource,
    get_eval_text,
    get_text_rows,
    load_text,
)

__all__ = [
    "DATASETS",
    "DATA_ENV",
    "DataError",
    "TextSource",
    "calibration_indices",
    "get_calibration_samples",
    "get_eval_text",
    "get_text_rows",
    "load_text",
    "split_windows",
    "text_mask",
    "tokenize_text",
]
