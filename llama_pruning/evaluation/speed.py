"""Size, compute, speed and memory of a model, and of a pruned model against its dense base.

- parameters (tied tensors once) and per-layer shapes read from the modules themselves (0 = block removed);
- MACs per token: multiply-accumulates of every nn.Linear, lm_head included; the attention products
  (Q·Kᵀ scores and the weighted sum of V) are reported apart, per token attending to `context_len` keys;
- prefill tokens/s (one forward over `[batch_size, prefill_len]` random tokens, full logits) and decode
  tokens/s (`decode_tokens` greedy steps on the KV cache after that prefill); fastest of `repeats` runs,
  after one warm-up run;
- peak memory: process peak RSS (VmHWM on Linux) on cpu, `torch.cuda.max_memory_allocated` on cuda.

`compare` profiles each model in its own subprocess (`python -m llama_pruning.evaluation.speed`), so the
peak memory of one is not inflated by the other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from llama_pruning.models.arch import count_params, decoder_layers
from llama_pruning.models.loading import default_device, load_model
from llama_pruning.plan import PLAN_FILENAME, PruningPlan

# quantities compared as pruned / dense
RATIO_KEYS = ("params", "linear_macs_per_token", "attention_macs_per_token", "prefill_tokens_per_s",
              "decode_tokens_per_s", "weights_bytes", "peak_memory_bytes")


class ProfileError(ValueError):
    """A model or setting that cannot be profiled (one line that says why)."""


def layer_shapes(model: nn.Module) -> list[dict]:
    """Per decoder layer: query heads, KV heads and MLP channels actually present (0 where a block is removed)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shapes = []
    for index, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        q_proj, k_proj = getattr(attn, "q_proj", None), getattr(attn, "k_proj", None)
        gate = getattr(mlp, "gate_proj", None)
        shapes.append({
            "layer": index,
            "q_heads": q_proj.out_features // head_dim if q_proj is not None else 0,
            "kv_heads": k_proj.out_features // head_dim if k_proj is not None else 0,
            "intermediate": gate.out_features if gate is not None else 0,
        })
    return shapes


def linear_macs_per_token(model: nn.Module) -> int:
    """Multiply-accumulates one token costs in every nn.Linear of the model (lm_head included)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def attention_macs_per_token(model: nn.Module, context_len: int) -> int:
    """MACs of the Q·Kᵀ and attention·V products for one token attending to `context_len` positions."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return sum(2 * shape["q_heads"] * head_dim * context_len for shape in layer_shapes(model))


def weights_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (shared tensors once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def model_profile(model: nn.Module, context_len: int) -> dict:
    """Static profile: parameters, per-layer shapes, MACs per token, weight bytes."""
    return {
        "params": count_params(model),
        "layers": layer_shapes(model),
        "linear_macs_per_token": linear_macs_per_token(model),
        "attention_macs_per_token": attention_macs_per_token(model, context_len),
        "context_len": context_len,
        "weights_bytes": weights_bytes(model),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(
    model: nn.Module,
    batch_size: int = 1,
    prefill_len: int = 128,
    decode_tokens: int = 32,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Prefill and decode throughput (tokens/s) of the fastest of `repeats` timed runs, after one warm-up run.

    The fastest run is the one least disturbed by other load on the machine (timeit's reasoning).
    """
    if min(batch_size, prefill_len, decode_tokens, repeats) < 1:
        raise ProfileError("batch_size, prefill_len, decode_tokens and repeats must all be at least 1")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (batch_size, prefill_len), generator=generator).to(device)
    prefill_times, decode_times = [], []
    model.eval()
    with torch.inference_mode():
        for run in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            _sync(device)
            middle = time.perf_counter()
            for _ in range(decode_tokens):
                step = out.logits[:, -1:].argmax(-1)
                out = model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
            _sync(device)
            end = time.perf_counter()
            if run:  # run 0 warms up kernels and allocators
                prefill_times.append(middle - start)
                decode_times.append(end - middle)
    prefill_s, decode_s = min(prefill_times), min(decode_times)
    return {
        "batch_size": batch_size,
        "prefill_len": prefill_len,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_tokens_per_s": batch_size * prefill_len / prefill_s,
        "decode_tokens_per_s": batch_size * decode_tokens / decode_s,
    }


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process image (None where the platform does not report it).

    Linux: VmHWM of /proc/self/status, which starts afresh at exec; `ru_maxrss` would instead carry the
    parent's peak into a child started by fork + exec. Elsewhere: `ru_maxrss`.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def load_for_profile(source: str, device: str, dtype: str, trust_remote_code: bool = False) -> nn.Module:
    """A model from a folder / hub id or the `smollm2-135m` alias; its own code runs only with `trust_remote_code`."""
    try:
        return load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code, tokenizer=False)[0]
    except OSError as err:
        raise ProfileError(f"cannot load model {source!r}: {str(err).splitlines()[0]}") from None


def profile(
    source: str,
    device: str | None = None,
    dtype: str = "float32",
    batch_size: int = 1,
    prefill_len: int = 128,
    decode_tokens: int = 32,
    context_len: int | None = None,
    repeats: int = 3,
    trust_remote_code: bool = False,
) -> dict:
    """Load `source` in this process and return its static profile, speed and peak memory."""
    device = device or default_device()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = peak_rss_bytes()
    model = load_for_profile(source, device, dtype, trust_remote_code)
    result = {"source": source, "device": device, "dtype": dtype}
    result.update(model_profile(model, context_len or prefill_len))
    result.update(measure_speed(model, batch_size, prefill_len, decode_tokens, repeats))
    if device.startswith("cuda"):
        result["peak_memory_kind"] = "cuda max_memory_allocated"
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        result["peak_memory_kind"] = "process peak RSS"
        result["peak_memory_bytes"] = peak_rss_bytes()
        result["rss_before_load_bytes"] = rss_before
    return result


def profile_in_subprocess(source: str, **settings) -> dict:
    """`profile(source, **settings)` run in a fresh Python process, so its peak memory is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json"
        cmd = [sys.executable, "-m", "llama_pruning.evaluation.speed", json.dumps({"source": source, **settings}),
               str(out)]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not out.is_file():
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            raise ProfileError(f"profiling {source} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
        return json.loads(out.read_text())


def base_model_of(model_dir: str | Path) -> str | None:
    """The dense base recorded in a pruned folder's pruning_plan.json (None when there is no plan)."""
    plan_file = Path(model_dir) / PLAN_FILENAME
    return PruningPlan.load(plan_file).base_model if plan_file.is_file() else None


def compare(
    model_dir: str,
    base_model: str | None = None,
    isolate: bool = True,
    device: str | None = None,
    **settings,
) -> dict:
    """Profile a pruned model and its dense base (each in its own process unless `isolate` is False).

    `base_model` defaults to the plan's `base_model`; None with no plan profiles the model alone.
    `settings` are `profile`'s keyword arguments. Ratios are pruned / dense.
    """
    device = device or default_device()
    base_model = base_model or base_model_of(model_dir)
    run = profile_in_subprocess if isolate else profile
    report = {"settings": {"device": device, "isolated": isolate, **settings},
              "pruned": run(model_dir, device=device, **settings)}
    if base_model is not None:
        report["dense"] = run(base_model, device=device, **settings)
        report["ratios"] = {
            key: report["pruned"][key] / report["dense"][key]
            for key in RATIO_KEYS
            if report["pruned"].get(key) is not None and report["dense"].get(key)
        }
    return report


def format_report(report: dict) -> str:
    """A short human-readable table of a `compare` report."""
    columns = [name for name in ("pruned", "dense") if name in report]
    rows = [
        ("params", "params", 1, "{:,.0f}"),
        ("linear MACs/token (M)", "linear_macs_per_token", 1e6, "{:,.2f}"),
        (f"attention MACs/token @{report['pruned']['context_len']} (M)", "attention_macs_per_token", 1e6, "{:,.2f}"),
        ("prefill tokens/s", "prefill_tokens_per_s", 1, "{:,.1f}"),
        ("decode tokens/s", "decode_tokens_per_s", 1, "{:,.1f}"),
        ("weights (MiB)", "weights_bytes", 2**20, "{:,.1f}"),
        (f"peak memory (MiB, {report['pruned']['peak_memory_kind']})", "peak_memory_bytes", 2**20, "{:,.1f}"),
    ]
    names = columns + (["pruned/dense"] if "ratios" in report else [])
    cells = {}
    for label, key, scale, fmt in rows:
        values = [report[name].get(key) for name in columns]
        line = ["n/a" if value is None else fmt.format(value / scale) for value in values]
        if "ratios" in report:
            ratio = report["ratios"].get(key)
            line.append("n/a" if ratio is None else f"{ratio:.3f}")
        cells[label] = line
    run = report["pruned"]
    text = [f"measured on {run['device']} in {run['dtype']} with batch size {run['batch_size']}, prompts of "
            f"{run['prefill_len']} tokens, {run['decode_tokens']} greedy decode steps; fastest of {run['repeats']} "
            "timed runs after a warm-up",
            pd.DataFrame.from_dict(cells, orient="index", columns=names).to_string()]
    for name in columns:
        shapes = report[name]["layers"]
        text.append(f"{name} ({len(shapes)} layers) kv heads:     {' '.join(str(s['kv_heads']) for s in shapes)}")
        text.append(f"{name} ({len(shapes)} layers) intermediate: {' '.join(str(s['intermediate']) for s in shapes)}")
    return "\n".join(text)


def _worker(argv: list[str] | None = None) -> None:
    """Subprocess entry: `python -m llama_pruning.evaluation.speed '<profile kwargs as JSON>' OUT.json`."""
    parser = argparse.ArgumentParser(description=_worker.__doc__)
    parser.add_argument("settings", type=json.loads)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    args.out.write_text(json.dumps(profile(**args.settings)))


if __name__ == "__main__":
    _worker()
