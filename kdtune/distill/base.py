"""What every distillation method shares: the weighted hard term, the stage list, the hooks the engine calls.

A method is an nn.Module (so its extra trainable parts, such as 1x1 adapters or a discriminator, are saved
with the trainer's checkpoint). Given one batch's outputs it returns a dict of named loss terms, each already
multiplied by its weight; the engine sums them and logs each term per epoch.

The engine drives every method through the same hooks, in this order:
  setup(shapes)            once, when the linked feature shapes are known
  start_stage(stage, tr)   once at a stage's first epoch (not again on resume): one-off work such as
                           fitting a discriminator; returns metrics reported from then on
  use_stage(stage)         whenever a stage becomes current (also after a resume): which terms to compute
  before_student_step(out) every batch, after the student's forward pass and before its loss
                           (a discriminator step); returns per-batch metrics averaged per epoch
  losses(out)              every batch: the weighted terms of the student's loss
A stage names the student parameters it trains (`train_up_to`) and the method's own parameters that join
the student's optimiser (`student_side_parameters`); a part with its own optimiser (a discriminator) is
left out of it and saves that optimiser through get_extra_state.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kdtune.config import Param, TrialConfig
from kdtune.distill.losses import ensemble_logits, hard_loss


@dataclass(frozen=True)
class Stage:
    """A span of epochs with some loss terms on. Two-stage methods (hints, FSP, ...) return two.

    train_up_to: student link numbers; the stage trains only the student parameters their features depend
    on (FitNets' stage 1 trains the student up to its guided layer); empty = the whole student. In such a
    stage the student modules it does not train stay in eval mode (BatchNorm statistics unchanged, dropout
    off), the student's (and an online teacher's) forward stops once the feature of every link in train_up_to
    is captured, so Outputs.student_logits and teacher_logits are None: the stage's `terms` may read only
    those features (a method computes only the terms its stage has on; see term_on).
    uses_teacher: whether the batch loss reads the teacher; when not, the engine skips the teacher's forward.
    """

    name: str
    epochs: int
    terms: frozenset[str] | None = None  # None: every term the method has
    train_up_to: tuple[str, ...] = ()  # links: train only the student parameters feeding them
    uses_teacher: bool = True


@dataclass
class Outputs:
    """One batch as the method sees it."""

    labels: torch.Tensor
    indices: torch.Tensor
    student_logits: torch.Tensor | None  # None in a stage with train_up_to: its forward stops at the last link
    teacher_logits: torch.Tensor | None = None
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)  # by link
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)


# What a method reads, declared so the logit cache, fusion and ensembles decide by themselves whether they apply:
READS_LOGITS = "logits"      # the teacher's logits only: cached logits and ensembles serve it
READS_FEATURES = "features"  # the teacher's intermediate features (links, embeddings): the teacher runs online
READS_MEMORY = "memory"      # a memory of past embeddings keyed by sample index (CRD): needs the sample indices


class Method(nn.Module):
    """A distillation method. Subclass it, give it a `name` and its `params` (a tuple of kdtune.config.Param),
    return its weighted loss terms from `losses`, and name it in a study as `package.module:Class` (see
    kdtune/distill/registry.py and README "Your own method")."""

    name = "none"
    needs_teacher = False
    reads: frozenset[str] = frozenset()  # READS_*: what of the teacher (and of past batches) the method reads
    params: tuple[Param, ...] = ()  # the method's own settings, declared once (kdtune/config.py, Param)
    paper: str = ""  # the source: authors, venue, year

    def __init__(self, config: TrialConfig):
        super().__init__()
        self.config = config
        self.stage: Stage | None = None  # set by use_stage; None (a bare method, as in tests) computes every term

    @classmethod
    def check_config(cls, config: TrialConfig) -> None:
        """Checks across the method's parameters (each one alone is checked by its Param)."""

    @classmethod
    def describe(cls) -> str:
        """The first line of the class docstring (`kdtune methods list`)."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def default_hard_weight(cls, config: TrialConfig) -> float:
        """The hard term's weight when hard_weight is not set."""
        return 1.0

    @property
    def needs_teacher_features(self) -> bool:
        """Methods that read teacher features cannot use cached teacher logits."""
        return bool(self.link_keys())

    def link_keys(self) -> tuple[str, ...]:
        """The links (numbers or teacher.path=student.path, see config.parse_links) whose features it reads."""
        return ()

    @property
    def teacher_temperature(self) -> float:
        """The temperature at which an ensemble's soft target is formed for this method (losses.ensemble_logits):
        a method with a soft term uses its T; the others read the ensemble's own prediction, T = 1."""
        return 1.0

    def teacher_view(self, teacher_logits: torch.Tensor | None) -> torch.Tensor | None:
        """What `Outputs.teacher_logits` holds for this method, from one teacher's (N, C) logits (unchanged) or an
        ensemble's member logits (M, N, C), online or cached alike: the one place member logits become a target."""
        return None if teacher_logits is None else ensemble_logits(teacher_logits, self.teacher_temperature)

    def bind_data(self, train_indices: torch.Tensor) -> None:
        """The training split's sample indices (what `Outputs.indices` holds), before `setup`: a method keeping a
        memory per training sample (CRD) sizes and keys it by them."""

    def begin_epoch(self, epoch: int, total_epochs: int) -> None:
        """Before each epoch, counted from 1 across stages (also after a resume): for weights that follow the
        epoch (DKD's warm-up, CTKD's curriculum)."""

    def setup(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size],
              num_classes: int | None = None) -> None:
        """Create extra modules once the feature shapes are known (called before the optimiser is built)."""

    def stages(self) -> list[Stage]:
        return [Stage("main", self.config.epochs, uses_teacher=self.needs_teacher)]

    def student_side_parameters(self, stage: Stage) -> list[nn.Parameter]:
        """The method's parameters optimised together with the student in this stage (e.g. adapters)."""
        return list(self.parameters())

    def start_stage(self, stage: Stage, trainer) -> dict[str, float]:
        return {}

    def use_stage(self, stage: Stage) -> None:
        self.stage = stage

    def term_on(self, name: str) -> bool:
        """Whether the current stage uses this term (so a method can skip computing the others)."""
        return self.stage is None or self.stage.terms is None or name in self.stage.terms

    def before_student_step(self, out: Outputs) -> dict[str, torch.Tensor]:
        return {}

    def losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        return {"hard": self.hard_weight * hard_loss(out.student_logits, out.labels)}

    @property
    def hard_weight(self) -> float:
        """The hard term's weight: hard_weight, or the method's default for it (default_hard_weight)."""
        return self.config.effective_hard_weight


class NoDistillation(Method):
    """The baseline student: hard labels only, weight 1."""

    name = "none"

    @property
    def hard_weight(self) -> float:
        return 1.0  # the baseline is the student trained alone, whatever hard_weight a study sets
