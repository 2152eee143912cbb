"""Recovery after pruning: LoRA or full fine-tuning, optionally distilled from the dense model.

`add_arguments` + `recover` serve the command line; `finetune` is the library entry point. Names load their
submodule on first use (PEP 562), so the command line's `--help` does not import transformers and peft.
"""

from importlib import import_module

_SUBMODULE = {
    "DEFAULT_LORA_TARGETS": "config",
    "RecoveryConfig": "config",
    "RecoveryError": "config",
    "add_arguments": "config",
    "TokenDataset": "data",
    "load_instruction_data": "data",
    "load_training_data": "data",
    "distillation_loss_sum": "losses",
    "lm_loss_sum": "losses",
    "recovery_loss": "losses",
    "finetune": "train",
    "lora_targets": "train",
    "plot_loss": "train",
    "recover": "train",
}

__all__ = sorted(_SUBMODULE)


def __getattr__(name: str):
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_SUBMODULE[name]}"), name)
