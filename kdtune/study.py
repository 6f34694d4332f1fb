"""The Ray Tune layer: validate a study, start or join Ray, run its phases, collect and record the results.

    run_study(spec) -> StudyResult
      resolve once, in the driver (kdtune/resolve.py): the dataset, the teacher and student references, every
      trial config (a search: its space, by sampling it), links probed on the real networks, the teacher
      source; all of it before any run, folder or version exists
      -> tracking server, Ray (user modules shipped with runtime_env)
      -> teacher (registry | file | pretrained + fine-tuned | trained once)
      -> object store: StudyParts (dataset, references, teacher weights, cached logits), put once
      -> phases, each one Tune experiment under the study folder:
           grid study:   "grid"    variants x seeds, FIFO
           search study: "search"  Optuna TPE (define-by-run) + ASHA on the trial's own epoch counter,
                         "confirm" baseline and the best configuration found, x seeds
      -> summary table, results logged to the parent run, best student registered as @champion

A study folder holds kdtune_study.json (the MLflow parent run, the phases); `resume` continues it: finished
trials are kept, unfinished ones continue from their checkpoints, each in its own MLflow run.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kdtune import cluster, ensemble, registry, report, teacher_training, teachers, tracking, warmstart
from kdtune.errors import KdtuneError
from kdtune.train.parts import StudyParts
from kdtune.train.fusion import group_size, group_variants
from kdtune.records import OBJECTIVE, TrialRecord, status_of
from kdtune.resolve import ResolvedStudy, resolve_study
from kdtune.study_context import StudyContext
from kdtune.study_files import read_study_file, write_study_file
from kdtune.study_log import log_study_results
from kdtune.study_kind import kind_of
from kdtune.storage import Location, check_storage
from kdtune.results import SettingRow, format_table, skipped_row, summarise
from kdtune.trial import MEMBERS_KEY, close_runs_callback, describe, members_of
from kdtune.tags import (BASELINE_LABEL, ROLE_STUDY, ROLE_TAG, STUDY_TAG, TEACHER_TAG, TEACHER_VERSION_TAG, TEACHER_WEIGHTS_TAG,
                         TRAIN_SET_TAG)

@dataclass
class Search:
    """An Optuna TPE search with ASHA early stopping. `suggest(trial)` is define-by-run: it calls
    trial.suggest_*(name, ...) for the TrialConfig fields it searches (conditionally, as it likes) and may
    return a dict of constants."""

    suggest: Callable
    num_samples: int = 30
    time_budget_s: float | None = None
    points_to_evaluate: list[dict] = field(default_factory=list)
    grace_period: int = 1
    reduction_factor: int = 3
    seed: int = 0


@dataclass
class StudySpec:
    """A study: a dataset, teacher and student, and what to compare (grid variants or a search).

    dataset: a built-in name, "folder:PATH", "npz:PATH", "package.module:function", or a kdtune Dataset
             (e.g. kdtune.data.from_arrays(...)) or a function returning one.
    teacher, student: a built-in name, "torchvision:NAME", "timm:NAME", "package.module:factory", a ModelRef,
             a function factory(num_classes, input_shape) -> nn.Module, or (teacher) a trained nn.Module.
    teacher_source: where the teacher's weights come from (kdtune/teachers.py): None, "pretrained",
             models:/..., a file, "train:S"; an nn.Module given as `teacher` is its own source; a list of
             sources is an ensemble teacher (kdtune/ensemble.py).
    """

    name: str
    dataset: Any = "digits"
    variants: list[dict] = field(default_factory=list)  # grid: each {"label": ..., <TrialConfig fields>}
    search: Search | None = None
    baseline_search: Search | None = None  # a search: the baseline's own search, same budget (else untuned)
    # several searches, each under its label (the methods study: one per method, the same budget); each one's best
    # point joins the confirm phase as its own row; a label the model pair cannot run is listed as skipped
    searches: dict = field(default_factory=dict)
    pareto: Any = None  # a search over students and a cost (kdtune.pareto.Pareto): the front, not one best
    tune: dict = field(default_factory=dict)  # grid: recipe values tried for every setting, e.g. {"lr": [...]}
    allow_failed_best: bool = False  # may a setting with failed seeds be chosen as best?
    fuse: Any = "auto"  # grid: train variants that share batches together, up to this many (off | auto | N)
    overrides: dict = field(default_factory=dict)  # applied to every student trial (after the dataset recipe)
    teacher_overrides: dict = field(default_factory=dict)
    seeds: int = 1
    teacher: Any = None  # default: the dataset recipe's
    student: Any = None
    teacher_source: Any = None
    image_size: int | None = None  # folder datasets: resize every image to this size
    stream: bool | None = None  # None: stream from disk only when the dataset exceeds the memory budget
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    reuse_actors: bool | None = None  # None: reuse trial processes on a single-node Ray only (cluster.reuse_actors)
    max_failures: int = 2
    address: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    store_dir: str = ".kdtune"
    data_dir: str | None = None
    download: bool = True
    register_as: str | None = None
    margin: float = 0.0  # the registry gate: champion moves only for a mean validation accuracy better by more
    resume: str | None = None  # a study folder to continue
    label_header: str = "setting"
    title: str = ""
    warm_start: int = 0  # a search: first run the N best configurations earlier studies recorded (kdtune/warmstart.py)


@dataclass
class StudyResult:
    spec: StudySpec
    trials: list[TrialRecord]  # the trials that make the final table (grid, or confirm after a search)
    summary: list[SettingRow]
    phases: dict[str, list[TrialRecord]]
    best_label: str | None
    registration: "registry.Decision | None"
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    study_dir: str
    wall_time_s: float
    training_time_s: float
    teacher: str = ""  # the references' texts, as resolved
    student: str = ""
    kind: Any = None  # the study kind that ran it (kdtune/study_kind.py): a Pareto study's holds its front

    def table(self) -> str:
        return format_table(self.summary, self.spec.label_header)


# ---- the study ------------------------------------------------------------------------------------

def run_study(spec: StudySpec, echo=print) -> StudyResult:
    started = time.perf_counter()
    check_storage(spec.storage)  # a missing bucket or credentials: one line, before any run or folder exists
    saved = read_study_file(spec) if spec.resume else None
    resolved = resolve_study(spec, echo)  # every bad value stops here, before anything is created
    store = Path(spec.store_dir).resolve()
    uri = spec.tracking_uri or (saved or {}).get("tracking_uri_external")
    start_ray = lambda: cluster.init_ray(spec.address, resolved.user_modules)  # noqa: E731
    with tracking.tracking_server(uri, store, echo, meanwhile=start_ray) as uri, tracking.tracking_at(uri):
        return _Study(spec, resolved, uri, store, saved, echo).run(started)


class _Study:
    def __init__(self, spec: StudySpec, resolved: ResolvedStudy, uri, store, saved, echo):
        self.spec, self.resolved = spec, resolved
        self.configs, self.teacher_cfg, self.dataset = resolved.configs, resolved.teacher_config, resolved.dataset
        self.uri, self.store, self.saved, self.echo = uri, store, saved, echo
        self.base = resolved.base
        self.client = tracking.client_for(uri)
        self.context = StudyContext(spec, resolved, self.client, echo)

    def run(self, started: float) -> StudyResult:
        spec = self.spec
        cluster.check_tracking_reachable(self.uri)
        cluster.check_resources(spec.cpus_per_trial, spec.gpus_per_trial)  # before any run or folder exists
        # the kind (kdtune/study_kind.py); a Pareto study measures its candidates' costs here, before any run
        self.kind = kind_of(spec, self.resolved, self.echo)
        if self.resolved.teacher_plan is not None:  # a mismatched registered teacher is refused here, early
            self.resolved.teacher_plan.find_registered(self.dataset, self.resolved.teacher, self.echo,
                                                       self.resolved.held_out)
        experiment_id, parent_id = self._open_parent_run()
        self.echo(f"mlflow: study run {parent_id}: {tracking.ui_link(self.uri, experiment_id)}")
        context = tracking.TrackingContext(self.uri, experiment_id, parent_id)
        status = "FAILED"
        try:
            study_dir = self._study_dir()
            write_study_file(study_dir, {"name": spec.name, "parent_run_id": parent_id,
                                          "experiment_id": experiment_id,
                                          "tracking_uri_external": spec.tracking_uri,
                                          # how to run it again: `kdtune study resume` re-runs this with --resume
                                          "command": [str(Path(sys.argv[0]).resolve()), *sys.argv[1:]]})
            self.echo(f"study folder: {study_dir}  (continue it with --resume {study_dir})")
            trainable = self._trainable(context)
            if spec.search is not None and spec.warm_start:  # kdtune/warmstart.py: earlier studies' best first
                tags = self.client.get_run(parent_id).data.tags
                warmstart.warm_start(spec, self.client, parent_id, warmstart.identity_of(self, tags), self.base,
                                     self.echo)
            phases: dict[str, list[TrialRecord]] = {}
            confirm: list[dict] = []
            # the study's one search as it is now (a warm start put its points first), then the labelled ones
            searches = {**({"": spec.search} if spec.search is not None else {}), **self.resolved.searches}
            if not searches:
                phases["grid"] = self._run_phase("grid", trainable, study_dir, context,
                                                 self._grid_space(self.resolved.variants))
            else:
                bests = []
                for label, search in searches.items():
                    phase = f"search_{label}" if label else "search"
                    phases[phase] = self._run_phase(phase, trainable, study_dir, context, None, search)
                    best = _best_search_trial(phases[phase])
                    if best is None and not label:
                        raise KdtuneError("the search finished no trial; see the failures above")
                    if best is None:
                        self.resolved.skipped[label] = "its search finished no trial (see the failures above)"
                        continue
                    # the chosen setting in the method's own short names, without the method (the row's label)
                    chosen = describe(best.params).partition(" ")[2] if label else ""
                    bests.append({"label": label or f"best: {best.label}", "point": chosen, **best.params})
                if not bests:
                    raise KdtuneError("no search finished a trial; see the failures above")
                baseline = {"label": BASELINE_LABEL, "method": "none"}
                if spec.baseline_search is not None:
                    # the same budget over the baseline's own hyperparameters, so the comparison is fair
                    phases["baseline_search"] = self._run_phase("baseline_search", trainable, study_dir, context,
                                                                None, spec.baseline_search)
                    tuned = _best_search_trial(phases["baseline_search"])
                    if tuned is None:
                        raise KdtuneError("the baseline search finished no trial; see the failures above")
                    point = describe({k: v for k, v in tuned.params.items() if k != "method"})
                    baseline = {**tuned.params, "label": BASELINE_LABEL, "point": point}
                confirm = self.kind.confirm_variants(phases, [baseline, *bests])
                phases["confirm"] = self._run_phase("confirm", trainable, study_dir, context,
                                                    self._grid_space(confirm))
            final = phases.get("confirm") or phases["grid"]
            order = [v["label"] for v in (confirm if searches else spec.variants)]
            summary = summarise(final, order=order, allow_failed=spec.allow_failed_best)
            summary += [skipped_row(label, reason) for label, reason in self.resolved.skipped.items()]
            best_label, champion = self.kind.finish(self.context, phases, final, summary, parent_id)
            training_time = sum(t.metrics.get("training_time_s", 0.0) for p in phases.values() for t in p)
            result = StudyResult(spec, final, summary, phases, best_label, champion, parent_id, experiment_id,
                                 self.uri, str(study_dir), time.perf_counter() - started, training_time,
                                 self.resolved.teacher.spec, self.resolved.student.spec, self.kind)
            log_study_results(self.client, parent_id, result)
            self._log_report(parent_id, study_dir / "report")
            status = "FINISHED"
            return result
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.client.set_terminated(parent_id, status=status)

    # ---- parts ------------------------------------------------------------------------------------
    def _log_report(self, parent_id: str, folder: Path) -> None:
        """The report comes after the results are safe in MLflow: a failure to draw it is reported, and the
        study still ends FINISHED (`kdtune study report` can rebuild it from MLflow later)."""
        try:
            page = report.log_report(self.client, parent_id, folder)
        except Exception as error:  # a figure must never cost the study its results
            self.echo(f"report: could not be built ({type(error).__name__}: {error}); "
                      f"rebuild it with: kdtune study report {parent_id}")
            return
        self.echo(f"report: {page} (logged to the study run under report/)")

    def _open_parent_run(self) -> tuple[str, str]:
        spec = self.spec
        if self.saved:
            parent_id = self.saved["parent_run_id"]
            self.client.update_run(parent_id, status="RUNNING")
            return self.saved["experiment_id"], parent_id
        experiment_id = tracking.get_or_create_experiment(self.client, spec.name)
        parent = self.client.create_run(experiment_id, run_name=f"{spec.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                        tags={ROLE_TAG: ROLE_STUDY, STUDY_TAG: spec.name,
                                              # which samples: a warm start matches earlier studies on it
                                              TRAIN_SET_TAG: registry.train_set_fingerprint(self.dataset)})
        tracking.log_params(self.client, parent.info.run_id, {
            "dataset": self.dataset.name, "teacher": self.teacher_cfg.student, "student": self.base.shared.student,
            "seeds": spec.seeds, "variants": len(spec.variants),
            "search": spec.search is not None or bool(self.resolved.searches),
            "search.num_samples": sum(s.num_samples for s in [*([spec.search] if spec.search else []),
                                                                *self.resolved.searches.values()]),
            "searches": ",".join(self.resolved.searches) if spec.searches else "-",
            "cpus_per_trial": spec.cpus_per_trial, "gpus_per_trial": spec.gpus_per_trial,
            "tune": json.dumps(spec.tune) if spec.tune else "-",
            "baseline_search": spec.baseline_search.num_samples if spec.baseline_search else 0,
            "train_samples": self.dataset.num_train, "test_samples": len(self.dataset.test_labels),
            # the validation split is carved from the training set, stratified by class (data.py)
            "val_samples": len(self.dataset.split(self.base.shared.val_fraction)[1]),
            **{f"base.{k}": v for k, v in self.base.items() if k not in ("dataset", "teacher", "student")},
        })
        # lineage: the splits as MLflow dataset inputs, their digests kdtune's fingerprints (kdtune/registry.py)
        registry.log_dataset(self.client, parent.info.run_id, self.dataset, self.base.shared.val_fraction)
        return experiment_id, parent.info.run_id

    def _study_dir(self) -> Location:
        """The study folder: a local folder or a prefix in an object store (kdtune/storage.py); either way
        `study_dir / name` is a phase's Tune storage and str(study_dir) what Tune and --resume take."""
        if self.spec.resume:
            return Location.of(self.spec.resume)
        storage = self.spec.storage or str(self.store / "ray_results")
        folder = Location.of(storage) / f"{self.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder.mkdir(exist_ok=False)
        return folder

    def _trainable(self, context):
        from ray import tune

        spec, resolved = self.spec, self.resolved
        parts = StudyParts(self.dataset, resolved.student, resolved.teacher)
        if resolved.needs_teacher:
            teacher = teacher_training.obtain_teacher(self.teacher_cfg, self.dataset, resolved.teacher,
                                                      resolved.teacher_plan, context, spec.cpus_per_trial,
                                                      spec.gpus_per_trial, log=self.echo)
            self.client.set_tag(context.parent_run_id, TEACHER_TAG, teacher.source)
            # the teacher's exact identity, whatever its source text: the registered version an alias resolved to,
            # and its weights' fingerprint (what a warm start matches earlier studies on: kdtune/warmstart.py)
            states = teacher.state_dict if teacher.members else [teacher.state_dict]
            fitted = [teachers.fit_state(state, resolved.teacher, self.dataset, teacher.source) for state in states]
            self.client.set_tag(context.parent_run_id, TEACHER_WEIGHTS_TAG,
                                teachers.weights_fingerprint(fitted if teacher.members else fitted[0]))
            if teacher.versions:
                self.client.set_tag(context.parent_run_id, TEACHER_VERSION_TAG, teacher.versions)
            parts.teacher_state = teacher.state_dict
            parts.teacher_logits = self._teacher_logits_if_useful(parts)
            self._teacher_accuracies(parts, teacher, context)
        function, trial_parts = self.kind.trainable(parts, resolved)
        return tune.with_resources(
            tune.with_parameters(function, parts=trial_parts, context=context, base=self.base,
                                 threads=int(spec.cpus_per_trial)),
            {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial},
        )

    def _teacher_accuracies(self, parts: StudyParts, teacher, context) -> None:
        """Each ensemble member's (or the one teacher's) validation and test accuracy, and the ensemble's, on the
        students' splits: logged to the parent run (kdtune/ensemble.py), listed by the report."""
        spec = self.spec
        sources = [m.source for m in teacher.members] if teacher.members else [teacher.source]
        fraction = self.base.shared.val_fraction
        rows = cluster.run_like_a_trial(ensemble.teacher_accuracies, parts, fraction, sources,
                                        cpus=spec.cpus_per_trial, gpus=spec.gpus_per_trial)
        ensemble.log_teacher_accuracies(self.client, context.parent_run_id, rows, self.echo)

    def _teacher_logits_if_useful(self, parts: StudyParts):
        """Cache teacher logits when some trial can use them (a logits-only method, no augmentation, data in
        memory), where a trial would compute them (cluster.run_like_a_trial)."""

        dataset = self.dataset
        usable = [c for c in self.configs if c.method != "none" and c.teacher_cache != "off"
                  and not c.augment_recipe(dataset.default_augment)
                  and not c.method_class(c).needs_teacher_features]
        fractions = {c.val_fraction for c in usable}
        if len(fractions) != 1:
            return None  # nothing can use it, or normalisation differs per split: trials run the teacher online
        if not dataset.in_memory:
            self.echo("teacher: the dataset streams from disk, so teacher logits are not cached; trials run the "
                      "teacher on every batch")
            return None
        spec = self.spec
        return cluster.run_like_a_trial(_cache_teacher_logits, parts, fractions.pop(), cpus=spec.cpus_per_trial,
                                        gpus=spec.gpus_per_trial)

    def _grid_space(self, variants: list[dict]) -> dict:
        """Variants x seeds; variants that can share batches and teacher train as one trial (`fuse`)."""
        from ray import tune

        spec = self.spec
        slots = cluster.trial_slots(spec.cpus_per_trial, spec.gpus_per_trial, spec.max_concurrent)
        groups = group_variants(variants, self.base, group_size(spec.fuse, len(variants) * spec.seeds, slots))
        return {"group": tune.grid_search(groups), "seed": tune.grid_search(list(range(self.spec.seeds)))}

    def _run_phase(self, name: str, trainable, study_dir: Path, context, param_space: dict | None,
                   search: Search | None = None) -> list[TrialRecord]:
        from ray import tune

        from kdtune.progress import quiet_tune

        path = study_dir / name
        with quiet_tune():  # kdtune's progress line (the run config's callback) instead of Tune's tables
            if self.spec.resume and tune.Tuner.can_restore(str(path)):
                self.echo(f"{name}: resuming {path}")
                tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
            else:
                tuner = tune.Tuner(trainable, param_space=param_space or {},
                                   tune_config=self._tune_config(search),
                                   run_config=self._run_config(name, study_dir, context,
                                                               self._progress(name, param_space, search)))
            return _collect(name, tuner.fit())

    def _progress(self, phase: str, param_space: dict | None, search: Search | None):
        """The phase's progress line (kdtune/progress.py): a grid counts its runs (settings x seeds, however
        they are fused into trials), a search its trials."""
        from kdtune.progress import PhaseProgress

        if search is not None:
            total, budget = search.num_samples, search.time_budget_s
        else:
            groups = param_space["group"]["grid_search"]
            total, budget = sum(len(g) for g in groups) * len(param_space["seed"]["grid_search"]), None
        return PhaseProgress(phase, total, label_header=self.spec.label_header, max_failures=self.spec.max_failures,
                             time_budget_s=budget, echo=None if self.echo is print else self.echo)

    def _tune_config(self, search: Search | None):
        from ray import tune

        common = dict(reuse_actors=cluster.reuse_actors(self.spec.reuse_actors), trial_name_creator=_trial_name,
                      trial_dirname_creator=_trial_name)
        if search is None:
            return tune.TuneConfig(max_concurrent_trials=self.spec.max_concurrent, **common)
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search import ConcurrencyLimiter

        limited = ConcurrencyLimiter(self.kind.searcher(search), max_concurrent=self.spec.max_concurrent or 2)
        # ASHA counts main-stage epochs (trial.py reports `main_epoch`): a two-stage method (hints, fsp,
        # adversarial_pretrained) is compared with the others at the same point of its main stage, never while
        # its first stage still runs, and can run to its last epoch and win
        epochs = max(c.epochs for c in self.configs)
        scheduler = self.kind.scheduler(ASHAScheduler(
            time_attr="main_epoch", metric=OBJECTIVE.metric, mode=OBJECTIVE.mode, max_t=epochs,
            grace_period=search.grace_period, reduction_factor=search.reduction_factor))
        return tune.TuneConfig(search_alg=limited, scheduler=scheduler, num_samples=search.num_samples,
                               time_budget_s=search.time_budget_s, **common)

    def _run_config(self, name: str, study_dir: Path, context, progress):
        from ray import tune

        return tune.RunConfig(
            name=name, storage_path=str(study_dir),
            failure_config=tune.FailureConfig(max_failures=self.spec.max_failures),
            # keep 2: with 1, Tune snapshots the whole experiment state after every single checkpoint. With 2 it
            # still forces a snapshot every second epoch of a trial (and warns when that happens often): that
            # keeps the saved state pointing at checkpoints that exist; a snapshot of a local study folder
            # takes milliseconds, so the warning is silenced (progress.quiet_tune), not the snapshots.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            # verbose=0: no Tune status tables or per-trial result lines; the progress callback says what matters
            callbacks=[close_runs_callback(context), progress], verbose=0,
        )


def _cache_teacher_logits(parts: StudyParts, val_fraction: float):
    """The teacher's logits on every un-augmented training sample."""
    from kdtune.train.teacher_logits import teacher_logits_for

    return teacher_logits_for(parts.build_teacher(), parts.dataset, val_fraction)


def _trial_name(trial) -> str:
    members = members_of(trial.config)
    label = members[0].label + (f"+{len(members) - 1}" if len(members) > 1 else "")
    return f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', label)[:60]}_seed{members[0].seed}_{trial.trial_id}"


def _collect(phase: str, grid) -> list[TrialRecord]:
    """One record per member of every trial (a fused trial reports each member's last metrics)."""
    trials = []
    for result in grid:
        config = result.config or {}
        members = members_of(config) if config else []
        error = None
        if result.error is not None:
            lines = str(result.error).strip().splitlines()
            error = (lines[-1] if lines else type(result.error).__name__)[:500]
        metrics = dict(result.metrics or {})
        reported = {(m["label"], m["point"]): m for m in json.loads(metrics.get(MEMBERS_KEY) or "[]")}
        for member in members:
            own = reported.get((member.label, member.point))
            own_metrics = dict(own["metrics"]) if own else {}
            own_error = (own or {}).get("error") or (error if not own_metrics or error else None)
            trials.append(TrialRecord(phase, member.label, member.overrides, member.seed,
                                      status_of(own_metrics, own_error), own_metrics, own_error,
                                      own_metrics.get("mlflow_run_id"), result.path, member.point))
    return trials


def _best_search_trial(trials: list[TrialRecord]) -> TrialRecord | None:
    """The search trial with the best objective among those that ran to the end."""
    return OBJECTIVE.best_trial(t for t in trials if t.finished)
