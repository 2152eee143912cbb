"""Running calibration passes: input checks, device placement, state restoration, micro-batches, the loss.

Every estimator borrows the caller's model. `calibration_session` puts it in the state a scoring pass
needs (eval mode, parameters frozen, on the requested device, optionally gradient checkpointing) and
gives it back exactly as it was, even when the pass raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llama_pruning.models.arch import decoder_layers


def check_samples(samples: torch.Tensor) -> None:
    """Refuse, in one line, anything but a [num_samples, seq_len >= 2] tensor of token ids."""
    if not isinstance(samples, torch.Tensor) or samples.dim() != 2 or samples.dtype != torch.long:
        raise ValueError("samples must be a torch.LongTensor of shape [num_samples, seq_len]")
    if samples.shape[0] < 1 or samples.shape[1] < 2:
        raise ValueError(f"need at least 1 sample of at least 2 tokens, got shape {tuple(samples.shape)}")


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")


def check_dense(model: nn.Module) -> None:
    """Importance is defined on the dense model that plans refer to."""
    if getattr(model.config, "pruned_layout", None) is not None:
        raise ValueError("this model is already pruned; compute importance on the dense model")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def micro_batches(samples: torch.Tensor, batch_size: int, device: torch.device, desc: str,
                  progress: bool) -> Iterator[torch.Tensor]:
    """Consecutive chunks of `batch_size` samples on `device`, with a progress bar over them."""
    starts = range(0, samples.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        yield samples[start:start + batch_size].to(device)


def nll_sum(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of a batch of unpadded windows, computed in float32 whatever the model dtype."""
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")


def _enable_checkpointing(model: nn.Module) -> None:
    """Turn HF gradient checkpointing on (the reentrant flavour, which runs the first forward without a graph)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:  # transformers releases before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def _disable_checkpointing(model: nn.Module) -> None:
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()


@contextmanager
def calibration_session(model: nn.Module, device: str | torch.device | None, *, gradients: bool = False,
                        gradient_checkpointing: bool = False) -> Iterator[torch.device]:
    """Prepare `model` for a scoring pass and restore it afterwards; yields the device to feed samples to.

    `device=None` uses the device the model already lives on (`load_model` puts it on cuda when there
    is one); another device moves the model there for the pass and back afterwards. All parameters are
    frozen: estimators compute the weight gradients they need themselves from module hooks, so autograd
    only propagates activation gradients (`gradients=True` makes the embedding output require grad for
    that). Gradient checkpointing switches on only the decoder layers' own `training` flag (which is what
    HF checks), so dropout modules stay in eval mode and scores stay deterministic.
    """
    home = model_device(model)
    target = torch.device(device) if device is not None else home
    modes = {module: module.training for module in model.modules()}
    requires = {param: param.requires_grad for param in model.parameters()}
    had_input_hook = hasattr(model, "_require_grads_hook")
    switch_checkpointing = gradient_checkpointing and not getattr(model, "is_activation_checkpointing", False)
    handles = []
    try:
        model.to(target)
        model.eval()
        model.requires_grad_(False)
        if gradients:
            handles.append(model.get_input_embeddings().register_forward_hook(
                lambda _module, _inputs, output: output.requires_grad_(True)))
        if gradient_checkpointing:
            if switch_checkpointing:
                _enable_checkpointing(model)
            for layer in decoder_layers(model):
                layer.training = True
        yield target
    finally:
        for handle in handles:
            handle.remove()
        if switch_checkpointing:
            _disable_checkpointing(model)
            if not had_input_hook and hasattr(model, "_require_grads_hook"):
                model.disable_input_require_grads()
        for module, mode in modes.items():
            module.training = mode
        for param, flag in requires.items():
            param.requires_grad_(flag)
        model.to(home)
