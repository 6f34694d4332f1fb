"""Hinton KD: hard_weight * CE(y, p_S) + alpha * S * KL(p_T^T || p_S^T).

S = T^2 with soft_scale="T2" (Hinton's scaling, the default), S = 1 with soft_scale="none" (the plain
H(P_T^T, P_S^T) / KL of seeds 000, 001 and 004). The methods built on KD (links, hints, fsp) use the same
soft term, so soft_scale applies to them too.
"""
from __future__ import annotations

import torch

from kdtune.config import TrialConfig
from kdtune.distill.base import Method, Outputs, Param
from kdtune.distill.losses import soft_loss


class KnowledgeDistillation(Method):
    name = "kd"
    needs_teacher = True
    search_parameters = (Param("temperature", 0.5, 20.0, log=True), Param("alpha", 0.05, 1.0))

    @classmethod
    def default_hard_weight(cls, config: TrialConfig) -> float:
        return 1.0 - config.alpha  # seed 001: (1 - alpha) * hard + alpha * soft

    @property
    def hard_weight(self) -> float:
        return self.config.effective_hard_weight

    @property
    def teacher_temperature(self) -> float:
        return self.config.temperature  # an ensemble's target is mean_i softmax(z_i / T) at this trial's T

    def losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        terms = {}
        if self.hard_weight > 0 and self.term_on("hard"):
            terms.update(super().losses(out))
        if self.config.alpha > 0 and self.term_on("soft"):
            terms["soft"] = self.config.alpha * soft_loss(out.student_logits, out.teacher_logits,
                                                          self.config.temperature, self.config.soft_scale)
        return terms

    def kd_terms(self) -> frozenset[str]:
        """The terms of a KD stage under this config (for two-stage methods whose second stage is KD)."""
        return frozenset(name for name, weight in (("hard", self.hard_weight), ("soft", self.config.alpha))
                         if weight > 0)


BETA = Param("beta", 0.01, 10.0, log=True)  # the weight of an intermediate (links, hints) or FSP term
LINK_SETS = Param("links", choices="link_sets")
STAGE1_EPOCHS = Param("stage1_epochs", 1, 5, integer=True)
