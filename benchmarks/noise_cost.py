"""What drawing certification noise on the CPU costs (robusteval.smoothing.sampler's definition).

Prints one line per figure: the CPU's normal draws per second through NoiseSource (blocks reseeded from
(seed, index, phase, block)), the seconds to draw one pass of `--batch` draws of each image shape, and,
with a GPU, the seconds to copy that pass to it. On a GPU the draws of pass k+1 overlap the device's work
on pass k, so noise costs nothing while a pass's forward takes longer than its draws.

    python benchmarks/noise_cost.py --batch 10000
"""

from __future__ import annotations

import os
import time

import click
import torch

from robusteval.smoothing.sampler import ESTIMATION, NoiseSource, Phase

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


@click.command()
@click.option("--batch", type=int, default=1000, show_default=True, help="Draws per pass.")
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--shapes", default="digits,cifar10", show_default=True, help=f"Comma-separated: {', '.join(SHAPES)}.")
def main(batch: int, repeats: int, shapes: str) -> None:
    pool = min(8, os.cpu_count() or 1)  # what NoiseSource uses for a GPU
    for name in [s.strip() for s in shapes.split(",") if s.strip()]:
        shape = SHAPES[name]
        out = torch.empty((batch, *shape))
        phase = Phase(ESTIMATION, 10 * batch)
        for threads in sorted({1, pool}):
            source = NoiseSource(0, shape, torch.device("cpu"), torch.float32, threads=threads)
            seconds = best_of(repeats, lambda: source.write(out, 7, phase, 0, batch))
            click.echo(f"noise {name} pass of {batch} draws on the CPU, {threads} drawing thread(s): "
                       f"{seconds:.4f} s, {out.numel() / seconds / 1e6:.0f} M values/s, block {source.block}")
        # The per-block reseeding alone (the Python loop the definition needs): hash + manual_seed.
        blocks = max(1, batch // source.block)
        generator = torch.Generator()
        reseed = best_of(repeats, lambda: [generator.manual_seed(source.block_seed(7, 1, k)) for k in range(blocks)])
        click.echo(f"noise {name} reseeding {blocks} block(s) per pass: {reseed * 1e6:.0f} µs")
        if torch.cuda.is_available():
            pinned = out.pin_memory()
            target = torch.empty_like(out, device="cuda")

            def copy() -> None:
                target.copy_(pinned, non_blocking=True)
                torch.cuda.synchronize()

            click.echo(f"noise {name} copy of one pass to the GPU: {best_of(repeats, copy):.4f} s")


if __name__ == "__main__":
    main()
