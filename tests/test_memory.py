"""Memory: the analytic model, --dry_run, dtype auto, bf16 as a first-class dtype, the layer-by-layer Taylor pass's plan."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from llama_pruning import memory
from llama_pruning.cli.main import main
from llama_pruning.importance import compute_importance
from llama_pruning.models.loading import pick_dtype
from llama_pruning.reconstruct import prune_with_reconstruction
from llama_pruning.selection import global_plan
from tests.test_importance import markov_tokens, train_markov_model
from tests.tiny import tiny_model


def test_weight_bytes_are_the_parameter_bytes():
    model = tiny_model(layers=3, intermediate=24)
    assert memory.weight_bytes(model.config, "float32") == 4 * sum(p.numel() for p in model.parameters())
    # Llama-3-8B: 8,030,261,248 parameters
    assert memory.weight_bytes(memory.SHAPES["8b"], "bfloat16") == 2 * 8_030_261_248


def test_default_command_on_llama3_8b_bf16_projects_under_22_gb():
    peaks = memory.phase_peaks(memory.SHAPES["8b"], memory.Workload())
    assert set(peaks) == {"load", "importance", "selection", "reconstruction", "save"}
    assert max(peaks.values()) <= 22e9
    assert peaks["importance"] > peaks["load"] and peaks["reconstruction"] > peaks["load"]


def test_block_reconstruction_on_llama3_8b_bf16_projects_under_22_gb():
    """--reconstruct block draws 384 windows by default; beyond lsq on as many it holds a third stream (the cut layer's
    inputs) and the layer's dense copy instead of the MLP's (its targets later replace the freed post-attention stream)."""
    config = memory.SHAPES["8b"]
    block = memory.phase_peaks(config, memory.Workload())["reconstruction"]
    lsq = memory.phase_peaks(config, memory.Workload(reconstruct="lsq", reconstruct_samples=384))["reconstruction"]
    stream, mlp = 384 * 128 * 4096 * 2, 3 * 4096 * 14336 * 2
    assert block >= lsq + stream + memory._layer_params(config) * 2 - mlp
    assert block == memory.phase_peaks(config, memory.Workload(reconstruct_samples=384))["reconstruction"]
    assert block <= 22e9 < memory.phase_peaks(config, memory.Workload(reconstruct_samples=512))["reconstruction"]


def test_a_span_of_refined_layers_holds_adam_state_for_each_and_is_given_up_first():
    """--reconstruct_span 2 refines two layers at once: their float32 weights, gradients and Adam moments (16 bytes per
    parameter) and bf16 dense copies (2) each, which takes Llama-3-8B over 22 GB; a span of 1 is the first remedy."""
    config = memory.SHAPES["8b"]
    one, two = (memory.phase_peaks(config, memory.Workload(span=k))["reconstruction"] for k in (1, 2))
    assert two - one >= memory._layer_params(config) * (2 + 16) and two > 22e9 >= one
    assert memory.remedies(config, memory.Workload(span=2), int(22e9)) == ["--reconstruct_span 1"]


def test_the_last_layers_kl_adds_one_micro_batch_of_logits_and_stays_under_22_gb_on_llama3_8b_bf16():
    """--reconstruct_last_loss kl (the default): the logit gradient of 4 x 128 tokens (bf16) and one chunk of float32
    softmax work; a float32 model also keeps a bfloat16 copy of its head."""
    config = memory.SHAPES["8b"]
    mse, kl = (memory.phase_peaks(config, memory.Workload(last_loss=loss))["reconstruction"] for loss in ("mse", "kl"))
    assert mse < kl <= 22e9
    # the default (auto) is kl; with a span of 2 the refine term is the larger one
    assert memory.phase_peaks(config, memory.Workload())["reconstruction"] == kl
    refine = memory.phase_peaks(config, memory.Workload(span=2, last_loss="mse"))["reconstruction"]
    both = memory.phase_peaks(config, memory.Workload(span=2, last_loss="kl"))["reconstruction"]
    assert both - refine == 512 * 128256 * 2 + memory.KL_ROWS * 128256 * 16
    f32 = [memory.phase_peaks(config, memory.Workload(dtype="float32", span=2, last_loss=loss))["reconstruction"]
           for loss in ("mse", "kl")]
    assert f32[1] - f32[0] == 512 * 128256 * 4 + memory.KL_ROWS * 128256 * 16 + 128256 * 4096 * 2


def test_remedies_pick_the_flags_that_fit():
    config, work = memory.SHAPES["8b"], memory.Workload(dtype="float32")
    assert memory.remedies(config, work, 10**15) == []
    flags = memory.remedies(config, work, 22 * 10**9)
    assert flags[0] == "--dtype bfloat16"
    fixed = memory.Workload(dtype="bfloat16")
    assert max(memory.phase_peaks(config, fixed).values()) <= 22e9
    assert memory.remedies(config, work, 10**9) is None  # the weights alone do not fit
    # the default's block refinement is the first thing given up in bf16, and no flag raises a setting already lower
    # the last layer's KL is given up first; where lsq is needed anyway it saves it too, so it is not named
    assert memory.remedies(config, memory.Workload(), int(21.8e9)) == ["--reconstruct_last_loss mse"]
    assert memory.remedies(config, memory.Workload(), int(21.5e9)) == ["--reconstruct lsq"]
    small = memory.Workload(reconstruct="bias", reconstruct_samples=32, dtype="float16")
    assert memory.remedies(config, small, 20 * 10**9) == ["--num_samples 32", "--gradient_batch_size 1"]


def test_a_projection_that_cannot_fit_names_what_is_too_big():
    config = memory.SHAPES["8b"]
    weights = memory.weight_bytes(config, "bfloat16")
    text, fits = memory.projection_report(config, memory.Workload(), "cuda:0", weights // 2)
    assert not fits and "the weights alone need more" in text
    long = memory.Workload(num_samples=64, seq_len=8192)
    text, fits = memory.projection_report(config, long, "cuda:0", weights + 2**30)
    assert not fits and "what 8192-token windows hold" in text and "--seq_len" in text and "weights alone" not in text


def test_dtype_auto_is_float32_on_cpu():
    assert pick_dtype("auto", "cpu") == "float32"
    assert pick_dtype("auto", "cuda:0") == "auto"
    assert pick_dtype("bfloat16", "cpu") == "bfloat16"


def test_dry_run_reads_the_config_only_and_advises(tmp_path, monkeypatch, capsys):
    model = tiny_model(layers=2, intermediate=16)
    model.config.max_position_embeddings = 128  # the default --seq_len's windows fit its context
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "runs"
    argv = ["global", "--base_model", str(tmp_path / "m"), "--output_root", str(out), "--device", "cpu", "--dry_run"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "projected peak memory on cpu (float32, 64 x 128 calibration tokens, obs + block)" in text
    assert not out.exists()  # nothing loaded, nothing written
    in_bf16 = max(memory.phase_peaks(model.config, memory.Workload(dtype="bfloat16")).values())
    monkeypatch.setattr(memory, "device_memory", lambda device: in_bf16)
    assert main(argv) == 2
    assert capsys.readouterr().out.endswith("does not fit; these flags bring it under the device's memory: --dtype bfloat16\n")
    monkeypatch.setattr(memory, "device_memory", lambda device: in_bf16 // 100)
    assert main(argv) == 2
    assert "what 128-token windows hold" in capsys.readouterr().out  # its weights are tiny
    assert main([*argv, "--layer_end", "9"]) == 2  # bad input fails the dry run as it would fail the run
    assert "layer range" in capsys.readouterr().err and not out.exists()


def _held_out_ppl(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


def test_bf16_default_pipeline_ppl_within_2_percent_of_float32():
    """taylor + global selection + lsq with drift, in bfloat16 and in float32: same quality to 2 %."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = train_markov_model()
        calib, held_out = markov_tokens(16, 32, seed=2), markov_tokens(32, 32, seed=3)
        ppl = {}
        for dtype in (torch.float32, torch.bfloat16):
            copy_ = copy.deepcopy(model).to(dtype)
            table = compute_importance(copy_, calib, "taylor", progress=False)
            plan, _ = global_plan(copy_, table, 0.2)
            prune_with_reconstruction(copy_, plan, calib, "lsq", ridge=30.0, progress=False)
            ppl[dtype] = _held_out_ppl(copy_.float(), held_out)
    finally:
        torch.set_num_threads(threads)
    assert abs(ppl[torch.bfloat16] / ppl[torch.float32] - 1) < 0.02, ppl


def _whole_model_taylor(model, samples: torch.Tensor) -> np.ndarray:
    """Reference Taylor scores: one autograd backward of the whole model, then |w * g| summed per unit by hand."""
    model.zero_grad()
    model(input_ids=samples, labels=samples).loss.backward()
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads * head_dim  # query rows per KV head
    scores = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        wg = {name: (lin.weight * lin.weight.grad).abs().double()
              for name, lin in [("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj),
                                ("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)]}
        heads = config.num_key_value_heads
        scores.append(wg["q"].reshape(heads, group, -1).sum((1, 2)) + wg["k"].reshape(heads, -1).sum(1)
                      + wg["v"].reshape(heads, -1).sum(1) + wg["o"].reshape(-1, heads, group).sum((0, 2)))
        scores.append(wg["gate"].sum(1) + wg["up"].sum(1) + wg["down"].sum(0))
    model.zero_grad(set_to_none=True)
    return torch.cat(scores).detach().numpy()


@pytest.mark.slow
def test_layerwise_taylor_selects_the_same_smollm2_plan_as_a_whole_model_backward(smollm2, data_dir):
    """The layer-by-layer pass gives a whole-model backward's scores and hence its 20 % plan (same libraries)."""
    from llama_pruning.data import get_calibration_samples

    model, tokenizer = smollm2
    samples = get_calibration_samples(tokenizer, "wikitext2", 16, 128, 0)
    table = compute_importance(model, samples, "taylor", progress=False)
    reference = _whole_model_taylor(model, samples)
    np.testing.assert_allclose(table.importance, reference, rtol=1e-3, atol=1e-3 * np.median(reference))
    plan = global_plan(model, table, 0.2)[0]
    expected = global_plan(model, table.assign(importance=reference), 0.2)[0]

    def kept(p) -> set:
        return {("attn", i, g) for i, gs in enumerate(p.attn_groups) for g in gs} | {
            ("mlp", i, c) for i, cs in enumerate(p.mlp_channels) for c in cs}

    # the same plan up to rounding: at most one near-tied pair swapped at the knapsack's boundary
    assert len(kept(plan) ^ kept(expected)) <= 2
