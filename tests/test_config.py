import pytest

from kdtune.config import TrialConfig, parse_links
from kdtune.errors import ConfigError


@pytest.mark.parametrize("values, message", [
    ({"temperature": 0}, "temperature=0.0: must be > 0"),
    ({"temperature": -1}, "temperature=-1.0: must be > 0"),
    ({"alpha": -0.1}, "alpha=-0.1: must be >= 0"),
    ({"alpha": 10}, "alpha=10.0: above 1 the default hard_weight"),
    ({"dataset": "imagenet"}, "dataset='imagenet': unknown; allowed: cifar10, cifar100, digits"),
    ({"student": "resnet9000"}, "student='resnet9000': unknown; allowed:"),
    ({"method": "links", "links": "7", "beta": 1}, "link 7 is not a link point of both digits_teacher and digits_student; allowed: 1, 2, 3, 4"),
    ({"method": "links", "teacher": "vgg16", "student": "vgg7", "links": "2,3,9", "beta": 1}, "allowed: 1, 2, 3, 4, 5, 6"),
    ({"method": "links", "links": "2"}, "beta=0.0: method 'links' needs beta > 0"),
    ({"method": "kd", "links": "2"}, "method 'kd' uses no links"),
    ({"epochs": 0}, "epochs=0: must be a whole number >= 1"),
    ({"epochs": 2.5}, "epochs=2.5: expected a int"),
    ({"lr": "fast"}, "lr='fast': expected a float"),
    ({"momentum": 1.0}, "momentum=1.0: must be in [0, 1)"),
    ({"precision": "fp8"}, "precision='fp8': unknown; allowed: bf16, fp32"),
    ({"colour": "red"}, "unknown config key 'colour'"),
    ({"dataset": "cifar10", "teacher": "vgg16", "student": "vgg7", "teacher_cache": "on"}, "teacher_cache='on' with random augmentation"),
])
def test_bad_values_are_rejected_with_a_message_naming_them(values, message):
    with pytest.raises(ConfigError) as error:
        TrialConfig.from_flat(values)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_weights_default_to_hinton_form_and_accept_independent_weights():
    kd = TrialConfig.from_flat({"method": "kd", "alpha": 0.7})
    assert kd.effective_hard_weight == pytest.approx(0.3)
    # seed 000 eq. 2: 0.05 hard + 0.6 soft + 0.35 intermediate
    seed000 = TrialConfig.from_flat({"method": "links", "hard_weight": 0.05, "alpha": 0.6, "beta": 0.35,
                                     "links": "2,3,4,5", "teacher": "vgg16", "student": "vgg7", "dataset": "cifar10"})
    assert (seed000.effective_hard_weight, seed000.alpha, seed000.beta) == (0.05, 0.6, 0.35)
    # seed 000 Table 4 uses alpha = 10, which needs an explicit hard weight
    assert TrialConfig.from_flat({"alpha": 10, "hard_weight": 1}).alpha == 10


def test_temperature_below_one_is_allowed():
    assert TrialConfig.from_flat({"temperature": 0.6}).temperature == 0.6


def test_flat_round_trip_and_link_forms():
    config = TrialConfig.from_flat({"method": "links", "links": [4, 2], "beta": 10, "alpha": 0.5})
    assert config.links == (2, 4)
    assert TrialConfig.from_flat(config.to_flat()) == TrialConfig.from_flat({**config.to_flat()})
    assert parse_links("2, 3,4") == (2, 3, 4) and parse_links(5) == (5,) and parse_links("") == ()
    with pytest.raises(ConfigError, match="link 3 is listed twice"):
        parse_links("3,3")
