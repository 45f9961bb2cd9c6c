"""Train the project's TopK SAE on the synthetic activations, in memory (no checkpoints, no files)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from precompute.sae.base import SAE


def fit_sae(
    x: np.ndarray,
    d_sae: int,
    k: int,
    steps: int,
    batch_size: int = 1024,
    lr: float | None = None,
    seed: int = 0,
    aux_k: int | None = None,
    dead_after: int | None = None,
    warmup_steps: int | None = None,
    decay_fraction: float = 0.2,
    init: str = "random",
    threads: int | None = 1,
    progress: bool = False,
) -> tuple[SAE, dict[str, Any]]:
    """Train the project's TopK SAE (`precompute.training`) on x in memory; returns (SAE, stats).
    (Named fit_sae, not train_sae, so it does not shadow that module.)

    ``init="random"`` is the project's recipe (random unit decoder rows, encoder = transpose);
    ``init="data"`` starts the decoder rows (and the encoder) at randomly chosen, centred and
    normalised training activations instead, everything else unchanged. ``threads`` caps torch's
    intra-op threads while training (1 is fastest for these small matrices on a shared machine;
    None leaves the setting alone).
    """
    from precompute.training.store import ShuffledBatches, sample_rows
    from precompute.training.trainer import TopKSAETrainer, default_warmup, fit

    data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    d_in = data.shape[1]
    aux_k = aux_k if aux_k is not None else max(1, d_in // 2)
    dead_after = dead_after if dead_after is not None else 20 * batch_size
    trainer = TopKSAETrainer(d_in, d_sae, k, aux_k=aux_k, dead_after_tokens=dead_after, seed=seed)
    trainer.init_from_sample(sample_rows(data, 8192, seed), "geometric_median")
    if init == "data":
        with torch.no_grad():
            norm_factor: Any = trainer.norm_factor  # a registered buffer (typed Tensor | Module)
            rows = sample_rows(data, d_sae, seed + 1) * norm_factor - trainer.b_dec
            rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
            trainer.W_dec.copy_(rows)
            trainer.W_enc.copy_(rows)
    elif init != "random":
        raise ValueError(f"init must be random or data, got {init!r}")
    batches = ShuffledBatches(data, batch_size, seed)
    lr = lr if lr is not None else 2e-4 * math.sqrt(16384 / d_sae)
    warmup = warmup_steps if warmup_steps is not None else default_warmup(steps)
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        result = fit(
            trainer,
            batches,
            steps,
            lr,
            warmup,
            decay_fraction,
            work_dir=None,
            progress=progress,
            log_every=max(1, steps // 20),
            checkpoint_every=steps + 1,
        )
    finally:
        torch.set_num_threads(prev_threads)
    sae = result.trainer.cpu().to_sae(hook_name="synth", model_name="synth")
    with torch.inference_mode():
        sub = data[: min(len(data), 65536)]
        recon = sae.reconstruct(sub)
        fvu = float((sub - recon).pow(2).sum() / (sub - sub.mean(0)).pow(2).sum())
    last = result.curve[-1] if result.curve else {}
    stats = {
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "lr": lr,
        "batch_size": batch_size,
        "aux_k": aux_k,
        "dead_after_tokens": dead_after,
        "warmup_steps": warmup,
        "init": init,
        "fvu": fvu,
        "final_train_fvu": last.get("fvu"),
        "dead_fraction": last.get("dead_fraction"),
        "curve": result.curve,
    }
    return sae, stats
