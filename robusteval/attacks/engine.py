"""The attack engine: one loop for every attack, suite, ε list and defense.

`AttackJob.run` attacks the points batch by batch (`batch.BatchAttacker`,
moved to the device one batch at a time), then runs the checks of a finished
run (`reliability`) and writes the summary (`results`).

Each batch writes its adversarial examples (one shard, atomically) and then
appends its records to samples.jsonl; within a batch, the state after each ε
is saved too (atomically, `resume.BatchState`), so a killed run resumes from
the last finished (batch, ε). Every random draw is seeded from (seed, batch,
ε, …) (`seeds`), so a resumed run produces exactly the summary of an
uninterrupted one.

A shard (`robusteval.runs.shards`) attacks whole batches of the same plan, so
its records are the unsharded run's; the checks that attack the run's first
points again run in the shard holding batch 0, and `ATTACK_MERGER` rebuilds
the unsharded summary from all records and those checks.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robusteval.attacks.batch import BatchAttacker
from robusteval.attacks.catalog import AttackSpec, resolve_attack
from robusteval.attacks.defenses import DeployedPipeline
from robusteval.attacks.progress import AttackProgress
from robusteval.attacks.reliability import (
    CheckPlan,
    ModelChecks,
    record_checks,
    run_checks,
)
from robusteval.attacks.remedies import recorded_attack_labels
from robusteval.attacks.results import AttackResult
from robusteval.attacks.resume import (
    adversarial_file_name,
    load_shard,
    load_tensors,
    partial_name,
    save_atomically,
    shard_name,
)
from robusteval.attacks.settings import ResolvedAttackSettings
from robusteval.core.atomic_files import atomic_write_json
from robusteval.core.determinism import gpu_notes
from robusteval.core.fingerprints import weights_fingerprint
from robusteval.core.interface import trusted_inputs
from robusteval.core.vocabulary import DefenseSpec, gradient_variants, parse_defense
from robusteval.data.imagenet import order_notes
from robusteval.jobs import Job, Resolved
from robusteval.records import AttackConfig
from robusteval.records.consistency import check_records, labels_lookup, record_problem
from robusteval.runs import (
    SAMPLES_FILE,
    SUMMARY_FILE,
    RunDirectory,
    RunFileDamaged,
    read_json_file,
)
from robusteval.runs.shards import MergeRefused, ShardRun, shard_title

logger = logging.getLogger(__name__)
# In the shard holding batch 0: the checks that ran the model again, for `robusteval merge`.
MODEL_CHECKS_FILE = "model_checks.json"


class AttackJob(Job):
    """A prepared attack evaluation: the resolved model and data, and the resolved settings it runs with.

    `config` (frozen) is what identifies it on disk. The fields of `AttackPlan` (what the batch attacker and
    the run checks read) are the settings', read through.
    """

    def __init__(self, resolved: Resolved, settings: ResolvedAttackSettings):
        self.settings = settings
        self.model, self.device = resolved.model, resolved.device
        data = resolved.data
        self.x = data.x[: settings.n].detach().to(torch.float32).cpu()
        self.y = data.y[: settings.n].detach().to(torch.long).cpu()
        checkpoint = resolved.options.checkpoint
        self._freeze(AttackConfig(
            model=resolved.model_name, checkpoint=str(checkpoint) if checkpoint is not None else None,
            model_fingerprint=weights_fingerprint(self.model), dataset=data.name, n=settings.n,
            attack=settings.spec.name,
            norm=settings.norm, eps=list(settings.eps), defense=str(settings.defense), gradient=settings.gradient,
            eot=settings.eot, steps=settings.steps, step_size=settings.step_size, seed=settings.seed,
            batch_size=settings.batch_size, decision_draws=settings.decision_draws,
            large_eps_check=settings.large_eps_check, masking_checks=settings.masking_checks,
            # An official file's --vae / --model-config (recorded only when given).
            **resolved.recorded(),
            file_fingerprints=resolved.options.file_fingerprints(),
        ).to_json(), resolved.options.shard)
        # The batches this job attacks: all, or its shard's whole batches of the same plan (same seeds).
        self.batches = self.shard.batches(self.n_batches) if self.shard is not None else range(self.n_batches)
        self.name_parts = (resolved.model_name, data.name, settings.spec.name, settings.norm) + (
            (str(settings.defense),) if settings.defense.kind != "none" else ())

    # --- the settings, as `AttackPlan` names them -----------------------------------------------------
    @property
    def spec(self) -> AttackSpec:
        return self.settings.spec

    @property
    def norm(self) -> str:
        return self.settings.norm

    @property
    def eps(self) -> list[float]:
        return list(self.settings.eps)

    @property
    def defense(self) -> DefenseSpec:
        return self.settings.defense

    @property
    def gradient(self) -> str:
        return self.settings.gradient

    @property
    def variants(self) -> list[str]:
        return self.settings.variants

    @property
    def eot(self) -> int:
        return self.settings.eot

    @property
    def steps(self) -> int | None:
        return self.settings.steps

    @property
    def step_size(self) -> float | None:
        return self.settings.step_size

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def large_eps_check(self) -> bool:
        return self.settings.large_eps_check

    @property
    def masking_checks(self) -> bool:
        return self.settings.masking_checks

    @property
    def decision_draws(self) -> int:
        return self.settings.decision_draws

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_batches(self) -> int:
        """Batches of the whole run (a shard attacks `batches`, a part of them)."""
        return math.ceil(self.n / self.batch_size)

    @property
    def points(self) -> range:
        """The points this job attacks (all of the run's, or its shard's)."""
        return range(self.batches.start * self.batch_size, min(self.n, self.batches.stop * self.batch_size))

    def run(self, out: str | Path | RunDirectory | None = None, resume: bool = True, progress: bool = False,
            wait: bool = False, on_wait: Callable[[str], None] | None = None) -> AttackResult:
        """Run (or resume) the evaluation; with `out=None` nothing is written to disk.

        The run directory is locked while the job works in it: another process
        there makes this one stop (RunDirectoryBusy), or wait with `wait=True`
        (`on_wait` hears whom it waits for).
        """
        started = time.perf_counter()
        with self.opened_run(out, resume, wait=wait, on_wait=on_wait or logger.warning) as run_dir:
            if run_dir is not None:
                run_dir.check_records(self.points, check=self._record_problem)
            return self._run(run_dir, started, progress)

    def _record_problem(self, record: dict[str, Any]) -> str | None:
        """What makes a stored record impossible for this job (None when it fits)."""
        batch = record.get("batch")
        if not isinstance(batch, int) or batch not in self.batches:
            return (f"batch {batch!r} is not one of batches {self.batches.start}..{self.batches.stop - 1} of "
                    f"{self.n} points in batches of {self.batch_size}")
        if not batch * self.batch_size <= record["index"] < (batch + 1) * self.batch_size:
            return f"image {record['index']} cannot belong to batch {batch} (batches of {self.batch_size})"
        results = record.get("results")
        if not isinstance(results, list) or [r.get("eps") if isinstance(r, dict) else None for r in results] \
                != list(self.eps):
            return f"its results are not one per configured eps ({', '.join(f'{e:g}' for e in self.eps)})"
        if not isinstance(record.get("correct"), bool):
            return "it has no clean result ('correct')"
        found = record_problem("attack", self.config, record, attack_labels=self.attack_labels,
                               data_labels=labels_lookup(self.y.tolist()))
        return None if found is None else f"field {found[0]}: {found[1]}"

    @property
    def attack_labels(self) -> frozenset[str]:
        """The attack names this run can record as what broke a point."""
        return recorded_attack_labels(self.spec.name, self.gradient, str(self.defense))

    def _run(self, run_dir: RunDirectory | None, started: float, progress: bool) -> AttackResult:
        records: list[dict[str, Any]] = run_dir.records if run_dir is not None else []
        done = {r["batch"] for r in records}
        if run_dir is not None and len(done) == len(self.batches) and run_dir.artifact(SUMMARY_FILE).exists():
            finished = self._finished(run_dir, records)
            if finished is not None:
                return finished
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=devices), trusted_inputs(), _autoattack_log_captured():
                attacker = BatchAttacker(self, {mode: DeployedPipeline(self.model, self.defense, mode,
                                                                       decision_draws=self.decision_draws)
                                                for mode in self.variants})
                notes = attacker.skipped_notes()
                adversarial, batch_wall = self._attack_batches(attacker, run_dir, records, done, notes, progress)
                records.sort(key=lambda r: r["index"])
                # The checks that attack the first points again run once: in the shard that holds them.
                checks, model = run_checks(self, attacker, records, notes, progress, with_model=0 in self.batches)
        finally:
            self.model.train(was_training)
        merged = {eps: torch.cat([adversarial[b][e] for b in self.batches])
                  for e, eps in enumerate(self.eps)}
        large = model.large if model is not None else None
        if run_dir is not None:
            self._merge_files(run_dir, merged)
            if self.shard is not None and model is not None:
                atomic_write_json(run_dir.artifact(MODEL_CHECKS_FILE), model.to_json())
        # Every batch's own time (in whichever process ran it, parts of a batch cut by a kill included), plus
        # this call's work outside the batches (loading, checks): the time of all processes, not the last one's.
        batches = sum({r["batch"]: r.get("batch_seconds", 0.0) for r in records}.values())
        overhead = time.perf_counter() - started - batch_wall
        notes_of_run = sorted(notes) + gpu_notes(self.device) + order_notes(self.config.get("image_order"))
        result = AttackResult.of_run(self.config, records, checks, large, notes_of_run,
                                     seconds=round(batches + overhead, 3))
        result.adversarial, result.records = merged, records
        result.run_dir = run_dir.path if run_dir is not None else None
        if run_dir is not None:
            run_dir.write_summary(result.summary())
        return result

    def _attack_batches(self, attacker: BatchAttacker, run_dir: RunDirectory | None, records: list[dict[str, Any]],
                        done: set[int], notes: set[str], progress: bool) -> tuple[dict[int, list[Tensor]], float]:
        """Every batch not done yet, its records appended and its examples kept.

        Returns, per batch, its examples per ε, and the seconds this call spent attacking batches.
        """
        adversarial: dict[int, list[Tensor]] = {}
        batch_wall = 0.0
        bar = AttackProgress(len(self.points), progress, initial=len(records),
                             robust_done=[_robust_count(records, e) for e in range(len(self.eps))],
                             title=shard_title("", self.shard).strip())
        try:
            for b in self.batches:
                start, stop = b * self.batch_size, min(self.n, (b + 1) * self.batch_size)
                if b in done:
                    # A shard's merged files hold its own points only, from its first point on.
                    offset = self.points.start
                    adversarial[b] = load_shard(run_dir, b, start - offset, stop - offset, self.eps)
                    continue
                partial = run_dir.artifact(partial_name(b)) if run_dir is not None else None
                batch_started = time.perf_counter()
                outcome = attacker.attack(b, self.x[start:stop], self.y[start:stop], start, self.eps, bar, partial)
                batch_wall += time.perf_counter() - batch_started
                for record in outcome.records:
                    record["batch_seconds"] = round(outcome.seconds, 3)
                notes |= outcome.notes
                adversarial[b] = outcome.adversarial
                if run_dir is not None:
                    save_atomically(run_dir.artifact(shard_name(b)), list(outcome.adversarial))
                    run_dir.append_batch(b, outcome.records)
                    partial.unlink(missing_ok=True)
                records.extend(outcome.records)
                bar.finished(stop - start, [_robust_count(outcome.records, e) for e in range(len(self.eps))])
        finally:
            bar.close()
        return adversarial, batch_wall

    def _merge_files(self, run_dir: RunDirectory, merged: dict[float, Tensor]) -> None:
        """One adversarial file per ε for all points; the batches' shards and partial states go."""
        for eps, tensor in merged.items():
            save_atomically(run_dir.artifact(adversarial_file_name(eps)), tensor)
        for b in self.batches:
            run_dir.artifact(shard_name(b)).unlink(missing_ok=True)
            # Left behind when a kill came between a batch's records and the removal of its partial state.
            run_dir.artifact(partial_name(b)).unlink(missing_ok=True)

    def _finished(self, run_dir: RunDirectory, records: list[dict[str, Any]]) -> AttackResult | None:
        """The result of a run directory that is already complete (None when its files are not all there)."""
        files = {eps: run_dir.artifact(adversarial_file_name(eps)) for eps in self.eps}
        if not all(p.exists() for p in files.values()):
            return None
        try:
            result = AttackResult.from_summary(read_json_file(run_dir.artifact(SUMMARY_FILE), "recomputing it"))
        except (RunFileDamaged, KeyError, TypeError, ValueError) as error:
            # The records and adversarial examples are intact: the figures follow from them again (as certify does).
            logger.warning("%s; its records are complete, so the summary is computed again",
                           error if isinstance(error, RunFileDamaged) else f"{SUMMARY_FILE} is incomplete ({error})")
            return None
        result.records = sorted(records, key=lambda r: r["index"])
        result.adversarial = {eps: load_tensors(p) for eps, p in files.items()}
        result.run_dir = run_dir.path
        return result


def _robust_count(records: list[dict[str, Any]], e: int) -> int:
    return sum(1 for r in records if r["correct"] and not r["results"][e]["broken"])


@contextlib.contextmanager
def _autoattack_log_captured() -> Iterator[None]:
    """Route pyautoattack's logger to debug level: its warnings are re-checked and reported as flags."""
    aa_logger = logging.getLogger("auto-attack")
    previous = aa_logger.propagate, aa_logger.level
    handler = _DebugRelay()
    aa_logger.addHandler(handler)
    aa_logger.propagate = False
    try:
        yield
    finally:
        aa_logger.removeHandler(handler)
        aa_logger.propagate, _ = previous


class _DebugRelay(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logger.debug("pyautoattack: %s", record.getMessage())


class _AttackMerger:
    """How the shards of an attack run merge (`robusteval.scale.merge`): the figures and record-based checks from
    all records, the model's checks from the shard that ran them, the adversarial examples concatenated."""

    def index_range(self, config: dict[str, Any]) -> range:
        return range(config["n"])

    def check_records(self, config: dict[str, Any], shard: ShardRun) -> None:
        check_records(Path(shard.source) / SAMPLES_FILE, "attack", config, shard.records,
                      attack_labels=recorded_attack_labels(config["attack"], config.get("gradient"),
                                                          config.get("defense", "none")),
                      remedy="re-run that shard with --no-resume")

    def summary(self, config: dict[str, Any], shards: list[ShardRun], records: list[dict[str, Any]]) -> dict[str, Any]:
        first = shards[0]
        if MODEL_CHECKS_FILE not in first.files:
            raise MergeRefused(f"{first.source} (shard {first.shard.label}) lacks {MODEL_CHECKS_FILE}; re-run its "
                               f"command to finish it")
        model = ModelChecks.from_json(json.loads(first.files[MODEL_CHECKS_FILE]))
        eps = list(config["eps"])
        variants = gradient_variants(config["gradient"], parse_defense(config["defense"]))
        plan = CheckPlan(resolve_attack(config["attack"]), variants, config["n"], eps, config["norm"],
                         bool(config["masking_checks"]), bool(config["large_eps_check"]), model.num_classes,
                         model.randomized)
        checks = record_checks(plan, records, model)
        summaries = [AttackResult.from_summary(s.summary or {}) for s in shards]
        result = AttackResult.of_run(config, records, checks, model.large,
                                     sorted(set().union(*(s.notes for s in summaries))),
                                     seconds=round(sum(s.seconds or 0.0 for s in summaries), 3))
        return result.summary()

    def files(self, config: dict[str, Any], shards: list[ShardRun]) -> dict[str, bytes]:
        files = {}
        for eps in config["eps"]:
            name = adversarial_file_name(eps)
            merged = torch.cat([shard.load_tensor(name) for shard in shards])
            buffer = io.BytesIO()
            torch.save(merged, buffer)
            files[name] = buffer.getvalue()
        return files


ATTACK_MERGER = _AttackMerger()
