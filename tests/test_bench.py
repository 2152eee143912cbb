"""The benchmark runner stays runnable: its --quick smoke mode goes through dense, global and layer-wise rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quality_quick(tmp_path, data_dir):
    results = tmp_path / "quick.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bench.quality", "--quick", "--results", str(results)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["name"] for r in rows] == ["dense", "P20 global taylor lsq", "P20 layer 2:8 inverse"]
    assert rows[0]["params_after"] == 134_515_008
    for row in rows[1:]:
        assert abs(row["params_after"] / 134_515_008 - (1 - 0.158)) < 0.002
        assert row["wikitext2 PPL after pruning"] > rows[0]["wikitext2 PPL after pruning"]
    assert not (tmp_path / "quick_runs").exists()
