"""Export a dense or pruned Llama-family model to a GGUF file that stock llama.cpp (and so Ollama) loads.

Uniform models are written as llama.cpp's `llama` architecture (every runtime loads it). Models whose
layers differ are written as `deci` (llama.cpp's Nemotron-NAS architecture: a plain Llama layer, RMSNorm,
SwiGLU and the same RoPE, that honours per-layer `head_count`, `head_count_kv` and `feed_forward_length`
arrays). Blocks llama.cpp cannot express as empty get exact stand-ins that add exactly zero:

- an emptied attention block in layer 0 becomes one all-zero KV group (llama.cpp reads the head size
  from layer 0, so that layer must have heads; zero V rows make the attention output exactly zero);
  elsewhere it is written as llama.cpp's attention-free layer (head_count 0);
- an emptied MLP becomes an all-zero MLP of 32 channels (`deci` skips the residual add of a layer
  without MLP, silently dropping its attention output, and aborts on such a last layer).

HF stores each head's rotary halves as [first half | second half]; llama.cpp rotates adjacent pairs,
so Q and K rows (and biases) are permuted per head, with each layer's own head count.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from llama_pruning.atomic import atomic_path, temp_sibling
from llama_pruning.models.arch import ModelSpec, decoder_layers
from llama_pruning.models.gguf_vocab import add_hf_tokenizer, copy_tokenizer_fields
from llama_pruning.options import GGUF_WRITER_TYPES, LLAMA_CPP_TYPES, OUTTYPES  # noqa: F401 (re-exported)
from llama_pruning.plan import PruningPlan

Q = gguf.GGMLQuantizationType
# written by the gguf package (2-D weights; 1-D tensors stay F32, as llama.cpp expects)
GGUF_TYPES = {name: Q[name.upper()] for name in GGUF_WRITER_TYPES}
# LLAMA_CPP_TYPES: llama.cpp's own mixtures (k-quants, 256-element blocks), produced by its quantizer via llama-cpp-python
K_BLOCK = 256
STANDIN_FF = 32  # width of the all-zero MLP stand-in: one 32-element quant block, so every type holds it exactly
# the way around a refusal before the run: write the model, then export it with the fallbacks allowed
EXPORT_LATER = "swap --save_gguf for --save_model and then run `llama-pruning export-gguf --allow_fallback` on the run"
_SUB8 = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)


class GGUFExportError(ValueError):
    """A model or option the GGUF export cannot honour (one-line message for the CLI)."""


def check_outtype(outtype: str) -> None:
    """Refuse an unknown type, or a llama.cpp-only type when llama-cpp-python is missing, before any work."""
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if outtype in LLAMA_CPP_TYPES:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise GGUFExportError(f"--outtype {outtype} needs llama.cpp's quantizer: pip install 'llama-pruning[gguf]' "
                                  f"(llama-cpp-python); the gguf package alone writes {', '.join(GGUF_TYPES)}") from None


def quant_block(outtype: str) -> int:
    """Elements per quantization block of a type (1 for float types): row lengths must be multiples of it."""
    return K_BLOCK if outtype in LLAMA_CPP_TYPES else gguf.GGML_QUANT_SIZES[GGUF_TYPES[outtype]][0]


@dataclass
class _Layer:
    """One decoder layer as llama.cpp will see it (stand-ins included)."""

    n_head: int
    n_head_kv: int
    n_ff: int
    attn: nn.Module | None  # None: stand-in or attention-free
    mlp: nn.Module | None  # None: zero stand-in


def _layers(model: nn.Module, head_dim: int, n_rep: int) -> list[_Layer]:
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = layer.self_attn if hasattr(layer.self_attn, "q_proj") else None
        mlp = layer.mlp if hasattr(layer.mlp, "gate_proj") else None
        kv = attn.k_proj.out_features // head_dim if attn is not None else (1 if i == 0 else 0)
        n_ff = mlp.gate_proj.out_features if mlp is not None else STANDIN_FF
        out.append(_Layer(kv * n_rep, kv, n_ff, attn, mlp))
    return out


def rope_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows from HF's half-split rotary layout to llama.cpp's adjacent pairs."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def rope_freqs(config) -> np.ndarray | None:
    """llama.cpp's per-frequency divisors for Llama-3 RoPE scaling; None without scaling; refuse other kinds."""
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind == "default":
        return None
    if kind != "llama3":
        raise GGUFExportError(f"RoPE scaling {kind!r} is not supported by the GGUF export (only none and llama3)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    base = params["rope_theta"]
    dim = scaled.numel() * 2
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).double() / dim))
    return (plain / scaled.double()).float().numpy()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _tensors(model: nn.Module, layers: list[_Layer], head_dim: int) -> Iterator[tuple[str, np.ndarray, bool]]:
    """(GGUF name, float32 array in HF [out, in] order, is a zero stand-in) for every tensor of the file."""
    hidden = model.config.hidden_size
    base = model.get_decoder()
    yield "token_embd.weight", _np(base.embed_tokens.weight), False
    for i, (shape, layer) in enumerate(zip(layers, decoder_layers(model), strict=True)):
        blk = f"blk.{i}"
        attn = shape.attn
        if attn is not None:
            yield f"{blk}.attn_norm.weight", _np(layer.input_layernorm.weight), False
            for name, proj, heads in (("attn_q", attn.q_proj, shape.n_head), ("attn_k", attn.k_proj, shape.n_head_kv),
                                      ("attn_v", attn.v_proj, None)):
                w, b = proj.weight, proj.bias
                if heads is not None:
                    w, b = rope_permute(w, heads), (rope_permute(b, heads) if b is not None else None)
                yield f"{blk}.{name}.weight", _np(w), False
                if b is not None:
                    yield f"{blk}.{name}.bias", _np(b), False
            yield f"{blk}.attn_output.weight", _np(attn.o_proj.weight), False
            if attn.o_proj.bias is not None:
                yield f"{blk}.attn_output.bias", _np(attn.o_proj.bias), False
        elif shape.n_head:
            q_rows, kv_rows = shape.n_head * head_dim, head_dim
            yield f"{blk}.attn_norm.weight", np.ones(hidden, np.float32), True
            for name, rows in (("attn_q", q_rows), ("attn_k", kv_rows), ("attn_v", kv_rows)):
                yield f"{blk}.{name}.weight", np.zeros((rows, hidden), np.float32), True
            yield f"{blk}.attn_output.weight", np.zeros((hidden, q_rows), np.float32), True
        mlp = shape.mlp
        if mlp is not None:
            yield f"{blk}.ffn_norm.weight", _np(layer.post_attention_layernorm.weight), False
            for name, proj in (("ffn_gate", mlp.gate_proj), ("ffn_up", mlp.up_proj), ("ffn_down", mlp.down_proj)):
                yield f"{blk}.{name}.weight", _np(proj.weight), False
                if proj.bias is not None:
                    yield f"{blk}.{name}.bias", _np(proj.bias), False
        else:
            yield f"{blk}.ffn_norm.weight", np.ones(hidden, np.float32), True
            for name in ("ffn_gate", "ffn_up"):
                yield f"{blk}.{name}.weight", np.zeros((STANDIN_FF, hidden), np.float32), True
            yield f"{blk}.ffn_down.weight", np.zeros((hidden, STANDIN_FF), np.float32), True
    yield "output_norm.weight", _np(base.norm.weight), False
    if not model.config.tie_word_embeddings:
        yield "output.weight", _np(model.get_output_embeddings().weight), False
    freqs = rope_freqs(model.config)
    if freqs is not None:
        yield "rope_freqs.weight", freqs, False


def _role(name: str) -> str:
    return name.split(".")[-2]


def tensor_type(name: str, array: np.ndarray, qtype: gguf.GGMLQuantizationType, tied: bool) -> gguf.GGMLQuantizationType:
    """The type a tensor is stored in: 1-D stays F32, the output matrix stays at Q8_0 for 4/5-bit types,
    and a row length that is not a multiple of the block size falls back to F16."""
    if array.ndim == 1 or qtype == Q.F32:
        return Q.F32
    if qtype in _SUB8 and (name == "output.weight" or (tied and name == "token_embd.weight")):
        qtype = Q.Q8_0
    return qtype if array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16


def dense_row_lengths(spec: ModelSpec) -> dict[str, int]:
    """Row length (input width) of each weight role in the dense model the plan was made for."""
    rows = dict.fromkeys(("token_embd", "output", "attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"), spec.hidden_size)
    rows.update(attn_output=spec.num_heads * spec.head_dim, ffn_down=spec.intermediate_size)
    return rows


def _fallback_error(bad: list[str], block: int, remedy: str) -> GGUFExportError:
    return GGUFExportError(
        f"{len(bad)} pruned tensors (e.g. {bad[0]}) have widths that are not multiples of {block} where the dense "
        f"model's are, so they would be stored in a wider type than in the dense export; {remedy}")


def check_fallbacks(tensors: list[tuple[str, np.ndarray, bool]], block: int, dense: ModelSpec | None) -> None:
    """Refuse when pruned widths are not multiples of the quant block on tensors whose dense width is."""
    if dense is None or block == 1:
        return
    rows = dense_row_lengths(dense)
    bad = [name for name, array, standin in tensors
           if array.ndim == 2 and not standin and array.shape[-1] % block and rows[_role(name)] % block == 0]
    if not bad:
        return
    if all(_role(name) == "attn_output" for name in bad):  # --round_to sets MLP widths only
        raise _fallback_error(bad, block, f"attention is cut in whole GQA groups of {dense.group_width} "
                                          "columns, which --round_to does not change: choose another --outtype, or pass "
                                          "--allow_fallback")
    raise _fallback_error(bad, block, f"prune with --round_to {block}, choose another --outtype, or pass --allow_fallback")


def check_group_fallbacks(geometry: dict, outtype: str) -> None:
    """Before any work: refuse an --outtype whose block does not divide a GQA group's o_proj width where it divides the
    dense width, since a pruned attn_output would then fall back to a wider type (`geometry`: `config_geometry`)."""
    block = quant_block(outtype)
    group = geometry["n_rep"] * geometry["head_dim"]
    if group % block == 0 or geometry["num_kv_heads"] * group % block:
        return
    fits = [name for name in OUTTYPES if group % quant_block(name) == 0]
    raise GGUFExportError(
        f"--outtype {outtype} stores rows in blocks of {block}, but attention is cut in whole GQA groups of {group} "
        f"columns, so a pruned attn_output would be stored in a wider type than in the dense export (--round_to sets "
        f"MLP widths only): choose --outtype {' / '.join(fits)}, or {EXPORT_LATER}")


def check_plan_fallbacks(plan: PruningPlan, outtype: str, source: str) -> None:
    """`check_fallbacks` from a plan's widths alone, before any cut: `source` (a replayed --plan) fixed the widths."""
    block = quant_block(outtype)
    if block == 1:
        return
    spec = plan.model_spec()
    rows = dense_row_lengths(spec)
    bad = [f"blk.{new}.{role}.weight" for new, old in enumerate(plan.kept_layers)
           for role, width in (("attn_output", len(plan.attn_groups[old]) * spec.group_width),
                               ("ffn_down", len(plan.mlp_channels[old])))
           if width % block and rows[role] % block == 0]
    if bad:
        raise _fallback_error(bad, block, f"{source} fixes them, so choose another --outtype, or {EXPORT_LATER}")


def _metadata(writer: gguf.GGUFWriter, model: nn.Module, layers: list[_Layer], head_dim: int, uniform: bool) -> None:
    config = model.config
    pick = (lambda values: values[0]) if uniform else list  # noqa: E731 - one value is broadcast, else one per layer
    context = config.max_position_embeddings
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window:  # llama.cpp's llama/deci attend to the whole context: advertise only the exact span
        context = min(context, window)
    writer.add_name(str(getattr(config, "name_or_path", "") or "llama-pruning model"))
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(layers))
    writer.add_feed_forward_length(pick([s.n_ff for s in layers]))
    writer.add_head_count(pick([s.n_head for s in layers]))
    writer.add_head_count_kv(pick([s.n_head_kv for s in layers]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    params = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def export_gguf(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    path: str | Path,
    outtype: str = "f16",
    source_gguf: str | Path | None = None,
    dense_spec: ModelSpec | None = None,
    allow_fallback: bool = False,
) -> dict[str, int]:
    """Write `model` as a GGUF file at `path`; returns the number of tensors written per type.

    `source_gguf`: the GGUF the model was loaded from, whose tokenizer metadata is copied verbatim
    (otherwise it is built from `tokenizer`). `dense_spec`: geometry of the dense model, used to refuse
    quantized types that pruned widths would push into a wider fallback than the dense export.
    """
    check_outtype(outtype)
    path = Path(path)
    config = model.config
    n_rep = config.num_attention_heads // config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = _layers(model, head_dim, n_rep)
    uniform = all((s.n_head, s.n_head_kv, s.n_ff) == (layers[0].n_head, layers[0].n_head_kv, layers[0].n_ff)
                  and s.attn is not None and s.mlp is not None for s in layers)
    arch = "llama" if uniform else "deci"
    if source_gguf is None and tokenizer is None:
        raise GGUFExportError("the model folder has no tokenizer; GGUF files must carry one")
    with torch.no_grad():
        tensors = list(_tensors(model, layers, head_dim))
    qtype = GGUF_TYPES.get(outtype, Q.F32)
    if not allow_fallback:
        check_fallbacks(tensors, quant_block(outtype), dense_spec)
    tied = bool(config.tie_word_embeddings)

    def write(target: Path) -> None:
        writer = gguf.GGUFWriter(target, arch)
        _metadata(writer, model, layers, head_dim, uniform)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == Q.F32
                             else getattr(gguf.LlamaFileType, f"MOSTLY_{outtype.upper()}"))
        if qtype not in (Q.F32, Q.F16):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if source_gguf is not None:
            copy_tokenizer_fields(writer, Path(source_gguf), config.vocab_size)
        else:
            add_hf_tokenizer(writer, tokenizer, config.vocab_size)
        for name, array, _ in tensors:
            kind = tensor_type(name, array, qtype, tied)
            data = gguf.quants.quantize(array, kind)
            writer.add_tensor(name, data, raw_dtype=kind if kind not in (Q.F32, Q.F16) else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    if outtype in LLAMA_CPP_TYPES:
        with atomic_path(path) as tmp:
            _llama_cpp_quantize(write, tmp, outtype)
    else:
        with atomic_path(path) as tmp:
            write(tmp)
    return tensor_type_counts(path)


def _llama_cpp_quantize(write: Callable[[Path], None], target: Path, outtype: str) -> None:
    """Write an F32 file next to `target`, then let llama.cpp's quantizer produce `target` from it."""
    import llama_cpp

    f32 = temp_sibling(target.with_name(target.name + ".f32"))
    try:
        write(f32)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}")
        params.nthread = 1
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(target).encode(), ctypes.byref(params))
        if rc != 0:
            raise GGUFExportError(f"llama.cpp's quantizer failed ({rc}) on {outtype}")
    finally:
        f32.unlink(missing_ok=True)


def tensor_type_counts(path: str | Path) -> dict[str, int]:
    """How many tensors of each type a GGUF file holds (read back from the file itself)."""
    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors))
