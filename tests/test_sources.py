import pickle
import shutil
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from kdtune.data import Dataset, DeviceData, StreamedDataset, batch_source, dataset_info, from_arrays, load_dataset
from kdtune.data import test_source as testing_source
from kdtune.errors import ConfigError, DatasetError
from kdtune.sources import DATASET_FORMS_HELP, resolve_dataset

CLASSES = ("ant", "bee", "cat")
CPU = torch.device("cpu")


def write_tree(root, splits=(("train", 3), ("test", 2)), size=(12, 10), gray=False, seed=0):
    """PNG folders root/<split>/<class>/<i>.png (size = height x width); returns {path: pixels}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for split, per_class in splits:
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                array = rng.integers(0, 256, size if gray else (*size, 3), dtype=np.uint8)
                array[..., :2] = 60 * label  # a class signal
                Image.fromarray(array).save(folder / f"{i}.png")
                pixels[folder / f"{i}.png"] = array
    return pixels


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "my pets!"
    return root, write_tree(root)


def test_folder_loads_shapes_labels_classes_and_pixels(tree):
    root, pixels = tree
    data = resolve_dataset(f"folder:{root}")
    assert isinstance(data, Dataset) and data.in_memory and data.is_image
    assert data.name == "my_pets" and data.classes == CLASSES and data.num_classes == 3
    assert data.train_images.shape == (9, 3, 12, 10) and data.test_images.shape == (6, 3, 12, 10)
    assert data.train_images.dtype == torch.uint8 and data.scale == pytest.approx(1 / 255)
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    bee = torch.from_numpy(pixels[root / "train" / "bee" / "1.png"]).permute(2, 0, 1)
    assert torch.equal(data.train_images[4], bee)
    assert data.input_shape == (3, 12, 10) and data.num_train == 9 and data.default_augment == ""
    assert torch.allclose(data.example(2), data.test_images[:2].float() / 255)
    assert data.example(2).dtype == torch.float32


def test_grayscale_folder_has_one_channel_and_val_replaces_test(tmp_path):
    write_tree(tmp_path, splits=(("train", 2), ("val", 1)), gray=True)
    data = resolve_dataset(f"folder:{tmp_path}")
    assert data.input_shape == (1, 12, 10) and len(data.test_labels) == 3


def test_image_size_resizes_and_mixed_sizes_without_it_say_to_pass_it(tmp_path):
    write_tree(tmp_path)
    Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(tmp_path / "test" / "cat" / "odd.png")
    with pytest.raises(DatasetError, match=r"images differ in size .*odd.png is 7x9.*pass image_size \(--image-size\)"):
        resolve_dataset(f"folder:{tmp_path}")
    assert resolve_dataset(f"folder:{tmp_path}", image_size=8).input_shape == (3, 8, 8)
    assert resolve_dataset(f"folder:{tmp_path}", image_size=(6, 4)).test_images.shape == (7, 3, 6, 4)
    with pytest.raises(ConfigError, match=r"image_size=0: expected a whole number"):
        resolve_dataset(f"folder:{tmp_path}", image_size=0)


def _no_test(root):
    shutil.rmtree(root / "test")


def _no_classes(root):
    for folder in (root / "train").iterdir():
        shutil.rmtree(folder)


def _empty_class(root):
    for image in (root / "train" / "bee").iterdir():
        image.unlink()


def _corrupt(root):
    (root / "test" / "ant" / "1.png").write_bytes(b"not a png")


def _other_classes(root):
    (root / "test" / "cat").rename(root / "test" / "cow")


@pytest.mark.parametrize("damage, fragment", [
    (lambda root: shutil.rmtree(root), "is not a folder"),
    (lambda root: shutil.rmtree(root / "train"), "has no train/ folder; expected"),
    (_no_test, "has no test/ or val/ folder"),
    (_no_classes, "train: no class folders; expected one subfolder per class"),
    (_empty_class, "bee: no images"),
    (_corrupt, "1.png: not a readable image"),
    (_other_classes, "classes differ between train/ [ant, bee, cat] and test/ [ant, bee, cow] "
                     "(only in train/: [cat]; only in test/: [cow])"),
])
def test_bad_folders_end_in_one_line_naming_the_problem(tree, damage, fragment):
    root, _ = tree
    damage(root)
    with pytest.raises(DatasetError) as error:
        resolve_dataset(f"folder:{root}")
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_npz_with_classes_and_with_missing_arrays(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny-set.npz", x_train=rng.random((8, 2, 5)), y_train=np.arange(8) % 2,
             x_test=rng.random((4, 2, 5)), y_test=np.arange(4) % 2, classes=np.array(["no", "yes"]))
    data = resolve_dataset(f"npz:{tmp_path / 'tiny-set.npz'}")
    assert data.name == "tiny-set" and data.classes == ("no", "yes") and data.input_shape == (2, 5)
    assert data.train_images.dtype == torch.float32 and data.scale == 1.0 and not data.is_image
    np.savez(tmp_path / "half.npz", x_train=np.zeros((2, 3)), y_train=np.zeros(2, int))
    with pytest.raises(DatasetError, match=r"half.npz: missing array\(s\) x_test, y_test; found x_train, y_train"):
        resolve_dataset(f"npz:{tmp_path / 'half.npz'}")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_signals.py").write_text(textwrap.dedent("""
        import numpy as np

        def vectors():
            rng = np.random.default_rng(0)
            x = rng.normal(size=(40, 16)) * np.arange(1, 17) + np.arange(16)
            return x[:30], np.arange(30) % 4, x[30:], np.arange(10) % 4

        def not_data():
            return {"x": 1}

        def broken():
            raise RuntimeError("no such sensor")

        NUMBER = 3
    """))
    (tmp_path / "bad_import.py").write_text("import numpy\nraise ImportError('needs the sensor SDK')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_module_function_with_feature_vectors_and_per_feature_stats(user_module):
    data = resolve_dataset("my_signals:vectors")
    assert data.name == "vectors" and data.input_shape == (16,) and not data.is_image and data.num_classes == 4
    train, _ = data.split(0.2)
    mean, std = data.channel_stats(train)
    x = data.train_images[train]
    assert mean.shape == (16,) and torch.allclose(mean, x.mean(0)) and torch.allclose(std, x.std(0))
    batch, labels, index = next(batch_source(data, train, mean, std, CPU).batches(len(train)))
    assert batch.shape == (len(train), 16) and torch.allclose(batch.mean(0), torch.zeros(16), atol=1e-5)
    assert torch.equal(labels, data.train_labels[index])
    with pytest.raises(ConfigError, match=r"augment='flip': needs image samples \(C, H, W\); .* are \(16,\)"):
        batch_source(data, train, mean, std, CPU, augment="flip")


@pytest.mark.parametrize("value, error, fragment", [
    ("my_signals:not_data", DatasetError, "my_signals.not_data() returned a dict; expected a kdtune.data.Dataset"),
    ("my_signals:broken", DatasetError, "my_signals.broken() raised RuntimeError: no such sensor"),
    ("my_signals:missing", DatasetError, "module 'my_signals' has no attribute 'missing'"),
    ("my_signals:NUMBER", DatasetError, "my_signals.NUMBER is a int, not a function"),
    ("bad_import:load", DatasetError, "importing module 'bad_import' failed (ImportError: needs the sensor SDK)"),
    ("no_such_pkg.sub:load", ConfigError, "unknown dataset form (no module named 'no_such_pkg'"),
    ("s3://bucket/set", ConfigError, "unknown dataset form; allowed forms: NAME (cifar10"),
    ("imagenet", ConfigError, "unknown dataset; allowed forms: NAME ("),
    ("npz:", DatasetError, "no path is not a file"),
])
def test_bad_values_are_one_line_naming_the_value(user_module, value, error, fragment):
    with pytest.raises(error) as raised:
        resolve_dataset(value)
    message = str(raised.value)
    assert fragment in message and "\n" not in message
    if "form" in fragment:
        assert "folder:PATH, npz:PATH, package.module:function" in message


def test_objects_and_callables_are_taken_as_they_are(digits):
    assert resolve_dataset(digits) is digits
    made = resolve_dataset(lambda: (np.zeros((4, 3)), [0, 1, 0, 1], np.ones((2, 3)), [1, 0]))
    assert made.name == "lambda" and made.input_shape == (3,)
    with pytest.raises(ConfigError, match="stream=True: only folder:PATH datasets can be streamed"):
        resolve_dataset("digits", stream=True)
    assert "folder:PATH" in DATASET_FORMS_HELP and "digits" in DATASET_FORMS_HELP


def test_built_in_datasets_keep_their_default_augmentation(digits):
    assert digits.default_augment == "" and dataset_info("cifar10").default_augment == "crop:4,flip"
    assert load_dataset("digits").default_augment == ""


def test_from_arrays_types_scales_and_checks():
    images = from_arrays(np.zeros((4, 1, 3, 3), np.uint8), np.array([0, 1, 2, 1]), np.zeros((2, 1, 3, 3), np.uint8),
                         torch.tensor([0, 2]), name="px", classes=["a", "b", "c", "d"])
    assert images.scale == pytest.approx(1 / 255) and images.train_images.dtype == torch.uint8
    assert images.num_classes == 4 and images.classes == ("a", "b", "c", "d")
    signal = from_arrays(torch.zeros(3, 2, 50, dtype=torch.float64), [0, 1, 1], np.zeros((2, 2, 50)), [1, 0])
    assert signal.train_images.dtype == torch.float32 and signal.scale == 1.0 and signal.num_classes == 2
    assert signal.channel_stats(torch.arange(3))[0].shape == (2,)
    x, y = np.zeros((4, 5)), np.array([0, 1, 0, 1])
    cases = [
        ((x, y[:3], x, y), {}, "x_train holds 4 samples but y_train holds 3 labels"),
        ((x, y, np.zeros((4, 6)), y), {}, "x_train samples are (5,) but x_test samples are (6,)"),
        ((x, y.astype(float), x, y), {}, "y_train is torch.float64; labels must be integers"),
        ((x, y, x, y + 1), {"classes": ["a", "b"]}, "y_test holds label 2; labels must be integers in 0..1"),
        ((x, y - 1, x, y), {}, "y_train holds label -1"),
        ((np.zeros(4), y, x, y), {}, "x_train has shape (4,); expected (N, ...)"),
        ((x * np.nan, y, x, y), {}, "x_train holds NaN or infinite values"),
        ((x.astype(np.uint8), y, x, y), {}, "x_train is torch.uint8 but x_test is torch.float64"),
    ]
    for args, kwargs, fragment in cases:
        with pytest.raises(DatasetError) as error:
            from_arrays(*args, **kwargs)
        assert fragment in str(error.value), (fragment, str(error.value))
    with pytest.raises(ConfigError, match="name='my set': a dataset name may hold only"):
        from_arrays(x, y, x, y, name="my set")


def test_streamed_folder_gives_the_same_batches_and_holds_no_images(tree):
    root, _ = tree
    loaded = resolve_dataset(f"folder:{root}")
    streamed = resolve_dataset(f"folder:{root}", stream=True)
    assert isinstance(streamed, StreamedDataset) and not streamed.in_memory and streamed.is_image
    assert streamed.input_shape == loaded.input_shape and streamed.classes == loaded.classes
    assert all(t.dim() == 1 for t in vars(streamed).values() if isinstance(t, torch.Tensor))  # labels only
    pixels = loaded.train_images.numel() + loaded.test_images.numel()
    assert len(pickle.dumps(streamed)) < pixels / 2  # paths, labels and a few numbers
    train, val = streamed.split(0.25)
    loaded_train, loaded_val = loaded.split(0.25)
    assert torch.equal(train, loaded_train) and torch.equal(val, loaded_val)
    mean, std = loaded.channel_stats(train)
    streamed_mean, streamed_std = streamed.channel_stats(train, workers=0)
    assert torch.allclose(mean, streamed_mean, atol=1e-5) and torch.allclose(std, streamed_std, atol=1e-5)
    assert torch.allclose(streamed.example(3), loaded.example(3))
    memory = batch_source(loaded, loaded_train, mean, std, CPU, augment="crop:2,flip")
    files = batch_source(streamed, train, mean, std, CPU, augment="crop:2,flip", workers=1)
    assert len(files) == len(memory) == len(train) and files.augment == memory.augment
    generators = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _epoch in range(2):  # the persistent workers serve a second, differently shuffled epoch too
        pairs = list(zip(memory.batches(4, generators[0]), files.batches(4, generators[1]), strict=True))
        for (x, y, i), (x2, y2, i2) in pairs:
            assert torch.allclose(x, x2) and torch.equal(y, y2) and torch.equal(i, i2)
    test_memory = testing_source(loaded, mean, std, CPU)
    test_files = testing_source(streamed, mean, std, CPU, workers=0)
    assert all(torch.allclose(a[0], b[0]) for a, b in zip(test_memory.batches(4), test_files.batches(4), strict=True))


def test_a_folder_over_the_memory_budget_streams_unless_told_not_to(tree, monkeypatch):
    root, _ = tree
    with pytest.warns(UserWarning, match="exceed the memory budget"):
        assert not resolve_dataset(f"folder:{root}", memory_budget_mb=0.001).in_memory
    monkeypatch.setenv("KDTUNE_MEMORY_BUDGET_MB", "0.001")
    with pytest.warns(UserWarning):
        assert not resolve_dataset(f"folder:{root}").in_memory
    assert resolve_dataset(f"folder:{root}", stream=False).in_memory
    monkeypatch.setenv("KDTUNE_MEMORY_BUDGET_MB", "lots")
    with pytest.raises(ConfigError, match="KDTUNE_MEMORY_BUDGET_MB='lots': must be a number of megabytes"):
        resolve_dataset(f"folder:{root}")


def test_a_file_broken_after_streaming_starts_is_named(tree):
    root, _ = tree
    streamed = resolve_dataset(f"folder:{root}", stream=True)
    (root / "train" / "cat" / "2.png").write_bytes(b"gone bad")
    source = batch_source(streamed, torch.arange(9), torch.zeros(3), torch.ones(3), CPU, workers=1)
    with pytest.raises(DatasetError, match=r"cat/2.png: not a readable image"):
        list(source.batches(4))


def test_train_and_validation_views_share_one_device_copy(digits):
    device = torch.device("meta")  # a separate device without memory: .to() makes a new tensor every time
    train, val = digits.split(0.1)
    mean, std = digits.channel_stats(train)
    a = DeviceData(digits, train, mean, std, device, augment=None)
    b = batch_source(digits, val, mean, std, device)
    assert a.images is b.images and a.labels is b.labels and a.images.device.type == "meta"
    other = Dataset(**{**vars(digits)})
    assert DeviceData(other, train, mean, std, device).images is not a.images
    assert testing_source(digits, mean, std, device).images is DeviceData.test_split(digits, mean, std, device).images
    with pytest.raises(ConfigError, match="is streamed from files; cut its batches with kdtune.data.batch_source"):
        DeviceData(StreamedDataset("s", (), torch.zeros(0), (), torch.zeros(0), 2, (1, 2, 2)), train, mean, std, CPU)
