"""Datasets as in-memory tensors, cut into batches on the training device.

A dataset is loaded once (on the study driver), held as uint8 image tensors plus labels, and shipped to trials
through the Ray object store. Inside a trial the images move to the training device once; every batch is cut
by index, converted to float, augmented (random crop with padding + horizontal flip, vectorised) and
normalised on that device. No DataLoader workers, no per-sample Python.

Each batch carries its sample indices, so per-sample caches (teacher logits) are keyed by index, never by
position in a shuffled order.
"""
from __future__ import annotations

import os
import pickle
import shutil
import socket
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

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


# ---- loaders --------------------------------------------------------------------------------------

def _load_digits(_data_dir: Path, _download: bool) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0-16); 20% held out as test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8), 0..16
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(0.2 * len(labels)))
    test, train = order[:n_test].sort().values, order[n_test:].sort().values
    return Dataset("digits", images[train], labels[train], images[test], labels[test], 10, 1.0 / 16.0)


@dataclass(frozen=True)
class _CifarFiles:
    folder: str
    archive: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int


_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_CIFAR = {
    "cifar10": _CifarFiles(
        "cifar-10-batches-py", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels", 10,
    ),
    "cifar100": _CifarFiles(
        "cifar-100-python", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
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


def _download_cifar(files: _CifarFiles, data_dir: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    url = _CIFAR_URL + files.archive
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        download_and_extract_archive(url, download_root=str(data_dir), md5=files.md5)
    except Exception as error:  # offline, DNS, HTTP, checksum: all end in the same advice
        (data_dir / files.archive).unlink(missing_ok=True)
        shutil.rmtree(data_dir / files.folder, ignore_errors=True)
        raise DatasetError(
            f"could not download {url} ({type(error).__name__}: {error}); on a machine without internet, "
            f"download {files.archive} elsewhere and extract it into {data_dir} "
            f"(so that {data_dir / files.folder} exists), then run again"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _cifar_loader(name: str) -> Callable[[Path, bool], Dataset]:
    files = _CIFAR[name]

    def load(data_dir: Path, download: bool) -> Dataset:
        folder = data_dir / files.folder
        missing = [n for n in files.train_files + files.test_files if not (folder / n).is_file()]
        if missing:
            if not download:
                raise DatasetError(
                    f"{name}: {folder / missing[0]} not found and downloads are off; download "
                    f"{_CIFAR_URL + files.archive} and extract it into {data_dir} (so that {folder} exists)"
                )
            created = not data_dir.exists()
            data_dir.mkdir(parents=True, exist_ok=True)
            try:
                _download_cifar(files, data_dir)
            except DatasetError:
                if created and not any(data_dir.iterdir()):
                    data_dir.rmdir()  # leave nothing behind that we made
                raise
        train_images, train_labels = _read_cifar_batches(folder, files.train_files, files.label_key)
        test_images, test_labels = _read_cifar_batches(folder, files.test_files, files.label_key)
        for split, labels in (("train", train_labels), ("test", test_labels)):
            if labels.min() < 0 or labels.max() >= files.num_classes:
                raise DatasetError(f"{name} {split}: labels outside 0..{files.num_classes - 1} in {folder}")
        return Dataset(name, train_images, train_labels, test_images, test_labels, files.num_classes, 1.0 / 255.0)

    return load


_DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, (1, 8, 8), False, _load_digits,
                          "scikit-learn's bundled 8x8 digits; no download (the embedded default)"),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), True, _cifar_loader("cifar10"),
                           "CIFAR-10, 50k train / 10k test 32x32 colour images"),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), True, _cifar_loader("cifar100"),
                            "CIFAR-100, 50k train / 10k test 32x32 colour images"),
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
