"""Datasets as in-memory tensors (or streamed image files), cut into batches on the training device.

A dataset is loaded once (on the study driver), held as tensors plus labels, and shipped to trials through
the Ray object store. Inside a trial the samples move to the training device once (one copy per dataset
and device, shared by the train and validation views); every batch is cut by index, converted to float,
normalised and augmented (a recipe from kdtune.augment, vectorised) on that device. No DataLoader workers,
no per-sample Python.

Samples may have any shape: images (C, H, W), signals (C, L) or feature vectors (D,). Normalisation is per
entry of dim 1 of a batch (channels for images and signals, features for vectors).

A folder of images larger than the memory budget is not decoded up front: a `StreamedDataset` holds only
file paths and labels, and `StreamingData` decodes batches in DataLoader workers, in exactly the order the
in-memory path would use for the same generator, then normalises and augments them on the device the same
way.

Each batch carries its sample indices, so per-sample caches (teacher logits) are keyed by index, never by
position in a shuffled order.

The package's modules: `dataset` (the Dataset type, from_arrays, splits), `builtin` (the built-in datasets and
their loaders), `download` (files fetched or explained offline; the staging lock is kdtune.locks),
`streamed` (file-backed datasets and their decoded batches), `batches` (training and test batch sources).
"""
from kdtune.data.batches import DeviceData, StreamingData, batch_source, crop_and_flip, test_source
from kdtune.data.builtin import dataset_info, dataset_names, default_data_dir, load_dataset
from kdtune.data.dataset import SAFE_NAME, SPLIT_SEED, Dataset, DatasetInfo, from_arrays
from kdtune.data.streamed import IMAGE_SUFFIXES, StreamedDataset, decode_image, default_workers

__all__ = ["IMAGE_SUFFIXES", "SAFE_NAME", "SPLIT_SEED", "Dataset", "DatasetInfo", "DeviceData", "StreamedDataset",
           "StreamingData", "batch_source", "crop_and_flip", "dataset_info", "dataset_names", "decode_image",
           "default_data_dir", "default_workers", "from_arrays", "load_dataset", "test_source"]
