"""ImageNet validation images from a local ImageFolder tree, in a fixed order, preprocessed as RobustBench does.

Layout: ``root/val/<wnid>/<image>`` or ``root/<wnid>/<image>`` (one folder per
WordNet id, as torchvision's ImageFolder and RobustBench expect). Nothing is
downloaded.

Labels: a wnid's index in the sorted list of the 1,000 ILSVRC-2012 wnids
(the standard class order of every ImageNet classifier). The list comes
from the robusteval-independent file RobustBench ships
(``robustbench/helper_files/imagenet_class_to_id_map.json``) when the
robustbench package is installed; without it the folders under root must be
exactly the 1,000 wnids.

Order, so that ``--n 1000`` means the same images on every machine:
1. when RobustBench's 5,000-image evaluation list
   (``helper_files/imagenet_test_image_ids.txt``) is installed and every file
   it names is under root: those images, in that list's order;
2. otherwise every image under root, sorted by (wnid, file name). That subset
   is not RobustBench's: the dataset's `order` says which order was used
   ("robustbench" or "sorted"), runs record it in their configuration
   (`image_order`) and their summary carries `order_notes`' warning.

Preprocessing (`PREPROCESSINGS`, chosen with --preprocessing and recorded in
the run's configuration): by default RobustBench's "Res256Crop224" (also
Cohen et al.'s test transform): resize the shorter side to 256 (bilinear,
antialiased), centre crop 224×224, scale to [0, 1]. RobustBench's others,
"Crop288" (centre crop 288, no resize) and "BicubicRes256Crop224", and
"Res256Crop256" (resize 256, centre crop 256: EGC's evaluation, 32×32 latents).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from robusteval.core.names import resolve_name
from robusteval.data.files import not_a_directory
from robusteval.data.registry import DatasetError, ImageDataset, check_split

RESIZE = 256
CROP = 224
# name → (shorter side resized to, interpolation, centre crop): RobustBench's names, and EGC's 256 crop.
PREPROCESSINGS: dict[str, tuple[int | None, str, int]] = {
    "Res256Crop224": (RESIZE, "bilinear", CROP),
    "Crop288": (None, "bilinear", 288),
    "BicubicRes256Crop224": (RESIZE, "bicubic", CROP),
    "Res256Crop256": (RESIZE, "bilinear", 256),
}
DEFAULT_PREPROCESSING = "Res256Crop224"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Without --n, more images than this are refused: 10,000 images at 224×224 already take 6 GB as float32.
MAX_UNLIMITED = 10_000


def robustbench_helper_file(name: str) -> Path | None:
    """A file of the installed robustbench package's helper_files, found without importing robustbench."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "helper_files" / name
    return path if path.is_file() else None


def _image_directory(root: str | Path | None) -> Path:
    if root is None:
        raise FileNotFoundError("imagenet: no data directory given; pass root=<directory> holding val/<wnid>/<images> "
                                "(ImageFolder layout); nothing is downloaded.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"imagenet: data directory {root} {not_a_directory(root)}; expected "
                                f"val/<wnid>/<images> in it.")
    for directory in (root / "val", root):
        if directory.is_dir() and any(_is_wnid(p) for p in directory.iterdir()):
            return directory
    raise FileNotFoundError(f"imagenet: no WordNet-id folders (n########/) in {root} or {root / 'val'}; expected the "
                            f"validation images in the ImageFolder layout.")


def _is_wnid(path: Path) -> bool:
    name = path.name
    return path.is_dir() and len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def class_index(directory: Path) -> dict[str, int]:
    """wnid → label: RobustBench's map of the 1,000 sorted wnids, else the 1,000 folders under `directory`."""
    mapping = robustbench_helper_file("imagenet_class_to_id_map.json")
    if mapping is not None:
        return {str(k): int(v) for k, v in json.loads(mapping.read_text()).items()}
    folders = sorted(p.name for p in directory.iterdir() if _is_wnid(p))
    if len(folders) != 1000:
        raise DatasetError(f"imagenet: {directory} has {len(folders)} class folders; without the robustbench package "
                           f"(which ships the list of the 1,000 wnids) all 1,000 must be present to number the "
                           f"classes")
    return {wnid: index for index, wnid in enumerate(folders)}


# Which order the images were taken in (ImageDataset.order, a run's `image_order`).
ROBUSTBENCH_ORDER = "robustbench"
SORTED_ORDER = "sorted"


def image_order(directory: Path) -> list[Path]:
    """The fixed order of the images (see the module docstring)."""
    return ordered_images(directory)[0]


def ordered_images(directory: Path, whole: bool = False) -> tuple[list[Path], str]:
    """The images in their fixed order, and which order that is (ROBUSTBENCH_ORDER or SORTED_ORDER).

    whole: every image sorted (the ImageFolder order of the papers' scripts), even where RobustBench's list is.
    """
    listed = None if whole else robustbench_helper_file("imagenet_test_image_ids.txt")
    if listed is not None:
        names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        paths = [directory / name for name in names]
        if all(path.is_file() for path in paths):
            return paths, ROBUSTBENCH_ORDER
    return sorted(
        (path for folder in directory.iterdir() if _is_wnid(folder) for path in folder.iterdir()
         if path.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda path: (path.parent.name, path.name),
    ), SORTED_ORDER


def order_notes(order: str | None) -> list[str]:
    """The summary's warning when the ImageNet images are not RobustBench's subset (none otherwise)."""
    if order != SORTED_ORDER:
        return []
    return ["imagenet: robustbench's list of its 5,000 evaluation images (helper_files/imagenet_test_image_ids.txt) "
            "was not found or not all its files are under the data folder, so the images are every image there "
            "sorted by (wnid, file name): this subset is not RobustBench's, and the figures are not comparable "
            "with its leaderboard"]


def crop_size(preprocessing: str) -> int:
    """The side of the images a preprocessing makes (224, 256 or 288)."""
    return PREPROCESSINGS[resolve_name(preprocessing, PREPROCESSINGS, "imagenet preprocessing")][2]


def preprocess(path: Path, preprocessing: str = DEFAULT_PREPROCESSING) -> torch.Tensor:
    """One image as `preprocessing` makes it (default RobustBench's Res256Crop224): (3, S, S) float in [0, 1]."""
    from PIL import Image  # deferred with torchvision (ImageNet only)
    from torchvision import transforms  # deferred: torchvision costs seconds to import

    resize, interpolation, crop = PREPROCESSINGS[preprocessing]
    mode = transforms.InterpolationMode.BICUBIC if interpolation == "bicubic" else transforms.InterpolationMode.BILINEAR
    steps = [transforms.Resize(resize, interpolation=mode)] if resize is not None else []
    transform = transforms.Compose([*steps, transforms.CenterCrop(crop), transforms.ToTensor()])
    try:
        with Image.open(path) as image:
            return transform(image.convert("RGB"))
    except OSError as error:
        raise DatasetError(f"{path}: not a readable image: {error}") from error


def load_imagenet(split: str = "test", root: str | Path | None = None, limit: int | None = None,
                  preprocessing: str = DEFAULT_PREPROCESSING, every: int = 1) -> ImageDataset:
    """The first `limit` validation images (all when None) in the fixed order, labelled by wnid, preprocessed.

    every > 1: images 0, every, 2·every, ... of all validation images sorted by (wnid, file name), the
    ImageFolder order in which the papers' scripts take every 50th (DMAE) or 100th (Cohen et al.) image.
    """
    preprocessing = resolve_name(preprocessing, PREPROCESSINGS, "imagenet preprocessing")
    check_split(split)
    if split != "test":
        raise ValueError("imagenet: only the validation images (split 'test') are read")
    directory = _image_directory(root)
    labels_of = class_index(directory)
    order, order_name = ordered_images(directory, whole=every > 1)
    order = order[::every]
    if not order:
        raise FileNotFoundError(f"imagenet: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of "
                                f"{directory}")
    if limit is None and len(order) > MAX_UNLIMITED:
        raise ValueError(f"imagenet: {len(order)} images under {directory}; pass a number of images (--n / "
                         f"--n-images) of at most {MAX_UNLIMITED} rather than decoding them all into memory")
    chosen = order if limit is None else order[:limit]
    unknown = sorted({path.parent.name for path in chosen} - set(labels_of))
    if unknown:
        raise DatasetError(f"imagenet: folders {unknown[:5]} under {directory} are not ILSVRC-2012 wnids")
    x = torch.stack([preprocess(path, preprocessing) for path in chosen])
    y = torch.tensor([labels_of[path.parent.name] for path in chosen], dtype=torch.long)
    classes = tuple(sorted(labels_of, key=labels_of.__getitem__))
    return ImageDataset("imagenet", split, x, y, classes, order=order_name)
