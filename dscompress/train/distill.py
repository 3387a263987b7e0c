"""The knowledge-distillation loss (Hinton et al. 2015), per image or per pixel."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float = 0.9,
    temperature: float = 4.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(student, labels)``, a scalar.

    Args:
        student_logits, teacher_logits: (N, classes), or (N, classes, H, W) for segmentation;
            without a teacher only the CE term is used.
        labels: (N,) class indices, or (N, H, W) masks; labels equal to ``ignore_index`` add
            nothing to the CE term (segmentation passes :data:`~dscompress.nn.metrics.IGNORE_INDEX`,
            255; the default is PyTorch's -100, which no class index is).

    The classes are on dimension 1. The KL term is summed over the classes and averaged over the
    images, and for segmentation over every pixel too (ignored pixels included: the label there
    is unknown, the teacher's output is not). The T^2 factor keeps the soft term's gradients the
    same size whatever the temperature.
    """
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing, ignore_index=ignore_index)
    if teacher_logits is None:
        return hard
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="none",
        log_target=True,
    )
    soft = soft.sum(dim=1).mean()
    return alpha * temperature**2 * soft + (1 - alpha) * hard
