"""DIST as plain loss functions: Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher",
NeurIPS 2022.

Checked against the authors' code: github.com/hunto/image_classification_sota lib/models/losses/dist_kd.py (the
classification code DIST_KD points to, at the commit its submodule pins, d9662f7, identical to HEAD 6f7a70a) and
lib/models/losses/kd_loss.py (how it is built), the configs configs/strategies/distill/dist_cifar.yaml and
resnet_dist.yaml, and DIST_KD's segmentation/losses/dist_kd.py (the same loss without tau).

The paper replaces KD's exact match of probabilities by a match of relations, with the distance
d_p(u, v) = 1 - rho_p(u, v), rho_p the Pearson correlation coefficient, on the (B, C) probability matrices
Y^(s), Y^(t) = softmax(Z / tau):
    inter-class   L_inter = 1/B * sum_i d_p(Y^(s)_i,:, Y^(t)_i,:)     (each sample's distribution over classes)
    intra-class   L_intra = 1/C * sum_j d_p(Y^(s)_:,j, Y^(t)_:,j)     (each class's probabilities across the batch)
    L = alpha * L_cls + beta * L_inter + gamma * L_intra
Pearson's rho is invariant to a positive affine map a * u + b (a > 0) of either argument: L_inter does not change
when a sample's probabilities are scaled and shifted (the student need not match the teacher's confidence, only
its ranking and relative gaps, the paper's point), and L_intra does not change when one class's column is.
"""
from __future__ import annotations

import torch

# The authors' defaults (image_classification_sota kd_loss.py): 'dist' = DIST(beta=1, gamma=1, tau=1) on ImageNet
# (resnet_dist.yaml), 'dist_t4' = DIST(beta=1, gamma=1, tau=4) on CIFAR-100 (dist_cifar.yaml). Both configs then
# weigh the whole DIST term by kd_loss_weight = 2 against ori_loss_weight = 1 for the cross-entropy, so relative
# to the CE the effective weights are beta = gamma = 2.
TAU_IMAGENET = 1.0
TAU_CIFAR = 4.0
LOSS_WEIGHT = 2.0


def _floating(tensor: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (exact checks); everything else is computed in float32."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation of two (N, K) matrices, shape (N,), as the authors' pearson_correlation:

        rho_i = sum_k (a_ik - mean_i a)(b_ik - mean_i b) / ( ||a_i - mean_i a||_2 * ||b_i - mean_i b||_2 + eps )

    eps sits in the denominator (the authors' cosine_similarity), so a constant row gives 0, not NaN.
    """
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"pearson_rows: shapes {tuple(a.shape)} and {tuple(b.shape)}: expected two equal (N, K)")
    a_centred = a - a.mean(dim=1, keepdim=True)
    b_centred = b - b.mean(dim=1, keepdim=True)
    return (a_centred * b_centred).sum(dim=1) / (a_centred.norm(dim=1) * b_centred.norm(dim=1) + eps)


def inter_class_loss(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """L_inter = 1 - mean over samples i of pearson(p_s[i, :], p_t[i, :]), on (N, C) probabilities."""
    return 1 - pearson_rows(p_s, p_t).mean()


def intra_class_loss(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """L_intra = 1 - mean over classes j of pearson(p_s[:, j], p_t[:, j]) (each class across the batch).

    With a batch of one sample every column is constant, every correlation 0 and the loss 1, with no gradient
    (as in the authors' code).
    """
    return inter_class_loss(p_s.transpose(0, 1), p_t.transpose(0, 1))


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float, beta: float = 1.0,
              gamma: float = 1.0) -> dict[str, torch.Tensor]:
    """DIST's two terms on (N, C) logits, as the authors' DIST.forward computes them:

        p = softmax(z / tau);   {"inter": tau^2 * beta * L_inter(p_s, p_t), "intra": tau^2 * gamma * L_intra(p_s, p_t)}

    The tau^2 factor is in the authors' code, on each term (as KD's T^2, it keeps the gradient scale as tau
    grows); beta = gamma = 1 are their DIST defaults, tau = 4 on CIFAR-100 (TAU_CIFAR) and 1 on ImageNet
    (TAU_IMAGENET), and their configs weigh the sum by 2 against the cross-entropy (LOSS_WEIGHT; see the module's
    constants). The teacher side is detached.
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"dist_loss: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}: "
                         "expected two equal (N, C) logit matrices")
    student = _floating(student_logits)
    p_s = torch.softmax(student / tau, dim=1)
    p_t = torch.softmax(_floating(teacher_logits.detach()) / tau, dim=1).to(p_s.dtype)
    return {"inter": tau**2 * beta * inter_class_loss(p_s, p_t),
            "intra": tau**2 * gamma * intra_class_loss(p_s, p_t)}


# ---- the method ---------------------------------------------------------------------------------
from kdtune.config import Param  # noqa: E402
from kdtune.distill.base import READS_LOGITS, Method, Outputs  # noqa: E402
from kdtune.distill.kd import LOGIT_STANDARDIZE, logit_pair  # noqa: E402


class DISTMethod(Method):
    """DIST: hard_weight * CE + beta * inter-class + gamma * intra-class Pearson relations of p = softmax(z/tau)."""

    name = "dist"
    needs_teacher = True
    reads = frozenset({READS_LOGITS})
    params = (Param("temperature", TAU_CIFAR, low=0.0, low_open=True, search=(1.0, 8.0), log=True, short="T",
                    help="tau of p = softmax(z / tau) (CIFAR: 4, ImageNet: 1)"),
              Param("beta", LOSS_WEIGHT, low=0.0, search=(0.1, 10.0), log=True, short="b",
                    help="weight of the inter-class relation (the authors' configs: 2 = 1 x loss weight 2)"),
              Param("gamma", LOSS_WEIGHT, low=0.0, search=(0.1, 10.0), log=True, short="g",
                    help="weight of the intra-class relation (the authors' configs: 2)"),
              LOGIT_STANDARDIZE)
    paper = "Huang, You, Wang, Qian & Xu, Knowledge Distillation from A Stronger Teacher, NeurIPS 2022"

    @property
    def teacher_temperature(self) -> float:
        return self.config.temperature

    def losses(self, out: Outputs) -> dict:
        terms = super().losses(out)
        student, teacher = logit_pair(self.config, out.student_logits, out.teacher_logits)
        relations = dist_loss(student, teacher, self.config.temperature, self.config.beta, self.config.gamma)
        terms.update({name: value for name, value in relations.items()
                      if (self.config.beta if name == "inter" else self.config.gamma) > 0})
        return terms
