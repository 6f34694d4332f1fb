"""What a user meets on small, real data (issue 19): recipes with Adam/AdamW, signal students linked by a 1x1
Conv1d, and the parts of a study that decide on a few validation samples."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kdtune.data import from_arrays
from kdtune.distill import trial_config
from kdtune.errors import ConfigError
from kdtune.models.refs import model_ref
from kdtune.train.parts import StudyParts, trainer_for
from kdtune.resolve import expand_tuning


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                        ("adamw", torch.optim.AdamW)])
def test_the_optimizer_is_a_recipe_value(digits, name, kind):
    config = trial_config({"method": "none", "optimizer": name, "lr": 0.003 if name != "sgd" else 0.03,
                           "epochs": 5, "weight_decay": 0.01})
    trainer = trainer_for(config, digits)
    assert type(trainer.optimizer) is kind
    if name != "sgd":
        assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    epochs = list(trainer.epochs())
    assert epochs[-1]["test_acc"] > 0.3 and epochs[-1]["train_loss"] < epochs[0]["train_loss"], name


def test_bad_optimizer_values_are_one_line():
    with pytest.raises(ConfigError, match=r"optimizer='lamb': unknown; allowed: adam, adamw, sgd"):
        trial_config({"optimizer": "lamb"})
    with pytest.raises(ConfigError, match=r"adam_beta2=1.0: must be in \[0, 1\)"):
        trial_config({"optimizer": "adam", "adam_beta2": 1.0})


def test_the_optimizer_can_be_tuned_for_every_setting():
    variants = expand_tuning([{"label": "baseline", "method": "none"}, {"label": "kd", "method": "kd"}],
                             {"optimizer": ["sgd", "adamw"]})
    assert [(v["label"], v["optimizer"], v["point"]) for v in variants] == [
        ("baseline", "sgd", "optimizer=sgd"), ("baseline", "adamw", "optimizer=adamw"),
        ("kd", "sgd", "optimizer=sgd"), ("kd", "adamw", "optimizer=adamw")]


class SignalNet(nn.Module):
    """A 1-D CNN on C x L signals: its `features` output is (N, width, L)."""

    def __init__(self, width: int, num_classes: int, channels: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(channels, width, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=2))


def signals(n=120, length=24, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    t = np.linspace(0, 1, length, dtype=np.float32)
    x = np.stack([np.stack([np.sin((3 + 4 * y) * 6.28 * t + rng.random()), rng.normal(0, 0.3, length)])
                  for y in labels]).astype(np.float32)
    return x, labels


def test_one_dimensional_features_of_different_widths_are_linked_by_a_conv1d_adapter():
    x, y = signals()
    dataset = from_arrays(x[:96], y[:96], x[96:], y[96:], name="signals")
    teacher = model_ref(lambda num_classes, shape: SignalNet(16, num_classes, shape[0]))
    student = model_ref(lambda num_classes, shape: SignalNet(4, num_classes, shape[0]))
    torch.manual_seed(0)
    teacher_state = teacher.build(2, dataset.input_shape).state_dict()
    parts = StudyParts(dataset, student, teacher, teacher_state)
    config = trial_config({"method": "links", "links": "features=features", "beta": 1.0, "epochs": 3,
                           "batch_size": 16, "lr": 0.01, "teacher": teacher.spec, "student": student.spec,
                           "dataset": dataset.name})
    trainer = parts.trainer(config)
    (adapter,) = trainer.method.adapters.values()
    assert isinstance(adapter, nn.Conv1d) and (adapter.in_channels, adapter.out_channels) == (4, 16)
    epochs = list(trainer.epochs())
    assert "loss_intermediate" in epochs[-1] and epochs[-1]["loss_intermediate"] < epochs[0]["loss_intermediate"]


def test_signals_of_different_lengths_are_refused_or_interpolated_as_asked():
    from kdtune.distill.links import make_adapter

    with pytest.raises(ConfigError, match="differ in length; set link_spatial=interpolate"):
        make_adapter(torch.Size([2, 4, 12]), torch.Size([2, 16, 24]), "features=features")
    adapter = make_adapter(torch.Size([2, 4, 12]), torch.Size([2, 16, 24]), "features=features", spatial="interpolate")
    assert adapter(torch.randn(2, 4, 12)).shape == (2, 16, 24)
