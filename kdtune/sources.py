"""Where a study's data comes from: one value (a name, a path form, a function, an object) -> one Dataset.

The driver resolves the dataset once and ships the object to trials, so a user's own data needs no
registration that a Ray worker would not see. Every mistake in the value ends here as one DatasetError or
ConfigError line naming the value and what is allowed; nothing is written.

Forms:
  NAME                     a built-in dataset (kdtune.data.load_dataset)
  folder:PATH              PATH/train/<class>/<image> and PATH/test/... (or PATH/val/...); classes = folder names
  npz:PATH                 arrays x_train, y_train, x_test, y_test (and optionally classes)
  package.module:function  a function without arguments returning a Dataset or (x_train, y_train, x_test, y_test)
A Dataset (or StreamedDataset) is taken as it is; any other callable is called like module:function.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from kdtune.data import (IMAGE_SUFFIXES, SAFE_NAME, Dataset, StreamedDataset, dataset_names, decode_image,
                         from_arrays, load_dataset)
from kdtune.errors import ConfigError, DatasetError, KdtuneError

DATASET_FORMS_HELP = (
    f"a built-in NAME ({', '.join(dataset_names())}), folder:PATH (PATH/train/<class>/<image> and PATH/test/ "
    "or PATH/val/), npz:PATH (arrays x_train, y_train, x_test, y_test[, classes]) or package.module:function "
    "(returns a Dataset or (x_train, y_train, x_test, y_test))"
)
_FORMS = f"NAME ({', '.join(dataset_names())}), folder:PATH, npz:PATH, package.module:function"
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def resolve_dataset(value, data_dir=None, download: bool = True, image_size=None, stream: bool | None = None,
                    memory_budget_mb: float | None = None) -> Dataset | StreamedDataset:
    """The dataset `value` stands for (see the module docstring for the forms).

    `image_size` (int or (h, w)) resizes a folder's images; `stream` True/False forces a folder to be
    streamed from its files or decoded into memory, None streams it only when its decoded size exceeds
    `memory_budget_mb` (default: $KDTUNE_MEMORY_BUDGET_MB, else 25 % of physical memory).
    """
    if isinstance(value, (Dataset, StreamedDataset)):
        return _safe_named(value)
    if callable(value) and not isinstance(value, str):
        _only_folders(_describe(value), image_size, stream)
        name = getattr(value, "__name__", type(value).__name__)
        return _call(f"{name}()", value, name)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"dataset={value!r}: expected one of {_FORMS}")
    text = value.strip()
    form, colon, rest = text.partition(":")
    if form == "folder" and colon:
        return load_folder(text, rest, image_size, stream, memory_budget_mb)
    _only_folders(text, image_size, stream)
    if not colon:
        if text not in dataset_names():
            raise ConfigError(f"dataset={text!r}: unknown dataset; allowed forms: {_FORMS}")
        return load_dataset(text, data_dir, download)
    if form == "npz":
        return load_npz(text, rest)
    return _load_function(text, form, rest)


def _describe(value) -> str:
    return getattr(value, "__qualname__", None) or type(value).__name__


def _only_folders(text: str, image_size, stream) -> None:
    if image_size is not None:
        raise ConfigError(f"image_size={image_size!r}: only folder:PATH datasets are resized; "
                          f"dataset={text!r} is used as it is")
    if stream:
        raise ConfigError(f"stream=True: only folder:PATH datasets can be streamed; dataset={text!r} is held in memory")


def safe_name(text: str, fallback: str = "dataset") -> str:
    """A name an MLflow registry accepts: runs of other characters become one '_'."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")
    return name or fallback


def _safe_named(dataset):
    if SAFE_NAME.match(dataset.name):
        return dataset
    return dataclasses.replace(dataset, name=safe_name(dataset.name))


# ---- package.module:function and callables --------------------------------------------------------

def _load_function(text: str, module_name: str, attribute: str):
    if not (_DOTTED.match(module_name) and _DOTTED.match(attribute)):
        raise ConfigError(f"dataset={text!r}: unknown dataset form; allowed forms: {_FORMS}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise ConfigError(f"dataset={text!r}: unknown dataset form (no module named {error.name!r} on the Python "
                              f"path; install it or set PYTHONPATH); allowed forms: {_FORMS}") from None
        raise DatasetError(f"dataset={text!r}: importing module {module_name!r} failed "
                           f"(ModuleNotFoundError: {error})") from None
    except Exception as error:  # the user's module: a syntax error, a failing import inside it, anything
        raise DatasetError(f"dataset={text!r}: importing module {module_name!r} failed "
                           f"({type(error).__name__}: {error})") from None
    try:
        function = functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise DatasetError(f"dataset={text!r}: module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(function):
        raise DatasetError(f"dataset={text!r}: {module_name}.{attribute} is a {type(function).__name__}, "
                           "not a function returning a dataset")
    return _call(f"{module_name}.{attribute}()", function, attribute.split(".")[-1])


def _call(what: str, function, name: str):
    try:
        result = function()
    except KdtuneError:
        raise
    except Exception as error:
        raise DatasetError(f"{what} raised {type(error).__name__}: {error}") from None
    if isinstance(result, (Dataset, StreamedDataset)):
        return _safe_named(result)
    if isinstance(result, (tuple, list)) and len(result) == 4:
        return from_arrays(*result, name=safe_name(name))
    kind = type(result).__name__ + (f" of {len(result)} items" if isinstance(result, (tuple, list)) else "")
    raise DatasetError(f"{what} returned a {kind}; expected a kdtune.data.Dataset or a tuple "
                       "(x_train, y_train, x_test, y_test) of numpy arrays or torch tensors")


# ---- npz:PATH -------------------------------------------------------------------------------------

def load_npz(text: str, path_text: str) -> Dataset:
    """An .npz holding x_train, y_train, x_test, y_test and optionally classes (np.savez writes one)."""
    path = Path(path_text).expanduser()
    if not path_text or not path.is_file():
        raise DatasetError(f"dataset={text!r}: {path_text or 'no path'} is not a file; expected npz:PATH to an .npz "
                           f"with arrays {', '.join(_NPZ_ARRAYS)}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except AttributeError:  # np.load gave a single .npy array, which has no .files
        raise DatasetError(f"{path}: a single .npy array; expected an .npz with arrays "
                           f"{', '.join(_NPZ_ARRAYS)}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{path}: not a readable .npz file ({type(error).__name__}: {error})") from None
    missing = [key for key in _NPZ_ARRAYS if key not in arrays]
    if missing:
        found = ", ".join(sorted(arrays)) or "none"
        raise DatasetError(f"{path}: missing array(s) {', '.join(missing)}; found {found}; "
                           f"expected {', '.join(_NPZ_ARRAYS)} (and optionally classes)")
    classes = arrays.get("classes")
    classes = None if classes is None else [str(c) for c in np.asarray(classes).reshape(-1).tolist()]
    return from_arrays(*(arrays[key] for key in _NPZ_ARRAYS), name=safe_name(path.stem), classes=classes)


# ---- folder:PATH ----------------------------------------------------------------------------------

def load_folder(text: str, path_text: str, image_size=None, stream: bool | None = None,
                memory_budget_mb: float | None = None) -> Dataset | StreamedDataset:
    """An image-folder tree: decoded into a uint8 Dataset, or a StreamedDataset when it would not fit."""
    root, train_dir, test_dir = _split_dirs(text, path_text)
    classes = _classes(root, train_dir, test_dir)
    train_files, train_labels = _files(train_dir, classes)
    test_files, test_labels = _files(test_dir, classes)
    every = train_files + test_files
    channels, size, resize = _geometry(every, image_size)
    shape = (channels, *size)
    name = safe_name(root.name, "folder")
    if stream is None:
        budget = memory_budget_bytes(memory_budget_mb)
        stream = len(every) * channels * size[0] * size[1] > budget
        if stream:
            warnings.warn(f"dataset={text!r}: {len(every)} images of {shape} exceed the memory budget "
                          f"({budget / 2**20:.0f} MB); streaming them from the files", stacklevel=2)
    labels = torch.tensor(train_labels, dtype=torch.int64), torch.tensor(test_labels, dtype=torch.int64)
    if stream:
        return StreamedDataset(name, tuple(train_files), labels[0], tuple(test_files), labels[1], len(classes),
                               shape, resize=resize, classes=tuple(classes))
    return Dataset(name, _decode_all(train_files, shape, resize), labels[0], _decode_all(test_files, shape, resize),
                   labels[1], len(classes), 1.0 / 255.0, classes=tuple(classes))


def _split_dirs(text: str, path_text: str) -> tuple[Path, Path, Path]:
    if not path_text:
        raise ConfigError(f"dataset={text!r}: folder: needs a path, e.g. folder:/data/flowers")
    root = Path(path_text).expanduser().resolve()  # absolute: trials may run in another working directory
    if not root.is_dir():
        raise DatasetError(f"dataset={text!r}: {root} is not a folder")
    layout = f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image> (or val/ instead of test/)"
    if not (root / "train").is_dir():
        raise DatasetError(f"dataset={text!r}: {root} has no train/ folder; {layout}")
    for test in ("test", "val"):
        if (root / test).is_dir():
            return root, root / "train", root / test
    raise DatasetError(f"dataset={text!r}: {root} has no test/ or val/ folder; {layout}")


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _show(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def _classes(root: Path, train_dir: Path, test_dir: Path) -> list[str]:
    train, test = _class_folders(train_dir), _class_folders(test_dir)
    if not train:
        raise DatasetError(f"{train_dir}: no class folders; expected one subfolder per class holding its images")
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise DatasetError(f"{root}: classes differ between train/ {_show(train)} and {test_dir.name}/ {_show(test)}"
                           f" (only in train/: {_show(only_train)}; only in {test_dir.name}/: {_show(only_test)})")
    if len(train) < 2:
        raise DatasetError(f"{train_dir}: one class folder ({train[0]}); classification needs at least 2")
    return train


def _files(split_dir: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = split_dir / name
        images = sorted(str(p) for p in folder.iterdir()
                        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DatasetError(f"{folder}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
                               "every class folder needs at least one")
        files += images
        labels += [label] * len(images)
    return files, labels


def _header(path: str) -> tuple[str, tuple[int, int]]:
    """(mode, (height, width)) from the file header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.mode, (image.size[1], image.size[0])
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{path}: not a readable image ({type(error).__name__}: {error})") from None


def _threads() -> int:
    return min(8, 2 * (os.cpu_count() or 1))  # file reads and PIL decoding release the GIL


def _geometry(files: list[str], image_size) -> tuple[int, tuple[int, int], bool]:
    """(channels, (height, width), resize?): 1 channel when every image is grayscale, else RGB."""
    size = parse_image_size(image_size)
    with ThreadPoolExecutor(_threads()) as pool:
        headers = list(pool.map(_header, files))
    channels = 1 if all(mode in _GRAY_MODES for mode, _ in headers) else 3
    if size is not None:
        return channels, size, True
    sizes = {}
    for path, (_, hw) in zip(files, headers):
        sizes.setdefault(hw, path)
    if len(sizes) > 1:
        (a, path_a), (b, path_b) = list(sizes.items())[:2]
        raise DatasetError(f"images differ in size ({path_a} is {a[0]}x{a[1]}, {path_b} is {b[0]}x{b[1]}, height x "
                           f"width; {len(sizes)} sizes in all): pass image_size (--image-size) to resize them to one")
    return channels, next(iter(sizes)), False


def parse_image_size(value) -> tuple[int, int] | None:
    """None, an int S (S x S), (h, w), or text 'S' / 'HxW' (as a command line gives it)."""
    if value is None:
        return None
    parts = value
    if isinstance(value, str):
        parts = value.lower().replace("x", " ").replace(",", " ").split()
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = (value,)
    try:
        numbers = tuple(int(p) for p in parts)
        ok = len(numbers) in (1, 2) and all(n >= 1 and float(n) == float(p) for n, p in zip(numbers, parts))
    except (TypeError, ValueError):
        ok = False
    if not ok or isinstance(value, bool):
        raise ConfigError(f"image_size={value!r}: expected a whole number S (S x S pixels) or (height, width), "
                          "e.g. 32 or 24x32")
    return (numbers[0], numbers[0]) if len(numbers) == 1 else numbers


def memory_budget_bytes(memory_budget_mb: float | None = None) -> float:
    """How much decoded data may be held: as given, else $KDTUNE_MEMORY_BUDGET_MB, else 25 % of physical RAM."""
    if memory_budget_mb is None:
        env = os.environ.get("KDTUNE_MEMORY_BUDGET_MB")
        if env is None:
            return 0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        try:
            memory_budget_mb = float(env)
        except ValueError:
            raise ConfigError(f"KDTUNE_MEMORY_BUDGET_MB={env!r}: must be a number of megabytes") from None
        what = f"KDTUNE_MEMORY_BUDGET_MB={env!r}"
    else:
        what = f"memory_budget_mb={memory_budget_mb!r}"
    if isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float)) or not memory_budget_mb > 0:
        raise ConfigError(f"{what}: must be a positive number of megabytes")
    return float(memory_budget_mb) * 2**20


def _decode_all(files: list[str], shape: tuple[int, int, int], resize: bool) -> torch.Tensor:
    out = np.empty((len(files), *shape), dtype=np.uint8)

    def decode(row: int) -> None:
        out[row] = decode_image(files[row], shape[0], shape[1:], resize)

    with ThreadPoolExecutor(_threads()) as pool:
        list(pool.map(decode, range(len(files))))
    return torch.from_numpy(out)
