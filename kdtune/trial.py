"""One Ray Tune trial: a student distilled under one configuration, reported every epoch.

A grid trial's Tune config is {"variant": {...partial config, "label"}, "seed": s}; an Optuna trial's is the
flat set of sampled values. Either way it becomes a validated TrialConfig on top of the study's base.
"""
from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path

import torch

from kdtune import tracking
from kdtune.config import TrialConfig
from kdtune.data import Dataset
from kdtune.errors import TrainingDiverged
from kdtune.parts import StudyParts

FAILURE_TAG = "kdtune.failure"


def variant_of(config: dict) -> tuple[str, dict, int]:
    """(label, overrides, seed) from a Tune config of either form."""
    if "variant" in config:
        variant = dict(config["variant"])
        variant.pop("point", None)
        return variant.pop("label"), variant, int(config.get("seed", 0))
    overrides = {k: v for k, v in config.items() if k != "seed"}
    return describe(overrides), overrides, int(config.get("seed", 0))


def point_of(config: dict) -> str:
    """The tuned recipe values of a grid trial ("lr=0.03"), "" when the study tunes none."""
    return str(config.get("variant", {}).get("point", ""))


def describe(overrides: dict) -> str:
    """A short label for a sampled configuration, e.g. 'kd T=3.2 a=0.61'."""
    short = {"temperature": "T", "alpha": "a", "beta": "b", "links": "L", "hard_weight": "h"}
    parts = [str(overrides.get("method", ""))]
    for key, value in overrides.items():
        if key == "method":
            continue
        name = short.get(key, key)
        parts.append(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(p for p in parts if p)


def distill_trial(config: dict, parts: StudyParts, context, base: dict, threads: int) -> None:
    """The Ray Tune function trainable: the dataset, the networks' references and the teacher arrive as objects
    (`parts`, from the object store); nothing is looked up by name here."""
    from ray import tune

    torch.set_num_threads(max(1, threads))
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per epoch is noise
    label, overrides, seed = variant_of(config)
    trial_config = TrialConfig.from_flat({**base, **overrides, "seed": seed})
    trial_id = tune.get_context().get_trial_id()
    point = point_of(config)
    run = tracking.ChildRun(context, trial_key=trial_id, run_name=f"{label} {point} seed={seed}".replace("  ", " "),
                            params=trial_config.to_flat(),
                            tags={"kdtune.role": "student", "kdtune.label": label, "kdtune.point": point,
                                  # what this trial set on top of the study's base: for a search, exactly
                                  # the parameters the space sampled for this method
                                  "kdtune.overrides": json.dumps(overrides, sort_keys=True)})
    if run.completed:
        tune.report({**run.recorded.metrics, "mlflow_run_id": run.run_id, "label": label, "seed": seed,
                     "model_uri": run.recorded.tags["kdtune.model_uri"]})
        return
    previous_failure = run.tags().get(FAILURE_TAG, "")
    if previous_failure.startswith("TrainingDiverged"):
        # a retry cannot fix a diverging configuration: fail again at once instead of retraining
        raise TrainingDiverged(previous_failure.split(": ", 1)[-1])
    trainer = parts.trainer(trial_config)
    dataset = parts.dataset
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "trainer.pt", map_location=trainer.device, weights_only=True)
        trainer.load_state_dict(state)
    run.set_tags({"kdtune.node_id": _node_id(), "kdtune.device": str(trainer.device)})
    try:
        first_stages = trainer.total_epochs - trial_config.epochs
        for metrics in trainer.epochs():
            # epochs into the main stage (0 while a two-stage method's first stage runs): ASHA's clock
            metrics["main_epoch"] = max(0, metrics["epoch"] - first_stages)
            final = metrics["epoch"] == metrics["epochs_total"]
            if final:
                metrics.update(inference_latency(trainer.student, dataset, trainer.device))
            run.log_epoch(metrics, step=metrics["epoch"])
            extra = {"mlflow_run_id": run.run_id, "label": label, "seed": seed}
            if final:
                extra["model_uri"] = _log_student(run, trainer, dataset)
                run.finish()
            with tempfile.TemporaryDirectory() as folder:
                torch.save(trainer.state_dict(), Path(folder) / "trainer.pt")
                tune.report({**metrics, **extra}, checkpoint=tune.Checkpoint.from_directory(folder))
    except TrainingDiverged as error:
        run.fail(f"TrainingDiverged: {error}")
        raise


def inference_latency(model: torch.nn.Module, dataset: Dataset, device: torch.device) -> dict[str, float]:
    """Median forward time on the trial's own device: one image, and per image in a batch of 256."""
    import statistics
    import time

    model.eval()
    timings = {}
    for batch, key in ((1, "latency_ms_batch1"), (256, "latency_ms_per_image")):
        images = torch.randn(batch, *dataset.input_shape, device=device)
        samples = []
        with torch.inference_mode():
            for _ in range(12):
                started = time.perf_counter()
                model(images)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                samples.append((time.perf_counter() - started) * 1000 / batch)
        timings[key] = statistics.median(samples[2:])  # the first calls warm up
    return timings


def _log_student(run: tracking.ChildRun, trainer, dataset: Dataset) -> str:
    trainer.close()  # forward hooks hold closures: remove them before the model is serialised
    servable = tracking.ServableModel(copy.deepcopy(trainer.student).cpu().eval(), trainer.normalisation["mean"],
                                      trainer.normalisation["std"], len(dataset.input_shape))
    return run.log_model(servable, dataset.example(2))


def _node_id() -> str:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray
        return "local"


def close_runs_callback(context):
    """A Tune callback that closes the MLflow run of a trial the scheduler stopped early or that failed for good.

    A trial stopped by ASHA never reaches the end of its function, so its run would stay RUNNING forever.
    """
    from ray import tune

    class CloseRuns(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, "FAILED")

        def _close(self, trial, status):
            client = tracking.client_for(context.uri)
            run = tracking.find_child_run(client, context, trial.trial_id)
            if run is None or run.info.status != "RUNNING":
                return
            last = trial.last_result or {}
            if status == "FINISHED" and last.get("epoch") != last.get("epochs_total"):
                client.set_tag(run.info.run_id, "kdtune.stopped_early_at_epoch", str(last.get("epoch", 0)))
            if status == "FAILED" and getattr(trial, "error_file", None):
                client.set_tag(run.info.run_id, FAILURE_TAG, _last_line(trial))
            client.set_terminated(run.info.run_id, status=status)

    return CloseRuns()


def _last_line(trial) -> str:
    try:
        text = Path(trial.error_file).read_text().strip().splitlines()
        return text[-1][:4000] if text else "unknown error"
    except OSError:
        return "unknown error"
