"""K students of one architecture stepped as one batched computation: `torch.func` (vmap) over stacked weights.

Fused trials (kdtune/train/fusion.py) run the teacher once per batch and then step each member in turn: K small
forward/backward passes, each launching its own kernels. Where the members share the architecture (a
temperature or alpha sweep always does), their weights can be stacked along a new leading dimension and the K
steps written as one: `torch.func.stack_module_state` stacks parameters and buffers, `functional_call` runs the
architecture on one member's slice, and `vmap` maps it over the K slices, so every layer runs once on K
members (a linear layer becomes a batched matmul, a convolution a grouped convolution over K * C channels).
One backward pass over the sum of the K losses gives each member its own gradient (the losses share no
weights), and an SGD step written over the stacked tensors takes each member's own learning rate, momentum
and weight decay. The inputs and labels are not stacked: every member reads the same batch.

What vmap allows, and what this module does about the rest:

- BatchNorm in training mode works: its running statistics are stacked buffers too (`stack_module_state`
  stacks them), so each member normalises with its own batch statistics and updates its own running mean and
  variance in place, exactly as alone (tests/test_batched.py). A BatchNorm with `momentum=None` (a cumulative
  average: it converts `num_batches_tracked` to a Python float) cannot run under vmap and is refused.
- Random operations (dropout) follow vmap's `randomness`: "error" (the default here) refuses a student with
  active dropout; "different" draws an independent mask per member, which is statistically what K trials
  draw, but not the same draws as the members' own unfused runs (fusion.py keeps those bit for bit).
- Anything a module does in Python with a tensor's value (`.item()`, `if x > 0`) fails under vmap; such a
  student is refused by the error vmap raises, at the first step.

What a caller keeps doing itself: the LR schedule (`set_lr` per member between epochs), divergence (`step`
returns each member's weighted "hard" and "soft" terms, (K,) each, as the engine logs them: a member whose sum
is not finite is dropped by building a new BatchedStudents from the others), evaluation and checkpoints
(`write_back` copies the stacked weights into the members' modules; `member_momentum` gives a member's SGD
momentum buffers, `load_momentum` takes them back from the members' optimisers). Methods that read the teacher's
features are out of reach (the step sees logits only, as fused trials do). The teacher's logits are one (N, C)
tensor every member reads, or (K, N, C), one target per member (an ensemble teacher, whose soft target depends on
each member's temperature).

Wired into the trial path by kdtune/train/fusion.py (`fused_epochs`, TrialConfig.batched): each epoch it builds a
BatchedStudents from the live members' modules and optimiser state, steps it on the shared batches and hands
weights, BatchNorm statistics and momentum buffers back before the epoch's evaluation and checkpoint.
benchmarks/gpu.py (G2, G5) measures it next to the sequential fused step.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from kdtune.distill.losses import hard_loss

DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _kl_batchmean(student_logits, teacher_logits, temperature):
    """KL(p_T^T || p_S^T) averaged over the batch: kdtune.distill.losses.soft_loss(..., scale="none") written
    out, because aten::kl_div has no vmap batching rule (vmap would loop over the members)."""
    log_p_student = torch.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum() / student_logits.shape[0]


class NotBatchable(ValueError):
    """The students cannot be stepped as one vmap-batched computation (the reason is the message)."""


@dataclass(frozen=True)
class MemberLoss:
    """One member's objective and optimiser: hard_weight * CE + alpha * S * KL(p_T^T || p_S^T), SGD.

    S = T^2 (soft_scale "T2") or 1 ("none"), as kdtune/distill/kd.py; alpha = 0 is the baseline (CE alone)."""

    temperature: float = 1.0
    alpha: float = 0.0
    hard_weight: float = 1.0
    soft_scale: str = "T2"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0

    @classmethod
    def from_config(cls, config) -> "MemberLoss":
        """From a TrialConfig of method 'kd' or 'none' (the single-stage, logits-only methods)."""
        if config.method not in ("kd", "none"):
            raise NotBatchable(f"method {config.method!r}: the batched step computes kd and none losses only")
        if config.optimizer != "sgd":
            raise NotBatchable(f"optimizer={config.optimizer!r}: the batched step is SGD with momentum only")
        if config.param("logit_standardize", False):
            raise NotBatchable("logit_standardize=true: the batched step computes the plain KD soft term only")
        kd = config.method == "kd"
        # 'none' trains on CE with weight 1 whatever hard_weight says (kdtune/distill/base.py, NoDistillation)
        return cls(temperature=float(config.temperature) if kd else 1.0, alpha=float(config.alpha) if kd else 0.0,
                   hard_weight=float(config.effective_hard_weight) if kd else 1.0,
                   soft_scale=config.soft_scale if kd else "T2",
                   lr=float(config.lr), momentum=float(config.momentum), weight_decay=float(config.weight_decay))


def check_batchable(model: nn.Module, randomness: str = "error") -> None:
    """Raise NotBatchable when `model` cannot train under vmap as this module runs it (see the docstring)."""
    if randomness not in ("error", "different", "same"):
        raise NotBatchable(f"randomness={randomness!r}: expected error, different or same (torch.func.vmap)")
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats \
                and module.momentum is None:
            raise NotBatchable(f"{name or 'model'}: BatchNorm with momentum=None (a cumulative average) reads "
                               "num_batches_tracked as a Python number, which vmap cannot batch")
        if isinstance(module, DROPOUT) and module.p > 0 and randomness == "error":
            raise NotBatchable(f"{name or 'model'}: {type(module).__name__}(p={module.p}) draws random masks; pass "
                               "randomness='different' for an independent mask per member (not the draws of the "
                               "members' unfused runs)")


class BatchedStudents:
    """K students of one architecture, their weights stacked, stepped together by `step`.

    students: K modules of the same architecture (their current weights are the start; they are not changed
              until `write_back`). losses: one MemberLoss per student. The stacked tensors live on `device`
              (default: the first student's). precision "bf16" runs the forward under bf16 autocast;
              channels_last converts 4-d inputs to NHWC first (what kdtune's engine does for image students).
    """

    def __init__(self, students: list[nn.Module], losses: list[MemberLoss], device: torch.device | None = None,
                 precision: str = "fp32", channels_last: bool = False, randomness: str = "error"):
        if not students or len(students) != len(losses):
            raise NotBatchable(f"{len(students)} students and {len(losses)} losses: one loss per student, at least one")
        kinds = {type(s) for s in students}
        shapes = {tuple((k, tuple(v.shape)) for k, v in s.state_dict().items()) for s in students}
        if len(kinds) != 1 or len(shapes) != 1:
            raise NotBatchable("the students differ in architecture (module types or weight shapes): vmap needs K "
                               "copies of one architecture")
        for model in students:
            check_batchable(model, randomness)
        if precision not in ("fp32", "bf16"):
            raise NotBatchable(f"precision={precision!r}: expected fp32 or bf16")
        from torch.func import stack_module_state

        self.students = students
        self.k = len(students)
        self.device = device or next(students[0].parameters()).device
        self.precision, self.channels_last, self.randomness = precision, channels_last, randomness
        for model in students:
            model.train()
        params, buffers = stack_module_state([s.to(self.device) for s in students])
        # leaves of their own, on the device: the step updates them in place, the members' modules stay as they were
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.buffers = {k: v.detach().clone() for k, v in buffers.items()}
        self._momentum_buffers: dict[str, torch.Tensor] = {}
        self._skeleton = copy.deepcopy(students[0]).to("meta")  # architecture only: functional_call supplies weights
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float32, device=self.device)  # noqa: E731
        self.temperature = as_tensor([m.temperature for m in losses])
        self.alpha = as_tensor([m.alpha for m in losses])
        self.hard_weight = as_tensor([m.hard_weight for m in losses])
        self.soft_factor = as_tensor([m.temperature ** 2 if m.soft_scale == "T2" else 1.0 for m in losses])
        self.lr = as_tensor([m.lr for m in losses])
        self.momentum = as_tensor([m.momentum for m in losses])
        self.weight_decay = as_tensor([m.weight_decay for m in losses])
        self._uses_soft = bool((self.alpha > 0).any())
        # two mappings: every member reads one (N, C) teacher target, or each its own from a (K, N, C) stack
        self._batched_loss = torch.func.vmap(self._member_loss, in_dims=(0, 0, None, None, None, 0, 0, 0, 0),
                                             randomness=randomness)
        self._batched_loss_own_target = torch.func.vmap(self._member_loss, in_dims=(0, 0, None, None, 0, 0, 0, 0, 0),
                                                        randomness=randomness)

    # ---- the step -----------------------------------------------------------------------------
    def _member_loss(self, params, buffers, images, labels, teacher_logits, temperature, alpha, hard_weight,
                     soft_factor):
        logits = torch.func.functional_call(self._skeleton, (params, buffers), (images,))
        hard = hard_weight * hard_loss(logits, labels)
        if teacher_logits is None:
            return hard, torch.zeros_like(hard)
        return hard, alpha * soft_factor * _kl_batchmean(logits, teacher_logits, temperature)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def step(self, images: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
        """One SGD step of every member on the same batch; returns each member's weighted loss terms, {"hard": (K,),
        "soft": (K,)} (detached, on the device: no sync), as kdtune's engine logs them (loss_hard, loss_soft).

        teacher_logits: the teacher's (N, C) logits on the batch, or (K, N, C), member k's target in row k (needed
        when some member has alpha > 0)."""
        if self._uses_soft and teacher_logits is None:
            raise ValueError("some member distils (alpha > 0): pass the teacher's logits on the batch")
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if teacher_logits is not None:
            teacher_logits = teacher_logits.detach().float()
        own_target = teacher_logits is not None and teacher_logits.dim() == 3
        if own_target and teacher_logits.shape[0] != self.k:
            raise ValueError(f"teacher logits of shape {tuple(teacher_logits.shape)}: expected (N, C) or "
                             f"({self.k}, N, C)")
        loss = self._batched_loss_own_target if own_target else self._batched_loss
        with self._autocast():
            hard, soft = loss(self.params, self.buffers, images, labels, teacher_logits,
                              self.temperature, self.alpha, self.hard_weight, self.soft_factor)
        (hard.sum() + soft.sum()).backward()  # members share no weights: each gradient slice is its member's
        self._sgd()
        return {"hard": hard.detach(), "soft": soft.detach()}

    @torch.no_grad()
    def _sgd(self) -> None:
        """torch.optim.SGD (dampening 0, no Nesterov) per member: d = g + wd * p; b = m * b + d (b = d at the
        first step); p -= lr * b; with each member's lr, momentum and weight decay."""
        for name, p in self.params.items():
            grad = p.grad
            if grad is None:
                continue
            shape = (self.k,) + (1,) * (p.dim() - 1)
            d = grad.add(p * self.weight_decay.view(shape))
            buf = self._momentum_buffers.get(name)
            if buf is None:
                buf = self._momentum_buffers[name] = d.clone()
            else:
                buf.mul_(self.momentum.view(shape)).add_(d)
            p.sub_(buf * self.lr.view(shape))
            p.grad = None

    # ---- members ------------------------------------------------------------------------------
    def set_lr(self, values) -> None:
        """Each member's learning rate from now on (an LR schedule: call between epochs)."""
        self.lr = torch.as_tensor(values, dtype=torch.float32, device=self.device).reshape(self.k).clone()

    def load_momentum(self, buffers: list[dict[str, torch.Tensor]]) -> None:
        """Continue from the members' SGD momentum buffers (member k's by parameter name, as `member_momentum`
        gives them; empty: not stepped yet). A member without a buffer where others have one gets zeros, which
        is what torch.optim.SGD does for it (momentum 0 keeps no buffer: m * 0 + d = d)."""
        if len(buffers) != self.k:
            raise ValueError(f"{len(buffers)} members' momentum buffers for {self.k} members")
        self._momentum_buffers = {}
        for name, p in self.params.items():
            if any(name in member for member in buffers):
                self._momentum_buffers[name] = torch.stack([
                    member[name].detach().to(p.device, p.dtype) if name in member else torch.zeros_like(p[k].detach())
                    for k, member in enumerate(buffers)])

    def member_momentum(self, index: int) -> dict[str, torch.Tensor]:
        """Member `index`'s SGD momentum buffers by parameter name (what torch.optim.SGD keeps per parameter as
        state['momentum_buffer']; empty before the first step), to hand a member's optimiser state back."""
        return {k: v[index].detach().clone() for k, v in self._momentum_buffers.items()}

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        """Member `index`'s state_dict (parameters and buffers), as tensors detached from the stack."""
        state = {k: v[index].detach().clone() for k, v in {**self.params, **self.buffers}.items()}
        order = self.students[index].state_dict().keys()
        return {k: state[k] for k in order}

    def write_back(self) -> list[nn.Module]:
        """Copy every member's stacked weights and buffers into its own module (to evaluate or save it)."""
        for index, model in enumerate(self.students):
            model.load_state_dict(self.member_state(index))
        return self.students
