"""The seed papers' distillation methods: their math by hand on tiny tensors, then each trained on digits.

Hand-worked values are written out in the comments. Training runs are short (a few epochs of the digits
pair) and check what a user would see: the stages in the per-epoch metrics, which terms are on in each,
which parameters a stage trains, and that a resumed trial equals the uninterrupted one.
"""
import math

import pytest
import torch

from kdtune.distill import method_class
from kdtune.distill.base import Outputs
from kdtune.train.teacher_logits import teacher_logits_for
from kdtune.train.parts import teacher_network, trainer_for
from kdtune.errors import ConfigError
from kdtune.models import build_model
from kdtune.distill import trial_config

LN3 = math.log(3)


def run(trainer):
    return list(trainer.epochs())


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before, module):
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p)}


@pytest.fixture(scope="module")
def teacher_cache(digits, trained_digits_teacher):
    return teacher_logits_for(teacher_network("digits_teacher", trained_digits_teacher[0], digits), digits, 0.1)


# ---- hints (seed 001 §2.4) ------------------------------------------------------------------------

def test_hint_loss_by_hand():
    config = trial_config({"method": "hints", "links": "1", "beta": 2, "stage1_epochs": 1})
    method = method_class("hints")(config)
    student = {"1": torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])}  # (1, 2 channels, 1, 2)
    teacher = {"1": torch.tensor([[[[1.0, 1.0]]]])}  # (1, 1 channel, 1, 2)
    method.setup({"1": student["1"].shape}, {"1": teacher["1"].shape})
    adapter = method.adapters["1"]
    assert isinstance(adapter, torch.nn.Conv2d) and adapter.kernel_size == (1, 1)
    with torch.no_grad():
        adapter.weight.copy_(torch.tensor([1.0, 2.0]).view(1, 2, 1, 1))
        adapter.bias.fill_(0.5)
    terms = method.losses(Outputs(labels=torch.tensor([0]), indices=torch.tensor([0]),
                                  student_logits=torch.zeros(1, 3), teacher_logits=torch.zeros(1, 3),
                                  student_features=student, teacher_features=teacher))
    # adapter: 1*ch0 + 2*ch1 + 0.5 = [1.5, 2.5]; MSE vs [1, 1] = (0.25 + 2.25) / 2 = 1.25; beta 2 -> 2.5
    assert terms["hint"].item() == pytest.approx(2.5)


def test_hint_loss_sum_is_fitnets_half_squared_norm():
    config = trial_config({"method": "hints", "links": "1", "beta": 2, "stage1_epochs": 1,
                                    "hint_loss": "sum"})
    method = method_class("hints")(config)
    student = {"1": torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]]])}  # (1, 1, 2, 2)
    teacher = {"1": torch.zeros(1, 1, 2, 2)}
    method.setup({"1": student["1"].shape}, {"1": teacher["1"].shape})
    with torch.no_grad():  # the 1x1 adapter as the identity
        method.adapters["1"].weight.fill_(1.0)
        method.adapters["1"].bias.zero_()
    outputs = Outputs(labels=torch.tensor([0]), indices=torch.tensor([0]), student_logits=None,
                      student_features=student, teacher_features=teacher)
    method.use_stage(method.stages()[0])
    # sum: beta * 1/2 * (1 + 4) = 5; mean (the default): beta * (1 + 4) / 4 = 2.5
    assert method.losses(outputs)["hint"].item() == pytest.approx(5.0)
    mean = method_class("hints")(config.replace(hint_loss="mean"))
    mean.setup({"1": student["1"].shape}, {"1": teacher["1"].shape})
    mean.load_state_dict(method.state_dict())
    mean.use_stage(mean.stages()[0])
    assert set(mean.losses(outputs)) == {"hint"}  # no logits in the hint stage: only its term is computed
    assert mean.losses(outputs)["hint"].item() == pytest.approx(2.5)


def test_hint_adapter_is_there_even_when_widths_match():
    config = trial_config({"method": "hints", "links": "1", "beta": 1, "stage1_epochs": 1})
    method = method_class("hints")(config)
    method.setup({"1": torch.Size([1, 4, 2, 2])}, {"1": torch.Size([1, 4, 2, 2])})
    assert isinstance(method.adapters["1"], torch.nn.Conv2d)


def test_hints_train_up_to_the_guided_layer_then_the_whole_student_with_kd(digits, trained_digits_teacher):
    config = trial_config({"method": "hints", "links": "2", "beta": 1, "stage1_epochs": 1, "epochs": 1,
                                    "alpha": 0.5, "temperature": 4, "lr": 0.01})
    trainer = trainer_for(config, digits, trained_digits_teacher[0])
    student, adapter = snapshot(trainer.student), snapshot(trainer.method.adapters)
    epochs = trainer.epochs()
    hint = next(epochs)
    # stage 1 moved the student up to link 2 (block2) and the adapter; nothing after it
    assert changed(student, trainer.student) == {"block1.0.weight", "block1.0.bias", "block2.0.weight", "block2.0.bias"}
    assert changed(adapter, trainer.method.adapters) == {"2.weight", "2.bias"}
    student, adapter = snapshot(trainer.student), snapshot(trainer.method.adapters)
    main = next(epochs)
    assert changed(student, trainer.student) == set(student)  # stage 2 trains the whole student...
    assert not changed(adapter, trainer.method.adapters)  # ...and leaves the adapter alone
    assert (hint["epoch"], hint["stage"], main["epoch"], main["stage"]) == (1, "hint", 2, "main")
    assert {k for k in hint if k.startswith("loss_")} == {"loss_hint"}
    assert {k for k in main if k.startswith("loss_")} == {"loss_hard", "loss_soft"}
    assert main["train_loss"] == pytest.approx(main["loss_hard"] + main["loss_soft"])
    assert "test_acc" in main


def bn_buffers(model):
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers()
            if name.endswith(("running_mean", "running_var"))}


def test_hint_stage_leaves_batchnorm_after_the_guided_layer_alone(digits):
    # ResNet-8 guided at link 2 (the end of section 1): the stem and layer1 train; layer2, layer3 and the
    # classifier are not trained in the hint stage, so their BatchNorm statistics must not move
    torch.manual_seed(0)
    teacher = build_model("resnet8", 10, (1, 8, 8)).state_dict()
    config = trial_config({"method": "hints", "teacher": "resnet8", "student": "resnet8", "links": "2",
                                    "beta": 1, "stage1_epochs": 2, "epochs": 1, "lr": 0.02, "batch_size": 64})
    trainer = trainer_for(config, digits, teacher)
    before = bn_buffers(trainer.student)
    epochs = trainer.epochs()
    hint = [next(epochs), next(epochs)]
    after = bn_buffers(trainer.student)
    guided = ("stem.", "layer1.")
    unchanged = {name for name in before if torch.equal(before[name], after[name])}
    assert unchanged == {name for name in before if not name.startswith(guided)}
    assert len(unchanged) == 8  # layer2 and layer3: one block of two BatchNorms each, mean and var...
    assert len(before) - len(unchanged) == 6  # ...while stem, layer1.0.bn1 and layer1.0.bn2 moved
    assert [m["stage"] for m in hint] == ["hint", "hint"]
    assert hint[1]["loss_hint"] < hint[0]["loss_hint"]  # and the stage still trains
    assert not any(m.training for m in trainer._frozen_modules)
    main = next(epochs)  # the main stage trains (and normalises with) the whole student again
    assert main["stage"] == "main" and {"loss_hard", "loss_soft"} <= set(main)
    final = bn_buffers(trainer.student)
    assert all(not torch.equal(after[name], final[name]) for name in after)
    trainer.close()


# ---- FSP (seed 002) -------------------------------------------------------------------------------

def test_fsp_loss_by_hand():
    config = trial_config({"method": "fsp", "fsp_pairs": "1-2", "beta": 0.5, "stage1_epochs": 1,
                                    "alpha": 0})
    method = method_class("fsp")(config)
    # two samples, one channel per layer, h=1, w=2
    s1, s2 = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]]), torch.tensor([[[[3.0, 4.0]]], [[[1.0, 1.0]]]])
    t1, t2 = torch.tensor([[[[1.0, 1.0]]], [[[2.0, 0.0]]]]), torch.tensor([[[[1.0, 1.0]]], [[[1.0, 5.0]]]])
    method.setup({"1": s1.shape, "2": s2.shape}, {"1": t1.shape, "2": t2.shape})
    terms = method.losses(Outputs(labels=torch.tensor([0, 0]), indices=torch.tensor([0, 1]),
                                  student_logits=torch.zeros(2, 3), student_features={"1": s1, "2": s2},
                                  teacher_features={"1": t1, "2": t2}))
    # sample 1: G_S = (1*3 + 2*4)/2 = 5.5, G_T = (1*1 + 1*1)/2 = 1 -> (5.5 - 1)^2 = 20.25
    # sample 2: G_S = 0,                   G_T = (2*1 + 0*5)/2 = 1 -> 1
    # mean over samples 10.625, times lambda = beta = 0.5 -> 5.3125; alpha=0 leaves the hard term at weight 1
    assert terms["fsp"].item() == pytest.approx(5.3125)
    assert terms["hard"].item() == pytest.approx(math.log(3))


def test_fsp_refuses_pairs_of_unequal_spatial_size_or_width(digits):
    config = trial_config({"method": "fsp", "fsp_pairs": "1-2", "beta": 1, "stage1_epochs": 1})
    with pytest.raises(ConfigError, match=r"fsp_pairs=1-2: links 1 \(8, 8, 8\) and 2 \(16, 4, 4\) of digits_student "
                                          "differ in spatial size"):
        trainer_for(config, digits, build_model("digits_teacher", 10, (1, 8, 8)).state_dict())
    method = method_class("fsp")(config)
    with pytest.raises(ConfigError, match="pair 1-2 gives a 8x8 FSP matrix in digits_student but 16x16 in "
                                          "digits_teacher; FSP needs equal channel widths"):
        method.setup({"1": torch.Size([1, 8, 4, 4]), "2": torch.Size([1, 8, 4, 4])},
                     {"1": torch.Size([1, 16, 4, 4]), "2": torch.Size([1, 16, 4, 4])})


def test_fsp_pretrains_the_flow_then_trains_the_main_task(digits):
    # seed 002's setting in miniature: ResNets share 16/32/64 widths; the pairs are the three sections.
    # The teacher is untrained here (its matrices are a valid target): this checks the mechanics, fast.
    torch.manual_seed(0)
    teacher = build_model("resnet8", 10, (1, 8, 8)).state_dict()
    config = trial_config({"method": "fsp", "teacher": "resnet8", "student": "resnet8", "alpha": 0,
                                    "fsp_pairs": "1-2,3-4,5-6", "beta": 0.01, "stage1_epochs": 2, "epochs": 1,
                                    "lr": 0.01, "batch_size": 128})
    trainer = trainer_for(config, digits, teacher)
    head = snapshot(trainer.student.classifier)
    epochs = trainer.epochs()
    fsp = [next(epochs), next(epochs)]
    assert not changed(head, trainer.student.classifier)  # stage 1 trains only what the matrices depend on
    main = next(epochs)
    assert [m["stage"] for m in fsp + [main]] == ["fsp", "fsp", "main"]
    assert [m["epoch"] for m in fsp + [main]] == [1, 2, 3]
    assert all({k for k in m if k.startswith("loss_")} == {"loss_fsp"} for m in fsp)
    assert fsp[1]["loss_fsp"] < fsp[0]["loss_fsp"]
    assert {k for k in main if k.startswith("loss_")} == {"loss_hard"}  # alpha=0: seed 002's stage 2
    assert changed(head, trainer.student.classifier)


# ---- conditional adversarial KD (seed 003) --------------------------------------------------------

def hand_discriminator(method, lr=0.1):
    """D(x) = [x0, x1, x0, x1]: label logits and Real/Fake logits both equal the input logits (C = 2)."""
    from kdtune.distill.discriminator import discriminator_optimizer

    linear = torch.nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    method.discriminator = linear
    method.disc_optimizer = discriminator_optimizer(linear, method.config.replace(disc_lr=lr, momentum=0,
                                                                                  weight_decay=0))
    return linear


def adversarial_batch():
    # teacher t = [ln 3, 0]: P(l=0|t) = P(Real|t) = 3/4; student s = [0, ln 3]: P(l=0|s) = 1/4, P(Fake|s) = 3/4
    student = torch.tensor([[0.0, LN3]], requires_grad=True)
    return Outputs(labels=torch.tensor([0]), indices=torch.tensor([0]), student_logits=student,
                   teacher_logits=torch.tensor([[LN3, 0.0]]))


def test_adversarial_student_terms_by_hand_and_the_way_l_gan_pushes():
    config = trial_config({"method": "adversarial", "hard_weight": 0.5, "l1_weight": 0.25,
                                    "adv_weight": 2})
    method = method_class("adversarial")(config)
    method.setup({}, {}, num_classes=2)
    discriminator = hand_discriminator(method)
    out = adversarial_batch()
    terms = method.losses(out)
    # L_S = -ln softmax(s)[0] = -ln(1/4) = ln 4                      -> x 0.5
    # L_L1 = |0 - ln 3| + |ln 3 - 0| = 2 ln 3                         -> x 0.25
    # L_A = ln P(Real|t) + ln P(Fake|s) = ln(3/4) + ln(3/4) = ln(9/16)
    # L_DS = ln P(0|t) + ln P(0|s) = ln(3/4) + ln(1/4) = ln(3/16)
    # L_GAN = (L_A - L_DS) / 2 = ln(3) / 2                            -> x 2
    assert terms["hard"].item() == pytest.approx(0.5 * math.log(4), rel=1e-6)
    assert terms["l1"].item() == pytest.approx(0.25 * 2 * LN3, rel=1e-6)
    assert terms["gan"].item() == pytest.approx(2 * LN3 / 2, rel=1e-6)
    # As a function of s: L_GAN = (ln p1(s) - ln p0(s)) / 2 + const = (s1 - s0) / 2 + const, so
    # d(2 L_GAN)/ds = [-1, 1]: descent raises s0 (D's 'Real' and the true label) and lowers s1 ('Fake').
    terms["gan"].backward()
    assert out.student_logits.grad[0].tolist() == pytest.approx([-1.0, 1.0])
    assert discriminator.weight.grad is None  # D is fixed in the student step


def test_adversarial_discriminator_step_by_hand_raises_its_objective_and_leaves_the_student():
    config = trial_config({"method": "adversarial"})
    method = method_class("adversarial")(config)
    method.setup({}, {}, num_classes=2)
    hand_discriminator(method)
    out = adversarial_batch()
    from kdtune.distill.losses import adversarial_log_likelihoods

    def objective():
        with torch.no_grad():
            l_a, l_ds = adversarial_log_likelihoods(method.discriminator(out.teacher_logits),
                                                    method.discriminator(out.student_logits), out.labels)
        return ((l_a + l_ds) / 2).item()

    metrics = method.before_student_step(out)
    # before the step: (L_A + L_DS) / 2 = (ln(9/16) + ln(3/16)) / 2 = ln(27/256) / 2
    assert metrics["disc_objective"].item() == pytest.approx(math.log(27 / 256) / 2, rel=1e-6)
    assert metrics["disc_source_acc"].item() == 1.0  # argmax: t is Real, s is Fake
    assert objective() > math.log(27 / 256) / 2  # gradient ascent on the log-likelihoods
    assert out.student_logits.grad is None  # the student's logits were detached


@pytest.fixture(scope="module")
def adversarial_config():
    return trial_config({"method": "adversarial", "epochs": 2, "lr": 0.01, "disc_lr": 0.01,
                                  "batch_size": 128})


@pytest.fixture(scope="module")
def adversarial_straight(adversarial_config, digits, trained_digits_teacher, teacher_cache):
    trainer = trainer_for(adversarial_config, digits, trained_digits_teacher[0], teacher_logits=teacher_cache)
    return trainer, run(trainer)


def test_adversarial_trains_on_cached_teacher_logits_and_logs_each_term(adversarial_straight):
    trainer, epochs = adversarial_straight
    assert trainer.teacher is None  # logits only: the offline cache serves, no teacher network runs
    for m in epochs:
        assert {"loss_hard", "loss_l1", "loss_gan", "disc_objective", "disc_source_acc"} <= set(m)
        assert m["train_loss"] == pytest.approx(m["loss_hard"] + m["loss_l1"] + m["loss_gan"])
        assert m["disc_objective"] <= 0  # a mean of log-likelihoods
    assert epochs[-1]["loss_l1"] < epochs[0]["loss_l1"]  # the student's logits move towards the teacher's


def test_adversarial_resumed_from_a_checkpoint_equals_the_uninterrupted_trial(
        adversarial_config, adversarial_straight, digits, trained_digits_teacher, teacher_cache, tmp_path):
    straight, straight_epochs = adversarial_straight
    first = trainer_for(adversarial_config, digits, trained_digits_teacher[0], teacher_logits=teacher_cache)
    next(first.epochs())
    torch.save(first.state_dict(), tmp_path / "trainer.pt")
    resumed = trainer_for(adversarial_config, digits, trained_digits_teacher[0], teacher_logits=teacher_cache)
    resumed.load_state_dict(torch.load(tmp_path / "trainer.pt", weights_only=True))
    final = run(resumed)[-1]
    assert final["epoch"] == 2
    for key in ("val_acc", "test_acc", "loss_gan", "loss_l1", "disc_objective"):
        assert final[key] == pytest.approx(straight_epochs[-1][key], rel=1e-5), key
    for name, value in straight.method.discriminator.state_dict().items():
        assert torch.allclose(resumed.method.discriminator.state_dict()[name], value, atol=1e-6), name
    momentum = [s["momentum_buffer"] for s in straight.method.disc_optimizer.state_dict()["state"].values()]
    resumed_momentum = [s["momentum_buffer"] for s in resumed.method.disc_optimizer.state_dict()["state"].values()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(momentum, resumed_momentum)) and momentum


# ---- adversarial KD with a pre-trained discriminator (seed 004) -----------------------------------

def test_seed004_loss_by_hand_and_the_way_it_pushes():
    config = trial_config({"method": "adversarial_pretrained", "stage1_epochs": 1, "hard_weight": 0.5,
                                    "adv_weight": 2})
    method = method_class("adversarial_pretrained")(config)
    method.setup({}, {}, num_classes=2)
    linear = torch.nn.Linear(2, 1, bias=False).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -1.0]]))  # logit of 'student' z = s0 - s1
    method.discriminator = linear
    student = torch.tensor([[LN3, 0.0]], requires_grad=True)
    out = Outputs(labels=torch.tensor([0]), indices=torch.tensor([0]), student_logits=student)
    method.use_stage(method.stages()[1])
    terms = method.losses(out)
    # alpha * H(y, P_S) = 0.5 * -ln(3/4); z = ln 3, P(student) = 3/4, L_class = -ln(3/4); -beta * L_class
    assert terms["hard"].item() == pytest.approx(0.5 * -math.log(3 / 4), rel=1e-6)
    assert terms["adv"].item() == pytest.approx(-2 * -math.log(3 / 4), rel=1e-6)
    # dL_class/dz = -(1 - 3/4) = -1/4, dz/ds = [1, -1] -> d(-2 L_class)/ds = [1/2, -1/2]: descent lowers z,
    # i.e. the student moves towards logits the discriminator calls 'teacher'
    terms["adv"].backward()
    assert student.grad[0].tolist() == pytest.approx([0.5, -0.5])
    # the pre-training stage is plain training: CE at weight 1, no adversarial term
    method.use_stage(method.stages()[0])
    assert set(method.losses(out)) == {"hard"}
    assert method.losses(out)["hard"].item() == pytest.approx(-math.log(3 / 4), rel=1e-6)


def test_seed004_nonsaturating_loss_by_hand_is_bounded_and_pushes_the_same_way():
    config = trial_config({"method": "adversarial_pretrained", "stage1_epochs": 1, "hard_weight": 0.5,
                                    "adv_weight": 2, "adv_loss": "nonsaturating"})
    method = method_class("adversarial_pretrained")(config)
    method.setup({}, {}, num_classes=2)
    linear = torch.nn.Linear(2, 1, bias=False).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -1.0]]))  # logit of 'student' z = s0 - s1
    method.discriminator = linear
    student = torch.tensor([[LN3, 0.0]], requires_grad=True)
    method.use_stage(method.stages()[1])
    terms = method.losses(Outputs(labels=torch.tensor([0]), indices=torch.tensor([0]), student_logits=student))
    # z = ln 3: P(teacher) = 1/4; beta * -ln P(teacher) = 2 ln 4 >= 0 (the paper's form gives -2 ln(4/3) here)
    assert terms["adv"].item() == pytest.approx(2 * math.log(4), rel=1e-6) and terms["adv"].item() >= 0
    assert terms["hard"].item() == pytest.approx(0.5 * -math.log(3 / 4), rel=1e-6)
    # d(beta softplus(z))/dz = beta * sigmoid(z) = 3/2, dz/ds = [1, -1]: descent lowers z, towards 'teacher',
    # the direction the paper's form pushes (its gradient here is [1/2, -1/2])
    terms["adv"].backward()
    assert student.grad[0].tolist() == pytest.approx([1.5, -1.5])


@pytest.mark.parametrize("method", ["adversarial", "adversarial_pretrained"])
def test_discriminator_starts_the_same_with_or_without_the_teacher_cache(method, digits, trained_digits_teacher,
                                                                         teacher_cache):
    # building the teacher online draws from the global generator; the method's set-up is seeded on its own
    config = trial_config({"method": method, "epochs": 1, "disc_hidden": 16,
                                    **({"stage1_epochs": 1} if method == "adversarial_pretrained" else {})})
    cached = trainer_for(config, digits, trained_digits_teacher[0], teacher_logits=teacher_cache)
    online = trainer_for(config.replace(teacher_cache="off"), digits, trained_digits_teacher[0],
                         teacher_logits=teacher_cache)
    assert cached.teacher is None and online.teacher is not None
    for name, value in cached.method.discriminator.state_dict().items():
        assert torch.equal(online.method.discriminator.state_dict()[name], value), name
    for name, value in cached.student.state_dict().items():
        assert torch.equal(online.student.state_dict()[name], value), name
    seeded = trainer_for(config.replace(seed=1), digits, trained_digits_teacher[0], teacher_logits=teacher_cache)
    assert not torch.equal(seeded.method.discriminator.net[0].weight, cached.method.discriminator.net[0].weight)


def test_seed004_nonsaturating_trial_trains_with_a_term_bounded_below(digits, trained_digits_teacher, teacher_cache):
    config = trial_config({"method": "adversarial_pretrained", "stage1_epochs": 1, "epochs": 1,
                                    "lr": 0.03, "disc_epochs": 2, "adv_weight": 1.0, "batch_size": 128,
                                    "adv_loss": "nonsaturating"})
    epochs = run(trainer_for(config, digits, trained_digits_teacher[0], teacher_logits=teacher_cache))
    assert [m["stage"] for m in epochs] == ["pretrain", "adversarial"]
    assert epochs[-1]["loss_adv"] >= 0 and math.isfinite(epochs[-1]["loss_adv"])


def test_seed004_pretrains_fits_the_discriminator_once_and_resumes_exactly(
        digits, trained_digits_teacher, teacher_cache, tmp_path):
    config = trial_config({"method": "adversarial_pretrained", "stage1_epochs": 1, "epochs": 2,
                                    "lr": 0.03, "disc_epochs": 3, "adv_weight": 0.5, "batch_size": 128})
    straight = trainer_for(config, digits, trained_digits_teacher[0], teacher_logits=teacher_cache)
    epochs = run(straight)
    assert [m["stage"] for m in epochs] == ["pretrain", "adversarial", "adversarial"]
    assert {k for k in epochs[0] if k.startswith("loss_")} == {"loss_hard"} and "disc_heldout_acc" not in epochs[0]
    for m in epochs[1:]:
        assert {k for k in m if k.startswith("loss_")} == {"loss_hard", "loss_adv"} and m["loss_adv"] <= 0
        assert m["disc_heldout_acc"] == epochs[1]["disc_heldout_acc"] > 0.5  # fitted once, better than chance

    first = trainer_for(config, digits, trained_digits_teacher[0], teacher_logits=teacher_cache)
    it = first.epochs()
    next(it), next(it)  # through the discriminator's fit
    torch.save(first.state_dict(), tmp_path / "trainer.pt")
    resumed = trainer_for(config, digits, trained_digits_teacher[0], teacher_logits=teacher_cache)
    resumed.load_state_dict(torch.load(tmp_path / "trainer.pt", weights_only=True))
    final = run(resumed)
    assert [m["epoch"] for m in final] == [3]
    for key in ("val_acc", "loss_adv", "loss_hard", "disc_heldout_acc"):
        assert final[-1][key] == pytest.approx(epochs[-1][key], rel=1e-5), key


# ---- dense students from conv teachers (seed 001 §3.3) --------------------------------------------

def test_kd_trains_a_dense_student_from_a_conv_teacher(digits, trained_digits_teacher, teacher_cache):
    # nothing dense-specific: the conv teacher's logits (cached) are all KD needs from it
    config = trial_config({"method": "kd", "student": "dense_student", "epochs": 2, "lr": 0.05,
                                    "temperature": 4})
    epochs = run(trainer_for(config, digits, trained_digits_teacher[0], teacher_logits=teacher_cache))
    assert {"loss_hard", "loss_soft"} <= set(epochs[-1])
    assert epochs[-1]["test_acc"] > 0.9


# ---- configuration --------------------------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"method": "hints", "links": "2", "stage1_epochs": 0}, "stage1_epochs=0: must be a whole number >= 1 "
                                                           "(method 'hints')"),
    ({"method": "hints", "stage1_epochs": 2, "beta": 1}, "links='': method 'hints' needs at least one"),
    ({"method": "hints", "links": "2", "beta": 0}, "beta=0.0: must be > 0 (method 'hints')"),
    ({"method": "kd", "stage1_epochs": 3}, "unknown config key 'stage1_epochs' for method 'kd'"),
    ({"method": "fsp", "stage1_epochs": -1}, "stage1_epochs=-1: must be a whole number >= 1"),
    ({"method": "fsp", "stage1_epochs": 1, "beta": 1}, "fsp_pairs='': method 'fsp' needs at least one layer pair"),
    ({"method": "fsp", "fsp_pairs": "1-2", "beta": -1}, "beta=-1.0: must be > 0 (method 'fsp')"),
    ({"fsp_pairs": "1-2"}, "unknown config key 'fsp_pairs' for method 'kd'"),
    ({"method": "fsp", "fsp_pairs": "1-1"}, "fsp_pairs='1-1': pair 1-1 needs two different links"),
    ({"method": "fsp", "fsp_pairs": "1-2,3"}, "fsp_pairs='1-2,3': '3' is not a pair of links; expected e.g."),
    ({"method": "fsp", "fsp_pairs": "1-2,2-1"}, "fsp_pairs='1-2,2-1': pair 1-2 is listed twice"),
    ({"method": "kd", "links": "2"}, "unknown config key 'links' for method 'kd'"),
    ({"method": "adversarial", "hard_weight": 0, "l1_weight": 0, "adv_weight": 0},
     "hard_weight=0.0, l1_weight=0.0, adv_weight=0.0: method 'adversarial' needs a term of weight > 0"),
    ({"method": "adversarial", "l1_weight": -1}, "l1_weight=-1.0: must be >= 0"),
    ({"method": "adversarial", "adv_weight": "much"}, "adv_weight='much': expected a float"),
    ({"method": "adversarial", "disc_lr": 0}, "disc_lr=0.0: must be > 0"),
    ({"method": "adversarial", "disc_hidden": 0}, "disc_hidden=0: must be a whole number >= 1"),
    ({"method": "adversarial_pretrained", "disc_epochs": 0}, "disc_epochs=0: must be a whole number >= 1"),
    ({"method": "adversarial_pretrained", "stage1_epochs": 0},
     "stage1_epochs=0: must be a whole number >= 1 (method 'adversarial_pretrained')"),
    ({"soft_scale": "T^2"}, "soft_scale='T^2': unknown; allowed: T2, none"),
    ({"method": "hints", "links": "2", "hint_loss": "l2"}, "hint_loss='l2': unknown; allowed: mean, sum"),
    ({"method": "adversarial_pretrained", "adv_loss": "bounded"},
     "adv_loss='bounded': unknown; allowed: nonsaturating, paper"),
    ({"method": "kd", "alpha": 0.5, "adv_weight": 1}, "unknown config key 'adv_weight' for method 'kd'"),
    ({"deterministic": "maybe"}, "deterministic='maybe': expected a bool"),
])
def test_bad_method_settings_are_rejected_with_one_line(values, message):
    with pytest.raises(ConfigError) as error:
        trial_config(values)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_fsp_pairs_forms_and_round_trip():
    config = trial_config({"method": "fsp", "teacher": "resnet26", "student": "resnet8", "beta": 1,
                                    "stage1_epochs": 1, "fsp_pairs": [(5, 6), [1, 2]]})
    assert config.fsp_pairs == (("1", "2"), ("5", "6"))
    assert config.to_flat()["fsp_pairs"] == "1-2,5-6"
    assert trial_config(config.to_flat()).to_flat() == config.to_flat()
    assert trial_config({**config.to_flat(), "fsp_pairs": "6-5,2-1"}).fsp_pairs == (("1", "2"), ("5", "6"))


def test_the_seed_forms_are_settings_with_kdtunes_defaults():
    config = trial_config({})
    assert (config.soft_scale, config.deterministic) == ("T2", False)
    assert trial_config({"method": "hints", "links": "2"}).hint_loss == "mean"
    assert trial_config({"method": "adversarial_pretrained"}).adv_loss == "paper"
    flat = trial_config({"soft_scale": "none", "deterministic": "true", "method": "hints", "links": "2",
                                  "beta": 1, "stage1_epochs": 1, "hint_loss": "sum"}).to_flat()
    assert (flat["soft_scale"], flat["deterministic"], flat["hint_loss"]) == ("none", True, "sum")
    assert trial_config(flat).to_flat() == flat


def test_hard_weight_defaults_to_one_without_a_soft_term():
    assert trial_config({"method": "adversarial"}).effective_hard_weight == 1.0
    assert trial_config({"method": "adversarial"}).to_flat()["hard_weight"] == 1.0
    assert trial_config({"method": "kd", "alpha": 0.7}).effective_hard_weight == pytest.approx(0.3)
    # a study's shared values reach only the methods that declare them: alpha is kd's, not the adversarial's
    assert trial_config({"method": "adversarial"}, base={"alpha": 0.7}).effective_hard_weight == 1.0
    # a default stays a default when the method changes
    from kdtune.distill import method_class

    kd = trial_config({"method": "kd", "alpha": 0.7})
    assert kd.replace(method="adversarial", method_class=method_class("adversarial")).effective_hard_weight == 1.0
