"""RobustBench's model zoo as JointModels: `robustbench:<Name>`.

The architecture comes from the robustbench package (its model_dicts, or
timm for the entries RobustBench itself creates through timm); the weights
come from a local directory in RobustBench's layout,

    <model_dir>/<dataset>/<threat_model>/<Name>.pt        (ensembles: <Name>.pt_m0.pt, ...)

Nothing is ever downloaded: a missing file is a CheckpointError naming the
exact path, and building an architecture whose constructor would fetch
pretrained weights over the network fails instead of connecting.

RobustBench models take [0, 1] images and normalise inside, which is the
robusteval contract, so they are wrapped as they are (capability `logits`).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robusteval.core.checkpoints import CheckpointError, load_into, read_state_dict
from robusteval.core.interface import JointModel, wrap
from robusteval.core.names import UnknownNameError, resolve_name

# RobustBench's data sets: number of classes and input shape.
DATASETS: dict[str, tuple[int, tuple[int, int, int]]] = {
    "cifar10": (10, (3, 32, 32)),
    "cifar100": (100, (3, 32, 32)),
    "imagenet": (1000, (3, 224, 224)),
}

# Training checkpoints wrap the weights: RobustBench reads 'last' when present
# (the final rather than the best epoch), then 'state_dict'.
NESTED_KEYS = ("last", "state_dict")

# Normalisation constants some architectures hold as buffers; RobustBench's
# released checkpoints of those models omit them, and the constructor's values
# are the right ones (RobustBench loads them non-strictly for this reason).
NORMALISATION_BUFFERS = frozenset({"mu", "sigma", "mean", "std"})


class _NetworkBlocked(OSError):
    pass


@contextlib.contextmanager
def _offline(what: str) -> Iterator[list[str]]:
    """Refuse every socket connection and DNS lookup of this process inside the block.

    Yields a list that records each refused attempt, so the caller can tell
    a refused download from an unrelated error (libraries often wrap the
    OSError in their own exception type).
    """
    attempts: list[str] = []
    original_connect = socket.socket.connect
    original_getaddrinfo = socket.getaddrinfo

    def refuse_connect(self: socket.socket, address: Any) -> None:
        attempts.append(str(address))
        raise _NetworkBlocked(f"robusteval does not use the network ({what} tried to connect to {address})")

    def refuse_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        attempts.append(str(host))
        raise _NetworkBlocked(f"robusteval does not use the network ({what} tried to look up {host})")

    socket.socket.connect = refuse_connect  # type: ignore[method-assign]
    socket.getaddrinfo = refuse_getaddrinfo  # type: ignore[assignment]
    try:
        yield attempts
    finally:
        socket.socket.connect = original_connect  # type: ignore[method-assign]
        socket.getaddrinfo = original_getaddrinfo


def robustbench_models(dataset: str = "cifar10", threat_model: str = "Linf") -> list[str]:
    """Names in RobustBench's zoo for a data set and threat model."""
    _, models = _zoo(dataset, threat_model)
    return list(models)


def _zoo(dataset: str, threat_model: str) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Resolve (dataset, threat model) to RobustBench's enums and its dict of model entries."""
    # deferred: installed right before robustbench is imported
    from robusteval.core import autoattack_alias

    autoattack_alias.install()  # robustbench imports `autoattack`
    # deferred: robustbench is imported only for robustbench:<Name> models
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset

    by_name = {d.value: d for d in BenchmarkDataset}
    if dataset.lower() not in by_name:
        raise UnknownNameError(
            f"RobustBench has models only for the data sets {', '.join(sorted(by_name))}; "
            f"got '{dataset}'. Pass dataset='cifar10' (CLI: --dataset cifar10) for a RobustBench model."
        )
    benchmark = by_name[dataset.lower()]
    threats = {t.value: t for t in model_dicts[benchmark]}
    # RobustBench keeps the 3D-corruption models in the `corruptions` folder.
    wanted = "corruptions" if threat_model == "corruptions_3d" else threat_model
    threat = threats[resolve_name(wanted, threats, f"RobustBench {benchmark.value} threat model")]
    return (benchmark, threat), model_dicts[benchmark][threat]


def checkpoint_paths(model_dir: str | Path, dataset: str, threat_model: str, name: str, parts: int) -> list[Path]:
    """Where RobustBench's layout keeps a model's weights (one file, or one per ensemble member)."""
    base = Path(model_dir) / dataset / threat_model / f"{name}.pt"
    if parts == 1:
        return [base]
    return [Path(f"{base}_m{i}.pt") for i in range(parts)]


def create_robustbench_model(
    name: str,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    model_dir: str | Path | None = None,
    allow_unsafe_pickle: bool = False,
) -> JointModel:
    """A RobustBench zoo model with weights from `model_dir`, as a JointModel in eval mode.

    `name` is RobustBench's name (e.g. 'Standard', 'Ding2020MMA'); an
    unknown one raises UnknownNameError with close matches. Weights are read
    from `<model_dir>/<dataset>/<threat_model>/<name>.pt` with
    `torch.load(weights_only=True)` unless `allow_unsafe_pickle=True`;
    checkpoint conventions of RobustBench (a 'state_dict' or 'last' key,
    'module.' and 'model.' prefixes, omitted normalisation buffers) are
    handled. A missing directory or file raises CheckpointError; nothing
    is downloaded.
    """
    (benchmark, threat), models = _zoo(dataset, threat_model)
    canonical = resolve_name(name, models, f"RobustBench {benchmark.value}/{threat.value} model")
    entry = models[canonical]
    num_classes, input_shape = DATASETS[benchmark.value]
    members = entry.get("gdrive_id")
    parts = len(members) if isinstance(members, list) else 1

    if model_dir is None:
        expected = checkpoint_paths("<model_dir>", benchmark.value, threat.value, canonical, parts)
        raise CheckpointError(
            f"robustbench:{canonical} needs its weights from a local directory (robusteval never downloads): "
            f"pass model_dir (CLI: --model-dir) holding {', '.join(map(str, expected))}"
        )
    paths = checkpoint_paths(model_dir, benchmark.value, threat.value, canonical, parts)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"robustbench:{canonical}: weights not found; expected {', '.join(map(str, missing))} "
            f"(RobustBench's layout <model_dir>/<dataset>/<threat_model>/<Name>.pt). robusteval never "
            f"downloads: fetch the file with RobustBench's own tools and place it there."
        )

    module = _build_architecture(canonical, entry, benchmark.value, threat.value, num_classes)
    if parts == 1:
        _load_checkpoint(module, paths[0], allow_unsafe_pickle)
    else:
        submodels = getattr(module, "models", None)
        if submodels is None or len(submodels) != parts:
            raise CheckpointError(
                f"robustbench:{canonical} is an ensemble whose members robusteval cannot map to its "
                f"{parts} checkpoint files (its architecture has no `models` list of that length)"
            )
        for member, path in zip(submodels, paths):
            _load_checkpoint(member, path, allow_unsafe_pickle)
    return wrap(module, num_classes, input_shape, name=f"robustbench:{canonical}").eval()


def _build_architecture(name: str, entry: dict[str, Any], dataset: str, threat: str, num_classes: int) -> nn.Module:
    """The untrained architecture, built the way robustbench.utils.load_model builds it, offline."""
    import timm  # deferred: timm costs ~4 s to import

    # RobustBench's own rule: when timm registers this model, load_model uses timm.
    timm_name = f"{name.lower().replace('-', '_')}_{dataset}_{threat.lower()}"
    what = f"the architecture of robustbench:{name}"
    with _offline(what) as attempts:
        try:
            if timm.is_model(timm_name):
                return timm.create_model(timm_name, num_classes=num_classes, pretrained=False)
            return entry["model"]()
        except Exception as error:  # the factory's own wrapper around the refused connection
            if attempts:
                raise CheckpointError(
                    f"{what} downloads pretrained weights while it is built (it tried to reach "
                    f"{attempts[0]}); robusteval never downloads, so this RobustBench entry is not supported"
                ) from error
            raise


def _load_checkpoint(module: nn.Module, path: Path, allow_unsafe_pickle: bool) -> None:
    state = read_state_dict(path, allow_unsafe_pickle=allow_unsafe_pickle, nested_keys=NESTED_KEYS)
    state = _align_keys(state, module)
    own = module.state_dict()
    parameters = {k for k, _ in module.named_parameters()}
    for key in set(own) - set(state):
        if key not in parameters and key.rsplit(".", 1)[-1] in NORMALISATION_BUFFERS:
            state[key] = own[key]
    load_into(module, state, str(path))


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _align_keys(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Undo DataParallel's 'module.' and wrapper 'model.' prefixes so the keys match the architecture.

    RobustBench strips 'module.' and 'model.' (and adds 'model.' back for
    ImageNet models wrapped in a normalisation layer); here the variant whose
    keys best match the architecture wins, so no model needs a special case.
    """
    state = _strip_prefix(state, "module.")
    own = set(module.state_dict())
    candidates = [
        state,
        _strip_prefix(state, "model."),
        {f"model.{k}": v for k, v in state.items()},
        {f"model.{k}": v for k, v in _strip_prefix(state, "model.").items()},
    ]
    return max(candidates, key=lambda c: len(own & set(c)))
