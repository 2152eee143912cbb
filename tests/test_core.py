"""Core engine: plan validation, exact surgery, parameter accounting, HF save/reload."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from llama_pruning.models.arch import UnsupportedModelError, count_params, matmul_attention, model_spec
from llama_pruning.models.export import save_pruned_model
from llama_pruning.plan import PLAN_FILENAME, PlanError, PruningPlan
from llama_pruning.surgery import apply_plan, expand_to_dense
from tests.tiny import random_plan, tiny_model


def masked_copy(model, plan: PruningPlan):
    """The dense model with every unit the plan drops zeroed (the reference the cut model must equal)."""
    masked = copy.deepcopy(model)
    spec = model_spec(model)
    hd, n_rep = spec.head_dim, spec.n_rep
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for g in set(range(spec.num_kv_heads)) - set(plan.attn_groups[i]):
                q = slice(g * n_rep * hd, (g + 1) * n_rep * hd)
                kv = slice(g * hd, (g + 1) * hd)
                for lin, rows in ((attn.q_proj, q), (attn.k_proj, kv), (attn.v_proj, kv)):
                    lin.weight[rows] = 0
                    if lin.bias is not None:
                        lin.bias[rows] = 0
                attn.o_proj.weight[:, q] = 0
            if not plan.attn_groups[i] and attn.o_proj.bias is not None:
                attn.o_proj.bias.zero_()
            drop = sorted(set(range(spec.intermediate_size)) - set(plan.mlp_channels[i]))
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight[drop] = 0
                if lin.bias is not None:
                    lin.bias[drop] = 0
            mlp.down_proj.weight[:, drop] = 0
            if not plan.mlp_channels[i] and mlp.down_proj.bias is not None:
                mlp.down_proj.bias.zero_()
    return masked


def cut(model, plan):
    return apply_plan(copy.deepcopy(model), plan)


CASES = [
    (1, 4, "llama", False),
    (3, 2, "llama", False),
    (3, 2, "llama", True),
    (4, 2, "mistral", False),
    (8, 2, "qwen2", True),
    (4, 3, "qwen2", False),
]


@pytest.mark.parametrize("n_rep,kv,family,bias", CASES)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float64, 1e-8)])
def test_cut_equals_masked(n_rep, kv, family, bias, dtype, atol):
    model = tiny_model(n_rep=n_rep, kv_heads=kv, model_type=family, bias=bias, dtype=dtype)
    x = torch.randint(0, 97, (2, 12))
    for seed in range(3):
        plan = random_plan(model, seed=seed, remove_blocks=seed != 0)
        pruned = cut(model, plan)
        with torch.no_grad():
            expected = masked_copy(model, plan)(x).logits
            got = pruned(x).logits
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
        assert pruned.config.num_hidden_layers == len(plan.kept_layers)
        for layer in pruned.model.layers:  # the Q:KV ratio survives in every layer
            if hasattr(layer.self_attn, "q_proj"):
                assert layer.self_attn.q_proj.out_features == n_rep * layer.self_attn.k_proj.out_features


@pytest.mark.parametrize("n_rep,kv,family,bias", CASES)
def test_expand_to_dense_computes_what_the_cut_model_does(n_rep, kv, family, bias):
    """Padding a cut model back to dense shapes (--iterative_steps) changes no output and zeroes exactly the cut units."""
    model = tiny_model(n_rep=n_rep, kv_heads=kv, model_type=family, bias=bias, dtype=torch.float64)
    plan = random_plan(model, seed=1, remove_blocks=False)
    pruned = cut(model, plan)
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        expected = pruned(x).logits
        padded = expand_to_dense(pruned, plan)
        got = padded(x).logits
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    assert {n: p.shape for n, p in padded.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    reference = masked_copy(model, plan).state_dict()
    assert all(torch.equal(t, reference[name]) for name, t in padded.state_dict().items())
    again = random_plan(model, seed=2, remove_blocks=False)  # the padded model takes a new plan like a dense one
    assert count_params(apply_plan(padded, again)) == again.param_report(model)["params_after"]


def test_expand_to_dense_refuses_emptied_blocks_and_other_plans():
    model = tiny_model()
    plan = random_plan(model, seed=0)  # empties blocks and deletes a layer
    with pytest.raises(PlanError, match="cannot be padded"):
        expand_to_dense(cut(model, plan), plan)
    kept = random_plan(model, seed=1, remove_blocks=False)
    with pytest.raises(PlanError, match="the plan the model was cut to"):
        expand_to_dense(cut(model, kept), random_plan(model, seed=2, remove_blocks=False))


@pytest.mark.parametrize("tie", [False, True])
def test_param_report_is_exact(tie):
    model = tiny_model(n_rep=3, kv_heads=2, bias=True, tie=tie)
    for seed in range(4):
        plan = random_plan(model, seed=seed)
        plan.bias_compensation = [seed % 2 == 1] * plan.num_layers
        report = plan.param_report(model)
        assert report["params_before"] == count_params(model)
        pruned = cut(model, plan)
        assert report["params_after"] == count_params(pruned)
        for row, layer in zip([r for r in report["layers"] if r["params_after"]], pruned.model.layers, strict=True):
            assert row["params_after"] == count_params(layer)


def test_generate_with_kv_cache_after_removing_first_attention():
    model = tiny_model(n_rep=2, kv_heads=2, layers=4)
    plan = random_plan(model, seed=3)  # empties layer 0's attention, layer 1's MLP, deletes layer 2
    pruned = cut(model, plan)
    x = torch.randint(0, 97, (1, 6))
    out = pruned.generate(x, max_new_tokens=6, do_sample=False, use_cache=True)
    # the same greedy continuation recomputed without a cache, token by token
    seq = x
    for _ in range(6):
        with torch.no_grad():
            nxt = pruned(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_plan_json_roundtrip(tmp_path):
    model = tiny_model()
    plan = random_plan(model, seed=1)
    plan.save(tmp_path / "p.json")
    again = PruningPlan.load(tmp_path / "p.json")
    assert again == plan
    assert again.base_model == "tiny-llama"
    assert again.removed_layers == [2]


def test_bad_plans_are_refused():
    model = tiny_model(n_rep=2, kv_heads=4)
    spec = model_spec(model)
    plan = PruningPlan.dense(spec, "tiny")
    plan.attn_groups[1] = [0, 4]
    with pytest.raises(PlanError, match="out of range"):
        apply_plan(copy.deepcopy(model), plan)
    plan = PruningPlan.dense(spec, "tiny")
    plan.mlp_channels[0] = [1, 1, 2]
    with pytest.raises(PlanError, match="duplicate"):
        apply_plan(copy.deepcopy(model), plan)
    other = PruningPlan.dense(model_spec(tiny_model(n_rep=1, kv_heads=4)), "other")
    with pytest.raises(PlanError, match="another model"):
        apply_plan(copy.deepcopy(model), other)
    empty = PruningPlan.dense(spec, "tiny")
    empty.attn_groups = [[] for _ in range(spec.num_layers)]
    empty.mlp_channels = [[] for _ in range(spec.num_layers)]
    with pytest.raises(PlanError, match="every layer"):
        apply_plan(copy.deepcopy(model), empty)
    pruned = cut(model, random_plan(model))
    with pytest.raises(PlanError, match="already pruned"):
        apply_plan(pruned, PruningPlan.dense(spec, "tiny"))


def test_bad_plan_files(tmp_path):
    with pytest.raises(PlanError, match="not found"):
        PruningPlan.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        PruningPlan.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(PlanError, match="not a pruning plan"):
        PruningPlan.load(tmp_path / "other.json")


def test_unsupported_architectures(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, PhiConfig

    from llama_pruning.models import load_model

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'"):
        model_spec(gpt2)
    phi = PhiConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    phi.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'phi'.*Llama"):
        load_model(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["llama_pruning"] = None  # our package must not be needed
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code={remote}, dtype=torch.float32)
    x = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(x).logits, sys.argv[3])
    print(type(model).__name__)
    """
)


def reload_logits(folder, x, remote: bool, tmp_path):
    script = tmp_path / "reload.py"
    script.write_text(RELOAD_SCRIPT.format(remote=remote))
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "y.pt"), proc.stdout.strip()


def test_save_uniform_plan_is_vanilla(tmp_path):
    model = tiny_model(n_rep=2, kv_heads=4)
    spec = model_spec(model)
    plan = PruningPlan.dense(spec, "tiny")
    plan.attn_groups = [[0, 2] for _ in range(spec.num_layers)]
    plan.mlp_channels = [list(range(0, spec.intermediate_size, 2)) for _ in range(spec.num_layers)]
    pruned = cut(model, plan)
    out = save_pruned_model(pruned, None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "pruned_layout" not in config
    assert (config["num_key_value_heads"], config["num_attention_heads"], config["intermediate_size"]) == (2, 4, 24)
    assert not (out / "modeling_pruned.py").exists()
    assert PruningPlan.load(out / PLAN_FILENAME) == plan
    x = torch.randint(0, 97, (2, 9))
    logits, cls = reload_logits(out, x, remote=False, tmp_path=tmp_path)
    assert cls == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.equal(logits, pruned(x).logits)


@pytest.mark.parametrize("family,bias", [("llama", False), ("qwen2", True)])
def test_save_non_uniform_plan_needs_only_transformers(tmp_path, family, bias):
    model = tiny_model(n_rep=2, kv_heads=3, model_type=family, bias=bias)
    plan = random_plan(model, seed=5)
    plan.bias_compensation = [True, False, False, True]
    pruned = cut(model, plan)
    with torch.no_grad():
        pruned.model.layers[-1].mlp.down_proj.bias.normal_()
    out = save_pruned_model(pruned, None, tmp_path / "m", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_pruned.Pruned")
    assert len(config["pruned_layout"]) == config["num_hidden_layers"] == 3
    kv, widths = ([entry[key] for entry in config["pruned_layout"]] for key in ("num_key_value_heads", "intermediate_size"))
    summary = config["pruned_summary"]  # the real shapes where a reader of config.json looks
    assert summary["num_key_value_heads"] == {"min": min(kv), "max": max(kv), "total": sum(kv)}
    assert summary["num_attention_heads"] == {"min": 2 * min(kv), "max": 2 * max(kv), "total": 2 * sum(kv)}
    assert summary["intermediate_size"] == {"min": min(widths), "max": max(widths), "total": sum(widths)}
    assert summary["layers_without_attention"] == [i for i, n in enumerate(kv) if n == 0] != []
    assert summary["layers_without_mlp"] == [i for i, n in enumerate(widths) if n == 0] != []
    x = torch.randint(0, 97, (2, 9))
    logits, cls = reload_logits(out, x, remote=True, tmp_path=tmp_path)
    assert cls.startswith("Pruned")
    with torch.no_grad():
        assert torch.equal(logits, pruned(x).logits)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.slow
def test_smollm2_random_plan_exact(smollm2):
    model = copy.deepcopy(smollm2[0]).double()  # float64: the comparison is then exact to 1e-8
    spec = model_spec(model)
    assert (spec.num_layers, spec.num_kv_heads, spec.n_rep, spec.head_dim) == (30, 3, 3, 64)
    plan = random_plan(model, seed=0)
    x = torch.randint(0, 49152, (1, 16))
    masked = masked_copy(model, plan)
    with torch.no_grad():
        expected = masked(x).logits
        del masked
        pruned = apply_plan(model, plan)
        got = pruned(x).logits
    torch.testing.assert_close(got, expected, atol=1e-8, rtol=0)
    report = plan.param_report(smollm2[0])
    assert report["params_after"] == count_params(pruned)
    assert report["params_before"] == count_params(smollm2[0]) == 134_515_008


def test_load_model_reads_saved_pruned_folder(tmp_path):
    from llama_pruning.models import load_model

    model = tiny_model(n_rep=2, kv_heads=3)
    pruned = cut(model, random_plan(model, seed=2))
    save_pruned_model(pruned, None, tmp_path)
    again, tokenizer = load_model(str(tmp_path), device="cpu")  # our own auto_map code: no flag needed
    assert tokenizer is None and type(again).__name__ == "PrunedLlamaForCausalLM"
    x = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert torch.equal(again(x).logits, pruned(x).logits)


@pytest.mark.parametrize("remove_blocks", [False, True])
def test_strategy_plot_mentions_deleted_layers_only_when_there_are_some(tmp_path, monkeypatch, remove_blocks):
    from matplotlib.figure import Figure

    from llama_pruning.reporting import plot_pruning_strategy

    model = tiny_model()
    plan = random_plan(model, seed=1, remove_blocks=remove_blocks)
    labels = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: labels.append(fig.axes[-1].get_xlabel()))
    plot_pruning_strategy(plan, plan.param_report(model), tmp_path / "p.png", "title", [1.0] * plan.num_layers,
                          layer_score_label="layer importance\n(block_influence)")
    assert bool(plan.removed_layers) == remove_blocks
    assert labels == ["layer (red: deleted)" if remove_blocks else "layer"]


@pytest.mark.parametrize("family, fields", [("llama", {}), ("mistral", {"sliding_window": 5}), ("qwen2", {})])
def test_matmul_attention_computes_what_sdpa_does(family, fields):
    """block's CPU attention gives SDPA's outputs and gradients (causal, sliding, padded rows, GQA, q/k/v biases), and the
    model's own implementation is back after the region, also when it raises."""
    model = tiny_model(model_type=family, bias=family == "qwen2", **fields)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 97, (3, 12))
    pad = torch.ones_like(ids)
    pad[0, :4] = 0  # left padding: those rows attend to nothing

    def run():
        model.zero_grad()
        logits = model(ids, attention_mask=pad).logits[pad.bool()]
        logits.square().mean().backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]

    reference = run()
    with matmul_attention(model):
        assert model.config._attn_implementation != "sdpa"
        fast = run()
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(reference, fast, strict=True))
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), matmul_attention(model):
        raise RuntimeError
    with matmul_attention(model, enabled=False):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "sdpa"
