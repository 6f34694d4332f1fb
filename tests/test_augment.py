import pickle

import pytest
import torch

from kdtune.augment import Augment, parse_augment
from kdtune.data import DeviceData, crop_and_flip, from_arrays
from kdtune.errors import ConfigError

IMAGE = (3, 8, 8)


def _images(n=6, shape=IMAGE, seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed)) + 0.1  # no zeros: padding shows


@pytest.mark.parametrize("text", [None, "", "  ", "none", "None"])
def test_no_recipe_means_no_augmentation(text):
    assert parse_augment(text, IMAGE) is None


@pytest.mark.parametrize("text, fragment", [
    ("blur", "unknown step 'blur'"),
    ("crop:4,,flip", "unknown step ''"),
    ("crop", "step 'crop' needs a number"),
    ("flip:2", "step 'flip:2' takes no number"),
    ("crop:x", "crop:x needs the padding in pixels, an integer >= 0"),
    ("crop:-1", "crop:-1 needs the padding in pixels"),
    ("random_resized_crop:0", "random_resized_crop:0 needs the output size in pixels, an integer >= 1"),
])
def test_bad_recipes_name_the_step_and_the_allowed_ones(text, fragment):
    with pytest.raises(ConfigError) as error:
        parse_augment(text, IMAGE)
    message = str(error.value)
    assert message.startswith(f"augment={text!r}: ") and fragment in message
    assert "allowed steps: crop:P" in message and "flip" in message and "random_resized_crop:S" in message


def test_augmenting_non_image_samples_is_refused():
    with pytest.raises(ConfigError) as error:
        parse_augment("flip", (64,))
    assert str(error.value) == "augment='flip': needs image samples (C, H, W); this dataset's samples are (64,)"
    with pytest.raises(ConfigError, match=r"samples are \(2, 100\)"):
        parse_augment("crop:4", (2, 100))


def test_crop_4_flip_equals_crop_and_flip_for_the_same_generator_state():
    images = _images(16)
    recipe = parse_augment("crop:4,flip", IMAGE)
    ours = recipe(images, torch.Generator().manual_seed(7))
    theirs = crop_and_flip(images, padding=4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours, theirs)
    assert recipe.output_shape(IMAGE) == IMAGE and str(recipe) == "crop:4,flip"


def test_augment_true_still_means_crop_4_flip_in_device_data():
    data = from_arrays(torch.randint(0, 255, (20, *IMAGE), dtype=torch.uint8), torch.arange(20) % 2,
                       torch.zeros((2, *IMAGE), dtype=torch.uint8), torch.tensor([0, 1]))
    mean, std = data.channel_stats(torch.arange(20))
    old = DeviceData(data, torch.arange(20), mean, std, torch.device("cpu"), augment=True)
    recipe = parse_augment("crop:4,flip", IMAGE)
    new = DeviceData(data, torch.arange(20), mean, std, torch.device("cpu"), augment=recipe)
    assert isinstance(old.augment, Augment) and old.augment == new.augment
    for (a, _, i), (b, _, j) in zip(old.batches(8, torch.Generator().manual_seed(3)),
                                    new.batches(8, torch.Generator().manual_seed(3))):
        assert torch.equal(a, b) and torch.equal(i, j)
    assert DeviceData(data, torch.arange(20), mean, std, torch.device("cpu"), augment=False).augment is None


def test_flip_alone_mirrors_whole_samples():
    images = _images(12)
    out = parse_augment("flip", IMAGE)(images, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    assert all(m or torch.equal(o, i) for m, o, i in zip(mirrored, out, images)) and 0 < sum(mirrored) < 12


def test_random_resized_crop_shape_determinism_and_content():
    recipe = parse_augment("random_resized_crop:5,flip", (3, 12, 10))
    assert recipe.output_shape((3, 12, 10)) == (3, 5, 5)
    images = _images(8, (3, 12, 10))
    first = recipe(images, torch.Generator().manual_seed(11))
    again = recipe(images, torch.Generator().manual_seed(11))
    other = recipe(images, torch.Generator().manual_seed(12))
    assert first.shape == (8, 3, 5, 5) and torch.equal(first, again) and not torch.equal(first, other)
    # bilinear sampling inside the image: values stay within the image's range, a constant image stays constant
    assert first.min() >= images.min() - 1e-6 and first.max() <= images.max() + 1e-6
    constant = torch.full((4, 3, 12, 10), 0.25)
    assert torch.allclose(recipe(constant, torch.Generator().manual_seed(0)), torch.full((4, 3, 5, 5), 0.25))


def test_random_resized_crop_boxes_fit_and_vary():
    step = parse_augment("random_resized_crop:4", (1, 12, 10)).steps[0]
    top, left, height, width = step.boxes(500, 12, 10, torch.Generator().manual_seed(0)).unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all() and (top + height <= 12).all() and (left + width <= 10).all())
    area = height * width / 120
    assert area.min() < 0.3 and area.max() > 0.9  # draws from the whole 8-100 % range


def test_recipes_pickle_and_keep_working():
    recipe = parse_augment("crop:2,flip,random_resized_crop:6", IMAGE)
    copy = pickle.loads(pickle.dumps(recipe))
    images = _images(4)
    assert copy == recipe
    assert torch.equal(copy(images, torch.Generator().manual_seed(5)), recipe(images, torch.Generator().manual_seed(5)))
