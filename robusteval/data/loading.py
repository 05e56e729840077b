"""Image classification data sets, loaded from local files only.

Nothing here downloads. Every loader returns an `ImageDataset` whose `x` is
float32 N×C×H×W in [0, 1] and whose `y` is int64.

Sources:

- ``digits``: scikit-learn's embedded 8×8 digits (nothing to install).
- ``mnist``, ``fashion-mnist``: the standard idx files
  (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
  ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``) in ``root``,
  ``root/<name>``, ``root/raw`` or torchvision's ``root/<MNIST|FashionMNIST>/raw``.
  Fashion-MNIST without ``root`` is read from /usr/share/datasets/fashion-mnist,
  where Debian's package ``dataset-fashion-mnist`` puts the four ``.gz`` files.
- ``cifar10``: the python pickle batches of ``cifar-10-batches-py/``; ``root``
  is that folder or its parent.
- ``cifar100``: the python pickles of ``cifar-100-python/`` (fine labels).
- ``imagenet``: the validation images in the ImageFolder layout, resized and
  centre-cropped as RobustBench does, in a fixed order (see `robusteval.data.imagenet`).
- any path ending in ``.npz`` holding arrays ``x`` and ``y`` (see `load_npz`).

Malformed files are a `DatasetError` (a ValueError) naming the file and what
was expected; missing files are a FileNotFoundError saying which files were
expected where.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from robusteval.core.errors import UsageError
from robusteval.core.names import resolve_name
from robusteval.data.files import (
    TORCHVISION_FOLDERS,
    load_cifar10,
    load_cifar100,
    load_idx_dataset,
    load_npz,
    npz_info,
)
from robusteval.data.registry import (
    DATASETS,
    DatasetInfo,
    ImageDataset,
    check_split,
)

# The embedded default: scikit-learn's digits, split once with this seed.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_SIZE = 500


def _is_npz(name: str | Path) -> bool:
    return str(name).lower().endswith(".npz")


def dataset_info(name: str | Path) -> DatasetInfo:
    """Metadata of a named data set (number of classes, input shape, class names).

    For a path ending in `.npz` the file is read (x's header and y) so that a
    model can be built for it; the rules are those of `load_npz`.
    """
    if _is_npz(name):
        return npz_info(Path(name))
    return DATASETS[resolve_name(str(name), DATASETS, "dataset")]


def load_digits(split: str = "test") -> ImageDataset:
    """scikit-learn's 1,797 8×8 digits, values / 16, a fixed stratified split.

    The split is `train_test_split(test_size=500, stratify=y, random_state=0)`:
    500 test images, 1,297 training images, the same on every machine.
    """
    # deferred: scikit-learn costs ~2 s to import
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    check_split(split)
    bunch = sklearn_digits()
    images = bunch.images.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    index = np.arange(len(labels))
    train_index, test_index = train_test_split(
        index, test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    chosen = np.sort(test_index if split == "test" else train_index)
    x = torch.from_numpy(images[chosen]).unsqueeze(1).contiguous()
    y = torch.from_numpy(labels[chosen])
    return ImageDataset("digits", split, x, y, DATASETS["digits"].classes)


# --- entry point -------------------------------------------------------------------------------


def load_dataset(name: str, split: str = "test", root: str | Path | None = None,
                 limit: int | None = None, preprocessing: str | None = None, every: int = 1) -> ImageDataset:
    """Load a data set by name, or an `.npz` file by path.

    Known names: see `DATASETS`. `root` is the directory holding the files of
    mnist, fashion-mnist (default /usr/share/datasets/fashion-mnist), cifar10,
    cifar100 and imagenet; digits and .npz paths ignore it. `every` keeps every
    `every`-th image (0, every, 2·every, ...: the papers' certify scripts'
    --skip / --sample_interval); ImageNet then takes every validation image in
    the sorted ImageFolder order, as those scripts do, not RobustBench's list.
    `limit` keeps the first `limit` images of those (ImageNet then decodes only
    them). Nothing is downloaded; missing files are a clear error naming what
    was expected where.
    `preprocessing`: ImageNet's (see `robusteval.data.imagenet.PREPROCESSINGS`; None: its default); other
    data sets take none.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    check_every(every)
    if str(name).lower() == "imagenet":  # decoded image by image, so only the first `limit` are read
        # deferred: it imports torchvision
        from robusteval.data.imagenet import load_imagenet

        return load_imagenet(split, root, limit, every=every,
                             **({"preprocessing": preprocessing} if preprocessing else {}))
    if preprocessing is not None:
        raise UsageError(f"--preprocessing applies to imagenet only, not to data set {name!r}")
    return _limited(every_nth(_load_dataset(name, split, root), every), limit)


def check_every(every: int) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UsageError(f"every must be a whole number of images >= 1 (1: every image), got {every!r}")


def every_nth(dataset: ImageDataset, every: int) -> ImageDataset:
    """Images 0, every, 2·every, ... of the data set (itself when every is 1)."""
    if every == 1:
        return dataset
    return ImageDataset(dataset.name, dataset.split, dataset.x[::every], dataset.y[::every], dataset.classes,
                        order=dataset.order)


def _limited(dataset: ImageDataset, limit: int | None) -> ImageDataset:
    if limit is None or limit >= len(dataset):
        return dataset
    return ImageDataset(dataset.name, dataset.split, dataset.x[:limit], dataset.y[:limit], dataset.classes,
                        order=dataset.order)


def _load_dataset(name: str, split: str, root: str | Path | None) -> ImageDataset:
    check_split(split)
    if _is_npz(name):
        return load_npz(name, split)
    key = resolve_name(str(name), DATASETS, "dataset")
    if key == "digits":
        return load_digits(split)
    if key in TORCHVISION_FOLDERS:
        return load_idx_dataset(key, split, root)
    if key == "cifar10":
        return load_cifar10(split, root)
    if key == "cifar100":
        return load_cifar100(split, root)
    raise AssertionError(f"no loader for {key}")  # pragma: no cover
