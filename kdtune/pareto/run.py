"""A Pareto study's kind (kdtune/study_kind.py): the candidates' costs, the multi-objective search, the front,
its confirm runs beside the same students without distillation, and its registration within the budget."""
from __future__ import annotations

import dataclasses
import json
import math

from kdtune.train.costs import COST_KEYS, latency_tags
from kdtune.errors import ConfigError
from kdtune.pareto import Pareto, front_indices
from kdtune.pareto.rows import FrontRow
from kdtune.results import SettingRow
from kdtune.tags import (BASELINE_PREFIX, COST_TAG, COST_TEXT, DEVICE_TAG, FRONT_PREFIX, FRONT_STUDY_TAG, ON_FRONT_TAG,
                         PHASE_TAG, PRECISION_TAG, STUDENT_TAG, cost_metric, pareto_model_name)


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
        self.rows: list[FrontRow] = []
        self.selected: str | None = None
        self.decisions: dict = {}
        self.phases, self.parent_id, self.dataset_name, self.seeds = {}, "", "", 1

    # measuring ---------------------------------------------------------------------------------
    @classmethod
    def measure(cls, spec, resolved, echo=print) -> "ParetoRun":
        """Every candidate architecture's costs, one model at a time, before any MLflow run or folder exists."""
        from kdtune import cluster
        from kdtune.train import costs as costs_module

        plan, dataset = spec.pareto, resolved.dataset
        refs = {s: resolved.students[s] for s in plan.refs()}
        threads = max(1, int(spec.cpus_per_trial))
        arguments = dict(refs=refs, num_classes=dataset.num_classes, input_shape=tuple(dataset.input_shape),
                         threads=threads, batch=plan.latency_batch, warmup=plan.warmup, repeats=plan.repeats,
                         runtime=plan.latency_runtime)
        # where a trial would run, on a whole device: nothing else runs on it while it is timed
        table, seconds = cluster.run_like_a_trial(costs_module.measure_task, **arguments, cpus=spec.cpus_per_trial,
                                                  gpus=math.ceil(spec.gpus_per_trial))
        run = cls(plan, refs, table, seconds, resolved.base.shared.student)
        echo(f"pareto: measured {len(table)} candidate student(s) in {seconds:.1f}s on {run.device}")
        if plan.latency_budget_ms is not None:
            fastest = min(table, key=lambda s: table[s]["latency_ms_batch1"])
            if table[fastest]["latency_ms_batch1"] > plan.latency_budget_ms:
                raise ConfigError(
                    f"--latency-budget-ms {plan.latency_budget_ms:g}: no candidate student meets it on {run.device}; "
                    f"the fastest, {fastest}, takes {table[fastest]['latency_ms_batch1']:.4f} ms at batch 1; "
                    f"allowed: a budget >= {table[fastest]['latency_ms_batch1']:.4f} ms, or smaller candidates")
        return run

    # the study kind's interface (kdtune/study_kind.py) -------------------------------------------
    def trainable(self, parts, resolved):
        """Each trial builds the student its config names."""
        return student_trial, student_parts(parts, resolved.students)

    def scheduler(self, asha):
        """ASHA judges accuracy alone and would stop the small students the front needs: off unless asked."""
        return asha if self.plan.early_stopping else None

    def result_lines(self, result, failures: str) -> list[str]:
        """Its table is the front: each member with its no-distillation student."""
        return [self.table(), failures]

    def searcher(self, search):
        """Accuracy and the student's cost: a multi-objective Optuna study."""
        import optuna

        from kdtune.pareto.search import CostSearch

        sampler = (optuna.samplers.NSGAIISampler(seed=search.seed) if self.plan.sampler == "nsga2"
                   else optuna.samplers.TPESampler(seed=search.seed))
        key = self.plan.cost_key
        return CostSearch(space=search.suggest, costs=self.costs, cost_key=key, cost_metric=cost_metric(key),
                          default_student=self.default_student,
                          points_to_evaluate=search.points_to_evaluate or None,
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

    def confirm_variants(self, phases: dict, chosen: list[dict]) -> list[dict]:
        """Each front member and the no-distillation student of the same architecture, trained alike (not the
        searches' single best points, `chosen`: a front has no one best)."""
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
    def finish(self, study, phases: dict, final: list, summary: list[SettingRow], parent_id: str):
        """Register every front member, choose the champion within the budget, record costs and the front.
        Returns (the selected member's label or None, its registry decision or None)."""
        self.phases, self.parent_id = phases, parent_id
        self.dataset_name, self.seeds = study.dataset.name, study.spec.seeds
        rows = {r.label: r for r in summary}
        self.rows = []
        for member in self.front:
            student = self.student_of(member)
            front, baseline = rows.get(FRONT_PREFIX + student), rows.get(BASELINE_PREFIX + student)
            self.rows.append(FrontRow(student, FRONT_PREFIX + student, self.costs[student], member.metrics["val_acc"],
                                      front, baseline, self.baseline_tuned.get(student, False), member.params))
        self._record_runs(study, final)
        name = study.spec.register_as or pareto_model_name(study.dataset.name)
        for row in self.rows:
            row.version = self._register(study, final, row, name)
        if self.plan.quantize:
            from kdtune.pareto.int8 import int8_rows

            quantised = int8_rows(study, self, final, study.echo)
            for row in quantised:
                row.version = self._register(study, final, row, name)
            twins = {row.student: row for row in quantised}
            self.rows = [r for row in self.rows for r in (row, twins.get(row.student)) if r is not None]
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
            study.client.set_tag(trial.run_id, STUDENT_TAG, student)
            if trial.run_id in on_front:
                study.client.set_tag(trial.run_id, ON_FRONT_TAG, "1")

    def _register(self, study, final: list, row: FrontRow, name: str) -> str | None:
        from kdtune.records import OBJECTIVE
        from kdtune.registration import register_trial, validation_set

        candidates = [t for t in final if t.label == row.label and t.finished and "weights_uri" in t.metrics]
        best = row.trial or OBJECTIVE.best_trial(candidates)  # an int8 row names the run it came from
        if best is None or row.front is None or not row.front.n:
            return None
        costs = row.costs
        tags = {"label": row.label, "parameters": costs["params"], "flops": costs["flops"], **latency_tags(costs),
                FRONT_STUDY_TAG: self.parent_id, "pareto_cost": self.plan.cost_key, PRECISION_TAG: row.precision,
                **({"baseline_test_acc_mean": f"{row.baseline_test_acc:.6f}"}
                   if row.baseline_test_acc is not None else {}),
                **row.tags}
        model_uri = row.model_uri or _model_uri(study, best, self.refs[row.student])
        decision = register_trial(study, best, dataclasses.replace(row.front, point="-"), name, model_uri,
                                  row.student, tags, gated=False)
        row.val_set = validation_set(study, best)
        self.decisions[row.label] = decision
        return decision.version

    def _choose_champion(self, study, name: str):
        """The most accurate registered member on validation within the budget, through the gate."""
        from kdtune import registry

        registered = [r for r in self.rows if r.version]
        within = [r for r in registered if self.plan.meets(r.costs)]
        if not within:
            study.echo(f"pareto: no front member meets the budget ({self.plan.budget_text()}); "
                       "the champion is unchanged")
            return None
        chosen = max(within, key=lambda r: (r.front.val_mean, -r.costs[self.plan.cost_key]))
        self.selected = chosen.label
        takes, reason = self._gate(study.client, name, chosen, study.spec.margin)
        alias = registry.CHAMPION if takes else registry.CHALLENGER
        why = (f"the most accurate front member on validation within {self.plan.budget_text()}" if
               self.plan.budget_text() else "the most accurate front member on validation (no budget)")
        reason = f"{why}; {reason}"
        study.client.set_registered_model_alias(name, alias, chosen.version)
        study.client.set_model_version_tag(name, chosen.version, "gate", reason)
        chosen.alias = alias
        decision = registry.Decision(name, chosen.version, alias, reason)
        study.echo(f"registry: {name} version {chosen.version} -> @{alias} ({reason})")
        return decision

    def _gate(self, client, name: str, chosen: FrontRow, margin: float) -> tuple[bool, str]:
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
        return registry.gate(client, name, chosen.front.val_mean, chosen.val_set, margin)

    def _log_front(self, study) -> None:
        from kdtune import tracking

        client, parent = study.client, self.parent_id
        client.set_tag(parent, COST_TAG, self.plan.cost_key)
        client.set_tag(parent, DEVICE_TAG, self.device)
        tracking.log_metrics(client, parent, {"latency_measure_time_s": self.seconds,
                                              "pareto_front_size": len(self.rows)}, step=0)
        client.log_text(parent, self.table() + "\n", "results/pareto_front.txt")
        client.log_text(parent, json.dumps([row.record() for row in self.rows], indent=2), "results/pareto_front.json")

    # text --------------------------------------------------------------------------------------
    def table(self) -> str:
        return format_front(self.rows, self.plan, self.device, self.dataset_name, self.seeds, self.seconds,
                            len(self.costs))


def format_front(rows: list[FrontRow], plan: Pareto, device: str, dataset: str, seeds: int, seconds: float,
                 candidates: int) -> str:
    def pct(value):
        return "-" if value is None or value != value else f"{100 * value:.2f}"

    def name(r: FrontRow):
        return r.student + (" int8" if r.precision == "int8" else "")

    width = max([7] + [len(name(r)) for r in rows])
    lines = [f"Pareto front of {dataset}: validation accuracy vs {COST_TEXT[plan.cost_key]} (chosen on validation; "
             f"test over {seeds} seed(s)); latency on {device}",
             f"{'student':<{width}}  {'ms b=1':>8}  {'ms/img':>8}  {'params':>9}  {'MFLOPs':>8}  {'val KD':>6}  "
             f"{'test KD':>7}  {'test no KD':>10}  {'gain':>8}  {'version':>9}"]
    for r in rows:
        gain = (f"{100 * (r.test_acc - r.baseline_test_acc):+.2f}pt"
                if r.test_acc is not None and r.baseline_test_acc is not None else "-")
        version = f"v{r.version}" + (f" @{r.alias}" if r.alias else "") if r.version else "-"
        note = "" if r.baseline_tuned else "*"
        lines.append(f"{name(r):<{width}}  {r.costs['latency_ms_batch1']:>8.4f}  {r.costs['latency_ms_per_image']:>8.5f}  "
                     f"{r.costs['params']:>9,}  {r.costs['flops'] / 1e6:>8.3f}  {pct(r.val_acc):>6}  "
                     f"{pct(r.test_acc):>7}  {pct(r.baseline_test_acc) + note:>10}  {gain:>8}  {version:>9}")
    for r in rows:
        if r.precision == "int8":
            lines.append(f"{name(r)}: post-training int8 of v{r.fp32_version} (onnxruntime), "
                         f"{r.speed_ratio:.2f}x the speed of its fp32 file at batch 1, timed "
                         "side by side in one process")
    if any(not r.baseline_tuned for r in rows):
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
