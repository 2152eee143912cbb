"""Command line: end-to-end runs on SmolLM2 with tiny calibration, outputs, replay, and clear errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_pruning.cli.main import build_parser, main
from llama_pruning.options import reconstruct_windows, resolve_ignore, resolve_last_loss
from llama_pruning.selection.global_knapsack import resolve_cut_penalty

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num_samples", "4", "--seq_len", "32", "--gradient_batch_size", "2", "--device", "cpu"]


def run_cli(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_global_end_to_end_and_replay(tmp_path, data_dir):
    out = tmp_path / "runs"
    code = main(["global", "--output_root", str(out), "--save_ckpt_log_name", "g", "--pruning_ratio", "0.1",
                 "--reconstruct", "none", "--save_model", "--test_after_prune", "--eval_max_windows", "2", *FAST])
    assert code == 0
    run = out / "g"
    for name in ("description.txt", "unit_table.csv", "pruning_plan.json", "pruning_strategy.png",
                 "metrics.json", "config.json", "model.safetensors", "tokenizer.json"):
        assert (run / name).is_file(), name
    logs = list(run.glob("2*/training.log"))
    assert len(logs) == 1 and "PPL after pruning" in logs[0].read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert abs(1 - metrics["params_after"] / metrics["params_before"] - 0.1) < 0.002
    description = (run / "description.txt").read_text()
    assert "pruning_ratio: 0.1" in description and "attention blocks: 30 -> 30" in description
    assert json.loads((run / "pruning_plan.json").read_text())["metadata"]["cut_penalty"] == 1.0  # auto, for obs
    # the saved folder loads with transformers alone and matches the replayed plan bit for bit
    code = main(["global", "--output_root", str(out), "--save_ckpt_log_name", "replay", "--plan",
                 str(run / "pruning_plan.json"), "--reconstruct", "none", "--save_model", *FAST])
    assert code == 0
    first, second = load_file(run / "model.safetensors"), load_file(out / "replay" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_global_iterative_steps(tmp_path, data_dir, capsys):
    """--iterative_steps 2: cut half the target, re-fit, re-score, then the whole target; the plan says so."""
    out = tmp_path / "runs"
    code = main(["global", "--output_root", str(out), "--save_ckpt_log_name", "it", "--pruning_ratio", "0.1",
                 "--importance_method", "taylor", "--reconstruct", "lsq", "--reconstruct_samples", "4",
                 "--iterative_steps", "2", "--reconstruct_ignore", "<unk>", "--importance_ignore", "<unk>", *FAST])
    assert code == 0
    log = next((out / "it").glob("2*/training.log")).read_text()
    assert log.count("iterative step 1/2: cutting to 1/2 of the target") == 1
    assert log.count("cutting with lsq reconstruction on 4 x 32 tokens") == 2
    assert log.count("left out of the fit") == 2  # every step's fit leaves the placeholders out
    assert log.count("left out of the importance loss") == 1  # drawn once: the re-scoring steps reuse the mask
    metrics = json.loads((out / "it" / "metrics.json").read_text())
    assert abs(1 - metrics["params_after"] / metrics["params_before"] - 0.1) < 0.002
    plan = json.loads((out / "it" / "pruning_plan.json").read_text())
    assert plan["metadata"]["iterative_steps"] == 2 and "cut_penalty" not in plan["metadata"]  # auto: off for taylor
    code = main(["global", "--output_root", str(out), "--save_ckpt_log_name", "r", "--plan",
                 str(out / "it" / "pruning_plan.json"), "--iterative_steps", "2", *FAST])
    assert code == 2 and "a replayed --plan has them already" in capsys.readouterr().err


@pytest.mark.slow
def test_global_block_default_leaves_placeholders_out(tmp_path, data_dir):
    """The default reconstruction (block) leaves the calibration's `<unk>` pieces out of its fit, and says how many."""
    out = tmp_path / "runs"
    code = main(["global", "--output_root", str(out), "--save_ckpt_log_name", "b", "--pruning_ratio", "0.05",
                 "--reconstruct_samples", "4", *FAST])
    assert code == 0
    log = next((out / "b").glob("2*/training.log")).read_text()
    assert log.count("cutting with block reconstruction on 4 x 32 tokens") == 1
    assert re.search(r"left out of the fit: [1-9][\d,]* of 128 tokens \(.*\), those overlapping '<unk>'", log), log


@pytest.mark.slow
def test_layer_end_to_end(tmp_path, data_dir):
    out = tmp_path / "runs"
    code = main(["layer", "--output_root", str(out), "--save_ckpt_log_name", "l", "--pruning_ratio", "0.1",
                 "--pruning_distribution", "2:8", "--freeze_top_n_layers", "2", "--reconstruct", "bias",
                 "--reconstruct_samples", "6", "--reconstruct_drift", "0.25", "--finetune", "--finetune_samples", "4",
                 "--finetune_seq_len", "32", "--finetune_max_steps", "2",
                 "--finetune_batch_size", "2", "--test_after_prune", "--eval_max_windows", "2", *FAST])
    assert code == 0
    description = (out / "l" / "description.txt").read_text()
    log = next((out / "l").glob("2*/training.log")).read_text()
    assert "bias reconstruction on 6 x 32 tokens (ridge 3000 tokens = 15.6 relative, drift 0.25)" in log
    assert "importance: taylor (units), block_influence (layers) on 4 x 32 tokens of wikitext2" in log
    assert (out / "l" / "unit_table.csv").is_file() and not (out / "l" / "global_group_table.csv").exists()
    assert "PPL after pruning, before recovery" in description and "PPL after recovery" in description
    assert (out / "l" / "finetune_loss.png").is_file()
    config = json.loads((out / "l" / "layer_importance_config.json").read_text())
    assert config["method"] == "block_influence" and len(config["layers"]) == 30
    assert sum(layer["frozen"] for layer in config["layers"]) == 2
    assert (out / "l" / "pruning_strategy.png").is_file()


def test_existing_run_name_is_refused(tmp_path):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "description.txt").write_text("earlier run")
    proc = run_cli("global_pruning.py", "--output_root", str(tmp_path / "runs"), "--save_ckpt_log_name", "taken")
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "runs" / "taken" / "description.txt").read_text() == "earlier run"


def test_distributed_launch_is_refused(tmp_path, monkeypatch):
    """Under torchrun/accelerate every rank would prune into the same folder: one clear line instead."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    proc = run_cli("global_pruning.py", "--output_root", str(tmp_path))
    assert proc.returncode == 2 and "WORLD_SIZE=2" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv,message", [
    (["global_pruning.py", "--base_model", "/no/such/model"], "error:"),
    (["layer_pruning.py", "--remove_empty_layers"], "--remove_layers"),
    (["layer_pruning.py", "--pruning_distribution", "2-8"], "A:M"),
    (["global_pruning.py", "--pruning_ratio", "1.5"], "must be in [0, 1), got 1.5 (a fraction: 1.5 % is 0.015)"),
    (["layer_pruning.py", "--pruning_ratio", "20"], "must be in [0, 1), got 20 (a fraction: 20 % is 0.2)"),
    (["global_pruning.py", "--pruning_ratio", "-0.1"], "must be in [0, 1), got -0.1 (--help"),
    (["global_pruning.py", "--importance_method", "tayler"], "invalid choice"),
    (["global_pruning.py", "--reconstruct_drift", "2"], "must be in [0, 1]"),
    (["layer_pruning.py", "--reconstruct_ridge", "-0.1"], "must be >= 0"),
    (["global_pruning.py", "--cut_penalty", "inf"], "must be >= 0 and finite"),
    (["global_pruning.py", "--cut_penalty", "high"], "invalid non_negative_or_auto value"),
    (["global_pruning.py", "--reconstruct_samples", "0"], "must be a positive integer"),
    (["global_pruning.py", "--reconstruct_ignore", " "], "must not be empty"),
    (["layer_pruning.py", "--importance_method", "wanda", "--importance_ignore", "<unk>"],
     "--importance_ignore <unk> shapes the scores of taylor, taylor_2nd, obs only, so with --importance_method wanda "
     "it would not be used"),
    (["global_pruning.py", "--importance_method", "taylor", "--obs_fisher", "labels"],
     "--obs_fisher labels shapes the scores of obs only, so with --importance_method taylor it would not be used"),
    (["global_pruning.py", "--fast", "--obs_fisher", "labels"], "use --importance_method obs"),
    (["layer_pruning.py", "--taylor_2nd_variant", "sum"], "--taylor_2nd_variant sum shapes the scores of taylor_2nd only"),
    (["global_pruning.py", "--reconstruct_lr", "0"], "must be > 0"),
    (["layer_pruning.py", "--reconstruct_epochs", "nan"], "must be > 0"),
    (["global_pruning.py", "--iterative_steps", "2", "--remove_empty_layers"], "drop --remove_empty_layers"),
    (["global_pruning.py", "--iterative_steps", "0"], "must be a positive integer"),
    (["global_pruning.py", "--reconstruct_span", "0"], "must be a positive integer"),
    (["layer_pruning.py", "--reconstruct_last_loss", "kl"], "needs --reconstruct block and --reconstruct_drift > 0"),
    (["global_pruning.py", "--reconstruct_last_loss", "kl", "--reconstruct_drift", "0"], "--reconstruct_drift > 0"),
    (["global_pruning.py", "--reconstruct_last_loss", "ce"], "invalid choice"),
    (["global_pruning.py", "--reconstruct_kl_tokens", "0"], "must be in (0, 1]"),
    (["global_pruning.py", "--reconstruct_kl_tokens", "2"], "must be in (0, 1], got 2"),
    (["global_pruning.py", "--reconstruct_kl_tokens", "1", "--reconstruct_last_loss", "mse"],
     "--reconstruct_kl_tokens 1 shapes the last layer's kl steps only"),
    (["layer_pruning.py", "--reconstruct_kl_tokens", "0.25"], "--reconstruct_kl_tokens 0.25 shapes"),
])
def test_bad_input_gives_one_line(tmp_path, argv, message):
    proc = run_cli(*argv, "--output_root", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_every_flag():
    for command, flags in {
        "global": ["--base_model", "--save_ckpt_log_name", "--pruning_ratio", "--importance_method", "--num_samples",
                   "--seq_len", "--gradient_batch_size", "--dataset", "--remove_empty_layers", "--test_before_prune",
                   "--test_after_prune", "--save_model", "--device", "--seed", "--plan", "--save_dtype", "--round_to",
                   "--eval_max_windows", "--layer_start", "--layer_end", "--reconstruct", "--reconstruct_ridge",
                   "--reconstruct_drift", "--reconstruct_samples", "--reconstruct_inputs",
                   "--reconstruct_epochs", "--reconstruct_lr", "--finetune", "--distill", "--cut_penalty",
                   "--reconstruct_ignore", "--importance_ignore", "--reconstruct_span", "--reconstruct_last_loss",
                   "--reconstruct_kl_tokens"],
        "layer": ["--pruning_distribution", "--pruning_strategy", "--freeze_top_n_layers", "--layer_importance_method",
                  "--remove_layers"],
    }.items():
        text = build_parser(command).format_help()
        for flag in flags:
            assert flag in text, (command, flag)


def test_importance_and_reconstruction_defaults_per_command():
    """obs + block for global (chosen on the dev split), taylor + lsq for layer-wise; --fast takes taylor + lsq unless a
    later flag says."""
    def parse(*argv: str):
        return build_parser(argv[0]).parse_args(argv[1:])

    default, layer = parse("global"), parse("layer")
    assert (default.importance_method, default.reconstruct, default.reconstruct_epochs) == ("obs", "block", 4 / 3)
    assert default.reconstruct_autocast == "auto"
    assert (layer.importance_method, layer.reconstruct) == ("taylor", "lsq")
    # block's Adam steps draw 384 windows, lsq's solve 256; --num_samples raises both, the flag sets them
    assert [reconstruct_windows(ns.reconstruct, ns.reconstruct_samples, ns.num_samples)
            for ns in (default, layer, parse("global", "--reconstruct", "lsq"), parse("global", "--num_samples", "600"),
                       parse("global", "--reconstruct_samples", "100"))] == [384, 256, 256, 600, 100]
    fast = parse("global", "--fast")
    assert (fast.importance_method, fast.reconstruct, fast.num_samples, fast.reconstruct_samples) == ("taylor", "lsq", 8, 8)
    assert parse("global", "--fast", "--importance_method", "obs").importance_method == "obs"
    # obs's Fisher: the model's own predictions (chosen on dev), the text's labels when asked
    assert (default.obs_fisher, parse("global", "--obs_fisher", "labels").obs_fisher) == ("sampled", "labels")
    # the knapsack's cut penalty: 1 for obs (chosen on dev), off for the other methods, a given value as given
    assert [resolve_cut_penalty(ns.cut_penalty, ns.importance_method)
            for ns in (default, parse("global", "--importance_method", "taylor"), parse("global", "--cut_penalty", "0"),
                       parse("global", "--importance_method", "wanda", "--cut_penalty", "2.5"))] == [1.0, 0.0, 0.0, 2.5]
    # the text whose tokens leave the fit: '<unk>' for block (chosen on dev), nothing for lsq, none, a given text
    assert [resolve_ignore(ns.reconstruct_ignore, ns.reconstruct)
            for ns in (default, layer, parse("global", "--reconstruct_ignore", "none"),
                       parse("layer", "--reconstruct_ignore", "@@"))] == ["<unk>", None, None, "@@"]
    # the last layer's loss: kl for block with a dense stream (chosen on dev), mse for lsq or without drift, as given
    assert [resolve_last_loss(ns.reconstruct_last_loss, ns.reconstruct, ns.reconstruct_drift)
            for ns in (default, layer, parse("global", "--reconstruct_drift", "0"), parse("global", "--fast"),
                       parse("global", "--reconstruct_last_loss", "mse"), parse("layer", "--reconstruct", "block",
                                                                                "--reconstruct_last_loss", "kl"))
            ] == ["kl", "mse", "mse", "mse", "mse", "kl"]
    # its steps: the head on half the tokens, twice the steps (chosen on dev)
    assert (default.reconstruct_kl_tokens, parse("global", "--reconstruct_kl_tokens", "1").reconstruct_kl_tokens) == (0.5, 1)


def test_importance_table_hands_the_obs_fisher_on(monkeypatch):
    """--obs_fisher reaches the importance pass (and, through its kwargs, the cache key)."""
    import llama_pruning.importance as importance
    from llama_pruning.cli.common import importance_table

    seen: dict = {}
    monkeypatch.setattr(importance, "compute_importance", lambda model, samples, method, **kw: seen.update(kw))
    for fisher in ("sampled", "labels"):
        importance_table(None, build_parser("global").parse_args(["--obs_fisher", fisher, "--importance_cache", "none"]),
                         None, None)
        assert seen["obs_fisher"] == fisher


def test_help_shows_defaults_without_importing_torch():
    """`--help` states the defaults and answers at once: the parsers are built without torch or transformers."""
    code = ("import sys\nfrom llama_pruning.cli.main import build_parser\n"
            "texts = [build_parser(c).format_help() for c in (None, 'global', 'layer', 'eval')]\n"
            "print(sorted(m for m in ('torch', 'transformers', 'pandas', 'peft') if m in sys.modules))\n"
            "print(texts[1])")
    proc = run_cli("-c", code)
    assert proc.returncode == 0, proc.stderr
    loaded, text = proc.stdout.split("\n", 1)
    assert loaded == "[]"
    text = " ".join(text.split())  # argparse wraps lines
    for shown in ("to remove (default: 0.2)", "unit importance metric (default: obs)", "calibration windows (default: 64)",
                  "tokens per calibration window (default: 128)", "(see docs/RECONSTRUCTION.md) (default: block)",
                  "(default: cuda when available, else cpu)"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text
