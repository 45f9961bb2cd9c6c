"""Data-parallel harvest under `torchrun`: the same batches a single process makes, split by shard.

    torchrun --nproc-per-node N -m precompute precompute --config ...      (or: featuregeom harvest)

How the work is split. The corpus plan and its batches are deterministic, and a shard is a fixed run
of `batches_per_shard` batches, so shard i means the same tokens in every process: rank r harvests the
shards i with i % world_size == r, writes them under their own names into the shared work directory
(no renumbering at the merge), and on a rerun skips the ones already there (each rank resumes on its
own). Rank 0 holds the output lock, checks the output and clears a stale work directory before any
rank starts (a barrier). Once every rank has written its shards (a second barrier), each rank
aggregates one contiguous range of the features over every shard, in order (`rank_aggregate`: a
feature's statistics depend only on its own entries, so the ranges joined equal one process's
aggregation bit for bit); rank 0 joins the ranges (a third barrier) and runs the rest of the job alone.

Backends: NCCL when the run is on CUDA (each rank on `cuda:LOCAL_RANK`), gloo on CPU. With one thread
per process (OMP_NUM_THREADS=1) and MKL_CBWR=STRICT (precompute/__init__.py) every forward equals the
single-process one, so the cache does too (tests/precompute/pipeline/test_distributed.py).

Several nodes: `torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT`
(under Slurm: one `srun` task per node, HOST the first node), with --out and its `.work` directory on a
filesystem every node sees (the shards meet there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from precompute.errors import ConfigError

# a rank that dies makes torchrun stop the others; this bounds a barrier when one hangs instead
BARRIER_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun launch (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def owns(self, shard: int) -> bool:
        """Whether this rank harvests shard `shard` (round robin: every rank gets every size-th shard)."""
        return shard % self.size == self.rank


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The World torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK (absent: a single process)."""
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" not in env:
        return World()
    try:
        rank, size = int(env.get("RANK", "0")), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun): {exc}") from exc
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ConfigError(
            f"RANK {rank} and WORLD_SIZE {size} do not describe a launch; start it with torchrun"
        )
    return World(rank, size, local)


def start(world: World, device: str) -> None:
    """Join the process group (NCCL on CUDA, gloo otherwise); on CUDA, pin this rank to its GPU."""
    if not world.parallel:
        return
    import torch
    import torch.distributed as dist

    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(world.local_rank)  # `cuda` (no index) is now this rank's GPU
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT)


def barrier(world: World) -> None:
    if world.parallel:
        import torch.distributed as dist

        dist.barrier()


def gather_to_main(world: World, value: Any) -> list[Any] | None:
    """Every rank's `value` (any picklable object), in rank order, on rank 0; None on the others."""
    if not world.parallel:
        return [value]
    import torch.distributed as dist

    out: list[Any] | None = [None] * world.size if world.main else None
    dist.gather_object(value, out, dst=0)
    return out


def stop(world: World) -> None:
    if world.parallel:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
