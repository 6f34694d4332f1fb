"""Training and test batch sources on the device: normalised, augmented batches from memory or streamed files."""
from __future__ import annotations

import weakref
from typing import Iterator

import torch

from kdtune.augment import DEFAULT_IMAGE_AUGMENT, Augment, parse_augment
from kdtune.data.dataset import Dataset, _per_channel
from kdtune.data.streamed import StreamedDataset, _checked, _file_loader, default_workers
from kdtune.errors import ConfigError

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
