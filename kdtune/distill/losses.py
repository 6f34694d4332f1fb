"""The loss terms as plain functions, so their math can be checked by hand on small tensors."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdtune.config import ADV_LOSSES, HINT_LOSSES, SOFT_SCALES


def hard_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the true labels at temperature 1."""
    return F.cross_entropy(student_logits.float(), labels)


def ensemble_logits(teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The logits a method reads from its teacher: one teacher's (N, C) logits as they are, or, for an ensemble's
    member logits z_i stacked as (M, N, C), the logit vector whose softmax at `temperature` T is the ensemble's
    soft target (Hinton et al. 2015, distilling an ensemble):

        p_ens^T = mean_i softmax(z_i / T)           (the members' averaged softened probabilities)
        z_ens   = T * log(p_ens^T) + mean_i T * logsumexp(z_i / T)

    softmax(z_ens / T) = p_ens^T exactly: the second term is a per-sample shift, which no softmax sees; it puts
    z_ens on the scale of raw logits (for M = 1, z_ens = z_1, and identical members give their own logits back),
    so methods that read logits directly (seed 003's L1 term and discriminator, seed 004's discriminator; they
    call this at T = 1, the ensemble's own prediction) get logits of the usual size. The KD losses are
    unchanged: soft_loss at T on z_ens is the KL to the ensemble's target.

    Why not average the logits: softmax(mean_i z_i / T) is the members' normalised *geometric* mean at T, and it
    is a different distribution at every T. Where members disagree it keeps only what they all find plausible
    (a product of their probabilities: a class one member gives almost nothing gets almost nothing), so the
    second and third classes one member ranks high (the "dark knowledge" a soft target carries) are damped by
    the members that do not; the arithmetic mean keeps each member's alternatives. The two agree only where the
    members agree or as T grows (to first order in 1/T), which is why the target must be formed at the trial's
    own T, and why a cache holds the member logits (M, N, C) rather than one averaged (N, C).
    """
    if teacher_logits.dim() == 2:
        return teacher_logits
    members = teacher_logits.float()
    if members.shape[0] == 1:
        return members[0]
    scaled = members / temperature
    log_mean = torch.logsumexp(F.log_softmax(scaled, dim=2), dim=0) - math.log(members.shape[0])
    shift = torch.logsumexp(scaled, dim=2).mean(dim=0, keepdim=True).transpose(0, 1)  # (N, 1)
    return temperature * (log_mean + shift)


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
              scale: str = "T2") -> torch.Tensor:
    """The soft-target term, KL(p_T^T || p_S^T) averaged over the batch (batchmean), times T^2 or not.

    scale="T2" (Hinton; kdtune's default): T^2 * KL. The T^2 factor keeps the gradient scale of the soft term
    roughly independent of T, so alpha means the same at every temperature.
    scale="none": KL alone, the form seeds 000, 001 and 004 write (a plain H(P_T^T, P_S^T)); its gradient
    shrinks as 1/T^2, so at T=4 the same alpha weighs the soft term 16 times less than under "T2".
    KL differs from the cross-entropy H(p_T^T, p_S^T) the seeds write only by the teacher's entropy, a constant
    for the student: the gradients are identical (the logged value is the KL, 0 when the student matches).
    """
    if scale not in SOFT_SCALES:
        raise ValueError(f"soft_loss scale={scale!r}: allowed: {', '.join(SOFT_SCALES)}")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2 if scale == "T2" else kl


def feature_mse(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Mean squared error between a (possibly adapted) student feature and the teacher feature."""
    return F.mse_loss(student_feature.float(), teacher_feature.float())


def hint_distance(student_feature: torch.Tensor, teacher_feature: torch.Tensor, form: str = "mean") -> torch.Tensor:
    """FitNets' hint loss between the adapted student feature r(v) and the teacher's hint u.

    form="mean" (kdtune's default): MSE, the mean over every element, so beta means the same whatever the size.
    form="sum": FitNets eq. 3, 1/2 * ||u - r(v)||^2 summed over the feature (C*H*W, or the vector), then
    averaged over the batch; it grows with the feature's size (seed 001 writes the squared norm without the 1/2).
    """
    if form not in HINT_LOSSES:
        raise ValueError(f"hint_distance form={form!r}: allowed: {', '.join(HINT_LOSSES)}")
    if form == "mean":
        return feature_mse(student_feature, teacher_feature)
    squared = (student_feature.float() - teacher_feature.float()) ** 2
    return 0.5 * squared.flatten(1).sum(dim=1).mean()


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

    d_student (N, 1) is the discriminator's logit for 'student'; L_class = mean_i -log sigmoid(d_i) >= 0.
    The paper's student minimises -beta * L_class, i.e. pushes the discriminator towards 'teacher'; that
    maximises a cross-entropy, which has no upper bound (see seed004_adversarial_loss).
    """
    return F.binary_cross_entropy_with_logits(d_student.float().squeeze(1), torch.ones(len(d_student),
                                              device=d_student.device))


def teacher_source_loss(d_student: torch.Tensor) -> torch.Tensor:
    """-log P_D(teacher | a_S) = mean_i -log sigmoid(-d_i) = mean_i softplus(d_i) >= 0, d the logit of 'student'."""
    return F.binary_cross_entropy_with_logits(d_student.float().squeeze(1), torch.zeros(len(d_student),
                                              device=d_student.device))


def seed004_adversarial_loss(d_student: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """The adversarial term of seed 004's student loss, before its weight beta (config.adv_weight).

    form="paper": -L_class(a_S | x=1) = mean_i log sigmoid(d_i) <= 0, as seed 004 writes it. Unbounded below:
        as d -> -inf it falls like d, and its gradient never fades, so the student can lower it forever by
        growing its logits (measured: NaN after ~500 SGD steps at beta 1, logits 1e16 at beta 0.1).
    form="nonsaturating": -log P_D(teacher | a_S) = mean_i softplus(d_i) >= 0, the GAN generator's
        non-saturating loss: the same direction (towards logits D calls 'teacher'), bounded below by 0, and
        its gradient fades once D is fooled.
    """
    if form == "paper":
        return -student_source_loss(d_student)
    if form == "nonsaturating":
        return teacher_source_loss(d_student)
    raise ValueError(f"seed004_adversarial_loss form={form!r}: allowed: {', '.join(ADV_LOSSES)}")


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation"): the
    per-sample Z-score over the classes (the last dimension),

        Z(z) = (z - mean(z)) / (std(z) + eps)

    as the authors' `normalize` (github.com/sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py,
    also DKD.py, MLKD.py and CTKD/distiller_zoo/KD.py; commit f6e5aa5). std is torch's default, the unbiased
    one (divides by K - 1), and this follows it; the paper writes the standard deviation with 1/K, which differs
    by sqrt(K / (K - 1)) (0.5% at K = 100), a fixed rescaling of the temperature. The result has mean 0 and
    (unbiased) std 1 per row up to eps, and does not change when a row is shifted or scaled by a positive factor;
    a constant row becomes zeros.

    KD+LS (their kd_loss with logit_stand): standardise both the teacher's and the student's logits, divide both
    by a base temperature T, and take T^2 * KL(softmax(Z(z_t)/T) || softmax(Z(z_s)/T)) averaged over the batch,
    i.e. soft_loss(standardize_logits(z_s), standardize_logits(z_t), T). Their README and tools/train.py
    (--logit-stand) run it with --base-temp 2 and --kd-weight 9 (the KD term's weight), with the cross-entropy
    weighted 0.1 (CFG.KD.LOSS.CE_WEIGHT in their mdistiller/engine/cfg.py).
    """
    floating = logits if logits.dtype == torch.float64 else logits.float()
    mean = floating.mean(dim=-1, keepdim=True)
    std = floating.std(dim=-1, keepdim=True)
    return (floating - mean) / (std + eps)
