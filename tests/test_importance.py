"""Unit importance: Taylor (1st/2nd order), Wanda, magnitude, random, against direct computations; cache."""

from __future__ import annotations

import functools
import logging
import re

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

import llama_pruning.importance.cache as cache_module
import llama_pruning.importance.unit as unit_module
from llama_pruning.gram import MIN_WIDTH
from llama_pruning.importance import (
    METHODS,
    TAYLOR_2ND_VARIANTS,
    cached_importance,
    compute_importance,
)
from llama_pruning.models.arch import model_spec
from llama_pruning.selection import global_plan
from tests.tiny import tiny_model


def markov_tokens(num: int, length: int, seed: int, vocab: int = 97) -> torch.Tensor:
    """Text from a fixed sparse Markov chain (3 successors per token, probabilities .6/.3/.1): learnable."""
    successors = torch.randint(0, vocab, (vocab, 3), generator=torch.Generator().manual_seed(123))
    gen = torch.Generator().manual_seed(seed)
    probs = torch.tensor([0.6, 0.3, 0.1]).expand(num, 3)
    out = torch.empty(num, length, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (num,), generator=gen)
    for t in range(1, length):
        pick = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        out[:, t] = successors[out[:, t - 1], pick]
    return out


def train_markov_model():
    """A 2-layer tiny Llama trained 150 steps on the Markov text, so the loss surface is not flat."""
    model = tiny_model(layers=2, kv_heads=2, n_rep=2, head_dim=8, intermediate=64)
    model.train()
    data = markov_tokens(150 * 16, 32, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        ids = data[step * 16:(step + 1) * 16]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    """The trained tiny model, shared by the module's tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is several times faster on a shared CPU
    try:
        yield train_markov_model()
    finally:
        torch.set_num_threads(threads)


def mean_nll(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_signed_first_order_ranks_measured_removal(trained):
    """-sum(w g) over a channel predicts, in rank, the loss increase when the channel is masked."""
    calib = markov_tokens(32, 32, seed=10**6)
    table = compute_importance(trained, calib, "taylor", progress=False)
    base = mean_nll(trained, calib)
    down = trained.model.layers[1].mlp.down_proj.weight
    increases = []
    for c in range(down.shape[1]):
        saved = down[:, c].clone()
        with torch.no_grad():
            down[:, c] = 0
        increases.append(mean_nll(trained, calib) - base)
        with torch.no_grad():
            down[:, c] = saved
    rows = table[(table.layer_idx == 1) & (table.group_type == "mlp")]
    assert spearmanr(rows.signed_first_order, increases).statistic > 0.6


# ---- hand computations ------------------------------------------------------------------------------

def unit_tensors(model, layer: int, group_type: str, idx: int, grads: dict | None = None) -> list[torch.Tensor]:
    """The weights (or, with `grads`, their gradients) of one unit, sliced by hand from the dense layout."""
    spec = model_spec(model)
    prefix = f"model.layers.{layer}."
    params = dict(model.named_parameters())
    source = grads if grads is not None else {k: v.detach() for k, v in params.items()}
    if group_type == "attn":
        q = slice(idx * spec.n_rep * spec.head_dim, (idx + 1) * spec.n_rep * spec.head_dim)
        kv = slice(idx * spec.head_dim, (idx + 1) * spec.head_dim)
        names = [("self_attn.q_proj", q, False), ("self_attn.k_proj", kv, False), ("self_attn.v_proj", kv, False),
                 ("self_attn.o_proj", q, True)]
    else:
        c = slice(idx, idx + 1)
        names = [("mlp.gate_proj", c, False), ("mlp.up_proj", c, False), ("mlp.down_proj", c, True)]
    out = []
    for name, sl, column in names:
        out.append(source[prefix + name + ".weight"][:, sl] if column else source[prefix + name + ".weight"][sl])
        if not column and prefix + name + ".bias" in params:
            out.append(source[prefix + name + ".bias"][sl])
    return out


def all_units(model):
    spec = model_spec(model)
    for layer in range(spec.num_layers):
        for idx in range(spec.num_kv_heads):
            yield layer, "attn", idx
        for idx in range(spec.intermediate_size):
            yield layer, "mlp", idx


def per_sample_grads(model, samples: torch.Tensor) -> list[dict]:
    """Gradient of each sample's own mean token NLL, by a plain loop."""
    out = []
    for ids in samples:
        model.zero_grad()
        model(input_ids=ids[None], labels=ids[None]).loss.backward()
        out.append({k: p.grad.clone() for k, p in model.named_parameters()})
    model.zero_grad()
    return out


@pytest.mark.parametrize("family", [dict(model_type="llama"), dict(model_type="qwen2", n_rep=3, kv_heads=2)])
def test_taylor_and_taylor_2nd_match_hand_computation(family):
    model = tiny_model(layers=2, bias=True, intermediate=16, seed=3, **family)
    samples = torch.randint(0, 97, (5, 12), generator=torch.Generator().manual_seed(0))
    grads = per_sample_grads(model, samples)
    g = {k: torch.stack([s[k] for s in grads]).mean(0) for k in grads[0]}
    fisher = {k: torch.stack([s[k] ** 2 for s in grads]).mean(0) for k in grads[0]}
    tables = {v: compute_importance(model, samples, "taylor_2nd", taylor_2nd_variant=v, gradient_batch_size=2,
                                    progress=False) for v in TAYLOR_2ND_VARIANTS}
    tables["taylor"] = compute_importance(model, samples, "taylor", gradient_batch_size=2, progress=False)
    expected = {k: [] for k in ("taylor", "signed", "second", "mix")}
    for unit in all_units(model):
        parts = list(zip(unit_tensors(model, *unit), unit_tensors(model, *unit, g), unit_tensors(model, *unit, fisher),
                         strict=True))
        expected["taylor"].append(sum((w * gr).abs().sum() for w, gr, _ in parts).item())
        expected["signed"].append(sum((-w * gr).sum() for w, gr, _ in parts).item())
        expected["second"].append(sum((0.5 * w**2 * f).sum() for w, _, f in parts).item())
        expected["mix"].append(sum((w * gr - 0.5 * w**2 * f).abs().sum() for w, gr, f in parts).item())
    expected = {k: np.array(v) for k, v in expected.items()}
    close = dict(rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(tables["taylor"].importance, expected["taylor"], **close)
    np.testing.assert_allclose(tables["mix"].importance, expected["mix"], **close)
    np.testing.assert_allclose(tables["second"].importance, expected["second"], **close)
    np.testing.assert_allclose(tables["sum"].importance, expected["taylor"] + expected["second"], **close)
    for table in tables.values():
        np.testing.assert_allclose(table.signed_first_order, expected["signed"], rtol=1e-4, atol=1e-6)
    for variant in TAYLOR_2ND_VARIANTS:
        np.testing.assert_allclose(tables[variant].second_order, expected["second"], **close)
    # the documented decomposition: `sum` = `taylor` + second_order
    np.testing.assert_allclose(tables["sum"].importance, tables["taylor"].importance + tables["sum"].second_order,
                               rtol=1e-6)


def test_ignored_targets_leave_taylor_loss_and_obs_gram():
    """Taylor with `ignore` is |w g| of the mean NLL over the kept targets; obs's Gram matrices sum the kept rows only;
    an all-False mask gives exactly the plain tables."""
    import llama_pruning.importance.obs as obs_module

    model = tiny_model(layers=2, bias=True, intermediate=MIN_WIDTH, seed=3)  # down_proj's Gram: block-triangular, mirrored
    samples = torch.randint(0, 97, (5, 12), generator=torch.Generator().manual_seed(0))
    ignore = torch.rand(samples.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    logits = model(input_ids=samples).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), samples[:, 1:], reduction="none")
    nll[~ignore[:, 1:]].mean().backward()
    g = {k: p.grad for k, p in model.named_parameters()}
    expected = [sum((w * gr).abs().sum() for w, gr in zip(unit_tensors(model, *unit), unit_tensors(model, *unit, g),
                                                          strict=True)).item() for unit in all_units(model)]
    model.zero_grad(set_to_none=True)
    table = compute_importance(model, samples, "taylor", gradient_batch_size=2, ignore=ignore, progress=False)
    np.testing.assert_allclose(table.importance, expected, rtol=1e-4, atol=1e-7)

    inputs: dict = {}
    hooks = [lin.register_forward_hook(lambda m, a, o, name=name: inputs.setdefault(name, []).append(a[0].detach()))
             for name, lin in model.named_modules() if name.endswith(("o_proj", "down_proj"))]
    with torch.no_grad():
        model(input_ids=samples)
    for hook in hooks:
        hook.remove()
    grams = []
    real = obs_module.greedy_obs
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(obs_module, "greedy_obs", lambda w, gram, *a, **k: (grams.append(gram.clone()), real(w, gram, *a, **k))[1])
        compute_importance(model, samples, "obs", gradient_batch_size=2, ignore=ignore, progress=False)
    kept = [x[0][~ignore].double() for x in inputs.values()]  # per projection, layer 1 then layer 0 (folding order)
    expected_grams = [x.T @ x for x in kept]
    names = list(inputs)
    order = [names.index(n) for n in ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj",
                                      "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj")]
    for gram, i in zip(grams, order, strict=True):
        torch.testing.assert_close(gram, expected_grams[i], rtol=1e-6, atol=1e-8)
    none = torch.zeros_like(ignore)
    for method in ("taylor", "obs"):
        plain = compute_importance(model, samples, method, gradient_batch_size=2, progress=False)
        pd.testing.assert_frame_equal(compute_importance(model, samples, method, gradient_batch_size=2, ignore=none,
                                                         progress=False), plain, check_exact=True)


@pytest.mark.parametrize("family", [dict(model_type="llama"), dict(model_type="qwen2", n_rep=3, kv_heads=2)])
def test_wanda_matches_recorded_activations(family):
    model = tiny_model(layers=2, bias=True, intermediate=16, seed=4, **family)
    samples = torch.randint(0, 97, (6, 10), generator=torch.Generator().manual_seed(1))
    inputs = {}
    handles = [module.register_forward_hook(lambda m, i, o, name=name: inputs.__setitem__(name, i[0]))
               for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        model(input_ids=samples)
    for handle in handles:
        handle.remove()
    # per-weight Wanda scores |W_ij| * ||X_j||; a bias reads a constant 1 over all 60 tokens
    scores = {}
    for name, module in model.named_modules():
        if name in inputs:
            norms = inputs[name].reshape(-1, module.in_features).norm(dim=0)
            scores[name + ".weight"] = module.weight.detach().abs() * norms
            if module.bias is not None:
                scores[name + ".bias"] = module.bias.detach().abs() * samples.numel() ** 0.5
    expected = [sum(t.sum() for t in unit_tensors(model, *unit, scores)).item() for unit in all_units(model)]
    table = compute_importance(model, samples, "wanda", gradient_batch_size=4, progress=False)
    np.testing.assert_allclose(table.importance, expected, rtol=1e-5)


def test_magnitude_and_random():
    model = tiny_model(layers=2, bias=True, intermediate=16)
    samples = torch.zeros(1, 4, dtype=torch.long)
    table = compute_importance(model, samples, "magnitude", progress=False)
    expected = [torch.sqrt(sum((w**2).sum() for w in unit_tensors(model, *u))).item() for u in all_units(model)]
    np.testing.assert_allclose(table.importance, expected, rtol=1e-6)
    first = compute_importance(model, samples, "random", seed=5, progress=False)
    pd.testing.assert_frame_equal(first, compute_importance(model, samples, "random", seed=5, progress=False))
    assert not np.allclose(first.importance, compute_importance(model, samples, "random", seed=6).importance)


def test_table_layout():
    model = tiny_model(layers=3, kv_heads=2, intermediate=10)
    table = compute_importance(model, torch.zeros(1, 4, dtype=torch.long), "magnitude", progress=False)
    assert list(table.columns) == ["layer_idx", "group_type", "group_idx", "importance"]
    assert len(table) == 3 * (2 + 10)
    layer1 = table[table.layer_idx == 1]
    assert layer1.group_type.tolist() == ["attn"] * 2 + ["mlp"] * 10
    assert layer1.group_idx.tolist() == [0, 1] + list(range(10))


@pytest.mark.parametrize("method, fisher", [("taylor", None), ("taylor_2nd", None), ("obs", "sampled"), ("obs", "labels")])
def test_micro_batch_size_does_not_change_scores(method, fisher):
    model = tiny_model(layers=2, bias=True, intermediate=16, seed=7)
    samples = torch.randint(0, 97, (8, 12), generator=torch.Generator().manual_seed(2))
    extra = {} if fisher is None else {"obs_fisher": fisher}
    tables = [compute_importance(model, samples, method, gradient_batch_size=b, progress=False, **extra)
              for b in (1, 2, 3, 8)]
    for table in tables[1:]:
        for column in table.columns[3:]:
            ref = tables[0][column].to_numpy()
            np.testing.assert_allclose(table[column], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("method", ["taylor", "taylor_2nd"])
def test_per_weight_buffers_live_for_one_layer_at_a_time_and_state_restored(method, monkeypatch):
    model = tiny_model(layers=3, intermediate=16, seed=8)
    model.lm_head.weight.requires_grad_(False)
    model.model.layers[0].train()
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    samples = torch.randint(0, 97, (5, 10), generator=torch.Generator().manual_seed(3))
    live = []
    fold = unit_module.TaylorAccumulator.fold_layer

    def spy(self, layer_idx):
        live.append((layer_idx, {key[0] for key in (*self.grad, *self.sq)}))
        fold(self, layer_idx)

    monkeypatch.setattr(unit_module.TaylorAccumulator, "fold_layer", spy)
    compute_importance(model, samples, method, gradient_batch_size=2, progress=False)
    assert live == [(2, {2}), (1, {1}), (0, {0})]  # last layer first, and only its own buffers exist
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_sampled_ids_invert_the_model_cdf():
    """Each target is the token whose CDF interval holds its uniform draw; the first token (no prediction) stays."""
    from llama_pruning.importance.runtime import sampled_ids

    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0)) * 3
    cdf = logits[:, :-1].softmax(-1).cumsum(-1)
    want = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    lower = torch.where(want > 0, cdf.gather(-1, (want - 1).clamp(min=0)[..., None])[..., 0], torch.zeros(()))
    mid = (lower + cdf.gather(-1, want[..., None])[..., 0]) / 2  # the middle of each wanted token's interval
    ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(2))
    uniform = torch.cat([mid.double(), torch.zeros(2, 1, dtype=torch.float64)], 1)  # uniform[:, t] draws target t + 1
    drawn = sampled_ids(logits, ids, uniform)
    assert torch.equal(drawn[:, 0], ids[:, 0]) and torch.equal(drawn[:, 1:], want)


def test_obs_sampled_fisher_is_the_nll_fisher_of_the_drawn_targets():
    """With `obs_fisher="sampled"`, greedy OBS receives sum_t (dL/dy_t)^2 of the mean NLL of targets drawn from the
    model's own predictions with uniforms from `--seed`; `labels` that of the text's next tokens; seeds differ."""
    import llama_pruning.importance.obs as obs_module
    from llama_pruning.importance.runtime import sampled_ids

    model = tiny_model(layers=2, intermediate=16, seed=5)
    samples = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(0))
    real = obs_module.greedy_obs
    for fisher in ("sampled", "labels"):
        got = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(obs_module, "greedy_obs",
                          lambda w, g, f, *a, got=got, **k: (got.append(f.clone()), real(w, g, f, *a, **k))[1])
            compute_importance(model, samples, "obs", gradient_batch_size=3, progress=False, obs_fisher=fisher, seed=7)
        outputs = {}

        def keep(module, args, out, name, outputs=outputs):
            out.retain_grad()
            outputs[name] = out

        hooks = [lin.register_forward_hook(functools.partial(keep, name=name))
                 for name, lin in model.named_modules() if name.endswith(("o_proj", "down_proj"))]
        logits = model(input_ids=samples).logits
        for hook in hooks:
            hook.remove()
        uniform = torch.rand(samples.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        targets = sampled_ids(logits.detach(), samples, uniform) if fisher == "sampled" else samples
        torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets[:, 1:]).backward()
        model.zero_grad(set_to_none=True)
        order = ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj",
                 "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj")  # folding order
        for f, name in zip(got, order, strict=True):
            torch.testing.assert_close(f, outputs[name].grad.double().square().sum((0, 1)), rtol=1e-4, atol=1e-12)
        if fisher == "sampled":
            assert not torch.equal(targets, samples)
    tables = [compute_importance(model, samples, "obs", progress=False, obs_fisher=f, seed=s)
              for f, s in (("sampled", 0), ("sampled", 1), ("labels", 0), ("labels", 1))]
    assert not tables[0].importance.equals(tables[1].importance)
    pd.testing.assert_frame_equal(tables[2], tables[3], check_exact=True)  # labels: the seed plays no part


def _joint_error(w: torch.Tensor, gram: torch.Tensor, fisher: torch.Tensor, removed: list[int]) -> float:
    """0.5 sum_d F_d min ||(W' - W)_d||^2_H over W' with the `removed` columns zero (the kept ones solved jointly)."""
    if not removed:
        return 0.0
    kept = [j for j in range(w.shape[1]) if j not in removed]
    delta = torch.zeros_like(w)
    delta[:, removed] = -w[:, removed]
    if kept:
        delta[:, kept] = w[:, removed] @ gram[removed][:, kept] @ torch.linalg.inv(gram[kept][:, kept])
    return 0.5 * float((fisher * torch.einsum("di,ij,dj->d", delta, gram, delta)).sum())


@pytest.mark.parametrize("group", [1, 2])
def test_greedy_obs_matches_brute_force_joint_refits(group):
    """Each step's score is the rise of the jointly re-fitted error, and the picks are the greedy minima."""
    from llama_pruning.importance.obs import greedy_obs

    gen = torch.Generator().manual_seed(group)
    x = torch.randn(40, 8, dtype=torch.float64, generator=gen) @ torch.randn(8, 8, dtype=torch.float64, generator=gen)
    w = torch.randn(5, 8, dtype=torch.float64, generator=gen)
    fisher = torch.rand(5, dtype=torch.float64, generator=gen) + 0.1
    damping = 0.05
    gram = x.T @ x
    damped = gram + damping * gram.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    scores = greedy_obs(w, gram.clone(), fisher, group, damping)
    removed: list[int] = []
    best, expected = 0.0, torch.empty(8 // group, dtype=torch.float64)
    for _ in range(8 // group):
        base = _joint_error(w, damped, fisher, removed)
        rises = {g: _joint_error(w, damped, fisher, removed + list(range(g * group, (g + 1) * group))) - base
                 for g in range(8 // group) if g * group not in removed}
        g = min(rises, key=rises.get)
        best = max(best, rises[g])
        expected[g] = best
        removed += list(range(g * group, (g + 1) * group))
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-9)


def test_greedy_obs_after_set_num_threads():
    """Groups of 192 columns (SmolLM2's GQA groups) score the same after torch.set_num_threads(2), where batched
    CPU linalg.inv fails with MKL's DLASWP error (pytorch#142815)."""
    from llama_pruning.importance.obs import greedy_obs

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(800, 576, dtype=torch.float64, generator=gen)
    w = torch.randn(16, 576, dtype=torch.float64, generator=gen)
    fisher = torch.rand(16, dtype=torch.float64, generator=gen) + 0.1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = greedy_obs(w, x.T @ x, fisher, 192)
        torch.set_num_threads(2)
        two = greedy_obs(w, x.T @ x, fisher, 192)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(two, one, rtol=1e-9, atol=0)


def test_bf16_model_scores_close_to_float32():
    model = tiny_model(layers=2, intermediate=16, seed=9)
    samples = torch.randint(0, 97, (4, 10), generator=torch.Generator().manual_seed(4))
    ref = compute_importance(model, samples, "taylor", progress=False)
    low = compute_importance(model.to(torch.bfloat16), samples, "taylor", progress=False)
    assert low.importance.dtype == np.float64
    assert spearmanr(low.importance, ref.importance).statistic > 0.95


def test_bad_input_messages():
    model = tiny_model(layers=2)
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="choose one of " + ", ".join(METHODS)):
        compute_importance(model, ids, "fisher")
    with pytest.raises(ValueError, match="unknown taylor_2nd variant 'both'"):
        compute_importance(model, ids, "taylor_2nd", taylor_2nd_variant="both")
    with pytest.raises(ValueError, match="unknown obs Fisher 'true'; choose one of sampled, labels"):
        compute_importance(model, ids, "obs", obs_fisher="true")
    with pytest.raises(ValueError, match="LongTensor"):
        compute_importance(model, ids.float(), "taylor")
    with pytest.raises(ValueError, match="batch size"):
        compute_importance(model, ids, "wanda", gradient_batch_size=0)
    with pytest.raises(ValueError, match="ignore must be a bool mask shaped like the samples"):
        compute_importance(model, ids, "taylor", ignore=torch.zeros(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="ignore applies to taylor, taylor_2nd, obs, not wanda"):
        compute_importance(model, ids, "wanda", ignore=torch.zeros(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="every calibration target"):
        compute_importance(model, ids, "obs", ignore=torch.ones(2, 8, dtype=torch.bool))
    model.config.pruned_layout = [{}]
    with pytest.raises(ValueError, match="already pruned"):
        compute_importance(model, ids, "taylor")


# ---- cache ------------------------------------------------------------------------------------------

def test_cache_hit_returns_identical_table_without_recomputing(tmp_path, monkeypatch):
    model = tiny_model(layers=2, intermediate=16)
    samples = torch.randint(0, 97, (4, 10), generator=torch.Generator().manual_seed(5))
    fields = {"dataset": "markov", "seed": 0}
    first = cached_importance(model, samples, "taylor_2nd", tmp_path, fields, progress=False)
    assert [p.suffix for p in tmp_path.iterdir()] == [".csv"]  # no temporary file left behind
    pd.testing.assert_frame_equal(first, compute_importance(model, samples, "taylor_2nd", progress=False))

    def fail(*args, **kwargs):
        raise AssertionError("recomputed despite a cache entry")

    monkeypatch.setattr(cache_module, "compute_importance", fail)
    again = cached_importance(model, samples, "taylor_2nd", tmp_path, fields, gradient_batch_size=1, progress=False)
    pd.testing.assert_frame_equal(again, first, check_exact=True)
    # anything that changes the table changes the entry
    ignore = torch.zeros(samples.shape, dtype=torch.bool)
    pd.testing.assert_frame_equal(cached_importance(model, samples, "taylor_2nd", tmp_path, fields, ignore=ignore,
                                                    progress=False), first, check_exact=True)  # nothing left out
    ignore[:, 3] = True
    for other_samples, other_fields, kwargs in ((samples, fields, {"taylor_2nd_variant": "sum"}),
                                                (samples, fields, {"ignore": ignore}),
                                                (samples.flip(0), fields, {}),
                                                (samples, {**fields, "dataset": "other"}, {})):
        with pytest.raises(AssertionError, match="recomputed"):
            cached_importance(model, other_samples, "taylor_2nd", tmp_path, other_fields, progress=False, **kwargs)


def _whole_rows(data: bytes) -> bytes:
    """The audit's damage: the first 1000 bytes, cut back to the last complete row."""
    return data[:data.rindex(b"\n", 0, 1000) + 1]


@pytest.mark.parametrize("damage, reason", [
    (_whole_rows, r"the table has \d+ rows for the model's 40 units"),
    (lambda data: data[:1000], "last row does not end in a newline"),  # a cut inside a row
    (lambda data: data[:-3], "last row does not end in a newline"),  # every unit there, the last score cut short
    (lambda data: b"garbage\n", r"the table lacks the column\(s\) layer_idx, group_type, group_idx, importance"),
    (lambda data: b"garbage", "last row does not end in a newline"),
    (lambda data: b"", "does not parse: No columns to parse from file"),
    (lambda data: b"\xff\xfe\n", "does not parse: 'utf-8' codec can't decode"),
], ids=["whole-rows", "cut-in-a-row", "last-score-cut", "garbage-line", "garbage", "empty", "not-utf8"])
def test_corrupt_cache_entry_is_warned_about_recomputed_and_overwritten(tmp_path, monkeypatch, caplog, damage, reason):
    """A cache entry is derived data: one that is not a whole table of the model is a miss, never trusted."""
    model = tiny_model(layers=2, intermediate=16)
    samples = torch.randint(0, 97, (4, 10), generator=torch.Generator().manual_seed(5))
    clean = cached_importance(model, samples, "taylor", tmp_path, progress=False)
    (path,) = tmp_path.iterdir()
    written = path.read_bytes()
    path.write_bytes(damage(written))
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return compute_importance(*args, **kwargs)

    monkeypatch.setattr(cache_module, "compute_importance", counting)
    with caplog.at_level(logging.INFO, logger=cache_module.__name__):
        again = cached_importance(model, samples, "taylor", tmp_path, progress=False)
    assert len(calls) == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"importance cache entry {path} is unusable, recomputing it: ") and re.search(reason, warning)
    assert "\n" not in warning and not any("cache hit" in r.getMessage() for r in caplog.records)
    pd.testing.assert_frame_equal(again, clean, check_exact=True)
    assert path.read_bytes() == written  # the entry overwritten with the recomputed table
    assert global_plan(model, again, 0.2, remove_empty_layers=True)[0] == global_plan(model, clean, 0.2,
                                                                                      remove_empty_layers=True)[0]


def test_obs_cache_entry_changes_with_its_constants(monkeypatch):
    """obs's damping and round count shape its table, so an edited constant must not hit an entry made before."""
    model = tiny_model(layers=2, intermediate=16)
    samples = torch.zeros(2, 8, dtype=torch.long)
    path = cache_module.cache_path("c", cache_module.importance_cache_key(model, samples, "obs"))
    for name, value in (("DAMPING", 0.2), ("OBS_CHUNKS", 64)):
        with monkeypatch.context() as patch:
            patch.setattr(cache_module, name, value)
            assert cache_module.cache_path("c", cache_module.importance_cache_key(model, samples, "obs")) != path
    key = functools.partial(cache_module.importance_cache_key, model, samples, "obs")
    paths = {cache_module.cache_path("c", key(**kw)) for kw in ({}, {"seed": 1}, {"obs_fisher": "labels"})}
    assert len(paths | {path}) == 3  # the sampled targets' seed and the Fisher's kind are part of the key
    assert key(obs_fisher="labels", seed=0) == key(obs_fisher="labels", seed=1)  # labels: no draws


@pytest.mark.slow
def test_smollm2_taylor_and_wanda_tables(smollm2):
    model, _ = smollm2
    samples = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    for method in ("taylor", "wanda"):
        table = compute_importance(model, samples, method, gradient_batch_size=2, progress=False)
        assert len(table) == 30 * (3 + 1536)
        assert np.isfinite(table.importance).all() and (table.importance > 0).all()
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
