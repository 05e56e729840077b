"""Issue 15: shards over images merge to exactly the unsharded run; torchrun ranks are shards; merge refuses
what is not one finished run; a killed shard resumes; the README's job-array example runs as printed."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from attack_fixtures import saturated_linear_problem

from robusteval.attacks.evaluate import evaluate_attack
from robusteval.attacks.resume import adversarial_file_name
from robusteval.benchmark import GridRun, spread_devices
from robusteval.core.errors import UsageError
from robusteval.reports.loading import load_runs
from robusteval.reports.regression import entries_from_runs
from robusteval.runs.shards import MergeRefused, Shard
from robusteval.scale.merge import merge
from robusteval.smoothing.engine import certify

ROOT = Path(__file__).resolve().parent.parent
# Records' and summaries' times differ between processes; everything else must be equal.
TIMES = {"seconds", "batch_seconds"}
CERTIFY = dict(sigma=0.25, n0=10, n=100, n_images=7, batch_size=220, compile=False)  # 2 images a batch: 4 batches


def _records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES}
            for line in (path / "samples.jsonl").read_text().splitlines()]


def _summary(path: Path) -> dict:
    return {k: v for k, v in json.loads((path / "summary.json").read_text()).items() if k not in TIMES}


def _config(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    config.pop("provenance")
    return config


def _assert_same_run(merged: Path, unsharded: Path) -> None:
    assert _records(merged) == _records(unsharded)
    assert _summary(merged) == _summary(unsharded)
    assert _config(merged) == _config(unsharded)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def unsharded_certify(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certify") / "full"
    certify("gaussian", "digits", out=out, **CERTIFY)
    return out


# --- the shard plan --------------------------------------------------------------------------
def test_shards_cut_whole_batches_and_cover_the_plan_once():
    for batches in range(1, 12):
        for count in range(1, batches + 1):
            parts = [Shard(i, count).batches(batches) for i in range(1, count + 1)]
            assert [b for part in parts for b in part] == list(range(batches))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1
    # 7 images in batches of 2 (the last holds 1) cut into 3: batches 0 | 1 | 2, 3.
    assert [Shard(i, 3).items(7, 2) for i in (1, 2, 3)] == [range(0, 2), range(2, 4), range(4, 7)]
    with pytest.raises(UsageError, match="at least one whole batch"):
        Shard(3, 3).batches(2)
    for text in ("0/2", "3/2", "1-2", "a/b"):
        with pytest.raises(UsageError):
            Shard.parse(text)
    assert Shard.parse(" 2 / 4 ") == Shard(2, 4)


# --- certify ---------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [2, 3])
def test_sharded_certify_merges_to_the_unsharded_run(tmp_path, unsharded_certify, count):
    shards = []
    for i in range(1, count + 1):
        out = tmp_path / f"s{i}"
        result = certify("gaussian", "digits", out=out, shard=f"{i}/{count}", **CERTIFY)
        assert json.loads((out / "config.json").read_text())["shard"] == f"{i}/{count}"
        shards.append((out, len(result.records)))
    # Uneven: 4 batches of 2, 2, 2, 1 images.
    assert [n for _, n in shards] == ([4, 3] if count == 2 else [2, 2, 3])
    merged = merge([p for p, _ in shards], tmp_path / "merged")
    assert len(merged.records) == 7
    _assert_same_run(tmp_path / "merged", unsharded_certify)
    # A merged run is an ordinary run: report and check read it, and the unsharded command resumes it as done.
    (run,) = load_runs([tmp_path / "merged"])
    assert run.kind == "certify" and run.summary["n_images"] == 7
    entries = [{key: dataclasses.replace(entry, run="") for key, entry in entries_from_runs(load_runs([p])).items()}
               for p in (tmp_path / "merged", unsharded_certify)]
    assert entries[0] == entries[1] and len(entries[0]) == 1
    again = certify("gaussian", "digits", out=tmp_path / "merged", **CERTIFY)
    assert [r["radius"] for r in again.records] == [r["radius"] for r in _records(unsharded_certify)]


SEQUENTIAL = dict(sigma=0.25, n0=10, method="sequential", radii=[0.25, 0.5], n_max=200, n_images=7,
                  batch_size=420, compile=False)  # 210 draws an image: 2 images a batch, 4 batches


def test_sharded_sequential_certify_merges_to_the_unsharded_run(tmp_path):
    # The sequential sampler draws each image's noise from its index and round only, so a shard (its own
    # image range, batches numbered from its first) gives the unsharded run's records.
    full = certify("gaussian", "digits", out=tmp_path / "full", **SEQUENTIAL)
    assert len({r["draws"] for r in full.records}) > 1  # images stop at different looks: a real sequential run
    parts = [certify("gaussian", "digits", out=tmp_path / f"s{i}", shard=f"{i}/2", **SEQUENTIAL) for i in (1, 2)]
    assert [len(p.records) for p in parts] == [4, 3]
    assert parts[1].records[0]["index"] == 4
    merge([tmp_path / "s1", tmp_path / "s2"], tmp_path / "merged")
    _assert_same_run(tmp_path / "merged", tmp_path / "full")
    assert _summary(tmp_path / "merged")["method"] == "sequential"


def test_merge_refusals(tmp_path, unsharded_certify):
    s1, s2, s3 = (tmp_path / f"s{i}" for i in (1, 2, 3))
    certify("gaussian", "digits", out=s1, shard="1/2", **CERTIFY)
    certify("gaussian", "digits", out=s2, shard="2/2", **CERTIFY)
    certify("gaussian", "digits", out=s3, shard="2/3", **CERTIFY)
    # The batch size is not part of a certify run's configuration (each image's noise depends on its index
    # only), so shards cut with other batch sizes are refused by their images: 3 images a batch puts 2/2 at
    # images 3..6 (overlapping 1/2's 0..3), 1 image a batch puts 1/2 at 0..2 (leaving 3 out).
    s2_wide = tmp_path / "s2wide"
    certify("gaussian", "digits", out=s2_wide, shard="2/2", **{**CERTIFY, "batch_size": 330})
    s1_narrow = tmp_path / "s1narrow"
    certify("gaussian", "digits", out=s1_narrow, shard="1/2", **{**CERTIFY, "batch_size": 110})
    other_seed = tmp_path / "seed1"
    certify("gaussian", "digits", out=other_seed, shard="2/2", **{**CERTIFY, "seed": 1})
    cases = [
        ([s1, other_seed], "different configurations.*seed"),
        ([s1, s1], "given twice"),
        ([s1, s3], "overlap"),
        ([s1, s2_wide], r"holds images 0\.\.3 and .* images 3\.\.6: they overlap"),
        ([s1_narrow, s2], r"they leave images 3\.\.3 out"),
        ([s1], r"2/2 missing"),
        ([unsharded_certify], "not a shard"),
        ([tmp_path / "nothing"], "not a run directory"),
    ]
    for dirs, message in cases:
        with pytest.raises(MergeRefused, match=message):
            merge(dirs, tmp_path / "merged")
    with pytest.raises(MergeRefused, match="holds another run.*seed"):
        merge([s1, s2], other_seed.with_name("seed1"))  # --out on a directory of another run
    (s2 / "summary.json").unlink()  # as a shard killed before its end leaves it
    with pytest.raises(MergeRefused, match="unfinished"):
        merge([s1, s2], tmp_path / "merged")
    assert not (tmp_path / "merged" / "summary.json").exists()
    # The command line says the same in one line, with exit code 2.
    done = subprocess.run([sys.executable, "-m", "robusteval", "merge", str(s1), str(s2), "--out",
                           str(tmp_path / "merged")], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 2 and "unfinished" in done.stderr and "Traceback" not in done.stderr


# --- attack ----------------------------------------------------------------------------------
ATTACK = dict(attack="pgd", eps=[0.05, 0.2], n=10, batch_size=3, steps=3)  # batches of 3, 3, 3, 1


def test_sharded_attack_merges_to_the_unsharded_run(tmp_path):
    full = evaluate_attack("standard", "digits", out=tmp_path / "full", **ATTACK)
    for count in (2, 3):
        dirs = [tmp_path / f"{count}-{i}" for i in range(1, count + 1)]
        for i, out in enumerate(dirs, start=1):
            evaluate_attack("standard", "digits", out=out, shard=f"{i}/{count}", **ATTACK)
        if count == 3:
            # A finished shard whose summary is lost takes its examples from its own files again (cut at its
            # own first point) and recomputes the summary.
            (dirs[1] / "summary.json").unlink()
            evaluate_attack("standard", "digits", out=dirs[1], shard="2/3", **ATTACK)
        merged_dir = tmp_path / f"merged{count}"
        merge(dirs, merged_dir)
        _assert_same_run(merged_dir, tmp_path / "full")
        summary = json.loads((merged_dir / "summary.json").read_text())
        assert summary["curve"] == full.summary()["curve"] and summary["checks"] == full.summary()["checks"]
        assert any(c["check"] == "large-eps" and c["status"] != "n/a" for c in summary["checks"])
        for eps in ATTACK["eps"]:
            name = adversarial_file_name(eps)
            merged = torch.load(merged_dir / name, weights_only=True)
            assert merged.shape[0] == 10 and torch.equal(merged, torch.load(tmp_path / "full" / name,
                                                                            weights_only=True))


def test_sharded_adaptive_attack_merges_to_the_unsharded_run(tmp_path):
    """The per-point fields of the adaptive stages (gradient causes, the attack's own figure, worst-of-N) and
    the model facts the record checks need (classes, randomized) survive the merge."""
    model, x, y, _ = saturated_linear_problem(n=12)
    options = dict(attack="apgd-ce", eps=[0.03, 0.1], defense="noise:0.05", eot=2, decision_draws=5,
                   batch_size=4, device="cpu")
    full = evaluate_attack(model, (x, y), out=tmp_path / "full", **options)
    for i in (1, 2):
        evaluate_attack(model, (x, y), out=tmp_path / f"s{i}", shard=f"{i}/2", **options)
    merge([tmp_path / "s1", tmp_path / "s2"], tmp_path / "merged")
    _assert_same_run(tmp_path / "merged", tmp_path / "full")
    summary = full.summary()
    assert any(r.get("gradient_cause") for r in full.records)
    assert all(p["worst_of_n_robust_accuracy"] is not None for p in summary["curve"])
    assert summary["curve"][-1]["standard_robust_accuracy"] > summary["curve"][-1]["robust_accuracy"]
    assert {c["check"] for c in summary["checks"]} >= {"zero-gradients", "decision-gap", "large-eps"}


# --- torchrun ---------------------------------------------------------------------------------
def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run"]


# --draws, not --n: torchrun's own parser would take --n for an abbreviation of its options.
CERTIFY_ARGS = ["--model", "gaussian", "--sigma", "0.25", "--n0", "10", "--draws", "100", "--n-images", "7",
                "--batch-size", "220", "--no-compile", "--quiet"]


def test_torchrun_ranks_run_shards_and_rank0_merges(tmp_path, unsharded_certify):
    out = tmp_path / "merged"
    done = subprocess.run([*_torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "robusteval", "certify",
                           *CERTIFY_ARGS, "--out", str(out)], capture_output=True, text=True, env=_env(),
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(out, unsharded_certify)
    # Each rank kept its own resumable shard; rank 0 printed the merged summary, once.
    assert [json.loads((tmp_path / f"merged-shard{i}of2" / "config.json").read_text())["shard"] for i in (1, 2)] \
        == ["1/2", "2/2"]
    assert done.stdout.count("certified accuracy (7 images") == 1


# --- a killed shard ----------------------------------------------------------------------------
def test_killed_shard_resumes_and_the_merge_is_still_equal(tmp_path):
    # One image a batch and enough draws that the kill comes between batches, some done and some not.
    settings = {**CERTIFY, "n": 3000, "batch_size": 3010}
    arguments = [*CERTIFY_ARGS, "--draws", "3000", "--batch-size", "3010"]

    def command(i: int) -> list[str]:
        return [sys.executable, "-m", "robusteval", "certify", *arguments, "--shard", f"{i}/2",
                "--out", str(tmp_path / f"s{i}")]

    certify("gaussian", "digits", out=tmp_path / "full", **settings)
    subprocess.run(command(1), check=True, capture_output=True, env=_env(), timeout=300)
    victim = subprocess.Popen(command(2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    samples = tmp_path / "s2" / "samples.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        if samples.exists() and samples.read_text().count("\n") >= 1:
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the shard finished before it could be killed"
    done_before = samples.read_text().count("\n")
    assert 1 <= done_before < 4
    with pytest.raises(MergeRefused, match="unfinished"):
        merge([tmp_path / "s1", tmp_path / "s2"], tmp_path / "merged")
    resumed = subprocess.run(command(2), capture_output=True, text=True, env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {tmp_path / 's2'} ({done_before}/4 images done)" in resumed.stderr
    merge([tmp_path / "s1", tmp_path / "s2"], tmp_path / "merged")
    _assert_same_run(tmp_path / "merged", tmp_path / "full")


# --- the README's job-array example -------------------------------------------------------------
def test_readme_job_array_example_runs_as_printed(tmp_path):
    readme = (ROOT / "README.md").read_text()
    script = re.search(r"```bash\n(#!/bin/bash\n#SBATCH.*?)```", readme, re.S)
    assert script is not None, "README lacks the sbatch example"
    lines = [line for line in script.group(1).splitlines() if line.strip() and not line.startswith("#")]
    shard_lines = [line for line in lines if "--shard" in line]
    merge_block = re.search(r"```bash\n(robusteval merge .*?)```", readme, re.S)
    assert len(shard_lines) == 1 and merge_block is not None
    count = int(re.search(r"#SBATCH --array=1-(\d+)", script.group(1)).group(1))
    for task in range(1, count + 1):
        env = {**_env(), "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(count)}
        done = subprocess.run(["bash", "-c", "\n".join(lines)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run(["bash", "-c", merge_block.group(1)], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    merged = next(p for p in tmp_path.rglob("summary.json") if "shard" not in p.parent.name).parent
    # The same command without --shard gives the same run.
    unsharded = lines[0].replace('--shard "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}"', "")
    unsharded = re.sub(r"--out \S+", f"--out {tmp_path / 'full'}", unsharded)
    subprocess.run(["bash", "-c", unsharded], cwd=tmp_path, env=_env(), check=True, capture_output=True,
                   timeout=300)
    _assert_same_run(merged, tmp_path / "full")


# --- benchmark ---------------------------------------------------------------------------------
def test_benchmark_jobs_spread_over_gpus_and_shards_split_the_run_list(tmp_path):
    work = [GridRun("certify", f"m{i}", "digits", {}, tmp_path / f"r{i}", cost=10 - i) for i in range(5)]
    spread = spread_devices(work, jobs=2, device="auto", gpus=2)
    assert [job.options["device"] for job in spread] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert spread_devices(work, jobs=2, device="cpu", gpus=2) == work  # an explicit device is kept
    assert spread_devices(work, jobs=1, device="auto", gpus=2) == work
    assert spread_devices(work, jobs=2, device="auto", gpus=0) == work
    parts = [Shard(i, 2).pick(work) for i in (1, 2)]
    assert [j.model for j in parts[0]] == ["m0", "m2", "m4"] and [j.model for j in parts[1]] == ["m1", "m3"]


def test_benchmark_shard_runs_its_part_of_the_suite(tmp_path, monkeypatch):
    import robusteval.benchmark as benchmark

    ran: dict[str, list[str]] = {}
    for part in ("1/2", "2/2"):
        ran[part] = []
        monkeypatch.setattr(benchmark, "run_job",
                            lambda job, part=part: (ran[part].append(job.label), (str(job.out), 0.0))[1])
        result = benchmark.run_benchmark(benchmark.resolve_suite("digits-ci"), tmp_path, models=("standard",),
                                         shard=part)
        assert sorted(map(str, result.finished)) == sorted(str(tmp_path / "digits-ci" / label) for label in ran[part])
    every = [p.name for p in result.planned]
    assert len(every) >= 2 and sorted(ran["1/2"] + ran["2/2"]) == sorted(every)
    assert not set(ran["1/2"]) & set(ran["2/2"])
