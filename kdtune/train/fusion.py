"""Fused students: grid trials that share their batches train together, with the teacher run once per batch.

A temperature sweep runs the same teacher on the same batches once per temperature, a link-set or hint sweep
too. Trials whose configs agree on everything that decides the batches and the stages (seed, batch size,
epochs, first-stage epochs, augmentation, validation split, precision, the teacher cache) share them, whatever
their methods: each batch is drawn and augmented once, the teacher runs once (a TeacherPass,
kdtune/train/forward.py), and each member takes its own optimiser step. Every member has its own forward hooks on the
shared teacher, so the one forward also catches each member's linked features (hints, FSP, links); it runs to
the logits, or, when every member's stage stops early (a hint stage), until the last module one of them needs.

Each member trains exactly what its unfused twin trains: the batch order and augmentation come from the shared
per-epoch generator (a function of seed and epoch, the same for every member), the teacher's outputs are the
same computation, and each member keeps its own stream of the global random generator (dropout), swapped in
around its step. A member whose loss diverges fails alone; the others go on. Members of different methods may
share a trial; one with more stages (hints, FSP) goes on alone on the same batches after the others finish.

Batched members (TrialConfig.batched; kdtune/train/batched.py): members that allow it step as one vmap computation
instead of one after the other inside the step: "auto" (default) on CUDA, "on" on any device, "off" never.
A member allows it when its method is kd or none, its optimiser plain SGD over the student alone and its student
runs under vmap without random draws (no dropout, no BatchNorm with momentum=None); the group needs one
architecture, one source of teacher logits (all online or all cached) and at least two such members. The rest
step sequentially, as before, and so do members whose student vmap refuses at the first batched step (Python
reading a tensor's value); under "on" one log line (logger "kdtune", a warning) says why, and the trial goes
on. Every epoch the batched stack is built from the live members' modules and optimisers and handed back before
the evaluation, so metrics, the LR schedule, best-state tracking, checkpoints and divergence stay the engine's
own, per member. Batched members train what their unfused twins train up to floating-point order (vmap runs
other kernels), not bit for bit.

`group_variants` decides the groups (a study option: off, a size, or automatic); kdtune/trial.py runs a group
as one Ray trial with one MLflow child run, checkpoint entry and table row per member.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from kdtune.distill.registry import trial_config
from kdtune.train.forward import teacher_pass
from kdtune.errors import ConfigError, TrainingDiverged

# what decides the batches, the stages and the teacher's inputs: members of a group agree on all of it
SHARED_FIELDS = ("seed", "batch_size", "epochs", "augment", "val_fraction", "precision", "teacher_cache",
                 "deterministic", "stage1_epochs", "dataset", "teacher", "student", "batched")
AUTO_GROUP = 8  # 'auto': up to this many members per trial


def group_size(value, trials: int, slots: int) -> int:
    """The largest group for `fuse`: 'auto' fuses only as far as it keeps every trial slot of the cluster busy
    (ceil(trials / slots), at most AUTO_GROUP), so a study on a large cluster still spreads over its nodes."""
    if value == "auto":
        return max(1, min(AUTO_GROUP, -(-trials // max(1, slots))))
    return parse_fuse(value)


def parse_fuse(value) -> int:
    """--fuse off | auto | N -> the largest group (1: no fusion; auto: up to AUTO_GROUP, see group_size)."""
    if value in (None, "off", 0, "0", 1, "1"):
        return 1
    if value == "auto":
        return AUTO_GROUP
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise ConfigError(f"fuse={value!r}: expected off, auto or a group size >= 1")
    return size


def group_variants(variants: list[dict], base: dict, size: int) -> list[list[dict]]:
    """Variants in groups of at most `size` that may train together (in order; the rest alone)."""
    if size <= 1:
        return [[v] for v in variants]
    groups: dict[tuple, list[list[dict]]] = {}
    order: list[tuple] = []
    for variant in variants:
        flat = trial_config({k: v for k, v in variant.items() if k not in ("label", "point")}, base).to_flat()
        key = tuple(str(flat.get(name)) for name in SHARED_FIELDS if name != "seed")
        if key not in groups:
            groups[key] = [[]]
            order.append(key)
        if len(groups[key][-1]) >= size:
            groups[key].append([])
        groups[key][-1].append(variant)
    return [group for key in order for group in groups[key]]


def fused_epochs(trainers: list, teacher: torch.nn.Module | None = None) -> Iterator[dict]:
    """Step every live trainer on the same batches; yield {index: metrics or TrainingDiverged} per epoch.

    `teacher` (shared by the members, which were built with it) runs once per batch for the members that use
    it online; members with cached logits look theirs up themselves. Members whose `batched` option asks for
    it and that allow it step as one vmap computation (`_plan_epoch`); the others one after the other. When
    an epoch's results are yielded, every member's module and optimiser hold its state (a checkpoint taken
    then resumes exactly).

    Time: an epoch's wall time (its steps and every member's validation; not the last epoch's test evaluation,
    which an unfused trial's training time leaves out too) is shared equally by the members that trained in it
    (`fused_members`): each one's `epoch_time_s` is its share and its `training_time_s` the sum of its shares, so
    a member that trains on after others diverged or finished counts a larger share of those epochs, and the
    members' training times add up to the trial's."""
    live = [i for i, t in enumerate(trainers) if not t.done]
    said: set[str] = set()  # fallback reasons already logged: the plan is made again every epoch
    refused: set[int] = set()  # members whose student vmap refused at run time: stepped alone from then on
    while live:
        started = time.perf_counter()
        streams = {}
        for i in live:
            trainers[i].begin_epoch()
            streams[i] = _rng_state(trainers[i].device)
        lead = trainers[live[0]]
        plan = _plan_epoch(trainers, live, teacher, refused, said)
        for images, labels, indices in lead.train.batches(lead.config.batch_size, lead.batch_generator()):
            shared = teacher_pass(plan.teacher, images, lead, plan.stop_at) if plan.teacher is not None else None
            if plan.group is not None:
                try:
                    plan.group.step(images, labels, indices, shared.logits if shared is not None else None)
                except (RuntimeError, NotImplementedError) as error:
                    if plan.group.steps:  # it ran before: a real failure, not a student vmap cannot batch
                        raise
                    _say(plan.group.trainers, f"fused members {plan.members} step one after the other, not "
                         f"batched: vmap refused the student ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200]})", said)
                    refused.update(plan.members)  # nothing was updated: they take this batch sequentially
                    plan = _plan_epoch(trainers, live, teacher, refused, said)
                    if plan.teacher is not None:  # the new plan's forward (once per trial: this happens once)
                        shared = teacher_pass(plan.teacher, images, lead, plan.stop_at)
            for i in plan.sequential:
                _set_rng_state(trainers[i].device, streams[i])
                trainers[i].train_step(images, labels, indices, shared if i in plan.shared else None)
                streams[i] = _rng_state(trainers[i].device)
        if plan.group is not None:
            plan.group.hand_back()  # before end_epoch evaluates, tracks the best state and the trial checkpoints
        results = {}
        for i in live:
            try:
                results[i] = trainers[i].end_epoch()
            except TrainingDiverged as error:
                results[i] = error
        # every member that trained this epoch (one that diverged in it included) takes an equal share of its wall
        # time: a survivor's later epochs, shared by fewer members, count more of their time
        elapsed = time.perf_counter() - started - sum(trainers[i].test_time_s for i in live)  # training time only
        share = elapsed / len(live)
        for i in live:
            if not isinstance(results[i], TrainingDiverged):
                trainers[i].take_epoch_share(results[i], share, len(live))
        live = [i for i in live if not isinstance(results[i], TrainingDiverged) and not trainers[i].done]
        yield results


# ---- the batched step (kdtune/train/batched.py) in the trial path ---------------------------------------------

@dataclass
class _EpochPlan:
    group: "BatchedGroup | None"  # the members stepped as one vmap computation, or None
    members: list[int]  # their indices
    sequential: list[int]  # the members stepped one after the other
    shared: list[int]  # of those, the ones given the shared teacher forward (a TeacherPass)
    teacher: torch.nn.Module | None  # runs the shared forward once per batch (None: nobody needs it)
    stop_at: list  # teacher modules after which the shared forward may stop ([]: to the logits)


def wants_batched(trainer) -> bool:
    """TrialConfig.batched: 'on' anywhere, 'auto' only on CUDA, 'off' never. 'auto' leaves CPUs out because
    there the gain depends on the model and the threads (digits students, K = 8, on 2 cores: ~1.4x with one
    thread, ~2x with two; CIFAR-sized students unmeasured): 'on' opts in."""
    mode = trainer.config.batched
    return mode == "on" or (mode == "auto" and trainer.device.type == "cuda")


def _plan_epoch(trainers: list, live: list[int], teacher, refused: set[int], said: set[str]) -> _EpochPlan:
    """Which live members step batched this epoch (built afresh from their modules and optimisers, so a member
    that diverged or finished is simply left out) and which sequentially; reasons for the latter are logged."""
    from kdtune.train.batched import NotBatchable

    members = []
    for i in live:
        if i in refused or not wants_batched(trainers[i]):
            continue
        try:
            check_member(trainers[i])
            members.append(i)
        except NotBatchable as error:
            _say([trainers[i]], f"fused member {i} (method {trainers[i].config.method!r}) steps on its own, not "
                 f"batched: {error}", said)
    group = None
    if len(members) >= 2:  # one member alone gains nothing from vmap
        try:
            group = BatchedGroup([trainers[i] for i in members])
        except NotBatchable as error:
            _say([trainers[i] for i in members], f"fused members {members} step one after the other, not "
                 f"batched: {error}", said)
    if group is None:
        members = []
    sequential = [i for i in live if i not in members]
    # one teacher forward for the members that run it online (their logits, and their features through their own
    # hooks on the shared teacher); members with cached logits look theirs up
    shared = [i for i in sequential if trainers[i].takes_shared_teacher] if teacher is not None else []
    net = teacher
    batched_online = group is not None and group.online
    if batched_online and net is None:
        net = group.source.teacher
    if len(shared) < 2 and not batched_online:
        shared, net = [], None
    return _EpochPlan(group, members, sequential, shared, net, _stop_at([trainers[i] for i in shared], batched_online))


def _stop_at(members: list, needs_logits: bool) -> list:
    """Where the shared teacher forward may stop: once every module some member's stage stops at has run, or
    nowhere ([]) when some member needs the teacher's logits."""
    if needs_logits or any(not t.teacher_stop_at for t in members):
        return []
    return list({id(m): m for t in members for m in t.teacher_stop_at}.values())


def _say(trainers: list, message: str, said: set[str]) -> None:
    """Log a fallback once per trial: a warning where a member asked for batched='on', else a debug line."""
    if message in said:
        return
    said.add(message)
    level = logging.WARNING if any(t.config.batched == "on" for t in trainers) else logging.DEBUG
    logging.getLogger("kdtune").log(level, "kdtune: %s", message)


def check_member(trainer) -> None:
    """Raise NotBatchable unless the trainer's step is one the batched step computes exactly: method kd or none
    (one stage, logits only), plain SGD over the student's parameters alone, a student vmap can run without
    drawing random numbers (no dropout: the batched step could not draw the member's own dropout masks)."""
    from kdtune.train.batched import MemberLoss, NotBatchable, check_batchable

    MemberLoss.from_config(trainer.config)  # kd or none
    if len(trainer.stages) != 1 or trainer.stages[0].train_up_to or trainer.method.needs_teacher_features:
        raise NotBatchable(f"method {trainer.config.method!r} has stages or reads teacher features")
    optimizer = trainer.optimizer
    groups = optimizer.param_groups
    if type(optimizer) is not torch.optim.SGD or len(groups) != 1 or groups[0]["nesterov"] \
            or groups[0]["dampening"] or groups[0].get("maximize"):
        raise NotBatchable(f"optimizer {type(optimizer).__name__}: the batched step is plain SGD (one parameter "
                           "group, no Nesterov, dampening or maximize)")
    if {id(p) for p in groups[0]["params"]} != {id(p) for p in trainer.student.parameters()}:
        raise NotBatchable("the optimiser trains more than the student (a method's own parameters)")
    check_batchable(trainer.student)


class BatchedGroup:
    """Fused members stepped as one BatchedStudents for one epoch: built from their modules, learning rates and
    momentum buffers at the epoch's start, handed back to them by `hand_back` at its end.

    Rebuilding every epoch costs one copy of the members' weights and momentum buffers into the stack and one
    back (O(K x parameters); for 8 digits students on a 2-core CPU about 10 ms per epoch, against ~0.3 s of
    training), and keeps the trainers the one place a member's state lives between epochs: evaluation,
    best-state tracking, checkpoints and resume need nothing of their own. While an epoch runs the weights and
    momentum buffers exist twice (the members' modules and optimisers, and the stack)."""

    def __init__(self, trainers: list):
        from kdtune.train.batched import BatchedStudents, MemberLoss, NotBatchable

        self.trainers = trainers
        lead = trainers[0]
        # the teacher's logits come from one place for the whole group: an online teacher or the cache, not both
        # (the cache is computed in other batches, so its logits differ from the online ones in the last bits)
        users = [t for t in trainers if t.uses_teacher_now]
        kinds = {"cached" if t.teacher_logits is not None else "online" for t in users}
        if len(kinds) > 1:
            raise NotBatchable("some members read cached teacher logits and others run the teacher online")
        if len({(t.device, t.config.precision, t.channels_last) for t in trainers}) > 1:
            raise NotBatchable("the members differ in device, precision or memory layout")
        self.source = users[0] if users else None  # the member whose teacher (or cache) the group reads
        self.online = bool(users) and kinds == {"online"}
        self.terms = [_term_names(t) for t in trainers]
        losses = [MemberLoss.from_config(t.config) for t in trainers]
        self.batched = BatchedStudents([t.student for t in trainers], losses, lead.device,
                                       precision=lead.config.precision, channels_last=lead.channels_last)
        self.batched.set_lr([t.optimizer.param_groups[0]["lr"] for t in trainers])  # this epoch's, after the schedule
        self.batched.load_momentum([_momentum_of(t) for t in trainers])
        self.steps = 0

    def step(self, images, labels, indices, online_logits: torch.Tensor | None) -> None:
        """One step of every member; each member's weighted terms are counted into its own epoch sums."""
        terms = self.batched.step(images, labels, self._targets(indices, online_logits))
        self.steps += 1
        for k, trainer in enumerate(self.trainers):
            trainer.record_terms({name: terms[name][k] for name in self.terms[k]})

    def _targets(self, indices, online_logits):
        """The teacher's logits as each member reads them (Method.teacher_view, as Trainer._forward applies it):
        one teacher's (N, C), or an ensemble's (M, N, C) members turned into each member's (N, C) target at its
        own temperature, stacked (K, N, C)."""
        if self.source is None:
            return None
        raw = online_logits if self.online else self.source.teacher_logits[..., indices, :]
        if raw.dim() == 2:
            return self.source.method.teacher_view(raw)
        return torch.stack([t.method.teacher_view(raw) for t in self.trainers])

    def hand_back(self) -> None:
        """Weights, BatchNorm statistics and SGD momentum buffers back into each member's module and optimiser."""
        self.batched.write_back()
        for k, trainer in enumerate(self.trainers):
            _set_momentum(trainer, self.batched.member_momentum(k))
            # the optimiser's steps were taken in the stack: tell the LR scheduler so (torch marks it here when its
            # own step runs, and warns at scheduler.step() when it has not)
            trainer.optimizer._opt_called = True


def _term_names(trainer) -> tuple[str, ...]:
    """The loss terms the member's method computes, in its order (kdtune/distill/kd.py: a zero weight drops its
    term; 'none' has only the hard one)."""
    config = trainer.config
    if config.method == "none":
        return ("hard",)
    return tuple(name for name, weight in (("hard", config.effective_hard_weight), ("soft", config.alpha))
                 if weight > 0)


def _momentum_of(trainer) -> dict[str, torch.Tensor]:
    state = trainer.optimizer.state
    return {name: state[p]["momentum_buffer"] for name, p in trainer.student.named_parameters()
            if state.get(p, {}).get("momentum_buffer") is not None}


def _set_momentum(trainer, buffers: dict[str, torch.Tensor]) -> None:
    """What torch.optim.SGD would hold after the same steps: a buffer per parameter, none with momentum 0."""
    if not trainer.optimizer.param_groups[0]["momentum"]:
        return
    for name, p in trainer.student.named_parameters():
        if name in buffers:
            trainer.optimizer.state[p]["momentum_buffer"] = buffers[name]


def _teacher_logits(teacher, images, lead) -> torch.Tensor:
    """The teacher's logits on a batch, run once for several members (the benchmarks' fused step)."""
    return teacher_pass(teacher, images, lead, []).logits


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
