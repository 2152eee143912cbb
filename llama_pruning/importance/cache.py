"""On-disk cache of importance tables, so a sweep over pruning ratios scores the model once per setting.

A table is stored as CSV under a name derived from everything that determines it: the model (name and
dtype), the method (and `taylor_2nd` variant, and seed for `random`), the caller's description of the
calibration data (`key_fields`, e.g. dataset and sampling seed) and a SHA-256 of the sample tokens
themselves, so different samples never share an entry even when described alike. Settings that only
change speed or float rounding (micro-batch size, checkpointing, device) are not part of the key.
An entry that cannot be read back as a whole table of the model (truncated, edited, garbled) is a miss.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from llama_pruning import atomic
from llama_pruning.importance.obs import DAMPING
from llama_pruning.importance.unit import DEFAULT_TAYLOR_2ND_VARIANT, compute_importance
from llama_pruning.importance.units import table_problem
from llama_pruning.models.arch import model_spec
from llama_pruning.options import DEFAULT_OBS_FISHER, OBS_CHUNKS

logger = logging.getLogger(__name__)


def importance_cache_key(model: nn.Module, samples: torch.Tensor, method: str, key_fields: dict | None = None, *,
                         seed: int = 0, taylor_2nd_variant: str = DEFAULT_TAYLOR_2ND_VARIANT,
                         ignore: torch.Tensor | None = None, obs_fisher: str = DEFAULT_OBS_FISHER) -> dict:
    """The JSON-serialisable fields that identify one importance table."""
    key = dict(key_fields or {})
    key.update(
        model=str(model.config.name_or_path),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        method=method,
        num_samples=int(samples.shape[0]),
        seq_len=int(samples.shape[1]),
        samples_sha256=hashlib.sha256(samples.detach().cpu().contiguous().numpy().tobytes()).hexdigest(),
    )
    if method == "taylor_2nd":
        key["variant"] = taylor_2nd_variant
    if method == "random":
        key["random_seed"] = seed
    if ignore is not None and bool(ignore.any()):  # tokens left out of the scoring pass
        key["ignore_sha256"] = hashlib.sha256(ignore.cpu().contiguous().numpy().tobytes()).hexdigest()
    if method == "obs":  # its constants change the table, so an edited value must not read an old one
        key.update(obs_damping=DAMPING, obs_chunks=OBS_CHUNKS, obs_fisher=obs_fisher)
        if obs_fisher == "sampled":  # the targets' draws
            key["sample_seed"] = seed
    return key


def cache_path(cache_dir: str | Path, key: dict) -> Path:
    """`<model>-<method>[-<variant>]-<hash of the key>.csv` inside `cache_dir`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    stem = "-".join(str(part) for part in (key["model"], key["method"], key.get("variant")) if part)
    return Path(cache_dir) / f"{re.sub(r'[^A-Za-z0-9._]+', '_', stem)}-{digest}.csv"


def _read_entry(path: Path, model: nn.Module) -> pd.DataFrame | None:
    """The table cached at `path`, or None (with a warning) when it is not a complete table of `model`."""
    try:
        text = path.read_text(encoding="utf-8")
        table = pd.read_csv(io.StringIO(text))
    except ValueError as err:  # pandas' parser errors (an empty file's too) and undecodable bytes
        problem = f"it does not parse: {' '.join(str(err).split())}"
    else:
        if not text.endswith("\n"):  # a cut inside the last row can keep every unit, with its score cut short
            problem = "its last row does not end in a newline, as in a truncated file"
        elif (problem := table_problem(table, model_spec(model))) is None:
            return table
        else:
            problem = f"the table {problem}"
    logger.warning("importance cache entry %s is unusable, recomputing it: %s", path, problem)
    return None


def cached_importance(model: nn.Module, samples: torch.Tensor, method: str, cache_dir: str | Path,
                      key_fields: dict | None = None, **kwargs) -> pd.DataFrame:
    """`compute_importance(model, samples, method, **kwargs)`, read from `cache_dir` when already computed.

    A new table is written atomically (temporary file, then rename), so an interrupted run or two
    concurrent runs never leave a truncated entry behind. The table returned is always the one read
    from the file, so a first run and every later hit give bit-identical tables. An entry that is not
    a complete table of the model is recomputed and overwritten, with a warning.
    """
    key = importance_cache_key(model, samples, method, key_fields, seed=kwargs.get("seed", 0),
                               taylor_2nd_variant=kwargs.get("taylor_2nd_variant", DEFAULT_TAYLOR_2ND_VARIANT),
                               ignore=kwargs.get("ignore"), obs_fisher=kwargs.get("obs_fisher", DEFAULT_OBS_FISHER))
    path = cache_path(cache_dir, key)
    if path.is_file() and (table := _read_entry(path, model)) is not None:
        logger.info("importance cache hit: %s", path)
        return table
    table = compute_importance(model, samples, method, **kwargs)
    atomic.remove_stale(path.parent, logger.info)
    with atomic.atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    logger.info("importance table written to %s", path)
    return pd.read_csv(path)
