"""Relational Knowledge Distillation (RKD) as plain loss functions: Park, Kim, Lu & Cho, "Relational Knowledge
Distillation", CVPR 2019.

Checked against the authors' code, github.com/lenscloth/RKD (metric/loss.py `RkdDistance`, `RKdAngle`, `pdist`;
commit 0a6c3c0), and RepDistiller's port (github.com/HobbitLong/RepDistiller, distiller_zoo/RKD.py `RKDLoss`),
which computes the same two terms.

The paper's potentials (Sec. 3.2) on a mini-batch of embeddings t_1..t_N (teacher) and s_1..s_N (student):
    distance  psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu,  mu = mean of ||t_i - t_j||_2 over the pairs i != j  (eq. 3)
    angle     psi_A(t_i, t_j, t_k) = cos angle t_i t_j t_k = <e_ij, e_kj>,  e_ij = (t_i - t_j) / ||t_i - t_j||_2
and the losses (eqs. 4, 7) match them with the Huber loss l_delta (eq. 5, delta = 1):
    l_delta(x, y) = (x - y)^2 / 2 if |x - y| <= 1 else |x - y| - 1/2      (= F.smooth_l1_loss, beta = 1)
The paper sums over pairs / triplets; the authors' code averages over every entry of the N x N distance matrix
and of the N x N x N cosine tensor, and these functions do what the code does (see each docstring), so the weights
below mean what they meant there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The paper's weights for RKD-D and RKD-A in its image-classification experiments (lambda_RKD-D = 25,
# lambda_RKD-A = 50; CIFAR-100 / Tiny ImageNet, RKD on the final embedding); RepDistiller's RKDLoss(w_d=25, w_a=50)
# and mdistiller's CFG.RKD.DISTANCE_WEIGHT / ANGLE_WEIGHT use the same. The authors' metric-learning README runs
# --dist_ratio 1 --angle_ratio 2 (the same 1:2 ratio at a smaller scale).
DISTANCE_WEIGHT = 25.0
ANGLE_WEIGHT = 50.0

# The authors' pdist clamps squared distances at 1e-12 before the square root (no infinite gradient at 0).
_EPS = 1e-12


def _floating(tensor: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (exact checks); everything else is computed in float32."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _embeddings(student_emb: torch.Tensor, teacher_emb: torch.Tensor, name: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    if student_emb.dim() < 2 or teacher_emb.dim() < 2:
        raise ValueError(f"{name}: student {tuple(student_emb.shape)}, teacher {tuple(teacher_emb.shape)}: "
                         "expected (N, D) embeddings (more dimensions are flattened)")
    if student_emb.shape[0] != teacher_emb.shape[0]:
        raise ValueError(f"{name}: batch sizes differ: student {student_emb.shape[0]}, teacher {teacher_emb.shape[0]}")
    # (N, D_s) and (N, D_t): the widths may differ, relations are compared, not the embeddings themselves
    return _floating(student_emb).flatten(1), _floating(teacher_emb).detach().flatten(1)


def pairwise_distances(emb: torch.Tensor) -> torch.Tensor:
    """(N, N) Euclidean distances ||e_i - e_j||_2, zero on the diagonal.

    The authors' pdist forms them as sqrt(|a|^2 + |b|^2 - 2 a.b), clamped at 1e-12; here the differences are taken
    directly (no cancellation when embeddings are close), with the same clamp: two identical embeddings off the
    diagonal are 1e-6 apart, as in their code, and the gradient stays finite. The diagonal is set to zero outside
    the graph, as theirs is.
    """
    squared = (emb[:, None, :] - emb[None, :, :]).pow(2).sum(dim=2)
    eye = torch.eye(len(emb), dtype=torch.bool, device=emb.device)
    return torch.where(eye, torch.zeros_like(squared), squared.clamp(min=_EPS).sqrt())


def _normalised_distances(emb: torch.Tensor) -> torch.Tensor:
    distances = pairwise_distances(emb)
    return distances / distances[distances > 0].mean()


def rkd_distance_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD-D (eq. 4), as the authors' RkdDistance computes it:

        d_ij = ||e_i - e_j||_2 / mu,   mu = mean of the non-zero (off-diagonal) distances of the batch
        loss = smooth_l1(d^S, d^T), mean over all N * N entries (the diagonal, 0 on both sides, adds no loss but
               counts in the mean; the paper writes a sum over pairs)

    Each network's distances are normalised by its own mu, so the loss does not change when the student's
    embeddings are scaled. Embeddings are (N, D) (anything with more dimensions is flattened per sample); student
    and teacher widths may differ. The teacher side carries no gradient (the authors compute it under no_grad).
    A batch of one sample has no pair: the loss is 0 (the authors' code would give NaN, the mean of nothing).
    """
    student, teacher = _embeddings(student_emb, teacher_emb, "rkd_distance_loss")
    if len(student) < 2:
        return student.sum() * 0.0
    with torch.no_grad():
        teacher_distances = _normalised_distances(teacher)
    student_distances = _normalised_distances(student)
    return F.smooth_l1_loss(student_distances, teacher_distances.to(student_distances.dtype), reduction="mean")


def _cosines(emb: torch.Tensor) -> torch.Tensor:
    # directions[j, i] = unit(e_i - e_j); cosines[j, i, k] = <unit(e_i - e_j), unit(e_k - e_j)>, the angle at j.
    # F.normalize leaves the zero vector (i == j) zero, so a triplet with i == j or k == j has cosine 0.
    directions = F.normalize(emb[None, :, :] - emb[:, None, :], p=2, dim=2)
    return torch.bmm(directions, directions.transpose(1, 2))


def rkd_angle_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD-A (eq. 7), as the authors' RKdAngle computes it:

        cos_ijk = < (e_i - e_j)/||e_i - e_j||, (e_k - e_j)/||e_k - e_j|| >     (the angle at e_j)
        loss = smooth_l1(cos^S, cos^T), mean over all N^3 ordered triplets (i, j, k)

    Like the authors' code, the mean runs over every (i, j, k), degenerate ones included: i == j or k == j gives a
    zero vector, cosine 0 on both sides, and i == k gives cosine 1 on both sides, so they add no loss but count in
    the N^3 of the mean (the paper writes a sum over triplets). Angles do not change when either network's
    embeddings are scaled or shifted. Memory is N^2 * D + N^3. The teacher side carries no gradient.
    """
    student, teacher = _embeddings(student_emb, teacher_emb, "rkd_angle_loss")
    with torch.no_grad():
        teacher_cosines = _cosines(teacher)
    student_cosines = _cosines(student)
    return F.smooth_l1_loss(student_cosines, teacher_cosines.to(student_cosines.dtype), reduction="mean")


# ---- the method ---------------------------------------------------------------------------------
from kdtune.config import Param  # noqa: E402
from kdtune.distill.base import READS_FEATURES, Method, Outputs  # noqa: E402
from kdtune.config import EMBEDDING  # noqa: E402


class RelationalKD(Method):
    """Relational KD: hard_weight * CE + distance and angle relations of the penultimate embeddings."""

    name = "rkd"
    needs_teacher = True
    reads = frozenset({READS_FEATURES})
    params = (Param("distance_weight", DISTANCE_WEIGHT, low=0.0, search=(1.0, 100.0), log=True, short="wd",
                    help="weight of the distance-wise term (paper: 25)"),
              Param("angle_weight", ANGLE_WEIGHT, low=0.0, search=(1.0, 200.0), log=True, short="wa",
                    help="weight of the angle-wise term (paper: 50)"))
    paper = "Park, Kim, Lu & Cho, Relational Knowledge Distillation, CVPR 2019"

    def link_keys(self) -> tuple[str, ...]:
        return (EMBEDDING,)

    def losses(self, out: Outputs) -> dict:
        terms = super().losses(out)
        student, teacher = out.student_features[EMBEDDING], out.teacher_features[EMBEDDING]
        if self.config.distance_weight > 0:
            terms["distance"] = self.config.distance_weight * rkd_distance_loss(student, teacher)
        if self.config.angle_weight > 0:
            terms["angle"] = self.config.angle_weight * rkd_angle_loss(student, teacher)
        return terms
