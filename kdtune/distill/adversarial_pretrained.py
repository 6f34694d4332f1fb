"""Adversarial KD with a pre-trained, fixed discriminator (seed 004 §3.2).

One trial runs seed 004's whole procedure:
  stage 'pretrain' (stage1_epochs): the student trains on hard labels alone (CE, weight 1): the
      "pre-trained student" seed 004 starts from.
  at the start of stage 'adversarial': a discriminator D (seed 003's 3-layer MLP, one output: the logit of
      'from the student') is fitted for disc_epochs epochs on teacher logits (label 0) and the pre-trained
      student's logits (label 1) of the training split, 20% of those samples held out; its held-out accuracy
      is reported as `disc_heldout_acc` in every later epoch. D is fixed from then on.
  stage 'adversarial' (epochs): the student minimises hard_weight * CE(y, P_S) + loss_adv, where loss_adv
      is set by adv_loss (hard_weight and adv_weight are seed 004's alpha and beta):
      adv_loss="paper" (default), the form seed 004 writes:
          loss_adv = -adv_weight * L_class(a_S | student),   L_class = -log P_D(student | a_S)
          the discriminator's loss for the true label 'student'. Minimising -L_class maximises D's error on
          the student: the student is pushed towards logits D calls 'teacher'. loss_adv is <= 0 and UNBOUNDED
          below: the student maximises a cross-entropy, which it can do without end by growing its logits
          (measured: NaN after ~500 SGD steps at beta 1, logits of 1e16 at beta 0.1; the trial then ends as
          diverged).
      adv_loss="nonsaturating", the GAN generator's non-saturating form:
          loss_adv = adv_weight * -log P_D(teacher | a_S)
          the same push (towards logits D calls 'teacher'), but loss_adv is >= 0, BOUNDED below by 0, and its
          gradient fades once D is fooled.
The teacher is only needed for the fit, so neither stage runs it per batch; cached teacher logits serve.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kdtune.config import ADV_LOSSES, Param, TrialConfig
from kdtune.distill.base import READS_LOGITS, Method, Outputs, Stage
from kdtune.distill.discriminator import (ADV_WEIGHT, DISC_HIDDEN, DISC_LR, LogitDiscriminator,
                                          discriminator_optimizer)
from kdtune.distill.kd import STAGE1_EPOCHS
from kdtune.distill.losses import hard_loss, seed004_adversarial_loss
from kdtune.errors import ConfigError

HELD_OUT = 0.2  # share of the training split kept from the discriminator's fit to measure its accuracy
FIT_BATCH = 128  # the fit is a small, separate problem: its batch need not be the student's


class PretrainedDiscriminator(Method):
    """Seed 004: pre-train the student, fit a discriminator on teacher vs student logits, then fool it."""

    name = "adversarial_pretrained"
    needs_teacher = True
    reads = frozenset({READS_LOGITS})
    params = (STAGE1_EPOCHS, ADV_WEIGHT, DISC_LR, DISC_HIDDEN,
              Param("disc_epochs", 10, kind="int", low=1,
                    help="epochs fitting the discriminator before the adversarial stage"),
              Param("adv_loss", "paper", kind="str", choices=ADV_LOSSES,
                    help="paper: -beta * L_class as seed 004 writes it (unbounded); nonsaturating: "
                         "beta * -log P_D(teacher | a_S) (>= 0)"))
    paper = "seed 004: KD and adversarial KD with a pre-trained discriminator (MLPs on MNIST)"

    @classmethod
    def check_config(cls, config: TrialConfig) -> None:
        super().check_config(config)
        if config.effective_hard_weight <= 0 and config.adv_weight <= 0:
            raise ConfigError(f"hard_weight={config.effective_hard_weight}, adv_weight={config.adv_weight}: method "
                              "'adversarial_pretrained' needs a term of weight > 0")

    @property
    def hard_weight(self) -> float:
        # seed 004's alpha applies to the adversarial stage; pre-training is plain training
        pretraining = self.stage is not None and self.stage.name == "pretrain"
        return 1.0 if pretraining else self.config.effective_hard_weight

    def setup(self, student_shapes, teacher_shapes, num_classes=None) -> None:
        self.discriminator = LogitDiscriminator(num_classes, self.config.disc_hidden, 1)
        self.discriminator.requires_grad_(False)  # trained only inside fit_discriminator

    def stages(self) -> list[Stage]:
        adversarial = frozenset(name for name, weight in (("hard", self.config.effective_hard_weight),
                                                          ("adv", self.config.adv_weight)) if weight > 0)
        return [Stage("pretrain", self.config.stage1_epochs, frozenset({"hard"}), uses_teacher=False),
                Stage("adversarial", self.config.epochs, adversarial, uses_teacher=False)]

    def student_side_parameters(self, stage: Stage) -> list[nn.Parameter]:
        return []

    def train(self, mode: bool = True):
        super().train(mode)
        self.discriminator.eval()  # fixed: no dropout once fitted
        return self

    def start_stage(self, stage: Stage, trainer) -> dict[str, float]:
        if stage.name != "adversarial":
            return {}
        student, teacher, _ = trainer.collect_logits(trainer.train)
        return {"disc_heldout_acc": self.fit_discriminator(teacher, student)}

    def fit_discriminator(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
        """Fit D on teacher (0) vs student (1) logits of the same samples; return its held-out accuracy."""
        config = self.config
        generator = torch.Generator().manual_seed(config.seed)
        order = torch.randperm(len(teacher_logits), generator=generator).to(teacher_logits.device)
        held = order[:max(1, int(len(order) * HELD_OUT))]
        fit = order[len(held):]

        def pairs(index):
            inputs = torch.cat([teacher_logits[index], student_logits[index]])
            return inputs, torch.cat([torch.zeros(len(index)), torch.ones(len(index))]).to(inputs.device)

        inputs, targets = pairs(fit)
        optimizer = discriminator_optimizer(self.discriminator, config)
        self.discriminator.requires_grad_(True).train()
        for _ in range(config.disc_epochs):
            shuffled = torch.randperm(len(inputs), generator=generator).to(inputs.device)
            for start in range(0, len(inputs), FIT_BATCH):
                batch = shuffled[start:start + FIT_BATCH]
                loss = F.binary_cross_entropy_with_logits(self.discriminator(inputs[batch]).squeeze(1),
                                                          targets[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.discriminator.requires_grad_(False).eval()
        inputs, targets = pairs(held)
        with torch.no_grad():
            predicted = (self.discriminator(inputs).squeeze(1) > 0).float()
        return float((predicted == targets).float().mean())

    def losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        terms = {}
        if self.hard_weight > 0 and self.term_on("hard"):
            terms["hard"] = self.hard_weight * hard_loss(out.student_logits, out.labels)
        if self.config.adv_weight > 0 and self.term_on("adv"):
            terms["adv"] = self.config.adv_weight * seed004_adversarial_loss(self.discriminator(out.student_logits),
                                                                             self.config.adv_loss)
        return terms
