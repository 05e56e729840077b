"""robusteval: adversarial and certified robustness of joint generative-discriminative classifiers."""

from robusteval import autoattack_alias

autoattack_alias.install()

# `robusteval.certify` is the function below (the subpackage stays importable by its full path).
from robusteval.certify import certify, predict  # noqa: E402
from robusteval.attacks.evaluate import evaluate_attack  # noqa: E402
from robusteval.attacks.results import AttackResult  # noqa: E402
from robusteval.data import ImageDataset, load_dataset  # noqa: E402
from robusteval.interface import CapabilityError, JointModel, wrap  # noqa: E402
from robusteval.model_zoo.registry import create_model, list_models, model_card, register_model  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AttackResult",
    "CapabilityError",
    "ImageDataset",
    "JointModel",
    "certify",
    "create_model",
    "evaluate_attack",
    "list_models",
    "load_dataset",
    "model_card",
    "predict",
    "register_model",
    "wrap",
]
