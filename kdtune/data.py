"""Datasets as in-memory tensors (or streamed image files), cut into batches on the training device.

A dataset is loaded once (on the study driver), held as tensors plus labels, and shipped to trials through
the Ray object store. Inside a trial the samples move to the training device once (one copy per dataset
and device, shared by the train and validation views); every batch is cut by index, converted to float,
normalised and augmented (a recipe from kdtune.augment, vectorised) on that device. No DataLoader workers,
no per-sample Python.

Samples may have any shape: images (C, H, W), signals (C, L) or feature vectors (D,). Normalisation is per
entry of dim 1 of a batch (channels for images and signals, features for vectors).

A folder of images larger than the memory budget is not decoded up front: a `StreamedDataset` holds only
file paths and labels, and `StreamingData` decodes batches in DataLoader workers, in exactly the order the
in-memory path would use for the same generator, then normalises and augments them on the device the same
way.

Each batch carries its sample indices, so per-sample caches (teacher logits) are keyed by index, never by
position in a shuffled order.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import re
import shutil
import socket
import warnings
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from kdtune.augment import DEFAULT_IMAGE_AUGMENT, Augment, parse_augment
from kdtune.locks import staging_lock
from kdtune.errors import ConfigError, DatasetError

SPLIT_SEED = 20240611  # fixed: every trial of every study validates on the same samples
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # what an MLflow registry name built from a dataset name allows


def _seeded_split(labels: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded and stratified: each class gives round(val_fraction x its count) samples to validation (at least
    one, never all, of a class with two or more), so the validation accuracy of a small dataset is not skewed by
    which classes the draw happened to favour. (train indices, validation indices), each sorted."""
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    ordered_labels = labels[order]
    chosen = []
    for label in torch.unique(labels):
        members = order[ordered_labels == label]  # this class's samples, in the seeded order
        take = int(round(len(members) * val_fraction))
        if len(members) >= 2:
            take = min(max(1, take), len(members) - 1)
        chosen.append(members[:take])
    val = torch.cat(chosen) if chosen else order[:0]
    if len(val) == 0:  # only singleton classes: fall back to a plain seeded draw
        val = order[:max(1, int(round(n * val_fraction)))]
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[val] = True
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


def _stat_dims(rank: int) -> tuple[int, ...]:
    """Batch dims reduced for per-channel (or per-feature) statistics: all but dim 1."""
    return (0, *range(2, rank))


def _per_channel(values: torch.Tensor, rank: int) -> torch.Tensor:
    """A (C,) vector shaped to broadcast over dim 1 of a batch of samples of `rank` dims."""
    return values.reshape(1, -1, *([1] * (rank - 1)))


class _Samples:
    """What both kinds of dataset derive the same way from their labels and sample shape."""

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    def split(self, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded, stratified train/validation split of the training set: (train indices, validation indices);
        the same for an in-memory and a streamed dataset of the same labels."""
        return _seeded_split(self.train_labels, val_fraction)


@dataclass
class Dataset(_Samples):
    """Samples as tensors (N, ...) (images uint8 (N, C, H, W)); `scale` maps stored values to [0, 1].

    `classes` names the labels when known (folder names); `default_augment` is the recipe a trial uses when
    its config leaves augment unset ("crop:4,flip" for natural images that survive a mirror, else "").
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    scale: float
    classes: tuple[str, ...] | None = None
    default_augment: str = ""

    def __post_init__(self):
        if self.classes is not None:
            self.classes = tuple(str(c) for c in self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.train_images.shape[1:])

    in_memory = True

    def channel_stats(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std per entry of dim 1 (channels, or features of vectors) in [0, 1] units, computed on
        the given training samples."""
        samples = self.train_images[indices].float() * self.scale
        dims = _stat_dims(samples.dim())
        mean = samples.mean(dim=dims)
        std = samples.std(dim=dims).clamp_min(1e-6)
        return mean, std

    def example(self, n: int = 2) -> torch.Tensor:
        """The first n test samples as float32 in [0, 1] units: what a served model takes."""
        return self.test_images[:n].float() * self.scale


def from_arrays(x_train, y_train, x_test, y_test, name: str = "arrays", classes=None, scale: float | None = None
                ) -> Dataset:
    """A Dataset from numpy arrays or torch tensors, checked so that a mistake is one line, not a crash later.

    uint8 samples are kept as uint8 with scale 1/255 (images); any other numeric samples are stored as
    float32 with scale 1.0 unless `scale` says otherwise. Labels are integers in 0..C-1, C = len(classes) when
    given, else the largest label + 1.
    """
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise ConfigError(f"name={name!r}: a dataset name may hold only letters, digits, '_', '.' and '-' "
                          "(it becomes part of MLflow registry names)")
    xs = {"x_train": _as_tensor("x_train", x_train), "x_test": _as_tensor("x_test", x_test)}
    ys = {"y_train": _as_tensor("y_train", y_train), "y_test": _as_tensor("y_test", y_test)}
    for (x_key, x), (y_key, y) in zip(xs.items(), ys.items()):
        _check_split(name, x_key, x, y_key, y)
    shapes = {key: tuple(x.shape[1:]) for key, x in xs.items()}
    if shapes["x_train"] != shapes["x_test"]:
        raise DatasetError(f"{name}: x_train samples are {shapes['x_train']} but x_test samples are "
                           f"{shapes['x_test']}; both splits need the same sample shape")
    uint8 = [x.dtype == torch.uint8 for x in xs.values()]
    if any(uint8) and not all(uint8):
        raise DatasetError(f"{name}: x_train is {xs['x_train'].dtype} but x_test is {xs['x_test'].dtype}; "
                           "give both splits the same dtype (uint8 for images 0..255, or floats)")
    if not all(uint8):
        xs = {key: x.to(torch.float32) for key, x in xs.items()}
        for key, x in xs.items():
            if not bool(torch.isfinite(x).all()):
                raise DatasetError(f"{name}: {key} holds NaN or infinite values")
    labels = {key: y.to(torch.int64) for key, y in ys.items()}
    num_classes = _num_classes(name, labels, classes)
    if scale is None:
        scale = 1.0 / 255.0 if all(uint8) else 1.0
    if not isinstance(scale, (int, float)) or not 0 < float(scale) < float("inf"):
        raise ConfigError(f"scale={scale!r}: must be a positive number (stored value * scale = [0, 1] units)")
    return Dataset(name, xs["x_train"], labels["y_train"], xs["x_test"], labels["y_test"], num_classes, float(scale),
                   classes=tuple(str(c) for c in classes) if classes is not None else None)


def _as_tensor(key: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        array = np.asarray(value)
    except Exception as error:  # ragged lists and the like
        raise DatasetError(f"{key}: not an array ({type(value).__name__}: {error})") from None
    if array.dtype.kind not in "biuf":
        raise DatasetError(f"{key}: {type(value).__name__} of dtype {array.dtype}; expected a numeric numpy array "
                           "or torch tensor")
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(array))


def _check_split(name: str, x_key: str, x: torch.Tensor, y_key: str, y: torch.Tensor) -> None:
    if x.dim() < 2:
        raise DatasetError(f"{name}: {x_key} has shape {tuple(x.shape)}; expected (N, ...) with one sample per row")
    if len(x) == 0:
        raise DatasetError(f"{name}: {x_key} is empty; every split needs samples")
    if x.is_complex():
        raise DatasetError(f"{name}: {x_key} is complex ({x.dtype}); expected real numbers")
    if y.dim() != 1:
        raise DatasetError(f"{name}: {y_key} has shape {tuple(y.shape)}; expected (N,) integer class labels")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DatasetError(f"{name}: {y_key} is {y.dtype}; labels must be integers 0..C-1")
    if len(x) != len(y):
        raise DatasetError(f"{name}: {x_key} holds {len(x)} samples but {y_key} holds {len(y)} labels")


def _num_classes(name: str, labels: dict[str, torch.Tensor], classes) -> int:
    if classes is not None and (isinstance(classes, str) or not hasattr(classes, "__len__")):
        raise ConfigError(f"classes={classes!r}: expected a list of class names")
    count = len(classes) if classes is not None else max(int(y.max()) for y in labels.values()) + 1
    if count < 2:
        raise DatasetError(f"{name}: {count} class(es); classification needs at least 2")
    for key, y in labels.items():
        bad = y[(y < 0) | (y >= count)]
        if len(bad):
            allowed = f"0..{count - 1}" + (f" (len(classes) = {count})" if classes is not None else "")
            raise DatasetError(f"{name}: {key} holds label {int(bad[0])}; labels must be integers in {allowed}")
    return count


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    augment_by_default: bool
    load: Callable[[Path, bool], Dataset]
    description: str

    @property
    def default_augment(self) -> str:
        return DEFAULT_IMAGE_AUGMENT if self.augment_by_default else ""


# ---- files: present, downloaded, or explained ---------------------------------------------------------

@dataclass(frozen=True)
class _Source:
    """Where a dataset's files come from: one mechanism for every dataset.

    `files` are (name, md5) pairs fetched from the first mirror that serves them. An archive (`extract`) is
    unpacked into data_dir and creates the dataset folder; plain files are saved into the folder itself.
    A source without mirrors cannot be downloaded (a login, no official host): `manual` says what to do,
    with {data_dir} and {folder} filled in.
    """

    mirrors: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    extract: bool = False
    manual: str = ""

    def how_to_get(self, data_dir: Path, folder: Path) -> str:
        if not self.mirrors:
            return self.manual.format(data_dir=data_dir, folder=folder)
        if self.extract:
            return f"download {self.mirrors[0]}{self.files[0][0]} and extract it into {data_dir} (so that {folder} exists)"
        names = ", ".join(name for name, _ in self.files)
        return f"download {names} from {self.mirrors[0]} into {folder}"


def _obtain(name: str, source: _Source, data_dir: Path, folder: Path, missing: Path, download: bool) -> None:
    """`missing` is the first required file not found: download what is missing, or end with one line saying
    how to get it. A failed download removes every file and folder it created."""
    how = source.how_to_get(data_dir, folder)
    if not source.mirrors:
        raise DatasetError(f"{name}: {missing} not found; {how}")
    if not download:
        raise DatasetError(f"{name}: {missing} not found and downloads are off; {how}")
    target = data_dir if source.extract else folder
    new_dirs = [d for d in (target, *target.parents) if not d.exists()]  # what we create, deepest first
    data_dir.mkdir(parents=True, exist_ok=True)
    # Several processes (studies, nodes sharing one NFS data dir) may get here at once: one downloads, the
    # others wait on the lock and then find the files there.
    with staging_lock(data_dir, f"{name}-download") as lock_file:
        if missing.exists():
            return
        folder_existed = folder.exists()
        existed = {file for file, _ in source.files if (target / file).is_file()}
        # An archive already here may be the one to (re-)extract; download_url skips it when its checksum holds.
        wanted = [(file, md5) for file, md5 in source.files if source.extract or file not in existed]
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)  # a dead mirror should fail in seconds, not hang a study
        try:
            target.mkdir(parents=True, exist_ok=True)
            for file, md5 in wanted:
                _fetch(name, source, file, md5, target, how)
        except DatasetError:
            for file, _ in wanted:
                if file not in existed:
                    (target / file).unlink(missing_ok=True)
            if not folder_existed:
                shutil.rmtree(folder, ignore_errors=True)  # half-extracted archive
            if data_dir in new_dirs:
                lock_file.unlink(missing_ok=True)  # leave nothing behind in a folder we made
            for directory in new_dirs:
                if directory.is_dir() and not any(directory.iterdir()):
                    directory.rmdir()
            raise
        finally:
            socket.setdefaulttimeout(previous)


def _fetch(name: str, source: _Source, file: str, md5: str, target: Path, how: str) -> None:
    from torchvision.datasets.utils import download_and_extract_archive, download_url

    errors = []
    for mirror in source.mirrors:
        try:
            if source.extract:
                download_and_extract_archive(mirror + file, download_root=str(target), md5=md5)
            else:
                download_url(mirror + file, str(target), md5=md5)
            return
        except Exception as error:  # offline, DNS, HTTP, checksum: try the next mirror, then explain
            errors.append(f"{type(error).__name__}: {error}")
    others = f"; {len(errors) - 1} other mirror(s) failed too" if len(errors) > 1 else ""
    raise DatasetError(
        f"could not download {source.mirrors[0]}{file} for {name} ({errors[0]}{others}); "
        f"on a machine without internet, {how}, then run again"
    ) from None


def _check_labels(name: str, split: str, labels: torch.Tensor, num_classes: int, where: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{name} {split}: labels outside 0..{num_classes - 1} in {where}")


def _hold_out(images: torch.Tensor, labels: torch.Tensor, fraction: float) -> tuple[torch.Tensor, ...]:
    """A fixed, seeded test split for datasets that ship without one: (train images, labels, test images, labels)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(fraction * len(labels)))
    test, train = order[:n_test].sort().values, order[n_test:].sort().values
    return images[train], labels[train], images[test], labels[test]


# ---- loaders --------------------------------------------------------------------------------------

def _load_digits(_data_dir: Path, _download: bool) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0-16); 20% held out as test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8), 0..16
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return Dataset("digits", *_hold_out(images, labels, 0.2), 10, 1.0 / 16.0)


@dataclass(frozen=True)
class _CifarFiles:
    folder: str
    source: _Source
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int


_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_CIFAR = {
    "cifar10": _CifarFiles(
        "cifar-10-batches-py",
        _Source((_CIFAR_URL,), (("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),), extract=True),
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels", 10,
    ),
    "cifar100": _CifarFiles(
        "cifar-100-python",
        _Source((_CIFAR_URL,), (("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),), extract=True),
        ("train",), ("test",), b"fine_labels", 100,
    ),
}


def _read_cifar_batches(folder: Path, names: tuple[str, ...], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the official CIFAR python-format batches (pickled dicts with b'data' N x 3072 uint8)."""
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            batch_labels = np.asarray(batch[label_key], dtype=np.int64)
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as error:
            raise DatasetError(f"{path}: not a readable CIFAR batch file ({type(error).__name__}: {error})") from None
        if len(batch_labels) != len(data):
            raise DatasetError(f"{path}: {len(data)} images but {len(batch_labels)} labels")
        images.append(torch.from_numpy(data))
        labels.append(torch.from_numpy(batch_labels))
    return torch.cat(images), torch.cat(labels)


def _cifar_loader(name: str) -> Callable[[Path, bool], Dataset]:
    files = _CIFAR[name]

    def load(data_dir: Path, download: bool) -> Dataset:
        folder = data_dir / files.folder
        missing = [n for n in files.train_files + files.test_files if not (folder / n).is_file()]
        if missing:
            _obtain(name, files.source, data_dir, folder, folder / missing[0], download)
        train_images, train_labels = _read_cifar_batches(folder, files.train_files, files.label_key)
        test_images, test_labels = _read_cifar_batches(folder, files.test_files, files.label_key)
        _check_labels(name, "train", train_labels, files.num_classes, folder)
        _check_labels(name, "test", test_labels, files.num_classes, folder)
        return Dataset(name, train_images, train_labels, test_images, test_labels, files.num_classes, 1.0 / 255.0)

    return load


# MNIST and Fashion-MNIST: the official idx files (big-endian header, then raw uint8), gzipped or not.
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_MNIST_SOURCES = {
    "mnist": _Source(
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        tuple(zip((f + ".gz" for f in _IDX_FILES), ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                                   "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"))),
    ),
    "fashion_mnist": _Source(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        tuple(zip((f + ".gz" for f in _IDX_FILES), ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                                   "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))),
    ),
}


def _read_idx(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes: magic 0x00 0x00 0x08 <ndim>, ndim big-endian uint32 sizes, then the data."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
            raw = bytearray(handle.read())  # writable, so torch.from_numpy needs no copy
    except (OSError, EOFError) as error:
        raise DatasetError(f"{path}: not a readable idx file ({type(error).__name__}: {error})") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DatasetError(f"{path}: not an idx file of unsigned bytes (starts with {bytes(raw[:4]).hex() or 'nothing'})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: header says shape {shape} but the file holds {data.size} values")
    return data.reshape(shape)


def _mnist_loader(name: str, folder_name: str) -> Callable[[Path, bool], Dataset]:
    source = _MNIST_SOURCES[name]

    def load(data_dir: Path, download: bool) -> Dataset:
        folder = data_dir / folder_name

        def path(stem: str) -> Path:
            return folder / stem if (folder / stem).is_file() else folder / (stem + ".gz")

        missing = [path(stem) for stem in _IDX_FILES if not path(stem).is_file()]
        if missing:
            _obtain(name, source, data_dir, folder, missing[0], download)
        arrays = [_read_idx(path(stem)) for stem in _IDX_FILES]
        splits = []
        for split, images, labels, stem in (("train", *arrays[:2], _IDX_FILES[0]), ("test", *arrays[2:], _IDX_FILES[2])):
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise DatasetError(f"{name} {split}: {path(stem)} holds images {images.shape} but labels {labels.shape}; "
                                   "expected (N, 28, 28) and (N,)")
            splits.append((torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))))
            _check_labels(name, split, splits[-1][1], 10, folder)
        return Dataset(name, *splits[0], *splits[1], 10, 1.0 / 255.0)

    return load


# SVHN: the official cropped-digit MATLAB files; X is (32, 32, 3, N), y is (N, 1) with 10 meaning digit 0.
_SVHN_SOURCE = _Source(
    ("http://ufldl.stanford.edu/housenumbers/",),
    (("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"), ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3")),
)


def _read_svhn(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(path)
        images = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1))  # -> N, C, H, W
        labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10
    except (OSError, ValueError, KeyError, TypeError, MatReadError) as error:
        raise DatasetError(f"{path}: not a readable SVHN .mat file ({type(error).__name__}: {error})") from None
    if images.shape[1:] != (3, 32, 32) or len(images) != len(labels):
        raise DatasetError(f"{path}: X is {images.shape} (N, C, H, W) with {len(labels)} labels; expected (N, 3, 32, 32)")
    return torch.from_numpy(images), torch.from_numpy(labels)


def _load_svhn(data_dir: Path, download: bool, name: str = "svhn") -> Dataset:
    folder = data_dir / "svhn"
    missing = [folder / file for file, _ in _SVHN_SOURCE.files if not (folder / file).is_file()]
    if missing:
        _obtain(name, _SVHN_SOURCE, data_dir, folder, missing[0], download)
    train = _read_svhn(folder / "train_32x32.mat")
    test = _read_svhn(folder / "test_32x32.mat")
    return Dataset(name, *train, *test, 10, 1.0 / 255.0)


def _gray28(images: torch.Tensor) -> torch.Tensor:
    """Colour 32x32 -> grayscale 28x28 (ITU-R 601 luma, area resampling), in chunks to bound memory."""
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    out = torch.empty((len(images), 1, 28, 28), dtype=torch.uint8)
    for start in range(0, len(images), 8192):
        gray = (images[start:start + 8192].float() * luma).sum(1, keepdim=True)
        out[start:start + 8192] = torch.nn.functional.interpolate(gray, size=(28, 28), mode="area").round().clamp(0, 255)
    return out


def _load_svhn28(data_dir: Path, download: bool) -> Dataset:
    """SVHN in MNIST's shape, as seed 004 used it: its MLP sizes count 784 inputs (28x28x1)."""
    svhn = _load_svhn(data_dir, download, name="svhn28")
    return Dataset("svhn28", _gray28(svhn.train_images), svhn.train_labels, _gray28(svhn.test_images),
                   svhn.test_labels, 10, 1.0 / 255.0)


# notMNIST: letter glyphs A-J as 28x28 PNGs in one folder per letter; no test split, no checksummed host.
_LETTERS = "ABCDEFGHIJ"
_NOTMNIST_SOURCE = _Source(manual=(
    "download notMNIST_small.tar.gz (http://yaroslavvb.com/upload/notMNIST/) and extract it into {data_dir}, "
    "so that {folder} holds the folders A..J (or put A..J directly into {data_dir})"
))


def _load_notmnist(data_dir: Path, _download: bool) -> Dataset:
    from PIL import Image

    roots = [r for r in (data_dir / "notMNIST_small", data_dir) if all((r / c).is_dir() for c in _LETTERS)]
    if not roots:
        folder = data_dir / "notMNIST_small"
        missing = next(folder / c for c in _LETTERS if not (folder / c).is_dir())
        _obtain("notmnist", _NOTMNIST_SOURCE, data_dir, folder, missing, False)
    images, labels, skipped = [], [], []
    for label, letter in enumerate(_LETTERS):
        before = len(labels)
        for path in sorted((roots[0] / letter).glob("*.png")):
            try:
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("L"), dtype=np.uint8)
            except (OSError, ValueError, SyntaxError):  # the real set holds a few empty or truncated PNGs
                skipped.append(path)
                continue
            if pixels.shape != (28, 28):
                skipped.append(path)
                continue
            images.append(pixels)
            labels.append(label)
        if len(labels) == before:
            raise DatasetError(f"notmnist: no readable 28x28 PNG in {roots[0] / letter}; every letter A..J needs images")
    if skipped:
        warnings.warn(f"notmnist: skipped {len(skipped)} unreadable or non-28x28 PNG file(s) in {roots[0]}, "
                      f"e.g. {skipped[0]}", stacklevel=2)
    stacked = torch.from_numpy(np.stack(images)).unsqueeze(1)
    return Dataset("notmnist", *_hold_out(stacked, torch.tensor(labels, dtype=torch.int64), 0.2), 10, 1.0 / 255.0)


# ImageNet32 (Chrabaszcz et al. 2017): npz batches, 'data' N x 3072 uint8 (CIFAR's channel-major order),
# 'labels' 1..1000. Behind an image-net.org login, so never downloaded.
_IMAGENET32_TRAIN = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))
_IMAGENET32_VAL = "val_data.npz"
_IMAGENET32_SOURCE = _Source(manual=(
    "ImageNet32 needs an image-net.org login: download Imagenet32_train_npz.zip and Imagenet32_val_npz.zip "
    "(Downsampled ImageNet 32x32, https://image-net.org/download-images.php) and unzip both into {folder}"
))


def _imagenet32_path(folder: Path, file: str) -> Path:
    """Files may lie flat in the folder or in the subfolders the official zips unpack to."""
    for sub in ("", "Imagenet32_train_npz", "Imagenet32_val_npz"):
        if (folder / sub / file).is_file():
            return folder / sub / file
    return folder / file


def _read_npz_batches(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    def read(path: Path, key: str) -> np.ndarray:
        try:
            with np.load(path) as batch:
                return np.asarray(batch[key])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise DatasetError(f"{path}: not a readable ImageNet32 batch ({type(error).__name__}: {error})") from None

    # Labels first, to size one image tensor: the train set is 3.9 GB and concatenating would double that.
    labels = [torch.from_numpy(read(p, "labels").reshape(-1).astype(np.int64) - 1) for p in paths]
    images = torch.empty((sum(map(len, labels)), 3, 32, 32), dtype=torch.uint8)
    start = 0
    for path, batch_labels in zip(paths, labels):
        data = read(path, "data")
        if data.dtype != np.uint8 or data.shape != (len(batch_labels), 3072):
            raise DatasetError(f"{path}: data is {data.dtype} {data.shape} for {len(batch_labels)} labels; "
                               f"expected uint8 ({len(batch_labels)}, 3072)")
        images[start:start + len(data)] = torch.from_numpy(data.reshape(-1, 3, 32, 32))
        start += len(data)
    return images, torch.cat(labels)


def _load_imagenet32(data_dir: Path, _download: bool) -> Dataset:
    folder = data_dir / "imagenet32"
    train_paths = [_imagenet32_path(folder, f) for f in _IMAGENET32_TRAIN]
    val_path = _imagenet32_path(folder, _IMAGENET32_VAL)
    missing = [p for p in (*train_paths, val_path) if not p.is_file()]
    if missing:
        _obtain("imagenet32", _IMAGENET32_SOURCE, data_dir, folder, missing[0], False)
    train_images, train_labels = _read_npz_batches(train_paths)
    test_images, test_labels = _read_npz_batches([val_path])  # the official validation set serves as test set
    _check_labels("imagenet32", "train", train_labels, 1000, folder)
    _check_labels("imagenet32", "val", test_labels, 1000, folder)
    return Dataset("imagenet32", train_images, train_labels, test_images, test_labels, 1000, 1.0 / 255.0)


_DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, (1, 8, 8), False, _load_digits,
                          "scikit-learn's bundled 8x8 digits; no download (the embedded default)"),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), True, _cifar_loader("cifar10"),
                           "CIFAR-10, 50k train / 10k test 32x32 colour images"),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), True, _cifar_loader("cifar100"),
                            "CIFAR-100, 50k train / 10k test 32x32 colour images"),
    # Digits and glyphs are not mirror-symmetric: no flip augmentation by default.
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), False, _mnist_loader("mnist", "mnist"),
                         "MNIST handwritten digits, 60k train / 10k test 28x28 grayscale (idx files)"),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, (1, 28, 28), False, _mnist_loader("fashion_mnist", "fashion_mnist"),
                                 "Fashion-MNIST clothing, 60k train / 10k test 28x28 grayscale (idx files)"),
    "svhn": DatasetInfo("svhn", 10, (3, 32, 32), False, _load_svhn,
                        "SVHN cropped digits, 73,257 train / 26,032 test 32x32 colour images (.mat files)"),
    "svhn28": DatasetInfo("svhn28", 10, (1, 28, 28), False, _load_svhn28,
                          "SVHN converted to MNIST's 28x28 grayscale, as seed 004 used it (same .mat files)"),
    "notmnist": DatasetInfo("notmnist", 10, (1, 28, 28), False, _load_notmnist,
                            "notMNIST letters A-J, 28x28 grayscale PNG folders; seeded 20% test split; no download"),
    "imagenet32": DatasetInfo("imagenet32", 1000, (3, 32, 32), True, _load_imagenet32,
                              "ImageNet 32x32 (Chrabaszcz et al.), 1.28M train / 50k val npz batches; no download"),
}


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    if name not in _DATASETS:
        raise ConfigError(f"dataset={name!r}: unknown; allowed: {', '.join(dataset_names())}")
    return _DATASETS[name]


def default_data_dir() -> Path:
    return Path(os.environ.get("KDTUNE_DATA_DIR", Path.home() / ".cache" / "kdtune" / "data"))


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    info = dataset_info(name)
    dataset = info.load(Path(data_dir) if data_dir else default_data_dir(), download)
    dataset.default_augment = info.default_augment
    return dataset


# ---- image files: decoded the same way for in-memory folders and streamed ones ----------------------

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})


def decode_image(path: str, channels: int, size: tuple[int, int], resize: bool) -> np.ndarray:
    """One image file as uint8 (C, H, W): grayscale for 1 channel, RGB for 3; resized to `size` (H, W) when
    `resize`, else it must already be that size. One decoder for both paths keeps their pixels identical."""
    from PIL import Image

    height, width = size
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (width, height):
                if not resize:
                    raise DatasetError(f"{path}: is {image.size[1]}x{image.size[0]} but the dataset's images are "
                                       f"{height}x{width} (height x width); pass image_size (--image-size) to resize")
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except DatasetError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{path}: not a readable image ({type(error).__name__}: {error})") from None
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def default_workers(workers: int | None = None) -> int:
    """DataLoader worker processes for streamed data: as asked, else min(4, CPU count)."""
    if workers is None:
        return min(4, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers={workers!r}: must be a whole number >= 0 (0 decodes in the training process)")
    return workers


@dataclass
class StreamedDataset(_Samples):
    """Image files too large to hold decoded: paths and labels in memory, pixels decoded on demand.

    It pickles to its paths, labels and a few numbers (Ray ships it to every trial), so it must never hold
    pixels; `channel_stats` results are cached here and travel with it, so computing them once in the driver
    saves every trial a pass over the files.
    """

    name: str
    train_files: tuple[str, ...]
    train_labels: torch.Tensor
    test_files: tuple[str, ...]
    test_labels: torch.Tensor
    num_classes: int
    sample_shape: tuple[int, int, int]
    resize: bool = False
    scale: float = 1.0 / 255.0
    classes: tuple[str, ...] | None = None
    default_augment: str = ""
    _stats: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.sample_shape)

    in_memory = False

    def channel_stats(self, indices: torch.Tensor, workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std in [0, 1] units over the given training files: one pass, then cached."""
        indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
        key = hashlib.sha1(indices.numpy().tobytes()).hexdigest()
        if key not in self._stats:
            self._stats[key] = self._measure(indices, workers)
        mean, std = self._stats[key]
        return mean.clone(), std.clone()

    def _measure(self, indices: torch.Tensor, workers: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        channels = self.sample_shape[0]
        total = torch.zeros(channels, dtype=torch.float64)
        squares = torch.zeros(channels, dtype=torch.float64)
        loader, order = _file_loader(self, "train", default_workers(workers), pin=False, persistent=False)
        order.set(indices, 256)
        for raw, _, _ in _checked(loader):
            values = raw.double() * self.scale
            total += values.sum(dim=(0, 2, 3))
            squares += (values * values).sum(dim=(0, 2, 3))
        count = len(indices) * self.sample_shape[1] * self.sample_shape[2]
        mean = total / count
        variance = (squares - count * mean * mean) / max(1, count - 1)  # unbiased, as torch.std
        return mean.float(), variance.clamp_min(0).sqrt().float().clamp_min(1e-6)

    def example(self, n: int = 2) -> torch.Tensor:
        """The first n test images as float32 in [0, 1] units: what a served model takes."""
        files = _FileBatches(self, "test")
        raw, _, _, error = files[list(range(min(n, len(self.test_files))))]
        if error:
            raise DatasetError(error)
        return raw.float() * self.scale


class _FileBatches(torch.utils.data.Dataset):
    """Decodes a whole batch of one split's files per request, so a worker returns one tensor per batch.

    A decoding error comes back as text (the fourth item) rather than an exception: an exception raised in a
    DataLoader worker reaches the user wrapped in a worker traceback, the text becomes one DatasetError line.
    """

    def __init__(self, dataset: StreamedDataset, split: str):
        self.files = getattr(dataset, f"{split}_files")
        self.labels = getattr(dataset, f"{split}_labels")
        self.shape = tuple(dataset.sample_shape)
        self.resize = dataset.resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, batch: list[int]):
        out = np.empty((len(batch), *self.shape), dtype=np.uint8)
        try:
            for row, index in enumerate(batch):
                out[row] = decode_image(self.files[index], self.shape[0], self.shape[1:], self.resize)
        except DatasetError as error:
            return torch.empty(0), torch.empty(0), torch.empty(0), str(error)
        index = torch.tensor(batch, dtype=torch.int64)
        return torch.from_numpy(out), self.labels[index], index, ""


class _Order(torch.utils.data.Sampler):
    """Yields batches of sample indices in an order set before each pass; a persistent DataLoader keeps one
    sampler, so the order is set on it rather than passed in."""

    def __init__(self):
        self.order: list[int] = []
        self.batch_size = 1

    def set(self, order: torch.Tensor, batch_size: int) -> None:
        self.order, self.batch_size = order.tolist(), batch_size

    def __iter__(self):
        order, size = self.order, self.batch_size
        return iter([order[start:start + size] for start in range(0, len(order), size)])

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)


def _file_loader(dataset: StreamedDataset, split: str, workers: int, pin: bool, persistent: bool):
    order = _Order()
    loader = torch.utils.data.DataLoader(
        _FileBatches(dataset, split), batch_size=None, sampler=order, num_workers=workers, pin_memory=pin,
        persistent_workers=persistent and workers > 0,
        generator=torch.Generator(),  # its worker seeds come from here, not from the global RNG a trial seeds
    )
    return loader, order


def _checked(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    for raw, labels, index, error in loader:
        if error:
            raise DatasetError(error)
        yield raw, labels, index


# ---- batches on the device ------------------------------------------------------------------------

_DEVICE_COPIES: dict[tuple[int, str, str], tuple[torch.Tensor, ...]] = {}


def _device_copy(dataset: Dataset, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One device copy of a split per (dataset object, device), shared by every view of it.

    The train and validation views both index the training samples; copying them per view doubled the
    device memory a trial needed. The entry goes when the dataset object is garbage-collected, and is
    renewed if the dataset's tensors were replaced.
    """
    images, labels = getattr(dataset, f"{split}_images"), getattr(dataset, f"{split}_labels")
    key = (id(dataset), str(torch.device(device)), split)
    entry = _DEVICE_COPIES.get(key)
    if entry is None or entry[0] is not images or entry[1] is not labels:
        if entry is None:
            weakref.finalize(dataset, _DEVICE_COPIES.pop, key, None)
        entry = (images, labels, images.to(device), labels.to(device))
        _DEVICE_COPIES[key] = entry
    return entry[2], entry[3]


def _as_augment(augment, sample_shape: tuple[int, ...]) -> Augment | None:
    """An Augment, a recipe string, None, or a bool (True = crop:4,flip, what augment=True always meant)."""
    if augment is None or augment is False:
        return None
    if augment is True:
        return parse_augment(DEFAULT_IMAGE_AUGMENT, sample_shape)
    return parse_augment(augment, sample_shape)


class _Split:
    """What both kinds of batch source share: normalisation folded into one multiply-add, then augment."""

    indices: torch.Tensor

    def _setup(self, dataset, mean, std, device, augment) -> None:
        self.device = torch.device(device)
        self.augment = _as_augment(augment, dataset.input_shape)
        self.sample_shape = self.augment.output_shape(dataset.input_shape) if self.augment else dataset.input_shape
        rank = len(dataset.input_shape)
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        # x_norm = (x_raw * scale - mean) / std = x_raw * a + b, per entry of dim 1
        self._mul = _per_channel(dataset.scale / std, rank).to(self.device)
        self._add = _per_channel(-mean / std, rank).to(self.device)

    def __len__(self) -> int:
        return len(self.indices)

    def _order(self, generator: torch.Generator | None, batch_size: int) -> torch.Tensor:
        """The samples in batch order: as stored for evaluation; shuffled for training (a generator given),
        where a last batch of a single sample is left out: BatchNorm cannot train on one sample (a torchvision
        ResNet fails on it), and one sample of a reshuffled epoch is a negligible loss."""
        if generator is None:
            return self.indices
        order = self.indices[torch.randperm(len(self.indices), generator=generator).to(self.indices.device)]
        return order[:-1] if len(order) % batch_size == 1 and len(order) > 1 else order

    def _prepare(self, raw: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        images = raw.float() * self._mul + self._add
        return self.augment(images, generator) if self.augment else images


class DeviceData(_Split):
    """One split of an in-memory dataset on the training device, cut into normalised (and augmented) batches."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 device: torch.device, augment=None):
        _require_in_memory(dataset)
        self.images, self.labels = _device_copy(dataset, "train", device)
        self.indices = torch.as_tensor(indices, dtype=torch.int64).to(device)
        self._setup(dataset, mean, std, device, augment)

    @classmethod
    def test_split(cls, dataset: Dataset, mean, std, device) -> "DeviceData":
        _require_in_memory(dataset)
        self = cls.__new__(cls)
        self.images, self.labels = _device_copy(dataset, "test", device)
        self.indices = torch.arange(len(self.labels), device=device)
        self._setup(dataset, mean, std, device, None)
        return self

    def batches(self, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (samples, labels, sample indices); shuffled when a generator is given."""
        order = self._order(generator, batch_size)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            yield self._prepare(self.images[index], generator), self.labels[index], index


class StreamingData(_Split):
    """One split of a streamed dataset: batches decoded by DataLoader workers, then normalised and augmented
    on the device exactly as DeviceData does, in the same order for the same generator.

    The permutation is drawn from the generator in this process, the same way DeviceData draws it, and fed to
    the workers as a batch order; the augmentation then draws from the same generator per batch, so both
    paths consume the generator identically.
    """

    def __init__(self, dataset: StreamedDataset, indices: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 device: torch.device, augment=None, workers: int | None = None, split: str = "train",
                 persistent: bool = True):
        self.indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
        self._setup(dataset, mean, std, device, augment)
        self._pin = self.device.type == "cuda"
        self._loader, self._sampler = _file_loader(dataset, split, default_workers(workers), self._pin, persistent)

    @classmethod
    def test_split(cls, dataset: StreamedDataset, mean, std, device, workers: int | None = None) -> "StreamingData":
        indices = torch.arange(len(dataset.test_labels))
        return cls(dataset, indices, mean, std, device, workers=workers, split="test", persistent=False)

    def batches(self, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (samples, labels, sample indices); shuffled when a generator is given."""
        self._sampler.set(self._order(generator, batch_size), batch_size)
        move = dict(device=self.device, non_blocking=self._pin)
        for raw, labels, index in _checked(self._loader):
            yield self._prepare(raw.to(**move), generator), labels.to(**move), index.to(**move)


def _require_in_memory(dataset) -> None:
    if not getattr(dataset, "in_memory", True):
        raise ConfigError(f"dataset {dataset.name!r} is streamed from files; cut its batches with "
                          "kdtune.data.batch_source / test_source, not DeviceData")


def batch_source(dataset: Dataset | StreamedDataset, indices: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 device: torch.device, augment=None, workers: int | None = None) -> DeviceData | StreamingData:
    """Batches of the given training samples: from device memory, or decoded from files for a streamed set."""
    if dataset.in_memory:
        return DeviceData(dataset, indices, mean, std, device, augment=augment)
    return StreamingData(dataset, indices, mean, std, device, augment=augment, workers=workers)


def test_source(dataset: Dataset | StreamedDataset, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                workers: int | None = None) -> DeviceData | StreamingData:
    """Batches of the test split, never augmented."""
    if dataset.in_memory:
        return DeviceData.test_split(dataset, mean, std, device)
    return StreamingData.test_split(dataset, mean, std, device, workers=workers)


test_source.__test__ = False  # not a test, though pytest collects test_* names imported into test modules


def crop_and_flip(images: torch.Tensor, padding: int, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per sample, vectorised on the device.

    The same transform as the recipe "crop:P,flip" (kdtune.augment), drawing the same random numbers.
    """
    from kdtune.augment import Crop

    return Crop(padding, flip=True)(images, generator)
