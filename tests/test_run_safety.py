"""Run directories that cannot be corrupted, and inputs that cannot be silently wrong (issue 18), end to end.

Each test is one way a hostile or careless user broke a run before: two processes in one directory, a model
evaluated on images of another size, a rejected command leaving a directory behind, unwritable outputs,
damaged JSON, a subset of the classes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error, summary_without_time
from click.testing import CliRunner

from robusteval.cli import main
from robusteval.data import load_digits
from robusteval.model_zoo.registry import WEIGHTS_DIR

STANDARD_WEIGHTS = str(WEIGHTS_DIR / "standard-digits.safetensors")
ATTACK = ["run", "--model", "standard", "--attack", "fgsm", "--eps", "0.05,0.1", "--device", "cpu", "--quiet",
          "--no-large-eps-check"]
CERTIFY = ["certify", "--model", "gaussian", "--sigma", "0.25", "--n0", "10", "--n", "50", "--n-images", "3",
           "--device", "cpu", "--no-compile", "--quiet"]


def _records(path: Path) -> list[dict]:
    lines = (path / "samples.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "batch_seconds"} for line in lines if line.strip()]


@pytest.fixture(scope="module")
def npz_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("npz")
    digits = load_digits("test")
    rng = np.random.default_rng(0)
    files = {
        "28x28": folder / "mnist-sized.npz",
        "digits 0-4": folder / "digits-0-4.npz",
        "label 10": folder / "label-10.npz",
    }
    np.savez(files["28x28"], x=rng.integers(0, 256, (12, 1, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 12))
    low = digits.y < 5
    np.savez(files["digits 0-4"], x=digits.x[low].numpy(), y=digits.y[low].numpy())
    np.savez(files["label 10"], x=digits.x[:6].numpy(), y=np.array([0, 1, 2, 10, 4, 5]))
    return files


# --- two processes, one directory ------------------------------------------------------------------------------
def test_two_processes_on_one_directory_one_refuses_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    args = ["run", "--model", "standard", "--attack", "apgd-ce", "--eps", "0.05,0.1", "--n", "40", "--batch-size",
            "5", "--device", "cpu", "--seed", "3", "--quiet"]
    shared = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.Popen([sys.executable, "-m", "robusteval.cli", *args, "--out", str(shared)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples = shared / "samples.jsonl"
    deadline = time.monotonic() + 180
    waiter = None
    try:
        while time.monotonic() < deadline and first.poll() is None:
            if samples.exists() and samples.read_bytes().count(b"\n") >= 5:  # it holds the lock and is working
                break
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)  # frozen mid-run, still holding the lock
        assert first.poll() is None, f"the first run ended too early: {first.stderr.read().decode()}"

        second = subprocess.run([sys.executable, "-m", "robusteval.cli", *args, "--out", str(shared)], env=env,
                                capture_output=True, text=True, timeout=180)
        assert second.returncode == 2, second.stderr
        message = second.stderr.strip().splitlines()[-1]
        assert message.startswith("error: ") and f"process {first.pid}" in message and "--wait" in message

        # A third waits for the first; it resumes once the first is killed (the OS drops the lock).
        waiter_log = tmp_path / "waiter.err"
        with waiter_log.open("w") as log:
            waiter = subprocess.Popen([sys.executable, "-m", "robusteval.cli", *args, "--out", str(shared),
                                       "--wait"], env=env, stdout=subprocess.DEVNULL, stderr=log)
        while time.monotonic() < deadline and waiter.poll() is None:
            if f"waiting for process {first.pid}" in waiter_log.read_text():
                break
            time.sleep(0.05)
        assert waiter.poll() is None, waiter_log.read_text()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert waiter is not None
    assert waiter.wait(timeout=300) == 0, waiter_log.read_text()
    assert f"waiting for process {first.pid}" in waiter_log.read_text()

    fresh = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "fresh")])
    assert fresh.exit_code == 0, fresh.output
    records = _records(shared)
    assert sorted(r["index"] for r in records) == list(range(40))  # never duplicated
    assert records == _records(tmp_path / "fresh")
    assert summary_without_time(shared) == summary_without_time(tmp_path / "fresh")


# --- images of the wrong size, labels of a subset ----------------------------------------------------------------
@pytest.mark.parametrize("command", [
    [*ATTACK, "--n", "4"],
    ["certify", "--model", "standard", "--sigma", "0.25", "--n0", "5", "--n", "10", "--device", "cpu"],
    ["predict", "--model", "standard", "--sigma", "0.25", "--n", "10", "--device", "cpu"],
])
def test_a_digits_model_on_28x28_images_is_an_error_naming_both_shapes(npz_files, tmp_path, command):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [*command, "--dataset", str(npz_files["28x28"]), "--checkpoint",
                                       STANDARD_WEIGHTS, "--out", str(out)])
    one_line_error(result, "1×8×8", "1×28×28", "standard")
    assert not out.exists()


def test_denoising_checks_the_image_shape_too(npz_files, tmp_path):
    import robusteval
    from robusteval.core.preflight import DataModelMismatch
    from robusteval.data import load_npz
    from robusteval.generative.denoising import evaluate_denoising

    model = robusteval.create_model("cdn", device="cpu")
    with pytest.raises(DataModelMismatch, match="1×8×8.*1×28×28"):
        evaluate_denoising(model, load_npz(npz_files["28x28"]), n_images=2, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_labels_0_to_4_of_the_digits_are_accepted_and_a_label_beyond_the_classes_is_not(npz_files, tmp_path):
    runner = CliRunner()
    subset = runner.invoke(main, [*ATTACK, "--n", "10", "--dataset", str(npz_files["digits 0-4"]), "--checkpoint",
                                  STANDARD_WEIGHTS, "--out", str(tmp_path / "subset"), "--json"])
    assert subset.exit_code == 0, subset.output
    summary = json.loads(subset.stdout)
    assert summary["n"] == 10 and summary["clean_accuracy"] >= 0.8  # the real digits model on real digits
    records = _records(tmp_path / "subset")
    assert {r["label"] for r in records} <= set(range(5)) and max(r["clean_prediction"] for r in records) < 10

    beyond = runner.invoke(main, [*ATTACK, "--dataset", str(npz_files["label 10"]), "--checkpoint",
                                  STANDARD_WEIGHTS, "--out", str(tmp_path / "beyond")])
    one_line_error(beyond, "labels in [0, 10]", "10 classes")
    assert not (tmp_path / "beyond").exists()


# --- nothing written before the job is valid -------------------------------------------------------------------
@pytest.mark.parametrize("extra, fragment", [
    (["--defense", "denoise:0.25"], "does not have the capability 'denoise'"),
    (["--eps", "2"], "exceeds 1"),
    (["--attack", "pgd-l2", "--norm", "L2", "--eps", "9"], "exceeds √64 = 8"),
    (["--gradient", "full"], "--gradient full applies to denoise, purify and sgld defenses only"),
    (["--gradient", "bpda"], "--gradient bpda applies to denoise, purify and sgld defenses only"),
    (["--gradient", "surrogate:2"], "a surrogate process applies to purify defenses only"),
    (["--gradient", "sideways"], "--gradient must be one of full, bpda, surrogate:K', auto"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "meta"], "device 'meta' is not supported"),
])
def test_a_rejected_run_is_one_line_and_leaves_no_directory(tmp_path, extra, fragment):
    out = tmp_path / "runs" / "x"
    result = CliRunner().invoke(main, [*ATTACK, "--n", "4", "--out", str(out), *extra])
    one_line_error(result, fragment)
    assert not (tmp_path / "runs").exists()


def test_a_rejected_default_directory_is_not_created_either(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [*ATTACK, "--n", "4", "--defense", "denoise:0.25"])
    one_line_error(result, "capability 'denoise'")
    assert list(tmp_path.iterdir()) == []


def test_a_certify_without_the_needed_capability_leaves_no_directory(tmp_path):
    result = CliRunner().invoke(main, [*CERTIFY, "--mode", "denoised", "--out", str(tmp_path / "x")])
    one_line_error(result, "capability 'denoise'")
    assert not (tmp_path / "x").exists()


# --- unwritable outputs ------------------------------------------------------------------------------------------
@pytest.fixture()
def blocked(tmp_path) -> Path:
    """An output path whose parent is a regular file: no user, root included, can create it."""
    (tmp_path / "file").write_text("in the way")
    return tmp_path / "file" / "out"


def test_an_out_below_a_file_is_one_line_for_run_certify_and_report(tmp_path, blocked):
    runner = CliRunner()
    one_line_error(runner.invoke(main, [*ATTACK, "--n", "4", "--out", str(blocked)]), str(blocked), "is a file")
    one_line_error(runner.invoke(main, [*CERTIFY, "--out", str(blocked)]), str(blocked), "is a file")
    finished = tmp_path / "finished"
    assert runner.invoke(main, [*CERTIFY, "--out", str(finished)]).exit_code == 0
    one_line_error(runner.invoke(main, ["report", str(finished), "--out", str(blocked / "r.html")]),
                    "is a file")


def test_a_folder_without_write_permission_is_one_line(tmp_path, monkeypatch):
    # Permissions cannot be tested as root (it ignores them); the OS's answer is simulated instead.
    real_access = os.access
    locked = tmp_path / "readonly"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    runner = CliRunner()
    one_line_error(runner.invoke(main, [*ATTACK, "--n", "4", "--out", str(locked / "run")]), "not writable")
    one_line_error(runner.invoke(main, [*CERTIFY, "--out", str(locked / "run")]), "not writable")
    assert not (locked / "run").exists()


def test_an_os_error_while_creating_the_directory_is_one_line(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    result = CliRunner().invoke(main, [*ATTACK, "--n", "4", "--out", str(tmp_path / "run")])
    one_line_error(result, "cannot create run directory", "Permission denied")


# --- damaged run files -------------------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def test_a_truncated_summary_is_recomputed_by_run_and_named_by_report(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    args = [*ATTACK, "--n", "10", "--out", str(out)]
    assert runner.invoke(main, args).exit_code == 0
    intact = summary_without_time(out)
    _truncate(out / "summary.json")

    report = runner.invoke(main, ["report", str(out), "--out", str(tmp_path / "report.html")])
    one_line_error(report, str(out / "summary.json"), "damaged")

    again = runner.invoke(main, args)
    assert again.exit_code == 0, again.output
    assert summary_without_time(out) == intact  # recomputed from the intact records and adversarial examples


def test_a_truncated_summary_of_certify_is_recomputed(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    assert runner.invoke(main, [*CERTIFY, "--out", str(out)]).exit_code == 0
    intact = summary_without_time(out)
    _truncate(out / "summary.json")
    assert runner.invoke(main, [*CERTIFY, "--out", str(out)]).exit_code == 0
    assert summary_without_time(out) == intact


@pytest.mark.parametrize("command", [ATTACK + ["--n", "5"], CERTIFY])
def test_a_truncated_config_names_the_file_and_no_resume_starts_afresh(tmp_path, command):
    runner = CliRunner()
    out = tmp_path / "run"
    assert runner.invoke(main, [*command, "--out", str(out)]).exit_code == 0
    intact = summary_without_time(out)
    _truncate(out / "config.json")
    one_line_error(runner.invoke(main, [*command, "--out", str(out)]), str(out / "config.json"), "--no-resume")
    report = runner.invoke(main, ["report", str(out), "--out", str(tmp_path / "report.html")])
    one_line_error(report, str(out / "config.json"))
    assert runner.invoke(main, [*command, "--out", str(out), "--no-resume"]).exit_code == 0
    assert summary_without_time(out) == intact


def test_duplicated_certify_records_are_refused_naming_the_line(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    assert runner.invoke(main, [*CERTIFY, "--n-images", "2", "--out", str(out)]).exit_code == 0
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(lines + lines))  # what two writers left before the lock
    (out / "summary.json").unlink()
    result = runner.invoke(main, [*CERTIFY, "--n-images", "2", "--out", str(out)])
    one_line_error(result, f"{out / 'samples.jsonl'} line 3", "recorded twice")


# --- small items -------------------------------------------------------------------------------------------------
def test_certify_accepts_allow_unsafe_pickle_as_its_error_advises(tmp_path):
    import robusteval

    checkpoint = tmp_path / "gaussian.pt"
    torch.save({"state_dict": robusteval.create_model("gaussian").state_dict(), "note": object.__name__}, checkpoint)
    runner = CliRunner()
    result = runner.invoke(main, [*CERTIFY, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output  # plain data: weights_only loads it
    result = runner.invoke(main, [*CERTIFY, "--checkpoint", str(checkpoint), "--allow-unsafe-pickle",
                                  "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert summary_without_time(tmp_path / "a")["certified_accuracy"] == summary_without_time(tmp_path / "b")["certified_accuracy"]


def test_seconds_of_a_resumed_denoise_run_count_every_process(tmp_path):
    import robusteval
    from robusteval.generative.denoising import evaluate_denoising

    digits = load_digits("test")
    model = robusteval.create_model("cdn", device="cpu")
    denoise = model.denoise

    def slow_then_killed(x, sigma):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # killed during the second batch
        time.sleep(1.0)
        return denoise(x, sigma)

    calls: list[int] = []
    model.denoise = slow_then_killed
    with pytest.raises(KeyboardInterrupt):
        evaluate_denoising(model, digits, sigmas=[0.25], n_images=8, batch_size=4, out=tmp_path / "run")
    model.denoise = denoise
    summary = evaluate_denoising(model, digits, sigmas=[0.25], n_images=8, batch_size=4, out=tmp_path / "run")
    assert summary["seconds"] >= 1.0  # the first process's slow batch counts
