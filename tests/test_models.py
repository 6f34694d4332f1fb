import pytest
import torch
from torch import nn

from kdtune import models


def conv_widths(model, block):
    return [m.out_channels for m in getattr(model, block) if isinstance(m, nn.Conv2d)]


def test_vgg16_and_vgg7_match_seed000_table1_layer_by_layer():
    vgg16 = models.build_model("vgg16", 10, (3, 32, 32))
    vgg7 = models.build_model("vgg7", 10, (3, 32, 32))
    assert [conv_widths(vgg16, f"block{i}") for i in range(1, 6)] == [
        [64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
    assert [conv_widths(vgg7, f"block{i}") for i in range(1, 6)] == [[64], [128], [256], [512], [512]]
    for model in (vgg16, vgg7):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.kernel_size == (3, 3) for c in convs)
        assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    linears = lambda m: [l.out_features for l in m.modules() if isinstance(l, nn.Linear)]
    assert linears(vgg16) == [4096, 4096, 10]  # FC-4096 FC-4096 FC-10
    assert linears(vgg7) == [4096, 10]  # one fewer FC layer


def test_six_link_points_have_matching_shapes_for_a_32x32_input():
    expected = {1: (64, 32, 32), 2: (128, 16, 16), 3: (256, 8, 8), 4: (512, 4, 4), 5: (512, 2, 2), 6: (4096,)}
    shapes = {}
    for name in ("vgg16", "vgg7"):
        model = models.build_model(name, 10, (3, 32, 32))
        assert sorted(models.model_spec(name).link_points) == [1, 2, 3, 4, 5, 6]
        tap = models.FeatureTap(model, models.model_spec(name).link_points)
        logits = model(torch.randn(2, 3, 32, 32))
        assert logits.shape == (2, 10)
        shapes[name] = {k: tuple(v.shape[1:]) for k, v in tap.features.items()}
        tap.remove()
    assert shapes["vgg16"] == expected == shapes["vgg7"]


def test_digits_pair_has_linkable_points_and_registry_builds_by_name():
    teacher = models.build_model("digits_teacher", 10, (1, 8, 8))
    student = models.build_model("digits_student", 10, (1, 8, 8))
    assert models.count_parameters(student) < models.count_parameters(teacher) / 10
    assert models.model_spec("digits_student").link_points.keys() == models.model_spec("digits_teacher").link_points.keys()
    with pytest.raises(Exception, match="model='nope': unknown"):
        models.build_model("nope", 10, (1, 8, 8))


def test_parameter_counts(capsys):
    counts = {n: models.count_parameters(models.build_model(n, 10, (3, 32, 32))) for n in ("vgg16", "vgg7")}
    print(counts)
    # conv stack of VGG-16 is 14.71M (Simonyan & Zisserman); the CIFAR head adds 512*4096 + 4096*4096 + 4096*10
    assert counts["vgg16"] == 14_714_688 + (512 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 10 + 10)
