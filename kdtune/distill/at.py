"""Attention Transfer (AT) as plain loss functions: Zagoruyko & Komodakis, "Paying More Attention to Attention:
Improving the Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017.

Checked against the authors' code, github.com/szagoruyko/attention-transfer (utils.py `at` / `at_loss`, cifar.py,
README; commit 893df54), and RepDistiller's port (github.com/HobbitLong/RepDistiller, distiller_zoo/AT.py; the
spatial pooling below), which mdistiller repeats (mdistiller/distillers/AT.py).

The paper (Sec. 3.1, activation-based attention) maps an activation tensor A (C, H, W) to a spatial attention map
with F^p_sum(A) = sum_c |A_c|^p (p = 2 in the experiments), and eq. 2 adds, for every chosen student/teacher layer
pair j,

    beta/2 * || Q_S^j / ||Q_S^j||_2 - Q_T^j / ||Q_T^j||_2 ||_p        (Q^j = vec(F(A^j)), p = 2)

to the student's loss. The text sets beta to 10^3 divided by the number of elements in the attention map and the
batch size, per layer. The authors' code computes something slightly different, and `attention_loss` does what
the code does (see its docstring).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The weight the authors train with: cifar.py adds `beta * sum over layer pairs of at_loss` to the loss and the
# README runs it with --beta 1e+3, on CIFAR and on ImageNet (RepDistiller's script: -b 1000; mdistiller's
# CFG.AT.LOSS.FEAT_WEIGHT = 1000). No 1/2: the code has no beta/2.
PAPER_BETA = 1000.0


def _floating(tensor: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (exact checks); everything else is computed in float32."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def attention_map(feature: torch.Tensor, p: float = 2) -> torch.Tensor:
    """The spatial attention map Q of an (N, C, H, W) feature map, or of an (N, C, L) map of a 1-D signal, per sample:

        Q = vec( mean over channels c of |A_c|^p ) / || vec(...) ||_2           shape (N, H*W) or (N, L)

    The paper's F^p_sum sums over channels; the mean (the authors' code: x.pow(2).mean(1)) differs by 1/C, which the
    L2 normalisation removes, so student and teacher may have different channel counts. For p = 2 (the paper's and
    the code's choice) |A|^p is A^p; the absolute value matters only for odd p. Normalisation is F.normalize's
    (eps 1e-12), as in the code: an all-zero map stays zero instead of becoming NaN.
    """
    if feature.dim() not in (3, 4):
        raise ValueError(f"attention_map: feature of shape {tuple(feature.shape)}: expected (N, C, H, W) or (N, C, L)")
    energy = _floating(feature).abs().pow(p).mean(dim=1)
    return F.normalize(energy.flatten(1), p=2, dim=1)


def _pool_to(feature: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    if tuple(feature.shape[2:]) == size:
        return feature
    if feature.dim() == 4:
        return F.adaptive_avg_pool2d(feature, size)
    return F.adaptive_avg_pool1d(feature, size)


def attention_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2) -> torch.Tensor:
    """AT loss of one layer pair, as the authors' code computes it (utils.at_loss):

        at_loss = mean over the N * (H*W) elements of (Q_S - Q_T)^2
                = 1 / (N * H*W) * sum_i || Q_S,i - Q_T,i ||_2^2

    with Q = attention_map(feature, p), each sample's map L2-normalised. Relation to the paper's eq. 2,
    beta/2 * || Q_S/||Q_S|| - Q_T/||Q_T|| ||_p: the code squares the norm (eq. 2 writes the norm itself), and the
    mean over the batch and the map's H*W positions is the paper's "beta = 10^3 divided by the number of elements
    in the attention map and batch size". The authors then add beta * sum over layer pairs of at_loss with
    beta = 1000 (PAPER_BETA; README: --beta 1e+3): there is no 1/2, so read literally the code's weight is twice
    eq. 2's beta/2 with that beta. A Method should weigh this loss by beta (1000 reproduces the authors).

    Spatial sizes may differ (student and teacher downsample differently): the larger map is adaptive-average-
    pooled down to the smaller one before the attention maps are formed, as RepDistiller (distiller_zoo/AT.py)
    does. RepDistiller compares only H and pools to a square (t_H, t_H); here each spatial dimension is pooled to
    the smaller of the two sizes, which is the same for square maps and also handles non-square and (N, C, L) maps.
    The original code needs equal sizes (its pairs are chosen so). Channel counts may differ (see attention_map).

    The teacher side is detached: the gradient flows to the student feature only (the authors compute the teacher
    under torch.no_grad()).
    """
    if student_feature.dim() != teacher_feature.dim() or student_feature.dim() not in (3, 4):
        raise ValueError(f"attention_loss: student {tuple(student_feature.shape)} and teacher "
                         f"{tuple(teacher_feature.shape)}: expected two (N, C, H, W) or two (N, C, L) maps")
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise ValueError(f"attention_loss: batch sizes differ: student {student_feature.shape[0]}, "
                         f"teacher {teacher_feature.shape[0]}")
    teacher_feature = teacher_feature.detach()
    size = tuple(min(s, t) for s, t in zip(student_feature.shape[2:], teacher_feature.shape[2:]))
    student_map = attention_map(_pool_to(_floating(student_feature), size), p)
    teacher_map = attention_map(_pool_to(_floating(teacher_feature), size), p)
    return (student_map - teacher_map.to(student_map.dtype)).pow(2).mean()


# ---- the method ---------------------------------------------------------------------------------
from kdtune.config import Param  # noqa: E402
from kdtune.distill.base import READS_FEATURES, READS_LOGITS, Method, Outputs  # noqa: E402
from kdtune.distill.kd import LINKS  # noqa: E402
from kdtune.errors import ConfigError  # noqa: E402


class AttentionTransfer(Method):
    """Attention transfer: hard_weight * CE + beta * sum over links of the attention-map loss."""

    name = "at"
    needs_teacher = True
    reads = frozenset({READS_LOGITS, READS_FEATURES})
    params = (Param("beta", PAPER_BETA, low=0.0, low_open=True, search=(0.1, 5000.0), log=True, short="b",
                    help="weight of the attention term, summed over the links (the authors' code: 1000)"),
              LINKS,
              Param("p", 2.0, low=0.0, low_open=True, help="the power of |A_c| averaged over channels (paper: 2)"))
    paper = "Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017"

    @classmethod
    def check_config(cls, config) -> None:
        if not config.links:
            raise ConfigError("links='': method 'at' needs at least one linked pair of feature maps, e.g. links='1,2,3'")

    def link_keys(self) -> tuple[str, ...]:
        return self.config.links

    def setup(self, student_shapes, teacher_shapes, num_classes=None) -> None:
        for link in self.config.links:
            if len(student_shapes[link]) not in (3, 4) or len(teacher_shapes[link]) not in (3, 4):
                raise ConfigError(f"link {link}: method 'at' needs feature maps (C x H x W or C x L), got student "
                                  f"{tuple(student_shapes[link][1:])} and teacher {tuple(teacher_shapes[link][1:])}")

    def losses(self, out: Outputs) -> dict:
        terms = super().losses(out)
        terms["attention"] = self.config.beta * sum(
            attention_loss(out.student_features[k], out.teacher_features[k], self.config.p) for k in self.config.links)
        return terms
