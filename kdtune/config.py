"""Typed, validated trial configuration: the core layer (no torch, no Ray, no MLflow, no distillation import).

A trial's values are of two kinds. The fields every method shares (data, recipe, optimiser, precision, ...) are
typed fields of `TrialConfig`. A method's own settings (temperature, alpha, beta, adv_weight, ...) are *declared
by the method* (`Param`, in its class's `params`) and live in `TrialConfig.params`; from that one declaration
kdtune derives their validation, `--set NAME=V`, the search space, the table label and the MLflow param.
`TrialConfig.from_flat(flat, method)` turns a flat dict (a Tune config) into a checked config or raises
`ConfigError` with one line that names the key, the value and what is allowed; it takes the method's class as
an argument (kdtune/distill/registry.py finds it from its name), so this module never imports a method.

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

Fused trials (kdtune/train/fusion.py): batched="auto" (default) steps the members of a fused trial as one vmap-batched
computation (kdtune/train/batched.py) on CUDA when they allow it (kd or none, SGD, one architecture, no dropout, ...),
batched="on" does so on any device (the CPU too), batched="off" never; members that do not allow it step one
after the other. Either way each member trains what it trains alone, up to floating-point order.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


from kdtune.errors import ConfigError


PRECISIONS = ("fp32", "bf16")
TEACHER_CACHE_MODES = ("auto", "on", "off")
BATCHED_MODES = ("auto", "on", "off")  # fused members stepped as one vmap computation (kdtune/train/fusion.py)
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
EMBEDDING = "embedding"  # the link a method (rkd, crd) names to read each network's penultimate (N, D) embedding
AUGMENT_FROM_BOOL = {True: "crop:4,flip", False: "none"}  # the meaning augment=true/false had before recipes
OPTIMIZERS = ("sgd", "adam", "adamw")  # the student's optimiser (kdtune/train/recipe.py builds it)
PARAM_KINDS = ("float", "int", "str", "bool", "links", "pairs")


@dataclass(frozen=True)
class Param:
    """One setting a distillation method adds, declared once by the method; kdtune derives from it the
    validation (one-line errors), `--set NAME=V`, the search space, the table label and the MLflow param.

    kind     float | int | str | bool | links (a link set, config.parse_links) | pairs (config.parse_pairs)
    default  the value when a trial does not set it (None with optional=True: "derive it", e.g. disc_lr = lr)
    low, high, low_open, high_open  the allowed range of a number (None: unbounded)
    choices  the allowed values of a str
    search   what a search samples: (low, high) for a number (log=True: on a log scale), a tuple of values for
             a str or bool, "link_sets" / "fsp_pairs" for values the model pair supplies, None: not searched
    short    the name a table label uses (e.g. "T" for temperature); help: one line for `kdtune methods show`
    """

    name: str
    default: Any
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    optional: bool = False
    search: Any = None
    log: bool = False
    short: str = ""
    help: str = ""

    def __post_init__(self):
        if self.kind not in PARAM_KINDS:
            raise ConfigError(f"parameter {self.name!r}: kind={self.kind!r}: unknown; allowed: {', '.join(PARAM_KINDS)}")
        if self.kind == "str" and not self.choices:
            raise ConfigError(f"parameter {self.name!r}: a str parameter declares its choices")
        if self.default is not None or not self.optional:
            self.check(self.default, "its declaration")  # a method's own default must be allowed
        if isinstance(self.search, tuple) and self.kind in ("float", "int"):
            if len(self.search) != 2:
                raise ConfigError(f"parameter {self.name!r}: search={self.search!r}: expected (low, high)")
            for end in self.search:
                self.check(end, "its search range")
            if self.log and not self.search[0] > 0:
                raise ConfigError(f"parameter {self.name!r}: a log-scale search range needs low > 0")

    @property
    def numeric(self) -> bool:
        return self.kind in ("float", "int")

    def allowed(self) -> str:
        """What a value may be, in words (for errors and `kdtune methods show`), e.g. '> 0', 'in [0, 1]'."""
        if self.kind == "str":
            return "one of " + ", ".join(sorted(self.choices))
        if self.kind == "bool":
            return "true or false"
        if self.kind in ("links", "pairs"):
            return "a link set such as '2,3'" if self.kind == "links" else "layer pairs such as '1-2,3-4'"
        prefix = "a whole number " if self.kind == "int" else ""
        if self.low is None and self.high is None:
            return prefix.strip() or "a number"
        if self.high is None:
            return f"{prefix}{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{prefix}{'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{prefix}in {left}{self.low:g}, {self.high:g}{right}"

    def check(self, value: Any, owner: str = "") -> Any:
        """The value converted to the parameter's type, or a ConfigError naming it and what is allowed."""
        where = f" ({owner})" if owner else ""
        if value is None:
            if self.optional:
                return None
            raise ConfigError(f"{self.name}=None: a value is required{where}; allowed: {self.allowed()}")
        if self.kind == "links":
            return parse_links(value)
        if self.kind == "pairs":
            return parse_pairs(value)
        converted = _convert(self.name, value, {"float": "float", "int": "int", "str": "str", "bool": "bool"}[self.kind])
        if self.kind == "str" and converted not in self.choices:
            raise ConfigError(f"{self.name}={value!r}: unknown; allowed: {', '.join(sorted(self.choices))}{where}")
        if self.numeric:
            too_low = self.low is not None and (converted <= self.low if self.low_open else converted < self.low)
            too_high = self.high is not None and (converted >= self.high if self.high_open else converted > self.high)
            if too_low or too_high:
                raise ConfigError(f"{self.name}={converted!r}: must be {self.allowed()}{where}")
        return converted

    def formatted(self, value: Any) -> Any:
        """The flat (MLflow, Tune, table) form of a value."""
        if self.kind == "links":
            return format_links(value)
        if self.kind == "pairs":
            return format_pairs(value)
        return value


# What a trial config needs to know of its method (kdtune/distill/base.py's Method is one): `name`, `params`
# (a tuple of Param), `default_hard_weight(config)` and `check_config(config)`. config.py takes it as an
# argument, so the core never imports the distillation layer.


@dataclass(frozen=True)
class TrialConfig:
    """One student distilled under one setting: the fields every method shares, typed, and the method's own
    declared parameters in `params` (read them as attributes: config.temperature). Defaults follow seed 000
    Table 2."""

    dataset: str = "digits"
    teacher: str = "digits_teacher"
    student: str = "digits_student"
    method: str = "kd"  # a built-in method's name or package.module:Class (kdtune/distill/registry.py)
    hard_weight: float | None = None  # None: the method's default (1 - alpha for KD-like methods, else 1)
    link_spatial: str = "refuse"  # linked maps of different height/width: refuse, or interpolate the student's
    seed: int = 0
    epochs: int = 25
    batch_size: int = 40
    optimizer: str = "sgd"  # sgd (momentum), adam or adamw (betas adam_beta1/adam_beta2)
    lr: float = 0.004
    momentum: float = 0.9  # sgd only
    adam_beta1: float = 0.9  # adam / adamw only
    adam_beta2: float = 0.999
    weight_decay: float = 2e-5  # sgd/adam: L2 added to the gradient; adamw: decoupled decay
    lr_step_epochs: int = 10
    lr_gamma: float = 0.1
    precision: str = "fp32"
    augment: str | None = None  # a recipe of named steps (kdtune/augment.py), e.g. "crop:4,flip"; "none";
    # None: the dataset's default (crop:4,flip for CIFAR, none for digits)
    val_fraction: float = 0.1
    teacher_cache: str = "auto"
    deterministic: bool = False  # deterministic algorithms only (module docstring); False: cudnn.benchmark on CUDA
    batched: str = "auto"  # fused trials: step members as one vmap computation (kdtune/train/fusion.py): auto =
    # on CUDA when the group allows it, on = whenever it allows it (CPU too), off = never; a group that does not
    # allow it runs its members one after the other
    params: tuple = ()  # the method's declared parameters: ((name, value), ...) in declaration order
    method_class: Any = field(default=None, compare=False, repr=False)  # the method's declaration (not a field
    # of the flat form: `method` names it)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> set[str]:
        """The keys every method shares (a method's own parameters come from its declaration)."""
        return {f.name for f in dataclasses.fields(cls)} - {"params", "method_class"}

    @classmethod
    def from_flat(cls, flat: dict[str, Any], method, base: dict[str, Any] | None = None) -> "TrialConfig":
        """Build and validate from a flat dict (a Tune config, a variant) for `method`, the method's declaration.

        `base` (the study's shared values) may hold parameters of other methods: a trial takes from it only what
        its method declares (a `--set temperature=4` reaches the KD trials, not the baseline); a key in `flat`
        that is neither shared nor declared by the method is an error naming both lists."""
        known = cls.field_names()
        declared = {p.name: p for p in method.params}
        unknown = sorted(k for k in flat if k not in known and k not in declared)
        if unknown:
            mine = ", ".join(declared) or "none"
            raise ConfigError(f"unknown config key {unknown[0]!r} for method {method.name!r}; its parameters: {mine}; "
                              f"shared keys: {', '.join(sorted(known))}")
        values = {k: v for k, v in (base or {}).items() if k in known or k in declared}
        values.update(flat)
        if isinstance(values.get("augment"), bool):
            values["augment"] = AUGMENT_FROM_BOOL[values["augment"]]
        elif isinstance(values.get("augment"), str) and values["augment"].strip().lower() in ("true", "false"):
            values["augment"] = AUGMENT_FROM_BOOL[values["augment"].strip().lower() == "true"]
        converted = {f.name: _convert(f.name, values[f.name], f.type)
                     for f in dataclasses.fields(cls) if f.name in values and f.name in known}
        owner = f"method {method.name!r}"
        params = tuple((p.name, p.check(values[p.name] if p.name in values else p.default, owner))
                       for p in method.params)
        config = cls(**converted, params=params, method_class=method)
        config.validate()
        return config

    def __getattr__(self, name: str) -> Any:
        # a method's declared parameter, e.g. config.temperature (only reached when no field has the name)
        params = self.__dict__.get("params", ())
        for key, value in params:
            if key == name:
                return value
        method = self.__dict__.get("method", "?")
        raise AttributeError(f"TrialConfig of method {method!r} has no field or parameter {name!r}")

    def param(self, name: str, default: Any = None) -> Any:
        """A declared parameter's value, or `default` when the method does not declare it."""
        return dict(self.params).get(name, default)

    def own_flat(self) -> dict[str, Any]:
        """The flat form with hard_weight as given (None stays None: a default follows alpha and the method)."""
        shared = self.field_names()
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in shared}
        declared = {p.name: p for p in self.method_class.params}
        flat.update({k: declared[k].formatted(v) for k, v in self.params})
        return flat

    def to_flat(self) -> dict[str, Any]:
        """The flat, MLflow-friendly form (links as a string, hard_weight resolved)."""
        return {**self.own_flat(), "hard_weight": self.effective_hard_weight}

    def replace(self, **changes) -> "TrialConfig":
        """A copy with some values changed (validated again). Changing `method` takes `method_class` too."""
        method = changes.pop("method_class", None)
        if "method" in changes and method is None and changes["method"] != self.method:
            raise ConfigError("replace(method=...) needs the new method's class: replace(method=..., method_class=...)")
        flat = self.own_flat()
        if method is not None:  # the other method's parameters do not carry over
            flat = {k: v for k, v in flat.items() if k in self.field_names()}
        flat.update(changes)
        return TrialConfig.from_flat(flat, method or self.method_class)

    @property
    def effective_hard_weight(self) -> float:
        """hard_weight, or the method's default for it: 1 - alpha where there is a soft term, else 1."""
        if self.hard_weight is not None:
            return self.hard_weight
        return self.method_class.default_hard_weight(self)

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        # dataset, teacher and student are the texts of references the study resolved (and checked) once in the
        # driver; a trial receives the resolved objects, so nothing here looks them up again
        for name in ("dataset", "teacher", "student", "method"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name}='': a {name} is required")
        _choice("link_spatial", self.link_spatial, LINK_SPATIAL_MODES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("teacher_cache", self.teacher_cache, TEACHER_CACHE_MODES)
        _choice("batched", self.batched, BATCHED_MODES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.hard_weight is None and self.effective_hard_weight < 0:
            raise ConfigError(
                f"alpha={self.param('alpha')}: above 1 the default hard_weight (1 - alpha) would be negative; "
                "set hard_weight explicitly (e.g. hard_weight=1 for hard + alpha*soft)"
            )
        if self.hard_weight is not None:
            _at_least("hard_weight", self.hard_weight, 0.0)
        _whole_at_least("seed", self.seed, 0)
        _whole_at_least("epochs", self.epochs, 1)
        _whole_at_least("batch_size", self.batch_size, 1)
        _positive("lr", self.lr)
        _between("momentum", self.momentum, 0.0, 1.0, upper_open=True)
        _between("adam_beta1", self.adam_beta1, 0.0, 1.0, upper_open=True)
        _between("adam_beta2", self.adam_beta2, 0.0, 1.0, upper_open=True)
        _at_least("weight_decay", self.weight_decay, 0.0)
        _whole_at_least("lr_step_epochs", self.lr_step_epochs, 1)
        _between("lr_gamma", self.lr_gamma, 0.0, 1.0, lower_open=True)
        _between("val_fraction", self.val_fraction, 0.0, 0.5, lower_open=True)
        self.method_class.check_config(self)

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
