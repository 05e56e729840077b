"""Records that cannot lie (issue 30), through the command line where a user meets each case.

Each test is one way a careless or hostile user got a wrong figure with exit 0 before: weights swapped
behind a checkpoint's path, records edited by hand, a configuration edited to another attack, NaN weights,
runs of different weights under one model name, malformed baselines and model names that inject Markdown.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import one_line_error
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from robusteval.cli import main
from robusteval.model_zoo.registry import WEIGHTS_DIR

FIXTURES = Path(__file__).parent / "fixtures" / "runs"
GAUSSIAN = WEIGHTS_DIR / "gaussian-digits.safetensors"
GAUSSIAN_05 = WEIGHTS_DIR / "gaussian-s0.5-digits.safetensors"  # the same CNN, other weights
CERTIFY = ["certify", "--model", "gaussian", "--sigma", "0.25", "--n0", "10", "--n", "100", "--n-images", "6",
           "--batch-size", "220", "--device", "cpu", "--no-compile", "--quiet"]
ATTACK = ["run", "--model", "standard", "--attack", "fgsm", "--eps", "0.05,0.1", "--n", "20", "--device", "cpu",
          "--quiet", "--no-large-eps-check"]


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _ok(result) -> None:
    assert result.exit_code == 0, result.output


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines() if line.strip()]


def _write_records(run: Path, records: list[dict]) -> None:
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


@pytest.fixture(scope="module")
def certified(tmp_path_factory) -> Path:
    """A finished certify run of the shipped gaussian weights (6 images)."""
    out = tmp_path_factory.mktemp("certify") / "run"
    _ok(_invoke(*CERTIFY, "--out", out))
    return out


@pytest.fixture(scope="module")
def certified_shards(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("shards")
    for i in (1, 2):
        _ok(_invoke(*CERTIFY, "--shard", f"{i}/2", "--out", folder / f"s{i}"))
    return folder / "s1", folder / "s2"


@pytest.fixture(scope="module")
def attacked(tmp_path_factory) -> Path:
    """A finished fgsm run on standard in which points are broken."""
    out = tmp_path_factory.mktemp("attack") / "run"
    _ok(_invoke(*ATTACK, "--out", out))
    assert any(r["results"][-1]["broken"] for r in _records(out))
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    (to / ".lock").unlink(missing_ok=True)
    return to


# --- 1. the weights fingerprinted in every run ------------------------------------------------------------------
def test_certify_resumed_with_other_weights_behind_the_path_is_refused_naming_both_fingerprints(tmp_path):
    checkpoint = tmp_path / "ck.safetensors"
    shutil.copy(GAUSSIAN_05, checkpoint)
    out = tmp_path / "run"
    args = [*CERTIFY, "--checkpoint", checkpoint, "--out", out]
    _ok(_invoke(*args))
    first = _config(out)
    assert len(first["model_fingerprint"]) == 16 and first["file_fingerprints"]["checkpoint"]
    shutil.copy(GAUSSIAN, checkpoint)  # other weights behind the same path
    message = one_line_error(_invoke(*args), str(checkpoint), "model_fingerprint", first["model_fingerprint"])
    assert "(stored)" in message and "(now)" in message and first["file_fingerprints"]["checkpoint"] in message


def test_shards_certified_with_other_weights_behind_one_path_do_not_merge(tmp_path):
    checkpoint = tmp_path / "ck.safetensors"
    shutil.copy(GAUSSIAN_05, checkpoint)
    _ok(_invoke(*CERTIFY, "--checkpoint", checkpoint, "--shard", "1/2", "--out", tmp_path / "s1"))
    shutil.copy(GAUSSIAN, checkpoint)
    _ok(_invoke(*CERTIFY, "--checkpoint", checkpoint, "--shard", "2/2", "--out", tmp_path / "s2"))
    fingerprints = [_config(tmp_path / s)["model_fingerprint"] for s in ("s1", "s2")]
    assert fingerprints[0] != fingerprints[1]
    one_line_error(_invoke("merge", tmp_path / "s1", tmp_path / "s2", "--out", tmp_path / "merged"),
                    "model_fingerprint", *fingerprints, str(checkpoint))
    assert not (tmp_path / "merged" / "summary.json").exists()


def test_predict_and_denoise_record_the_weights_fingerprint(tmp_path):
    _ok(_invoke("predict", "--model", "gaussian", "--sigma", "0.25", "--n", "50", "--n-images", "2", "--device",
                "cpu", "--no-compile", "--quiet", "--out", tmp_path / "p"))
    _ok(_invoke("denoise", "--model", "dncnn+standard", "--n-images", "4", "--device", "cpu", "--out",
                tmp_path / "d"))
    fingerprints = {_config(tmp_path / "p")["model_fingerprint"], _config(tmp_path / "d")["model_fingerprint"]}
    assert len(fingerprints) == 2 and all(len(f) == 16 for f in fingerprints)


def test_a_run_made_before_fingerprints_is_reported_but_not_resumed(certified, tmp_path):
    old = _copy(certified, tmp_path / "old")
    config = _config(old)
    del config["model_fingerprint"]
    (old / "config.json").write_text(json.dumps(config))
    _ok(_invoke("report", old, "--out", tmp_path / "report.html"))
    one_line_error(_invoke(*CERTIFY, "--out", old), "written before weights were fingerprinted", "--no-resume")


# --- 2. every record checked against itself ---------------------------------------------------------------------
def _edited_shard(shards: tuple[Path, Path], tmp_path: Path, edit) -> tuple[Path, Path]:
    s1, s2 = _copy(shards[0], tmp_path / "s1"), _copy(shards[1], tmp_path / "s2")
    records = _records(s2)
    edit(records[1])
    _write_records(s2, records)
    return s1, s2


def test_merge_refuses_an_abstained_record_edited_to_correct(certified_shards, tmp_path):
    def abstained_but_correct(record):
        record.update(prediction=None, abstain=True, radius=0.0, correct=True)

    s1, s2 = _edited_shard(certified_shards, tmp_path, abstained_but_correct)
    one_line_error(_invoke("merge", s1, s2, "--out", tmp_path / "merged"),
                    f"{s2 / 'samples.jsonl'} line 2: field correct")


def test_merge_refuses_a_radius_that_does_not_follow_from_its_bound(certified_shards, tmp_path):
    s1, s2 = _edited_shard(certified_shards, tmp_path, lambda record: record.update(radius=5.0))
    one_line_error(_invoke("merge", s1, s2, "--out", tmp_path / "merged"),
                    f"{s2 / 'samples.jsonl'} line 2: field radius", "pA_lower")


def test_merge_refuses_a_count_beyond_n(certified_shards, tmp_path):
    s1, s2 = _edited_shard(certified_shards, tmp_path, lambda record: record.update(count=101))
    one_line_error(_invoke("merge", s1, s2, "--out", tmp_path / "merged"), "line 2: field count", "0..100")


def test_resume_refuses_a_label_other_than_the_data_set_s(certified, tmp_path):
    run = _copy(certified, tmp_path / "run")
    records = _records(run)
    records[2]["label"] = (records[2]["label"] + 1) % 10
    records[2]["correct"] = records[2]["prediction"] == records[2]["label"]  # consistent with itself
    _write_records(run, records)
    one_line_error(_invoke(*CERTIFY, "--out", run), f"{run / 'samples.jsonl'} line 3: field label",
                    "data set's label")


def test_report_refuses_a_radius_edited_in_a_finished_run(certified, tmp_path):
    run = _copy(certified, tmp_path / "run")
    records = _records(run)
    certified_line = next(k for k, r in enumerate(records) if not r["abstain"])
    records[certified_line]["radius"] = 5.0
    _write_records(run, records)
    one_line_error(_invoke("report", run, "--out", tmp_path / "r.html"),
                    f"line {certified_line + 1}: field radius")
    one_line_error(_invoke("check", run, "--baseline", tmp_path / "b.json", "--update"), "field radius")


def test_report_refuses_an_attack_record_at_an_eps_not_configured(attacked, tmp_path):
    run = _copy(attacked, tmp_path / "run")
    records = _records(run)
    records[0]["results"][1]["eps"] = 0.2
    _write_records(run, records)
    one_line_error(_invoke("report", run, "--out", tmp_path / "r.html"),
                    "line 1: field results[1].eps", "0.2")


def test_report_and_check_refuse_broken_flipped_to_false(attacked, tmp_path):
    run = _copy(attacked, tmp_path / "run")
    records = _records(run)
    line = next(k for k, r in enumerate(records) if r["results"][-1]["broken"])
    for record in records:
        for result in record["results"]:
            result["broken"] = False
    _write_records(run, records)
    report = _invoke("report", run, "--out", tmp_path / "r.html")
    message = one_line_error(report, f"{run / 'samples.jsonl'} line", ".broken")
    assert int(message.split(" line ")[1].split(":")[0]) <= line + 1
    one_line_error(_invoke("check", run, "--baseline", tmp_path / "b.json", "--update"), ".broken")


def test_report_refuses_an_attack_name_the_run_did_not_run(attacked, tmp_path):
    run = _copy(attacked, tmp_path / "run")
    records = _records(run)
    line = next(k for k, r in enumerate(records) if r["results"][-1]["broken"])
    records[line]["results"][-1]["attack"] = "pgd"
    _write_records(run, records)
    one_line_error(_invoke("report", run, "--out", tmp_path / "r.html"),
                    f"line {line + 1}: field results[1].attack", "'pgd' is not an attack of this run")


# --- 3. a configuration edited to another attack ----------------------------------------------------------------
def test_a_config_edited_to_another_attack_is_not_resumed_under_it(attacked, tmp_path):
    run = _copy(attacked, tmp_path / "run")
    config = _config(run)
    config["attack"] = "pgd"
    (run / "config.json").write_text(json.dumps(config))
    pgd = [a if a != "fgsm" else "pgd" for a in ATTACK]
    one_line_error(_invoke(*pgd, "--out", run), "field results[", "'fgsm' is not an attack of this run")


# --- 4. non-finite weights and logits ---------------------------------------------------------------------------
def _weights_with(tmp_path: Path, value: float, name: str) -> tuple[Path, str]:
    state = load_file(str(GAUSSIAN))
    tensor = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    state[tensor] = state[tensor].clone()
    state[tensor].view(-1)[0] = value
    path = tmp_path / name
    save_file(state, str(path), metadata={"dataset": "digits"})
    return path, tensor


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, value):
    checkpoint, tensor = _weights_with(tmp_path, value, "bad.safetensors")
    one_line_error(_invoke(*CERTIFY, "--checkpoint", checkpoint, "--out", tmp_path / "c"), str(checkpoint),
                    f"tensor {tensor}", "non-finite")
    one_line_error(_invoke("run", "--model", "gaussian", "--attack", "fgsm", "--eps", "0.1", "--n", "4",
                            "--device", "cpu", "--quiet", "--checkpoint", checkpoint, "--out", tmp_path / "a"),
                    f"tensor {tensor}")


def test_logits_that_overflow_stop_certify_and_attack_runs_naming_the_model(tmp_path):
    state = load_file(str(GAUSSIAN))
    # Finite weights whose products overflow float32: every logit becomes Inf or NaN.
    state = {k: (v * 1e30 if v.is_floating_point() and v.dim() > 1 else v) for k, v in state.items()}
    checkpoint = tmp_path / "huge.safetensors"
    save_file(state, str(checkpoint), metadata={"dataset": "digits"})
    certify = _invoke(*CERTIFY, "--checkpoint", checkpoint, "--out", tmp_path / "c")
    one_line_error(certify, "model gaussian gave non-finite logits")
    assert not (tmp_path / "c" / "samples.jsonl").exists() or not _records(tmp_path / "c")
    attack = _invoke("run", "--model", "gaussian", "--attack", "fgsm", "--eps", "0.1", "--n", "4", "--device", "cpu",
                     "--quiet", "--checkpoint", checkpoint, "--out", tmp_path / "a")
    one_line_error(attack, "model gaussian gave non-finite logits")


# --- 5. runs of different weights never share a row -------------------------------------------------------------
@pytest.mark.slow  # two reports with figures: 10-15 s on 2 busy cores
def test_report_keeps_runs_of_different_weights_in_rows_of_their_own(certified, tmp_path):
    other = tmp_path / "other"
    _ok(_invoke(*CERTIFY, "--checkpoint", GAUSSIAN_05, "--out", other))
    fingerprints = [_config(run)["model_fingerprint"][:8] for run in (certified, other)]
    assert fingerprints[0] != fingerprints[1]
    _ok(_invoke("report", certified, other, "--out", tmp_path / "report" / "index.html"))
    table = (tmp_path / "report" / "tables" / "certified.md").read_text()
    for fingerprint in fingerprints:
        assert f"gaussian@{fingerprint}" in table
    board = (tmp_path / "report" / "tables" / "leaderboard.md").read_text()
    assert all(f"gaussian@{f}" in board for f in fingerprints)
    # Runs of the same weights keep the plain name.
    _ok(_invoke("report", certified, "--out", tmp_path / "same" / "index.html"))
    assert "gaussian@" not in (tmp_path / "same" / "tables" / "certified.md").read_text()


# --- 6. check refuses malformed baselines -----------------------------------------------------------------------
@pytest.fixture()
def baseline(tmp_path) -> tuple[list[Path], Path]:
    runs = [FIXTURES / "standard-autoattack-Linf", FIXTURES / "gaussian-certify-0.25"]
    path = tmp_path / "baseline.json"
    _ok(_invoke("check", *runs, "--baseline", path, "--update"))
    return runs, path


def _edit_entry(path: Path, edit) -> str:
    document = json.loads(path.read_text())
    key = next(k for k in document["entries"] if k.startswith("attack/"))
    edit(document["entries"], key)
    path.write_text(json.dumps(document))
    return key


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda entries, key: entries[key].update(figures={}), "has no figures"),
    (lambda entries, key: entries[key]["figures"]["clean_accuracy"].update(correct=0, total=0), "is 0/0"),
    (lambda entries, key: entries[key]["figures"]["clean_accuracy"].update(correct=7.5), "correct 7.5"),
    (lambda entries, key: entries[key]["figures"]["clean_accuracy"].update(correct=41, total=40), "is 41/40"),
    (lambda entries, key: entries[key]["identity"].update(model="pgd-at"), "does not match its identity"),
])
def test_check_refuses_a_malformed_baseline_naming_the_entry(baseline, edit, fragment):
    runs, path = baseline
    key = _edit_entry(path, edit)
    one_line_error(_invoke("check", *runs, "--baseline", path), f"entry {key!r}", fragment)


def test_the_committed_baseline_is_well_formed():
    from robusteval.reports.regression import load_baseline

    assert len(load_baseline(Path(__file__).parent.parent / "reports" / "baseline.json")) > 0


# --- 7. tables escape what their format needs -------------------------------------------------------------------
@pytest.mark.slow  # a report with figures: about 10 s on 2 busy cores
def test_tables_escape_a_hostile_model_name(tmp_path):
    hostile = "<script>alert(1)</script>|x\n[y](javascript:z)"
    runs = []
    for name, formula in (("standard-autoattack-Linf", hostile), ("gaussian-certify-0.25", "=HYPERLINK(1)")):
        run = _copy(FIXTURES / name, tmp_path / name)
        summary = json.loads((run / "summary.json").read_text())
        summary["model"] = formula
        (run / "summary.json").write_text(json.dumps(summary))
        runs.append(run)
    _ok(_invoke("report", *runs, "--out", tmp_path / "report" / "index.html"))
    tables = tmp_path / "report" / "tables"
    for markdown in tables.glob("*.md"):
        text = markdown.read_text()
        assert "<script>" not in text and "](javascript" not in text
        for table in text.split("\n\n"):
            rows = [line for line in table.splitlines() if line.startswith("|")]
            cells = {len(line.replace("\\|", "").split("|")) for line in rows}
            assert len(cells) <= 1, (markdown.name, rows)  # every row has the header's columns
    assert "&lt;script&gt;" in (tables / "adversarial.md").read_text()
    assert "'=HYPERLINK(1)" in (tables / "certified.csv").read_text()
    latex = (tables / "adversarial.tex").read_text()
    assert "\\textless{}script\\textgreater{}" in latex and "\\_" not in latex.replace("\\\\_", "")


def test_merge_refuses_a_label_changed_away_from_the_data_set_s(certified_shards, tmp_path):
    def relabelled(record: dict) -> None:  # consistent with itself: label, prediction and class moved together
        other = (record["label"] + 1) % 10
        record.update(label=other, top_class=other, **({"prediction": other} if record["prediction"] is not None else {}))

    s1, s2 = _edited_shard(certified_shards, tmp_path, relabelled)
    message = one_line_error(_invoke("merge", s1, s2, "--out", tmp_path / "merged"), "line 2: field label")
    assert "samples.jsonl" in message
    assert not (tmp_path / "merged" / "summary.json").exists()
    merged = _invoke("merge", *certified_shards, "--out", tmp_path / "intact")
    _ok(merged)
    assert "labels checked against data set 'digits'" in merged.stdout
