"""Image classification data sets, loaded from local files only (nothing here downloads).

`load_dataset` is the entry point; what each data set is and its budgets live in
`registry`, the file readers in `files`, ImageNet's folder tree in `imagenet`.
"""

from robusteval.data.files import (
    CIFAR10_FOLDER,
    CIFAR100_FOLDER,
    load_cifar10,
    load_cifar100,
    load_idx_dataset,
    load_npz,
    read_idx,
)
from robusteval.data.loading import (
    DIGITS_SPLIT_SEED,
    DIGITS_TEST_SIZE,
    dataset_info,
    load_dataset,
    load_digits,
)
from robusteval.data.registry import (
    DATASETS,
    FASHION_MNIST_DEFAULT_DIR,
    SPLITS,
    Budgets,
    DatasetError,
    DatasetInfo,
    ImageDataset,
    dataset_budgets,
    default_eps,
)

__all__ = [
    "CIFAR10_FOLDER", "CIFAR100_FOLDER", "DATASETS", "DIGITS_SPLIT_SEED", "DIGITS_TEST_SIZE",
    "FASHION_MNIST_DEFAULT_DIR", "SPLITS", "Budgets", "DatasetError", "DatasetInfo", "ImageDataset",
    "dataset_budgets", "dataset_info", "default_eps", "load_cifar10", "load_cifar100", "load_dataset",
    "load_digits", "load_idx_dataset", "load_npz", "read_idx",
]
