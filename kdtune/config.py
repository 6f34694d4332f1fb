"""Typed, validated trial configuration.

Every value a user can set for one trial lives in `TrialConfig`. Ray Tune hands a trial a flat dict;
`TrialConfig.from_flat` turns it into a checked config or raises `ConfigError` with one line that names
the field, the value and what is allowed. Studies validate every trial's config before any trial starts.

Loss weights (the seed papers disagree, so every form is expressible):
  total = hard_weight * CE(y, p_S)                      "hard"
        + alpha * T^2 * KL(p_T^T || p_S^T)              "soft"  (batchmean; T may be below 1)
        + beta * sum over links of MSE(adapter(f_S), f_T)  "intermediate"
  hard_weight defaults to 1 - alpha (seed 001's (1-a)*hard + a*soft); set it explicitly for
  seed 000's independent weights (0.05 / 0.6 / 0.35) or seed 004's hard + lambda*soft (hard_weight=1).
  Methods without a soft term (adversarial, adversarial_pretrained) default hard_weight to 1.

The other methods' weights (each term is logged as loss_<name>; kdtune/distill/<method>.py says more):
  hints   stage 'hint': beta * sum over links of MSE(1x1 adapter(f_S), f_T), then stage 'main' = kd
  fsp     stage 'fsp':  beta * mean over samples of sum over fsp_pairs of ||G_T - G_S||^2, then stage 'main' = kd
          (alpha=0 gives seed 002's plain main-task stage 2)
  adversarial (seed 003)  hard_weight * L_S + l1_weight * L_L1 + adv_weight * L_GAN
  adversarial_pretrained (seed 004)  stage 'pretrain': CE, then stage 'adversarial':
          hard_weight * CE - adv_weight * L_class(a_S | student)
  Two-stage methods run stage1_epochs epochs of their first stage, then `epochs` epochs of the second.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


from kdtune.errors import ConfigError


PRECISIONS = ("fp32", "bf16")
TEACHER_CACHE_MODES = ("auto", "on", "off")


def parse_links(value: Any) -> tuple[int, ...]:
    """Accept a link set as "2,3,4,5", [2, 3, 4, 5], (5,), 5 or "" (no links)."""
    if value is None:
        return ()
    if isinstance(value, bool):
        raise ConfigError(f"links={value!r}: expected link numbers such as '2,3,4,5'")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace(";", ",").split(",") if p.strip()]
    else:
        parts = list(value)
    links = []
    for part in parts:
        try:
            number = int(part)
        except (TypeError, ValueError):
            raise ConfigError(f"links={value!r}: {part!r} is not a link number; expected e.g. '2,3,4,5'") from None
        if number in links:
            raise ConfigError(f"links={value!r}: link {number} is listed twice")
        links.append(number)
    return tuple(sorted(links))


def format_links(links: tuple[int, ...]) -> str:
    return ",".join(str(n) for n in links)


def parse_pairs(value: Any) -> tuple[tuple[int, int], ...]:
    """Accept FSP layer pairs as "1-2,3-4", [(1, 2), (3, 4)] or "" (none); each pair = two link numbers.

    A pair is stored lower link first (the earlier layer is F1 in seed 002's G = F1^T F2 / (h*w)).
    """
    if value is None or value == "":
        return ()
    parts = [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
    pairs = []
    for part in parts:
        ends = part.split("-") if isinstance(part, str) else list(part) if isinstance(part, (list, tuple)) else [part]
        try:
            first, second = (int(str(e).strip()) for e in ends)
        except (TypeError, ValueError):
            raise ConfigError(f"fsp_pairs={value!r}: {part!r} is not a pair of link numbers; expected e.g. '1-2,3-4'") from None
        if first == second:
            raise ConfigError(f"fsp_pairs={value!r}: pair {first}-{second} needs two different links")
        first, second = min(first, second), max(first, second)  # G of b-a is G of a-b transposed: same loss
        if (first, second) in pairs:
            raise ConfigError(f"fsp_pairs={value!r}: pair {first}-{second} is listed twice")
        pairs.append((first, second))
    return tuple(sorted(pairs))


def format_pairs(pairs: tuple[tuple[int, int], ...]) -> str:
    return ",".join(f"{a}-{b}" for a, b in pairs)


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
    links: tuple[int, ...] = ()
    seed: int = 0
    epochs: int = 25
    batch_size: int = 40
    lr: float = 0.004
    momentum: float = 0.9
    weight_decay: float = 2e-5
    lr_step_epochs: int = 10
    lr_gamma: float = 0.1
    precision: str = "fp32"
    augment: bool | None = None  # None: the dataset's default (crop+flip for CIFAR, none for digits)
    val_fraction: float = 0.1
    teacher_cache: str = "auto"
    # ---- method-specific (see the module docstring and kdtune/distill/) ----
    stage1_epochs: int = 0  # two-stage methods: epochs of the first stage, run before `epochs` main epochs
    fsp_pairs: tuple[tuple[int, int], ...] = ()  # fsp: layer pairs by link number, e.g. "1-2,3-4,5-6"
    l1_weight: float = 1.0  # adversarial: weight of L_L1 (mean L1 distance of student and teacher logits)
    adv_weight: float = 1.0  # adversarial: weight of L_GAN; adversarial_pretrained: beta of -beta * L_class
    disc_hidden: int = 128  # adversarial methods: width of the discriminator's two hidden layers
    disc_lr: float | None = None  # adversarial methods: discriminator SGD learning rate (None: lr)
    disc_epochs: int = 10  # adversarial_pretrained: epochs fitting the discriminator before the adversarial stage

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
        from kdtune import data, models, distill  # late: these import torch

        _choice("dataset", self.dataset, data.dataset_names())
        _choice("teacher", self.teacher, models.model_names())
        _choice("student", self.student, models.model_names())
        _choice("method", self.method, distill.method_names())
        _choice("precision", self.precision, PRECISIONS)
        _choice("teacher_cache", self.teacher_cache, TEACHER_CACHE_MODES)
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
        models.check_links(self.teacher, self.student, self.links)
        distill.method_class(self.method).check_config(self)
        if self.teacher_cache == "on" and self.uses_augmentation():
            raise ConfigError(
                "teacher_cache='on' with random augmentation: cached teacher logits are computed on "
                "un-augmented images and would not match augmented inputs; set augment=false or teacher_cache='off'"
            )

    def uses_augmentation(self) -> bool:
        from kdtune import data

        return data.dataset_info(self.dataset).augment_by_default if self.augment is None else self.augment


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
