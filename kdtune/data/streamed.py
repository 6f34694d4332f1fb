"""Image files decoded on demand: the one image decoder, the streamed dataset type and its DataLoader batches."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from kdtune.data.dataset import _Samples
from kdtune.errors import ConfigError, DatasetError

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
