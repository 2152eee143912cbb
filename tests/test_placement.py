"""Device maps (llama_pruning.placement): a model spread over CPU memory and an offload folder on disk prunes,
reconstructs and evaluates exactly like the same model held whole on one device."""

from __future__ import annotations

import json
import re

import pytest
import torch

from llama_pruning import placement as placement_module
from llama_pruning.evaluation.ppl import window_perplexity
from llama_pruning.importance import compute_importance, layer_importance
from llama_pruning.models import load_model
from llama_pruning.placement import Placement, device_map_summary, parse_max_memory, prepare, run_device
from llama_pruning.reconstruct import prune_with_reconstruction
from llama_pruning.selection import global_plan
from tests.test_cli import FAST, run_cli
from tests.test_reliability import make_tiny_dir
from tests.tiny import tiny_model


def _budget(model: torch.nn.Module, layers_in_memory: int) -> int:
    """CPU bytes for the embeddings and `layers_in_memory` decoder layers: the rest of the model goes to disk."""
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    return model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size() + layers_in_memory * layer


@pytest.fixture
def tiny_folder(tmp_path):
    model = tiny_model(layers=4, bias=True, seed=3)
    model.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", _budget(model, 2) + 1024


def _prune(model: torch.nn.Module, method: str, mode: str, span: int = 1, last_loss: str = "mse") -> tuple:
    """Importance, a 50 % global plan, reconstruction (`mode`, block's `span` and `last_loss`) with drift; the table, the
    plan, and the pruned logits."""
    generator = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 97, (6, 16), generator=generator)
    table = compute_importance(model, samples, method, gradient_batch_size=4, progress=False)
    plan, _ = global_plan(model, table, 0.5)
    prune_with_reconstruction(model, plan, samples, mode=mode, ridge=10.0, batch_size=4, drift_weight=0.5,
                              progress=False, block_span=span, last_loss=last_loss)
    probe = torch.randint(0, 97, (3, 16), generator=generator)
    with torch.no_grad():
        logits = model(input_ids=probe, use_cache=False).logits
    return table, model.pruning_plan, logits, window_perplexity(model, probe, batch_size=2)


@pytest.mark.parametrize(("method", "mode", "span", "last_loss"), [
    ("taylor", "lsq", 1, "mse"), ("taylor_2nd", "lsq", 1, "mse"), ("wanda", "lsq", 1, "mse"), ("obs", "lsq", 1, "mse"),
    ("obs", "block", 1, "mse"), ("obs", "block", 2, "mse"), ("obs", "block", 1, "kl")])
def test_offloaded_model_gives_the_same_plan_and_pruned_logits(tiny_folder, tmp_path, method, mode, span, last_loss):
    """Same operations on the same device in the same order: the dispatched run must match bit for bit (block's Adam
    steps on an offloaded layer included, also when two layers at a time are refined jointly, and the last layer's KL
    through the offloaded final norm and head)."""
    folder, budget = tiny_folder
    plain, _ = load_model(str(folder), dtype="float32", device="cpu", tokenizer=False)
    placed, _ = load_model(str(folder), dtype="float32", tokenizer=False,
                           placement=Placement("auto", {"cpu": budget}, str(tmp_path / "offload")))
    devices = set(placed.hf_device_map.values())
    assert devices == {"cpu", "disk"}, placed.hf_device_map
    assert placed.model.layers[3].mlp.up_proj.weight.device.type == "meta"  # really offloaded
    table, plan, logits, ppl = _prune(plain, method, mode, span, last_loss)
    table_d, plan_d, logits_d, ppl_d = _prune(placed, method, mode, span, last_loss)
    assert table.equals(table_d)
    assert plan_d.attn_groups == plan.attn_groups and plan_d.mlp_channels == plan.mlp_channels
    # both blocks are cut in a layer that lives on disk (layers 2 and 3), so both re-fits are written back there
    assert min(len(plan.attn_groups[2]), len(plan.attn_groups[3])) < 4 and len(plan.mlp_channels[2]) < 48
    assert torch.equal(logits, logits_d) and ppl == ppl_d
    # the cut, re-fitted weights of the offloaded layers were written back to the offload folder
    assert any((tmp_path / "offload").glob("model.layers.3.mlp.down_proj.weight.dat"))
    assert placed.model.layers[3].mlp.down_proj.weight.shape == plain.model.layers[3].mlp.down_proj.weight.shape


def test_offloaded_layer_importance_matches(tiny_folder, tmp_path):
    folder, budget = tiny_folder
    plain, _ = load_model(str(folder), dtype="float32", device="cpu", tokenizer=False)
    placed, _ = load_model(str(folder), dtype="float32", tokenizer=False,
                           placement=Placement("auto", {"cpu": budget}, str(tmp_path / "offload")))
    samples = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    for method in ("block_influence", "removal"):
        assert (layer_importance(plain, samples, method, progress=False)
                == layer_importance(placed, samples, method, progress=False))


def test_map_onto_one_device_is_placed_there(tiny_folder):
    """A map that puts the whole model on one device (here the CPU, capped by max_memory) leaves no hooks and no
    hf_device_map; the model still counts as placed there: the log line names it and no --device moves it."""
    folder, _ = tiny_folder
    placed, _ = load_model(str(folder), dtype="float32", tokenizer=False, placement=Placement("auto", {"cpu": 2**30}))
    assert not hasattr(placed, "hf_device_map")
    assert device_map_summary(placed) == "cpu: whole model"
    cpu = torch.device("cpu")
    assert run_device(placed, "meta") == cpu and prepare(placed, "meta") == cpu
    assert {p.device for p in placed.parameters()} == {cpu}


def test_global_with_device_map_auto_on_one_device(tmp_path, capsys):
    """`--device_map auto` where the model fits on one device (a CPU-only machine, or one GPU) runs there."""
    from llama_pruning.cli.main import main

    folder = make_tiny_dir(tmp_path / "tiny")
    assert main(["global", "--base_model", str(folder), "--output_root", str(tmp_path / "runs"), "--num_samples", "4",
                 "--seq_len", "32", "--reconstruct", "none", "--importance_method", "taylor", "--device_map", "auto"]) == 0
    log = next((tmp_path / "runs" / "global_pruning").glob("2*/training.log")).read_text()
    assert re.search(r"device map \(auto\): (cpu|cuda:0): whole model\n", log), log


def test_max_memory_parsing():
    assert parse_max_memory("0=20GiB, 1=1.5GB,cpu=60MiB") == {0: 20 * 2**30, 1: 1_500_000_000, "cpu": 60 * 2**20}
    assert parse_max_memory("cpu=1000") == {"cpu": 1000}
    for bad in ("20GiB", "gpu0=20GiB", "cpu=lots", "cpu=1=2", "cpu=-5GB"):
        with pytest.raises(ValueError, match="--max_memory"):
            parse_max_memory(bad)


@pytest.mark.parametrize("argv,message", [
    (["--device_map", "everywhere"], "invalid choice"),
    (["--device_map", "auto", "--max_memory", "cpu=lots"], "DEVICE=SIZE"),
    (["--max_memory", "cpu=1GiB"], "--max_memory applies to --device_map only"),
    (["--device_map", "auto", "--device", "cpu"], "exclude each other"),
    (["--device_map", "auto", "--save_gguf"], "--save_gguf is not supported with --device_map"),
])
def test_bad_placement_flags_give_one_line(tmp_path, argv, message):
    proc = run_cli("global_pruning.py", *argv, "--output_root", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_with_device_map_matches_the_plain_run(tmp_path, data_dir):
    """The global command (taylor + lsq) on a tiny model with SmolLM2's tokenizer, once whole on the CPU and once
    with layers offloaded to disk: the same plan, the same perplexity and the same saved weights."""
    from safetensors.torch import load_file

    from llama_pruning.models.loading import smollm2_hf_dir

    model = tiny_model(layers=4, vocab_size=49152, seed=5)
    model.config.name_or_path = "tiny-with-smollm2-tokenizer"
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((smollm2_hf_dir() / name).read_bytes())
    budget = _budget(model, 1) + 1024
    common = ["--base_model", str(folder), "--output_root", str(tmp_path / "runs"), "--pruning_ratio", "0.05",
              "--reconstruct_samples", "4", "--test_after_prune", "--eval_max_windows", "2", "--save_model",
              "--importance_cache", "none", *[a for a in FAST if a not in ("--device", "cpu")]]
    plain = run_cli("global_pruning.py", *common, "--device", "cpu", "--save_ckpt_log_name", "plain")
    assert plain.returncode == 0, plain.stderr[-2000:]
    placed = run_cli("global_pruning.py", *common, "--save_ckpt_log_name", "placed", "--device_map", "auto",
                     "--max_memory", f"cpu={budget}", "--offload_dir", str(tmp_path / "offload"))
    assert placed.returncode == 0, placed.stderr[-2000:]
    runs = tmp_path / "runs"
    log = next((runs / "placed").glob("2*/training.log")).read_text()
    assert "device map (auto): " in log and "disk: " in log
    plans = [json.loads((runs / name / "pruning_plan.json").read_text()) for name in ("plain", "placed")]
    assert plans[0]["attn_groups"] == plans[1]["attn_groups"] and plans[0]["mlp_channels"] == plans[1]["mlp_channels"]
    metrics = [json.loads((runs / name / "metrics.json").read_text()) for name in ("plain", "placed")]
    assert metrics[0]["wikitext2 PPL after pruning"] == metrics[1]["wikitext2 PPL after pruning"]
    first, second = (load_file(runs / name / "model.safetensors") for name in ("plain", "placed"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_dry_run_with_a_device_map_does_not_refuse(tiny_folder, tmp_path, monkeypatch, capsys):
    """The projection is for one device; with a map the run is not refused for it (exit 0, a line says why)."""
    from llama_pruning import memory
    from llama_pruning.cli.main import main

    folder, _ = tiny_folder
    monkeypatch.setattr(memory, "device_memory", lambda device: 1)
    argv = ["global", "--base_model", str(folder), "--output_root", str(tmp_path / "runs"), "--dry_run",
            "--seq_len", "32"]  # within the tiny model's context
    assert main(argv) == 2
    assert main([*argv, "--device_map", "auto"]) == 0
    assert "with --device_map the weights are spread" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(placement_module._TRIM is None, reason="glibc's malloc_trim only")
def test_release_host_memory_returns_freed_heap_pages():
    """Freed heap chunks below glibc's mmap threshold stay resident while a live chunk above them pins the heap's
    top; release_host_memory hands them back (a layer-by-layer stage frees such memory at every layer)."""
    def rss() -> int:
        with open("/proc/self/status") as status:
            return int(status.read().split("VmRSS:")[1].split()[0]) * 1024

    chunks = [bytearray(b"x" * 100_000) for _ in range(2000)]  # 200 MB, touched, from the heap
    pinned = chunks[-1]
    del chunks[:-1]
    before = rss()
    placement_module.release_host_memory()
    assert before - rss() > 100 * 2**20 and len(pinned) == 100_000
