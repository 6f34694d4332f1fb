"""Pareto studies: the accuracy/cost trade-off of distilled students, over student architectures.

    plan = Pareto(students=[...refs or family refs...], cost="latency", latency_budget_ms=0.5)
    Search(suggest=plan.space(MethodSpace(("kd",), recipe={"lr": (...)})), ...)   (studies/pareto.py)

What a Pareto study runs (kdtune/study.py calls the steps below):
  costs        every candidate architecture measured once, one at a time, before anything is created: parameters
               and FLOPs (deterministic) and latency (kdtune/costs.py) on the device a trial would use (the driver
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

import json
import math
from dataclasses import dataclass, field

from kdtune.costs import COST_KEYS, RUNTIMES, check_runtime, latency_tags
from kdtune.errors import ConfigError

COSTS = {"latency": "latency_ms_batch1", "latency_per_image": "latency_ms_per_image", "params": "params",
         "flops": "flops"}
COST_TEXT = {"latency_ms_batch1": "latency at batch 1 (ms)", "latency_ms_per_image": "latency per image in a "
             "batch (ms)", "params": "parameters", "flops": "FLOPs per sample"}
PHASE_TAG = "kdtune.pareto.phase"  # search | baseline_search | front | baseline
ON_FRONT_TAG = "kdtune.pareto.on_front"
COST_TAG = "kdtune.pareto.cost"
DEVICE_TAG = "kdtune.pareto.device"
FRONT_PREFIX, BASELINE_PREFIX = "front: ", "baseline: "
FRONT_STUDY_TAG = "pareto_study_run"  # on every registered front member: the study run that made the front


def cost_metric(key: str) -> str:
    return f"cost_{key}"


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
    latency_runtime: str = "torch"  # torch | onnxruntime (kdtune/costs.py): where latency is timed
    quantize: str | None = None  # "int8": each front member's int8 twin joins the front (kdtune/int8_front.py)
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
        from kdtune.int8_front import PRECISIONS

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
    from kdtune.costs import parameters

    counts = {spec: parameters(ref.build(dataset.num_classes, dataset.input_shape)) for spec, ref in refs.items()}
    smallest = min(counts, key=counts.get)
    if counts[smallest] > plan.max_params:
        raise ConfigError(f"--max-params {plan.max_params}: no candidate student has that few parameters; the "
                          f"smallest, {smallest}, has {counts[smallest]:,}; allowed: a budget >= "
                          f"{counts[smallest]}, or smaller candidates")


# ---- trials -----------------------------------------------------------------------------------------

def student_parts(parts, students: dict) -> dict:
    """One StudyParts per candidate student, all sharing the dataset, teacher weights and cached teacher logits
    (one object each in the object store: pickling keeps shared objects shared)."""
    import dataclasses

    by_student = {parts.student.spec: parts} if parts.student is not None else {}
    by_student.update({spec: dataclasses.replace(parts, student=ref) for spec, ref in students.items()})
    return by_student


def student_trial(config: dict, parts: dict, context, base: dict, threads: int) -> None:
    """The Ray Tune trainable of a Pareto study: distill_trial with the parts of the student the config names
    (members of a fused trial share their student: kdtune/train/fusion.py groups by it)."""
    from kdtune.trial import distill_trial, members_of

    student = members_of(config)[0].overrides.get("student", base["student"])
    chosen = parts.get(student)
    if chosen is None:
        raise ValueError(f"student {student!r} is not a candidate of this study: {', '.join(parts)}")
    return distill_trial(config, chosen, context, base, threads)


# ---- the study's steps ----------------------------------------------------------------------------

class ParetoRun:
    """A Pareto study's state in the driver: the cost table, the front, what was registered."""

    def __init__(self, plan: Pareto, refs: dict, costs: dict, seconds: float, default_student: str):
        self.plan, self.refs, self.costs, self.seconds = plan, refs, costs, seconds
        self.default_student = default_student
        self.device = next(iter(costs.values()))["device"] if costs else "?"
        self.front: list = []  # search trials on the front, by cost
        self.baseline_tuned: dict[str, bool] = {}
        self.rows: list[dict] = []
        self.selected: str | None = None
        self.decisions: dict = {}
        self.phases, self.parent_id, self.dataset_name, self.seeds = {}, "", "", 1

    # measuring ---------------------------------------------------------------------------------
    @classmethod
    def measure(cls, spec, resolved, echo=print) -> "ParetoRun":
        """Every candidate architecture's costs, one model at a time, before any MLflow run or folder exists."""
        from kdtune import cluster
        from kdtune import costs as costs_module

        plan, dataset = spec.pareto, resolved.dataset
        refs = {s: resolved.students[s] for s in plan.refs()}
        threads = max(1, int(spec.cpus_per_trial))
        arguments = dict(refs=refs, num_classes=dataset.num_classes, input_shape=tuple(dataset.input_shape),
                         threads=threads, batch=plan.latency_batch, warmup=plan.warmup, repeats=plan.repeats,
                         runtime=plan.latency_runtime)
        # where a trial would run, on a whole device: nothing else runs on it while it is timed
        table, seconds = cluster.run_like_a_trial(costs_module.measure_task, **arguments, cpus=spec.cpus_per_trial,
                                                  gpus=math.ceil(spec.gpus_per_trial))
        run = cls(plan, refs, table, seconds, resolved.base["student"])
        echo(f"pareto: measured {len(table)} candidate student(s) in {seconds:.1f}s on {run.device}")
        if plan.latency_budget_ms is not None:
            fastest = min(table, key=lambda s: table[s]["latency_ms_batch1"])
            if table[fastest]["latency_ms_batch1"] > plan.latency_budget_ms:
                raise ConfigError(
                    f"--latency-budget-ms {plan.latency_budget_ms:g}: no candidate student meets it on {run.device}; "
                    f"the fastest, {fastest}, takes {table[fastest]['latency_ms_batch1']:.4f} ms at batch 1; "
                    f"allowed: a budget >= {table[fastest]['latency_ms_batch1']:.4f} ms, or smaller candidates")
        return run

    def searcher(self, search, points_to_evaluate):
        import optuna

        from kdtune.pareto_search import CostSearch

        sampler = (optuna.samplers.NSGAIISampler(seed=search.seed) if self.plan.sampler == "nsga2"
                   else optuna.samplers.TPESampler(seed=search.seed))
        key = self.plan.cost_key
        return CostSearch(space=search.suggest, costs=self.costs, cost_key=key, cost_metric=cost_metric(key),
                          default_student=self.default_student, points_to_evaluate=points_to_evaluate,
                          sampler=sampler)

    def student_of(self, trial) -> str:
        return trial.params.get("student", self.default_student)

    def cost_of(self, trial) -> float:
        return float(self.costs[self.student_of(trial)][self.plan.cost_key])

    # the front and the confirm phase -----------------------------------------------------------
    def search_front(self, trials) -> list:
        finished = [t for t in trials if t.finished and self.student_of(t) in self.costs]
        points = [(t.metrics["val_acc"], self.cost_of(t)) for t in finished]
        return [finished[i] for i in front_indices(points)]

    def confirm_variants(self, phases: dict) -> list[dict]:
        """Each front member and the no-distillation student of the same architecture, trained alike."""
        from kdtune.records import OBJECTIVE

        self.front = self.search_front(phases["search"])
        baselines = [t for t in phases.get("baseline_search", []) if t.finished]
        variants = []
        for member in self.front:
            student = self.student_of(member)
            variants.append({**member.params, "student": student, "label": FRONT_PREFIX + student})
            tuned = OBJECTIVE.best_trial(t for t in baselines if self.student_of(t) == student)
            self.baseline_tuned[student] = tuned is not None
            if tuned is not None:
                params = dict(tuned.params)
            else:  # the baseline search never tried this architecture: the member's own recipe values
                params = {k: v for k, v in member.params.items() if k in _recipe_keys()}
            variants.append({**params, "method": "none", "student": student, "label": BASELINE_PREFIX + student})
        return variants

    # registering and recording -----------------------------------------------------------------
    def finish(self, study, phases: dict, final: list, summary: list[dict], parent_id: str):
        """Register every front member, choose the champion within the budget, record costs and the front.
        Returns (the selected member's label or None, its registry decision or None)."""
        self.phases, self.parent_id = phases, parent_id
        self.dataset_name, self.seeds = study.dataset.name, study.spec.seeds
        rows = {r["label"]: r for r in summary}
        self.rows = []
        for member in self.front:
            student = self.student_of(member)
            front, baseline = rows.get(FRONT_PREFIX + student), rows.get(BASELINE_PREFIX + student)
            self.rows.append({"student": student, "label": FRONT_PREFIX + student, "costs": self.costs[student],
                              "search_val": member.metrics["val_acc"], "front": front, "baseline": baseline,
                              "baseline_tuned": self.baseline_tuned.get(student, False), "params": member.params,
                              "version": None, "alias": "", "precision": "float32"})
        self._record_runs(study, final)
        name = study.spec.register_as or f"kdtune-{study.dataset.name}-pareto"
        for row in self.rows:
            row["version"] = self._register(study, final, row, name)
        if self.plan.quantize:
            from kdtune.int8_front import int8_rows

            quantised = int8_rows(study, self, final, study.echo)
            for row in quantised:
                row["version"] = self._register(study, final, row, name)
            twins = {row["student"]: row for row in quantised}
            self.rows = [r for row in self.rows for r in (row, twins.get(row["student"])) if r is not None]
        decision = self._choose_champion(study, name)
        self._log_front(study)
        return self.selected, decision

    def _record_runs(self, study, final: list) -> None:
        """Costs as metrics and the phase as a tag on every student run of the study (the report reads them)."""
        from kdtune import tracking

        on_front = {t.run_id for t in self.front}
        by_phase = [(t, "search") for t in self.phases.get("search", [])]
        by_phase += [(t, "baseline_search") for t in self.phases.get("baseline_search", [])]
        by_phase += [(t, "front" if t.label.startswith(FRONT_PREFIX) else "baseline") for t in final]
        for trial, phase in by_phase:
            student = self.student_of(trial)
            if not trial.run_id or student not in self.costs:
                continue
            costs = self.costs[student]
            tracking.log_metrics(study.client, trial.run_id,
                                 {cost_metric(k): float(costs[k]) for k in COST_KEYS}, step=0)
            study.client.set_tag(trial.run_id, PHASE_TAG, phase)
            study.client.set_tag(trial.run_id, "kdtune.student", student)
            if trial.run_id in on_front:
                study.client.set_tag(trial.run_id, ON_FRONT_TAG, "1")

    def _register(self, study, final: list, row: dict, name: str) -> str | None:
        from kdtune import registry
        from kdtune.distill.registry import trial_config
        from kdtune.records import OBJECTIVE

        candidates = [t for t in final if t.label == row["label"] and t.finished
                      and "weights_uri" in t.metrics]
        best = row.get("trial") or OBJECTIVE.best_trial(candidates)  # an int8 row names the run it came from
        summary = row["front"]
        if best is None or not summary or not summary["n"]:
            return None
        costs, metrics, spec = row["costs"], best.metrics, study.spec
        tags = {
            "study": spec.name, "dataset": study.dataset.name, "teacher": study.teacher_cfg.student,
            "student": row["student"], "method": best.params.get("method", study.base.get("method")),
            "label": row["label"], "tuned": "-", "seed": best.seed, "run_id": best.run_id,
            "val_acc": f"{metrics['val_acc']:.4f}", "test_acc": f"{metrics['test_acc']:.4f}",
            "test_acc_per_seed": ",".join(f"{a:.4f}" for a in summary["test"]),
            **{f"hp.{k}": v for k, v in best.params.items()},
            "parameters": costs["params"], "flops": costs["flops"],
            **latency_tags(costs),
            FRONT_STUDY_TAG: self.parent_id, "pareto_cost": self.plan.cost_key,
            "precision": row["precision"], **row.get("tags", {}),
        }
        if row["baseline"] and row["baseline"]["n"]:
            tags["baseline_test_acc_mean"] = f"{row['baseline']['test_mean']:.6f}"
        val_fraction = trial_config(best.params, study.base).val_fraction
        model_uri = row.get("model_uri") or _model_uri(study, best, self.refs[row["student"]])
        decision = registry.register(
            study.client, model_uri, name, tags,
            val_mean=summary["val_mean"], seeds=summary["n"], test_mean=summary["test_mean"],
            val_set=registry.validation_fingerprint(study.dataset, val_fraction),
            test_set=registry.test_set_fingerprint(study.dataset), margin=spec.margin, gated=False)
        row["val_set"] = registry.validation_fingerprint(study.dataset, val_fraction)
        self.decisions[row["label"]] = decision
        return decision.version

    def _choose_champion(self, study, name: str):
        """The most accurate registered member on validation within the budget, through the gate."""
        from kdtune import registry

        registered = [r for r in self.rows if r["version"]]
        within = [r for r in registered if self.plan.meets(r["costs"])]
        if not within:
            study.echo(f"pareto: no front member meets the budget ({self.plan.budget_text()}); "
                       "the champion is unchanged")
            return None
        chosen = max(within, key=lambda r: (r["front"]["val_mean"], -r["costs"][self.plan.cost_key]))
        self.selected = chosen["label"]
        takes, reason = self._gate(study.client, name, chosen, study.spec.margin)
        alias = registry.CHAMPION if takes else registry.CHALLENGER
        why = (f"the most accurate front member on validation within {self.plan.budget_text()}" if
               self.plan.budget_text() else "the most accurate front member on validation (no budget)")
        reason = f"{why}; {reason}"
        study.client.set_registered_model_alias(name, alias, chosen["version"])
        study.client.set_model_version_tag(name, chosen["version"], "gate", reason)
        chosen["alias"] = alias
        decision = registry.Decision(name, chosen["version"], alias, reason)
        study.echo(f"registry: {name} version {chosen['version']} -> @{alias} ({reason})")
        return decision

    def _gate(self, client, name: str, chosen: dict, margin: float) -> tuple[bool, str]:
        """The gate on validation; with a budget, a champion that does not meet it (or whose latency was
        measured on another device) cannot stay: a budget is a constraint the champion must satisfy."""
        from kdtune import registry

        champion = registry.current_champion(client, name)
        if champion is not None and self.plan.budget_text():
            tags = champion.tags
            problem = None
            try:
                if self.plan.latency_budget_ms is not None:
                    measured = (tags.get("latency_device"), tags.get("latency_runtime", "torch"))
                    if measured != (self.device, self.plan.latency_runtime):
                        problem = (f"its latency was measured on {measured[0] or 'no device'} in {measured[1]}, not "
                                   f"{self.device} in {self.plan.latency_runtime}")
                    elif float(tags["latency_ms_batch1"]) > self.plan.latency_budget_ms:
                        problem = f"its latency is {float(tags['latency_ms_batch1']):.4f} ms"
                if problem is None and self.plan.max_params is not None and int(tags["parameters"]) > self.plan.max_params:
                    problem = f"it has {int(tags['parameters']):,} parameters"
            except (KeyError, ValueError):
                problem = "it records no costs"
            if problem:
                return True, f"champion version {champion.version} is outside the budget ({problem})"
        return registry.gate(client, name, chosen["front"]["val_mean"], chosen.get("val_set", ""), margin)

    def _log_front(self, study) -> None:
        from kdtune import tracking

        client, parent = study.client, self.parent_id
        client.set_tag(parent, COST_TAG, self.plan.cost_key)
        client.set_tag(parent, DEVICE_TAG, self.device)
        tracking.log_metrics(client, parent, {"latency_measure_time_s": self.seconds,
                                              "pareto_front_size": len(self.rows)}, step=0)
        client.log_text(parent, self.table() + "\n", "results/pareto_front.txt")
        client.log_text(parent, json.dumps(self.records(), indent=2), "results/pareto_front.json")

    # text --------------------------------------------------------------------------------------
    def records(self) -> list[dict]:
        out = []
        for row in self.rows:
            front, base = row["front"] or {}, row["baseline"] or {}
            out.append({"student": row["student"], "precision": row["precision"],
                        **{k: row["costs"][k] for k in (*COST_KEYS, "device", "runtime")},
                        "search_val_acc": row["search_val"], "val_acc": front.get("val_mean"),
                        "test_acc": front.get("test_mean"), "test_acc_std": front.get("test_std"),
                        "baseline_val_acc": base.get("val_mean"), "baseline_test_acc": base.get("test_mean"),
                        "baseline_tuned": row["baseline_tuned"], "seeds": front.get("n"),
                        "version": row["version"], "alias": row["alias"], "hyperparameters": row["params"],
                        **({"fp32_version": row["fp32_version"], "int8_speedup_vs_fp32_same_run": row["speed_ratio"]}
                           if row["precision"] == "int8" else {})})
        return out

    def table(self) -> str:
        return format_front(self.records(), self.plan, self.device, self.dataset_name, self.seeds, self.seconds,
                            len(self.costs))


def format_front(records: list[dict], plan: Pareto, device: str, dataset: str, seeds: int, seconds: float,
                 candidates: int) -> str:
    def pct(value):
        return "-" if value is None or value != value else f"{100 * value:.2f}"

    def name(r):
        return r["student"] + (" int8" if r.get("precision") == "int8" else "")

    width = max([7] + [len(name(r)) for r in records])
    lines = [f"Pareto front of {dataset}: validation accuracy vs {COST_TEXT[plan.cost_key]} (chosen on validation; "
             f"test over {seeds} seed(s)); latency on {device}",
             f"{'student':<{width}}  {'ms b=1':>8}  {'ms/img':>8}  {'params':>9}  {'MFLOPs':>8}  {'val KD':>6}  "
             f"{'test KD':>7}  {'test no KD':>10}  {'gain':>8}  {'version':>9}"]
    for r in records:
        gain = (f"{100 * (r['test_acc'] - r['baseline_test_acc']):+.2f}pt"
                if r["test_acc"] is not None and r["baseline_test_acc"] is not None else "-")
        version = f"v{r['version']}" + (f" @{r['alias']}" if r["alias"] else "") if r["version"] else "-"
        note = "" if r["baseline_tuned"] else "*"
        lines.append(f"{name(r):<{width}}  {r['latency_ms_batch1']:>8.4f}  {r['latency_ms_per_image']:>8.5f}  "
                     f"{r['params']:>9,}  {r['flops'] / 1e6:>8.3f}  {pct(r['val_acc']):>6}  {pct(r['test_acc']):>7}  "
                     f"{pct(r['baseline_test_acc']) + note:>10}  {gain:>8}  {version:>9}")
    for r in records:
        if r.get("precision") == "int8":
            lines.append(f"{name(r)}: post-training int8 of v{r['fp32_version']} (onnxruntime), "
                         f"{r['int8_speedup_vs_fp32_same_run']:.2f}x the speed of its fp32 file at batch 1, timed "
                         "side by side in one process")
    if any(not r["baseline_tuned"] for r in records):
        lines.append("* the baseline search did not try this architecture: its baseline ran at the member's recipe values")
    budget = plan.budget_text()
    lines.append(f"champion rule: the most accurate member on validation{' within ' + budget if budget else ''}, "
                 "through the registry gate")
    lines.append(f"costs: {candidates} candidate architecture(s) measured once each in {seconds:.1f}s, one at a "
                 f"time, before any trial (warm-up {plan.warmup}, median of {plan.repeats}; batch 1 and "
                 f"{plan.latency_batch}); no-KD students trained with the same epochs")
    return "\n".join(lines)


def _recipe_keys() -> set[str]:
    return {"lr", "momentum", "weight_decay", "batch_size", "epochs", "lr_step_epochs", "lr_gamma"}


def _model_uri(study, trial, ref) -> str:
    """What the registry takes for a trial's student: a servable model made from its logged weights."""
    from kdtune import students

    return students.servable_model_uri(study.client, trial.run_id, ref, study.dataset)


# ---- the report's figure (from MLflow alone) -------------------------------------------------------

def is_pareto(study_runs) -> bool:
    return COST_TAG in study_runs.parent.data.tags


def report_parts(study_runs):
    """(Plot, front table text) for a Pareto study's report, or None for any other study."""
    if not is_pareto(study_runs):
        return None
    from kdtune.report import Plot, _figure, _png

    key = study_runs.parent.data.tags[COST_TAG]
    metric = cost_metric(key)
    groups: dict[str, list] = {"search": [], "baseline_search": [], "front": [], "baseline": [], "on_front": []}
    for run in study_runs.students:
        tags, metrics = run.data.tags, run.data.metrics
        phase = tags.get(PHASE_TAG)
        if phase not in groups or metric not in metrics or "val_acc" not in metrics:
            continue
        groups[phase].append(run)
        if tags.get(ON_FRONT_TAG) == "1":
            groups["on_front"].append(run)

    def per_student(runs, value):
        points: dict[str, list] = {}
        for run in runs:
            if value in run.data.metrics:
                points.setdefault(run.data.tags.get("kdtune.student", "?"), []).append(run)
        rows = []
        for student, members in points.items():
            values = [100 * r.data.metrics[value] for r in members]
            rows.append((members[0].data.metrics[metric], sum(values) / len(values), student))
        return sorted(rows)

    figure, (left, right) = _figure(width=6.5, height=4.8, columns=2)
    front, baseline = per_student(groups["front"], "test_acc"), per_student(groups["baseline"], "test_acc")
    if front:
        left.plot([p[0] for p in front], [p[1] for p in front], "-o", color="tab:orange", linewidth=2, markersize=8,
                  label="front: distilled students", zorder=3)
        names = _short_names([p[2] for p in front])
        for x, y, student in front:
            left.annotate(names[student], (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7)
    if baseline:
        left.plot([p[0] for p in baseline], [p[1] for p in baseline], "--s", color="black", markersize=6,
                  label="same students, no distillation", zorder=2)
    left.set_title("Front on test (mean over seeds)")
    left.set_ylabel("test accuracy (%)")
    for label, runs, style in (("search trials (distilled)", groups["search"], dict(color="tab:gray", marker="o")),
                               ("baseline search (no distillation)", groups["baseline_search"],
                                dict(color="tab:blue", marker="x"))):
        if runs:
            right.scatter([r.data.metrics[metric] for r in runs], [100 * r.data.metrics["val_acc"] for r in runs],
                          s=22, alpha=0.55, label=label, **style)
    chosen = sorted((r.data.metrics[metric], 100 * r.data.metrics["val_acc"]) for r in groups["on_front"])
    if chosen:
        right.step([c[0] for c in chosen], [c[1] for c in chosen], where="post", color="tab:orange", linewidth=2,
                   label="front (on validation)", zorder=3)
        right.scatter([c[0] for c in chosen], [c[1] for c in chosen], color="tab:orange", s=60, zorder=4)
    right.set_title("Search on validation: what chose the front")
    right.set_ylabel("validation accuracy (%)")
    values = [r.data.metrics[metric] for g in groups.values() for r in g]
    for ax in (left, right):
        ax.set_xlabel(COST_TEXT.get(key, key))
        if values and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        ax.legend(fontsize="x-small")
    device = study_runs.parent.data.tags.get(DEVICE_TAG, "?")
    plot = Plot("pareto_front", "Accuracy vs cost: the Pareto front",
                f"Left: each front member (orange) and the same architecture trained without distillation (black), "
                f"same epochs, test accuracy. Right: every search trial on validation, the front it chose "
                f"highlighted. Cost: {COST_TEXT.get(key, key)}; latency measured on {device}.", _png(figure))
    return plot, _front_text(study_runs)


def _short_names(students: list[str]) -> dict[str, str]:
    """What tells the students apart: a family's knobs that differ (e.g. 'width=0.5'), else the reference."""
    parts = {s: s.split(":", 1)[1].split(",") if ":" in s else [s] for s in students}
    common = set.intersection(*(set(p) for p in parts.values())) if len(students) > 1 else set()
    return {s: ",".join(p for p in parts[s] if p not in common) or s for s in students}


def _front_text(study_runs) -> str:
    import tempfile
    from pathlib import Path

    client, run_id = study_runs.client, study_runs.parent.info.run_id
    try:
        with tempfile.TemporaryDirectory() as folder:
            return Path(client.download_artifacts(run_id, "results/pareto_front.txt", folder)).read_text().rstrip()
    except Exception:  # a study still running has not written it yet
        return ""


# ---- `kdtune models pareto NAME` ----------------------------------------------------------------------

def list_front(client, name: str, study_run: str | None = None) -> str:
    """The front registered under `name` by its latest Pareto study (or by `study_run`), cheapest first."""
    from kdtune.errors import TrackingError

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception as error:
        raise TrackingError(f"model {name!r}: could not be read ({type(error).__name__})") from None
    members = [v for v in versions if FRONT_STUDY_TAG in v.tags]
    if not versions:
        raise TrackingError(f"model {name!r}: not in the registry (kdtune models list shows what is)")
    if not members:
        raise TrackingError(f"model {name!r}: no version was registered by a Pareto study "
                            "(studies/pareto.py registers its front)")
    if study_run is None:
        study_run = max(members, key=lambda v: int(v.version)).tags[FRONT_STUDY_TAG]
    members = [v for v in members if v.tags[FRONT_STUDY_TAG] == study_run]
    if not members:
        raise TrackingError(f"model {name!r}: no version comes from study run {study_run}")
    aliases: dict[str, list] = {}
    model = client.get_registered_model(name)
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    key = members[0].tags.get("pareto_cost", "latency_ms_batch1")
    members.sort(key=lambda v: float(v.tags.get(key, "nan") if key != "params" else v.tags.get("parameters", "nan")))
    def student(v):
        return v.tags.get("student", "?") + (" int8" if v.tags.get("precision") == "int8" else "")

    width = max([7] + [len(student(v)) for v in members])
    lines = [f"{name}: Pareto front of study run {study_run} ({len(members)} members, by {key}; latency on "
             f"{members[0].tags.get('latency_device', '?')})",
             f"{'version':<8} {'aliases':<12} {'student':<{width}}  {'ms b=1':>8}  {'ms/img':>8}  {'params':>9}  "
             f"{'MFLOPs':>8}  {'val mean':>8}  {'test mean':>9}"]
    for v in members:
        t = v.tags
        marks = " ".join(f"@{a}" for a in aliases.get(str(v.version), []))
        lines.append(f"v{v.version:<7} {marks:<12} {student(v):<{width}}  "
                     f"{float(t.get('latency_ms_batch1', 'nan')):>8.4f}  {float(t.get('latency_ms_per_image', 'nan')):>8.5f}  "
                     f"{int(t.get('parameters', 0)):>9,}  {int(t.get('flops', 0)) / 1e6:>8.3f}  "
                     f"{100 * float(t.get('val_acc_mean', 'nan')):>7.2f}%  {100 * float(t.get('test_acc_mean', 'nan')):>8.2f}%")
    return "\n".join(lines)


# ---- the study scripts' options (studies/pareto.py, studies/search.py --pareto) ---------------------------

# the size knobs searched by default, for each built-in dataset's student: width multipliers around it
DEFAULT_FAMILIES = {
    "digits_student": ("vgg", {"blocks": ["8x16x16"], "fc": ["32"], "width": ["0.25", "0.5", "1", "2", "4"]}),
    "vgg7": ("vgg", {"width": ["0.125", "0.25", "0.5", "1"]}),
    "cnn2": ("cnn", {"width": ["0.25", "0.5", "1", "2"]}),
    "cnn1": ("cnn", {"blocks": ["16"], "fc": ["32"], "width": ["0.5", "1", "2", "4"]}),
    "mlp_2x800": ("mlp", {"hidden": ["800x800"], "width": ["0.125", "0.25", "0.5", "1"]}),
    "mlp_3x800": ("mlp", {"hidden": ["800x800x800"], "width": ["0.125", "0.25", "0.5", "1"]}),
    "mlp_2x3072": ("mlp", {"hidden": ["3072x3072"], "width": ["0.125", "0.25", "0.5", "1"]}),
    "mlp_student": ("mlp", {"hidden": ["64"], "width": ["0.25", "0.5", "1", "2", "4"]}),
    "wrn_10_4": ("wrn", {"depth": ["10", "16"], "widen": ["1", "2", "4"]}),
    "wrn_22_4": ("wrn", {"depth": ["10", "16", "22"], "widen": ["1", "2", "4"]}),
    "resnet8": ("resnet", {"depth": ["8", "14", "20", "26", "32"]}),
}


def add_options(parser) -> None:
    from kdtune.models.families import family_help

    group = parser.add_argument_group("Pareto: candidate students, costs and budgets")
    group.add_argument("--students", nargs="+", metavar="REF",
                       help="candidate students: built-in names, torchvision:NAME, timm:NAME, package.module:factory "
                            "or family references such as wrn:depth=16,widen=2")
    group.add_argument("--family", help=f"a family searched over its knobs' values (--knob); {family_help()}")
    group.add_argument("--knob", action="append", default=[], metavar="NAME=V1,V2",
                       help="values of a family knob, e.g. --knob depth=10,16 --knob widen=1,2 (every combination)")
    group.add_argument("--cost", choices=list(COSTS), default="latency",
                       help="the front's cost axis (latency: batch 1; all four are always recorded)")
    group.add_argument("--latency-budget-ms", type=float,
                       help="the champion: the most accurate front member (on validation) whose batch-1 latency is "
                            "at most this")
    group.add_argument("--max-params", type=int, help="the champion: the most accurate front member with at most "
                                                      "this many parameters")
    group.add_argument("--sampler", choices=["tpe", "nsga2"], default="tpe", help="Optuna's multi-objective sampler")
    group.add_argument("--asha", action="store_true",
                       help="early stopping with ASHA on validation accuracy alone (it takes one metric); off by "
                            "default: it stops small students first, which the front needs")
    group.add_argument("--latency-warmup", type=int, default=5, help="untimed forward passes before timing")
    group.add_argument("--latency-runtime", choices=list(RUNTIMES), default="torch",
                       help="time candidates in eager PyTorch on the trial's device, or as ONNX in onnxruntime on the "
                            "CPU (pip install 'kdtune[export]')")
    group.add_argument("--latency-repeats", type=int, default=21, help="timed forward passes; the median is kept")
    group.add_argument("--latency-batch", type=int, default=256, help="the batch of the per-image latency")
    group.add_argument("--quantize", choices=["int8"],
                       help="int8: each front member's post-training int8 twin (onnxruntime, calibrated on training "
                            "samples) is measured and registered beside it; needs --latency-runtime onnxruntime")
    group.add_argument("--calibration-samples", type=int, default=256,
                       help="--quantize: training samples the int8 activation ranges are calibrated on")


def parse_knobs(pairs: list[str]) -> dict[str, list[str]]:
    choices: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, values = pair.partition("=")
        listed = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not name.strip() or not listed:
            raise ConfigError(f"--knob {pair!r}: expected NAME=V1,V2,..., e.g. --knob widen=1,2,4")
        if name.strip() in choices:
            raise ConfigError(f"--knob {name.strip()}: given twice; list all its values once")
        choices[name.strip()] = listed
    return choices


def plan_from_args(args, default_student: str) -> Pareto:
    """The Pareto plan of a script's options; a bad value raises one ConfigError line."""
    from kdtune.models.families import FAMILIES, expand_family

    students = list(args.students or [])
    if args.knob and not args.family:
        raise ConfigError(f"--knob {args.knob[0]}: give the family it belongs to with --family "
                          f"({', '.join(FAMILIES)})")
    if args.family:
        students += expand_family(args.family, parse_knobs(args.knob))
    if not students:
        if default_student not in DEFAULT_FAMILIES:
            raise ConfigError(f"student {default_student}: no default family of sizes to search; give --students "
                              f"REF ... or --family NAME --knob KNOB=V1,V2 (families: {', '.join(FAMILIES)})")
        students = expand_family(*DEFAULT_FAMILIES[default_student])
    plan = Pareto(students=students, cost=args.cost, latency_budget_ms=args.latency_budget_ms,
                  max_params=args.max_params, early_stopping=args.asha, sampler=args.sampler,
                  latency_batch=args.latency_batch, warmup=args.latency_warmup, repeats=args.latency_repeats,
                  latency_runtime=args.latency_runtime, quantize=args.quantize,
                  calibration_samples=args.calibration_samples)
    plan.check()
    plan.refs()
    return plan


def start_points(plan: Pareto, params: dict) -> list[dict]:
    """Known points to start the search from: `params` at the first, middle and last candidate as listed (a
    family lists its sizes in the order of the knobs' values), so the front spans the sizes from the start."""
    specs = list(plan.refs())
    if len(specs) == 1:
        return [dict(params)]
    chosen = list(dict.fromkeys([specs[0], specs[len(specs) // 2], specs[-1]]))
    return [{**params, "student": student} for student in chosen]


def run_script(args, name: str = "pareto") -> int:
    """A study script's Pareto study (studies/pareto.py, studies/search.py --pareto): build, run, print."""
    import sys

    from kdtune.errors import KdtuneError
    from kdtune.options import user_errors
    from kdtune.study import run_study

    with user_errors():
        spec = script_spec(args, name)
    try:
        result = run_study(spec)
    except KdtuneError as error:
        print(f"kdtune: error: {error}", file=sys.stderr)
        return 2
    return print_result(result)


def script_spec(args, name: str):
    """The StudySpec of a script's options: candidates, the multi-objective search and the baseline's own
    search over the same students with the same budget."""
    from kdtune.options import spec_from_args
    from kdtune.resolve import common_links, models_of, recipe_of
    from kdtune.spaces import MethodSpace, candidate_link_sets
    from kdtune.study import Search

    plain = spec_from_args(args, name=name, variants=[])
    defaults = recipe_of(plain)
    teacher, student = models_of(plain, defaults)
    plan = plan_from_args(args, student.spec)
    lr = plain.overrides.get("lr") or defaults["student_recipe"]["lr"]
    recipe = _lr_range(args.search_lr, lr)
    # link numbers every candidate shares with the teacher: a link set searched must map onto each student
    common = sorted(set.intersection(*(set(common_links(teacher, ref)) for ref in plan.refs().values())))
    methods = MethodSpace(tuple(args.methods), tuple(candidate_link_sets(common)),
                          fsp_pairs=getattr(args, "fsp_pairs", "") if "fsp" in args.methods else "", recipe=recipe)
    budget = dict(num_samples=args.num_samples, time_budget_s=args.time_budget_s, grace_period=args.grace_period,
                  reduction_factor=args.reduction_factor, seed=args.searcher_seed)
    at_lr = {"lr": lr} if recipe else {}
    known = [{"method": "kd", "temperature": 4.0, "alpha": 0.9, **at_lr}] if "kd" in args.methods else []
    search = Search(suggest=plan.space(methods), points_to_evaluate=[p for k in known for p in start_points(plan, k)],
                    **budget)
    baseline = Search(suggest=plan.space(MethodSpace(("none",), recipe=recipe)),
                      points_to_evaluate=start_points(plan, {"method": "none", **at_lr}), **budget)
    return spec_from_args(args, name=name, variants=[], search=search, baseline_search=baseline, pareto=plan,
                          label_header="student", title=f"Pareto front, {args.dataset}")


def _lr_range(text: str | None, lr: float) -> dict:
    if text == "none":
        return {}
    if text:
        try:
            low, high = (float(v) for v in text.split(","))
        except ValueError:
            raise ConfigError(f"--search-lr {text!r}: expected LOW,HIGH, e.g. 0.003,0.03") from None
        return {"lr": (low, high)}
    return {"lr": (lr / 3, lr * 3)}


def print_result(result) -> int:
    """The search, the front, the champion and what measuring latency cost; 1 when a budget found no member."""
    import sys

    from kdtune.options import search_table

    run = result.pareto
    print()
    print(search_table(result.phases["search"]))
    print()
    print(run.table())
    for phase, trials in result.phases.items():
        for trial in trials:
            if trial.failed:
                print(f"failed ({phase}): {trial.label} seed={trial.seed}: {trial.error}")
    decision = result.registration
    if decision:
        print(f"\nchampion: {decision.name} version {decision.version} -> @{decision.alias}: {decision.reason}")
    name = decision.name if decision else (result.spec.register_as or "NAME")
    print(f"registered {sum(1 for r in run.rows if r['version'])} front member(s) (kdtune models pareto {name} "
          "lists them)")
    share = run.seconds / result.wall_time_s if result.wall_time_s else 0.0
    print(f"wall time {result.wall_time_s:.1f}s; latency measurement {run.seconds:.1f}s ({100 * share:.1f}% of it); "
          f"trial training time {result.training_time_s:.1f}s")
    print(f"mlflow: {result.tracking_uri} experiment {result.experiment_id}, study run {result.parent_run_id}")
    if run.plan.budget_text() and run.selected is None:
        print(f"kdtune: error: no front member meets the budget ({run.plan.budget_text()}); the champion is "
              "unchanged", file=sys.stderr)
        return 1
    return 0
