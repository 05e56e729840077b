"""One shape for every evaluation: resolve (model, weights, data, device) → a prepared job → run().

Every entry point, in Python and on the command line, takes the options of
`JobOptions` under the same names: `evaluate_attack`, `certify`, `predict`,
`evaluate_denoising`, `sample`, `counterfactual` and `run_benchmark` accept
them as keywords, and the commands `run`, `certify`, `predict`, `denoise`,
`sample`, `counterfactual` and `benchmark` as flags (`robusteval.cli` builds
the flags from the fields below). `resolve` turns them into a model on its
device and a data set, with the same checks and the same messages for every
evaluation. An engine then builds a `Job`: a frozen configuration, its hash
and default run directory, and `run()`.

To add an option to every evaluation command and API entry point, add a
field to `JobOptions` (with its `cli` metadata); read it where it acts. The
entry points' signatures and docstrings list it by themselves (`shows_keywords`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import torch
from torch import Tensor

from robusteval.core.determinism import set_deterministic
from robusteval.core.devices import resolve_device
from robusteval.core.errors import UsageError
from robusteval.core.fingerprints import files_fingerprints, weights_fingerprint
from robusteval.core.interface import JointModel, validate_images
from robusteval.core.names import resolve_name
from robusteval.core.preflight import check_data_fits_model
from robusteval.data import ImageDataset, dataset_info, load_dataset
from robusteval.data.imagenet import DEFAULT_PREPROCESSING, PREPROCESSINGS, crop_size
from robusteval.data.loading import check_every, every_nth
from robusteval.model_zoo.factory import (
    checkpoint_dataset_info,
    create_model,
    get_entry,
)
from robusteval.model_zoo.official import official_architecture
from robusteval.model_zoo.paired import PairedDenoiser
from robusteval.model_zoo.user_models import (
    build_factory_model,
    is_factory_reference,
    parse_model_kwargs,
)
from robusteval.runs import RunDirectory, config_id, default_run_dir
from robusteval.runs.shards import Shard, with_shard


@dataclass(frozen=True)
class CliFlag:
    """How a `JobOptions` field appears on the command line (robusteval.cli turns it into a click option)."""

    name: str
    help: str
    kind: str = "text"  # text | dir (an existing-or-not directory) | file (an existing file) | flag | switch (--x/--no-x)
    default: Any = None


def _option(default: Any, flag: CliFlag) -> Any:
    return field(default=default, metadata={"cli": flag})


@dataclass(frozen=True)
class JobOptions:
    """What every evaluation takes besides its own settings: where the model, weights and data come from."""

    dataset: Any = _option("digits", CliFlag(
        "--dataset", "Data set (name or .npz path); its test split is evaluated.", default="digits"))
    data_dir: str | Path | None = _option(None, CliFlag(
        "--data-dir", "Directory with the data set's files (mnist, fashion-mnist, cifar10); never downloaded.",
        kind="dir"))
    checkpoint: str | Path | None = _option(None, CliFlag(
        "--checkpoint", "Load these weights (.safetensors, or .pt read with weights_only) instead of the shipped "
                        "ones.", kind="file"))
    model_dir: str | Path | None = _option(None, CliFlag(
        "--model-dir", "Weights directory for robustbench:<Name> models.", kind="dir"))
    allow_unsafe_pickle: bool = _option(False, CliFlag(
        "--allow-unsafe-pickle", "Allow arbitrary unpickling of a .pt checkpoint (only for files you trust).",
        kind="flag", default=False))
    # The official files' companions (issue 13): what an official egc / jdm --checkpoint needs beside itself.
    vae: str | Path | None = _option(None, CliFlag(
        "--vae", "egc: the autoencoder's file (autoencoder_kl.pth, or latent diffusion's KL-f8 model.ckpt) "
                 "for --checkpoint.", kind="file"))
    model_config: str | Path | None = _option(None, CliFlag(
        "--model-config", "JSON of the official training flags, for what a jdm/egc --checkpoint's shapes cannot "
                          "tell (e.g. num_heads, diffusion_steps); jdm: preset:cifar10 (1,000 steps) or "
                          "preset:fashion-mnist (500), the published commands'."))
    # A user's --model package.module:factory is called with these (robusteval.model_zoo.user_models).
    model_kwargs: str | Mapping[str, Any] | None = _option(None, CliFlag(
        "--model-kwargs", "JSON object of keyword arguments for a --model package.module:factory, e.g. "
                          "'{\"width\": 64}'."))
    # ImageNet's preprocessing (robusteval.data.imagenet.PREPROCESSINGS); None: the model's paper's (egc:
    # Res256Crop256, dmae: BicubicRes256Crop224), else RobustBench's Res256Crop224. Recorded in the run's
    # configuration.
    preprocessing: str | None = _option(None, CliFlag(
        "--preprocessing", "imagenet: Res256Crop224 (RobustBench's default), Crop288, BicubicRes256Crop224 "
                           "(DMAE's, its default for dmae) or Res256Crop256 (EGC's, its default for egc)."))
    # Every K-th test image (the papers' certify --skip / --sample_interval); recorded in the configuration when
    # above 1. run, certify and predict take it (the jobs that record it); the papers suite sets each claim's.
    every: int = _option(1, CliFlag(
        "--every", "Evaluate every K-th test image (0, K, 2K, ...: Cohen et al.'s certify --skip 100 and DMAE's "
                   "--sample_interval 50 on ImageNet, which then takes all validation images in the sorted "
                   "ImageFolder order, not RobustBench's list); --n / --n-images count the images taken.",
        default=1))
    # None: 'auto' for a registered name (CUDA when present); a JointModel instance stays where it is.
    device: str | torch.device | None = _option(None, CliFlag(
        "--device", "auto (CUDA when present), cpu, cuda or cuda:N.", default="auto"))
    # "I/N": shard I of N of the run (robusteval.runs.shards); run, certify, predict and benchmark take it.
    shard: str | Shard | None = _option(None, CliFlag(
        "--shard", "Run only shard I of N (I/N, e.g. 2/4): a contiguous part of the images cut at whole batches; "
                   "`robusteval merge` joins the shards into the unsharded run. benchmark: part I of N of the "
                   "suite's runs."))
    # None: the command's default (on for benchmark, off for single evaluations).
    deterministic: bool | None = _option(None, CliFlag(
        "--deterministic", "Deterministic GPU algorithms and no TF32 (slower on a GPU; CPU results are the same "
                           "either way). Default: on for benchmark, off otherwise.", kind="switch"))
    # Any denoiser before any classifier (issue 27; robusteval.model_zoo.paired): a registered name, or a
    # JointModel with `denoise` in Python.
    denoiser: Any = _option(None, CliFlag(
        "--denoiser", "Purify with this model's denoiser instead of --model's own (denoise defenses of run, "
                      "--mode denoised of certify and predict); --model classifies. Shapes and data sets must "
                      "agree."))
    denoiser_checkpoint: str | Path | None = _option(None, CliFlag(
        "--denoiser-checkpoint", "Weights for --denoiser (.safetensors, or .pt read with weights_only) instead of "
                                 "its shipped ones.", kind="file"))

    @classmethod
    def of(cls, dataset: Any, options: Mapping[str, Any]) -> JobOptions:
        """The options of an entry point called with `dataset` and keyword `options`."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"unexpected keyword(s) {', '.join(unknown)}; the options every evaluation takes are "
                            f"{', '.join(known)}")
        return cls(dataset=dataset, **options)

    def as_config(self) -> dict[str, str | None]:
        """Where other weights came from, for a run's configuration (None: not given).

        The companions appear only when given, so the configurations (and run directories) of other runs keep
        their hash.
        """
        return {"checkpoint": _text(self.checkpoint), "model_dir": _text(self.model_dir),
                **{k: str(v) for k, v in self.official_files().items()}}

    def file_fingerprints(self) -> dict[str, str] | None:
        """{option: fingerprint} of the files given (--checkpoint, --vae, --model-config); None when none was.

        A run records them beside the weights' fingerprint, so that another file behind the same path is a
        mismatch on resume and merge, also where the file does not change the weights (--model-config).
        """
        given = files_fingerprints({"checkpoint": self.checkpoint, **self.official_files()})
        return given or None

    def official_files(self) -> dict[str, str | Path]:
        """The create_model keywords of the given companions (none when absent, so other models are unaffected)."""
        return {k: v for k, v in (("vae", self.vae), ("model_config", self.model_config)) if v is not None}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def split_keywords(keywords: Mapping[str, Any], settings: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keywords of an entry point split into its own settings (fields of the `settings` dataclass) and the rest."""
    own = {f.name for f in dataclasses.fields(settings)}
    return ({k: v for k, v in keywords.items() if k in own}, {k: v for k, v in keywords.items() if k not in own})


@dataclass(frozen=True)
class Resolved:
    """A model on its device and the data set it is evaluated on."""

    model: JointModel
    model_name: str
    data: ImageDataset | None  # None when the job needs no images (sampling)
    dataset_name: str
    device: torch.device
    options: JobOptions
    # Where a --model package.module:factory came from (factory, file, sha256, kwargs); None for other models.
    model_source: dict[str, Any] | None = None
    preprocessing: str | None = None  # ImageNet's preprocessing (None for the other data sets)
    # What the configuration records of a --denoiser (name, checkpoint, weight fingerprint); empty without one.
    denoiser_config: Mapping[str, str] = field(default_factory=dict)

    def recorded(self) -> dict[str, Any]:
        """What a run's configuration records besides its settings, each only where it applies: the official
        files' companions as given, or what a loader assumed for one not given (a jdm file's diffusion steps
        and schedule); where a --model package.module:factory came from; ImageNet's preprocessing and image
        order (a subset depends on it); a --denoiser in front of the model's classifier."""
        companions: dict[str, Any] = {k: str(v) for k, v in self.options.official_files().items()}
        assumed = getattr(self.model, "assumed_config", None)
        if assumed and "model_config" not in companions:
            companions["model_config"] = "assumed " + json.dumps(assumed, sort_keys=True)
        extra = {"model_source": self.model_source, "preprocessing": self.preprocessing,
                 "image_order": getattr(self.data, "order", None),
                 "every": self.options.every if self.options.every != 1 else None}
        return {**companions, **{k: v for k, v in extra.items() if v is not None}, **self.denoiser_config}


def resolve_data(dataset: Any, data_dir: str | Path | None = None, limit: int | None = None,
                 preprocessing: str | None = None, every: int = 1) -> ImageDataset:
    """The test split of a data set name or .npz path, an ImageDataset as is, or an (x, y) pair of tensors.

    `every`: every `every`-th image only (see `load_dataset`). `limit`: a named data set reads only the first
    `limit` of those (ImageNet decodes them one by one); the other forms are returned whole.
    """
    check_every(every)
    if isinstance(dataset, (str, Path)):
        return load_dataset(str(dataset), "test", root=data_dir, limit=limit, preprocessing=preprocessing,
                            every=every)
    if preprocessing is not None:
        raise UsageError("--preprocessing applies to imagenet given by name")
    if isinstance(dataset, ImageDataset):
        return every_nth(dataset, every)
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        x, y = dataset
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise UsageError("a data set given as a pair must be two tensors (x, y)")
        if x.dim() != 4:
            raise UsageError(f"x must be a (N, C, H, W) batch of images, got shape {tuple(x.shape)}")
        validate_images(x, tuple(x.shape[1:]), what="x")
        if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
            raise UsageError(f"y must be {x.shape[0]} integer labels, got shape {tuple(y.shape)} and dtype {y.dtype}")
        classes = tuple(str(c) for c in range(int(y.max()) + 1 if y.numel() else 0))
        return every_nth(ImageDataset("custom", "test", x.detach().to(torch.float32).cpu(),
                                      y.detach().to(torch.long).cpu(), classes), every)
    raise UsageError(f"the data set must be a name, an .npz path, an ImageDataset or a pair (x, y) of tensors, "
                     f"got {type(dataset).__name__}")


def resolve(model: JointModel | str, options: JobOptions, *, threat_model: str = "Linf",
            load_data: bool = True, limit: int | None = None, shardable: bool = False,
            uses_denoiser: bool = False) -> Resolved:
    """The model (built with its weights, on its device) and the data of a job, checked against each other.

    `limit`: how many leading test images the job needs at most (None: all), so only those are read.
    `shardable`: the job can run one shard of its images (`options.shard`); other jobs refuse a shard.
    `uses_denoiser`: the job purifies with the model's denoiser, so `options.denoiser` may replace it (the
    model is then a `PairedDenoiser`); other jobs refuse a denoiser.
    """
    if options.shard is not None and not shardable:
        raise UsageError("--shard applies to run, certify, predict and benchmark only")
    if options.every != 1 and not shardable:  # the jobs that record it: a denoise or sample run would not say
        raise UsageError("--every applies to run, certify and predict only")
    _check_denoiser_options(options, uses_denoiser)
    Shard.parse(options.shard)  # a malformed shard stops here, before the model is built
    preprocessing = preprocessing_for(model, options)
    data = resolve_data(options.dataset, options.data_dir, limit, preprocessing, options.every) if load_data else None
    if data is None and not isinstance(options.dataset, (str, Path)):
        raise UsageError("without images to evaluate, the data set must be given by name")
    # A named data set builds the model for that name (an .npz path reads its shape from the file).
    dataset_name = str(options.dataset) if isinstance(options.dataset, (str, Path)) else data.name
    set_deterministic(bool(options.deterministic))  # before the model is built or run
    source = None
    if options.model_kwargs is not None and not (isinstance(model, str) and is_factory_reference(model)):
        raise UsageError("--model-kwargs applies to a --model package.module:factory only")
    if isinstance(model, str) and is_factory_reference(model):
        if options.checkpoint is not None or options.model_dir is not None or options.official_files():
            raise UsageError("--checkpoint, --model-dir, --vae and --model-config load weights for a registered "
                             "model name; a --model package.module:factory loads its own weights")
        device = resolve_device(options.device or "auto")
        shape, classes = _data_shape(data, dataset_name)
        made = build_factory_model(model, parse_model_kwargs(options.model_kwargs), classes, shape, device)
        built, name, source = made.model, made.model.name, made.source
    elif isinstance(model, str):
        device = resolve_device(options.device or "auto")
        size = {"image_size": crop_size(preprocessing)} if _is_imagenet(options.dataset) else {}
        built = create_model(model, dataset=dataset_name, device=device, checkpoint=options.checkpoint,
                             model_dir=options.model_dir, threat_model=threat_model,
                             allow_unsafe_pickle=options.allow_unsafe_pickle, **options.official_files(), **size)
        name = model
    elif isinstance(model, JointModel):
        if options.checkpoint is not None or options.model_dir is not None or options.official_files():
            raise UsageError("checkpoint, model_dir, vae and model_config load weights for a registered model name; "
                             "load them into your JointModel yourself")
        device = resolve_device(options.device) if options.device is not None else model.device
        built, name = model.to(device), model.name
    else:
        raise UsageError(f"model must be a JointModel (use robusteval.wrap for a plain nn.Module) or a registered "
                         f"name, got {type(model).__name__}")
    denoiser_config: dict[str, str] = {}
    if options.denoiser is not None:
        built, denoiser_config = _paired(built, options, dataset_name, device, threat_model)
    if data is not None:
        _check_fit(built, name, data)
    return Resolved(built, name, data, dataset_name, device, options, source,
                    preprocessing if _is_imagenet(options.dataset) else None, denoiser_config)


def _is_imagenet(dataset: Any) -> bool:
    return isinstance(dataset, str) and dataset.lower() == "imagenet"


def preprocessing_for(model: JointModel | str, options: JobOptions) -> str | None:
    """ImageNet's preprocessing: the option, else the model's paper's, else RobustBench's default.

    Other data sets: the option as given (their loader refuses one).
    """
    if not _is_imagenet(options.dataset):
        return options.preprocessing
    if options.preprocessing is not None:
        return resolve_name(options.preprocessing, PREPROCESSINGS, "imagenet preprocessing")
    if isinstance(model, str) and not is_factory_reference(model) and not model.startswith("robustbench:"):
        spec = official_architecture(get_entry(model).card.name, "imagenet")
        if spec is not None and spec.imagenet_preprocessing is not None:
            return spec.imagenet_preprocessing
    return DEFAULT_PREPROCESSING


def _data_shape(data: ImageDataset | None, dataset_name: str) -> tuple[tuple[int, int, int], int]:
    """The image shape and number of classes a user's plain classifier is wrapped with: the data set's."""
    if data is not None:
        return data.input_shape, max(len(data.classes), int(data.y.max()) + 1 if len(data) else 0)
    info = dataset_info(dataset_name)
    return info.input_shape, info.num_classes



def _check_denoiser_options(options: JobOptions, uses_denoiser: bool) -> None:
    if options.denoiser_checkpoint is not None and options.denoiser is None:
        raise UsageError("--denoiser-checkpoint loads weights for --denoiser NAME, which is not given")
    if options.denoiser is not None and not uses_denoiser:
        raise UsageError("--denoiser applies to run with a denoise defense and to certify/predict --mode denoised "
                         "(the jobs that purify with a denoiser)")


def _paired(classifier: JointModel, options: JobOptions, dataset_name: str, device: torch.device,
            threat_model: str) -> tuple[JointModel, dict[str, str]]:
    """The classifier behind the --denoiser's denoiser, and what the configuration records of the denoiser.

    Refused (one line) when the denoiser has no `denoise`, another input shape, or weights trained on another
    data set than the classifier's.
    """
    denoiser = options.denoiser
    if isinstance(denoiser, str):
        built = create_model(denoiser, dataset=dataset_name, device=device, checkpoint=options.denoiser_checkpoint,
                             threat_model=threat_model, allow_unsafe_pickle=options.allow_unsafe_pickle)
        mine = checkpoint_dataset_info(options.denoiser_checkpoint) if options.denoiser_checkpoint else None
        theirs = checkpoint_dataset_info(options.checkpoint) if options.checkpoint else None
        denoiser_data = mine.name if mine is not None else dataset_name
        classifier_data = theirs.name if theirs is not None else dataset_name
        if denoiser_data != classifier_data:
            raise UsageError(f"--denoiser {denoiser} was trained on {denoiser_data} but --model {classifier.name} "
                             f"on {classifier_data}: the two must agree")
        name = denoiser
    elif isinstance(denoiser, JointModel):
        if options.denoiser_checkpoint is not None:
            raise UsageError("denoiser_checkpoint loads weights for a registered denoiser name; load them into "
                             "your JointModel yourself")
        built, name = denoiser.to(device).eval(), denoiser.name
    else:
        raise UsageError(f"denoiser must be a registered model name or a JointModel, got {type(denoiser).__name__}")
    paired = PairedDenoiser(classifier, built)
    config = {"denoiser": name, "denoiser_fingerprint": weights_fingerprint(built)}
    if options.denoiser_checkpoint is not None:
        config["denoiser_checkpoint"] = str(options.denoiser_checkpoint)
    return paired, config


def _check_fit(model: JointModel, name: str, data: ImageDataset) -> None:
    # The model's shape and classes (a checkpoint's own data set fixes them), never the data's largest label.
    check_data_fits_model(name, model.input_shape, model.num_classes, data.x, data.y,
                          data_name=f"data set '{data.name}'")


class Job:
    """A prepared evaluation: a frozen configuration (what identifies it on disk), its hash and `run()`.

    Subclasses set `config` (via `_freeze`) and `name_parts`, and implement `run(out, resume, progress)`.
    """

    config: Mapping[str, Any]
    name_parts: tuple[str, ...]
    shard: Shard | None = None  # the part of the run's batches this job computes (None: all)

    def _freeze(self, config: dict[str, Any], shard: Shard | str | None = None) -> None:
        """Fix the configuration; a shard is recorded in it, so each shard is its own run directory."""
        self.shard = Shard.parse(shard)
        self.config = MappingProxyType(with_shard(dict(config), self.shard))

    @property
    def config_hash(self) -> str:
        """The short hash of the configuration that names the default run directory."""
        return config_id(dict(self.config))

    def default_run_dir(self, root: str | Path = "runs") -> Path:
        """runs/<readable parts>-<config hash>: the same command maps to the same directory, so it resumes.

        A shard's directory is the unsharded run's with -shard<I>of<N> appended (see `Shard.run_dir`).
        """
        if self.shard is not None:
            unsharded = {k: v for k, v in self.config.items() if k != "shard"}
            return self.shard.run_dir(default_run_dir(unsharded, self.name_parts, root=root))
        return default_run_dir(dict(self.config), self.name_parts, root=root)

    def open_run(self, out: str | Path | RunDirectory | None, resume: bool = True, wait: bool = False,
                 on_wait: Callable[[str], None] | None = None) -> RunDirectory | None:
        """The run directory at `out` opened (and locked) for this configuration (None: the job runs in memory).

        Another process writing there makes this a RunDirectoryBusy, or a wait with `wait=True`.
        """
        if out is None or isinstance(out, RunDirectory):
            return out
        return RunDirectory(out, dict(self.config), resume=resume, wait=wait, on_wait=on_wait)

    @contextlib.contextmanager
    def opened_run(self, out: str | Path | RunDirectory | None, resume: bool = True, wait: bool = False,
                   on_wait: Callable[[str], None] | None = None) -> Iterator[RunDirectory | None]:
        """`open_run` for the length of a block: a directory opened here is closed (its lock released) at the
        end; one passed in as a RunDirectory stays open, its caller's to close."""
        run_dir = self.open_run(out, resume, wait=wait, on_wait=on_wait)
        try:
            yield run_dir
        finally:
            if run_dir is not None and run_dir is not out:
                run_dir.close()

    def run(self, out: str | Path | RunDirectory | None = None, resume: bool = True, progress: bool = False) -> Any:
        raise NotImplementedError


# --- signatures that show every keyword --------------------------------------------------------------------
_Function = TypeVar("_Function", bound=Callable[..., Any])


def keyword_parameters(source: Callable[..., Any] | type) -> list[inspect.Parameter]:
    """The keywords a source takes: a dataclass's fields (with their defaults), or a function's keyword-only
    parameters."""
    if dataclasses.is_dataclass(source):
        return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=_field_default(f),
                                  annotation=f.type) for f in dataclasses.fields(source) if f.init]
    return [p for p in inspect.signature(source).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return inspect.Parameter.empty


def shows_keywords(*sources: Callable[..., Any] | type, without: Sequence[str] = ()) -> Callable[[_Function], _Function]:
    """Decorate an entry point that passes `**keywords` on: its signature (what help(), inspect.signature and
    editors show) lists every keyword it accepts instead, and its docstring ends with them and their defaults.

    The keywords are the function's own parameters, then those of each of `sources` (`keyword_parameters`),
    then the `JobOptions` fields, each once; `without` names keywords the entry point refuses although a
    source has them. Only the documentation changes: the keywords are still checked where they are used, so an
    option still lives in one place.
    """
    def decorate(function: _Function) -> _Function:
        own = inspect.signature(function)
        parameters = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        names = {p.name for p in parameters} | set(without)
        added = []
        for parameter in [p for source in (*sources, JobOptions) for p in keyword_parameters(source)]:
            if parameter.name not in names:
                names.add(parameter.name)
                added.append(parameter)
        function.__signature__ = own.replace(parameters=parameters + added)  # type: ignore[attr-defined]
        listed = ", ".join(f"{p.name}={p.default!r}" if p.default is not inspect.Parameter.empty else p.name
                           for p in added)
        function.__doc__ = (inspect.cleandoc(function.__doc__ or "") + "\n\nEvery other keyword it takes, with its "
                            "default (generated from the settings and `robusteval.jobs.JobOptions`):\n"
                            + textwrap.fill(listed, 100, initial_indent="    ", subsequent_indent="    "))
        return function

    return decorate
