"""Int8 members of a Pareto front (`--quantize int8`): each front member's post-training int8 twin, measured
like the member and registered beside it.

For every front member, after its confirm runs (kdtune/pareto/run.py):
  quantise   each seed's trained student (the weights its run logged) exported to ONNX and quantised statically
             by onnxruntime (kdtune/train/quantize.py: int8 weights per channel and activations, ranges calibrated on
             samples of that run's training split, never validation or test)
  measure    validation and test accuracy of the int8 file in onnxruntime, per seed, on the splits the fp32
             member is judged on; latency of the best seed's int8 file (on validation) and of its fp32 file,
             interleaved in one process where a trial would run (kdtune/train/costs.py), so the two are side by side
  register   the int8 file as an MLflow ONNX model (signature, input example) in the same run as its fp32 twin,
             a version of the same registered model, tagged precision=int8 and with its own latency; the
             champion rule then picks among fp32 and int8 members alike

Int8 latency is an onnxruntime figure, so a study with int8 members times its fp32 candidates in onnxruntime
too (`--latency-runtime onnxruntime`): one front compares latencies of one runtime only.
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kdtune.pareto.rows import FrontRow
from kdtune.results import SettingRow
from kdtune.tags import INT8_MODEL, INT8_PREFIX

PRECISIONS = ("int8",)


@dataclass(frozen=True)
class Quantised:
    """One seed's int8 student: its run, the files, and what onnxruntime measured."""

    trial: object
    fp32_file: Path
    int8_file: Path
    val_acc: float
    test_acc: float
    val_acc_fp32: float  # the same file's fp32 accuracy in onnxruntime: the int8 cost, measured alike
    agreement: float  # share of test samples on which fp32 and int8 predict the same class


def quantise_trial(study, trial, ref, folder: Path, calibration: int) -> Quantised:
    """The int8 twin of one confirm trial's student, evaluated on its validation split and the test set."""
    from kdtune import students
    from kdtune.train import quantize

    dataset = study.dataset
    folder.mkdir(parents=True, exist_ok=True)
    model = students.servable_student(study.client, trial.run_id, ref, dataset.num_classes, dataset.input_shape)
    val_fraction = study.base.trial(trial.params).val_fraction
    fp32, int8 = quantize.int8_onnx(model, dataset, folder, calibration, val_fraction, seed=trial.seed)
    _, val_idx = dataset.split(val_fraction)
    on_val = quantize.compare(fp32, int8, *quantize.split_samples(dataset, "train", val_idx))
    on_test = quantize.compare(fp32, int8, *quantize.split_samples(dataset, "test"))
    return Quantised(trial, fp32, int8, on_val.accuracy_int8, on_test.accuracy_int8, on_val.accuracy_fp32,
                     on_test.agreement)


def summary_of(label: str, quantised: list[Quantised]) -> SettingRow:
    """The int8 students of one member's seeds as a summary row (what the front and the registry read)."""
    return SettingRow(label, val=tuple(q.val_acc for q in quantised), test=tuple(q.test_acc for q in quantised))


def int8_rows(study, run, final: list, echo=print) -> list[FrontRow]:
    """A front row for the int8 twin of every registered fp32 row of `run` (a ParetoRun), its model logged and
    its latency measured; registering is the caller's (one registration path for both precisions)."""
    from kdtune import cluster
    from kdtune.train import costs as costs_module

    plan, spec = run.plan, study.spec
    members = [r for r in run.rows if r.version]
    if not members:
        return []
    with tempfile.TemporaryDirectory() as scratch:
        chosen: dict[str, tuple[FrontRow, list[Quantised], Quantised]] = {}
        for row in members:
            trials = [t for t in final if t.label == row.label and t.finished and "weights_uri" in t.metrics]
            quantised = [quantise_trial(study, t, run.refs[row.student], Path(scratch) / t.run_id,
                                        plan.calibration_samples) for t in trials]
            best = max(quantised, key=lambda q: q.val_acc)  # the int8 file registered: best on validation
            chosen[row.student] = (row, quantised, best)
            _log_seed_metrics(study.client, quantised)
        files = {}
        for student, (_, _, best) in chosen.items():
            files[("int8", student)] = best.int8_file.read_bytes()
            files[("fp32", student)] = best.fp32_file.read_bytes()
        table, seconds = cluster.run_like_a_trial(
            costs_module.onnx_file_latencies, files=files, input_shape=tuple(study.dataset.input_shape),
            threads=max(1, int(spec.cpus_per_trial)), batch=plan.latency_batch, warmup=plan.warmup,
            repeats=plan.repeats, cpus=spec.cpus_per_trial, gpus=0)
        echo(f"int8: quantised {sum(len(q) for _, q, _ in chosen.values())} student(s) of {len(chosen)} front "
             f"member(s); int8 and fp32 files timed side by side in {seconds:.1f}s")
        rows = []
        for student, (row, quantised, best) in chosen.items():
            latency = table[("int8", student)]
            paired = table[("fp32", student)]
            uri = _log_int8_model(study, best)
            rows.append(dataclasses.replace(
                row, label=INT8_PREFIX + student, precision="int8", costs={**row.costs, **latency},
                front=summary_of(INT8_PREFIX + student, quantised), params=best.trial.params, version=None, alias="",
                trial=best.trial, model_uri=uri, fp32_version=row.version,
                speed_ratio=paired["latency_ms_batch1"] / latency["latency_ms_batch1"],
                tags={"precision": "int8", "calibration_samples": plan.calibration_samples,
                      "quantization": "onnxruntime static QDQ, int8 weights per channel and activations, MinMax",
                      "calibration_split": "training", "fp32_version": row.version,
                      "val_acc": f"{best.val_acc:.4f}", "test_acc": f"{best.test_acc:.4f}",
                      "test_acc_per_seed": ",".join(f"{q.test_acc:.4f}" for q in quantised),
                      "int8_agreement_test": f"{best.agreement:.4f}",
                      "fp32_latency_ms_batch1_same_run": f"{paired['latency_ms_batch1']:.4f}"}))
    return rows


def _log_seed_metrics(client, quantised: list[Quantised]) -> None:
    """Each confirm run shows what its int8 twin measured (the MLflow UI compares them with the run's own)."""
    from kdtune import tracking

    for q in quantised:
        tracking.log_metrics(client, q.trial.run_id, {"int8_val_acc": q.val_acc, "int8_test_acc": q.test_acc,
                                                      "int8_agreement": q.agreement}, step=0)


def _log_int8_model(study, best: Quantised) -> str:
    from kdtune.tracking import log_onnx_model

    return log_onnx_model(study.client, best.trial.run_id, best.int8_file, study.dataset.example(2).numpy(),
                          INT8_MODEL)
