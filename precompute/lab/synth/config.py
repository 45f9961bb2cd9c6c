"""Options of a planted-ground-truth run (`SynthConfig`: flags of `featuregeom synth` and keys of its
--config TOML) and the files it writes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from precompute.options import option

# 0.9 and 0.7 are left out of the default on purpose: the project's TopK recipe merges a task
# feature and an independently firing neighbour at cos 0.9 almost always, and at 0.7 now and then,
# into one latent (measured, docs/results.md "Planted ground truth"); pass
# --cosines 0.9 0.7 0.5 0.3 to see it.
DEFAULT_COSINES = (0.6, 0.5, 0.4, 0.3)
MAGNITUDES = ("uniform", "constant", "lognormal")
REPORT_FILE = "synth_report.json"
PLOT_FILE = "recovered_vs_planted.html"
DICTIONARY_FILE = "dictionary.npz"
SAE_DIR = "sae"
# Reports name these two options as they were first called; the flags are --partners and --decoys.
_REPORT_NAMES = {"partners": "n_partners", "decoys": "n_decoys"}


@dataclass
class SynthConfig:
    # --- the dictionary
    d: int = option(64, low=2, bounds="[)", help="activation dimension")
    n_task: int = option(8, low=1, bounds="[)", help="task features, each with planted neighbours")
    cosines: list[float] = option(
        default_factory=lambda: list(DEFAULT_COSINES),
        low=-1,
        high=1,
        nargs="+",
        metavar="RHO",
        help="planted cosines of each task feature's harmful neighbours (default "
        + " ".join(f"{c:g}" for c in DEFAULT_COSINES)
        + ")",
    )
    partners: int | None = option(
        None, low=0, bounds="[)", help="co-firing orthogonal partners (default: one per task)"
    )
    decoys: int = option(12, low=0, bounds="[)", help="random decoy features")
    # --- the activations
    samples: int = option(100_000, low=1, bounds="[)", help="activations generated")
    firing_prob: float = option(
        0.03,
        low=0,
        high=1,
        help="per-feature firing probability with --n-active 0; with a fixed L0, only partners' relative "
        "weight (x --partner-solo) matters",
    )
    n_active: int | None = option(
        3,
        low=0,
        bounds="[)",
        help="features firing in every sample (fixed L0; k defaults to it); 0: every feature fires "
        "independently with --firing-prob",
    )
    cofire_prob: float = option(0.6, low=0, high=1, help="P(partner fires | its task feature fires)")
    partner_solo: float = option(
        0.5,
        low=0,
        high=1,
        help="a partner's firing probability without its task feature, as a fraction of --firing-prob",
    )
    magnitude: str = option("uniform", choices=MAGNITUDES, help="distribution of a firing's magnitude")
    magnitude_range: list[float] = option(
        default_factory=lambda: [0.5, 1.5], low=0, bounds="()", help="low and high of the magnitudes"
    )
    noise: float = option(0.01, low=0, bounds="[)", help="Gaussian noise std per coordinate")
    # --- the SAE
    d_sae: int | None = option(None, low=1, bounds="[)", help="SAE latents (default 2 x the true features)")
    k: int | None = option(
        None,
        low=1,
        bounds="[)",
        help="TopK k (default: expected true L0 + 1.5 sqrt(L0), rounded: k matched to the true L0)",
    )
    steps: int = option(3000, low=1, bounds="[)", help="optimiser steps")
    batch_size: int = option(1024, low=1, bounds="[)", help="activations per step")
    lr: float | None = option(0.005, low=0, bounds="()", help="Adam learning rate")
    init: str = option(
        "random",
        choices=("random", "data"),
        help="decoder initialisation: random (the project's train-sae recipe) or data (rows at random "
        "training activations)",
    )
    # --- the geometry
    fpr: float = option(0.01, low=0, high=1, bounds="()", help="false-positive rate of the cosine null")
    neighbors: int = option(32, low=1, bounds="[)", help="kNN list length")
    seed: int = option(0, low=0, high=2**32 - 1, help="seed for everything")

    def resolved(self) -> SynthConfig:
        """A copy with the defaults that depend on other options filled in (partners, d_sae), plain
        floats, and n_active 0 as None (independent firing)."""
        out = SynthConfig(**{f.name: getattr(self, f.name) for f in fields(SynthConfig)})
        out.cosines = [float(c) for c in self.cosines]
        out.magnitude_range = [float(v) for v in self.magnitude_range]
        out.n_active = self.n_active or None
        n_part = self.n_task if self.partners is None else self.partners
        out.partners = n_part
        n_true = self.n_task * (1 + len(self.cosines)) + n_part + self.decoys
        if out.d_sae is None:
            out.d_sae = 2 * n_true
        return out

    def to_dict(self) -> dict[str, Any]:
        """The options of SynthConfig (not a subclass's) as reports and SAE metadata record them."""
        values = asdict(self)
        return {_REPORT_NAMES.get(f.name, f.name): values[f.name] for f in fields(SynthConfig)}
