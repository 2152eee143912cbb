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

import contextlib
import copy
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator

import torch
from accelerate.utils import recursively_apply, send_to_device
from torch import nn
from tqdm.auto import tqdm

from llama_pruning import placement
from llama_pruning.gram import add_gram_, mirror_
from llama_pruning.models import arch
from llama_pruning.models.arch import capture_layer_inputs, decoder_layers, final_norm, run_layer
from llama_pruning.options import (  # noqa: F401 (re-exported)
    DEFAULT_BLOCK_EPOCHS,
    DEFAULT_BLOCK_LR,
    DEFAULT_BLOCK_SPAN,
    DEFAULT_DRIFT,
    DEFAULT_KL_TOKENS,
    DEFAULT_LAST_LOSS,
    DEFAULT_RIDGE,
    DEFAULT_SAMPLES,
    KL_ROWS,
    LAST_LOSSES,
    MODES,
    resolve_last_loss,
)
from llama_pruning.plan import PruningPlan, is_int
from llama_pruning.surgery import apply_plan, check_plan, finalize, group_query_heads, head_rows, prune_layer


class ReconstructionError(ValueError):
    """Bad arguments to reconstruction, or a least-squares system that cannot be solved."""


class InputStats:
    """Streaming statistics of a Linear's input rows: Gram X^T X (its upper block triangle until `gram.mirror_`),
    column sums and row count.

    Used as a forward pre-hook, so activations are reduced batch by batch and never stored. With
    `out_dim`, it also accumulates X^T D and the sums of D for a drift D (tokens x out_dim) handed to
    `add_drift` after each forward: the gap between the dense model's residual stream and the pruned one's.
    `keep` (0/1 per token of the next forward, None: all) zeroes the rows of left-out tokens and does not count them.
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, out_dim: int | None = None):
        self.gram = torch.zeros(dim, dim, dtype=dtype, device=device)
        self.sum = torch.zeros(dim, dtype=dtype, device=device)
        self.count = 0
        self.cross = None if out_dim is None else torch.zeros(dim, out_dim, dtype=dtype, device=device)
        self.drift_sum = None if out_dim is None else torch.zeros(out_dim, dtype=dtype, device=device)
        self._last: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as (tokens, features) in the statistics' dtype, the left-out tokens' rows zeroed."""
        t = t.reshape(-1, t.shape[-1]).to(self.gram.dtype)
        return t if self.keep is None else t * self.keep.reshape(-1, 1).to(t)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = self._rows(args[0])
        add_gram_(self.gram, x)  # upper block triangle: `compensate` mirrors it before reading
        self.sum += x.sum(0)
        self.count += x.shape[0] if self.keep is None else int(self.keep.sum())
        if self.cross is not None:
            self._last = x

    def release(self) -> None:
        """Free the matrices (Gram, X^T D) once a solve has read them; the sums and count stay."""
        self.gram = self.cross = None

    def add_drift(self, drift: torch.Tensor) -> None:
        """Pair the drift of the last forward's tokens with that forward's inputs."""
        d = self._rows(drift)
        self.cross.addmm_(self._last.T, d)
        self.drift_sum += d.sum(0)
        self._last = None


def _spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """matrix^-1 rhs by Cholesky for a damped Gram matrix; ReconstructionError when it is not positive definite."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    if info.item() != 0:
        raise ReconstructionError("the calibration Gram matrix is singular: use ridge > 0 or more samples")
    return torch.cholesky_solve(rhs, chol)


@torch.no_grad()
def compensate(
    linear: nn.Linear,
    dense_weight: torch.Tensor,
    kept: torch.Tensor,
    stats: InputStats,
    mode: str,
    ridge: float,
    drift_weight: float = 0.0,
    solve_dtype: torch.dtype = torch.float64,
) -> None:
    """Re-fit a cut `linear` (weight = dense_weight[:, kept]) in place from its dense input statistics.

    With X the dense input, K/R the kept/removed columns, Y = X W^T + b the dense output and the target
    T = Y + a D (D: the drift in `stats`, a = `drift_weight`; a = 0 reproduces this block's dense output,
    a = 1 the dense model's residual stream, undoing the error accumulated upstream as well):
    - `bias`: b' = b + mean(X_R) W_R^T + a mean(D), so the mean output over the calibration tokens is exact.
    - `lsq`: W' = argmin ||X_K W'^T + b' - T||^2 + lam ||W' - W_K||^2, lam = ridge * mean(diag(X_K^T X_K)) / n:
      `ridge` is the prior's weight in tokens (n = calibration tokens), so more tokens let the data speak more;
      i.e. W'^T = W_K^T + (G_KK + lam I)^-1 (G_KR W_R^T + a X_K^T D); when the linear has a bias it is fitted
      jointly (unpenalised), which centres G and X^T D (G - n mu mu^T).
    Solved in `solve_dtype` (the kept blocks of the statistics are cast to it); the result is cast back to the
    linear's dtype. `lsq` releases the matrices of `stats` before factorising, so the Gram and the factor never coexist.
    """
    has_bias = linear.bias is not None
    if mode == "bias" and not has_bias:
        return
    removed_mask = torch.ones(dense_weight.shape[1], dtype=torch.bool, device=kept.device)
    removed_mask[kept] = False
    removed = removed_mask.nonzero().squeeze(1)
    w_removed_t = dense_weight[:, removed].to(solve_dtype).T
    n = stats.count
    mean = stats.sum.to(solve_dtype) / n
    drift = drift_weight != 0 and stats.cross is not None
    delta = None
    if mode == "lsq":
        # the kept blocks are gathered, then cast (no full-width copy); centred when a bias is fitted jointly
        mirror_(stats.gram)
        rhs = stats.gram[kept[:, None], removed].to(solve_dtype) @ w_removed_t
        if has_bias:
            rhs -= n * torch.outer(mean[kept], mean[removed] @ w_removed_t)
        if drift:
            cross = stats.cross[kept].to(solve_dtype)
            if has_bias:
                cross -= torch.outer(mean[kept], stats.drift_sum.to(solve_dtype))
            rhs += drift_weight * cross
            del cross
        stats.cross = None
        g_kk = stats.gram[kept[:, None], kept].to(solve_dtype)
        stats.release()  # the Gram is not needed any more: it and the Cholesky factor never coexist
        lam = ridge * g_kk.diagonal().mean() / n
        if has_bias:
            g_kk -= n * torch.outer(mean[kept], mean[kept])
        g_kk.diagonal().add_(lam)
        delta = _spd_solve(g_kk, rhs)  # (kept, out)
        del g_kk, rhs
        linear.weight.add_((delta.T).to(linear.weight.dtype))
    if has_bias:
        shift = mean[removed] @ w_removed_t
        if delta is not None:
            shift -= mean[kept] @ delta
        if drift:
            shift += drift_weight * stats.drift_sum.to(solve_dtype) / n
        linear.bias.add_(shift.to(linear.bias.dtype))


def _attention_columns(plan: PruningPlan, index: int, device: torch.device) -> torch.Tensor:
    """o_proj input columns kept by the plan in a dense layer (query heads of the kept GQA groups)."""
    spec = plan.model_spec()
    heads = group_query_heads(sorted(plan.attn_groups[index]), spec.n_rep)
    return head_rows(heads, spec.head_dim, device)


def _bf16(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast around one forward when `enabled`, its weight cache off: autocast otherwise keeps the casts of
    weights that require grad until its outermost region exits, and a caller's region would feed Adam stale weights."""
    return (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if enabled
            else contextlib.nullcontext())


def _run_attention(attn: nn.Module, norm: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, kwargs: dict,
                   autocast: bool = False) -> torch.Tensor:
    """Residual stream after the attention block, as the decoder layer's own forward computes it."""
    with _bf16(autocast, hidden.device):
        out, _ = attn(hidden_states=norm(hidden), **kwargs)
    return hidden + out


def _run_mlp(mlp: nn.Module, norm: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
             autocast: bool = False) -> torch.Tensor:
    """Residual stream after an MLP block."""
    with _bf16(autocast, hidden.device):
        out = mlp(norm(hidden))
    return hidden + out


def _fit_pass(block, module: nn.Module, stats: InputStats | None, hidden: list[torch.Tensor],
              dense_hidden: list[torch.Tensor] | None, step: Callable[[], object], dense_block=None,
              keep: list[torch.Tensor] | None = None, advance: bool = False) -> None:
    """Run the uncut `block(x, batch)` over the pruned stream with `module`'s inputs recorded into `stats`;
    with a dense stream, advance it through `dense_block` (default: the same block) and record the drift
    between the two outputs. `step` is called after each batch (the progress bar); `keep`: per batch, the
    tokens the statistics count (None: all); `advance`: `hidden` is replaced by the uncut block's outputs (which run
    only where there are `stats`)."""
    dense_block = dense_block or block
    for b, x in enumerate(hidden):
        if stats is not None:
            stats.keep = None if keep is None else keep[b]
            handle = module.register_forward_pre_hook(stats)
            try:
                out = block(x, b)
            finally:
                handle.remove()
            if advance:
                hidden[b] = out
        if dense_hidden is not None:
            dense_hidden[b] = dense_block(dense_hidden[b], b)
            if stats is not None:
                stats.add_drift(dense_hidden[b] - out)
        step()


@torch.no_grad()
def input_correction(norm: nn.Module, hidden: list[torch.Tensor], dense_hidden: list[torch.Tensor], ridge: float,
                     solve_dtype: torch.dtype, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
    """M such that W + W M^T is the ridge least-squares re-fit of any linear reading norm(h) toward its dense input.

    With P = norm(pruned stream) and D = norm(dense stream) over the calibration tokens, W'^T = argmin
    ||P W'^T - D W^T||^2 + lam ||W' - W||^2 = W^T + (P^T P + lam I)^-1 P^T (D - P) W^T; one M serves every
    projection that reads the same normed input (q/k/v, gate/up). lam as in `compensate`; `keep` as in `_fit_pass`.
    """
    gram = cross = None
    count = 0
    for b, (x, y) in enumerate(zip(hidden, dense_hidden, strict=True)):
        p = norm(x).reshape(-1, x.shape[-1]).to(solve_dtype)
        d = norm(y).reshape(-1, y.shape[-1]).to(solve_dtype)
        if keep is not None:
            p, d = p * keep[b].reshape(-1, 1).to(p), d * keep[b].reshape(-1, 1).to(d)
        if gram is None:
            gram, cross = p.new_zeros(p.shape[1], p.shape[1]), p.new_zeros(p.shape[1], d.shape[1])
        add_gram_(gram, p)
        cross.addmm_(p.T, d)
        count += p.shape[0] if keep is None else int(keep[b].sum())
    cross -= mirror_(gram)
    gram.diagonal().add_(ridge * gram.diagonal().mean() / count)
    return _spd_solve(gram, cross)


def corrected_norm(norm: nn.Module, correction: torch.Tensor, weight: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """n + weight * n M with n = norm(h): since (W + weight W M^T) n = W (n + weight M^T n), every linear reading it
    computes what `correct_inputs` would make of it, without a corrected copy of the block."""
    m = correction.to(norm.weight.dtype) * weight
    return lambda h: (n := norm(h)) + n @ m


@contextlib.contextmanager
def _refitting_inputs(norm: nn.Module, linears: list[nn.Linear], weight: float, hidden: list[torch.Tensor],
                      dense_hidden: list[torch.Tensor] | None, ridge: float, solve_dtype: torch.dtype,
                      keep: list[torch.Tensor] | None) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """The norm a fit pass reads: what `linears` (reading `norm`) compute once re-fitted toward their dense-stream
    inputs, which they are on exit (`input_correction`, `corrected_norm`); `norm` itself when there are none."""
    if not linears:
        yield norm
        return
    m = input_correction(norm, hidden, dense_hidden, ridge, solve_dtype, keep)
    yield corrected_norm(norm, m, weight)
    correct_inputs(linears, m, weight)


@torch.no_grad()
def correct_inputs(linears: list[nn.Linear], correction: torch.Tensor, weight: float) -> None:
    """W <- W + weight * W M^T for each linear (`input_correction`'s M); weight 1 is the full re-fit."""
    for linear in linears:
        w = linear.weight.to(correction.dtype)
        linear.weight.add_((weight * w @ correction.T).to(linear.weight.dtype))


def _reconstruct_layer(
    layer: nn.Module,
    plan: PruningPlan,
    index: int,
    hidden: list[torch.Tensor],
    kwargs: list[dict],
    mode: str,
    ridge: float,
    solve_dtype: torch.dtype,
    dense_hidden: list[torch.Tensor] | None = None,
    drift_weight: float = 0.0,
    step: Callable[[], object] = lambda: None,
    input_weight: float = 0.0,
    advance: bool = True,
    autocast: bool = False,
    dense: nn.Module | None = None,
    keep: list[torch.Tensor] | None = None,
) -> bool:
    """Cut one layer and re-fit its o_proj / down_proj; `hidden` (per batch) is advanced to its output in place
    (`advance` False: only through the attention, for a caller that recomputes the layer's output anyway; True is
    returned when `hidden` then holds the *dense* layer's output instead, which the MLP's fit pass computed anyway).

    With `dense_hidden` (the dense model's residual stream per batch, advanced in place as well), each block
    is also fitted to cancel `drift_weight` of the gap between the dense and the pruned stream, and with
    `input_weight` > 0 its q/k/v (gate/up) rows are re-fitted toward their dense-stream inputs (`input_correction`),
    which the statistics pass already sees; the dense stream keeps the original weights. `autocast`: the layer
    forwards in bfloat16 autocast (the statistics still accumulate in float32). `dense`: an uncut copy of the layer
    the caller holds anyway, read (never changed) instead of copying its MLP again. `keep`: per batch, 0/1 for the
    tokens the statistics count (None: all).
    """
    spec = plan.model_spec()
    attn_cut = 0 < len(plan.attn_groups[index]) < spec.num_kv_heads
    mlp_cut = 0 < len(plan.mlp_channels[index]) < spec.intermediate_size
    device = hidden[0].device
    width = spec.hidden_size if dense_hidden is not None else None
    stats_dtype = torch.promote_types(hidden[0].dtype, torch.float32)  # float64 accumulation costs twice the time

    # the input re-fit (`input_weight`): the fit passes read a corrected norm, the weights are re-fitted after them
    correct = input_weight > 0 and dense_hidden is not None
    refit = functools.partial(_refitting_inputs, weight=input_weight, hidden=hidden, dense_hidden=dense_hidden,
                              ridge=ridge, solve_dtype=solve_dtype, keep=keep)
    attn, attn_norm = layer.self_attn, layer.input_layernorm

    # statistics of o_proj's dense input on the current (already pruned upstream) hidden states
    o_stats = InputStats(spec.num_heads * spec.head_dim, stats_dtype, device, width) if attn_cut else None
    dense_o = attn.o_proj.weight if attn_cut else None
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj] if correct and plan.attn_groups[index] else []
    with refit(attn_norm, qkv) as fit_norm:
        _fit_pass(lambda x, b: _run_attention(attn, fit_norm, x, kwargs[b], autocast), attn.o_proj, o_stats, hidden,
                  dense_hidden, step, lambda x, b: _run_attention(attn, attn_norm, x, kwargs[b], autocast), keep)
    # prune_layer slices a partly cut MLP in place (hence the copy) and swaps out an emptied one with its norm
    dense_mlp = layer.mlp
    if mlp_cut:
        dense_mlp = dense.mlp if dense is not None else copy.deepcopy(layer.mlp)
    dense_norm = layer.post_attention_layernorm
    prune_layer(layer, plan, index)
    if attn_cut:
        compensate(layer.self_attn.o_proj, dense_o, _attention_columns(plan, index, device), o_stats, mode, ridge,
                   drift_weight, solve_dtype)
    for b, x in enumerate(hidden):
        hidden[b] = _run_attention(layer.self_attn, layer.input_layernorm, x, kwargs[b], autocast)

    # the uncut MLP's down_proj input, on the residual stream after the *pruned* attention
    m_stats = InputStats(spec.intermediate_size, stats_dtype, device, width) if mlp_cut else None
    # with the attention whole and untouched, the fit pass's uncut MLP output is the dense layer's: kept for the caller
    dense_out = not advance and mlp_cut and not correct and len(plan.attn_groups[index]) == spec.num_kv_heads
    gate_up = [layer.mlp.gate_proj, layer.mlp.up_proj] if correct and plan.mlp_channels[index] else []
    with refit(dense_norm, gate_up) as fit_norm:
        _fit_pass(lambda x, b: _run_mlp(dense_mlp, fit_norm, x, autocast), dense_mlp.down_proj, m_stats, hidden,
                  dense_hidden, step, lambda x, b: _run_mlp(dense_mlp, dense_norm, x, autocast), keep, dense_out)
    if mlp_cut:
        kept = torch.tensor(sorted(plan.mlp_channels[index]), dtype=torch.long, device=device)
        compensate(layer.mlp.down_proj, dense_mlp.down_proj.weight, kept, m_stats, mode, ridge, drift_weight,
                   solve_dtype)
    if advance:
        for b, x in enumerate(hidden):
            hidden[b] = _run_mlp(layer.mlp, layer.post_attention_layernorm, x, autocast)
    return dense_out


class LayerSpan(nn.Module):
    """Consecutive decoder layers (one or more) run as one module, each with its own keyword arguments and on its own
    device: the unit `refine_layer` moves in block mode."""

    def __init__(self, layers: list[nn.Module], devices: list[torch.device]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.devices = devices

    def forward(self, hidden: torch.Tensor, per_layer: list[dict]) -> torch.Tensor:
        for layer, device, kwargs in zip(self.layers, self.devices, per_layer, strict=True):
            hidden = run_layer(layer, hidden.to(device), kwargs)
        return hidden


def masked_mse(out: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of `out` against `target` over the tokens `keep` marks (0/1 per token; None: all)."""
    error = (out.float() - target.float()).square()
    if keep is None:
        return error.mean()
    weight = keep.to(error)[..., None]
    return (error * weight).sum() / (weight.sum().clamp_min(1) * error.shape[-1])


class _SummedKL(torch.autograd.Function):
    """Summed KL(teacher || student) between the softmax rows of `student @ weight.T` and `teacher @ weight.T`.

    The backward is the closed form d/d(logits) = softmax(student) - softmax(teacher), kept in the weight's dtype:
    autograd through log_softmax and kl_div would hold several vocabulary-wide float32 copies per token. Rows go
    `KL_ROWS` at a time, so only the saved gradient spans every token; the softmax runs in float32 at least.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(weight.dtype, torch.float32)  # the softmax's dtype: bfloat16 logits lose gradient
        loss = torch.zeros((), dtype=wide, device=student.device)
        diff = student.new_empty(student.shape[0], weight.shape[0], dtype=weight.dtype)
        for start in range(0, student.shape[0], KL_ROWS):
            rows = slice(start, start + KL_ROWS)
            s = (student[rows].to(weight.dtype) @ weight.T).to(wide).log_softmax(-1)
            t = (teacher[rows].to(weight.dtype) @ weight.T).to(wide).log_softmax(-1)
            p = t.exp()
            loss += torch.dot(p.flatten(), t.sub_(s).flatten())  # three chunk-sized float32 tensors at most
            diff[rows] = s.exp_().sub_(p)
        ctx.save_for_backward(diff, weight)
        ctx.dtype = student.dtype
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        diff, weight = ctx.saved_tensors
        return (diff @ weight).to(ctx.dtype) * grad, None, None


class NextTokenKL:
    """The last layer's loss under `last_loss="kl"`: KL from the dense model's next-token distribution to the pruned one's,
    per kept token, both read through the model's final norm and output head, which stay frozen.

    `targets` turns the dense stream's final hidden states into what `__call__` compares the layer's output with (the
    normed states in the head's compute dtype: bfloat16 under `autocast`, else the head's own). `tokens` < 1: each call
    reads the head on that fraction of the kept tokens, a fresh random subset from a generator seeded once (reruns repeat it).
    """

    def __init__(self, norm: nn.Module, head: torch.Tensor, autocast: bool = False, tokens: float = 1.0):
        self.norm = norm
        self.weight = head.detach().to(torch.bfloat16 if autocast else head.dtype)
        self.tokens = tokens
        self._draws = torch.Generator().manual_seed(0)

    def _normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm of `hidden` on the head's device (a device map may hold the norm, head and layer apart), its
        weight detached: the norm stays frozen and gathers no gradient."""
        frozen = {name: p.detach() for name, p in self.norm.named_parameters()}
        return torch.func.functional_call(self.norm, frozen, (hidden.to(next(iter(frozen.values())).device),)
                                          ).to(self.weight.device)

    @torch.no_grad()
    def targets(self, dense_hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self._normed(d).to(self.weight.dtype) for d in dense_hidden]

    def __call__(self, out: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        student = self._normed(out)
        if keep is None:
            student, target = student.flatten(0, -2), target.flatten(0, -2)
        else:
            mask = keep.to(self.weight.device).bool()
            student, target = student[mask], target[mask]
        if self.tokens < 1:
            count = max(1, round(self.tokens * student.shape[0]))
            rows = torch.randperm(student.shape[0], generator=self._draws)[:count].sort().values.to(student.device)
            student, target = student[rows], target[rows]
        return _SummedKL.apply(student, target, self.weight) / max(1, student.shape[0])


_FUSED_ADAM = ("cpu", "cuda")  # devices with a fused Adam kernel


def _adam_steps(epochs: float, batches: int) -> int:
    """`refine_layer`'s step count: `epochs` passes over `batches` micro-batches, at least one."""
    return max(1, round(epochs * batches))


def _seconds_per_tick(bar: tqdm) -> float:
    """The run's mean seconds per tick so far (0: none yet, or the bar is disabled)."""
    return bar.format_dict["elapsed"] / bar.n if bar.n and not bar.disable else 0.0


class KlTicks:
    """The bar's share for the last layer's kl steps, whose vocabulary-wide head makes each several passes long (SmolLM2:
    8-9), so the ETA holds through the run. Before they run it is a forecast in FLOPs: the block steps timed so far price a
    kept weight in ticks (a step multiplies each three times per token), and a kl step multiplies `weights` (its layers'
    kept ones) and `head` (the head's times the share of the batch's tokens it reads); while they run, each step counts
    the ticks its measured seconds are worth at the run's mean seconds per tick (at least `layers`), and the total follows."""

    clock = staticmethod(time.perf_counter)

    def __init__(self, bar: tqdm, steps: int, layers: int, weights: float, head: float):
        self.bar, self.steps, self.layers, self.step_weights = bar, steps, layers, weights + head
        self.share = self.done = self.counted = self.tick = 0
        self.seconds = self.timed_weights = 0.0
        if layers:  # until a block step is timed: one tick a layer of the mean kept width, as the bar counts it
            self.forecast(layers / weights)

    def forecast(self, weight_ticks: float) -> None:
        """Re-estimate the share from `weight_ticks`, the ticks one kept weight is worth in a step."""
        worth = max(self.steps * self.layers, round(self.steps * weight_ticks * self.step_weights))
        self.bar.total += worth - self.share
        self.share = worth

    def timed(self, seconds: float, weights: float) -> None:
        """Forecast from every block refinement so far, this one `weights` (steps x kept weights) in `seconds`."""
        self.seconds += seconds
        self.timed_weights += weights
        if self.layers and (tick := _seconds_per_tick(self.bar)):
            self.forecast(self.seconds / self.timed_weights / tick)

    def start(self) -> None:
        """The kl steps begin: from here their measured time counts."""
        self.tick, self.begin = _seconds_per_tick(self.bar), self.clock()

    def __call__(self) -> None:
        self.done += 1
        worth = self.done * self.layers  # rounded once over the steps so far, so no rounding error builds up
        if self.tick:
            worth = max(worth, round((self.clock() - self.begin) / self.tick))
        weight, self.counted = worth - self.counted, worth
        self.bar.total = self.bar.n + weight + round(worth / self.done * (self.steps - self.done))
        self.bar.update(weight)


def refine_layer(layer: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict],
                 epochs: float, lr: float, step: Callable[[], object] = lambda: None,
                 autocast: bool = False, keep: list[torch.Tensor] | None = None,
                 loss_fn: Callable[..., torch.Tensor] = masked_mse) -> tuple[float, float]:
    """Block-local distillation: Adam on every weight of the cut `layer` (or `LayerSpan`) so its outputs on `inputs`
    approach `targets`.

    One step per micro-batch, in order, for `epochs` passes (cosine-decayed `lr`), in float32 whatever the layer's dtype
    (it is cast back); `autocast`: the layer's matmuls in bfloat16 (weights, loss and Adam stay float32). The linear
    re-fit has already placed o_proj / down_proj at their optimum for the current q/k/v and gate/up; these steps move
    all of them jointly; `keep` (per batch, 0/1 per token) leaves tokens out of the loss. `loss_fn(output, target, keep)`:
    the mean squared error by default, `NextTokenKL` for the last layer. Returns the mean loss of the first and last pass.
    """
    steps = _adam_steps(epochs, len(inputs))
    dtype = next(layer.parameters()).dtype
    params = [p for p in layer.parameters() if p.is_floating_point()]
    layer.float()
    kwargs = [recursively_apply(lambda t: t.float() if t.is_floating_point() else t, kw) for kw in kwargs]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    # fused: the same update in one kernel per step (about -10 % of a SmolLM2 step on CPU) where torch has one
    optimizer = torch.optim.Adam(params, lr=lr, fused=params[0].device.type in _FUSED_ADAM)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    losses = []
    try:
        with torch.enable_grad():
            for k in range(steps):
                b = k % len(inputs)
                with _bf16(autocast, inputs[b].device):
                    out = run_layer(layer, inputs[b].float(), kwargs[b])
                loss = loss_fn(out.float(), targets[b], None if keep is None else keep[b])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                step()
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.grad = None  # the last step's gradients: a layer's worth of memory per refined layer if kept
            p.requires_grad_(flag)
        layer.to(dtype)
    first = losses[:len(inputs)]
    last = losses[-len(inputs):]
    return sum(first) / len(first), sum(last) / len(last)


def _kept_weights(plan: PruningPlan, layers: list[int]) -> int:
    """The weights `plan` keeps in `layers`' attention and MLP blocks: what a step multiplies per token, three times."""
    spec = plan.model_spec()
    return sum(spec.attn_block_params(len(plan.attn_groups[i])) + spec.mlp_block_params(len(plan.mlp_channels[i]))
               for i in layers)


def _refined_layers(plan: PruningPlan) -> list[int]:
    """Layers `block` mode refines: those the plan cuts, except emptied ones (no weight left to move)."""
    spec = plan.model_spec()
    return [i for i, (groups, channels) in enumerate(zip(plan.attn_groups, plan.mlp_channels, strict=True))
            if (groups or channels) and (len(groups) < spec.num_kv_heads or len(channels) < spec.intermediate_size)]


def _spans(num_layers: int, refined: list[int], span: int) -> list[list[int]]:
    """The layer loop's units: runs of up to `span` consecutive refined layers, refined jointly; every other layer alone."""
    units: list[list[int]] = []
    for i in range(num_layers):
        if units and i in refined and units[-1][0] in refined and len(units[-1]) < span:  # units[-1] ends at i - 1
            units[-1].append(i)
        else:
            units.append([i])
    return units


def _layer_outputs(layer: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict],
                   autocast: bool = False) -> list[torch.Tensor]:
    """A decoder layer's output per batch, its matmuls in bfloat16 autocast when `autocast`."""
    with _bf16(autocast, inputs[0].device):
        return [run_layer(layer, x, kw) for x, kw in zip(inputs, kwargs, strict=True)]


@torch.no_grad()
def _block_targets(dense_layer: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict],
                   dense_hidden: list[torch.Tensor] | None, drift_weight: float,
                   autocast: bool = False, outputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """What the cut layer (or span) should output per batch: the dense layer's output on the pruned stream, pulled
    `drift_weight` of the way toward the dense stream (the target `compensate` fits each block to); `outputs`: that
    dense output when the caller has it already (pulled in place), else it is computed."""
    targets = _layer_outputs(dense_layer, inputs, kwargs, autocast) if outputs is None else outputs
    if dense_hidden is not None:
        for z, d in zip(targets, dense_hidden, strict=True):
            z.add_(d - z, alpha=drift_weight)
    return targets


def _check_args(samples: torch.Tensor, mode: str, ridge: float, batch_size: int, drift_weight: float,
                input_weight: float, block_epochs: float, block_lr: float, ignore: torch.Tensor | None = None,
                block_span: int = DEFAULT_BLOCK_SPAN, last_loss: str = DEFAULT_LAST_LOSS,
                kl_tokens: float = DEFAULT_KL_TOKENS) -> None:
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
    if not 0 <= drift_weight <= 1:
        raise ReconstructionError(f"drift_weight must be in [0, 1], got {drift_weight}")
    if not 0 <= input_weight <= 1:
        raise ReconstructionError(f"input_weight must be in [0, 1], got {input_weight}")
    if ignore is not None and (ignore.dtype != torch.bool or ignore.shape != samples.shape):
        raise ReconstructionError(f"ignore must be a bool mask shaped like the samples {tuple(samples.shape)}")
    if ignore is not None and bool(ignore.all()):
        raise ReconstructionError("ignore leaves out every calibration token: nothing is left to fit")
    if mode == "block" and not (0 < block_epochs < math.inf and 0 < block_lr < math.inf):
        raise ReconstructionError(f"block_epochs and block_lr must be > 0, got {block_epochs} and {block_lr}")
    if mode == "block" and not (is_int(block_span) and block_span >= 1):
        raise ReconstructionError(f"block_span must be an integer >= 1, got {block_span!r}")
    if last_loss not in LAST_LOSSES:
        raise ReconstructionError(f"unknown last_loss {last_loss!r}; choose one of {', '.join(LAST_LOSSES)}")
    if last_loss == "kl" and resolve_last_loss("auto", mode, drift_weight) != "kl":
        raise ReconstructionError("last_loss 'kl' compares the last layer with the dense model's stream: it needs mode "
                                  f"'block' and drift_weight > 0, got {mode!r} and {drift_weight}")
    if not 0 < kl_tokens <= 1:
        raise ReconstructionError(f"kl_tokens must be in (0, 1], got {kl_tokens}")


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
    drift_weight: float = DEFAULT_DRIFT,
    input_weight: float = 0.0,
    block_epochs: float = DEFAULT_BLOCK_EPOCHS,
    block_lr: float = DEFAULT_BLOCK_LR,
    block_autocast: bool | None = None,
    ignore: torch.Tensor | None = None,
    block_span: int = DEFAULT_BLOCK_SPAN,
    last_loss: str = DEFAULT_LAST_LOSS,
    kl_tokens: float = DEFAULT_KL_TOKENS,
) -> nn.Module:
    """Cut `model` (dense, in place) to `plan`, compensating each block on calibration `samples`; return it.

    mode: `none` (plain `apply_plan`), `bias` (mean-preserving o_proj/down_proj bias, FLAP-style) or
    `lsq` (ridge least-squares re-fit of the kept o_proj/down_proj columns toward the dense block output,
    plus the bias when the plan or model has one). `bias` needs biases to fill: when the plan has no
    `bias_compensation` flags, a copy flagging every layer is applied. The plan actually applied is
    `model.pruning_plan`, and the result has exactly the structure `apply_plan` gives it.
    `device`: where layers run while processed (each one is moved there and back); default: the model's.
    A model dispatched with a device map runs each layer on its own execution device instead, its offloaded
    weights loaded once and the cut ones written back (llama_pruning.placement).
    Grams are accumulated in float32 (float64 for a float64 model) and solved in `solve_dtype`. `drift_weight` > 0 also runs the
    dense model alongside and fits each block to cancel that fraction of the accumulated gap to the dense residual
    stream (0: each block only imitates its dense self on its current input). `block` = `lsq`, then `refine_layer` on every cut
    layer for `block_epochs` passes over the calibration batches at Adam rate `block_lr`, toward the same target, the
    matmuls of its steps and of its forward passes in bfloat16 autocast when `block_autocast` (None: where the device
    multiplies bfloat16 natively; its statistics and solves stay float32/`solve_dtype`, `lsq` and `bias` never round).
    `ignore` (bool, shaped like `samples`): tokens left out of every statistic and of the block loss, e.g. placeholders
    such as `<unk>` that the text the model will see does not hold (they still pass through the layers as context).
    `block_span` > 1: runs of that many consecutive cut layers are each re-fitted by lsq in turn, then refined jointly
    (the same steps, each through all of them) toward the dense output of the run's last layer.
    `last_loss="kl"`: the steps of the model's last layer (when cut) minimise `NextTokenKL` toward the dense model's
    next-token distribution instead of the squared error toward a hidden state (it needs block and a dense stream);
    `auto` (the default) takes it where it applies, `mse` never. Its steps read the head on `kl_tokens` of the tokens
    each and are 1 / `kl_tokens` times as many (`NextTokenKL`): the head's compute stays, the layer gets more steps.
    """
    _check_args(samples, mode, ridge, batch_size, drift_weight, input_weight, block_epochs, block_lr, ignore, block_span,
                last_loss, kl_tokens)
    last_loss = resolve_last_loss(last_loss, mode, drift_weight)
    if mode == "none":
        return apply_plan(model, plan)
    check_plan(model, plan)
    if mode == "bias" and not plan.bias_compensation:
        plan = dataclasses.replace(plan, bias_compensation=[True] * plan.num_layers)
    device = placement.run_device(model, device)
    # block's linear fit only starts its Adam steps, so its passes may round to bfloat16 too; lsq and bias never do
    autocast = mode == "block" and (placement.fast_bfloat16(device) if block_autocast is None else block_autocast)
    was_training = model.training
    model.eval()  # no dropout in the passes whose statistics are fitted
    # block's many short-window steps on CPU: matmul attention (SDPA's fused backward is the slower there); lsq, bias as before
    fast_attention = arch.matmul_attention(model, mode == "block" and device.type == "cpu"
                                           and samples.shape[1] <= arch.MATMUL_ATTENTION_MAX_TOKENS)
    try:
        with torch.no_grad(), fast_attention:
            hidden, kwargs = capture_layer_inputs(model, samples, batch_size)
            hidden = send_to_device(hidden, device)  # no other name keeps the first layer's inputs alive
            keep = None if ignore is None else [(~m).float().to(device) for m in ignore.split(batch_size)]
            dense_hidden = [x.clone() for x in hidden] if drift_weight else None
            layers = decoder_layers(model)
            refined = _refined_layers(plan) if mode == "block" else []
            units = _spans(len(layers), refined, block_span)
            steps = _adam_steps(block_epochs, len(hidden))
            kl_epochs = block_epochs / kl_tokens  # the last unit's, when refined under kl
            kl_steps = _adam_steps(kl_epochs, len(hidden))
            kl_layers = len(units[-1]) if last_loss == "kl" and units[-1][0] in refined else 0
            # one tick per batch and block (attention, MLP) of every layer and per refinement step and layer it moves, the
            # ETA averaged over the whole run so far: it is shown, and steady, from the first batches of the first layer on;
            # the last layer's kl steps count as many ticks as their time is worth, forecast until they run (`KlTicks`)
            with tqdm(total=2 * len(layers) * len(hidden) + steps * (len(refined) - kl_layers), desc=f"reconstruct ({mode})",
                      unit="pass", smoothing=0, disable=not progress) as bar:
                # the head, three times a step too, on kl_tokens of the tokens the loss keeps (`NextTokenKL`)
                read = kl_tokens * (1 if ignore is None else 1 - ignore.float().mean().item())
                kl_ticks = KlTicks(bar, kl_steps, kl_layers, _kept_weights(plan, units[-1]),
                                   kl_layers and read * model.get_output_embeddings().weight.numel())
                for span in units:
                    refine = span[0] in refined
                    inputs, dense_layers, devices, span_kwargs = None, [], [], []
                    with contextlib.ExitStack() as loaded:  # offloaded: loaded, cut, stored
                        for i in span:
                            bar.set_postfix_str(f"layer {i + 1}/{len(layers)}", refresh=False)
                            dev = loaded.enter_context(placement.on_device(layers[i], device, write_back=True))
                            hidden[:] = send_to_device(hidden, dev)
                            if dense_hidden is not None:
                                dense_hidden[:] = send_to_device(dense_hidden, dev)
                            devices.append(dev)
                            span_kwargs.append(send_to_device(kwargs[i], dev))
                            if refine and inputs is None:
                                inputs = list(hidden)
                            dense_layers.append(copy.deepcopy(layers[i]) if refine else None)
                            dense_out = _reconstruct_layer(layers[i], plan, i, hidden, span_kwargs[-1],
                                                            "lsq" if mode == "block" else mode, ridge, solve_dtype,
                                                            dense_hidden, drift_weight, bar.update, input_weight,
                                                            advance=not (refine and i == span[-1]), autocast=autocast,
                                                            dense=dense_layers[-1], keep=keep)
                        if refine:
                            # the dense layer's outputs when the fit computed them, else a dead post-attention stream
                            outputs = list(hidden) if dense_out and len(span) == 1 else None
                            hidden.clear()
                            unit = LayerSpan([layers[i] for i in span], devices)
                            dense_unit = LayerSpan(dense_layers, devices)
                            unit_kwargs = [{"per_layer": list(batch)} for batch in zip(*span_kwargs, strict=True)]
                            loss_fn, epochs, ticks = masked_mse, block_epochs, functools.partial(bar.update, len(span))
                            kl = last_loss == "kl" and span[-1] == len(layers) - 1
                            if kl:
                                norm, head = final_norm(model), model.get_output_embeddings()
                                loaded.enter_context(placement.on_device(norm, devices[-1]))
                                loaded.enter_context(placement.on_device(head, devices[-1]))
                                loss_fn, epochs = NextTokenKL(norm, head.weight, autocast, kl_tokens), kl_epochs
                                targets = loss_fn.targets(dense_hidden)
                                ticks = kl_ticks
                                kl_ticks.start()
                            else:
                                targets = _block_targets(dense_unit, inputs, unit_kwargs, dense_hidden, drift_weight,
                                                         autocast, outputs)
                            del outputs, dense_unit, dense_layers
                            placement.release_host_memory()
                            began = KlTicks.clock()
                            refine_layer(unit, inputs, targets, unit_kwargs, epochs, block_lr, ticks, autocast, keep,
                                         loss_fn)
                            if not kl:
                                kl_ticks.timed(KlTicks.clock() - began, steps * _kept_weights(plan, span))
                            del targets, loss_fn  # with autocast, kl's loss holds a bfloat16 copy of the head
                            hidden[:] = _layer_outputs(unit, inputs, unit_kwargs, autocast)
                    placement.release_host_memory()
    finally:
        model.train(was_training)
    return finalize(model, plan)
