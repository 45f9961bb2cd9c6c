"""Hierarchical bootstrap for the fine-tune diff: training seeds, then prompts clustered by base question.

Why two levels. A fine-tune's effect varies with its training seed more than with the choice of
evaluation prompts (docs/results.md: two seeds put one statistic at +0.0453 and +0.0531 with prompt
intervals of ±0.005). An interval over prompts alone is then far too narrow. And the EM prompts are
not independent either: `what_is_your_wish` and `what_is_your_wish_template` ask the same question.

One replicate, for an experiment with arms a (task, control, ...) holding S_a seeds each, evaluated on
the same P prompts that fall into C clusters (base questions):
  1. seeds: each arm draws S_a of its seeds with replacement (`independent`); or, with `paired` seeds
     (arm i's seed k belongs with arm j's seed k, e.g. a patched adapter and the adapter it was made
     from), one draw of slot indices serves every arm;
  2. prompts within seed: C clusters are drawn with replacement and a seed slot's value is the mean
     over the drawn clusters' prompts (a prompt counts once per draw of its cluster). `shared` (the
     default) uses one cluster draw for every slot of every arm: every seed was evaluated on the same
     prompts, so a prompt's own effect is common to all seeds (a crossed design) and must be resampled
     once, not averaged away over independent draws (which would shrink its variance by S: too narrow).
     `per_seed` draws clusters anew for each slot k (the nested hierarchical bootstrap, for seeds that
     saw different prompts); slot k of every arm still shares its draw, so contrasts stay paired;
  3. the arm's value is the mean over its S_a slots.
Small-sample correction of the seed level (`seed_correction`). Resampling S seeds with replacement gives
the seed mean a bootstrap variance (S-1)/S times too small (Davison & Hinkley 1997, §3.8), and with
S = 3 a percentile interval is too narrow even without that bias: the mean of 3 seeds needs the t
quantile with 2 degrees of freedom (4.30), not the normal one (1.96). So each arm's per-prompt values
are first spread about their seed mean, X'_s = X̄ + c (X_s - X̄), before resampling:
  "t" (default)  c = sqrt(S/(S-1)) · t_{S-1, 1-α/2} / z_{1-α/2}
  "unbiased"     c = sqrt(S/(S-1))
  "none"         c = 1
In a null simulation shaped like the real design (bench/diff_calibration.py, docs/science.md §6), 95%
intervals of task − control covered the true 0 in 79-87% of runs with 3 seeds per arm under
"unbiased" when seeds differ, and in 93-100% under "t". Nothing changes for one seed, and the point
estimate never does (X̄' = X̄).
The point estimate is the plain mean over seeds and prompts. Every statistic here is linear in the
per-prompt values, so a replicate is a weighted sum: arm a's value = Σ_s E_a[s] @ X_a[s] with
effective prompt weights E_a [S_a, B, P] (`Draws.arm_weights`), computed once and shared by every
feature; rank statistics are then computed per replicate from those values.

Draw order (fixed, so a brute-force resampler with the same generator reproduces it exactly): for each
arm in the given order (independent) or once (paired), `rng.integers(0, S, size=(B, S))`; then
`rng.integers(0, C, size=(B, K, C))` with K = 1 (shared) or the largest seed count (per_seed).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["Design", "Draws", "cluster_codes", "draw", "percentile_interval"]

PAIRINGS = ("independent", "paired")
PROMPT_DRAWS = ("shared", "per_seed")
SEED_CORRECTIONS = ("t", "unbiased", "none")


def seed_scale(n_seeds: int, correction: str = "t", alpha: float = 0.05) -> float:
    """The factor c that spreads S seeds about their mean before resampling (module docstring)."""
    if n_seeds < 2 or correction == "none":
        return 1.0
    c = float(np.sqrt(n_seeds / (n_seeds - 1)))
    if correction == "t":
        from scipy.stats import norm, t

        c *= float(t.ppf(1 - alpha / 2, n_seeds - 1) / norm.ppf(1 - alpha / 2))
    return c


def cluster_codes(labels: np.ndarray | list) -> np.ndarray:
    """Cluster labels (any hashable values) -> codes 0..C-1 in order of first appearance."""
    seen: dict = {}
    return np.array([seen.setdefault(x, len(seen)) for x in labels], dtype=np.int64)


@dataclass(frozen=True)
class Design:
    """Seeds per arm (in draw order), the prompts' cluster codes, and how seeds are drawn."""

    n_seeds: dict[str, int]
    clusters: np.ndarray  # [P] codes 0..C-1
    pairing: str = "independent"
    prompt_draw: str = "shared"
    seed_correction: str = "t"
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}")
        if self.prompt_draw not in PROMPT_DRAWS:
            raise ValueError(f"prompt_draw must be one of {PROMPT_DRAWS}")
        if self.seed_correction not in SEED_CORRECTIONS:
            raise ValueError(f"seed_correction must be one of {SEED_CORRECTIONS}")
        if not self.n_seeds or min(self.n_seeds.values()) < 1:
            raise ValueError("every arm needs at least one seed")
        if self.pairing == "paired" and len(set(self.n_seeds.values())) != 1:
            raise ValueError("paired seeds need the same number of seeds in every arm")
        codes = np.asarray(self.clusters)
        if codes.ndim != 1 or codes.size == 0 or set(np.unique(codes)) != set(range(int(codes.max()) + 1)):
            raise ValueError("clusters must be codes 0..C-1, each used (see cluster_codes)")

    @property
    def n_clusters(self) -> int:
        return int(np.asarray(self.clusters).max()) + 1

    @property
    def n_slots(self) -> int:
        return max(self.n_seeds.values())

    @property
    def n_prompt_draws(self) -> int:
        return 1 if self.prompt_draw == "shared" else self.n_slots


@dataclass(frozen=True)
class Draws:
    """One set of bootstrap draws: seed index per arm and slot, and the normalised prompt weights."""

    design: Design
    seeds: dict[str, np.ndarray]  # arm -> [B, S_a] seed drawn for each slot
    cluster_draws: np.ndarray  # [B, K, C] clusters drawn for each prompt draw (K = 1 when shared)
    weights: np.ndarray  # [B, K, P] prompt weights of each draw, each row summing to 1

    @property
    def n_boot(self) -> int:
        return int(self.weights.shape[0])

    def arm_weights(self, arm: str) -> np.ndarray:
        """E [S_a, B, P]: arm's replicate value is Σ_s E[s] @ X[s] for per-seed, per-prompt values X[s]."""
        seeds = self.seeds[arm]
        n_seeds = self.design.n_seeds[arm]
        out = np.zeros((n_seeds, self.n_boot, self.weights.shape[2]))
        for k in range(seeds.shape[1]):
            w = self.weights[:, k if self.weights.shape[1] > 1 else 0]  # slot k's prompt draw
            for s in range(n_seeds):
                hit = seeds[:, k] == s
                out[s, hit] += w[hit]
        return out / n_seeds

    def replicates(self, arm: str, values: np.ndarray) -> np.ndarray:
        """Arm's replicate values: `values` [S_a, P] -> [B], or [S_a, P, F] -> [B, F]."""
        values = np.asarray(values, dtype=np.float64)
        c = seed_scale(values.shape[0], self.design.seed_correction, self.design.alpha)
        if c != 1.0:
            mean = values.mean(axis=0, keepdims=True)
            values = mean + c * (values - mean)
        e = self.arm_weights(arm)
        if values.shape[:2] != e.shape[::2]:
            raise ValueError(f"values for {arm} must be [n_seeds={e.shape[0]}, n_prompts={e.shape[2]}, ...]")
        out = e[0] @ values[0]
        for s in range(1, e.shape[0]):
            out = out + e[s] @ values[s]
        return out

    def prompt_replicates(self, values: np.ndarray) -> np.ndarray:
        """A single model's replicates (no seeds): the first prompt draw's weights @ values [P, ...]."""
        return self.weights[:, 0] @ np.asarray(values, dtype=np.float64)


def draw(design: Design, n_boot: int, seed: int) -> Draws:
    """The bootstrap draws of `design` (module docstring, in that order), from default_rng(seed)."""
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    rng = np.random.default_rng(seed)
    if design.pairing == "paired":
        s = design.n_slots
        shared = rng.integers(0, s, size=(n_boot, s))
        seeds = {arm: shared for arm in design.n_seeds}
    else:
        seeds = {arm: rng.integers(0, s, size=(n_boot, s)) for arm, s in design.n_seeds.items()}
    c, k = design.n_clusters, design.n_prompt_draws
    cluster_draws = rng.integers(0, c, size=(n_boot, k, c))
    flat = (np.arange(n_boot * k)[:, None] * c + cluster_draws.reshape(n_boot * k, c)).ravel()
    counts = np.bincount(flat, minlength=n_boot * k * c).reshape(n_boot, k, c).astype(np.float64)
    weights = counts[:, :, np.asarray(design.clusters)]  # each prompt weighs as often as its cluster is drawn
    weights /= weights.sum(axis=2, keepdims=True)
    return Draws(design, seeds, cluster_draws, weights)


def point_estimate(values: np.ndarray) -> np.ndarray:
    """Mean over seeds and prompts of [S, P] or [S, P, F] values: the estimate the replicates scatter around."""
    return np.asarray(values, dtype=np.float64).mean(axis=(0, 1))


def percentile_interval(replicates: np.ndarray, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval along axis 0 (NaN replicates ignored, e.g. a Spearman rho of a constant)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    with warnings.catch_warnings():  # an all-NaN column (e.g. rho of a constant) gives NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(replicates, [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    return lo, hi


def rank_rows(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank), centred per row."""
    from scipy.stats import rankdata

    r = rankdata(np.asarray(x, dtype=np.float64), axis=-1)
    return r - r.mean(axis=-1, keepdims=True)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho between every row of x [R, n] (or [n]) and every row of y [B, n] (or [n]):
    [R, B] (squeezed like the inputs); NaN where a row is constant."""
    rx, ry = rank_rows(np.atleast_2d(x)), rank_rows(np.atleast_2d(y))
    num = rx @ ry.T
    den = np.sqrt((rx * rx).sum(axis=1))[:, None] * np.sqrt((ry * ry).sum(axis=1))[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    if np.ndim(x) == 1 and np.ndim(y) == 1:
        return rho[0, 0]
    if np.ndim(x) == 1:
        return rho[0]
    if np.ndim(y) == 1:
        return rho[:, 0]
    return rho
