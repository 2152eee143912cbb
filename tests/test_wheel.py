"""The built wheel carries the default data (byte-identical WikiText-2 and its licence) and stays small."""

from __future__ import annotations

import hashlib
import lzma
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from llama_pruning.data.sources import DATASETS

ROOT = Path(__file__).resolve().parents[1]
WHEEL_CAP_BYTES = 2_000_000  # code + the two xz files (~0.7 MB); the uncompressed text alone would be 2.4 MB


def test_wheel_ships_the_packaged_data_byte_identical(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "llama_pruning", source / "llama_pruning", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp_path / "dist")], check=True)
    (wheel,) = (tmp_path / "dist").glob("llama_pruning-*.whl")
    assert wheel.stat().st_size < WHEEL_CAP_BYTES
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "llama_pruning/data/wikitext2/LICENSE" in names
        assert "CC BY-SA 3.0" in archive.read("llama_pruning/data/wikitext2/LICENSE").decode()
        for split in ("calibration", "evaluation"):
            packaged = DATASETS["wikitext2"].splits[split].packaged
            member = f"llama_pruning/data/{packaged.name}.xz"
            assert archive.read(member) == (ROOT / member).read_bytes()
            assert hashlib.sha256(lzma.decompress(archive.read(member))).hexdigest() == packaged.sha256
