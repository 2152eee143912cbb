"""Layer importance: block influence and removal against direct computations; taylor sums."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llama_pruning.importance import LAYER_METHODS, compute_importance, layer_importance
from tests.tiny import tiny_model


@pytest.fixture
def model_and_samples():
    model = tiny_model(layers=4, intermediate=24, seed=11)
    samples = torch.randint(0, 97, (5, 12), generator=torch.Generator().manual_seed(0))
    return model, samples


def test_block_influence_matches_layer_by_layer_run(model_and_samples):
    """Run the decoder layers by hand and compare each layer's input and output token by token."""
    model, samples = model_and_samples
    with torch.no_grad():
        hidden = model.model.embed_tokens(samples)
        positions = torch.arange(samples.shape[1])[None]
        rotary = model.model.rotary_emb(hidden, position_ids=positions)
        expected = []
        for layer in model.model.layers:  # no mask: causal attention, as in the model's own forward
            out = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions)
            expected.append(1 - F.cosine_similarity(hidden, out, dim=-1).mean().item())
            hidden = out
    scores = layer_importance(model, samples, "block_influence", batch_size=2, progress=False)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_removal_matches_model_without_the_layer(model_and_samples):
    model, samples = model_and_samples
    layers = list(model.model.layers)
    with torch.no_grad():
        base = model(input_ids=samples, labels=samples).loss.item()
        expected = []
        for i in range(len(layers)):
            shorter = copy.deepcopy(model)
            del shorter.model.layers[i]
            shorter.config.num_hidden_layers -= 1
            expected.append(shorter(input_ids=samples, labels=samples, use_cache=False).loss.item() - base)
    scores = layer_importance(model, samples, "removal", batch_size=2, progress=False)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
    assert list(model.model.layers) == layers  # the model got its own layer list back


def test_taylor_layer_scores_are_unit_sums(model_and_samples):
    model, samples = model_and_samples
    table = compute_importance(model, samples, "taylor", progress=False)
    expected = [table[table.layer_idx == i].importance.sum() for i in range(4)]
    np.testing.assert_allclose(layer_importance(model, samples, "taylor", table=table), expected, rtol=1e-12)
    np.testing.assert_allclose(layer_importance(model, samples, "taylor", batch_size=5, progress=False), expected,
                               rtol=1e-5)
    with pytest.raises(ValueError, match=r"has 56 rows for the model's 112 units"):  # layers 2 and 3 would score 0
        layer_importance(model, samples, "taylor", table=table[table.layer_idx < 2])


def test_default_is_block_influence_and_bad_method(model_and_samples):
    model, samples = model_and_samples
    assert layer_importance(model, samples, progress=False) == layer_importance(
        model, samples, "block_influence", progress=False)
    with pytest.raises(ValueError, match="choose one of " + ", ".join(LAYER_METHODS)):
        layer_importance(model, samples, "angular")


@pytest.mark.slow
def test_smollm2_block_influence(smollm2):
    model, _ = smollm2
    samples = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    scores = layer_importance(model, samples, "block_influence", progress=False)
    assert len(scores) == 30 and all(0 < s < 2 for s in scores)
