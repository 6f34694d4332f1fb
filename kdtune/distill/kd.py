"""Hinton KD: hard_weight * CE(y, p_S) + alpha * S * KL(p_T^T || p_S^T).

S = T^2 with soft_scale="T2" (Hinton's scaling, the default), S = 1 with soft_scale="none" (the plain
H(P_T^T, P_S^T) / KL of seeds 000, 001 and 004). The methods built on KD (links, hints, fsp) use the same
soft term, so soft_scale applies to them too.
"""
from __future__ import annotations

import torch

from kdtune.config import SOFT_SCALES, Param, TrialConfig
from kdtune.distill.base import READS_LOGITS, Method, Outputs
from kdtune.distill.losses import soft_loss

# The settings every method with a Hinton soft term shares (kd and the methods built on it; DKD, DIST and CTKD
# reuse TEMPERATURE and LOGIT_STANDARDIZE)
TEMPERATURE = Param("temperature", 2.0, low=0.0, low_open=True, search=(0.5, 20.0), log=True, short="T",
                    help="softmax temperature T of the soft targets (may be below 1: seed 000 sweeps T = 0.6)")
ALPHA = Param("alpha", 0.5, low=0.0, search=(0.05, 1.0), short="a",
              help="weight of the soft term; hard_weight defaults to 1 - alpha")
SOFT_SCALE = Param("soft_scale", "T2", kind="str", choices=SOFT_SCALES,
                   help="T2: soft term times T^2 (Hinton); none: the plain KL the seeds write")
LOGIT_STANDARDIZE = Param("logit_standardize", False, kind="bool", short="LS",
                          help="z-score each sample's teacher and student logits before the temperature "
                               "(Sun et al., CVPR 2024)")


def logit_pair(config: TrialConfig, student_logits, teacher_logits):
    """The logits a soft term compares: as they are, or each sample's logits standardised (logit_standardize,
    Sun et al. 2024: (z - mean z) / std z, so the student matches the teacher's logit *relations* rather than
    their scale); the temperature is applied afterwards by the loss, as the paper's base temperature."""
    if not config.param("logit_standardize", False):
        return student_logits, teacher_logits
    from kdtune.distill.losses import standardize_logits

    return standardize_logits(student_logits), standardize_logits(teacher_logits)


class KnowledgeDistillation(Method):
    """Hinton KD: hard_weight * CE + alpha * S * KL(p_T^T || p_S^T)."""

    name = "kd"
    needs_teacher = True
    reads = frozenset({READS_LOGITS})
    params = (TEMPERATURE, ALPHA, SOFT_SCALE, LOGIT_STANDARDIZE)
    paper = "Hinton, Vinyals & Dean, Distilling the Knowledge in a Neural Network, 2015"

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
            student, teacher = logit_pair(self.config, out.student_logits, out.teacher_logits)
            terms["soft"] = self.config.alpha * soft_loss(student, teacher, self.config.temperature,
                                                          self.config.soft_scale)
        return terms

    def kd_terms(self) -> frozenset[str]:
        """The terms of a KD stage under this config (for two-stage methods whose second stage is KD)."""
        return frozenset(name for name, weight in (("hard", self.hard_weight), ("soft", self.config.alpha))
                         if weight > 0)


BETA = Param("beta", 1.0, low=0.0, low_open=True, search=(0.01, 10.0), log=True, short="b",
             help="weight of the intermediate (links, hints) or FSP term")
LINKS = Param("links", (), kind="links", search="link_sets", short="L",
              help="linked layers: link numbers both models declare, or teacher.path=student.path")
STAGE1_EPOCHS = Param("stage1_epochs", 1, kind="int", low=1, search=(1, 5),
                      help="epochs of the first stage, run before `epochs` epochs of the second")
