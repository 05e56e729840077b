"""The official training flags a `--model-config` may give, type- and range-checked before any file is read.

The diffusion codebases (guided-diffusion, joint_diffusion, EGC) take their
configuration as command-line flags; `--model-config FILE.json` gives them
to robusteval as a JSON object. Each flag a loader reads has a kind here
(an integer >= 1, a boolean, a probability, ...); a value of another kind is
a one-line error naming the flag, never a traceback or a silent truncation
(2.7 heads read as 2). Flags the loaders accept and ignore (a pasted
training command's learning rate) are not checked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from robusteval.core.errors import UsageError
from robusteval.model_zoo.official.schedule import DiscreteSchedule

# The official flags' JSON is a few hundred bytes; a larger file is not one (e.g. /dev/zero, a checkpoint).
MAX_MODEL_CONFIG_BYTES = 16 * 1024


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value: Any, valid: Callable[[Any], bool]) -> bool:
    """A list of numbers or the official comma-separated string of them ("16,8"), each `valid`."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        return False
    try:
        parsed = [float(item) if isinstance(item, str) else item for item in items if item != ""]
    except ValueError:
        return False
    return all(valid(item) for item in parsed)


# flag -> (what it must be, test). Names as the official scripts spell them.
_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **{flag: ("an integer >= 1", lambda v: _integer(v) and v >= 1) for flag in (
        "num_channels", "num_res_blocks", "num_heads", "in_channels", "diffusion_steps", "sample_steps",
        "image_size", "autoencoder_stride")},
    **{flag: ("-1 (unset) or an integer >= 1", lambda v: _integer(v) and (v == -1 or v >= 1)) for flag in (
        "num_head_channels", "num_heads_upsample")},
    **{flag: ("true or false", lambda v: isinstance(v, bool)) for flag in (
        "use_scale_shift_norm", "resblock_updown", "use_new_attention_order", "learn_sigma", "predict_xstart",
        "rescale_timesteps", "use_ddim")},
    **{flag: ("a number in (0, 1)", lambda v: _number(v) and 0 < v < 1) for flag in ("linear_start", "linear_end")},
    "scale_factor": ("a number > 0", lambda v: _number(v) and v > 0),
    "classifier_scale": ("a finite number", _number),
    "channel_mult": ("a list (or comma-separated string) of numbers > 0",
                     lambda v: v == "" or _numbers(v, lambda m: _number(m) and m > 0)),
    "attention_resolutions": ("a list (or comma-separated string) of integers >= 1",
                              lambda v: v == "" or _numbers(v, lambda r: _number(r) and r >= 1 and r == int(r))),
    "noise_schedule": ("'linear' or 'cosine'", lambda v: v in ("linear", "cosine")),
    "pool": ("'sattn', 'attn' or 'adaptive'", lambda v: v in ("sattn", "attn", "adaptive")),
    "timestep_respacing": ("a string such as 'ddim100' or '250'", lambda v: isinstance(v, str)),
}


def read_model_config(path: str | Path) -> dict[str, Any]:
    """A JSON object of official training flags (e.g. the arguments of the training command), at most 16 KiB.

    The size is checked while reading, so a device or a huge file is refused after 16 KiB, not read to the end.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_MODEL_CONFIG_BYTES + 1)
    except OSError as error:
        raise UsageError(f"--model-config {path}: not a readable file ({error.strerror or error})") from error
    if len(text) > MAX_MODEL_CONFIG_BYTES:
        raise UsageError(f"--model-config {path}: larger than {MAX_MODEL_CONFIG_BYTES // 1024} KiB; expected a small "
                         f"JSON object of the official training flags, such as {{\"num_heads\": 4}}")
    try:
        options = json.loads(text)
    except ValueError as error:
        raise UsageError(f"--model-config {path}: not a readable JSON file ({error})") from error
    if not isinstance(options, dict):
        raise UsageError(f"--model-config {path}: expected a JSON object of the official flags, got "
                         f"{type(options).__name__}")
    return options


def model_config_options(model_config: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    """The flags of `--model-config` (a JSON file or a dict), each checked against its kind."""
    options = read_model_config(model_config) if isinstance(model_config, (str, Path)) else dict(model_config or {})
    for flag, value in options.items():
        kind = _KINDS.get(flag)
        if kind is not None and not kind[1](value):
            raise UsageError(f"--model-config: '{flag}' must be {kind[0]}, got {value!r}")
    return options


def flag_schedule(betas: np.ndarray, flags: str) -> DiscreteSchedule:
    """The schedule of β made from `flags` (described for the message), or an error naming --model-config."""
    if len(betas) and ((betas > 0) & (betas < 1)).all():
        return DiscreteSchedule(betas)
    low, high = (float(betas.min()), float(betas.max())) if len(betas) else (math.nan, math.nan)
    raise UsageError(f"--model-config: {flags} give diffusion β from {low:.4g} to {high:.4g}, outside (0, 1); "
                     f"choose another diffusion_steps")
