"""Building registered models: `create_model`, `list_models`, `model_card` (as timm's `_factory`).

This module imports every zoo module, so every model is registered once it
is imported; the zoo modules themselves import only the registry below.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path
from typing import Any

import torch

from robusteval.core.checkpoints import (
    CheckpointError,
    load_into,
    read_state_dict,
    safetensors_metadata,
)
from robusteval.core.devices import resolve_device
from robusteval.core.errors import UsageError
from robusteval.core.interface import JointModel
from robusteval.data import DATASETS, DatasetInfo, dataset_info
from robusteval.model_zoo import baselines, cdn, cohen, dmae, egc, gmmc, jdm, jem  # noqa: F401 (they register)
from robusteval.model_zoo.baselines import GaussianRecipe
from robusteval.model_zoo.official import (
    PAPER_DATASETS,
    OfficialArchitecture,
    official_architecture,
    official_spec,
)
from robusteval.model_zoo.registry import (
    ModelCard,
    ModelEntry,
    load_shipped_weights,
    registered,
    registered_names,
)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return [name for name in registered_names() if fnmatch.fnmatch(name, pattern)]


def smoothing_base_classifier(sigma: float, dataset: str = "digits") -> tuple[str, float]:
    """The zoo's smoothing base classifier for σ: the model trained with Gaussian augmentation (Cohen et al.'s
    recipe) at the σ nearest to `sigma` (ties: the smaller σ) among those with shipped weights for `dataset`.

    Returns (name, the σ it was trained at). On digits: `gaussian` (0.25), `gaussian-s0.12`, `gaussian-s0.5`.
    """
    trained = []
    for name in list_models():
        card = model_card(name)
        own = card.recipe.get("sigma")
        if isinstance(card.recipe, GaussianRecipe) and dataset in card.checkpoints():
            trained.append((abs(float(own) - sigma), float(own), name))
    if not trained:
        raise UsageError(f"no smoothing base classifier of the zoo has weights for data set '{dataset}'; "
                         f"pass --model")
    _, own, name = min(trained)
    return name, own


def shipped_models(dataset: str = "digits") -> list[str]:
    """The registered models with shipped weights for a data set, sorted."""
    return [name for name in list_models() if dataset in model_card(name).checkpoints()]


def get_entry(name: str) -> ModelEntry:
    """The registry entry of a model (an unknown name suggests the close matches)."""
    return registered(name)


def model_card(name: str) -> ModelCard:
    return get_entry(name).card


def checkpoint_dataset_info(checkpoint: str | Path) -> DatasetInfo | None:
    """The data set a checkpoint was trained on, from the metadata `robusteval train` writes (None if unknown)."""
    trained_on = safetensors_metadata(checkpoint).get("dataset")
    return DATASETS.get(trained_on) if trained_on else None


def create_model(
    name: str,
    dataset: str = "digits",
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    checkpoint: str | Path | None = None,
    model_dir: str | Path | None = None,
    threat_model: str = "Linf",
    allow_unsafe_pickle: bool = False,
    official: bool | None = None,
    vae: str | Path | None = None,
    model_config: str | Path | dict[str, Any] | None = None,
    image_size: int | None = None,
) -> JointModel:
    """Build a registered model for `dataset`, with its shipped (verified) weights.

    `checkpoint` loads other weights for the same architecture instead. On a
    data set for which the model has an official architecture (JEM on cifar10,
    Cohen et al.'s ResNets on imagenet, ...), `checkpoint` is a file as the
    paper's code writes it, and the network is built to the file's sizes.
    `official=None` decides by the weights: a `.safetensors` file or shipped
    weights are robusteval's own re-implementation, anything else the
    official architecture; True or False forces the choice.
    On the other data sets the official code defines (jdm on mnist and
    fashion-mnist) the official architecture is used for a non-safetensors
    `checkpoint` or `official=True`, the re-implementation otherwise.
    `vae` (egc's autoencoder file) and `model_config` (a JSON file or dict of
    the official training flags, for what a file's shapes cannot tell) go to
    the official loaders that take them (see the card's `official.options`).
    `robustbench:<Name>` builds a RobustBench zoo architecture with weights
    from `model_dir` in RobustBench's layout; it never downloads.
    `image_size`: the side of the data set's square images when a preprocessing makes it differ from the data
    set's description (ImageNet's --preprocessing: 224, 256 or 288).
    """
    target = resolve_device(device)
    if name.startswith("robustbench:"):
        # deferred: it imports robustbench
        from robusteval.model_zoo.robustbench_zoo import create_robustbench_model

        return create_robustbench_model(
            name.split(":", 1)[1], dataset=dataset, threat_model=threat_model, model_dir=model_dir,
            allow_unsafe_pickle=allow_unsafe_pickle,
        ).to(target)

    entry = get_entry(name)
    info = dataset_info(dataset)
    if image_size is not None:
        info = dataclasses.replace(info, input_shape=(info.input_shape[0], image_size, image_size))
    spec = official_architecture(entry.card.name, info.name) if official is not False else None
    if official and spec is None:
        raise UsageError(f"model '{entry.card.name}' has no official architecture for data set '{info.name}'")
    if official is None and spec is not None:
        if checkpoint is not None:
            own_weights = str(checkpoint).endswith(".safetensors")
        else:  # off the papers' data sets, only a paper's file selects the official architecture
            own_weights = (pretrained and info.name in entry.card.checkpoints()) or info.name not in PAPER_DATASETS
        spec = None if own_weights else spec
    options = {k: v for k, v in (("vae", vae), ("model_config", model_config)) if v is not None}
    if spec is not None:
        model = _create_official(spec, info, pretrained, checkpoint, allow_unsafe_pickle, options)
        model.name = entry.card.name
        return model.eval().to(target)
    if options:
        flags = " and ".join(f"--{k.replace('_', '-')}" for k in options)
        verb = "apply" if len(options) > 1 else "applies"
        raise UsageError(f"{flags} {verb} to the official architectures that take them (see the model card's "
                         f"'official' options); '{entry.card.name}' on {info.name} is robusteval's re-implementation")
    if checkpoint is not None:
        # The weights, not the data, fix the input shape and the classes: digits weights make a 1×8×8,
        # 10-class model whatever data it is then given (which the jobs check against it).
        info = checkpoint_dataset_info(checkpoint) or info
    model = entry.build(info)
    model.name = entry.card.name
    if checkpoint is not None:
        try:
            load_into(model, read_state_dict(checkpoint, allow_unsafe_pickle=allow_unsafe_pickle), str(checkpoint))
        except CheckpointError as error:
            raise _with_official_hint(error, entry.card.name, info, checkpoint) from None
    elif pretrained:
        load_shipped_weights(model, entry.card, info)
    return model.eval().to(target)


def _with_official_hint(error: CheckpointError, model: str, info: DatasetInfo,
                        checkpoint: str | Path) -> CheckpointError:
    """A re-implementation's refusal of a file, with the data sets where a paper's file would load.

    A paper's file (JEM's CCF checkpoint) given on a data set its official architecture is not defined for
    (digits) reaches robusteval's own network, whose message alone would not say why.
    """
    spec = official_spec(model)
    if spec is None or str(checkpoint).endswith(".safetensors") or info.name in spec.datasets:
        return error
    return type(error)(f"{error}. If it is the paper's file: the official '{model}' architecture that reads it is "
                       f"defined for the data sets {', '.join(spec.datasets)}, not {info.name}")


def _create_official(
    official: OfficialArchitecture, info: DatasetInfo, pretrained: bool, checkpoint: str | Path | None,
    allow_unsafe_pickle: bool, options: dict[str, Any],
) -> JointModel:
    """The paper's architecture for `info`: from its official file, or at the published size with random weights."""
    unused = sorted(set(options) - set(official.options))
    if unused:
        flags = " and ".join(f"--{k.replace('_', '-')}" for k in unused)
        raise UsageError(f"{flags}: the official '{official.model}' loader takes no such file "
                         f"(it takes: {', '.join(official.options) or 'the checkpoint only'})")
    if checkpoint is None and options:
        raise UsageError(f"{', '.join(options)} given without checkpoint: they describe how to read the official "
                         f"'{official.model}' file (CLI: --checkpoint FILE)")
    if checkpoint is not None:
        return official.load(info, Path(checkpoint), allow_unsafe_pickle, **options)
    if pretrained:
        raise CheckpointError(
            f"model '{official.model}' on {info.name} is the official architecture of {official.repository}; "
            f"robusteval ships no weights for it (nothing is downloaded). Pass the paper's file with "
            f"checkpoint=<file> (CLI: --checkpoint), or pretrained=False for random weights."
        )
    return official.build(info)
