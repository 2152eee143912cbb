"""Zero-shot accuracy with lm-evaluation-harness on an in-memory model (optional extra: `pip install .[eval]`).

The harness downloads each task's data from the Hugging Face hub; offline, tasks can be defined from local
files in a folder of task YAMLs passed as `include_path` (see docs/EVALUATION.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

DEFAULT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
INSTALL_HINT = "pip install 'llama-pruning[eval]'  (or: pip install lm-eval)"


class ZeroShotError(ValueError):
    """Zero-shot evaluation cannot run: harness missing, unknown task, or task data unreachable."""


def evaluate_zeroshot(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str] = DEFAULT_TASKS,
    batch_size: int = 8,
    num_fewshot: int = 0,
    limit: int | None = None,
    include_path: str | Path | None = None,
    include_defaults: bool = True,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness `tasks` on `model` and return `{task: {metric: value}}` (e.g. acc, acc_norm).

    `limit` evaluates only the first documents of each task; `include_path` is a folder of extra task
    YAMLs (e.g. local-file tasks for offline use); `include_defaults=False` skips indexing the harness' own
    tasks (about half a minute) when only such local tasks are run.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ZeroShotError(f"zero-shot evaluation needs lm-evaluation-harness: {INSTALL_HINT}") from None
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None,
                          include_defaults=include_defaults)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ZeroShotError(f"unknown lm-eval task(s) {', '.join(unknown)}; see `lm-eval ls tasks`, or define them "
                            "in a YAML folder passed as include_path")
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = lm_eval.simple_evaluate(
            model=harness_model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (ConnectionError, OSError) as err:  # hub unreachable / dataset missing (DatasetNotFoundError is an OSError)
        raise ZeroShotError(
            f"cannot load the data of task(s) {', '.join(tasks)} ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "offline, define tasks over local files in a YAML folder passed as include_path"
        ) from None
    return {
        task: {key.removesuffix(",none"): value for key, value in metrics.items() if isinstance(value, int | float)}
        for task, metrics in output["results"].items()
    }
