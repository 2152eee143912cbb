"""Tokenizer metadata for a GGUF file: copied from the source GGUF, or built from an HF fast tokenizer.

llama.cpp re-implements each tokenizer family, so the file must name the family (`tokenizer.ggml.model`)
and, for byte-level BPE, the pre-tokenizer (`tokenizer.ggml.pre`: the regex split before the merges).
Supported from HF: byte-level BPE (GPT-2 / SmolLM2 digit splitting / Llama-3 / Qwen2 pre-tokenizers)
and Llama-2-style SentencePiece BPE with byte fallback.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import gguf
from transformers import PreTrainedTokenizerBase


class TokenizerExportError(ValueError):
    """A tokenizer llama.cpp would not reproduce."""


def copy_tokenizer_fields(writer: gguf.GGUFWriter, source: Path, n_vocab: int) -> None:
    """Copy every `tokenizer.*` key of the source GGUF unchanged (same vocabulary, same llama.cpp behaviour)."""
    reader = gguf.GGUFReader(source)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != n_vocab:
        raise TokenizerExportError(f"{source} does not hold a tokenizer of {n_vocab} tokens")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), gguf.GGUFValueType.ARRAY, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), field.types[0])


def _split_regex(pre: dict) -> str | None:
    return (pre.get("pattern") or {}).get("Regex") if pre.get("type") == "Split" else None


def bpe_pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, recognised from tokenizer.json's structure."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = _split_regex(steps[0]) or ""
        if r"\p{N}{1,3}" in regex:
            return "llama-bpe"
        if r"\p{N}" in regex and r"\p{N}+" not in regex:
            return "qwen2"
    raise TokenizerExportError(f"pre-tokenizer {kinds} is not one llama.cpp is known to reproduce "
                               "(supported: GPT-2, SmolLM2, Llama-3, Qwen2 byte-level BPE; Llama-2 SentencePiece)")


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _token_table(tokenizer: PreTrainedTokenizerBase, n_vocab: int, kind: str, merges: list[str]):
    """Tokens (id order, padded to the model's embedding rows), scores and llama.cpp token types."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    unk = tokenizer.unk_token_id
    rank: dict[str, int] = {}
    if kind == "llama":  # SentencePiece merges the adjacent pair whose result scores highest: score = -merge rank
        for r, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", "", 1), r)
    tokens, scores, types = [], [], []
    T = gguf.TokenType
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(T.UNUSED)
            continue
        if i in added:
            kind_of = T.CONTROL if added[i].special else T.USER_DEFINED
        elif i == unk and kind == "llama":
            kind_of = T.UNKNOWN
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind_of = T.BYTE
        else:
            kind_of = T.NORMAL
        tokens.append(text)
        scores.append(-float(rank[text]) if text in rank else 0.0)
        types.append(kind_of)
    return tokens, scores, types


def add_hf_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, n_vocab: int) -> None:
    """Write llama.cpp tokenizer metadata built from an HF fast tokenizer (vocab, merges, specials, template)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerExportError("GGUF export needs a fast tokenizer (tokenizer.json)")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        data = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        special = gguf.SpecialVocab(tmp, load_merges=False, n_vocab=n_vocab)
    model = data["model"]
    if model.get("type") != "BPE":
        raise TokenizerExportError(f"tokenizer model {model.get('type')!r} is not supported for GGUF export (BPE only)")
    merges = _merges(model)
    if model.get("byte_fallback"):
        kind, pre = "llama", None
        first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
        writer.add_add_space_prefix(bool(first) and first[0].startswith("\u2581"))
    else:
        if (data.get("decoder") or {}).get("type") != "ByteLevel":
            raise TokenizerExportError("a BPE tokenizer without byte fallback must be byte-level for GGUF export")
        kind, pre = "gpt2", bpe_pre_tokenizer(data.get("pre_tokenizer"))
    tokens, scores, types = _token_table(tokenizer, n_vocab, kind, merges)
    writer.add_tokenizer_model(kind)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "llama":
        writer.add_token_scores(scores)
    else:
        writer.add_token_merges(merges)
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token = {"bos": bos is not None and ids[:1] == [bos], "eos": eos is not None and ids[-1:] == [eos]}
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            special.special_token_ids[name] = token_id
    if tokenizer.chat_template is not None:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
