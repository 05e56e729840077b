"""torchrun ranks as shards: under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) a command runs shard
RANK+1 of WORLD_SIZE on cuda:LOCAL_RANK (the CPU without CUDA); the finished shards reach rank 0
through the process group (gloo, no shared filesystem needed) and rank 0 merges them.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from robusteval.core.errors import UsageError
from robusteval.runs.shards import Shard, ShardRun
from robusteval.scale.merge import MergedRun, combine, write_merged


@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def shard(self) -> Shard:
        return Shard(self.rank + 1, self.world_size)

    def device(self, requested: str | None) -> str:
        """cuda:LOCAL_RANK when CUDA is there and no explicit device was asked for (auto), else as asked."""
        if requested in (None, "auto", "cuda"):
            if torch.cuda.is_available():
                return f"cuda:{self.local_rank % torch.cuda.device_count()}"
            return "cpu" if requested != "cuda" else "cuda"
        return str(requested)


def launched_rank() -> Rank | None:
    """The torchrun rank of this process (None outside torchrun or with one process)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world <= 1:
        return None
    return Rank(rank, world, local)


def start_group(timeout_hours: float = 72.0) -> None:
    """Join the process group (gloo: it carries Python objects on CPU and GPU machines alike).

    The timeout is long because ranks meet again only when every shard is done; torchrun itself ends the
    others when one dies.
    """
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=_dt.timedelta(hours=timeout_hours))


def gather_to_rank0(shard_dir: str | Path, out: str | Path) -> MergedRun | None:
    """Send this rank's finished shard to rank 0, which merges all of them into `out` (others get None)."""
    start_group()
    run = ShardRun.read(shard_dir)
    gathered: list[ShardRun | None] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(run, gathered, dst=0)
    merged = None
    if dist.get_rank() == 0:
        merged = combine([r for r in gathered if r is not None])  # type: ignore[union-attr]
        write_merged(merged, out)
    dist.barrier()
    dist.destroy_process_group()
    return merged


def wait_for_ranks() -> bool:
    """Wait until every rank gets here; True on rank 0 (which then reports for all)."""
    start_group()
    dist.barrier()
    first = dist.get_rank() == 0
    dist.destroy_process_group()
    return first
