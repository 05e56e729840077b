"""The configurations a run directory's config.json holds: what fixes a run's results (resume compares them).

Part of the run records (`robusteval.records` re-exports them); split off to keep that module short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from robusteval.records.encoding import to_json_dict as _json

# Recorded only when there is one: the companions of an official --checkpoint
# (robusteval.jobs.JobOptions.official_files), ImageNet's image order and preprocessing (robusteval.data.imagenet),
# every K-th image taken (robusteval.jobs.JobOptions.every, when above 1),
# where a --model package.module:factory came from (robusteval.jobs.Resolved.model_source), the fingerprints
# of the files given (robusteval.core.fingerprints) and a --denoiser in front of the model's classifier
# (robusteval.jobs.Resolved.denoiser_config).
_COMPANIONS = ("vae", "model_config", "image_order", "every", "file_fingerprints", "model_source", "preprocessing",
               "denoiser", "denoiser_checkpoint", "denoiser_fingerprint")


@dataclass(frozen=True)
class AttackConfig:
    """config.json of an attack run: everything that fixes its results (what resume compares).

    Where it runs (cpu, cuda, cuda:N) is not part of it: a run moves between
    devices and resumes; each sample line records the device its batch ran on.
    """

    model: str
    checkpoint: str | None
    model_fingerprint: str
    dataset: str
    n: int
    attack: str
    norm: str
    eps: list[float]
    defense: str
    gradient: str
    eot: int
    steps: int | None
    step_size: float | None
    seed: int
    batch_size: int
    decision_draws: int
    large_eps_check: bool
    masking_checks: bool
    kind: str = "attack"
    vae: str | None = None
    model_config: str | None = None
    image_order: str | None = None
    every: int | None = None  # every K-th test image (records' indices count the images taken)
    file_fingerprints: dict[str, str] | None = None  # {option: fingerprint} of --checkpoint, --vae, --model-config
    model_source: dict[str, Any] | None = None
    preprocessing: str | None = None  # ImageNet's (robusteval.data.imagenet.PREPROCESSINGS)
    denoiser: str | None = None
    denoiser_checkpoint: str | None = None
    denoiser_fingerprint: str | None = None

    def to_json(self) -> dict[str, Any]:
        # The official files' companions are recorded only when given, so other runs keep their configuration.
        return {"kind": self.kind, **{k: v for k, v in _json(self).items()
                                      if k != "kind" and (v is not None or k not in _COMPANIONS)}}


@dataclass(frozen=True)
class SmoothingConfig:
    """config.json of a certify or predict run (the noise scheme names the generator, block layout and dtype).

    The noise is drawn on the CPU on every device (robusteval.smoothing.sampler), so the device is not
    part of it: a run moves between cpu, cuda and cuda:N and resumes.
    """

    kind: str
    model: str
    dataset: str
    mode: str
    sigma: float
    n0: int
    n: int
    alpha: float
    n_images: int
    skip: int
    seed: int
    noise: str
    # The sequential method only (n is then its budget n_max): its grid and the design fixed before any draw.
    method: str | None = None
    radii: list[float] | None = None
    n_max: int | None = None
    looks: list[int] | None = None
    confidence_sequence: str | None = None  # "betting"; runs before it was recorded used Clopper–Pearson looks
    bets: dict[str, Any] | None = None
    futility: dict[str, float] | None = None  # {"chance": δ, "alpha": γ}; absent: radii were never given up
    alpha_spent: list[float] | None = None  # the Clopper–Pearson design's α per look (older runs)
    checkpoint: str | None = None
    model_dir: str | None = None
    vae: str | None = None
    model_config: str | None = None
    image_order: str | None = None
    every: int | None = None  # every K-th test image (records' indices count the images taken)
    # The weights the records were computed with (robusteval.core.fingerprints); absent in runs made before.
    model_fingerprint: str | None = None
    file_fingerprints: dict[str, str] | None = None
    model_source: dict[str, Any] | None = None
    preprocessing: str | None = None  # ImageNet's (robusteval.data.imagenet.PREPROCESSINGS)
    denoiser: str | None = None
    denoiser_checkpoint: str | None = None
    denoiser_fingerprint: str | None = None

    # Not a field: what is written only when given (the sequential method's design, other weights).
    OPTIONAL: ClassVar[tuple[str, ...]] = ("method", "radii", "n_max", "looks", "confidence_sequence", "bets",
                                           "futility", "alpha_spent", "checkpoint", "model_dir", "model_fingerprint",
                                           *_COMPANIONS)

    def to_json(self) -> dict[str, Any]:
        # Recorded only when given, so CERTIFY runs of the shipped weights keep their configuration and hash.
        return {k: v for k, v in _json(self).items() if v is not None or k not in self.OPTIONAL}


@dataclass(frozen=True)
class DenoiseConfig:
    """config.json of a denoise run."""

    model: str
    dataset: str
    sigmas: list[float]
    n_images: int
    seed: int
    batch_size: int
    kind: str = "denoise"
    model_fingerprint: str | None = None  # absent in runs made before
    file_fingerprints: dict[str, str] | None = None
    model_source: dict[str, Any] | None = None
    preprocessing: str | None = None  # ImageNet's (robusteval.data.imagenet.PREPROCESSINGS)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: v for k, v in _json(self).items()
                                      if k != "kind" and (v is not None or k not in _COMPANIONS)}}
