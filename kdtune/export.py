"""A registered student as a file that ships: ONNX (onnxruntime, any language) or a torch.export pt2 archive.

    kdtune models export NAME@ALIAS --format onnx --out student.onnx
    kdtune models export NAME/VERSION --format pt2 --out student.pt2

The file is what the registry serves: the student with its input normalisation built in (samples scaled to
[0, 1], float32, N x C x H x W for images), logits out, the batch dimension dynamic. Before the file takes
its name it is run (onnxruntime for ONNX, `torch.export.load` for pt2) beside the registered model on real
samples: the model's logged input example, and up to `CHECK_SAMPLES` test samples of the dataset its version
was trained on (the `dataset` tag), when that dataset is available on this machine without a download; on the
whole batch and at batch 1. The largest absolute difference of their outputs must be within the tolerance
(default 1e-4, float32 logits) or nothing is written. It is written to a temporary file in the target folder
and renamed at the end, so a failure at any step leaves nothing behind.

ONNX needs the optional extra `export` (onnx, onnxscript, onnxruntime): pip install 'kdtune[export]'.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdtune.train.model_files import ExportError, export_file, require_extra, run_file

if TYPE_CHECKING:
    import numpy as np
    import torch

# numpy and torch are imported where they are used: `kdtune --help` builds this module's options without them

FORMATS = ("onnx", "pt2")
TOLERANCE = 1e-4  # max abs difference of float32 logits between the file and the registered model
CHECK_SAMPLES = 256  # dataset test samples the file is checked on, beside the logged input example


@dataclass
class Exported:
    path: Path
    format: str
    model_uri: str  # models:/NAME/VERSION, the version that was exported
    alias: str | None
    max_abs_diff: float
    samples: int
    where: str  # which samples, in words
    tolerance: float

    def summary(self) -> str:
        alias = f" (@{self.alias})" if self.alias else ""
        return (f"{self.path}: {self.format} of {self.model_uri}{alias}; max abs difference from the registered "
                f"model {self.max_abs_diff:.2e} on {self.samples} samples ({self.where}) and at batch 1, "
                f"tolerance {self.tolerance:g}")


# ---- checks before any work -------------------------------------------------------------------------

def check_format(fmt: str) -> None:
    if fmt not in FORMATS:  # argparse takes any word: a wrong one is this one line, not a usage message
        raise ExportError(f"--format {fmt!r}: not an export format; allowed: weights, {', '.join(FORMATS)}")


def check_out(out: str | Path) -> Path:
    """The target file: its folder must exist and be writable; the file itself may exist (it is replaced)."""
    path = Path(out).expanduser()
    folder = path.parent
    if path.is_dir():
        raise ExportError(f"--out {out}: is a folder; give a file name, e.g. {path / 'student.onnx'}")
    if not folder.exists():
        raise ExportError(f"--out {out}: folder {folder} does not exist")
    if not folder.is_dir():
        raise ExportError(f"--out {out}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: folder {folder} is not writable")
    return path


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """NAME@ALIAS, NAME/VERSION (either with or without models:/) -> (name, alias, version)."""
    text = ref[len("models:/"):] if ref.startswith("models:/") else ref
    name, at, alias = text.rpartition("@")
    if at and name and alias and "/" not in alias:
        return name, alias, None
    name, slash, version = text.rpartition("/")
    if slash and name and version.isdigit():
        return name, None, version
    raise ExportError(f"model {ref!r}: expected NAME@ALIAS or NAME/VERSION, "
                      "e.g. kdtune-digits-digits_student@champion or kdtune-digits-digits_student/3")


def find_version(client, ref: str):
    """The registered version `ref` names, or one line saying which part is unknown."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_ref(ref)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise ExportError(f"model {name!r}: not in the registry (`kdtune models list --all` shows the "
                          "registered models)") from None
    if alias is not None:
        if alias not in (model.aliases or {}):
            known = ", ".join(sorted(model.aliases or {})) or "none"
            raise ExportError(f"model {name!r} has no alias {alias!r}; its aliases: {known}")
        return client.get_model_version_by_alias(name, alias), alias
    try:
        return client.get_model_version(name, version), None
    except MlflowException:
        raise ExportError(f"model {name!r} has no version {version}") from None


# ---- the samples and the reference outputs -------------------------------------------------------------

def load_registered(model_uri: str, folder: str) -> tuple[torch.nn.Module, np.ndarray | None]:
    """(the registered model, its logged input example or None), downloaded once into `folder`."""
    import numpy as np
    import mlflow
    from mlflow.models import Model

    try:
        local = mlflow.artifacts.download_artifacts(model_uri, dst_path=folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = mlflow.pytorch.load_model(local, map_location="cpu")
    except Exception as error:
        raise ExportError(f"model {model_uri}: could not be loaded ({type(error).__name__}: "
                          f"{_first_line(error)})") from None
    with contextlib.suppress(NotImplementedError):  # an exported GraphModule refuses eval(): it is eval already
        model.eval()
    try:
        example = Model.load(local).load_input_example(local)
    except Exception:
        example = None
    return model, None if example is None else np.asarray(example)


def check_samples(model_uri: str, example: np.ndarray | None, dataset_name: str | None,
                  limit: int = CHECK_SAMPLES) -> tuple[torch.Tensor, str]:
    """(samples, where they come from): the logged input example, and the dataset's first test samples."""
    import torch

    parts, where = [], []
    if example is not None:
        parts.append(torch.as_tensor(example, dtype=torch.float32))
        where.append(f"logged input example {len(example)}")
    samples = _dataset_samples(dataset_name, limit)
    if samples is not None and (not parts or samples.shape[1:] == parts[0].shape[1:]):
        parts.append(samples)
        where.append(f"{dataset_name} test {len(samples)}")
    if not parts:
        raise ExportError(f"model {model_uri}: no input example logged and its dataset "
                          f"{dataset_name or '(no dataset tag)'} is not available here: nothing to check the "
                          "exported file on")
    return torch.cat(parts), " + ".join(where)


def _dataset_samples(name: str | None, limit: int) -> torch.Tensor | None:
    """The first `limit` test samples of a built-in dataset, if it is on this machine (never downloaded)."""
    from kdtune.data import dataset_names, load_dataset

    if not name or name not in dataset_names():
        return None
    try:
        dataset = load_dataset(name, download=False)
        return dataset.example(min(limit, len(dataset.test_labels)))
    except Exception:  # not downloaded here: the input example alone
        return None


# ---- export and verify -----------------------------------------------------------------------------

def max_abs_diff(fmt: str, path: Path, model: torch.nn.Module, samples: torch.Tensor) -> float:
    """Largest |file - registered model| over the outputs on `samples` and on the first sample alone."""
    import numpy as np
    import torch

    worst = 0.0
    with torch.no_grad():
        for batch in (samples, samples[:1]):
            expected = model(batch).numpy()
            got = run_file(fmt, path, batch)
            if got.shape != expected.shape:
                raise ExportError(f"the {fmt} file gives outputs of shape {got.shape} on {tuple(batch.shape)}, "
                                  f"the registered model {expected.shape}")
            diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
            worst = max(worst, diff if np.isfinite(diff) else float("inf"))
    return worst


def export(client, ref: str, fmt: str, out: str | Path, tolerance: float = TOLERANCE) -> Exported:
    """Export the registered version `ref` names to `out` as `fmt`, checked against the registered model."""
    import numpy as np

    check_format(fmt)
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0 and np.isfinite(tolerance)):
        raise ExportError(f"--tolerance {tolerance!r}: must be a number >= 0")
    require_extra(fmt)
    path = check_out(out)
    version, alias = find_version(client, ref)
    model_uri = f"models:/{version.name}/{version.version}"
    if is_int8(version):
        if fmt != "onnx":
            raise ExportError(f"{model_uri} is an int8 ONNX student (--quantize int8): allowed: --format onnx")
        return _copy_registered_onnx(version, model_uri, alias, path)
    # the file is written under a temporary name in the target folder (made now: an unwritable folder is found
    # before any work) and renamed only once it matches
    try:
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".partial.{fmt}")
    except OSError as error:
        raise ExportError(f"--out {out}: cannot write in {path.parent} ({error.strerror})") from None
    os.close(handle)
    temp = Path(temp)
    try:
        with tempfile.TemporaryDirectory() as folder:
            model, example = load_registered(model_uri, folder)
        samples, where = check_samples(model_uri, example, version.tags.get("dataset"))
        meta = {"kdtune.source": model_uri, "kdtune.alias": alias or "", "kdtune.run_id": version.run_id or "",
                "kdtune.input": f"float32 N x {' x '.join(map(str, samples.shape[1:]))}, scaled to [0, 1] "
                                "(normalisation is built in)", "kdtune.output": "logits"}
        try:
            export_file(model, fmt, samples[:2], temp, meta)
        except OSError as error:
            raise ExportError(f"--out {out}: could not be written ({error.strerror or error})") from None
        except Exception as error:
            raise ExportError(f"{fmt} export of {model_uri} failed: {type(error).__name__}: "
                              f"{_first_line(error)}") from None
        try:
            diff = max_abs_diff(fmt, temp, model, samples)
        except ExportError:
            raise
        except Exception as error:
            raise ExportError(f"the exported {fmt} file of {model_uri} does not run: {type(error).__name__}: "
                              f"{_first_line(error)}") from None
        if not diff <= tolerance:
            raise ExportError(f"the {fmt} file of {model_uri} differs from the registered model by max abs "
                              f"{diff:.3g} > tolerance {tolerance:g} on {len(samples)} samples ({where}): not written")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(temp, 0o666 & ~mask)  # a temporary file is private (0600): the file gets what a new file gets
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return Exported(path, fmt, model_uri, alias, diff, len(samples), where, tolerance)


def is_int8(version) -> bool:
    """A registered version that is an int8 ONNX file (kdtune/pareto/int8.py), not a PyTorch model."""
    return version.tags.get("precision") == "int8"


def _copy_registered_onnx(version, model_uri: str, alias: str | None, path: Path) -> Exported:
    """An int8 version's registered ONNX file itself, written once onnxruntime runs it on real samples."""
    import shutil

    import numpy as np
    import torch

    with tempfile.TemporaryDirectory() as folder:
        import mlflow

        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=folder))
        files = sorted(local.rglob("*.onnx"))
        if len(files) != 1:
            raise ExportError(f"{model_uri}: expected one ONNX file in the registered model, found {len(files)}")
        try:
            example = np.asarray(mlflow.models.Model.load(str(local)).load_input_example(str(local)))
        except Exception:
            example = None
        samples, where = check_samples(model_uri, example, version.tags.get("dataset"))
        outputs = run_file("onnx", files[0], torch.as_tensor(samples))
        if outputs.shape[0] != len(samples) or not np.isfinite(outputs).all():
            raise ExportError(f"the registered int8 file of {model_uri} does not give finite logits per sample")
        temp = path.with_name(f".{path.name}.partial.onnx")
        shutil.copyfile(files[0], temp)
        os.replace(temp, path)
    return Exported(path, "onnx (int8, the registered file)", model_uri, alias, 0.0, len(samples), where, 0.0)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# ---- the command -----------------------------------------------------------------------------------

def add_options(parser) -> None:
    """`kdtune models export`'s --format (the weights file it always wrote, or a runnable file) and --tolerance."""
    parser.add_argument("--format", default="weights", metavar="{weights," + ",".join(FORMATS) + "}",
                        help="weights: the network's state dict (.pt, a --teacher-source) and its normalisation "
                             "(.json); onnx: an ONNX file for onnxruntime (pip install 'kdtune[export]'); pt2: a "
                             "torch.export archive (torch.export.load). onnx and pt2 are checked against the "
                             "registered model before they are written")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"onnx/pt2: the largest absolute difference of outputs allowed (default {TOLERANCE:g})")


def command(args, client, uri) -> int:
    print(export(client, args.model, args.format, args.out, args.tolerance).summary())
    return 0
