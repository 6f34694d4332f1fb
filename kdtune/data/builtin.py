"""The built-in datasets (digits, CIFAR, MNIST, SVHN, notMNIST, ImageNet32): their readers, registry and loading."""
from __future__ import annotations

import gzip
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kdtune.data.dataset import SPLIT_SEED, Dataset, DatasetInfo
from kdtune.data.download import _obtain, _Source
from kdtune.errors import ConfigError, DatasetError

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
