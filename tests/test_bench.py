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


def test_report_renders_rows_references_and_plot(tmp_path):
    from bench.report import write_report

    rows = {"dense": {"params_after": 134_515_008, "wikitext2 PPL after pruning": 52.08, "prefill_tokens_per_s": 100.0,
                      "linear_macs_per_token": 134_479_872},
            "P20 global taylor lsq": {"params_after": 113_262_912, "layer_params_after": 84_962_304, "pruning seconds": 288.1,
                                      "wikitext2 PPL after pruning": 70.86, "prefill_tokens_per_s": 150.0,
                                      "linear_macs_per_token": 113_227_776},
            "P30 global taylor lsq": {"params_after": 102_648_960, "wikitext2 PPL after pruning": 87.52},
            "P20 global random": {"params_after": 113_262_336, "wikitext2 PPL after pruning": 15236.9}}
    (tmp_path / "RESULTS_NOTES.md").write_text("## Notes\n* hand-written\n")
    write_report(rows, tmp_path, machine="test machine")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| P20 global taylor lsq | 113,262,912 | 20.0% | 70.86 | 288 | — | — | 0.842 | 1.50 |" in text
    assert "| P30 global taylor lsq | 102,648,960 | — | 87.52 | — | — | — | — | — |" in text  # unknown, not 0%
    assert "| dense | 134,515,008 | 0.0% | 52.08 | — | — | — | 1.000 | 1.00 |" in text
    assert "Machine: test machine." in text and "| ShortGPT block-influence" in text and text.endswith("* hand-written\n\n")
    assert (tmp_path / "results_p20.png").stat().st_size > 10_000


def test_report_leaves_out_rows_recorded_with_other_args():
    from bench.quality import current_rows

    configs = [("P20 a", ["global", "--x", "1"]), ("P20 b", ["global", "--x", "2"]), ("P20 c", ["global"])]
    rows = {"P20 b": {"args": "global --x 2"}, "P20 a": {"args": "global --x 1 --y"}, "dense": {"args": ""},
            "gone": {"args": "global"}}
    current, stale = current_rows(rows, configs)
    assert list(current) == ["dense", "P20 b"]  # configuration order; unknown names and missing rows dropped
    assert stale == ["P20 a"]


def test_dev_split_is_disjoint_from_every_calibration_draw_and_reproducible(smollm2):
    """The committed dev windows: none drawn by seeds 0-2 up to 512 samples, same tokens as when committed."""
    from bench.dev import MAX_SAMPLES, SEEDS, SPLIT, calibration_windows, dev_windows, make_split
    from llama_pruning.data import calibration_indices

    _, tokenizer = smollm2
    split = json.loads(SPLIT.read_text())
    assert make_split(tokenizer) == split  # the file is what the protocol gives today
    windows = calibration_windows(tokenizer)
    drawn = set().union(*(calibration_indices(windows, MAX_SAMPLES, seed) for seed in SEEDS))
    assert len(split["dev"]) == len(windows) - len(drawn) > 800
    assert drawn.isdisjoint(split["dev"]) and set(split["scored"]) <= set(split["dev"])
    assert len(split["scored"]) == 128 and dev_windows(tokenizer).shape == (128, 128)
    # a default run's calibration (64 windows for importance, 256 for the solve) is a prefix of its seed's draw
    assert calibration_indices(windows, 256, 0)[:64] == calibration_indices(windows, 64, 0)


def test_dev_report_averages_seeds(tmp_path):
    from bench.dev import report

    rows = [{"name": "a", "point": "P20", "seed": s, "flags": "", "dev PPL": p, "pruning seconds": 10.0 * s,
             "peak RSS MiB": 100.0, "load average": 1.0} for s, p in ((0, 60.0), (1, 62.0), (2, 64.0))]
    text = report(rows)
    assert "| P20 | a | (defaults) | 0,1,2 | 62.00 [60.00-64.00] | 10 | 100 | 1.0 |" in text
