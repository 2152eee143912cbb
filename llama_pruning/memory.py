"""Memory model of the pruning commands: the peak bytes each phase holds on its device, from the config alone.

Used by `--dry_run` (before anything is loaded) and checked against measurements in bench/memory.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llama_pruning.options import DEFAULT_DRIFT, DEFAULT_LAST_LOSS, KL_ROWS, OBS_CHUNKS, reconstruct_windows, resolve_last_loss

# Llama-3 shapes (untied embeddings, vocab 128256): what bench/memory.py builds and what the docs project
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               vocab_size=128256, num_hidden_layers=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                vocab_size=128256, num_hidden_layers=80),
}

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SOLVE_BYTES = 8  # solves and obs Grams are float64 (reconstruction Grams accumulate in float32, within that bound)
GRAD_BYTES = 4  # Taylor's per-weight accumulators are float32


@dataclass(frozen=True)
class Workload:
    """What a pruning command will do, in the terms its memory depends on."""

    dtype: str = "bfloat16"
    num_samples: int = 64
    seq_len: int = 128
    batch_size: int = 4
    reconstruct_samples: int | None = None  # None: the mode's default (options.reconstruct_windows)
    importance: str = "obs"  # obs (the global command's default), taylor, taylor_2nd (mix), or a forward-only method
    reconstruct: str = "block"  # the global command's default (block-local refinement after lsq)
    span: int = 1  # block: layers refined jointly (--reconstruct_span)
    last_loss: str = DEFAULT_LAST_LOSS  # block: kl (auto: with block) adds one micro-batch's logit work (--reconstruct_last_loss)


def _get(config, name: str):
    return config[name] if isinstance(config, dict) else getattr(config, name)


def weight_bytes(config, dtype: str) -> int:
    """Bytes of all parameters (embeddings counted twice unless tied)."""
    h, i, v, n = (_get(config, k) for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
    tied = config.get("tie_word_embeddings", False) if isinstance(config, dict) else getattr(config, "tie_word_embeddings", False)
    return (v * h * (1 if tied else 2) + n * _layer_params(config) + h) * _BYTES[dtype]


def _layer_params(config) -> int:
    h, i = _get(config, "hidden_size"), _get(config, "intermediate_size")
    q = _get(config, "num_attention_heads") * _head_dim(config)
    kv = _get(config, "num_key_value_heads") * _head_dim(config)
    return 2 * h * q + 2 * h * kv + 3 * h * i + 2 * h


def _head_dim(config) -> int:
    head_dim = config.get("head_dim") if isinstance(config, dict) else getattr(config, "head_dim", None)
    return head_dim or _get(config, "hidden_size") // _get(config, "num_attention_heads")


def phase_peaks(config, work: Workload) -> dict[str, int]:
    """Projected peak bytes held on the device in each phase of the pruning command (weights included).

    Terms (docs/MEMORY.md): Taylor keeps every layer's input hidden states (model dtype), the gradient
    of one micro-batch's logits, and float32 per-weight sums for one layer; lsq keeps two streams of
    hidden states (pruned and dense) and, for the MLP being solved, a float32 Gram, then its kept block in float64
    and that block's Cholesky factor (bounded by two float64 Grams);
    block adds a third stream (the refined layer's inputs) and its dense copy (which serves as the MLP's), then holds
    its targets in place of the post-attention stream it frees, and Adam's float32 state for that layer (with a span of
    layers refined jointly: dense copies, Adam state and backward activations for each of them; with the last layer's
    KL, the head's logit gradient of one micro-batch and one chunk of its float32 softmax work).
    """
    s = _BYTES[work.dtype]
    h, i, v, n = (_get(config, k) for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
    q = _get(config, "num_attention_heads") * _head_dim(config)
    weights = weight_bytes(config, work.dtype)
    tokens, batch_tokens = work.num_samples * work.seq_len, work.batch_size * work.seq_len
    acts = batch_tokens * (4 * i + 8 * h) * 4  # one micro-batch through one layer, upcasts included
    peaks = {"load": weights, "selection": weights, "save": weights}
    if work.importance in ("taylor", "taylor_2nd"):
        per_weight = (2 if work.importance == "taylor_2nd" else 1) * (_layer_params(config) - 2 * h) * GRAD_BYTES
        head = (n + 2) * tokens * h * s + batch_tokens * v * (s + 3 * 4)
        layer = (n + 1) * tokens * h * s + per_weight + 2 * i * h * 4 + acts
        peaks["importance"] = weights + max(head, layer)
    elif work.importance == "obs":  # Taylor's backward without per-weight sums, one layer's float64 Grams,
        head = (n + 2) * tokens * h * s + batch_tokens * v * (s + 3 * 4)  # then the greedy OBS of its MLP
        layer = (n + 1) * tokens * h * s + q * q * SOLVE_BYTES + obs_block_bytes(i, h) + acts
        peaks["importance"] = weights + max(head, layer)
    else:
        # one micro-batch's logits (removal), or one layer's inputs and outputs over all tokens (wanda, block influence)
        peaks["importance"] = weights + max(batch_tokens * v * (s + 4), 2 * tokens * h * s) + acts
    stream = reconstruct_windows(work.reconstruct, work.reconstruct_samples, work.num_samples) * work.seq_len * h * s
    if work.reconstruct in ("lsq", "block"):
        width = max(i, q)  # the solved block's input width; kept columns counted as all of them (upper bound)
        solve = max(width * width + width * h + width * h, 2 * width * width + width * h) * SOLVE_BYTES
        fit = 3 * i * h * s + solve + acts  # the MLP's dense copy, its statistics and solve, one micro-batch
        if work.reconstruct == "block":  # the layer's inputs, its dense copy in place of the MLP's, then Adam in float32
            refine = work.span * (_layer_params(config) * (s + 4 * GRAD_BYTES) + 2 * acts)  # weights, grads, 2 moments
            # an upper bound: counted with the default drift and whether or not the plan cuts the last layer
            if resolve_last_loss(work.last_loss, work.reconstruct, DEFAULT_DRIFT) == "kl":
                # the saved logit gradient (of the whole micro-batch: an upper bound under --reconstruct_kl_tokens),
                # one chunk's softmax work (at most 16 bytes per logit), a bfloat16 copy of a wider head
                refine += batch_tokens * v * s + KL_ROWS * v * 4 * 4 + (v * h * 2 if s > 2 else 0)
            fit = stream + max(fit - 3 * i * h * s + work.span * _layer_params(config) * s, refine)
        peaks["reconstruction"] = weights + 2 * stream + fit
    elif work.reconstruct == "bias":
        peaks["reconstruction"] = weights + 2 * stream + acts
    return peaks


def obs_block_bytes(width: int, out: int) -> int:
    """Greedy OBS of one block (importance/obs.py): its H^-1 in the Gram's own storage, W in float64 and its
    square, and two `width x chunk` slices of H^-1 per round (chunk = width / OBS_CHUNKS channels)."""
    return (width * width + 2 * width * out + 2 * width * max(1, width // OBS_CHUNKS)) * SOLVE_BYTES


# flag changes tried in order, each on top of the ones before, until the projection fits
_REMEDIES = (
    ("--dtype bfloat16", {"dtype": "bfloat16"}),
    ("--reconstruct_span 1", {"span": 1}),
    ("--reconstruct_last_loss mse", {"last_loss": "mse"}),
    ("--reconstruct lsq", {"reconstruct": "lsq"}),
    ("--reconstruct_samples 64", {"reconstruct_samples": 64}),
    ("--num_samples 32", {"num_samples": 32}),
    ("--gradient_batch_size 1", {"batch_size": 1}),
    ("--reconstruct bias", {"reconstruct": "bias"}),
    ("--importance_method wanda", {"importance": "wanda"}),
)


def remedies(config, work: Workload, available: int) -> list[str] | None:
    """The fewest flags (in a fixed order of cost to quality) whose projection fits in `available` bytes, or None."""
    chosen: list[tuple[str, dict]] = []
    current, peaks = work, phase_peaks(config, work)
    for flag, change in _REMEDIES:
        if max(peaks.values()) <= available:
            break
        candidate = replace(current, **change)
        after = phase_peaks(config, candidate)
        if after == peaks or any(after[phase] > peak for phase, peak in peaks.items()):
            continue  # already set, or it would not lower anything (bfloat16 over float16, 64 solve windows over 32)
        current, peaks = candidate, after
        chosen.append((flag, change))
    if max(peaks.values()) > available:
        return None
    for item in list(chosen):  # drop what a later flag made unneeded (lsq leaves the last layer's loss nothing to save)
        rest = [c for c in chosen if c is not item]
        if max(phase_peaks(config, _with(work, rest)).values()) <= available:
            chosen = rest
    return [flag for flag, _ in chosen]


def _with(work: Workload, changes: list[tuple[str, dict]]) -> Workload:
    for _, change in changes:
        work = replace(work, **change)
    return work


def checkpoint_dtype(config) -> str:
    """The dtype name the checkpoint is stored in (float32 when the config does not say)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in _BYTES else "float32"


def device_memory(device: str) -> int:
    """Total memory of a cuda device, or the memory available now for cpu."""
    import psutil
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return psutil.virtual_memory().available


def projection_report(config, work: Workload, device: str, available: int) -> tuple[str, bool]:
    """Lines for the user: projected peak per phase, what the device has, and which flags make it fit."""
    peaks = phase_peaks(config, work)
    peak = max(peaks.values())
    lines = [f"projected peak memory on {device} ({work.dtype}, {work.num_samples} x {work.seq_len} calibration tokens, "
             f"{work.importance} + {work.reconstruct}): {peak / 2**30:.1f} GiB; the device has {available / 2**30:.1f} GiB",
             "  " + ", ".join(f"{name} {value / 2**30:.1f}" for name, value in peaks.items()) + " (GiB)"]
    if peak <= available:
        return "\n".join(lines), True
    flags = remedies(config, work, available)
    tried = " ".join(flag for flag, _ in _REMEDIES)
    if flags is None and weight_bytes(config, "bfloat16") > available:
        lines.append(f"does not fit even with {tried}: the weights alone need more; use a device with more memory")
    elif flags is None:
        lines.append(f"does not fit even with {tried}: what {work.seq_len}-token windows hold (hidden states, logits) "
                     "needs more than the weights leave; use a shorter --seq_len")
    else:
        lines.append("does not fit; these flags bring it under the device's memory: " + " ".join(flags))
    return "\n".join(lines), False
