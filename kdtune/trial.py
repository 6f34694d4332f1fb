"""One Ray Tune trial: one student, or several fused students (kdtune/train/fusion.py), logged to MLflow every epoch.

A grid trial's Tune config is {"group": [variant, ...], "seed": s}, each variant a partial config with its
"label" (and "point" when the study tunes recipe values); a group of one is the plain trial. An Optuna trial's
config is the flat set of sampled values: one member. Each member becomes a validated TrialConfig on top of
the study's base, keeps its own MLflow child run, per-epoch metrics, checkpoint entry and model, and fails
alone when its loss diverges; the trial fails only when every member has.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kdtune import students, tracking
from kdtune.distill.registry import trial_config
from kdtune.data import Dataset
from kdtune.train.devices import pick_device
from kdtune.errors import TrainingDiverged
from kdtune.train.parts import StudyParts
from kdtune.tags import (DEVICE_TAG_OF_RUN, FAILURE_TAG, LABEL_TAG, NODE_TAG, OVERRIDES_TAG, PARENT_TAG,
                         POINT_TAG, ROLE_STUDENT, ROLE_TAG, STOPPED_TAG, TUNE_TRIAL_TAG, WEIGHTS_TAG)

MEMBERS_KEY = "members"  # the reported metric holding each member's last metrics (JSON)


@dataclass
class Member:
    label: str
    point: str
    overrides: dict
    seed: int


def members_of(config: dict) -> list[Member]:
    """The members of a Tune config of either form."""
    seed = int(config.get("seed", 0))
    if "group" in config:
        members = []
        for variant in config["group"]:
            variant = dict(variant)
            label, point = variant.pop("label"), str(variant.pop("point", ""))
            members.append(Member(label, point, variant, seed))
        return members
    overrides = {k: v for k, v in config.items() if k != "seed"}
    return [Member(describe(overrides), "", overrides, seed)]


def describe(overrides: dict) -> str:
    """A short label for a sampled configuration, e.g. 'kd T=3.2 a=0.61', with each parameter's declared short
    name (kdtune/config.py, Param.short)."""
    from kdtune import distill

    method = overrides.get("method", "")
    short = {"hard_weight": "h"}
    if method:
        short.update({p.name: p.short for p in distill.method_class(method).params if p.short})
    parts = [str(method)]
    for key, value in overrides.items():
        if key == "method":
            continue
        name = short.get(key, key)
        parts.append(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(p for p in parts if p)


class _MemberRun:
    """One member's config, MLflow run and state inside a trial."""

    def __init__(self, member: Member, index: int, size: int, context, base: dict, trial_id: str, attempt: dict):
        self.member = member
        self.index = index  # its place in the trial's config: the same in every attempt
        self.config = trial_config({**member.overrides, "seed": member.seed}, base)
        key = trial_id if size == 1 else f"{trial_id}/{index}"
        name = f"{member.label} {member.point} seed={member.seed}".replace("  ", " ")
        self.run = tracking.ChildRun(context, trial_key=key, run_name=name, params=self.config.to_flat(), tags={
            ROLE_TAG: ROLE_STUDENT, LABEL_TAG: member.label, POINT_TAG: member.point,
            TUNE_TRIAL_TAG: trial_id,
            # what this trial set on top of the study's base: for a search, exactly what the space sampled
            OVERRIDES_TAG: json.dumps(member.overrides, sort_keys=True)}, attempt_tags=attempt)
        self.metrics: dict = dict(self.run.recorded.metrics) if self.run.completed else {}
        if self.run.completed:
            self.metrics["weights_uri"] = self.run.recorded.tags[WEIGHTS_TAG]
        previous = self.run.recorded.tags.get(FAILURE_TAG, "") if self.run.recorded and not self.run.completed else ""
        # a retry cannot fix a diverging configuration: it stays failed instead of training again
        self.error = previous if previous.startswith("TrainingDiverged") else None
        self.trainer = None

    @property
    def trains(self) -> bool:
        return not self.run.completed and self.error is None

    def summary(self) -> dict:
        m = self.member
        return {"label": m.label, "point": m.point, "overrides": m.overrides, "seed": m.seed, "error": self.error,
                "metrics": {**tracking.numeric_metrics(self.metrics), **{k: self.metrics[k] for k in (
                    "weights_uri", "stage") if k in self.metrics}, "mlflow_run_id": self.run.run_id}}


def distill_trial(config: dict, parts: StudyParts, context, base: dict, threads: int) -> None:
    """The Ray Tune function trainable: the dataset, the networks' references and the teacher arrive as objects
    (`parts`, from the object store); nothing is looked up by name here.

    Ray runs the next trial in the same process (reuse_actors): whatever this one changed process-wide (threads,
    deterministic kernels, cudnn's flags, CUBLAS_WORKSPACE_CONFIG) is put back when it ends, also when it fails
    (kdtune/train/backends.py trial_settings)."""
    from kdtune.train.backends import trial_settings

    with trial_settings(threads):
        _distill(config, parts, context, base)


def _distill(config: dict, parts: StudyParts, context, base: dict) -> None:
    from ray import tune

    from kdtune.train.fusion import fused_epochs

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per epoch is noise
    members = members_of(config)
    # A search's scheduler (ASHA) and searcher read every epoch's result. A grid runs first-in first-out: nothing
    # reads its results before the end, so it reports with its checkpoints and at its end (each report is a
    # round trip through Tune's driver, ~15 ms). Its members log every epoch to MLflow either way.
    every_epoch = "group" not in config
    trial_id = tune.get_context().get_trial_id() or "local"  # None outside a Tune session (a script, a test)
    device = pick_device()
    attempt = {NODE_TAG: _node_id(), DEVICE_TAG_OF_RUN: str(device)}
    runs = [_MemberRun(m, i, len(members), context, base, trial_id, attempt) for i, m in enumerate(members)]
    training = [r for r in runs if r.trains]
    if not training:  # all done before (a driver that died after the trial's end), or all failed for good
        return _report_final(runs)
    trainers, teacher = parts.fused_trainers([r.config for r in training], device)
    for run, trainer in zip(training, trainers):
        run.trainer = trainer
    _restore(training)
    # a member that diverged before the checkpoint stays out (the checkpoint keeps its place in `training`)
    active = [r for r in training if r.error is None]
    if not active:
        return _report_final(runs)
    dataset = parts.dataset
    clock = CheckpointClock()
    for results in fused_epochs([r.trainer for r in active], teacher):
        for index, result in results.items():
            run = active[index]
            if isinstance(result, TrainingDiverged):
                run.error = f"TrainingDiverged: {result}"
                run.run.fail(run.error)
                continue
            _record_epoch(run, result, dataset)
        alive = [r for r in training if r.error is None]
        if not alive:
            raise TrainingDiverged("; ".join(f"{r.member.label}: {r.error}" for r in training))
        lead = next((r for r in alive if not r.trainer.done), alive[0]).metrics  # Tune's clock: one still training
        last = all(r.trainer.done for r in alive)
        if last or not clock.due():  # the last epoch needs no checkpoint: its members' runs are closed
            if last or every_epoch:
                tune.report(_trial_metrics(runs, lead))
            continue
        clock.start()
        with tempfile.TemporaryDirectory() as folder:
            # a restored trial starts after this checkpoint, so the epoch's metric points not yet stored go in it
            # (sent again on restore) rather than the trial waiting for the tracking server here
            torch.save({"members": {r.index: r.trainer.state_dict() if r.error is None else None for r in training},
                        "unsent_metrics": {r.index: r.run.unsent() for r in training}}, Path(folder) / "trainer.pt")
            tune.report(_trial_metrics(runs, lead), checkpoint=tune.Checkpoint.from_directory(folder))
        clock.stop()


class CheckpointClock:
    """When a trial saves a checkpoint: after its first epoch, then once the training since the last one took at
    least EVERY_COST times what saving it took. Saving (state dicts, Tune's copy) costs ~20 ms; a digits epoch
    takes ~0.1 s, so every epoch would spend a sixth of the trial saving, while an epoch of minutes on a GPU is
    still saved every time. A restored trial trains at most that much again (the first checkpoint bounds it
    from the second epoch on), and the tracking server keeps the epochs it had stored once (ChildRun)."""

    EVERY_COST = 20  # saving takes at most ~1/20 of the trial's time

    def __init__(self):
        self._last: float | None = None  # when the last checkpoint was done
        self._cost = 0.0
        self._started = 0.0

    def due(self) -> bool:
        return self._last is None or time.perf_counter() - self._last >= self.EVERY_COST * self._cost

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self) -> None:
        self._last = time.perf_counter()
        self._cost = self._last - self._started


def _record_epoch(run: _MemberRun, metrics: dict, dataset: Dataset) -> None:
    """One member's epoch into its run; `training_time_s` is already its share of the fused epochs it trained in
    (kdtune/train/fusion.py), so a study's sum over members counts each trial's training once. A trial times no
    inference latency: other trials share its device while it runs, so the figure would be theirs as much as its
    own; the study measures the registered student's once, alone, after its trials (kdtune/study.py)."""
    trainer = run.trainer
    # epochs into the main stage (0 while a two-stage method's first stage runs): ASHA's clock
    metrics["main_epoch"] = max(0, metrics["epoch"] - (trainer.total_epochs - run.config.epochs))
    final = metrics["epoch"] == metrics["epochs_total"]
    run.run.log_epoch(metrics, step=metrics["epoch"])
    if final:
        metrics["weights_uri"] = _log_student(run.run, trainer, dataset)
        run.run.finish()
    run.metrics = metrics


def _restore(training: list[_MemberRun]) -> None:
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if not checkpoint:
        return
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "trainer.pt", map_location=training[0].trainer.device, weights_only=True)
    # by member index: members that finished before the checkpoint (fewer stages) are not in `training` now.
    # (A checkpoint of an earlier kdtune holds lists in `training` order, where every member was still training.)
    members, unsent = (dict(enumerate(v)) if isinstance(v, list) else v
                       for v in (state["members"], state.get("unsent_metrics", {})))
    for run in training:
        run.run.resend(unsent.get(run.index, []))
        if members[run.index] is None:
            run.error = run.error or "TrainingDiverged: diverged before the last checkpoint"
        else:
            run.trainer.load_state_dict(members[run.index])


def _report_final(runs: list[_MemberRun]) -> None:
    from ray import tune

    done = [r for r in runs if r.error is None]
    if not done:
        raise TrainingDiverged("; ".join(f"{r.member.label}: {r.error}" for r in runs))
    tune.report(_trial_metrics(runs, done[0].metrics))


def _trial_metrics(runs: list[_MemberRun], lead: dict) -> dict:
    """What the trial reports to Tune: the lead member's metrics (for ASHA and the progress line), and every
    member's last metrics (MEMBERS_KEY) for the study's records."""
    return {**{k: v for k, v in lead.items() if k != "weights_uri"}, "members_label": _label(runs),
            MEMBERS_KEY: json.dumps([r.summary() for r in runs])}


def _label(runs: list[_MemberRun]) -> str:
    """The trial's setting(s) in Tune's result files (progress.csv, result.json): one label, or the first and how
    many more."""
    first = runs[0].member
    text = f"{first.label} {first.point}".strip()
    return text if len(runs) == 1 else f"{text} +{len(runs) - 1}"


def _log_student(run: tracking.ChildRun, trainer, dataset: Dataset) -> str:
    trainer.close()  # forward hooks hold closures: remove them before the weights are taken
    return students.log_weights(run, trainer.student, trainer.normalisation,
                                len(dataset.input_shape), trainer.config.student)


def _node_id() -> str:
    import ray

    if not ray.is_initialized():  # outside Ray: asking for the runtime context would start a local Ray
        return "local"
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
            if status == "FINISHED" and _every_member_closed(trial.last_result or {}):
                return  # the usual end: no request to the server from Tune's control loop
            client = tracking.client_for(context.uri)
            runs = tracking.retrying(lambda: client.search_runs([context.experiment_id], filter_string=(
                f"tags.`{PARENT_TAG}` = '{context.parent_run_id}' and "
                f"tags.`{TUNE_TRIAL_TAG}` = '{trial.trial_id}' and attributes.status = 'RUNNING'"), max_results=100),
                "find the trial's open runs", context.uri)  # each call survives a tracking-server outage
            last = trial.last_result or {}
            for run in runs:  # every member of the trial still open: stopped by the scheduler, or failed for good
                run_id = run.info.run_id
                if status == "FINISHED" and last.get("epoch") != last.get("epochs_total"):
                    tracking.retrying(lambda: client.set_tag(run_id, STOPPED_TAG, str(
                        last.get("epoch", 0))), "tag a stopped run", context.uri)
                if status == "FAILED" and getattr(trial, "error_file", None):
                    tracking.retrying(lambda: client.set_tag(run_id, FAILURE_TAG, _last_line(trial)),
                                      "tag a failed run", context.uri)
                tracking.retrying(lambda: client.set_terminated(run_id, status=status), "close a run", context.uri)

    return CloseRuns()


def _every_member_closed(last: dict) -> bool:
    """Whether the trial's last report says each member closed its own run (trained to its last epoch, or
    failed): then no run of it is left open."""
    try:
        members = json.loads(last[MEMBERS_KEY])
    except (KeyError, TypeError, ValueError):
        return False
    return all(m["error"] or m["metrics"].get("epoch") == m["metrics"].get("epochs_total") for m in members)


def _last_line(trial) -> str:
    try:
        text = Path(trial.error_file).read_text().strip().splitlines()
        return text[-1][:4000] if text else "unknown error"
    except OSError:
        return "unknown error"
