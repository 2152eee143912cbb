"""Argument pieces and the pipeline shared by `global` and `layer` pruning (one implementation, two selectors).

load -> calibration -> importance (cached) -> selection -> plan -> surgery (+ reconstruction) -> recovery
-> evaluation -> save, all logged into prune_log/<name>/<YYYYMMDD_HHMMSS>/training.log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from llama_pruning.options import (
    BLOCK_AUTOCAST,
    DEFAULT_BLOCK_EPOCHS,
    DEFAULT_BLOCK_LR,
    DEFAULT_BLOCK_SAMPLES,
    DEFAULT_BLOCK_SPAN,
    DEFAULT_DRIFT,
    DEFAULT_KL_TOKENS,
    DEFAULT_LAST_LOSS,
    DEFAULT_MODEL,
    DEFAULT_OBS_FISHER,
    DEFAULT_OUTTYPE,
    DEFAULT_RIDGE,
    DEFAULT_SAMPLES,
    DEFAULT_TAYLOR_2ND_VARIANT,
    DEVICE_MAPS,
    GRADIENT_METHODS,
    LAST_LOSSES,
    METHODS,
    MODES,
    OBS_FISHERS,
    OUTTYPES,
    TAYLOR_2ND_VARIANTS,
    reconstruct_windows,
    resolve_ignore,
    resolve_last_loss,
)

if TYPE_CHECKING:  # the heavy libraries are imported where they are used, so `--help` answers at once
    import pandas as pd
    import torch
    from torch import nn

    from llama_pruning.plan import PruningPlan
    from llama_pruning.reporting import RunDir

    # (plan, group table or None, layer scores or None) from (model, args, samples, importance table)
    Selector = Callable[[nn.Module, argparse.Namespace, torch.Tensor, pd.DataFrame], tuple]
    # a command's own checks of its flags against the model's layer count, run before anything is loaded
    Check = Callable[[argparse.Namespace, int], None]

RATIO_TOLERANCE = 0.01  # a plan further than this from --pruning_ratio (of all parameters) is logged as a warning
UNIT_TABLE = "unit_table.csv"  # every unit of the run: importance, cost, score, pruned (global and layer-wise runs)


def ratio(text: str) -> float:
    """argparse type for a pruning ratio in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        percent = f" (a fraction: {value:g} % is {value / 100:g})" if 1 < value < 100 else ""
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}{percent}")
    return value


def fraction(text: str) -> float:
    """argparse type for a weight in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def positive_fraction(text: str) -> float:
    """argparse type for a fraction in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def non_negative(text: str) -> float:
    """argparse type for a finite float >= 0."""
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be >= 0 and finite, got {text}")
    return value


def non_negative_or_auto(text: str) -> float | str:
    """argparse type for `auto` (the method decides) or a finite float >= 0."""
    return "auto" if text == "auto" else non_negative(text)


def positive_float(text: str) -> float:
    """argparse type for a finite float > 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type for an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_empty(text: str) -> str:
    """argparse type for a text that must not be empty (or only spaces)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def max_memory(text: str) -> dict:
    """argparse type for --max_memory (llama_pruning.placement.parse_max_memory)."""
    from llama_pruning.placement import parse_max_memory

    try:
        return parse_max_memory(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# --fast: the documented cheaper settings (fewer calibration windows for importance and for the solve)
FAST_SETTINGS = {"num_samples": 8, "reconstruct_samples": 8, "importance_method": "taylor", "reconstruct": "lsq"}


class FastAction(argparse.Action):
    """`--fast` sets FAST_SETTINGS as if those flags were written in its place (flags after it still override)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, True)
        for name, value in FAST_SETTINGS.items():
            setattr(namespace, name, value)


def add_common_arguments(parser: argparse.ArgumentParser, default_name: str, default_importance: str,
                         default_reconstruct: str = "lsq") -> None:
    """Flags shared by both pruning commands (selection-specific flags are added by each command)."""
    from llama_pruning.recovery import add_arguments as add_recovery_arguments

    p = parser.add_argument_group("model and run")
    p.add_argument("--base_model", default=DEFAULT_MODEL,
                   help=f"HF id, local folder, or {DEFAULT_MODEL} (the embedded default)")
    p.add_argument("--save_ckpt_log_name", default=default_name, help="run folder name under --output_root")
    p.add_argument("--output_root", default="prune_log", help="folder that holds the run folders")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder, only once this run has finished")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the model is loaded and pruned in (auto: the checkpoint's own on cuda, float32 on cpu)")
    p.add_argument("--device_map", choices=DEVICE_MAPS, default=None,
                   help="for models too big for one device: spread the layers over the GPUs, then CPU memory, then "
                        "--offload_dir (accelerate); each stage loads one layer at a time (docs/MEMORY.md)")
    p.add_argument("--max_memory", type=max_memory, default=None,
                   help="with --device_map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB (the rest goes to disk)")
    p.add_argument("--offload_dir", default=None,
                   help="with --device_map: folder for the weights offloaded to disk (default: a temporary folder)")
    p.add_argument("--dry_run", action="store_true",
                   help="read only the model's config, print the projected peak memory per phase and the flags that "
                        "make it fit the device, then stop (exit 2 when it does not fit)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration windows, random scores and training")
    p.add_argument("--plan", type=Path, default=None, help="replay a saved pruning_plan.json (no importance pass)")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow the base model's own Python code to run (never needed for folders llama-pruning wrote)")
    p.add_argument("--fast", nargs=0, action=FastAction, default=False,
                   help="cheaper settings for a first try, lower quality (bench/results_fast.md): the same as "
                        + " ".join(f"--{name} {value}" for name, value in FAST_SETTINGS.items()))
    p = parser.add_argument_group("importance")
    p.add_argument("--pruning_ratio", type=ratio, default=0.2,
                   help="fraction of the model's TOTAL parameters (embeddings included) to remove")
    p.add_argument("--importance_method", choices=METHODS, default=default_importance, help="unit importance metric")
    p.add_argument("--taylor_2nd_variant", choices=TAYLOR_2ND_VARIANTS, default=DEFAULT_TAYLOR_2ND_VARIANT,
                   help="form of the second-order Taylor score (see docs/IMPORTANCE.md)")
    p.add_argument("--importance_ignore", type=non_empty, default=None, metavar="TEXT",
                   help="leave the calibration tokens overlapping TEXT out of the importance loss (and obs's Gram "
                        "matrices); they stay in as context (taylor, taylor_2nd, obs; e.g. '<unk>')")
    p.add_argument("--obs_fisher", choices=OBS_FISHERS, default=DEFAULT_OBS_FISHER,
                   help="obs: weigh each block's output error by the Fisher of the model's own predictions (sampled, "
                        "seeded by --seed) or of the text's next tokens (labels); see docs/IMPORTANCE.md")
    p.add_argument("--dataset", default="wikitext2",
                   help="calibration data: wikitext2, ptb, c4, or a local .txt/.jsonl file")
    p.add_argument("--num_samples", type=positive_int, default=64, help="calibration windows")
    p.add_argument("--seq_len", type=positive_int, default=128, help="tokens per calibration window")
    p.add_argument("--gradient_batch_size", type=positive_int, default=4,
                   help="micro-batch of the calibration passes (results do not depend on it, except through "
                        "--reconstruct block's steps: one per micro-batch)")
    p.add_argument("--importance_cache", default=None,
                   help="importance cache folder (default: <output_root>/.importance_cache; 'none' disables)")
    p = parser.add_argument_group("cutting")
    p.add_argument("--round_to", type=positive_int, default=None,
                   help="keep each MLP width a multiple of N (8/64 help GPUs; default 1, or the GGUF block with --save_gguf: "
                        "32, 256 for k-quants)")
    p.add_argument("--reconstruct", choices=MODES, default=default_reconstruct,
                   help="retraining-free compensation of the kept weights (see docs/RECONSTRUCTION.md)")
    p.add_argument("--reconstruct_ridge", type=non_negative, default=DEFAULT_RIDGE,
                   help="lsq's pull toward the original weights, in calibration tokens (relative ridge = this / solve tokens)")
    p.add_argument("--reconstruct_drift", type=fraction, default=DEFAULT_DRIFT,
                   help="fraction (0-1) of the drift from the dense model's stream each block is also fitted to cancel")
    p.add_argument("--reconstruct_inputs", type=fraction, default=0.0,
                   help="with lsq and drift: also re-fit q/k/v and gate/up toward their dense-stream inputs (0 off, 1 full)")
    p.add_argument("--reconstruct_epochs", type=positive_float, default=DEFAULT_BLOCK_EPOCHS,
                   help="with --reconstruct block: Adam passes over the solve's batches per cut layer")
    p.add_argument("--reconstruct_lr", type=positive_float, default=DEFAULT_BLOCK_LR,
                   help="with --reconstruct block: peak Adam learning rate of the block-local distillation")
    p.add_argument("--reconstruct_span", type=positive_int, default=DEFAULT_BLOCK_SPAN, metavar="K",
                   help="with --reconstruct block: refine K consecutive cut layers at a time, Adam on all their weights "
                        "toward the dense output of the last (1: each layer alone; the steps stay the same)")
    p.add_argument("--reconstruct_autocast", choices=BLOCK_AUTOCAST, default="auto",
                   help="with --reconstruct block: run the Adam steps' and the fit passes' matmuls in bfloat16 "
                        "(float32 weights, loss and statistics); "
                        "auto: where the device multiplies bfloat16 natively (CUDA with bf16, CPUs with AMX/AVX512-BF16)")
    p.add_argument("--reconstruct_last_loss", choices=LAST_LOSSES, default=DEFAULT_LAST_LOSS,
                   help="with --reconstruct block: the last layer's loss, the squared error toward its hidden-state target "
                        "(mse) or the KL from the dense model's next-token distribution through the frozen final norm "
                        "and head (kl; needs --reconstruct_drift > 0); auto: kl where it applies")
    p.add_argument("--reconstruct_kl_tokens", type=positive_fraction, default=DEFAULT_KL_TOKENS, metavar="F",
                   help="with the last layer's kl: each of its steps reads the head on a random F of the tokens, and it "
                        "takes 1/F times the steps, so the head's compute stays the same (1: every token, the steps of "
                        "the other layers)")
    p.add_argument("--reconstruct_samples", type=positive_int, default=None,
                   help=f"calibration windows of the reconstruction (default: the larger of {DEFAULT_SAMPLES}, "
                        f"{DEFAULT_BLOCK_SAMPLES} with --reconstruct block, and --num_samples)")
    p.add_argument("--reconstruct_ignore", type=non_empty, default="auto", metavar="TEXT",
                   help="leave the calibration tokens overlapping TEXT out of the reconstruction's statistics and loss; "
                        "they stay in as context (auto: '<unk>', the placeholder of wikitext-2's tokenized release, "
                        "for block, nothing for the other modes; none: nothing)")
    p = parser.add_argument_group("evaluation and output")
    p.add_argument("--test_before_prune", action="store_true", help="wikitext-2 perplexity of the dense model")
    p.add_argument("--test_after_prune", action="store_true", help="wikitext-2 perplexity of the pruned model")
    p.add_argument("--eval_max_windows", type=non_negative_int, default=0,
                   help="evaluate only the first N windows of 128 tokens (0 = the whole split)")
    p.add_argument("--save_model", action="store_true", help="save the pruned model (HF format) in the run folder")
    p.add_argument("--save_dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the saved weights (default: as pruned)")
    p.add_argument("--save_gguf", action="store_true",
                   help="also write the pruned model as model-<outtype>.gguf for llama.cpp / Ollama in the run folder")
    p.add_argument("--outtype", choices=OUTTYPES, default=DEFAULT_OUTTYPE, help="tensor type of the --save_gguf file")
    add_recovery_arguments(parser)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _ppl(model: nn.Module, tokenizer, args: argparse.Namespace) -> float:
    from llama_pruning.evaluation import PPLMetric

    result = PPLMetric(model, tokenizer, datasets=["wikitext2"], seq_len=128, device=args.device,
                       max_windows=args.eval_max_windows or None)
    return float(next(iter(result.values())))


def importance_label(args: argparse.Namespace) -> str:
    """The importance a run used, in words: layer-wise runs rank units and layers by different measures."""
    layer_method = getattr(args, "layer_importance_method", None)
    if layer_method is None:
        return args.importance_method
    return f"{args.importance_method} (units), {layer_method} (layers)"


def importance_cache_dir(args: argparse.Namespace) -> str:
    """--importance_cache, by default `.importance_cache` under --output_root (`none`: no cache)."""
    return args.importance_cache or str(Path(args.output_root) / ".importance_cache")


def importance_table(model: nn.Module, args: argparse.Namespace, samples: torch.Tensor, ignore: torch.Tensor | None,
                     cached: bool = True) -> pd.DataFrame:
    """Unit importance for the run's method, from the cache when this (model, data, method, left-out tokens) was seen
    (`cached` False: a model the cache key cannot tell from the loaded one, e.g. an iterative step's)."""
    from llama_pruning.importance import cached_importance, compute_importance

    kwargs = dict(gradient_batch_size=args.gradient_batch_size, device=args.device, seed=args.seed,
                  taylor_2nd_variant=args.taylor_2nd_variant, ignore=ignore, obs_fisher=args.obs_fisher)
    cache = importance_cache_dir(args)
    if not cached or cache.lower() == "none":
        return compute_importance(model, samples, args.importance_method, **kwargs)
    key = {"dataset": args.dataset, "seed": args.seed}
    return cached_importance(model, samples, args.importance_method, cache, key_fields=key, **kwargs)


def _check_text(dataset: str, split: str, why: str) -> None:
    """A local text file must exist and be UTF-8; an evaluation corpus must be reachable (read now, not after pruning)."""
    from llama_pruning.data import DataError, load_text
    from llama_pruning.data.sources import DATASETS, is_local_path

    try:
        if split == "evaluation" or is_local_path(dataset) or dataset not in DATASETS:
            load_text(dataset, split)
    except UnicodeDecodeError as err:
        raise DataError(f"{dataset} is not UTF-8 text (byte {err.start}): give a .txt or .jsonl file") from None
    except DataError as err:
        if split != "evaluation":
            raise
        raise DataError(f"{why} measures perplexity on the wikitext-2 test split, which cannot be read: reinstall "
                        "llama-pruning (it ships the split), or set LLAMA_PRUNING_DATA to a folder holding "
                        "wikitext2/wiki.test.raw (or make the hub reachable), "
                        f"or drop {why} ({str(err).split(':')[0]})") from None
    except IsADirectoryError:
        raise DataError(f"{dataset} is a folder, not a text file") from None


def check_inputs(args: argparse.Namespace, check: Check | None = None) -> PruningPlan | None:
    """Every flag and input file, checked after reading the model's config and before any weights or data are
    loaded, so a long run never fails at its end on bad input; returns the replayed plan, if any."""
    from llama_pruning.models.arch import config_geometry
    from llama_pruning.models.loading import check_device, check_model, context_limit
    from llama_pruning.plan import PlanError, PruningPlan
    from llama_pruning.recovery.config import RecoveryConfig
    from llama_pruning.reporting import RunDir

    RunDir.check(args.output_root, args.save_ckpt_log_name, args.overwrite)
    cache = importance_cache_dir(args)
    if cache.lower() != "none" and Path(cache).exists() and not Path(cache).is_dir():
        raise ValueError(f"the importance cache {cache} is a file, not a folder (--importance_cache names another "
                         "folder, or `none` for no cache)")
    check_device(args.device)
    kl_applies = resolve_last_loss("auto", args.reconstruct, args.reconstruct_drift) == "kl"
    if args.reconstruct_last_loss == "kl" and not kl_applies:
        raise ValueError("--reconstruct_last_loss kl compares the last layer with the dense model's stream: it needs "
                         "--reconstruct block and --reconstruct_drift > 0")
    if args.reconstruct_kl_tokens != DEFAULT_KL_TOKENS and (
            resolve_last_loss(args.reconstruct_last_loss, args.reconstruct, args.reconstruct_drift) != "kl"):
        raise ValueError(f"--reconstruct_kl_tokens {args.reconstruct_kl_tokens:g} shapes the last layer's kl steps only, "
                         "which need --reconstruct block and --reconstruct_drift > 0 and --reconstruct_last_loss "
                         "auto / kl: drop it")
    if args.finetune or args.distill:
        RecoveryConfig.from_args(args)  # raises RecoveryError for settings no training can use
    plan = PruningPlan.load(args.plan) if args.plan is not None else None
    for flag, (methods, default) in METHOD_FLAGS.items():
        if plan is None and getattr(args, flag) != default and args.importance_method not in methods:
            raise ValueError(f"--{flag} {getattr(args, flag)} shapes the scores of {', '.join(methods)} only, so with "
                             f"--importance_method {args.importance_method} it would not be used: drop it, or use "
                             f"--importance_method {' / '.join(methods)}")
    config = check_model(args.base_model, args.trust_remote_code)
    context = context_limit(config)
    calibrates = plan is None or args.reconstruct != "none"
    if calibrates and context and args.seq_len > context:
        raise ValueError(f"--seq_len {args.seq_len} is longer than the model's context ({context} tokens, "
                         "max_position_embeddings)")
    geometry = config_geometry(config)
    if plan is not None:
        diff = {k: (plan.spec[k], v) for k, v in geometry.items() if plan.spec[k] != v}
        if diff:
            raise PlanError(f"{args.plan} was made for another model ({plan.base_model}); "
                            f"mismatched (plan, model): {diff}")
        if getattr(args, "iterative_steps", 1) > 1:
            raise PlanError("--iterative_steps chooses the units step by step; a replayed --plan has them already")
        if args.save_gguf:
            from llama_pruning.models.gguf_export import check_plan_fallbacks

            check_plan_fallbacks(plan, args.outtype, f"--plan {args.plan}")
    else:
        if check is not None:
            check(args, geometry["num_layers"])
        if args.save_gguf and _cuts_attention(args):
            from llama_pruning.models.gguf_export import check_group_fallbacks

            check_group_fallbacks(geometry, args.outtype)
    if plan is None or args.reconstruct != "none":
        _check_text(args.dataset, "calibration", "--dataset")
    for flag in ("test_before_prune", "test_after_prune"):
        if getattr(args, flag):
            _check_text("wikitext2", "evaluation", f"--{flag}")
            break
    return plan


def _cuts_attention(args: argparse.Namespace) -> bool:
    """Whether the command may cut attention groups: any width pruning may, except layer-wise pruning whose A:M has A = 0."""
    from llama_pruning.selection import parse_distribution

    distribution = getattr(args, "pruning_distribution", None)
    return args.pruning_ratio > 0 and (distribution is None or parse_distribution(distribution)[0] > 0)


# flags that shape some importance methods' scores, with their defaults: refused, when set, with another method (they
# would not be used); --importance_ignore leaves tokens out of a loss, so it shapes the gradient methods
METHOD_FLAGS = {"importance_ignore": (GRADIENT_METHODS, None),
                "taylor_2nd_variant": (("taylor_2nd",), DEFAULT_TAYLOR_2ND_VARIANT),
                "obs_fisher": (("obs",), DEFAULT_OBS_FISHER)}

# flags that only choose units: a replayed --plan has its units already (iterative_steps is refused on its own)
SELECTION_FLAGS = ("pruning_ratio", "importance_method", "taylor_2nd_variant", "importance_ignore", "obs_fisher",
                   "remove_empty_layers", "layer_start", "layer_end", "normalization", "cut_penalty", "round_to",
                   "pruning_distribution", "pruning_strategy", "layer_importance_method", "freeze_top_n_layers",
                   "remove_layers")


def check_replay_flags(args: argparse.Namespace) -> None:
    """With --plan, refuse the command's selection flags set away from their default (or --fast's): they would not be
    used. Called before `prepare_gguf` gives --round_to its default."""
    from llama_pruning.plan import PlanError

    if args.plan is None:
        return
    parser = argparse.ArgumentParser(add_help=False)
    sys.modules[args.func.__module__].add_arguments(parser)
    defaults = {name: parser.get_default(name) for name in SELECTION_FLAGS}
    if args.fast:
        defaults.update((name, value) for name, value in FAST_SETTINGS.items() if name in defaults)
    unused = [f"--{name} {getattr(args, name)}" for name in SELECTION_FLAGS
              if hasattr(args, name) and getattr(args, name) != defaults[name]]
    if unused:
        raise PlanError(f"--plan replays the units {args.plan} holds, so {', '.join(unused)} would not be used: "
                        "drop them, or drop --plan to choose new units")


def prepare_gguf(args: argparse.Namespace) -> None:
    """Check --outtype before any work and default --round_to to its quant block (32; 256 for k-quants) with --save_gguf."""
    from llama_pruning.models.gguf_export import check_outtype, quant_block

    if not args.save_gguf:
        if args.outtype != DEFAULT_OUTTYPE:
            raise ValueError(f"--outtype {args.outtype} is the type of the --save_gguf file: add --save_gguf, or drop "
                             "--outtype (export a saved run later with `llama-pruning export-gguf`)")
        args.round_to = args.round_to or 1
        return
    check_outtype(args.outtype)
    block = quant_block(args.outtype)
    args.round_to = args.round_to or max(block, 32)
    if args.round_to % block:
        raise ValueError(f"--outtype {args.outtype} stores weights in blocks of {block}: use a --round_to that is a multiple "
                         f"of {block} (got {args.round_to})")


def memory_projection(args: argparse.Namespace) -> tuple[str, bool]:
    """The memory model's projection for this command's model, dtype, device and flags (llama_pruning/memory.py)."""
    from llama_pruning import memory
    from llama_pruning.models.loading import check_model, pick_dtype

    config = check_model(args.base_model, args.trust_remote_code)
    dtype = pick_dtype(args.dtype, args.device)
    work = memory.Workload(
        dtype=memory.checkpoint_dtype(config) if dtype == "auto" else dtype, num_samples=args.num_samples,
        seq_len=args.seq_len, batch_size=args.gradient_batch_size,
        reconstruct_samples=args.reconstruct_samples,
        importance="replayed plan" if args.plan else args.importance_method, reconstruct=args.reconstruct,
        span=args.reconstruct_span,
        last_loss=resolve_last_loss(args.reconstruct_last_loss, args.reconstruct, args.reconstruct_drift))
    return memory.projection_report(config, work, args.device, memory.device_memory(args.device))


def run_pruning(args: argparse.Namespace, select: Selector, title: str, check: Check | None = None) -> int:
    """The whole pipeline of a pruning command; returns the exit code."""
    from llama_pruning.data import get_calibration_samples
    from llama_pruning.models.arch import count_params, model_spec
    from llama_pruning.models.loading import default_device, load_model
    from llama_pruning.placement import Placement, device_map_summary
    from llama_pruning.recovery import recover
    from llama_pruning.reporting import RunDir

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # every rank would prune and write the same run folder
        raise ValueError(f"pruning runs in one process, not under a distributed launcher (WORLD_SIZE={world}); prune with "
                         "plain python, then recover on several GPUs with `torchrun ... -m llama_pruning.recovery` "
                         "(docs/RECOVERY.md)")
    place = Placement.from_args(args)
    args.device = args.device or default_device()
    check_replay_flags(args)
    prepare_gguf(args)
    replayed = check_inputs(args, check)  # a dry run answers for the real command, so bad input fails it too
    if args.dry_run:
        text, fits = memory_projection(args)
        print(text)
        if place is not None:  # the projection is for the whole model on one device, which the map does not need
            print("with --device_map the weights are spread over the map's devices: docs/MEMORY.md says what each "
                  "stage holds on the execution device")
            return 0
        return 0 if fits else 2
    seed_everything(args.seed)
    run = RunDir(args.output_root, args.save_ckpt_log_name, overwrite=args.overwrite)
    log = run.log
    args.run_path = run.path
    try:
        log(f"{title}: run folder {run.final} (written in {run.path.name} until it is complete)")
        started = time.perf_counter()
        log(memory_projection(args)[0])
        model, tokenizer = load_model(args.base_model, dtype=args.dtype, device=args.device,
                                      trust_remote_code=args.trust_remote_code, placement=place)
        if place is not None:
            log(f"device map ({args.device_map}): {device_map_summary(model)}")
        spec = model_spec(model)
        log(f"loaded {args.base_model}: {spec.model_type}, {spec.num_layers} layers, {spec.num_heads} query / "
            f"{spec.num_kv_heads} KV heads of {spec.head_dim}, MLP {spec.intermediate_size}, "
            f"{count_params(model):,} parameters")
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        run.check_space((weight_bytes if args.save_model else 0) + 64 * 2**20)
        metrics: dict = {}
        if args.test_before_prune:
            metrics["wikitext2 PPL before pruning"] = _ppl(model, tokenizer, args)
            log(f"PPL before pruning: {metrics['wikitext2 PPL before pruning']:.2f}")
        samples = (get_calibration_samples(tokenizer, args.dataset, args.num_samples, args.seq_len, args.seed)
                   if args.plan is None else None)
        groups = layer_scores = None
        steps = getattr(args, "iterative_steps", 1)  # global command only
        if replayed is not None:
            plan = replayed
            log(f"replaying plan {args.plan} (made for {plan.base_model})")
            # the flags of selection were not used: record what made the plan (None when it does not say)
            args.importance_method = plan.metadata.get("importance_method")
            args.pruning_ratio = plan.metadata.get("pruning_ratio")
            plan.metadata["replayed_from"] = str(args.plan)
        else:
            log(f"importance: {importance_label(args)} on {args.num_samples} x {args.seq_len} tokens of {args.dataset}")
            ignore = left_out(tokenizer, samples, args.importance_ignore, "the importance loss", log)
            table = importance_table(model, args, samples, ignore)
            if steps == 1:
                plan, groups, layer_scores = select(model, args, samples, table)
            else:
                from llama_pruning.iterative import iterative_plan

                plan, groups, layer_scores = iterative_plan(
                    model, steps, lambda k: table if k == 1 else importance_table(model, args, samples, ignore, cached=False),
                    lambda t, fraction, previous: select(model, args, samples, t, fraction, previous),
                    lambda partial: cut(model, partial, args, tokenizer, samples, log), log=log)
        plan.metadata.update({"command": title, "importance_method": args.importance_method,
                              "pruning_ratio": args.pruning_ratio, "reconstruct": args.reconstruct})
        if steps > 1:
            plan.metadata["iterative_steps"] = steps
        if args.reconstruct == "bias" and not plan.bias_compensation:
            plan.bias_compensation = [True] * plan.num_layers
        report = plan.param_report(model)
        log(f"plan: {report['params_before']:,} -> {report['params_after']:,} parameters "
            f"({1 - report['params_after'] / report['params_before']:.2%} removed); "
            f"deleted layers: {report['removed_layers']}")
        removed = 1 - report["params_after"] / report["params_before"]
        if replayed is None and args.pruning_ratio and abs(removed - args.pruning_ratio) > RATIO_TOLERANCE:
            bounds = [f"--round_to {args.round_to}"] if args.round_to > 1 else []
            bounds += [f"--remove_layers {args.remove_layers}"] if getattr(args, "remove_layers", 0) else []
            log(f"warning: the plan removes {removed:.2%} of the parameters, not the {args.pruning_ratio:.2%} asked for"
                + (f" (with {' and '.join(bounds)})" if bounds else ""))
        selected = time.perf_counter()
        teacher = (lambda: load_model(args.base_model, dtype=args.dtype, device=args.device,
                                      trust_remote_code=args.trust_remote_code)[0]) if args.distill else None
        cut(model, plan, args, tokenizer, samples, log)
        plan = model.pruning_plan
        if count_params(model) != report["params_after"]:
            raise RuntimeError(f"cut model has {count_params(model):,} parameters, the plan said {report['params_after']:,}")
        metrics["pruning seconds"] = round(time.perf_counter() - started, 1)
        metrics["cutting seconds"] = round(time.perf_counter() - selected, 1)
        if args.test_after_prune and (args.finetune or args.distill):
            metrics["wikitext2 PPL after pruning, before recovery"] = _ppl(model, tokenizer, args)
            log(f"PPL after pruning, before recovery: {metrics['wikitext2 PPL after pruning, before recovery']:.2f}")
        model = recover(model, tokenizer, args, run.path, teacher, log=log)
        if args.test_after_prune:
            key = "wikitext2 PPL after recovery" if (args.finetune or args.distill) else "wikitext2 PPL after pruning"
            metrics[key] = _ppl(model, tokenizer, args)
            log(f"{key}: {metrics[key]:.2f}")
        _write_outputs(run, args, model, tokenizer, plan, report, spec, groups, layer_scores, metrics, title)
        run.commit()
        log(f"done in {time.perf_counter() - started:.0f} s: {run.path}")
        return 0
    except BaseException:
        with open(run.log_dir / "training.log", "a") as handle:  # the full story goes to the log, not the console
            traceback.print_exc(file=handle)
        log(f"run failed: its log is kept in {run.fail() / run.stamp / 'training.log'}")
        raise
    finally:
        run.close()


def left_out(tokenizer, samples: torch.Tensor, text: str | None, what: str,
             log: Callable[[str], object]) -> torch.Tensor | None:
    """The mask of the calibration tokens overlapping `text` (None: no text), logged as left out of `what`."""
    from llama_pruning.data import text_mask

    if text is None:
        return None
    ignore = text_mask(tokenizer, samples, text)
    log(f"left out of {what}: {int(ignore.sum()):,} of {ignore.numel():,} tokens ({ignore.float().mean():.1%}), "
        f"those overlapping {text!r}")
    return ignore


def cut(model: nn.Module, plan: PruningPlan, args: argparse.Namespace, tokenizer, samples: torch.Tensor | None,
        log: Callable[[str], object]) -> None:
    """Cut `model` to `plan` in place with the run's reconstruction, on its own calibration draw when it needs more windows."""
    from llama_pruning.data import get_calibration_samples
    from llama_pruning.reconstruct import prune_with_reconstruction
    from llama_pruning.surgery import apply_plan

    if args.reconstruct == "none":
        apply_plan(model, plan)
        return
    count = reconstruct_windows(args.reconstruct, args.reconstruct_samples, args.num_samples)
    if samples is None or count != len(samples):
        samples = get_calibration_samples(tokenizer, args.dataset, count, args.seq_len, args.seed)
    last_loss = resolve_last_loss(args.reconstruct_last_loss, args.reconstruct, args.reconstruct_drift)
    toward = (", the model's last layer, where cut, toward the dense next-token distribution "
              f"(the head on {args.reconstruct_kl_tokens:g} of the tokens per step)") if last_loss == "kl" else ""
    log(f"cutting with {args.reconstruct} reconstruction on {len(samples)} x {args.seq_len} tokens "
        f"(ridge {args.reconstruct_ridge:g} tokens = {args.reconstruct_ridge / samples.numel():.3g} relative, "
        f"drift {args.reconstruct_drift}{toward})")
    ignore = left_out(tokenizer, samples, resolve_ignore(args.reconstruct_ignore, args.reconstruct), "the fit", log)
    prune_with_reconstruction(model, plan, samples, mode=args.reconstruct, ridge=args.reconstruct_ridge,
                              batch_size=args.gradient_batch_size, device=args.device,
                              drift_weight=args.reconstruct_drift, input_weight=args.reconstruct_inputs,
                              block_epochs=args.reconstruct_epochs, block_lr=args.reconstruct_lr,
                              block_span=args.reconstruct_span, last_loss=last_loss,
                              kl_tokens=args.reconstruct_kl_tokens,
                              block_autocast={"auto": None, "bf16": True, "none": False}[args.reconstruct_autocast],
                              ignore=ignore)


def _write_outputs(run: RunDir, args, model, tokenizer, plan: PruningPlan, report: dict, spec, groups,
                   layer_scores, metrics: dict, title: str) -> None:
    import torch

    from llama_pruning.evaluation.speed import peak_rss_bytes
    from llama_pruning.models.export import save_pruned_model
    from llama_pruning.plan import PLAN_FILENAME
    from llama_pruning.reporting import plot_pruning_strategy, write_description

    path = run.path
    plan.save(path / PLAN_FILENAME)
    if groups is not None:
        groups.to_csv(path / UNIT_TABLE, index=False)
    plot_pruning_strategy(plan, report, path / "pruning_strategy.png",
                          f"{title}: {importance_label(args)}, {1 - report['params_after'] / report['params_before']:.1%} "
                          "of parameters removed", layer_scores,
                          layer_score_label=f"layer importance\n({getattr(args, 'layer_importance_method', '')})")
    metrics["peak RSS MiB"] = round((peak_rss_bytes() or 0) / 2**20, 1)
    if torch.cuda.is_available() and str(args.device).startswith("cuda"):
        metrics["peak CUDA memory MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    layout = model.config.pruned_layout
    write_description(path / "description.txt", args, report, spec, layout, metrics)
    summary = {"params_before": report["params_before"], "params_after": report["params_after"],
               "layer_params_before": report["layer_params_before"], "layer_params_after": report["layer_params_after"],
               "removed_layers": report["removed_layers"], **metrics}
    (path / "metrics.json").write_text(json.dumps(summary, indent=1))
    if args.save_model:
        save_pruned_model(model, tokenizer, path, plan=plan, dtype=args.save_dtype)
        run.log(f"model saved in {run.final} (load it with llama_pruning.models.load_model; "
                "plain transformers: see README, Saved models)")
    if args.save_gguf:
        from llama_pruning.cli.gguf_cmd import format_counts, source_gguf
        from llama_pruning.models.gguf_export import export_gguf

        gguf_path = path / f"model-{args.outtype}.gguf"
        counts = export_gguf(model, tokenizer, gguf_path, args.outtype, source_gguf=source_gguf(args.base_model), dense_spec=spec)
        run.log(f"GGUF written to {run.final / gguf_path.name} ({gguf_path.stat().st_size / 2**20:.1f} MiB): "
                f"tensors {format_counts(counts)}")

