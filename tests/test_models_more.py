"""The seed papers' models: sizes against the papers' figures, link points, and a forward pass for each dataset."""
import functools

import pytest
import torch
from torch import nn

from kdtune import models
from kdtune.data import dataset_info, dataset_names
from kdtune.errors import ConfigError
from kdtune.models.mlp import MLP
from kdtune.models.resnet import FSP_PAIRS, CifarResNet
from kdtune.models.wrn import WideResNet
from kdtune.recipes import recipe_for

CIFAR = (3, 32, 32)
MNIST = (1, 28, 28)


def count(module_type, model):
    return sum(isinstance(m, module_type) for m in model.modules())


@functools.lru_cache(maxsize=None)
def built(name, num_classes, shape):
    """Each model is built once per session: WRN-40-10's 56M weights take seconds to initialise."""
    return models.build_model(name, num_classes, shape).eval()


def link_shapes(name, num_classes, shape, batch=2):
    """Forward a batch and return the logits' shape and every link point's feature shape (without the batch)."""
    model = built(name, num_classes, shape)
    tap = models.FeatureTap(model, models.model_spec(name).link_points)
    with torch.no_grad():
        logits = model(torch.randn(batch, *shape))
    tap.remove()
    return tuple(logits.shape), {k: tuple(v.shape[1:]) for k, v in tap.features.items()}


def assert_near(value, paper, tolerance):
    assert abs(value - paper) <= tolerance * paper, f"{value:,} is not within {tolerance:.0%} of {paper:,}"


def test_seed001_cnns_match_the_papers_layer_counts_and_sizes():
    nets = {n: built(n, 10, CIFAR) for n in ("cnn11", "cnn2", "cnn1", "dense_student")}
    sizes = {n: models.count_parameters(m) for n, m in nets.items()}
    print(sizes)
    # §3: "11 convolutional layers, 4 max-pooling layers and 3 dense layers, totalling around 12 million"
    assert (count(nn.Conv2d, nets["cnn11"]), count(nn.MaxPool2d, nets["cnn11"]), count(nn.Linear, nets["cnn11"])) == (11, 4, 3)
    assert_near(sizes["cnn11"], 12_000_000, 0.03)
    # "two convolution-max-pooling blocks, and one dense layer, totalling around 250 thousand"
    assert (count(nn.Conv2d, nets["cnn2"]), count(nn.MaxPool2d, nets["cnn2"])) == (2, 2)
    assert_near(sizes["cnn2"], 250_000, 0.03)
    # §3.2: "one convolutional, max-pooling and dense layer, totalling 130k parameters"
    assert (count(nn.Conv2d, nets["cnn1"]), count(nn.MaxPool2d, nets["cnn1"])) == (1, 1)
    assert_near(sizes["cnn1"], 130_000, 0.03)
    # §3.3: a student of dense layers only
    assert count(nn.Conv2d, nets["dense_student"]) == 0 and sizes["dense_student"] < 300_000


def test_seed001_hint_and_guided_layers_have_the_same_spatial_size():
    teacher = link_shapes("cnn11", 10, CIFAR)[1]
    assistant = link_shapes("cnn2", 10, CIFAR)[1]
    student = link_shapes("cnn1", 10, CIFAR)[1]
    dense = link_shapes("dense_student", 10, CIFAR)[1]
    assert teacher == {1: (64, 32, 32), 2: (128, 16, 16), 3: (256, 8, 8), 4: (512, 4, 4), 5: (768,)}
    assert assistant == {1: (32, 32, 32), 2: (64, 16, 16), 5: (56,)}
    assert student == {1: (16, 32, 32), 5: (32,)}
    assert dense == {5: (80,)}  # the last hidden layer, linkable to the teacher's last dense layer
    models.check_links("cnn11", "cnn2", (1, 2, 5))
    models.check_links("cnn2", "cnn1", (1,))  # the teacher assistant's hint for the small student
    with pytest.raises(ConfigError, match="link 2 is not a link point of both cnn11 and cnn1; allowed: 1, 5"):
        models.check_links("cnn11", "cnn1", (2,))


@pytest.mark.parametrize("name, hidden, paper_weights", [
    ("mlp_2x1200", [1200] * 2, 2_392_800), ("mlp_2x800", [800] * 2, 1_275_200),      # MNIST
    ("mlp_3x1200", [1200] * 3, 3_832_800), ("mlp_3x800", [800] * 3, 1_915_200),      # notMNIST
    ("mlp_2x4096", [4096] * 2, 20_029_440), ("mlp_2x3072", [3072] * 2, 11_876_352),  # SVHN in MNIST format
])
def test_seed004_mlps_have_the_papers_weight_counts_on_28x28_input(name, hidden, paper_weights):
    model = models.build_model(name, 10, MNIST)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    print(name, "weights", weights, "with biases", models.count_parameters(model))
    assert weights == paper_weights  # §4 counts weights without biases
    assert models.count_parameters(model) == paper_weights + sum(hidden) + 10
    logits, links = link_shapes(name, 10, MNIST)
    assert logits == (2, 10) and links == {k: (w,) for k, w in enumerate(hidden, start=1)}
    assert link_shapes(name, 10, CIFAR)[0] == (2, 10)  # any input shape is flattened


def test_mlp_links_see_the_feature_not_its_dropped_out_copy():
    model = MLP([64, 64], 10, MNIST, dropout=0.5).train()
    tap = models.FeatureTap(model, {1: "hidden1"})
    x = torch.randn(8, *MNIST)
    torch.manual_seed(0)
    first_logits, first_link = model(x), tap.features[1].clone()
    second_logits, second_link = model(x), tap.features[1]
    assert not torch.equal(first_logits, second_logits)  # dropout is on in training
    assert torch.equal(first_link, second_link)
    assert torch.equal(model.eval()(x), model(x))


def test_seed002_resnets_have_the_cifar_sizes_and_matching_fsp_points():
    sizes = {d: models.count_parameters(built(f"resnet{d}", 10, CIFAR)) for d in (8, 26, 32)}
    print(sizes)
    assert_near(sizes[32], 460_000, 0.02)  # He et al. Table 6: ResNet-32 0.46M
    assert_near(sizes[8], 78_000, 0.04)
    assert sizes[8] < sizes[26] < sizes[32]
    for depth in (8, 26, 32):
        model = built(f"resnet{depth}", 10, CIFAR)
        assert count(nn.Conv2d, model) + count(nn.Linear, model) == depth  # 6n+2 weighted layers, option-A shortcuts
    expected = {1: (16, 32, 32), 2: (16, 32, 32), 3: (32, 16, 16), 4: (32, 16, 16), 5: (64, 8, 8), 6: (64, 8, 8)}
    assert link_shapes("resnet8", 100, CIFAR) == ((2, 100), expected)
    assert link_shapes("resnet32", 100, CIFAR)[1] == expected  # teacher and student pair on every point
    for start, end in FSP_PAIRS:
        assert expected[start][1:] == expected[end][1:]  # an FSP matrix needs equal h x w
    with pytest.raises(ValueError, match="depth=9: a CIFAR ResNet has 6n\\+2 layers"):
        CifarResNet(9, 10, CIFAR)


def test_wrn_follows_the_wrn_papers_parameter_counts():
    # Zagoruyko & Komodakis, Tables 1 and 4 (CIFAR-10): the conventions the registry's WRNs are built with.
    for depth, widen, paper in ((28, 10, 36_500_000), (40, 4, 8_900_000), (16, 8, 11_000_000)):
        assert_near(models.count_parameters(WideResNet(depth, widen, 10, CIFAR)), paper, 0.01)
    sizes = {n: models.count_parameters(built(n, 10, CIFAR)) for n in ("wrn_40_10", "wrn_22_4", "wrn_10_4")}
    print(sizes)
    assert_near(sizes["wrn_40_10"], 55_600_000, 0.01)  # 55.84M: the 55.6M often quoted is 0.4% lower
    assert_near(sizes["wrn_22_4"], 4_300_000, 0.01)
    assert_near(sizes["wrn_10_4"], 1_200_000, 0.01)


def test_seed003_wrns_link_at_group_outputs_and_students_use_dropout_03():
    assert link_shapes("wrn_40_10", 10, CIFAR, batch=1) == ((1, 10), {1: (160, 32, 32), 2: (320, 16, 16), 3: (640, 8, 8)})
    assert link_shapes("wrn_10_4", 10, CIFAR)[1] == {1: (64, 32, 32), 2: (128, 16, 16), 3: (256, 8, 8)}
    for name, p in (("wrn_10_4", 0.3), ("wrn_22_4", 0.3)):
        assert {m.p for m in built(name, 10, CIFAR).modules() if isinstance(m, nn.Dropout)} == {p}
    assert count(nn.Dropout, built("wrn_40_10", 10, CIFAR)) == 0
    models.check_links("wrn_40_10", "wrn_22_4", (1, 2, 3))


@pytest.mark.parametrize("dataset", [n for n in dataset_names() if n not in ("digits", "cifar10", "cifar100")])
def test_each_new_datasets_recipe_pair_builds_for_its_shape_and_shares_links(dataset):
    info, recipe = dataset_info(dataset), recipe_for(dataset)
    sizes = {}
    for role in ("teacher", "student"):
        logits, _ = link_shapes(recipe[role], info.num_classes, info.input_shape, batch=1)
        assert logits == (1, info.num_classes)
        sizes[role] = models.count_parameters(built(recipe[role], info.num_classes, info.input_shape))
    assert sizes["student"] < sizes["teacher"]
    shared = set(models.model_spec(recipe["teacher"]).link_points) & set(models.model_spec(recipe["student"]).link_points)
    assert len(shared) >= 2
    for part in ("student_recipe", "teacher_recipe"):
        assert recipe[part]["lr_step_epochs"] < recipe[part]["epochs"]  # the decay happens within the budget


@pytest.mark.parametrize("name, shape", [("resnet8", CIFAR), ("wrn_10_4", CIFAR), ("cnn2", CIFAR),
                                         ("dense_student", CIFAR), ("mlp_2x800", MNIST)])
def test_a_loss_on_every_link_trains_through_the_model(name, shape):
    # Hooked features feed hint/FSP losses: nothing may modify them in place before backward.
    model = models.build_model(name, 10, shape).train()
    tap = models.FeatureTap(model, models.model_spec(name).link_points)
    logits = model(torch.randn(4, *shape))
    loss = logits.logsumexp(1).mean() + sum(f.pow(2).mean() for f in tap.features.values())
    loss.backward()
    first = next(model.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
