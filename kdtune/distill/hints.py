"""FitNets hints with a 1x1 adaptation layer (seed 001 §2.4 and §3.1), then KD.

Stage 'hint' (stage1_epochs): the student up to its guided layer(s), plus the adapters, minimise
    beta * sum over links k of D(r_k(v_k(x)), u_k(x))
where u_k is the teacher's hint layer, v_k the student's guided layer and r_k the adaptation layer: a 1x1
convolution for feature maps (a linear map for vectors). Seed 001 always puts the adapter after the guided
layer, so it is there even when widths match; heights and widths must already agree.
Stage 'main' (epochs): the whole student trains with KD, hard_weight * CE + alpha * S * KL (seed 001 §2.3;
S = T^2 under soft_scale="T2", the default, or 1 under soft_scale="none", the form seed 001 writes).
The hint stage keeps every student module it does not train in eval mode (their BatchNorm statistics stay
as they are, their dropout is off) and its forward stops after the last guided layer (kdtune/train/trainer.py).

Hint/guided pairs are links, as for method 'links' (a number or teacher.path=student.path): link k is the teacher's hint layer and the
student's guided layer; several links give several pairs. D is set by hint_loss:
    hint_loss="mean" (default): MSE, the mean over elements, so beta means the same whatever the feature size
    hint_loss="sum": FitNets' 1/2 * ||u - r(v)||^2, summed over C*H*W (or the vector), averaged over the batch
        (seed 001 eq. 2.4 writes ||u - r(v)||^2 without the 1/2: the same up to beta's factor of 2)
"""
from __future__ import annotations

import torch
from torch import nn

from kdtune.config import TrialConfig
from kdtune.distill.base import READS_FEATURES, READS_LOGITS, Outputs, Stage
from kdtune.config import HINT_LOSSES, Param
from kdtune.distill.kd import BETA, LINKS, STAGE1_EPOCHS, KnowledgeDistillation
from kdtune.distill.links import adapter_key, make_adapter
from kdtune.distill.losses import hint_distance
from kdtune.errors import ConfigError


HINT_LOSS = Param("hint_loss", "mean", kind="str", choices=HINT_LOSSES,
                  help="mean: MSE; sum: FitNets' 1/2 * ||u - r(v)||^2 summed per sample")


class Hints(KnowledgeDistillation):
    """FitNets hints (seed 001): a hint stage through a 1x1 adapter, then KD."""

    name = "hints"
    reads = frozenset({READS_LOGITS, READS_FEATURES})
    params = KnowledgeDistillation.params + (BETA, LINKS, STAGE1_EPOCHS, HINT_LOSS)
    paper = "Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015 (seed 001)"

    @classmethod
    def check_config(cls, config: TrialConfig) -> None:
        super().check_config(config)
        if not config.links:
            raise ConfigError("links='': method 'hints' needs at least one hint/guided link, e.g. links='2'")
        if config.alpha <= 0 and config.effective_hard_weight <= 0:
            raise ConfigError(f"alpha={config.alpha}, hard_weight={config.effective_hard_weight}: method 'hints' "
                              "needs a KD stage with a term of weight > 0")

    def link_keys(self) -> tuple[str, ...]:
        return self.config.links

    def setup(self, student_shapes, teacher_shapes, num_classes=None) -> None:
        self.adapters = nn.ModuleDict({
            adapter_key(k): make_adapter(student_shapes[k], teacher_shapes[k], k, always=True,
                                         spatial=self.config.link_spatial)
            for k in self.config.links
        })

    def stages(self) -> list[Stage]:
        return [
            Stage("hint", self.config.stage1_epochs, frozenset({"hint"}), train_up_to=self.config.links),
            Stage("main", self.config.epochs, self.kd_terms(), uses_teacher=self.config.alpha > 0),
        ]

    def student_side_parameters(self, stage: Stage) -> list[nn.Parameter]:
        # the adapters only serve the hint stage; KD afterwards trains the student alone
        return list(self.adapters.parameters()) if stage.name == "hint" else []

    def losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        terms = super().losses(out)
        if self.term_on("hint"):
            terms["hint"] = self.config.beta * sum(
                hint_distance(self.adapters[adapter_key(k)](out.student_features[k]), out.teacher_features[k],
                              self.config.hint_loss)
                for k in self.config.links)
        return terms
