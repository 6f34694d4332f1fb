"""The seed papers' other datasets, each read from tiny files written here in its official format."""
import gzip
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from kdtune.data import DeviceData, dataset_info, dataset_names, load_dataset
from kdtune.errors import DatasetError

RNG = np.random.default_rng(0)


def write_idx(path, array, compress=True):
    """MNIST's idx format: 0x00 0x00 0x08 <ndim>, big-endian uint32 sizes, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def write_mnist(folder, n_train=30, n_test=12, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = RNG.integers(0, 10, n).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, compress)
        arrays[split] = images, labels
    return arrays


def write_svhn(folder, n_train=20, n_test=8):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # the official layout: H, W, C, N
        y = RNG.integers(1, 11, (n, 1)).astype(np.uint8)  # 1..10, 10 is the digit 0
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        arrays[split] = x, y
    return arrays


def write_notmnist(root, per_letter=5):
    for letter in "ABCDEFGHIJ":
        (root / letter).mkdir(parents=True)
        for i in range(per_letter):
            pixels = RNG.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / letter / f"{letter}{i}.png")


def write_imagenet32(root, per_batch=3, n_val=4):
    """The unzipped official layout: Imagenet32_train_npz/train_data_batch_1..10.npz, Imagenet32_val_npz/val_data.npz."""
    (root / "Imagenet32_train_npz").mkdir(parents=True)
    (root / "Imagenet32_val_npz").mkdir(parents=True)
    for i in range(1, 11):
        np.savez(root / "Imagenet32_train_npz" / f"train_data_batch_{i}.npz",
                 data=RNG.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 labels=RNG.integers(1, 1001, per_batch).tolist(), mean=np.zeros(3072))
    val = RNG.integers(0, 256, (n_val, 3072), dtype=np.uint8)
    np.savez(root / "Imagenet32_val_npz" / "val_data.npz", data=val, labels=[1, 1000, 500, 2][:n_val])
    return val


# ---- reading each format ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, folder, compress", [("mnist", "mnist", True), ("fashion_mnist", "fashion_mnist", False)])
def test_mnist_family_reads_official_idx_files_gzipped_or_not(tmp_path, name, folder, compress):
    arrays = write_mnist(tmp_path / folder, compress=compress)
    data = load_dataset(name, tmp_path, download=False)
    assert data.train_images.shape == (30, 1, 28, 28) and data.test_images.shape == (12, 1, 28, 28)
    assert data.train_images.dtype == torch.uint8 and data.scale == pytest.approx(1 / 255)
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(arrays["train"][0]))
    assert data.test_labels.tolist() == arrays["t10k"][1].tolist()
    assert data.input_shape == dataset_info(name).input_shape and data.num_classes == 10


def test_idx_file_with_a_wrong_header_or_length_is_named(tmp_path):
    write_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + bytes(8)))
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte.gz: not an idx file of unsigned bytes"):
        load_dataset("mnist", tmp_path, download=False)
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte", np.zeros(30, np.uint8))
    payload = gzip.decompress((tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(payload[:-3]))  # truncated
    with pytest.raises(DatasetError, match=r"header says shape \(30,\) but the file holds 27 values"):
        load_dataset("mnist", tmp_path, download=False)


def test_svhn_reads_the_official_mat_files_with_10_meaning_digit_0(tmp_path):
    arrays = write_svhn(tmp_path / "svhn")
    data = load_dataset("svhn", tmp_path, download=False)
    x, y = arrays["train"]
    assert data.train_images.shape == (20, 3, 32, 32) and data.test_images.shape == (8, 3, 32, 32)
    assert torch.equal(data.train_images[3], torch.from_numpy(x[:, :, :, 3].transpose(2, 0, 1).copy()))
    assert data.train_labels.tolist() == [int(v) % 10 for v in y[:, 0]]
    assert 0 <= int(data.train_labels.min()) and int(data.train_labels.max()) <= 9
    # Normalisation statistics come from SVHN's own training split, per channel.
    train, _ = data.split(0.1)
    mean, std = data.channel_stats(train)
    images, _, _ = next(DeviceData(data, train, mean, std, torch.device("cpu")).batches(len(train)))
    assert images.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (images.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2


def test_svhn28_is_svhn_in_mnist_shape_for_seed004s_mlps(tmp_path):
    folder = tmp_path / "svhn"
    folder.mkdir()
    x = np.zeros((32, 32, 3, 2), np.uint8)
    x[..., 0, 0], x[..., 1, 1] = 200, 100  # a pure red image and a pure green one
    for split in ("train", "test"):
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": np.array([[10], [3]])})
    data = load_dataset("svhn28", tmp_path, download=False)
    assert data.input_shape == (1, 28, 28) == dataset_info("svhn28").input_shape
    assert data.train_images[0].unique().tolist() == [round(0.299 * 200)]  # luma of red
    assert data.train_images[1].unique().tolist() == [round(0.587 * 100)]
    assert data.train_labels.tolist() == [0, 3]


def test_notmnist_reads_letter_folders_skips_broken_pngs_and_holds_out_a_fixed_test_split(tmp_path):
    root = tmp_path / "notMNIST_small"
    write_notmnist(root)
    (root / "C" / "empty.png").write_bytes(b"")
    (root / "F" / "truncated.png").write_bytes((root / "F" / "F0.png").read_bytes()[:40])
    with pytest.warns(UserWarning, match=r"notmnist: skipped 2 unreadable or non-28x28 PNG file\(s\)"):
        data = load_dataset("notmnist", tmp_path, download=False)
    assert len(data.train_labels) + len(data.test_labels) == 50 and len(data.test_labels) == 10
    assert data.input_shape == (1, 28, 28)
    labels = torch.cat([data.train_labels, data.test_labels]).bincount(minlength=10)
    assert labels.tolist() == [5] * 10  # A..J -> 0..9, five each
    expected = np.array(Image.open(root / "A" / "A0.png"))
    assert any(torch.equal(img[0], torch.from_numpy(expected)) for img in torch.cat([data.train_images, data.test_images]))
    # letters directly in the given directory work too, and the split is the same every time
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_dataset("notmnist", root, download=False)
    assert torch.equal(again.test_labels, data.test_labels) and torch.equal(again.test_images, data.test_images)


def test_imagenet32_reads_the_npz_batches_in_the_official_zip_layout(tmp_path):
    val = write_imagenet32(tmp_path / "imagenet32")
    data = load_dataset("imagenet32", tmp_path, download=False)
    assert data.train_images.shape == (30, 3, 32, 32) and data.num_classes == 1000
    assert data.test_labels.tolist() == [0, 999, 499, 1]  # labels 1..1000 become 0..999
    assert torch.equal(data.test_images[1], torch.from_numpy(val[1].reshape(3, 32, 32)))  # CIFAR's channel-major rows
    assert dataset_info("imagenet32").augment_by_default  # crop + flip like CIFAR
    assert not any(dataset_info(n).augment_by_default for n in ("mnist", "fashion_mnist", "svhn", "svhn28", "notmnist"))


# ---- missing data: one line that says what to do ------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("mnist", ["mnist: ", "mnist/train-images-idx3-ubyte.gz not found and downloads are off",
               "download train-images-idx3-ubyte.gz", "https://ossci-datasets.s3.amazonaws.com/mnist/"]),
    ("fashion_mnist", ["fashion_mnist: ", "fashion_mnist/train-images-idx3-ubyte.gz not found and downloads are off",
                       "fashion-mnist.s3-website"]),
    ("svhn", ["svhn: ", "svhn/train_32x32.mat not found and downloads are off", "http://ufldl.stanford.edu/housenumbers/"]),
    ("svhn28", ["svhn28: ", "svhn/train_32x32.mat not found"]),
    ("notmnist", ["notmnist: ", "notMNIST_small/A not found", "notMNIST_small.tar.gz", "A..J"]),
    ("imagenet32", ["imagenet32: ", "imagenet32/train_data_batch_1.npz not found", "login",
                    "Imagenet32_train_npz.zip", "image-net.org"]),
    ("cifar100", ["cifar100: ", "cifar-100-python/train not found and downloads are off", "cifar-100-python.tar.gz"]),
])
def test_every_missing_dataset_offline_says_where_and_what_to_do_in_one_line(tmp_path, name, expected):
    with pytest.raises(DatasetError) as error:
        load_dataset(name, tmp_path / "data", download=False)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "data") in message
    for part in expected:
        assert part in message
    assert not (tmp_path / "data").exists()  # looking does not create anything


def test_a_failed_download_keeps_what_was_there_and_removes_what_it_made(tmp_path):
    # DNS is off here, so a real attempt fails at once (every mirror), as on any machine without internet.
    started = time.monotonic()
    with pytest.raises(DatasetError) as error:
        load_dataset("mnist", tmp_path / "new" / "data", download=True)
    assert time.monotonic() - started < 60
    message = str(error.value)
    assert message.startswith("could not download https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz for mnist")
    assert "1 other mirror(s) failed too" in message and "on a machine without internet, download" in message
    assert not (tmp_path / "new").exists()

    folder = tmp_path / "data" / "svhn"
    folder.mkdir(parents=True)
    (folder / "test_32x32.mat").write_bytes(b"the user's own file")
    with pytest.raises(DatasetError, match="could not download http://ufldl.stanford.edu/housenumbers/train_32x32.mat"):
        load_dataset("svhn", tmp_path / "data", download=True)
    assert [p.name for p in folder.iterdir()] == ["test_32x32.mat"]


def test_every_dataset_is_registered_with_its_shape():
    shapes = {n: (dataset_info(n).input_shape, dataset_info(n).num_classes) for n in dataset_names()}
    assert shapes["mnist"] == shapes["fashion_mnist"] == shapes["notmnist"] == shapes["svhn28"] == ((1, 28, 28), 10)
    assert shapes["svhn"] == ((3, 32, 32), 10) and shapes["imagenet32"] == ((3, 32, 32), 1000)
