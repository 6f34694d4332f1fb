"""A trained student in MLflow: weights from every trial, a servable model only for what is registered.

Logging a servable MLflow model (torch.export into a pt2 archive, plus its environment files) cost every trial
about 1.2 s, and 6.6 s in a fresh process (benchmarks/RESULTS.md), for models that nearly all stay unused. So a
trial logs its student's weights and normalisation (one small artifact, `weights/student.pt`); the study turns
the weights of the students it registers into a servable model, in the driver, once per registered student.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from kdtune.tags import MODEL_TAG, WEIGHTS_ARTIFACT, WEIGHTS_TAG


def log_weights(run, student: nn.Module, normalisation: dict, sample_dims: int, student_spec: str) -> str:
    """Log the student's weights to the trial's run (a `tracking.ChildRun`); return their URI."""
    payload = {"network": {k: v.detach().cpu() for k, v in student.state_dict().items()},
               "mean": list(normalisation["mean"]), "std": list(normalisation["std"]), "sample_dims": sample_dims,
               "student": student_spec}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(WEIGHTS_ARTIFACT).name
        torch.save(payload, path)
        run.client.log_artifact(run.run_id, str(path), artifact_path=str(Path(WEIGHTS_ARTIFACT).parent))
    uri = f"runs:/{run.run_id}/{WEIGHTS_ARTIFACT}"
    run.set_tags({WEIGHTS_TAG: uri})
    return uri


def load_weights(client, run_id: str) -> dict:
    """The payload `log_weights` wrote to run `run_id`."""
    with tempfile.TemporaryDirectory() as folder:
        local = client.download_artifacts(run_id, WEIGHTS_ARTIFACT, folder)
        return torch.load(local, map_location="cpu", weights_only=True)


def servable_student(client, run_id: str, student_ref, num_classes: int, input_shape: tuple) -> nn.Module:
    """The run's student rebuilt from its reference and logged weights, with its normalisation built in."""
    from kdtune.tracking import ServableModel

    payload = load_weights(client, run_id)
    network = student_ref.build(num_classes, tuple(input_shape))
    network.load_state_dict(payload["network"])
    return ServableModel(network.eval(), payload["mean"], payload["std"], payload["sample_dims"])


def servable_model_uri(client, run_id: str, student_ref, dataset) -> str:
    """The run's student as a logged MLflow model, what the registry takes: logged now, the first time."""
    from kdtune.tracking import log_model

    logged = client.get_run(run_id).data.tags.get(MODEL_TAG)
    if logged:
        return logged
    model = servable_student(client, run_id, student_ref, dataset.num_classes, dataset.input_shape)
    uri = log_model(client, run_id, model, dataset.example(2))
    client.set_tag(run_id, MODEL_TAG, uri)
    return uri
