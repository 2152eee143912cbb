"""Where a model's weights live and where they run: one device, or accelerate's big-model dispatch.

`--device_map auto` loads a model with transformers/accelerate dispatch: layers fill the GPUs, then CPU
memory, then an offload folder on disk (`max_memory` caps each), and accelerate's hooks bring offloaded
weights to the execution device for each forward. The stages never take placement flags; they ask this
module instead:

- `run_device(model, device)`: where to feed inputs (a placed model stays where its map put it);
- `prepare(model, device)`: the same, moving a model loaded without a map to `device` first;
- `on_device(module, device, write_back)`: a context in which `module` is an ordinary module with its real
  weights on its execution device (hooks paused), so stages can read weights, backpropagate and cut layer by
  layer; with `write_back` the cut weights are stored back where they came from (CPU dict or offload folder);
- `release_host_memory()`: between layers, hand the C heap's freed pages back to the system (glibc).

A map that puts the whole model on one device (`auto` on a machine with only a CPU, or with room on one GPU)
leaves no hooks and no `hf_device_map`: transformers dispatches only across several devices. Such a model
counts as placed on that device; it is not moved to `--device`'s default.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# flags a dispatched model cannot serve yet: their stages read or write every weight at once
UNSUPPORTED_WITH_MAP = {"finetune": "--finetune", "distill": "--distill", "save_gguf": "--save_gguf",
                        "save_dtype": "--save_dtype"}
_PLACED = "llama_pruning_placement"  # attribute naming the Placement a model was loaded with


def parse_max_memory(text: str) -> dict[int | str, int]:
    """`0=20GiB,1=20GiB,cpu=60GB` -> bytes per device {0: ..., 1: ..., 'cpu': ...} (sizes as accelerate reads them:
    a plain integer is bytes); ValueError in one line otherwise."""
    from accelerate.utils import convert_file_size_to_int

    limits: dict[int | str, int] = {}
    for item in text.split(","):
        key, sep, size = (part.strip() for part in item.partition("="))
        try:
            nbytes = convert_file_size_to_int(int(size) if size.isdigit() else size) if sep else -1
        except ValueError:
            nbytes = -1
        if nbytes < 0:
            raise ValueError(f"--max_memory wants DEVICE=SIZE items separated by commas, e.g. 0=20GiB,cpu=60GiB (got {item!r})")
        if not (key.isdigit() or key in ("cpu", "mps")):
            raise ValueError(f"--max_memory device {key!r} is not a GPU index, cpu or mps")
        limits[int(key) if key.isdigit() else key] = nbytes
    return limits


@dataclass(frozen=True)
class Placement:
    """How to load a model across devices: accelerate's `device_map` strategy, memory caps, offload folder."""

    device_map: str = "auto"
    max_memory: dict[int | str, int] | None = None
    offload_dir: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Placement | None:
        """The placement a command's flags ask for (None: one device); ValueError for flags that do not combine."""
        if args.device_map is None:
            for flag in ("max_memory", "offload_dir"):
                if getattr(args, flag) is not None:
                    raise ValueError(f"--{flag} applies to --device_map only")
            return None
        if args.device is not None:
            raise ValueError("--device and --device_map exclude each other: the map decides where each layer runs")
        for dest, flag in UNSUPPORTED_WITH_MAP.items():
            if getattr(args, dest, None):
                raise ValueError(f"{flag} is not supported with --device_map yet (docs/MEMORY.md, big models)")
        return cls(args.device_map, args.max_memory, args.offload_dir)

    def load(self, from_pretrained: Callable[..., nn.Module], source: str, **kwargs) -> nn.Module:
        """`from_pretrained(source, **kwargs)` dispatched by this placement; without `offload_dir` the offload
        folder is a temporary one, removed when the model is garbage-collected."""
        temporary = None if self.offload_dir else tempfile.TemporaryDirectory(prefix="llama_pruning_offload_")
        kwargs.update(device_map=self.device_map, offload_folder=self.offload_dir or temporary.name)
        if self.max_memory is not None:
            kwargs["max_memory"] = self.max_memory
        model = from_pretrained(source, **kwargs)
        model.offload_folder_handle = temporary
        setattr(model, _PLACED, self)
        return model


def device_map_summary(model: nn.Module) -> str:
    """How many top-level modules the map put on each device, e.g. `cpu: 3, disk: 5` (for the run log); a map
    that chose a single device has no `hf_device_map`: `cpu: whole model`."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map is None:
        return f"{next(model.parameters()).device}: whole model"
    counts = Counter(str(device) for device in device_map.values())
    return ", ".join(f"{device}: {count}" for device, count in counts.items())


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate's hooks place this model (loaded with a device map over several devices)."""
    return hasattr(model, "_hf_hook")


def is_placed(model: nn.Module) -> bool:
    """Whether a device map decided where this model runs: dispatched, or loaded whole onto the one device it chose."""
    return is_dispatched(model) or getattr(model, _PLACED, None) is not None


def run_device(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    """Where inputs go: a placed model's (main) execution device (its map decides, `device` is ignored), else `device`
    or the device of the model's first weight."""
    if is_dispatched(model):
        return torch.device(model._hf_hook.execution_device)
    if is_placed(model) or device is None:
        return next(model.parameters()).device
    return torch.device(device)


def fast_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively (CUDA with bf16, CPUs with AMX or AVX512-BF16), so autocast saves time."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    return False


def prepare(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    """Move a plain model to `device` (when given) and return `run_device`; a placed model is never moved."""
    target = run_device(model, device)
    if not is_placed(model) and device is not None:
        model.to(target)
    return target


def _tensors(module: nn.Module, hook) -> dict[str, torch.Tensor]:
    """The tensors an offloading hook manages for `module` (the names its weights map is keyed by)."""
    from accelerate.utils import named_module_tensors

    return dict(named_module_tensors(module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules,
                                     remove_non_persistent=True))


def _write_back(module: nn.Module, hook, before: list[str]) -> None:
    """Store the module's current tensors (cut or re-fitted) where its hook reads offloaded weights from:
    the offload folder for a module that came from disk, else the CPU dict."""
    from accelerate.utils import PrefixedDataset, offload_weight

    weights_map = hook.weights_map
    for name, tensor in _tensors(module, hook).items():
        tensor = tensor.detach().cpu()
        if not isinstance(weights_map, PrefixedDataset):  # a plain dict (accelerate's cpu_offload)
            weights_map[name] = tensor
            continue
        loader, key = weights_map.dataset, weights_map.prefix + name
        if any(weights_map.prefix + old in loader.index for old in before):
            offload_weight(tensor, key, loader.save_folder, index=loader.index)
            loader.state_dict.pop(key, None)
        else:
            loader.state_dict[key] = tensor
        if key not in loader.all_keys:
            loader.all_keys.append(key)


@contextmanager
def on_device(module: nn.Module, device: str | torch.device | None = None, write_back: bool = False
              ) -> Iterator[torch.device]:
    """Run a block of code on `module` (a decoder layer, a projection) as an ordinary module on one device.

    Plain module: moved to `device` (default: where it is) and back afterwards. Dispatched module:
    `device` is ignored; accelerate's hooks are taken off and offloaded weights are loaded onto the
    execution device once (not per forward); on exit the hooks are put back, which drops the loaded
    copies. With `write_back` (a stage that cuts or re-fits weights), the module's tensors, whatever
    their new shapes, are first stored where they came from (CPU dict or offload folder).
    Yields the device the module runs on: inputs must be sent there.
    """
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    hooked = [m for m in module.modules() if hasattr(m, "_hf_hook")]
    if not hooked:
        home = next(module.parameters()).device
        target = torch.device(device) if device is not None else home
        module.to(target)
        try:
            yield target
        finally:
            module.to(home)
        return
    target = torch.device(hooked[0]._hf_hook.execution_device)
    saved = []
    for m in hooked:
        hook = m._hf_hook
        names = list(_tensors(m, hook)) if hook.offload else []
        hook.original_devices = {}  # detaching would load the weights back where they were: they are loaded below, once
        remove_hook_from_module(m)
        for name in names:
            set_module_tensor_to_device(m, name, target, value=hook.weights_map[name])
        saved.append((m, hook, names))
    try:
        yield target
    finally:
        alive = set(module.modules())  # surgery may have replaced some submodules: those are gone with their hooks
        for m, hook, names in saved:
            if m in alive:
                if hook.offload and write_back:
                    _write_back(m, hook, names)
                add_hook_to_module(m, hook)  # an offloading hook sends the module's tensors back to meta


def _glibc_trim() -> Callable[[], object] | None:
    """glibc's `malloc_trim`, where the C library is glibc (Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _glibc_trim()


def release_host_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc `malloc_trim`): a layer-by-layer stage frees tensors of
    a different size at every layer, which a fragmented heap otherwise keeps resident (docs/MEMORY.md)."""
    if _TRIM is not None:
        _TRIM(0)
