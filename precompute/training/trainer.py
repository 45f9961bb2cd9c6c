"""The TopK sparse autoencoder under training (Gao et al. 2024) and its optimisation loop.

Recipe ("Scaling and evaluating sparse autoencoders", Gao et al. 2024, and the public
`sparse_autoencoder`/`sparsify` code that follows it):

* activations are scaled by one scalar so that E||x|| = sqrt(d_in) (estimated from a sample);
  at save time the scalar is folded into the weights, so the written SAE reads raw activations
  (``normalize_activations: none``) and the factor is recorded in ``metadata``;
* ``b_dec`` starts at the geometric median of a sample, decoder rows are unit-norm (the gradient
  component parallel to each row is removed before the step, rows renormalised after it) and
  the encoder starts as the decoder's transpose;
* the loss is the fraction of variance unexplained of the batch plus ``aux_coef`` times the AuxK
  loss: the ``aux_k`` largest pre-activations among *dead* latents (no firing in the last
  ``dead_after_tokens`` tokens) must reconstruct the main reconstruction's residual error;
* Adam (eps 6.25e-10) with linear warm-up, constant rate and a linear decay to zero at the end.

CPU notes (docs/design.md): the decoder is ``embedding_bag`` over the top-k indices and the encoder's
backward pass is sparse (only the k selected latents of a row get gradient), so a 4096-latent
SAE trains at several thousand activations per second on two cores.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from precompute.atomic import write_atomic
from precompute.errors import FeatureGeomError
from precompute.sae.base import SAE
from precompute.training.parallel import LOCAL, Reducer
from precompute.training.schedule import ADAM_EPS, default_warmup, lr_lambda, make_optimizer
from precompute.training.store import ShuffledBatches

CHECKPOINT = "checkpoint.pt"
__all__ = ["ADAM_EPS", "CHECKPOINT", "TopKSAETrainer", "default_warmup", "fit", "lr_lambda", "make_optimizer"]


class _SparseEncode(torch.autograd.Function):
    """Pre-activations of the selected latents, with a backward pass that touches only them.

    ``pre_vals`` [B, m] were already computed by the dense forward matmul; the backward pass
    gives W_enc a gradient through a sparse [d_sae, B] @ [B, d_in] product (B*m non-zeros)
    instead of a dense one, which is what makes CPU training affordable.
    """

    @staticmethod
    def forward(
        ctx,
        x_c: torch.Tensor,
        w_enc: torch.Tensor,
        b_enc: torch.Tensor,
        idx: torch.Tensor,
        pre_vals: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(x_c, w_enc, idx)
        ctx.d_sae = w_enc.shape[0]
        return pre_vals.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_c, w_enc, idx = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, w_enc, per_sample_weights=grad, mode="sum")
        rows = idx.reshape(-1)
        flat = grad.reshape(-1)
        if ctx.needs_input_grad[1]:
            cols = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
            sparse = torch.sparse_coo_tensor(
                torch.stack([rows, cols]), flat, (ctx.d_sae, idx.shape[0]), check_invariants=False
            )
            grad_w = torch.sparse.mm(sparse, x_c)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(ctx.d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, rows, flat)
        return grad_x, grad_w, grad_b, None, None


@dataclass
class StepStats:
    loss: float
    fvu: float
    aux_loss: float
    l0: float
    n_dead: int


class TopKSAETrainer(torch.nn.Module):
    """A TopK SAE under training, on *normalised* activations (x * norm_factor).

    ``W_enc`` is stored as [d_sae, d_in] (one row per latent, the transpose of SAELens' layout) so
    the sparse backward passes gather and scatter contiguous rows; `to_sae` converts.
    """

    tokens_since_fired: torch.Tensor  # buffer [d_sae]: training tokens since each latent last fired
    norm_factor: torch.Tensor  # buffer []: the scalar s with E||s x|| = sqrt(d_in)

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        aux_k: int = 512,
        aux_coef: float = 1 / 32,
        dead_after_tokens: int = 1_000_000,
        seed: int = 0,
    ):
        super().__init__()
        if not 0 < k <= d_sae:
            raise ValueError(f"need 0 < k <= d_sae, got k={k}, d_sae={d_sae}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.aux_k, self.aux_coef, self.dead_after_tokens = aux_k, aux_coef, dead_after_tokens
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(d_sae, d_in, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w_dec)
        self.W_enc = torch.nn.Parameter(w_dec.clone())  # encoder = decoder transpose at init
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("norm_factor", torch.ones(()))
        self.reduce: Reducer = LOCAL  # under torchrun: sums over the ranks (precompute.training.parallel)

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def init_from_sample(self, sample: torch.Tensor, method: str = "geometric_median") -> None:
        """Set the normalisation scalar (E||x|| = sqrt(d_in)) and b_dec from raw activations."""
        sample = sample.float()
        self.norm_factor.fill_(norm_scaling_factor(sample))
        x = sample * self.norm_factor
        if method == "geometric_median":
            self.b_dec.copy_(geometric_median(x))
        elif method == "mean":
            self.b_dec.copy_(x.mean(dim=0))
        else:
            self.b_dec.zero_()

    # ------------------------------------------------------------------ forward
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_after_tokens

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss on a batch of normalised activations [B, d_in]: FVU + aux_coef * AuxK."""
        x_c = x - self.b_dec
        with torch.no_grad():
            pre = x_c @ self.W_enc.detach().T + self.b_enc.detach()
            top = pre.topk(self.k, dim=1)
        vals = _SparseEncode.apply(x_c, self.W_enc, self.b_enc, top.indices, top.values).relu()
        recon = F.embedding_bag(top.indices, self.W_dec, per_sample_weights=vals, mode="sum") + self.b_dec
        total_var = self._spread(x).clamp_min(1e-12)
        err = x - recon
        fvu = err.pow(2).sum() / total_var
        loss = fvu
        aux = torch.zeros(())
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if self.aux_coef > 0 and self.aux_k > 0 and n_dead > 0:
            with torch.no_grad():
                aux_top = pre.masked_fill(~dead, float("-inf")).topk(min(self.aux_k, n_dead), dim=1)
            aux_vals = _SparseEncode.apply(
                x_c, self.W_enc, self.b_enc, aux_top.indices, aux_top.values
            ).relu()
            aux_recon = F.embedding_bag(aux_top.indices, self.W_dec, per_sample_weights=aux_vals, mode="sum")
            target = err.detach()
            aux = (aux_recon - target).pow(2).sum() / self._spread(target).clamp_min(1e-12)
            aux = aux.nan_to_num(0.0)
            loss = loss + self.aux_coef * aux
        info = {
            "indices": top.indices,
            "values": vals.detach(),
            "fvu": fvu.detach(),
            "aux": aux.detach(),
            "n_dead": n_dead,
        }
        return loss, info

    def _spread(self, t: torch.Tensor) -> torch.Tensor:
        """Σ‖t_i − mean‖² over the batch; under torchrun over every rank's part of it."""
        if not self.reduce.world.parallel:
            return (t - t.mean(dim=0)).pow(2).sum()
        n = self.reduce.sum(torch.tensor(float(t.shape[0]), device=t.device))
        mean = self.reduce.sum(t.detach().sum(dim=0)) / n
        return self.reduce.sum((t.detach() - mean).pow(2).sum())

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Keep decoder rows on the unit sphere: drop each row's gradient along the row."""
        if self.W_dec.grad is not None:
            w, g = self.W_dec.data, self.W_dec.grad
            g -= (g * w).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def update_dead(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=indices.device)
        fired[indices[values > 0]] = True
        n = indices.shape[0]
        if self.reduce.world.parallel:  # a latent is alive if it fired on any rank's rows
            fired = self.reduce.sum(fired.to(torch.int32)) > 0
            n = int(self.reduce.sum(torch.tensor(n, device=indices.device)))
        self.tokens_since_fired += n
        self.tokens_since_fired[fired] = 0

    def step(
        self,
        x: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> StepStats:
        optimizer.zero_grad(set_to_none=True)
        loss, info = self(x)
        loss.backward()
        self.reduce.grads(self.parameters())  # each rank's loss is its share of the whole batch's
        self.remove_parallel_grad()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        self.normalize_decoder()
        self.update_dead(info["indices"], info["values"])
        active = (info["values"] > 0).sum(dim=1).float()
        if self.reduce.world.parallel:
            parts = self.reduce.sum(
                torch.stack(
                    [
                        loss.detach(),
                        info["fvu"],
                        info["aux"],
                        active.sum(),
                        active.new_tensor(float(len(active))),
                    ]
                )
            )
            return StepStats(
                float(parts[0]), float(parts[1]), float(parts[2]), float(parts[3] / parts[4]), info["n_dead"]
            )
        return StepStats(
            float(loss.detach()), float(info["fvu"]), float(info["aux"]), float(active.mean()), info["n_dead"]
        )

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def encode_normalized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = (x - self.b_dec) @ self.W_enc.T + self.b_enc
        top = pre.topk(self.k, dim=1)
        return top.indices, top.values.relu()

    @torch.no_grad()
    def reconstruct_raw(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Reconstruction of raw activations through the normalised SAE (for checks)."""
        s = float(self.norm_factor)
        idx, vals = self.encode_normalized(x_raw.float() * s)
        return (F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum") + self.b_dec) / s

    @torch.no_grad()
    def to_sae(
        self,
        hook_name: str | None = None,
        model_name: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> SAE:
        """The trained SAE with the normalisation folded in, so it reads raw activations.

        With s = norm_factor: pre_raw = pre / s = (x - b_dec/s) W_enc + b_enc/s, and the TopK choice
        is unchanged by the positive scale; x_hat = (acts / s) W_dec + b_dec / s keeps W_dec unit-norm.
        """
        s = float(self.norm_factor)
        meta = dict(metadata or {})
        meta["norm_scaling_factor_folded"] = s
        return SAE(
            W_enc=self.W_enc.detach().T.contiguous().cpu().clone(),
            b_enc=(self.b_enc.detach() / s).cpu().clone(),
            W_dec=self.W_dec.detach().cpu().clone(),
            b_dec=(self.b_dec.detach() / s).cpu().clone(),
            architecture="topk",
            k=self.k,
            apply_b_dec_to_input=True,
            normalize_activations="none",
            hook_name=hook_name,
            model_name=model_name,
            format="saelens",
            source="train-sae",
            metadata=meta,
        )


def norm_scaling_factor(sample: torch.Tensor) -> float:
    """The scalar s with E||s x|| = sqrt(d_in) (SAELens' expected_average_only_in)."""
    mean_norm = float(sample.float().norm(dim=1).mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise FeatureGeomError("the activation sample has zero or non-finite norm; cannot normalise it")
    return math.sqrt(sample.shape[1]) / mean_norm


def geometric_median(points: torch.Tensor, iterations: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distances (robust to outliers)."""
    points = points.double()
    median = points.mean(dim=0)
    for _ in range(iterations):
        dist = (points - median).norm(dim=1).clamp_min(eps)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (new - median).norm() <= eps * max(1.0, float(median.norm())):
            median = new
            break
        median = new
    return median.float()


# ============================================================================ training loop
@dataclass
class TrainResult:
    trainer: TopKSAETrainer
    steps: int
    curve: list[dict[str, float]]
    train_seconds: float
    resumed_from: int | None


@dataclass
class _Progress:
    """Where a run stands besides its weights; saved in and restored from the checkpoint."""

    step: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)
    elapsed: float = 0.0  # training seconds before this process
    window: list[StepStats] = field(default_factory=list)  # steps since the last curve point
    resumed_from: int | None = None


def _load_checkpoint(
    path: Path,
    signature: str,
    trainer: TopKSAETrainer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> _Progress:
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("signature") != signature:
        raise FeatureGeomError(
            f"{path} belongs to a run with different settings; pass --overwrite to discard it "
            "or choose another --work-dir"
        )
    trainer.load_state_dict(state["trainer"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    window = [StepStats(**w) for w in state.get("window", [])]
    return _Progress(state["step"], state["curve"], state["elapsed"], window, resumed_from=state["step"])


def _save_checkpoint(
    path: Path,
    signature: str,
    step: int,
    trainer: TopKSAETrainer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: _Progress,
    seconds: float,
) -> None:
    state = {
        "signature": signature,
        "step": step,
        "trainer": trainer.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "curve": progress.curve,
        "elapsed": seconds,
        "window": [asdict(w) for w in progress.window],
    }
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def _curve_point(
    window: list[StepStats], done: int, batch_size: int, d_sae: int, lr: float, rate: float, elapsed: float
) -> dict[str, float]:
    """One point of the training curve: the means over the steps since the previous point."""
    return {
        "step": done,
        "tokens": done * batch_size,
        "loss": float(np.mean([s.loss for s in window])),
        "fvu": float(np.mean([s.fvu for s in window])),
        "aux_loss": float(np.mean([s.aux_loss for s in window])),
        "l0": float(np.mean([s.l0 for s in window])),
        "dead_fraction": window[-1].n_dead / d_sae,
        "lr": lr,
        "acts_per_s": rate,
        "elapsed_s": elapsed,
    }


def fit(
    trainer: TopKSAETrainer,
    data: ShuffledBatches,
    total_steps: int,
    lr: float,
    warmup_steps: int,
    decay_fraction: float,
    work_dir: Path | None = None,
    checkpoint_every: int = 200,
    log_every: int = 25,
    signature: str = "",
    stop_at: int | None = None,
    progress: bool = True,
    device: torch.device | None = None,
) -> TrainResult:
    """Run (or resume) the optimisation; checkpoints go to `work_dir` every `checkpoint_every` steps.

    `trainer` must already hold its initialisation (norm factor, b_dec). If `work_dir` holds a
    checkpoint with the same `signature`, training continues from it, bit-for-bit as if never
    interrupted (the batch order is a function of the step). `stop_at` ends early after saving a
    checkpoint (used by tests to simulate an interruption).
    """
    device = device or torch.device("cpu")
    world = trainer.reduce.world
    trainer.to(device)
    optimizer, scheduler = make_optimizer(trainer, lr, total_steps, warmup_steps, decay_fraction)
    ckpt_path = work_dir / CHECKPOINT if work_dir else None
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    state = _Progress()
    if ckpt_path is not None and ckpt_path.is_file():
        state = _load_checkpoint(ckpt_path, signature, trainer, optimizer, scheduler, device)
    start = state.step
    t_start = time.perf_counter()

    def seconds() -> float:
        return state.elapsed + time.perf_counter() - t_start

    bar = tqdm(
        total=total_steps,
        initial=start,
        desc="train",
        unit="step",
        disable=not (progress and world.main),
        smoothing=0.05,
    )
    t_window = time.perf_counter()
    end = total_steps if stop_at is None else min(stop_at, total_steps)
    for step in range(start, end):
        x = data.batch(step, (world.rank, world.size)).to(device) * trainer.norm_factor
        stats = trainer.step(x, optimizer, scheduler)
        if not math.isfinite(stats.loss):
            raise FeatureGeomError(
                f"the loss became {stats.loss} at step {step}; lower --lr (now {lr:g}) and rerun with --overwrite"
            )
        state.window.append(stats)
        done = step + 1
        if done % log_every == 0 or done == total_steps:
            now = time.perf_counter()
            rate = len(state.window) * data.batch_size / max(now - t_window, 1e-9)
            point = _curve_point(
                state.window,
                done,
                data.batch_size,
                trainer.d_sae,
                float(scheduler.get_last_lr()[0]),
                rate,
                seconds(),
            )
            state.curve.append(point)
            bar.set_postfix(
                loss=f"{point['loss']:.4f}",
                fvu=f"{point['fvu']:.3f}",
                l0=f"{point['l0']:.1f}",
                dead=f"{point['dead_fraction']:.1%}",
                acts_s=f"{rate:,.0f}",
            )
            state.window, t_window = [], now
        bar.update(1)
        # one writer; every rank resumed from the same file, and the collectives keep them in step
        if ckpt_path is not None and world.main and (done % checkpoint_every == 0 or done == end):
            _save_checkpoint(ckpt_path, signature, done, trainer, optimizer, scheduler, state, seconds())
    bar.close()
    return TrainResult(trainer, max(start, end), state.curve, seconds(), state.resumed_from)
