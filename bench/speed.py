"""Benchmark: dense SmolLM2-135M vs a ~20%-pruned copy, prefill / decode throughput, MACs and peak memory.

The pruned model drops one of the three GQA groups in every other layer and a uniform number of MLP
channels per layer (a multiple of 64, chosen to reach `--target` of the decoder-layer parameters), both by
L2 weight magnitude. Both models are saved to a temporary folder and profiled by
`llama_pruning.evaluation.speed.compare`, each in its own process.

Target: measured prefill speed-up (dense time / pruned time) >= 0.9 x MACs ratio (dense / pruned prefill
MACs per token: every linear plus the causal attention products, averaged over the prompt).

    python bench/speed.py                          # cpu, float32, 1 x 256 prompt tokens, 32 decode steps
    python bench/speed.py --device cuda --dtype bfloat16 --batch_size 32 --prefill_len 512
    python bench/speed.py --random_weights CONFIG_DIR   # speed only, weights drawn from SmolLM2's config
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llama_pruning.evaluation.speed import compare, format_report
from llama_pruning.models import load_model
from llama_pruning.models.arch import ModelSpec, decoder_layers, model_spec
from llama_pruning.models.export import save_pruned_model
from llama_pruning.models.loading import default_device
from llama_pruning.plan import PruningPlan
from llama_pruning.surgery import apply_plan


def magnitude_plan(model: torch.nn.Module, spec: ModelSpec, target: float, base_model: str) -> PruningPlan:
    """One GQA group less in every other layer, then equal MLP cuts (multiple of 64) up to `target` of layer params."""
    plan = PruningPlan.dense(spec, base_model)
    hd, kv, n_rep = spec.head_dim, spec.num_kv_heads, spec.n_rep
    attn_layers = range(1, spec.num_layers, 2)
    layer_params = spec.attn_block_params(kv) + spec.mlp_block_params(spec.intermediate_size) + 2 * spec.hidden_size
    mlp_budget = target * spec.num_layers * layer_params - len(attn_layers) * spec.attn_group_cost()
    cut = mlp_budget / (spec.num_layers * spec.mlp_channel_cost())
    kept_channels = int(round((spec.intermediate_size - cut) / 64)) * 64
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        if i in attn_layers:
            score = (attn.q_proj.weight.view(kv, n_rep * hd, -1).pow(2).sum((1, 2))
                     + attn.k_proj.weight.view(kv, hd, -1).pow(2).sum((1, 2))
                     + attn.v_proj.weight.view(kv, hd, -1).pow(2).sum((1, 2))
                     + attn.o_proj.weight.view(-1, kv, n_rep * hd).pow(2).sum((0, 2)))
            plan.attn_groups[i] = sorted(score.topk(kv - 1).indices.tolist())
        score = (mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1)
                 + mlp.down_proj.weight.pow(2).sum(0))
        plan.mlp_channels[i] = sorted(score.topk(kept_channels).indices.tolist())
    return plan


def prefill_macs(profile: dict, prefill_len: int) -> float:
    """Prefill MACs per token: linears plus attention over the causal average of (L + 1) / 2 keys."""
    attention_per_key = profile["attention_macs_per_token"] / profile["context_len"]
    return profile["linear_macs_per_token"] + attention_per_key * (prefill_len + 1) / 2


def markdown(report: dict, plan_report: dict, args: argparse.Namespace) -> str:
    """A results section: settings, the comparison table and the target check."""
    pruned, dense = report["pruned"], report["dense"]
    macs_ratio = prefill_macs(dense, args.prefill_len) / prefill_macs(pruned, args.prefill_len)
    prefill_speedup = pruned["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"]
    decode_speedup = pruned["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
    removed = 1 - plan_report["layer_params_after"] / plan_report["layer_params_before"]
    verdict = "met" if prefill_speedup >= 0.9 * macs_ratio else "NOT met"
    return "\n".join([
        f"### {args.device}, {args.dtype}, batch {args.batch_size} x {args.prefill_len} prompt tokens, "
        f"{args.decode_tokens} decode steps, best of {args.repeats} runs"
        + (" (random weights)" if args.random_weights else ""),
        "",
        f"- decoder-layer parameters removed: {removed:.1%} "
        f"({plan_report['params_before']:,} -> {plan_report['params_after']:,} parameters in total)",
        f"- prefill MACs ratio dense/pruned: {macs_ratio:.3f}",
        f"- prefill speed-up dense time/pruned time: {prefill_speedup:.3f} "
        f"(target >= 0.9 x {macs_ratio:.3f} = {0.9 * macs_ratio:.3f}: {verdict})",
        f"- decode speed-up: {decode_speedup:.3f}",
        "",
        "```",
        format_report(report),
        "```",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random_weights", default=None, metavar="CONFIG_DIR",
                        help="build the dense model from this config with random weights (speed only)")
    parser.add_argument("--target", type=float, default=0.2, help="fraction of decoder-layer parameters to remove")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--prefill_len", type=int, default=256)
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="append the markdown section to this file")
    parser.add_argument("--json", type=Path, default=None, help="write the raw comparison report here")
    args = parser.parse_args(argv)

    if args.random_weights:
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(args.random_weights)
        model, tokenizer = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), None
    else:
        model, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    spec = model_spec(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "dense")
        plan = magnitude_plan(model, spec, args.target, args.model)
        plan_report = plan.param_report(model)
        save_pruned_model(apply_plan(model, plan), tokenizer, Path(tmp) / "pruned", plan)
        del model
        report = compare(str(Path(tmp) / "pruned"), base_model=str(Path(tmp) / "dense"), device=args.device,
                         dtype=args.dtype, batch_size=args.batch_size, prefill_len=args.prefill_len,
                         decode_tokens=args.decode_tokens, repeats=args.repeats)
    section = markdown(report, plan_report, args)
    print(section)
    if args.out:
        with args.out.open("a") as handle:
            handle.write(section + "\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
