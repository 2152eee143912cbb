"""PPLMetric: equals an independent hand computation, reports under dataset labels, fails clearly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llama_pruning.data import DataError
from llama_pruning.evaluation import PPLMetric, window_nll, window_perplexity
from tests.test_data import word_tokenizer
from tests.tiny import tiny_model


@pytest.mark.slow
def test_smollm2_ppl_equals_hand_computation(smollm2, data_dir):
    model, tokenizer = smollm2
    with open(data_dir / "wikitext2" / "wiki.test.raw", encoding="utf-8") as handle:
        rows = [line.rstrip("\n") for line in handle if line.strip()]
    ids = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
    losses = []
    with torch.no_grad():
        for i in range(16):
            window = ids[i * 128:(i + 1) * 128][None]
            logits = model(window).logits
            losses.append(F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="none"))
    expected = math.exp(torch.cat(losses).double().mean().item())
    result = PPLMetric(model, tokenizer, ["wikitext2"], seq_len=128, batch_size=4, max_windows=16)
    assert list(result) == ["wikitext2 (wikitext-2-raw-v1)"]
    assert result["wikitext2 (wikitext-2-raw-v1)"] == pytest.approx(expected, rel=1e-5)


@pytest.fixture
def corpus(tmp_path):
    """A local text file whose words fit the tiny model's 97-token vocabulary, and a tokenizer for it."""
    words = [f"w{i}" for i in range(90)]
    rows = [" ".join(words[(7 * r + j) % 90] for j in range(11)) for r in range(30)]
    path = tmp_path / "eval.txt"
    path.write_text("\n".join(rows) + "\n")
    return str(path), rows, word_tokenizer(" ".join(words))


def test_ppl_windows_batches_and_keys(corpus):
    path, rows, tokenizer = corpus
    model = tiny_model()
    ids = tokenizer("\n\n".join(rows), add_special_tokens=False).input_ids  # 330 tokens -> 20 windows of 16
    windows = torch.tensor(ids[: 20 * 16]).view(20, 16)
    with torch.no_grad():
        logits = model(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    one = PPLMetric(model, tokenizer, [path], seq_len=16, batch_size=1)
    three = PPLMetric(model, tokenizer, path, seq_len=16, batch_size=3)
    assert list(one) == [path]
    assert one[path] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert three[path] == pytest.approx(one[path], rel=1e-5)
    first = PPLMetric(model, tokenizer, [path], seq_len=16, max_windows=2)[path]
    with torch.no_grad():
        head = F.cross_entropy(logits[:2, :-1].reshape(-1, logits.shape[-1]), windows[:2, 1:].reshape(-1))
    assert first == pytest.approx(math.exp(head.item()), rel=1e-5)


def test_window_nll_is_per_target_and_batch_independent():
    model = tiny_model()
    windows = torch.randint(0, 97, (5, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(windows).logits
    expected = F.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none")
    nll = window_nll(model, windows, batch_size=2)
    assert nll.shape == (5, 15) and nll.dtype == torch.float64
    torch.testing.assert_close(nll.float(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(window_nll(model, windows, batch_size=5), nll, rtol=1e-5, atol=1e-6)
    assert window_perplexity(model, windows, batch_size=2) == math.exp(nll.mean().item())


def test_ppl_restores_training_mode_and_runs_on_given_device(corpus):
    path, _, tokenizer = corpus
    model = tiny_model().train()
    PPLMetric(model, tokenizer, [path], seq_len=16, device="cpu")
    assert model.training


def test_ppl_errors(corpus):
    path, _, tokenizer = corpus
    model = tiny_model()
    with pytest.raises(DataError, match="unknown dataset 'wikitext-2'"):
        PPLMetric(model, tokenizer, ["wikitext-2"])
    with pytest.raises(DataError, match="no window"):
        PPLMetric(model, tokenizer, [path], seq_len=4096)
    with pytest.raises(ValueError, match="max_windows"):
        PPLMetric(model, tokenizer, [path], max_windows=0)
