"""Training helpers, below the model zoo: context, recipes, the shared loops, SGLD.

Every zoo model imports from here; nothing here imports `robusteval.model_zoo`.
`robusteval.model_zoo.train_model` (the `robusteval train` command) sits above the zoo.
"""

from robusteval.training.context import TrainContext, accuracy, minibatches
from robusteval.training.recipes import DiffusionRecipe, Recipe, SGLDRecipe

__all__ = ["DiffusionRecipe", "Recipe", "SGLDRecipe", "TrainContext", "accuracy", "minibatches"]
