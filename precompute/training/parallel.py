"""train-sae under torchrun: data parallel, the same optimisation as one process with the whole batch.

    torchrun --nproc-per-node N -m precompute train-sae --config configs/train-sae.toml

Rank 0 collects the activation store (resumable, in --work-dir, which every rank must see) while the
others wait; then each rank reads its 1/N of every batch (`ShuffledBatches.batch(step, part)`), so the
store's rows are split across ranks. Every quantity the single-process loss normalises by is summed
over ranks first (the batch's mean and variance, the AuxK target's variance, the batch size), and the
gradients are summed, so each rank takes the step one process would take on the whole batch, up to
the order of float additions; the dead-latent counters see every rank's firings. Rank 0 alone writes
checkpoints (every rank resumes from them), evaluates and writes the SAE.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from precompute.pipeline.distributed import World


class Reducer:
    """Sums tensors over the ranks of `world` (the identity for one process)."""

    def __init__(self, world: World = World()) -> None:
        self.world = world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.world.parallel:
            return t
        import torch.distributed as dist

        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    def grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every gradient over the ranks, in place (each rank's loss is its share of the total)."""
        if not self.world.parallel:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)


LOCAL = Reducer()
