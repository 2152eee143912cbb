"""Recovery: LoRA / full fine-tuning / distillation on pruned models, merged export, data-parallel equivalence.

Run as a module (`torchrun ... -m tests.test_recovery OUT BATCH`) this file is also the data-parallel worker.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama_pruning.models.export import save_pruned_model
from llama_pruning.recovery import (
    RecoveryConfig,
    RecoveryError,
    TokenDataset,
    add_arguments,
    distillation_loss_sum,
    finetune,
    load_instruction_data,
    load_training_data,
    lora_targets,
    recover,
    recovery_loss,
)
from llama_pruning.recovery.data import IGNORE_INDEX, collate
from llama_pruning.surgery import apply_plan
from tests.tiny import random_plan, tiny_model

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a of and to in is was for on that with as by at from it his an were are which this be has had or "
         "not but have one new first after city year two been time also its all their they more most her game "
         "she other when into war some may there than river over film only school music album season world "
         "would later made series who used team").split()


def pruned_tiny(seed: int = 0, **kwargs):
    """A tiny model pruned by a random plan that also removes an attention block, an MLP block and a layer."""
    model = tiny_model(seed=seed, **kwargs)
    return apply_plan(model, random_plan(model, seed=seed))


def windows(n: int = 8, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, x: torch.Tensor) -> float:
    with torch.no_grad():
        return recovery_loss(model(x).logits, x).item()


def kl_to(model, teacher, x: torch.Tensor, temperature: float) -> float:
    with torch.no_grad():
        kl = distillation_loss_sum(model(x).logits, teacher(x).logits, x, temperature)
    return kl.item() / (x.shape[0] * (x.shape[1] - 1))


def quiet(_: str) -> None:
    """A log that drops messages (keeps test output short)."""


def tiny_tokenizer():
    """A word-level tokenizer whose ids fit the tiny models' vocabulary of 97 (no download needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    assert len(vocab) <= 97
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def instruction_file(path: Path, n: int = 12) -> Path:
    rows = [{"prompt": f"the {WORDS[i + 10]} of the {WORDS[i + 20]} is", "response": f"a {WORDS[i + 30]} {WORDS[i]}"}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def recovery_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


# ---------------------------------------------------------------------------------------------------- losses
def test_recovery_loss_matches_reference_formulas():
    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :3] = IGNORE_INDEX  # a prompt: targets 1 and 2 of row 0 carry no loss
    mask = labels[:, 1:] != IGNORE_INDEX
    assert mask.sum() == 6
    ce = F.cross_entropy(logits[:, :-1][mask], labels[:, 1:][mask])
    torch.testing.assert_close(recovery_loss(logits, labels), ce)
    t = 3.0
    p = F.softmax(teacher[:, :-1][mask] / t, -1)
    kl = (p * (p.log() - F.log_softmax(logits[:, :-1][mask] / t, -1))).sum(-1).mean() * t**2
    torch.testing.assert_close(recovery_loss(logits, labels, teacher, t, alpha=1.0), kl)
    torch.testing.assert_close(recovery_loss(logits, labels, teacher, t, alpha=0.25), 0.25 * kl + 0.75 * ce)
    torch.testing.assert_close(recovery_loss(logits, labels, teacher, t, alpha=0.0), ce)
    assert recovery_loss(teacher, labels, teacher, t).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="vocabulary"):
        recovery_loss(logits, labels, teacher[..., :7], t)


# ------------------------------------------------------------------------------------------- LoRA targets
def test_lora_targets_skip_removed_blocks():
    model = pruned_tiny()
    layers = model.model.layers  # dense layer 2 was deleted: layer 0 has no attention, layer 1 no MLP
    assert [type(layer.self_attn).__name__ for layer in layers] == ["RemovedAttention", "LlamaAttention",
                                                                    "LlamaAttention"]
    assert type(layers[1].mlp).__name__ == "RemovedMLP"
    targets = lora_targets(model, RecoveryConfig().lora_target_modules)
    assert len(targets) == 3 + 4 + 4 + 3  # MLP of layer 0, attention of 1, both of 2
    assert not any(t.startswith("model.layers.0.self_attn") or t.startswith("model.layers.1.mlp") for t in targets)
    assert lora_targets(model, ["q_proj"]) == ["model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    with pytest.raises(RecoveryError, match="unknown LoRA target"):
        lora_targets(model, ["qproj"])
    spec_plan = random_plan(tiny_model())
    spec_plan.attn_groups = [[] for _ in spec_plan.attn_groups]
    no_attention = apply_plan(tiny_model(), spec_plan)
    with pytest.raises(RecoveryError, match="none of the LoRA target modules"):
        lora_targets(no_attention, ["q_proj", "k_proj"])


# -------------------------------------------------------------------------------------------------- LoRA
def test_lora_lowers_loss_and_returns_a_merged_plain_model():
    model = pruned_tiny()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    plan = model.pruning_plan
    x = windows()
    before = lm_loss(model, x)
    out, history = finetune(model, x, RecoveryConfig(lr=1e-2, max_steps=20, batch_size=4), log=quiet)
    assert len(history) == 20 and [h["step"] for h in history] == list(range(1, 21))
    assert history[-1]["loss"] < history[0]["loss"]
    assert lm_loss(out, x) < before - 0.3
    assert out is model and type(out).__name__ == "LlamaForCausalLM" and out.pruning_plan is plan
    assert {k: v.shape for k, v in out.state_dict().items()} == keys  # merged: no lora_A/B, same shapes
    assert not any("lora" in name for name, _ in out.named_modules())
    assert all(p.requires_grad for p in out.parameters())  # flags given back after peft froze them
    assert not out.training and out.config.use_cache


def test_same_seed_gives_identical_weights_and_checkpointing_changes_nothing():
    x = windows()
    config = RecoveryConfig(lr=1e-2, max_steps=4, batch_size=4, seed=3)
    a, _ = finetune(pruned_tiny(), x, config, log=quiet)
    b, _ = finetune(pruned_tiny(), x, config, log=quiet)
    c, _ = finetune(pruned_tiny(), x, RecoveryConfig(lr=1e-2, max_steps=4, batch_size=4, seed=3,
                                                     gradient_checkpointing=True), log=quiet)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for k in sa:
        torch.testing.assert_close(sc[k], sa[k], rtol=0, atol=1e-6)


def test_gradient_accumulation_matches_one_large_batch():
    x = windows()
    big, _ = finetune(pruned_tiny(), x, RecoveryConfig(lr=1e-2, max_steps=3, batch_size=4, lora_dropout=0.0),
                      log=quiet)
    accumulated = RecoveryConfig(lr=1e-2, max_steps=3, batch_size=2, lora_dropout=0.0,
                                 extra_training_args={"gradient_accumulation_steps": 2})
    small, _ = finetune(pruned_tiny(), x, accumulated, log=quiet)
    sb, ss = big.state_dict(), small.state_dict()
    for k in sb:
        torch.testing.assert_close(ss[k], sb[k], rtol=0, atol=1e-5)


def test_bf16_autocast_trains():
    model = pruned_tiny()
    x = windows()
    before = copy.deepcopy(model.state_dict())
    out, history = finetune(model, x, RecoveryConfig(lr=1e-2, max_steps=3, batch_size=4, bf16=True), log=quiet)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert out.model.layers[2].mlp.down_proj.weight.dtype == torch.float32  # autocast: weights stay float32
    assert not torch.equal(before["model.layers.2.mlp.down_proj.weight"], out.model.layers[2].mlp.down_proj.weight)


RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["llama_pruning"] = None  # our package must not be needed
    try:
        import peft  # the fake package first on PYTHONPATH raises ImportError
    except ImportError as err:
        assert "blocked" in str(err), err
    else:
        raise SystemExit("peft was importable")
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
    """
)


def test_merged_save_reloads_without_peft_and_matches_the_adapter_model(tmp_path):
    model = pruned_tiny()
    x = windows()
    peft_model, _ = finetune(model, x, RecoveryConfig(lr=1e-2, max_steps=5, batch_size=4), log=quiet, merge=False)
    assert type(peft_model).__name__ == "PeftModelForCausalLM"
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # adapters moved away from their zero init
    probe = windows(3, 12, seed=1)
    with torch.no_grad():
        expected = peft_model(input_ids=probe).logits
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(input_ids=probe).logits, expected, atol=1e-4)  # adapters matter
    out = save_pruned_model(peft_model.merge_and_unload(), None, tmp_path / "model", dtype="float32")
    fake = tmp_path / "fake_site" / "peft"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('peft is blocked in this test')\n")
    (tmp_path / "reload.py").write_text(RELOAD_SCRIPT)
    torch.save(probe, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "reload.py", str(out), "x.pt", "y.pt"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(fake.parent)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------------------- full
def test_full_finetuning_changes_exactly_the_trainable_parameters():
    model = pruned_tiny()
    model.model.embed_tokens.weight.requires_grad_(False)  # untied model: lm_head stays trainable
    before = copy.deepcopy(model.state_dict())
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    out, _ = finetune(model, windows(), RecoveryConfig(method="full", lr=1e-3, max_steps=3, batch_size=4), log=quiet)
    after = out.state_dict()
    assert after.keys() == before.keys()
    for name, p in out.named_parameters():
        assert torch.equal(p, before[name]) == (name == "model.embed_tokens.weight"), name
    assert {k: b for k, b in out.named_buffers()}.keys() == buffers.keys()
    assert all(torch.equal(b, buffers[k]) for k, b in out.named_buffers())
    assert not out.model.embed_tokens.weight.requires_grad and out.lm_head.weight.requires_grad
    with pytest.raises(RecoveryError, match="every requires_grad is False"):
        finetune(out.requires_grad_(False), windows(), RecoveryConfig(method="full", max_steps=1), log=quiet)


# ------------------------------------------------------------------------------------------ distillation
@pytest.mark.parametrize("method,lr", [("lora", 1e-2), ("full", 1e-3)])
def test_distillation_lowers_kl_to_the_teacher(method, lr):
    dense = tiny_model()
    teacher = copy.deepcopy(dense)
    student = apply_plan(dense, random_plan(dense))
    x = windows()
    before = kl_to(student, teacher, x, 2.0)
    teacher_state = copy.deepcopy(teacher.state_dict())
    config = RecoveryConfig(method=method, lr=lr, max_steps=20, batch_size=4, distill_alpha=1.0)
    out, history = finetune(student, x, config, teacher=teacher, log=quiet)
    assert kl_to(out, teacher, x, 2.0) < 0.7 * before
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())  # teacher frozen
    assert history[-1]["loss"] < history[0]["loss"]


# ------------------------------------------------------------------------------------------ data, recover
def test_instruction_data_trains_on_response_tokens_only(tmp_path):
    tok = tiny_tokenizer()
    path = instruction_file(tmp_path / "pairs.jsonl", n=3)
    data = load_instruction_data(tok, path, num_samples=10, seq_len=32, seed=0)
    assert len(data) == 3
    for item in data:
        ids, labels = item["input_ids"], item["labels"]
        n_prompt = 6  # "the X of the Y is" with no BOS added by this tokenizer
        assert labels[:n_prompt].eq(IGNORE_INDEX).all() and torch.equal(labels[n_prompt:], ids[n_prompt:])
        assert ids[-1] == tok.eos_token_id and len(ids) == n_prompt + 3 + 1  # "a X Y" + EOS
    cut = load_instruction_data(tok, path, num_samples=2, seq_len=8, seed=0)
    assert len(cut) == 2 and all(len(item["input_ids"]) == 8 and (item["labels"] != IGNORE_INDEX).sum() == 2
                                 for item in cut)
    batch = collate([{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
                     {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}])
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(RecoveryError, match="bad.jsonl:2"):
        load_instruction_data(tok, bad, 4, 8)
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", oops\n')
    with pytest.raises(RecoveryError, match="bad.jsonl:2 is not a JSON object"):
        load_instruction_data(tok, bad, 4, 8)
    with pytest.raises(RecoveryError, match="no prompt/response pair"):
        load_instruction_data(tok, path, 4, seq_len=6)


def test_text_files_become_windows_through_the_data_module(tmp_path):
    tok = tiny_tokenizer()
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(9)) for i in range(40)))
    data = load_training_data(tok, str(text), num_samples=6, seq_len=10, seed=1)
    assert isinstance(data, TokenDataset) and len(data) == 6
    assert all(torch.equal(item["input_ids"], item["labels"]) and len(item["input_ids"]) == 10 for item in data)


def test_recover_follows_the_arguments(tmp_path):
    tok = tiny_tokenizer()
    data = instruction_file(tmp_path / "pairs.jsonl")
    model = pruned_tiny()
    assert recover(model, tok, recovery_args(), tmp_path, None, log=quiet) is model
    with pytest.raises(RecoveryError, match="teacher"):
        recover(model, tok, recovery_args("--distill", "--finetune_dataset", str(data)), tmp_path, None, log=quiet)
    with pytest.raises(RecoveryError, match="learning rate"):
        recover(model, tok, recovery_args("--finetune", "--finetune_lr", "0"), tmp_path, None, log=quiet)
    lines = []
    args = recovery_args("--finetune", "--distill", "--finetune_method", "full", "--finetune_dataset", str(data),
                         "--finetune_samples", "8", "--finetune_seq_len", "16", "--finetune_max_steps", "4",
                         "--finetune_lr", "1e-3", "--distill_alpha", "0.5")
    dense = tiny_model()
    teacher_calls = []

    def teacher_factory():
        teacher_calls.append(1)
        return copy.deepcopy(dense)

    out = recover(pruned_tiny(), tok, args, tmp_path / "run", teacher_factory, log=lines.append)
    assert teacher_calls == [1] and type(out).__name__ == "LlamaForCausalLM"
    assert (tmp_path / "run" / "finetune_loss.png").stat().st_size > 0
    assert len((tmp_path / "run" / "finetune_loss.csv").read_text().splitlines()) == 1 + 4
    assert any("full fine-tuning" in line and "distillation" in line for line in lines)
    assert sum("step " in line for line in lines) == 4


def test_recovery_command_trains_a_saved_pruned_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from llama_pruning.recovery.__main__ import main

    dense = tiny_model()
    dense_dir = save_pruned_model(dense, tiny_tokenizer(), tmp_path / "dense")
    pruned = apply_plan(copy.deepcopy(dense), random_plan(dense))
    pruned.pruning_plan.base_model = str(dense_dir)  # the teacher --distill loads by default
    source = save_pruned_model(pruned, tiny_tokenizer(), tmp_path / "pruned")
    data = instruction_file(tmp_path / "pairs.jsonl")
    with pytest.raises(SystemExit):
        main(["--model", str(source), "--output", str(tmp_path / "none")])
    assert "nothing to do" in capsys.readouterr().err
    assert main(["--model", str(source), "--output", str(tmp_path / "out"), "--distill", "--finetune_dataset",
                 str(data), "--finetune_samples", "8", "--finetune_seq_len", "16", "--finetune_max_steps", "3",
                 "--finetune_lr", "1e-2"]) == 0
    assert "recovered model saved" in capsys.readouterr().out
    out = tmp_path / "out"
    assert (out / "finetune_loss.png").is_file() and (out / "pruning_plan.json").is_file()
    before = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).state_dict()
    assert before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------ data parallel
DDP_STEPS, DDP_GLOBAL_BATCH = 4, 4


def ddp_run(out_path: str, per_process_batch: int) -> None:
    """Train LoRA on the tiny pruned model; process 0 saves the merged state dict (the worker of the test)."""
    model = pruned_tiny()
    config = RecoveryConfig(lr=1e-2, max_steps=DDP_STEPS, batch_size=per_process_batch, lora_dropout=0.0)
    out, _ = finetune(model, windows(), config, log=quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(out.state_dict(), out_path)


def test_two_process_data_parallel_matches_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.test_recovery", str(tmp_path / "ddp.pt"), str(DDP_GLOBAL_BATCH // 2)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_run(str(tmp_path / "single.pt"), DDP_GLOBAL_BATCH)
    single, ddp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    assert single.keys() == ddp.keys()
    base = pruned_tiny().state_dict()
    assert any(not torch.equal(single[k], base[k]) for k in single)  # training did something
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_smollm2_pruned_lora_distillation_lowers_kl(smollm2):
    """Real GQA geometry, tied embeddings and removed blocks; kept tiny (2 steps on 24 tokens)."""
    dense, _ = smollm2
    student = apply_plan(copy.deepcopy(dense), random_plan(dense, seed=0))
    x = torch.randint(0, dense.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    before = kl_to(student, dense, x, 2.0)
    out, _ = finetune(student, x, RecoveryConfig(lr=2e-3, max_steps=2, batch_size=1), teacher=dense, log=quiet)
    assert type(out).__name__ == "LlamaForCausalLM" and out.lm_head.weight is out.model.embed_tokens.weight
    assert kl_to(out, dense, x, 2.0) < before
    assert all(p.requires_grad for p in dense.parameters()) and not dense.training  # the fixture is untouched


if __name__ == "__main__":
    ddp_run(sys.argv[1], int(sys.argv[2]))
