"""Reconstruction: exact solver algebra, mean preservation, held-out error reduction, structure and export."""

from __future__ import annotations

import copy
import gc
import io
import itertools

import pytest
import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from llama_pruning import placement, reconstruct
from llama_pruning.gram import MIN_WIDTH
from llama_pruning.models.arch import ModelSpec, count_params, decoder_layers, model_spec, run_layer
from llama_pruning.models.export import save_pruned_model
from llama_pruning.options import DEFAULT_KL_TOKENS
from llama_pruning.plan import PruningPlan
from llama_pruning.reconstruct import (
    InputStats,
    NextTokenKL,
    ReconstructionError,
    compensate,
    correct_inputs,
    corrected_norm,
    input_correction,
    prune_with_reconstruction,
    refine_layer,
)
from llama_pruning.surgery import apply_plan
from tests.tiny import random_plan, tiny_model

F64 = torch.float64


def _ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 97, (n, length), generator=torch.Generator().manual_seed(seed))


def _stats(x: torch.Tensor, drift: torch.Tensor | None = None) -> InputStats:
    stats = InputStats(x.shape[1], F64, x.device, None if drift is None else drift.shape[1])
    stats(None, (x,))
    if drift is not None:
        stats.add_drift(drift)
    return stats


def _cut_linear(weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(len(kept), weight.shape[0], bias=bias is not None, dtype=F64)
    with torch.no_grad():
        linear.weight.copy_(weight[:, kept])
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@pytest.mark.parametrize("d_in", [12, MIN_WIDTH + 44])  # one Gram GEMM; the block-triangular Gram, mirrored
@pytest.mark.parametrize("drift_weight", [0.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lsq_matches_explicit_ridge_solution(with_bias, drift_weight, d_in):
    """compensate() == argmin ||X_K W'^T + b' - T||^2 + lam ||W' - W_K||^2, lam = ridge * mean diag(X_K^T X_K) / n,
    T = X W^T + b + a D for a drift D of weight a."""
    g = torch.Generator().manual_seed(0)
    n, d_out, ridge = 200, 5, 10.0  # the prior weighs like 10 of the 200 tokens
    x = torch.randn(n, d_in, generator=g, dtype=F64) + 0.5
    w = torch.randn(d_out, d_in, generator=g, dtype=F64)
    b = torch.randn(d_out, generator=g, dtype=F64) if with_bias else None
    drift = torch.randn(n, d_out, generator=g, dtype=F64) + x[:, :d_out] + 0.3
    kept = torch.tensor([0, 2, 3, 7, 8, 11]) if d_in == 12 else torch.arange(1, d_in, 2)  # kept and removed in every block
    linear = _cut_linear(w, b, kept)
    compensate(linear, w, kept, _stats(x, drift), "lsq", ridge, drift_weight)

    y = x @ w.T + (b if with_bias else 0) + drift_weight * drift
    xk = x[:, kept]
    lam = ridge * (xk * xk).sum(0).mean() / n
    design = torch.cat([xk, torch.ones(n, 1, dtype=F64)], 1) if with_bias else xk
    k = design.shape[1]
    penalty = torch.eye(k, dtype=F64)[: len(kept)] * lam.sqrt()  # the intercept column is not penalised
    target_pen = lam.sqrt() * w[:, kept].T
    solution = torch.linalg.lstsq(torch.cat([design, penalty]), torch.cat([y, target_pen])).solution
    torch.testing.assert_close(linear.weight, solution[: len(kept)].T, rtol=0, atol=1e-10)
    if with_bias:
        torch.testing.assert_close(linear.bias, solution[-1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_statistics_give_the_float64_solution(with_bias):
    """Statistics accumulated in float32 (what a float32 model's reconstruction uses) and solved in float64 give the
    re-fit of float64 statistics to float32 precision, over many tokens with a mean offset (centred with a bias)."""
    g = torch.Generator().manual_seed(5)
    n, d_in, d_out = 8192, 64, 16
    x = torch.randn(n, d_in, generator=g, dtype=F64) * torch.rand(d_in, generator=g, dtype=F64) * 3 + 2.0
    w, b = torch.randn(d_out, d_in, generator=g, dtype=F64), torch.randn(d_out, generator=g, dtype=F64)
    drift = torch.randn(n, d_out, generator=g, dtype=F64)
    kept = torch.arange(0, d_in, 3)
    fits = []
    for dtype in (F64, torch.float32):
        stats = InputStats(d_in, dtype, x.device, d_out)
        for chunk, d in zip(x.split(512), drift.split(512), strict=True):
            stats(None, (chunk.to(dtype),))
            stats.add_drift(d.to(dtype))
        linear = _cut_linear(w, b if with_bias else None, kept)
        compensate(linear, w, kept, stats, "lsq", 100.0, 0.5)
        fits.append(linear)
    update = fits[0].weight - w[:, kept]  # what the solve computed, compared relative to its own size
    error = (fits[1].weight - fits[0].weight).norm() / update.norm()
    assert 0 < error < 2e-4  # > 0: the float32 path did accumulate in float32 (centring costs the most digits)
    if with_bias:
        assert (fits[1].bias - fits[0].bias).norm() / (fits[0].bias - b).norm() < 2e-4


@pytest.mark.parametrize("mode", ["bias", "lsq"])
def test_compensate_keeping_every_column_is_identity(mode):
    """Nothing removed: the dense weights are already the optimum, so they come back unchanged."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 8, generator=g, dtype=F64)
    w, b = torch.randn(3, 8, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    kept = torch.arange(8)
    linear = _cut_linear(w, b, kept)
    compensate(linear, w, kept, _stats(x), mode, 1e-3)
    torch.testing.assert_close(linear.weight, w, rtol=0, atol=1e-12)
    torch.testing.assert_close(linear.bias, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("drift_weight, input_weight", [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)])
def test_lsq_with_a_plan_that_prunes_nothing_leaves_weights_unchanged(drift_weight, input_weight):
    model = tiny_model(dtype=F64)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    plan = PruningPlan.dense(model_spec(model), "tiny")
    out = prune_with_reconstruction(model, plan, _ids(4, 16, 0), "lsq", progress=False, drift_weight=drift_weight,
                                    input_weight=input_weight)
    state = out.state_dict()
    assert state.keys() == dense.keys()
    for key, value in dense.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-12)


def _block_io(dense: nn.Module, pruned: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pruned, dense) block outputs for every attention and MLP block, on the pruned model's own stream.

    Each dense block sees exactly the input its pruned counterpart sees, i.e. the quantity reconstruction fits.
    Plans used here delete no layer, so dense and pruned layers line up.
    """
    records = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, kw: records.append((a[0], kw)), with_kwargs=True)
        for layer in decoder_layers(pruned)
    ]
    with torch.no_grad():
        pruned(ids, use_cache=False)
        for h in hooks:
            h.remove()
        pairs = []
        for (x, kw), d_layer, p_layer in zip(records, decoder_layers(dense), decoder_layers(pruned), strict=True):
            p_attn = p_layer.self_attn(hidden_states=p_layer.input_layernorm(x), **kw)[0]
            d_attn = d_layer.self_attn(hidden_states=d_layer.input_layernorm(x), **kw)[0]
            h = x + p_attn
            pairs.append((p_attn, d_attn))
            pairs.append((p_layer.mlp(p_layer.post_attention_layernorm(h)), d_layer.mlp(d_layer.post_attention_layernorm(h))))
    return pairs


def _partial_plan(model, seed: int) -> PruningPlan:
    """A random plan that cuts every block partly (no block or layer removed)."""
    plan = random_plan(model, seed=seed, remove_blocks=False)
    for i in range(plan.num_layers):
        plan.attn_groups[i] = plan.attn_groups[i][:3]
        plan.mlp_channels[i] = plan.mlp_channels[i][: max(1, len(plan.mlp_channels[i]) - 8)]
    return plan


def test_reconstruction_lowers_block_error_on_held_out_tokens():
    dense = tiny_model(dtype=F64, layers=3)
    plan = _partial_plan(dense, seed=3)
    calib, held_out = _ids(48, 32, seed=0), _ids(16, 32, seed=1)
    errors = {}
    for mode in ("none", "bias", "lsq"):  # drift 0: the objective is exactly this block error
        pruned = prune_with_reconstruction(copy.deepcopy(dense), plan, calib, mode, progress=False, drift_weight=0.0)
        errors[mode] = sum((p - d).pow(2).sum().item() for p, d in _block_io(dense, pruned, held_out))
    assert errors["bias"] < errors["none"]
    assert errors["lsq"] < errors["bias"]


def _bias_compensated(mode: str, drift_weight: float):
    """(dense, reconstructed copy, calibration ids) for a tiny biased model whose plan flags bias compensation."""
    dense = tiny_model(dtype=F64, model_type="qwen2", bias=True, layers=3)
    plan = _partial_plan(dense, seed=4)
    plan.bias_compensation = [True] * plan.num_layers
    calib = _ids(10, 24, seed=2)
    pruned = prune_with_reconstruction(copy.deepcopy(dense), plan, calib, mode, batch_size=3, progress=False,
                                       drift_weight=drift_weight)
    return dense, pruned, calib


@pytest.mark.parametrize("mode", ["bias", "lsq"])
def test_bias_preserves_block_output_mean_on_calibration_tokens(mode):
    """A fitted bias makes each surviving block's mean output over the calibration tokens equal the dense one."""
    dense, pruned, calib = _bias_compensated(mode, drift_weight=0.0)
    for p, d in _block_io(dense, pruned, calib):
        torch.testing.assert_close(p.mean((0, 1)), d.mean((0, 1)), rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["bias", "lsq"])
def test_full_drift_preserves_the_dense_stream_mean(mode):
    """With drift weight 1 and biases, every layer's output has the dense model's mean over the calibration tokens
    (each block's bias absorbs the mean gap accumulated upstream, not just its own)."""
    dense, pruned, calib = _bias_compensated(mode, drift_weight=1.0)
    with torch.no_grad():
        ours = pruned(calib, output_hidden_states=True).hidden_states
        theirs = dense(calib, output_hidden_states=True).hidden_states
    for p, d in zip(ours[1:-1], theirs[1:-1], strict=True):  # the last entry is after the final norm
        torch.testing.assert_close(p.mean((0, 1)), d.mean((0, 1)), rtol=0, atol=1e-10)
        assert not torch.allclose(p, d)


@pytest.mark.parametrize("width", [6, MIN_WIDTH + 4])  # one Gram GEMM; the block-triangular Gram, mirrored
def test_input_correction_is_the_ridge_least_squares_refit(width):
    """W + W M^T minimises ||P W'^T - D W^T||^2 + lam ||W' - W||^2 (normal equations solved directly)."""
    gen = torch.Generator().manual_seed(0)
    p = [torch.randn(2, 20, width, dtype=F64, generator=gen) for _ in range(2)]
    d = [x + 0.3 * torch.randn(x.shape, dtype=F64, generator=gen) for x in p]
    w = torch.randn(4, width, dtype=F64, generator=gen)
    ridge = 5.0
    linear = nn.Linear(width, 4, bias=False, dtype=F64)
    linear.weight.data.copy_(w)
    correct_inputs([linear], input_correction(nn.Identity(), p, d, ridge, F64), 1.0)
    P, D = torch.cat(p).reshape(-1, width), torch.cat(d).reshape(-1, width)
    lam = ridge * (P.T @ P).diagonal().mean() / P.shape[0]
    expected = torch.linalg.solve(P.T @ P + lam * torch.eye(width, dtype=F64), P.T @ D @ w.T + lam * w.T).T
    torch.testing.assert_close(linear.weight, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype, atol", [(F64, 1e-12), (torch.float32, 1e-5)])
def test_corrected_norm_feeds_a_linear_what_its_corrected_weights_compute(dtype, atol):
    """The fit passes run the uncut block on `corrected_norm` instead of a copy re-fitted by `correct_inputs`; M comes
    from the solve in float64 whatever the model's dtype."""
    gen = torch.Generator().manual_seed(0)
    norm = nn.RMSNorm(6, dtype=dtype)
    norm.weight.data.uniform_(0.5, 1.5, generator=gen)
    m, h = torch.randn(6, 6, dtype=F64, generator=gen), torch.randn(3, 5, 6, generator=gen).to(dtype)
    linear = nn.Linear(6, 4, dtype=dtype)
    refit = copy.deepcopy(linear)
    correct_inputs([refit], m, 0.4)
    torch.testing.assert_close(linear(corrected_norm(norm, m, 0.4)(h)), refit(norm(h)), rtol=0, atol=atol)


@pytest.mark.parametrize("plain, refined", [({"drift_weight": 0.0}, {"drift_weight": 1.0}),
                                             ({"drift_weight": 0.5}, {"drift_weight": 0.5, "input_weight": 1.0})])
def test_stream_targets_lower_the_final_stream_error_on_held_out_tokens(plain, refined):
    """Fitting toward the dense stream (drift 1 over local fits; q/k/v and gate/up re-fit toward their dense-stream
    inputs over o_proj/down_proj alone) ends closer to the dense model's last hidden state."""
    dense = tiny_model(dtype=F64, layers=3)
    plan = _partial_plan(dense, seed=3)
    calib, held_out = _ids(48, 32, seed=0), _ids(16, 32, seed=1)
    with torch.no_grad():
        target = dense(held_out, output_hidden_states=True).hidden_states[-1]
    errors = []
    for kwargs in (plain, refined):
        pruned = prune_with_reconstruction(copy.deepcopy(dense), plan, calib, "lsq", progress=False, **kwargs)
        with torch.no_grad():
            errors.append((pruned(held_out, output_hidden_states=True).hidden_states[-1] - target).pow(2).sum().item())
    assert errors[1] < errors[0]


def _layer_inputs(model: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword arguments) that each decoder layer of `model` receives on `ids`."""
    records = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: records.append((a[0], kw)), with_kwargs=True)
             for layer in decoder_layers(model)]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return records


@torch.no_grad()
def _layer_io(dense: nn.Module, pruned: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pruned, dense) outputs of every decoder layer on the pruned model's own stream (plans that delete no layer)."""
    return [(run_layer(p, x, kw), run_layer(d, x, kw)) for (x, kw), d, p
            in zip(_layer_inputs(pruned, ids), decoder_layers(dense), decoder_layers(pruned), strict=True)]


@pytest.mark.parametrize("autocast", [False, True, "inside a caller's autocast region"])
def test_refine_layer_moves_every_weight_toward_the_targets_and_restores_the_layer(autocast):
    """Adam lowers the layer's error on its batches (bfloat16 matmuls too, also inside a caller's autocast region,
    whose weight cache would serve the pre-step weights); dtype and requires_grad flags come back, and no gradient is
    left on the layer (the model keeps every refined layer: each would hold a layer's worth of memory)."""
    dense = tiny_model(layers=2)
    layer, teacher = decoder_layers(dense)
    layer.self_attn.q_proj.weight.requires_grad_(False)
    records = []
    hook = layer.register_forward_pre_hook(lambda m, a, kw: records.append((a[0], kw)), with_kwargs=True)
    with torch.no_grad():
        dense(_ids(6, 16, seed=0), use_cache=False)
        hook.remove()
        inputs, kwargs = [x for x, _ in records], [kw for _, kw in records]
        targets = [run_layer(teacher, x, kw) for x, kw in records]
    before = copy.deepcopy(layer.state_dict())
    outer = torch.autocast("cpu", dtype=torch.bfloat16, enabled=isinstance(autocast, str))
    with outer:
        first, last = refine_layer(layer, inputs, targets, kwargs, epochs=20, lr=1e-3, autocast=bool(autocast))
    assert last < 0.5 * first
    assert all(not torch.equal(before[k], v) for k, v in layer.state_dict().items())  # norms included
    assert {p.dtype for p in layer.parameters()} == {torch.float32}
    assert not layer.self_attn.q_proj.weight.requires_grad and layer.mlp.up_proj.weight.requires_grad
    assert all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize("dtype, autocast", [(F64, False), (torch.float32, True)])
def test_block_lowers_the_layer_error_below_lsq_on_calibration_tokens(dtype, autocast):
    """Drift 0: both fit each layer to its dense self on the pruned stream; block's Adam continues from lsq's optimum
    of o_proj / down_proj and moves q/k/v and gate/up too, so the whole layer's error is lower. With autocast its
    passes and steps run in bfloat16 and the error (measured in float32) is still lower: no step reads stale weights."""
    dense = tiny_model(dtype=dtype, layers=3)
    plan = _partial_plan(dense, seed=3)
    calib = _ids(48, 32, seed=0)
    errors = {}
    for mode in ("lsq", "block"):
        pruned = prune_with_reconstruction(copy.deepcopy(dense), plan, calib, mode, progress=False, drift_weight=0.0,
                                           block_lr=1e-3, block_autocast=autocast)
        errors[mode] = [(p - d).pow(2).sum().item() for p, d in _layer_io(dense, pruned, calib)]
    assert all(b < 0.9 * a for a, b in zip(errors["lsq"], errors["block"], strict=True)), errors


def test_spans_join_runs_of_consecutive_refined_layers():
    assert reconstruct._spans(7, [0, 1, 2, 4, 5, 6], 2) == [[0, 1], [2], [3], [4, 5], [6]]
    assert reconstruct._spans(7, [0, 1, 2, 4, 5, 6], 3) == [[0, 1, 2], [3], [4, 5, 6]]
    assert reconstruct._spans(3, [0, 1, 2], 1) == [[0], [1], [2]]


@torch.no_grad()
def _span_error(dense: nn.Module, pruned: nn.Module, ids: torch.Tensor, span: list[int]) -> float:
    """Squared error of the pruned layers `span`, run in turn, against the dense ones, on the span's pruned input."""
    p, kw = _layer_inputs(pruned, ids)[span[0]]
    d = p
    for i in span:
        p, d = run_layer(decoder_layers(pruned)[i], p, kw), run_layer(decoder_layers(dense)[i], d, kw)
    return (p - d).pow(2).sum().item()


def test_block_span_refines_consecutive_layers_jointly_toward_their_dense_output():
    """block_span 2 (drift 0): layers 0-1 are re-fitted by lsq in turn, then Adam moves both toward the dense output of
    layer 1 on the pruned input of layer 0. That pair error ends lower than lsq's and than refining each layer alone,
    which fits layer 0 to its own output instead."""
    dense = tiny_model(dtype=F64, layers=3)
    plan = _partial_plan(dense, seed=3)
    calib = _ids(48, 32, seed=0)
    errors = {}
    for name, mode, span in (("lsq", "lsq", 1), ("alone", "block", 1), ("span", "block", 2)):
        pruned = prune_with_reconstruction(copy.deepcopy(dense), plan, calib, mode, progress=False, drift_weight=0.0,
                                           block_lr=1e-3, block_span=span)
        errors[name] = _span_error(dense, pruned, calib, [0, 1])
    assert errors["span"] < 0.9 * errors["lsq"] and errors["span"] < errors["alone"], errors


def test_block_span_gives_each_layer_its_own_mask_on_mixed_sliding_models(monkeypatch):
    """Qwen2 with full layers 0-1 and sliding-window layers 2-3: a span across the boundary runs each layer with the
    mask the model itself gives it (exactly the model's hidden states; layer 1's mask for both differs), and the
    layer loop hands the span those per-layer kwargs."""
    from llama_pruning.models.arch import capture_layer_inputs

    dense = tiny_model(model_type="qwen2", dtype=F64, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert dense.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    ids = _ids(4, 32, seed=0)
    _, kwargs = capture_layer_inputs(dense, ids, 2)
    states = dense.model(input_ids=ids[:2], output_hidden_states=True).hidden_states
    span = reconstruct.LayerSpan(list(decoder_layers(dense)[1:3]), [torch.device("cpu")] * 2)
    with torch.no_grad():
        assert torch.equal(span(states[1], [kwargs[1][0], kwargs[2][0]]), states[3])
        assert not torch.allclose(span(states[1], [kwargs[1][0], kwargs[1][0]]), states[3])

    plan = _partial_plan(dense, seed=3)
    plan.attn_groups[0], plan.mlp_channels[0] = list(range(4)), list(range(48))  # layer 0 whole: spans [1, 2] and [3]
    seen = []
    forward = reconstruct.LayerSpan.forward
    monkeypatch.setattr(reconstruct.LayerSpan, "forward",
                        lambda self, hidden, per_layer: seen.append(per_layer) or forward(self, hidden, per_layer))
    prune_with_reconstruction(copy.deepcopy(dense), plan, ids, "block", batch_size=2, progress=False, block_epochs=1,
                              block_span=2)
    pairs = [per_layer for per_layer in seen if len(per_layer) == 2]
    assert pairs and all(first["attention_mask"] is None and torch.equal(second["attention_mask"],
                                                                         kwargs[2][0]["attention_mask"])
                         for first, second in pairs)


def test_block_autocast_auto_follows_the_device():
    """None picks bfloat16 autocast exactly where the device multiplies bfloat16 natively; the two settings differ."""
    dense = tiny_model(layers=2)
    plan = _partial_plan(dense, seed=1)
    calib = _ids(8, 16, seed=2)
    runs = {flag: prune_with_reconstruction(copy.deepcopy(dense), plan, calib, "block", progress=False,
                                            block_autocast=flag).state_dict() for flag in (None, False, True)}
    native = placement.fast_bfloat16(torch.device("cpu"))
    assert all(torch.equal(v, runs[native][k]) for k, v in runs[None].items())
    assert not all(torch.equal(v, runs[not native][k]) for k, v in runs[None].items())


@pytest.mark.parametrize("mode, longest, expected", [("lsq", 512, "sdpa"), ("block", 512, "matmul"), ("block", 15, "sdpa")])
def test_block_on_cpu_runs_matmul_attention(monkeypatch, mode, longest, expected):
    """block's steps and passes on CPU go through the matmul attention, every one of them, unless the windows are longer
    than it takes; lsq keeps the model's own."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from llama_pruning.models import arch
    from llama_pruning.models.arch import MATMUL_ATTENTION

    monkeypatch.setattr(arch, "MATMUL_ATTENTION_MAX_TOKENS", longest)

    seen = []
    fast = ALL_ATTENTION_FUNCTIONS[MATMUL_ATTENTION]
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, MATMUL_ATTENTION,
                        lambda *a, **k: seen.append("matmul") or fast(*a, **k))
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", lambda *a, **k: seen.append("sdpa") or sdpa(*a, **k))
    dense = tiny_model(layers=2)
    prune_with_reconstruction(dense, _partial_plan(dense, seed=1), _ids(8, 16, seed=2), mode, progress=False)
    assert set(seen) == {expected}
    assert dense.config._attn_implementation == "sdpa"


def test_autocast_rounds_block_passes_only():
    """block runs its fit passes in bfloat16 under autocast; lsq (a final fit, not a start) ignores the flag exactly."""
    dense = tiny_model(layers=2)
    plan = _partial_plan(dense, seed=1)
    calib = _ids(8, 16, seed=2)
    seen = {"lsq": set(), "block": set()}
    for mode, dtypes in seen.items():
        model = copy.deepcopy(dense)
        hook = decoder_layers(model)[1].mlp.down_proj.register_forward_pre_hook(lambda m, a, d=dtypes: d.add(a[0].dtype))
        with torch.no_grad():
            prune_with_reconstruction(model, plan, calib, mode, progress=False, block_autocast=True)
        hook.remove()
    assert seen == {"lsq": {torch.float32}, "block": {torch.bfloat16}}
    runs = [prune_with_reconstruction(copy.deepcopy(dense), plan, calib, "lsq", progress=False,
                                      block_autocast=flag).state_dict() for flag in (False, True)]
    assert all(torch.equal(v, runs[1][k]) for k, v in runs[0].items())


@pytest.mark.parametrize("autocast", [False, True])
def test_block_reuses_the_mlp_fit_pass_as_targets_where_the_attention_is_whole(monkeypatch, autocast):
    """Where the attention is kept whole, the MLP's fit pass runs the dense layer on the layer's input, so its outputs
    are the targets: bit-identical to computing them again (which happens only where the attention is cut)."""
    dense = tiny_model(layers=3)
    plan = _partial_plan(dense, seed=1)
    plan.attn_groups[0] = plan.attn_groups[2] = list(range(4))  # whole in layers 0 and 2, cut in layer 1
    calib = _ids(8, 16, seed=2)
    block_targets = reconstruct._block_targets
    runs = {}
    for reuse in (True, False):
        seen, computed = [], []

        def targets(*args, reuse=reuse, seen=seen, computed=computed):
            *args, outputs = args
            computed.append(outputs is None or not reuse)
            out = block_targets(*args, outputs if reuse else None)
            seen.append([t.clone() for t in out])
            return out

        monkeypatch.setattr(reconstruct, "_block_targets", targets)
        model = prune_with_reconstruction(copy.deepcopy(dense), plan, calib, "block", batch_size=2, progress=False,
                                          block_autocast=autocast, last_loss="mse")  # kl's last layer has no such target
        runs[reuse] = seen, computed, model.state_dict()
    (reused, computed, weights), (fresh, _, fresh_weights) = runs[True], runs[False]
    assert computed == [False, True, False]
    assert all(torch.equal(a, b) for r, f in zip(reused, fresh, strict=True) for a, b in zip(r, f, strict=True))
    assert all(torch.equal(v, fresh_weights[k]) for k, v in weights.items())


@pytest.mark.parametrize("whole_attention", [False, True])
@pytest.mark.parametrize("drift_weight", [0.0, 0.5])
def test_block_holds_three_streams_of_hidden_states_while_refining(monkeypatch, drift_weight, whole_attention):
    """While a layer is refined only its inputs, its targets and the dense stream (with drift) are alive: the
    post-attention stream is freed (or became the targets, where the attention is whole) and nothing keeps the first
    layer's captured inputs (docs/MEMORY.md's terms)."""
    dense = tiny_model(layers=3)
    plan = _partial_plan(dense, seed=1)
    if whole_attention:
        plan.attn_groups[0] = plan.attn_groups[2] = list(range(4))
    calib = _ids(8, 16, seed=2)
    counts = []

    def counting(layer, inputs, targets, *args, **kwargs):
        gc.collect()
        counts.append(sum(isinstance(o, torch.Tensor) and o.shape == inputs[0].shape for o in gc.get_objects()))
        return refine_layer(layer, inputs, targets, *args, **kwargs)

    monkeypatch.setattr(reconstruct, "refine_layer", counting)
    prune_with_reconstruction(dense, plan, calib, "block", batch_size=2, progress=False, drift_weight=drift_weight)
    batches, streams = 4, 3 if drift_weight else 2
    assert counts == [streams * batches] * 3


@pytest.mark.parametrize("mode", ["lsq", "block"])
def test_heap_released_after_every_layer_and_before_each_refinement(monkeypatch, mode):
    """The C heap's free pages go back to the system once per layer, and once more before block refines a layer
    (the lsq fit's statistics are freed by then), so a fragmented heap does not grow layer after layer."""
    dense = tiny_model(layers=3)
    calls = []
    monkeypatch.setattr(reconstruct.placement, "release_host_memory", lambda: calls.append(1))
    prune_with_reconstruction(dense, _partial_plan(dense, seed=1), _ids(4, 16, seed=2), mode, progress=False)
    assert len(calls) == (6 if mode == "block" else 3)


@pytest.mark.parametrize("mode", ["bias", "lsq", "block"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_structure_params_and_reload(tmp_path, mode, model_type):
    """Removed blocks and layers, GQA, q/k/v biases: apply_plan's structure, exact counts, identical reload."""
    dense = tiny_model(model_type=model_type, bias=model_type == "qwen2")
    plan = random_plan(dense, seed=5)
    pruned = prune_with_reconstruction(copy.deepcopy(dense), plan, _ids(6, 16, seed=3), mode, progress=False)
    applied = pruned.pruning_plan
    reference = apply_plan(copy.deepcopy(dense), applied)
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert pruned.config.pruned_layout == reference.config.pruned_layout
    assert applied.param_report(dense)["params_after"] == count_params(pruned)
    assert applied.bias_compensation == ([True] * plan.num_layers if mode == "bias" else [])
    assert not plan.bias_compensation  # the caller's plan is not modified

    save_pruned_model(pruned, None, tmp_path, applied)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    ids = _ids(2, 12, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits, rtol=0, atol=0)


def test_none_is_apply_plan():
    dense = tiny_model()
    plan = random_plan(dense, seed=6)
    a = prune_with_reconstruction(copy.deepcopy(dense), plan, _ids(2, 8, 0), "none", progress=False)
    b = apply_plan(copy.deepcopy(dense), plan)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("mode", ["lsq", "block"])
def test_bfloat16_model_keeps_dtype_and_stays_finite(mode):
    dense = tiny_model(dtype=torch.bfloat16)
    pruned = prune_with_reconstruction(dense, random_plan(dense, seed=7), _ids(4, 16, 0), mode, progress=False)
    assert {p.dtype for p in pruned.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(pruned(_ids(1, 8, 1)).logits.float()).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "ols"}, "unknown reconstruction mode"),
        ({"ridge": -1.0}, "ridge must be >= 0"),
        ({"samples": torch.zeros(4, dtype=torch.long)}, "samples must be"),
        ({"samples": torch.zeros(2, 4)}, "token ids"),
        ({"batch_size": 0}, "batch_size"),
        ({"drift_weight": 1.5}, "drift_weight must be in"),
        ({"input_weight": -0.5}, "input_weight must be in"),
        ({"mode": "block", "block_lr": 0.0}, "block_epochs and block_lr must be > 0"),
        ({"mode": "block", "block_epochs": float("nan")}, "block_epochs and block_lr must be > 0"),
        ({"mode": "block", "block_span": 0}, "block_span must be an integer >= 1"),
        ({"mode": "block", "block_span": 1.5}, "block_span must be an integer >= 1"),
        ({"mode": "block", "block_span": True}, "block_span must be an integer >= 1"),
        ({"mode": "block", "last_loss": "ce"}, "unknown last_loss 'ce'"),
        ({"mode": "lsq", "last_loss": "kl"}, "needs mode 'block' and drift_weight > 0"),
        ({"mode": "block", "last_loss": "kl", "drift_weight": 0.0}, "needs mode 'block' and drift_weight > 0"),
        ({"mode": "block", "kl_tokens": 0.0}, "kl_tokens must be in"),
        ({"mode": "block", "kl_tokens": 1.5}, "kl_tokens must be in"),
        ({"ignore": torch.zeros(2, 8)}, "ignore must be a bool mask"),
        ({"ignore": torch.zeros(2, 7, dtype=torch.bool)}, "ignore must be a bool mask"),
        ({"ignore": torch.ones(2, 8, dtype=torch.bool)}, "leaves out every calibration token"),
    ],
)
def test_bad_arguments_raise_one_line_errors(kwargs, message):
    dense = tiny_model()
    args = {"samples": _ids(2, 8, 0), "mode": "lsq"} | kwargs
    with pytest.raises(ReconstructionError, match=message):
        prune_with_reconstruction(dense, random_plan(dense), progress=False, **args)


def test_left_out_tokens_are_absent_from_the_statistics():
    """`keep` gives exactly the Gram, sums, count and X^T D of the kept rows alone (integer data: exact in float64)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (12, 5), generator=gen).to(F64)
    d = torch.randint(-4, 5, (12, 3), generator=gen).to(F64)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1], dtype=F64)
    masked = InputStats(5, F64, x.device, 3)
    masked.keep = keep
    masked(None, (x,))
    masked.add_drift(d)
    rows = keep.bool()
    plain = _stats(x[rows], d[rows])
    assert masked.count == plain.count == 8
    for name in ("gram", "sum", "cross", "drift_sum"):
        assert torch.equal(getattr(masked, name), getattr(plain, name)), name


@pytest.mark.parametrize("mode", ["lsq", "block"])
def test_ignore_nothing_changes_nothing_and_ignored_targets_do_not_matter(mode):
    """An all-False `ignore` gives bit-identical weights; with tokens ignored, the weights differ, and the block loss
    does not read the ignored tokens' targets (refine_layer gives the same weights whatever they hold)."""
    dense = tiny_model(layers=2)
    plan = _partial_plan(dense, seed=3)
    calib = _ids(8, 16, seed=0)
    none = torch.zeros(calib.shape, dtype=torch.bool)
    some = torch.rand(calib.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    runs = {name: prune_with_reconstruction(copy.deepcopy(dense), plan, calib, mode, progress=False, batch_size=4,
                                            ignore=ignore).state_dict()
            for name, ignore in (("default", None), ("none", none), ("some", some))}
    assert all(torch.equal(v, runs["none"][k]) for k, v in runs["default"].items())
    assert any(not torch.equal(v, runs["some"][k]) for k, v in runs["default"].items())

    layer = decoder_layers(dense)[0]
    records = []
    hook = layer.register_forward_pre_hook(lambda m, a, kw: records.append((a[0], kw)), with_kwargs=True)
    with torch.no_grad():
        dense(calib, use_cache=False)
    hook.remove()
    inputs, kwargs = [x for x, _ in records], [kw for _, kw in records]
    keep = [(~some).float()]
    targets = [torch.randn(x.shape, generator=torch.Generator().manual_seed(2)) for x in inputs]
    garbage = [t.masked_fill(some[..., None], 1e6) for t in targets]
    refined = []
    for target in (targets, garbage):
        copy_ = copy.deepcopy(layer)
        refine_layer(copy_, inputs, target, kwargs, epochs=3, lr=1e-3, keep=keep)
        refined.append(copy_.state_dict())
    assert all(torch.equal(v, refined[1][k]) for k, v in refined[0].items())


def test_singular_gram_without_ridge_is_reported():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, dtype=F64, generator=gen)
    x[:, 5] = 0.0  # a dead kept unit: its Gram row and column are exactly zero (rounding cannot rescue it)
    w = torch.randn(3, 8, dtype=F64, generator=gen)
    kept = torch.arange(6)
    with pytest.raises(ReconstructionError, match="singular"):
        compensate(_cut_linear(w, None, kept), w, kept, _stats(x), "lsq", 0.0)


def _windows(tokenizer, path, n: int, length: int) -> torch.Tensor:
    """The first n non-overlapping token windows of a text file."""
    text = path.read_text(encoding="utf-8-sig")[: 200 * n * length]
    ids = tokenizer(text, return_tensors="pt").input_ids[0, : n * length]
    return ids.reshape(n, length)


@pytest.mark.slow
def test_smollm2_lsq_lowers_held_out_loss(smollm2, data_dir):
    """Real model, 8 x 64 calibration tokens, ~20% random plan: lsq beats plain cutting on unseen text.

    512 tokens are few for 1230 kept MLP columns; the default ridge (3000 tokens, 6x the calibration) keeps the
    solve stable (see docs/RECONSTRUCTION.md).
    """
    model, tokenizer = smollm2
    plan = random_plan(model, seed=0, remove_blocks=False)
    rng = torch.Generator().manual_seed(0)
    for i in range(plan.num_layers):
        plan.attn_groups[i] = [0, 1, 2] if i % 3 else [0, 2]
        plan.mlp_channels[i] = sorted(torch.randperm(1536, generator=rng)[:1230].tolist())
    calib = _windows(tokenizer, data_dir / "wikitext2" / "wiki.valid.tokens", 8, 64)
    held_out = _windows(tokenizer, data_dir / "wikitext2" / "wiki.test.raw", 4, 64)
    losses = {}
    for mode in ("none", "lsq"):
        pruned = prune_with_reconstruction(copy.deepcopy(model), plan, calib, mode, progress=False)
        with torch.no_grad():
            losses[mode] = pruned(held_out, labels=held_out).loss.item()
    assert losses["lsq"] < losses["none"] - 0.5


def test_progress_counts_every_batch_of_every_block(capsys):
    """The bar advances per calibration batch of each block (attention, MLP) of each layer, so its ETA exists and
    is averaged over real work from the first batches on; it ends exactly at its total."""
    dense = tiny_model()
    prune_with_reconstruction(dense, random_plan(dense, seed=2), _ids(6, 8, 0), "lsq", batch_size=2)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    layers, batches = 4, 3
    assert f" {2 * layers * batches}/{2 * layers * batches} " in bar and "layer 4/4" in bar and "pass/s" in bar


@pytest.mark.parametrize("span", [1, 2])
def test_block_progress_adds_every_refinement_step(capsys, monkeypatch, span):
    """Block mode's bar also counts its Adam steps (epochs x batches) on each cut layer, emptied layers excepted, the
    last layer's kl steps 1 / kl_tokens times as many (steps that take no time: one tick per layer each); a step through
    a span of layers counts once per layer, so the total does not depend on the span."""
    monkeypatch.setattr(reconstruct.KlTicks, "clock", staticmethod(lambda: 0.0))
    dense = tiny_model()
    plan = random_plan(dense, seed=2)  # layer 2 emptied
    prune_with_reconstruction(dense, plan, _ids(6, 8, 0), "block", batch_size=2, block_epochs=1.5, block_span=span)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    layers, batches, refined = 4, 3, 3  # the last unit is layer 3 alone with either span
    total = 2 * layers * batches + round(1.5 * batches) * (refined - 1) + round(1.5 / DEFAULT_KL_TOKENS * batches)
    assert f" {total}/{total} " in bar


def test_kl_ticks_forecast_the_kl_steps_then_count_the_passes_their_time_is_worth(monkeypatch):
    """Until a block step is timed, the kl steps' share of the total is a tick a layer-step scaled by the step's weights
    (its layers' and the head's) against the layers'; then the seconds per kept weight of every block step timed so far,
    in ticks (at least a tick a layer-step). Running after 10 passes in 10 s, kl steps of 4 s count 4 ticks each and the
    total follows, so the bar ends at it; steps of 1.4 s count 6 ticks over four (no rounding error builds up); a step
    quicker than `layers` passes counts `layers`; a disabled bar is not timed."""
    times = iter([0.0, 4.0, 8.0, 12.0, 20.0, 21.4, 22.8, 24.2, 25.6, 100.0, 100.3, 200.0, 300.0])
    monkeypatch.setattr(reconstruct.KlTicks, "clock", staticmethod(lambda: next(times)))
    with tqdm(total=10, file=io.StringIO()) as bar:
        ticks = reconstruct.KlTicks(bar, 3, 1, 10.0, 20.0)
        assert bar.total == 10 + 3 * (10 + 20) // 10
        bar.update(10)
        bar.start_t -= 10  # tqdm's elapsed time: 10 s for the 10 passes
        ticks.timed(0.0, 60.0)
        assert bar.total == 10 + 3
        ticks.timed(24.0, 60.0)  # 24 s for 120 weight-steps: 0.2 ticks a weight, so 3 steps x 0.2 x 30
        assert bar.total == 10 + 18
        ticks.start()
        seen = []
        for _ in range(3):
            ticks()
            seen.append((bar.n, bar.total))
        assert seen == [(14, 22), (18, 22), (22, 22)]
        uneven = reconstruct.KlTicks(bar, 4, 1, 1.0, 0.0)
        bar.start_t = bar._time() - 22  # 1 s per pass again
        uneven.start()
        seen = []
        for _ in range(4):
            uneven()
            seen.append(bar.n - 22)
        assert seen == [1, 3, 4, 6] and bar.total == bar.n
        quick = reconstruct.KlTicks(bar, 1, 2, 1.0, 0.0)
        quick.start()
        quick()
        assert (bar.n, bar.total) == (30, 30)
    with tqdm(total=5, disable=True) as off:
        idle = reconstruct.KlTicks(off, 5, 1, 1.0, 0.0)
        idle.start()
        idle()
        assert off.n == 0 and next(times) == 300.0  # its start read the clock, its step did not


def test_kept_weights_count_what_a_step_multiplies():
    """SmolLM2's geometry, its last layer cut to 2 of 3 groups: 2 x (5 x 64 + 192) x 576 + 1536 x 3 x 576 weights; layer
    28 cut to half its channels: 3 x 294912 + 768 x 1728; layers are summed."""
    spec = ModelSpec("llama", 30, 576, 3, 3, 64, 1536, False, False, False)
    plan = PruningPlan.dense(spec, "smollm2")
    plan.attn_groups[29] = [0, 2]
    plan.mlp_channels[28] = list(range(768))
    assert reconstruct._kept_weights(plan, [29]) == 3244032
    assert reconstruct._kept_weights(plan, [28, 29]) == 3244032 + 3 * 294912 + 768 * 1728


def test_the_bar_forecasts_the_kl_steps_from_the_timed_block_steps(monkeypatch):
    """When the kl steps start, the bar's total is every pass and block step plus their forecast: the seconds per kept
    weight of the block steps before them (10 s each refinement on the fake clock, 1 s a tick), times the kl layer's kept
    weights and the head's on half of the tokens (a quarter of them ignored: on half of the rest)."""
    clock, totals = itertools.count(0.0, 10.0), []
    monkeypatch.setattr(reconstruct.KlTicks, "clock", staticmethod(lambda: next(clock)))
    monkeypatch.setattr(reconstruct, "_seconds_per_tick", lambda bar: 1.0)
    start = reconstruct.KlTicks.start
    monkeypatch.setattr(reconstruct.KlTicks, "start", lambda self: totals.append(self.bar.total) or start(self))
    dense = tiny_model()
    plan = random_plan(dense, seed=2)  # layer 2 emptied: 0, 1 and 3 refined, 3 under kl
    ignore = torch.zeros(6, 8, dtype=torch.bool)
    ignore[:, :2] = True
    head = dense.get_output_embeddings().weight.numel()
    prune_with_reconstruction(dense, plan, _ids(6, 8, 0), "block", batch_size=2, block_epochs=1.5, ignore=ignore)
    steps, kl_steps, kept = 4, 9, [reconstruct._kept_weights(plan, [i]) for i in (0, 1, 3)]
    forecast = round(kl_steps * 20 / (steps * (kept[0] + kept[1])) * (kept[2] + 0.5 * 0.75 * head))
    assert totals == [2 * 4 * 3 + steps * 2 + forecast]


@pytest.mark.parametrize("rows", [0, 3, 200])
def test_summed_kl_and_its_closed_form_gradient_match_autograd(rows, monkeypatch):
    """_SummedKL's value and input gradient equal kl_div's through log_softmax (float64), chunked or not, none at all
    included."""
    monkeypatch.setattr(reconstruct, "KL_ROWS", 7)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 6, generator=gen, dtype=F64)
    x = torch.randn(rows, 6, generator=gen, dtype=F64, requires_grad=True)
    y = torch.randn(rows, 6, generator=gen, dtype=F64)
    reference = torch.nn.functional.kl_div((x @ weight.T).log_softmax(-1), (y @ weight.T).log_softmax(-1),
                                           log_target=True, reduction="sum")
    (expected,) = torch.autograd.grad(reference, x)
    loss = reconstruct._SummedKL.apply(x, y, weight)
    (grad,) = torch.autograd.grad(3 * loss, x)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad, 3 * expected)


def test_summed_kl_with_a_bfloat16_head_adds_no_rounding_beyond_its_logits():
    """A bfloat16 head (block under autocast) rounds the logits; from there the float32 softmax gives the exact loss on
    those logits and their gradient within the bfloat16 storage of the softmax difference (0.2 % here; a softmax in
    bfloat16 is 1.3 % off and its loss 0.6 %)."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(3000, 64, generator=gen) * 0.3).bfloat16()
    x = torch.randn(300, 64, generator=gen, requires_grad=True)
    y = x.detach() + 0.3 * torch.randn(300, 64, generator=gen)
    logits = (x.detach().bfloat16() @ weight.T).double().requires_grad_()
    reference = torch.nn.functional.kl_div(logits.log_softmax(-1), (y.bfloat16() @ weight.T).double().log_softmax(-1),
                                           log_target=True, reduction="sum")
    (expected,) = torch.autograd.grad(reference, logits)
    expected = expected @ weight.double()
    loss = reconstruct._SummedKL.apply(x, y, weight)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == torch.float32
    assert abs(loss.item() / reference.item() - 1) < 1e-4
    assert ((grad.double() - expected).norm() / expected.norm()).item() < 0.005


def test_next_token_kl_is_zero_on_the_dense_stream_and_ignores_left_out_tokens():
    """The loss is exactly 0 when the layer reproduces the dense final state, and tokens `keep` leaves out (placeholders)
    change nothing, however far they are from their targets; the kept ones count per token."""
    dense = tiny_model(dtype=F64)
    loss = NextTokenKL(dense.model.norm, dense.lm_head.weight)
    hidden = torch.randn(2, 5, dense.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=F64)
    (target,) = loss.targets([hidden])
    keep = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]], dtype=F64)
    assert loss(hidden, target, keep).item() == 0.0
    moved = hidden.clone()
    moved[~keep.bool()] += 5.0
    assert loss(moved, target, keep).item() == 0.0
    moved[0, 0] += 1.0
    single = NextTokenKL(dense.model.norm, dense.lm_head.weight)(moved[:1, :1], target[:1, :1])
    torch.testing.assert_close(loss(moved, target, keep), single / 8)


def test_next_token_kl_on_a_fraction_of_the_tokens_is_the_kl_of_a_fresh_seeded_subset_per_call():
    """With `tokens` < 1 each call is exactly the per-token KL of that fraction of the kept tokens, drawn anew per call
    from a generator seeded once, so two losses built alike repeat each other's draws."""
    dense = tiny_model(dtype=F64)
    hidden = torch.randn(2, 5, dense.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=F64)
    full = NextTokenKL(dense.model.norm, dense.lm_head.weight)
    (target,) = full.targets([hidden])
    moved = hidden + torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    keep = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]], dtype=F64)
    half, again = (NextTokenKL(dense.model.norm, dense.lm_head.weight, tokens=0.5) for _ in range(2))
    draws = torch.Generator().manual_seed(0)
    kept_student, kept_target = moved[keep.bool()], target[keep.bool()]
    losses = []
    for _ in range(3):
        rows = torch.randperm(8, generator=draws)[:4].sort().values
        expected = full(kept_student[rows], kept_target[rows])
        loss = half(moved, target, keep)
        assert loss.item() == expected.item() and again(moved, target, keep).item() == loss.item()
        losses.append(loss.item())
    assert len(set(losses)) == 3  # a fresh subset per call


def test_kl_tokens_give_the_last_layer_proportionally_more_steps(monkeypatch):
    """kl_tokens F: the last layer's kl steps are 1/F times the other layers' (the head's compute per layer stays), on a
    `NextTokenKL` reading F of the tokens; 1 is the plain kl; the progress bar's total counts exactly the steps taken."""
    dense = tiny_model(layers=3)
    plan = _partial_plan(dense, seed=3)
    calls, bars, refine, bar = [], [], reconstruct.refine_layer, reconstruct.tqdm

    def spy(*args, **kwargs):
        calls.append((args[4], getattr(args[-1], "tokens", None)))
        return refine(*args, **kwargs)

    monkeypatch.setattr(reconstruct, "refine_layer", spy)
    monkeypatch.setattr(reconstruct, "tqdm", lambda **kwargs: bars.append(bar(**kwargs)) or bars[-1])
    monkeypatch.setattr(reconstruct.KlTicks, "clock", staticmethod(lambda: 0.0))  # a kl step: one tick
    for tokens in (0.25, 1.0):
        prune_with_reconstruction(copy.deepcopy(dense), plan, _ids(8, 16, 0), "block", batch_size=2, block_epochs=1.5,
                                  kl_tokens=tokens)
    assert calls == [(1.5, None), (1.5, None), (6.0, 0.25), (1.5, None), (1.5, None), (1.5, 1.0)]
    assert [b.n for b in bars] == [b.total for b in bars] and bars[0].total - bars[1].total == 24 - 6  # 4 batches


def _next_token_kl(dense: nn.Module, pruned: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        p, d = pruned(ids).logits.log_softmax(-1), dense(ids).logits.log_softmax(-1)
    return torch.nn.functional.kl_div(p, d, log_target=True, reduction="batchmean").item()


@pytest.mark.parametrize(("autocast", "span"), [(False, 1), (True, 1), (False, 2)])
def test_last_loss_kl_moves_only_the_last_layer_toward_the_dense_next_token_distribution(autocast, span):
    """last_loss kl changes nothing before the last layer (bit for bit; with a span, before the last span, which it moves
    jointly), and there trades the squared error toward a hidden state for the KL to the dense model's next-token
    distribution, which ends lower on the calibration tokens; the final norm and head are untouched and gather no
    gradient."""
    layers = 2 + span  # spans run from layer 0: with 4 layers and span 2 the last span is layers 2-3
    dense = tiny_model(layers=layers)
    plan = _partial_plan(dense, seed=3)
    calib = _ids(48, 32, seed=0)
    runs = {loss: prune_with_reconstruction(copy.deepcopy(dense), plan, calib, "block", progress=False, block_lr=3e-3,
                                            block_epochs=20, block_autocast=autocast, last_loss=loss, block_span=span)
            for loss in ("mse", "kl")}
    mse, kl = (decoder_layers(runs[k]) for k in ("mse", "kl"))
    assert all(torch.equal(a, b) for i in range(2) for a, b in zip(mse[i].state_dict().values(),
                                                                   kl[i].state_dict().values(), strict=True))
    assert all(not torch.equal(mse[i].mlp.up_proj.weight, kl[i].mlp.up_proj.weight) for i in range(2, layers))
    assert torch.equal(runs["kl"].lm_head.weight, dense.lm_head.weight)
    assert torch.equal(runs["kl"].model.norm.weight, dense.model.norm.weight)
    assert runs["kl"].model.norm.weight.grad is None and runs["kl"].lm_head.weight.grad is None
    assert _next_token_kl(dense, runs["kl"], calib) < 0.9 * _next_token_kl(dense, runs["mse"], calib)
