"""The papers' own architectures, with the official module names, so their checkpoint files load as they are.

`official_architecture(name, dataset)` says whether a registered model has
an official architecture for a data set; `create_model` then builds it
(sized from the file's shapes) instead of the small digits re-implementation.
Nothing here downloads, and nothing is built until asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from robusteval.core.errors import UsageError
from robusteval.core.interface import JointModel
from robusteval.data import DatasetInfo


@dataclass(frozen=True)
class OfficialArchitecture:
    """How to build one paper's official network and read its files, with what could not be settled."""

    model: str
    datasets: tuple[str, ...]
    repository: str
    architecture: str
    file_format: str
    preprocessing: str
    build: Callable[[DatasetInfo], JointModel]  # the published size, random weights
    # load(info, file, allow_unsafe_pickle, **{option: value}): a file as the official code writes it
    load: Callable[..., JointModel]
    capabilities: frozenset[str]
    unsettled: tuple[str, ...] = field(default_factory=tuple)
    # Keywords of `load` beyond the file (egc's autoencoder `vae`, the diffusion models' `model_config`).
    options: tuple[str, ...] = ()
    # Capabilities the re-implementation has and the official model does not, with the reason.
    not_offered: dict[str, str] = field(default_factory=dict)
    # The ImageNet preprocessing of the paper's own evaluation (robusteval.data.imagenet.PREPROCESSINGS), the
    # default of --preprocessing for this model; None: RobustBench's Res256Crop224.
    imagenet_preprocessing: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "datasets": list(self.datasets),
            "repository": self.repository,
            "architecture": self.architecture,
            "file_format": self.file_format,
            "preprocessing": self.preprocessing,
            "capabilities": sorted(self.capabilities),
            "not_offered": dict(self.not_offered),
            "options": list(self.options),
            "unsettled": list(self.unsettled),
        }


def _jem() -> OfficialArchitecture:
    # deferred: each official architecture loads with its file
    from robusteval.model_zoo.official import jem

    return OfficialArchitecture(
        model="jem", datasets=jem.DATASETS, repository="https://github.com/wgrathwohl/JEM",
        architecture="CCF over Wide_ResNet(depth, k, norm=None): convs with bias, LeakyReLU 0.2, no norm layers, "
                     "64k-d features; energy_output and class_output heads. Depth and width are read from the file "
                     "(published: WRN-28-10).",
        file_format=jem.FORMAT,
        preprocessing="(x - 0.5) / 0.5 inside the model",
        build=jem.build_jem, load=jem.load_jem, capabilities=jem.OfficialJEM.capabilities,
        unsettled=(
            "sample(): JEM's sample_q settings (20 SGLD steps, step 1, noise 0.01 on [-1, 1]) started from the "
            "file's replay buffer, class-conditional chains from the buffer images the model classifies as the "
            "class (eval_wrn_ebm.py cond_samples); the official code has no single inference sampler, so these "
            "choices are ours. Samples are clamped to [0, 1] after every step (JEM clamps only for plotting).",
            "Only norm=None files load (the published runs); files trained with --norm batch/instance/layer/act "
            "are refused with their unexpected keys.",
        ),
    )


def _gmmc() -> OfficialArchitecture:
    # deferred: each official architecture loads with its file
    from robusteval.model_zoo.official import gmmc

    return OfficialArchitecture(
        model="gmmc", datasets=gmmc.DATASETS, repository="https://github.com/sndnyang/GMMC",
        architecture="F over JEM's Wide_ResNet(depth, k, norm=None) without its linear layer; LDALayer with identity "
                     "covariance: logits -1/2 ||phi(x) - mu_c||^2 with the Max-Mahalanobis centres. Depth and width "
                     "are read from the file (published: WRN-28-10).",
        file_format=gmmc.FORMAT,
        preprocessing="(x - 0.5) / 0.5 inside the model",
        build=gmmc.build_gmmc, load=gmmc.load_gmmc, capabilities=gmmc.OfficialGMMC.capabilities,
        unsettled=(
            "The centres are the file's (its pickled LDALayer, of which only 'centers' is read); a file without "
            "'margin' gets the Max-Mahalanobis centres recomputed with --mu_c 10, train_gmmc.py's default.",
            "sample(): train_gmmc.py's staged sampling with the published --gamma 0.001 (scripts/cifar10_gen.sh): "
            "20 steps of x -= 1 * grad of the batch mean of 1/2 ||phi(x) - (mu_y + gamma z)||^2 (z ~ N(0, I) drawn "
            "once per chain) on [-1, 1] images, clamped, no noise, from the file's replay buffer "
            "(class-y slots y * N/C + i, as sample_p_0). The official step depends on the batch size through the "
            "mean; robusteval fixes it at the official batch of 64.",
        ),
    )


def _dmae() -> OfficialArchitecture:
    # deferred: each official architecture loads with its file
    from robusteval.model_zoo.official import dmae_vit

    return OfficialArchitecture(
        model="dmae", datasets=dmae_vit.DATASETS, repository="https://github.com/quanlin-wu/dmae",
        architecture="models_vit.VisionTransformer (timm ViT, global average pooling of the patch tokens + fc_norm): "
                     "ViT-B/16 or ViT-L/16; width, depth, patch, MLP ratio and input size read from the file "
                     "(published: ViT-B/16 for CIFAR-10, ViT-B/16 and ViT-L/16 for ImageNet)",
        file_format=dmae_vit.FORMAT,
        preprocessing="CIFAR-10: the 32x32 image (noise added there) resized bicubically to 224, then normalised "
                      "with mean (0.4914, 0.4822, 0.4465), std (0.2471, 0.2435, 0.2616); ImageNet: normalised with "
                      "ImageNet's mean/std",
        build=dmae_vit.build_dmae, load=dmae_vit.load_dmae, capabilities=dmae_vit.DMAEClassifier.capabilities,
        not_offered={"denoise": "the fine-tuned classifier file holds the encoder only (DMAE's decoder is "
                                "pre-training's and is not in it)"},
        imagenet_preprocessing="BicubicRes256Crop224",  # DMAE's evaluation transform (util/datasets.py)
        unsettled=(
            "The number of attention heads is not in the weights' shapes: it comes from the file's args.model "
            "(vit_base_patch16: 12, vit_large_patch16: 16, vit_huge_patch14: 16), else from the width (768: 12, "
            "1024: 16, 1280: 16, otherwise width / 64).",
            "Bicubic upsampling 32 -> 224 without antialiasing (torch interpolate, cubic a = -0.75): what "
            "torchvision's tensor Resize did before 0.17; newer torchvision antialiases by default, which changes "
            "the cubic kernel to a = -0.5. The official requirements do not pin torchvision.",
            "ImageNet is evaluated as DMAE's own evaluation transform does by default (util/datasets.py: bicubic "
            "resize to 256, centre crop 224: --preprocessing BicubicRes256Crop224); --preprocessing Res256Crop224 "
            "gives RobustBench's bilinear resize.",
            "Pre-training checkpoints (decoder_*, mask_token) are not classifiers: those entries are ignored with a "
            "warning and the missing fc_norm/head keys are reported.",
        ),
    )


def _cohen() -> OfficialArchitecture:
    # deferred: each official architecture loads with its file
    from robusteval.model_zoo.official import cohen

    return OfficialArchitecture(
        model="cohen", datasets=cohen.DATASETS, repository="https://github.com/locuslab/smoothing",
        architecture="Sequential(NormalizeLayer, net): cifar_resnet20 / cifar_resnet110 (archs/cifar_resnet.py) on "
                     "CIFAR-10, torchvision resnet50 inside DataParallel on ImageNet; depth read from the file",
        file_format=cohen.FORMAT,
        preprocessing="NormalizeLayer with datasets.py's mean/std inside the model; noise is added before it",
        build=cohen.build_cohen, load=cohen.load_cohen, capabilities=cohen.CohenClassifier.capabilities,
        unsettled=(
            "Files from before torch 0.4.1 lack BatchNorm's num_batches_tracked; they load (inference never reads it).",
        ),
    )


def _jdm() -> OfficialArchitecture:
    # deferred: each official architecture loads with its file
    from robusteval.model_zoo.official import jdm

    return OfficialArchitecture(
        model="jdm", datasets=jdm.DATASETS, repository=jdm.REPOSITORY, architecture=jdm.ARCHITECTURE,
        file_format=jdm.FORMAT, preprocessing=jdm.PREPROCESSING, build=jdm.build_jdm, load=jdm.load_jdm,
        capabilities=jdm.OfficialJointDiffusion.capabilities, unsettled=jdm.UNSETTLED,
        options=("model_config",),
    )


def _egc() -> OfficialArchitecture:
    # deferred: each official architecture loads with its file
    from robusteval.model_zoo.official import egc

    return OfficialArchitecture(
        model="egc", datasets=egc.DATASETS, repository=egc.REPOSITORY, architecture=egc.ARCHITECTURE,
        file_format=egc.FORMAT, preprocessing=egc.PREPROCESSING, build=egc.build_egc, load=egc.load_egc,
        capabilities=egc.OfficialEGC.capabilities, unsettled=egc.UNSETTLED, options=("vae", "model_config"),
        not_offered={"denoise": "EGC's diffusion noise lives in the autoencoder's latent, so no pixel-space "
                                "denoiser (and no denoised certification or denoise:S defense) can be read off it"},
        imagenet_preprocessing="Res256Crop256",  # EGC's evaluation: resize 256, centre crop 256 (32×32 latents)
    )


_OFFICIAL: dict[str, Callable[[], OfficialArchitecture]] = {
    "jem": _jem, "gmmc": _gmmc, "dmae": _dmae, "cohen": _cohen, "jdm": _jdm, "egc": _egc,
}


def official_spec(model: str) -> OfficialArchitecture | None:
    """The official architecture of a registered model, or None when it has none."""
    make = _OFFICIAL.get(model)
    return make() if make is not None else None


# The data sets of the papers' experiments: on these a model with an official architecture uses it or nothing.
PAPER_DATASETS = ("cifar10", "cifar100", "imagenet")


def official_architecture(model: str, dataset: str) -> OfficialArchitecture | None:
    """The official architecture of `model` for `dataset`, or None (then the digits re-implementation is used).

    A paper's data set that the paper's code does not define the model for is
    an error rather than a silently substituted small network. Other data sets
    the official code defines (jdm's mnist, fashion-mnist) have it too; there
    create_model uses it only for a paper's file (see `paper_dataset`).
    """
    spec = official_spec(model)
    if spec is None or (dataset not in PAPER_DATASETS and dataset not in spec.datasets):
        return None
    if dataset not in spec.datasets:
        raise UsageError(f"the official architecture of '{model}' ({spec.repository}) is defined for the data sets "
                         f"{', '.join(spec.datasets)}, not {dataset}")
    return spec
