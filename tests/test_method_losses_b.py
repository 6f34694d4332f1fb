"""DKD, CTKD and CRD loss pieces checked against their papers on hand computations (expected values are
worked out here with explicit loops and math, never with the function under test), plus the behaviour a user
would notice (eq. 1 of DKD, the reversal of CTKD, CRD's memory and its state_dict)."""
from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kdtune.distill import crd, ctkd, dkd


# ----------------------------------------------------------------------------------------------------------
# helpers: plain-Python probability math
# ----------------------------------------------------------------------------------------------------------
def softmax_list(z, T):
    m = max(v / T for v in z)
    e = [math.exp(v / T - m) for v in z]
    s = sum(e)
    return [x / s for x in e]


def kl_list(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def hand_dkd(student, teacher, labels, T):
    """TCKD and NCKD by the paper's definitions (§3.1), summed over samples, / B, * T^2."""
    tckd = nckd = 0.0
    for s, t, y in zip(student, teacher, labels):
        ps, pt = softmax_list(s, T), softmax_list(t, T)
        bs = [ps[y], sum(p for j, p in enumerate(ps) if j != y)]
        bt = [pt[y], sum(p for j, p in enumerate(pt) if j != y)]
        tckd += kl_list(bt, bs)
        qs = [p / bs[1] for j, p in enumerate(ps) if j != y]
        qt = [p / bt[1] for j, p in enumerate(pt) if j != y]
        nckd += kl_list(qt, qs)
    B = len(labels)
    return tckd * T * T / B, nckd * T * T / B


def hand_kd(student, teacher, T):
    return sum(kl_list(softmax_list(t, T), softmax_list(s, T)) for s, t in zip(student, teacher)) * T * T / len(student)


# ----------------------------------------------------------------------------------------------------------
# DKD
# ----------------------------------------------------------------------------------------------------------
STUDENT = [[1.0, 2.0, 0.5], [0.2, -1.0, 3.0]]
TEACHER = [[3.0, 1.0, -0.5], [0.0, 0.5, 2.0]]
LABELS = [0, 2]


def test_dkd_terms_match_hand_computation_three_classes():
    T = 2.0
    tckd, nckd = dkd.dkd_terms(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS), T)
    e_tckd, e_nckd = hand_dkd(STUDENT, TEACHER, LABELS, T)
    assert tckd.item() == pytest.approx(e_tckd, rel=1e-5, abs=1e-7)
    assert nckd.item() == pytest.approx(e_nckd, rel=1e-5, abs=1e-7)


def test_dkd_terms_worked_example_one_sample():
    # s = [0, ln 2, ln 2] -> p_S = [1/5, 2/5, 2/5]; t = [ln 3, 0, ln 2] -> p_T = [1/2, 1/6, 1/3] (T = 1), y = 0.
    # b_S = [1/5, 4/5], b_T = [1/2, 1/2]: TCKD = 1/2 ln(5/2) + 1/2 ln(5/8) = 1/2 ln(25/16) = ln(5/4).
    # p^_S = [1/2, 1/2], p^_T = [1/3, 2/3]: NCKD = 1/3 ln(2/3) + 2/3 ln(4/3).
    s = torch.tensor([[0.0, math.log(2), math.log(2)]], dtype=torch.float64)
    t = torch.tensor([[math.log(3), 0.0, math.log(2)]], dtype=torch.float64)
    tckd, nckd = dkd.dkd_terms(s, t, torch.tensor([0]), 1.0)
    assert tckd.item() == pytest.approx(math.log(5 / 4), rel=1e-12)
    assert nckd.item() == pytest.approx(1 / 3 * math.log(2 / 3) + 2 / 3 * math.log(4 / 3), rel=1e-12)
    # T^2 scaling: the same probabilities at T = 3 come from logits 3x larger, and both terms are 9x.
    tckd3, nckd3 = dkd.dkd_terms(3 * s, 3 * t, torch.tensor([0]), 3.0)
    assert tckd3.item() == pytest.approx(9 * math.log(5 / 4), rel=1e-12)
    assert nckd3.item() == pytest.approx(9 * nckd.item(), rel=1e-12)


def test_dkd_terms_four_classes_batch_mean():
    s = [[0.3, -0.2, 1.5, 0.0], [2.0, 0.1, -0.7, 0.4], [-1.0, -1.0, 0.5, 2.5]]
    t = [[1.2, 0.0, 2.5, -1.0], [3.0, -0.5, 0.0, 1.0], [0.0, -2.0, 0.0, 4.0]]
    y = [2, 0, 1]
    for T in (1.0, 4.0):
        tckd, nckd = dkd.dkd_terms(torch.tensor(s), torch.tensor(t), torch.tensor(y), T)
        e_tckd, e_nckd = hand_dkd(s, t, y, T)
        assert tckd.item() == pytest.approx(e_tckd, rel=1e-5, abs=1e-7)
        assert nckd.item() == pytest.approx(e_nckd, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 8.0])
def test_kd_equals_tckd_plus_weighted_nckd_eq1(T):
    """Eq. 1 of the paper: KD = TCKD + (1 - p_t^T) NCKD, per sample, with the teacher's p_t at T."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 10, generator=g, dtype=torch.float64) * 3
    t = torch.randn(5, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (5,), generator=g)
    per_sample = []
    for i in range(5):
        tckd, nckd = dkd.dkd_terms(s[i:i + 1], t[i:i + 1], y[i:i + 1], T)
        p_t = softmax_list(t[i].tolist(), T)[int(y[i])]
        kd_i = hand_kd([s[i].tolist()], [t[i].tolist()], T)
        assert kd_i == pytest.approx(tckd.item() + (1 - p_t) * nckd.item(), rel=1e-9)
        per_sample.append(tckd.item() + (1 - p_t) * nckd.item())
    # over the batch the identity holds with each sample's own weight (batchmean of the per-sample sums)
    assert hand_kd(s.tolist(), t.tolist(), T) == pytest.approx(sum(per_sample) / 5, rel=1e-9)


def test_dkd_zero_for_identical_logits():
    z = torch.tensor([[1.0, -2.0, 0.3, 4.0], [0.0, 0.0, 5.0, 1.0]])
    tckd, nckd = dkd.dkd_terms(z, z.clone(), torch.tensor([3, 1]), 4.0)
    assert tckd.item() == pytest.approx(0.0, abs=1e-6)
    assert nckd.item() == pytest.approx(0.0, abs=1e-6)


def test_nckd_ignores_target_logit_and_tckd_only_sees_target_mass():
    s = torch.tensor([[0.5, 1.0, -1.0, 2.0]])
    t = torch.tensor([[1.0, 3.0, 0.0, 0.5]])
    y = torch.tensor([1])
    tckd, nckd = dkd.dkd_terms(s, t, y, 4.0)
    s2, t2 = s.clone(), t.clone()
    s2[0, 1] += 7.0
    t2[0, 1] -= 3.0
    _, nckd2 = dkd.dkd_terms(s2, t2, y, 4.0)
    assert nckd2.item() == pytest.approx(nckd.item(), rel=1e-5)
    # permuting the non-target classes of the student together changes NCKD, not TCKD
    s3 = s[:, [2, 1, 0, 3]]
    tckd3, nckd3 = dkd.dkd_terms(s3, t, y, 4.0)
    assert tckd3.item() == pytest.approx(tckd.item(), rel=1e-5)
    assert nckd3.item() != pytest.approx(nckd.item(), rel=1e-3)


def test_nckd_mask_holds_for_a_very_confident_target():
    # target logit far above the others at T = 1: the -1000 mask still removes it exactly
    s = [[60.0, 0.0, 1.0], [0.0, 40.0, -2.0]]
    t = [[80.0, 2.0, 0.0], [1.0, 70.0, 0.0]]
    y = [0, 1]
    _, nckd = dkd.dkd_terms(torch.tensor(s), torch.tensor(t), torch.tensor(y), 1.0)
    qs = [softmax_list([0.0, 1.0], 1.0), softmax_list([0.0, -2.0], 1.0)]
    qt = [softmax_list([2.0, 0.0], 1.0), softmax_list([1.0, 0.0], 1.0)]
    expected = (kl_list(qt[0], qs[0]) + kl_list(qt[1], qs[1])) / 2
    assert nckd.item() == pytest.approx(expected, rel=1e-5)


def test_dkd_loss_weights_and_gradient_to_student_only():
    s = torch.tensor(STUDENT, requires_grad=True)
    t = torch.tensor(TEACHER)
    y = torch.tensor(LABELS)
    e_tckd, e_nckd = hand_dkd(STUDENT, TEACHER, LABELS, 4.0)
    loss = dkd.dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0)
    assert loss.item() == pytest.approx(e_tckd + 8 * e_nckd, rel=1e-5)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # the defaults are the paper's CIFAR-100 ones
    assert (dkd.ALPHA, dkd.BETA, dkd.TEMPERATURE, dkd.WARMUP_EPOCHS) == (1.0, 8.0, 4.0, 20)


def test_dkd_warmup_counts_from_epoch_one():
    assert dkd.dkd_warmup(1, 20) == pytest.approx(1 / 20)
    assert dkd.dkd_warmup(10, 20) == pytest.approx(0.5)
    assert dkd.dkd_warmup(20, 20) == 1.0
    assert dkd.dkd_warmup(240, 20) == 1.0
    assert dkd.dkd_warmup(0, 20) == 0.0
    assert dkd.dkd_warmup(3, 0) == 1.0
    with pytest.raises(ValueError):
        dkd.dkd_warmup(1, -1)


def test_dkd_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        dkd.dkd_terms(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]), 4.0)
    with pytest.raises(ValueError):
        dkd.dkd_terms(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1, 2]), 4.0)


# ----------------------------------------------------------------------------------------------------------
# CTKD
# ----------------------------------------------------------------------------------------------------------
def test_gradient_reversal_forward_identity_backward_minus_lambda():
    x = torch.tensor([1.5, -2.0, 0.25], requires_grad=True)
    y = ctkd.grad_reverse(x, 0.3)
    assert torch.equal(y, x.detach())
    c = torch.tensor([2.0, -1.0, 4.0])
    (y * c).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([-0.6, 0.3, -1.2]))
    x.grad = None
    (ctkd.grad_reverse(x, 0.0) * c).sum().backward()
    assert torch.equal(x.grad, torch.zeros(3))


def test_global_temperature_init_and_range():
    m = ctkd.GlobalTemperature()
    tau = ctkd.ctkd_temperature(m, 1.0)
    assert tau.dim() == 0
    assert tau.item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)   # 15.62 at w = 1
    assert m.value() == pytest.approx(tau.item())
    for w in (-60.0, -3.0, 0.0, 2.5, 60.0):
        with torch.no_grad():
            m.global_t.fill_(w)
        tau = m(0.5).item()
        assert 1.0 <= tau <= 21.0
        assert tau == pytest.approx(1 + 20 / (1 + math.exp(-w)), rel=1e-6)
    with torch.no_grad():
        m.global_t.fill_(-60.0)
    assert m(1.0).item() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        m.global_t.fill_(60.0)
    assert m(1.0).item() == pytest.approx(21.0, abs=1e-5)


def test_ctkd_kd_loss_hand_value_and_reversed_temperature_gradient():
    s = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
    t = [[3.0, 0.5, -2.0], [0.0, 4.0, 1.0]]
    m = ctkd.GlobalTemperature().double()
    with torch.no_grad():
        m.global_t.fill_(0.2)
    lam = 0.7
    tau = m(lam)
    loss = ctkd.ctkd_kd_loss(torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64), tau)
    w = 0.2

    def tau_of(w_):
        return 1 + 20 / (1 + math.exp(-w_))

    assert loss.item() == pytest.approx(hand_kd(s, t, tau_of(w)), rel=1e-10)
    loss.backward()
    h = 1e-5
    dl_dw = (hand_kd(s, t, tau_of(w + h)) - hand_kd(s, t, tau_of(w - h))) / (2 * h)
    assert m.global_t.grad.item() == pytest.approx(-lam * dl_dw, rel=1e-5)


def test_temperature_step_maximises_kd_while_student_step_minimises_it():
    torch.manual_seed(0)
    s = torch.randn(8, 5, requires_grad=True)
    t = torch.randn(8, 5) * 3
    m = ctkd.GlobalTemperature()
    with torch.no_grad():
        m.global_t.fill_(-1.0)   # tau ~ 6.4, where KD still moves with tau
    loss0 = ctkd.ctkd_kd_loss(s, t, m(1.0))
    loss0.backward()
    lr = 0.1
    with torch.no_grad():
        w0 = m.global_t.clone()
        m.global_t -= lr * m.global_t.grad            # plain descent on the *reversed* gradient
        loss_tau_step = ctkd.ctkd_kd_loss(s, t, m(1.0))
        m.global_t.copy_(w0)
        loss_student_step = ctkd.ctkd_kd_loss(s - lr * s.grad, t, m(1.0))
    assert loss_tau_step.item() > loss0.item()        # the temperature went up the KD loss
    assert loss_student_step.item() < loss0.item()    # the student went down it


def test_cosine_lambda_schedule_endpoints_and_authors_form():
    assert ctkd.cosine_lambda(0) == 0.0
    assert ctkd.cosine_lambda(10) == pytest.approx(1.0)
    assert ctkd.cosine_lambda(240) == pytest.approx(1.0)
    assert ctkd.cosine_lambda(-5) == 0.0
    assert ctkd.cosine_lambda(5) == pytest.approx(0.5)
    assert ctkd.cosine_lambda(1) == pytest.approx((1 - math.cos(math.pi / 10)) / 2)   # 0.0245, epoch 1
    values = [ctkd.cosine_lambda(e) for e in range(12)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    # the authors' CosineDecay(max=0, min=-1, loops=10), whose value multiplies the gradient, is -lambda
    for e in range(15):
        i = min(e, 10)
        authors = (math.cos(i * math.pi / 10) + 1.0) * 0.5 * (0 - (-1)) + (-1)
        assert ctkd.cosine_lambda(e) == pytest.approx(-authors, abs=1e-12)
    assert ctkd.cosine_lambda(3, 0.2, 0.8, 6) == pytest.approx(0.5)
    assert ctkd.cosine_lambda(6, 0.2, 0.8, 6) == pytest.approx(0.8)
    assert ctkd.cosine_lambda(0, 0.2, 0.8, 0) == 0.8


def test_global_temperature_state_dict_round_trip():
    a = ctkd.GlobalTemperature()
    with torch.no_grad():
        a.global_t.fill_(0.37)
    b = ctkd.GlobalTemperature()
    b.load_state_dict(a.state_dict())
    assert b(1.0).item() == a(1.0).item()


# ----------------------------------------------------------------------------------------------------------
# CRD
# ----------------------------------------------------------------------------------------------------------
def unit(angle):
    return [math.cos(angle), math.sin(angle)]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def normalise(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def hand_nce(scores, n_data, eps=1e-7):
    """The NCE loss of the authors' ContrastLoss, with loops: P_n = 1/N, K negatives."""
    K = len(scores[0]) - 1
    total = 0.0
    for row in scores:
        total += math.log(row[0] / (row[0] + K / n_data + eps))
        for p in row[1:]:
            total += math.log((K / n_data) / (p + K / n_data + eps))
    return -total / len(scores)


def test_embed_is_linear_then_l2_normalised():
    e = crd.Embed(12, 8)
    x = torch.randn(3, 3, 2, 2)
    out = e(x)
    assert out.shape == (3, 8)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-6)
    raw = e.linear(x.reshape(3, -1))
    assert torch.allclose(out, raw / raw.norm(dim=1, keepdim=True), atol=1e-6)
    assert crd.Embed(4).linear.out_features == crd.FEAT_DIM == 128


def test_contrast_memory_init_as_repdistiller():
    mem = crd.ContrastMemory(2000, 128, seed=0)
    stdv = 1 / math.sqrt(128 / 3)
    for bank in (mem.memory_s, mem.memory_t):
        assert bank.shape == (2000, 128)
        assert bank.min() >= -stdv and bank.max() <= stdv
        assert bank.pow(2).sum(1).mean().item() == pytest.approx(1.0, abs=0.02)   # unit in expectation
    assert not torch.equal(mem.memory_s, mem.memory_t)
    assert mem.z_s.item() == -1 and mem.z_t.item() == -1
    assert set(mem.state_dict()) >= {"memory_s", "memory_t", "z_s", "z_t"}
    assert (crd.NCE_K, crd.NCE_T, crd.NCE_M, crd.CRD_WEIGHT, crd.CE_WEIGHT, crd.KD_WEIGHT) == \
        (16384, 0.07, 0.5, 0.8, 1.0, 0.0)


def tiny_memory():
    """N = 4, d = 2, K = 2, nce_t = 0.5, momentum 0.5, banks set to known unit vectors."""
    mem = crd.ContrastMemory(4, feat_dim=2, nce_k=2, nce_t=0.5, nce_m=0.5, seed=0)
    ms = [unit(0.0), unit(1.0), unit(2.0), unit(3.0)]
    mt = [unit(0.5), unit(-1.0), unit(2.5), unit(4.0)]
    with torch.no_grad():
        mem.memory_s.copy_(torch.tensor(ms))
        mem.memory_t.copy_(torch.tensor(mt))
    return mem, ms, mt


def test_contrast_memory_scores_z_loss_and_update_by_hand():
    mem, ms, mt = tiny_memory()
    vs = [unit(0.2), unit(2.2)]
    vt = [unit(0.4), unit(1.9)]
    idx = [0, 2]
    neg = [[1, 3], [0, 1]]
    T, N = 0.5, 4
    scores_s, scores_t = mem(torch.tensor(vs), torch.tensor(vt), torch.tensor(idx), torch.tensor(neg))

    raw_s = [[math.exp(dot(mt[j], vs[b]) / T) for j in [idx[b]] + neg[b]] for b in range(2)]
    raw_t = [[math.exp(dot(ms[j], vt[b]) / T) for j in [idx[b]] + neg[b]] for b in range(2)]
    z_s = sum(sum(r) for r in raw_s) / 6 * N
    z_t = sum(sum(r) for r in raw_t) / 6 * N
    exp_s = [[x / z_s for x in r] for r in raw_s]
    exp_t = [[x / z_t for x in r] for r in raw_t]
    assert scores_s.shape == (2, 3) and scores_t.shape == (2, 3)
    assert torch.allclose(scores_s, torch.tensor(exp_s), rtol=1e-5)
    assert torch.allclose(scores_t, torch.tensor(exp_t), rtol=1e-5)
    assert mem.z_s.item() == pytest.approx(z_s, rel=1e-5)
    assert mem.z_t.item() == pytest.approx(z_t, rel=1e-5)

    assert crd.nce_loss(scores_s, N).item() == pytest.approx(hand_nce(exp_s, N), rel=1e-5)
    assert crd.nce_loss(scores_t, N).item() == pytest.approx(hand_nce(exp_t, N), rel=1e-5)

    # the banks took the batch in: momentum 0.5, then back onto the unit circle; rows 1 and 3 untouched
    for b, i in enumerate(idx):
        want_s = normalise([0.5 * a + 0.5 * v for a, v in zip(ms[i], vs[b])])
        want_t = normalise([0.5 * a + 0.5 * v for a, v in zip(mt[i], vt[b])])
        assert torch.allclose(mem.memory_s[i], torch.tensor(want_s), atol=1e-6)
        assert torch.allclose(mem.memory_t[i], torch.tensor(want_t), atol=1e-6)
        assert mem.memory_s[i].norm().item() == pytest.approx(1.0, abs=1e-6)
    for i in (1, 3):
        assert torch.allclose(mem.memory_s[i], torch.tensor(ms[i]))
        assert torch.allclose(mem.memory_t[i], torch.tensor(mt[i]))

    # Z is set once: a second batch is scored with the first batch's Z
    ms1 = mem.memory_s.clone()
    mt1 = mem.memory_t.clone()
    vs2 = [unit(-0.7)]
    vt2 = [unit(1.1)]
    s2, t2 = mem(torch.tensor(vs2), torch.tensor(vt2), torch.tensor([3]), torch.tensor([[0, 2]]))
    assert mem.z_s.item() == pytest.approx(z_s, rel=1e-5)
    want = [math.exp(dot(mt1[j].tolist(), vs2[0]) / T) / z_s for j in (3, 0, 2)]
    assert torch.allclose(s2[0], torch.tensor(want), rtol=1e-5)
    want_t = [math.exp(dot(ms1[j].tolist(), vt2[0]) / T) / z_t for j in (3, 0, 2)]
    assert torch.allclose(t2[0], torch.tensor(want_t), rtol=1e-5)


def test_crd_loss_is_both_anchors_and_trains_the_embeddings_not_the_banks():
    mem, _, _ = tiny_memory()
    vs = torch.tensor([unit(0.2), unit(2.2)], requires_grad=True)
    vt = torch.tensor([unit(0.4), unit(1.9)], requires_grad=True)
    idx, neg = torch.tensor([0, 2]), torch.tensor([[1, 3], [0, 1]])
    mem2, _, _ = tiny_memory()
    s, t = mem2(vs.detach(), vt.detach(), idx, neg)
    expected = hand_nce(s.tolist(), 4) + hand_nce(t.tolist(), 4)
    loss = crd.crd_loss(mem, vs, vt, idx, neg)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert vs.grad.abs().sum() > 0 and vt.grad.abs().sum() > 0
    assert all(not b.requires_grad for b in mem.buffers())


def test_update_false_leaves_banks_alone():
    mem, ms, mt = tiny_memory()
    mem(torch.tensor([unit(0.2)]), torch.tensor([unit(0.4)]), torch.tensor([1]), torch.tensor([[0, 2]]),
        update=False)
    assert torch.allclose(mem.memory_s, torch.tensor(ms)) and torch.allclose(mem.memory_t, torch.tensor(mt))


def test_k_clamps_for_a_tiny_dataset_and_negatives_exclude_the_positive():
    mem = crd.ContrastMemory(5, feat_dim=4, seed=1)          # asks for nce_k = 16384
    assert mem.k == 4
    idx = torch.tensor([0, 3, 4, 3])
    neg = mem.sample_negatives(idx)
    assert neg.shape == (4, 4)
    for row, i in zip(neg.tolist(), idx.tolist()):
        assert sorted(row) == sorted(set(range(5)) - {i})  # K = N - 1: exactly every other sample, once
    v = F.normalize(torch.randn(4, 4), dim=1)
    s, t = mem(v, v, idx)
    assert s.shape == (4, 5) and t.shape == (4, 5)
    with pytest.raises(ValueError):
        crd.ContrastMemory(1, feat_dim=4)


def test_digits_sized_memory_works_with_default_k():
    n = 1437
    head = crd.CRDCriterion(s_dim=32, t_dim=64, n_data=n, seed=0)
    assert head.memory.k == n - 1
    f_s = torch.randn(16, 32)
    f_t = torch.randn(16, 64)
    idx = torch.randperm(n)[:16]
    loss = head(f_s, f_t, idx)
    assert torch.isfinite(loss)
    loss.backward()
    assert head.embed_s.linear.weight.grad.abs().sum() > 0
    assert head.embed_t.linear.weight.grad.abs().sum() > 0


def test_negatives_are_uniform_over_the_others():
    mem = crd.ContrastMemory(6, feat_dim=2, nce_k=1, seed=3)
    draws = mem.sample_negatives(torch.full((6000,), 2)).reshape(-1)
    counts = torch.bincount(draws, minlength=6).tolist()
    assert counts[2] == 0
    for c in counts[:2] + counts[3:]:
        assert abs(c - 1200) < 150


def test_class_negatives_come_from_other_classes():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    mem = crd.ContrastMemory(9, feat_dim=2, seed=0, labels=labels)
    assert mem.k == 9 - 4
    idx = torch.arange(9)
    neg = mem.sample_negatives(idx)
    for i, row in enumerate(neg.tolist()):
        assert all(labels[j] != labels[i] for j in row)
        assert len(set(row)) == len(row)


def test_state_dict_round_trip_restores_banks_and_continues_exactly():
    torch.manual_seed(0)
    n, d = 30, 8
    batches = [(F.normalize(torch.randn(5, d), dim=1), F.normalize(torch.randn(5, d), dim=1),
                torch.randperm(n)[:5]) for _ in range(6)]
    a = crd.ContrastMemory(n, feat_dim=d, nce_k=7, seed=11)
    for v_s, v_t, idx in batches[:3]:
        a(v_s, v_t, idx)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = crd.ContrastMemory(n, feat_dim=d, nce_k=7, seed=999)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for name in ("memory_s", "memory_t", "z_s", "z_t"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    for v_s, v_t, idx in batches[3:]:
        sa, ta = a(v_s, v_t, idx)
        sb, tb = b(v_s, v_t, idx)
        assert torch.equal(sa, sb) and torch.equal(ta, tb)    # same negatives drawn, same Z, same banks
    assert torch.equal(a.memory_s, b.memory_s) and torch.equal(a.memory_t, b.memory_t)


def test_seed_none_follows_the_global_rng():
    torch.manual_seed(5)
    a = crd.ContrastMemory(10, feat_dim=4)
    torch.manual_seed(5)
    b = crd.ContrastMemory(10, feat_dim=4)
    assert torch.equal(a.memory_s, b.memory_s)
    assert torch.equal(a.sample_negatives(torch.tensor([1, 2])), b.sample_negatives(torch.tensor([1, 2])))


def test_loss_lower_when_student_and_teacher_agree():
    torch.manual_seed(0)
    n, d = 50, 16
    x = F.normalize(torch.randn(n, d), dim=1)

    def loss_for(v_s, v_t, idx, neg):
        mem = crd.ContrastMemory(n, feat_dim=d, nce_k=10, seed=0)
        with torch.no_grad():
            mem.memory_s.copy_(x)
            mem.memory_t.copy_(x)
            mem.z_s.fill_(float(n))     # the same Z for both cases
            mem.z_t.fill_(float(n))
        return crd.crd_loss(mem, v_s, v_t, idx, neg, update=False).item()

    idx = torch.arange(8)
    neg = torch.stack([torch.tensor([j for j in range(8, 50)][:10]) for _ in range(8)])
    agree = loss_for(x[idx], x[idx], idx, neg)
    other = x[torch.arange(20, 28)]                  # embeddings of other samples: they disagree with idx
    disagree = loss_for(other, other, idx, neg)
    assert agree < disagree


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    n, d = 40, 8
    v_s, v_t = F.normalize(torch.randn(6, d), dim=1), F.normalize(torch.randn(6, d), dim=1)
    idx = torch.randperm(n)[:6]
    cpu = crd.ContrastMemory(n, feat_dim=d, nce_k=9, seed=4)
    gpu = crd.ContrastMemory(n, feat_dim=d, nce_k=9, seed=4).cuda()
    for _ in range(3):
        sc, tc = cpu(v_s, v_t, idx)
        sg, tg = gpu(v_s.cuda(), v_t.cuda(), idx.cuda())
        assert torch.allclose(sc, sg.cpu(), rtol=1e-4) and torch.allclose(tc, tg.cpu(), rtol=1e-4)
    assert torch.allclose(cpu.memory_s, gpu.memory_s.cpu(), atol=1e-6)
    s = torch.randn(4, 5, device="cuda", requires_grad=True)
    m = ctkd.GlobalTemperature().cuda()
    ctkd.ctkd_kd_loss(s, torch.randn(4, 5, device="cuda"), m(0.5)).backward()
    assert m.global_t.grad is not None
    tckd, nckd = dkd.dkd_terms(s.detach(), torch.randn(4, 5, device="cuda"), torch.tensor([0, 1, 2, 3]).cuda(), 4.0)
    assert torch.isfinite(tckd) and torch.isfinite(nckd)
