"""Typed, validated trial configuration.

Every value a user can set for one trial lives in `TrialConfig`. Ray Tune hands a trial a flat dict;
`TrialConfig.from_flat` turns it into a checked config or raises `ConfigError` with one line that names
the field, the value and what is allowed. Studies validate every trial's config before any trial starts.

Loss weights (the seed papers disagree, so every form is expressible):
  total = hard_weight * CE(y, p_S)                      "hard"
        + alpha * S * KL(p_T^T || p_S^T)                "soft"  (batchmean; T may be below 1)
        + beta * sum over links of MSE(adapter(f_S), f_T)  "intermediate"
  hard_weight defaults to 1 - alpha (seed 001's (1-a)*hard + a*soft); set it explicitly for
  seed 000's independent weights (0.05 / 0.6 / 0.35) or seed 004's hard + lambda*soft (hard_weight=1).
  Methods without a soft term (adversarial, adversarial_pretrained) default hard_weight to 1.
  S is set by soft_scale, in every method with a soft term (kd, links, hints, fsp):
    soft_scale="T2"   (default) S = T^2, Hinton's scaling: the soft gradient's size barely depends on T
    soft_scale="none" S = 1, the plain H(P_T^T, P_S^T) / KL that seeds 000, 001 and 004 write
  (KL and the seeds' cross-entropy differ by the teacher's entropy, a constant: same gradients.)

The other methods' weights (each term is logged as loss_<name>; kdtune/distill/<method>.py says more):
  hints   stage 'hint': beta * sum over links of D(1x1 adapter(f_S), f_T), then stage 'main' = kd
          hint_loss="mean" (default): D = MSE, the mean over elements
          hint_loss="sum": D = 1/2 * ||f_T - adapter(f_S)||^2 summed over C*H*W, averaged over the batch (FitNets)
  fsp     stage 'fsp':  beta * mean over samples of sum over fsp_pairs of ||G_T - G_S||^2, then stage 'main' = kd
          (alpha=0 gives seed 002's plain main-task stage 2)
  adversarial (seed 003)  hard_weight * L_S + l1_weight * L_L1 + adv_weight * L_GAN
  adversarial_pretrained (seed 004)  stage 'pretrain': CE, then stage 'adversarial':
          adv_loss="paper" (default): hard_weight * CE - adv_weight * L_class(a_S | student), as seed 004
              writes it; L_class = -log P_D(student | a_S), so the term is <= 0 and UNBOUNDED below (the
              student maximises a cross-entropy; a large adv_weight runs away to NaN)
          adv_loss="nonsaturating": hard_weight * CE + adv_weight * (-log P_D(teacher | a_S)); the term is
              >= 0, bounded below by 0, and pushes the same way
  Two-stage methods run stage1_epochs epochs of their first stage, then `epochs` epochs of the second.

Reproducibility: deterministic=True makes the trial use deterministic algorithms only
(torch.use_deterministic_algorithms(True, warn_only=False), cudnn.deterministic, no cudnn.benchmark); an op
without a deterministic implementation then raises a RuntimeError. On CUDA that includes (torch's documented
list) the backward of nn.AdaptiveAvgPool2d, which the ResNet and WRN models use for their global pooling, and
of bilinear interpolation (link_spatial='interpolate'). Deterministic cuBLAS also needs
CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before the process first uses CUDA; the trial sets it when
unset. deterministic=False (the default) lets cudnn.benchmark pick the fastest convolution algorithms on CUDA
(fixed-shape CNN training). The settings hold for the trial and are restored when it closes.

Fused trials (kdtune/fusion.py): batched="auto" (default) steps the members of a fused trial as one vmap-batched
computation (kdtune/batched.py) on CUDA when they allow it (kd or none, SGD, one architecture, no dropout, ...),
batched="on" does so on any device (the CPU too), batched="off" never; members that do not allow it step one
after the other. Either way each member trains what it trains alone, up to floating-point order.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


from kdtune.errors import ConfigError


PRECISIONS = ("fp32", "bf16")
TEACHER_CACHE_MODES = ("auto", "on", "off")
BATCHED_MODES = ("auto", "on", "off")  # fused members stepped as one vmap computation (kdtune/fusion.py)
SOFT_SCALES = ("T2", "none")  # soft term times T^2 (Hinton) or not (the seeds' plain KL / cross-entropy)
HINT_LOSSES = ("mean", "sum")  # hint term: MSE, or FitNets' 1/2 * squared L2 norm summed per sample
ADV_LOSSES = ("paper", "nonsaturating")  # seed 004's adversarial term: as written (unbounded), or bounded
# how a study's title names the soft term it runs
SOFT_SCALE_TEXT = {"T2": "soft = T^2 * KL (Hinton)", "none": "soft = KL without T^2 (the seeds' form)"}


def parse_link(part: Any, field: str = "links", whole: Any = None) -> str:
    """One link: a link number both models declare ("3") or "teacher.module.path=student.module.path"."""
    whole = part if whole is None else whole
    if isinstance(part, bool):
        raise ConfigError(f"{field}={whole!r}: {part!r} is not a link; expected a link number or "
                          "teacher.path=student.path")
    text = str(part).strip()
    if "=" in text:
        teacher, _, student = (side.strip() for side in text.partition("="))
        if not teacher or not student or "=" in student or any(c.isspace() for c in teacher + student):
            raise ConfigError(f"{field}={whole!r}: {text!r} is not a link; a module-path link is written "
                              "teacher.module.path=student.module.path, e.g. layer2=features.6")
        return f"{teacher}={student}"
    try:
        return str(int(text))
    except ValueError:
        raise ConfigError(f"{field}={whole!r}: {text!r} is not a link; expected a link number (e.g. '2,3,4,5') "
                          "or teacher.module.path=student.module.path (e.g. 'layer2=features.6')") from None


def is_numbered(link: str) -> bool:
    return "=" not in link


def _link_order(link: str) -> tuple:
    # numbered links in numeric order first (seed 000 names link sets by number), module-path links as given
    return (0, int(link), "") if is_numbered(link) else (1, 0, "")


def parse_links(value: Any) -> tuple[str, ...]:
    """A link set: "2,3,4,5", [2, 3], 5, "layer2=features.6,layer3=features.9", or "" (no links)."""
    if value is None:
        return ()
    if isinstance(value, bool):
        raise ConfigError(f"links={value!r}: expected link numbers such as '2,3,4,5' or teacher.path=student.path")
    if isinstance(value, int):
        value = [value]
    parts = [p for p in value.replace(";", ",").split(",") if p.strip()] if isinstance(value, str) else list(value)
    links: list[str] = []
    for part in parts:
        link = parse_link(part, "links", value)
        if link in links:
            raise ConfigError(f"links={value!r}: link {link} is listed twice")
        links.append(link)
    return tuple(sorted(links, key=_link_order))


def format_links(links: tuple[str, ...]) -> str:
    return ",".join(links)


def parse_pairs(value: Any) -> tuple[tuple[str, str], ...]:
    """FSP layer pairs: "1-2,3-4" (link numbers) or "layer1.0=features.2-layer1.1=features.4" (module-path links),
    [(1, 2), ...], or "" (none). A numbered pair is stored lower link first: the earlier layer is F1 in seed 002's
    G = F1^T F2 / (h*w) (G of b-a is G of a-b transposed: the same loss); a module-path pair keeps its order."""
    if value is None or value == "":
        return ()
    parts = [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
    pairs: list[tuple[str, str]] = []
    for part in parts:
        ends = part.split("-") if isinstance(part, str) else list(part) if isinstance(part, (list, tuple)) else [part]
        if len(ends) != 2:
            raise ConfigError(f"fsp_pairs={value!r}: {part!r} is not a pair of links; expected e.g. '1-2,3-4'")
        first, second = (parse_link(e, "fsp_pairs", value) for e in ends)
        if first == second:
            raise ConfigError(f"fsp_pairs={value!r}: pair {first}-{second} needs two different links")
        if is_numbered(first) and is_numbered(second) and int(first) > int(second):
            first, second = second, first
        if (first, second) in pairs:
            raise ConfigError(f"fsp_pairs={value!r}: pair {first}-{second} is listed twice")
        pairs.append((first, second))
    return tuple(sorted(pairs, key=lambda p: (_link_order(p[0]), _link_order(p[1]))))


def format_pairs(pairs: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{a}-{b}" for a, b in pairs)


LINK_SPATIAL_MODES = ("refuse", "interpolate")
AUGMENT_FROM_BOOL = {True: "crop:4,flip", False: "none"}  # the meaning augment=true/false had before recipes


@dataclass(frozen=True)
class TrialConfig:
    """One student distilled under one setting. Defaults follow seed 000 Table 2."""

    dataset: str = "digits"
    teacher: str = "digits_teacher"
    student: str = "digits_student"
    method: str = "kd"
    temperature: float = 2.0
    alpha: float = 0.5
    hard_weight: float | None = None  # None: 1 - alpha
    beta: float = 0.0
    links: tuple[str, ...] = ()  # link numbers ("2") or module-path links ("layer2=features.6"); see parse_links
    link_spatial: str = "refuse"  # linked maps of different height/width: refuse, or interpolate the student's
    seed: int = 0
    epochs: int = 25
    batch_size: int = 40
    lr: float = 0.004
    momentum: float = 0.9
    weight_decay: float = 2e-5
    lr_step_epochs: int = 10
    lr_gamma: float = 0.1
    precision: str = "fp32"
    augment: str | None = None  # a recipe of named steps (kdtune/augment.py), e.g. "crop:4,flip"; "none";
    # None: the dataset's default (crop:4,flip for CIFAR, none for digits)
    val_fraction: float = 0.1
    teacher_cache: str = "auto"
    soft_scale: str = "T2"  # soft term: "T2" = T^2 * KL (Hinton), "none" = KL as seeds 000/001/004 write it
    deterministic: bool = False  # deterministic algorithms only (module docstring); False: cudnn.benchmark on CUDA
    batched: str = "auto"  # fused trials: step members as one vmap computation (kdtune/fusion.py): auto = on CUDA
    # when the group allows it, on = whenever it allows it (CPU too), off = never; a group that does not allow it
    # runs its members one after the other
    # ---- method-specific (see the module docstring and kdtune/distill/) ----
    stage1_epochs: int = 0  # two-stage methods: epochs of the first stage, run before `epochs` main epochs
    fsp_pairs: tuple[tuple[str, str], ...] = ()  # fsp: layer pairs of links, e.g. "1-2,3-4,5-6"
    l1_weight: float = 1.0  # adversarial: weight of L_L1 (mean L1 distance of student and teacher logits)
    adv_weight: float = 1.0  # adversarial: weight of L_GAN; adversarial_pretrained: beta of -beta * L_class
    disc_hidden: int = 128  # adversarial methods: width of the discriminator's two hidden layers
    disc_lr: float | None = None  # adversarial methods: discriminator SGD learning rate (None: lr)
    disc_epochs: int = 10  # adversarial_pretrained: epochs fitting the discriminator before the adversarial stage
    hint_loss: str = "mean"  # hints: "mean" = MSE, "sum" = FitNets' 1/2 * ||u - r(v)||^2 summed, batch mean
    adv_loss: str = "paper"  # adversarial_pretrained: "paper" = -beta * L_class (unbounded), "nonsaturating" =
    # beta * -log P_D(teacher | a_S) (>= 0)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> "TrialConfig":
        """Build and validate from a flat dict (a Tune config). Unknown keys are an error."""
        known = cls.field_names()
        unknown = sorted(k for k in flat if k not in known)
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r}; allowed keys: {', '.join(sorted(known))}")
        values = dict(flat)
        if "links" in values:
            values["links"] = parse_links(values["links"])
        if "fsp_pairs" in values:
            values["fsp_pairs"] = parse_pairs(values["fsp_pairs"])
        if isinstance(values.get("augment"), bool):
            values["augment"] = AUGMENT_FROM_BOOL[values["augment"]]
        elif isinstance(values.get("augment"), str) and values["augment"].strip().lower() in ("true", "false"):
            values["augment"] = AUGMENT_FROM_BOOL[values["augment"].strip().lower() == "true"]
        converted = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                converted[f.name] = _convert(f.name, values[f.name], f.type)
        config = cls(**converted)
        config.validate()
        return config

    def to_flat(self) -> dict[str, Any]:
        """The flat, MLflow-friendly form (links as a string, hard_weight resolved)."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        flat["links"] = format_links(self.links)
        flat["fsp_pairs"] = format_pairs(self.fsp_pairs)
        flat["hard_weight"] = self.effective_hard_weight
        return flat

    def replace(self, **changes) -> "TrialConfig":
        flat = {k: v for k, v in self.to_flat().items()}
        if "hard_weight" not in changes and self.hard_weight is None:
            flat["hard_weight"] = None  # a default stays a default (it depends on alpha and the method)
        flat.update(changes)
        return TrialConfig.from_flat(flat)

    @property
    def effective_hard_weight(self) -> float:
        """hard_weight, or the method's default for it: 1 - alpha where there is a soft term, else 1."""
        from kdtune import distill

        if self.hard_weight is not None:
            return self.hard_weight
        return distill.method_class(self.method).default_hard_weight(self)

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        from kdtune import distill  # late: it imports torch

        # dataset, teacher and student are the texts of references the study resolved (and checked) once in the
        # driver; a trial receives the resolved objects, so nothing here looks them up again
        for name in ("dataset", "teacher", "student"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name}='': a {name} is required")
        _choice("method", self.method, distill.method_names())
        _choice("link_spatial", self.link_spatial, LINK_SPATIAL_MODES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("teacher_cache", self.teacher_cache, TEACHER_CACHE_MODES)
        _choice("batched", self.batched, BATCHED_MODES)
        _choice("soft_scale", self.soft_scale, SOFT_SCALES)
        _choice("hint_loss", self.hint_loss, HINT_LOSSES)
        _choice("adv_loss", self.adv_loss, ADV_LOSSES)
        _positive("temperature", self.temperature)
        _at_least("alpha", self.alpha, 0.0)
        if self.hard_weight is None and self.effective_hard_weight < 0:
            raise ConfigError(
                f"alpha={self.alpha}: above 1 the default hard_weight (1 - alpha) would be negative; "
                "set hard_weight explicitly (e.g. hard_weight=1 for hard + alpha*soft)"
            )
        if self.hard_weight is not None:
            _at_least("hard_weight", self.hard_weight, 0.0)
        _at_least("beta", self.beta, 0.0)
        _whole_at_least("seed", self.seed, 0)
        _whole_at_least("epochs", self.epochs, 1)
        _whole_at_least("batch_size", self.batch_size, 1)
        _positive("lr", self.lr)
        _between("momentum", self.momentum, 0.0, 1.0, upper_open=True)
        _at_least("weight_decay", self.weight_decay, 0.0)
        _whole_at_least("lr_step_epochs", self.lr_step_epochs, 1)
        _between("lr_gamma", self.lr_gamma, 0.0, 1.0, lower_open=True)
        _between("val_fraction", self.val_fraction, 0.0, 0.5, lower_open=True)
        _whole_at_least("stage1_epochs", self.stage1_epochs, 0)
        _at_least("l1_weight", self.l1_weight, 0.0)
        _at_least("adv_weight", self.adv_weight, 0.0)
        _whole_at_least("disc_hidden", self.disc_hidden, 1)
        if self.disc_lr is not None:
            _positive("disc_lr", self.disc_lr)
        _whole_at_least("disc_epochs", self.disc_epochs, 1)
        distill.method_class(self.method).check_config(self)

    def augment_recipe(self, default: str) -> str:
        """The augmentation recipe this trial uses, given its dataset's default ("" or "none": no augmentation)."""
        recipe = default if self.augment is None else self.augment
        return "" if recipe.strip().lower() in ("", "none") else recipe


def _convert(name: str, value: Any, annotation: str) -> Any:
    """Coerce what Tune/argparse/JSON give (numpy scalars, strings) to the field's type."""
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"{name}=None: a value is required")
    try:
        if annotation.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            result = float(value)
            if not math.isfinite(result):
                raise ConfigError(f"{name}={value!r}: must be a finite number")
            return result
        if annotation.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if annotation.startswith("bool"):
            if type(value).__name__ == "bool_":  # numpy's, as a Tune search space may give
                value = bool(value)
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "1", "yes", "on"):
                    return True
                if lowered in ("false", "0", "no", "off"):
                    return False
                raise TypeError
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise TypeError
        if annotation.startswith("str"):
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        kind = annotation.split(" ")[0].split("|")[0]
        raise ConfigError(f"{name}={value!r}: expected a {kind}") from None
    return value


def _choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}: unknown; allowed: {', '.join(sorted(allowed))}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name}={value}: must be > 0")


def _at_least(name: str, value: float, low: float) -> None:
    if not value >= low:
        raise ConfigError(f"{name}={value}: must be >= {low:g}")


def _whole_at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name}={value}: must be a whole number >= {low}")


def _between(name: str, value: float, low: float, high: float, lower_open=False, upper_open=False) -> None:
    ok_low = value > low if lower_open else value >= low
    ok_high = value < high if upper_open else value <= high
    if not (ok_low and ok_high):
        left = "(" if lower_open else "["
        right = ")" if upper_open else "]"
        raise ConfigError(f"{name}={value}: must be in {left}{low:g}, {high:g}{right}")
