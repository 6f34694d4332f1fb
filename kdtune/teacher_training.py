"""Obtain a study's planned teacher (kdtune/teachers.py plans it): read its weights, or train one and register it.

    obtain_teacher(config, dataset, ref, plan, ...)   the Teacher a TeacherPlan or EnsemblePlan names
    train_and_register(config, dataset, ref, ...)     train where a trial would, register as the dataset's teacher
    train_teacher(config, dataset, ref, ...)          the Ray task's work: train (or fine-tune) and log the run

Training (from scratch or from pretrained weights) uses the same engine as every student (method 'none'),
inside a Ray task with a trial's resources, logged as the study's 'teacher' child run, and is registered as
`kdtune-teacher-<dataset>-<architecture>` with alias `champion`, so the next study on that dataset reuses it,
and alias `seed<S>` (S its training seed), so ensemble members can be named: models:/...@seed1.
"""
from __future__ import annotations

from kdtune.config import TrialConfig
from kdtune.data import Dataset
from kdtune.teachers import (PRETRAINED, TEACHER_ALIAS, TRAIN, EnsemblePlan, Teacher, TeacherPlan,
                             load_teacher_state, registry_name, resolved_version, seed_alias)
from kdtune.tracking import ChildRun, ServableModel, TrackingContext, register_model
from kdtune.tags import ROLE_TAG, ROLE_TEACHER, TEACHER_INIT_TAG


def train_teacher(config: TrialConfig, dataset: Dataset, ref, initial_state: dict | None,
                  tracking: TrackingContext, threads: int, key: str = "teacher") -> dict:
    """Runs inside a Ray task: train (or fine-tune), log the 'teacher' child run and its model. What it changes
    process-wide (threads, deterministic kernels) is put back when it ends, also when it fails: Ray reuses the
    process."""
    from kdtune.train.backends import trial_settings

    with trial_settings(threads):
        return _train_teacher(config, dataset, ref, initial_state, tracking, key)


def _train_teacher(config: TrialConfig, dataset: Dataset, ref, initial_state: dict | None,
                   tracking: TrackingContext, key: str) -> dict:
    from kdtune.train.parts import StudyParts

    what = "fine-tuned from pretrained weights" if initial_state is not None else "trained from scratch"
    # key: "teacher", or one per ensemble member trained in the study (each its own run, found again on resume)
    name = f"teacher {ref.spec}" + (f" seed={config.seed}" if key != "teacher" else "")
    run = ChildRun(tracking, trial_key=key, run_name=name,
                   params=config.to_flat(), tags={ROLE_TAG: ROLE_TEACHER, TEACHER_INIT_TAG: what})
    network = None
    if initial_state is not None:
        network = ref.build(dataset.num_classes, dataset.input_shape)
        network.load_state_dict(initial_state)
    trainer = StudyParts(dataset, ref).trainer(config, student=network)  # seeded as every student is
    metrics = {}
    try:
        for metrics in trainer.epochs():
            run.log_epoch(metrics, step=metrics["epoch"])
        trainer.close()
        servable = ServableModel(trainer.student.cpu().eval(), trainer.normalisation["mean"],
                                 trainer.normalisation["std"], len(dataset.input_shape))
        model_uri = run.log_model(servable, dataset.example(2), name="teacher")
        run.finish()
    except BaseException as error:
        run.fail(f"{type(error).__name__}: {error}")
        raise
    return {"state_dict": trainer.student.state_dict(), "model_uri": model_uri, "metrics": metrics,
            "run_id": run.run_id}


def obtain_teacher(config: TrialConfig, dataset: Dataset, ref, plan: TeacherPlan, tracking: TrackingContext,
                   cpus: float, gpus: float, log=print, key: str = "teacher") -> Teacher:
    """`config` is the teacher's training config (its `student` field is the teacher architecture)."""
    if isinstance(plan, EnsemblePlan):
        log(f"teacher: an ensemble of {plan.members} teachers (soft targets: the members' averaged probabilities "
            "at each trial's temperature)")
        members = [obtain_teacher(config, dataset, ref, member, tracking, cpus, gpus, log, key=f"teacher/{i}")
                   for i, member in enumerate(plan.plans)]
        return Teacher([m.state_dict for m in members], " + ".join(m.source for m in members),
                       trained_now=any(m.trained_now for m in members), members=members)
    if plan.seed is not None:
        config = config.replace(seed=plan.seed)
        log(f"teacher: training a new {ref.spec} with seed {plan.seed} as asked ({config.epochs} epochs)")
        return train_and_register(config, dataset, ref, tracking, cpus, gpus, log, make_champion=False, key=key)
    if plan.state is not None:
        log(f"teacher: {plan.source}")
        return Teacher(plan.state, plan.source, trained_now=False)
    if plan.source and plan.source not in (PRETRAINED, TRAIN):
        log(f"teacher: loading {plan.source}")
        version = resolved_version(plan.source)  # before reading: the weights are read from this version
        return Teacher(load_teacher_state(plan.source, ref, dataset), plan.source, trained_now=False,
                       version=version)
    if plan.source == PRETRAINED:
        log(f"teacher: fine-tuning {ref.spec} from its pretrained weights ({config.epochs} epochs)")
        return train_and_register(config, dataset, ref, tracking, cpus, gpus, log, plan.initial_state, key=key)
    if plan.source == TRAIN:
        log(f"teacher: training a new {ref.spec} as asked ({config.epochs} epochs)")
        return train_and_register(config, dataset, ref, tracking, cpus, gpus, log, key=key)
    uri = plan.registered
    if uri:
        version = resolved_version(uri)
        log(f"teacher: reusing the registered {uri}" + (f" (version {version.rsplit('/', 1)[1]})" if version else ""))
        return Teacher(load_teacher_state(uri, ref, dataset), uri, trained_now=False, version=version)
    log(f"teacher: none registered for {dataset.name}/{ref.spec}; training one ({config.epochs} epochs)")
    return train_and_register(config, dataset, ref, tracking, cpus, gpus, log)


def train_and_register(config: TrialConfig, dataset: Dataset, ref, tracking: TrackingContext, cpus: float,
                       gpus: float, log=print, initial_state: dict | None = None, make_champion: bool = True,
                       key: str = "teacher") -> Teacher:
    """Train a teacher where a trial would (cluster.run_like_a_trial) and register it as the dataset's teacher:
    alias seed<S> (its training seed) always; alias champion too if `make_champion` or the model has none yet."""
    from kdtune import cluster
    from kdtune.models import count_parameters

    result = cluster.run_like_a_trial(train_teacher, config, dataset, ref, initial_state, tracking, int(cpus), key,
                                      cpus=cpus, gpus=gpus)
    name = registry_name(dataset.name, ref.name)
    from kdtune.registry import train_set_fingerprint

    from kdtune.registry import training_split_fingerprint

    tags = {ROLE_TAG: ROLE_TEACHER, "dataset": dataset.name, "architecture": ref.spec,
            "train_set": train_set_fingerprint(dataset),
            # the samples it trained on: a study checks they exclude its students' validation split
            "val_fraction": config.val_fraction, "fit_set": training_split_fingerprint(dataset, config.val_fraction),
            "init": PRETRAINED if initial_state is not None else "scratch",
            "test_acc": f"{result['metrics']['test_acc']:.4f}", "run_id": result["run_id"],
            "parameters": count_parameters(ref.build(dataset.num_classes, dataset.input_shape))}
    tags["seed"] = config.seed
    import mlflow

    client = mlflow.MlflowClient()
    seeded = not make_champion  # another member: named by its seed alias
    if not make_champion:
        try:
            client.get_model_version_by_alias(name, TEACHER_ALIAS)
        except mlflow.exceptions.MlflowException:
            make_champion = True  # the first teacher of this dataset and architecture is its champion
    alias = seed_alias(config.seed)
    version = register_model(result["model_uri"], name, alias, tags)
    aliases = [f"@{alias}"]
    if make_champion:
        client.set_registered_model_alias(name, TEACHER_ALIAS, version)
        aliases.insert(0, f"@{TEACHER_ALIAS}")
    log(f"teacher: test accuracy {result['metrics']['test_acc']:.4f}; registered {name} version {version} "
        f"as {' '.join(aliases)}")
    return Teacher(result["state_dict"], f"models:/{name}@{alias if seeded else TEACHER_ALIAS}",
                   trained_now=True, test_acc=result["metrics"]["test_acc"], version=f"{name}/{version}")
