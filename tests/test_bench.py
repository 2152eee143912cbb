"""The benchmark runner stays runnable: its --quick smoke mode goes through dense, global and layer-wise rows."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

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


def test_a_scratch_results_file_leaves_the_committed_report_alone(tmp_path, monkeypatch, capsys):
    """Only bench/results.jsonl renders docs/RESULTS.md: rows run into another file do not replace the table."""
    import bench.report
    from bench import quality

    rendered = []
    monkeypatch.setattr(bench.report, "write_report", lambda rows, folder, machine: rendered.append(folder))
    scratch = tmp_path / "scratch.jsonl"
    scratch.write_text(json.dumps({"name": "dense", "args": ""}) + "\n")
    assert quality.main(["--report_only", "--results", str(scratch)]) == 0
    assert rendered == [] and "docs/RESULTS.md left as is" in capsys.readouterr().out
    assert quality.main(["--report_only"]) == 0
    assert rendered == [ROOT / "docs"]


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
    tokens, scored = dev_windows(windows)
    assert len(split["scored"]) == 128 and tokens.shape == (128, 128) and scored == split["scored"]
    # a default run's calibration (64 windows for importance, 256 for the solve) is a prefix of its seed's draw
    assert calibration_indices(windows, 256, 0)[:64] == calibration_indices(windows, 64, 0)


def test_larger_draws_are_scored_outside_them_and_overlaps_refused(smollm2):
    """A 768-window run is scored on 128 windows no seed draws within 768 (the committed ones are not: 18-25 of them
    are in each seed's draw); a run whose own draw holds a scored window is refused."""
    from bench.dev import SEEDS, calibration_draw, calibration_windows, check_disjoint, dev_windows
    from llama_pruning.data import calibration_indices

    _, tokenizer = smollm2
    windows = calibration_windows(tokenizer)
    assert calibration_draw([]) == 384 and calibration_draw(["--reconstruct", "lsq"]) == 256
    assert calibration_draw(["--reconstruct_samples", "768"]) == 768
    assert calibration_draw(["--reconstruct", "none", "--num_samples", "100"]) == 100
    committed = dev_windows(windows)[1]
    tokens, scored = dev_windows(windows, 768)
    assert tokens.shape == (128, 128) and torch.equal(tokens, windows[scored]) and scored != committed
    for seed in SEEDS:
        assert set(calibration_indices(windows, 768, seed)).isdisjoint(scored)
        check_disjoint(windows, scored, 768, [seed])
    with pytest.raises(SystemExit, match="seed 0's calibration \\(768 windows\\) holds 25 of the 128"):
        check_disjoint(windows, committed, 768, [0])
    with pytest.raises(SystemExit, match="seed 5's calibration"):
        check_disjoint(windows, committed, 64, [5])
    with pytest.raises(SystemExit, match="draws of 1500 windows leave [0-9]+ dev windows, fewer than 128"):
        dev_windows(windows, 1500)


def test_dev_report_averages_seeds(tmp_path):
    from bench.dev import report

    rows = [{"name": "a", "point": "P20", "seed": s, "flags": "", "dev PPL": p, "pruning seconds": 10.0 * s,
             "peak RSS MiB": 100.0, "load average": 1.0} for s, p in ((0, 60.0), (1, 62.0), (2, 64.0))]
    rows[1].update({"clean dev PPL": 66.0, "copy NLL": 0.5})  # rows from before the scores existed have none
    rows[2].update({"clean dev PPL": 68.0, "copy NLL": 0.7, "seed": 3})
    text = report(rows + [{**rows[0], "name": "b"}, {**rows[0], "dev draw": 768}, {**rows[0], "dev overlap": 25}])
    assert "| P20 | a | (defaults) | 0,1,3 | 62.00 [60.00-64.00] | 67.00 | 0.600 | 10 | 100 | 1.0 |" in text
    assert "| P20 | b | (defaults) | 0 | 60.00 | — | — | 0 | 100 | 1.0 |" in text
    # rows scored on other windows, or on windows their calibration saw, never average with the others
    assert "| P20 | a [scored outside every 768-window draw] | (defaults) | 0 | 60.00 |" in text
    assert "| P20 | a [its calibration held some of the scored windows: not a dev figure] | (defaults) | 0 |" in text


def test_text_mask_marks_every_piece_of_unk(smollm2):
    """`<unk>` spans three tokens here, the last one merged with the comma after it; nothing else is marked."""
    from llama_pruning.data import text_mask, tokenize_text

    _, tokenizer = smollm2
    ids = tokenize_text(tokenizer, " the <unk> of <unk>, a <b>")
    pieces = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert pieces[:9] == ["Ġthe", "Ġ<", "unk", ">", "Ġof", "Ġ<", "unk", ">,", "Ġa"]
    assert text_mask(tokenizer, ids[None], "<unk>")[0].tolist() == [0, 1, 1, 1, 0, 1, 1, 1] + [0] * (len(ids) - 8)


class _Copier(torch.nn.Module):
    """A fake causal LM: uniform logits, or (copy=True) a sharp guess of the token COPY_LEN positions back."""

    def __init__(self, vocab: int, copy: bool):
        super().__init__()
        self.vocab, self.copy = vocab, copy

    def forward(self, input_ids, use_cache=False):
        from bench.dev import COPY_LEN

        logits = torch.zeros(*input_ids.shape, self.vocab)
        if self.copy:  # position t predicts token t + 1, which repeats token t + 1 - COPY_LEN
            logits[:, COPY_LEN - 1:-1].scatter_(2, input_ids[:, :-COPY_LEN, None], 100.0)
        return SimpleNamespace(logits=logits)


def test_dev_scores_are_exact_for_uniform_and_copying_models():
    from bench.dev import copy_snippets, dev_scores

    vocab = 50
    windows = torch.randint(0, vocab, (64, 128), generator=torch.Generator().manual_seed(0))
    placeholders = torch.zeros(windows.shape, dtype=torch.bool)
    placeholders[:, 1::2] = True
    uniform = dev_scores(_Copier(vocab, copy=False), windows, placeholders)
    assert uniform == {"dev PPL": pytest.approx(vocab), "clean dev PPL": pytest.approx(vocab),
                       "copy NLL": pytest.approx(math.log(vocab), abs=1e-4)}
    assert dev_scores(_Copier(vocab, copy=True), windows, placeholders)["copy NLL"] < 1e-6
    # on repeated text the copier is perfect from target COPY_LEN on; targets 1..30 are marked as placeholders,
    # so the clean PPL averages target 31 (uniform, log vocab) with 96 perfect ones
    repeated = copy_snippets(windows)
    marks = torch.zeros(repeated.shape, dtype=torch.bool)
    marks[:, :31] = True
    clean = dev_scores(_Copier(vocab, copy=True), repeated, marks)["clean dev PPL"]
    assert clean == pytest.approx(math.exp(math.log(vocab) / 97), abs=1e-4)
