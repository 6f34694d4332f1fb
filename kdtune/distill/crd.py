"""Contrastive Representation Distillation (CRD): Tian, Krishnan, Isola, "Contrastive Representation
Distillation", ICLR 2020 (arXiv:1910.10699). Modules and loss functions only; a kdtune Method wraps them.

Student and teacher features (penultimate, pooled) go through their own linear head to feat_dim and are L2
normalised (``Embed``). A memory bank per side holds one unit vector per training sample. For each sample i
of a batch, with K negatives j_1..j_K drawn from the other samples,
    student anchor: P_s(i, j) = exp(<v_s,i, m_t,j> / nce_t) / Z_s      (against the *teacher* bank)
    teacher anchor: P_t(i, j) = exp(<v_t,i, m_s,j> / nce_t) / Z_t      (against the *student* bank)
and each side's NCE loss (the code's ``ContrastLoss``, "eq. 18"; P_n = 1/N the uniform noise distribution)
    L = -1/B * sum_i [ log D(P(i, i)) + sum_k log(1 - D(P(i, j_k))) ],   D(P) = P / (P + K * P_n + eps)
    (written as the code does: log(1 - D) = log(K * P_n / (P + K * P_n + eps)), eps = 1e-7)
CRD = L_s + L_t. Z_s, Z_t are estimated once, from the first batch: Z = mean of that batch's exp scores * N.
After scoring, the banks move towards the batch: m_i <- normalise(nce_m * m_i + (1 - nce_m) * v_i).

Checked by reading HobbitLong/RepDistiller (commit b84f547): crd/memory.py (ContrastMemory: bank init
uniform in [-stdv, stdv] with stdv = 1 / sqrt(feat_dim / 3), scores, Z from the first batch, the momentum
update with renormalisation), crd/criterion.py (CRDLoss = criterion_s(out_s) + criterion_t(out_t),
ContrastLoss, Embed, Normalize), dataset/cifar100.py (CIFAR100InstanceSample: mode "exact" draws the K
negatives of a sample from the samples of the *other classes*, without replacement when there are enough),
train_student.py and scripts/run_cifar_distill.sh (defaults below); megvii-research/mdistiller's port
(mdistiller/distillers/CRD.py, engine/cfg.py CFG.CRD) has the same code and numbers.

Differences from the authors, on purpose:
  * negatives come from a ``torch.Generator`` the memory owns (seeded by ``seed``, or from the global RNG
    once at construction when seed is None), on the CPU whatever the banks' device, so a run draws the same
    negatives on any device; its state is in the module's state_dict (extra state), so a resumed run draws
    exactly the negatives an uninterrupted one would. The banks' initial values come from it too.
  * by default negatives are drawn uniformly, without replacement, among the N - 1 samples other than the
    positive (RepDistiller's fallback sampler, AliasMethod over uniform unigrams, can draw the positive itself
    and draws with replacement); pass ``labels`` (the training set's labels) for the authors' CIFAR "exact"
    mode, negatives from the other classes only. K = min(nce_k, N - 1) (labels: N minus the largest class),
    so a small dataset such as digits (~1,400 samples) works with the default nce_k = 16384.
  * the bank initialisation is the authors' (rows are unit only in expectation, E||m||^2 = 1); Z is estimated
    from those rows, as theirs is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# RepDistiller train_student.py argument defaults (and mdistiller engine/cfg.py CFG.CRD.*)
FEAT_DIM = 128       # --feat_dim
NCE_K = 16384        # --nce_k
NCE_T = 0.07         # --nce_t
NCE_M = 0.5          # --nce_m
EPS = 1e-7           # crd/criterion.py eps
# Loss weights of the best CIFAR-100 CRD run, RepDistiller README / scripts/run_cifar_distill.sh:
# "--distill crd -a 0 -b 0.8" with -r (gamma, CE weight) at its default 1 (mdistiller CFG.CRD.LOSS:
# CE_WEIGHT 1.0, FEAT_WEIGHT 0.8); "CRD+KD" is -a 1 -b 0.8.
CE_WEIGHT = 1.0
KD_WEIGHT = 0.0
CRD_WEIGHT = 0.8


class Embed(nn.Module):
    """Linear head to feat_dim, then L2 normalisation of each row (RepDistiller crd/criterion.py Embed).
    Inputs are flattened to (B, -1) first. Normalisation is F.normalize (x / max(||x||, 1e-12)): the authors'
    x / ||x|| except that a zero row gives 0 instead of NaN."""

    def __init__(self, dim_in: int, dim_out: int = FEAT_DIM):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.reshape(x.shape[0], -1)), p=2, dim=1)


class ContrastMemory(nn.Module):
    """The two memory banks of CRD and its NCE scores (RepDistiller crd/memory.py ContrastMemory).

    Buffers (all in state_dict): memory_s, memory_t (N, feat_dim) for the student and teacher sides;
    z_s, z_t the normalisation constants (-1 until the first batch sets them); labels (N,) when given.
    Extra state: the negatives' generator state.

    forward(v_s, v_t, idx, contrast_idx=None, update=True) -> (scores_s, scores_t), each (B, K + 1) with the
    positive in column 0: scores_s against the teacher bank (student anchor), scores_t against the student
    bank (teacher anchor). v_s, v_t: (B, feat_dim) embeddings (``Embed`` outputs); idx: (B,) the samples'
    indices in the training set; contrast_idx: (B, K) negative indices to use instead of drawing them (the
    positive is *not* included, unlike RepDistiller's sample_idx whose column 0 is the positive). Gradients
    flow to v_s, v_t; the banks are read detached. With update=True (the authors always update) the banks
    then take the batch in with momentum nce_m and are renormalised. Duplicate indices in one batch keep one
    of the updates (index_copy_; which one is unspecified on CUDA), as in the authors' code.
    """

    def __init__(self, n_data: int, feat_dim: int = FEAT_DIM, nce_k: int = NCE_K, nce_t: float = NCE_T,
                 nce_m: float = NCE_M, seed: int | None = None, labels: torch.Tensor | None = None):
        super().__init__()
        if n_data < 2:
            raise ValueError(f"ContrastMemory needs at least 2 training samples (one positive, one negative), "
                             f"got n_data={n_data}")
        if nce_k < 1:
            raise ValueError(f"ContrastMemory: nce_k must be >= 1, got {nce_k}")
        if not 0.0 <= nce_m < 1.0:
            raise ValueError(f"ContrastMemory: nce_m must be in [0, 1), got {nce_m}")
        if nce_t <= 0:
            raise ValueError(f"ContrastMemory: nce_t must be > 0, got {nce_t}")
        self.n_data = int(n_data)
        self.feat_dim = int(feat_dim)
        self.nce_k = int(nce_k)
        self.nce_t = float(nce_t)
        self.nce_m = float(nce_m)
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))

        if labels is not None:
            labels = torch.as_tensor(labels).reshape(-1).long().cpu()
            if labels.numel() != self.n_data:
                raise ValueError(f"ContrastMemory: {labels.numel()} labels for n_data={self.n_data}")
            largest = int(torch.bincount(labels - labels.min()).max())
            if largest == self.n_data:
                raise ValueError("ContrastMemory: with labels, negatives come from the other classes, "
                                 "but every sample has the same label")
            self.register_buffer("labels", labels)
            self.k = min(self.nce_k, self.n_data - largest)
        else:
            self.labels = None
            self.k = min(self.nce_k, self.n_data - 1)

        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        g = self.generator
        self.register_buffer("memory_s", torch.rand(self.n_data, self.feat_dim, generator=g) * (2 * stdv) - stdv)
        self.register_buffer("memory_t", torch.rand(self.n_data, self.feat_dim, generator=g) * (2 * stdv) - stdv)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))

    # -- the generator travels in state_dict (nn.Module extra state) -------------------------------------------
    def get_extra_state(self):
        return {"generator_state": self.generator.get_state()}

    def set_extra_state(self, state) -> None:
        self.generator.set_state(state["generator_state"].cpu())

    def extra_repr(self) -> str:
        return (f"n_data={self.n_data}, feat_dim={self.feat_dim}, k={self.k} (asked {self.nce_k}), "
                f"nce_t={self.nce_t}, nce_m={self.nce_m}, class_negatives={self.labels is not None}")

    def sample_negatives(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, K) negative indices for the positives idx, drawn with the memory's generator: uniformly without
        replacement among the samples other than each positive (or, with labels, among the other classes)."""
        idx = idx.reshape(-1).long().cpu()
        weights = torch.ones(idx.numel(), self.n_data)
        if self.labels is None:
            weights[torch.arange(idx.numel()), idx] = 0.0
        else:
            labels = self.labels.cpu()
            weights = (labels.unsqueeze(0) != labels[idx].unsqueeze(1)).float()
        return torch.multinomial(weights, self.k, replacement=False, generator=self.generator)

    def forward(self, v_s: torch.Tensor, v_t: torch.Tensor, idx: torch.Tensor,
                contrast_idx: torch.Tensor | None = None, update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        device, dtype = self.memory_s.device, self.memory_s.dtype
        batch = v_s.shape[0]
        if v_s.shape != (batch, self.feat_dim) or v_t.shape != (batch, self.feat_dim):
            raise ValueError(f"ContrastMemory wants (B, {self.feat_dim}) embeddings, got {tuple(v_s.shape)} "
                             f"and {tuple(v_t.shape)}")
        idx = idx.reshape(-1).long().to(device)
        if idx.numel() != batch:
            raise ValueError(f"ContrastMemory: {idx.numel()} indices for a batch of {batch}")
        if contrast_idx is None:
            neg = self.sample_negatives(idx).to(device)
        else:
            neg = contrast_idx.long().to(device)
            if neg.dim() != 2 or neg.shape[0] != batch:
                raise ValueError(f"ContrastMemory: contrast_idx must be (B, K), got {tuple(neg.shape)}")
        if int(idx.min()) < 0 or int(idx.max()) >= self.n_data or (
                neg.numel() and (int(neg.min()) < 0 or int(neg.max()) >= self.n_data)):
            raise ValueError(f"ContrastMemory: sample indices must lie in [0, {self.n_data})")
        all_idx = torch.cat([idx.unsqueeze(1), neg], dim=1)                      # (B, K+1), positive first

        v_s = v_s.to(dtype)
        v_t = v_t.to(dtype)
        w_t = self.memory_t[all_idx].detach()                                    # (B, K+1, d)
        w_s = self.memory_s[all_idx].detach()
        scores_s = torch.exp(torch.einsum("bkd,bd->bk", w_t, v_s) / self.nce_t)  # student anchor
        scores_t = torch.exp(torch.einsum("bkd,bd->bk", w_s, v_t) / self.nce_t)  # teacher anchor

        if float(self.z_s) < 0:
            self.z_s.fill_(float(scores_s.detach().mean()) * self.n_data)
        if float(self.z_t) < 0:
            self.z_t.fill_(float(scores_t.detach().mean()) * self.n_data)
        scores_s = scores_s / float(self.z_s)
        scores_t = scores_t / float(self.z_t)

        if update:
            with torch.no_grad():
                for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                    pos = bank.index_select(0, idx) * self.nce_m + v.detach() * (1.0 - self.nce_m)
                    pos = pos / pos.pow(2).sum(1, keepdim=True).pow(0.5)
                    bank.index_copy_(0, idx, pos)
        return scores_s, scores_t


def nce_loss(scores: torch.Tensor, n_data: int, eps: float = EPS) -> torch.Tensor:
    """The NCE loss of one side (RepDistiller crd/criterion.py ContrastLoss), a scalar:

        -1/B * sum_i [ log(P_i0 / (P_i0 + K/N + eps)) + sum_{k=1..K} log((K/N) / (P_ik + K/N + eps)) ]

    scores: (B, K + 1) from ContrastMemory, the positive in column 0; n_data: N, the training-set size
    (P_n = 1/N)."""
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"nce_loss wants (B, K + 1) scores with K >= 1, got {tuple(scores.shape)}")
    batch = scores.shape[0]
    m = scores.shape[1] - 1
    noise = m / float(n_data)
    p_pos = scores[:, 0]
    log_d1 = torch.log(p_pos / (p_pos + noise + eps))
    p_neg = scores[:, 1:]
    log_d0 = torch.log(noise / (p_neg + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / batch


def crd_loss(memory: ContrastMemory, v_s: torch.Tensor, v_t: torch.Tensor, idx: torch.Tensor,
             contrast_idx: torch.Tensor | None = None, update: bool = True) -> torch.Tensor:
    """CRD = student-anchor NCE + teacher-anchor NCE (RepDistiller CRDLoss.forward), from the embeddings
    (``Embed`` outputs); the memory scores them and, with update=True, takes them in."""
    scores_s, scores_t = memory(v_s, v_t, idx, contrast_idx, update=update)
    return nce_loss(scores_s, memory.n_data) + nce_loss(scores_t, memory.n_data)


class CRDCriterion(nn.Module):
    """Both heads and the memory in one module (RepDistiller CRDLoss): forward(f_s, f_t, idx, contrast_idx)
    embeds the raw features and returns crd_loss. embed_s and embed_t are trainable (they go into the
    optimiser with the student); the memory has buffers only."""

    def __init__(self, s_dim: int, t_dim: int, n_data: int, feat_dim: int = FEAT_DIM, nce_k: int = NCE_K,
                 nce_t: float = NCE_T, nce_m: float = NCE_M, seed: int | None = None,
                 labels: torch.Tensor | None = None):
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.memory = ContrastMemory(n_data, feat_dim, nce_k, nce_t, nce_m, seed=seed, labels=labels)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, idx: torch.Tensor,
                contrast_idx: torch.Tensor | None = None, update: bool = True) -> torch.Tensor:
        return crd_loss(self.memory, self.embed_s(f_s), self.embed_t(f_t.detach()), idx, contrast_idx, update)


# ---- the method ---------------------------------------------------------------------------------
from kdtune.config import Param  # noqa: E402
from kdtune.distill.base import READS_FEATURES, READS_MEMORY, Method, Outputs  # noqa: E402
from kdtune.config import EMBEDDING  # noqa: E402


class ContrastiveRD(Method):
    """CRD: hard_weight * CE + beta * the NCE contrastive loss of the embeddings against a memory of the others."""

    name = "crd"
    needs_teacher = True
    reads = frozenset({READS_FEATURES, READS_MEMORY})
    params = (Param("beta", CRD_WEIGHT, low=0.0, low_open=True, search=(0.1, 5.0), log=True, short="b",
                    help="weight of the contrastive term (the authors' CIFAR runs: 0.8)"),
              Param("nce_t", NCE_T, low=0.0, low_open=True, search=(0.02, 0.5), log=True, short="t",
                    help="temperature of the critic exp(<v, m> / t) (paper: 0.07)"),
              Param("nce_k", NCE_K, kind="int", low=1,
                    help="negatives per sample (paper: 16384; at most the training samples - 1)"),
              Param("feat_dim", FEAT_DIM, kind="int", low=1, help="dimension of the embedding heads (paper: 128)"),
              Param("nce_m", NCE_M, low=0.0, high=1.0, high_open=True, help="momentum of the memory update (0.5)"))
    paper = "Tian, Krishnan & Isola, Contrastive Representation Distillation, ICLR 2020"

    def link_keys(self) -> tuple[str, ...]:
        return (EMBEDDING,)

    def bind_data(self, train_indices: torch.Tensor) -> None:
        # the memory holds one row per training sample: a sample index -> its row (validation samples have none)
        indices = train_indices.cpu()
        position = torch.full((int(indices.max()) + 1,), -1, dtype=torch.int64)
        position[indices] = torch.arange(len(indices))
        self.register_buffer("position", position, persistent=False)

    def setup(self, student_shapes, teacher_shapes, num_classes=None) -> None:
        c = self.config
        self.criterion = CRDCriterion(student_shapes[EMBEDDING][1], teacher_shapes[EMBEDDING][1],
                                      n_data=int((self.position >= 0).sum()), feat_dim=c.feat_dim, nce_k=c.nce_k,
                                      nce_t=c.nce_t, nce_m=c.nce_m, seed=c.seed)

    def losses(self, out: Outputs) -> dict:
        terms = super().losses(out)
        rows = self.position[out.indices]
        terms["contrast"] = self.config.beta * self.criterion(out.student_features[EMBEDDING],
                                                              out.teacher_features[EMBEDDING], rows)
        return terms
