"""The README's first command works for a newcomer: bare clone, no ../shared, no environment variable, offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# appended to keep the run short; the install steps, the script and its own flags are the README's
CHEAP = "--num_samples 4 --seq_len 64 --reconstruct_samples 4 --eval_max_windows 2"
LEAKS = ("LLAMA_PRUNING_DATA", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "PYTHONPATH", "VIRTUAL_ENV", "PIP_")


def readme_main_command() -> str:
    """The README's first ```bash block, which must be one command line."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1).strip()
    assert "\n" not in block, "the README's first block should be one command line"
    return block


def test_readme_main_command_is_self_contained():
    command = readme_main_command()
    assert "python global_pruning.py" in command and "--save_model" in command and "pip install -e ." in command
    assert "LLAMA_PRUNING_DATA" not in command and "../" not in command  # no variable, no path outside the clone


@pytest.mark.slow
def test_readme_main_command_runs_in_a_bare_clone_offline(tmp_path):
    """Clone HEAD into a folder with nothing beside it, install as the README says into a throwaway venv (that sees
    the machine's packages, so pip needs no network) with a fresh model cache, run, and reload the saved model."""
    clone = tmp_path / "llama-pruning"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    assert not (tmp_path / "shared").exists()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    # the venv's own (old, bundled) setuptools would hide the machine's, which torch's metadata and our build need
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True)
    # offline pip: no index, and the build backend (setuptools) from the machine instead of a download
    command = readme_main_command().replace("pip install ", "pip install --no-index --no-build-isolation ")
    env = {k: v for k, v in os.environ.items() if not k.startswith(LEAKS)}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(venv), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", LLAMA_PRUNING_CACHE=str(tmp_path / "cache"), PIP_NO_INPUT="1")
    proc = subprocess.run(["bash", "-c", f"set -e; {command} {CHEAP}"], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert "Hugging Face hub" not in out  # the data came from the package, not a hub attempt
    run = clone / "prune_log" / "global_pruning"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert "wikitext2 PPL after pruning: " in lines[-3] and f"model saved in {run.relative_to(clone)} " in lines[-2]
    assert (tmp_path / "cache" / "smollm2-135m-fp32" / "config.json").is_file()  # the first-run conversion happened
    from llama_pruning.models import load_model
    from llama_pruning.models.arch import count_params

    model, tokenizer = load_model(str(run), dtype="float32", device="cpu")
    assert count_params(model) == json.loads((run / "metrics.json").read_text())["params_after"]
    with torch.no_grad():
        logits = model(**tokenizer("The capital of France is", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
