"""`robusteval benchmark --suite papers`: each paper's own claims beside robusteval's measurements.

For every claim on a model card (`robusteval.model_zoo.claims`) the suite
looks for the released checkpoint in `--model-dir` (the path the official
archive unpacks to, with or without its leading `models/`), and evaluates it
on the paper's data set from `--data-dir`:

- under the paper's own protocol: CERTIFY with its σ, n0, n, α and number of
  images for a certified claim (for a figure that is the best over several σ,
  each σ's own file certified and the best taken at the claim's radius, with
  an interval that holds for all σ at once: `best_of`); the paper's attack at
  its ε for an empirical one;
- under AutoAttack and robusteval's adaptive evaluation: one attack run at the
  claim's budget on the deployed pipeline (the smoothed classifier
  `smooth:σ:K` under `autoattack-rand` for a certificate, the paper's
  pipeline under `autoattack` for an empirical claim, `autoattack-rand` when
  it is randomized). The run's `standard_robust_accuracy` is AutoAttack's own
  figure; its `robust_accuracy`, the worst case over everything the engine
  ran (remedies, escalation, exact and BPDA gradients), is the adaptive figure.

The report puts the claimed figure, the three measurements with 95%
Clopper–Pearson intervals and the gap (claimed minus the figure the claim
should be compared with: the certified accuracy measured under the paper's
protocol for a certificate, the adaptive robust accuracy for an empirical
claim; its interval is the claim minus the measurement's interval) side by
side. A missing checkpoint is a row that says which file was looked for;
an evaluation that fails is a row with its error; neither stops the others.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robusteval.attacks.evaluate import evaluate_attack
from robusteval.core.atomic_files import atomic_write_bytes, atomic_write_json
from robusteval.core.errors import UsageError
from robusteval.core.vocabulary import parse_defense
from robusteval.model_zoo.claims import NO_CLAIM_REASONS, Claim
from robusteval.model_zoo.factory import list_models, model_card
from robusteval.reports.loading import load_runs
from robusteval.reports.paths import slug
from robusteval.smoothing.engine import certify

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PapersSuite:
    """Settings of the papers suite. None keeps each claim's own protocol; the overrides make it small.

    n_images: test points of every evaluation (the paper's count when None); n0, n: CERTIFY's draws;
    attack_points: points of the attack runs (default: as many as the paper's, at most `max_attack_points`,
    since AutoAttack on a smoothed classifier costs K forward passes per query); votes: K of `smooth:σ:K`;
    eot, steps: the attack's EOT draws and iterations (None: AutoAttack's published settings).
    """

    n_images: int | None = None
    n0: int | None = None
    n: int | None = None
    attack_points: int | None = None
    max_attack_points: int = 500
    votes: int = 100
    eot: int | None = None
    steps: int | None = None
    large_eps_check: bool = True
    masking_checks: bool = True

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ClaimRow:
    """One claim and what was measured for it (fractions; None where not measured)."""

    model: str
    claim: Claim
    checkpoint: str
    status: str  # "measured", "missing" or "failed: <error>"
    paper: dict[str, float] | None = None  # {"value", "ci_low", "ci_high"}
    autoattack: dict[str, float] | None = None
    adaptive: dict[str, float] | None = None
    gap: dict[str, float] | None = None
    runs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "claim": self.claim.as_dict(), "label": self.claim.label,
                "checkpoint": self.checkpoint, "status": self.status, "claimed": self.claim.robust_accuracy,
                "paper_protocol": self.paper, "autoattack": self.autoattack, "adaptive": self.adaptive,
                "gap": self.gap, "runs": self.runs, "notes": self.notes}


def paper_claims() -> list[tuple[str, Claim]]:
    """Every claim on every model card, by model name."""
    return [(name, claim) for name in list_models() for claim in model_card(name).claims]


def find_checkpoint(model_dir: Path, released: str) -> Path | None:
    """The released file under `model_dir`: its archive path, or that path without the leading 'models/'.

    A "*" in the file name stands for a training's epoch: the highest-numbered match is the file (the last
    checkpoint-<epoch>.pth the official fine-tuning wrote).
    """
    candidates = [model_dir / released]
    if released.startswith("models/"):
        candidates.append(model_dir / released.removeprefix("models/"))
    for path in candidates:
        if "*" not in path.name:
            if path.is_file():
                return path
            continue
        found = [match for match in path.parent.glob(path.name) if match.is_file()] if path.parent.is_dir() else []
        if found:
            return max(found, key=_epoch_order)
    return None


def _epoch_order(path: Path) -> tuple[int, str]:
    numbers = re.findall(r"\d+", path.name)
    return (int(numbers[-1]) if numbers else -1, path.name)


def run_papers(model_dir: str | Path, out: str | Path = "runs", suite: PapersSuite = PapersSuite(),
               on_event: Callable[[str], None] | None = None, **options: Any) -> tuple[list[ClaimRow], Path]:
    """Evaluate every claim whose checkpoint is in `model_dir`; returns the rows and the suite folder.

    `options` are the JobOptions of every evaluation (data_dir, device, ...); checkpoint and dataset are the
    claim's. Writes `<out>/papers/papers.json` and `papers.md`.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UsageError(f"--model-dir {model_dir} is not a folder; the papers suite reads the released "
                         f"checkpoints from it")
    for taken in ("checkpoint", "dataset", "model_dir", "shard"):
        if options.get(taken) is not None:
            raise UsageError(f"the papers suite takes each claim's own {taken.replace('_', '-')}; do not pass it")
        options.pop(taken, None)
    if options.pop("every", 1) != 1:
        raise UsageError("the papers suite takes every image its claim's paper takes; do not pass --every")
    if options.get("deterministic") is None:
        options["deterministic"] = True
    say = on_event or (lambda message: logger.info("%s", message))
    folder = Path(out) / "papers"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for model, claim in paper_claims():
        rows.append(_evaluate_claim(model, claim, model_dir, folder, suite, options, say))
    atomic_write_json(folder / "papers.json", {"suite": suite.as_dict(), "model_dir": str(model_dir),
                                               "rows": [row.as_dict() for row in rows]})
    atomic_write_bytes(folder / "papers.md", papers_markdown(rows).encode())
    return rows, folder


def _evaluate_claim(model: str, claim: Claim, model_dir: Path, folder: Path, suite: PapersSuite,
                    options: dict[str, Any], say: Callable[[str], None]) -> ClaimRow:
    # One file per σ of a certified claim (the best over several σ needs them all), one file otherwise.
    levels: tuple[float | None, ...] = claim.noise_levels if claim.certified else (None,)
    released = {sigma: claim.protocol.checkpoint_for(sigma) for sigma in levels}
    files = {sigma: find_checkpoint(model_dir, path) for sigma, path in released.items()}
    missing = [path for sigma, path in released.items() if files[sigma] is None]
    if missing:
        say(f"missing {model} {claim.label}: no {', '.join(missing)} under {model_dir}")
        return ClaimRow(model, claim, ", ".join(str(model_dir / path) for path in missing), "missing")
    row = ClaimRow(model, claim, ", ".join(str(file) for file in files.values()), "measured")
    # One directory per evaluation: the claims of one checkpoint at several radii share its certify run.
    name = "-".join(part for part in (slug(model), claim.dataset, slug(claim.variant.lower())) if part)
    started = time.perf_counter()
    say(f"running {model} {claim.label} from {row.checkpoint}")
    try:
        if claim.certified:
            _measure_certificate(row, claim, folder, name, files, suite, options)
        else:
            _measure_attack_claim(row, claim, folder / name, suite, {"checkpoint": files[None], **options})
    except Exception as error:  # one failed evaluation must not lose the others
        row.status = f"failed: {type(error).__name__}: {error}"
        say(f"FAILED {model} {claim.label}: {error}")
        return row
    row.gap = _gap(claim.robust_accuracy, row.paper if claim.certified else row.adaptive)
    say(f"done {model} {claim.label} in {time.perf_counter() - started:.0f} s")
    return row


def _points(claim: Claim, suite: PapersSuite) -> int | None:
    return suite.n_images if suite.n_images is not None else claim.protocol.n_images


def _measure_certificate(row: ClaimRow, claim: Claim, folder: Path, name: str, files: dict[Any, Path],
                         suite: PapersSuite, options: dict[str, Any]) -> None:
    """CERTIFY each σ's classifier; the claim's figure is the certified accuracy (the best over its σ)."""
    protocol = claim.protocol
    n_images = _points(claim, suite)
    counts: dict[float, int] = {}
    totals = set()
    for sigma, file in files.items():
        certified = folder / (f"{name}-s{sigma:g}-certify" + (f"-n{n_images}" if n_images is not None else ""))
        certify(row.model, claim.dataset, sigma=float(sigma), mode="direct", n0=suite.n0 or protocol.n0 or 100,
                n=suite.n or protocol.n or 100_000, alpha=protocol.alpha or 0.001, n_images=n_images, out=certified,
                checkpoint=file, every=protocol.skip, **options)
        (run,) = load_runs([certified])
        row.runs.append(str(certified))
        total = int(run.summary["n_images"])
        counts[sigma] = round(run.certified_accuracy_at(claim.budget) * total)
        totals.add(total)
    (total,) = totals  # the same images for every σ
    if len(counts) == 1:
        row.paper = interval(next(iter(counts.values())), total)
    else:
        row.paper = best_of(counts, total)
        row.notes.append("certified per σ: " + ", ".join(
            f"σ={sigma:g} {100 * count / total:.1f}%" for sigma, count in counts.items())
            + f"; the interval of the best holds for all {len(counts)} σ at once (Clopper–Pearson at "
              f"{100 * (1 - 0.05 / len(counts)):.2f}% each, Bonferroni)")
    if protocol.skip > 1:
        row.notes.append(f"every {ordinal(protocol.skip)} test image in the sorted order, as the paper's script")
    # The attack goes at the pipeline the figure comes from: the smoothed classifier of the best σ.
    sigma = max(counts, key=lambda level: (counts[level], -level))
    defense = f"smooth:{sigma:g}:{suite.votes}"
    _attack_runs(row, claim, folder / f"{name}-s{sigma:g}", suite, {"checkpoint": files[sigma], **options},
                 attack="autoattack-rand", norm="L2", defense=defense)


def _measure_attack_claim(row: ClaimRow, claim: Claim, base: Path, suite: PapersSuite,
                          common: dict[str, Any]) -> None:
    protocol = claim.protocol
    n = _attack_points(claim, suite)
    paper = base.with_name(base.name + f"-{claim.threat_model}-{claim.budget:g}-{slug(protocol.attack)}")
    evaluate_attack(row.model, claim.dataset, attack=protocol.attack, norm=claim.threat_model, eps=[claim.budget],
                    n=n, defense=claim.defense, steps=protocol.steps, out=paper, every=protocol.skip,
                    large_eps_check=suite.large_eps_check, masking_checks=suite.masking_checks, **common)
    (run,) = load_runs([paper])
    row.runs.append(str(paper))
    point = run.robust_accuracy_at(claim.budget)
    row.paper = interval(int(point["robust"]), int(run.summary["n"]))
    attack = "autoattack-rand" if parse_defense(claim.defense).randomized else "autoattack"
    _attack_runs(row, claim, base, suite, common, attack=attack, norm=claim.threat_model, defense=claim.defense)


def _attack_points(claim: Claim, suite: PapersSuite) -> int | None:
    if suite.attack_points is not None:
        return suite.attack_points
    points = _points(claim, suite)
    return min(points, suite.max_attack_points) if points is not None else suite.max_attack_points


def _attack_runs(row: ClaimRow, claim: Claim, base: Path, suite: PapersSuite, common: dict[str, Any], *,
                 attack: str, norm: str, defense: str) -> None:
    """AutoAttack's own figure and the adaptive worst case, from one run of the engine."""
    out = base.with_name(base.name + f"-{norm}-{claim.budget:g}-{attack}")
    gradient = "auto" if parse_defense(defense).differentiates_through else None
    evaluate_attack(row.model, claim.dataset, attack=attack, norm=norm, eps=[claim.budget],
                    n=_attack_points(claim, suite), defense=defense, gradient=gradient, eot=suite.eot,
                    steps=suite.steps, out=out, every=claim.protocol.skip, large_eps_check=suite.large_eps_check,
                    masking_checks=suite.masking_checks, **common)
    (run,) = load_runs([out])
    row.runs.append(str(out))
    point = run.robust_accuracy_at(claim.budget)
    n = int(run.summary["n"])
    standard = point.get("standard_robust")
    row.autoattack = interval(int(point["robust"] if standard is None else standard), n)
    row.adaptive = interval(int(point["robust"]), n)
    row.notes.append(f"{attack} on {defense}" + (f", EOT {run.summary['eot']}" if run.summary.get("eot") else ""))
    if run.flags:
        row.notes.append("sanity flags: " + "; ".join(run.flags))


def ordinal(number: int) -> str:
    """2nd, 50th, 101st."""
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def interval(successes: int, total: int, alpha: float = 0.05) -> dict[str, float]:
    """A proportion with its (1 - alpha) Clopper–Pearson interval (95% by default)."""
    from statsmodels.stats.proportion import (
        proportion_confint,  # deferred: statsmodels costs ~0.8 s to import
    )

    low, high = proportion_confint(successes, total, alpha=alpha, method="beta")
    return {"value": successes / total, "ci_low": float(low), "ci_high": float(high), "count": successes,
            "n": total}


def best_of(counts: dict[float, int], total: int, alpha: float = 0.05) -> dict[str, float]:
    """The best of several proportions on the same `total` points, with a (1 - alpha) interval for the best.

    Each proportion gets a Clopper–Pearson interval at level 1 - alpha/m (Bonferroni over the m of them), so
    with probability at least 1 - alpha all m hold at once; then the largest true proportion lies between the
    largest lower and the largest upper bound. (A 95% interval around the best count alone would be too
    narrow: the maximum of m estimates is biased upwards.)
    """
    each = [interval(count, total, alpha / len(counts)) for count in counts.values()]
    best = max(counts.values())
    return {"value": best / total, "ci_low": max(i["ci_low"] for i in each),
            "ci_high": max(i["ci_high"] for i in each), "count": best, "n": total}


def _gap(claimed: float, measured: dict[str, float] | None) -> dict[str, float] | None:
    """Claimed minus measured, with the interval the measurement's gives (the claim is a fixed number)."""
    if measured is None:
        return None
    return {"value": claimed - measured["value"], "ci_low": claimed - measured["ci_high"],
            "ci_high": claimed - measured["ci_low"]}


def _percent(figure: dict[str, float] | None) -> str:
    if figure is None:
        return "-"
    return f"{100 * figure['value']:.1f} [{100 * figure['ci_low']:.1f}, {100 * figure['ci_high']:.1f}]"


def papers_table(rows: list[ClaimRow]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The report's table: a header and one row of strings per claim (percentages, 95% intervals)."""
    header = ("model", "claim", "source", "claimed (%)", "paper protocol (%)", "AutoAttack (%)", "adaptive (%)",
              "gap (points)", "status")
    body = []
    for row in rows:
        gap = row.gap
        gap_text = "-" if gap is None else (f"{100 * gap['value']:+.1f} [{100 * gap['ci_low']:+.1f}, "
                                            f"{100 * gap['ci_high']:+.1f}]")
        status = row.status if row.status != "missing" else f"missing: {row.checkpoint}"
        body.append((row.model, row.claim.label, row.claim.source, f"{100 * row.claim.robust_accuracy:.1f}",
                     _percent(row.paper), _percent(row.autoattack), _percent(row.adaptive), gap_text, status))
    return header, body


def papers_markdown(rows: list[ClaimRow]) -> str:
    """The table as Markdown (every cell escaped), with the notes of each measured row below it."""
    header, body = papers_table(rows)

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(markdown_cell(c) for c in cells) + " |"

    parts = ["# The papers' claims beside robusteval's measurements", "",
             "Claimed: the paper's figure (model card). Paper protocol: its own evaluation (CERTIFY with its σ, "
             "n0, n, α; or its attack). AutoAttack: AutoAttack's own figure on the deployed pipeline; adaptive: "
             "the worst case over everything robusteval's engine ran. Gap: claimed minus the certified accuracy "
             "measured (certificates) or minus the adaptive figure (empirical claims), 95% intervals.", "",
             line(header), "| " + " | ".join("---" for _ in header) + " |", *(line(cells) for cells in body), ""]
    for row in rows:  # what the card says of the claim, then what was noticed measuring it
        notes = [*row.claim.notes, *row.notes]
        if notes:
            parts.append(f"- {markdown_cell(row.model)}, {markdown_cell(row.claim.label)}: "
                         f"{markdown_cell('; '.join(notes))}")
    # Why the other seed systems have no row: no claim of theirs could be confirmed (model_zoo/claims.py).
    parts += ["", "## Systems without a recorded claim", "",
              *(f"- {markdown_cell(name)}: {markdown_cell(reason)}" for name, reason in NO_CLAIM_REASONS.items())]
    return "\n".join(parts) + "\n"


def markdown_cell(text: str) -> str:
    """Text safe inside a Markdown table cell: no pipes, newlines or HTML."""
    return (str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")
            .replace(">", "&gt;"))
