"""Token-level recovery losses: next-token cross-entropy and distillation KL, over labelled positions only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_pruning.recovery.data import IGNORE_INDEX


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """`[B, L-1]` True where position t predicts a labelled token t+1."""
    return labels[:, 1:] != IGNORE_INDEX


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled targets (float32)."""
    mask = target_mask(labels)
    return F.cross_entropy(logits[:, :-1][mask].float(), labels[:, 1:][mask], reduction="sum")


def distillation_loss_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Summed T^2 * KL(teacher || student) of the temperature-T next-token distributions at labelled targets.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the teacher must share the student's vocabulary")
    mask = target_mask(labels)
    student = F.log_softmax(student_logits[:, :-1][mask].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1][mask].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum")
    return kl * temperature**2


def recovery_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 2.0,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Mean per labelled target of the LM loss, or with a teacher of alpha * distillation + (1 - alpha) * LM."""
    count = target_mask(labels).sum().clamp(min=1)
    if teacher_logits is None:
        return lm_loss_sum(logits, labels) / count
    total = alpha * distillation_loss_sum(logits, teacher_logits, labels, temperature)
    if alpha < 1:
        total = total + (1 - alpha) * lm_loss_sum(logits, labels)
    return total / count
