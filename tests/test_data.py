"""Data loading: digits, idx (MNIST / Fashion-MNIST), CIFAR-10 pickles, .npz, and every error path.

Every file except the embedded digits is written by the tests themselves, a few images each.
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import robusteval
from robusteval import data
from robusteval.core.names import UnknownNameError
from robusteval.data import DatasetError, dataset_info, load_dataset, read_idx
from robusteval.data import files as data_files

# --- helpers -----------------------------------------------------------------------------------

_IDX_CODES = {np.dtype("uint8"): 0x08, np.dtype("int8"): 0x09, np.dtype("int16"): 0x0B,
              np.dtype("int32"): 0x0C, np.dtype("float32"): 0x0D, np.dtype("float64"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx encoding of `array`: magic (0, 0, type code, ndim), big-endian dims, big-endian data."""
    header = bytes([0, 0, _IDX_CODES[array.dtype], array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    payload = idx_bytes(array)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_idx_split(directory: Path, split: str, n: int = 3, gz: bool = False, seed: int = 0,
                   size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Write one split of idx files into `directory`; return (images, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if gz else ""
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


class _Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as Python 2 byte strings (BINSTRING), as the original CIFAR-10 files do."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + n.to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj: object) -> bytes:
    """A protocol-2 pickle shaped like the ones Python 2 and numpy 1 wrote for CIFAR-10."""
    import io

    buffer = io.BytesIO()
    _Py2StylePickler(buffer, protocol=2).dump(obj)
    # The original files name numpy.core, numpy 2 writes numpy._core; GLOBAL is a text line, so swap it.
    return buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


CIFAR_NAMES = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def make_cifar(directory: Path, per_batch: int = 2, py2: bool = True) -> dict[str, dict]:
    """Write a miniature cifar-10-batches-py folder; return the batches written, by file name."""
    directory.mkdir(parents=True, exist_ok=True)
    dump = py2_pickle if py2 else (lambda obj: pickle.dumps(obj, protocol=4))
    batches = {}
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        rng = np.random.default_rng(index)
        batch = {
            b"batch_label": f"batch {index}".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img{index}_{i}.png".encode() for i in range(per_batch)],
        }
        (directory / name).write_bytes(dump(batch))
        batches[name] = batch
    meta = {b"label_names": CIFAR_NAMES, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (directory / "batches.meta").write_bytes(dump(meta))
    return batches


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# --- names and splits --------------------------------------------------------------------------


def test_unknown_name_lists_known_datasets_and_suggests():
    with pytest.raises(UnknownNameError) as caught:
        load_dataset("fashion_mnist")
    message = str(caught.value)
    assert "Did you mean: fashion-mnist" in message
    for known in ("digits", "mnist", "fashion-mnist", "cifar10"):
        assert known in message
    with pytest.raises(UnknownNameError, match="Known datasets: cifar10, cifar100, digits, fashion-mnist, imagenet, "
                                               "mnist"):
        dataset_info("svhn")


def test_names_are_case_insensitive_and_info_matches_the_issue():
    assert dataset_info("MNIST").input_shape == (1, 28, 28)
    fashion = dataset_info("fashion-mnist")
    assert fashion.num_classes == 10 and fashion.input_shape == (1, 28, 28)
    assert fashion.classes[0] == "T-shirt/top" and fashion.classes[-1] == "Ankle boot"
    assert "apt-get install dataset-fashion-mnist" in fashion.source
    cifar = dataset_info("cifar10")
    assert (cifar.num_classes, cifar.input_shape) == (10, (3, 32, 32))
    assert all(info.source for info in data.DATASETS.values())


@pytest.mark.parametrize("name", ["digits", "mnist", "cifar10"])
def test_bad_split_names_the_allowed_splits(name, tmp_path):
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'validation'"):
        load_dataset(name, split="validation", root=tmp_path)


def test_bad_split_for_npz(tmp_path):
    path = write_npz(tmp_path / "a.npz", x=np.zeros((1, 1, 2, 2), np.uint8), y=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        load_dataset(str(path), split="val")


# --- digits ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_splits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def test_digits_shapes_sizes_and_range(digits_splits):
    train, test = digits_splits
    assert (len(train), len(test)) == (1297, 500)
    for split in (train, test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.input_shape == (1, 8, 8) and split.num_classes == 10
        assert float(split.x.min()) == 0.0 and float(split.x.max()) == 1.0
        # Raw values are integers 0..16, so every pixel is a multiple of 1/16.
        assert torch.equal(split.x * 16, torch.round(split.x * 16))
    assert robusteval.load_dataset is load_dataset


def test_digits_split_is_stratified(digits_splits):
    train, test = digits_splits
    totals = torch.bincount(train.y, minlength=10) + torch.bincount(test.y, minlength=10)
    expected = totals.double() * 500 / 1797
    counts = torch.bincount(test.y, minlength=10)
    assert bool((counts > 0).all())
    assert bool(((counts.double() - expected).abs() <= 2).all()), (counts, expected)


def test_digits_is_deterministic_and_train_test_partition_the_full_set(digits_splits):
    from sklearn.datasets import load_digits

    train, test = digits_splits
    again = load_dataset("digits", "test")
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)

    def rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        table = np.concatenate([y.reshape(-1, 1), x.reshape(len(y), -1)], axis=1)
        return table[np.lexsort(table.T[::-1])]

    bunch = load_digits()
    everything = rows(bunch.images / 16.0, bunch.target)
    joined = rows(torch.cat([train.x, test.x]).numpy().astype(np.float64), torch.cat([train.y, test.y]).numpy())
    # The two splits together are exactly the 1,797 images, each once: disjoint and complete.
    np.testing.assert_array_equal(joined, everything)


# --- idx ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([258, -2, 7], dtype=np.int16),  # multi-byte: proves the big-endian decoding
    np.array([[0.5, -1.25], [3.0, 1e-3]], dtype=np.float32),
])
def test_read_idx_round_trip(tmp_path, suffix, array):
    path = write_idx(tmp_path / f"a-idx{suffix}", array)
    loaded = read_idx(path)
    assert loaded.dtype == array.dtype and loaded.dtype.isnative
    np.testing.assert_array_equal(loaded, array)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loads_both_splits_from_root(tmp_path, gz):
    test_images, test_labels = make_idx_split(tmp_path, "test", n=3, gz=gz, seed=1)
    train_images, train_labels = make_idx_split(tmp_path, "train", n=4, gz=gz, seed=2)
    test = load_dataset("mnist", "test", root=tmp_path)
    train = load_dataset("mnist", "train", root=str(tmp_path))
    assert (len(test), len(train)) == (3, 4)
    assert test.x.shape == (3, 1, 28, 28) and test.x.dtype == torch.float32 and test.y.dtype == torch.int64
    np.testing.assert_allclose(test.x[:, 0].numpy(), test_images / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(train.y.numpy(), train_labels)
    np.testing.assert_array_equal(test.y.numpy(), test_labels)
    assert test.classes == tuple(str(i) for i in range(10)) and test.name == "mnist"


def test_plain_file_is_preferred_when_both_exist(tmp_path):
    make_idx_split(tmp_path, "test", gz=True, seed=1)
    _, plain_labels = make_idx_split(tmp_path, "test", gz=False, seed=5)
    np.testing.assert_array_equal(load_dataset("mnist", root=tmp_path).y.numpy(), plain_labels)


@pytest.mark.parametrize("subfolder", ["mnist", "raw", "MNIST/raw"])
def test_idx_found_in_accepted_subfolders(tmp_path, subfolder):
    _, labels = make_idx_split(tmp_path / subfolder, "test", seed=3)
    np.testing.assert_array_equal(load_dataset("mnist", root=tmp_path).y.numpy(), labels)


def test_fashion_mnist_default_directory_is_debians(tmp_path, monkeypatch):
    assert data.FASHION_MNIST_DEFAULT_DIR == Path("/usr/share/datasets/fashion-mnist")
    # Debian's package installs exactly the four .gz files, flat in that directory.
    images, labels = make_idx_split(tmp_path, "test", gz=True, seed=4)
    make_idx_split(tmp_path, "train", gz=True, seed=6)
    monkeypatch.setattr(data_files, "FASHION_MNIST_DEFAULT_DIR", tmp_path)
    test = load_dataset("fashion-mnist")
    assert test.classes[9] == "Ankle boot"
    np.testing.assert_array_equal(test.y.numpy(), labels)
    np.testing.assert_allclose(test.x[:, 0].numpy(), images / 255.0, rtol=0, atol=1e-7)
    assert len(load_dataset("fashion-mnist", "train")) == 3
    # An explicit root wins over the default.
    other = tmp_path / "other"
    _, other_labels = make_idx_split(other, "test", seed=7)
    np.testing.assert_array_equal(load_dataset("fashion-mnist", root=other).y.numpy(), other_labels)


def test_fashion_mnist_missing_default_says_how_to_install(tmp_path, monkeypatch):
    missing = tmp_path / "not-installed"
    monkeypatch.setattr(data_files, "FASHION_MNIST_DEFAULT_DIR", missing)
    with pytest.raises(FileNotFoundError) as caught:
        load_dataset("fashion-mnist")
    message = str(caught.value)
    assert str(missing) in message and "does not exist" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "t10k-images-idx3-ubyte[.gz]" in message and "t10k-labels-idx1-ubyte[.gz]" in message


def test_installed_fashion_mnist_test_split_known_answers():
    # .ci/run installs Debian's dataset-fashion-mnist; with CI set, a missing package fails instead of skipping.
    if not (data.FASHION_MNIST_DEFAULT_DIR / "t10k-labels-idx1-ubyte.gz").exists():
        message = "Debian package dataset-fashion-mnist not installed"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI is set, so the real-data test must run")
        pytest.skip(message)
    test = load_dataset("fashion-mnist", "test")
    assert len(test) == 10_000 and test.input_shape == (1, 28, 28)
    assert torch.bincount(test.y).tolist() == [1000] * 10
    assert test.y[:5].tolist() == [9, 2, 1, 1, 6]
    assert float(test.x.min()) == 0.0 and float(test.x.max()) == 1.0


def test_mnist_without_root_asks_for_one():
    with pytest.raises(FileNotFoundError, match=r"mnist: no data directory given; pass root=<directory> holding "
                                                r"t10k-images-idx3-ubyte\[\.gz\] and t10k-labels-idx1-ubyte"):
        load_dataset("mnist")


def test_idx_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data directory .*nowhere does not exist; expected "
                                                r"train-images-idx3-ubyte\[\.gz\] and train-labels"):
        load_dataset("mnist", "train", root=tmp_path / "nowhere")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="data directory .*file is a file, not a directory; expected"):
        load_dataset("mnist", "train", root=tmp_path / "file")


def test_idx_missing_files_lists_where_it_looked(tmp_path):
    make_idx_split(tmp_path, "test")  # only the test split is there
    with pytest.raises(FileNotFoundError) as caught:
        load_dataset("mnist", "train", root=tmp_path)
    message = str(caught.value)
    assert "no train idx files found" in message
    assert "train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]" in message
    for place in (tmp_path, tmp_path / "mnist", tmp_path / "raw", tmp_path / "MNIST" / "raw"):
        assert str(place) in message


def test_idx_half_a_split_names_the_missing_file(tmp_path):
    make_idx_split(tmp_path, "test")
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte\\[.gz\\] is missing"):
        load_dataset("mnist", root=tmp_path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_truncated_idx_file_names_file_and_sizes(tmp_path, suffix):
    make_idx_split(tmp_path, "test", n=3)
    payload = idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-100]
    path = tmp_path / f"t10k-images-idx3-ubyte{suffix}"
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    path.write_bytes(gzip.compress(payload) if suffix else payload)
    expected = 16 + 3 * 28 * 28
    with pytest.raises(DatasetError, match=rf"t10k-images-idx3-ubyte{suffix}: idx file truncated: "
                                           rf"{expected - 100} bytes, expected {expected}"):
        load_dataset("mnist", root=tmp_path)


def test_idx_trailing_bytes_are_an_error(tmp_path):
    path = tmp_path / "x-idx"
    path.write_bytes(idx_bytes(np.zeros(4, np.uint8)) + b"\0")
    with pytest.raises(DatasetError, match="has trailing bytes: 13 bytes, expected 12"):
        read_idx(path)


def test_idx_truncated_header(tmp_path):
    path = tmp_path / "x-idx"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DatasetError, match="truncated idx header: 6 bytes, expected 16 for 3 dims"):
        read_idx(path)
    path.write_bytes(b"\0\0")
    with pytest.raises(DatasetError, match="2 bytes, expected at least a 4-byte magic number"):
        read_idx(path)


@pytest.mark.parametrize("magic", [bytes([1, 0, 8, 1]), bytes([0, 0, 0x42, 1]), bytes([0, 0, 8, 0])])
def test_idx_bad_magic(tmp_path, magic):
    path = tmp_path / "x-idx"
    path.write_bytes(magic + bytes(8))
    with pytest.raises(DatasetError, match=f"x-idx: not an idx file: magic number {magic.hex()}, expected 0000"):
        read_idx(path)


def test_corrupt_gzip_names_the_file(tmp_path):
    make_idx_split(tmp_path, "test", gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz: cannot read idx file, the file is corrupt"):
        load_dataset("mnist", root=tmp_path)
    cut = gzip.compress(idx_bytes(np.zeros(3, np.uint8)))[:-12]
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(cut)
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        load_dataset("mnist", root=tmp_path)


def test_idx_label_count_must_match_images(tmp_path):
    make_idx_split(tmp_path, "test", n=3)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(DatasetError, match="2 labels in .* but 3 images in .*; the counts must be equal"):
        load_dataset("mnist", root=tmp_path)


def test_idx_labels_out_of_range(tmp_path):
    make_idx_split(tmp_path, "test", n=3)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 10, 3], np.uint8))
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 9\], found min 0 and max 10"):
        load_dataset("mnist", root=tmp_path)


def test_idx_wrong_image_shape_or_dtype(tmp_path):
    make_idx_split(tmp_path, "test", n=3, size=27)
    with pytest.raises(DatasetError, match=r"expected uint8 images of shape \(N, 28, 28\), got uint8 \(3, 27, 27\)"):
        load_dataset("mnist", root=tmp_path)
    make_idx_split(tmp_path, "test", n=3)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.int32))
    with pytest.raises(DatasetError, match=r"expected uint8 labels of shape \(N,\), got int32 \(3,\)"):
        load_dataset("mnist", root=tmp_path)


# --- CIFAR-10 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("py2", [True, False])
def test_cifar10_batches_load_with_channel_planes(tmp_path, py2):
    folder = tmp_path / "cifar-10-batches-py"
    batches = make_cifar(folder, py2=py2)
    test = load_dataset("cifar10", "test", root=tmp_path)
    raw = batches["test_batch"][b"data"]
    assert test.x.shape == (2, 3, 32, 32) and test.x.dtype == torch.float32 and test.y.dtype == torch.int64
    # Row layout: 1024 red, then green, then blue values, each plane row-major 32×32.
    assert float(test.x[1, 0, 0, 1]) == pytest.approx(raw[1, 1] / 255.0)
    assert float(test.x[1, 1, 0, 0]) == pytest.approx(raw[1, 1024] / 255.0)
    assert float(test.x[0, 2, 31, 31]) == pytest.approx(raw[0, 3071] / 255.0)
    assert float(test.x[0, 0, 1, 0]) == pytest.approx(raw[0, 32] / 255.0)
    assert test.y.tolist() == batches["test_batch"][b"labels"]
    assert test.classes == tuple(n.decode() for n in CIFAR_NAMES)  # from batches.meta, not hard-coded
    train = load_dataset("cifar10", "train", root=folder)  # the folder itself works too
    assert len(train) == 10
    expected = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert train.y.tolist() == expected
    np.testing.assert_allclose(train.x[8:].reshape(2, -1).numpy(), batches["data_batch_5"][b"data"] / 255.0,
                               rtol=0, atol=1e-7)


def test_malicious_cifar_pickle_is_refused_without_running_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Payload(), b"labels": []}, protocol=2))
    with pytest.raises(DatasetError, match="test_batch: not a valid CIFAR pickle: refusing to load global "
                                           "'posix.mkdir'|refusing to load global '(nt|os).mkdir'"):
        load_dataset("cifar10", root=folder)
    assert not marker.exists()


def test_cifar_missing_root_meta_or_batches(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10: no data directory given; pass root=<directory> holding "
                                                "cifar-10-batches-py/ .*data_batch_1.*test_batch, batches.meta"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match=r"data directory .*missing does not exist; expected "
                                                r"cifar-10-batches-py/"):
        load_dataset("cifar10", root=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no batches.meta in .* or .*cifar-10-batches-py; expected the "
                                                r"python batches \(data_batch_1"):
        load_dataset("cifar10", root=tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    (folder / "data_batch_3").unlink()
    assert len(load_dataset("cifar10", "test", root=tmp_path)) == 2  # the test split does not need it
    with pytest.raises(FileNotFoundError, match=r"data_batch_3 missing in .*cifar-10-batches-py \(the train split "
                                                r"needs data_batch_1, data_batch_2"):
        load_dataset("cifar10", "train", root=tmp_path)


def test_cifar_truncated_or_wrong_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    whole = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match="test_batch: not a valid CIFAR pickle"):
        load_dataset("cifar10", root=folder)
    (folder / "test_batch").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(DatasetError, match="test_batch: expected a pickled dict, got list"):
        load_dataset("cifar10", root=folder)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"num_vis": 3072}, protocol=2))
    with pytest.raises(DatasetError, match="batches.meta: expected a non-empty 'label_names' list"):
        load_dataset("cifar10", root=folder)


@pytest.mark.parametrize("batch, message", [
    ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]},
     r"expected 'data' as a uint8 array of shape \(n, 3072\), got uint8 \(2, 1024\)"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
     r"expected 'data' as a uint8 .*, got float32 \(2, 3072\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels but 2 images; the counts must be equal"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "no 'labels' entry"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels must lie in \[0, 9\], found min 0 and "
                                                                    r"max 10"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.5, 1.0]}, "'labels' must be integers, got float64"),
])
def test_cifar_inconsistent_batch(tmp_path, batch, message):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetError, match="test_batch: " + message):
        load_dataset("cifar10", root=folder)


# --- .npz --------------------------------------------------------------------------------------


def test_npz_nchw_uint8(tmp_path):
    x = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    path = write_npz(tmp_path / "set.npz", x=x, y=np.array([1, 0]))
    loaded = load_dataset(str(path))
    assert loaded.x.shape == (2, 3, 4, 4) and loaded.x.dtype == torch.float32 and loaded.y.dtype == torch.int64
    np.testing.assert_allclose(loaded.x.numpy(), x / 255.0, rtol=0, atol=1e-7)
    assert loaded.y.tolist() == [1, 0] and loaded.classes == ("0", "1") and loaded.name == str(path)
    assert load_dataset(str(path), "train").split == "train"


def test_npz_nhwc_is_transposed(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)  # N, H, W, C
    path = write_npz(tmp_path / "nhwc.npz", x=x, y=np.array([0, 1]))
    loaded = load_dataset(path)
    assert loaded.input_shape == (3, 5, 6)
    assert float(loaded.x[1, 2, 4, 5]) == pytest.approx(x[1, 4, 5, 2] / 255.0)
    gray = np.random.default_rng(1).random((3, 7, 7, 1)).astype(np.float32)
    loaded = load_dataset(write_npz(tmp_path / "gray.npz", x=gray, y=np.array([0, 1, 1])))
    assert loaded.input_shape == (1, 7, 7)
    np.testing.assert_array_equal(loaded.x.numpy(), gray.transpose(0, 3, 1, 2))


def test_npz_layout_rule_prefers_nchw_when_ambiguous(tmp_path):
    # Second and last dims both 3: the rule reads N, C, H, W.
    x = np.zeros((1, 3, 5, 3), np.uint8)
    assert dataset_info(write_npz(tmp_path / "amb.npz", x=x, y=np.array([0]))).input_shape == (3, 5, 3)


def test_npz_float_kept_and_classes_span_max_label(tmp_path):
    x = np.linspace(0, 1, 4 * 2 * 2, dtype=np.float64).reshape(4, 1, 2, 2)
    path = write_npz(tmp_path / "f.npz", x=x, y=np.array([0, 3, 3, 1], dtype=np.uint8))
    loaded = load_dataset(path)
    assert loaded.x.dtype == torch.float32
    np.testing.assert_allclose(loaded.x.numpy(), x, rtol=1e-6)
    assert loaded.num_classes == 4 and loaded.classes == ("0", "1", "2", "3")
    info = dataset_info(str(path))
    assert (info.num_classes, info.input_shape, info.name) == (4, (1, 2, 2), str(path))


def test_create_model_accepts_an_npz_dataset(tmp_path):
    path = write_npz(tmp_path / "mine.npz", x=np.zeros((2, 8, 8, 1), np.uint8), y=np.array([0, 4]))
    model = robusteval.create_model("standard", dataset=str(path), pretrained=False)
    assert model.num_classes == 5 and tuple(model.input_shape) == (1, 8, 8)
    assert model.logits(load_dataset(path).x).shape == (2, 5)


def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.npz: no such .npz file \(expected arrays x and y in it\)"):
        load_dataset(str(tmp_path / "nope.npz"))


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((1, 1, 2, 2), np.uint8)}, r"missing array\(s\) y; expected x and y \(found: x\)"),
    ({"images": np.zeros(1), "labels": np.zeros(1)}, r"missing array\(s\) x, y; expected x and y"),
    ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(2, np.int64)},
     r"x must have 4 dims \(N, C, H, W\) or \(N, H, W, C\), got shape \(2, 4, 4\)"),
    ({"x": np.full((2, 1, 2, 2), 1.5), "y": np.zeros(2, np.int64)},
     r"float x must lie in \[0, 1\], found min 1.5 and max 1.5"),
    ({"x": np.array([-0.25, 0.5, 2.0, 0.0]).reshape(1, 1, 2, 2), "y": np.zeros(1, np.int64)},
     r"found min -0.25 and max 2"),
    ({"x": np.array([np.nan, 0.5, 0.2, 0.0]).reshape(1, 1, 2, 2), "y": np.zeros(1, np.int64)},
     r"x holds NaN or infinite values; expected floats in \[0, 1\]"),
    ({"x": np.zeros((1, 1, 2, 2), np.int32), "y": np.zeros(1, np.int64)},
     r"x must be uint8 \(0..255\) or float in \[0, 1\], got dtype int32"),
    ({"x": np.zeros((2, 1, 2, 2), np.uint8), "y": np.zeros(2, np.float32)},
     r"y must be a 1-d integer array of labels, got float32 \(2,\)"),
    ({"x": np.zeros((2, 1, 2, 2), np.uint8), "y": np.zeros(3, np.int64)},
     "3 labels in y but 2 images in x; the counts must be equal"),
    ({"x": np.zeros((2, 1, 2, 2), np.uint8), "y": np.array([0, -1])}, "labels must be >= 0, found min -1"),
    ({"x": np.zeros((0, 1, 2, 2), np.uint8), "y": np.zeros(0, np.int64)}, "x and y are empty"),
])
def test_npz_errors(tmp_path, arrays, message):
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(path))
    with pytest.raises(DatasetError, match=message):
        dataset_info(str(path))


def test_npz_object_arrays_are_never_unpickled(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(DatasetError, match="array x is corrupt or not a plain numeric array: .*allow_pickle"):
        load_dataset(str(path))


def test_npz_corrupt_file(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(DatasetError, match="junk.npz: not a readable .npz file"):
        load_dataset(str(path))
    single = tmp_path / "single.npz"
    with single.open("wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(DatasetError, match="expected an .npz archive with arrays x and y, found a single .npy"):
        load_dataset(str(single))
