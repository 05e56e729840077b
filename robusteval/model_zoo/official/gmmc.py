"""GMMC's official CIFAR model (sndnyang/GMMC `train_gmmc.py`) under the JointModel contract.

GMMC's `F` holds only `f`, JEM's Wide ResNet without its unused `linear`
layer; the classifier is an `LDALayer` with identity covariance whose
`centers` μ_c are the Max-Mahalanobis centres (`Utils/mmc_utils.py
cal_center`, scaled by C = 10) and logits −½‖φ(x) − μ_c‖². Inputs are
normalised by (x − 0.5)/0.5. The training script saves
`{"model_state_dict": F.state_dict(), "replay_buffer": [x, y], "margin": LDALayer}`,
pickling the whole LDALayer module; robusteval keeps only its centres.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robusteval.core.checkpoints import (
    BATCHNORM_STEPS,
    CheckpointError,
    PickledLDALayer,
    load_into,
)
from robusteval.core.errors import UsageError
from robusteval.core.interface import JointModel
from robusteval.data import DatasetInfo
from robusteval.model_zoo.official.common import (
    ReplayImages,
    official_state_dict,
    read_official_file,
    require_classes,
    require_dataset,
)
from robusteval.model_zoo.official.wideresnet import WideResNet, wrn_size
from robusteval.training.sgld import SGLDConfig, sgld, uniform_noise

logger = logging.getLogger(__name__)

DATASETS = ("cifar10", "cifar100")
FORMAT = ("GMMC's checkpoint ({'model_state_dict': {f.*}, 'replay_buffer': [x, y], 'margin': LDALayer with "
          "'centers'})")
MU_C = 10.0  # train_gmmc.py --mu_c default
# GMMC's sample_q: 20 steps of x -= 1·∇ mean_batch ½‖φ(x) − μ_y‖² on [-1, 1] images, no noise, clamped: a step of
# 1/4 on [0, 1] images; the batch mean is taken over the official batch of 64.
GMMC_SGLD = SGLDConfig(steps=20, step_size=0.25, noise=0.0)
OFFICIAL_BATCH = 64
# Staged sampling's feature-space target u_y + γ·z (z ~ N(0, I) drawn once per chain): the published command
# (scripts/cifar10_gen.sh) passes --gamma 0.001; train_gmmc.py's default is 0.
GMMC_SAMPLE_GAMMA = 0.001


def mmc_centers(num_classes: int, dim: int, scale: float = MU_C) -> Tensor:
    """The Max-Mahalanobis centres of `cal_center`: unit vectors with pairwise inner product −1/(C − 1), × scale.

    Row k is fixed by its inner products with rows 0..k−1 (solved in order,
    a triangular system) and then completed to unit norm on axis k. Computed
    in float32 with tensor arithmetic throughout, as `cal_center` computes
    them: the centres a genuine file holds (a float64 solve differs from
    them by 6e-3 on the last centre at C = 10, 1e-2 at C = 100).
    """
    if num_classes < 2 or dim < num_classes:
        raise UsageError(f"Max-Mahalanobis centres need 2 <= classes <= dim, got {num_classes} classes in {dim} dims")
    centers = torch.zeros(num_classes, dim, dtype=torch.float32, device="cpu")  # also inside a meta-device build
    centers[0, 0] = 1.0
    for k in range(1, num_classes):
        for j in range(k):
            centers[k, j] = -(1.0 / (num_classes - 1) + torch.dot(centers[k], centers[j])) / centers[j, j]
        centers[k, k] = torch.sqrt(torch.abs(1.0 - torch.linalg.vector_norm(centers[k]).pow(2)))
    return centers * scale


class OfficialGMMC(JointModel):
    """GMMC: logits −½‖φ((x − 0.5)/0.5) − μ_c‖², energy −logsumexp(logits)."""

    capabilities = frozenset({"logits", "energy", "sample"})

    def __init__(self, info: DatasetInfo, depth: int = 28, widen_factor: int = 10, centers: Tensor | None = None):
        super().__init__()
        self.num_classes = info.num_classes
        self.input_shape = (3, 32, 32)
        self.f = WideResNet(depth, widen_factor, linear_outputs=None)
        if centers is None:
            centers = mmc_centers(info.num_classes, self.f.last_dim)
        if tuple(centers.shape) != (info.num_classes, self.f.last_dim):
            raise CheckpointError(f"GMMC centres of shape {tuple(centers.shape)} do not fit {info.num_classes} classes "
                                  f"of {self.f.last_dim}-d features")
        # Not part of the state dict: the official file keeps them in the pickled LDALayer.
        self.register_buffer("centers", centers.float().clone(), persistent=False)
        # The file's replay buffer: images (read when sampled) and their labels, on the CPU.
        self.replay_source: tuple[ReplayImages, Tensor] | None = None
        self.sample_config = GMMC_SGLD
        self.sample_gamma = GMMC_SAMPLE_GAMMA

    def features(self, x: Tensor) -> Tensor:
        return self.f((x - 0.5) / 0.5)

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        return -0.5 * (self.features(x)[:, None, :] - self.centers[None]).pow(2).sum(-1)

    def _energy(self, x: Tensor, sigma: Tensor) -> Tensor:
        return -torch.logsumexp(self._logits(x, sigma), dim=1)

    @property
    def replay_buffer(self) -> tuple[Tensor, Tensor] | None:
        """([0, 1] images, labels) of the file's replay buffer (None without one); reading checks it is finite."""
        return None if self.replay_source is None else (self.replay_source[0].images(), self.replay_source[1])

    def _sample(self, n: int, y: Tensor | None, generator: torch.Generator | None) -> Tensor:
        start, labels = self._chain_starts(n, y, generator)
        jitter = self.sample_gamma * torch.randn(n, self.centers.shape[1], generator=generator)
        target = self.centers[labels.to(self.device)] + jitter.to(self.device)

        def energy(v: Tensor) -> Tensor:  # P_X_y: ½‖φ − μ_y‖², averaged over the official batch
            return 0.5 * (self.features(v) - target).pow(2).sum(1) / OFFICIAL_BATCH

        return sgld(energy, start.to(self.device), self.sample_config, generator)

    def _chain_starts(self, n: int, y: Tensor | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Official sample_p_0: class-y chains from buffer slots y·(N/C) + i, else random slots and their labels."""
        buffer = self.replay_buffer
        if buffer is None:
            labels = y.cpu() if y is not None else torch.randint(0, self.num_classes, (n,), generator=generator)
            return uniform_noise(n, self.input_shape, generator), labels
        images, buffer_labels = buffer
        if y is None:
            index = torch.randint(0, len(images), (n,), generator=generator)
            return images[index].clone(), buffer_labels[index].clone()
        per_class = len(images) // self.num_classes
        index = y.cpu() * per_class + torch.randint(0, per_class, (n,), generator=generator)
        return images[index].clone(), y.cpu()


def build_gmmc(info: DatasetInfo) -> OfficialGMMC:
    """The published configuration, WRN-28-10 with the Max-Mahalanobis centres (C = 10), random weights."""
    require_dataset("GMMC", info, DATASETS)
    return OfficialGMMC(info)


def load_gmmc(info: DatasetInfo, path: str | Path, allow_unsafe_pickle: bool = False) -> OfficialGMMC:
    """GMMC's file as train_gmmc.py writes it; the WRN's size is read from its shapes."""
    require_dataset("GMMC", info, DATASETS)
    loaded = read_official_file(path, allow_unsafe_pickle, FORMAT)
    state = official_state_dict(loaded, path, FORMAT)
    if "f.layer1.0.conv1.weight" not in state:
        with torch.device("meta"):
            published = OfficialGMMC(info)
        load_into(published, state, str(path), FORMAT, optional=BATCHNORM_STEPS)
    depth, widen_factor, linear_outputs = wrn_size(state)
    if linear_outputs is not None:
        raise CheckpointError(f"checkpoint {path} has f.linear.* (JEM's Wide ResNet); GMMC's has none. Is it a JEM "
                              f"checkpoint? Load it with the model 'jem'.")
    margin = loaded.get("margin")
    if isinstance(margin, PickledLDALayer):
        centers = margin.centers
        require_classes(path, "margin.centers", int(centers.shape[0]), info)
        classes, dim = (int(d) for d in centers.shape)
        if classes > dim or not torch.allclose(centers.float(), mmc_centers(classes, dim), atol=1e-4):
            logger.info("%s: the file's centres are not the Max-Mahalanobis centres with C = %g (trained with another "
                        "--method or --mu_c); the file's centres are used", path, MU_C)
    elif margin is None:
        centers = mmc_centers(info.num_classes, 64 * widen_factor)
        logger.warning("%s has no 'margin' (GMMC's pickled LDALayer); using the Max-Mahalanobis centres recomputed "
                       "with C = %g, as train_gmmc.py initialises them", path, MU_C)
    else:
        raise CheckpointError(f"checkpoint {path}: 'margin' is a {type(margin).__name__}; expected {FORMAT}")
    model = OfficialGMMC(info, depth, widen_factor, centers)
    load_into(model, state, str(path), FORMAT, optional=BATCHNORM_STEPS)
    buffer = loaded.get("replay_buffer")
    if buffer is not None:
        model.replay_source = replay_with_labels(buffer, path, model)
    return model.eval()  # as create_model: a direct caller must not get BatchNorm on batch statistics


def replay_with_labels(buffer: Any, path: str | Path, model: OfficialGMMC) -> tuple[ReplayImages, Tensor]:
    """GMMC's [x, y] replay buffer: x as `ReplayImages`, y one integer label in [0, C) per image."""
    if not isinstance(buffer, (list, tuple)) or len(buffer) != 2:
        raise CheckpointError(f"checkpoint {path}: 'replay_buffer' is a {type(buffer).__name__}; expected [x, y] "
                              f"(GMMC's images and their labels)")
    images = ReplayImages(buffer[0], path, model.input_shape, where="replay_buffer[0]")
    labels = buffer[1]
    if not isinstance(labels, Tensor) or labels.is_floating_point() or tuple(labels.shape) != (len(images),) \
            or bool(((labels < 0) | (labels >= model.num_classes)).any()):
        raise CheckpointError(f"checkpoint {path}: 'replay_buffer[1]' must hold {len(images)} integer labels in "
                              f"[0, {model.num_classes}), one per image of replay_buffer[0]")
    return images, labels.long()
