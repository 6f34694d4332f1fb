"""The model registry with a gate: `champion` moves only to a student that earned it.

A candidate is compared with the current champion of the same registered model on the same validation split
(its fingerprint, `val_set`, is a version tag). It takes `champion` only if its mean validation accuracy over
seeds beats the champion's by more than `margin`; otherwise it is registered with alias `challenger`. The
`gate` tag says what was compared. Test accuracy is recorded (per seed and mean, with the test set's
fingerprint) and reported, never used to choose: a registry that moves on test accuracy lets the test set steer
every later study that starts from the champion. Every version carries what a reader needs to trust it: study, dataset, teacher, method,
hyperparameters, test accuracy (per seed and mean), parameter count and the student's inference latency with
what it was measured on (`latency_device`, `latency_threads`, `latency_runtime`; kdtune/train/costs.py latency_tags),
timed alone after the study's trials (kdtune/study.py) or, for a Pareto study, before them (kdtune/pareto/run.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from kdtune.data import Dataset
from kdtune.errors import TrackingError
from kdtune.tracking.server import quiet_mlflow
from kdtune.tags import DATASET_SOURCE_KEY, FINGERPRINT_TAG, HELD_OUT_TAG, SAMPLES_TAG

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass
class Decision:
    name: str
    version: str
    alias: str  # champion | challenger
    reason: str


def test_set_fingerprint(dataset: Dataset) -> str:
    """What the test set is: its samples (in memory) or its files (streamed), and its labels."""
    digest = hashlib.sha1()
    _add_samples(digest, dataset, "test")
    digest.update(dataset.test_labels.contiguous().numpy().tobytes())
    return f"{dataset.name}:{digest.hexdigest()[:16]}"


def train_set_fingerprint(dataset: Dataset) -> str:
    """Which samples the training set holds: a teacher registered with another one is not this dataset's."""
    digest = hashlib.sha1()
    digest.update(dataset.train_labels.contiguous().numpy().tobytes())
    _add_samples(digest, dataset, "train")
    return f"{dataset.name}:train{dataset.num_train}:{digest.hexdigest()[:16]}"


def training_split_fingerprint(dataset: Dataset, val_fraction: float) -> str:
    """Which samples a network trained on: the training split left by `val_fraction`'s validation split. A
    registered teacher records it (tag fit_set) with its val_fraction, so a study can check that the teacher
    never saw the samples its students are validated on (kdtune/teachers.py)."""
    return _split_fingerprint(dataset, dataset.split(val_fraction)[0], "fit")


def validation_fingerprint(dataset: Dataset, val_fraction: float) -> str:
    """Which samples the validation split holds: the same fingerprint means accuracies are comparable."""
    return _split_fingerprint(dataset, dataset.split(val_fraction)[1], "val")


def _split_fingerprint(dataset: Dataset, indices, kind: str) -> str:
    """Some of the training set's samples (their indices, labels and contents) as dataset:KINDn:digest."""
    digest = hashlib.sha1()
    digest.update(indices.numpy().tobytes())
    digest.update(dataset.train_labels[indices].contiguous().numpy().tobytes())
    _add_samples(digest, dataset, "train", indices)
    return f"{dataset.name}:{kind}{len(indices)}:{digest.hexdigest()[:16]}"


def _add_samples(digest, dataset: Dataset, split: str, indices: torch.Tensor | None = None) -> None:
    """A split's samples (or some of them) into `digest`: their bytes in memory, their file paths streamed."""
    if dataset.in_memory:
        samples = getattr(dataset, f"{split}_images")
        digest.update((samples if indices is None else samples[indices]).contiguous().numpy().tobytes())
    else:
        files = getattr(dataset, f"{split}_files")
        digest.update("\n".join(files if indices is None else [files[i] for i in indices.tolist()]).encode())


def current_champion(client, name: str):
    import mlflow

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def measure_accuracy(model_uri: str, dataset: Dataset) -> float:
    """Test accuracy of a registered (servable) model, measured now on the dataset's test set."""
    import mlflow

    from kdtune.data import test_source

    model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    channels = dataset.input_shape[0]
    # mean 0, std 1: the samples as a served model takes them, scaled to [0, 1] (it normalises them itself)
    samples = test_source(dataset, torch.zeros(channels), torch.ones(channels), torch.device("cpu"))
    correct = 0
    with torch.no_grad():
        for inputs, labels, _ in samples.batches(512):
            correct += int((model(inputs).argmax(1) == labels).sum())
    return correct / len(dataset.test_labels)


def gate(client, name: str, val_mean: float, val_set: str, margin: float) -> tuple[bool, str]:
    """(takes champion?, reason): mean validation accuracy against the champion's, on the same split."""
    champion = current_champion(client, name)
    if champion is None:
        return True, f"no champion yet (mean validation accuracy {val_mean:.4f})"
    if not val_set:
        return False, "this version records no validation split: use --force"
    if champion.tags.get("val_set") != val_set:
        return False, (f"champion version {champion.version} was measured on validation split "
                       f"{champion.tags.get('val_set', 'unknown (registered before kdtune gated on validation)')}, "
                       f"not {val_set}: not comparable")
    champion_mean = float(champion.tags.get("val_acc_mean", "nan"))
    compared = (f"mean validation accuracy {val_mean:.4f} vs champion version {champion.version} "
                f"{champion_mean:.4f} on {val_set}")
    if val_mean > champion_mean + margin:
        return True, f"{compared}: better by more than {margin:g}"
    return False, f"{compared}: not better by more than {margin:g}"


def register(client, model_uri: str, name: str, tags: dict, val_mean: float, seeds: int, test_mean: float,
             val_set: str, test_set: str, margin: float = 0.0, gated: bool = True) -> Decision:
    """Register `model_uri` as a new version of `name`, then let the gate decide its alias (`gated=False`: no
    alias; the caller decides, e.g. a Pareto study gates only the member chosen within its budget)."""
    import mlflow

    if margin < 0:
        raise TrackingError(f"margin={margin}: must be >= 0")
    takes_champion, reason = gate(client, name, val_mean, val_set, margin) if gated else (False, "not gated")
    all_tags = {**tags, "val_acc_mean": f"{val_mean:.6f}", "val_set": val_set, "seeds": seeds,
                "test_acc_mean": f"{test_mean:.6f}", "test_set": test_set, "gate": reason}
    with quiet_mlflow():
        version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in all_tags.items()}).version
    if not gated:
        return Decision(name, str(version), "", reason)
    alias = CHAMPION if takes_champion else CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    return Decision(name, str(version), alias, reason)


def promote(client, name: str, version: str, margin: float = 0.0, force: bool = False) -> Decision:
    """Move `champion` to an existing version: through the gate unless forced."""
    import mlflow

    try:
        candidate = client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException:
        raise TrackingError(f"model {name!r} version {version!r}: not found in the registry") from None
    if force:
        reason = "promoted by hand (--force), without the gate"
    else:
        mean = float(candidate.tags.get("val_acc_mean", "nan"))
        takes, reason = gate(client, name, mean, candidate.tags.get("val_set", ""), margin)
        if not takes:
            return Decision(name, version, "unchanged", reason)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "gate", reason)
    return Decision(name, version, CHAMPION, reason)


# ---- lineage: the splits as MLflow dataset inputs of a study run -------------------------------------------

DATASET_CONTEXTS = ("training", "validation", "testing")


def log_dataset(client, run_id: str, dataset, val_fraction: float) -> dict[str, str]:
    """The study's dataset as inputs of its (parent) run, as `mlflow.log_input` logs them: one input per split,
    named after the dataset, with context training (the training set as given, validation included: what a
    registered teacher is matched on), validation (carved from it, what selection and the registry gate use)
    and testing. Each digest is the hash part of kdtune's fingerprint of that split (above), the
    same value a registered version's `val_set`/`test_set` tag holds, so a registered student leads back to
    the study run and the exact samples it was chosen on. Tags: kdtune.samples (the split's size; for training:
    the samples trials train on, validation left out), kdtune.fingerprint. Returns context -> fingerprint."""
    import json

    import numpy as np
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from kdtune.tracking.runs import retrying
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT


    _, val_idx = dataset.split(val_fraction)
    n_val, n_test = len(val_idx), len(dataset.test_labels)
    fingerprints = {"training": train_set_fingerprint(dataset),
                    "validation": validation_fingerprint(dataset, val_fraction),
                    "testing": test_set_fingerprint(dataset)}
    sizes = {"training": dataset.num_train - n_val, "validation": n_val, "testing": n_test}
    rows = {"training": dataset.num_train, "validation": n_val, "testing": n_test}
    shape = [int(d) for d in dataset.input_shape]
    schema = Schema([TensorSpec(np.dtype(np.float32), (-1, *shape), "samples"),
                     TensorSpec(np.dtype(np.int64), (-1,), "labels")])
    source = CodeDatasetSource({DATASET_SOURCE_KEY: dataset.name, "num_classes": int(dataset.num_classes),
                                "stored": "memory" if dataset.in_memory else "files",
                                "val_fraction": float(val_fraction)})
    inputs = []
    for context in DATASET_CONTEXTS:
        meta = MetaDataset(source, name=dataset.name, digest=fingerprints[context].rsplit(":", 1)[1], schema=schema)
        profile = {"num_rows": rows[context], "samples_used": sizes[context], "num_classes": int(dataset.num_classes),
                   "sample_shape": shape}
        entity = DatasetEntity(**{**meta.to_dict(), "profile": json.dumps(profile)})
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag(SAMPLES_TAG, str(sizes[context])),
                InputTag(FINGERPRINT_TAG, fingerprints[context])]
        if context == "training":
            tags.append(InputTag(HELD_OUT_TAG, str(n_val)))
        inputs.append(DatasetInput(entity, tags))
    retrying(lambda: client.log_inputs(run_id, datasets=inputs), "log the study's dataset", client.tracking_uri)
    return fingerprints
