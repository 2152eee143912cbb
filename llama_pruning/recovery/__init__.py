"""Recovery after pruning: LoRA or full fine-tuning, optionally distilled from the dense model.

`add_arguments` + `recover` serve the command line; `finetune` is the library entry point.
"""

from llama_pruning.recovery.config import (
    DEFAULT_LORA_TARGETS,
    RecoveryConfig,
    RecoveryError,
    add_arguments,
)
from llama_pruning.recovery.data import TokenDataset, load_instruction_data, load_training_data
from llama_pruning.recovery.losses import distillation_loss_sum, lm_loss_sum, recovery_loss
from llama_pruning.recovery.train import finetune, lora_targets, plot_loss, recover

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "RecoveryConfig",
    "RecoveryError",
    "TokenDataset",
    "add_arguments",
    "distillation_loss_sum",
    "finetune",
    "lm_loss_sum",
    "load_instruction_data",
    "load_training_data",
    "lora_targets",
    "plot_loss",
    "recover",
    "recovery_loss",
]
