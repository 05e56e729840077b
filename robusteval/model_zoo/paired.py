"""Any denoiser before any classifier: one model's denoiser paired with another model's classifier.

Carlini et al. 2023, "(Certified!!) Adversarial Robustness for Free!": an
off-the-shelf denoiser in front of an off-the-shelf classifier. `--denoiser
NAME` (robusteval.jobs) builds a `PairedDenoiser`: a JointModel whose
`denoise` is the denoiser model's and whose everything else (logits, energy,
sampling) is the classifier's. Every defense and mode that purifies with "the
model's denoiser" (`denoise:` defenses, `certify --mode denoised`) calls
`model.denoise`, so it uses the paired denoiser without knowing about it.

The two must agree on the input shape (checked here) and on the data set
(checked by the job that builds them, which knows what each was trained on).
"""

from __future__ import annotations

import torch
from torch import Tensor

from robusteval.core.errors import UsageError
from robusteval.core.interface import CapabilityError, JointModel


class PairedDenoiser(JointModel):
    """`classifier` with `denoiser`'s denoise in place of its own (σ in the [0, 1] pixel scale for both)."""

    def __init__(self, classifier: JointModel, denoiser: JointModel):
        super().__init__()
        check_pairing(classifier, denoiser)
        self.classifier = classifier
        self.denoiser = denoiser
        # The classifier names the run (its card, its σ warnings); the configuration records the denoiser apart.
        self.name = classifier.name
        self.num_classes = classifier.num_classes
        self.input_shape = classifier.input_shape
        self.capabilities = classifier.capabilities | {"denoise"}
        self.stochastic_inference = bool(classifier.stochastic_inference or denoiser.stochastic_inference)
        self.training = classifier.training

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.classifier.logits(x, sigma)

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.denoiser.denoise(x, sigma)

    def _energy(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.classifier.energy(x, sigma)

    def _sample(self, n: int, y: Tensor | None, generator: torch.Generator | None) -> Tensor:
        return self.classifier.sample(n, y, generator)


def check_pairing(classifier: JointModel, denoiser: JointModel) -> None:
    """Refuse a denoiser without `denoise` or of another input shape than the classifier (one-line errors)."""
    if "denoise" not in denoiser.capabilities:
        raise CapabilityError(denoiser.name, "denoise", denoiser.capabilities)
    if tuple(denoiser.input_shape) != tuple(classifier.input_shape):
        raise UsageError(f"--denoiser {denoiser.name} takes images of shape {tuple(denoiser.input_shape)} but "
                         f"--model {classifier.name} takes {tuple(classifier.input_shape)}: the two must agree")
