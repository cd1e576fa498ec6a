"""Datasets for the convergence benchmark: scikit-learn's digits and CIFAR-10.

Both loaders return a :class:`Dataset` of NHWC float32 images, standardised with
statistics of the training split only, and int32 labels in 0..9.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"


class Dataset(NamedTuple):
    """A train/test split.

    Attributes:
      x_train: float32 images, shape [N_train, H, W, C].
      y_train: int32 labels in 0..num_classes-1, shape [N_train].
      x_test: float32 images, shape [N_test, H, W, C].
      y_test: int32 labels, shape [N_test].
      num_classes: Number of classes.
      name: The dataset's name.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel zero mean, unit variance, with the training split's statistics."""
    mean = x_train.mean(axis=(0, 1, 2), keepdims=True)
    std = x_train.std(axis=(0, 1, 2), keepdims=True) + 1e-8
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def load_digits(test_fraction: float = 0.25, split_seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images), ships with scikit-learn.

    The split is stratified and fixed by ``split_seed``, so every optimizer and
    seed sees the same train and test sets.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = digits.images.astype(np.float32)[..., None]  # [1797, 8, 8, 1], values 0..16
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=split_seed, stratify=labels
    )
    x_train, x_test = _standardise(x_train, x_test)
    return Dataset(x_train, y_train, x_test, y_test, num_classes=10, name="digits")


def _read_cifar10_batches(data_dir: Path) -> dict[str, dict]:
    """The six pickled batches, from the .tar.gz or the extracted directory.

    ``data_dir`` may be the archive itself, a directory holding it, the
    extracted ``cifar-10-batches-py`` directory, or a directory holding that.
    """
    names = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    candidates_dirs = [data_dir / CIFAR10_DIR, data_dir]
    for directory in candidates_dirs:
        if all((directory / name).is_file() for name in names):
            batches = {}
            for name in names:
                with open(directory / name, "rb") as f:
                    batches[name] = pickle.load(f, encoding="bytes")
            return batches

    archive = data_dir if data_dir.is_file() else data_dir / CIFAR10_ARCHIVE
    if archive.is_file():
        batches = {}
        with tarfile.open(archive, "r:gz") as tar:
            for name in names:
                try:
                    member = tar.extractfile(f"{CIFAR10_DIR}/{name}")
                except KeyError:
                    member = None
                if member is None:
                    raise FileNotFoundError(
                        f"{archive} has no {CIFAR10_DIR}/{name}: is it the CIFAR-10 python archive?"
                    )
                batches[name] = pickle.load(io.BytesIO(member.read()), encoding="bytes")
        return batches

    raise FileNotFoundError(
        f"no CIFAR-10 found at {data_dir}: --data-dir must be {CIFAR10_ARCHIVE}, a directory "
        f"holding it, or the extracted {CIFAR10_DIR} directory (or its parent) with files "
        f"{', '.join(names)}. Download the python version from "
        "https://www.cs.toronto.edu/~kriz/cifar.html"
    )


def _cifar10_arrays(batch: dict) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"CIFAR-10 batch data must have shape [N, 3072], got {data.shape}")
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
    labels = np.asarray(batch[b"labels"], dtype=np.int32)
    return images, labels


def load_cifar10(data_dir: str | Path) -> Dataset:
    """CIFAR-10 from the standard python archive (50000 train, 10000 test images).

    Reads ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py``
    directory (``data_batch_1`` .. ``data_batch_5``, ``test_batch``: pickled
    dicts with ``b"data"``, uint8 [N, 3072], and ``b"labels"``). Only load an
    archive you trust: the batches are pickles.
    """
    batches = _read_cifar10_batches(Path(data_dir).expanduser())
    train = [_cifar10_arrays(batches[name]) for name in CIFAR10_TRAIN_FILES]
    x_train = np.concatenate([images for images, _ in train])
    y_train = np.concatenate([labels for _, labels in train])
    x_test, y_test = _cifar10_arrays(batches[CIFAR10_TEST_FILE])
    x_train, x_test = _standardise(x_train, x_test)
    return Dataset(x_train, y_train, x_test, y_test, num_classes=10, name="cifar10")


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """``"digits"`` or ``"cifar10"`` (which needs ``data_dir``)."""
    if name == "digits":
        return load_digits()
    if name == "cifar10":
        if data_dir is None:
            raise ValueError("--dataset cifar10 needs --data-dir DIR (the CIFAR-10 python archive)")
        return load_cifar10(data_dir)
    raise ValueError(f"dataset must be one of ('digits', 'cifar10'), got {name!r}")
