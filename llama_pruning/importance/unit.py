"""Unit-level importance: one score per attention group and per MLP channel of every layer.

Methods (formulas and signs in docs/IMPORTANCE.md):
- `taylor`: sum over the unit's weights of |w * g|, g = dL/dw of the mean token NLL over all samples.
- `taylor_2nd`: adds the diagonal-Fisher second-order term 0.5 * w^2 * F, F = mean over samples of the
  squared per-sample gradient; variants `mix` |w g - 0.5 w^2 F|, `second` 0.5 w^2 F, `sum` |w g| + 0.5 w^2 F.
- `wanda`: sum over the unit's weights of |w| * ||x_in||_2 (input feature norm over all calibration tokens).
- `magnitude`: L2 norm of all the unit's weights; `random`: seeded uniform scores.
- `obs`: the loss increase after the best re-fit of the block, greedy per block (importance/obs.py).

Gradient methods never ask autograd for weight gradients: a forward hook on each projection keeps its
input x and hooks its output, whose gradient dy arrives in the backward pass; the weight gradient is then
dy^T x (per sample for `taylor_2nd`), folded at once into float32 accumulators. The backward runs one
decoder layer at a time over the whole calibration set (`layerwise_backward`), so those accumulators
exist for one layer at a time and are turned into unit scores as soon as the layer is done. No `.grad`
buffer is ever allocated, embeddings and lm_head get no weight gradient, and micro-batching changes
nothing but float rounding.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from llama_pruning import placement
from llama_pruning.importance.obs import obs_scores
from llama_pruning.importance.runtime import (
    calibration_session,
    check_batch_size,
    check_dense,
    check_samples,
    forward_by_layer,
    layerwise_backward,
    on_output_gradient,
)
from llama_pruning.importance.units import (
    GROUP_TYPES,
    UnitLinear,
    unit_counts,
    unit_linears,
    unit_sum,
    unit_sum_squares,
)
from llama_pruning.models.arch import ModelSpec, model_spec
from llama_pruning.options import (  # noqa: F401 (re-exported)
    DEFAULT_OBS_FISHER,
    DEFAULT_TAYLOR_2ND_VARIANT,
    GRADIENT_METHODS,
    METHODS,
    OBS_FISHERS,
    TAYLOR_2ND_VARIANTS,
)

Key = tuple[int, str]  # (layer_idx, group_type)
Columns = dict[str, dict[Key, torch.Tensor]]


def _zeros(spec: ModelSpec, device: torch.device) -> dict[Key, torch.Tensor]:
    counts = unit_counts(spec)
    return {(i, t): torch.zeros(counts[t], dtype=torch.float32, device=device)
            for i in range(spec.num_layers) for t in GROUP_TYPES}


def _accumulate_square(buffers: dict, key: tuple, value: torch.Tensor) -> None:
    """Add `value ** 2` into `buffers[key]` without a temporary once the buffer exists."""
    if key in buffers:
        buffers[key].addcmul_(value, value)
    else:
        buffers[key] = value * value


def _accumulate(buffers: dict, key: tuple, value: torch.Tensor) -> None:
    """Add `value` into `buffers[key]`, adopting the (freshly computed, float32) tensor on first use."""
    if key in buffers:
        buffers[key].add_(value)
    else:
        buffers[key] = value


class TaylorAccumulator:
    """Collects, from each projection's input and output gradient, what the Taylor scores need.

    The loss is the mean token NLL over all N samples, so the output gradients of one micro-batch are
    1/N times those of its samples' own losses: per sample s, G_s = dy_s^T x_s = g_s / N. Then
    g = sum_s G_s and F = mean_s g_s^2 = N * sum_s G_s^2.

    Memory: one float32 per-weight buffer holds g, for the layer being backpropagated only (the pass
    goes layer by layer and `fold_layer` consumes and frees each layer's buffers). The second-order term
    is linear in the per-sample squares: `second` and `sum` add it up per unit as each sample arrives;
    only `mix`, whose |w g - 0.5 w^2 F| needs F per weight, keeps a second per-weight buffer
    (sum_s G_s^2), from which its per-unit second-order term is also read when the layer is folded.
    """

    def __init__(self, units: list[UnitLinear], spec: ModelSpec, num_samples: int, device: torch.device,
                 variant: str | None):
        self.units = units
        self.num_samples = num_samples
        self.variant = variant  # None: first order only
        self.device = device  # where the unit scores are kept (a device map may run layers elsewhere)
        self.signed = _zeros(spec, device)
        self.second = _zeros(spec, device)
        self.importance = _zeros(spec, device)
        self.grad: dict[tuple, torch.Tensor] = {}
        self.sq: dict[tuple, torch.Tensor] = {}

    @property
    def per_sample(self) -> bool:
        return self.variant is not None

    def attach(self) -> list:
        return [on_output_gradient(unit.linear, partial(self._consume, unit)) for unit in self.units]

    def _consume(self, unit: UnitLinear, x: torch.Tensor, dy: torch.Tensor) -> None:
        x = x.float().reshape(x.shape[0], -1, x.shape[-1])
        dy = dy.float().reshape(dy.shape[0], -1, dy.shape[-1])
        if self.per_sample:
            for s in range(x.shape[0]):
                self._update(unit, dy[s].T @ x[s], dy[s].sum(0))
        else:
            self._update(unit, dy.flatten(0, 1).T @ x.flatten(0, 1), dy.sum((0, 1)))

    @torch.no_grad()
    def _update(self, unit: UnitLinear, grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> None:
        """Fold one gradient (a sample's, or a micro-batch's for first order) into the accumulators."""
        key = (unit.layer_idx, unit.group_type)
        for kind, param, axis in unit.params():
            g = grad_weight if kind == "weight" else grad_bias
            if self.variant == "mix":  # the per-unit second-order term is read from this buffer at the end
                _accumulate_square(self.sq, (unit.layer_idx, unit.name, kind), g)
            elif self.per_sample:
                wg = param.detach().float() * g
                self.second[key] += ((0.5 * self.num_samples) * unit_sum_squares(wg, axis, unit.n_units)).to(self.device)
            _accumulate(self.grad, (unit.layer_idx, unit.name, kind), g)

    @torch.no_grad()
    def fold_layer(self, layer_idx: int) -> None:
        """Turn one layer's complete per-weight sums into its unit scores and free them."""
        for unit in self.units:
            if unit.layer_idx != layer_idx:
                continue
            key = (unit.layer_idx, unit.group_type)
            for kind, param, axis in unit.params():
                w = param.detach().float()
                wg = self.grad.pop((unit.layer_idx, unit.name, kind)).mul_(w)
                self.signed[key] -= unit_sum(wg, axis, unit.n_units).to(self.device)
                if self.variant == "second":
                    continue
                if self.variant == "mix":  # w g - 0.5 w^2 F with F = N * sum_s G_s^2
                    half_w2f = self.sq.pop((unit.layer_idx, unit.name, kind)).mul_(w).mul_(w)
                    half_w2f.mul_(0.5 * self.num_samples)
                    self.second[key] += unit_sum(half_w2f, axis, unit.n_units).to(self.device)
                    wg.sub_(half_w2f)
                self.importance[key] += unit_sum(wg.abs_(), axis, unit.n_units).to(self.device)

    def finish(self) -> Columns:
        """The score columns, once every layer has been folded."""
        if self.variant is None:
            return {"importance": self.importance, "signed_first_order": self.signed}
        if self.variant == "second":
            self.importance = self.second
        elif self.variant == "sum":
            for key, value in self.second.items():
                self.importance[key] += value
        return {"importance": self.importance, "signed_first_order": self.signed, "second_order": self.second}


def _taylor(model: nn.Module, samples: torch.Tensor, spec: ModelSpec, device: torch.device, batch_size: int,
            variant: str | None, progress: bool, ignore: torch.Tensor | None = None) -> Columns:
    """Layer-by-layer gradient pass over the samples, loss normalised to the mean token NLL over all of them
    (over the targets not in `ignore`)."""
    acc = TaylorAccumulator(unit_linears(model, spec), spec, samples.shape[0], device, variant)
    handles = acc.attach()
    desc = "taylor" if variant is None else f"taylor_2nd ({variant})"
    try:
        layerwise_backward(model, samples, device, batch_size, acc.fold_layer, desc, progress, ignore)
    finally:
        for handle in handles:
            handle.remove()
    return acc.finish()


@torch.no_grad()
def _wanda(model: nn.Module, samples: torch.Tensor, spec: ModelSpec, device: torch.device, batch_size: int,
           progress: bool) -> Columns:
    """|w| times the L2 norm, over all calibration tokens, of the input feature the weight reads.

    A bias is a weight on a constant input of 1, whose norm over the T calibration tokens is sqrt(T).
    """
    units = unit_linears(model, spec)
    sumsq: dict[int, torch.Tensor] = {}

    def record(index: int, _module: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
        x = inputs[0].float()
        _accumulate(sumsq, index, x.pow(2).reshape(-1, x.shape[-1]).sum(0))

    handles = [unit.linear.register_forward_hook(partial(record, i)) for i, unit in enumerate(units)]
    try:
        with tqdm(total=spec.num_layers, desc="wanda", unit="layer", disable=not progress) as bar:
            forward_by_layer(model, samples, batch_size, bar.update)  # the inputs of the layers only: no lm_head
    finally:
        for handle in handles:
            handle.remove()
    tokens = samples.numel()
    importance = _zeros(spec, device)
    for i, unit in enumerate(units):
        norms = sumsq.pop(i).sqrt_()
        with placement.on_device(unit.linear) as dev:
            for kind, param, axis in unit.params():
                scale = norms.to(dev) if kind == "weight" else tokens ** 0.5
                score = param.detach().float().abs() * scale
                importance[(unit.layer_idx, unit.group_type)] += unit_sum(score, axis, unit.n_units).to(device)
    return {"importance": importance}


@torch.no_grad()
def _magnitude(model: nn.Module, spec: ModelSpec) -> Columns:
    """L2 norm of all the unit's weights (q/k/v rows, o_proj columns; gate/up rows, down columns; biases)."""
    device = placement.run_device(model)
    squares = _zeros(spec, device)
    for unit in unit_linears(model, spec):
        with placement.on_device(unit.linear):
            for _kind, param, axis in unit.params():
                squares[(unit.layer_idx, unit.group_type)] += unit_sum_squares(param.detach().float(), axis,
                                                                               unit.n_units).to(device)
    return {"importance": {key: value.sqrt() for key, value in squares.items()}}


def _random(spec: ModelSpec, seed: int) -> Columns:
    """Uniform [0, 1) scores from a generator seeded with `seed`, drawn layer by layer, attention first."""
    generator = torch.Generator().manual_seed(seed)
    counts = unit_counts(spec)
    return {"importance": {(i, t): torch.rand(counts[t], generator=generator, dtype=torch.float64)
                           for i in range(spec.num_layers) for t in GROUP_TYPES}}


def importance_table(spec: ModelSpec, columns: Columns) -> pd.DataFrame:
    """One row per unit: layer_idx, group_type, group_idx, then each score column (float64)."""
    counts = unit_counts(spec)
    keys = [(i, t) for i in range(spec.num_layers) for t in GROUP_TYPES]
    data = {
        "layer_idx": np.concatenate([np.full(counts[t], i) for i, t in keys]),
        "group_type": np.concatenate([np.full(counts[t], t, dtype=object) for _, t in keys]),
        "group_idx": np.concatenate([np.arange(counts[t]) for _, t in keys]),
    }
    for name, values in columns.items():
        data[name] = np.concatenate([values[key].detach().double().cpu().numpy() for key in keys])
    return pd.DataFrame(data)


def compute_importance(
    model: nn.Module,
    samples: torch.Tensor,
    method: str,
    *,
    gradient_batch_size: int = 4,
    device: str | torch.device | None = None,
    seed: int = 0,
    taylor_2nd_variant: str = DEFAULT_TAYLOR_2ND_VARIANT,
    progress: bool = True,
    ignore: torch.Tensor | None = None,
    obs_fisher: str = DEFAULT_OBS_FISHER,
) -> pd.DataFrame:
    """Score every attention group and MLP channel of a dense model on calibration `samples`.

    Returns a DataFrame with `layer_idx, group_type ('attn'|'mlp'), group_idx, importance` (higher =
    more important), plus `signed_first_order` (Taylor methods) and `second_order` (`taylor_2nd`).
    `gradient_batch_size` is the micro-batch of every calibration pass; results do not depend on it
    beyond float rounding. The model is returned in the state it came in (mode, requires_grad, device).
    `ignore` (bool, shaped like `samples`; gradient methods only): tokens left out of the loss as targets and, for obs,
    of the Gram matrices as inputs; they stay in as context (e.g. placeholders the deployed text does not hold).
    `obs_fisher` (obs only): `sampled` weighs its errors by the Fisher of the model's own predictions (drawn with `seed`),
    `labels` by that of the text's next tokens.
    """
    if method not in METHODS:
        raise ValueError(f"unknown importance method {method!r}; choose one of {', '.join(METHODS)}")
    if taylor_2nd_variant not in TAYLOR_2ND_VARIANTS:
        raise ValueError(f"unknown taylor_2nd variant {taylor_2nd_variant!r}; "
                         f"choose one of {', '.join(TAYLOR_2ND_VARIANTS)}")
    if obs_fisher not in OBS_FISHERS:
        raise ValueError(f"unknown obs Fisher {obs_fisher!r}; choose one of {', '.join(OBS_FISHERS)}")
    check_samples(samples)
    check_batch_size(gradient_batch_size)
    check_dense(model)
    if ignore is not None:
        if ignore.dtype != torch.bool or ignore.shape != samples.shape:
            raise ValueError(f"ignore must be a bool mask shaped like the samples {tuple(samples.shape)}")
        if method not in GRADIENT_METHODS:
            raise ValueError(f"ignore applies to {', '.join(GRADIENT_METHODS)}, not {method}")
        if bool(ignore[:, 1:].all()):
            raise ValueError("ignore leaves out every calibration target: nothing is left to score")
        ignore = ignore if bool(ignore.any()) else None  # nothing left out: exactly the plain pass
    spec = model_spec(model)
    if method == "random":
        return importance_table(spec, _random(spec, seed))
    with calibration_session(model, device) as dev:
        if method == "magnitude":
            columns = _magnitude(model, spec)
        elif method == "wanda":
            columns = _wanda(model, samples, spec, dev, gradient_batch_size, progress)
        elif method == "obs":
            columns = obs_scores(model, samples, spec, dev, gradient_batch_size, progress, ignore, obs_fisher, seed)
        else:
            variant = taylor_2nd_variant if method == "taylor_2nd" else None
            columns = _taylor(model, samples, spec, dev, gradient_batch_size, variant, progress, ignore)
    return importance_table(spec, columns)
