"""The fast paths compute what the straightforward computation computes.

kdtune's training step takes shortcuts for speed: batches cut from device-resident uint8 tensors with crop/flip
on the device, channels_last weights and activations, the teacher under inference_mode (or its logits from a
cache), bf16 autocast. Each test runs one real training step through the engine on one batch and checks its
loss terms (and the student weights after the step) against a plain computation on the same batch: fresh
NCHW fp32 models, the teacher called directly, the loss written out from its definition, a plain SGD step.
No timing here: speed is measured in benchmarks/, never asserted in tests.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from kdtune import models
from kdtune.config import TrialConfig
from kdtune.data import Dataset
from kdtune.train.devices import cpu_has_native_bf16
from kdtune.train.teacher_logits import teacher_logits_for
from kdtune.train.parts import teacher_network, trainer_for
from kdtune.distill import trial_config

KD = {"method": "kd", "temperature": 3.0, "alpha": 0.7, "hard_weight": 0.3, "epochs": 1, "lr": 0.05,
      "momentum": 0.9, "weight_decay": 1e-3, "seed": 3}


def one_batch_trainer(config: TrialConfig, dataset, teacher_state, **kwargs):
    """A Trainer whose whole training split is one batch, with a spy recording the batch it trains on."""
    trainer = trainer_for(config, dataset, teacher_state, device=torch.device("cpu"), **kwargs)
    assert len(trainer.train) <= config.batch_size
    seen = []
    batches = trainer.train.batches

    def spy(*args, **kw):
        for batch in batches(*args, **kw):
            seen.append(tuple(t.clone() for t in batch))
            yield batch

    trainer.train.batches = spy
    return trainer, seen


def reference_step(config: TrialConfig, dataset, student_state, teacher_state, batch):
    """Fresh NCHW fp32 models, the loss from its definition, one plain SGD step: (hard, soft, student)."""
    images, labels, _ = batch
    student = models.build_model(config.student, dataset.num_classes, dataset.input_shape)
    student.load_state_dict(student_state)
    teacher = models.build_model(config.teacher, dataset.num_classes, dataset.input_shape)
    teacher.load_state_dict(teacher_state)
    teacher.eval()
    student.train()
    with torch.no_grad():
        teacher_logits = teacher(images)
    logits = student(images)
    t = config.temperature
    hard = -logits.log_softmax(1)[torch.arange(len(labels)), labels].mean()
    p_teacher = (teacher_logits / t).softmax(1)
    kl = (p_teacher * ((teacher_logits / t).log_softmax(1) - (logits / t).log_softmax(1))).sum(1).mean()
    hard_term, soft_term = config.hard_weight * hard, config.alpha * t * t * kl
    optimizer = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    optimizer.zero_grad()
    (hard_term + soft_term).backward()
    optimizer.step()
    return hard_term.item(), soft_term.item(), student


def assert_same_weights(trained: torch.nn.Module, reference: torch.nn.Module, atol: float) -> None:
    for (name, p), (_, q) in zip(trained.named_parameters(), reference.named_parameters()):
        assert torch.allclose(p.detach(), q.detach(), atol=atol, rtol=1e-4), f"{name} differs after one step"


@pytest.fixture(scope="module")
def small_cifar():
    """40 random 3x32x32 images (CIFAR-shaped, crop+flip augmentation on by default)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (42, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (42,), generator=generator)
    return Dataset("cifar10", images, labels, images[:8], labels[:8], 10, 1 / 255, default_augment="crop:4,flip")


def test_online_teacher_step_on_device_augmented_batch_matches_the_reference(small_cifar):
    """VGG-16 -> VGG-7 on a crop+flip batch made on the device: same losses, same weights after the step."""
    config = trial_config({**KD, "dataset": "cifar10", "teacher": "vgg16", "student": "vgg7",
                                    "batch_size": 64, "val_fraction": 0.05})
    assert config.augment_recipe(small_cifar.default_augment) == "crop:4,flip"
    torch.manual_seed(1)
    teacher_state = models.build_model("vgg16", 10, (3, 32, 32)).state_dict()
    # an untrained VGG-16 gives near-uniform logits (a KL of ~1e-4, all rounding); sharpen them to a real target
    teacher_state["classifier.weight"] *= 300
    trainer, seen = one_batch_trainer(config, small_cifar, teacher_state)
    assert trainer.teacher is not None and trainer.teacher_logits is None  # the teacher runs on every batch
    if trainer.channels_last:  # the fast layout is the one under test
        assert trainer.student.block1[0].weight.is_contiguous(memory_format=torch.channels_last)
    initial = copy.deepcopy(trainer.student.state_dict())
    metrics = next(trainer.epochs())
    assert len(seen) == 1
    images, labels, indices = seen[0]

    # every image is the normalised source image, zero-padded by 4, cropped at some offset, maybe flipped
    mean = torch.tensor(trainer.normalisation["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(trainer.normalisation["std"]).view(1, 3, 1, 1)
    source = (small_cifar.train_images[indices].float() / 255 - mean) / std
    padded = F.pad(source, (4, 4, 4, 4))
    for i in range(len(indices)):
        candidates = [crop.flip(-1) if flip else crop
                      for dy in range(9) for dx in range(9)
                      for crop in [padded[i, :, dy:dy + 32, dx:dx + 32]] for flip in (False, True)]
        assert any(torch.allclose(images[i], c, atol=1e-5) for c in candidates), f"sample {i} is not a crop/flip"
    assert torch.equal(labels, small_cifar.train_labels[indices])

    hard, soft, reference = reference_step(config, small_cifar, initial, teacher_state, seen[0])
    assert metrics["loss_hard"] == pytest.approx(hard, rel=1e-4)
    assert metrics["loss_soft"] == pytest.approx(soft, rel=1e-4)
    trainer.close()
    assert_same_weights(trainer.student, reference, atol=1e-5)


def test_cached_teacher_logits_step_matches_the_online_reference(digits, trained_digits_teacher):
    """Seed 003's mode: teacher logits computed once on un-augmented images, looked up by sample index."""
    teacher_state = trained_digits_teacher[0]
    config = trial_config({**KD, "dataset": "digits", "batch_size": 2048, "teacher_cache": "on"})
    cache = teacher_logits_for(teacher_network(config.teacher, teacher_state, digits), digits, config.val_fraction)
    trainer, seen = one_batch_trainer(config, digits, teacher_state, teacher_logits=cache)
    assert trainer.teacher is None and trainer.teacher_logits is not None  # no teacher forward in the step
    initial = copy.deepcopy(trainer.student.state_dict())
    metrics = next(trainer.epochs())
    hard, soft, reference = reference_step(config, digits, initial, teacher_state, seen[0])
    assert metrics["loss_hard"] == pytest.approx(hard, rel=1e-4)
    assert metrics["loss_soft"] == pytest.approx(soft, rel=1e-4)
    trainer.close()
    assert_same_weights(trainer.student, reference, atol=1e-5)


def test_online_teacher_on_digits_matches_the_reference(digits, trained_digits_teacher):
    teacher_state = trained_digits_teacher[0]
    config = trial_config({**KD, "dataset": "digits", "batch_size": 2048, "teacher_cache": "off"})
    trainer, seen = one_batch_trainer(config, digits, teacher_state)
    initial = copy.deepcopy(trainer.student.state_dict())
    metrics = next(trainer.epochs())
    hard, soft, reference = reference_step(config, digits, initial, teacher_state, seen[0])
    assert metrics["loss_hard"] == pytest.approx(hard, rel=1e-4)
    assert metrics["loss_soft"] == pytest.approx(soft, rel=1e-4)
    trainer.close()
    assert_same_weights(trainer.student, reference, atol=1e-5)


def test_bf16_step_stays_within_bf16_rounding_of_the_fp32_reference(digits, trained_digits_teacher):
    teacher_state = trained_digits_teacher[0]
    config = trial_config({**KD, "dataset": "digits", "batch_size": 2048, "teacher_cache": "off",
                                    "precision": "bf16"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # bf16 emulated on this CPU: slow, still correct
        trainer, seen = one_batch_trainer(config, digits, teacher_state)
    initial = copy.deepcopy(trainer.student.state_dict())
    metrics = next(trainer.epochs())
    hard, soft, _ = reference_step(config, digits, initial, teacher_state, seen[0])
    # bf16 keeps 8 bits of mantissa (~0.4% per rounding); the losses themselves are computed in fp32
    assert metrics["loss_hard"] == pytest.approx(hard, rel=3e-2)
    assert metrics["loss_soft"] == pytest.approx(soft, rel=5e-2, abs=1e-3)
    trainer.close()


@pytest.mark.skipif(cpu_has_native_bf16(), reason="this CPU has native bf16 (AMX or AVX512-BF16)")
def test_bf16_on_a_cpu_without_native_bf16_says_it_will_be_slow(digits):
    config = trial_config({"dataset": "digits", "method": "none", "epochs": 1, "precision": "bf16"})
    with pytest.warns(RuntimeWarning, match="without AMX or AVX512-BF16.*use precision='fp32'"):
        trainer_for(config, digits, device=torch.device("cpu")).close()
