"""Recovery options: one dataclass for library users and the `recovery` argument group built from it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

METHODS = ("lora", "full")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LR = {"lora": 1e-4, "full": 1e-5}


class RecoveryError(ValueError):
    """Bad recovery settings or data, reported in one line."""


@dataclass
class RecoveryConfig:
    """How to train the pruned model; the optimizer is AdamW with a linear decay and no warmup.

    `distill_alpha` weighs the distillation term: loss = alpha * T^2 * KL(teacher || student) +
    (1 - alpha) * next-token cross-entropy. It only matters when a teacher is given.
    """

    method: str = "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    lr: float | None = None
    epochs: float = 1.0
    batch_size: int = 4
    max_steps: int | None = None
    distill_temperature: float = 2.0
    distill_alpha: float = 1.0
    gradient_checkpointing: bool = False
    bf16: bool = False
    seed: int = 0
    log_lines: int = 20
    extra_training_args: dict = field(default_factory=dict)

    @property
    def learning_rate(self) -> float:
        """The given rate, else the method's default (LoRA 1e-4, full 1e-5)."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def validate(self) -> None:
        """Raise RecoveryError for values no training run can use."""
        checks = [
            (self.method in METHODS, f"finetune method must be one of {', '.join(METHODS)} (got {self.method!r})"),
            (self.lora_r >= 1, f"lora_r must be at least 1 (got {self.lora_r})"),
            (0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1) (got {self.lora_dropout})"),
            (bool(self.lora_target_modules), "lora_target_modules is empty"),
            (self.learning_rate > 0, f"learning rate must be positive (got {self.learning_rate})"),
            (self.epochs > 0, f"epochs must be positive (got {self.epochs})"),
            (self.batch_size >= 1, f"batch size must be at least 1 (got {self.batch_size})"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be at least 1 (got {self.max_steps})"),
            (self.distill_temperature > 0, f"distill temperature must be > 0 (got {self.distill_temperature})"),
            (0 <= self.distill_alpha <= 1, f"distill_alpha must be in [0, 1] (got {self.distill_alpha})"),
        ]
        for ok, message in checks:
            if not ok:
                raise RecoveryError(message)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RecoveryConfig:
        """The config the `recovery` argument group asks for (`args.seed` when the parser has one)."""
        config = cls(
            method=args.finetune_method,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            lora_target_modules=tuple(name.strip() for name in args.lora_target_modules.split(",") if name.strip()),
            lr=args.finetune_lr,
            epochs=args.finetune_epochs,
            batch_size=args.finetune_batch_size,
            max_steps=args.finetune_max_steps,
            distill_temperature=args.distill_temperature,
            distill_alpha=args.distill_alpha,
            gradient_checkpointing=args.gradient_checkpointing,
            bf16=args.bf16,
            seed=getattr(args, "seed", 0),
        )
        config.validate()
        return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `recovery` argument group (fine-tuning and distillation after pruning) to a parser."""
    group = parser.add_argument_group("recovery")
    group.add_argument("--finetune", action="store_true", help="fine-tune the pruned model to recover quality")
    group.add_argument("--finetune_method", choices=METHODS, default="lora",
                       help="lora: train low-rank adapters, merged into the weights afterwards; full: train all")
    group.add_argument("--lora_r", type=int, default=8, help="LoRA rank")
    group.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA scaling numerator (update = alpha/r * BA)")
    group.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    group.add_argument("--lora_target_modules", default=",".join(DEFAULT_LORA_TARGETS),
                       help="comma-separated Linear names to adapt; removed blocks are skipped")
    group.add_argument("--finetune_samples", type=int, default=512, help="number of training sequences")
    group.add_argument("--finetune_lr", type=float, default=None,
                       help="peak learning rate (default: 1e-4 for lora, 1e-5 for full)")
    group.add_argument("--finetune_epochs", type=float, default=1.0, help="passes over the training sequences")
    group.add_argument("--finetune_batch_size", type=int, default=4, help="sequences per step on each process")
    group.add_argument("--finetune_seq_len", type=int, default=256, help="tokens per training sequence (maximum)")
    group.add_argument("--finetune_dataset", default="wikitext2",
                       help="wikitext2, ptb, c4, a .txt/.jsonl text file, or a .jsonl with prompt/response fields")
    group.add_argument("--distill", action="store_true",
                       help="distill from the dense model (KL on next-token distributions); implies training")
    group.add_argument("--distill_temperature", type=float, default=2.0, help="softmax temperature T of distillation")
    group.add_argument("--distill_alpha", type=float, default=1.0,
                       help="weight of the distillation term; 1 - alpha goes to the language-modelling loss")
    group.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute activations in the backward pass to save memory")
    group.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast (mixed precision)")
    group.add_argument("--finetune_max_steps", type=int, default=None,
                       help="stop after this many optimizer steps (overrides --finetune_epochs)")
