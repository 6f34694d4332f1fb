"""Augmentation recipes: a short text ("crop:4,flip") parsed once into a picklable, batch-level transform.

Why text: a recipe is a hyperparameter. It travels in a trial's config, in MLflow params and in a search
space, so it must be a plain value; parsing it in the driver turns a typo into one ConfigError before any
trial starts. Why batch-level: every step works on a whole batch on the training device (one gather or one
grid_sample per batch), never per sample in Python. All randomness is drawn on the CPU from the caller's
`torch.Generator`, so a run is reproducible on any device and the in-memory and streamed paths, fed the
same generator, augment identically.

Steps, applied left to right:
  crop:P                 zero-pad P pixels on each side, random crop back to the original size
  flip                   random horizontal flip, p = 0.5
  random_resized_crop:S  random area (8-100 %) and aspect ratio (3/4-4/3) crop, resized to S x S (bilinear)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdtune.errors import ConfigError

ALLOWED_STEPS = ("crop:P (zero-pad P pixels, random crop back), flip (random horizontal flip), "
                 "random_resized_crop:S (random area/aspect crop resized to S x S)")
DEFAULT_IMAGE_AUGMENT = "crop:4,flip"  # what augment=True meant before recipes existed


def _draw(*shape: int, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) on the CPU: the generator is a CPU generator whatever the batch's device."""
    return torch.rand(shape, generator=generator)


# ---- steps: each knows its output shape and transforms a float batch (N, C, H, W) on its device ---------

@dataclass(frozen=True)
class Crop:
    """Zero padding + random crop; with `flip` also the horizontal flip, fused into the same gather.

    The fused form draws offsets then flips, exactly as `kdtune.data.crop_and_flip` always did, so a recipe
    "crop:4,flip" reproduces earlier runs sample for sample.
    """

    padding: int
    flip: bool = False

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        n, channels, height, width = images.shape
        device, p = images.device, self.padding
        padded = torch.nn.functional.pad(images, (p, p, p, p))
        offsets = torch.randint(0, 2 * p + 1, (2, n), generator=generator).to(device)
        rows = (offsets[0].view(n, 1) + torch.arange(height, device=device)).view(n, 1, height, 1)
        cols = offsets[1].view(n, 1) + torch.arange(width, device=device)
        if self.flip:
            flips = (_draw(n, generator=generator) < 0.5).to(device)
            cols = torch.where(flips.view(n, 1), cols.flip(1), cols)
        batch = torch.arange(n, device=device).view(n, 1, 1, 1)
        channel = torch.arange(channels, device=device).view(1, channels, 1, 1)
        return padded[batch, channel, rows, cols.view(n, 1, 1, width)]


@dataclass(frozen=True)
class Flip:
    """Random horizontal flip of whole samples, p = 0.5."""

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        flips = (_draw(len(images), generator=generator) < 0.5).to(images.device)
        return torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)


@dataclass(frozen=True)
class RandomResizedCrop:
    """Inception-style crop, vectorised: boxes drawn per sample, one affine_grid + grid_sample per batch.

    Like torchvision, each sample tries 10 (area, log-ratio) draws and keeps the first box that fits; a
    sample whose 10 draws all miss takes the central crop with the ratio clamped to the allowed range.
    Unlike torchvision there is no antialiasing when shrinking (bilinear sampling of the box).
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    attempts: int = 10

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0], self.size, self.size)

    def boxes(self, n: int, height: int, width: int, generator: torch.Generator | None) -> torch.Tensor:
        """(n, 4) float boxes (top, left, box height, box width) in pixels."""
        draws = _draw(2, n, self.attempts, generator=generator)
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * draws[0])
        low, high = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(low + (high - low) * draws[1])
        box_w = torch.sqrt(area * aspect).round()
        box_h = torch.sqrt(area / aspect).round()
        fits = (box_w >= 1) & (box_w <= width) & (box_h >= 1) & (box_h <= height)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)
        box_w, box_h = box_w.gather(1, first)[:, 0], box_h.gather(1, first)[:, 0]
        fallback_h, fallback_w = self._central(height, width)
        found = fits.any(1)
        box_h = torch.where(found, box_h, torch.tensor(float(fallback_h)))
        box_w = torch.where(found, box_w, torch.tensor(float(fallback_w)))
        where = _draw(2, n, generator=generator)
        top = torch.where(found, (where[0] * (height - box_h + 1)).floor(), (height - box_h) // 2)
        left = torch.where(found, (where[1] * (width - box_w + 1)).floor(), (width - box_w) // 2)
        return torch.stack([top, left, box_h, box_w], dim=1)

    def _central(self, height: int, width: int) -> tuple[int, int]:
        aspect = width / height
        if aspect < self.ratio[0]:
            return int(round(width / self.ratio[0])), width
        if aspect > self.ratio[1]:
            return height, int(round(height * self.ratio[1]))
        return height, width

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        n, channels, height, width = images.shape
        top, left, box_h, box_w = self.boxes(n, height, width, generator).unbind(1)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = box_w / width
        theta[:, 0, 2] = (2 * left + box_w) / width - 1
        theta[:, 1, 1] = box_h / height
        theta[:, 1, 2] = (2 * top + box_h) / height - 1
        theta = theta.to(device=images.device, dtype=images.dtype)
        grid = torch.nn.functional.affine_grid(theta, [n, channels, self.size, self.size], align_corners=False)
        return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                                               align_corners=False)


@dataclass(frozen=True)
class Augment:
    """A parsed recipe: `text` is its canonical spelling (what MLflow logs), `steps` run left to right."""

    text: str
    steps: tuple

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for step in self.steps:
            batch = step(batch, generator)
        return batch

    def output_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = tuple(sample_shape)
        for step in self.steps:
            shape = step.output_shape(shape)
        return shape

    def __str__(self) -> str:
        return self.text


# ---- parsing ----------------------------------------------------------------------------------------

def _whole(text: str, step: str, value: str, minimum: int, meaning: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ConfigError(f"augment={text!r}: {step}:{value} needs {meaning}, an integer >= {minimum}; "
                          f"allowed steps: {ALLOWED_STEPS}")
    return number


def _step(text: str, item: str):
    name, _, value = item.partition(":")
    if name == "crop" and value:
        return Crop(_whole(text, name, value, 0, "the padding in pixels"))
    if name == "flip" and not value:
        return Flip()
    if name == "random_resized_crop" and value:
        return RandomResizedCrop(_whole(text, name, value, 1, "the output size in pixels"))
    if name in ("crop", "random_resized_crop", "flip"):
        needs = "takes no number" if name == "flip" else "needs a number"
        raise ConfigError(f"augment={text!r}: step {item!r} {needs}; allowed steps: {ALLOWED_STEPS}")
    raise ConfigError(f"augment={text!r}: unknown step {item!r}; allowed steps: {ALLOWED_STEPS}")


def _fuse(steps: list) -> tuple:
    """crop followed by flip -> one gather drawing randomness in crop_and_flip's order."""
    fused: list = []
    for step in steps:
        if isinstance(step, Flip) and fused and isinstance(fused[-1], Crop) and not fused[-1].flip:
            fused[-1] = Crop(fused[-1].padding, flip=True)
        else:
            fused.append(step)
    return tuple(fused)


def parse_augment(text, sample_shape: tuple[int, ...]) -> Augment | None:
    """The recipe `text` for samples of `sample_shape`; None when it asks for no augmentation.

    None, "" and "none" mean no augmentation. Every step needs image samples (C, H, W): on signals or
    feature vectors a crop or flip has no meaning, so it is refused rather than silently skipped.
    """
    if isinstance(text, Augment):
        text = text.text
    if text is None or not str(text).strip() or str(text).strip().lower() == "none":
        return None
    if not isinstance(text, str):
        raise ConfigError(f"augment={text!r}: expected a recipe string such as 'crop:4,flip'; "
                          f"allowed steps: {ALLOWED_STEPS}")
    items = [item.strip() for item in text.strip().split(",")]
    steps = [_step(text, item) for item in items]
    shape = tuple(int(d) for d in sample_shape)
    if len(shape) != 3:
        raise ConfigError(f"augment={text!r}: needs image samples (C, H, W); this dataset's samples are {shape}")
    return Augment(",".join(items), _fuse(steps))
