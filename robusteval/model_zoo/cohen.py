"""Cohen et al.'s smoothing base classifier as a registered model.

On cifar10 and imagenet `create_model("cohen", ...)` builds the official
networks of locuslab/smoothing and reads their files (model_zoo/official).
On other data sets it is a ResNet-20 of the same design (Sequential of a
normalisation layer and He et al.'s CIFAR ResNet), trained as Cohen et al.
train: cross-entropy on x + N(0, σ²) without clipping.
"""

from __future__ import annotations

from robusteval.core.interface import JointModel
from robusteval.data import DatasetInfo
from robusteval.model_zoo.baselines import GaussianRecipe, train_gaussian
from robusteval.model_zoo.claims import COHEN_CLAIMS
from robusteval.model_zoo.official.cohen import build_cohen
from robusteval.model_zoo.registry import register_model


@register_model(
    "cohen",
    family="baseline",
    system="Randomized smoothing base classifier (official ResNets)",
    paper="Cohen, Rosenfeld & Kolter 2019, Certified Adversarial Robustness via Randomized Smoothing (ICML)",
    capabilities={"logits"},
    trainer=train_gaussian,
    default_epochs=60,
    recipe=GaussianRecipe(sigma=0.25),
    description="Sequential(NormalizeLayer, ResNet): the official cifar_resnet20/110 (CIFAR-10) and resnet50 "
    "(ImageNet) read from locuslab/smoothing's checkpoints; elsewhere a ResNet-20 of the same design trained "
    "on x + N(0, 0.25²). No weights are shipped.",
    claims=COHEN_CLAIMS,
)
def cohen(info: DatasetInfo) -> JointModel:
    return build_cohen(info)
