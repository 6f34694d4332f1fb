"""The Ray Tune layer: validate a study, start or join Ray, run its phases, collect and record the results.

    run_study(spec) -> StudyResult
      validate every trial config (a search: its space, by sampling it), the dataset and the tracking server
      -> teacher (registry | file | trained once) -> object store (dataset, teacher weights, cached logits)
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
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kdtune import recipes, registry, report, teachers, tracking
from kdtune.config import TrialConfig
from kdtune.data import load_dataset
from kdtune.errors import ConfigError, KdtuneError
from kdtune.results import BASELINE_LABEL, format_table, pick_best, summarise
from kdtune.trial import close_runs_callback, distill_trial, variant_of

STUDY_FILE = "kdtune_study.json"


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
    """A study: a dataset, teacher and student, and what to compare (grid variants or a search)."""

    name: str
    dataset: str = "digits"
    variants: list[dict] = field(default_factory=list)  # grid: each {"label": ..., <TrialConfig fields>}
    search: Search | None = None
    overrides: dict = field(default_factory=dict)  # applied to every student trial (after the dataset recipe)
    teacher_overrides: dict = field(default_factory=dict)
    seeds: int = 1
    teacher: str | None = None  # architecture; default from the dataset recipe
    student: str | None = None
    teacher_source: str | None = None  # models:/name@alias or a weights file; default: registry, else train
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    reuse_actors: bool | None = None  # None: reuse trial processes on a single-node Ray only (see _reuse_actors)
    max_failures: int = 2
    address: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    store_dir: str = ".kdtune"
    data_dir: str | None = None
    download: bool = True
    register_as: str | None = None
    margin: float = 0.0  # the registry gate: champion moves only for a mean test accuracy better by more
    resume: str | None = None  # a study folder to continue
    label_header: str = "setting"
    title: str = ""


@dataclass
class StudyResult:
    spec: StudySpec
    trials: list[dict]  # the trials that make the final table (grid, or confirm after a search)
    summary: list[dict]
    phases: dict[str, list[dict]]
    best_label: str | None
    registration: "registry.Decision | None"
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    study_dir: str
    wall_time_s: float
    training_time_s: float

    def table(self) -> str:
        return format_table(self.summary, self.spec.label_header)


# ---- validation -----------------------------------------------------------------------------------

def check_spec(spec: StudySpec) -> list[TrialConfig]:
    """Every trial config the study can produce, validated; raises ConfigError naming the bad value."""
    if not isinstance(spec.seeds, int) or spec.seeds < 1:
        raise ConfigError(f"seeds={spec.seeds!r}: must be a whole number >= 1")
    if not spec.cpus_per_trial > 0:
        raise ConfigError(f"cpus_per_trial={spec.cpus_per_trial}: must be > 0")
    if not spec.gpus_per_trial >= 0:
        raise ConfigError(f"gpus_per_trial={spec.gpus_per_trial}: must be >= 0")
    if spec.max_concurrent is not None and spec.max_concurrent < 1:
        raise ConfigError(f"max_concurrent={spec.max_concurrent}: must be >= 1")
    if spec.search is None and not spec.variants:
        raise ConfigError(f"study {spec.name!r}: no variants and no search to run")
    labels = [v.get("label") for v in spec.variants]
    if len(set(labels)) != len(labels) or None in labels:
        raise ConfigError(f"study {spec.name!r}: every variant needs a distinct 'label' (got {labels})")
    base = student_base(spec)
    configs = [TrialConfig.from_flat({**base, **_without_label(v), "seed": seed})
               for v in spec.variants for seed in range(spec.seeds)]
    if spec.search is not None:
        configs += _sample_search_space(spec.search, base)
    return configs


def _without_label(variant: dict) -> dict:
    return {k: v for k, v in variant.items() if k != "label"}


def _sample_search_space(search: Search, base: dict, samples: int = 48) -> list[TrialConfig]:
    """Draw configurations from the define-by-run space (random sampler) and validate each one now,
    so a bad range fails before any trial instead of inside one."""
    import optuna

    if search.num_samples < 1:
        raise ConfigError(f"num_samples={search.num_samples}: must be >= 1")
    if search.time_budget_s is not None and search.time_budget_s <= 0:
        raise ConfigError(f"time_budget_s={search.time_budget_s}: must be > 0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=search.seed))
    configs = [TrialConfig.from_flat({**base, **point}) for point in search.points_to_evaluate]
    for _ in range(samples):
        trial = study.ask()
        constants = search.suggest(trial) or {}
        configs.append(TrialConfig.from_flat({**base, **trial.params, **constants}))
        study.tell(trial, 0.0)
    return configs


def student_base(spec: StudySpec) -> dict:
    recipe = recipes.recipe_for(spec.dataset)
    return {
        "dataset": spec.dataset,
        "teacher": spec.teacher or recipe["teacher"],
        "student": spec.student or recipe["student"],
        **recipe["student_recipe"],
        **spec.overrides,
    }


def teacher_config(spec: StudySpec) -> TrialConfig:
    recipe = recipes.recipe_for(spec.dataset)
    arch = spec.teacher or recipe["teacher"]
    return TrialConfig.from_flat({
        "dataset": spec.dataset, "teacher": arch, "student": arch, "method": "none",
        **recipe["teacher_recipe"], **spec.teacher_overrides,
    })


# ---- the study ------------------------------------------------------------------------------------

def run_study(spec: StudySpec, echo=print) -> StudyResult:
    started = time.perf_counter()
    configs = check_spec(spec)  # every bad value stops here, before anything starts
    teacher_cfg = teacher_config(spec)
    saved = _read_study_file(spec) if spec.resume else None
    dataset = load_dataset(spec.dataset, spec.data_dir, spec.download)
    store = Path(spec.store_dir).resolve()
    uri = spec.tracking_uri or (saved or {}).get("tracking_uri_external")
    with tracking.tracking_server(uri, store, echo) as uri:
        return _Study(spec, configs, teacher_cfg, dataset, uri, store, saved, echo).run(started)


class _Study:
    def __init__(self, spec, configs, teacher_cfg, dataset, uri, store, saved, echo):
        self.spec, self.configs, self.teacher_cfg, self.dataset = spec, configs, teacher_cfg, dataset
        self.uri, self.store, self.saved, self.echo = uri, store, saved, echo
        self.base = student_base(spec)
        self.client = tracking.client_for(uri)

    def run(self, started: float) -> StudyResult:
        spec = self.spec
        _init_ray(spec.address)
        _check_tracking_reachable_from_cluster(self.uri)
        experiment_id, parent_id = self._open_parent_run()
        self.echo(f"mlflow: study run {parent_id}: {tracking.ui_link(self.uri, experiment_id)}")
        context = tracking.TrackingContext(self.uri, experiment_id, parent_id)
        status = "FAILED"
        try:
            study_dir = self._study_dir()
            _write_study_file(study_dir, {"name": spec.name, "parent_run_id": parent_id,
                                          "experiment_id": experiment_id,
                                          "tracking_uri_external": spec.tracking_uri,
                                          # how to run it again: `kdtune study resume` re-runs this with --resume
                                          "command": [str(Path(sys.argv[0]).resolve()), *sys.argv[1:]]})
            self.echo(f"study folder: {study_dir}  (continue it with --resume {study_dir})")
            trainable = self._trainable(context)
            phases: dict[str, list[dict]] = {}
            confirm: list[dict] = []
            if spec.search is None:
                phases["grid"] = self._run_phase("grid", trainable, study_dir, context,
                                                 self._grid_space(spec.variants))
            else:
                phases["search"] = self._run_phase("search", trainable, study_dir, context, None)
                best = _best_search_trial(phases["search"])
                if best is None:
                    raise KdtuneError("the search finished no trial; see the failures above")
                confirm = [{"label": BASELINE_LABEL, "method": "none"},
                           {"label": f"best: {best['label']}", **best["params"]}]
                phases["confirm"] = self._run_phase("confirm", trainable, study_dir, context,
                                                    self._grid_space(confirm))
            final = phases.get("confirm") or phases["grid"]
            summary = summarise(final, order=[v["label"] for v in (confirm if spec.search else spec.variants)])
            best_label = pick_best(summary)
            champion = self._register_best(final, summary, best_label) if best_label else None
            training_time = sum(t["metrics"].get("training_time_s", 0.0) for p in phases.values() for t in p)
            result = StudyResult(spec, final, summary, phases, best_label, champion, parent_id, experiment_id,
                                 self.uri, str(study_dir), time.perf_counter() - started, training_time)
            _log_study_results(self.client, parent_id, result)
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
                                        tags={"kdtune.role": "study", "kdtune.study": spec.name})
        tracking.log_params(self.client, parent.info.run_id, {
            "dataset": spec.dataset, "teacher": self.teacher_cfg.student, "student": self.base["student"],
            "seeds": spec.seeds, "variants": len(spec.variants), "search": spec.search is not None,
            "search.num_samples": spec.search.num_samples if spec.search else 0,
            "cpus_per_trial": spec.cpus_per_trial, "gpus_per_trial": spec.gpus_per_trial,
            **{f"base.{k}": v for k, v in self.base.items() if k not in ("dataset", "teacher", "student")},
        })
        return experiment_id, parent.info.run_id

    def _study_dir(self) -> Path:
        if self.spec.resume:
            return Path(self.spec.resume).resolve()
        storage = self.spec.storage or str(self.store / "ray_results")
        if "://" in storage:
            raise ConfigError(f"storage={storage!r}: kdtune keeps its study folder on a mounted path; use a shared "
                              "filesystem path (e.g. /shared/ray_results on NFS)")
        folder = Path(storage).resolve() / f"{self.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder.mkdir(parents=True, exist_ok=False)
        return folder

    def _trainable(self, context):
        from ray import tune

        spec = self.spec
        teacher_state, teacher_logits = None, None
        if any(c.method != "none" for c in self.configs):
            teacher = teachers.obtain_teacher(self.teacher_cfg, self.dataset, spec.teacher_source, context,
                                              spec.cpus_per_trial, spec.gpus_per_trial, log=self.echo)
            self.client.set_tag(context.parent_run_id, "kdtune.teacher", teacher.source)
            teacher_state = teacher.state_dict
            teacher_logits = _teacher_logits_if_useful(self.configs, self.teacher_cfg.student, teacher_state,
                                                       self.dataset, spec)
        return tune.with_resources(
            tune.with_parameters(distill_trial, dataset=self.dataset, teacher_state=teacher_state,
                                 teacher_logits=teacher_logits, context=context, base=self.base,
                                 threads=int(spec.cpus_per_trial)),
            {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial},
        )

    def _grid_space(self, variants: list[dict]) -> dict:
        from ray import tune

        return {"variant": tune.grid_search(variants), "seed": tune.grid_search(list(range(self.spec.seeds)))}

    def _run_phase(self, name: str, trainable, study_dir: Path, context, param_space: dict | None) -> list[dict]:
        from ray import tune

        path = study_dir / name
        if self.spec.resume and tune.Tuner.can_restore(str(path)):
            self.echo(f"{name}: resuming {path}")
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=param_space or {},
                               tune_config=self._tune_config(name),
                               run_config=self._run_config(name, study_dir, context))
        return _collect(tuner.fit())

    def _tune_config(self, phase: str):
        from ray import tune

        common = dict(reuse_actors=_reuse_actors(self.spec.reuse_actors), trial_name_creator=_trial_name,
                      trial_dirname_creator=_trial_name)
        if phase != "search":
            return tune.TuneConfig(max_concurrent_trials=self.spec.max_concurrent, **common)
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search = self.spec.search
        import optuna

        searcher = OptunaSearch(space=search.suggest, metric="val_acc", mode="max",
                                points_to_evaluate=search.points_to_evaluate or None,
                                sampler=optuna.samplers.TPESampler(seed=search.seed))
        limited = ConcurrencyLimiter(searcher, max_concurrent=self.spec.max_concurrent or 2)
        epochs = max(c.epochs for c in self.configs)
        scheduler = ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=epochs,
                                  grace_period=search.grace_period, reduction_factor=search.reduction_factor)
        return tune.TuneConfig(search_alg=limited, scheduler=scheduler, num_samples=search.num_samples,
                               time_budget_s=search.time_budget_s, **common)

    def _run_config(self, name: str, study_dir: Path, context):
        from ray import tune

        return tune.RunConfig(
            name=name, storage_path=str(study_dir),
            failure_config=tune.FailureConfig(max_failures=self.spec.max_failures),
            # keep 2: with 1, Tune snapshots the whole experiment state after every single checkpoint
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[close_runs_callback(context)], verbose=1, progress_reporter=_status_table(name),
        )

    def _register_best(self, trials: list[dict], summary: list[dict], best_label: str):
        """Register the best configuration's best seed; the registry gate decides whether it is champion."""
        from kdtune.models import build_model, count_parameters

        candidates = [t for t in trials if t["label"] == best_label and not t["error"] and "model_uri" in t["metrics"]]
        if not candidates:
            return None
        best = max(candidates, key=lambda t: t["metrics"]["val_acc"])
        row = next(r for r in summary if r["label"] == best_label)
        spec, base, metrics = self.spec, self.base, best["metrics"]
        student = build_model(base["student"], self.dataset.num_classes, self.dataset.input_shape)
        tags = {
            "study": spec.name, "dataset": spec.dataset, "teacher": self.teacher_cfg.student,
            "student": base["student"], "method": best["params"].get("method", base.get("method")),
            "label": best_label, "seed": best["seed"], "run_id": metrics["mlflow_run_id"],
            "val_acc": f"{metrics['val_acc']:.4f}", "test_acc": f"{metrics['test_acc']:.4f}",
            "test_acc_per_seed": ",".join(f"{a:.4f}" for a in row["test"]), "parameters": count_parameters(student),
            **{f"hp.{k}": v for k, v in best["params"].items()},
            **{k: f"{metrics[k]:.4f}" for k in ("latency_ms_batch1", "latency_ms_per_image") if k in metrics},
        }
        decision = registry.register(self.client, metrics["model_uri"], registered_name(spec, base), tags,
                                     candidate_mean=row["test_mean"],
                                     fingerprint=registry.test_set_fingerprint(self.dataset), margin=spec.margin)
        self.echo(f"registry: {decision.name} version {decision.version} -> @{decision.alias} ({decision.reason})")
        return decision


def registered_name(spec: StudySpec, base: dict) -> str:
    return spec.register_as or f"kdtune-{spec.dataset}-{base['student']}"


def _status_table(phase: str):
    """Tune's status table with the columns that matter, not dozens (Ray's newer output shows every metric)."""
    from ray.tune import CLIReporter

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Ray ignores a custom reporter under its new output engine
    # only keys every trial has: the reporter looks each one up in the best trial's config (a search's
    # conditional parameters, e.g. beta for a kd trial, would raise KeyError there)
    parameters = {"method": "method"} if phase == "search" else {"variant/label": "setting", "seed": "seed"}
    return CLIReporter(parameter_columns=parameters, max_report_frequency=20, print_intermediate_tables=True,
                       metric_columns={"epoch": "epoch", "val_acc": "val acc", "best_val_acc": "best val",
                                       "train_loss": "train loss", "test_acc": "test acc"},
                       sort_by_metric=True, metric="val_acc", mode="max", max_progress_rows=30)


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise KdtuneError(f"address={address!r}: could not connect to a Ray cluster ({error})") from None


def _alive_nodes() -> list[dict]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def _reuse_actors(asked: bool | None) -> bool:
    """Whether a finished trial's process runs the next trial. It saves the process start-up (seconds per trial),
    which matters for short trials on one machine. On a cluster of several nodes, or one whose head takes no
    trials (an autoscaling cluster), a freed process would take over pending trials whose own processes are still
    starting on other nodes, piling the study onto whichever node started first; there, every trial gets a
    process of its own unless the user asks otherwise."""
    if asked is not None:
        return asked
    nodes = _alive_nodes()
    return len(nodes) == 1 and nodes[0].get("Resources", {}).get("CPU", 0) > 0


def _check_tracking_reachable_from_cluster(uri: str) -> None:
    """A loopback tracking URI (the embedded server) is unreachable from trials on other machines."""
    host = uri.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        return
    machines = {node["NodeManagerAddress"] for node in _alive_nodes()}
    if len(machines) > 1:
        raise ConfigError(f"tracking URI {uri} is on loopback, but the Ray cluster spans {len(machines)} machines "
                          "whose trials could not reach it; start an MLflow server on the head "
                          "(kdtune mlflow serve, or mlflow server --host 0.0.0.0) and pass --tracking-uri "
                          "http://HEAD:5000 or set MLFLOW_TRACKING_URI")


def _teacher_logits_if_useful(configs, teacher_arch, teacher_state, dataset, spec):
    """Cache teacher logits (one Ray task) when some trial can use them: logits-only method, no augmentation."""
    from kdtune import distill

    usable = [c for c in configs if c.method != "none" and c.teacher_cache != "off" and not c.uses_augmentation()
              and not distill.method_class(c.method)(c).needs_teacher_features]
    fractions = {c.val_fraction for c in usable}
    if len(fractions) != 1:
        return None  # nothing can use it, or normalisation differs per split: trials run the teacher online
    import ray

    from kdtune.engine import teacher_logits_for

    task = ray.remote(num_cpus=spec.cpus_per_trial, num_gpus=spec.gpus_per_trial)(teacher_logits_for)
    return ray.get(task.remote(teacher_arch, teacher_state, dataset, fractions.pop()))


def _trial_name(trial) -> str:
    label, _, seed = variant_of(trial.config)
    return f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', label)[:60]}_seed{seed}_{trial.trial_id}"


def _collect(grid) -> list[dict]:
    trials = []
    for result in grid:
        config = result.config or {}
        label, params, seed = variant_of(config) if config else ("?", {}, 0)
        error = None
        if result.error is not None:
            lines = str(result.error).strip().splitlines()
            error = (lines[-1] if lines else type(result.error).__name__)[:500]
        trials.append({"label": label, "params": params, "seed": seed, "metrics": dict(result.metrics or {}),
                       "error": error, "path": result.path})
    return trials


def _best_search_trial(trials: list[dict]) -> dict | None:
    """The search trial with the best validation accuracy among those that ran to the end."""
    finished = [t for t in trials if not t["error"] and "test_acc" in t["metrics"]]
    return max(finished, key=lambda t: t["metrics"]["val_acc"]) if finished else None


def _write_study_file(study_dir: Path, content: dict) -> None:
    path = study_dir / STUDY_FILE
    if not path.exists():
        path.write_text(json.dumps(content, indent=2))


def _read_study_file(spec: StudySpec) -> dict:
    path = Path(spec.resume) / STUDY_FILE
    if not path.is_file():
        raise ConfigError(f"resume={spec.resume!r}: not a kdtune study folder (no {STUDY_FILE}); "
                          "give the folder printed as 'study folder: ...' when the study started")
    saved = json.loads(path.read_text())
    if saved.get("name") != spec.name:
        raise ConfigError(f"resume={spec.resume!r}: that folder holds study {saved.get('name')!r}, not {spec.name!r}")
    return saved


def _log_study_results(client, parent_id: str, result: StudyResult) -> None:
    import csv
    import io

    best = next((r for r in result.summary if r["label"] == result.best_label), None)
    baseline = next((r for r in result.summary if r["label"] == BASELINE_LABEL and r["n"]), None)
    all_trials = [t for p in result.phases.values() for t in p]
    metrics = {"wall_time_s": result.wall_time_s, "training_time_s": result.training_time_s,
               "trials": len(all_trials), "trials_failed": sum(1 for t in all_trials if t["error"]),
               "trials_stopped_early": sum(1 for t in all_trials if not t["error"] and "test_acc" not in t["metrics"]),
               "epochs_trained": sum(t["metrics"].get("epoch", 0) for t in all_trials)}
    if best:
        metrics.update(best_test_acc=best["test_mean"], best_val_acc=best["val_mean"])
    if baseline:
        metrics["baseline_test_acc"] = baseline["test_mean"]
    tracking.log_metrics(client, parent_id, metrics, step=0)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["phase", "label", "seed", "params", "val_acc", "test_acc", "test_acc_at_best_val",
                     "best_epoch", "epochs", "mlflow_run_id", "error"])
    for phase, trials in result.phases.items():
        for t in trials:
            m = t["metrics"]
            writer.writerow([phase, t["label"], t["seed"], json.dumps(t["params"], sort_keys=True), m.get("val_acc"),
                             m.get("test_acc"), m.get("test_acc_at_best_val"), m.get("best_epoch"), m.get("epoch"),
                             m.get("mlflow_run_id"), t["error"] or ""])
    client.log_text(parent_id, buffer.getvalue(), "results/trials.csv")
    client.log_text(parent_id, result.table() + "\n", "results/table.txt")
    client.set_tag(parent_id, "kdtune.best", str(result.best_label))
    if result.registration:
        client.set_tag(parent_id, "kdtune.registered", f"{result.registration.name} version "
                                                       f"{result.registration.version} @{result.registration.alias}")
