"""Conditional adversarial KD (seed 003): a discriminator on logits learns the loss that transfers knowledge.

Every batch, first the discriminator D (C + 2 outputs: C labels, then Real/Fake) takes one step of its own
optimiser, maximising (L_A + L_DS) / 2 on teacher logits (real) and detached student logits (fake); then
the student minimises
    hard_weight * L_S + l1_weight * L_L1 + adv_weight * L_GAN,   L_GAN = (L_A - L_DS) / 2
(eq. 5; the paper's weights are all 1). L_A and L_DS are log-likelihoods (kdtune/distill/losses.py), so
lowering L_A pushes the student's logits towards 'Real' and lowering -L_DS towards the right label under D's
label head: both fool-the-discriminator and keep-the-class. L_GAN keeps the teacher halves of L_A and L_DS as
the paper writes it; they are constant for the student, so the logged value is the paper's and the gradient
is unchanged. A term of weight 0 is left out: seed 003 Table 2's ablation is a grid over
hard_weight, l1_weight and adv_weight (with adv_weight=0 the discriminator is not trained at all).

Only logits are used, so the offline teacher-logit cache serves this method. D's weights and its optimiser's
state are part of the method's state_dict (get_extra_state), so a resumed trial continues exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from kdtune.config import Param, TrialConfig
from kdtune.distill.base import READS_LOGITS, Method, Outputs, Stage
from kdtune.distill.discriminator import (ADV_WEIGHT, DISC_HIDDEN, DISC_LR, LogitDiscriminator,
                                          discriminator_optimizer)
from kdtune.distill.losses import FAKE, REAL, adversarial_log_likelihoods, hard_loss, l1_alignment
from kdtune.errors import ConfigError


class ConditionalAdversarial(Method):
    """Seed 003: a conditional discriminator on logits (C+2 outputs) plus L1 logit alignment."""

    name = "adversarial"
    needs_teacher = True
    reads = frozenset({READS_LOGITS})
    params = (ADV_WEIGHT, DISC_LR, Param("l1_weight", 1.0, low=0.0, search=(0.01, 10.0), log=True, short="l1",
                                         help="weight of L_L1, the mean L1 distance of student and teacher logits"),
              DISC_HIDDEN)
    paper = "Xu et al., conditional adversarial networks for KD (seed 003)"

    @classmethod
    def check_config(cls, config: TrialConfig) -> None:
        super().check_config(config)
        if config.effective_hard_weight <= 0 and config.l1_weight <= 0 and config.adv_weight <= 0:
            raise ConfigError(f"hard_weight={config.effective_hard_weight}, l1_weight={config.l1_weight}, "
                              f"adv_weight={config.adv_weight}: method 'adversarial' needs a term of weight > 0")

    @property
    def hard_weight(self) -> float:
        return self.config.effective_hard_weight

    def setup(self, student_shapes, teacher_shapes, num_classes=None) -> None:
        self.discriminator = LogitDiscriminator(num_classes, self.config.disc_hidden, num_classes + 2)
        self.disc_optimizer = discriminator_optimizer(self.discriminator, self.config)

    def student_side_parameters(self, stage: Stage) -> list[nn.Parameter]:
        return []  # the discriminator has its own optimiser

    def before_student_step(self, out: Outputs) -> dict[str, torch.Tensor]:
        """One discriminator step: maximise (L_A + L_DS) / 2 with the student fixed (its logits detached)."""
        if self.config.adv_weight <= 0:
            return {}
        d_teacher = self.discriminator(out.teacher_logits.detach())
        d_student = self.discriminator(out.student_logits.detach())
        l_a, l_ds = adversarial_log_likelihoods(d_teacher, d_student, out.labels)
        objective = (l_a + l_ds) / 2
        self.disc_optimizer.zero_grad(set_to_none=True)
        (-objective).backward()
        self.disc_optimizer.step()
        source_correct = torch.cat([d_teacher[:, -2:].argmax(1) == REAL, d_student[:, -2:].argmax(1) == FAKE])
        return {"disc_objective": objective.detach(), "disc_source_acc": source_correct.float().mean()}

    def losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        config = self.config
        terms = {}
        if self.hard_weight > 0:
            terms["hard"] = self.hard_weight * hard_loss(out.student_logits, out.labels)
        if config.l1_weight > 0:
            terms["l1"] = config.l1_weight * l1_alignment(out.student_logits, out.teacher_logits)
        if config.adv_weight > 0:
            with torch.no_grad():  # the teacher halves are constants for the student
                d_teacher = self.discriminator(out.teacher_logits)
            # D is fixed in the student step: recorded without its parameters, the graph sends no gradient to D
            self.discriminator.requires_grad_(False)
            d_student = self.discriminator(out.student_logits)
            self.discriminator.requires_grad_(True)
            l_a, l_ds = adversarial_log_likelihoods(d_teacher, d_student, out.labels)
            terms["gan"] = config.adv_weight * (l_a - l_ds) / 2
        return terms

    def get_extra_state(self) -> dict:
        return {"disc_optimizer": self.disc_optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])
