"""kdtune/train/batched.py: K students stepped as one vmap computation train what K students stepped alone train."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdtune import models
from kdtune.train.batched import BatchedStudents, MemberLoss, NotBatchable, check_batchable
from kdtune.distill.losses import hard_loss, soft_loss
from kdtune.distill import trial_config

LOSSES = [  # a baseline and three distilled members, each with its own lr, momentum, weight decay and scale
    MemberLoss(alpha=0.0, hard_weight=1.0, lr=0.05, momentum=0.9, weight_decay=5e-4),
    MemberLoss(temperature=2.0, alpha=0.5, hard_weight=0.5, lr=0.02, momentum=0.9, weight_decay=0.0),
    MemberLoss(temperature=4.0, alpha=0.9, hard_weight=0.1, lr=0.01, momentum=0.0, weight_decay=1e-3),
    MemberLoss(temperature=0.6, alpha=0.3, hard_weight=1.0, soft_scale="none", lr=0.03, momentum=0.5,
               weight_decay=2e-5),
]


class BatchNormNet(nn.Module):
    """A small CNN with BatchNorm in training mode (running statistics updated every step)."""

    def __init__(self, num_classes=10, momentum=0.1):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6, momentum=momentum)
        self.fc = nn.Linear(6 * 4 * 4, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


def sequential_reference(students, losses, batches):
    """The members one after the other, each with torch.optim.SGD and kdtune's own loss functions."""
    students = [copy.deepcopy(s) for s in students]
    optimisers = [torch.optim.SGD(s.parameters(), lr=m.lr, momentum=m.momentum, weight_decay=m.weight_decay)
                  for s, m in zip(students, losses)]
    for images, labels, teacher_logits in batches:
        for student, optimiser, member in zip(students, optimisers, losses):
            student.train()
            logits = student(images)
            loss = member.hard_weight * hard_loss(logits, labels)
            if member.alpha:
                loss = loss + member.alpha * soft_loss(logits, teacher_logits, member.temperature, member.soft_scale)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    buffers = [{p: o.state[p].get("momentum_buffer") for p in s.parameters()} for s, o in zip(students, optimisers)]
    return students, buffers


def make_batches(shape, steps=6, n=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=generator), torch.randint(0, 10, (n,), generator=generator),
             3 * torch.randn(n, 10, generator=generator)) for _ in range(steps)]


@pytest.mark.parametrize("build, shape", [
    (lambda: models.build_model("digits_student", 10, (1, 8, 8)), (1, 8, 8)),  # digits CNN
    (lambda: models.build_model("mlp_student", 10, (64,)), (64,)),  # digits-sized MLP
    (lambda: BatchNormNet(), (1, 8, 8)),  # BatchNorm in training mode
], ids=["digits_cnn", "mlp", "batchnorm"])
def test_vmap_batched_students_reach_the_weights_of_students_stepped_one_after_the_other(build, shape):
    torch.manual_seed(0)
    students = [build() for _ in LOSSES]
    start = [copy.deepcopy(s.state_dict()) for s in students]
    batches = make_batches(shape)
    reference, expected_buffers = sequential_reference(students, LOSSES, batches)

    batched = BatchedStudents(students, LOSSES)
    for images, labels, teacher_logits in batches:
        terms = batched.step(images, labels, teacher_logits)
        assert terms.keys() == {"hard", "soft"} and terms["soft"].shape == (len(LOSSES),)
        assert terms["soft"][0] == 0  # the baseline member has no soft term
    for student, state in zip(students, start):  # the members' modules are untouched until write_back
        for key, value in student.state_dict().items():
            assert torch.equal(value, state[key])
    batched.write_back()
    for index, (student, expected) in enumerate(zip(students, reference)):
        momentum = batched.member_momentum(index)
        if LOSSES[index].momentum:  # torch.optim.SGD's own buffers, one per parameter
            names = [name for name, _ in expected.named_parameters()]
            optimiser_buffers = [expected_buffers[index][p] for p in expected.parameters()]
            for name, buffer in zip(names, optimiser_buffers):
                torch.testing.assert_close(momentum[name], buffer, rtol=1e-5, atol=1e-6)
        got, want = student.state_dict(), expected.state_dict()
        assert got.keys() == want.keys()
        for key in want:
            if want[key].is_floating_point():
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"member {index}, {key}: {m}")
            else:  # BatchNorm's num_batches_tracked
                assert torch.equal(got[key], want[key]), (index, key)
        assert not torch.equal(got[next(iter(want))], start[index][next(iter(want))])  # it did train


def test_member_state_and_lr_schedule():
    torch.manual_seed(0)
    students = [models.build_model("mlp_student", 10, (64,)) for _ in range(2)]
    losses = [MemberLoss(lr=0.1, momentum=0.0), MemberLoss(lr=0.1, momentum=0.0)]
    batched = BatchedStudents(students, losses)
    batched.set_lr([0.1, 0.0])  # member 1 frozen from now on
    before = batched.member_state(1)
    images, labels, _ = make_batches((64,), steps=1)[0]
    batched.step(images, labels)
    after = batched.member_state(1)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(a, b) for a, b in zip(batched.member_state(0).values(),
                                                     students[0].state_dict().values()))


def test_distilling_members_need_the_teachers_logits():
    students = [models.build_model("mlp_student", 10, (64,)) for _ in range(2)]
    batched = BatchedStudents(students, LOSSES[:2])
    images, labels, _ = make_batches((64,), steps=1)[0]
    with pytest.raises(ValueError, match="teacher's logits"):
        batched.step(images, labels)


def test_what_vmap_cannot_batch_is_refused_with_the_reason():
    wrn = models.build_model("wrn_10_4", 10, (3, 32, 32))  # dropout 0.3
    with pytest.raises(NotBatchable, match="randomness='different'"):
        check_batchable(wrn)
    check_batchable(wrn, randomness="different")  # an independent mask per member: allowed when asked
    with pytest.raises(NotBatchable, match="momentum=None"):
        check_batchable(BatchNormNet(momentum=None))
    with pytest.raises(NotBatchable, match="architecture"):
        BatchedStudents([models.build_model("mlp_student", 10, (64,)), models.build_model("mlp_teacher", 10, (64,))],
                        LOSSES[:2])
    with pytest.raises(NotBatchable, match="one loss per student"):
        BatchedStudents([models.build_model("mlp_student", 10, (64,))], LOSSES[:2])


def test_dropout_members_train_under_randomness_different():
    torch.manual_seed(0)
    students = [nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)) for _ in range(3)]
    batched = BatchedStudents(students, LOSSES[:3], randomness="different")
    for images, labels, teacher_logits in make_batches((64,), steps=2):
        terms = batched.step(images, labels, teacher_logits)
        assert torch.isfinite(terms["hard"] + terms["soft"]).all()


def test_member_loss_from_a_trial_config():

    kd = MemberLoss.from_config(trial_config({"method": "kd", "temperature": 3.0, "alpha": 0.7, "lr": 0.02}))
    assert (kd.temperature, kd.alpha, kd.lr) == (3.0, 0.7, 0.02)
    assert kd.hard_weight == pytest.approx(0.3)
    none = MemberLoss.from_config(trial_config({"method": "none"}))
    assert (none.alpha, none.hard_weight) == (0.0, 1.0)
    with pytest.raises(NotBatchable, match="kd and none"):
        MemberLoss.from_config(SimpleNamespace(method="fsp"))  # any two-stage or feature method


def test_a_stack_rebuilt_from_written_back_members_continues_exactly():
    """What fused trials do every epoch: write back, build a new stack from the members' modules, load their
    momentum buffers; it continues where one long-lived stack goes."""
    torch.manual_seed(0)
    students = [models.build_model("digits_student", 10, (1, 8, 8)) for _ in LOSSES]
    batches = make_batches((1, 8, 8), steps=6)
    straight = BatchedStudents([copy.deepcopy(s) for s in students], LOSSES)
    for images, labels, teacher_logits in batches:
        straight.step(images, labels, teacher_logits)

    first = BatchedStudents(students, LOSSES)
    for images, labels, teacher_logits in batches[:3]:
        first.step(images, labels, teacher_logits)
    first.write_back()
    second = BatchedStudents(students, LOSSES)
    second.load_momentum([first.member_momentum(k) for k in range(len(LOSSES))])
    for images, labels, teacher_logits in batches[3:]:
        second.step(images, labels, teacher_logits)
    for k in range(len(LOSSES)):
        want, got = straight.member_state(k), second.member_state(k)
        assert all(torch.equal(want[name], got[name]) for name in want), k
    forgetful = BatchedStudents(students, LOSSES)  # the members' weights after 3 steps, momentum not carried over
    for images, labels, teacher_logits in batches[3:]:
        forgetful.step(images, labels, teacher_logits)
    weights = "classifier.weight"
    assert not torch.equal(forgetful.member_state(0)[weights], straight.member_state(0)[weights])


def test_each_member_may_read_its_own_teacher_target():
    """(K, N, C) teacher logits: member k distils towards row k (an ensemble's target at each member's T)."""
    torch.manual_seed(0)
    students = [models.build_model("mlp_student", 10, (64,)) for _ in LOSSES]
    batches = make_batches((64,), steps=4)
    generator = torch.Generator().manual_seed(2)
    targets = [3 * torch.randn(len(LOSSES), 16, 10, generator=generator) for _ in batches]
    references = [sequential_reference([s], [m], [(i, y, t[k]) for (i, y, _), t in zip(batches, targets)])[0][0]
                  for k, (s, m) in enumerate(zip(students, LOSSES))]
    batched = BatchedStudents(students, LOSSES)
    for (images, labels, _), target in zip(batches, targets):
        batched.step(images, labels, target)
    batched.write_back()
    for student, reference in zip(students, references):
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(student.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected \(N, C\) or \(4, N, C\)"):
        batched.step(batches[0][0], batches[0][1], targets[0][:2])
