"""The model zoo: the digits models, the papers' official architectures and RobustBench's zoo.

Importing this package registers every model (`factory` imports each zoo module).
"""

from robusteval.model_zoo.factory import (
    create_model,
    get_entry,
    list_models,
    model_card,
)
from robusteval.model_zoo.registry import register_model

__all__ = ["create_model", "get_entry", "list_models", "model_card", "register_model"]
