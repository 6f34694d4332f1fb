"""The standard methods after the seeds (AT, RKD, CRD, DKD, DIST, CTKD, logit standardisation) as kdtune methods:
each trains on digits and logs its own terms; what it reads decides the logit cache, fusion and ensembles; its
epoch-dependent weights and memory survive a resume. Their loss functions are checked by hand in
tests/test_method_losses_a.py and tests/test_method_losses_b.py."""
from __future__ import annotations

import pytest
import torch

from kdtune.distill import method_class, trial_config
from kdtune.distill.base import Outputs
from kdtune.distill.dkd import dkd_terms
from kdtune.distill.losses import soft_loss, standardize_logits
from kdtune.train.teacher_logits import teacher_logits_for
from kdtune.ensemble import ensemble_refusal
from kdtune.errors import ConfigError
from kdtune.train.fusion import fused_epochs
from kdtune.models.refs import model_ref
from kdtune.train.parts import StudyParts, teacher_network

# each new method with a setting that trains on the digits pair (digits_teacher -> digits_student)
# (the papers' weights are CIFAR's: on the 8x8 digits pair, whose student has no BatchNorm, DKD's beta 8 and DIST's
# tau 4 diverge at lr 0.01 and AT's beta 1000 swamps CE; a methods study searches them with lr)
SETTINGS = {
    "at": {"links": "1,2", "beta": 1.0},
    "rkd": {},
    "crd": {"nce_k": 256, "beta": 0.1, "lr": 0.03},
    "dkd": {"warmup_epochs": 2, "beta": 1.0},
    "dist": {"temperature": 1.0},
    "ctkd": {"decay_epochs": 2, "alpha": 0.5},  # the authors' 0.1 * CE learns slowly in 4 epochs
}
TERMS = {"at": {"hard", "attention"}, "rkd": {"hard", "distance", "angle"}, "crd": {"hard", "contrast"},
         "dkd": {"hard", "tckd", "nckd"}, "dist": {"hard", "inter", "intra"}, "ctkd": {"hard", "soft"}}
RECIPE = {"epochs": 4, "lr": 0.01, "batch_size": 40}


@pytest.fixture(scope="module")
def cache(digits, trained_digits_teacher):
    return teacher_logits_for(teacher_network("digits_teacher", trained_digits_teacher[0], digits), digits, 0.1)


@pytest.fixture(scope="module")
def parts(digits, trained_digits_teacher, cache):
    return StudyParts(digits, model_ref("digits_student"), model_ref("digits_teacher"), trained_digits_teacher[0],
                      cache)


def config_of(method: str, **extra):
    return trial_config({"method": method, **RECIPE, **SETTINGS[method], **extra})


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_each_method_trains_on_digits_and_logs_its_terms(parts, method):
    trainer = parts.trainer(config_of(method))
    epochs = list(trainer.epochs())
    assert {f"loss_{t}" for t in TERMS[method]} <= set(epochs[-1]), epochs[-1].keys()
    assert epochs[-1]["test_acc"] > 0.3, (method, epochs[-1]["test_acc"])  # 10 classes: chance is 0.1
    assert epochs[-1]["loss_hard"] < epochs[0]["loss_hard"], method
    # logits-only methods use the cached teacher logits; feature methods run the teacher on every batch
    reads_features = "features" in method_class(method).reads
    assert (trainer.teacher_logits is None) == reads_features, method


def test_a_feature_method_refuses_the_logit_cache_by_name(parts):
    with pytest.raises(ConfigError, match="teacher_cache='on': method 'crd'"):
        parts.trainer(config_of("crd", teacher_cache="on"))


@pytest.mark.parametrize("method, refused", [("at", True), ("rkd", True), ("crd", True), ("dkd", False),
                                             ("dist", False), ("ctkd", False)])
def test_ensembles_serve_the_logit_methods_and_refuse_the_feature_methods_with_a_reason(method, refused):
    reason = ensemble_refusal(config_of(method), members=3)
    assert (reason is not None) == refused
    if refused:
        assert f"method {method!r} reads teacher features" in reason and "dkd" in reason


def test_fused_members_of_the_new_methods_train_what_they_train_alone(parts):
    configs = [config_of("dkd"), config_of("crd"), config_of("rkd"), config_of("dist", temperature=2.0)]
    trainers, teacher = parts.fused_trainers(configs)
    history = {i: [] for i in range(len(configs))}
    for results in fused_epochs(trainers, teacher):
        for i, metrics in results.items():
            history[i].append(metrics)
    for i, config in enumerate(configs):
        alone = list(parts.trainer(config).epochs())
        assert [m["train_loss"] for m in alone] == [m["train_loss"] for m in history[i]], config.method
        assert alone[-1]["test_acc"] == history[i][-1]["test_acc"], config.method


@pytest.mark.parametrize("method", ["crd", "ctkd", "dkd"])
def test_a_resumed_trial_continues_exactly(parts, method):
    """CRD's memory, CTKD's temperature and DKD's warm-up all live in the trainer's state."""
    whole = list(parts.trainer(config_of(method)).epochs())
    first = parts.trainer(config_of(method))
    epochs = first.epochs()
    next(epochs)
    state = first.state_dict()
    second = parts.trainer(config_of(method))
    second.load_state_dict(state)
    rest = list(second.epochs())
    assert [m["train_loss"] for m in rest] == [m["train_loss"] for m in whole[1:]]


def batch(classes=5, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, classes, generator=g) * 3, torch.randn(n, classes, generator=g) * 3,
            torch.randint(0, classes, (n,), generator=g))


def test_dkd_terms_ramp_up_over_the_warm_up_epochs():
    student, teacher, labels = batch()
    method = method_class("dkd")(trial_config({"method": "dkd", "warmup_epochs": 4, "alpha": 1, "beta": 8}))
    tckd, nckd = dkd_terms(student, teacher, labels, 4.0)
    for epoch, factor in ((1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)):
        method.begin_epoch(epoch, 10)
        terms = method.losses(Outputs(labels, torch.arange(6), student, teacher))
        assert terms["tckd"].item() == pytest.approx(factor * tckd.item())
        assert terms["nckd"].item() == pytest.approx(factor * 8 * nckd.item())


def test_logit_standardisation_switches_the_soft_target_to_z_scored_logits():
    student, teacher, labels = batch()
    plain = method_class("kd")(trial_config({"method": "kd", "temperature": 2, "alpha": 1}))
    ls = method_class("kd")(trial_config({"method": "kd", "temperature": 2, "alpha": 1, "logit_standardize": True}))
    out = Outputs(labels, torch.arange(6), student, teacher)
    assert plain.losses(out)["soft"].item() == pytest.approx(soft_loss(student, teacher, 2.0).item())
    expected = soft_loss(standardize_logits(student), standardize_logits(teacher), 2.0)
    assert ls.losses(out)["soft"].item() == pytest.approx(expected.item())
    # logits that differ only in scale and shift per sample match exactly once standardised
    assert ls.losses(Outputs(labels, torch.arange(6), 3 * teacher + 1, teacher))["soft"].item() == \
        pytest.approx(0.0, abs=1e-6)


def test_ctkd_learns_its_temperature_against_the_student():
    """The temperature module's parameter joins the student's optimiser with a reversed gradient: -lambda times
    the KD loss's derivative, so each SGD step on it raises the loss the student lowers."""
    student, teacher, labels = batch(seed=3)
    student, teacher = student.double(), teacher.double()  # float32 rounding would swamp the finite difference
    method = method_class("ctkd")(trial_config({"method": "ctkd", "alpha": 1.0, "hard_weight": 0.0,
                                                "lambda_max": 0.5, "decay_epochs": 4}))
    method.begin_epoch(4, 10)  # the end of the curriculum: lambda = lambda_max
    (weight,) = method.student_side_parameters(None)
    out = Outputs(labels, torch.arange(6), student, teacher)
    method.losses(out)["soft"].backward()

    def loss_at(w):
        with torch.no_grad():
            weight.fill_(w)
            return method.losses(out)["soft"].item()

    w0, h = weight.item(), 1e-2
    derivative = (loss_at(w0 + h) - loss_at(w0 - h)) / (2 * h)
    assert derivative != 0 and weight.grad.item() == pytest.approx(-0.5 * derivative, rel=1e-2)


@pytest.mark.parametrize("values, message", [
    ({"method": "dkd", "beta": -1}, "beta=-1.0: must be >= 0 (method 'dkd')"),
    ({"method": "crd", "nce_m": 1.0}, "nce_m=1.0: must be in [0, 1) (method 'crd')"),
    ({"method": "at"}, "links='': method 'at' needs at least one linked pair"),
    ({"method": "dist", "temperature": 0}, "temperature=0.0: must be > 0 (method 'dist')"),
    ({"method": "rkd", "temperature": 4}, "unknown config key 'temperature' for method 'rkd'"),
])
def test_bad_settings_of_the_new_methods_are_refused_in_one_line(values, message):
    with pytest.raises(ConfigError) as error:
        trial_config(values)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_methods_study_lists_a_method_the_pair_cannot_run_as_skipped_with_the_reason():
    """An MLP pair has no feature maps: attention transfer cannot link it; the other methods still run."""
    import numpy as np

    from kdtune.data import from_arrays
    from kdtune.resolve import resolve_study
    from kdtune.spaces import MethodSpace
    from kdtune.study import Search, StudySpec

    rng = np.random.default_rng(0)
    vectors = from_arrays(rng.random((200, 12), dtype=np.float32), rng.integers(0, 3, 200),
                          rng.random((30, 12), dtype=np.float32), rng.integers(0, 3, 30), name="vectors")
    searches = {"at": Search(MethodSpace(("at",), link_sets=("1",)), num_samples=2),
                "dkd": Search(MethodSpace(("dkd",)), num_samples=2)}
    said = []
    resolved = resolve_study(StudySpec(name="methods", dataset=vectors, searches=searches), echo=said.append)
    assert list(resolved.searches) == ["dkd"]
    assert resolved.skipped["at"].startswith("link 1: method 'at' needs feature maps (C x H x W or C x L)")
    assert any(line.startswith("skipped at: ") for line in said)
    with pytest.raises(ConfigError, match="every search was skipped: at: "):
        resolve_study(StudySpec(name="methods", dataset=vectors, searches={"at": searches["at"]}), echo=said.append)
