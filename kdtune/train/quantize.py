"""Post-training int8 students: the ONNX student quantised statically by onnxruntime, calibrated on training samples.

    calibration_samples(dataset, n)          n samples of the training split (seeded; never validation or test:
                                             those choose and report the student), float32 in [0, 1]
    quantize_onnx(fp32, int8, samples)       onnxruntime's quantize_static: QDQ format, int8 weights (per output
                                             channel) and activations, MinMax ranges over the calibration batches
    int8_onnx(model, dataset, folder)        both files for a servable student (normalisation built in):
                                             export (kdtune/export.py) + calibrate + quantise
    compare(fp32, int8, samples, labels)     accuracy of each file, agreement of their predictions, the largest
                                             logit difference and the file sizes, all run in onnxruntime

Int8 is a trade, not a free gain: `compare` says what it costs in accuracy, `kdtune.train.costs.onnxruntime_timings`
what it saves in time (on a CPU without int8 dot-product instructions, and for networks as small as the digits
student, the quantise/dequantise steps can cost more than the int8 arithmetic saves). Needs kdtune[export].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdtune.errors import ConfigError
from kdtune.tags import PRECISION_META

if TYPE_CHECKING:
    import numpy as np
    import torch

CALIBRATION_SAMPLES = 256
CALIBRATION_BATCH = 32
EVAL_BATCH = 512  # samples per onnxruntime call when a split is evaluated (bounds the memory of a large split)


def calibration_samples(dataset, n: int = CALIBRATION_SAMPLES, val_fraction: float = 0.1, seed: int = 0
                        ) -> tuple["np.ndarray", "torch.Tensor"]:
    """(samples float32 in [0, 1], their indices in the training set): `n` of the training split's samples
    (the training set less the validation split of `val_fraction`), drawn with `seed`."""
    import torch

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"calibration samples={n!r}: must be a whole number >= 1")
    train_idx, _ = dataset.split(val_fraction)
    order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))
    chosen = train_idx[order[:n]].sort().values
    return split_samples(dataset, "train", chosen)[0], chosen


def split_samples(dataset, split: str, indices=None) -> tuple["np.ndarray", "np.ndarray"]:
    """(samples float32 in [0, 1], labels) of `split` ("train" or "test") at `indices` (all when None), decoded
    from their files for a streamed dataset, as a streamed study reads them."""
    import torch

    labels = dataset.train_labels if split == "train" else dataset.test_labels
    if indices is None:
        indices = torch.arange(len(labels))
    if dataset.in_memory:
        images = dataset.train_images if split == "train" else dataset.test_images
        samples = images[indices].float() * dataset.scale
    else:
        from kdtune.data.streamed import _FileBatches

        raw, _, _, error = _FileBatches(dataset, split)[indices.tolist()]
        if error:
            from kdtune.errors import DatasetError

            raise DatasetError(error)
        samples = raw.float() * dataset.scale
    return samples.numpy(), labels[indices].numpy()


class _Batches:
    """onnxruntime's CalibrationDataReader over an array of samples, in batches."""

    def __init__(self, name: str, samples: "np.ndarray", batch: int):
        self.feeds = iter([{name: samples[i:i + batch]} for i in range(0, len(samples), batch)])

    def get_next(self):
        return next(self.feeds, None)

    def rewind(self):  # not needed for MinMax (one pass); part of the reader interface
        pass


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path, samples: "np.ndarray",
                  batch: int = CALIBRATION_BATCH, per_channel: bool = True) -> Path:
    """Quantise the ONNX file `fp32_path` to `int8_path` (static, QDQ, int8 weights and activations), the
    activation ranges calibrated on `samples` (MinMax)."""
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(samples) == 0:
        raise ConfigError("int8 calibration needs at least one sample")
    name = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference and graph clean-up, as recommended
        quantize_static(str(prepared), str(int8_path), _Batches(name, samples, batch), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return Path(int8_path)


def int8_onnx(model: "torch.nn.Module", dataset, folder: str | Path, n: int = CALIBRATION_SAMPLES,
              val_fraction: float = 0.1, seed: int = 0) -> tuple[Path, Path]:
    """(fp32 ONNX file, int8 ONNX file) of a servable student (samples in [0, 1] in, logits out), calibrated on
    `n` training samples of `dataset`."""
    import torch

    from kdtune.train.model_files import export_file

    folder = Path(folder)
    fp32, int8 = folder / "student.onnx", folder / "student.int8.onnx"
    samples, _ = calibration_samples(dataset, n, val_fraction, seed)
    export_file(model, "onnx", torch.from_numpy(samples[:2]), fp32, {PRECISION_META: "float32"})
    quantize_onnx(fp32, int8, samples)
    return fp32, int8


@dataclass
class Comparison:
    accuracy_fp32: float
    accuracy_int8: float
    agreement: float  # share of samples on which both files predict the same class
    max_abs_logit_diff: float
    bytes_fp32: int
    bytes_int8: int

    def as_dict(self) -> dict:
        return asdict(self)


def compare(fp32_path: str | Path, int8_path: str | Path, samples: "np.ndarray", labels: "np.ndarray",
            threads: int | None = 1) -> Comparison:
    """Both files run in onnxruntime on `samples` (e.g. the test set, for reporting)."""
    import numpy as np

    from kdtune.train.model_files import onnx_session

    outputs = []
    for path in (fp32_path, int8_path):
        session = onnx_session(path, threads)
        name = session.get_inputs()[0].name
        outputs.append(np.concatenate([session.run(None, {name: samples[i:i + EVAL_BATCH]})[0]
                                       for i in range(0, len(samples), EVAL_BATCH)]))
    fp32, int8 = outputs
    labels = np.asarray(labels)
    return Comparison(float((fp32.argmax(1) == labels).mean()), float((int8.argmax(1) == labels).mean()),
                      float((fp32.argmax(1) == int8.argmax(1)).mean()), float(np.abs(fp32 - int8).max()),
                      Path(fp32_path).stat().st_size, Path(int8_path).stat().st_size)
