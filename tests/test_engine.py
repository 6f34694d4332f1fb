import pytest
import torch

from kdtune.train.teacher_logits import teacher_logits_for
from kdtune.train.parts import teacher_network, trainer_for
from kdtune.errors import ConfigError, TrainingDiverged
from kdtune.distill import trial_config

from conftest import write_cifar10


def run(trainer):
    metrics = None
    for metrics in trainer.epochs():
        pass
    return metrics


def test_teacher_trains_to_high_accuracy_with_the_same_engine(trained_digits_teacher):
    _, metrics = trained_digits_teacher
    assert metrics["test_acc"] > 0.95 and metrics["val_acc"] > 0.95


def test_each_loss_term_is_reported_every_epoch(digits, trained_digits_teacher):
    config = trial_config({"method": "links", "links": "3,4", "beta": 0.5, "alpha": 0.5, "epochs": 2})
    trainer = trainer_for(config, digits, trained_digits_teacher[0])
    epochs = list(trainer.epochs())
    assert [m["epoch"] for m in epochs] == [1, 2]
    for m in epochs:
        assert {"loss_hard", "loss_soft", "loss_intermediate", "val_acc", "lr"} <= set(m)
        assert m["train_loss"] == pytest.approx(m["loss_hard"] + m["loss_soft"] + m["loss_intermediate"])
    assert "test_acc" in epochs[-1] and "test_acc" not in epochs[0]


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_result(digits, trained_digits_teacher, tmp_path):
    config = trial_config({"method": "kd", "temperature": 4, "epochs": 4, "lr_step_epochs": 2})
    uninterrupted = trainer_for(config, digits, trained_digits_teacher[0])
    straight = run(uninterrupted)

    first = trainer_for(config, digits, trained_digits_teacher[0])
    epochs = first.epochs()
    next(epochs), next(epochs)
    torch.save(first.state_dict(), tmp_path / "trainer.pt")
    resumed = trainer_for(config, digits, trained_digits_teacher[0])
    resumed.load_state_dict(torch.load(tmp_path / "trainer.pt", weights_only=True))
    final = run(resumed)
    assert final["epoch"] == 4
    assert final["val_acc"] == pytest.approx(straight["val_acc"]) and final["test_acc"] == pytest.approx(straight["test_acc"])
    assert final["loss_soft"] == pytest.approx(straight["loss_soft"], rel=1e-4)
    assert final["lr"] == straight["lr"] == pytest.approx(0.004 * 0.1)  # epoch 4 trained at the second step's rate
    for name, value in uninterrupted.student.state_dict().items():  # bit for bit
        assert torch.equal(resumed.student.state_dict()[name], value), name


def test_lr_is_the_rate_the_epoch_trained_with(digits):
    config = trial_config({"method": "none", "epochs": 3, "lr": 0.1, "lr_step_epochs": 1, "lr_gamma": 0.5})
    trainer = trainer_for(config, digits)
    lrs = [m["lr"] for m in trainer.epochs()]
    assert lrs == pytest.approx([0.1, 0.05, 0.025])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0125)  # the next epoch's, not logged


def test_a_hint_stage_resumes_bit_for_bit_with_its_frozen_batchnorm(digits, tmp_path):
    from kdtune.models import build_model

    torch.manual_seed(0)
    teacher = build_model("resnet8", 10, (1, 8, 8)).state_dict()
    config = trial_config({"method": "hints", "teacher": "resnet8", "student": "resnet8", "links": "4",
                                    "beta": 1, "stage1_epochs": 2, "epochs": 1, "lr": 0.02, "batch_size": 128})
    straight = trainer_for(config, digits, teacher)
    straight_epochs = list(straight.epochs())
    first = trainer_for(config, digits, teacher)
    next(first.epochs())  # one of the two hint epochs
    torch.save(first.state_dict(), tmp_path / "trainer.pt")
    resumed = trainer_for(config, digits, teacher)
    resumed.load_state_dict(torch.load(tmp_path / "trainer.pt", weights_only=True))
    final = list(resumed.epochs())
    assert [m["stage"] for m in final] == ["hint", "main"]
    assert final[0]["loss_hint"] == straight_epochs[1]["loss_hint"]
    assert final[-1]["val_acc"] == straight_epochs[-1]["val_acc"]
    for name, value in straight.student.state_dict().items():  # weights and BatchNorm buffers, bit for bit
        assert torch.equal(resumed.student.state_dict()[name], value), name


def test_deterministic_trial_sets_and_restores_the_backends(digits, monkeypatch):
    import os

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark)
    config = trial_config({"method": "none", "epochs": 1, "deterministic": True})
    trainer = trainer_for(config, digits)
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert cudnn.deterministic and not cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    first = run(trainer)
    trainer.close()
    assert (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark) == before
    again = trainer_for(config, digits)
    second = run(again)
    again.close()
    assert first["val_acc"] == second["val_acc"] and first["train_loss"] == second["train_loss"]
    # not deterministic: on the CPU nothing changes (on CUDA, cudnn.benchmark is on for the trial)
    plain = trainer_for(config.replace(deterministic=False), digits)
    assert (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark) == before
    plain.close()


def test_an_open_trainer_keeps_its_deterministic_kernels_while_another_closes(digits, monkeypatch):
    """Fused members close one at a time (a hints member trains on alone after the others finish): the process's
    own settings come back only when the last trainer that changed them closes, in either order."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    config = trial_config({"method": "none", "epochs": 1, "deterministic": True})
    for order in ((0, 1), (1, 0)):
        trainers = [trainer_for(config, digits), trainer_for(config, digits)]
        trainers[order[0]].close()
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic, order
        trainers[order[1]].close()
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic, order


def test_cached_teacher_logits_equal_the_teacher_on_the_same_samples(digits, trained_digits_teacher):
    state = trained_digits_teacher[0]
    cache = teacher_logits_for(teacher_network("digits_teacher", state, digits), digits, 0.1)
    config = trial_config({"method": "kd", "epochs": 1})
    online = trainer_for(config, digits, state)
    images, labels, index = next(online.train.batches(64, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        expected = online.teacher(images)
    assert torch.allclose(cache[index], expected, atol=1e-5)
    # and the cached trial trains to the same place as the online one
    cached = trainer_for(config, digits, state, teacher_logits=cache)
    assert cached.teacher is None
    assert run(cached)["loss_soft"] == pytest.approx(run(online)["loss_soft"], rel=1e-4)


def test_cache_with_random_augmentation_is_refused(tmp_path, digits):
    write_cifar10(tmp_path)
    from kdtune.data import load_dataset
    from kdtune.models import build_model

    cifar = load_dataset("cifar10", tmp_path, download=False)
    config = trial_config({"dataset": "cifar10", "teacher": "vgg7", "student": "vgg7", "method": "kd",
                                    "teacher_cache": "on", "augment": False})
    logits = torch.zeros(len(cifar.train_labels), 10)
    teacher_state = build_model("vgg7", 10, (3, 32, 32)).state_dict()
    with pytest.raises(ConfigError, match="teacher_cache='on': method 'kd' with augment='crop:4,flip' needs the "
                                          "teacher run on every batch"):
        trainer_for(config.replace(augment=True), cifar, teacher_state, teacher_logits=logits)
    # 'auto' quietly runs the teacher online when augmentation makes the cache invalid
    auto = trainer_for(config.replace(teacher_cache="auto", augment=True), cifar, teacher_state, teacher_logits=logits)
    assert auto.teacher_logits is None and auto.teacher is not None


def test_cifar_path_trains_vgg7_from_vgg16_end_to_end(tmp_path):
    write_cifar10(tmp_path, per_batch=8, test=8)
    from kdtune.data import load_dataset
    from kdtune.models import build_model

    cifar = load_dataset("cifar10", tmp_path, download=False)
    teacher = build_model("vgg16", 10, (3, 32, 32)).state_dict()
    config = trial_config({"dataset": "cifar10", "teacher": "vgg16", "student": "vgg7", "method": "links",
                                    "links": "2,3,4,5", "beta": 10, "alpha": 0.6, "hard_weight": 0.05,
                                    "epochs": 1, "batch_size": 8})
    trainer = trainer_for(config, cifar, teacher)
    assert trainer.train.augment  # crop + flip on by default for CIFAR
    metrics = run(trainer)
    assert {"loss_hard", "loss_soft", "loss_intermediate", "test_acc"} <= set(metrics)
    assert all(isinstance(a, torch.nn.Identity) for a in trainer.method.adapters.values())  # VGG-7 widths match


def test_a_diverging_trial_stops_with_its_reason(digits):
    config = trial_config({"method": "none", "lr": 1e6, "epochs": 3})
    with pytest.raises(TrainingDiverged, match="loss term 'hard' became nan in epoch 1"):
        run(trainer_for(config, digits))
