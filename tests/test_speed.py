"""Speed/memory profile: exact MACs and shapes, throughput measurement, and the eval command end to end."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from llama_pruning.cli import eval_cmd
from llama_pruning.evaluation.speed import (
    ProfileError,
    attention_macs_per_token,
    base_model_of,
    layer_shapes,
    linear_macs_per_token,
    load_for_profile,
    measure_speed,
    peak_rss_bytes,
)
from llama_pruning.models.arch import count_params
from llama_pruning.models.export import save_pruned_model
from llama_pruning.surgery import apply_plan
from tests.tiny import random_plan, tiny_model


def hand_macs(hidden: int, head_dim: int, vocab: int, layers: list[tuple[int, int, int]]) -> int:
    """Linear MACs per token counted by hand from (q_heads, kv_heads, intermediate) per layer."""
    total = hidden * vocab  # lm_head
    for q, kv, inter in layers:
        total += hidden * (q + 2 * kv) * head_dim + q * head_dim * hidden + 3 * hidden * inter
    return total


def test_macs_and_shapes_of_dense_and_pruned_tiny_models():
    dense = tiny_model(n_rep=2, kv_heads=4, head_dim=8, layers=4, intermediate=48)
    assert linear_macs_per_token(dense) == hand_macs(64, 8, 97, [(8, 4, 48)] * 4)
    assert linear_macs_per_token(dense) == 4 * (64 * 128 + 64 * 64 + 3 * 64 * 48) + 64 * 97
    assert attention_macs_per_token(dense, 10) == 4 * 2 * 8 * 8 * 10
    plan = random_plan(dense, seed=1)
    pruned = apply_plan(tiny_model(n_rep=2, kv_heads=4, head_dim=8, layers=4, intermediate=48), plan)
    layout = [(2 * len(plan.attn_groups[i]), len(plan.attn_groups[i]), len(plan.mlp_channels[i]))
              for i in plan.kept_layers]
    assert [(s["q_heads"], s["kv_heads"], s["intermediate"]) for s in layer_shapes(pruned)] == layout
    assert linear_macs_per_token(pruned) == hand_macs(64, 8, 97, layout)
    assert attention_macs_per_token(pruned, 7) == sum(2 * q * 8 * 7 for q, _, _ in layout)


def test_measure_speed_reports_throughput():
    model = tiny_model()
    speed = measure_speed(model, batch_size=2, prefill_len=8, decode_tokens=3, repeats=2)
    assert speed["prefill_tokens_per_s"] == pytest.approx(16 / speed["prefill_s"])
    assert speed["decode_tokens_per_s"] == pytest.approx(6 / speed["decode_s"])
    with pytest.raises(ProfileError, match="at least 1"):
        measure_speed(model, repeats=0)


def test_eval_command_end_to_end(tmp_path, capsys):
    dense = tiny_model()
    dense.save_pretrained(tmp_path / "dense")
    plan = random_plan(dense)
    pruned = apply_plan(tiny_model(), plan)
    save_pruned_model(pruned, None, tmp_path / "pruned", plan)
    assert base_model_of(tmp_path / "pruned") == "tiny-llama"
    parser = argparse.ArgumentParser()
    eval_cmd.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "pruned"), "--base_model", str(tmp_path / "dense"), "--device", "cpu",
                              "--prefill_len", "8", "--decode_tokens", "2", "--repeats", "1",
                              "--json", str(tmp_path / "out" / "report.json")])
    ballast = torch.ones(2**28)  # 1 GiB: raises this process's peak RSS, which children must not inherit
    parent_peak = peak_rss_bytes()
    del ballast
    assert eval_cmd.run(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pruned"]["params"] == count_params(pruned)
    assert report["dense"]["params"] == count_params(dense)
    assert report["pruned"]["linear_macs_per_token"] == linear_macs_per_token(pruned)
    assert report["pruned"]["layers"] == layer_shapes(pruned)
    assert report["ratios"]["params"] == count_params(pruned) / count_params(dense)
    for side in ("pruned", "dense"):
        assert parent_peak > report[side]["peak_memory_bytes"] > report[side]["weights_bytes"] > 0
        assert report[side]["prefill_tokens_per_s"] > 0 and report[side]["decode_tokens_per_s"] > 0
    table = capsys.readouterr().out
    assert "pruned/dense" in table and "decode tokens/s" in table
    assert table.startswith("measured on cpu in float32 with batch size 1, prompts of 8 tokens, 2 greedy decode steps; "
                            "fastest of 1 timed runs")


def test_eval_without_device_runs_on_the_default_device(tmp_path, capsys):
    """`eval MODEL_DIR` as the README writes it (no --device) profiles on cuda when there is one, else on the CPU."""
    from llama_pruning.cli.main import main
    from llama_pruning.models.loading import default_device

    tiny_model().save_pretrained(tmp_path / "dense")
    assert main(["eval", str(tmp_path / "dense"), "--in_process", "--prefill_len", "8", "--decode_tokens", "2",
                 "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"measured on {default_device()} in float32 ") for line in lines), lines


def test_eval_json_into_a_folder_is_refused_before_timing(tmp_path, capsys, monkeypatch):
    """--json naming a folder: one line, exit 2, before any model is loaded; the folder and its files stay."""
    from llama_pruning.cli.main import main
    from llama_pruning.evaluation import speed

    tiny_model().save_pretrained(tmp_path / "dense")
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "earlier.json").write_text("{}")
    monkeypatch.setattr(speed, "compare", lambda *a, **k: pytest.fail("models were profiled before --json was checked"))
    capsys.readouterr()  # the save's progress bars
    assert main(["eval", str(tmp_path / "dense"), "--device", "cpu", "--json", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {folder} is a folder; a file path is expected (nothing was written)"
    assert sorted(p.name for p in folder.iterdir()) == ["earlier.json"] and (folder / "earlier.json").read_text() == "{}"


def test_eval_longer_than_the_context_is_refused_before_timing(tmp_path, capsys, monkeypatch):
    from llama_pruning.cli.main import main
    from llama_pruning.evaluation import speed

    tiny_model().save_pretrained(tmp_path / "dense")  # a 64-token context
    monkeypatch.setattr(speed, "compare", lambda *a, **k: pytest.fail("models were profiled before the lengths were checked"))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "dense"), "--device", "cpu", "--prefill_len", "60", "--decode_tokens", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --prefill_len 60 + --decode_tokens 5 tokens are more than") and "(64 tokens" in err


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ProfileError, match="cannot load model"):
        load_for_profile(str(tmp_path / "nothing"), "cpu", "float32")
