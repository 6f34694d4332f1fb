"""The loss terms as plain functions, so their math can be checked by hand on small tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def hard_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the true labels at temperature 1."""
    return F.cross_entropy(student_logits.float(), labels)


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target term: T^2 * KL(p_T^T || p_S^T), averaged over the batch (batchmean).

    The T^2 factor keeps the gradient scale of the soft term roughly independent of T, so alpha means
    the same at every temperature. KL differs from the cross-entropy H(p_T^T, p_S^T) of seed 001 only by the
    teacher's entropy, a constant for the student: the gradients are identical.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def feature_mse(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Mean squared error between a (possibly adapted) student feature and the teacher feature."""
    return F.mse_loss(student_feature.float(), teacher_feature.float())
