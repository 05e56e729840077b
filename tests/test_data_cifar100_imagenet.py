"""The data sets of the papers' checkpoints: CIFAR-100's python pickles and ImageNet's validation folder."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robusteval.core.errors import UsageError
from robusteval.data import DatasetError, dataset_info, imagenet, load_dataset


def make_cifar100(directory: Path, n: int = 5) -> dict[str, dict]:
    folder = directory / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for index, split in enumerate(("train", "test")):
        rng = np.random.default_rng(index)
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                 b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)]}
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
        written[split] = batch
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def test_cifar100_reads_the_fine_labels_in_cifar_layout(tmp_path: Path) -> None:
    written = make_cifar100(tmp_path)
    for split in ("train", "test"):
        data = load_dataset("cifar100", split, root=tmp_path)
        raw = written[split]
        assert data.x.shape == (5, 3, 32, 32) and data.num_classes == 100 and data.classes[7] == "fine7"
        assert data.y.tolist() == raw[b"fine_labels"]
        # Pixel (row 1, col 2) of the green plane sits at 1024 + 1·32 + 2 of the flat row.
        assert float(data.x[3, 1, 1, 2]) == pytest.approx(raw[b"data"][3, 1024 + 34] / 255.0, abs=1e-7)
    assert load_dataset("cifar100", root=tmp_path / "cifar-100-python", limit=2).x.shape[0] == 2
    assert dataset_info("cifar100").input_shape == (3, 32, 32)


def test_cifar100_missing_or_corrupt_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no meta in"):
        load_dataset("cifar100", root=tmp_path)
    make_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8)}))
    with pytest.raises(DatasetError, match=r"expected 'data' as a uint8 array of shape \(n, 3072\)"):
        load_dataset("cifar100", root=tmp_path)


WNIDS = ("n01440764", "n01443537", "n15075141")  # classes 0, 1 and 999 of ILSVRC-2012


def make_imagenet(directory: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for wnid, sizes in zip(WNIDS, [((300, 400), (256, 256)), ((500, 333),), ((224, 640), (260, 300))]):
        (directory / "val" / wnid).mkdir(parents=True)
        for index, (height, width) in enumerate(sizes):
            path = directory / "val" / wnid / f"ILSVRC2012_val_{index:08d}.png"
            Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return paths


def reference_res256_crop224(path: Path) -> torch.Tensor:
    """Shorter side to 256 (PIL bilinear), then the central 224×224, written out with PIL alone."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    if width <= height:
        size = (256, int(256 * height / width))
    else:
        size = (int(256 * width / height), 256)
    image = image.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - 224) / 2)), int(round((size[1] - 224) / 2))
    array = np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def test_imagenet_folder_is_read_in_the_documented_order_with_the_standard_labels(tmp_path: Path) -> None:
    paths = make_imagenet(tmp_path)
    data = load_dataset("imagenet", root=tmp_path)
    assert data.x.shape == (5, 3, 224, 224) and data.num_classes == 1000
    # Not all of RobustBench's 5,000 files are here: every image, sorted by (wnid, file name).
    assert data.y.tolist() == [0, 0, 1, 999, 999]
    for row, path in enumerate(sorted(paths, key=lambda p: (p.parent.name, p.name))):
        torch.testing.assert_close(data.x[row], reference_res256_crop224(path), atol=1 / 255, rtol=0)
    assert load_dataset("imagenet", root=tmp_path / "val").y.tolist() == data.y.tolist()



def test_imagenet_preprocessings_are_robustbench_s_and_egc_s(tmp_path: Path) -> None:
    from torchvision import transforms

    paths = sorted(make_imagenet(tmp_path), key=lambda p: (p.parent.name, p.name))
    default = load_dataset("imagenet", root=tmp_path)
    assert torch.equal(load_dataset("imagenet", root=tmp_path, preprocessing="Res256Crop224").x, default.x)
    crop288 = load_dataset("imagenet", root=tmp_path, preprocessing="crop288")  # names as RobustBench's, any case
    egc = load_dataset("imagenet", root=tmp_path, preprocessing="Res256Crop256")
    bicubic = load_dataset("imagenet", root=tmp_path, preprocessing="BicubicRes256Crop224")
    assert crop288.x.shape[1:] == (3, 288, 288) and egc.x.shape[1:] == (3, 256, 256)
    assert bicubic.x.shape == default.x.shape and not torch.equal(bicubic.x, default.x)
    image = Image.open(paths[1]).convert("RGB")  # 500×333: no resize, the central 288×288
    torch.testing.assert_close(crop288.x[1], transforms.ToTensor()(transforms.CenterCrop(288)(image)))
    # Res256Crop256 keeps the whole shorter side: its central 224 is Res256Crop224's image.
    torch.testing.assert_close(egc.x[:, :, 16:240, 16:240], default.x)
    with pytest.raises(UsageError, match="imagenet only"):
        load_dataset("digits", preprocessing="Crop288")
    with pytest.raises(UsageError, match="Crop288"):
        load_dataset("imagenet", root=tmp_path, preprocessing="Crop300")

def test_imagenet_uses_robustbenchs_list_order_when_all_its_files_exist(tmp_path: Path, monkeypatch) -> None:
    paths = make_imagenet(tmp_path)
    listed = tmp_path / "ids.txt"
    order = [paths[3], paths[0], paths[2]]
    listed.write_text("\n".join(f"{p.parent.name}/{p.name}" for p in order) + "\n")
    real = imagenet.robustbench_helper_file
    monkeypatch.setattr(imagenet, "robustbench_helper_file",
                        lambda name: listed if name == "imagenet_test_image_ids.txt" else real(name))
    decoded = []
    original = imagenet.preprocess
    monkeypatch.setattr(imagenet, "preprocess", lambda path, *how: decoded.append(path) or original(path, *how))
    data = load_dataset("imagenet", root=tmp_path, limit=2)
    assert data.y.tolist() == [999, 0]
    assert decoded == order[:2], "only the first `limit` images are decoded"


def test_every_kth_imagenet_image_comes_from_the_whole_sorted_order_as_in_the_papers_scripts(
        tmp_path: Path, monkeypatch) -> None:
    paths = sorted(make_imagenet(tmp_path), key=lambda p: (p.parent.name, p.name))
    # RobustBench's list is present, yet every K-th image is counted in the ImageFolder order of all images
    # (Cohen et al.'s certify.py --skip, DMAE's --sample_interval), and only the images taken are decoded.
    listed = tmp_path / "ids.txt"
    listed.write_text("\n".join(f"{p.parent.name}/{p.name}" for p in paths[::-1]) + "\n")
    real = imagenet.robustbench_helper_file
    monkeypatch.setattr(imagenet, "robustbench_helper_file",
                        lambda name: listed if name == "imagenet_test_image_ids.txt" else real(name))
    assert load_dataset("imagenet", root=tmp_path).y.tolist() == [999, 999, 1, 0, 0]  # the list's order
    decoded = []
    original = imagenet.preprocess
    monkeypatch.setattr(imagenet, "preprocess", lambda path, *how: decoded.append(path) or original(path, *how))
    data = load_dataset("imagenet", root=tmp_path, every=2)
    assert data.y.tolist() == [0, 1, 999] and data.order == imagenet.SORTED_ORDER
    assert decoded == paths[::2]
    decoded.clear()
    assert load_dataset("imagenet", root=tmp_path, every=2, limit=2).y.tolist() == [0, 1]
    assert decoded == [paths[0], paths[2]]
    digits = load_dataset("digits")
    strided = load_dataset("digits", every=3, limit=4)
    assert torch.equal(strided.x, digits.x[0:12:3]) and torch.equal(strided.y, digits.y[0:12:3])
    with pytest.raises(UsageError, match="every must be a whole number"):
        load_dataset("digits", every=0)


def test_imagenet_errors_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no WordNet-id folders"):
        load_dataset("imagenet", root=tmp_path)
    make_imagenet(tmp_path)
    (tmp_path / "val" / "n99999999").mkdir()
    (tmp_path / "val" / "n99999999" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"folders \['n99999999'\] .* are not ILSVRC-2012 wnids"):
        load_dataset("imagenet", root=tmp_path)
    with pytest.raises(ValueError, match="only the validation images"):
        load_dataset("imagenet", "train", root=tmp_path)


def test_a_missing_cifar100_directory_is_a_usage_error_the_cli_prints_in_one_line(tmp_path):
    from robusteval.core.errors import UsageError

    for root in (None, tmp_path / "absent", tmp_path):
        with pytest.raises(UsageError, match=r"cifar100: "):
            load_dataset("cifar100", root=root)


def test_runs_record_the_imagenet_order_and_warn_when_it_is_not_robustbenchs(tmp_path: Path, monkeypatch) -> None:
    import torch

    import robusteval

    paths = make_imagenet(tmp_path / "imagenet")
    network = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 1000))
    model = robusteval.wrap(network, num_classes=1000, input_shape=(3, 224, 224))
    common = {"data_dir": tmp_path / "imagenet", "device": "cpu"}
    # robustbench's list names files that are not in this folder: every image, sorted, and the runs say so.
    certified = robusteval.certify(model, "imagenet", sigma=0.25, n0=2, n=4, n_images=2, compile=False,
                                   out=tmp_path / "certify", **common)
    attacked = robusteval.evaluate_attack(model, "imagenet", attack="fgsm", eps=[4 / 255], n=2,
                                          large_eps_check=False, masking_checks=False, out=tmp_path / "attack",
                                          **common)
    for run, summary in ((tmp_path / "certify", certified.summary), (tmp_path / "attack", attacked.summary())):
        assert json.loads((run / "config.json").read_text())["image_order"] == imagenet.SORTED_ORDER
        assert any("this subset is not RobustBench's" in note for note in summary["notes"])
    # With every file of its list present, RobustBench's order is used and recorded, and nothing is said.
    listed = tmp_path / "ids.txt"
    listed.write_text("\n".join(f"{p.parent.name}/{p.name}" for p in paths[:2]) + "\n")
    real = imagenet.robustbench_helper_file
    monkeypatch.setattr(imagenet, "robustbench_helper_file",
                        lambda name: listed if name == "imagenet_test_image_ids.txt" else real(name))
    again = robusteval.certify(model, "imagenet", sigma=0.25, n0=2, n=4, n_images=2, compile=False,
                               out=tmp_path / "certify-rb", **common)
    assert json.loads((tmp_path / "certify-rb" / "config.json").read_text())["image_order"] == "robustbench"
    assert not again.summary.get("notes")
    # Other data sets record no order: their configurations (and run directories) are unchanged.
    digits = robusteval.certify("gaussian", "digits", sigma=0.25, n0=2, n=4, n_images=1, compile=False,
                                out=tmp_path / "digits")
    assert "image_order" not in json.loads((tmp_path / "digits" / "config.json").read_text())
    assert digits.summary["n_images"] == 1
