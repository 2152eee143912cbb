"""GGUF export, checked by llama.cpp itself (through llama-cpp-python): logits, generation, tokenization."""

from __future__ import annotations

import copy
import importlib.util
import json

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llama_pruning.cli.main import main
from llama_pruning.models.arch import model_spec
from llama_pruning.models.gguf_export import (
    GGUFExportError,
    check_group_fallbacks,
    check_outtype,
    check_plan_fallbacks,
    export_gguf,
    rope_permute,
    tensor_type_counts,
)
from llama_pruning.models.loading import SMOLLM2_GGUF, smollm2_dir
from llama_pruning.plan import PruningPlan
from llama_pruning.surgery import apply_plan
from tests.tiny import random_plan, tiny_model

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama_cpp is not importable: pip install '.[gguf]'")

TEXT = ["The quick brown fox jumps over the lazy dog in 2024, isn't it? Numbers 12345 and 678.",
        "Llamas graze on the high plains; they're calm, they'd say.\n\n  Indented   spaces\tand tabs.",
        "Pruning removes whole heads and channels; the model keeps its shape per layer."] * 20
SAMPLE = "Hello world! In 2024, llamas weren't pruned.\n\n  Then   3141 heads went\tto Llama's farm."
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def byte_level_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A tiny trained byte-level BPE with the pre-tokenizer of Llama-3 (`llama-bpe`), Qwen2 or SmolLM2."""
    if kind == "smollm":
        pre = [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    else:
        split = LLAMA3_SPLIT if kind == "llama-bpe" else QWEN2_SPLIT
        pre = [pre_tokenizers.Split(Regex(split), "isolated"),
               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin|>", "<|end|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "llama-bpe":  # Llama-3 prepends BOS
        tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A", pair="<|begin|> $A $B",
                                                           special_tokens=[("<|begin|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>",
                                   chat_template="{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}")


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny Llama-2-style tokenizer: BPE over '▁'-joined text with byte fallback, BOS prepended."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=500, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def llama_cpp_model(path, n_ctx: int = 64):
    """Load a GGUF in llama.cpp with an F32 KV cache and all logits kept (single-threaded, quiet)."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=1,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False, seed=0)


def llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp_model(path)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(ours).max())


def plan_for(model, attn: list[int], mlp: list[int], bias: bool = False) -> PruningPlan:
    """Keep the first `attn[i]` groups and the last `mlp[i]` channels of each layer."""
    spec = model_spec(model)
    plan = PruningPlan.dense(spec, model.config.name_or_path)
    for i in range(spec.num_layers):
        plan.attn_groups[i] = list(range(0, spec.num_kv_heads))[: attn[i]]
        plan.mlp_channels[i] = list(range(spec.intermediate_size - mlp[i], spec.intermediate_size))
    if bias:
        plan.bias_compensation = [True] * spec.num_layers
    return plan


def randomize_biases(model) -> None:
    """Compensation biases start at zero; give them values so their export is checked."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)


CASES = {  # name: (model_type, qkv bias, kept groups per layer (of 4), kept channels per layer (of 48), bias compensation)
    "llama-uniform": ("llama", False, [2, 2, 2, 2], [24, 24, 24, 24], False),
    "llama-nonuniform": ("llama", False, [4, 1, 3, 2], [24, 7, 48, 13], False),
    "llama-attn0-removed": ("llama", False, [0, 2, 3, 1], [24, 10, 16, 20], False),
    "llama-attn-middle-removed": ("llama", False, [3, 0, 2, 4], [24, 10, 16, 20], False),
    "llama-mlp-middle-removed": ("llama", False, [2, 3, 2, 1], [24, 0, 16, 20], False),
    "llama-mlp-last-removed": ("llama", False, [2, 3, 2, 1], [24, 12, 16, 0], False),
    "llama-layers-deleted": ("llama", False, [2, 0, 3, 0], [20, 0, 16, 0], False),
    "llama-bias-compensation": ("llama", False, [1, 3, 0, 2], [16, 0, 30, 8], True),
    "mistral-nonuniform": ("mistral", False, [0, 4, 1, 2], [9, 30, 0, 17], False),
    "qwen2-uniform-bias": ("qwen2", True, [3, 3, 3, 3], [16, 16, 16, 16], False),
    "qwen2-nonuniform-bias": ("qwen2", True, [1, 4, 0, 2], [40, 0, 16, 33], True),
}


@needs_llama_cpp
@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_logits_match(tmp_path, case):
    model_type, bias, attn, mlp, compensate = CASES[case]
    tokenizer = sentencepiece_tokenizer() if model_type == "mistral" else byte_level_tokenizer(
        "qwen2" if model_type == "qwen2" else "llama-bpe")
    model = tiny_model(model_type=model_type, bias=bias, vocab_size=len(tokenizer), seed=3)
    apply_plan(model, plan_for(model, attn, mlp, compensate))
    if compensate:
        randomize_biases(model)
    counts = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    assert set(counts) == {"F32"}
    arch = gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents()
    assert arch == ("llama" if "-uniform" in case else "deci")
    ids = tokenizer(SAMPLE)["input_ids"][:40]
    assert relative_error(hf_logits(model, ids), llama_cpp_logits(tmp_path / "m.gguf", ids)) < 1e-3


@needs_llama_cpp
def test_llama3_rope_scaling_matches(tmp_path):
    tokenizer = byte_level_tokenizer("llama-bpe")
    model = tiny_model(vocab_size=len(tokenizer), seed=4, head_dim=16)
    model.config.rope_parameters = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16, "rope_theta": 500000.0}
    model = type(model)(model.config).eval()  # rebuild the rotary embedding with the scaled frequencies
    apply_plan(model, plan_for(model, [4, 1, 3, 2], [24, 7, 48, 13]))
    export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    ids = tokenizer(SAMPLE)["input_ids"][:60]
    assert relative_error(hf_logits(model, ids), llama_cpp_logits(tmp_path / "m.gguf", ids)) < 1e-3


def test_unsupported_rope_scaling_refused(tmp_path):
    tokenizer = byte_level_tokenizer("llama-bpe")
    model = tiny_model(vocab_size=len(tokenizer))
    model.config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(GGUFExportError, match="RoPE scaling 'yarn'"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    assert not list(tmp_path.iterdir())


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["llama-bpe", "qwen2", "smollm", "sentencepiece"])
def test_llama_cpp_tokenizes_like_hf(tmp_path, kind):
    tokenizer = sentencepiece_tokenizer() if kind == "sentencepiece" else byte_level_tokenizer(kind)
    model = tiny_model(vocab_size=len(tokenizer))
    export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    if kind != "sentencepiece":
        assert fields["tokenizer.ggml.pre"].contents() == kind
        assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    llm = llama_cpp_model(tmp_path / "m.gguf")
    for text in [SAMPLE, *TEXT[:3], " leading space", "digits 1234567890 end"]:
        add_bos = tokenizer(text)["input_ids"][:1] == [tokenizer.bos_token_id]
        assert llm.tokenize(text.encode(), add_bos=add_bos, special=False) == tokenizer(text)["input_ids"], text


def test_rope_permutation_turns_half_split_into_adjacent_pairs():
    """Rotating adjacent pairs of permuted rows equals HF's half-split rotation, permuted the same way."""
    heads, dim, pos = 3, 8, 5
    x = torch.randn(heads * dim)
    theta = pos / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    cos, sin = theta.cos().repeat(2), theta.sin().repeat(2)
    xh = x.view(heads, dim)
    hf = xh * cos + torch.cat([-xh[:, dim // 2:], xh[:, : dim // 2]], dim=1) * sin
    pairs = rope_permute(x, heads).view(heads, dim // 2, 2)
    c, s = theta.cos(), theta.sin()
    llama = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], dim=-1)
    assert torch.allclose(llama.reshape(-1), rope_permute(hf.reshape(-1), heads), atol=1e-6)


def test_quantized_fallback_refused_unless_allowed(tmp_path):
    tokenizer = byte_level_tokenizer("llama-bpe")
    model = tiny_model(vocab_size=len(tokenizer), intermediate=64, head_dim=16)  # hidden 128, MLP 64: all 32-aligned
    dense_spec = model_spec(model)
    # the untied output.weight stays at Q8_0
    assert export_gguf(model, tokenizer, tmp_path / "dense.gguf", "q4_1") == {"F32": 9, "Q4_1": 29, "Q8_0": 1}
    apply_plan(model, plan_for(model, [4, 2, 3, 1], [32, 20, 64, 32]))
    with pytest.raises(GGUFExportError, match="--round_to 32"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_1", dense_spec=dense_spec)
    assert not (tmp_path / "m.gguf").exists()
    counts = export_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_1", dense_spec=dense_spec, allow_fallback=True)
    assert counts == {"F32": 9, "Q4_1": 28, "Q8_0": 1, "F16": 1}  # blk.1.ffn_down (20 channels) falls back
    assert tensor_type_counts(tmp_path / "m.gguf") == counts


def test_attention_fallback_advice_leaves_round_to_out(tmp_path):
    """A pruned attn_output off the block is refused with advice that can fix it: --round_to sets MLP widths only."""
    tokenizer = byte_level_tokenizer("llama-bpe")
    model = tiny_model(vocab_size=len(tokenizer), intermediate=64, head_dim=16, n_rep=1)  # groups of 16 columns, dense 64
    dense_spec = model_spec(model)
    apply_plan(model, plan_for(model, [3, 4, 4, 4], [64, 64, 64, 64]))  # layer 0's attn_output: 48 columns
    with pytest.raises(GGUFExportError, match="GQA groups of 16 columns, which --round_to does not change") as err:
        export_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_1", dense_spec=dense_spec)
    assert "(e.g. blk.0.attn_output.weight)" in str(err.value) and "prune with --round_to" not in str(err.value)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(("n_rep", "head_dim", "kv_heads", "outtype", "fits"), [
    (1, 128, 32, "q4_k_m", "f32 / f16 / bf16 / q8_0 / q4_0 / q4_1 / q5_0 / q5_1"),  # Llama-2-7B: MHA, groups of 128
    (1, 16, 4, "q4_1", "f32 / f16 / bf16"),
    (4, 128, 8, "q4_k_m", None),  # Llama-3-8B: groups of 512 columns
    (3, 64, 3, "q4_k_m", None),  # SmolLM2: the dense 576 is off the block too, so the export keeps its types
    (1, 16, 4, "f16", None),
])
def test_group_fallbacks_refused_before_work(n_rep, head_dim, kv_heads, outtype, fits):
    """An --outtype whose block divides the dense o_proj width but not one GQA group's is refused from the config alone."""
    geometry = {"n_rep": n_rep, "head_dim": head_dim, "num_kv_heads": kv_heads}
    if fits is None:
        check_group_fallbacks(geometry, outtype)
        return
    with pytest.raises(GGUFExportError) as err:
        check_group_fallbacks(geometry, outtype)
    assert f"GQA groups of {n_rep * head_dim} columns" in str(err.value)
    assert f"choose --outtype {fits}, or swap --save_gguf for --save_model" in str(err.value)


def test_layer_command_rounds_for_the_gguf_block(tmp_path, data_dir):
    """`layer --save_gguf --outtype q4_1` rounds MLP widths to 32, so no tensor falls back to a wider type."""
    tokenizer = byte_level_tokenizer("llama-bpe")
    tiny_model(vocab_size=len(tokenizer), intermediate=256, head_dim=16).save_pretrained(tmp_path / "dense")  # hidden 128
    tokenizer.save_pretrained(tmp_path / "dense")
    code = main(["layer", "--base_model", str(tmp_path / "dense"), "--output_root", str(tmp_path), "--save_ckpt_log_name",
                 "l", "--pruning_ratio", "0.3", "--pruning_distribution", "0:10", "--save_gguf", "--outtype", "q4_1",
                 "--reconstruct", "none", "--num_samples", "4", "--seq_len", "32", "--gradient_batch_size", "2",
                 "--device", "cpu"])
    assert code == 0
    path = tmp_path / "l" / "model-q4_1.gguf"
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "deci"
    widths = reader.fields["deci.feed_forward_length"].contents()
    config = json.loads((tmp_path / "l" / "layer_importance_config.json").read_text())["layers"]
    assert widths == [round(256 * (1 - layer["mlp_ratio"])) for layer in config]
    assert all(w % 32 == 0 for w in widths) and len(set(widths)) > 1
    assert tensor_type_counts(path) == {"F32": 9, "Q4_1": 29, "Q8_0": 1}  # the dense export's types: nothing fell back


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_plan_fallbacks_refuse_what_the_export_refuses(tmp_path, outtype):
    """A replayed plan's widths are refused before the cut exactly when the export of the cut model would refuse them,
    naming the same count and first tensor (layers the plan deletes renumber the rest)."""
    tokenizer = byte_level_tokenizer("llama-bpe")
    dense = tiny_model(vocab_size=len(tokenizer), intermediate=64, head_dim=8, kv_heads=4, n_rep=2)  # 16 per group
    outcomes = []
    for seed in range(8):
        plan = random_plan(dense, seed=seed, remove_blocks=seed % 2 == 0)
        deleted = {1: 3, 3: 0}.get(seed)  # a deleted layer: the last one, or the first (the rest are renumbered)
        if deleted is not None:
            plan.attn_groups[deleted], plan.mlp_channels[deleted] = [], []
        if seed >= 5:  # widths of whole q8_0 / q4_0 blocks: 32 MLP channels, two KV groups
            plan.mlp_channels = [channels[: len(channels) // 32 * 32] for channels in plan.mlp_channels]
            plan.attn_groups = [groups[: len(groups) // 2 * 2] for groups in plan.attn_groups]
        early = later = None
        try:
            check_plan_fallbacks(plan, outtype, "--plan p.json")
        except GGUFExportError as error:
            early = str(error).split(";")[0]
        try:
            export_gguf(apply_plan(copy.deepcopy(dense), plan), tokenizer, tmp_path / f"{seed}.gguf", outtype,
                        dense_spec=model_spec(dense))
        except GGUFExportError as error:
            later = str(error).split(";")[0]
        assert early == later, seed
        outcomes.append(early is None)
    assert any(outcomes) and not all(outcomes)  # both kinds of plan were met


def test_outtype_checked_before_pruning(tmp_path, capsys):
    with pytest.raises(GGUFExportError, match="unknown --outtype"):
        check_outtype("q9_9")
    code = main(["global", "--save_gguf", "--outtype", "q4_k_m", "--round_to", "32", "--output_root", str(tmp_path),
                 "--base_model", str(tmp_path / "missing")])
    assert code == 2
    err = capsys.readouterr().err
    assert ("--round_to" in err) if HAS_LLAMA_CPP else ("llama-cpp-python" in err)
    assert not list(tmp_path.iterdir())  # refused before the run folder or the model


@needs_llama_cpp
@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_1", "q4_k_m"])
def test_quantized_files_run_in_llama_cpp(tmp_path, outtype):
    tokenizer = byte_level_tokenizer("llama-bpe")
    model = tiny_model(vocab_size=len(tokenizer), intermediate=512, head_dim=64, kv_heads=2, n_rep=2)  # hidden 256
    apply_plan(model, plan_for(model, [2, 1, 0, 2], [256, 512, 0, 256]))
    counts = export_gguf(model, tokenizer, tmp_path / "m.gguf", outtype)
    assert sum(counts.values()) == len(gguf.GGUFReader(tmp_path / "m.gguf").tensors)
    ids = tokenizer(SAMPLE)["input_ids"][:40]
    ours, theirs = hf_logits(model, ids), llama_cpp_logits(tmp_path / "m.gguf", ids)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.9  # quantization noise only


@pytest.fixture(scope="module")
def pruned_smollm2(smollm2):
    """SmolLM2 pruned by 20% with magnitude importance, MLP widths rounded to 32 (non-uniform: exported as deci)."""
    from llama_pruning.importance import compute_importance
    from llama_pruning.selection import global_plan

    dense, tokenizer = smollm2
    table = compute_importance(dense, torch.zeros(1, 4, dtype=torch.long), "magnitude", progress=False)
    plan, _ = global_plan(dense, table, 0.2, normalization="layer", round_to=32)
    model = apply_plan(copy.deepcopy(dense), plan)
    return model, tokenizer, plan


@needs_llama_cpp
@pytest.mark.slow
def test_pruned_smollm2_generates_identically_in_llama_cpp(tmp_path, pruned_smollm2, data_dir):
    model, tokenizer, plan = pruned_smollm2
    path = tmp_path / "p20.gguf"
    export_gguf(model, tokenizer, path, "f32", source_gguf=smollm2_dir() / SMOLLM2_GGUF, dense_spec=plan.model_spec())
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "deci"
    llm = llama_cpp_model(path, n_ctx=256)
    prompt = "The history of the city begins in"
    ids = tokenizer(prompt)["input_ids"]
    assert llm.tokenize(prompt.encode(), add_bos=False) == ids
    with torch.no_grad():
        ours = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        theirs.append(int(token))
        if len(theirs) == 32:
            break
    assert theirs == ours
    text = (data_dir / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")[:20000]
    assert llm.tokenize(text.encode(), add_bos=False) == tokenizer(text)["input_ids"]


def test_export_gguf_command(tmp_path, capsys):
    from llama_pruning.models.export import save_pruned_model

    tokenizer = byte_level_tokenizer("llama-bpe")
    model = tiny_model(vocab_size=len(tokenizer), intermediate=64, head_dim=16)
    plan = plan_for(model, [4, 0, 3, 1], [32, 64, 0, 32])
    apply_plan(model, plan)
    save_pruned_model(model, tokenizer, tmp_path / "run", plan=plan)
    assert main(["export-gguf", str(tmp_path / "run"), "--outtype", "q8_0"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "run" / "model-q8_0.gguf"
    assert f"wrote {path}" in out and "Q8_0" in out
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "deci"
    assert reader.fields["deci.attention.head_count_kv"].contents() == [4, 0, 3, 1]
    assert reader.fields["deci.feed_forward_length"].contents() == [32, 64, 32, 32]  # layer 2: zero stand-in
    (tmp_path / "empty").mkdir()
    assert main(["export-gguf", str(tmp_path / "empty")]) == 2
    assert "no saved model" in capsys.readouterr().err


def test_export_gguf_out_naming_a_folder_keeps_it(tmp_path, capsys, monkeypatch):
    """--out RUN_DIR (a folder) is refused in one line before the model is loaded: the run folder stays whole."""
    from llama_pruning.models import loading
    from llama_pruning.models.export import save_pruned_model

    tokenizer = byte_level_tokenizer("llama-bpe")
    model = tiny_model(vocab_size=len(tokenizer), intermediate=64, head_dim=16)
    run = tmp_path / "run"
    save_pruned_model(model, tokenizer, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded before --out was checked"))
    capsys.readouterr()  # the save's progress bars
    assert main(["export-gguf", str(run), "--outtype", "f32", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {run} is a folder; a file path is expected (nothing was written)"
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.slow
def test_save_gguf_on_pruning_command(tmp_path, data_dir):
    code = main(["global", "--output_root", str(tmp_path), "--save_ckpt_log_name", "g", "--pruning_ratio", "0.1",
                 "--reconstruct", "none", "--save_gguf", "--outtype", "q8_0", "--num_samples", "4", "--seq_len", "32",
                 "--importance_method", "taylor",  # the GGUF output is under test, not the (slower) default importance
                 "--gradient_batch_size", "2", "--device", "cpu"])
    assert code == 0
    reader = gguf.GGUFReader(tmp_path / "g" / "model-q8_0.gguf")
    widths = reader.fields["deci.feed_forward_length"].contents()
    assert len(widths) == 30 and all(w % 32 == 0 for w in widths) and min(widths) < 1536  # --round_to became 32
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"  # copied from the source GGUF
    log = next((tmp_path / "g").glob("2*/training.log")).read_text()
    assert "GGUF written to" in log and "Q8_0" in log
