"""Reliability and security: no code runs without consent, no run destroys earlier results, bad input is one line.

Every case runs on a tiny random Llama with a byte-level tokenizer (seconds, not minutes); the CLI is called
in-process where possible, and in a subprocess where a crash, a kill or a clean interpreter is the point.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_pruning import atomic
from llama_pruning.cli import common
from llama_pruning.cli.main import main
from llama_pruning.models import loading
from llama_pruning.models.export import save_pruned_model
from llama_pruning.models.loading import (
    FORMAT_KEY,
    KNOWN_MODELING_SHA256,
    MODELING_FILE,
    ModelLoadError,
    check_device,
    load_model,
)
from llama_pruning.plan import PLAN_FILENAME, PlanError, PruningPlan
from llama_pruning.recovery.__main__ import main as recovery_main
from llama_pruning.reporting import RunDir
from llama_pruning.surgery import apply_plan
from tests.tiny import random_plan

ROOT = Path(__file__).resolve().parents[1]
CHEAP = ["--num_samples", "4", "--seq_len", "64", "--reconstruct", "none", "--device", "cpu", "--gradient_batch_size", "4"]


def make_tiny_dir(path: Path) -> Path:
    """A random 4-layer Llama (GQA 4:2) with a byte-level tokenizer, saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab["<unk>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_dir(tmp_path_factory.mktemp("tiny") / "dense")


@pytest.fixture(scope="module")
def pruned_dir(tiny_dir, tmp_path_factory) -> Path:
    """A non-uniform pruned folder (modeling_pruned.py in auto_map) whose plan names `tiny_dir` as its base."""
    model, tokenizer = load_model(str(tiny_dir), device="cpu")
    plan = random_plan(model, seed=3)
    plan.base_model = str(tiny_dir)
    return save_pruned_model(apply_plan(model, plan), tokenizer, tmp_path_factory.mktemp("pruned") / "p", plan=plan)


@pytest.fixture
def evil_dir(pruned_dir, tmp_path) -> tuple[Path, Path]:
    """A copy of `pruned_dir` whose modeling_pruned.py still works but also writes a marker file when imported."""
    folder, marker = tmp_path / "evil", tmp_path / "marker"
    shutil.copytree(pruned_dir, folder)
    future = "from __future__ import annotations\n"
    code = (folder / MODELING_FILE).read_text().replace(future, f"{future}import pathlib\n"
                                                                 f"pathlib.Path({str(marker)!r}).write_text('ran')\n")
    (folder / MODELING_FILE).write_text(code)
    return folder, marker


def cli(argv: list[str]) -> int:
    """`main(argv)` with argparse's exit turned into its code, as a shell would see it."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# 1. no code runs without consent --------------------------------------------------------------------------------
def test_our_folder_loads_with_the_package_classes(pruned_dir, tmp_path):
    config = json.loads((pruned_dir / "config.json").read_text())
    assert config[FORMAT_KEY] == 1 and config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_pruned.")
    model, _ = load_model(str(pruned_dir), device="cpu")
    assert type(model).__module__ == "llama_pruning.models.modeling_pruned"
    # a folder of the first release (no format key) is recognised by its modeling file and loads the same
    old = tmp_path / "old"
    shutil.copytree(pruned_dir, old)
    del config[FORMAT_KEY]
    (old / "config.json").write_text(json.dumps(config))
    again, _ = load_model(str(old), device="cpu")
    x = torch.randint(0, 257, (1, 7))
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


def test_shipped_modeling_file_is_a_known_version():
    """Editing modeling_pruned.py without recording its hash would make our own new folders unloadable."""
    import hashlib

    from llama_pruning.models import modeling_pruned

    assert hashlib.sha256(Path(modeling_pruned.__file__).read_bytes()).hexdigest() in KNOWN_MODELING_SHA256


def test_unknown_modeling_file_is_refused_in_process(evil_dir):
    folder, marker = evil_dir
    with pytest.raises(ModelLoadError, match="--trust_remote_code"):
        load_model(str(folder), device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("command", ["global", "layer", "eval", "eval-base", "recovery"])
def test_unknown_modeling_file_never_runs(command, evil_dir, pruned_dir, tmp_path, capsys):
    folder, marker = evil_dir
    out = tmp_path / "runs"
    if command in ("global", "layer"):
        code = main([command, "--base_model", str(folder), "--output_root", str(out), *CHEAP])
    elif command == "eval":
        code = main(["eval", str(folder), "--device", "cpu", "--in_process"])
    elif command == "eval-base":  # a clean folder whose plan names the malicious one as its dense base
        clean = tmp_path / "clean"
        shutil.copytree(pruned_dir, clean)
        plan = json.loads((clean / PLAN_FILENAME).read_text())
        (clean / PLAN_FILENAME).write_text(json.dumps({**plan, "base_model": str(folder)}))
        code = main(["eval", str(clean), "--device", "cpu", "--in_process"])
    else:
        code = recovery_main(["--model", str(folder), "--output", str(out), "--finetune"])
    assert code == 2
    assert "--trust_remote_code" in one_line_error(capsys)
    assert not marker.exists() and not out.exists()


def test_auto_map_alone_no_longer_turns_on_remote_code(evil_dir, tiny_dir, tmp_path):
    """The probe's trigger: any config whose auto_map names modeling_pruned.* used to run that file on load."""
    evil, marker = evil_dir
    folder = tmp_path / "vanilla"
    shutil.copytree(tiny_dir, folder)
    shutil.copyfile(evil / MODELING_FILE, folder / MODELING_FILE)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_pruned.PrunedLlamaForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_model(str(folder), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()


def test_trust_remote_code_runs_the_folder_code(evil_dir):
    """The positive control: with consent the folder's own file is what runs (so the tests above can fail)."""
    folder, marker = evil_dir
    model, _ = load_model(str(folder), device="cpu", trust_remote_code=True)
    assert marker.read_text() == "ran" and type(model).__module__ != "llama_pruning.models.modeling_pruned"


# 2. --overwrite never destroys the previous run --------------------------------------------------------------------
def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_keeps_old_outputs_until_the_new_run_is_complete(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    base = ["global", "--output_root", str(out), "--save_ckpt_log_name", "r1", *CHEAP]
    assert main([*base, "--base_model", str(tiny_dir), "--save_model"]) == 0
    before = snapshot(out / "r1")
    assert "config.json" in before and "model.safetensors" in before
    capsys.readouterr()
    # bad input: refused before anything is touched
    assert main([*base, "--overwrite", "--base_model", "/nonexistent"]) == 2
    assert "/nonexistent" in one_line_error(capsys)
    # a failure late in the run: the earlier run stays whole, the failed run's log is kept beside it
    monkeypatch.setattr(common, "_write_outputs", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk on fire")))
    with pytest.raises(RuntimeError):
        main([*base, "--overwrite", "--base_model", str(tiny_dir), "--save_model"])
    assert snapshot(out / "r1") == before
    failed = [p for p in out.iterdir() if p.name.startswith("r1.failed-")]
    assert len(failed) == 1 and "disk on fire" in next(failed[0].glob("*/training.log")).read_text()
    assert not list(failed[0].glob("*.json"))  # only the log is kept
    monkeypatch.undo()
    # a rerun that succeeds replaces the old run as a whole
    assert main([*base, "--overwrite", "--base_model", str(tiny_dir)]) == 0
    after = snapshot(out / "r1")
    assert "model.safetensors" not in after and not set(after) & {k for k in before if "/" in k}
    assert "replacing the earlier run in" in next((out / "r1").glob("2*/training.log")).read_text()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".importance_cache") == []


def test_overwrite_refuses_a_folder_that_holds_no_run(tiny_dir, tmp_path, capsys, no_weights):
    folder = tmp_path / "Documents"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    argv = ["global", "--base_model", str(tiny_dir), "--output_root", str(tmp_path), *CHEAP, "--overwrite"]
    assert main([*argv, "--save_ckpt_log_name", "Documents"]) == 2
    assert "holds files but no llama-pruning run" in one_line_error(capsys)
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"] and (folder / "thesis.tex").read_text() == "years of work"
    photos = tmp_path / "Photos" / "20230615"  # dated folders alone look like a failed run's logs, but hold no log
    photos.mkdir(parents=True)
    (photos / "img.jpg").write_bytes(b"jpeg")
    assert main([*argv[:-1], "--save_ckpt_log_name", "Photos"]) == 2
    assert "holds files but no llama-pruning run" in one_line_error(capsys)
    assert (photos / "img.jpg").read_bytes() == b"jpeg"
    # what runs leave is replaced: an older run's outputs (with --overwrite), a failed run's log alone (without)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "description.txt").write_text("an older run")
    (tmp_path / "failed" / "20260101_000000").mkdir(parents=True)
    (tmp_path / "failed" / "20260101_000000" / "training.log").write_text("run failed")
    assert main([*argv, "--save_ckpt_log_name", "old", "--dry_run"]) == 0
    assert main([*argv[:-1], "--save_ckpt_log_name", "failed", "--dry_run"]) == 0
    assert main([*argv[:-1], "--save_ckpt_log_name", "old", "--dry_run"]) == 2
    assert "already exists" in capsys.readouterr().err


# 3. an interrupted save never looks like a model, and the next run cleans up ------------------------------------
def test_sigkill_while_saving_leaves_no_model_and_rerun_cleans_up(tiny_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["global_pruning.py", "--base_model", str(tiny_dir), "--output_root", str(out), "--save_ckpt_log_name", "k",
            "--save_model", *CHEAP]
    env = {**os.environ, atomic.PAUSE_ENV: "3", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stderr:  # the writer pauses with 3 files in its temporary model folder
            if line.startswith("paused with 3 files"):
                break
        else:
            pytest.fail("the writer never paused")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "k").exists()  # the run folder does not exist, so it cannot look like a model
    leftovers = [p for p in out.iterdir() if p.name.startswith(".k.tmp-")]
    assert len(leftovers) == 1 and list(leftovers[0].rglob("model.safetensors"))
    assert not list(out.rglob("config.json")) or all(".tmp-" in str(p) for p in out.rglob("config.json"))
    assert main(["global", *argv[1:], "--overwrite"]) == 0
    assert f"removed {leftovers[0]}" in capsys.readouterr().out
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert (out / "k" / "config.json").is_file()


def test_atomic_helper_modes_cleanup_and_restore(tmp_path):
    old_mask = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
        with atomic.atomic_path(tmp_path / "d", directory=True) as tmp:
            (tmp / "f").write_text("y")
        with pytest.raises(ZeroDivisionError), atomic.atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("half")
            raise ZeroDivisionError
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "d" / "f").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]
    # leftovers of dead writers: a temp is removed, a folder swapped out but never replaced is put back
    pid = dead_pid()
    (tmp_path / f".smollm2-135m-fp32.tmp-{pid}-x").mkdir()
    (tmp_path / f".run.old-{pid}-1").mkdir()
    (tmp_path / f".busy.tmp-{os.getpid()}-x").mkdir()  # ours, alive: kept
    lines: list[str] = []
    atomic.remove_stale(tmp_path, lines.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".busy.tmp-{os.getpid()}-x", "a.txt", "d", "run"]
    assert len(lines) == 2


def test_file_writers_refuse_a_folder_and_leave_it_intact(tmp_path):
    """Only a folder writer replaces a folder: a file written onto one (write_text, atomic_path, a plan, a bare
    replace) is refused in one line, the folder and its files stay, and no temporary is left behind."""
    folder = tmp_path / "run"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "sub" / "log.txt").write_text("log")
    before = snapshot(folder)
    written: list[Path] = []
    message = f"{folder} is a folder; a file path is expected"
    with pytest.raises(IsADirectoryError, match=message):
        atomic.write_text(folder, "{}")
    with pytest.raises(IsADirectoryError, match=message), atomic.atomic_path(folder) as tmp:
        written.append(tmp)  # never reached: the expensive write must not start
    with pytest.raises(IsADirectoryError, match=message):
        PruningPlan.from_dict(plan_dict()).save(folder)
    loose = tmp_path / "loose.bin"
    loose.write_bytes(b"x")
    with pytest.raises(IsADirectoryError, match=message):
        atomic.replace(loose, folder)
    assert not written and snapshot(folder) == before and loose.read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loose.bin", "run"]
    # a folder writer still swaps the old folder out for the new one (the --overwrite path)
    with atomic.atomic_path(folder, directory=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert snapshot(folder) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loose.bin", "run"]


# 4. plan files are checked by type and range ---------------------------------------------------------------------
PLAN_CASES = [
    ({"attn_groups": 5}, "attn_groups"),
    ({"metadata": []}, "metadata"),
    ({"bias_compensation": ["no"]}, "bias_compensation"),
    ({"attn_groups": [[True], [0], [0], [0]]}, r"attn_groups\[0\]\[0\]"),
    ({"mlp_channels": [[0.5], [0], [0], [0]]}, r"mlp_channels\[0\]\[0\]"),
    ({"attn_groups": [[0, 9], [0], [0], [0]]}, r"attn_groups\[0\]\[1\]"),
    ({"spec": {"num_layers": True}}, "spec"),
    ({"base_model": None}, "base_model"),
    ({"extra": 1}, "unknown fields"),
]


def plan_dict() -> dict:
    spec = {"model_type": "llama", "num_layers": 4, "hidden_size": 32, "num_kv_heads": 2, "n_rep": 2, "head_dim": 8,
            "intermediate_size": 64, "qkv_bias": False, "o_bias": False, "mlp_bias": False}
    return {"base_model": "tiny", "spec": spec, "attn_groups": [[0, 1]] * 4, "mlp_channels": [list(range(64))] * 4,
            "bias_compensation": [], "metadata": {}}


@pytest.mark.parametrize("change,field", PLAN_CASES)
def test_plan_with_wrong_types_names_the_field(change, field, tmp_path):
    data = plan_dict()
    data.update(change)
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=field):
        PruningPlan.load(tmp_path / "p.json")


# 5. one line instead of a traceback -------------------------------------------------------------------------------
def test_truncated_weights_are_named(tiny_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors is not a readable safetensors file"):
        load_model(str(broken), device="cpu")
    assert main(["global", "--base_model", str(broken), "--output_root", str(tmp_path / "runs"), *CHEAP]) == 2
    assert str(broken / "model.safetensors") in one_line_error(capsys) and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("device", ["foo", "cuda:7" if torch.cuda.is_available() else "cuda"])
def test_unavailable_device_names_the_available_ones(device, tiny_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="available: cpu"):
        check_device(device)
    args = ["--base_model", str(tiny_dir), "--output_root", str(tmp_path), *CHEAP, "--device", device]
    assert main(["global", *args]) == 2
    assert f"device {device!r} is not available here; available: cpu" in one_line_error(capsys)
    assert main(["eval", str(tiny_dir), "--device", device, "--in_process"]) == 2
    one_line_error(capsys)


def test_no_device_means_the_default_one_and_odd_values_are_one_line():
    check_device(None)  # no --device: the default device, which every machine has
    for odd in ([0], 1.5, object()):
        with pytest.raises(ValueError, match="is not available here; available: cpu"):
            check_device(odd)


def test_a_mistyped_flag_is_answered_with_the_nearest_one_of_its_command(capsys):
    """The one-line usage error names the closest flag of the command used, and none when no flag is close."""
    assert cli(["global", "--pruning_ration", "0.2"]) == 2
    assert one_line_error(capsys).endswith(
        "unrecognized arguments: --pruning_ration 0.2; did you mean --pruning_ratio? (--help lists the options)")
    assert cli(["layer", "--save-model", "--xyz"]) == 2
    assert "did you mean --save_model?" in one_line_error(capsys)
    assert cli(["eval", "folder", "--pruning_ratio", "0.2"]) == 2  # a flag of another command is not suggested
    assert "did you mean" not in one_line_error(capsys)
    with pytest.raises(SystemExit, match="2"):  # python global_pruning.py: the command's own parser
        main(["--pruning_ration", "0.2"], command="global")
    assert "did you mean --pruning_ratio?" in one_line_error(capsys)


# 6. + 7. validation before weights or data, and the right words -------------------------------------------------
@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a command gets as far as loading weights."""
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded before validation"))


@pytest.mark.parametrize("command,extra,message", [
    ("layer", ["--freeze_top_n_layers", "9"], "--freeze_top_n_layers must be in [0, 4], got 9"),
    ("layer", ["--remove_layers", "4"], "--remove_layers must be in [0, 4), got 4"),
    ("global", ["--layer_end", "7"], "layer range [0, 7)"),
    ("global", ["--eval_max_windows", "-5"], "must be >= 0, got -5"),
    ("global", ["--finetune", "--lora_r", "0"], "lora_r must be at least 1"),
    ("global", ["--seq_len", "257"], "--seq_len 257 is longer than the model's context (256 tokens"),
    ("layer", ["--outtype", "q4_0"], "--outtype q4_0 is the type of the --save_gguf file: add --save_gguf"),
    ("global", ["--importance_cache", str(Path(__file__))], f"the importance cache {Path(__file__)} is a file"),
    ("global", ["--output_root", str(Path(__file__))], f"--output_root {Path(__file__)} is a file, not a folder"),
])
def test_late_flags_are_checked_first(command, extra, message, tiny_dir, tmp_path, capsys, no_weights):
    out = tmp_path / "runs"
    assert cli([command, "--base_model", str(tiny_dir), "--output_root", str(out), *CHEAP, *extra]) == 2
    assert message in one_line_error(capsys) and not out.exists()


def test_windows_past_a_scaled_rope_context_are_allowed(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32,
                         rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    argv = ["global", "--base_model", str(tmp_path / "m"), "--output_root", str(tmp_path / "runs"), "--device", "cpu",
            "--dry_run", "--seq_len", "100"]
    assert cli(argv) == 0, capsys.readouterr().err  # dynamic scaling stretches the 32-token context at run time
    timing = ["eval", str(tmp_path / "m"), "--in_process", "--device", "cpu", "--prefill_len", "40", "--decode_tokens", "2",
              "--repeats", "1"]
    assert cli(timing) == 0, capsys.readouterr().err  # and so does `eval`'s context check


def test_missing_evaluation_file_is_named_before_loading(tiny_dir, tmp_path, capsys, monkeypatch, no_weights,
                                                         no_packaged_data):
    from llama_pruning.data import sources

    monkeypatch.setenv(sources.DATA_ENV, str(tmp_path))  # no wikitext2/ there
    monkeypatch.setattr(sources, "_hub_rows", lambda *a: (_ for _ in ()).throw(ConnectionError("offline")))
    argv = ["global", "--base_model", str(tiny_dir), "--output_root", str(tmp_path / "runs"), *CHEAP]
    assert main([*argv, "--dataset", str(ROOT / "README.md"), "--test_after_prune"]) == 2
    notice, err = capsys.readouterr().err.strip().splitlines()  # the one announced hub attempt, then the error
    assert "trying the Hugging Face hub" in notice and "Traceback" not in err
    assert "wikitext2/wiki.test.raw" in err and "--test_after_prune" in err and "as the dataset" not in err


def test_wrong_words(tiny_dir, tmp_path, capsys, no_weights):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 8)
    runs = ["--output_root", str(tmp_path / "runs"), *CHEAP]
    assert main(["global", "--base_model", str(empty), *runs]) == 2
    err = one_line_error(capsys)
    assert "hub said" not in err and f"cannot read the model folder {empty}" in err
    assert main(["global", "--base_model", str(tiny_dir), "--dataset", str(tmp_path / "binary.txt"), *runs]) == 2
    assert f"{tmp_path / 'binary.txt'} is not UTF-8 text" in one_line_error(capsys)
    (tmp_path / "blank.txt").write_text("\n   \n\t\n")
    assert main(["global", "--base_model", str(tiny_dir), "--dataset", str(tmp_path / "blank.txt"), *runs]) == 2
    assert f"{tmp_path / 'blank.txt'} holds no text" in one_line_error(capsys)


def test_replayed_plan_records_what_made_it(tiny_dir, tmp_path):
    out = tmp_path / "runs"
    run = ["--base_model", str(tiny_dir), "--output_root", str(out), *CHEAP]
    assert main(["global", *run, "--save_ckpt_log_name", "a", "--pruning_ratio", "0.1",
                 "--importance_method", "magnitude"]) == 0
    assert main(["global", *run, "--save_ckpt_log_name", "b", "--plan", str(out / "a" / PLAN_FILENAME)]) == 0
    metadata = json.loads((out / "b" / PLAN_FILENAME).read_text())["metadata"]
    assert (metadata["pruning_ratio"], metadata["importance_method"]) == (0.1, "magnitude")
    description = (out / "b" / "description.txt").read_text()
    assert "pruning_ratio: 0.1\n" in description and "importance_method: magnitude\n" in description


def test_replayed_plan_refuses_selection_flags_it_would_ignore(tiny_dir, tmp_path, capsys, no_weights):
    plan = random_plan(load_model(str(tiny_dir), device="cpu")[0], seed=1)
    plan.save(tmp_path / PLAN_FILENAME)
    capsys.readouterr()
    replay = ["--base_model", str(tiny_dir), "--output_root", str(tmp_path / "runs"), *CHEAP, "--plan",
              str(tmp_path / PLAN_FILENAME)]
    assert cli(["global", *replay, "--pruning_ratio", "0.5", "--importance_method", "magnitude"]) == 2
    err = one_line_error(capsys)
    assert "--pruning_ratio 0.5, --importance_method magnitude would not be used" in err
    assert cli(["layer", *replay, "--remove_layers", "1"]) == 2
    assert "--remove_layers 1 would not be used" in one_line_error(capsys)
    assert cli(["global", *replay, "--save_gguf", "--round_to", "64"]) == 2
    assert "--round_to 64 would not be used" in one_line_error(capsys)
    # the plan's attention widths (16 per KV group) are not multiples of q8_0's 32 where the dense model's (64) are:
    # refused before any work, where the export would have failed after the cut
    assert cli(["global", *replay, "--save_gguf", "--outtype", "q8_0"]) == 2
    err = one_line_error(capsys)
    assert "have widths that are not multiples of 32" in err
    assert err.endswith(f"--plan {tmp_path / PLAN_FILENAME} fixes them, so choose another --outtype, or swap --save_gguf "
                        "for --save_model and then run `llama-pruning export-gguf --allow_fallback` on the run")
    assert not (tmp_path / "runs").exists()
    # without --plan the same widths are refused from the config alone, unless the command cuts no attention group
    fresh = replay[:-2]
    assert cli(["global", *fresh, "--save_gguf", "--outtype", "q8_0"]) == 2
    assert "attention is cut in whole GQA groups of 16 columns" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()
    for argv in (["layer", *fresh, "--pruning_distribution", "0:10"], ["global", *fresh, "--pruning_ratio", "0"]):
        assert cli([*argv, "--save_gguf", "--outtype", "q8_0", "--dry_run"]) == 0, argv
    # what replaying does use, flags at their defaults, --fast's settings and --save_gguf's own --round_to pass
    for extra in (["--fast"], ["--save_gguf"], ["--pruning_ratio", "0.2", "--importance_method", "obs"],
                  ["--seq_len", "1000"]):  # longer than the context: no calibration runs without reconstruction
        assert cli(["global", *replay, *extra, "--dry_run"]) == 0, extra


def test_a_plan_that_misses_the_ratio_is_logged_as_a_warning(tiny_dir, tmp_path, capsys):
    run = ["--base_model", str(tiny_dir), "--output_root", str(tmp_path / "runs"), *CHEAP, "--pruning_ratio", "0.2"]
    assert main(["global", *run, "--save_ckpt_log_name", "exact"]) == 0
    assert "warning" not in capsys.readouterr().out
    assert main(["global", *run, "--save_ckpt_log_name", "rounded", "--round_to", "64"]) == 0  # every MLP whole
    out = capsys.readouterr().out
    assert "warning: the plan removes" in out and "not the 20.00% asked for (with --round_to 64)" in out


# fuzz -----------------------------------------------------------------------------------------------------------
def mutate(value, rng: random.Random):
    """A random JSON value, or a small change of `value`."""
    pool = [None, True, False, 0, -1, 1, 2.5, 10**9, "", "x", [], {}, [True], [[0]], [[-1]], {"a": 1}, [0, 0]]
    if isinstance(value, list) and value and rng.random() < 0.6:
        value = list(value)
        i = rng.randrange(len(value))
        value[i] = mutate(value[i], rng) if rng.random() < 0.7 else rng.choice(pool)
        return value if rng.random() < 0.8 else value[: rng.randrange(len(value))]
    if isinstance(value, dict) and value and rng.random() < 0.6:
        value = dict(value)
        key = rng.choice(sorted(value))
        value[key] = mutate(value[key], rng)
        return value
    return rng.choice(pool)


FLAG_POOL = ["--pruning_ratio", "--num_samples", "--seq_len", "--device", "--dtype", "--eval_max_windows", "--plan",
             "--freeze_top_n_layers", "--remove_layers", "--layer_start", "--layer_end", "--round_to", "--reconstruct",
             "--importance_method", "--dataset", "--pruning_distribution", "--lora_r", "--finetune", "--save_model",
             "--test_after_prune", "--save_ckpt_log_name", "--seed", "--nonsense", "--overwrite", "--trust_remote_code"]
VALUE_POOL = ["0", "1", "-1", "4", "99", "0.5", "1.5", "nan", "", "cpu", "foo", "cuda", "float16", "2:8", "x:y",
              "taylor", "none", "lsq", "/nonexistent", "wikitext2", "../escape", ".hidden", "a b"]


def random_argv(rng: random.Random, tiny_dir: Path, out: Path) -> list[str]:
    """A pruning command on the tiny model (or, now and then, a folder that is no model) with random flags."""
    base = rng.choice([tiny_dir] * 6 + [out.parent, Path("/nonexistent")])  # never a hub id: no network here
    argv = [rng.choice(["global", "layer"]), "--base_model", str(base), "--output_root", str(out), *CHEAP]
    for _ in range(rng.randint(0, 3)):
        argv.append(rng.choice(FLAG_POOL))
        if rng.random() < 0.85:
            argv.append(rng.choice(VALUE_POOL))
    return argv


class _Validated(Exception):
    """Raised where a run would start its real work: everything before it is what the fuzz exercises."""


def test_fuzz_plans_and_arguments_in_process(tiny_dir, tmp_path, capsys, monkeypatch):
    """~200 seeded cases: each is accepted or ends in exit 2 with one line on stderr, never anything else."""
    rng = random.Random(16)
    base = plan_dict()
    plans, commands = {"ok": 0, "refused": 0}, {"ok": 0, "refused": 0}
    for _ in range(100):
        data = mutate(base, rng) if rng.random() < 0.1 else {**base, rng.choice(sorted(base)): mutate(base, rng)}
        if rng.random() < 0.3:  # a valid change: fewer kept channels in one layer
            data = {**base, "mlp_channels": [list(range(rng.randrange(65)))] + base["mlp_channels"][1:]}
        try:
            PruningPlan.from_dict(data)
            plans["ok"] += 1
        except PlanError as err:
            assert "\n" not in str(err)
            plans["refused"] += 1
    monkeypatch.setattr(RunDir, "__init__", lambda *a, **k: (_ for _ in ()).throw(_Validated()))
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({**base, "base_model": str(tiny_dir)}))
    for _ in range(100):
        argv = [str(plan_file) if a == "/nonexistent" and rng.random() < 0.5 else a
                for a in random_argv(rng, tiny_dir, tmp_path / "runs")]
        try:
            code = cli(argv)
        except _Validated:
            commands["ok"] += 1
            continue
        captured = capsys.readouterr()
        assert code == 2, (argv, code, captured.err)
        assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err, (argv, captured.err)
        commands["refused"] += 1
    assert min(*plans.values(), *commands.values()) >= 10, (plans, commands)  # both outcomes are exercised
    assert not (tmp_path / "runs").exists()


def test_fuzz_arguments_in_subprocesses(tiny_dir, tmp_path):
    """A handful of random command lines in a fresh interpreter: success or exit 2 with one stderr line."""
    rng = random.Random(1616)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = []
    for i in range(3):  # started together: the interpreters' start-up is most of the time
        argv = random_argv(rng, tiny_dir, tmp_path / f"runs{i}")
        runs.append((argv, subprocess.Popen([sys.executable, "-m", "llama_pruning.cli.main", *argv], env=env,
                                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    for argv, proc in runs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode in (0, 2) and "Traceback" not in stderr, (argv, stderr[-2000:])
        if proc.returncode == 2:
            errors = [line for line in stderr.splitlines() if "error" in line]
            assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1], (argv, stderr)
