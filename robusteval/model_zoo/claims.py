"""The papers' own headline robustness claims, as data on the model cards.

A `Claim` is one figure a paper publishes: the data set, the threat model,
the budget (ε of an attack, or the L2 radius of a certificate with its σ),
the figure, where in the paper (or the official repository) it is printed,
and the protocol that produced it (attack or CERTIFY settings, number of
test points, the released checkpoint's file). A certified figure that is the
best over several σ (DMAE's tables: for each radius, the best of three
classifiers, each fine-tuned at its own σ) is one claim with its σ set and a
file per σ. Only figures read in the
paper or its official repository are recorded; a system whose figures
could not be confirmed has no claim rather than a guessed one.

The papers suite (`robusteval.papers`) measures each claim under the
paper's own protocol and robusteval's adaptive evaluation; the RobustBench
export fills `reported` from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# How close a budget must be to the claim's (ε typed as 0.031373 is the paper's 8/255).
BUDGET_TOLERANCE = 1e-4


@dataclass(frozen=True)
class PaperProtocol:
    """How the paper measured the figure.

    attack: the paper's attack for an empirical claim ("certify" for a certificate); n_images: its test
    points (None: the whole test split), taken every `skip`-th image as the official script does; n0, n, alpha:
    CERTIFY's draws and level; checkpoint: the released file, relative to the folder its archive unpacks into.
    For a claim over several σ the path holds "{sigma}" (one file per σ); a "*" in its file name stands for
    the training's epoch, and the highest-numbered file is taken (the last checkpoint-<epoch>.pth it wrote).
    """

    attack: str
    checkpoint: str
    n_images: int | None = None
    skip: int = 1
    n0: int | None = None
    n: int | None = None
    alpha: float | None = None
    steps: int | None = None

    def checkpoint_for(self, sigma: float | None) -> str:
        """The file of the classifier for noise level `sigma` ("{sigma}" written as 0.25, 0.50, 1.00)."""
        return self.checkpoint if sigma is None else self.checkpoint.replace("{sigma}", f"{sigma:.2f}")


@dataclass(frozen=True)
class Claim:
    """One published robustness figure.

    threat_model: "Linf" or "L2" for an empirical robust accuracy at ε = budget, "L2-certified" for a
    randomized-smoothing certified accuracy at L2 radius `budget` with noise `sigma`, or, with `sigmas`
    instead, the best certified accuracy at that radius over the classifiers of those σ (each its own file).
    robust_accuracy: the figure as a fraction (0.49 for 49%). source: where it is printed.
    defense: the pipeline the paper evaluates, in robusteval's defense syntax ("none": the bare model).
    variant: which of the paper's models ("ViT-B"), where its table has several.
    """

    dataset: str
    threat_model: str
    budget: float
    robust_accuracy: float
    source: str
    protocol: PaperProtocol
    sigma: float | None = None
    sigmas: tuple[float, ...] = ()
    defense: str = "none"
    variant: str = ""
    clean_accuracy: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.threat_model not in ("Linf", "L2", "L2-certified"):
            raise ValueError(f"claim threat model must be Linf, L2 or L2-certified, got {self.threat_model!r}")
        if not 0.0 <= self.robust_accuracy <= 1.0:
            raise ValueError(f"a claim's robust_accuracy is a fraction in [0, 1], got {self.robust_accuracy}")
        if (self.threat_model == "L2-certified") != (self.sigma is not None or bool(self.sigmas)):
            raise ValueError("a certified claim needs its sigma, and only a certified claim has one")
        if self.sigma is not None and self.sigmas:
            raise ValueError("a claim has one sigma or a set of sigmas (the best over them), not both")
        if self.sigmas and (len(self.sigmas) < 2 or min(self.sigmas) <= 0
                            or list(self.sigmas) != sorted(set(self.sigmas))):
            raise ValueError(f"a claim's sigmas are two or more increasing noise levels > 0, got {self.sigmas}")
        if self.sigmas and "{sigma}" not in self.protocol.checkpoint:
            raise ValueError("a claim over several sigmas names one file per sigma: its checkpoint holds {sigma}")

    @property
    def certified(self) -> bool:
        return self.threat_model == "L2-certified"

    @property
    def noise_levels(self) -> tuple[float, ...]:
        """The σ of each classifier a certified claim is measured on (one, or the set it is the best over)."""
        return (self.sigma,) if self.sigma is not None else self.sigmas

    @property
    def label(self) -> str:
        """'cifar10 certified L2 r=0.5 (σ=0.25)', 'imagenet ViT-L certified L2 r=1 (best of σ ∈ {0.25, 0.5, 1})'
        or 'cifar10 Linf ε=0.03137'."""
        dataset = f"{self.dataset} {self.variant}" if self.variant else self.dataset
        if self.sigmas:
            levels = ", ".join(f"{sigma:g}" for sigma in self.sigmas)
            return f"{dataset} certified L2 r={self.budget:g} (best of σ ∈ {{{levels}}})"
        if self.certified:
            return f"{dataset} certified L2 r={self.budget:g} (σ={self.sigma:g})"
        return f"{dataset} {self.threat_model} ε={self.budget:.4g}" + (
            f" ({self.defense})" if self.defense != "none" else "")

    def matches(self, *, dataset: str, threat_model: str, budget: float, defense: str = "none") -> bool:
        """Whether this claim is the paper's figure for that evaluation (budgets equal to 1e-4)."""
        return (self.dataset == dataset and self.threat_model == threat_model and self.defense == defense
                and abs(self.budget - budget) < BUDGET_TOLERANCE)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- Cohen, Rosenfeld & Kolter 2019 (locuslab/smoothing) ------------------------------------------
# The official README's tables (ImageNet: "the same data in tabular form" as the paper's plot; CIFAR-10: the
# ResNet-110 table kept in the README's source). experiments.MD certifies every 20th CIFAR-10 test image and every
# 100th ImageNet validation image (certify.py --skip 20 / --skip 100: 500 images each; the data/certify outputs
# hold idx 0, 20, ... and 0, 100, ...), with CERTIFY at n0 = 100, n = 100,000, alpha = 0.001. Each σ is its own
# released checkpoint. Where the repository's own raw outputs give another figure than the README, the claim's
# notes say which (counted here from those files: correct and radius >= r, over their rows).
_COHEN_CERTIFY = {"attack": "certify", "n0": 100, "n": 100_000, "alpha": 0.001}
_COHEN_README = "locuslab/smoothing README, {} certified-accuracy table (σ = {}, r = {})"
_COHEN_IMAGES = {"cifar10": (500, 20), "imagenet": (500, 100)}


def _cohen(dataset: str, sigma: float, radius: float, figure: float, architecture: str,
           raw: str | None = None) -> Claim:
    checkpoint = f"models/{dataset}/{architecture}/noise_{sigma:.2f}/checkpoint.pth.tar"
    n_images, skip = _COHEN_IMAGES[dataset]
    output = f"data/certify/{dataset}/{architecture}/noise_{sigma:.2f}/test/sigma_{sigma:.2f}"
    return Claim(dataset=dataset, threat_model="L2-certified", budget=radius, robust_accuracy=figure, sigma=sigma,
                 source=_COHEN_README.format("ImageNet" if dataset == "imagenet" else "CIFAR-10", f"{sigma:.2f}",
                                            f"{radius:g}")
                 + {"imagenet": "; the abstract's 49% at r = 0.5" if radius == 0.5 else "",
                    "cifar10": " (ResNet-110; kept in an HTML comment of the README)"}[dataset],
                 protocol=PaperProtocol(checkpoint=checkpoint, n_images=n_images, skip=skip, **_COHEN_CERTIFY),
                 notes=(f"the repository's raw CERTIFY output {output} gives {raw}",) if raw else ())


COHEN_CLAIMS: tuple[Claim, ...] = (
    _cohen("cifar10", 0.25, 0.25, 0.60, "resnet110"),
    _cohen("cifar10", 0.25, 0.5, 0.42, "resnet110", raw="42.8% (214 of 500)"),
    _cohen("cifar10", 0.50, 0.75, 0.31, "resnet110", raw="32.0% (160 of 500)"),
    _cohen("cifar10", 1.00, 1.0, 0.22, "resnet110", raw="21.6% (108 of 500)"),
    _cohen("imagenet", 0.25, 0.5, 0.49, "resnet50", raw="49.4% over the 427 images it holds (211 of 427)"),
    _cohen("imagenet", 0.50, 1.0, 0.38, "resnet50", raw="37.2% (186 of 500)"),
    _cohen("imagenet", 1.00, 2.0, 0.19, "resnet50", raw="19.4% (97 of 500)"),
)


# --- Wu et al. 2023, DMAE (quanlin-wu/dmae) ---------------------------------------------------------------
# The official README shows the paper's Table 1 (ImageNet) and Table 3 (CIFAR-10) as images (assets/). Each entry
# is the best certified accuracy at its radius over the classifiers fine-tuned at σ ∈ {0.25, 0.5, 1.0}
# (FINETUNE.md: certify.py's σ set when --sigma is not given; the tables' captions: the best noise level). No
# fine-tuned classifier is released, only the pre-trained DMAE-Base/-Large, so these claims are measured on the
# user's own fine-tunes, one folder per σ: the --output_dir of finetune_cifar10.py (CIFAR-10) or main_finetune.py
# (ImageNet), under <model-dir>/dmae/<dataset>/<model>/sigma_<σ>/. The protocol is the official evaluation's:
# certify_cifar10.py over the whole test set with n = 100,000 (FINETUNE.md's command), certify.py over every 50th
# ImageNet image (1,000) with its default n = 10,000; both n0 = 100, alpha = 0.001.
DMAE_SIGMAS = (0.25, 0.5, 1.0)
_DMAE_FOLDER = "dmae/{dataset}/{model}/sigma_{{sigma}}/checkpoint-*.pth"
_DMAE_AUTOCAST = ("the official certification runs the ViT under torch.cuda.amp.autocast (float16 matrix "
                  "products); robusteval certifies in float32")
_DMAE_NOTES = {
    "cifar10": (_DMAE_AUTOCAST,
                "Table 3 also lists 80.8/67.1/49.7/37.7% for a DMAE-Base whose pre-training continued on CIFAR-10 "
                "(pretrain_cifar10.py); these claims are for fine-tunes of the released DMAE-Base",
                "finetune_cifar10.py saves an epoch when its smoothed accuracy at radius 0 (100 noise draws, every "
                "10th test image) is the best so far: the last checkpoint-<epoch>.pth it writes is that epoch"),
    "imagenet": (_DMAE_AUTOCAST, "main_finetune.py writes a checkpoint-<epoch>.pth every epoch; the last one is taken",
                 "every 50th validation image (certify.py --sample_interval 50), resized bicubically to 256 and "
                 "centre-cropped to 224 (util/datasets.py)"),
}


def _dmae(dataset: str, model: str, variant: str, radius: float, figure: float) -> Claim:
    table = {"cifar10": "Table 3 (CIFAR-10)", "imagenet": "Table 1 (ImageNet)"}[dataset]
    protocol = {"cifar10": {"n_images": 10_000, "skip": 1, "n": 100_000},
                "imagenet": {"n_images": 1_000, "skip": 50, "n": 10_000}}[dataset]
    return Claim(dataset=dataset, threat_model="L2-certified", budget=radius, robust_accuracy=figure,
                 sigmas=DMAE_SIGMAS, variant=variant,
                 source=f"quanlin-wu/dmae README, the paper's {table}, DMAE {variant}, r = {radius:g} (best over σ)",
                 protocol=PaperProtocol(attack="certify", checkpoint=_DMAE_FOLDER.format(dataset=dataset, model=model),
                                        n0=100, alpha=0.001, **protocol),
                 notes=_DMAE_NOTES[dataset])


DMAE_CLAIMS: tuple[Claim, ...] = (
    *(_dmae("cifar10", "vit_base_patch16", "ViT-B", radius, figure)
      for radius, figure in zip((0.25, 0.5, 0.75, 1.0), (0.792, 0.646, 0.473, 0.361), strict=True)),
    *(_dmae("imagenet", "vit_base_patch16", "ViT-B", radius, figure)
      for radius, figure in zip((0.5, 1.0, 1.5, 2.0, 3.0), (0.696, 0.579, 0.478, 0.354, 0.225), strict=True)),
    *(_dmae("imagenet", "vit_large_patch16", "ViT-L", radius, figure)
      for radius, figure in zip((0.5, 1.0, 1.5, 2.0, 3.0), (0.736, 0.646, 0.537, 0.415, 0.275), strict=True)),
)


# --- The seed systems without a claim, and why -------------------------------------------------------
# A claim needs its figure, its threat model and budget (with σ for a certificate) and the released file it
# was measured on, all read in the paper or its official repository. Where one of them could not be read,
# the card has no claim and the reason stays here, so that the papers report can say why a system has no
# row (and the next reader knows what was already looked at).
NO_CLAIM_REASONS: dict[str, str] = {
    "gmmc": (
        "sndnyang/GMMC's README gives clean accuracy only (models A: 94.08%, B: 92.51%); the paper's "
        "robustness comparison with JEM could not be read as a figure with its ε"
    ),
    "jem": (
        "wgrathwohl/JEM's README gives the attack commands (attack_model.py, Linf and L2) but no figure; "
        "the paper shows robustness as curves, and no number stated in its text could be read"
    ),
    "egc": (
        "GuoQiushan/EGC's README gives ImageNet clean accuracy only (78.97% and 72.39%); the paper's "
        "robustness is on CIFAR-10, for which no checkpoint is released, and its figures could not be read"
    ),
    "jdm": (
        "KamilDeja/joint_diffusion's README and the paper's abstract state no robustness figure; none in the "
        "paper's body could be read"
    ),
    "cdn": (
        "the abstract (arXiv:2410.03505) says only that robustness increases over a standard classifier; no "
        "figure in the paper's body could be read, and no official repository was found"
    ),
}
