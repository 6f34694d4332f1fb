"""Flow of the solution procedure (FSP, seed 002), then normal training.

Stage 'fsp' (stage1_epochs): the student minimises
    beta * mean over samples of sum over pairs i of ||G_i^T - G_i^S||_2^2,   G = F1^T F2 / (h * w)
one lambda (= beta) for every pair, as the paper does. A pair "a-b" of fsp_pairs names two links (numbers or teacher.path=student.path) of equal
height and width; it is taken in both networks, so the student's matrix lines up with the teacher's.
Stage 'main' (epochs): the main task, hard_weight * CE, plus alpha * S * KL when alpha > 0
(alpha=0 is seed 002's stage 2; S = T^2 or 1 by soft_scale, as for kd).
The FSP stage keeps every student module it does not train in eval mode (BatchNorm statistics unchanged,
dropout off) and its forward stops after the last linked layer (kdtune/train/trainer.py).

Widths must match too (seed 002's ResNet-8/26/32 all have 16/32/64 channels per section): a 1x1 adapter would
let the student match a projection of its flow instead of the flow itself, which the paper never does, so
a pair whose matrices differ in shape is refused at set-up with a ConfigError.
"""
from __future__ import annotations

import torch

from kdtune.config import Param, TrialConfig, format_pairs
from kdtune.distill.base import READS_FEATURES, READS_LOGITS, Outputs, Stage
from kdtune.distill.kd import BETA, STAGE1_EPOCHS, KnowledgeDistillation
from kdtune.distill.losses import fsp_distance, fsp_matrix
from kdtune.errors import ConfigError


FSP_PAIRS = Param("fsp_pairs", (), kind="pairs", search="fsp_pairs",
                  help="layer pairs of links of equal spatial size, e.g. 1-2,3-4,5-6")


class FlowOfSolution(KnowledgeDistillation):
    """FSP matrices (seed 002): an FSP stage matching G = F1^T F2 / (h*w), then normal training."""

    name = "fsp"
    reads = frozenset({READS_LOGITS, READS_FEATURES})
    params = KnowledgeDistillation.params + (BETA, FSP_PAIRS, STAGE1_EPOCHS)
    paper = "Yim et al., A Gift from Knowledge Distillation, CVPR 2017 (seed 002)"

    @classmethod
    def check_config(cls, config: TrialConfig) -> None:
        super().check_config(config)
        if not config.fsp_pairs:
            raise ConfigError("fsp_pairs='': method 'fsp' needs at least one layer pair, e.g. fsp_pairs='1-2,3-4,5-6'")
        if config.alpha <= 0 and config.effective_hard_weight <= 0:
            raise ConfigError(f"alpha={config.alpha}, hard_weight={config.effective_hard_weight}: method 'fsp' "
                              "needs a main stage with a term of weight > 0")

    def link_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for pair in self.config.fsp_pairs for k in pair))

    def setup(self, student_shapes, teacher_shapes, num_classes=None) -> None:
        """Equal spatial sizes within each network, equal matrix shapes across them: checked on real shapes."""
        config = self.config
        for first, second in config.fsp_pairs:
            for model, shapes in ((config.student, student_shapes), (config.teacher, teacher_shapes)):
                a, b = shapes[first], shapes[second]
                if len(a) != 4 or len(b) != 4 or a[2:] != b[2:]:
                    raise ConfigError(
                        f"fsp_pairs={format_pairs(config.fsp_pairs)}: links {first} {tuple(a[1:])} and {second} "
                        f"{tuple(b[1:])} of {model} differ in spatial size; a pair needs two feature maps of "
                        "equal height and width")
            s = (student_shapes[first][1], student_shapes[second][1])
            t = (teacher_shapes[first][1], teacher_shapes[second][1])
            if s != t:
                raise ConfigError(
                    f"fsp_pairs={format_pairs(config.fsp_pairs)}: pair {first}-{second} gives a {s[0]}x{s[1]} FSP "
                    f"matrix in {config.student} but {t[0]}x{t[1]} in {config.teacher}; FSP needs equal channel "
                    "widths at both links (as seed 002's ResNets have)")

    def stages(self) -> list[Stage]:
        return [
            Stage("fsp", self.config.stage1_epochs, frozenset({"fsp"}), train_up_to=self.link_keys()),
            Stage("main", self.config.epochs, self.kd_terms(), uses_teacher=self.config.alpha > 0),
        ]

    def losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        terms = super().losses(out)
        if self.term_on("fsp"):
            pairs = self.config.fsp_pairs
            student = [fsp_matrix(out.student_features[a], out.student_features[b]) for a, b in pairs]
            teacher = [fsp_matrix(out.teacher_features[a], out.teacher_features[b]) for a, b in pairs]
            terms["fsp"] = self.config.beta * fsp_distance(student, teacher)
        return terms
