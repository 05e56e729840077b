"""robusteval: adversarial and certified robustness of joint generative-discriminative classifiers."""

from robusteval.core import autoattack_alias

autoattack_alias.install()

from robusteval.attacks.evaluate import evaluate_attack  # noqa: E402
from robusteval.attacks.results import AttackResult  # noqa: E402
from robusteval.core.errors import UsageError  # noqa: E402
from robusteval.core.interface import CapabilityError, JointModel, wrap  # noqa: E402
from robusteval.data import ImageDataset, load_dataset  # noqa: E402
from robusteval.generative.denoising import evaluate_denoising  # noqa: E402
from robusteval.jobs import JobOptions  # noqa: E402
from robusteval.model_zoo import create_model, list_models, model_card, register_model  # noqa: E402

# The randomized-smoothing engine is the subpackage robusteval.smoothing; robusteval.certify is its function.
from robusteval.smoothing import certify, predict  # noqa: E402

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
