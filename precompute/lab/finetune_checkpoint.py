"""Checkpoints of a `featuregeom finetune` run, so that a killed run resumes where it stopped.

A CPU fine-tune at the lab's settings takes 10-40 minutes; a session that ends, or a machine that is
taken back, must not cost it all. Every `checkpoint_every` steps the run saves beside OUT, in
`.OUT-name.checkpoint.pt` (written atomically): the adapter's trainable tensors, the optimiser state,
the steps done, the loss log, the held-out loss before training and the seconds spent. Training has
no randomness after the adapter's seeded initialisation (no dropout; the batch order and learning
rate are functions of the step), so a resumed run ends with the same adapter as an uninterrupted one
(tests/precompute/lab/test_finetune_checkpoint.py). A checkpoint is used only under the same
signature (every option that changes training, the corpus files' hashes, the model); the finished
output replaces it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from precompute.atomic import write_atomic
from precompute.errors import FeatureGeomError
from precompute.provenance import sha256_of

# options that do not change what is trained (where, how it is shown or written, how often saved)
_NOT_TRAINING = ("out", "overwrite", "progress", "device", "checkpoint_every", "corpus", "heldout")


def checkpoint_path(out: Path) -> Path:
    return out.parent / f".{out.name}.checkpoint.pt"


def signature(cfg: Any, model_info: dict[str, Any]) -> str:
    """A hash of what the trained adapter depends on: the training options, every corpus and held-out
    file's content, and the model's identity."""
    options = {k: v for k, v in asdict(cfg).items() if k not in _NOT_TRAINING}
    files = [c.path for c in cfg.corpus] + ([cfg.heldout] if cfg.heldout else [])
    payload = {
        "options": options,
        "corpus": [{**asdict(c), "path": None} for c in cfg.corpus],
        "files": [sha256_of(p) for p in files],
        "model": {k: model_info.get(k) for k in ("spec", "sha256", "architecture")},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class TrainingStopped(RuntimeError):
    """finetune(stop_after=N) stopped after N steps (a test's stand-in for a killed run)."""


@dataclass
class Progress:
    """Where a run stands besides its tensors."""

    step: int = 0  # steps done
    log: list[tuple[int, float, float]] = field(default_factory=list)  # step, loss, learning rate
    loss_before: float | None = None
    seconds: float = 0.0  # training seconds before this process
    resumed_from: int | None = None


def load(
    path: Path, sig: str, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer
) -> Progress:
    """Restore the adapter tensors and the optimiser from `path`; Progress() when there is none."""
    if not path.is_file():
        return Progress()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, never unpickle it
        raise FeatureGeomError(f"{path} is not a readable checkpoint ({exc}); pass --overwrite") from exc
    if state.get("signature") != sig:
        raise FeatureGeomError(
            f"{path} is the checkpoint of a fine-tune with other settings or data; pass --overwrite to "
            "discard it, or use another --out"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name].to(p.device))
    optimizer.load_state_dict(state["optimizer"])
    log = [(int(s), float(loss), float(lr)) for s, loss, lr in state["log"]]
    return Progress(
        int(state["step"]), log, state["loss_before"], float(state["seconds"]), int(state["step"])
    )


def save(
    path: Path,
    sig: str,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    progress: Progress,
) -> None:
    state = {
        "signature": sig,
        "step": progress.step,
        "params": {name: p.detach().cpu().clone() for name, p in params.items()},
        "optimizer": optimizer.state_dict(),
        "log": [list(x) for x in progress.log],
        "loss_before": progress.loss_before,
        "seconds": progress.seconds,
    }
    write_atomic(path, lambda tmp: torch.save(state, tmp))
