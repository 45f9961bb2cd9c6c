"""Synthetic activations with a known dictionary and a small trainer on them, shared by the training tests.

Synthetic data: every sample is a sparse non-negative combination of 4 of 64 random unit
directions in 32 dimensions (plus an offset), so a 64-latent, k=4 SAE can explain it almost fully.
"""

from __future__ import annotations

from pathlib import Path

import torch

from precompute.training.store import ShuffledBatches
from precompute.training.trainer import TopKSAETrainer, fit

D_IN, D_SAE, K = 32, 64, 4


def synthetic(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Sparse combinations of a fixed random dictionary (seed 123), sample noise from `seed`."""
    dictionary = torch.randn(D_SAE, D_IN, generator=torch.Generator().manual_seed(123))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    offset = torch.randn(D_IN, generator=torch.Generator().manual_seed(7)) * 2.0
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, D_SAE, generator=gen).topk(K, dim=1).indices
    vals = 1.0 + 2.0 * torch.rand(n, K, generator=gen)
    codes = torch.zeros(n, D_SAE).scatter_(1, idx, vals)
    return scale * (codes @ dictionary + offset)


def trained(
    data: torch.Tensor,
    steps: int = 400,
    seed: int = 0,
    aux_coef: float = 1 / 32,
    lr: float = 1e-2,
    dead_after: int = 2048,
    work_dir: Path | None = None,
    stop_at: int | None = None,
    trainer: TopKSAETrainer | None = None,
):
    trainer = trainer or make_trainer(data, seed, aux_coef, dead_after)
    batches = ShuffledBatches(data, 256, seed)
    result = fit(
        trainer,
        batches,
        steps,
        lr,
        20,
        0.2,
        work_dir=work_dir,
        checkpoint_every=10,
        log_every=10,
        signature="test",
        stop_at=stop_at,
        progress=False,
    )
    return trainer, result


def make_trainer(
    data: torch.Tensor, seed: int = 0, aux_coef: float = 1 / 32, dead_after: int = 2048
) -> TopKSAETrainer:
    trainer = TopKSAETrainer(
        D_IN, D_SAE, K, aux_k=16, aux_coef=aux_coef, dead_after_tokens=dead_after, seed=seed
    )
    trainer.init_from_sample(data[:2048])
    return trainer


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return 1.0 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
