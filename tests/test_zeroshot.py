"""Zero-shot harness: clear message without lm-eval; offline run of a local-file task equals a hand count."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from llama_pruning.evaluation.zeroshot import ZeroShotError, evaluate_zeroshot
from tests.test_data import word_tokenizer
from tests.tiny import tiny_model

DOCS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "banana"], "label": 0},
    {"question": "How many legs does a dog have?", "choices": ["seventeen", "four"], "label": 1},
    {"question": "What color is the sky on a clear day?", "choices": ["blue", "loud"], "label": 1},
    {"question": "Which animal says moo?", "choices": ["a cow", "a table"], "label": 0},
]


def local_task(folder, name: str = "tiny_local_qa") -> None:
    """Write a multiple-choice lm-eval task over a local JSON-lines file into `folder`."""
    data = folder / "docs.jsonl"
    data.write_text("\n".join(json.dumps(doc) for doc in DOCS) + "\n")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_target: label\n"
        'doc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


def test_missing_harness_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(ZeroShotError, match=r"pip install 'llama-pruning\[eval\]'"):
        evaluate_zeroshot(tiny_model(), None, ["piqa"])


@pytest.mark.slow
def test_local_task_accuracy_equals_hand_count(smollm2, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'llama-pruning[eval]')")
    model, tokenizer = smollm2
    local_task(tmp_path)
    result = evaluate_zeroshot(model, tokenizer, ["tiny_local_qa"], batch_size=2, include_path=tmp_path,
                                include_defaults=False)
    correct = 0
    with torch.no_grad():
        for doc in DOCS:
            context = f"Question: {doc['question']}\nAnswer:"
            scores = []
            for choice in doc["choices"]:
                whole = tokenizer(context + " " + choice).input_ids
                start = len(tokenizer(context).input_ids)
                logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
                scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(start, len(whole))))
            correct += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    assert result["tiny_local_qa"]["acc"] == pytest.approx(correct / len(DOCS))


def test_unknown_task_is_a_clear_error(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'llama-pruning[eval]')")
    local_task(tmp_path)
    with pytest.raises(ZeroShotError, match="unknown lm-eval task.*no_such_task_xyz"):
        evaluate_zeroshot(tiny_model(), None, ["tiny_local_qa", "no_such_task_xyz"], include_path=tmp_path,
                          include_defaults=False)


def test_unreachable_task_data_is_a_clear_error(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'llama-pruning[eval]')")
    local_task(tmp_path)
    (tmp_path / "docs.jsonl").unlink()
    tokenizer = word_tokenizer("Question: Answer:")
    tokenizer.eos_token = "[UNK]"
    with pytest.raises(ZeroShotError, match="cannot load the data of task"):
        evaluate_zeroshot(tiny_model(), tokenizer, ["tiny_local_qa"], include_path=tmp_path, include_defaults=False)
