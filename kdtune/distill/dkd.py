"""Decoupled Knowledge Distillation (DKD): Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation",
CVPR 2022 (arXiv:2203.08679). Loss functions only; a kdtune Method wraps them.

Notation (paper §3.1): at temperature T, p = softmax(z / T) over C classes, t the target class,
    b   = [p_t, p_\\t] with p_\\t = sum_{i != t} p_i          (binary: target vs all others)
    p^  = p_i / p_\\t for i != t                              (the non-target classes, renormalised)
Eq. 1 of the paper (exact, per sample, both sides at the same T, teacher's weight):
    KD = KL(p^T || p^S) = KL(b^T || b^S) + (1 - p_t^T) * KL(p^^T || p^^S) = TCKD + (1 - p_t^T) * NCKD
DKD (eq. 4) drops the teacher-confidence weight (1 - p_t^T) and weighs the two parts freely:
    DKD = alpha * TCKD + beta * NCKD

The code follows megvii-research/mdistiller, mdistiller/distillers/DKD.py (commit a08d46f, checked by reading):
  * TCKD = kl_div(log(b_S), b_T, reduction="sum") * T^2 / batch, where b is made by summing the softmax over
    the target / non-target masks (``cat_mask``) and the student's log is taken of those sums (not a
    log_softmax of two logits);
  * NCKD masks the target class by subtracting 1000 from its logit *after* dividing by T:
    softmax(z_T / T - 1000 * gt) and log_softmax(z_S / T - 1000 * gt), then kl_div(..., "sum") * T^2 / batch.
    In float32 and float64 exp(-1000) underflows to exactly 0, so the teacher's target entry is 0 and
    contributes nothing (kl_div uses 0 * log 0 = 0): this equals the KL over the non-target classes
    renormalised among them, as long as no non-target logit / T is more than ~1000 below the target's
    (then the mask is no longer complete; reproduced as the authors have it).
  * the warm-up multiplies the whole DKD term (not the CE) by min(epoch / WARMUP, 1), with mdistiller's
    trainer counting epochs from 1 (mdistiller/engine/trainer.py: ``epoch = 1 ... while epoch <
    EPOCHS + 1``), so the first epoch already has weight 1/WARMUP and the weight is 1 from epoch WARMUP on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Defaults: mdistiller/engine/cfg.py (CFG.DKD.*), the values its CIFAR-100 configs use unless they override BETA.
CE_WEIGHT = 1.0
ALPHA = 1.0
BETA = 8.0
TEMPERATURE = 4.0
WARMUP_EPOCHS = 20

# beta per CIFAR-100 teacher/student pair: mdistiller configs/cifar100/dkd/*.yaml (a pair without a DKD.BETA
# there uses the default 8.0). Checked against the released configs, not the paper's own table (not read here).
# All use alpha=1, T=4, warm-up 20. ImageNet (configs/imagenet/r34_r18/dkd.yaml, r50_mv1/dkd.yaml): T=1, warm-up 1, beta 0.5 (R34->R18)
# and 2.0 (R50->MobileNetV1).
BETA_CIFAR100 = {
    ("resnet56", "resnet20"): 2.0,
    ("resnet110", "resnet32"): 2.0,
    ("resnet32x4", "resnet8x4"): 8.0,
    ("wrn_40_2", "wrn_16_2"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 6.0,
    ("vgg13", "vgg8"): 6.0,
    ("resnet32x4", "ShuffleV1"): 8.0,
    ("wrn_40_2", "ShuffleV1"): 8.0,
    ("vgg13", "MobileNetV2"): 6.0,
    ("ResNet50", "MobileNetV2"): 8.0,
    ("resnet32x4", "ShuffleV2"): 8.0,
}

MASK_LOGIT = 1000.0  # mdistiller subtracts this from the target's (already divided by T) logit for NCKD


def _float(x: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 logits are computed in float32 (mdistiller runs in float32); float64 stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _masks(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = labels.reshape(-1).long()
    gt = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), True)
    return gt, ~gt


def _binary(probs: torch.Tensor, gt: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[p_t, sum of the others] per row, both sums taken directly (mdistiller's cat_mask)."""
    return torch.cat([(probs * gt).sum(1, keepdim=True), (probs * other).sum(1, keepdim=True)], dim=1)


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of DKD (Zhao et al. 2022, eq. 1 and 4), each a scalar: the sum over the batch of the
    per-sample KL divided by the batch size (batchmean), times T^2, as mdistiller's ``dkd_loss`` computes them.

        TCKD = T^2 / B * sum_n KL(b_T,n || b_S,n),   b = [p_t, sum_{i != t} p_i], p = softmax(z / T)
        NCKD = T^2 / B * sum_n KL(p^_T,n || p^_S,n), p^ = softmax(z / T - 1000 * onehot(t))

    student_logits, teacher_logits: (B, C); labels: (B,) class indices. The teacher side is used as given
    (detach it, or compute it under no_grad, as the caller's teacher forward does).
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"dkd_terms wants (B, C) student and teacher logits of one shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if labels.reshape(-1).shape[0] != student_logits.shape[0]:
        raise ValueError(f"dkd_terms: {labels.numel()} labels for a batch of {student_logits.shape[0]}")
    s = _float(student_logits)
    t = _float(teacher_logits).to(s.dtype)
    gt, other = _masks(s, labels)
    batch = s.shape[0]
    scale = temperature ** 2 / batch

    b_s = _binary(F.softmax(s / temperature, dim=1), gt, other)
    b_t = _binary(F.softmax(t / temperature, dim=1), gt, other)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * scale

    log_p_s_hat = F.log_softmax(s / temperature - MASK_LOGIT * gt, dim=1)
    p_t_hat = F.softmax(t / temperature - MASK_LOGIT * gt, dim=1)
    nckd = F.kl_div(log_p_s_hat, p_t_hat, reduction="sum") * scale
    return tckd, nckd


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float = ALPHA, beta: float = BETA, temperature: float = TEMPERATURE) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD (paper eq. 4; mdistiller ``dkd_loss``), without the warm-up factor."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature)
    return alpha * tckd + beta * nckd


def dkd_warmup(epoch: float, warmup_epochs: float = WARMUP_EPOCHS) -> float:
    """min(epoch / warmup_epochs, 1): the factor on the whole DKD term (mdistiller DKD.forward_train).

    mdistiller counts epochs from 1, so pass the 1-based epoch to reproduce it (the first epoch gets
    1 / warmup_epochs, never 0); a 0-based loop should pass epoch + 1. warmup_epochs = 0 means no warm-up
    (factor 1; mdistiller would divide by zero). Epochs below 0 give 0.
    """
    if warmup_epochs < 0:
        raise ValueError(f"dkd_warmup: warmup_epochs must be >= 0, got {warmup_epochs}")
    if warmup_epochs == 0:
        return 1.0
    return float(min(max(epoch, 0) / warmup_epochs, 1.0))


# ---- the method ---------------------------------------------------------------------------------
from kdtune.config import Param  # noqa: E402
from kdtune.distill.base import READS_LOGITS, Method, Outputs  # noqa: E402
from kdtune.distill.kd import LOGIT_STANDARDIZE, logit_pair  # noqa: E402


class DecoupledKD(Method):
    """DKD: hard_weight * CE + warm-up * (alpha * TCKD + beta * NCKD), each at T with T^2."""

    name = "dkd"
    needs_teacher = True
    reads = frozenset({READS_LOGITS})
    params = (Param("alpha", ALPHA, low=0.0, search=(0.25, 4.0), log=True, short="a",
                    help="weight of TCKD, the target-vs-rest binary term (paper: 1)"),
              Param("beta", BETA, low=0.0, search=(0.5, 16.0), log=True, short="b",
                    help="weight of NCKD, the non-target classes' term (paper: 8 for resnet32x4 -> resnet8x4)"),
              Param("temperature", TEMPERATURE, low=0.0, low_open=True, search=(1.0, 8.0), log=True, short="T",
                    help="softmax temperature (paper: 4 on CIFAR-100)"),
              Param("warmup_epochs", WARMUP_EPOCHS, kind="int", low=0, search=(0, 20), short="wu",
                    help="epochs over which the DKD terms ramp up linearly (paper: 20 of 240)"),
              LOGIT_STANDARDIZE)
    paper = "Zhao, Cui, Song, Qiu & Liang, Decoupled Knowledge Distillation, CVPR 2022"

    def __init__(self, config):
        super().__init__(config)
        self.warmup = 1.0

    @property
    def teacher_temperature(self) -> float:
        return self.config.temperature

    def begin_epoch(self, epoch: int, total_epochs: int) -> None:
        self.warmup = dkd_warmup(epoch, self.config.warmup_epochs)

    def losses(self, out: Outputs) -> dict:
        terms = super().losses(out)
        student, teacher = logit_pair(self.config, out.student_logits, out.teacher_logits)
        tckd, nckd = dkd_terms(student, teacher, out.labels, self.config.temperature)
        if self.config.alpha > 0:
            terms["tckd"] = self.warmup * self.config.alpha * tckd
        if self.config.beta > 0:
            terms["nckd"] = self.warmup * self.config.beta * nckd
        return terms
