"""Ensemble teachers (Hinton et al. 2015: distilling an ensemble into one student; seed 003 cites it).

    --teacher-source A --teacher-source B     two (or more) members, each any teacher source (kdtune/teachers.py):
                                              models:/...@alias, a file, 'train:S' (train one now with seed S),
                                              'pretrained', 'train'; all of the study's teacher architecture

The soft target at temperature T is the members' averaged softened probabilities, mean_i softmax(z_i / T)
(distill/losses.py, `ensemble_logits`, which says why not averaged logits). One mechanism serves both paths:

    online   `EnsembleTeacher`: a module whose forward returns the members' logits stacked, (M, N, C)
    cached   the logit cache holds the same stack for every training sample, (M, N_train, C)

and each method turns member logits into what it reads with one call, `Method.teacher_view` (the KD family at
its T, the adversarial methods at T = 1, the ensemble's own prediction); a single teacher is the 1-member case
and reaches the methods unchanged. Methods that read teacher features (links, hints, fsp) are refused with an
ensemble: the members' feature maps have no average that is one network's features.

`teacher_accuracies` measures each member's and the ensemble's validation and test accuracy (the ensemble's
prediction: argmax of the averaged probabilities at T = 1); the study logs them to its parent run and the report
lists them.
"""
from __future__ import annotations

import json

import torch

from kdtune.errors import ConfigError
from kdtune.results import ENSEMBLE, format_teachers
from kdtune.tags import TEACHERS_TAG



def check_methods(configs, members: int) -> None:
    """One line, before anything is created, for a method that cannot distil from an ensemble."""
    if members < 2:
        return
    for config in configs:
        reason = ensemble_refusal(config, members)
        if reason:
            raise ConfigError(reason)


def ensemble_refusal(config, members: int) -> str | None:
    """Why `config`'s method cannot distil from an ensemble of `members` teachers, or None when it can."""
    from kdtune import distill

    method = config.method_class(config)
    if members < 2 or not (method.needs_teacher and method.needs_teacher_features):
        return None
    logits_only = [m for m in distill.method_names()
                   if distill.method_class(m).needs_teacher and distill.method_class(m).reads == {"logits"}]
    return (f"method {config.method!r} reads teacher features, which an ensemble of {members} teachers "
            f"(--teacher-source given {members} times) does not have; give one --teacher-source (the member to "
            f"take features from), or use a logits method ({', '.join(logits_only)}) with the ensemble")


@torch.no_grad()
def teacher_accuracies(parts, val_fraction: float, sources: list[str]) -> list[dict]:
    """Each member's validation and test accuracy and, for an ensemble, the ensemble's: a Ray task's work.

    The splits and normalisation are the students' (the training split's statistics, the same validation split)."""
    from kdtune.data import batch_source, test_source
    from kdtune.distill.losses import ensemble_logits
    from kdtune.train.devices import pick_device

    device = pick_device()
    dataset = parts.dataset
    train_idx, val_idx = dataset.split(val_fraction)
    mean, std = dataset.channel_stats(train_idx)
    teacher = parts.build_teacher().eval().to(device)
    rows = None
    for split_name, split in (("val_acc", batch_source(dataset, val_idx, mean, std, device)),
                              ("test_acc", test_source(dataset, mean, std, device))):
        correct, count = None, 0
        for images, labels, _ in split.batches(512):
            logits = teacher(images).float()
            stacked = logits if logits.dim() == 3 else logits[None]
            predictions = [z.argmax(1) for z in stacked]
            if len(stacked) > 1:
                predictions.append(ensemble_logits(stacked, 1.0).argmax(1))
            hits = torch.stack([(p == labels).sum() for p in predictions]).cpu()
            correct = hits if correct is None else correct + hits
            count += len(labels)
        if rows is None:
            names = list(range(len(correct))) if len(correct) == 1 else [*range(len(correct) - 1), ENSEMBLE]
            rows = [{"member": name, "source": sources[name] if name != ENSEMBLE else "mean of the members' "
                     "probabilities"} for name in names]
        for row, hits in zip(rows, correct.tolist()):
            row[split_name] = hits / count
    return rows


def log_teacher_accuracies(client, parent_run_id: str, rows: list[dict], echo=print) -> None:
    """Tag the parent run with the rows (the report reads them) and log them as metrics; print one line each."""
    from kdtune import tracking

    client.set_tag(parent_run_id, TEACHERS_TAG, json.dumps(rows))
    metrics = {}
    for row in rows:
        key = "teacher_ensemble" if row["member"] == ENSEMBLE else f"teacher_member{row['member']}"
        metrics.update({f"{key}_val_acc": row["val_acc"], f"{key}_test_acc": row["test_acc"]})
    tracking.log_metrics(client, parent_run_id, metrics, step=0)
    for line in format_teachers(rows):
        echo(line)
