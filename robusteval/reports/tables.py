"""Result tables (pandas): the leaderboard, the certified-radius table and the adversarial table.

Every table is built as a DataFrame of numbers (fractions in [0, 1]; CSV keeps
them so), then rendered for people as Markdown or LaTeX with percentages.

- Certified-radius table, in the layout of Cohen et al. (2019) and the DMAE
  paper: rows are models, first the best σ at each radius ("best σ"), then one
  row per σ; columns are certified accuracy at radius 0, 0.25, 0.5, 0.75, 1.0
  (digits also 1.5, 2.0) and the average certified radius (ACR).
- Adversarial table: clean accuracy and robust accuracy per attack (suite) and
  ε with its 95% interval (the worst case over every stage the engine ran);
  where they differ, a cell also shows the attack's own figure ("autoattack
  alone ...") and, for randomized pipelines, worst-of-N; rows whose run
  raised sanity flags are marked unreliable.
- Leaderboard: one row per evaluated system (a model, or a model behind a
  defense): clean accuracy, AutoAttack's own robust accuracy and the best-known
  robust accuracy over all attacks and stages run at a headline ε per norm
  (for a randomized pipeline, its majority-vote decision), beside it the
  worst-of-N robust accuracy where a norm has randomized pipelines (fooled
  on any one fresh decision draw; a deterministic pipeline's equals its
  best-known figure), certified accuracy at chosen radii (best σ), and the flags.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from robusteval.core.vocabulary import NORM_SYMBOL, NORMS, norm_order
from robusteval.data import dataset_budgets
from robusteval.reports.loading import Run

UNRELIABLE_MARK = "†"
_NUMERIC_CELL = re.compile(r"^(–|\d[\d.]*)(\s|$)")


def certified_radii(dataset: str) -> tuple[float, ...]:
    """The radius columns of the certified table for a data set (its description's budgets)."""
    return dataset_budgets(dataset).table_radii


def format_number(value: float) -> str:
    """A budget, radius or σ as a short string: 0.1, 0.25, 2."""
    return f"{value:.6g}"


def percent(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage string; '–' when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.{digits}f}"


def is_autoattack(run: Run) -> bool:
    """AutoAttack's standard suite or its version for randomized defenses."""
    return str(run.summary["attack"]).lower().startswith("autoattack")


def headline_eps(dataset: str, norm: str, runs: Sequence[Run],
                 overrides: dict[str, float] | None = None) -> float | None:
    """The ε the leaderboard reports for a data set and norm.

    An override wins; then the data set's default when some run evaluated it;
    otherwise the median of the budgets the runs share. None without attack runs.
    """
    relevant = [r for r in runs if r.kind == "attack" and r.dataset == dataset and r.summary["norm"] == norm]
    if not relevant:
        return None
    if overrides and norm in overrides:
        return float(overrides[norm])
    default = dataset_budgets(dataset).headline_eps.get(norm)
    if default is not None and any(r.robust_accuracy_at(default) is not None for r in relevant):
        return default
    budgets = sorted({float(p["eps"]) for r in relevant for p in r.summary["curve"]})
    return budgets[(len(budgets) - 1) // 2]


# --- certified-radius table -----------------------------------------------------------------
@dataclass(frozen=True)
class CertifiedTable:
    """Certified accuracy per model, mode and σ.

    `values` has columns dataset, model, mode, sigma (NaN on "best σ" rows),
    row ("best σ" or "σ = 0.25"), one column per radius (float name) and acr.
    `best_sigma` has, for each "best σ" row (same index), the σ that reached
    each radius' value.
    """

    values: pd.DataFrame
    best_sigma: pd.DataFrame
    radii: tuple[float, ...]


def certified_table(runs: Sequence[Run], radii: Sequence[float] | None = None) -> CertifiedTable:
    """The certified-radius table over the certify runs (one block per data set, model and mode)."""
    certify_runs = [r for r in runs if r.kind == "certify"]
    datasets = sorted({r.dataset for r in certify_runs})
    if radii is None:
        radii = sorted({x for d in datasets for x in certified_radii(d)})
    radii = tuple(float(r) for r in radii)
    rows: list[dict] = []
    best_rows: dict[int, dict[float, float]] = {}
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in certify_runs:
        groups.setdefault((run.dataset, run.model, run.smoothing_mode), []).append(run)
    for (dataset, model, mode), group in sorted(groups.items()):
        group = sorted(group, key=lambda r: float(r.summary["sigma"]))
        per_sigma = [
            {"dataset": dataset, "model": model, "mode": mode, "sigma": float(r.summary["sigma"]),
             "row": f"σ = {format_number(float(r.summary['sigma']))}",
             **{radius: r.certified_accuracy_at(radius) for radius in radii}, "acr": float(r.summary["acr"])}
            for r in group
        ]
        if len(per_sigma) > 1:  # with one σ the "best σ" row would repeat it
            best = {"dataset": dataset, "model": model, "mode": mode, "sigma": float("nan"), "row": "best σ"}
            winners: dict[float | str, float] = {}
            for column in (*radii, "acr"):
                top = max(per_sigma, key=lambda row: row[column])  # ties: the smallest σ
                best[column] = top[column]
                winners[column] = top["sigma"] if top[column] > 0 else float("nan")
            best_rows[len(rows)] = winners
            rows.append(best)
        rows.extend(per_sigma)
    columns = ["dataset", "model", "mode", "sigma", "row", *radii, "acr"]
    values = pd.DataFrame(rows, columns=columns)
    best_sigma = pd.DataFrame.from_dict(best_rows, orient="index", columns=[*radii, "acr"])
    return CertifiedTable(values=values, best_sigma=best_sigma, radii=radii)


def certified_display(table: CertifiedTable) -> pd.DataFrame:
    """The certified table for people: percentages, ACR with 3 decimals, the winning σ on 'best σ' rows."""
    out = []
    for index, row in table.values.iterrows():
        shown = {"model": row["model"], "dataset": row["dataset"], "mode": row["mode"], "σ": row["row"]}
        for radius in table.radii:
            shown[f"r = {format_number(radius)}"] = percent(row[radius]) + _winner(table, index, radius)
        shown["ACR"] = f"{row['acr']:.3f}" + _winner(table, index, "acr")
        out.append(shown)
    return pd.DataFrame(out)


def _winner(table: CertifiedTable, index: object, column: float | str) -> str:
    if index not in table.best_sigma.index or math.isnan(table.best_sigma.loc[index, column]):
        return ""
    return f" (σ={format_number(table.best_sigma.loc[index, column])})"


# --- adversarial table ----------------------------------------------------------------------
def adversarial_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Long format: one row per attack run and ε (system, attack, n, clean and robust accuracy, interval, flags)."""
    rows = []
    for run in runs:
        if run.kind != "attack":
            continue
        for point in run.summary["curve"]:
            rows.append({
                "dataset": run.dataset, "norm": run.summary["norm"], "model": run.model, "defense": run.defense,
                "system": run.system, "attack": run.attack_label, "n": int(run.summary["n"]),
                "clean_accuracy": float(run.summary["clean_accuracy"]), "eps": float(point["eps"]),
                "robust_accuracy": float(point["robust_accuracy"]), "ci_low": float(point["ci_low"]),
                "ci_high": float(point["ci_high"]),
                # The attack's own figure (older runs: robust_accuracy) and, for randomized pipelines, worst-of-N.
                "standard_robust_accuracy": float(own_robust_accuracy(point)),
                "worst_of_n_robust_accuracy": (float(point["worst_of_n_robust_accuracy"])
                                               if point.get("worst_of_n_robust_accuracy") is not None
                                               else float("nan")),
                "broken_by": json.dumps(point.get("broken_by") or {}, sort_keys=True),
                "unreliable": bool(run.flags), "flags": "; ".join(run.flags), "cleared": "; ".join(run.cleared),
            })
    columns = ["dataset", "norm", "model", "defense", "system", "attack", "n", "clean_accuracy", "eps",
               "robust_accuracy", "ci_low", "ci_high", "standard_robust_accuracy", "worst_of_n_robust_accuracy",
               "broken_by", "unreliable", "flags", "cleared"]
    return pd.DataFrame(rows, columns=columns)


def own_robust_accuracy(point: dict) -> float:
    """The attack's own robust accuracy at a curve point (summaries before the remedy stages: robust_accuracy)."""
    own = point.get("standard_robust_accuracy")
    return point["robust_accuracy"] if own is None else own


def adversarial_display(long: pd.DataFrame, dataset: str, norm: str) -> pd.DataFrame:
    """Wide table for one data set and norm: a row per system and attack, a column per ε ('61.0 [56.6, 65.3]')."""
    part = long[(long["dataset"] == dataset) & (long["norm"] == norm)]
    out = []
    for (system, attack), group in part.groupby(["system", "attack"], sort=True):
        first = group.iloc[0]
        name = system + (f" {UNRELIABLE_MARK}" if first["unreliable"] else "")
        row = {"system": name, "attack": attack, "n": int(first["n"]), "clean": percent(first["clean_accuracy"])}
        for _, point in group.sort_values("eps").iterrows():
            cell = f"{percent(point['robust_accuracy'])} [{percent(point['ci_low'])}, {percent(point['ci_high'])}]"
            # Both figures where they differ: the worst case over every stage, and the attack's own.
            if abs(point["standard_robust_accuracy"] - point["robust_accuracy"]) > 1e-12:
                cell += f"; {attack} alone {percent(point['standard_robust_accuracy'])}"
            if point["worst_of_n_robust_accuracy"] == point["worst_of_n_robust_accuracy"] and \
                    abs(point["worst_of_n_robust_accuracy"] - point["robust_accuracy"]) > 1e-12:
                cell += f"; worst-of-N {percent(point['worst_of_n_robust_accuracy'])}"
            row[f"ε = {format_number(point['eps'])}"] = cell
        # A flag a remedy cleared is shown with its note, so the reader sees why there is no flag.
        cleared = f"cleared, {first['cleared']}" if first.get("cleared") else ""
        row["flags"] = "; ".join(part for part in (first["flags"], cleared) if part)
        out.append(row)
    frame = pd.DataFrame(out)
    if not frame.empty:
        eps_columns = sorted((c for c in frame.columns if c.startswith("ε = ")), key=lambda c: float(c[4:]))
        frame = frame[["system", "attack", "n", "clean", *eps_columns, "flags"]].fillna("–")
    return frame


# --- leaderboard ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LeaderboardColumn:
    """A numeric leaderboard column and what it means."""

    key: str
    title: str
    description: str


def leaderboard_radii(dataset: str, radii: Sequence[float] | None = None) -> tuple[float, ...]:
    return tuple(float(r) for r in radii) if radii else dataset_budgets(dataset).leaderboard_radii


def leaderboard(runs: Sequence[Run], eps_overrides: dict[str, float] | None = None,
                radii: Sequence[float] | None = None) -> tuple[pd.DataFrame, list[LeaderboardColumn]]:
    """One row per data set and evaluated system, sorted by best-known robust accuracy (first norm), then clean.

    Certified accuracy (best σ over modes) is reported on the model's own row
    (the system without a defense): randomized smoothing certifies the model.
    """
    attack_runs = [r for r in runs if r.kind == "attack"]
    columns = _Columns()
    rows = []
    norms = [n for n in NORMS if any(r.summary["norm"] == n for r in attack_runs)]
    # A worst-of-N column where a norm has a randomized pipeline (the other runs carry no such figure).
    randomized = {r.summary["norm"] for r in attack_runs
                  if any(p.get("worst_of_n_robust_accuracy") is not None for p in r.summary.get("curve", []))}
    for dataset in sorted({r.dataset for r in runs if r.kind in ("attack", "certify")}):
        budgets = {norm: headline_eps(dataset, norm, runs, eps_overrides) for norm in norms}
        for system, parts in _systems(runs, dataset).items():
            row: dict = {"dataset": dataset, "system": system, "model": parts["model"], "defense": parts["defense"]}
            attacked = parts["attack"]
            row["clean"] = (float(max(attacked, key=lambda r: (int(r.summary["n"]), is_autoattack(r)))
                                  .summary["clean_accuracy"]) if attacked else float("nan"))
            for norm in norms:
                if budgets[norm] is not None:
                    row.update(_robust_cells(attacked, norm, budgets[norm], columns, norm in randomized))
            row.update(_certified_cells(parts["certify"], leaderboard_radii(dataset, radii), columns))
            flags = sorted({f"{r.attack_label} {NORM_SYMBOL[r.summary['norm']]}: {flag}"
                            for r in attacked for flag in r.flags})
            row["flags"] = "; ".join(flags)
            row["unreliable"] = bool(flags)
            rows.append(row)
    keys = [c.key for c in columns.columns]
    frame = pd.DataFrame(rows, columns=["dataset", "system", "model", "defense", *keys, "flags", "unreliable"])
    sort_key = next((k for k in keys if k.startswith("best_")), None)
    order = [c for c in (sort_key, "clean") if c]
    if not frame.empty:
        frame = frame.sort_values(["dataset", *order, "system"], ascending=[True, *[False] * len(order), True],
                                  na_position="last", kind="stable").reset_index(drop=True)
    return frame, columns.columns


class _Columns:
    """The leaderboard's numeric columns in the order they first appear (clean accuracy first)."""

    def __init__(self) -> None:
        self.columns = [LeaderboardColumn("clean", "clean accuracy (%)", "accuracy on unperturbed test images")]

    def add(self, key: str, title: str, description: str) -> str:
        if key not in {c.key for c in self.columns}:
            self.columns.append(LeaderboardColumn(key, title, description))
        return key


def _systems(runs: Sequence[Run], dataset: str) -> dict[str, dict]:
    """The evaluated systems of a data set with their attack runs and (on the model's own row) certify runs."""
    systems: dict[str, dict] = {}
    for run in (r for r in runs if r.kind == "attack" and r.dataset == dataset):
        systems.setdefault(run.system, {"model": run.model, "defense": run.defense, "attack": [], "certify": []})
        systems[run.system]["attack"].append(run)
    for run in (r for r in runs if r.kind == "certify" and r.dataset == dataset):
        systems.setdefault(run.model, {"model": run.model, "defense": "none", "attack": [], "certify": []})
        systems[run.model]["certify"].append(run)
    return systems


def _robust_cells(attacked: list[Run], norm: str, eps: float, columns: _Columns,
                  worst_of_n: bool = False) -> dict[str, float]:
    """AutoAttack's own and the best-known robust accuracy at the headline ε of a norm (and worst-of-N).

    The AutoAttack column is AutoAttack's own figure (comparable with RobustBench); best-known is the
    worst case over every attack run and every stage the engine added (remedies, escalation), by the
    deployed decision (majority vote for a randomized pipeline). With `worst_of_n`, the lowest worst-of-N
    figure too: a point counts as broken when any one fresh decision draw is fooled (a deterministic run's
    one draw is its decision, so its best-known figure stands there).
    """
    symbol = NORM_SYMBOL[norm]
    aa_key = columns.add(f"autoattack_{norm}", f"AutoAttack {symbol} ε={format_number(eps)} (%)",
                         f"robust accuracy under AutoAttack, {symbol}, ε = {format_number(eps)}")
    best_key = columns.add(f"best_{norm}", f"best-known {symbol} ε={format_number(eps)} (%)",
                           f"lowest robust accuracy over every attack run, {symbol}, ε = {format_number(eps)}")
    worst_key = columns.add(f"worst_of_n_{norm}", f"worst-of-N {symbol} ε={format_number(eps)} (%)",
                            f"randomized pipelines: robust accuracy when being fooled on any one of the fresh "
                            f"decision draws counts as broken, {symbol}, ε = {format_number(eps)} (deterministic "
                            f"ones: their best-known figure)") if worst_of_n else None
    at_eps = [(r, r.robust_accuracy_at(eps)) for r in attacked if r.summary["norm"] == norm]
    at_eps = [(r, p) for r, p in at_eps if p is not None]
    aa = [float(own_robust_accuracy(p)) for r, p in at_eps if is_autoattack(r)]
    cells = {aa_key: min(aa) if aa else float("nan"),
             best_key: min((float(p["robust_accuracy"]) for _, p in at_eps), default=float("nan"))}
    if worst_key is not None:
        cells[worst_key] = min((float(p["worst_of_n_robust_accuracy"] if p.get("worst_of_n_robust_accuracy")
                                      is not None else p["robust_accuracy"]) for _, p in at_eps), default=float("nan"))
    return cells


def _certified_cells(certified: list[Run], radii: Sequence[float], columns: _Columns) -> dict[str, float]:
    """Certified accuracy at each leaderboard radius, the best over the model's σ and modes."""
    cells = {}
    for radius in radii:
        key = columns.add(f"certified_{format_number(radius)}", f"certified r={format_number(radius)} (%)",
                          f"certified accuracy at L2 radius {format_number(radius)}, best σ and mode")
        cert = [r.certified_accuracy_at(radius) for r in certified]
        cells[key] = max(cert) if cert else float("nan")
    return cells


def leaderboard_display(frame: pd.DataFrame, columns: Sequence[LeaderboardColumn]) -> pd.DataFrame:
    """The leaderboard for people: percentages, the unreliable mark on flagged systems."""
    out = []
    multiple = frame["dataset"].nunique() > 1
    for _, row in frame.iterrows():
        shown = {"dataset": row["dataset"]} if multiple else {}
        shown["system"] = row["system"] + (f" {UNRELIABLE_MARK}" if row["unreliable"] else "")
        for column in columns:
            shown[column.title] = percent(row[column.key])
        shown["flags"] = row["flags"] or ""
        out.append(shown)
    return pd.DataFrame(out)


# --- rendering ------------------------------------------------------------------------------
# Markdown cells: a backslash, pipe or backtick escaped (a pipe would end the cell, a backslash before it undo
# the escape), HTML's <, > and & as entities (Markdown passes raw HTML through: `<script>` would run in a viewer),
# a link's "](" broken, line breaks (which end a table row) as spaces.
_MARKDOWN = {"\\": "\\\\", "|": "\\|", "`": "\\`", "<": "&lt;", ">": "&gt;", "&": "&amp;", "\n": " ", "\r": " "}


def markdown_escape(text: str) -> str:
    """Text made safe for one cell (or heading) of GitHub-flavoured Markdown: it can neither end the cell nor
    inject HTML or a link."""
    return "".join(_MARKDOWN.get(ch, ch) for ch in text).replace("](", "]\\(")


def csv_safe(value: object) -> object:
    """A CSV cell that a spreadsheet will not run as a formula: text starting with =, +, -, @, tab or CR gets a
    leading apostrophe (OWASP's advice); numbers, and text that reads as a number, stay as they are."""
    if not isinstance(value, str) or not value or value[0] not in "=+-@\t\r":
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def to_csv(frame: pd.DataFrame) -> str:
    """CSV (pandas quotes commas, quotes and line breaks) with formula-like text made inert (`csv_safe`)."""
    safe = frame.map(csv_safe)
    safe.columns = [csv_safe(str(c)) for c in frame.columns]
    return safe.to_csv(index=False)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table; every cell and header escaped (`markdown_escape`)."""
    if frame.empty:
        return "_(no rows)_\n"
    escaped = frame.map(lambda v: markdown_escape(str(v)))
    escaped.columns = [markdown_escape(str(c)) for c in frame.columns]
    # Cells are already formatted ("97.5", "60.0 [40.1, 77.3]"): no re-parsing as numbers; numbers to the right.
    align = ["right" if all(_NUMERIC_CELL.match(v) for v in escaped[c]) else "left" for c in escaped.columns]
    return escaped.to_markdown(index=False, disable_numparse=True, colalign=align) + "\n"


_LATEX = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
    "σ": r"$\sigma$", "ε": r"$\varepsilon$", "∞": r"$\infty$", "†": r"\dag{}", "–": "--", "≤": r"$\leq$",
    "\n": " ", "\r": " ",
}


def latex_escape(text: str) -> str:
    """Text made safe for LaTeX: special characters escaped, σ ε ∞ as math, line breaks as spaces (a blank
    line would end the tabular's paragraph)."""
    return "".join(_LATEX.get(ch, ch) for ch in text)


def to_latex(frame: pd.DataFrame, caption: str | None = None) -> str:
    """A booktabs LaTeX tabular; every cell and header is LaTeX-escaped."""
    if frame.empty:
        return "% (no rows)\n"
    text = frame.map(lambda v: latex_escape(str(v)))
    text.columns = [latex_escape(str(c)) for c in frame.columns]
    return text.style.hide(axis="index").to_latex(hrules=True, caption=caption)


@dataclass(frozen=True)
class TableSet:
    """The tables of one report, as numbers and as written files."""

    leaderboard: pd.DataFrame
    leaderboard_columns: list[LeaderboardColumn]
    certified: CertifiedTable
    adversarial: pd.DataFrame
    files: dict[str, Path]


def write_tables(runs: Sequence[Run], out_dir: str | Path, eps_overrides: dict[str, float] | None = None,
                 radii: Sequence[float] | None = None) -> TableSet:
    """Write every table as Markdown, CSV and LaTeX under `out_dir`; returns the numbers and file paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    board, board_columns = leaderboard(runs, eps_overrides, radii)
    certified = certified_table(runs)
    adversarial = adversarial_table(runs)
    files: dict[str, Path] = {}

    def write(name: str, text: str) -> None:
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        files[name] = path

    board_shown = leaderboard_display(board, board_columns) if not board.empty else pd.DataFrame()
    write("leaderboard.csv", to_csv(board))
    write("leaderboard.md", to_markdown(board_shown))
    write("leaderboard.tex", to_latex(board_shown, caption="Leaderboard"))
    if not certified.values.empty:
        shown = certified_display(certified)
        csv = certified.values.copy()
        csv.columns = [f"r={format_number(c)}" if isinstance(c, float) else c for c in csv.columns]
        write("certified.csv", to_csv(csv))
        write("certified.md", to_markdown(shown))
        write("certified.tex", to_latex(shown, caption="Certified accuracy (\\%) at L2 radius r, and ACR"))
    if not adversarial.empty:
        write("adversarial.csv", to_csv(adversarial))
        markdown, latex = [], []
        for dataset, norm in _dataset_norms(adversarial):
            shown = adversarial_display(adversarial, dataset, norm)
            title = f"{dataset}, {NORM_SYMBOL[norm]}"
            markdown.append(f"### Robust accuracy (%), {markdown_escape(title)}\n\n{to_markdown(shown)}")
            latex.append(to_latex(shown, caption=f"Robust accuracy (\\%) with 95\\% intervals, "
                                                 f"{latex_escape(title)}"))
        note = (f"\n{UNRELIABLE_MARK} flagged: a sanity check failed; its reason is in the flags column.\n"
                if adversarial["unreliable"].any() else "")
        write("adversarial.md", "\n".join(markdown) + note)
        write("adversarial.tex", "\n".join(latex))
    return TableSet(board, board_columns, certified, adversarial, files)


def _dataset_norms(adversarial: pd.DataFrame) -> Iterable[tuple[str, str]]:
    pairs = adversarial[["dataset", "norm"]].drop_duplicates().itertuples(index=False)
    return sorted(((d, n) for d, n in pairs), key=lambda p: (p[0], norm_order(p[1])))
