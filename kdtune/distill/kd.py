"""Hinton KD: hard_weight * CE(y, p_S) + alpha * T^2 * KL(p_T^T || p_S^T)."""
from __future__ import annotations

import torch

from kdtune.distill.base import Method, Outputs
from kdtune.distill.losses import soft_loss


class KnowledgeDistillation(Method):
    name = "kd"
    needs_teacher = True

    @property
    def hard_weight(self) -> float:
        return self.config.effective_hard_weight

    def losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        terms = {}
        if self.hard_weight > 0:
            terms.update(super().losses(out))
        if self.config.alpha > 0:
            terms["soft"] = self.config.alpha * soft_loss(out.student_logits, out.teacher_logits,
                                                          self.config.temperature)
        return terms
