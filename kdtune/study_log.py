"""What a finished study records on its MLflow run (kdtune/study.py calls it once, after the kind finished)."""
from __future__ import annotations

import json

from kdtune import tracking
from kdtune.tags import BASELINE_LABEL, BEST_TAG, REGISTERED_TAG


def log_study_results(client, parent_id: str, result) -> None:
    """The study's totals as metrics of its run, every trial in results/trials.csv, the results table in
    results/table.txt (the kind's lines), the best setting and the registration as tags."""
    import csv
    import io

    best = next((r for r in result.summary if r.label == result.best_label), None)
    baseline = next((r for r in result.summary if r.label == BASELINE_LABEL and r.n), None)
    all_trials = [t for p in result.phases.values() for t in p]
    metrics = {"wall_time_s": result.wall_time_s, "training_time_s": result.training_time_s,
               "trials": len(all_trials), "trials_failed": sum(1 for t in all_trials if t.failed),
               "trials_stopped_early": sum(1 for t in all_trials if t.stopped),
               "epochs_trained": sum(t.metrics.get("epoch", 0) for t in all_trials)}
    if best:
        metrics.update(best_test_acc=best.test_mean, best_val_acc=best.val_mean)
    if baseline:
        metrics["baseline_test_acc"] = baseline.test_mean
    tracking.log_metrics(client, parent_id, metrics, step=0)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["phase", "label", "point", "seed", "status", "params", "val_acc", "test_acc",
                     "test_acc_at_best_val", "best_epoch", "epochs", "mlflow_run_id", "error"])
    for t in all_trials:
        m = t.metrics
        writer.writerow([t.phase, t.label, t.point, t.seed, t.status, json.dumps(t.params, sort_keys=True),
                         m.get("val_acc"),
                         m.get("test_acc"), m.get("test_acc_at_best_val"), m.get("best_epoch"), m.get("epoch"),
                         t.run_id, t.error or ""])
    client.log_text(parent_id, buffer.getvalue(), "results/trials.csv")
    from kdtune.results import format_failures

    # every failed trial: at the chosen points, at the points not chosen, and in the other phases (searches)
    failures = format_failures(result.summary, [t for p in result.phases.values() if p is not result.trials for t in p])
    lines = result.kind.result_lines(result, failures)
    client.log_text(parent_id, "\n".join(filter(None, lines)) + "\n", "results/table.txt")
    client.set_tag(parent_id, BEST_TAG, str(result.best_label))
    if result.registration:
        client.set_tag(parent_id, REGISTERED_TAG, f"{result.registration.name} version "
                                                       f"{result.registration.version} @{result.registration.alias}")
