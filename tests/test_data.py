import pytest
import torch

from kdtune.data import DeviceData, crop_and_flip, load_dataset
from kdtune.errors import DatasetError

from conftest import write_cifar10


def test_digits_is_bundled_with_a_fixed_test_split_and_seeded_validation_split(digits):
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.train_labels) + len(digits.test_labels) == 1797
    assert len(digits.test_labels) == 359
    train, val = digits.split(0.1)
    again_train, again_val = load_dataset("digits").split(0.1)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert len(set(train.tolist()) & set(val.tolist())) == 0 and len(train) + len(val) == len(digits.train_labels)


def test_cifar10_reads_the_official_file_format(tmp_path):
    write_cifar10(tmp_path, per_batch=10, test=7)
    data = load_dataset("cifar10", tmp_path, download=False)
    assert data.train_images.shape == (50, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (7, 3, 32, 32)
    assert data.num_classes == 10 and 0 <= int(data.train_labels.min()) and int(data.train_labels.max()) <= 9


def test_missing_cifar_without_download_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_dataset("cifar10", tmp_path / "empty", download=False)
    message = str(error.value)
    assert "cifar-10-batches-py" in message and "cifar-10-python.tar.gz" in message and str(tmp_path) in message


def test_corrupt_cifar_file_is_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3: not a readable CIFAR batch file"):
        load_dataset("cifar10", tmp_path, download=False)


def test_batches_are_normalised_on_the_device_and_carry_their_sample_indices(digits):
    train, _ = digits.split(0.1)
    mean, std = digits.channel_stats(train)
    data = DeviceData(digits, train, mean, std, torch.device("cpu"))
    images, labels, index = next(data.batches(len(train)))
    assert images.mean().item() == pytest.approx(0.0, abs=1e-4) and images.std().item() == pytest.approx(1.0, abs=1e-2)
    assert torch.equal(labels, digits.train_labels[index])
    shuffled = torch.cat([i for _, _, i in data.batches(100, torch.Generator().manual_seed(3))])
    assert sorted(shuffled.tolist()) == sorted(train.tolist()) and not torch.equal(shuffled, train)


def test_crop_and_flip_moves_pixels_but_keeps_content():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4) + 1
    out = crop_and_flip(images, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    for n in range(2):
        kept = set(out[n][out[n] != 0].tolist())
        assert kept <= set(images[n].flatten().tolist())  # only original pixels or zero padding
    # with no padding, every sample is the image or its mirror image
    out = crop_and_flip(images, padding=0, generator=torch.Generator().manual_seed(1))
    for n in range(2):
        assert torch.equal(out[n], images[n]) or torch.equal(out[n], images[n].flip(-1))
