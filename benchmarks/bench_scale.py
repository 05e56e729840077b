"""Scale-out benchmark (issue 15): one single-threaded process against N single-threaded shards under torchrun.

For a certification and an attack run of the same work, it times (wall clock, start-up and merge included)

- `robusteval certify|run ...` in one process (OMP_NUM_THREADS=1), and
- `torchrun --standalone --nproc-per-node N -m robusteval certify|run ...` (gloo on the CPU, one thread per
  rank), whose rank 0 merges the shards,

checks that the merged run equals the single-process run (records, summary and, for the attack, the
adversarial examples; times aside), and prints the throughput ratio, the parallel efficiency, and the
expected wall time on G devices from the measured compute per shard and the fixed cost (start-up, merge):

    time(G) ≈ fixed + compute(1 process) / G,  fixed = time(N ranks) − max compute of a shard

Usage (about 30 minutes on 2 cores with the default 3 repeats; nothing else should run):

    python benchmarks/bench_scale.py                 # both workloads, 2 ranks, 3 timed pairs each (median)
    python benchmarks/bench_scale.py --only certify --ranks 2 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TIMES = {"seconds", "batch_seconds"}

WORKLOADS = {
    # 200 digits images (about as long as the attack run: torchrun's own ~3 s of launcher start-up and
    # shutdown weigh the same), Cohen et al.'s n0 = 100 and n = 10,000 at σ = 0.25 (the gaussian baseline's σ).
    "certify": ["certify", "--model", "gaussian", "--sigma", "0.25", "--n0", "100", "--draws", "10000",
                "--n-images", "200", "--batch-size", "2000", "--no-compile", "--quiet"],
    # AutoAttack (standard) at the digits headline ε on --attack-points points (400: 8 batches of 50, 4 per rank).
    "attack": ["run", "--model", "standard", "--attack", "autoattack", "--eps", "0.1", "--batch-size", "50",
               "--quiet"],
}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def _records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES}
            for line in (path / "samples.jsonl").read_text().splitlines()]


def _summary(path: Path) -> dict:
    return {k: v for k, v in json.loads((path / "summary.json").read_text()).items() if k not in TIMES}


def _identical(a: Path, b: Path) -> bool:
    if _records(a) != _records(b) or _summary(a) != _summary(b):
        return False
    for tensor_file in sorted(a.glob("adversarial_eps*.pt")):
        if not torch.equal(torch.load(tensor_file, weights_only=True),
                           torch.load(b / tensor_file.name, weights_only=True)):
            return False
    return True


def _shard_compute(merged: Path, ranks: int) -> list[float]:
    """Each shard's own compute seconds, from its summary (the engines sum their batches' times)."""
    return [float(json.loads((merged.with_name(f"{merged.name}-shard{i}of{ranks}") / "summary.json")
                             .read_text())["seconds"]) for i in range(1, ranks + 1)]


def bench(name: str, ranks: int, folder: Path, attack_points: int, repeat: int) -> float:
    """One timed pair (the single process and the sharded launch, in turn first); returns the throughput ratio."""
    arguments = WORKLOADS[name] + (["--points", str(attack_points)] if name == "attack" else [])
    single = folder / f"{name}-single-{repeat}"
    sharded = folder / f"{name}-sharded-{repeat}"
    one = [sys.executable, "-m", "robusteval", *arguments, "--out", str(single)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
              "-m", "robusteval", *arguments, "--out", str(sharded)]
    # Alternate which goes first, so a machine slowing down or speeding up over minutes favours neither.
    if repeat % 2 == 0:
        t_single, t_sharded = _timed(one, folder), _timed(launch, folder)
    else:
        t_sharded, t_single = _timed(launch, folder), _timed(one, folder)
    same = _identical(single, sharded)
    compute_single = float(json.loads((single / "summary.json").read_text())["seconds"])
    shards = _shard_compute(sharded, ranks)
    fixed = max(0.0, t_sharded - max(shards))
    ratio = t_single / t_sharded
    print(f"{name:8s} 1 process {t_single:7.1f} s   {ranks} ranks {t_sharded:7.1f} s   throughput ratio "
          f"{ratio:.2f}x   efficiency {ratio / ranks:.0%}   identical results: {same}")
    print(f"{'':8s} compute: 1 process {compute_single:.1f} s, shards "
          f"{', '.join(f'{s:.1f}' for s in shards)} s; fixed cost (start-up, gather, merge) {fixed:.1f} s")
    expected = ", ".join(f"G={g}: {fixed + compute_single / g:.1f} s" for g in (1, 2, 4, 8, 16))
    print(f"{'':8s} expected wall time on G devices: {expected}", flush=True)
    if not same:
        raise SystemExit(f"{name}: the merged run differs from the single-process run")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(WORKLOADS), default=None)
    parser.add_argument("--ranks", type=int, default=2, help="torchrun processes (one thread each)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories in this folder")
    parser.add_argument("--attack-points", type=int, default=400,
                        help="points of the attack run (400; the fixed costs, start-up and the run's model checks "
                             "on its first points, weigh more on shorter runs: 200 gave 1.63x)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed pairs per workload (3): two processes on two cores leave no core for the "
                             "machine's own work, so one pair can be off by up to 10%%; the median is the figure")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.ranks} ranks, one thread per process")
    started = time.perf_counter()
    try:
        for name in [args.only] if args.only else list(WORKLOADS):
            ratios = sorted(bench(name, args.ranks, folder, args.attack_points, r) for r in range(args.repeats))
            if len(ratios) > 1:
                print(f"{name:8s} median of {len(ratios)}: {statistics.median(ratios):.2f}x "
                      f"(efficiency {statistics.median(ratios) / args.ranks:.0%}; "
                      f"range {ratios[0]:.2f}x to {ratios[-1]:.2f}x)", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"{time.perf_counter() - started:.0f} s (whole script)")


if __name__ == "__main__":
    main()
