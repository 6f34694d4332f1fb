"""The loss terms against values worked out by hand (see the comments) on small tensors."""
import math

import pytest
import torch

from kdtune.errors import ConfigError

from kdtune.distill import method_class
from kdtune.distill.base import Outputs
from kdtune.distill.links import make_adapter
from kdtune.distill.losses import feature_mse, hard_loss, soft_loss
from kdtune.distill import trial_config

STUDENT = torch.tensor([[1.0, 2.0, 3.0]])
TEACHER = torch.tensor([[3.0, 1.0, 0.0]])


@pytest.mark.parametrize("temperature, expected", [
    # p = softmax(teacher / T), q = softmax(student / T); T^2 * sum p log(p / q)
    (1.0, 1.6851240160639807),
    (2.0, 2.0738163287413798),
    (4.0, 2.1545412566786353),
])
def test_soft_loss_is_t_squared_kl_of_temperature_softmaxes(temperature, expected):
    assert soft_loss(STUDENT, TEACHER, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_soft_loss_averages_over_the_batch_and_vanishes_when_student_matches():
    batch_s = torch.cat([STUDENT, TEACHER])
    batch_t = torch.cat([TEACHER, TEACHER])
    assert soft_loss(batch_s, batch_t, 2.0).item() == pytest.approx(2.0738163287413798 / 2, rel=1e-6)
    assert soft_loss(TEACHER, TEACHER, 0.6).item() == pytest.approx(0.0, abs=1e-7)


def test_hard_loss_is_cross_entropy_at_t1():
    # -log softmax([1, 2, 3])[0] = -log(e / (e + e^2 + e^3))
    expected = -math.log(math.e / (math.e + math.e**2 + math.e**3))
    assert hard_loss(STUDENT, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_kd_method_weights_each_term():
    config = trial_config({"method": "kd", "alpha": 0.6, "hard_weight": 0.05, "temperature": 2.0})
    terms = method_class("kd")(config).losses(
        Outputs(labels=torch.tensor([0]), indices=torch.tensor([0]), student_logits=STUDENT, teacher_logits=TEACHER))
    assert terms["hard"].item() == pytest.approx(0.05 * 2.40760596444438, rel=1e-6)
    assert terms["soft"].item() == pytest.approx(0.6 * 2.0738163287413798, rel=1e-6)
    # the default hard weight is 1 - alpha
    config = trial_config({"method": "kd", "alpha": 0.75, "temperature": 1.0})
    terms = method_class("kd")(config).losses(
        Outputs(labels=torch.tensor([0]), indices=torch.tensor([0]), student_logits=STUDENT, teacher_logits=TEACHER))
    assert terms["hard"].item() == pytest.approx(0.25 * 2.40760596444438, rel=1e-6)


def test_intermediate_term_is_beta_times_sum_of_mse_over_links():
    config = trial_config({"method": "links", "links": "1,2", "beta": 10, "alpha": 0.0, "hard_weight": 0.0})
    method = method_class("links")(config)
    student_features = {"1": torch.zeros(1, 2, 2, 2), "2": torch.ones(1, 3)}
    teacher_features = {"1": torch.full((1, 2, 2, 2), 2.0), "2": torch.full((1, 3), 4.0)}
    method.setup({k: v.shape for k, v in student_features.items()}, {k: v.shape for k, v in teacher_features.items()})
    terms = method.losses(Outputs(labels=torch.tensor([0]), indices=torch.tensor([0]), student_logits=STUDENT,
                                  teacher_logits=TEACHER, student_features=student_features,
                                  teacher_features=teacher_features))
    # link 1: mean((0-2)^2) = 4, link 2: mean((1-4)^2) = 9 -> 10 * 13; no hard or soft term at weight 0
    assert set(terms) == {"intermediate"}
    assert terms["intermediate"].item() == pytest.approx(130.0)


def test_adapters_only_where_widths_differ():
    assert isinstance(make_adapter(torch.Size([1, 64, 8, 8]), torch.Size([1, 64, 8, 8]), 1), torch.nn.Identity)
    conv = make_adapter(torch.Size([1, 8, 8, 8]), torch.Size([1, 32, 8, 8]), 1)
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and conv.out_channels == 32
    assert isinstance(make_adapter(torch.Size([1, 32]), torch.Size([1, 256]), 4), torch.nn.Linear)
    with pytest.raises(ConfigError, match=r"student feature \(8, 4, 4\) and teacher feature \(8, 8, 8\) differ in "
                       "height/width; set link_spatial=interpolate"):
        make_adapter(torch.Size([1, 8, 4, 4]), torch.Size([1, 8, 8, 8]), "2")
    resized = make_adapter(torch.Size([1, 4, 4, 4]), torch.Size([1, 8, 8, 8]), "2", spatial="interpolate")
    assert tuple(resized(torch.ones(2, 4, 4, 4)).shape) == (2, 8, 8, 8)
    with pytest.raises(ConfigError, match="cannot be joined by an adapter"):
        make_adapter(torch.Size([1, 8, 4, 4]), torch.Size([1, 32]), "layer4=fc")


def test_feature_mse():
    assert feature_mse(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])).item() == pytest.approx(5.0)


# ---- FSP (seed 002) -------------------------------------------------------------------------------

def test_fsp_matrix_is_channel_inner_products_over_positions():
    from kdtune.distill.losses import fsp_matrix

    # one sample, h=1, w=2; F1 has m=2 channels [1, 2] and [3, 4]; F2 has n=1 channel [5, 6]
    first = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    second = torch.tensor([[[[5.0, 6.0]]]])
    # G[0, 0] = (1*5 + 2*6) / (1*2) = 8.5 ; G[1, 0] = (3*5 + 4*6) / 2 = 19.5
    assert fsp_matrix(first, second).tolist() == [[[8.5], [19.5]]]


def test_fsp_distance_sums_pairs_and_averages_samples():
    from kdtune.distill.losses import fsp_distance

    student = [torch.tensor([[[5.5]], [[0.0]]]), torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]])]
    teacher = [torch.tensor([[[1.0]], [[1.0]]]), torch.tensor([[[0.0, 3.0]], [[0.0, 0.0]]])]
    # sample 1: (5.5-1)^2 + (1-0)^2 + (1-3)^2 = 20.25 + 1 + 4 = 25.25 ; sample 2: (0-1)^2 = 1 ; mean = 13.125
    assert fsp_distance(student, teacher).item() == pytest.approx(13.125)


# ---- adversarial (seeds 003, 004) -----------------------------------------------------------------

def test_adversarial_log_likelihoods_by_hand():
    from kdtune.distill.losses import adversarial_log_likelihoods, l1_alignment

    # C = 2: columns 0-1 are label logits, 2 = Real, 3 = Fake; true label 0
    d_teacher = torch.tensor([[math.log(3), 0.0, math.log(3), 0.0]])  # P(l=0|t) = 3/4, P(Real|t) = 3/4
    d_student = torch.tensor([[0.0, math.log(3), 0.0, math.log(3)]])  # P(l=0|s) = 1/4, P(Fake|s) = 3/4
    l_a, l_ds = adversarial_log_likelihoods(d_teacher, d_student, torch.tensor([0]))
    assert l_a.item() == pytest.approx(math.log(3 / 4) + math.log(3 / 4), rel=1e-6)  # ln(9/16)
    assert l_ds.item() == pytest.approx(math.log(3 / 4) + math.log(1 / 4), rel=1e-6)  # ln(3/16)
    # seed 003 eq. 4: |1 - 0| + |-2 - 1| = 4 for sample 1, 0 for sample 2, mean 2
    assert l1_alignment(torch.tensor([[1.0, -2.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])).item() == 2.0


def test_seed004_student_source_loss_is_cross_entropy_for_label_student():
    from kdtune.distill.losses import student_source_loss

    # logit ln 3 for 'student': P(student) = sigmoid(ln 3) = 3/4, L_class = -ln(3/4)
    assert student_source_loss(torch.tensor([[math.log(3)]])).item() == pytest.approx(-math.log(3 / 4), rel=1e-6)


# ---- the forms the seeds write differently (soft_scale, hint_loss, adv_loss) ------------------------

def test_soft_loss_with_and_without_t_squared_at_t4():
    # p = softmax([3, 1, 0] / 4), q = softmax([1, 2, 3] / 4): KL(p || q) = sum p log(p / q) = 0.13465882854241471
    p = [math.exp(x / 4) for x in (3, 1, 0)]
    p = [x / sum(p) for x in p]
    q = [math.exp(x / 4) for x in (1, 2, 3)]
    q = [x / sum(q) for x in q]
    kl = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert kl == pytest.approx(0.13465882854241471, rel=1e-12)
    assert soft_loss(STUDENT, TEACHER, 4.0, "none").item() == pytest.approx(kl, rel=1e-6)  # seeds 000/001/004
    assert soft_loss(STUDENT, TEACHER, 4.0, "T2").item() == pytest.approx(16 * kl, rel=1e-6)  # Hinton: T^2 = 16
    assert soft_loss(STUDENT, TEACHER, 4.0).item() == pytest.approx(16 * kl, rel=1e-6)  # the default


def test_kd_method_soft_scale_none_drops_the_t_squared():
    outputs = Outputs(labels=torch.tensor([0]), indices=torch.tensor([0]), student_logits=STUDENT,
                      teacher_logits=TEACHER)
    plain = trial_config({"method": "kd", "alpha": 0.5, "temperature": 4.0, "soft_scale": "none"})
    hinton = trial_config({"method": "kd", "alpha": 0.5, "temperature": 4.0})
    assert hinton.soft_scale == "T2"
    assert method_class("kd")(plain).losses(outputs)["soft"].item() == pytest.approx(0.5 * 0.13465882854241471,
                                                                                      rel=1e-6)
    assert method_class("kd")(hinton).losses(outputs)["soft"].item() == pytest.approx(0.5 * 2.1545412566786353,
                                                                                       rel=1e-6)


def test_hint_distance_mean_and_fitnets_sum():
    from kdtune.distill.losses import hint_distance

    # two samples of 1 x 2 x 2 against a zero hint: squared errors [1, 4, 0, 0] and [0, 0, 0, 9]
    student = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 3.0]]]])
    teacher = torch.zeros_like(student)
    # mean: (1 + 4 + 9) / 8 elements = 1.75
    assert hint_distance(student, teacher, "mean").item() == pytest.approx(1.75)
    assert hint_distance(student, teacher).item() == pytest.approx(1.75)  # the default
    # sum: 1/2 * ||.||^2 per sample = 2.5 and 4.5, averaged over the batch = 3.5
    assert hint_distance(student, teacher, "sum").item() == pytest.approx(3.5)
    # vectors (a dense guided layer): 1/2 * (1 + 4) = 2.5 and 1/2 * 9 = 4.5 -> 3.5; mean 14 / 4 = 3.5 too
    vectors = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    assert hint_distance(vectors, torch.zeros(2, 2), "sum").item() == pytest.approx(3.5)
    assert hint_distance(vectors, torch.ones(2, 2), "sum").item() == pytest.approx((0.5 * 1 + 0.5 * 5) / 2)


def test_seed004_paper_and_nonsaturating_terms_on_given_discriminator_logits():
    from kdtune.distill.losses import seed004_adversarial_loss

    beta = 2.0
    # d = ln 3 is D's logit for 'student': P(student) = 3/4, P(teacher) = 1/4
    d = torch.tensor([[math.log(3)]], requires_grad=True)
    paper = beta * seed004_adversarial_loss(d, "paper")
    # paper: -beta * L_class = -beta * -ln P(student) = beta * ln(3/4) < 0
    assert paper.item() == pytest.approx(beta * math.log(3 / 4), rel=1e-6) and paper.item() < 0
    paper.backward()
    # d/dd of beta * ln sigmoid(d) = beta * (1 - sigmoid(d)) = 2 * 1/4: positive, so descent lowers d ('teacher')
    assert d.grad.item() == pytest.approx(0.5, rel=1e-6)
    d.grad = None
    nonsaturating = beta * seed004_adversarial_loss(d, "nonsaturating")
    # non-saturating: beta * -ln P(teacher) = beta * -ln(1/4) = 2 ln 4 > 0
    assert nonsaturating.item() == pytest.approx(beta * math.log(4), rel=1e-6) and nonsaturating.item() >= 0
    nonsaturating.backward()
    # d/dd of beta * softplus(d) = beta * sigmoid(d) = 2 * 3/4: also positive, the same push
    assert d.grad.item() == pytest.approx(1.5, rel=1e-6)
    # bounded vs not: as the student fools D (d -> -inf) the paper's term falls without end, the other stays >= 0
    fooled = torch.tensor([[-50.0], [-1e4]])
    assert seed004_adversarial_loss(fooled, "paper").item() == pytest.approx(-(50 + 1e4) / 2, rel=1e-6)
    for logits in (fooled, torch.linspace(-30, 30, 61)[:, None]):
        assert seed004_adversarial_loss(logits, "nonsaturating").item() >= 0
    assert seed004_adversarial_loss(fooled, "nonsaturating").item() == pytest.approx(0.0, abs=1e-20)
