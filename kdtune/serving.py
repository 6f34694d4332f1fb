"""A registered student, loaded for inference: `kdtune.load_student("models:/NAME@champion")`.

    import kdtune
    student = kdtune.load_student("models:/kdtune-digits-digits_student@champion")
    student.eval()
    logits = student(images)          # images scaled to [0, 1]; the normalisation is built in

Where the registry is found, as the `kdtune` command finds it: `tracking_uri=` if given (else
$MLFLOW_TRACKING_URI, where study scripts write by default), else the server already serving the store
(`kdtune mlflow serve`), else the store folder itself (`store=".kdtune"`, the quickstart's): its SQLite database
is read directly and the artifacts the embedded server kept for it (`mlflow-artifacts:/...`, under
`<store>/artifacts`) are read from disk, so no server has to run (`mlflow.pytorch.load_model` alone cannot: on
that store the artifacts are only reachable through a server).

MLflow hands a registered student back as a torch.export graph, on which `.eval()` and `.train()` raise. The
student returned here is an `nn.Module` that supports what inference needs (`.eval()`, calling it on a batch
of any size, `state_dict()`); an exported graph cannot train, so `.train()` says how to fine-tune instead.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from kdtune.errors import TrackingError

DEFAULT_STORE = ".kdtune"  # what study scripts and the `kdtune` command use without --store


class ExportedStudent(nn.Module):
    """An exported inference graph (the network with its input normalisation) as an `nn.Module` in eval mode."""

    def __init__(self, graph: nn.Module, source: str):
        super().__init__()
        self.graph = graph
        self.source = source
        self.training = False

    def forward(self, *args, **kwargs):
        return self.graph(*args, **kwargs)

    def train(self, mode: bool = True) -> "ExportedStudent":
        if mode:
            raise NotImplementedError(f"{self.source} is an exported inference graph (torch.export): it runs in eval "
                                      "mode only; to fine-tune it, build the student again and load the weights "
                                      "`kdtune models export` writes")
        return self  # eval(): already

    def state_dict(self, *args, **kwargs):  # the keys MLflow's model has ("model.…", "mean", "std")
        return self.graph.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.graph.load_state_dict(*args, **kwargs)


def load_student(model_uri: str, tracking_uri: str | None = None, store: str | os.PathLike = DEFAULT_STORE,
                 map_location: str = "cpu") -> nn.Module:
    """The registered model `model_uri` (models:/NAME@ALIAS, models:/NAME/VERSION, or NAME@ALIAS) as an
    `nn.Module` for inference, found as the module docstring says. Raises TrackingError in one line when the
    store, the model or its alias is not there."""
    import mlflow

    from kdtune import tracking

    name, ref = _parse(model_uri)
    shown = f"models:/{name}{ref}"
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.EmbeddedServer.running_uri(store)
    artifacts = None  # where mlflow-artifacts:/ URIs live on disk, when no server serves them
    if uri:
        uri = tracking.local_tracking_uri(uri)
        tracking.check_tracking_uri(uri)
    else:
        database = Path(store).expanduser().resolve() / "mlflow.db"
        if not database.exists():
            raise TrackingError(f"{shown}: no MLflow store at {database} (run a study here first, pass "
                                "store='FOLDER' for another --store, or tracking_uri='http://HOST:PORT')")
        uri, artifacts = f"sqlite:///{database}", database.parent / "artifacts"
    client = tracking.client_for(uri)
    try:
        version = _version(client, name, ref)
        location = client.get_model_version_download_uri(name, version)
        precision = client.get_model_version(name, version).tags.get("precision")
    except TrackingError:
        raise
    except Exception as error:
        raise TrackingError(f"{shown}: not in the registry of {tracking.redact(uri)} ({tracking._first_line(error)});"
                            " `kdtune models list` shows what is registered") from None
    if precision == "int8":  # kdtune/pareto/int8.py registers int8 students as ONNX files
        raise TrackingError(f"{shown}: version {version} is an int8 ONNX student (--quantize int8): it runs in "
                            f"onnxruntime, not PyTorch; `kdtune models export {name}/{version} --format onnx --out "
                            "FILE` writes its file")
    with tempfile.TemporaryDirectory() as folder, tracking.quiet_mlflow():
        local = _local_copy(location, uri, artifacts, folder, shown)
        loaded = mlflow.pytorch.load_model(local, map_location=map_location)
    return as_module(loaded, shown)


def as_module(loaded, source: str = "the model") -> nn.Module:
    """`loaded` in eval mode: itself if it supports `.eval()`, else (an exported graph) an `ExportedStudent`."""
    try:
        return loaded.eval()
    except NotImplementedError:  # torch.export's GraphModule: "Calling eval() is not supported yet."
        return ExportedStudent(loaded, source)


def _parse(model_uri: str) -> tuple[str, str]:
    """("NAME", "@ALIAS" | "/VERSION")."""
    text = model_uri[len("models:/"):] if model_uri.startswith("models:/") else model_uri
    if "@" in text:
        name, _, alias = text.partition("@")
        if name and alias:
            return name, f"@{alias}"
    elif "/" in text:
        name, _, version = text.rpartition("/")
        if name and version:
            return name, f"/{version}"
    raise TrackingError(f"model {model_uri!r}: give models:/NAME@ALIAS or models:/NAME/VERSION, e.g. "
                        "models:/kdtune-digits-digits_student@champion")


def _version(client, name: str, ref: str) -> str:
    if ref.startswith("@"):
        return client.get_model_version_by_alias(name, ref[1:]).version
    version = ref[1:]
    if version == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise TrackingError(f"models:/{name}/latest: {name} has no versions")
        return str(max(int(v.version) for v in versions))
    return client.get_model_version(name, version).version


def _local_copy(location: str, uri: str, artifacts: Path | None, folder: str, shown: str) -> str:
    """A local path holding the model's files."""
    if location.startswith("mlflow-artifacts:"):
        if artifacts is None:  # a server serves them
            import mlflow

            return mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=uri, dst_path=folder)
        local = artifacts / urlparse(location).path.lstrip("/")
        if not local.is_dir():
            raise TrackingError(f"{shown}: its files ({location}) are not under {artifacts}; serve the store "
                                "(kdtune mlflow serve) and pass tracking_uri='http://127.0.0.1:5000'")
        return str(local)
    return location  # a local path, file:, s3://...: MLflow reads it itself
