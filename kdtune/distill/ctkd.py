"""Curriculum Temperature for Knowledge Distillation (CTKD, global temperature): Li, Li, Yang, Zhao, Song, Luo,
Li, Yang, AAAI 2023 (arXiv:2211.16231). The pieces only; a kdtune Method wraps them.

A learnable temperature tau is trained *adversarially*: the student minimises the KD loss at tau, while tau
sees that loss through a gradient reversal layer (GRL, Ganin & Lempitsky 2015) and so maximises it. The
strength lambda of the reversal follows an easy-to-hard curriculum, 0 -> 1 along a cosine over the first
decay_epochs epochs.

Checked by reading zhengli97/CTKD (commit 7d52522):
  * models/temp_global.py: ``Global_T`` holds one ``nn.Parameter(torch.ones(1))`` (init 1.0) and returns it
    through ``GradientReversalFunction`` (forward ``x.clone()``, backward ``lambda_ * grad``);
  * helper/loops.py: ``temp = opt.t_start + opt.t_end * torch.sigmoid(temp)`` with train_student.py defaults
    t_start=1, t_end=20: ``t_end`` is used as the *range*, so tau = 1 + 20 * sigmoid(w) lies in (1, 21) and
    starts at 1 + 20 * sigmoid(1) = 15.62;
  * train_student.py ``CosineDecay(max_value, min_value, num_loops).get_value(epoch)``
    = min + (max - min) * (1 + cos(pi * min(epoch, num_loops) / num_loops)) / 2, called once per epoch with
    epoch counted from 1; scripts/run_cifar_distill.sh uses ``--decay_max 0 --decay_min -1 --decay_loops 10``
    (run_imagenet_distill.sh: 5 loops), so the authors' lambda_ runs 0 -> -1 and the GRL's ``lambda_ * grad``
    is the reversal. Here lambda is written positive (0 -> 1) and the GRL multiplies by -lambda: the same
    gradients. The first epoch (epoch 1) already has lambda = (1 - cos(pi / 10)) / 2 = 0.0245.
  * distiller_zoo/KD.py ``DistillKL``: KLDivLoss(batchmean)(log_softmax(s / tau), softmax(t / tau)) * tau * tau,
    with tau a tensor, so tau's gradient flows through both the softmaxes and the tau^2 factor.
  * the temperature module is appended to the student's ``trainable_list``: one SGD optimiser (its lr, momentum,
    weight decay) trains the student and tau's parameter together.
CIFAR-100 loss weights in their scripts: CE 0.1 (-r), KD 0.9 (-a), kd_T=4 when no learned temperature.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# zhengli97/CTKD train_student.py argument defaults and scripts/run_cifar_distill.sh
T_START = 1.0            # --t_start
T_RANGE = 20.0           # --t_end (used as the range: tau = t_start + t_end * sigmoid(w))
T_INIT_PARAM = 1.0       # Global_T: nn.Parameter(torch.ones(1))
LAMBDA_MIN = 0.0         # -(--decay_max 0)
LAMBDA_MAX = 1.0         # -(--decay_min -1)
DECAY_EPOCHS = 10        # --decay_loops 10 on CIFAR-100 (5 in the ImageNet script)
CE_WEIGHT = 0.1          # -r 0.1 (CIFAR script)
KD_WEIGHT = 0.9          # -a 0.9


class GradientReversal(torch.autograd.Function):
    """Forward: the identity (a copy). Backward: -lambda * grad for x, nothing for lambda.

    Written with lambda >= 0 doing the reversal; the authors' GradientReversalFunction multiplies by their
    (negative) lambda_ instead, which is the same thing.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = float(lam)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """x in the forward pass; -lam times the incoming gradient in the backward pass."""
    return GradientReversal.apply(x, lam)


class GlobalTemperature(nn.Module):
    """One learnable scalar w turned into the distillation temperature tau = t_start + t_range * sigmoid(w),
    in the open interval (t_start, t_start + t_range); w starts at init_param (authors: 1.0, so tau = 15.62).

    forward(lam) returns tau as a 0-dim tensor with the reversal already applied to w: a KD loss computed at
    tau and back-propagated pushes w *up* that loss's gradient (scaled by lam) while the student goes down it.
    """

    def __init__(self, t_start: float = T_START, t_range: float = T_RANGE, init_param: float = T_INIT_PARAM):
        super().__init__()
        if t_range <= 0:
            raise ValueError(f"GlobalTemperature: t_range must be > 0, got {t_range}")
        if t_start <= 0:
            raise ValueError(f"GlobalTemperature: t_start must be > 0 (a temperature), got {t_start}")
        self.t_start = float(t_start)
        self.t_range = float(t_range)
        self.global_t = nn.Parameter(torch.full((1,), float(init_param)))

    def forward(self, lam: float) -> torch.Tensor:
        w = grad_reverse(self.global_t, lam)
        return (self.t_start + self.t_range * torch.sigmoid(w)).reshape(())

    @torch.no_grad()
    def value(self) -> float:
        """The current temperature as a number (for logging)."""
        return float(self.t_start + self.t_range * torch.sigmoid(self.global_t))

    def extra_repr(self) -> str:
        return f"t_start={self.t_start}, t_range={self.t_range}"


def ctkd_temperature(module: GlobalTemperature, lam: float) -> torch.Tensor:
    """The temperature tensor to use in this step's KD loss, with the gradient reversal of strength lam."""
    return module(lam)


def cosine_lambda(epoch: float, lambda_min: float = LAMBDA_MIN, lambda_max: float = LAMBDA_MAX,
                  decay_epochs: float = DECAY_EPOCHS) -> float:
    """The reversal strength of the curriculum:

        lambda(e) = lambda_min + (lambda_max - lambda_min) * (1 - cos(pi * e' / decay_epochs)) / 2,
        e' = min(max(e, 0), decay_epochs)

    i.e. lambda_min at e = 0, lambda_max from e = decay_epochs on (the authors' CosineDecay with
    max=-lambda_min, min=-lambda_max, negated). The authors call it with the 1-based epoch at the start of
    each epoch; a 0-based loop reproduces them by passing epoch + 1. decay_epochs <= 0 means no curriculum
    (lambda_max throughout).
    """
    if decay_epochs <= 0:
        return float(lambda_max)
    e = min(max(float(epoch), 0.0), float(decay_epochs))
    return float(lambda_min + (lambda_max - lambda_min) * (1.0 - math.cos(math.pi * e / decay_epochs)) / 2.0)


def ctkd_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 temperature: torch.Tensor) -> torch.Tensor:
    """tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau)), batchmean, with tau a tensor that keeps its graph
    (the authors' DistillKL): the student gets the usual KD gradient, tau gets d/dtau of the whole expression
    (through the softmaxes and tau^2), reversed by the GRL inside GlobalTemperature."""
    s = student_logits if student_logits.dtype in (torch.float32, torch.float64) else student_logits.float()
    t = teacher_logits.to(s.dtype)
    tau = temperature.to(s.dtype)
    return F.kl_div(F.log_softmax(s / tau, dim=1), F.softmax(t / tau, dim=1), reduction="batchmean") * tau * tau


# ---- the method ---------------------------------------------------------------------------------
from kdtune.config import Param  # noqa: E402
from kdtune.distill.base import READS_LOGITS, Method, Outputs  # noqa: E402
from kdtune.distill.kd import LOGIT_STANDARDIZE, logit_pair  # noqa: E402


class CurriculumTemperatureKD(Method):
    """CTKD: KD whose temperature is learnt adversarially (a reversed gradient), its strength on a cosine curriculum."""

    name = "ctkd"
    needs_teacher = True
    reads = frozenset({READS_LOGITS})
    params = (Param("alpha", KD_WEIGHT, low=0.0, search=(0.05, 1.0), short="a",
                    help="weight of the KD term; hard_weight defaults to 1 - alpha (the authors' CIFAR run: 0.9)"),
              Param("t_start", T_START, low=0.0, low_open=True, help="lowest temperature: T = t_start + t_range * sigmoid(w)"),
              Param("t_range", T_RANGE, low=0.0, low_open=True, help="temperature range above t_start (authors: 20)"),
              Param("lambda_max", LAMBDA_MAX, low=0.0, search=(0.1, 2.0), log=True, short="lam",
                    help="the reversal strength the curriculum reaches"),
              Param("decay_epochs", DECAY_EPOCHS, kind="int", low=1,
                    help="epochs of the cosine curriculum from lambda 0 to lambda_max (authors: 10)"),
              LOGIT_STANDARDIZE)
    paper = "Li et al., Curriculum Temperature for Knowledge Distillation, AAAI 2023"

    @classmethod
    def default_hard_weight(cls, config) -> float:
        return 1.0 - config.alpha

    @property
    def hard_weight(self) -> float:
        return self.config.effective_hard_weight

    def __init__(self, config):
        super().__init__(config)
        self.temperature = GlobalTemperature(config.t_start, config.t_range)
        self.lam = 0.0

    def begin_epoch(self, epoch: int, total_epochs: int) -> None:
        self.lam = cosine_lambda(epoch, LAMBDA_MIN, self.config.lambda_max, self.config.decay_epochs)

    def before_student_step(self, out: Outputs) -> dict:
        return {"ctkd_temperature": self.temperature(0.0).detach()}

    def losses(self, out: Outputs) -> dict:
        terms = super().losses(out) if self.hard_weight > 0 else {}
        if self.config.alpha > 0:
            student, teacher = logit_pair(self.config, out.student_logits, out.teacher_logits)
            terms["soft"] = self.config.alpha * ctkd_kd_loss(student, teacher, self.temperature(self.lam))
        return terms
