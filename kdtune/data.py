"""Datasets as in-memory tensors, cut into batches on the training device.

A dataset is loaded once (on the study driver), held as uint8 image tensors plus labels, and shipped to trials
through the Ray object store. Inside a trial the images move to the training device once; every batch is cut
by index, converted to float, augmented (random crop with padding + horizontal flip, vectorised) and
normalised on that device. No DataLoader workers, no per-sample Python.

Each batch carries its sample indices, so per-sample caches (teacher logits) are keyed by index, never by
position in a shuffled order.
"""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import socket
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from kdtune.cluster import staging_lock
from kdtune.errors import ConfigError, DatasetError

SPLIT_SEED = 20240611  # fixed: every trial of every study validates on the same samples


@dataclass
class Dataset:
    """Images as uint8 (N, C, H, W); `scale` maps stored values to [0, 1]."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    scale: float

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def split(self, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded train/validation split of the training set: (train indices, validation indices)."""
        n = len(self.train_labels)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
        n_val = max(1, int(round(n * val_fraction)))
        return order[n_val:].sort().values, order[:n_val].sort().values

    def channel_stats(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std in [0, 1] units, computed on the given training samples."""
        images = self.train_images[indices].float() * self.scale
        mean = images.mean(dim=(0, 2, 3))
        std = images.std(dim=(0, 2, 3)).clamp_min(1e-6)
        return mean, std


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    augment_by_default: bool
    load: Callable[[Path, bool], Dataset]
    description: str


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
    return info.load(Path(data_dir) if data_dir else default_data_dir(), download)


# ---- batches on the device ------------------------------------------------------------------------

class DeviceData:
    """One split of a dataset on the training device, cut into normalised (and augmented) batches."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 device: torch.device, augment: bool = False):
        self.indices = indices.to(device)
        self.images = dataset.train_images.to(device)
        self.labels = dataset.train_labels.to(device)
        self._setup(dataset.scale, mean, std, device, augment)

    @classmethod
    def test_split(cls, dataset: Dataset, mean, std, device) -> "DeviceData":
        self = cls.__new__(cls)
        self.images = dataset.test_images.to(device)
        self.labels = dataset.test_labels.to(device)
        self.indices = torch.arange(len(self.labels), device=device)
        self._setup(dataset.scale, mean, std, device, False)
        return self

    def _setup(self, scale, mean, std, device, augment):
        self.device = device
        self.augment = augment
        # Fold the [0,1] scale into the normalisation: x_norm = x_raw * a + b, per channel.
        self._mul = (scale / std).to(device).view(1, -1, 1, 1)
        self._add = (-mean / std).to(device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (images, labels, sample indices); shuffled when a generator is given."""
        order = self.indices
        if generator is not None:
            order = order[torch.randperm(len(order), generator=generator).to(self.device)]
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            images = self.images[index].float() * self._mul + self._add
            if self.augment:
                images = crop_and_flip(images, padding=4, generator=generator)
            yield images, self.labels[index], index


def crop_and_flip(images: torch.Tensor, padding: int, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per sample, vectorised on the device."""
    n, channels, height, width = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(device)
    flips = (torch.rand(n, generator=generator) < 0.5).to(device)
    rows = (offsets[0].view(n, 1) + torch.arange(height, device=device)).view(n, 1, height, 1)
    cols = offsets[1].view(n, 1) + torch.arange(width, device=device)
    cols = torch.where(flips.view(n, 1), cols.flip(1), cols).view(n, 1, 1, width)
    batch = torch.arange(n, device=device).view(n, 1, 1, 1)
    channel = torch.arange(channels, device=device).view(1, channels, 1, 1)
    return padded[batch, channel, rows, cols]
