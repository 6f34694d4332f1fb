"""Trained students as MLflow models: logged with a signature and an input example (PyTorch or ONNX), the
servable wrapper with its input normalisation built in, and registering a model under an alias."""
from __future__ import annotations

import warnings

import torch
from torch import nn


from kdtune.tracking.server import quiet_mlflow


def log_model(client, run_id: str, model: nn.Module, input_example: torch.Tensor, name: str = "student") -> str:
    """Log a servable model into run `run_id` (its status unchanged) with its input example (real samples) and
    the signature inferred from the model's outputs on them; return its model URI."""
    import mlflow

    signature = model_signature(model, input_example)
    status = client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # torch.export's pt2 packaging warns that weights are not on a GPU: they are on the CPU on purpose
        warnings.filterwarnings("ignore", message="No complete tensor found")
        info = mlflow.pytorch.log_model(
            model, name=name, input_example=input_example.numpy(), signature=signature,
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "kdtune"],
        )
    if status != "FINISHED":  # start_run's context marks the run FINISHED on exit
        client.update_run(run_id, status=status)
    return info.model_uri


def log_onnx_model(client, run_id: str, path, input_example, name: str) -> str:
    """Log the ONNX file `path` as an MLflow ONNX model into run `run_id` (its status unchanged), with the input
    example (real samples, float32) and the signature of what onnxruntime returns on it; return its model URI."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    from kdtune.train.model_files import onnx_session

    session = onnx_session(path)
    outputs = session.run(None, {session.get_inputs()[0].name: input_example})[0]
    status = client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.onnx.log_model(onnx.load(str(path)), name=name, input_example=input_example,
                                     signature=infer_signature(input_example, outputs),
                                     pip_requirements=["onnxruntime", "onnx"], save_as_external_data=False)
    if status != "FINISHED":
        client.update_run(run_id, status=status)
    return info.model_uri


def model_signature(model: nn.Module, batch: torch.Tensor):
    """The MLflow signature of `model` on a real batch: float32 samples in, logits out, the batch dimension
    variable (-1). Inferred from what the model returns, not left to MLflow's best effort, which logs no
    signature (only a warning) when its own inference fails."""
    from mlflow.models import infer_signature

    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(batch.to(device))
    finally:
        model.train(was_training)
    return infer_signature(batch.cpu().numpy(), outputs.detach().cpu().numpy())


class ServableModel(nn.Module):
    """The student with its input normalisation built in: takes samples scaled to [0, 1] (images N x C x H x W,
    or any other shape; statistics are per channel, dim 1), returns logits."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], sample_dims: int = 3):
        super().__init__()
        self.model = model
        shape = (1, -1, *([1] * (sample_dims - 1)))  # broadcast over dim 1 of a batch
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def network_state(loaded: nn.Module) -> dict:
    """The network's weights inside a logged ServableModel. MLflow may hand the model back as an exported
    GraphModule rather than the class kdtune logged, so take the weights by their "model." prefix."""
    return {k[len("model."):]: v for k, v in loaded.state_dict().items() if k.startswith("model.")}


def register_model(model_uri: str, name: str, alias: str, tags: dict) -> str:
    """Register a logged model as a new version of `name`, tag it and point `alias` at it; return the version."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="kdtune students (alias 'champion' = current best)")
    with quiet_mlflow():
        version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client.set_registered_model_alias(name, alias, version.version)
    return version.version
