"""The optimiser and learning-rate schedule of train-sae (Gao et al. 2024)."""

from __future__ import annotations

from collections.abc import Callable

import torch

ADAM_EPS = 6.25e-10  # Gao et al. 2024


def lr_lambda(total_steps: int, warmup_steps: int, decay_fraction: float) -> Callable[[int], float]:
    """Linear warm-up, constant, then linear decay to 0 over the last `decay_fraction` of steps."""
    decay_start = int(total_steps * (1 - decay_fraction))

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if step >= decay_start and total_steps > decay_start:
            return max(0.0, (total_steps - step) / (total_steps - decay_start))
        return 1.0

    return factor


def make_optimizer(
    trainer: torch.nn.Module, lr: float, total_steps: int, warmup_steps: int, decay_fraction: float
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.Adam(trainer.parameters(), lr=lr, betas=(0.9, 0.999), eps=ADAM_EPS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup_steps, decay_fraction)
    )
    return optimizer, scheduler


def default_warmup(total_steps: int) -> int:
    return max(1, min(1000, total_steps // 20))
