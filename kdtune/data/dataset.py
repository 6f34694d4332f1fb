"""The in-memory dataset type, its checked construction from arrays, and the seeded train/validation split."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kdtune.augment import DEFAULT_IMAGE_AUGMENT
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
