"""Model identities: the colour and marker that draw one model in every figure of every report.

A reader compares models across figures (robust accuracy, certified
accuracy, PSNR, the per-model pages) and across reports, so a model's look
must not depend on which other models a report happens to hold:

- the models of the zoo take fixed slots, in the order of `KNOWN_MODELS`;
- any other model (a user's model, `robustbench:<Name>`) takes the next free
  slots in name order: deterministic for a given set of models, with no hash
  involved, and recorded in the report's `figures/identities.json`.

Slot i is a pair (colour, marker): 12 colours (Okabe & Ito's 7 without the
yellow that vanishes on white, then 5 from Paul Tol's schemes) and 12 markers,
paired so that the first 12 slots differ in both and the first 144 slots are
distinct pairs. Line style is never part of an identity: it says what was
evaluated (pipeline, certification mode, σ).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from robusteval.core.atomic_files import atomic_write_bytes

PALETTE = (
    "#0072B2",  # blue (Okabe-Ito)
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#882255",  # wine (Tol muted)
    "#999933",  # olive
    "#332288",  # indigo
    "#661100",  # dark brown (Tol)
    "#44AA99",  # teal
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
DISTINCT_SLOTS = len(PALETTE) * len(MARKERS)

# The zoo, joint models first: the models compared most often get the most distinct colours.
KNOWN_MODELS = (
    "cdn", "egc", "jem", "gmmc", "dmae", "jdm",
    "standard", "gaussian", "gaussian-s0.12", "gaussian-s0.5", "pgd-at", "dncnn+standard",
)

# What was evaluated, drawn the same way in every figure: the attacked pipeline's kind sets the dash
# pattern and how the marker is filled (the marker's shape and colour stay the model's).
PIPELINE_KINDS = ("none", "denoise", "noise", "sgld", "smooth")
_PIPELINE_LOOK = {
    "none": ("-", "full"),
    "denoise": ("--", "none"),
    "noise": (":", "left"),
    "sgld": ((0, (5, 1.5, 1, 1.5)), "top"),
    "smooth": ("-.", "bottom"),
}
_OTHER_PIPELINE = ((0, (1, 1)), "right")
MODE_LINESTYLES = {"direct": "-", "denoised": "--"}


@dataclass(frozen=True)
class Identity:
    """How one model is drawn: its colour and marker, and the slot they come from."""

    color: str
    marker: str
    slot: int


def identity_for_slot(slot: int) -> Identity:
    """Slot i → (colour i mod 12, marker (i mod 12 + i div 12) mod 12): distinct pairs for i < 144.

    For a fixed colour r the markers of slots r, r + 12, r + 24, … are r, r + 1, r + 2, … (mod 12), so two
    slots below 144 never share both; past 144 the pairs repeat.
    """
    if slot < 0:
        raise ValueError(f"identity slot must be non-negative, got {slot}")
    cycle, colour = divmod(slot % DISTINCT_SLOTS, len(PALETTE))
    return Identity(PALETTE[colour], MARKERS[(colour + cycle) % len(MARKERS)], slot)


def model_identities(models: Iterable[str]) -> dict[str, Identity]:
    """One identity per model: zoo models at their fixed slots, the others in the next free slots by name."""
    names = sorted(set(models))
    slots = {name: KNOWN_MODELS.index(name) for name in names if name in KNOWN_MODELS}
    free = itertools.count(len(KNOWN_MODELS))
    for name in names:
        if name not in slots:
            slots[name] = next(free)
    return {name: identity_for_slot(slots[name]) for name in names}


def pipeline_kind(defense: str) -> str:
    """'denoise' for 'denoise:0.25:noise', 'none' for no defense."""
    return (defense or "none").split(":", 1)[0]


def pipeline_panel(defense: str) -> str:
    """The panel a pipeline is drawn in: its spec, except that `sgld:K:step:noise:chains` joins `sgld:K` (a
    model's own chain step and noise are part of its pipeline, as σ is a model's in certification)."""
    if pipeline_kind(defense) == "sgld":
        return ":".join(defense.split(":")[:2])
    return defense or "none"


def pipeline_look(defense: str) -> tuple[object, str]:
    """(line style, marker fill style) of an attacked pipeline."""
    return _PIPELINE_LOOK.get(pipeline_kind(defense), _OTHER_PIPELINE)


def pipeline_order(defense: str) -> tuple[int, str]:
    """Sort key: no defense first, then the known kinds in `PIPELINE_KINDS` order, then the others."""
    kind = pipeline_kind(defense)
    return (PIPELINE_KINDS.index(kind) if kind in PIPELINE_KINDS else len(PIPELINE_KINDS), defense)


def write_identities(identities: Mapping[str, Identity], path: str | Path) -> Path:
    """Record the identities of a report (model → colour, marker, slot) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "about": "colour and marker of each model in this report's figures; zoo models keep fixed slots "
                 "(robusteval.reports.styles.KNOWN_MODELS), other models take the next free slots by name",
        "models": {name: asdict(identity) for name, identity in sorted(identities.items())},
    }
    atomic_write_bytes(path, (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode())
    return path
