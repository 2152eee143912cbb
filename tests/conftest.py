"""Shared fixtures: the real SmolLM2-135M is loaded once per test session; data comes from the package."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

# the developers' copy beside the checkout; only cross-checks against the packaged data use it
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PACKAGED_FILES = ("wikitext2/wiki.valid.tokens", "wikitext2/wiki.test.raw")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M in float32 on CPU; tests must not modify it."""
    from llama_pruning.models import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A folder in the LLAMA_PRUNING_DATA layout holding the packaged WikiText-2 files, decompressed (always there)."""
    from llama_pruning.data.sources import packaged_data

    path = tmp_path_factory.mktemp("data")
    for name in PACKAGED_FILES:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(lzma.decompress(packaged_data().joinpath(f"{name}.xz").read_bytes()))
    return path


@pytest.fixture
def no_packaged_data(monkeypatch, tmp_path) -> None:
    """Hide the packaged data, as in an install without it, so LLAMA_PRUNING_DATA and the hub are consulted."""
    from llama_pruning.data import sources

    monkeypatch.setattr(sources, "packaged_data", lambda: tmp_path / "no-packaged-data")


@pytest.fixture(autouse=True)
def _fixed_global_rng() -> None:
    """Each test starts from the same global torch RNG state, so its random data does not depend on test order."""
    import torch

    torch.manual_seed(0)
