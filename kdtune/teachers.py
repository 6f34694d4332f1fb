"""Obtain a study's teacher once: from the MLflow registry, from a file, or by training it (then registering it).

The teacher is trained with the same engine as every student (method 'none'), inside a Ray task with a trial's
resources, and logged as the study's 'teacher' child run. Registered as `kdtune-teacher-<dataset>-<arch>` with
alias `champion`, so the next study on that dataset reuses it instead of training another.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kdtune import models
from kdtune.config import TrialConfig
from kdtune.data import Dataset
from kdtune.errors import ConfigError, TrackingError
from kdtune.tracking import ChildRun, ServableModel, TrackingContext, network_state, register_model

TEACHER_ALIAS = "champion"


@dataclass
class Teacher:
    state_dict: dict
    source: str  # where it came from: a models:/ URI or a file path
    trained_now: bool
    test_acc: float | None = None


def registry_name(dataset: str, arch: str) -> str:
    return f"kdtune-teacher-{dataset}-{arch}"


def load_teacher_state(source: str, arch: str, dataset: Dataset) -> dict:
    """Read a teacher's weights from `models:/...` or a file, and check they fit the architecture."""
    if source.startswith(("models:/", "runs:/")):
        import mlflow

        try:
            loaded = mlflow.pytorch.load_model(source, map_location="cpu")
        except Exception as error:  # MLflow raises several types for a missing model/alias
            raise TrackingError(f"teacher {source}: could not be loaded from MLflow ({type(error).__name__}: "
                                f"{str(error).splitlines()[0] if str(error) else ''})") from None
        state = network_state(loaded)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"teacher={source!r}: no such file (give a models:/name@alias URI or a .pt path)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ConfigError(f"teacher={source!r}: not a PyTorch weights file ({type(error).__name__})") from None
        if isinstance(state, dict) and "student" in state and isinstance(state["student"], dict):
            state = state["student"]  # a kdtune trial checkpoint
    model = models.build_model(arch, dataset.num_classes, dataset.input_shape)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"teacher {source}: weights do not fit model {arch!r} for {dataset.name} ({first})") from None
    return model.state_dict()


def registered_teacher_uri(dataset: str, arch: str) -> str | None:
    """The registered teacher's URI if one exists for this dataset and architecture."""
    import mlflow

    name = registry_name(dataset, arch)
    try:
        mlflow.MlflowClient().get_model_version_by_alias(name, TEACHER_ALIAS)
    except mlflow.exceptions.MlflowException:
        return None
    return f"models:/{name}@{TEACHER_ALIAS}"


def train_teacher(config: TrialConfig, dataset: Dataset, tracking: TrackingContext, threads: int) -> dict:
    """Runs inside a Ray task: train, log the 'teacher' child run and its model. Returns weights and metrics."""
    from kdtune.engine import Trainer

    torch.set_num_threads(max(1, threads))
    run = ChildRun(tracking, trial_key="teacher", run_name=f"teacher {config.student}",
                   params=config.to_flat(), tags={"kdtune.role": "teacher"})
    trainer = Trainer(config, dataset)
    metrics = {}
    try:
        for metrics in trainer.epochs():
            run.log_epoch(metrics, step=metrics["epoch"])
        trainer.close()
        servable = ServableModel(trainer.student.cpu().eval(), **_norm(trainer))
        example = dataset.test_images[:2].float() * dataset.scale
        model_uri = run.log_model(servable, example, name="teacher")
        run.finish()
    except BaseException as error:
        run.fail(f"{type(error).__name__}: {error}")
        raise
    return {"state_dict": trainer.student.state_dict(), "model_uri": model_uri, "metrics": metrics,
            "run_id": run.run_id}


def _norm(trainer) -> dict:
    return {"mean": trainer.normalisation["mean"], "std": trainer.normalisation["std"]}


def obtain_teacher(config: TrialConfig, dataset: Dataset, source: str | None, tracking: TrackingContext,
                   cpus: float, gpus: float, log=print) -> Teacher:
    """`config` is the teacher's training config (its `student` field is the teacher architecture)."""
    arch = config.student
    if source:
        log(f"teacher: loading {source}")
        return Teacher(load_teacher_state(source, arch, dataset), source, trained_now=False)
    uri = registered_teacher_uri(dataset.name, arch)
    if uri:
        log(f"teacher: reusing the registered {uri}")
        return Teacher(load_teacher_state(uri, arch, dataset), uri, trained_now=False)
    log(f"teacher: none registered for {dataset.name}/{arch}; training one ({config.epochs} epochs)")
    return train_and_register(config, dataset, tracking, cpus, gpus, log)


def train_and_register(config: TrialConfig, dataset: Dataset, tracking: TrackingContext, cpus: float, gpus: float,
                       log=print) -> Teacher:
    """Train a teacher in a Ray task with a trial's resources and register it as the dataset's teacher."""
    import ray

    arch = config.student
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(train_teacher)
    result = ray.get(task.remote(config, dataset, tracking, int(cpus)))
    name = registry_name(dataset.name, arch)
    tags = {"kdtune.role": "teacher", "dataset": dataset.name, "architecture": arch,
            "test_acc": f"{result['metrics']['test_acc']:.4f}", "run_id": result["run_id"],
            "parameters": models.count_parameters(models.build_model(arch, dataset.num_classes, dataset.input_shape))}
    version = register_model(result["model_uri"], name, TEACHER_ALIAS, tags)
    log(f"teacher: test accuracy {result['metrics']['test_acc']:.4f}; registered {name} version {version} "
        f"as @{TEACHER_ALIAS}")
    return Teacher(result["state_dict"], f"models:/{name}@{TEACHER_ALIAS}", trained_now=True,
                   test_acc=result["metrics"]["test_acc"])
