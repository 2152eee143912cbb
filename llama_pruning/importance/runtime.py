"""Running calibration passes: input checks, device placement, state restoration, micro-batches, the loss.

Every estimator borrows the caller's model. `calibration_session` puts it in the state a scoring pass
needs (eval mode, parameters frozen, on the requested device) and gives it back exactly as it was, even
when the pass raises. `layerwise_backward` is the gradient pass of the Taylor methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from llama_pruning import placement
from llama_pruning.models.arch import capture_layer_inputs, decoder_layers, run_layer


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


def micro_batches(samples: torch.Tensor, batch_size: int, device: torch.device, desc: str,
                  progress: bool) -> Iterator[torch.Tensor]:
    """Consecutive chunks of `batch_size` samples on `device`, with a progress bar over them."""
    starts = range(0, samples.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        yield samples[start:start + batch_size].to(device)


def token_nll_sum(logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token NLL of unpadded windows from their logits, computed in float32 whatever the model dtype;
    `keep` (bool, shaped like the targets `ids[:, 1:]`) sums only those targets."""
    logits, targets = logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()
    if keep is None:
        return F.cross_entropy(logits, targets, reduction="sum")
    return F.cross_entropy(logits, targets, reduction="none")[keep.flatten().to(logits.device)].sum()


def sampled_ids(logits: torch.Tensor, ids: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """`ids` with every target (`ids[:, 1:]`) replaced by a draw from the model's own next-token distribution (`logits`);
    `uniform` (shaped like `ids`, in [0, 1)) drives the draws by inverse CDF, so they do not depend on the device or on
    how windows are grouped into micro-batches (beyond the rounding of `logits`)."""
    cdf = logits[:, :-1].float().softmax(-1).cumsum_(-1)
    u = uniform[:, :-1, None].to(cdf) * cdf[..., -1:]
    drawn = torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    return torch.cat([ids[:, :1], drawn.to(ids)], 1)


def nll_sum(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of a batch of unpadded windows."""
    return token_nll_sum(model(input_ids=ids, use_cache=False).logits, ids)


@torch.no_grad()
def forward_by_layer(model: nn.Module, samples: torch.Tensor, batch_size: int, step: Callable[[], object],
                     inputs: list | None = None) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Run the decoder layers over every micro-batch, one layer at a time: the last layer's outputs and the
    kwargs of every layer, per micro-batch; `inputs`, when given, receives each layer's inputs.

    Each layer runs inside `placement.on_device`, so an offloaded layer (device map) is loaded once for all
    micro-batches; hooks on the layers and their modules see what a plain forward shows them. `step` is
    called after each layer (a progress bar).
    """
    hidden, kwargs = capture_layer_inputs(model, samples, batch_size)
    for layer, layer_kwargs in zip(decoder_layers(model), kwargs, strict=True):
        if inputs is not None:
            inputs.append(hidden)
        with placement.on_device(layer) as dev:
            hidden = [run_layer(layer, x.to(dev), send_to_device(kw, dev)) for x, kw in zip(hidden, layer_kwargs, strict=True)]
        step()
    return hidden, kwargs


def on_output_gradient(linear: nn.Module, consume: Callable[[torch.Tensor, torch.Tensor], None]):
    """Hook `linear` so each backward through it calls `consume(x, dy)`: its input and its output's gradient.

    Forwards without a graph (the no-grad pass that precedes a layer's re-run) are ignored. Returns the handle.
    """
    def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if output.requires_grad:
            x = inputs[0].detach()
            output.register_hook(lambda dy: consume(x, dy))

    return linear.register_forward_hook(hook)


def layerwise_backward(model: nn.Module, samples: torch.Tensor, device: torch.device, batch_size: int,
                       layer_done: Callable[[int], None], desc: str, progress: bool,
                       ignore: torch.Tensor | None = None, batch_started: Callable[[int], None] | None = None,
                       sample_seed: int | None = None) -> None:
    """Backpropagate the mean token NLL over all samples one decoder layer at a time, last layer first.

    `ignore` (bool, shaped like `samples`): targets left out of the loss (they stay in as context); `sample_seed`: the
    targets are drawn from the model's own predictions (`sampled_ids`, seeded) instead of read from the text;
    `batch_started(b)` is called before micro-batch b of each layer is backpropagated.

    A no-grad forward keeps every layer's input hidden states (per micro-batch, in the model's dtype);
    the head's loss gives the gradient at the last layer's output; then each layer is re-run per
    micro-batch on its kept input and backpropagated from its output gradient, which hands the gradient
    of its input to the layer below. All output gradients of a layer's projections, over the whole
    calibration set, thus arrive while that layer is processed: `layer_done(index)` is called right
    after, so per-weight accumulators need to exist for one layer only. Parameters get no `.grad`.
    It costs one forward more than a plain backward (this is gradient checkpointing at layer boundaries),
    and the kept inputs take num_layers x num_samples x seq_len x hidden values. Each layer runs inside
    `placement.on_device`, so an offloaded layer (device map) is brought to its device twice in all.
    """
    num_samples, seq_len = samples.shape
    layers = decoder_layers(model)
    # progress in forward-layer units: a layer's re-run + backward costs about three forwards
    bar = tqdm(total=4 * len(layers) + 1, desc=desc, unit="fwd", disable=not progress)
    inputs: list[list[torch.Tensor | None]] = []
    hidden, kwargs = forward_by_layer(model, samples, batch_size, bar.update, inputs)
    head = model.get_output_embeddings()
    norm = model.get_decoder().norm
    grads = []
    masks = [None] * len(hidden) if ignore is None else (~ignore[:, 1:]).split(batch_size)
    targets = num_samples * (seq_len - 1) if ignore is None else int((~ignore[:, 1:]).sum())
    uniform = (None if sample_seed is None else
               torch.rand(samples.shape, generator=torch.Generator().manual_seed(sample_seed), dtype=torch.float64))
    for b, (x, ids, keep) in enumerate(zip(hidden, samples.split(batch_size), masks, strict=True)):
        x.requires_grad_(True)
        logits = head(norm(x))
        ids = ids.to(logits.device)
        if uniform is not None:
            ids = sampled_ids(logits.detach(), ids, uniform[b * batch_size:(b + 1) * batch_size])
        loss = token_nll_sum(logits, ids, keep) / targets
        loss.backward()
        grads.append(x.grad)
    del hidden, x, logits
    bar.update()
    for index in reversed(range(len(layers))):
        with placement.on_device(layers[index]) as dev:  # an offloaded layer is loaded once for all its micro-batches
            for b, kw in enumerate(kwargs[index]):
                if batch_started is not None:
                    batch_started(b)
                x = inputs[index][b].to(dev).requires_grad_(True)
                inputs[index][b] = None
                out = run_layer(layers[index], x, send_to_device(kw, dev))
                out.backward(grads[b].to(out.device))
                grads[b] = x.grad
            del x, out
            layer_done(index)  # inside: the layer's real weights are at hand
        bar.update(3)
    bar.close()


@contextmanager
def calibration_session(model: nn.Module, device: str | torch.device | None) -> Iterator[torch.device]:
    """Prepare `model` for a scoring pass and restore it afterwards; yields the device to feed samples to.

    `device=None` uses the device the model already lives on (`load_model` puts it on cuda when there
    is one); another device moves the model there for the pass and back afterwards (a model dispatched
    with a device map is never moved: see llama_pruning.placement). All parameters are
    frozen: estimators compute the weight gradients they need themselves from module hooks, so autograd
    only propagates activation gradients.
    """
    home = placement.run_device(model)
    modes = {module: module.training for module in model.modules()}
    requires = {param: param.requires_grad for param in model.parameters()}
    try:
        target = placement.prepare(model, device)
        model.eval()
        model.requires_grad_(False)
        yield target
    finally:
        for module, mode in modes.items():
            module.training = mode
        for param, flag in requires.items():
            param.requires_grad_(flag)
        placement.prepare(model, home)
