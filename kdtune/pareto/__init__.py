"""Pareto studies: the accuracy/cost trade-off of distilled students, over student architectures.

    plan = Pareto(students=[...refs or family refs...], cost="latency", latency_budget_ms=0.5)
    Search(suggest=plan.space(MethodSpace(("kd",), recipe={"lr": (...)})), ...)   (studies/pareto.py)

The package: this module is the plan (what a StudySpec holds; checked in kdtune/resolve.py); run.py the study
kind that runs it (kdtune/study_kind.py), search.py its multi-objective searcher, int8.py the int8 twins of its
front, front.py what the report and `kdtune models pareto` read back from MLflow, script.py the scripts' options.

What a Pareto study runs (the driver, kdtune/study.py, calls the steps below through run.py's ParetoRun):
  costs        every candidate architecture measured once, one at a time, before anything is created: parameters
               and FLOPs (deterministic) and latency (kdtune/train/costs.py) on the device a trial would use (the driver
               on a local CPU study, else one Ray task with a whole GPU); a budget no candidate meets stops here
  search       Optuna multi-objective (validation accuracy up, the chosen cost down) over the student and the
               method's parameters (kdtune/pareto_search.py); early stopping, if on, is ASHA on validation
               accuracy alone (it takes one metric), which cuts small students first, so it is off by default
  baseline_search  the same search over the students alone (method none), same budget: each architecture's
               no-distillation student is tuned as the distilled ones were
  front        the search's non-dominated finished trials on (validation accuracy, cost): one per architecture
  confirm      each front member and, at the same architecture, its best baseline (else the member's recipe
               with method none), over --seeds seeds, with the same epochs: the gain at equal cost
  registry     every front member registered (one version each, its costs as tags); the most accurate member
               on validation within the budget (--latency-budget-ms on batch-1 latency, --max-params) goes
               through the gate for `champion`

Links: a method with links needs link numbers every candidate student shares with the teacher (a family keeps
its numbering across sizes); the link sets searched are those common to all (`common_links`), and the 1x1
adapters follow each student's width (built from its real feature shapes in the trial).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from kdtune.train.costs import check_runtime
from kdtune.errors import ConfigError

COSTS = {"latency": "latency_ms_batch1", "latency_per_image": "latency_ms_per_image", "params": "params",
         "flops": "flops"}


@dataclass
class Pareto:
    """What a search study needs to become a Pareto study."""

    students: list  # candidate students: references (text or objects), family references included
    cost: str = "latency"  # the front's cost axis: latency | latency_per_image | params | flops
    latency_budget_ms: float | None = None  # on batch-1 latency
    max_params: int | None = None
    early_stopping: bool = False  # ASHA on validation accuracy alone
    sampler: str = "tpe"  # tpe | nsga2 (Optuna's multi-objective samplers)
    latency_batch: int = 256
    warmup: int = 5
    repeats: int = 21
    latency_runtime: str = "torch"  # torch | onnxruntime (kdtune/train/costs.py): where latency is timed
    quantize: str | None = None  # "int8": each front member's int8 twin joins the front (kdtune/pareto/int8.py)
    calibration_samples: int = 256  # training samples the int8 activation ranges are calibrated on
    _refs: dict = field(default_factory=dict, repr=False)

    def check(self, spec=None) -> None:
        """Every value, and (given the StudySpec) that its searches sample the student from these candidates."""
        if self.cost not in COSTS:
            raise ConfigError(f"cost={self.cost!r}: not a cost; allowed: {', '.join(COSTS)}")
        if self.latency_budget_ms is not None and not (isinstance(self.latency_budget_ms, (int, float))
                                                       and self.latency_budget_ms > 0):
            raise ConfigError(f"--latency-budget-ms {self.latency_budget_ms!r}: must be a number of milliseconds "
                              "> 0 (the batch-1 latency a champion may take)")
        if self.max_params is not None and (not isinstance(self.max_params, int) or isinstance(self.max_params, bool)
                                            or self.max_params < 1):
            raise ConfigError(f"--max-params {self.max_params!r}: must be a whole number of parameters >= 1")
        if self.sampler not in ("tpe", "nsga2"):
            raise ConfigError(f"sampler={self.sampler!r}: allowed: tpe, nsga2")
        if not self.students:
            raise ConfigError("a Pareto study needs candidate students (--students REF ... or --family ...)")
        for name, value in (("latency_batch", self.latency_batch), ("repeats", self.repeats)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: must be a whole number >= 1")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup={self.warmup!r}: must be a whole number >= 0")
        check_runtime(self.latency_runtime)
        self._check_quantize()
        if spec is not None:
            for name in ("search", "baseline_search"):
                search = getattr(spec, name)
                if (search is None and name == "search") or (search is not None and not (
                        isinstance(search.suggest, StudentSpace) and set(search.suggest.students) <= set(self.refs()))):
                    raise ConfigError(f"a Pareto study's {name} must sample the student from its candidates: "
                                      f"Search(suggest=plan.space(MethodSpace(...)), ...)")

    def _check_quantize(self) -> None:
        from kdtune.pareto.int8 import PRECISIONS

        if self.quantize is None:
            return
        if self.quantize not in PRECISIONS:
            raise ConfigError(f"--quantize {self.quantize!r}: allowed: {', '.join(PRECISIONS)}")
        if self.latency_runtime != "onnxruntime":
            raise ConfigError(f"--quantize {self.quantize} needs --latency-runtime onnxruntime: int8 students run in "
                              f"onnxruntime, and one front compares latencies of one runtime (asked: "
                              f"{self.latency_runtime})")
        samples = self.calibration_samples
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ConfigError(f"--calibration-samples {samples!r}: must be a whole number of training samples >= 1")

    @property
    def cost_key(self) -> str:
        return COSTS[self.cost]

    def refs(self) -> dict:
        """Canonical spec -> ModelRef of every candidate, resolved once (a bad reference: one ConfigError line)."""
        if not self._refs:
            from kdtune.models.refs import model_ref

            refs = {}
            for value in self.students:
                ref = model_ref(value)
                if ref.spec in refs and refs[ref.spec] != ref:
                    raise ConfigError(f"students: two different candidates are both named {ref.spec!r}")
                refs[ref.spec] = ref
            self._refs = refs
        return self._refs

    def space(self, methods) -> "StudentSpace":
        return StudentSpace(methods, tuple(self.refs()))

    def budget_text(self) -> str:
        parts = []
        if self.latency_budget_ms is not None:
            parts.append(f"latency <= {self.latency_budget_ms:g} ms at batch 1")
        if self.max_params is not None:
            parts.append(f"parameters <= {self.max_params:,}")
        return " and ".join(parts)

    def meets(self, costs: dict) -> bool:
        if self.latency_budget_ms is not None and not costs["latency_ms_batch1"] <= self.latency_budget_ms:
            return False
        return self.max_params is None or costs["params"] <= self.max_params


@dataclass
class StudentSpace:
    """A define-by-run space: the student (one categorical over the candidates' specs), then what the method
    space samples. Picklable (Tune checkpoints the searcher)."""

    methods: object  # a MethodSpace
    students: tuple[str, ...]

    def __call__(self, trial) -> dict:
        constants = {}
        if len(self.students) > 1:
            trial.suggest_categorical("student", list(self.students))
        else:
            constants["student"] = self.students[0]
        return {**(self.methods(trial) or {}), **constants}


def front_indices(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points of (accuracy: higher is better, cost: lower is better), by cost.
    Of points with the same cost only the most accurate can be on the front; a point no more accurate than a
    cheaper one is dominated."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0], i))
    front, best = [], -math.inf
    for i in order:
        if points[i][0] > best:
            front.append(i)
            best = points[i][0]
    return front


def check_param_budget(plan: Pareto, refs: dict, dataset) -> None:
    """--max-params against the candidates (deterministic, in the driver, before anything is created)."""
    if plan.max_params is None:
        return
    from kdtune.train.costs import parameters

    counts = {spec: parameters(ref.build(dataset.num_classes, dataset.input_shape)) for spec, ref in refs.items()}
    smallest = min(counts, key=counts.get)
    if counts[smallest] > plan.max_params:
        raise ConfigError(f"--max-params {plan.max_params}: no candidate student has that few parameters; the "
                          f"smallest, {smallest}, has {counts[smallest]:,}; allowed: a budget >= "
                          f"{counts[smallest]}, or smaller candidates")
