"""Retraining-free recovery: cut a model layer by layer and re-fit each block's output projection.

Every block (attention, MLP) ends in one linear map, o_proj or down_proj, whose input columns are exactly
the pruning units (query-head context dims, MLP channels). Removing units only drops columns of that
input: the kept columns are unchanged, so the dense block output is Y = X W^T + b on the *same* input
X. Compensation replaces the kept weights W_K (and the bias) so X_K W'^T + b' stays close to Y over
calibration tokens. Because Y is an exact linear function of X, everything needed is the streamed
statistics of X: Gram matrix X^T X, column sums and token count (see docs/RECONSTRUCTION.md).

Layers are processed in order and each one sees the hidden states produced by the already-pruned
layers before it, so later layers correct for what the earlier ones could not.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from llama_pruning.models.arch import decoder_layers
from llama_pruning.plan import PruningPlan
from llama_pruning.surgery import apply_plan, check_plan, finalize, group_query_heads, head_rows, prune_layer

MODES = ("none", "bias", "lsq")
DEFAULT_RIDGE = 0.1  # measured best on SmolLM2 (docs/RECONSTRUCTION.md)


class ReconstructionError(ValueError):
    """Bad arguments to reconstruction, or a least-squares system that cannot be solved."""


class InputStats:
    """Streaming statistics of a Linear's input rows: Gram X^T X, column sums and row count.

    Used as a forward pre-hook, so activations are reduced batch by batch and never stored.
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device):
        self.gram = torch.zeros(dim, dim, dtype=dtype, device=device)
        self.sum = torch.zeros(dim, dtype=dtype, device=device)
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).to(self.gram.dtype)
        self.gram.addmm_(x.T, x)
        self.sum += x.sum(0)
        self.count += x.shape[0]


@torch.no_grad()
def compensate(
    linear: nn.Linear,
    dense_weight: torch.Tensor,
    kept: torch.Tensor,
    stats: InputStats,
    mode: str,
    ridge: float,
) -> None:
    """Re-fit a cut `linear` (weight = dense_weight[:, kept]) in place from its dense input statistics.

    With X the dense input, K/R the kept/removed columns and Y = X W^T + b the dense output:
    - `bias`: b' = b + mean(X_R) W_R^T, so the mean output over the calibration tokens is exact.
    - `lsq`: W' = argmin ||X_K W'^T + b' - Y||^2 + lam ||W' - W_K||^2, with lam = ridge * mean(diag(X_K^T X_K)),
      i.e. W'^T = W_K^T + (G_KK + lam I)^-1 G_KR W_R^T; when the linear has a bias it is fitted jointly
      (unpenalised), which replaces G by the centred Gram G - n mu mu^T.
    Solved in the dtype of `stats`; the result is cast back to the linear's dtype.
    """
    dtype = stats.gram.dtype
    has_bias = linear.bias is not None
    if mode == "bias" and not has_bias:
        return
    removed_mask = torch.ones(dense_weight.shape[1], dtype=torch.bool, device=kept.device)
    removed_mask[kept] = False
    removed = removed_mask.nonzero().squeeze(1)
    w_removed_t = dense_weight[:, removed].to(dtype).T
    mean = stats.sum / stats.count
    delta = None
    if mode == "lsq":
        gram = stats.gram - stats.count * torch.outer(mean, mean) if has_bias else stats.gram
        g_kk = gram[kept][:, kept]
        lam = ridge * stats.gram.diagonal()[kept].mean()
        g_kk.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(g_kk)
        if info.item() != 0:
            raise ReconstructionError("the calibration Gram matrix is singular: use ridge > 0 or more samples")
        delta = torch.cholesky_solve(gram[kept][:, removed] @ w_removed_t, chol)  # (kept, out)
        linear.weight.add_((delta.T).to(linear.weight.dtype))
    if has_bias:
        shift = mean[removed] @ w_removed_t
        if delta is not None:
            shift -= mean[kept] @ delta
        linear.bias.add_(shift.to(linear.bias.dtype))


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records its inputs and kwargs, passes hidden states through.

    Every recorder sees the embedding output (references, not copies); only the first one's is used.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        self.kwargs: list[dict] = []

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        self.inputs.append(hidden_states)
        self.kwargs.append(kwargs)
        return hidden_states


def capture_layer_inputs(
    model: nn.Module, samples: torch.LongTensor, batch_size: int
) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Hidden states entering layer 0 per batch, and the kwargs the model passes each layer per batch.

    The decoder layers are swapped for recorders, so only embeddings, rotary embeddings and masks are
    computed; the kwargs (causal mask, position embeddings, ...) are exactly what the model's own forward
    builds, per layer (mixed sliding/full attention models get each layer's own mask).
    """
    decoder = model.get_decoder()
    layers = decoder.layers
    recorders = nn.ModuleList(_Recorder() for _ in layers)
    device = next(model.parameters()).device
    decoder.layers = recorders
    try:
        for batch in samples.split(batch_size):
            decoder(input_ids=batch.to(device), use_cache=False)
    finally:
        decoder.layers = layers
    return recorders[0].inputs, [r.kwargs for r in recorders]


def _attention_columns(plan: PruningPlan, index: int, device: torch.device) -> torch.Tensor:
    """o_proj input columns kept by the plan in a dense layer (query heads of the kept GQA groups)."""
    spec = plan.model_spec()
    heads = group_query_heads(sorted(plan.attn_groups[index]), spec.n_rep)
    return head_rows(heads, spec.head_dim, device)


def _run_attention(layer: nn.Module, norm: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Residual stream after the attention block, as the decoder layer's own forward computes it."""
    out, _ = layer.self_attn(hidden_states=norm(hidden), **kwargs)
    return hidden + out


def _run_mlp(mlp: nn.Module, norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Residual stream after an MLP block."""
    return hidden + mlp(norm(hidden))


def _reconstruct_layer(
    layer: nn.Module,
    plan: PruningPlan,
    index: int,
    hidden: list[torch.Tensor],
    kwargs: list[dict],
    mode: str,
    ridge: float,
    solve_dtype: torch.dtype,
) -> None:
    """Cut one layer and re-fit its o_proj / down_proj; `hidden` (per batch) is advanced to its output in place."""
    spec = plan.model_spec()
    attn_cut = 0 < len(plan.attn_groups[index]) < spec.num_kv_heads
    mlp_cut = 0 < len(plan.mlp_channels[index]) < spec.intermediate_size
    device = hidden[0].device
    attn_norm = layer.input_layernorm
    dense_o = layer.self_attn.o_proj.weight if attn_cut else None
    dense_mlp = copy.deepcopy(layer.mlp) if mlp_cut else None
    mlp_norm = layer.post_attention_layernorm

    if attn_cut:  # statistics of o_proj's dense input on the current (already pruned upstream) hidden states
        o_stats = InputStats(dense_o.shape[1], solve_dtype, device)
        handle = layer.self_attn.o_proj.register_forward_pre_hook(o_stats)
        try:
            for x, kw in zip(hidden, kwargs, strict=True):
                _run_attention(layer, attn_norm, x, kw)
        finally:
            handle.remove()
    prune_layer(layer, plan, index)
    if attn_cut:
        compensate(layer.self_attn.o_proj, dense_o, _attention_columns(plan, index, device), o_stats, mode, ridge)
    for b, (x, kw) in enumerate(zip(hidden, kwargs, strict=True)):
        hidden[b] = _run_attention(layer, layer.input_layernorm, x, kw)

    if mlp_cut:  # the dense MLP's down_proj input, on the residual stream after the *pruned* attention
        m_stats = InputStats(spec.intermediate_size, solve_dtype, device)
        handle = dense_mlp.down_proj.register_forward_pre_hook(m_stats)
        try:
            for x in hidden:
                dense_mlp(mlp_norm(x))
        finally:
            handle.remove()
        kept = torch.tensor(sorted(plan.mlp_channels[index]), dtype=torch.long, device=device)
        compensate(layer.mlp.down_proj, dense_mlp.down_proj.weight, kept, m_stats, mode, ridge)
    for b, x in enumerate(hidden):
        hidden[b] = _run_mlp(layer.mlp, layer.post_attention_layernorm, x)


def _check_args(samples: torch.Tensor, mode: str, ridge: float, batch_size: int) -> None:
    """One-line errors for arguments the layer loop would otherwise trip over deep inside."""
    if mode not in MODES:
        raise ReconstructionError(f"unknown reconstruction mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "none":
        return
    if not isinstance(samples, torch.Tensor) or samples.dim() != 2 or samples.numel() == 0:
        raise ReconstructionError("samples must be a non-empty LongTensor of token ids shaped [num_samples, length]")
    if samples.dtype != torch.long:
        raise ReconstructionError(f"samples must hold token ids (torch.long), got {samples.dtype}")
    if not ridge >= 0:
        raise ReconstructionError(f"ridge must be >= 0, got {ridge}")
    if batch_size < 1:
        raise ReconstructionError(f"batch_size must be >= 1, got {batch_size}")


def prune_with_reconstruction(
    model: nn.Module,
    plan: PruningPlan,
    samples: torch.LongTensor,
    mode: str = "lsq",
    ridge: float = DEFAULT_RIDGE,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    solve_dtype: torch.dtype = torch.float64,
    progress: bool = True,
) -> nn.Module:
    """Cut `model` (dense, in place) to `plan`, compensating each block on calibration `samples`; return it.

    mode: `none` (plain `apply_plan`), `bias` (mean-preserving o_proj/down_proj bias, FLAP-style) or
    `lsq` (ridge least-squares re-fit of the kept o_proj/down_proj columns toward the dense block output,
    plus the bias when the plan or model has one). `bias` needs biases to fill: when the plan has no
    `bias_compensation` flags, a copy flagging every layer is applied. The plan actually applied is
    `model.pruning_plan`, and the result has exactly the structure `apply_plan` gives it.
    `device`: where layers run while processed (each one is moved there and back); default: the model's.
    Grams are accumulated and solved in `solve_dtype`.
    """
    _check_args(samples, mode, ridge, batch_size)
    if mode == "none":
        return apply_plan(model, plan)
    check_plan(model, plan)
    if mode == "bias" and not plan.bias_compensation:
        plan = dataclasses.replace(plan, bias_compensation=[True] * plan.num_layers)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()  # no dropout in the passes whose statistics are fitted
    try:
        with torch.no_grad():
            inputs, kwargs = capture_layer_inputs(model, samples, batch_size)
            hidden = send_to_device(inputs, device)
            layers = decoder_layers(model)
            for i in tqdm(range(len(layers)), desc=f"reconstruct ({mode})", disable=not progress):
                layer = layers[i].to(device)
                _reconstruct_layer(layer, plan, i, hidden, send_to_device(kwargs[i], device), mode, ridge, solve_dtype)
                layers[i] = layer.to(home)
    finally:
        model.train(was_training)
    return finalize(model, plan)
