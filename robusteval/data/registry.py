"""What each data set is: its description and budgets (`DATASETS`), the `ImageDataset` a loader returns and the
`DatasetError` a malformed file raises.

The bottom of the data layer: the readers (`robusteval.data.files`) and the entry points
(`robusteval.data`, where every name here stays importable) build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from robusteval.core.errors import UsageError

# Where Debian's `dataset-fashion-mnist` installs the idx files (read at call time,
# by `robusteval.data.files`, so tests can patch it there).
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")

SPLITS = ("train", "test")


class DatasetError(UsageError):
    """A data file exists but is malformed: corrupt, truncated, inconsistent or out of range."""


@dataclass(frozen=True)
class Budgets:
    """The budgets a data set is evaluated and reported at, in the [0, 1] pixel scale.

    eps: the ε grid of an attack run per norm (no default grid: --eps is needed);
    headline_eps: the ε a leaderboard reports per norm; leaderboard_radii: its
    certified-accuracy columns; table_radii: the columns of the certified table.
    """

    eps: dict[str, tuple[float, ...]] = field(default_factory=dict, hash=False)
    headline_eps: dict[str, float] = field(default_factory=dict, hash=False)
    leaderboard_radii: tuple[float, ...] = (0.25, 0.5)
    table_radii: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # Cohen et al.'s CIFAR-10 layout


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set before seeing it, and the budgets it is evaluated at.

    `source` says in words where the files are looked for.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    source: str = ""
    budgets: Budgets = Budgets()


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        "digits", 10, (1, 8, 8), tuple(str(i) for i in range(10)),
        source="embedded (scikit-learn load_digits); nothing to install",
        # The 8x8 digits reach larger certified radii than CIFAR-10. L1: an L1 ball of radius r lies inside the L2
        # ball of r, which lies inside the L1 ball of √d·r. CIFAR-10's L1 ε = 12 sits 79% of the way (log scale)
        # from its L2 headline 0.5 to √3072·0.5; the same place on 64 pixels (L2 headline 1, √64 = 8) is 5.2:
        # headline 4, the grid doubles from 0.5 to 8 (the standard CNN: 45% robust at 1, 5% at 2, 0% from 4).
        budgets=Budgets({"Linf": (0.05, 0.1, 0.15, 0.2, 0.3), "L2": (0.25, 0.5, 1.0, 1.5, 2.0),
                         "L1": (0.5, 1.0, 2.0, 4.0, 8.0)},
                        {"Linf": 0.1, "L2": 1.0, "L1": 4.0}, (0.5, 1.0), (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)),
    ),
    "mnist": DatasetInfo(
        "mnist", 10, (1, 28, 28), tuple(str(i) for i in range(10)),
        source="idx files (train-/t10k- images-idx3/labels-idx1 -ubyte[.gz]) in root, root/mnist, root/raw "
               "or root/MNIST/raw",
        # L1 10 beside L∞ 0.3 and L2 2.0: MNIST's budgets in the multiple-perturbation literature (Maini et al. 2020).
        budgets=Budgets({"Linf": (0.1, 0.2, 0.3), "L2": (0.5, 1.0, 1.5, 2.0), "L1": (2.5, 5.0, 10.0)},
                        {"Linf": 0.3, "L2": 2.0, "L1": 10.0}),
    ),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, (1, 28, 28),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        source=f"idx files in root (default {FASHION_MNIST_DEFAULT_DIR}: apt-get install dataset-fashion-mnist)",
        budgets=Budgets({"Linf": (0.05, 0.1, 0.2), "L2": (0.5, 1.0, 1.5)}, {"Linf": 0.1, "L2": 1.5}),
    ),
    "cifar10": DatasetInfo(
        "cifar10", 10, (3, 32, 32),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        source="python pickle batches in root/cifar-10-batches-py (or root itself)",
        # L1 12: the budget Croce & Hein 2021 ("Mind the box") evaluate CIFAR-10 at; the grid halves down to it.
        budgets=Budgets({"Linf": (2 / 255, 4 / 255, 8 / 255), "L2": (0.25, 0.5), "L1": (3.0, 6.0, 12.0)},
                        {"Linf": 8 / 255, "L2": 0.5, "L1": 12.0}),
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, (3, 32, 32), tuple(str(i) for i in range(100)),
        source="python pickles (train, test, meta) in root/cifar-100-python (or root itself); fine labels",
        # RobustBench's CIFAR-100 budgets: L∞ 8/255 (its leaderboard), L2 0.5 (as its CIFAR-10 L2 board).
        budgets=Budgets({"Linf": (2 / 255, 4 / 255, 8 / 255), "L2": (0.25, 0.5)}, {"Linf": 8 / 255, "L2": 0.5}),
    ),
    "imagenet": DatasetInfo(
        "imagenet", 1000, (3, 224, 224), tuple(str(i) for i in range(1000)),
        source="validation images in the ImageFolder layout (one folder per WordNet id) in root/val (or root "
               "itself); resize 256, centre crop 224",
        # RobustBench's ImageNet leaderboard: L∞ 4/255. It has no ImageNet L2 board, so L2 needs --eps.
        budgets=Budgets({"Linf": (1 / 255, 2 / 255, 4 / 255)}, {"Linf": 4 / 255}),
    ),
}


@dataclass
class ImageDataset:
    """A labelled image set: x float32 (N, C, H, W) in [0, 1], y int64 (N,)."""

    name: str
    split: str
    x: Tensor
    y: Tensor
    classes: tuple[str, ...]
    # Which fixed order the images were taken in, where that decides the subset (ImageNet: "robustbench" or
    # "sorted"; see robusteval.data.imagenet); None for data sets read whole in their files' order.
    order: str | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def dataset_budgets(name: str) -> Budgets:
    """The budgets of a named data set; an .npz file or tensors get the defaults (and need an explicit ε list)."""
    info = DATASETS.get(str(name).lower())
    return info.budgets if info is not None else Budgets()


def default_eps(dataset: str, norm: str) -> tuple[float, ...]:
    """The ε grid for a data set and norm; unknown data sets need an explicit ε list."""
    grid = dataset_budgets(dataset).eps.get(norm)
    if grid is None:
        have = ", ".join(name for name, info in DATASETS.items() if norm in info.budgets.eps)
        raise UsageError(f"there is no default eps list for data set '{dataset}'; pass eps explicitly "
                         f"(--eps 0.1,0.2,...). Defaults exist for: {have}")
    return grid


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UsageError(f"split must be 'train' or 'test', got {split!r}")
