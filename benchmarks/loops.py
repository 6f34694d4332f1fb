"""The three ways to train one distillation trial, each behind the same `epoch()`: (wall, CPU) seconds per step.

- kdtune: the engine (`Trainer`), batches cut from device-resident uint8 tensors, augmentation on the device.
- plain: a PyTorch loop written the way tutorials write it: a torchvision dataset of PIL images with
  transforms, a DataLoader with 2 workers, the teacher run under no_grad on every step, `loss.item()` per step.
- torchdistill: its DistillationBox (KDLoss inside WeightedSumLoss) over the same torchvision dataset.

All three train the same kdtune-built teacher and student on the same samples with the same batch size,
optimiser and loss weights; a StepClock on each optimizer gives steady-state seconds per step.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import StepClock
from kdtune import models
from kdtune.config import TrialConfig
from kdtune.data import Dataset
from kdtune.train.devices import pick_device
from kdtune.train.teacher_logits import teacher_logits_for
from kdtune.train.parts import teacher_network, trainer_for
from kdtune.distill import trial_config

VAL_FRACTION = 0.05


# ---- data ---------------------------------------------------------------------------------------------

def sized_dataset(name: str, train_images: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                  scale: float, n_train: int) -> Dataset:
    """A kdtune Dataset whose training split (after the validation cut) holds exactly `n_train` samples."""
    n = n_train
    while n - max(1, int(round(n * VAL_FRACTION))) < n_train:
        n += 1
    repeat = math.ceil(n / len(train_labels))
    images = train_images.repeat(repeat, 1, 1, 1)[:n]
    labels = train_labels.repeat(repeat)[:n]
    return Dataset(name, images, labels, train_images[:16], train_labels[:16], num_classes, scale)


def cifar_shaped(n_train: int, seed: int = 0) -> Dataset:
    """Random 3x32x32 uint8 images, 10 classes (speed only; nothing is learnt)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n_train,), generator=generator)
    return sized_dataset("cifar10", images, labels, 10, 1 / 255, n_train)


def digits_sized(n_train: int) -> Dataset:
    from kdtune.data import load_dataset

    digits = load_dataset("digits")
    return sized_dataset("digits", digits.train_images, digits.train_labels, 10, digits.scale, n_train)


def train_split(dataset: Dataset) -> tuple[np.ndarray, np.ndarray, list[float], list[float]]:
    """The kdtune training split as HWC uint8 arrays for PIL (values in 0..255), labels, mean and std."""
    train_idx, _ = dataset.split(VAL_FRACTION)
    images = dataset.train_images[train_idx].float() * dataset.scale  # [0, 1]
    mean = images.mean(dim=(0, 2, 3)).tolist()
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    arrays = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if arrays.shape[-1] == 1:
        arrays = arrays[..., 0]  # grayscale: PIL mode "L"
    return arrays, dataset.train_labels[train_idx].numpy(), mean, std


def vision_dataset(arrays, labels, mean, std, augment: bool):
    """A torchvision dataset exactly like torchvision.datasets.CIFAR10 (PIL image per sample, transforms)."""
    from PIL import Image
    from torchvision import transforms
    from torchvision.datasets import VisionDataset

    steps = []
    if augment:
        steps += [transforms.RandomCrop(arrays.shape[1], padding=4), transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]

    class ArrayImages(VisionDataset):
        def __init__(self):
            super().__init__(root=None, transform=transforms.Compose(steps))
            self.data, self.targets = arrays, [int(t) for t in labels]

        def __getitem__(self, index):
            image = Image.fromarray(self.data[index])
            return self.transform(image), self.targets[index]

        def __len__(self):
            return len(self.data)

    return ArrayImages()


# ---- the three loops -----------------------------------------------------------------------------------

class KdtuneLoop:
    def __init__(self, dataset: Dataset, teacher_state: dict | None, nchw: bool = False, **config):
        base = {"val_fraction": VAL_FRACTION, "epochs": 1000, "lr_step_epochs": 1000}
        self.config = trial_config({"dataset": dataset.name, **base, **config})
        logits = None
        if self.config.teacher_cache == "on":
            logits = teacher_logits_for(teacher_network(self.config.teacher, teacher_state, dataset), dataset, VAL_FRACTION)
        self.trainer = trainer_for(self.config, dataset, teacher_state, teacher_logits=logits)
        if nchw and getattr(self.trainer, "channels_last", False):  # ablation: the engine before channels_last
            self.trainer.channels_last = False
            for model in (self.trainer.student, self.trainer.teacher):
                if model is not None:
                    model.to(memory_format=torch.contiguous_format)
        self.clock = StepClock(self.trainer.optimizer)
        self.batch_size = self.config.batch_size

    def epoch(self) -> float:
        self.clock.reset()
        self.trainer.train_pass()  # the engine's training pass, without validation
        self.clock.stop()
        return self.clock.seconds_per_step(), self.clock.cpu_per_step()


def _kd_weights(config: TrialConfig) -> tuple[float, float, float]:
    return config.effective_hard_weight, config.alpha, config.temperature


class PlainLoop:
    def __init__(self, dataset: Dataset, teacher_state: dict | None, augment: bool, workers: int = 2, **config):
        self.config = trial_config({"dataset": dataset.name, "val_fraction": VAL_FRACTION, **config})
        self.device = pick_device()
        arrays, labels, mean, std = train_split(dataset)
        self.loader = torch.utils.data.DataLoader(vision_dataset(arrays, labels, mean, std, augment),
                                                  batch_size=self.config.batch_size, shuffle=True,
                                                  num_workers=workers)
        c = self.config
        self.teacher = None
        if c.method != "none":
            self.teacher = models.build_model(c.teacher, dataset.num_classes, dataset.input_shape)
            self.teacher.load_state_dict(teacher_state)
            self.teacher.to(self.device).eval()
        self.student = models.build_model(c.student, dataset.num_classes, dataset.input_shape).to(self.device)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=c.lr, momentum=c.momentum,
                                         weight_decay=c.weight_decay)
        self.clock = StepClock(self.optimizer)
        self.batch_size = c.batch_size

    def epoch(self) -> float:
        hard_weight, alpha, temperature = _kd_weights(self.config)
        self.clock.reset()
        self.student.train()
        running = 0.0
        for images, labels in self.loader:
            images, labels = images.to(self.device), labels.to(self.device)
            logits = self.student(images)
            loss = F.cross_entropy(logits, labels)
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(images)
                soft = F.kl_div(F.log_softmax(logits / temperature, dim=1),
                                F.softmax(teacher_logits / temperature, dim=1), reduction="batchmean")
                loss = hard_weight * loss + alpha * temperature**2 * soft
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            running += loss.item()
        self.clock.stop()
        return self.clock.seconds_per_step(), self.clock.cpu_per_step()


def torchdistill_version() -> str | None:
    try:
        from importlib.metadata import version

        import torchdistill  # noqa: F401
        return version("torchdistill")
    except Exception:
        return None


class TorchdistillLoop:
    """torchdistill's DistillationBox, driven the way its example image_classification.py drives it."""

    def __init__(self, dataset: Dataset, teacher_state: dict, augment: bool, workers: int = 2, **config):
        import logging

        from torchdistill.core.distillation import get_distillation_box

        logging.getLogger("torchdistill").setLevel(logging.WARNING)
        c = self.config = trial_config({"dataset": dataset.name, "val_fraction": VAL_FRACTION, **config})
        self.device = pick_device()
        arrays, labels, mean, std = train_split(dataset)
        teacher = models.build_model(c.teacher, dataset.num_classes, dataset.input_shape)
        teacher.load_state_dict(teacher_state)
        teacher.to(self.device).eval()
        student = models.build_model(c.student, dataset.num_classes, dataset.input_shape).to(self.device)
        hard_weight, alpha, temperature = _kd_weights(c)
        train_config = {
            "num_epochs": 1000,
            "train_data_loader": {
                "dataset_id": "train",
                "sampler": {"class_or_func": torch.utils.data.RandomSampler, "kwargs": None},
                "kwargs": {"batch_size": c.batch_size, "num_workers": workers, "drop_last": False},
            },
            "teacher": {"sequential": [], "requires_grad": False, "frozen_modules": [],
                        "forward_proc": "forward_batch_only"},
            "student": {"adaptations": None, "sequential": [], "requires_grad": True, "frozen_modules": [],
                        "forward_proc": "forward_batch_only"},
            "optimizer": {"key": "SGD", "kwargs": {"lr": c.lr, "momentum": c.momentum,
                                                   "weight_decay": c.weight_decay}},
            "scheduler": {"key": "StepLR", "kwargs": {"step_size": 1000, "gamma": c.lr_gamma}},
            "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
                "criterion": {"key": "KDLoss", "kwargs": {
                    "student_module_path": ".", "student_module_io": "output",
                    "teacher_module_path": ".", "teacher_module_io": "output",
                    # torchdistill: alpha * CE + beta * T^2 * KL
                    "temperature": temperature, "alpha": hard_weight, "beta": alpha, "reduction": "batchmean"}},
                "weight": 1.0}}}},
        }
        self.box = get_distillation_box(teacher, student, {"train": vision_dataset(arrays, labels, mean, std, augment)},
                                        train_config, self.device, None, False, 1.0)
        self.clock = StepClock(self.box.optimizer)
        self.batch_size = c.batch_size
        self._epoch = 0

    def epoch(self) -> float:
        self.clock.reset()
        box = self.box
        box.pre_epoch_process(epoch=self._epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            sample_batch, targets = sample_batch.to(self.device), targets.to(self.device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss)
            loss.item()  # its example logs the loss every step
        self._epoch += 1
        self.clock.stop()
        return self.clock.seconds_per_step(), self.clock.cpu_per_step()
