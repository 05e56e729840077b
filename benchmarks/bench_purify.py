"""Benchmark: memory and time of exact gradients through purify:S:K, with and without checkpointing.

One attack step is what PGD-EOT does per iteration and draw: a forward pass of
the deployed pipeline `purify:S:K` (K reverse steps of the model's own
denoiser, then its classifier) on a batch, the cross-entropy, and its input
gradient with `--gradient full`. Measured for K = 1, 5 and 20 (`--steps`), with
per-step checkpointing (the engine's default) and without:

- seconds per attack step: the median of `--repeats` timed steps after one
  warm-up, without any memory hooks installed;
- peak saved-activation bytes: the most bytes autograd held for the backward
  pass at once, counted by `torch.autograd.graph.saved_tensors_hooks`
  (`robusteval.core.saved_memory`; it includes what a checkpointed step saves
  while it is recomputed, and the model's weights, which are saved too);
- on CUDA, `torch.cuda.max_memory_allocated` over one step, beyond what was
  allocated before it (the allocator's view: activations and temporaries).

Goals (issue 27): with checkpointing, the peak at K = 20 at most 2× the one at
K = 1; time per step at most 1.5× the same gradient without checkpointing.

    python benchmarks/bench_purify.py                       # jdm, digits, batch 32, K = 1, 5, 20
    python benchmarks/bench_purify.py --model cdn --steps 1,5 --repeats 1
"""

from __future__ import annotations

import statistics
import time

import click
import torch
import torch.nn.functional as F

import robusteval
from robusteval.attacks.defenses import DeployedPipeline
from robusteval.core.interface import trusted_inputs
from robusteval.core.saved_memory import SavedTensorBytes
from robusteval.core.vocabulary import parse_defense
from robusteval.model_zoo.factory import create_model


def attack_step(pipeline: DeployedPipeline, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One PGD step's work: the loss of one draw of the pipeline and its input gradient."""
    inputs = x.clone().requires_grad_(True)
    with trusted_inputs():
        loss = F.cross_entropy(pipeline(inputs), y)
    (grad,) = torch.autograd.grad(loss, inputs)
    return grad


def seconds_per_step(pipeline: DeployedPipeline, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    attack_step(pipeline, x, y)  # warm-up
    times = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        started = time.perf_counter()
        attack_step(pipeline, x, y)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def saved_peak(pipeline: DeployedPipeline, x: torch.Tensor, y: torch.Tensor) -> int:
    counter = SavedTensorBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        attack_step(pipeline, x, y)
    return counter.peak


def cuda_peak(pipeline: DeployedPipeline, x: torch.Tensor, y: torch.Tensor) -> int | None:
    if not x.is_cuda:
        return None
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    attack_step(pipeline, x, y)
    torch.cuda.synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device) - before


@click.command()
@click.option("--model", "model_name", default="jdm", show_default=True)
@click.option("--sigma", type=float, default=0.25, show_default=True, help="S of purify:S:K.")
@click.option("--steps", "steps_text", default="1,5,20", show_default=True, help="The K values, comma-separated.")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm", show_default=True)
@click.option("--batch", type=int, default=32, show_default=True, help="Digits test images per step.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed steps per setting (median).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
def main(model_name: str, sigma: float, steps_text: str, sampler: str, batch: int, repeats: int, device: str,
         threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    target = torch.device(device)
    model = create_model(model_name).eval().to(target)
    data = robusteval.load_dataset("digits")
    x, y = data.x[:batch].to(target), data.y[:batch].to(target)
    print(f"model {model_name}, digits, batch {batch}, purify:{sigma:g}:K:{sampler}, --gradient full, "
          f"device {target}, {threads} thread(s), torch {torch.__version__}")
    print(f"{'K':>3} {'checkpointed':>12} {'s/step':>8} {'saved MB':>9} {'cuda MB':>8}")
    rows: dict[tuple[int, bool], tuple[float, int, int | None]] = {}
    for steps in (int(k) for k in steps_text.split(",")):
        for checkpointed in (True, False):
            pipeline = DeployedPipeline(model, parse_defense(f"purify:{sigma:g}:{steps}:{sampler}"), "full",
                                        checkpointed=checkpointed)
            seconds = seconds_per_step(pipeline, x, y, repeats)
            saved = saved_peak(pipeline, x, y)
            allocated = cuda_peak(pipeline, x, y)
            rows[steps, checkpointed] = (seconds, saved, allocated)
            cuda = f"{allocated / 1e6:8.1f}" if allocated is not None else f"{'-':>8}"
            print(f"{steps:>3} {checkpointed!s:>12} {seconds:8.3f} {saved / 1e6:9.2f} {cuda}", flush=True)
    ks = sorted({k for k, _ in rows})
    low, high = ks[0], ks[-1]
    print(f"checkpointed saved peak K={high} / K={low}: {rows[high, True][1] / rows[low, True][1]:.2f} (goal <= 2)")
    if rows[high, True][2] is not None:
        print(f"checkpointed CUDA peak K={high} / K={low}: {rows[high, True][2] / rows[low, True][2]:.2f} (goal <= 2)")
    for k in ks:
        print(f"K={k}: time checkpointed / plain {rows[k, True][0] / rows[k, False][0]:.2f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
