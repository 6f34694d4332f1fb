"""One registration path for every study kind: a trial's trained student becomes a version of a registered
model, with the tags every version carries (where it came from, how it was chosen, how it scored) and the
fingerprints of the samples it was selected and reported on. The kind adds its own tags (costs, precision) and
says whether the registry gate decides the alias now (`gated`)."""
from __future__ import annotations

from kdtune import registry
from kdtune.results import SettingRow
from kdtune.study_context import StudyContext


def register_trial(context: StudyContext, trial, row: SettingRow, name: str, model_uri: str, student: str,
                   extra_tags: dict, gated: bool = True):
    """Register `model_uri`, the student of `trial` (a TrialRecord of the confirm phase or grid), as a version of
    `name`; `row` is its setting's summary (mean validation and test accuracy over `row.n` seeds). Returns
    the registry's Decision."""
    metrics = trial.metrics
    tags = {
        "study": context.spec.name, "dataset": context.dataset.name, "teacher": context.teacher_cfg.student,
        "student": student, "method": trial.params.get("method", context.base.shared.method),
        "label": trial.label, "tuned": row.point or "-", "seed": trial.seed, "run_id": trial.run_id,
        "val_acc": f"{metrics['val_acc']:.4f}", "test_acc": f"{metrics['test_acc']:.4f}",
        "test_acc_per_seed": ",".join(f"{a:.4f}" for a in row.test),
        **{f"hp.{k}": v for k, v in trial.params.items()},
        **extra_tags,
    }
    return registry.register(context.client, model_uri, name, tags, val_mean=row.val_mean, seeds=row.n,
                             test_mean=row.test_mean, val_set=validation_set(context, trial),
                             test_set=registry.test_set_fingerprint(context.dataset), margin=context.spec.margin,
                             gated=gated)


def validation_set(context: StudyContext, trial) -> str:
    """The fingerprint of the validation split `trial` was judged on (the gate compares only like with like)."""
    return registry.validation_fingerprint(context.dataset, context.base.trial(trial.params).val_fraction)
