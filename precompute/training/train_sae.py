"""`featuregeom train-sae`: train a TopK sparse autoencoder (Gao et al. 2024) on one hook point.

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

CPU notes (DESIGN.md): the decoder is ``embedding_bag`` over the top-k indices and the encoder's
backward pass is sparse (only the k selected latents of a row get gradient), so a 4096-latent
SAE trains at several thousand activations per second on two cores.

Activations come from `precompute.data.activations` (the same planning, masking and batching as the
precompute harvest), are written once to a float16 ``.npy`` store under ``--work-dir`` (resumable
batch by batch) and then read in shuffled order, epoch after epoch. Held-out documents (chosen by
a hash of their content, so the split is stable across budgets, seeds and source order) never
reach the training store; the final evaluation on them reports explained variance, L0, dead
latents and the next-token cross-entropy with the SAE reconstruction spliced in at the hook.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from precompute.data.corpus import Context, CorpusSource, Document, pack_contexts, read_source
from precompute.data.plan import CorpusPlan
from precompute.data.records import ReadStats
from precompute.errors import CorpusError, FeatureGeomError, run_command
from precompute.model.activations import count_mask, iter_activations, pad_batch
from precompute.model.hooks import HookPoint, HookReader
from precompute.sae.base import SAE

ADAM_EPS = 6.25e-10  # Gao et al. 2024
CHECKPOINT = "checkpoint.pt"
RUN_FILE = "run.json"
STORE_FILE = "train_activations.npy"
STORE_PROGRESS = "train_activations.progress.json"
REPORT_FILE = "training_report.json"


# ============================================================================ options
@dataclass
class TrainSAEConfig:
    """Every option of `train-sae`; defaults < --config TOML < command-line flags."""

    model: str = "smollm2"
    hook: str = "blocks.15.hook_resid_post"
    corpus: list[CorpusSource] = field(default_factory=list)
    out: str | None = None
    work_dir: str | None = None
    d_sae: int = 4096
    k: int = 32
    max_tokens: int | None = None
    heldout_fraction: float = 0.08
    context_size: int = 128
    packing: str = "split"
    harvest_batch_size: int = 16
    batch_size: int = 4096
    lr: float | None = None
    epochs: float = 1.0
    steps: int | None = None
    warmup_steps: int | None = None
    decay_fraction: float = 0.2
    buffer_tokens: int = 4_000_000
    store_dtype: str = "float16"
    aux_k: int = 512
    aux_coef: float = 1 / 32
    dead_after_tokens: int = 1_000_000
    init_b_dec: str = "geometric_median"
    checkpoint_every: int = 200
    log_every: int = 25
    eval_tokens: int | None = None
    eval_ce_tokens: int = 20_000
    eval_batch_size: int = 8
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False
    resume: bool = False
    keep_work: bool = False
    eval_only: bool = False
    progress: bool = True

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainSAEConfig:
        """Read a TOML file (keys = option names, plus [[corpus]] tables), then apply overrides."""
        from precompute.options import load_options

        return load_options(cls, path, overrides)  # load_options calls validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise FeatureGeomError(msg)

        if not self.corpus:
            bad(
                "train-sae needs a corpus: --corpus PATH[:GROUP[:CATEGORY]] (repeatable) or [[corpus]] in --config"
            )
        if not self.out:
            bad("train-sae needs --out DIR (where the SAELens directory is written)")
        if self.d_sae < 1 or not 0 < self.k <= self.d_sae:
            bad(f"need d_sae >= 1 and 0 < k <= d_sae; got d_sae={self.d_sae}, k={self.k}")
        if not 0 < self.heldout_fraction < 1:
            bad(f"--heldout-fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.batch_size < 2:
            bad("--batch-size must be at least 2")
        if self.steps is None and self.epochs <= 0:
            bad("--epochs must be positive (or give --steps)")
        if self.steps is not None and self.steps < 1:
            bad("--steps must be at least 1")
        if self.store_dtype not in ("float16", "float32"):
            bad("--store-dtype must be float16 or float32")
        if self.init_b_dec not in ("geometric_median", "mean", "zeros"):
            bad("--init-b-dec must be geometric_median, mean or zeros")
        if not 0 <= self.decay_fraction <= 1:
            bad("--decay-fraction must be in [0, 1]")
        if self.aux_k < 0 or self.aux_coef < 0:
            bad("--aux-k and --aux-coef must be non-negative")
        from precompute.options import check_ranges

        check_ranges(
            self,
            {
                "max_tokens": (0, None, "()"),
                "context_size": (2, None, "[)"),
                "harvest_batch_size": (1, None, "[)"),
                "lr": (0, None, "()"),
                "warmup_steps": (0, None, "[)"),
                "buffer_tokens": (1, None, "[)"),
                "dead_after_tokens": (1, None, "[)"),
                "checkpoint_every": (1, None, "[)"),
                "log_every": (1, None, "[)"),
                "eval_tokens": (1, None, "[)"),
                "eval_ce_tokens": (0, None, "[)"),
                "eval_batch_size": (1, None, "[)"),
                "seed": (0, 2**32 - 1, "[]"),
            },
            {"packing": ("split", "truncate", "pack"), "device": ("auto", "cpu", "cuda")},
        )
        if self.eval_only and (self.overwrite or self.resume):
            bad("--eval-only re-scores an existing --out; it takes neither --overwrite nor --resume")
        if self.overwrite and self.resume:
            bad("--overwrite discards the checkpoint that --resume asks for; pass one of them")

    def resolved_lr(self) -> float:
        """Gao et al.'s scaling: 2e-4 at 16k latents, times sqrt(16384 / d_sae)."""
        return float(self.lr) if self.lr is not None else 2e-4 * math.sqrt(16384 / self.d_sae)

    def resolved_work_dir(self) -> Path:
        if self.work_dir:
            return Path(self.work_dir)
        return Path(".featuregeom-work") / "train-sae" / Path(str(self.out)).resolve().name

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["corpus"] = [c.to_dict() for c in self.corpus]
        return out


_HELP = {
    "model": "model: 'smollm2' (the packaged SmolLM2-135M-Instruct GGUF), a .gguf file, a local "
    "transformers directory or a hub id (default: smollm2)",
    "hook": "hook point: a SAELens name such as blocks.15.hook_resid_post or a module path such as "
    "model.layers.15 (default: blocks.15.hook_resid_post)",
    "corpus": "corpus source PATH[:GROUP[:CATEGORY]] (JSONL/CSV/TXT/JSON/YAML, optionally .gz, or Parquet); "
    "repeat for several; replaces the config's [[corpus]] tables",
    "out": "output SAELens directory (cfg.json, sae_weights.safetensors, sparsity.safetensors, "
    "training_report.json)",
    "work_dir": "checkpoints and the activation store (default: .featuregeom-work/train-sae/<out name>); "
    "rerunning the same command resumes from here",
    "d_sae": "number of latents (default: 4096)",
    "k": "active latents per token, the TopK k (default: 32)",
    "max_tokens": "token budget (training + held-out) shared equally by sources without their own "
    "max_tokens (default: all tokens)",
    "heldout_fraction": "share of DOCUMENTS held out for evaluation, chosen by a hash of each document's "
    "content so they never reach training (default: 0.08)",
    "context_size": "tokens per context (default: 128)",
    "packing": "split | truncate | pack: how documents become contexts (default: split)",
    "harvest_batch_size": "contexts per model forward pass while collecting activations (default: 16)",
    "batch_size": "activations per optimiser step (default: 4096)",
    "lr": "Adam learning rate (default: 2e-4 * sqrt(16384 / d_sae), Gao et al.'s scaling)",
    "epochs": "passes over the training activations, may be fractional (default: 1); ignored with --steps",
    "steps": "optimiser steps (overrides --epochs)",
    "warmup_steps": "linear warm-up steps (default: 5%% of the steps, at most 1000)",
    "decay_fraction": "final share of the steps over which the learning rate decays linearly to 0 (default: 0.2)",
    "buffer_tokens": "activations shuffled together: if the store holds more, each epoch shuffles within "
    "blocks of this many (and it is read from disk); otherwise it is shuffled whole, "
    "in memory (default: 4000000)",
    "store_dtype": "float16 | float32: dtype of the on-disk activation store (default: float16)",
    "aux_k": "dead latents used by the AuxK loss per token (default: 512)",
    "aux_coef": "weight of the AuxK loss (default: 1/32)",
    "dead_after_tokens": "a latent counts as dead after this many training tokens without firing "
    "(default: 1000000)",
    "init_b_dec": "geometric_median | mean | zeros: initial decoder bias from a data sample "
    "(default: geometric_median)",
    "checkpoint_every": "steps between checkpoints (default: 200)",
    "log_every": "steps between training-curve points (default: 25)",
    "eval_tokens": "held-out tokens used for explained variance, L0 and dead latents (default: all)",
    "eval_ce_tokens": "held-out tokens for the cross-entropy comparison, which needs three full forward "
    "passes (default: 20000)",
    "eval_batch_size": "contexts per forward pass in the evaluation (default: 8)",
    "device": "auto | cpu | cuda (default: auto)",
    "seed": "seed for the initialisation, the shuffling and the corpus subsets (default: 0)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `featuregeom train-sae`; every option can also be a key of the --config TOML file."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Options can come from --config FILE.toml (keys = option names with underscores, plus [[corpus]]\n"
        "tables with path/group/category/text_field/format/where/max_tokens); flags override the file.\n"
        "Rerunning the same command resumes from the last checkpoint in --work-dir; --overwrite starts\n"
        "afresh and replaces --out. Example:\n"
        "  featuregeom train-sae --config configs/train-sae.toml \\\n"
        "      --out assets/sae/smollm2-135m-instruct-blocks.15.hook_resid_post-topk"
    )
    a = parser.add_argument
    a("--config", metavar="FILE.toml", default=None, help="TOML file with any of these options")
    a("--model", default=None, help=_HELP["model"])
    a("--hook", default=None, help=_HELP["hook"])
    a("--corpus", action="append", default=None, metavar="PATH[:GROUP[:CATEGORY]]", help=_HELP["corpus"])
    a("--out", default=None, metavar="DIR", help=_HELP["out"])
    a("--work-dir", default=None, metavar="DIR", help=_HELP["work_dir"])
    g = parser.add_argument_group("SAE and optimisation")
    g.add_argument("--d-sae", type=int, default=None, help=_HELP["d_sae"])
    g.add_argument("--k", type=int, default=None, help=_HELP["k"])
    g.add_argument("--batch-size", type=int, default=None, help=_HELP["batch_size"])
    g.add_argument("--lr", type=float, default=None, help=_HELP["lr"])
    g.add_argument("--epochs", type=float, default=None, help=_HELP["epochs"])
    g.add_argument("--steps", type=int, default=None, help=_HELP["steps"])
    g.add_argument("--warmup-steps", type=int, default=None, help=_HELP["warmup_steps"])
    g.add_argument("--decay-fraction", type=float, default=None, help=_HELP["decay_fraction"])
    g.add_argument("--aux-k", type=int, default=None, help=_HELP["aux_k"])
    g.add_argument("--aux-coef", type=float, default=None, help=_HELP["aux_coef"])
    g.add_argument("--dead-after-tokens", type=int, default=None, help=_HELP["dead_after_tokens"])
    g.add_argument(
        "--init-b-dec", choices=("geometric_median", "mean", "zeros"), default=None, help=_HELP["init_b_dec"]
    )
    g.add_argument("--seed", type=int, default=None, help=_HELP["seed"])
    g = parser.add_argument_group("data")
    g.add_argument("--max-tokens", type=int, default=None, help=_HELP["max_tokens"])
    g.add_argument("--heldout-fraction", type=float, default=None, help=_HELP["heldout_fraction"])
    g.add_argument("--context-size", type=int, default=None, help=_HELP["context_size"])
    g.add_argument("--packing", choices=("split", "truncate", "pack"), default=None, help=_HELP["packing"])
    g.add_argument("--harvest-batch-size", type=int, default=None, help=_HELP["harvest_batch_size"])
    g.add_argument("--buffer-tokens", type=int, default=None, help=_HELP["buffer_tokens"])
    g.add_argument("--store-dtype", choices=("float16", "float32"), default=None, help=_HELP["store_dtype"])
    g = parser.add_argument_group("evaluation, checkpoints and running")
    g.add_argument("--eval-tokens", type=int, default=None, help=_HELP["eval_tokens"])
    g.add_argument("--eval-ce-tokens", type=int, default=None, help=_HELP["eval_ce_tokens"])
    g.add_argument("--eval-batch-size", type=int, default=None, help=_HELP["eval_batch_size"])
    g.add_argument("--checkpoint-every", type=int, default=None, help=_HELP["checkpoint_every"])
    g.add_argument("--log-every", type=int, default=None, help=_HELP["log_every"])
    g.add_argument("--device", default=None, help=_HELP["device"])
    g.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="require a checkpoint to resume from (without it, one is used when present and compatible)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="discard any checkpoint in --work-dir and replace --out if it exists",
    )
    g.add_argument(
        "--keep-work",
        action="store_true",
        default=None,
        help="keep the activation store in --work-dir after success (default: delete it)",
    )
    g.add_argument(
        "--eval-only",
        action="store_true",
        default=None,
        help="no training: re-evaluate the SAE already in --out on the held-out split of this "
        "config and update its cfg.json eval, sparsity and training_report.json",
    )
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bars"
    )


# ============================================================================ trainer
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
        total_var = (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
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
            aux = (aux_recon - target).pow(2).sum() / (target - target.mean(dim=0)).pow(2).sum().clamp_min(
                1e-12
            )
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
        self.tokens_since_fired += indices.shape[0]
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
        self.remove_parallel_grad()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        self.normalize_decoder()
        self.update_dead(info["indices"], info["values"])
        return StepStats(
            float(loss.detach()),
            float(info["fvu"]),
            float(info["aux"]),
            float((info["values"] > 0).sum(dim=1).float().mean()),
            info["n_dead"],
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
    trainer: TopKSAETrainer, lr: float, total_steps: int, warmup_steps: int, decay_fraction: float
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.Adam(trainer.parameters(), lr=lr, betas=(0.9, 0.999), eps=ADAM_EPS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup_steps, decay_fraction)
    )
    return optimizer, scheduler


def default_warmup(total_steps: int) -> int:
    return max(1, min(1000, total_steps // 20))


# ============================================================================ data order
class ShuffledBatches:
    """Deterministic batch order over a [n, d] activation array: step -> row indices.

    Each epoch is a fresh permutation (seeded by seed and epoch). When n exceeds `buffer_rows`
    the permutation shuffles blocks of `buffer_rows` consecutive rows and rows within a block, so
    a batch reads from one contiguous stretch of a disk store. A step's rows depend only on
    (seed, step), which makes resuming exact.
    """

    def __init__(
        self, data: np.ndarray | torch.Tensor, batch_size: int, seed: int, buffer_rows: int | None = None
    ):
        self.data = data
        self.n = int(data.shape[0])
        if self.n < batch_size:
            raise FeatureGeomError(
                f"only {self.n} training activations, fewer than one batch of {batch_size}; "
                "use more tokens or a smaller --batch-size"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.buffer_rows = min(self.n, buffer_rows or self.n)
        self.steps_per_epoch = self.n // batch_size
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.buffer_rows >= self.n:
            return rng.permutation(self.n)
        starts = np.arange(0, self.n, self.buffer_rows)
        parts = [s + rng.permutation(min(self.buffer_rows, self.n - s)) for s in rng.permutation(starts)]
        return np.concatenate(parts)

    def indices(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm, self._epoch = self.permutation(epoch), epoch
        return self._perm[j * self.batch_size : (j + 1) * self.batch_size]

    def batch(self, step: int) -> torch.Tensor:
        idx = self.indices(step)
        if isinstance(self.data, torch.Tensor):
            return self.data[torch.from_numpy(idx)].float()
        return torch.from_numpy(np.asarray(self.data[np.sort(idx)], dtype=np.float32))


# ============================================================================ training loop
def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class TrainResult:
    trainer: TopKSAETrainer
    steps: int
    curve: list[dict[str, float]]
    train_seconds: float
    resumed_from: int | None


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
    trainer.to(device)
    optimizer, scheduler = make_optimizer(trainer, lr, total_steps, warmup_steps, decay_fraction)
    start, curve, elapsed, resumed = 0, [], 0.0, None
    window: list[StepStats] = []  # steps since the last curve point (kept across a resume)
    ckpt_path = work_dir / CHECKPOINT if work_dir else None
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    if ckpt_path is not None and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if state.get("signature") != signature:
            raise FeatureGeomError(
                f"{ckpt_path} belongs to a run with different settings; pass --overwrite to discard it "
                "or choose another --work-dir"
            )
        trainer.load_state_dict(state["trainer"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_torch"])
        start, curve, elapsed, resumed = state["step"], state["curve"], state["elapsed"], state["step"]
        window = [StepStats(**w) for w in state.get("window", [])]

    t_start = time.perf_counter()

    def seconds() -> float:
        return elapsed + time.perf_counter() - t_start

    def save(step: int) -> None:
        if ckpt_path is None:
            return
        _atomic_torch_save(
            {
                "signature": signature,
                "step": step,
                "trainer": trainer.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng_torch": torch.get_rng_state(),
                "curve": curve,
                "elapsed": seconds(),
                "window": [asdict(w) for w in window],
            },
            ckpt_path,
        )

    bar = tqdm(
        total=total_steps, initial=start, desc="train", unit="step", disable=not progress, smoothing=0.05
    )
    t_window = time.perf_counter()
    end = total_steps if stop_at is None else min(stop_at, total_steps)
    for step in range(start, end):
        x = data.batch(step).to(device) * trainer.norm_factor
        stats = trainer.step(x, optimizer, scheduler)
        if not math.isfinite(stats.loss):
            raise FeatureGeomError(
                f"the loss became {stats.loss} at step {step}; lower --lr (now {lr:g}) and rerun with --overwrite"
            )
        window.append(stats)
        done = step + 1
        if done % log_every == 0 or done == total_steps:
            now = time.perf_counter()
            rate = len(window) * data.batch_size / max(now - t_window, 1e-9)
            point = {
                "step": done,
                "tokens": done * data.batch_size,
                "loss": float(np.mean([s.loss for s in window])),
                "fvu": float(np.mean([s.fvu for s in window])),
                "aux_loss": float(np.mean([s.aux_loss for s in window])),
                "l0": float(np.mean([s.l0 for s in window])),
                "dead_fraction": window[-1].n_dead / trainer.d_sae,
                "lr": float(scheduler.get_last_lr()[0]),
                "acts_per_s": rate,
                "elapsed_s": seconds(),
            }
            curve.append(point)
            bar.set_postfix(
                loss=f"{point['loss']:.4f}",
                fvu=f"{point['fvu']:.3f}",
                l0=f"{point['l0']:.1f}",
                dead=f"{point['dead_fraction']:.1%}",
                acts_s=f"{rate:,.0f}",
            )
            window, t_window = [], now
        bar.update(1)
        if done % checkpoint_every == 0 or done == end:
            save(done)
    bar.close()
    return TrainResult(trainer, max(start, end), curve, seconds(), resumed)


# ============================================================================ corpus split
def document_key(doc: Document) -> str:
    """What identifies a document across configs: its content (text or chat messages)."""
    if doc.messages is not None:
        return json.dumps(doc.messages, sort_keys=True, ensure_ascii=False)
    return doc.text or ""


def is_heldout(doc: Document, fraction: float) -> bool:
    """Deterministic document-level split: a hash of the content, so duplicates fall on one side
    and the split does not move when budgets, seeds or the order of sources change."""
    digest = hashlib.sha256(document_key(doc).encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def plan_split(
    sources: list[CorpusSource],
    tokenizer: Any,
    context_size: int = 128,
    packing: str = "split",
    max_tokens: int | None = None,
    heldout_fraction: float = 0.08,
    seed: int = 0,
) -> tuple[CorpusPlan, CorpusPlan]:
    """Like `plan_corpus`, but documents are first split into training and held-out sets.

    Each source's token budget (its own max_tokens, or an equal share of `max_tokens`) is split in
    the same proportion, so held-out tokens come from documents the SAE never saw.
    """
    if not sources:
        raise CorpusError("no corpus given: pass --corpus PATH[:GROUP[:CATEGORY]] at least once")
    unbudgeted = [s for s in sources if s.max_tokens is None]
    share = None
    if max_tokens is not None:
        fixed = sum(s.max_tokens or 0 for s in sources)
        share = max(0, max_tokens - fixed) // max(1, len(unbudgeted))
    parts: dict[str, dict[str, list]] = {
        name: {"documents": [], "contexts": [], "stats": [], "tokens": []} for name in ("train", "heldout")
    }
    next_doc, next_ctx = 0, 0
    for index, source in enumerate(sources):
        docs, stats = read_source(source, index, first_doc_id=next_doc, seed=seed)
        next_doc += len(docs)
        budget = source.max_tokens if source.max_tokens is not None else share
        held = [d for d in docs if is_heldout(d, heldout_fraction)]
        train = [d for d in docs if not is_heldout(d, heldout_fraction)]
        budgets = {"train": None, "heldout": None}
        if budget is not None:
            budgets["heldout"] = max(2, int(round(budget * heldout_fraction)))
            budgets["train"] = max(2, budget - budgets["heldout"])
        for name, subset in (("train", train), ("heldout", held)):
            made = list(pack_contexts(subset, tokenizer, context_size, packing, budgets[name], next_ctx))
            next_ctx += len(made)
            used = {c for ctx in made for c in ctx.doc_ids}
            part = parts[name]
            part["documents"].extend(d for d in subset if d.doc_id in used)
            part["contexts"].extend(made)
            part["stats"].append(ReadStats(records=stats.records, documents=len(used)))
            part["tokens"].append(sum(len(c.token_ids) for c in made))
    for name in ("train", "heldout"):
        if not parts[name]["contexts"]:
            raise CorpusError(
                f"the {name} split got no tokens; use more documents or another --heldout-fraction"
            )
    return tuple(  # type: ignore[return-value]
        CorpusPlan(sources, p["documents"], p["contexts"], p["stats"], p["tokens"])
        for p in (parts["train"], parts["heldout"])
    )


def skip_ids_of(tokenizer: Any) -> set[int]:
    """Special tokens never count (same rule as the harvest)."""
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def pad_id_of(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0


def counted_positions(context: Context, skip_ids: set[int]) -> int:
    """Rows a context contributes to the activation store (position 0 and special tokens excluded)."""
    return sum(1 for i, t in enumerate(context.token_ids) if i > 0 and t not in skip_ids)


# ============================================================================ activation store
def harvest_store(
    plan: CorpusPlan,
    reader: HookReader,
    tokenizer: Any,
    work_dir: Path,
    d_in: int,
    batch_size: int,
    device: torch.device,
    dtype: str = "float16",
    seed: int = 0,
    progress: bool = True,
    signature: str = "",
) -> np.ndarray:
    """Write the training activations to `work_dir/train_activations.npy`, resumable per batch.

    Batches are taken in a seeded random order (each is still length-homogeneous), so the rows of
    the store are already mixed across sources before any shuffling.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    skip_ids, pad_id = skip_ids_of(tokenizer), pad_id_of(tokenizer)
    batches = plan.batches(batch_size)
    order = np.random.default_rng([seed, 7]).permutation(len(batches))
    batches = [batches[i] for i in order]
    rows_per_batch = [sum(counted_positions(c, skip_ids) for c in b) for b in batches]
    offsets = np.concatenate([[0], np.cumsum(rows_per_batch)]).astype(np.int64)
    n_rows = int(offsets[-1])
    path, progress_path = work_dir / STORE_FILE, work_dir / STORE_PROGRESS
    np_dtype = np.float16 if dtype == "float16" else np.float32
    done = 0
    if path.is_file() and progress_path.is_file():
        info = json.loads(progress_path.read_text())
        same = (info.get("rows"), info.get("d_in"), info.get("dtype"), info.get("signature"))
        if same == (n_rows, d_in, dtype, signature):
            done = int(info["batches_done"])
    if done == 0 or not path.is_file():
        store = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=(n_rows, d_in))
        done = 0
    else:
        store = np.lib.format.open_memmap(path, mode="r+")
    if done == len(batches):
        return store
    bar = tqdm(
        total=n_rows,
        initial=int(offsets[done]),
        desc="collect activations",
        unit="act",
        unit_scale=True,
        disable=not progress,
        smoothing=0.1,
    )
    last_flush = time.perf_counter()
    limit = np.finfo(np_dtype).max
    for batch in iter_activations(reader, batches, pad_id, skip_ids, device, start_batch=done):
        acts = batch.acts.cpu()
        if acts.shape[0] != rows_per_batch[batch.index]:
            raise FeatureGeomError(
                "internal error: the counted positions of a batch changed between plan and run"
            )
        if float(acts.abs().max()) > limit:
            raise FeatureGeomError(
                f"activations exceed the {dtype} range ({float(acts.abs().max()):.3g}); use --store-dtype float32"
            )
        store[offsets[batch.index] : offsets[batch.index + 1]] = acts.numpy().astype(np_dtype)
        bar.update(acts.shape[0])
        done = batch.index + 1
        if time.perf_counter() - last_flush > 30 or done == len(batches):
            store.flush()
            _atomic_write_text(
                progress_path,
                json.dumps(
                    {
                        "rows": n_rows,
                        "d_in": d_in,
                        "dtype": dtype,
                        "signature": signature,
                        "batches_done": done,
                        "batches": len(batches),
                    }
                ),
            )
            last_flush = time.perf_counter()
    bar.close()
    return store


def sample_rows(data: np.ndarray | torch.Tensor, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, 11])
    idx = np.sort(rng.choice(data.shape[0], size=min(n, data.shape[0]), replace=False))
    if isinstance(data, torch.Tensor):
        return data[torch.from_numpy(idx)].float()
    return torch.from_numpy(np.asarray(data[idx], dtype=np.float32))


# ============================================================================ evaluation
@contextlib.contextmanager
def _hook_override(
    module: torch.nn.Module, hook: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]
):
    """Call `fn` on the hook's activations during a full forward pass; a tensor it returns replaces them."""
    if hook.read_input:

        def pre_hook(_m, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            new = fn(hidden)
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def post_hook(_m, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            new = fn(hidden)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()


class VarianceStats:
    """Streaming sums for explained variance, 1 - sum||x - x_hat||^2 / sum||x - mean||^2 (float64)."""

    def __init__(self, d: int):
        self.n = 0
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_sq = 0.0
        self.sum_err = 0.0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        xd = x.double()
        self.n += x.shape[0]
        self.sum_x += xd.sum(dim=0).cpu()
        self.sum_sq += float(xd.pow(2).sum())
        self.sum_err += float((xd - x_hat.double()).pow(2).sum())

    @property
    def total_variance(self) -> float:
        return self.sum_sq - float((self.sum_x / max(self.n, 1)).pow(2).sum()) * self.n

    def explained_variance(self) -> float:
        return 1.0 - self.sum_err / self.total_variance if self.n > 1 else float("nan")


class _Capture:
    """Hook callback that keeps the activations and leaves them unchanged."""

    hidden: torch.Tensor

    def __call__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


class _Splice:
    """Hook callback that replaces the activations at `mask` positions by `values`."""

    def __init__(self, mask: torch.Tensor, values: torch.Tensor):
        self.mask, self.values = mask, values

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        out = hidden.clone()
        out[self.mask] = self.values.to(hidden.dtype)
        return out


def _target_logprobs(logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [n, vocab] at the positions whose next token is scored."""
    return torch.log_softmax(logits[:, :-1][target_mask].float(), dim=-1)


@torch.no_grad()
def evaluate(
    sae: SAE,
    model: torch.nn.Module,
    hook: HookPoint,
    contexts: list[Context],
    tokenizer: Any,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    max_tokens: int | None = None,
    ce_tokens: int = 20_000,
    progress: bool = False,
    outlier_factor: float = 10.0,
) -> dict[str, Any]:
    """Quality of `sae` (raw-activation space) on held-out contexts.

    * explained_variance = 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 over counted positions;
    * explained_variance_no_outliers: the same without "massive activation" tokens (norm above
      `outlier_factor` x the median norm of the first batch). A handful of such tokens (e.g. a
      newline right after a window start in SmolLM2, norm ~100x the median) can hold most of the
      variance and, being easy to reconstruct, inflate the plain figure;
    * l0 = mean number of active latents; dead_fraction = share of latents that never fire;
    * on the first `ce_tokens` tokens: next-token cross-entropy with the clean model, with the hook
      activations replaced by the SAE reconstruction at counted positions ("spliced"), and with them
      zeroed; fraction of CE recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean).
    Returns the figures plus `firing_counts` (tensor [d_sae]) for the sparsity file.
    """
    device = torch.device(device)
    sae = sae.to(device)
    skip_ids, pad_id = skip_ids_of(tokenizer), pad_id_of(tokenizer)
    module = dict(model.named_modules())[hook.module_path]
    reader = HookReader(model, hook)
    order = sorted(contexts, key=lambda c: (-len(c.token_ids), c.context_id))
    # Interleave long and short contexts in a fixed order so a token cap samples all lengths.
    rng = np.random.default_rng(1234)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    stats_all, stats_typical = VarianceStats(sae.d_in), VarianceStats(sae.d_in)
    threshold: float | None = None
    n_tok = 0
    sum_l0 = 0.0
    counts = torch.zeros(sae.d_sae, dtype=torch.long)
    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    kl_sum = 0.0
    n_ce = 0
    total = sum(len(c.token_ids) for c in contexts)
    if max_tokens is not None:
        total = min(total, max_tokens)
    bar = tqdm(total=total, desc="evaluate", unit="tok", unit_scale=True, disable=not progress)

    def accumulate(x: torch.Tensor) -> torch.Tensor:
        nonlocal n_tok, sum_l0, threshold
        if fast_topk:  # sparse path: no [N, d_sae] intermediate
            idx, vals = sae.encode_sparse(x)
            x_hat = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum") + sae.b_dec
            active = vals > 0
            fired = idx[active]
        else:
            acts = sae.encode(x)
            x_hat = sae.reconstruct(x)
            active = acts > 0
            fired = active.nonzero(as_tuple=True)[1]
        x_hat = x_hat.float()
        norms = x.norm(dim=1)
        if threshold is None and x.shape[0] > 0:
            threshold = outlier_factor * float(norms.median())
        typical = norms <= threshold if threshold is not None else torch.ones_like(norms, dtype=torch.bool)
        stats_all.add(x, x_hat)
        stats_typical.add(x[typical], x_hat[typical])
        n_tok += x.shape[0]
        sum_l0 += float(active.sum())
        counts.index_add_(0, fired.cpu(), torch.ones(fired.numel(), dtype=torch.long))
        return x_hat

    fast_topk = (
        sae.architecture == "topk"
        and sae.normalize_activations == "none"
        and not sae.rescale_acts_by_decoder_norm
    )

    used = 0
    for batch in batches:
        if max_tokens is not None and used >= max_tokens:
            break
        ids, attention = pad_batch([c.token_ids for c in batch], pad_id)
        mask = count_mask(ids, attention, skip_ids).to(device)
        ids, attention = ids.to(device), attention.to(device)
        if n_ce < ce_tokens:
            # Targets: token t+1 predicted at a counted position t.
            target_mask = mask[:, :-1] & attention[:, 1:].bool()
            targets = ids[:, 1:][target_mask]
            capture = _Capture()
            with _hook_override(module, hook, capture):
                logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            x = capture.hidden[mask].float()
            x_hat = accumulate(x)
            lp_clean = _target_logprobs(logits, target_mask)
            ce["clean"] += float(-lp_clean.gather(1, targets[:, None]).sum())
            with _hook_override(module, hook, _Splice(mask, x_hat)):
                lp = _target_logprobs(
                    model(input_ids=ids, attention_mask=attention, use_cache=False).logits, target_mask
                )
            ce["spliced"] += float(-lp.gather(1, targets[:, None]).sum())
            kl_sum += float((lp_clean.exp() * (lp_clean - lp)).sum())
            with _hook_override(module, hook, _Splice(mask, torch.zeros_like(x_hat))):
                lp = _target_logprobs(
                    model(input_ids=ids, attention_mask=attention, use_cache=False).logits, target_mask
                )
            ce["zero"] += float(-lp.gather(1, targets[:, None]).sum())
            n_ce += int(targets.numel())
        else:
            hidden = reader(ids, attention)
            accumulate(hidden[mask].float())
        tokens = int(attention.sum())
        used += tokens
        bar.update(tokens)
    bar.close()
    if n_tok == 0:
        raise FeatureGeomError("the held-out set has no counted tokens to evaluate on")
    result: dict[str, Any] = {
        "tokens": n_tok,
        "explained_variance": stats_all.explained_variance(),
        "explained_variance_no_outliers": stats_typical.explained_variance(),
        "outlier_tokens": n_tok - stats_typical.n,
        "outlier_norm_threshold": threshold,
        "outlier_variance_share": 1.0 - stats_typical.total_variance / stats_all.total_variance,
        "median_norm": threshold / outlier_factor if threshold else None,
        "mse_per_token": stats_all.sum_err / n_tok,
        "l0": sum_l0 / n_tok,
        "dead_fraction": float((counts == 0).float().mean()),
        "dead_latents": int((counts == 0).sum()),
        "firing_counts": counts,
    }
    if n_ce:
        clean, spliced, zero = (ce[key] / n_ce for key in ("clean", "spliced", "zero"))
        result.update(
            {
                "ce_tokens": n_ce,
                "ce_clean": clean,
                "ce_spliced": spliced,
                "ce_zero_ablated": zero,
                "ce_increase": spliced - clean,
                "ce_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
                "kl_spliced": kl_sum / n_ce,
            }
        )
    return result


def log10_sparsity(counts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """SAELens' sparsity tensor: log10 of each latent's firing frequency (-10 for never)."""
    return torch.log10(counts.double() / max(n_tokens, 1) + 1e-10).float()


# ============================================================================ the command
def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in fields(TrainSAEConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


DATA_KEYS = (
    "hook",
    "max_tokens",
    "heldout_fraction",
    "context_size",
    "packing",
    "harvest_batch_size",
    "store_dtype",
    "seed",
)
TRAIN_KEYS = (
    "d_sae",
    "k",
    "batch_size",
    "lr",
    "epochs",
    "steps",
    "warmup_steps",
    "decay_fraction",
    "buffer_tokens",
    "aux_k",
    "aux_coef",
    "dead_after_tokens",
    "init_b_dec",
)


def _signature(
    cfg: TrainSAEConfig,
    model_info: dict[str, Any],
    corpus_hashes: list[str],
    d_in: int,
    data_only: bool = False,
) -> str:
    """A hash of everything that changes the activation store (`data_only`) or the trained SAE.

    A checkpoint is reused only under the same full signature; the activation store only under
    the same data signature (so --overwrite with new optimiser settings does not re-collect it).
    """
    keys = DATA_KEYS if data_only else DATA_KEYS + TRAIN_KEYS
    payload: dict[str, Any] = {k: getattr(cfg, k) for k in keys}
    payload["corpus"] = [c.to_dict() for c in cfg.corpus]
    payload["corpus_sha256"] = corpus_hashes
    payload["model"] = {
        "spec": model_info.get("spec"),
        "sha256": model_info.get("sha256"),
        "architecture": model_info.get("architecture"),
        "d_model": d_in,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("train_sae.py", "__main__.py")):
        argv = ["python", "-m", "precompute.training.train_sae"] + argv[1:]
    elif argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def run(args: argparse.Namespace) -> int:
    """Train, evaluate and write the SAE named by `args` (see `add_arguments`)."""
    from precompute.cache import check_replaceable_output, sha256_of, write_dir_atomic
    from precompute.model.hooks import resolve_hook
    from precompute.model.load import load_model, resolve_device
    from precompute.sae.formats.saelens import save_saelens

    cfg = TrainSAEConfig.load(getattr(args, "config", None), _overrides(args))
    if cfg.eval_only:
        return _eval_only(cfg)
    out = Path(str(cfg.out))
    work = cfg.resolved_work_dir()
    say = print if cfg.progress else (lambda *a, **k: None)
    # --overwrite replaces an earlier SAE of ours, never a user's folder (checked before any work)
    check_replaceable_output(out, REPORT_FILE, "train-sae output")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FeatureGeomError(
            f"{out} already exists; pass --overwrite to replace it (or choose another --out)"
        )
    if cfg.overwrite:  # a fresh start; an activation store with the same data settings is reused
        for name in (CHECKPOINT, RUN_FILE):
            (work / name).unlink(missing_ok=True)
    if cfg.resume and not (work / CHECKPOINT).is_file() and not (work / STORE_PROGRESS).is_file():
        raise FeatureGeomError(f"--resume: no checkpoint in {work}; run without --resume to start")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)

    loaded = load_model(cfg.model, device=str(device))
    hook = resolve_hook(loaded.model, cfg.hook)
    d_in = loaded.d_model
    say(
        f"model {cfg.model} ({loaded.describe()['architecture']}, d_model {d_in}) loaded in "
        f"{loaded.load_seconds:.1f} s; hook {hook.name} -> {hook.module_path}"
    )
    corpus_hashes = [sha256_of(c.path) for c in cfg.corpus]
    train_plan, held_plan = plan_split(
        cfg.corpus,
        loaded.tokenizer,
        cfg.context_size,
        cfg.packing,
        cfg.max_tokens,
        cfg.heldout_fraction,
        cfg.seed,
    )
    say(
        f"corpus: {train_plan.n_tokens:,} training tokens ({len(train_plan.documents):,} documents), "
        f"{held_plan.n_tokens:,} held-out tokens ({len(held_plan.documents):,} documents)"
    )
    signature = _signature(cfg, loaded.describe(), corpus_hashes, d_in)
    data_signature = _signature(cfg, loaded.describe(), corpus_hashes, d_in, data_only=True)
    run_path = work / RUN_FILE
    if run_path.is_file():
        previous = json.loads(run_path.read_text()).get("signature")
        if previous != signature:
            raise FeatureGeomError(
                f"{work} holds a run with different settings; pass --overwrite to discard it or "
                "choose another --work-dir"
            )
    _atomic_write_text(
        run_path, json.dumps({"signature": signature, "config": cfg.to_dict()}, indent=2, default=str)
    )

    # ---- activations
    t_collect = time.perf_counter()
    reader = HookReader(loaded.model, hook)
    store = harvest_store(
        train_plan,
        reader,
        loaded.tokenizer,
        work,
        d_in,
        cfg.harvest_batch_size,
        device,
        cfg.store_dtype,
        cfg.seed,
        cfg.progress,
        data_signature,
    )
    collect_s = time.perf_counter() - t_collect
    n_rows = int(store.shape[0])
    data: np.ndarray | torch.Tensor = store
    if n_rows <= cfg.buffer_tokens:
        data = torch.from_numpy(np.asarray(store, dtype=np.float32))  # whole store in memory
    batches = ShuffledBatches(data, cfg.batch_size, cfg.seed, cfg.buffer_tokens)
    total_steps = cfg.steps or max(1, int(math.ceil(cfg.epochs * batches.steps_per_epoch)))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup(total_steps)
    lr = cfg.resolved_lr()
    say(
        f"training: {n_rows:,} activations, {total_steps:,} steps of {cfg.batch_size} "
        f"({total_steps * cfg.batch_size / n_rows:.2f} epochs), d_sae {cfg.d_sae}, k {cfg.k}, lr {lr:g}"
    )

    # ---- training
    trainer = TopKSAETrainer(d_in, cfg.d_sae, cfg.k, cfg.aux_k, cfg.aux_coef, cfg.dead_after_tokens, cfg.seed)
    trainer.init_from_sample(sample_rows(data, 32768, cfg.seed), cfg.init_b_dec)
    result = fit(
        trainer,
        batches,
        total_steps,
        lr,
        warmup,
        cfg.decay_fraction,
        work,
        cfg.checkpoint_every,
        cfg.log_every,
        signature,
        progress=cfg.progress,
        device=device,
    )
    del data, batches, store

    # ---- evaluation
    meta = {
        "model_name": loaded.name,
        "hook_name": hook.name,
        "context_size": cfg.context_size,
        "prepend_bos": False,
        "exclude_special_tokens": True,
        "dataset_path": ", ".join(c.path for c in cfg.corpus),
        "model_spec": cfg.model,
        "model_sha256": loaded.sha256,
        "hook_module": hook.module_path,
    }
    sae = result.trainer.cpu().to_sae(hook_name=hook.name, model_name=meta["model_name"], metadata=meta)
    t_eval = time.perf_counter()
    metrics = evaluate(
        sae,
        loaded.model,
        hook,
        held_plan.contexts,
        loaded.tokenizer,
        device,
        cfg.eval_batch_size,
        cfg.eval_tokens,
        cfg.eval_ce_tokens,
        cfg.progress,
    )
    eval_s = time.perf_counter() - t_eval
    counts = metrics.pop("firing_counts")
    sparsity = log10_sparsity(counts, metrics["tokens"])
    total_s = time.perf_counter() - t0

    corpus_info = []
    for i, src in enumerate(cfg.corpus):
        corpus_info.append(
            {
                **src.to_dict(),
                "sha256": corpus_hashes[i],
                "train_tokens": train_plan.tokens_per_source[i],
                "heldout_tokens": held_plan.tokens_per_source[i],
                "train_documents": train_plan.stats[i].documents,
                "heldout_documents": held_plan.stats[i].documents,
            }
        )
    training = {
        "d_sae": cfg.d_sae,
        "k": cfg.k,
        "steps": total_steps,
        "batch_size": cfg.batch_size,
        "lr": lr,
        "warmup_steps": warmup,
        "decay_fraction": cfg.decay_fraction,
        "aux_k": cfg.aux_k,
        "aux_coef": cfg.aux_coef,
        "dead_after_tokens": cfg.dead_after_tokens,
        "init_b_dec": cfg.init_b_dec,
        "seed": cfg.seed,
        "train_activations": n_rows,
        "epochs": total_steps * cfg.batch_size / n_rows,
        "heldout_fraction": cfg.heldout_fraction,
        "heldout_tokens": metrics["tokens"],
        "norm_scaling_factor_folded": float(trainer.norm_factor),
    }
    timing = {
        "collect_s": collect_s,
        "train_s": result.train_seconds,
        "eval_s": eval_s,
        "total_s": total_s,
        "resumed_from_step": result.resumed_from,
    }
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
    }
    extra = {
        "metadata": {
            **meta,
            "norm_scaling_factor_folded": float(trainer.norm_factor),
            "eval": metrics,
            "training": training,
            "trained_with": "featuregeom train-sae (TopK, Gao et al. 2024)",
        }
    }
    report = {
        "command": _command_line(),
        "config": cfg.to_dict(),
        "model": loaded.describe(),
        "hook": hook.describe(),
        "corpus": corpus_info,
        "training": training,
        "eval": metrics,
        "timing": timing,
        "machine": machine,
        "curve": result.curve,
    }

    def write(staging: Path) -> None:
        save_saelens(sae, staging, extra_cfg=extra, sparsity=sparsity)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))

    write_dir_atomic(out, write, marker=REPORT_FILE, what="train-sae output")
    if not cfg.keep_work:
        for name in (STORE_FILE, STORE_PROGRESS):
            (work / name).unlink(missing_ok=True)
    print(_summary(metrics))
    print(
        f"wrote {out} in {total_s / 60:.1f} min (collect {collect_s:.0f} s, train {result.train_seconds:.0f} s, "
        f"eval {eval_s:.0f} s)"
    )
    return 0


def _summary(metrics: dict[str, Any]) -> str:
    line = (
        f"held-out ({metrics['tokens']:,} tokens): explained variance {metrics['explained_variance']:.4f} "
        f"({metrics['explained_variance_no_outliers']:.4f} without {metrics['outlier_tokens']} massive-norm "
        f"tokens), L0 {metrics['l0']:.1f}, dead {metrics['dead_fraction']:.2%}"
    )
    if "ce_clean" in metrics:
        line += (
            f", CE clean {metrics['ce_clean']:.4f} / spliced {metrics['ce_spliced']:.4f} / zero "
            f"{metrics['ce_zero_ablated']:.4f} (recovered {metrics['ce_recovered']:.1%})"
        )
    return line


def _eval_only(cfg: TrainSAEConfig) -> int:
    """Re-score the SAE in --out on this config's held-out documents; rewrite its recorded figures."""
    from safetensors.torch import save_file

    from precompute.model.hooks import resolve_hook
    from precompute.model.load import load_model, resolve_device
    from precompute.sae.registry import load_sae

    out = Path(str(cfg.out))
    if not (out / "cfg.json").is_file():
        raise FeatureGeomError(f"--eval-only needs an SAE directory in --out; {out} has no cfg.json")
    device = resolve_device(cfg.device)
    sae = load_sae(str(out))
    loaded = load_model(cfg.model, device=str(device))
    hook = resolve_hook(loaded.model, sae.hook_name or cfg.hook)
    _, held_plan = plan_split(
        cfg.corpus,
        loaded.tokenizer,
        cfg.context_size,
        cfg.packing,
        cfg.max_tokens,
        cfg.heldout_fraction,
        cfg.seed,
    )
    t0 = time.perf_counter()
    metrics = evaluate(
        sae,
        loaded.model,
        hook,
        held_plan.contexts,
        loaded.tokenizer,
        device,
        cfg.eval_batch_size,
        cfg.eval_tokens,
        cfg.eval_ce_tokens,
        cfg.progress,
    )
    eval_s = time.perf_counter() - t0
    counts = metrics.pop("firing_counts")
    tmp = out / f"sparsity.safetensors.tmp-{os.getpid()}"
    save_file({"sparsity": log10_sparsity(counts, metrics["tokens"]).contiguous()}, str(tmp))
    os.replace(tmp, out / "sparsity.safetensors")
    cfg_json = json.loads((out / "cfg.json").read_text())
    cfg_json.setdefault("metadata", {})["eval"] = metrics
    _atomic_write_text(out / "cfg.json", json.dumps(cfg_json, indent=2))
    report_path = out / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["eval"] = metrics
    report.setdefault("evaluations", []).append(
        {"command": _command_line(), "eval_s": eval_s, "eval": metrics}
    )
    _atomic_write_text(report_path, json.dumps(report, indent=2, default=str))
    print(_summary(metrics))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m precompute.training.train_sae",
        description="Train a TopK sparse autoencoder (Gao et al. 2024) on activations streamed from any "
        "model/hook/corpus and write a SAELens-format directory.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(run, args, prog="train-sae")


if __name__ == "__main__":
    sys.exit(main())
