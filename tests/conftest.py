"""Shared fixtures: the real SmolLM2-135M is loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "LLAMA_PRUNING_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["LLAMA_PRUNING_DATA"] = str(SHARED_DATA)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M in float32 on CPU; tests must not modify it."""
    from llama_pruning.models import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline data folder (../shared/data) or skip when it is absent."""
    path = Path(os.environ.get("LLAMA_PRUNING_DATA", SHARED_DATA))
    if not (path / "wikitext2").is_dir():
        pytest.skip("offline data folder not available")
    return path


@pytest.fixture(autouse=True)
def _fixed_global_rng() -> None:
    """Each test starts from the same global torch RNG state, so its random data does not depend on test order."""
    import torch

    torch.manual_seed(0)
