"""Options of `featuregeom train-sae`: each field is one flag and one TOML key, its help, default and
range written here once (the options system in `precompute.options` builds argparse and TOML from them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from precompute.data.corpus import CorpusSource
from precompute.data.split import (
    DEFAULT_SCORING_FRACTION,
    DOCUMENT_SPLIT_HELP,
    DOCUMENT_SPLITS,
    SCORING_FRACTION_HELP,
)
from precompute.errors import FeatureGeomError
from precompute.options import load_options, option, options_dict
from precompute.pipeline.config import DEVICES, MODEL_HELP

STORE_DTYPES = ("float16", "float32")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
PACKINGS = ("split", "truncate", "pack")


@dataclass
class TrainSAEConfig:
    """Every option of `train-sae`; defaults < --config TOML < command-line flags."""

    # --- what to read and where to write
    model: str = option("smollm2", help=MODEL_HELP)
    hook: str = option(
        "blocks.15.hook_resid_post",
        help="hook point: a SAELens name such as blocks.15.hook_resid_post or a module path such as "
        "model.layers.15",
    )
    corpus: list[CorpusSource] = option(
        default_factory=list,
        item=CorpusSource,
        metavar="PATH[:GROUP[:CATEGORY]]",
        help="corpus source PATH[:GROUP[:CATEGORY]] (JSONL/CSV/TXT/JSON/YAML, optionally .gz, or Parquet); "
        "repeat for several; replaces the config's [[corpus]] tables",
    )
    out: str | None = option(
        None,
        metavar="DIR",
        help="output SAELens directory (cfg.json, sae_weights.safetensors, sparsity.safetensors, "
        "training_report.json)",
    )
    work_dir: str | None = option(
        None,
        metavar="DIR",
        help="checkpoints and the activation store (default: .featuregeom-work/train-sae/<out name>); "
        "rerunning the same command resumes from here",
    )
    # --- the SAE; d_sae and k are checked together in validate()
    d_sae: int = option(4096, help="number of latents")
    k: int = option(32, help="active latents per token, the TopK k")
    # --- data
    max_tokens: int | None = option(
        None,
        low=0,
        bounds="()",
        help="token budget (training + held-out) shared equally by sources without their own "
        "max_tokens (default: all tokens)",
    )
    document_split: str = option("all", choices=DOCUMENT_SPLITS, help=DOCUMENT_SPLIT_HELP)
    scoring_fraction: float = option(
        DEFAULT_SCORING_FRACTION, low=0, high=1, bounds="()", help=SCORING_FRACTION_HELP
    )
    heldout_fraction: float = option(
        0.08,
        low=0,
        high=1,
        bounds="()",
        help="share of DOCUMENTS held out for evaluation, chosen by a hash of each document's content so "
        "they never reach training",
    )
    context_size: int = option(128, low=2, bounds="[)", help="tokens per context")
    packing: str = option("split", choices=PACKINGS, help="how documents become contexts")
    harvest_batch_size: int = option(
        16, low=1, bounds="[)", help="contexts per model forward pass while collecting activations"
    )
    # --- optimisation
    batch_size: int = option(4096, low=2, bounds="[)", help="activations per optimiser step")
    lr: float | None = option(
        None,
        low=0,
        bounds="()",
        help="Adam learning rate (default: 2e-4 * sqrt(16384 / d_sae), Gao et al.'s scaling)",
    )
    epochs: float = option(
        1.0,
        help="passes over the training activations, may be fractional; ignored with --steps",
    )
    steps: int | None = option(None, low=1, bounds="[)", help="optimiser steps (overrides --epochs)")
    warmup_steps: int | None = option(
        None, low=0, bounds="[)", help="linear warm-up steps (default: 5% of the steps, at most 1000)"
    )
    decay_fraction: float = option(
        0.2,
        low=0,
        high=1,
        help="final share of the steps over which the learning rate decays linearly to 0",
    )
    buffer_tokens: int = option(
        4_000_000,
        low=1,
        bounds="[)",
        help="activations shuffled together: if the store holds more, each epoch shuffles within blocks of "
        "this many (and it is read from disk); otherwise it is shuffled whole, in memory",
    )
    store_dtype: str = option("float16", choices=STORE_DTYPES, help="dtype of the on-disk activation store")
    aux_k: int = option(512, low=0, bounds="[)", help="dead latents used by the AuxK loss per token")
    aux_coef: float = option(1 / 32, low=0, bounds="[)", help="weight of the AuxK loss")
    dead_after_tokens: int = option(
        1_000_000,
        low=1,
        bounds="[)",
        help="a latent counts as dead after this many training tokens without firing",
    )
    init_b_dec: str = option(
        "geometric_median", choices=B_DEC_INITS, help="initial decoder bias from a data sample"
    )
    # --- checkpoints and evaluation
    checkpoint_every: int = option(200, low=1, bounds="[)", help="steps between checkpoints")
    log_every: int = option(25, low=1, bounds="[)", help="steps between training-curve points")
    eval_tokens: int | None = option(
        None,
        low=1,
        bounds="[)",
        help="held-out tokens used for explained variance, L0 and dead latents (default: all)",
    )
    eval_ce_tokens: int = option(
        20_000,
        low=0,
        bounds="[)",
        help="held-out tokens for the cross-entropy comparison, which needs three full forward passes",
    )
    eval_batch_size: int = option(8, low=1, bounds="[)", help="contexts per forward pass in the evaluation")
    # --- running
    device: str = option("auto", choices=DEVICES, help="where to run")
    seed: int = option(
        0,
        low=0,
        high=2**32 - 1,
        help="seed for the initialisation and the training order (and, without --data-seed, the corpus "
        "subsets)",
    )
    data_seed: int | None = option(
        None,
        low=0,
        high=2**32 - 1,
        help="seed for the corpus subsets and the order activations are collected in (default: --seed); "
        "SAEs that differ only in --seed then share one activation store",
    )
    overwrite: bool = option(
        False, help="discard any checkpoint in --work-dir and replace --out if it exists"
    )
    resume: bool = option(
        False,
        help="require a checkpoint to resume from (without it, one is used when present and compatible)",
    )
    keep_work: bool = option(
        False, help="keep the activation store in --work-dir after success (default: delete it)"
    )
    eval_only: bool = option(
        False,
        help="no training: re-evaluate the SAE already in --out on the held-out split of this config and "
        "update its cfg.json eval, sparsity and training_report.json",
    )
    progress: bool = option(True, help="no progress bars")

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainSAEConfig:
        """Read a TOML file (keys = option names, plus [[corpus]] tables), then apply overrides."""
        return load_options(cls, path, overrides)  # checks each option's range, then validate()

    def validate(self) -> None:
        """What depends on several options (single-option ranges are declared on the fields)."""
        if not self.corpus:
            raise FeatureGeomError(
                "train-sae needs a corpus: --corpus PATH[:GROUP[:CATEGORY]] (repeatable) or [[corpus]] in --config"
            )
        if not self.out:
            raise FeatureGeomError("train-sae needs --out DIR (where the SAELens directory is written)")
        if self.d_sae < 1 or not 0 < self.k <= self.d_sae:
            raise FeatureGeomError(f"need d_sae >= 1 and 0 < k <= d_sae; got d_sae={self.d_sae}, k={self.k}")
        if self.steps is None and self.epochs <= 0:
            raise FeatureGeomError("--epochs must be positive (or give --steps)")
        if self.eval_only and (self.overwrite or self.resume):
            raise FeatureGeomError(
                "--eval-only re-scores an existing --out; it takes neither --overwrite nor --resume"
            )
        if self.overwrite and self.resume:
            raise FeatureGeomError(
                "--overwrite discards the checkpoint that --resume asks for; pass one of them"
            )

    @property
    def corpus_seed(self) -> int:
        """The seed of the corpus subsets and the collection order: --data-seed, else --seed."""
        return self.seed if self.data_seed is None else self.data_seed

    def resolved_lr(self) -> float:
        """Gao et al.'s scaling: 2e-4 at 16k latents, times sqrt(16384 / d_sae)."""
        return float(self.lr) if self.lr is not None else 2e-4 * math.sqrt(16384 / self.d_sae)

    def resolved_work_dir(self) -> Path:
        if self.work_dir:
            return Path(self.work_dir)
        return Path(".featuregeom-work") / "train-sae" / Path(str(self.out)).resolve().name

    def to_dict(self) -> dict[str, Any]:
        return options_dict(self)
