"""Readers of data set files: idx (MNIST, Fashion-MNIST), the CIFAR-10/100 python pickles (through a
restricted unpickler) and `.npz` arrays, each checking what it reads.

Malformed files are a `DatasetError` (a ValueError) naming the file and what was expected; missing files
are a FileNotFoundError saying which files were expected where. See `robusteval.data` for the entry point.
"""

from __future__ import annotations

import codecs
import gzip
import math
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robusteval.core.errors import MissingFileError, UsageError
from robusteval.data.registry import (
    DATASETS,
    FASHION_MNIST_DEFAULT_DIR,
    DatasetError,
    DatasetInfo,
    ImageDataset,
    check_split,
)

# --- idx (MNIST, Fashion-MNIST) ----------------------------------------------------------------

# idx type codes (third byte of the magic number) and their big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_IDX_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Folder torchvision uses for each set under its root (root/<folder>/raw); accepted so that an
# existing torchvision download can be pointed at.
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (plain or gzip-compressed) into a numpy array in native byte order.

    Checks the magic number (two zero bytes, a known type code, the number of
    dimensions) and that the file holds exactly the bytes its header promises;
    anything else is a `DatasetError` naming the file.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        if isinstance(error, FileNotFoundError):
            raise
        # gzip raises BadGzipFile (an OSError) for a bad header and EOFError when cut short.
        raise DatasetError(f"{path}: cannot read idx file, the file is corrupt or truncated ({error})") from error
    if len(data) < 4:
        raise DatasetError(f"{path}: not an idx file: {len(data)} bytes, expected at least a 4-byte magic number")
    zero1, zero2, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(
            f"{path}: not an idx file: magic number {data[:4].hex()}, expected 0000 then a type code "
            f"({', '.join(f'{code:02x}' for code in _IDX_DTYPES)}) and a dimension count >= 1"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DatasetError(f"{path}: truncated idx header: {len(data)} bytes, expected {header_size} for {ndim} dims")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = header_size + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "has trailing bytes"
        raise DatasetError(
            f"{path}: idx file {state}: {len(data)} bytes, expected {expected} "
            f"(header for shape {dims} of {dtype.name})"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a writable copy, not a view of the read-only buffer


def not_a_directory(path: Path) -> str:
    return "is a file, not a directory" if path.exists() else "does not exist"


def _find_file(directory: Path, stem: str) -> Path | None:
    """`directory/stem`, else `directory/stem.gz`, else None."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_directories(name: str, root: Path) -> list[Path]:
    return [root, root / name, root / "raw", root / TORCHVISION_FOLDERS[name] / "raw"]


def _locate_idx(name: str, split: str, root: str | Path | None) -> tuple[Path, Path]:
    """The (images, labels) idx files of `split`, searched in the accepted folders under root."""
    stems = _IDX_SPLIT_FILES[split]
    wanted = " and ".join(f"{stem}[.gz]" for stem in stems)
    install_hint = (
        f" Fashion-MNIST is packaged by Debian: `apt-get install dataset-fashion-mnist` puts it in "
        f"{FASHION_MNIST_DEFAULT_DIR}, where it is found without root."
        if name == "fashion-mnist" else ""
    )
    if root is None:
        if name != "fashion-mnist":
            raise MissingFileError(
                f"{name}: no data directory given; pass root=<directory> holding {wanted} "
                f"(nothing is downloaded)."
            )
        root = FASHION_MNIST_DEFAULT_DIR
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingFileError(
            f"{name}: data directory {root} {not_a_directory(root)}; expected {wanted} in it.{install_hint}"
        )
    searched = _idx_directories(name, root)
    for directory in searched:
        images, labels = _find_file(directory, stems[0]), _find_file(directory, stems[1])
        if images is not None and labels is not None:
            return images, labels
        if images is not None or labels is not None:
            missing = stems[1] if images is not None else stems[0]
            raise MissingFileError(f"{name}: {directory} has only half of the {split} split: "
                                    f"{missing}[.gz] is missing (expected {wanted}).{install_hint}")
    raise MissingFileError(
        f"{name}: no {split} idx files found; expected {wanted} in one of: "
        f"{', '.join(str(d) for d in searched)}.{install_hint}"
    )


def load_idx_dataset(name: str, split: str = "test", root: str | Path | None = None) -> ImageDataset:
    """MNIST or Fashion-MNIST from idx files (see the module docstring for where they are looked for).

    Images must be uint8 N×28×28 and labels uint8 N with values below 10.
    """
    check_split(split)
    if name not in TORCHVISION_FOLDERS:
        raise UsageError(f"idx data sets are {', '.join(TORCHVISION_FOLDERS)}; got {name!r}")
    info = DATASETS[name]
    images_path, labels_path = _locate_idx(name, split, root)
    images, labels = read_idx(images_path), read_idx(labels_path)
    height, width = info.input_shape[1:]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (height, width):
        raise DatasetError(f"{images_path}: expected uint8 images of shape (N, {height}, {width}), "
                           f"got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(f"{labels_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise DatasetError(f"{name} {split}: {len(labels)} labels in {labels_path} but {len(images)} images "
                           f"in {images_path}; the counts must be equal")
    _check_label_range(labels, info.num_classes, str(labels_path))
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1).contiguous()
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(name, split, x, y, info.classes)


def _check_label_range(labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{where}: labels must lie in [0, {num_classes - 1}], "
                           f"found min {labels.min()} and max {labels.max()}")


# --- CIFAR-10 python pickles -------------------------------------------------------------------

CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_SPLIT_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_CIFAR10_META = "batches.meta"


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays, nothing else.

    A pickle can name any importable callable and have it called while loading, so
    an ordinary `pickle.load` of a downloaded file can run arbitrary code. The
    CIFAR batches only need dicts, lists, strings, numbers and numpy arrays, so
    every global other than numpy's array reconstruction is refused. Also allowed,
    both pure data constructors: numpy's `scalar` (labels stored as numpy ints) and
    `_codecs.encode`, which protocol-2 pickles written by Python 3 use to store bytes.
    """

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy.core.multiarray", "scalar"): np.int64(0).__reduce__()[0],
        ("numpy._core.multiarray", "scalar"): np.int64(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': only numpy arrays and plain data are allowed"
            ) from None


def _load_cifar_pickle(path: Path) -> dict[str, Any]:
    """One CIFAR pickle as a dict with str keys, through the restricted unpickler."""
    try:
        with path.open("rb") as handle:
            # latin1 reads the Python 2 byte strings of the original files (numpy's documented choice).
            obj = _ArrayOnlyUnpickler(handle, encoding="latin1").load()
    # Truncated or garbled pickles fail in any of these ways, depending on where the damage is.
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError) as error:
        raise DatasetError(f"{path}: not a valid CIFAR pickle: {error}") from error
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {key.decode("latin1") if isinstance(key, bytes) else str(key): value for key, value in obj.items()}


def _pickle_directory(name: str, root: str | Path | None, folder: str, meta: str, wanted: str,
                      files: str = "pickles") -> Path:
    """The directory holding a CIFAR data set's python pickles: `root` itself or `root/folder`."""
    if root is None:
        raise MissingFileError(f"{name}: no data directory given; pass root=<directory> holding {folder}/ "
                               f"({wanted}); nothing is downloaded.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"{name}: data directory {root} {not_a_directory(root)}; "
                               f"expected {folder}/ ({wanted}) in it or to be it.")
    for directory in (root, root / folder):
        if (directory / meta).is_file():
            return directory
    raise MissingFileError(f"{name}: no {meta} in {root} or {root / folder}; expected the "
                           f"python {files} ({wanted}) there.")


def _cifar_directory(root: str | Path | None) -> Path:
    wanted = ", ".join((*_CIFAR10_SPLIT_FILES["train"], *_CIFAR10_SPLIT_FILES["test"], _CIFAR10_META))
    return _pickle_directory("cifar10", root, CIFAR10_FOLDER, _CIFAR10_META, wanted, files="batches")


def load_cifar10(split: str = "test", root: str | Path | None = None) -> ImageDataset:
    """CIFAR-10 from the python batches (`data_batch_1`..`5`, `test_batch`, `batches.meta`).

    `root` is the `cifar-10-batches-py` folder or its parent. Class names come
    from `batches.meta`. Each batch must hold uint8 `data` of shape (n, 3072)
    (red, green, blue planes of 32×32, row-major) and n `labels`.
    """
    check_split(split)
    directory = _cifar_directory(root)
    meta_path = directory / _CIFAR10_META
    names = _load_cifar_pickle(meta_path).get("label_names")
    if not isinstance(names, (list, tuple)) or not names:
        raise DatasetError(f"{meta_path}: expected a non-empty 'label_names' list")
    classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    missing = [f for f in _CIFAR10_SPLIT_FILES[split] if not (directory / f).is_file()]
    if missing:
        raise MissingFileError(f"cifar10: {', '.join(missing)} missing in {directory} "
                                f"(the {split} split needs {', '.join(_CIFAR10_SPLIT_FILES[split])}).")
    images, labels = [], []
    for file_name in _CIFAR10_SPLIT_FILES[split]:
        data, label_array = _cifar_batch(directory / file_name, "labels", len(classes))
        images.append(data)
        labels.append(label_array)
    x = np.concatenate(images).reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    y = np.concatenate(labels)
    return ImageDataset("cifar10", split, torch.from_numpy(x), torch.from_numpy(y), classes)


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR pickle's uint8 `data` (n, 3072) and its n integer labels under `label_key`, checked."""
    batch = _load_cifar_pickle(path)
    data, batch_labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: expected 'data' as a uint8 array of shape (n, 3072), got {got}")
    if batch_labels is None:
        raise DatasetError(f"{path}: no '{label_key}' entry (keys: {', '.join(sorted(batch))})")
    try:
        label_array = np.asarray(batch_labels)
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{path}: '{label_key}' must be a list of integers: {error}") from error
    if label_array.size and not np.issubdtype(label_array.dtype, np.integer):
        raise DatasetError(f"{path}: '{label_key}' must be integers, got {label_array.dtype}")
    label_array = label_array.astype(np.int64)
    if label_array.ndim != 1 or len(label_array) != len(data):
        raise DatasetError(f"{path}: {label_array.size} labels but {len(data)} images; the counts must be equal")
    _check_label_range(label_array, num_classes, str(path))
    return data, label_array


# --- CIFAR-100 python pickles ------------------------------------------------------------------

CIFAR100_FOLDER = "cifar-100-python"
_CIFAR100_META = "meta"


def _cifar100_directory(root: str | Path | None) -> Path:
    return _pickle_directory("cifar100", root, CIFAR100_FOLDER, _CIFAR100_META, "train, test, meta")


def load_cifar100(split: str = "test", root: str | Path | None = None) -> ImageDataset:
    """CIFAR-100 from the python pickles (`train`, `test`, `meta`), with the 100 fine labels.

    `root` is the `cifar-100-python` folder or its parent. Each file holds
    uint8 `data` (n, 3072) in CIFAR-10's layout and n `fine_labels`; class
    names are `meta`'s `fine_label_names`.
    """
    check_split(split)
    directory = _cifar100_directory(root)
    meta_path = directory / _CIFAR100_META
    names = _load_cifar_pickle(meta_path).get("fine_label_names")
    if not isinstance(names, (list, tuple)) or len(names) != 100:
        raise DatasetError(f"{meta_path}: expected a 'fine_label_names' list of 100 names")
    classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    path = directory / split
    if not path.is_file():
        raise FileNotFoundError(f"cifar100: {split} missing in {directory} (expected train, test and meta).")
    data, label_array = _cifar_batch(path, "fine_labels", 100)
    x = data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return ImageDataset("cifar100", split, torch.from_numpy(x), torch.from_numpy(label_array), classes)


# --- .npz files --------------------------------------------------------------------------------


def _npz_layout(shape: tuple[int, ...], path: Path) -> str:
    """'NHWC' when the last dim is 1 or 3 and the second is not, else 'NCHW'."""
    if len(shape) != 4:
        raise DatasetError(f"{path}: x must have 4 dims (N, C, H, W) or (N, H, W, C), got shape {shape}")
    return "NHWC" if shape[3] in (1, 3) and shape[1] not in (1, 3) else "NCHW"


def _npz_open(path: Path) -> Any:
    if not path.is_file():
        raise MissingFileError(f"{path}: no such .npz file (expected arrays x and y in it)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DatasetError(f"{path}: not a readable .npz file: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path}: expected an .npz archive with arrays x and y, found a single .npy array")
    missing = [key for key in ("x", "y") if key not in archive.files]
    if missing:
        archive.close()
        raise DatasetError(f"{path}: missing array(s) {', '.join(missing)}; expected x and y "
                           f"(found: {', '.join(archive.files) or 'none'})")
    return archive


def _npz_array(archive: Any, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as error:
        # allow_pickle=False makes object arrays a ValueError here, so nothing is ever unpickled.
        raise DatasetError(f"{path}: array {key} is corrupt or not a plain numeric array: {error}") from error


def _npz_labels(y: np.ndarray, num_images: int, path: Path) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{path}: y must be a 1-d integer array of labels, got {y.dtype} {y.shape}")
    if len(y) != num_images:
        raise DatasetError(f"{path}: {len(y)} labels in y but {num_images} images in x; the counts must be equal")
    if num_images == 0:
        raise DatasetError(f"{path}: x and y are empty; expected at least one image")
    if y.min() < 0:
        raise DatasetError(f"{path}: labels must be >= 0, found min {y.min()}")
    return y.astype(np.int64)


def _npz_classes(y: np.ndarray) -> tuple[str, ...]:
    # Class i is named str(i) for every i up to the largest label, so classes[label] is always its name
    # and len(classes) == max label + 1 even when some label is absent from this file.
    return tuple(str(i) for i in range(int(y.max()) + 1))


def npz_info(path: Path) -> DatasetInfo:
    # Loading the whole file applies exactly load_npz's checks, so a model is never built for a bad file.
    dataset = load_npz(path)
    return DatasetInfo(str(path), dataset.num_classes, dataset.input_shape, dataset.classes,
                       source=f"arrays x and y in {path}")


def load_npz(path: str | Path, split: str = "test") -> ImageDataset:
    """Images and labels from an `.npz` file holding arrays `x` and `y`.

    - x has 4 dims. It is read as N×H×W×C when its last dim is 1 or 3 and its
      second is not, otherwise as N×C×H×W (so a 3×32×32 or 1×28×28 image is
      never mistaken for channels-last).
    - x is uint8 (divided by 255) or floating point already in [0, 1]; other
      dtypes, non-finite values or values outside [0, 1] are errors.
    - y is a 1-d integer array of N labels >= 0; the classes are named "0" ..
      str(max label), so num_classes = max label + 1.
    - The file is one set of images: `split` is checked and recorded, not used
      to select anything.
    Loaded with `allow_pickle=False`: an .npz never runs code.
    """
    check_split(split)
    path = Path(path).expanduser()
    archive = _npz_open(path)
    with archive:
        x = _npz_array(archive, "x", path)
        y = _npz_array(archive, "y", path)
    layout = _npz_layout(x.shape, path)
    labels = _npz_labels(y, x.shape[0], path)
    if layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        images = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DatasetError(f"{path}: x holds NaN or infinite values; expected floats in [0, 1]")
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            raise DatasetError(f"{path}: float x must lie in [0, 1], found min {low:g} and max {high:g} "
                               f"(store uint8 0..255 or divide by 255 first)")
        images = x.astype(np.float32)
    else:
        raise DatasetError(f"{path}: x must be uint8 (0..255) or float in [0, 1], got dtype {x.dtype}")
    x_tensor = torch.from_numpy(np.ascontiguousarray(images))
    return ImageDataset(str(path), split, x_tensor, torch.from_numpy(labels), _npz_classes(labels))
