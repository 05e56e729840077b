"""`robusteval run` and `robusteval list attacks` end to end, including resuming after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from attack_fixtures import clopper_pearson
from cli_helpers import summary_without_time
from click.testing import CliRunner

from robusteval.cli import main
from robusteval.model_zoo.factory import model_card

RESUME_ARGS = ["run", "--model", "standard", "--attack", "apgd-ce", "--eps", "0.05,0.1", "--n", "40",
               "--batch-size", "5", "--device", "cpu", "--seed", "3", "--quiet"]


def _records(path: Path) -> list[dict]:
    lines = (path / "samples.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "batch_seconds"} for line in lines if line.strip()]


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_to_the_uninterrupted_summary(tmp_path, monkeypatch):
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "robusteval.cli", *RESUME_ARGS, "--out", str(killed)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples = killed / "samples.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if samples.exists() and samples.read_bytes().count(b"\n") >= 5:  # at least one batch of 5 written
                break
            time.sleep(0.005)
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()}"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists()
    written = len(_records(killed))
    assert 5 <= written < 40

    # Count the points APGD attacks at the run's ε (not the large-ε check) after the restart: only the
    # unfinished batches' points may be attacked again, where recomputing everything attacks all 40's.
    import torchattacks

    attacked: dict[float, int] = {}
    real_forward = torchattacks.APGD.forward

    def counting_forward(self, images, labels):
        attacked[round(float(self.eps), 6)] = attacked.get(round(float(self.eps), 6), 0) + len(images)
        return real_forward(self, images, labels)

    monkeypatch.setattr(torchattacks.APGD, "forward", counting_forward)
    runner = CliRunner()
    resumed = runner.invoke(main, [*RESUME_ARGS, "--out", str(killed)])
    assert resumed.exit_code == 0, resumed.output
    after_restart = dict(attacked)
    attacked.clear()
    fresh = runner.invoke(main, [*RESUME_ARGS, "--out", str(tmp_path / "fresh")])
    assert fresh.exit_code == 0, fresh.output
    fresh_records = _records(tmp_path / "fresh")
    left = [r for r in fresh_records[written:] if r["correct"]]
    # At ε = 0.05 APGD attacks exactly the correct points of the batches left; the fresh run attacks them all.
    assert after_restart[0.05] == len(left) < attacked[0.05] == sum(r["correct"] for r in fresh_records)

    assert summary_without_time(killed) == summary_without_time(tmp_path / "fresh")
    assert _records(killed) == _records(tmp_path / "fresh")
    for eps in ("0.05", "0.1"):
        name = f"adversarial_eps{eps}.pt"
        restored = torch.load(killed / name, weights_only=True)
        assert restored.shape == (40, 1, 8, 8)
        assert torch.equal(restored, torch.load(tmp_path / "fresh" / name, weights_only=True))


@pytest.mark.slow
def test_run_egc_autoattack_writes_a_valid_run_directory(tmp_path):
    # egc ships with digits weights: this must run, not skip.
    assert "digits" in model_card("egc").checkpoints()
    out = tmp_path / "egc"
    result = CliRunner().invoke(main, ["run", "--model", "egc", "--attack", "autoattack", "--n", "20", "--eps",
                                       "0.1,0.3", "--device", "cpu", "--quiet", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "attack" and summary["model"] == "egc" and summary["attack"] == "autoattack"
    assert summary["n"] == 20 and [p["eps"] for p in summary["curve"]] == [0.1, 0.3]
    accuracies = [p["robust_accuracy"] for p in summary["curve"]]
    assert summary["clean_accuracy"] >= accuracies[0] >= accuracies[1]
    for point in summary["curve"]:
        robust = round(point["robust_accuracy"] * 20)
        assert (point["ci_low"], point["ci_high"]) == pytest.approx(clopper_pearson(robust, 20), abs=1e-9)
    assert set(k for p in summary["curve"] for k in p["broken_by"]) <= {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert len((out / "samples.jsonl").read_text().splitlines()) == 20
    assert json.loads((out / "config.json").read_text())["model"] == "egc"
    for eps in ("0.1", "0.3"):
        assert torch.load(out / f"adversarial_eps{eps}.pt", weights_only=True).shape == (20, 1, 8, 8)


def test_list_attacks_and_unknown_names():
    runner = CliRunner()
    listed = runner.invoke(main, ["list", "attacks"])
    assert listed.exit_code == 0
    for name in ("fgsm", "pgd", "pgd-l2", "cw-l2", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square", "eot-pgd",
                 "autoattack", "autoattack-rand"):
        assert f"\n{name} " in listed.output
    catalog = {a["name"]: a for a in json.loads(runner.invoke(main, ["list", "attacks", "--json"]).output)}
    assert catalog["autoattack"]["members"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert catalog["autoattack"]["defaults"]["square_queries"] == 5000
    assert catalog["pgd-l2"]["norms"] == ["L2"]
    wrong = runner.invoke(main, ["run", "--model", "standard", "--attack", "autoatack", "--n", "5"])
    assert wrong.exit_code == 2
    assert "Did you mean: autoattack" in wrong.output
