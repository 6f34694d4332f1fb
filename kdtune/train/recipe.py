"""What a TrialConfig's training recipe builds: the student's optimiser, its LR schedule, the training augmentation."""
from __future__ import annotations

import torch

from kdtune.augment import parse_augment
from kdtune.config import TrialConfig
from kdtune.data import Dataset
from kdtune.errors import ConfigError


def build_optimizer(parameters, config: TrialConfig) -> torch.optim.Optimizer:
    """The student's optimiser (config.optimizer): SGD with momentum (the seeds' recipes), Adam, or AdamW
    (decoupled weight decay), each at config.lr; StepLR schedules all three."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    kind = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return kind(parameters, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrialConfig) -> torch.optim.lr_scheduler.StepLR:
    """The stage's LR schedule: StepLR, x config.lr_gamma every config.lr_step_epochs epochs."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step_epochs, gamma=config.lr_gamma)


def training_augmentation(config: TrialConfig, dataset: Dataset):
    """The trial's augmentation (None: none): its recipe, or the dataset's default; checked against the samples."""
    augment = parse_augment(config.augment_recipe(dataset.default_augment), dataset.input_shape)
    if augment is not None and tuple(augment.output_shape(dataset.input_shape)) != tuple(dataset.input_shape):
        raise ConfigError(f"augment={config.augment_recipe(dataset.default_augment)!r}: turns samples of shape "
                          f"{tuple(dataset.input_shape)} into {tuple(augment.output_shape(dataset.input_shape))}, "
                          "but validation and test samples keep their shape; crop to the dataset's size "
                          "(e.g. random_resized_crop:224 with --image-size 224)")
    return augment
