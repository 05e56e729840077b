"""RobustBench `model_info` entries: `model_info/<dataset>/<Linf|L2>/<Name>.json`.

The fields are those of RobustBench's `ModelInfo` (robustbench/utils.py) plus
the `external` and `unreliable` keys its leaderboards read:

- accuracies are strings in percent with 2 decimals (`"59.53"`), as
  `update_json` writes them: `clean_acc`, `autoattack_acc` (AutoAttack at the
  headline ε), `external` (the best-known robust accuracy: the lowest over all
  attacks run on the system at that ε), `reported` (the paper's own figure
  from the model card's claims, empty when the card has none for this data
  set, threat model, ε and pipeline);
- `autoattack_acc` is RobustBench's rule, exactly: only the standard
  AutoAttack (`autoattack`) with its published settings (no `--steps`,
  `--step-size` or EOT) on a deterministic pipeline counts. Any other
  AutoAttack run (`autoattack-rand`, changed iterations, EOT, a randomized
  defense or model) goes under `nonstandard_autoattack_acc` with the reason
  in `nonstandard_reason` and the footnote, and `autoattack_acc` is absent;
- `eps` is a string (`"8/255"` when ε is within 1e-4 of a multiple of 1/255
  under L∞, as RobustBench writes it, so `0.031373` is `"8/255"`; else the
  number, e.g. `"0.5"`);
- `unreliable` is true when the engine's sanity checks raised flags; the
  flags go in `footnote`;
- `link`, `name`, `authors`, `venue` come from the model card's paper
  ("Authors Year, Title (Venue)"), `architecture` from the registered
  builder, `additional_data` is false for zoo models (trained on the data set's
  own training split) and null for models robusteval does not know;
- `number_forward_passes`: 1, or 2 behind a `denoise:S` defense (denoiser,
  then classifier), or K for `smooth:S:K`.

An entry is written for each data set, norm and evaluated system that has an
AutoAttack run at the headline ε; other systems are skipped with a log line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robusteval.core.atomic_files import atomic_write_json
from robusteval.core.names import UnknownNameError
from robusteval.core.vocabulary import parse_defense
from robusteval.data import dataset_info
from robusteval.model_zoo.factory import get_entry
from robusteval.reports.loading import Run
from robusteval.reports.tables import (
    format_number,
    headline_eps,
    is_autoattack,
    own_robust_accuracy,
)

logger = logging.getLogger(__name__)

_PAPER = re.compile(r"^(?P<authors>.+?)\s+(?P<year>(?:19|20)\d{2}),\s*(?P<title>.+?)\s*\((?P<venue>[^()]+)\)\s*$")
_URL = re.compile(r"https?://\S+")
# How far an ε may be from k/255 and still be RobustBench's "k/255".
EPS_TOLERANCE = 1e-4


def percent_string(fraction: float) -> str:
    """RobustBench's accuracy format: percent with 2 decimals, as a string."""
    return f"{100 * float(fraction):.2f}"


def eps_string(eps: float, norm: str) -> str:
    """RobustBench's ε format: '8/255' for L∞ multiples of 1/255, else the number."""
    steps = round(eps * 255)
    # 1e-4 in the pixel scale: the 6 or 7 digits people type (0.031373, 0.0313726) are 8/255.
    if norm == "Linf" and steps > 0 and abs(eps - steps / 255) < EPS_TOLERANCE:
        return f"{steps}/255"
    return format_number(eps)


def nonstandard_reason(run: Run) -> str | None:
    """Why an AutoAttack run's figure is not RobustBench's `autoattack_acc` (None: it is).

    RobustBench accepts the standard AutoAttack with its published settings
    on a deterministic model; its randomized version, changed iterations or
    step sizes, EOT and randomized pipelines are other evaluations.
    """
    attack = str(run.summary["attack"]).lower()
    if attack != "autoattack":
        return f"{attack} is not the standard AutoAttack"
    config = run.config
    reasons = []
    if config.get("steps") is not None:
        reasons.append(f"--steps {config['steps']} changes AutoAttack's published iterations")
    if config.get("step_size") is not None:
        reasons.append(f"--step-size {config['step_size']} changes AutoAttack's published step")
    eot = run.summary.get("eot", config.get("eot"))
    if eot not in (None, 0, 1):
        reasons.append(f"EOT {eot} is not the standard version")
    if parse_defense(run.defense).randomized:
        reasons.append(f"the defense {run.defense} is randomized")
    elif _randomized_check(run) in ("pass", "flag"):
        reasons.append("the model is randomized (AutoAttack's randomness check)")
    return "; ".join(reasons) or None


def _randomized_check(run: Run) -> str | None:
    for check in run.summary.get("checks") or ():
        if isinstance(check, dict) and check.get("check") == "randomized-without-eot":
            return str(check.get("status"))
    return None


def forward_passes(defense: str) -> int:
    """Network passes per prediction of the deployed pipeline."""
    return parse_defense(defense).forward_passes


def reported_claim(model: str, dataset: str, norm: str, eps: float, defense: str = "none") -> str:
    """The paper's own robust accuracy from the model card's claims, or "" when it has none for this case."""
    try:
        claims = get_entry(model).card.claims
    except UnknownNameError:
        return ""
    for claim in claims:
        if claim.matches(dataset=dataset, threat_model=norm, budget=eps, defense=defense):
            return percent_string(claim.robust_accuracy)
    return ""


def _card_fields(model: str, dataset: str) -> dict[str, Any]:
    try:
        entry = get_entry(model)
    except UnknownNameError:
        return {"link": "", "name": model, "authors": "", "additional_data": None, "venue": "N/A",
                "architecture": "unknown"}
    card = entry.card
    match = _PAPER.match(card.paper)
    url = _URL.search(card.paper)
    fields = {"link": url.group(0) if url else "", "name": card.system, "authors": "", "additional_data": False,
              "venue": "N/A"}
    if match:
        fields.update(name=match["title"], authors=match["authors"], venue=f"{match['venue']} {match['year']}")
    try:
        network = entry.build(dataset_info(dataset))
        parameters = sum(p.numel() for p in network.parameters())
        fields["architecture"] = f"{type(network).__name__} ({parameters / 1000:.0f}k parameters)"
    except (UnknownNameError, ValueError, RuntimeError) as error:
        logger.info("architecture of %s on %s unknown: %s", model, dataset, error)
        fields["architecture"] = card.system
    return fields


def entry_name(system: str) -> str:
    """A file name for a system: the model name, then the defense ('cdn_denoise-0.25')."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", system.replace(" + ", "_").replace(":", "-")).strip("._") or "model"


def robustbench_entries(runs: Sequence[Run],
                        eps_overrides: dict[str, float] | None = None) -> dict[Path, dict[str, Any]]:
    """Entries keyed by their relative path `model_info/<dataset>/<norm>/<Name>.json`."""
    attack_runs = [r for r in runs if r.kind == "attack"]
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in attack_runs:
        groups.setdefault((run.dataset, str(run.summary["norm"]), run.system), []).append(run)
    entries: dict[Path, dict[str, Any]] = {}
    for (dataset, norm, system), group in sorted(groups.items()):
        eps = headline_eps(dataset, norm, runs, eps_overrides)
        at_eps = [(r, r.robust_accuracy_at(eps)) for r in group]
        at_eps = [(r, p) for r, p in at_eps if p is not None]
        autoattack = [(r, p) for r, p in at_eps if is_autoattack(r)]
        if not autoattack:
            logger.warning("no RobustBench entry for %s (%s, %s): no AutoAttack run at ε = %s", system, dataset, norm,
                           format_number(eps))
            continue
        standard = [(r, p) for r, p in autoattack if nonstandard_reason(r) is None]
        # RobustBench's autoattack_acc is AutoAttack's own figure; `external` is the worst case over every attack
        # and every stage the engine added (remedies, escalation).
        aa_run, aa_point = min(standard or autoattack, key=lambda rp: float(own_robust_accuracy(rp[1])))
        best = min(float(p["robust_accuracy"]) for _, p in at_eps)
        flags = sorted({flag for r, _ in at_eps for flag in r.flags})
        footnote = [f"robusteval: {aa_run.summary['n']} test points"]
        if group[0].defense != "none":
            footnote.append(f"defense {group[0].defense}")
        figure: dict[str, Any] = {"autoattack_acc": percent_string(own_robust_accuracy(aa_point))}
        if not standard:
            reason = str(nonstandard_reason(aa_run))
            figure = {"nonstandard_autoattack_acc": figure["autoattack_acc"], "nonstandard_reason": reason}
            footnote.append(f"not RobustBench's autoattack_acc: {reason}")
            logger.warning("RobustBench entry for %s (%s, %s) has no autoattack_acc: %s", system, dataset, norm,
                           reason)
        if flags:
            footnote.append("sanity flags: " + "; ".join(flags))
        entry = {
            **_card_fields(group[0].model, dataset),
            "number_forward_passes": forward_passes(group[0].defense),
            "dataset": dataset,
            "eps": eps_string(eps, norm),
            "clean_acc": percent_string(aa_run.summary["clean_accuracy"]),
            "reported": reported_claim(group[0].model, dataset, norm, eps, group[0].defense),
            **figure,
            "external": percent_string(best),
            "unreliable": bool(flags),
            "footnote": ". ".join(footnote),
        }
        order = ["link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                 "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "nonstandard_autoattack_acc",
                 "nonstandard_reason", "external", "unreliable", "footnote"]
        entries[Path("model_info") / dataset / norm / f"{entry_name(system)}.json"] = {k: entry[k] for k in order
                                                                                     if k in entry}
    return entries


def write_robustbench(runs: Sequence[Run], out_dir: str | Path,
                      eps_overrides: dict[str, float] | None = None) -> list[Path]:
    """Write the entries under `out_dir` (atomically each); returns their paths."""
    written = []
    for relative, entry in robustbench_entries(runs, eps_overrides).items():
        path = Path(out_dir) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, entry)
        written.append(path)
    return written
