"""The CIFAR-100 KD benchmark's models (Tian et al., CRD; RepDistiller / mdistiller): sizes, link points and the
pooled embedding that relation / contrastive methods (RKD, CRD) read."""
import functools

import pytest
import torch
from torch import nn

from kdtune import models

CIFAR = (3, 32, 32)

# name: (the figure quoted for the benchmark at 100 classes, the exact count of RepDistiller's own model code
# at num_classes=100, which mdistiller's copy gives too)
PUBLISHED = {
    "resnet8x4": (1_230_000, 1_233_540),
    "resnet32x4": (7_430_000, 7_433_860),
    "wrn_40_2": (2_260_000, 2_255_156),
    "wrn_16_2": (700_000, 703_284),
    "wrn_40_1": (570_000, 569_780),
    "shufflenetv2": (1_350_000, 1_355_528),
    "mobilenetv2": (810_000, 812_836),
}
NAMES = list(PUBLISHED)

# link points: number -> (module path, shape without the batch for a 3x32x32 input); the last is the embedding
LINKS = {
    "resnet8x4": {1: ("layer1", (64, 32, 32)), 2: ("layer2", (128, 16, 16)), 3: ("layer3", (256, 8, 8)),
                  4: ("embedding", (256,))},
    "resnet32x4": {1: ("layer1", (64, 32, 32)), 2: ("layer2", (128, 16, 16)), 3: ("layer3", (256, 8, 8)),
                   4: ("embedding", (256,))},
    "wrn_40_2": {1: ("group1", (32, 32, 32)), 2: ("group2", (64, 16, 16)), 3: ("group3", (128, 8, 8)),
                 4: ("embedding", (128,))},
    "wrn_16_2": {1: ("group1", (32, 32, 32)), 2: ("group2", (64, 16, 16)), 3: ("group3", (128, 8, 8)),
                 4: ("embedding", (128,))},
    "wrn_40_1": {1: ("group1", (16, 32, 32)), 2: ("group2", (32, 16, 16)), 3: ("group3", (64, 8, 8)),
                 4: ("embedding", (64,))},
    "shufflenetv2": {1: ("layer1", (116, 16, 16)), 2: ("layer2", (232, 8, 8)), 3: ("layer3", (464, 4, 4)),
                     4: ("embedding", (1024,))},
    "mobilenetv2": {1: ("blocks.1", (12, 16, 16)), 2: ("blocks.2", (16, 8, 8)), 3: ("blocks.4", (48, 4, 4)),
                    4: ("blocks.6", (160, 2, 2)), 5: ("embedding", (1280,))},
}


@functools.lru_cache(maxsize=None)
def built(name, num_classes=100, shape=CIFAR):
    torch.manual_seed(0)
    return models.build_model(name, num_classes, shape).eval()


def forward_with_taps(model, link_points, x):
    """Logits, every link point's feature, and the classifier's input (a forward pre-hook)."""
    tap = models.FeatureTap(model, link_points)
    seen = {}
    handle = model.classifier.register_forward_pre_hook(lambda _m, inputs: seen.setdefault("input", inputs[0]))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        tap.remove()
        handle.remove()
    return logits, tap.features, seen["input"]


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_the_published_figure(name):
    published, authors_code = PUBLISHED[name]
    size = models.count_parameters(built(name))
    assert abs(size - published) <= 0.01 * published, f"{name}: {size:,} vs {published:,}"
    assert size == authors_code


@pytest.mark.parametrize("name", NAMES)
def test_links_are_stage_ends_then_the_embedding_and_the_embedding_is_the_classifiers_input(name):
    spec = models.model_spec(name)
    assert spec.link_points == {k: path for k, (path, _) in LINKS[name].items()}
    last = max(spec.link_points)
    assert spec.link_points[last] == "embedding" and sorted(spec.link_points) == list(range(1, last + 1))
    model = built(name)
    assert isinstance(dict(model.named_modules())["embedding"], nn.Flatten)
    logits, features, classifier_input = forward_with_taps(model, spec.link_points, torch.randn(2, *CIFAR))
    assert logits.shape == (2, 100)
    assert {k: tuple(f.shape[1:]) for k, f in features.items()} == {k: s for k, (_, s) in LINKS[name].items()}
    embedding = features[last]
    assert embedding.dim() == 2 and embedding.shape == (2, model.classifier.in_features)
    assert torch.equal(embedding, classifier_input)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8)])
def test_builds_for_small_inputs_and_any_number_of_classes(name, shape):
    model = built(name, 7, shape)
    spec = models.model_spec(name)
    logits, features, classifier_input = forward_with_taps(model, spec.link_points, torch.randn(2, *shape))
    assert logits.shape == (2, 7)
    assert set(features) == set(spec.link_points)
    embedding_width = LINKS[name][max(spec.link_points)][1]
    assert tuple(features[max(spec.link_points)].shape) == (2, *embedding_width)
    assert torch.equal(features[max(spec.link_points)], classifier_input)


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "shufflenetv2", "mobilenetv2"])
def test_a_loss_on_every_link_trains_through_the_model(name):
    # hooked features feed hint / relation losses: nothing may modify them in place before backward
    model = models.build_model(name, 10, (3, 16, 16)).train()
    tap = models.FeatureTap(model, models.model_spec(name).link_points)
    logits = model(torch.randn(3, 3, 16, 16))
    loss = logits.logsumexp(1).mean() + sum(f.pow(2).mean() for f in tap.features.values())
    loss.backward()
    stem = next(model.parameters())
    assert stem.grad is not None and stem.grad.abs().sum() > 0


def test_the_benchmark_pairs_share_their_link_numbers():
    for teacher, student in (("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"),
                             ("resnet32x4", "shufflenetv2")):
        models.check_links(teacher, student, (1, 2, 3, 4))  # 4 = the embedding of both
    models.check_links("wrn_40_2", "mobilenetv2", (1, 2, 3))  # MobileNetV2's embedding is link 5


def test_the_seed_models_are_unchanged_and_their_penultimate_features_are_where_documented():
    # no embedding module was added to the existing families; their (N, D) pre-classifier vector is:
    #   resnet / wrn: the classifier's input (their `pool` gives (N, C, 1, 1)); vgg / cnn: the last `fcK`;
    #   mlp: the last `hiddenK` (the classifier reads it through dropout, identity when dropout is 0)
    cases = {"resnet8": (CIFAR, None), "wrn_10_4": (CIFAR, None), "digits_student": ((1, 8, 8), "fc1"),
             "cnn1": (CIFAR, "fc1"), "mlp_2x800": ((1, 28, 28), "hidden2")}
    for name, (shape, path) in cases.items():
        model = built(name, 10, shape)
        names = dict(model.named_modules())
        assert "embedding" not in names
        link_points = {0: path} if path else {0: "pool"}
        _, features, classifier_input = forward_with_taps(model, link_points, torch.randn(2, *shape))
        if path:
            assert torch.equal(features[0], classifier_input)
        else:
            assert features[0].shape == (*classifier_input.shape, 1, 1)
            assert torch.equal(features[0].flatten(1), classifier_input)
    assert models.count_parameters(built("resnet32", 10, CIFAR)) == 464_154  # option-A shortcuts as before
