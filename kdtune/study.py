"""The Ray Tune layer: validate a study, start or join Ray, run one trial per configuration, collect results.

    run_study(spec) -> StudyResult
      validate every trial config, the dataset and the tracking server (before any trial starts)
      -> teacher (registry | file | trained once) -> object store (dataset, teacher weights, cached logits)
      -> Tuner(grid over variants x seeds) -> distill_trial(config) per trial
      -> summary table, results logged to the parent run, best student registered as @champion
"""
from __future__ import annotations

import logging
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdtune import recipes, teachers, tracking
from kdtune.config import TrialConfig
from kdtune.data import Dataset, load_dataset
from kdtune.errors import ConfigError, KdtuneError
from kdtune.models import count_parameters

log = logging.getLogger("kdtune")


@dataclass
class StudySpec:
    """A study: a dataset, teacher and student, and the variants (partial trial configs) to compare."""

    name: str
    dataset: str = "digits"
    variants: list[dict] = field(default_factory=list)  # each: {"label": ..., <TrialConfig fields>}
    overrides: dict = field(default_factory=dict)  # applied to every student trial (after the dataset recipe)
    teacher_overrides: dict = field(default_factory=dict)
    seeds: int = 1
    teacher: str | None = None  # architecture; default from the dataset recipe
    student: str | None = None
    teacher_source: str | None = None  # models:/name@alias or a weights file; default: registry, else train
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    max_failures: int = 2
    address: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    store_dir: str = ".kdtune"
    data_dir: str | None = None
    download: bool = True
    register_as: str | None = None
    label_header: str = "setting"
    title: str = ""


@dataclass
class StudyResult:
    spec: StudySpec
    trials: list[dict]  # one per trial: label, seed, config, final metrics, error
    summary: list[dict]  # one per label: mean/std over seeds
    best_label: str | None
    champion_version: str | None
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    wall_time_s: float
    training_time_s: float

    def table(self) -> str:
        return format_table(self.summary, self.spec.label_header)


# ---- validation -----------------------------------------------------------------------------------

def trial_configs(spec: StudySpec) -> list[tuple[str, TrialConfig]]:
    """Every (label, config) of the study, validated; raises ConfigError naming the bad value."""
    if not spec.variants:
        raise ConfigError(f"study {spec.name!r}: no variants to run")
    if not isinstance(spec.seeds, int) or spec.seeds < 1:
        raise ConfigError(f"seeds={spec.seeds!r}: must be a whole number >= 1")
    if not spec.cpus_per_trial > 0:
        raise ConfigError(f"cpus_per_trial={spec.cpus_per_trial}: must be > 0")
    if not spec.gpus_per_trial >= 0:
        raise ConfigError(f"gpus_per_trial={spec.gpus_per_trial}: must be >= 0")
    labels = [v.get("label") for v in spec.variants]
    if len(set(labels)) != len(labels) or None in labels:
        raise ConfigError(f"study {spec.name!r}: every variant needs a distinct 'label' (got {labels})")
    base = student_base(spec)
    configs = []
    for variant in spec.variants:
        overrides = {k: v for k, v in variant.items() if k != "label"}
        for seed in range(spec.seeds):
            configs.append((variant["label"], TrialConfig.from_flat({**base, **overrides, "seed": seed})))
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


# ---- the trial ------------------------------------------------------------------------------------

def distill_trial(config: dict, dataset: Dataset, teacher_state: dict | None, teacher_logits, context,
                  base: dict, threads: int) -> None:
    """A Ray Tune function trainable: one student under one configuration."""
    from ray import tune

    from kdtune.engine import Trainer
    from kdtune.errors import TrainingDiverged

    torch.set_num_threads(max(1, threads))
    variant = dict(config["variant"])
    label = variant.pop("label")
    trial_config = TrialConfig.from_flat({**base, **variant, "seed": config["seed"]})
    trial_id = tune.get_context().get_trial_id()
    run = tracking.ChildRun(context, trial_key=trial_id, run_name=f"{label} seed={trial_config.seed}",
                            params=trial_config.to_flat(),
                            tags={"kdtune.role": "student", "kdtune.label": label})
    trainer = Trainer(trial_config, dataset, teacher_state, teacher_logits=teacher_logits)
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(torch.load(Path(folder) / "trainer.pt", map_location=trainer.device,
                                               weights_only=True))
    run.set_tags({"kdtune.node_id": _node_id(), "kdtune.device": str(trainer.device)})
    try:
        for metrics in trainer.epochs():
            run.log_epoch(metrics, step=metrics["epoch"])
            extra = {"mlflow_run_id": run.run_id, "label": label, "seed": trial_config.seed}
            if "test_acc" in metrics:
                trainer.close()
                servable = tracking.ServableModel(trainer.student, trainer.normalisation["mean"],
                                                  trainer.normalisation["std"])
                example = dataset.test_images[:2].float() * dataset.scale
                extra["model_uri"] = run.log_model(_cpu_copy(servable), example)
                run.finish()
            with tempfile.TemporaryDirectory() as folder:
                torch.save(trainer.state_dict(), Path(folder) / "trainer.pt")
                tune.report({**metrics, **extra}, checkpoint=tune.Checkpoint.from_directory(folder))
    except TrainingDiverged as error:
        run.fail(str(error))
        raise


def _cpu_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).cpu().eval()


def _node_id() -> str:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (tests calling the trainable directly)
        return "local"


# ---- the study ------------------------------------------------------------------------------------

def run_study(spec: StudySpec, echo=print) -> StudyResult:
    started = time.perf_counter()
    configs = trial_configs(spec)  # every bad value stops here, before anything starts
    base = student_base(spec)
    teacher_cfg = teacher_config(spec)
    needs_teacher = any(c.method != "none" for _, c in configs)
    dataset = load_dataset(spec.dataset, spec.data_dir, spec.download)
    store = Path(spec.store_dir).resolve()
    server = None
    uri = spec.tracking_uri
    if uri:
        tracking.check_tracking_uri(uri)
    else:
        echo(f"mlflow: starting the embedded server (store: {store})")
        server = tracking.EmbeddedServer(store).start()
        uri = server.uri
    try:
        return _run(spec, configs, base, teacher_cfg, needs_teacher, dataset, uri, store, started, echo)
    finally:
        if server:
            server.stop()
            echo(f"mlflow: embedded server stopped; browse the results with: kdtune mlflow serve --store {store}")


def _run(spec, configs, base, teacher_cfg, needs_teacher, dataset, uri, store, started, echo) -> StudyResult:
    import ray
    from ray import tune

    client = tracking.client_for(uri)
    experiment_id = tracking.get_or_create_experiment(client, spec.name)
    parent = client.create_run(experiment_id, run_name=f"{spec.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                               tags={"kdtune.role": "study", "kdtune.study": spec.name})
    parent_id = parent.info.run_id
    echo(f"mlflow: study run {parent_id}: {tracking.ui_link(uri, experiment_id)}")
    tracking.log_params(client, parent_id, {
        "dataset": spec.dataset, "teacher": teacher_cfg.student, "student": base["student"],
        "seeds": spec.seeds, "variants": len(spec.variants), "trials": len(configs),
        "cpus_per_trial": spec.cpus_per_trial, "gpus_per_trial": spec.gpus_per_trial,
        **{f"base.{k}": v for k, v in base.items() if k not in ("dataset", "teacher", "student")},
    })
    context = tracking.TrackingContext(uri, experiment_id, parent_id)
    status = "FAILED"
    try:
        _init_ray(spec.address)
        teacher_state, teacher_logits = None, None
        if needs_teacher:
            teacher = teachers.obtain_teacher(teacher_cfg, dataset, spec.teacher_source, context,
                                              spec.cpus_per_trial, spec.gpus_per_trial, log=echo)
            client.set_tag(parent_id, "kdtune.teacher", teacher.source)
            teacher_state = teacher.state_dict
            teacher_logits = _teacher_logits_if_useful(configs, teacher_cfg.student, teacher_state, dataset, spec)
        trainable = tune.with_resources(
            tune.with_parameters(distill_trial, dataset=dataset, teacher_state=teacher_state,
                                 teacher_logits=teacher_logits, context=context, base=base,
                                 threads=int(spec.cpus_per_trial)),
            {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial},
        )
        storage = spec.storage or str(store / "ray_results")
        tuner = tune.Tuner(
            trainable,
            param_space={"variant": tune.grid_search(spec.variants), "seed": tune.grid_search(list(range(spec.seeds)))},
            tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=spec.max_concurrent,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=storage if "://" in storage else str(Path(storage).resolve()),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=1,
            ),
        )
        grid = tuner.fit()
        trials = _collect(grid)
        summary = summarise(trials)
        best_label = pick_best(summary)
        champion = None
        if best_label is not None:
            champion = _register_best(spec, trials, best_label, base, dataset, teacher_cfg.student)
        training_time = sum(t["metrics"].get("training_time_s", 0.0) for t in trials)
        result = StudyResult(spec, trials, summary, best_label, champion, parent_id, experiment_id, uri,
                             time.perf_counter() - started, training_time)
        _log_study_results(client, parent_id, result)
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent_id, status=status)


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True, configure_logging=True)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise KdtuneError(f"address={address!r}: could not connect to a Ray cluster ({error})") from None


def _teacher_logits_if_useful(configs, teacher_arch, teacher_state, dataset, spec):
    """Cache teacher logits (one Ray task) when some trial can use them: logits-only method, no augmentation."""
    from kdtune import distill

    usable = [c for _, c in configs if c.method != "none" and c.teacher_cache != "off"
              and not c.uses_augmentation() and not distill.method_class(c.method)(c).needs_teacher_features]
    if not usable:
        return None
    fractions = {c.val_fraction for c in usable}
    if len(fractions) > 1:
        return None  # normalisation differs per split; trials run the teacher online instead
    import ray

    from kdtune.engine import teacher_logits_for

    task = ray.remote(num_cpus=spec.cpus_per_trial, num_gpus=spec.gpus_per_trial)(teacher_logits_for)
    return ray.get(task.remote(teacher_arch, teacher_state, dataset, fractions.pop()))


def _trial_name(trial) -> str:
    label = re.sub(r"[^A-Za-z0-9_.=-]+", "_", str(trial.config["variant"]["label"]))
    return f"{label}_seed{trial.config['seed']}_{trial.trial_id}"


def _collect(grid) -> list[dict]:
    trials = []
    for result in grid:
        metrics = dict(result.metrics or {})
        config = result.config or {}
        trials.append({
            "label": config.get("variant", {}).get("label"),
            "seed": config.get("seed"),
            "metrics": metrics,
            "error": None if result.error is None else str(result.error).strip().splitlines()[-1][:500],
            "path": result.path,
        })
    return trials


def summarise(trials: list[dict]) -> list[dict]:
    """Per label, in the order first seen: mean/std of validation and test accuracy over finished seeds."""
    rows: dict[str, dict] = {}
    for trial in trials:
        row = rows.setdefault(trial["label"], {"label": trial["label"], "val": [], "test": [], "failed": 0})
        metrics = trial["metrics"]
        if trial["error"] or "test_acc" not in metrics:
            row["failed"] += 1
            continue
        row["val"].append(metrics["val_acc"])
        row["test"].append(metrics["test_acc"])
    summary = []
    for row in rows.values():
        n = len(row["test"])
        summary.append({
            "label": row["label"], "n": n, "failed": row["failed"],
            "val_mean": statistics.fmean(row["val"]) if n else float("nan"),
            "test_mean": statistics.fmean(row["test"]) if n else float("nan"),
            "test_std": statistics.stdev(row["test"]) if n > 1 else 0.0,
            "test_median": statistics.median(row["test"]) if n else float("nan"),
        })
    baseline = next((r for r in summary if r["label"] == BASELINE_LABEL and r["n"]), None)
    for row in summary:
        row["gain"] = row["test_mean"] - baseline["test_mean"] if baseline and row["n"] else float("nan")
    return summary


BASELINE_LABEL = "baseline"


def pick_best(summary: list[dict]) -> str | None:
    """The configuration with the best mean validation accuracy (selection never looks at the test set)."""
    finished = [r for r in summary if r["n"]]
    return max(finished, key=lambda r: r["val_mean"])["label"] if finished else None


def format_table(summary: list[dict], label_header: str) -> str:
    lines = [f"{label_header:>12}  {'val acc':>8}  {'test acc':>16}  {'vs baseline':>11}  {'n':>2}"]
    for row in summary:
        if not row["n"]:
            lines.append(f"{row['label']:>12}  {'failed':>8}  {'':>16}  {'':>11}  {0:>2}")
            continue
        test = f"{100 * row['test_mean']:.2f} ± {100 * row['test_std']:.2f} %"
        gain = "" if row["label"] == BASELINE_LABEL or row["gain"] != row["gain"] else f"{100 * row['gain']:+.2f} pt"
        failed = f"  ({row['failed']} failed)" if row["failed"] else ""
        lines.append(f"{row['label']:>12}  {100 * row['val_mean']:7.2f}%  {test:>16}  {gain:>11}  {row['n']:>2}{failed}")
    return "\n".join(lines)


def registered_name(spec: StudySpec, base: dict) -> str:
    return spec.register_as or f"kdtune-{spec.dataset}-{base['student']}"


def _register_best(spec, trials, best_label, base, dataset, teacher_arch) -> str | None:
    candidates = [t for t in trials if t["label"] == best_label and not t["error"] and "model_uri" in t["metrics"]]
    if not candidates:
        return None
    best = max(candidates, key=lambda t: t["metrics"]["val_acc"])
    variant = next(v for v in spec.variants if v["label"] == best_label)
    from kdtune.models import build_model

    tags = {
        "study": spec.name, "dataset": spec.dataset, "teacher": teacher_arch, "student": base["student"],
        "label": best_label, "seed": best["seed"], "run_id": best["metrics"]["mlflow_run_id"],
        "val_acc": f"{best['metrics']['val_acc']:.4f}", "test_acc": f"{best['metrics']['test_acc']:.4f}",
        "parameters": count_parameters(build_model(base["student"], dataset.num_classes, dataset.input_shape)),
        **{f"hp.{k}": v for k, v in variant.items() if k != "label"},
    }
    return tracking.register_model(best["metrics"]["model_uri"], registered_name(spec, base), "champion", tags)


def _log_study_results(client, parent_id: str, result: StudyResult) -> None:
    import csv
    import io

    best = next((r for r in result.summary if r["label"] == result.best_label), None)
    baseline = next((r for r in result.summary if r["label"] == BASELINE_LABEL and r["n"]), None)
    metrics = {"wall_time_s": result.wall_time_s, "training_time_s": result.training_time_s,
               "trials_failed": sum(1 for t in result.trials if t["error"])}
    if best:
        metrics.update(best_test_acc=best["test_mean"], best_val_acc=best["val_mean"])
    if baseline:
        metrics["baseline_test_acc"] = baseline["test_mean"]
    tracking.log_metrics(client, parent_id, metrics, step=0)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["label", "seed", "val_acc", "test_acc", "test_acc_at_best_val", "best_epoch", "epochs",
                     "mlflow_run_id", "error"])
    for t in result.trials:
        m = t["metrics"]
        writer.writerow([t["label"], t["seed"], m.get("val_acc"), m.get("test_acc"), m.get("test_acc_at_best_val"),
                         m.get("best_epoch"), m.get("epoch"), m.get("mlflow_run_id"), t["error"] or ""])
    client.log_text(parent_id, buffer.getvalue(), "results/trials.csv")
    client.log_text(parent_id, result.table() + "\n", "results/table.txt")
    client.set_tag(parent_id, "kdtune.best", str(result.best_label))
    if result.champion_version:
        client.set_tag(parent_id, "kdtune.champion_version", result.champion_version)
