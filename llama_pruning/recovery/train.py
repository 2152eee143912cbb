"""Recovery training on the Hugging Face Trainer: LoRA (merged afterwards) or full fine-tuning,
optionally distilled from the dense teacher.

Because the loop is the stock Trainer, `accelerate launch` / `torchrun` data parallelism works without
changes: every process trains its share of each batch and ends with the same merged weights.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch
from accelerate import PartialState
from torch import nn
from torch.utils.data import Dataset
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from llama_pruning.recovery.config import DEFAULT_LORA_TARGETS, RecoveryConfig, RecoveryError
from llama_pruning.recovery.data import TokenDataset, collate, load_training_data
from llama_pruning.recovery.losses import recovery_loss

LOSS_PLOT = "finetune_loss.png"
LOSS_CSV = "finetune_loss.csv"
_NEW_CHECKPOINTING = "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}


def lora_targets(model: nn.Module, names: tuple[str, ...] | list[str]) -> list[str]:
    """Full names of the Linear layers whose last name component is in `names`.

    Removed blocks (RemovedAttention / RemovedMLP) hold no Linear, so they are skipped by construction.
    A standard block Linear missing everywhere (e.g. every attention block removed) is not an error;
    a name that is neither a block Linear nor any Linear of the model is (most likely a typo).
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    present = {name.rsplit(".", 1)[-1] for name in linears}
    unknown = sorted(set(names) - present - set(DEFAULT_LORA_TARGETS))
    if unknown:
        raise RecoveryError(f"unknown LoRA target module(s) {unknown}; the model's Linear layers are {sorted(present)}")
    targets = [name for name in linears if name.rsplit(".", 1)[-1] in names]
    if not targets:
        raise RecoveryError(f"none of the LoRA target modules {list(names)} is left in the pruned model")
    return targets


def attach_lora(model: nn.Module, config: RecoveryConfig) -> nn.Module:
    """Wrap `model` in a PEFT LoRA model on its surviving target Linears (per-layer shapes are fine)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_targets(model, config.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


class RecoveryTrainer(Trainer):
    """Trainer whose loss is `recovery_loss`: next-token cross-entropy, or distillation from a frozen teacher.

    The loss is a mean over each micro-batch's labelled tokens; the Trainer divides it by the gradient
    accumulation steps and DDP averages it over processes, so micro-batches weigh equally (exact for
    fixed-length windows).
    """

    def __init__(self, *args, teacher: nn.Module | None = None, temperature: float = 2.0, alpha: float = 1.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha
        self.model_accepts_loss_kwargs = False  # we normalise per micro-batch; no token count to pass

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}
        outputs = model(**batch)
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(**batch).logits
        loss = recovery_loss(outputs.logits, inputs["labels"], teacher_logits, self.temperature, self.alpha)
        return (loss, outputs) if return_outputs else loss


class _QuietProgress(ProgressCallback):
    """The Trainer's tqdm bar without its per-log dictionary dumps (our log gets the loss curve)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return control


class _LossLog(TrainerCallback):
    """Writes about `lines` evenly spaced loss lines into the run log (main process only)."""

    def __init__(self, log: Callable[[str], None], lines: int):
        self.log, self.lines = log, max(1, lines)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return control
        every = max(1, state.max_steps // self.lines)
        step = state.global_step
        if step == 1 or step % every == 0 or step == state.max_steps:
            self.log(f"  step {step}/{state.max_steps}  loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}")
        return control


def training_arguments(config: RecoveryConfig, output_dir: str | Path, use_cpu: bool) -> TrainingArguments:
    """TrainingArguments for a recovery run: AdamW, linear decay, a loss entry every step, nothing saved."""
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        use_cpu=use_cpu,
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )
    if _NEW_CHECKPOINTING:  # transformers >= 5.2x renamed it; non-reentrant is the default there
        kwargs["activation_checkpointing"] = config.gradient_checkpointing
    else:
        kwargs["gradient_checkpointing"] = config.gradient_checkpointing
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}  # works with frozen inputs (LoRA)
    kwargs.update(config.extra_training_args)
    return TrainingArguments(**kwargs)


def finetune(
    model: nn.Module,
    train_data: torch.Tensor | Dataset,
    config: RecoveryConfig | None = None,
    teacher: nn.Module | None = None,
    output_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    merge: bool = True,
) -> tuple[nn.Module, list[dict]]:
    """Train a (pruned) causal LM to recover quality; returns `(model, loss history)`.

    `train_data` is a `[N, seq_len]` LongTensor of windows or a dataset of `{input_ids, labels}` (see
    `TokenDataset`). With `config.method == "lora"` adapters are trained and, with `merge`, merged into the
    weights so the result is a plain model (no peft needed to save or load it); without `merge` the PEFT
    model is returned. `"full"` trains every parameter whose `requires_grad` is True (freeze some to keep
    them). With a `teacher` (the dense model), the loss is distillation (see RecoveryConfig). The
    history holds one `{"step", "loss", "learning_rate"}` per optimizer step. `output_dir` is the Trainer's
    (it only receives files when `config.extra_training_args` asks for checkpoints); default: a temporary one.
    """
    config = config or RecoveryConfig()
    config.validate()
    if config.method == "full" and not any(p.requires_grad for p in model.parameters()):
        raise RecoveryError("full fine-tuning needs trainable parameters, and every requires_grad is False")
    dataset = TokenDataset.from_windows(train_data) if isinstance(train_data, torch.Tensor) else train_data
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    use_cache = model.config.use_cache
    model.config.use_cache = False
    with tempfile.TemporaryDirectory() as scratch:
        args = training_arguments(config, output_dir or scratch, use_cpu=next(model.parameters()).device.type == "cpu")
        main = args.process_index == 0
        set_seed(config.seed)  # LoRA initialisation is random
        trained = attach_lora(model, config) if config.method == "lora" else model
        n_train = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        if teacher is not None:
            teacher.eval()  # frozen: it runs under no_grad and is not in the optimizer
        trainer = RecoveryTrainer(
            model=trained, args=args, train_dataset=dataset, data_collator=collate,
            teacher=teacher, temperature=config.distill_temperature, alpha=config.distill_alpha,
            callbacks=[_LossLog(log, config.log_lines)],
        )
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(_QuietProgress())
        if teacher is not None:
            teacher.to(args.device)
        if main:
            objective = (f"distillation (T={config.distill_temperature}, alpha={config.distill_alpha})"
                         if teacher is not None else "next-token cross-entropy")
            log(f"recovery: {config.method} fine-tuning, {n_train:,} trainable parameters, {len(dataset)} sequences, "
                f"lr {config.learning_rate:g}, {objective}, {args.world_size} process(es)")
        start = time.perf_counter()
        trainer.train()
        if config.gradient_checkpointing:
            name = "activation_checkpointing_disable" if _NEW_CHECKPOINTING else "gradient_checkpointing_disable"
            getattr(trained, name)()
    history = [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate")}
               for e in trainer.state.log_history if "loss" in e]
    if main:
        log(f"recovery: {trainer.state.global_step} steps in {time.perf_counter() - start:.1f} s, "
            f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}")
    model.config.use_cache = use_cache
    if config.method == "lora" and merge:
        trained = trained.merge_and_unload()
    if config.method == "full" or merge:  # a plain model again: give back the caller's requires_grad flags
        for name, p in trained.named_parameters():
            p.requires_grad_(requires_grad[name])
    return trained.eval(), history


def plot_loss(history: list[dict], path: str | Path, title: str = "recovery training loss") -> None:
    """Write the loss curve (loss per optimizer step) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], linewidth=1)
    ax.set(xlabel="optimizer step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def recover(
    model: nn.Module,
    tokenizer,
    args: argparse.Namespace,
    run_dir: Path,
    teacher_factory: Callable[[], nn.Module] | None,
    log: Callable[[str], None] = print,
) -> nn.Module:
    """Run what the `recovery` arguments ask: nothing, fine-tuning, and/or distillation from the dense model.

    Returns the recovered model with any LoRA merged into its weights; writes `finetune_loss.png` and
    `finetune_loss.csv` into `run_dir` (main process only) and the loss curve into `log`. Full
    fine-tuning trains every parameter.
    """
    if not (args.finetune or args.distill):
        return model
    config = RecoveryConfig.from_args(args)
    if args.distill and teacher_factory is None:
        raise RecoveryError("--distill needs the dense model as teacher, and none is available here")
    data = load_training_data(tokenizer, args.finetune_dataset, args.finetune_samples, args.finetune_seq_len,
                              config.seed)
    if config.method == "full":
        model.requires_grad_(True)
    teacher = teacher_factory() if args.distill else None
    model, history = finetune(model, data, config, teacher=teacher, log=log)
    del teacher
    if PartialState().is_main_process:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        kind = f"{config.method}{' + distillation' if args.distill else ''}"
        plot_loss(history, run_dir / LOSS_PLOT, title=f"recovery ({kind}) training loss")
        import pandas as pd

        pd.DataFrame(history).to_csv(run_dir / LOSS_CSV, index=False)
        log(f"recovery: loss curve written to {run_dir / LOSS_PLOT}")
    return model
