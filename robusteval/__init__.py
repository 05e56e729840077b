"""robusteval: adversarial and certified robustness of joint generative-discriminative classifiers."""

from robusteval import autoattack_alias

autoattack_alias.install()

# The randomized-smoothing engine is the subpackage robusteval.smoothing; robusteval.certify is its function.
from robusteval.smoothing import certify, predict  # noqa: E402
from robusteval.attacks.evaluate import evaluate_attack  # noqa: E402
from robusteval.attacks.results import AttackResult  # noqa: E402
from robusteval.data import ImageDataset, load_dataset  # noqa: E402
from robusteval.denoising import evaluate_denoising  # noqa: E402
from robusteval.errors import UsageError  # noqa: E402
from robusteval.interface import CapabilityError, JointModel, wrap  # noqa: E402
from robusteval.jobs import JobOptions  # noqa: E402
from robusteval.model_zoo.registry import create_model, list_models, model_card, register_model  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AttackResult",
    "CapabilityError",
    "ImageDataset",
    "JobOptions",
    "JointModel",
    "UsageError",
    "certify",
    "create_model",
    "evaluate_attack",
    "evaluate_denoising",
    "list_models",
    "load_dataset",
    "model_card",
    "predict",
    "register_model",
    "wrap",
]
