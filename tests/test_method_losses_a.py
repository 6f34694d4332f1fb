"""AT, RKD, DIST and logit standardisation against their papers' formulas, by hand on tiny tensors.

Every expected value is worked out independently of the code under test: explicit Python loops over nested lists
(math only), or a closed form from elementary geometry, never the vectorised implementation. float64 throughout,
so the comparisons can be tight.
"""
from __future__ import annotations

import math

import pytest
import torch

from kdtune.distill.at import PAPER_BETA, attention_loss, attention_map
from kdtune.distill.dist import dist_loss, inter_class_loss, intra_class_loss, pearson_rows
from kdtune.distill.losses import standardize_logits
from kdtune.distill.rkd import ANGLE_WEIGHT, DISTANCE_WEIGHT, rkd_angle_loss, rkd_distance_loss

D = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def huber(x: float) -> float:
    """The Huber loss of RKD's eq. 5 with delta = 1 (PyTorch's smooth_l1 at beta = 1), on one difference."""
    return 0.5 * x * x if abs(x) <= 1 else abs(x) - 0.5


# ----------------------------------------------------------------------------------------------- attention transfer

# (N=2, C=2, H=2, W=2), signs mixed: p = 2 squares them away
AT_STUDENT = [[[[1.0, -2.0], [0.5, 0.0]], [[3.0, 1.0], [-1.0, 2.0]]],
              [[[0.0, 1.0], [1.0, 1.0]], [[2.0, -2.0], [0.0, 4.0]]]]
AT_TEACHER = [[[[2.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [3.0, -1.0]]],
              [[[1.0, 2.0], [0.0, -3.0]], [[0.5, 0.5], [2.0, 1.0]]]]


def at_map_by_hand(feature, p=2.0):
    """Per sample: Q[h][w] = mean_c |A[c][h][w]|^p, flattened row by row, divided by its L2 norm."""
    maps = []
    for sample in feature:
        channels, height, width = len(sample), len(sample[0]), len(sample[0][0])
        q = [sum(abs(sample[c][h][w]) ** p for c in range(channels)) / channels
             for h in range(height) for w in range(width)]
        norm = math.sqrt(sum(v * v for v in q))
        maps.append([v / norm for v in q])
    return maps


def at_loss_by_hand(student, teacher, p=2.0):
    qs, qt = at_map_by_hand(student, p), at_map_by_hand(teacher, p)
    squares = [(a - b) ** 2 for row_s, row_t in zip(qs, qt) for a, b in zip(row_s, row_t)]
    return sum(squares) / len(squares)  # the mean over N * H * W


def test_attention_map_is_channel_mean_of_powers_normalised_per_sample():
    # sample 0: squares averaged over the 2 channels: [(1+9)/2, (4+1)/2, (0.25+1)/2, (0+4)/2] = [5, 2.5, 0.625, 2]
    raw = [5.0, 2.5, 0.625, 2.0]
    norm = math.sqrt(sum(v * v for v in raw))
    q = attention_map(t(AT_STUDENT))
    assert q.shape == (2, 4)
    assert q[0].tolist() == pytest.approx([v / norm for v in raw], rel=1e-12)
    assert q[1].tolist() == pytest.approx(at_map_by_hand(AT_STUDENT)[1], rel=1e-12)
    assert q.norm(dim=1).tolist() == pytest.approx([1.0, 1.0], rel=1e-12)


def test_attention_map_p1_uses_absolute_values():
    # p = 1: mean_c |A_c|; sample 0: [(1+3)/2, (2+1)/2, (0.5+1)/2, (0+2)/2] = [2, 1.5, 0.75, 1]
    raw = [2.0, 1.5, 0.75, 1.0]
    norm = math.sqrt(sum(v * v for v in raw))
    assert attention_map(t(AT_STUDENT), p=1)[0].tolist() == pytest.approx([v / norm for v in raw], rel=1e-12)


def test_attention_loss_is_mean_squared_difference_of_normalised_maps():
    expected = at_loss_by_hand(AT_STUDENT, AT_TEACHER)
    assert attention_loss(t(AT_STUDENT), t(AT_TEACHER)).item() == pytest.approx(expected, rel=1e-12)
    assert attention_loss(t(AT_STUDENT), t(AT_TEACHER), p=1).item() == pytest.approx(
        at_loss_by_hand(AT_STUDENT, AT_TEACHER, p=1.0), rel=1e-12)
    assert PAPER_BETA == 1000.0


def test_attention_loss_zero_for_identical_maps_and_unchanged_by_scaling_a_map():
    student, teacher = t(AT_STUDENT), t(AT_TEACHER)
    assert attention_loss(student, student).item() == pytest.approx(0.0, abs=1e-15)
    # the maps are L2-normalised: a positive (or negative, for even p) factor on a feature map changes nothing
    base = attention_loss(student, teacher).item()
    assert attention_loss(7.5 * student, teacher).item() == pytest.approx(base, rel=1e-12)
    assert attention_loss(student, 0.01 * teacher).item() == pytest.approx(base, rel=1e-12)
    assert attention_loss(-student, teacher).item() == pytest.approx(base, rel=1e-12)


def test_attention_loss_accepts_different_channel_counts():
    # a 3-channel student: channel means of squares; teacher keeps its 2 channels
    student = [[sample[0], sample[1], [[1.0, 1.0], [1.0, 1.0]]] for sample in AT_STUDENT]
    expected = at_loss_by_hand(student, AT_TEACHER)
    assert attention_loss(t(student), t(AT_TEACHER)).item() == pytest.approx(expected, rel=1e-12)


def test_attention_loss_pools_the_larger_map_down_to_the_smaller():
    # student (1, 1, 4, 4), teacher (1, 2, 2, 2): the student is average-pooled over 2x2 blocks first
    big = [[[[1.0, 2.0, 0.0, 1.0], [3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 2.0, 2.0]]]]
    pooled = [[[[sum(big[0][0][2 * h + a][2 * w + b] for a in range(2) for b in range(2)) / 4 for w in range(2)]
                for h in range(2)]]]
    assert pooled == [[[[2.0, 0.5], [0.5, 3.0]]]]
    teacher = [AT_TEACHER[0]]
    expected = at_loss_by_hand(pooled, teacher)
    assert attention_loss(t(big), t(teacher)).item() == pytest.approx(expected, rel=1e-12)
    # the other way round: the teacher is the larger one
    assert attention_loss(t(teacher), t(big)).item() == pytest.approx(expected, rel=1e-12)


def test_attention_loss_on_one_dimensional_signal_maps():
    # (N=2, C=2, L=3): Q = channel mean of squares over the 3 positions
    student = [[[1.0, 0.0, 2.0], [1.0, 2.0, 0.0]], [[0.0, 3.0, 1.0], [1.0, 1.0, 1.0]]]
    teacher = [[[2.0, 1.0, 1.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [2.0, 0.0, 1.0]]]

    def as_2d(x):  # (C, L) read as (C, 1, L)
        return [[[row] for row in sample] for sample in x]

    expected = at_loss_by_hand(as_2d(student), as_2d(teacher))
    assert attention_loss(t(student), t(teacher)).item() == pytest.approx(expected, rel=1e-12)
    # different lengths: the longer one is pooled (length 6 -> 3, pairs averaged)
    long = [[[1.0, 3.0, 0.0, 0.0, 2.0, 1.0], [0.0, 2.0, 2.0, 4.0, 0.0, 1.0]],
            [[0.0, 0.0, 3.0, 1.0, 1.0, 2.0], [1.0, 1.0, 1.0, 2.0, 0.0, 1.0]]]
    pooled = [[[(row[2 * i] + row[2 * i + 1]) / 2 for i in range(3)] for row in sample] for sample in long]
    assert pooled == [[[2.0, 0.0, 1.5], [1.0, 3.0, 0.5]], [[0.0, 2.0, 1.5], [1.0, 1.5, 0.5]]]
    assert attention_loss(t(long), t(teacher)).item() == pytest.approx(
        at_loss_by_hand(as_2d(pooled), as_2d(teacher)), rel=1e-12)


def test_attention_loss_gradient_reaches_the_student_only():
    student = t(AT_STUDENT).requires_grad_()
    teacher = t(AT_TEACHER).requires_grad_()
    attention_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_attention_loss_refuses_mismatched_inputs():
    with pytest.raises(ValueError):
        attention_loss(torch.ones(2, 3, 4, 4), torch.ones(3, 3, 4, 4))
    with pytest.raises(ValueError):
        attention_loss(torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4))
    with pytest.raises(ValueError):
        attention_map(torch.ones(2, 3))


# --------------------------------------------------------------------------------------- relational KD (distance)

# 3 x 4 embeddings
RKD_STUDENT = [[1.0, 0.0, 2.0, -1.0], [0.0, 1.0, 1.0, 0.0], [2.0, 2.0, 0.0, 1.0]]
RKD_TEACHER = [[0.0, 0.0, 0.0, 1.0], [3.0, 0.0, 1.0, 0.0], [1.0, -1.0, 2.0, 2.0]]


def rkd_distance_by_hand(student, teacher):
    def normalised(emb):
        n = len(emb)
        d = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(emb[i], emb[j]))) for j in range(n)] for i in range(n)]
        off = [d[i][j] for i in range(n) for j in range(n) if i != j]
        mu = sum(off) / len(off)
        return [[d[i][j] / mu for j in range(n)] for i in range(n)]
    ds, dt = normalised(student), normalised(teacher)
    n = len(student)
    return sum(huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / (n * n)


def test_rkd_distance_loss_by_hand():
    expected = rkd_distance_by_hand(RKD_STUDENT, RKD_TEACHER)
    assert rkd_distance_loss(t(RKD_STUDENT), t(RKD_TEACHER)).item() == pytest.approx(expected, rel=1e-10)


def test_rkd_distance_loss_closed_form_triangles():
    # student: equilateral triangle (every normalised distance 1); teacher: right isosceles, legs 1, hypotenuse
    # sqrt 2, mean distance (2 + sqrt 2) / 3, so legs -> 3 / (2 + sqrt 2), hypotenuse -> 3 sqrt 2 / (2 + sqrt 2).
    # 9 entries: 3 zero diagonals, 4 ordered legs, 2 ordered hypotenuses.
    equilateral = [[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]]
    right = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    leg, hyp = 3 / (2 + math.sqrt(2)), 3 * math.sqrt(2) / (2 + math.sqrt(2))
    expected = (4 * 0.5 * (1 - leg) ** 2 + 2 * 0.5 * (1 - hyp) ** 2) / 9
    assert rkd_distance_loss(t(equilateral), t(right)).item() == pytest.approx(expected, rel=1e-10)


def test_rkd_distance_loss_huber_linear_branch():
    # collinear points whose normalised distances differ by more than 1: the Huber loss is |x| - 1/2 there
    student = [[0.0, 0.0], [5.0, 0.0], [5.01, 0.0]]
    teacher = [[0.0, 0.0, 0.0], [0.01, 0.0, 0.0], [10.0, 0.0, 0.0]]
    # pair (0, 1): student 5 / mean(5, 5.01, 0.01), teacher 0.01 / mean(0.01, 10, 9.99): they differ by ~1.5
    assert 5 / (10.02 / 3) - 0.01 / (20 / 3) > 1
    expected = rkd_distance_by_hand(student, teacher)
    assert rkd_distance_loss(t(student), t(teacher)).item() == pytest.approx(expected, rel=1e-10)


def test_rkd_distance_loss_zero_for_identical_and_invariant_to_student_scale():
    student, teacher = t(RKD_STUDENT), t(RKD_TEACHER)
    assert rkd_distance_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-15)
    base = rkd_distance_loss(student, teacher).item()
    assert rkd_distance_loss(40.0 * student, teacher).item() == pytest.approx(base, rel=1e-10)
    assert rkd_distance_loss(0.001 * student + 3.0, teacher).item() == pytest.approx(base, rel=1e-10)


def test_rkd_flattens_extra_dimensions():
    # (3, 2, 2) is read as (3, 4)
    student = t(RKD_STUDENT)
    assert rkd_distance_loss(student.reshape(3, 2, 2), t(RKD_TEACHER)).item() == pytest.approx(
        rkd_distance_by_hand(RKD_STUDENT, RKD_TEACHER), rel=1e-10)
    assert rkd_angle_loss(student.reshape(3, 2, 2), t(RKD_TEACHER)).item() == pytest.approx(
        rkd_angle_by_hand(RKD_STUDENT, RKD_TEACHER), rel=1e-10)


def test_rkd_distance_loss_with_a_duplicate_embedding_stays_finite():
    student = t([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]]).requires_grad_()
    loss = rkd_distance_loss(student, t(RKD_TEACHER))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_rkd_distance_loss_single_sample_is_zero():
    student = torch.ones(1, 4, dtype=D, requires_grad=True)
    loss = rkd_distance_loss(student, torch.ones(1, 8, dtype=D))
    assert loss.item() == 0.0
    loss.backward()


# ------------------------------------------------------------------------------------------ relational KD (angle)

def rkd_angle_by_hand(student, teacher):
    def cosines(emb):
        n = len(emb)
        out = {}
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u = [a - b for a, b in zip(emb[i], emb[j])]
                    v = [a - b for a, b in zip(emb[k], emb[j])]
                    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
                    # a zero vector (i == j or k == j) has no direction: cosine 0, the authors' convention
                    out[i, j, k] = 0.0 if nu == 0 or nv == 0 else sum(a * b for a, b in zip(u, v)) / (nu * nv)
        return out
    cs, ct = cosines(student), cosines(teacher)
    return sum(huber(cs[key] - ct[key]) for key in cs) / len(cs)  # mean over all N^3 ordered triplets


def test_rkd_angle_loss_by_hand():
    expected = rkd_angle_by_hand(RKD_STUDENT, RKD_TEACHER)
    assert rkd_angle_loss(t(RKD_STUDENT), t(RKD_TEACHER)).item() == pytest.approx(expected, rel=1e-10)


def test_rkd_angle_loss_closed_form_triangles():
    # equilateral (every angle 60 deg, cosine 1/2) against right isosceles (90, 45, 45 deg: cosines 0, r, r with
    # r = sqrt(2)/2). At each vertex the two ordered proper triplets carry the angle; the rest match (0 or 1).
    equilateral = [[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]]
    right = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    r = math.sqrt(2) / 2
    expected = (2 * 0.5 * 0.5 ** 2 + 4 * 0.5 * (r - 0.5) ** 2) / 27
    assert rkd_angle_loss(t(equilateral), t(right)).item() == pytest.approx(expected, rel=1e-10)
    # angles ignore a rotation, a shift and a scale of either side, and the embedding's width
    rotated = [[0.0, 0.0, 7.0, 0.0], [0.0, 3.0, 7.0, 0.0], [-3.0, 0.0, 7.0, 0.0]]  # the right triangle, x3, moved
    assert rkd_angle_loss(t(equilateral), t(rotated)).item() == pytest.approx(expected, rel=1e-10)


def test_rkd_angle_loss_zero_for_identical_and_invariant_to_scale():
    student, teacher = t(RKD_STUDENT), t(RKD_TEACHER)
    assert rkd_angle_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-15)
    base = rkd_angle_loss(student, teacher).item()
    assert rkd_angle_loss(0.2 * student - 1.0, teacher).item() == pytest.approx(base, rel=1e-10)


def test_rkd_gradients_reach_the_student_only():
    for loss_fn in (rkd_distance_loss, rkd_angle_loss):
        student = t(RKD_STUDENT).requires_grad_()
        teacher = t(RKD_TEACHER).requires_grad_()
        loss_fn(student, teacher).backward()
        assert teacher.grad is None
        assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_rkd_weights_are_the_papers():
    assert (DISTANCE_WEIGHT, ANGLE_WEIGHT) == (25.0, 50.0)


def test_rkd_refuses_mismatched_batches():
    with pytest.raises(ValueError):
        rkd_distance_loss(torch.ones(3, 4), torch.ones(4, 4))
    with pytest.raises(ValueError):
        rkd_angle_loss(torch.ones(3), torch.ones(3))


# ------------------------------------------------------------------------------------------------------------ DIST

# 3 samples x 4 classes, rows sum to 1
P_S = [[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.4, 0.1]]
P_T = [[0.05, 0.15, 0.5, 0.3], [0.4, 0.3, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1]]


def pearson_by_hand(x, y, eps=1e-8):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return cov / (sx * sy + eps)


def columns(m):
    return [[row[j] for row in m] for j in range(len(m[0]))]


def inter_by_hand(ps, pt):
    return 1 - sum(pearson_by_hand(a, b) for a, b in zip(ps, pt)) / len(ps)


def intra_by_hand(ps, pt):
    return inter_by_hand(columns(ps), columns(pt))


def softmax_by_hand(z, tau):
    exps = [math.exp(v / tau) for v in z]
    return [e / sum(exps) for e in exps]


def test_pearson_rows_by_hand():
    # row 1: x = [0.7, .1, .1, .1] (mean .25), y = [.4, .3, .2, .1] (mean .25);
    # cov = .45*.15 + (-.15)(.05) + (-.15)(-.05) + (-.15)(-.15) = .09; |x| = sqrt(.27), |y| = sqrt(.05)
    rho = pearson_rows(t(P_S), t(P_T), eps=0.0)
    assert rho[1].item() == pytest.approx(0.09 / math.sqrt(0.27 * 0.05), rel=1e-12)
    assert rho.tolist() == pytest.approx([pearson_by_hand(a, b, 0.0) for a, b in zip(P_S, P_T)], rel=1e-12)
    assert pearson_rows(t(P_S), t(P_T)).tolist() == pytest.approx(
        [pearson_by_hand(a, b) for a, b in zip(P_S, P_T)], rel=1e-12)


def test_inter_and_intra_class_losses_by_hand():
    assert inter_class_loss(t(P_S), t(P_T)).item() == pytest.approx(inter_by_hand(P_S, P_T), rel=1e-12)
    assert intra_class_loss(t(P_S), t(P_T)).item() == pytest.approx(intra_by_hand(P_S, P_T), rel=1e-12)


def test_dist_loss_by_hand_with_tau_squared_and_weights():
    z_s = [[1.0, 2.0, 0.0, -1.0], [0.5, 0.5, 3.0, 1.0], [2.0, -2.0, 1.0, 0.0]]
    z_t = [[3.0, 1.0, 0.0, 0.0], [0.0, 1.0, 4.0, 2.0], [1.0, 0.0, 2.0, 1.0]]
    tau, beta, gamma = 2.0, 0.5, 3.0
    ps = [softmax_by_hand(row, tau) for row in z_s]
    pt = [softmax_by_hand(row, tau) for row in z_t]
    terms = dist_loss(t(z_s), t(z_t), tau, beta=beta, gamma=gamma)
    assert set(terms) == {"inter", "intra"}
    assert terms["inter"].item() == pytest.approx(tau**2 * beta * inter_by_hand(ps, pt), rel=1e-10)
    assert terms["intra"].item() == pytest.approx(tau**2 * gamma * intra_by_hand(ps, pt), rel=1e-10)
    # defaults beta = gamma = 1; tau = 1 has no factor
    terms = dist_loss(t(z_s), t(z_t), 1.0)
    ps1 = [softmax_by_hand(row, 1.0) for row in z_s]
    pt1 = [softmax_by_hand(row, 1.0) for row in z_t]
    assert terms["inter"].item() == pytest.approx(inter_by_hand(ps1, pt1), rel=1e-10)
    assert terms["intra"].item() == pytest.approx(intra_by_hand(ps1, pt1), rel=1e-10)


def test_dist_loss_zero_for_identical_logits():
    z = t([[1.0, 2.0, 0.0, -1.0], [0.5, 0.5, 3.0, 1.0], [2.0, -2.0, 1.0, 0.0]])
    terms = dist_loss(z, z.clone(), 4.0)
    # only the eps of the authors' Pearson separates it from 0 (1 - s / (s + 1e-8), times tau^2)
    assert terms["inter"].item() == pytest.approx(0.0, abs=1e-4)
    assert terms["intra"].item() == pytest.approx(0.0, abs=1e-4)
    assert 1 - pearson_rows(z, z, eps=0.0).mean().item() == pytest.approx(0.0, abs=1e-14)


def test_inter_class_loss_invariant_to_affine_maps_of_each_sample():
    # a_i * p_i + b_i, a_i > 0: the student may be more or less confident than the teacher (DIST's point)
    ps, pt = t(P_S), t(P_T)
    scale, shift = t([[3.0], [0.2], [10.0]]), t([[-0.1], [0.5], [2.0]])
    base = inter_class_loss(ps, pt).item()
    assert inter_class_loss(scale * ps + shift, pt).item() == pytest.approx(base, rel=1e-6)
    assert inter_class_loss(ps, scale * pt + shift).item() == pytest.approx(base, rel=1e-6)
    # a negative scale reverses the ranking: the correlation changes sign
    assert inter_class_loss(-ps, pt).item() == pytest.approx(2 - base, rel=1e-6)


def test_intra_class_loss_invariant_to_affine_maps_of_each_class():
    ps, pt = t(P_S), t(P_T)
    scale, shift = t([[2.0, 0.5, 7.0, 1.5]]), t([[0.3, -0.2, 0.0, 1.0]])
    base = intra_class_loss(ps, pt).item()
    assert intra_class_loss(scale * ps + shift, pt).item() == pytest.approx(base, rel=1e-6)
    # per-sample maps mix the columns' scales: intra-class is not invariant to them (inter-class is)
    per_sample = t([[3.0], [0.2], [10.0]]) * ps
    assert intra_class_loss(per_sample, pt).item() != pytest.approx(base, rel=1e-3)


def test_dist_gradients_reach_the_student_only():
    student = t([[1.0, 2.0, 0.0, -1.0], [0.5, 0.5, 3.0, 1.0], [2.0, -2.0, 1.0, 0.0]]).requires_grad_()
    teacher = t([[3.0, 1.0, 0.0, 0.0], [0.0, 1.0, 4.0, 2.0], [1.0, 0.0, 2.0, 1.0]]).requires_grad_()
    terms = dist_loss(student, teacher, 4.0)
    (terms["inter"] + terms["intra"]).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_dist_refuses_mismatched_logits():
    with pytest.raises(ValueError):
        dist_loss(torch.ones(3, 4), torch.ones(3, 5), 1.0)


# -------------------------------------------------------------------------------------------- logit standardisation

def test_standardize_logits_by_hand_unbiased_std():
    # row [1, 2, 3, 6]: mean 3, deviations [-2, -1, 0, 3], sum of squares 14, unbiased variance 14 / 3
    z = [[1.0, 2.0, 3.0, 6.0], [0.0, -1.0, 4.0, 1.0], [2.0, 2.5, 2.0, 1.5]]
    out = standardize_logits(t(z))
    std0 = math.sqrt(14 / 3)
    assert out[0].tolist() == pytest.approx([-2 / std0, -1 / std0, 0.0, 3 / std0], rel=1e-6, abs=1e-12)
    for row, got in zip(z, out.tolist()):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
        assert got == pytest.approx([(v - mean) / (std + 1e-7) for v in row], rel=1e-12, abs=1e-15)


def test_standardize_logits_rows_have_mean_zero_std_one():
    z = torch.randn(5, 10, dtype=D, generator=torch.Generator().manual_seed(0)) * 6 + 2
    out = standardize_logits(z)
    assert out.mean(dim=1).abs().max().item() < 1e-12
    assert out.std(dim=1).tolist() == pytest.approx([1.0] * 5, rel=1e-6)


def test_standardize_logits_invariant_to_shift_and_scale_of_a_row():
    z = t([[1.0, 2.0, 3.0, 6.0], [0.0, -1.0, 4.0, 1.0]])
    scale, shift = t([[5.0], [0.1]]), t([[-3.0], [100.0]])
    assert torch.allclose(standardize_logits(scale * z + shift), standardize_logits(z), rtol=1e-6, atol=1e-9)
    # a constant row becomes zeros (eps keeps it finite)
    assert standardize_logits(t([[2.0, 2.0, 2.0]])).tolist() == [[0.0, 0.0, 0.0]]


def test_standardize_logits_dtype_and_gradient():
    assert standardize_logits(torch.ones(2, 3, dtype=torch.float16)).dtype == torch.float32
    assert standardize_logits(torch.ones(2, 3, dtype=D)).dtype == D
    z = t([[1.0, 2.0, 3.0, 6.0]]).requires_grad_()
    (standardize_logits(z) * t([[1.0, 0.0, 0.0, 0.0]])).sum().backward()
    # the output ignores shifts of the row, so the gradient sums to 0 over the row
    assert z.grad.sum().item() == pytest.approx(0.0, abs=1e-12)
