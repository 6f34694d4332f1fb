import pytest

from kdtune.config import parse_links, parse_pairs
from kdtune.errors import ConfigError
from kdtune.distill import trial_config


@pytest.mark.parametrize("values, message", [
    ({"temperature": 0}, "temperature=0.0: must be > 0"),
    ({"temperature": -1}, "temperature=-1.0: must be > 0"),
    ({"alpha": -0.1}, "alpha=-0.1: must be >= 0"),
    ({"alpha": 10}, "alpha=10.0: above 1 the default hard_weight"),
    ({"method": "links", "links": "layer2="}, "a module-path link is written teacher.module.path=student.module.path"),
    ({"method": "links", "links": "two"}, "'two' is not a link"),
    ({"link_spatial": "stretch"}, "link_spatial='stretch': unknown; allowed: interpolate, refuse"),
    ({"method": "links", "links": "2", "beta": 0}, "beta=0.0: must be > 0 (method 'links')"),
    ({"method": "links"}, "links='': method 'links' needs at least one link"),
    ({"method": "kd", "links": "2"}, "unknown config key 'links' for method 'kd'; its parameters: temperature"),
    ({"epochs": 0}, "epochs=0: must be a whole number >= 1"),
    ({"epochs": 2.5}, "epochs=2.5: expected a int"),
    ({"lr": "fast"}, "lr='fast': expected a float"),
    ({"momentum": 1.0}, "momentum=1.0: must be in [0, 1)"),
    ({"precision": "fp8"}, "precision='fp8': unknown; allowed: bf16, fp32"),
    ({"colour": "red"}, "unknown config key 'colour'"),
])
def test_bad_values_are_rejected_with_a_message_naming_them(values, message):
    with pytest.raises(ConfigError) as error:
        trial_config(values)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_weights_default_to_hinton_form_and_accept_independent_weights():
    kd = trial_config({"method": "kd", "alpha": 0.7})
    assert kd.effective_hard_weight == pytest.approx(0.3)
    # seed 000 eq. 2: 0.05 hard + 0.6 soft + 0.35 intermediate
    seed000 = trial_config({"method": "links", "hard_weight": 0.05, "alpha": 0.6, "beta": 0.35,
                                     "links": "2,3,4,5", "teacher": "vgg16", "student": "vgg7", "dataset": "cifar10"})
    assert (seed000.effective_hard_weight, seed000.alpha, seed000.beta) == (0.05, 0.6, 0.35)
    # seed 000 Table 4 uses alpha = 10, which needs an explicit hard weight
    assert trial_config({"alpha": 10, "hard_weight": 1}).alpha == 10


def test_temperature_below_one_is_allowed():
    assert trial_config({"temperature": 0.6}).temperature == 0.6


def test_flat_round_trip_and_link_forms():
    config = trial_config({"method": "links", "links": [4, 2], "beta": 10, "alpha": 0.5})
    assert config.links == ("2", "4")
    assert trial_config(config.to_flat()) == trial_config({**config.to_flat()})
    assert parse_links("2, 3,4") == ("2", "3", "4") and parse_links(5) == ("5",) and parse_links("") == ()
    # module-path links keep their order, after numbered ones; the same grammar serves FSP pairs
    assert parse_links("layer3=features.9, 2, layer2 = features.6") == ("2", "layer3=features.9", "layer2=features.6")
    assert parse_pairs("3-1,layer1.0=features.2-layer1.1=features.4") == (
        ("1", "3"), ("layer1.0=features.2", "layer1.1=features.4"))
    with pytest.raises(ConfigError, match="link 3 is listed twice"):
        parse_links("3,3")


def test_augment_accepts_recipes_and_the_old_booleans():
    assert trial_config({"augment": "crop:4,flip"}).augment_recipe("") == "crop:4,flip"
    assert trial_config({"augment": True}).augment == "crop:4,flip"
    assert trial_config({"augment": "false"}).augment_recipe("crop:4,flip") == ""
    assert trial_config({}).augment_recipe("crop:4,flip") == "crop:4,flip"  # the dataset's default


def test_a_study_base_gives_each_method_its_own_parameters_and_cannot_be_changed_in_place():
    import pickle

    from kdtune.distill.registry import StudyBase

    base = StudyBase({"dataset": "digits", "student": "digits_student", "epochs": 3, "temperature": 6.0})
    assert base.shared.epochs == 3 and base.shared.student == "digits_student"
    assert base.trial({"method": "kd"}).temperature == 6.0  # --set temperature=6 reaches the KD trials
    dkd = base.trial({"method": "dkd"})
    assert dkd.beta == trial_config({"method": "dkd"}).beta  # DKD keeps its own default
    assert base.trial({"method": "none"}).param("temperature") is None  # the baseline has no temperature
    changed = base.replace(epochs=5)
    assert changed.shared.epochs == 5 and base.shared.epochs == 3
    with pytest.raises(AttributeError, match="read-only"):
        base.shared = None
    with pytest.raises(TypeError):
        base["epochs"] = 4
    assert dict(pickle.loads(pickle.dumps(base))) == dict(base)  # shipped to every trial by Ray
    with pytest.raises(ConfigError, match="epochs"):
        StudyBase({"epochs": "many"}).shared
