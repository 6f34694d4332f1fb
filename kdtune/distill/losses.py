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


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Seed 002 eq. 1: G[i, j] = sum over positions (s, t) of F1[s, t, i] * F2[s, t, j] / (h * w), per sample.

    first (N, m, h, w) and second (N, n, h, w) must share h and w; the result is (N, m, n).
    """
    height, width = first.shape[2:]
    return torch.bmm(first.float().flatten(2), second.float().flatten(2).transpose(1, 2)) / (height * width)


def fsp_distance(student_matrices: list[torch.Tensor], teacher_matrices: list[torch.Tensor]) -> torch.Tensor:
    """Seed 002 eq. 2 without the lambdas: mean over samples of sum over pairs of ||G_T - G_S||_2^2."""
    per_sample = sum(((t - s) ** 2).sum(dim=(1, 2)) for s, t in zip(student_matrices, teacher_matrices))
    return per_sample.mean()


# Seed 003's discriminator outputs C label logits, then two logits for the source: real (teacher), fake (student).
REAL, FAKE = 0, 1


def adversarial_log_likelihoods(d_teacher: torch.Tensor, d_student: torch.Tensor, labels: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed 003 eqs. 1 and 3 from discriminator outputs (N, C+2) on teacher and student logits:

    L_A  = mean_i log P(Real | D(t_i)) + log P(Fake | D(F(x_i)))
    L_DS = mean_i log P(l_i | D(t_i)) + log P(l_i | D(F(x_i)))
    Both are log-likelihoods (<= 0): the discriminator maximises their half-sum, the student minimises
    L_GAN = (L_A - L_DS) / 2.
    """
    classes = d_teacher.shape[1] - 2
    source_t = F.log_softmax(d_teacher[:, classes:].float(), dim=1)[:, REAL]
    source_s = F.log_softmax(d_student[:, classes:].float(), dim=1)[:, FAKE]
    label_t = F.log_softmax(d_teacher[:, :classes].float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    label_s = F.log_softmax(d_student[:, :classes].float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return (source_t + source_s).mean(), (label_t + label_s).mean()


def l1_alignment(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Seed 003 eq. 4: mean over samples of ||F(x_i) - t_i||_1 (summed over classes)."""
    return (student_logits.float() - teacher_logits.float()).abs().sum(dim=1).mean()


def student_source_loss(d_student: torch.Tensor) -> torch.Tensor:
    """Seed 004's L_class(a_S | x=1): the discriminator's cross-entropy for 'comes from the student' (label 1).

    d_student (N, 1) is the discriminator's logit for 'student'; L_class = mean_i -log sigmoid(d_i).
    The student minimises -beta * L_class, i.e. pushes the discriminator towards 'teacher'.
    """
    return F.binary_cross_entropy_with_logits(d_student.float().squeeze(1), torch.ones(len(d_student),
                                              device=d_student.device))
