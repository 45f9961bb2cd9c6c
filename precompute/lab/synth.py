"""`featuregeom synth`: planted ground truth for the whole geometry pipeline (SCIENCE.md section 4).

A known dictionary is built in which every *task* feature t has *planted harmful* neighbours at
chosen cosines (h_k = rho_k t + sqrt(1 - rho_k^2) u_k with u_k orthogonal to t and to the other
planted directions), *co-firing partners* that fire together with t but are exactly orthogonal to
it, and random *decoys*. Activations x = sum_i a_i d_i + noise are drawn from it with sparse codes
in which the planted neighbours fire INDEPENDENTLY of their task feature and the partners fire
WITH it, so geometry (decoder cosine) and co-activation (Jaccard of firing sets) point in opposite
directions by construction. The project's TopK SAE (`precompute.training.train_sae`) is trained on them and
the same geometry code the pipeline uses (`geometry.knn_cosine`, `null_cosine`, `cosine_z`) is run
on the learned decoder. The checks:

* recovery: Hungarian matching of true to learned directions, mean matched |cos| (MCC) and mean
  max |cos| (MMCS), both should reach 0.9;
* ordering: each task feature's learned neighbour list holds its planted neighbours in descending
  rho, and the recovered cosines track rho;
* false positives: co-firing partners and decoys must not be flagged above the null more often
  than the null's false-positive rate (a task feature's list holds a false flag with probability
  at most ``fpr``);
* co-activation vs geometry: partners co-fire (high Jaccard, cosine ~ 0), planted neighbours do
  not (low Jaccard, high cosine).

Everything is seeded: the same config gives the same numbers.

    python -m precompute.lab.synth --out runs/synth            # d=64, ~60 true features, ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scipy.optimize import linear_sum_assignment

from precompute import argtypes
from precompute.argtypes import (
    fraction_closed,
    fraction_open,
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
)
from precompute.pipeline import geometry
from precompute.sae.base import SAE

ROLES = ("task", "planted", "partner", "decoy")
# An unmatched live latent with cosine >= this to both a task feature and its co-firing partner
# is reported as a "composite" (the SAE turned their co-occurrence into a direction).
COMPOSITE_COS = 0.3
# 0.9 and 0.7 are left out of the default on purpose: the project's TopK recipe merges a task
# feature and an independently firing neighbour at cos 0.9 almost always, and at 0.7 now and then,
# into one latent (measured, docs/results.md "Planted ground truth"); pass
# --cosines 0.9 0.7 0.5 0.3 to see it.
DEFAULT_COSINES = (0.6, 0.5, 0.4, 0.3)
REPORT_FILE = "synth_report.json"
PLOT_FILE = "recovered_vs_planted.html"
DICTIONARY_FILE = "dictionary.npz"
SAE_DIR = "sae"


# ============================================================================ the dictionary
@dataclass
class SynthDictionary:
    """Unit rows [n, d] (float64) and the role of each row.

    ``roles`` columns: ``feature`` (row id), ``role`` (task | planted | partner | decoy), ``task``
    (the task feature a planted neighbour or partner belongs to; -1 for tasks and decoys),
    ``target_cosine`` (the planted rho; 0.0 for partners; NaN otherwise).
    """

    directions: np.ndarray
    roles: pd.DataFrame
    seed: int = 0
    blocks_orthogonal: bool = True  # whether different tasks' planted blocks are mutually orthogonal

    @property
    def n(self) -> int:
        return int(self.directions.shape[0])

    @property
    def d(self) -> int:
        return int(self.directions.shape[1])

    def ids(self, role: str) -> np.ndarray:
        return self.roles.loc[self.roles["role"] == role, "feature"].to_numpy(dtype=np.int64)

    def planted_of(self, task: int) -> pd.DataFrame:
        """Planted neighbours of ``task``, in descending target cosine."""
        r = self.roles
        sel = r[(r["role"] == "planted") & (r["task"] == task)]
        return sel.sort_values(["target_cosine", "feature"], ascending=[False, True])

    def partners_of(self, task: int) -> np.ndarray:
        r = self.roles
        return r.loc[(r["role"] == "partner") & (r["task"] == task), "feature"].to_numpy(dtype=np.int64)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _orthogonalise(v: np.ndarray, basis: list[np.ndarray]) -> np.ndarray:
    """Two rounds of modified Gram-Schmidt against orthonormal ``basis`` (re-orthogonalisation
    keeps the result orthogonal to ~1e-15 even with hundreds of basis vectors)."""
    for _ in range(2):
        for q in basis:
            v = v - (v @ q) * q
    return v


def _random_orthogonal(rng: np.random.Generator, d: int, basis: list[np.ndarray]) -> np.ndarray:
    for _ in range(100):
        v = _orthogonalise(rng.standard_normal(d), basis)
        nv = float(np.linalg.norm(v))
        if nv > 1e-6:
            return v / nv
    raise ValueError(f"no direction orthogonal to {len(basis)} vectors in d={d}")  # pragma: no cover


def make_dictionary(
    d: int,
    n_task: int,
    cosines: tuple[float, ...] | list[float] = DEFAULT_COSINES,
    n_coactive_orthogonal: int | None = None,
    n_decoys: int = 0,
    seed: int = 0,
) -> SynthDictionary:
    """A dictionary with planted geometry; rows are unit vectors (float64).

    Order of rows: for each task i, its task feature then its planted neighbours (in the order of
    ``cosines``); then the co-firing partners (partner j belongs to task j mod n_task); then the
    decoys. Construction:

    * task features and the u_k are drawn at random and Gram-Schmidt-orthogonalised against every
      earlier task / u direction while those span fewer than d dimensions (so different tasks'
      blocks are mutually orthogonal when n_task * (1 + len(cosines)) <= d), and always against
      their own task feature and the task's other u's (needs 1 + len(cosines) <= d);
    * planted h_k = rho_k t + sqrt(1 - rho_k^2) u_k, so cos(h_k, t) = rho_k exactly (and
      cos(h_j, h_k) = rho_j rho_k within a task);
    * a partner is exactly orthogonal to its task feature and otherwise random;
    * decoys are uniform random unit vectors.
    """
    cosines = tuple(float(c) for c in cosines)
    if d < 2 or n_task < 1:
        raise ValueError(f"need d >= 2 and n_task >= 1, got d={d}, n_task={n_task}")
    if any(not -1.0 < c < 1.0 for c in cosines):
        raise ValueError(f"planted cosines must lie in (-1, 1), got {cosines}")
    if 1 + len(cosines) > d:
        raise ValueError(
            f"{len(cosines)} planted directions per task need d >= {1 + len(cosines)}, got d={d}"
        )
    n_partner = n_task if n_coactive_orthogonal is None else int(n_coactive_orthogonal)
    if n_partner < 0 or n_decoys < 0:
        raise ValueError("n_coactive_orthogonal and n_decoys must be non-negative")
    rng = np.random.default_rng([seed, 7])
    rows: list[np.ndarray] = []
    meta: list[tuple[str, int, float]] = []
    global_basis: list[np.ndarray] = []
    blocks_orthogonal = True
    task_ids: list[int] = []
    for _ in range(n_task):
        use_global = len(global_basis) + 1 + len(cosines) <= d
        blocks_orthogonal &= use_global
        t = _random_orthogonal(rng, d, global_basis if use_global else [])
        local = [t]
        task_id = len(rows)
        task_ids.append(task_id)
        rows.append(t)
        meta.append(("task", -1, math.nan))
        for rho in cosines:
            u = _random_orthogonal(rng, d, (global_basis if use_global else []) + local)
            local.append(u)
            rows.append(rho * t + math.sqrt(1.0 - rho * rho) * u)
            meta.append(("planted", task_id, rho))
        if use_global:
            global_basis.extend(local)
    for j in range(n_partner):
        task_id = task_ids[j % n_task]
        rows.append(_random_orthogonal(rng, d, [rows[task_id]]))
        meta.append(("partner", task_id, 0.0))
    for _ in range(n_decoys):
        rows.append(_unit(rng.standard_normal(d)))
        meta.append(("decoy", -1, math.nan))
    D = np.stack(rows).astype(np.float64)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    roles = pd.DataFrame(
        {
            "feature": np.arange(len(rows), dtype=np.int64),
            "role": [m[0] for m in meta],
            "task": np.array([m[1] for m in meta], dtype=np.int64),
            "target_cosine": np.array([m[2] for m in meta], dtype=np.float64),
        }
    )
    return SynthDictionary(D, roles, seed=seed, blocks_orthogonal=bool(blocks_orthogonal))


# ============================================================================ the activations
@dataclass
class SynthData:
    """Activations x [n, d] (float32) and the true codes [n, n_features] (CSR, float32, >= 0)."""

    x: np.ndarray
    codes: sparse.csr_matrix
    params: dict[str, Any] = field(default_factory=dict)

    def fires(self) -> sparse.csr_matrix:
        return binary_fires(self.codes)


def _magnitudes(rng: np.random.Generator, size: int, kind: str, low: float, high: float) -> np.ndarray:
    if kind == "uniform":
        return rng.uniform(low, high, size)
    if kind == "constant":
        return np.full(size, 0.5 * (low + high))
    if kind == "lognormal":  # median sqrt(low*high), ~95% of the mass inside [low, high]
        mu, sigma = 0.5 * (math.log(low) + math.log(high)), (math.log(high) - math.log(low)) / 4.0
        return rng.lognormal(mu, sigma, size)
    raise ValueError(f"magnitude must be uniform, constant or lognormal, got {kind!r}")


def generate_activations(
    dictionary: SynthDictionary,
    n_samples: int,
    firing_prob: float | np.ndarray = 0.03,
    cofire_prob: float = 0.6,
    partner_solo: float = 0.5,
    magnitude: str = "uniform",
    magnitude_range: tuple[float, float] = (0.5, 1.5),
    noise: float = 0.01,
    seed: int = 0,
    n_active: int | None = None,
    chunk: int = 65536,
) -> SynthData:
    """Sparse codes a and x = a @ D + N(0, noise^2) per coordinate.

    Every feature fires independently with ``firing_prob`` (a scalar or one value per feature),
    except partners: a partner fires with probability ``cofire_prob`` on samples where its task
    feature fires, and with ``firing_prob * partner_solo`` on the others. Planted neighbours are
    independent of their task feature, so they are geometrically close and do NOT co-fire; the
    partners co-fire and are orthogonal. Magnitudes are i.i.d. (``magnitude`` over
    ``magnitude_range``) for every firing.

    ``n_active`` (fixed-L0 mode): every sample holds exactly ``n_active`` firing features instead.
    They are drawn without replacement with weights proportional to ``firing_prob`` (partners:
    ``firing_prob * partner_solo``); a drawn task feature brings each of its partners along with
    probability ``cofire_prob`` (see `_fixed_l0_fires`). A constant L0 lets the TopK k equal it,
    which leaves the SAE no free slots for composite latents. Drawing without replacement makes
    every pair of features slightly anti-correlated (given i fires, only n_active - 1 slots are
    left); planted neighbours carry no dependence on their task feature beyond that one, which
    all unrelated pairs share. With ``n_active=None`` they are exactly independent.
    """
    n_feat = dictionary.n
    p = np.broadcast_to(np.asarray(firing_prob, dtype=np.float64), (n_feat,)).copy()
    if np.any((p < 0) | (p > 1)) or not 0 <= cofire_prob <= 1 or partner_solo < 0:
        raise ValueError("probabilities must lie in [0, 1] and partner_solo must be >= 0")
    lo, hi = magnitude_range
    if not 0 < lo <= hi:
        raise ValueError(f"magnitude_range must satisfy 0 < low <= high, got {magnitude_range}")
    r = dictionary.roles
    partners = r.loc[r["role"] == "partner", "feature"].to_numpy(dtype=np.int64)
    partner_task = r.loc[r["role"] == "partner", "task"].to_numpy(dtype=np.int64)
    p_solo = p.copy()
    p_solo[partners] = np.clip(p[partners] * partner_solo, 0.0, 1.0)
    is_task = (r["role"] == "task").to_numpy()
    if n_active is not None and not 1 <= n_active <= int((p_solo > 0).sum()):
        raise ValueError(f"n_active must lie in [1, number of features that can fire], got {n_active}")
    D = dictionary.directions.astype(np.float32)
    rng = np.random.default_rng([seed, 13])
    xs, blocks = [], []
    for s in range(0, n_samples, chunk):
        m = min(chunk, n_samples - s)
        if n_active is None:
            fires = rng.random((m, n_feat)) < p_solo
            if partners.size:
                with_task = rng.random((m, partners.size)) < cofire_prob
                task_on = fires[:, partner_task]
                fires[:, partners] = np.where(task_on, with_task, fires[:, partners])
        else:
            fires = _fixed_l0_fires(
                rng, m, p_solo, int(n_active), is_task, partners, partner_task, cofire_prob
            )
        rows, cols = np.nonzero(fires)
        vals = _magnitudes(rng, rows.size, magnitude, lo, hi).astype(np.float32)
        a = sparse.csr_matrix((vals, (rows, cols)), shape=(m, n_feat), dtype=np.float32)
        x = np.asarray(a @ D, dtype=np.float32)
        if noise > 0:
            x += rng.normal(0.0, noise, size=x.shape).astype(np.float32)
        xs.append(x)
        blocks.append(a)
    codes = (
        sparse.vstack(blocks, format="csr") if blocks else sparse.csr_matrix((0, n_feat), dtype=np.float32)
    )
    params = {
        "n_samples": n_samples,
        "firing_prob": float(np.mean(p)),
        "n_active": n_active,
        "cofire_prob": cofire_prob,
        "partner_solo": partner_solo,
        "magnitude": magnitude,
        "magnitude_range": [lo, hi],
        "noise": noise,
        "seed": seed,
        "true_l0": float(codes.getnnz() / max(1, n_samples)),
    }
    x_all = np.concatenate(xs) if xs else np.zeros((0, dictionary.d), np.float32)
    return SynthData(x_all, codes, params)


def _fixed_l0_fires(
    rng: np.random.Generator,
    m: int,
    weights: np.ndarray,
    n_active: int,
    is_task: np.ndarray,
    partners: np.ndarray,
    partner_task: np.ndarray,
    cofire_prob: float,
) -> np.ndarray:
    """[m, n] boolean firing matrix with exactly n_active True per row (see generate_activations).

    Each row ranks all features by a weighted random order (Gumbel keys, i.e. sampling without
    replacement with probabilities proportional to ``weights``) and fills its slots walking down
    that order. A task feature reached in the walk tosses one coin per partner (``cofire_prob``);
    it enters together with the partners whose coin came up (and which are not in yet), or, when
    the slots left cannot hold them all, is passed over. Being passed over happens more often with
    the coin up, so P(partner | task) ends somewhat below ``cofire_prob`` (about 0.5 for 0.6 with
    n_active=3; the report carries the measured co-firing); the order of the partners never matters.
    """
    n = weights.size
    with np.errstate(divide="ignore"):
        keys = np.log(weights)[None, :] + rng.gumbel(size=(m, n))
    order = np.argsort(-keys, axis=1, kind="stable")
    max_p = 0
    plist: dict[int, list[int]] = {}
    for j, t in zip(partners.tolist(), partner_task.tolist(), strict=True):
        plist.setdefault(t, []).append(j)
        max_p = max(max_p, len(plist[t]))
    P = np.full((n, max(1, max_p)), -1, np.int64)  # partners of each task feature, -1 padded
    for t, js in plist.items():
        P[t, : len(js)] = js
    fires = np.zeros((m, n), dtype=bool)
    left = np.full(m, n_active, np.int64)
    rows = np.arange(m)
    for pos in range(n):
        live = left > 0
        if not live.any():
            break
        f = order[:, pos]
        new = live & ~fires[rows, f]
        need = np.ones(m, np.int64)
        add = np.zeros((m, P.shape[1]), dtype=bool)
        if max_p:
            pf = P[f]  # [m, max_p]
            valid = pf >= 0
            coin = rng.random((m, P.shape[1])) < cofire_prob
            add = valid & coin & ~fires[rows[:, None], np.where(valid, pf, 0)]
            need += add.sum(axis=1)
        ok = new & (need <= left)
        fires[rows[ok], f[ok]] = True
        if max_p:
            r_i, c_i = np.nonzero(add & ok[:, None])
            fires[r_i, P[f[r_i], c_i]] = True
        left -= np.where(ok, need, 0)
    if (left > 0).any():  # pragma: no cover - only when too few features can fire at all
        raise ValueError(f"cannot fill {n_active} slots per sample from these features")
    return fires


def expected_l0(
    dictionary: SynthDictionary, firing_prob: float, cofire_prob: float = 0.6, partner_solo: float = 0.5
) -> float:
    """Mean number of firing features per sample under `generate_activations`' model."""
    n_partner = len(dictionary.ids("partner"))
    p_partner = firing_prob * cofire_prob + (1 - firing_prob) * min(1.0, firing_prob * partner_solo)
    return (dictionary.n - n_partner) * firing_prob + n_partner * p_partner


def default_k(l0: float) -> int:
    """TopK k matched to a true mean L0: the mean plus 1.5 Poisson standard deviations, so that few
    samples hold more active features than k while few slots stay free (free slots let TopK keep
    composite latents, see `make_dictionary`'s notes in docs/results.md)."""
    return max(1, int(round(l0 + 1.5 * math.sqrt(max(l0, 0.0)))))


# ============================================================================ matching
@dataclass
class MatchResult:
    """Hungarian matching of true rows to learned rows on |cos|.

    ``assignment[i]``: learned row matched to true row i (-1 when there are fewer learned rows);
    ``matched_cos[i]``: signed cosine of that pair (0 when unmatched); ``mcc``: mean matched |cos|;
    ``mmcs``: mean over true rows of the best |cos| with any learned row (not one-to-one);
    ``best_learned[i]``: that best row; ``learned_to_true[j]``: true row matched to learned row j
    (-1 for learned rows left out); ``learned_best_true[j]``/``learned_best_cos[j]``: the true row
    closest (|cos|) to learned row j, and the signed cosine.
    """

    assignment: np.ndarray
    matched_cos: np.ndarray
    mcc: float
    mmcs: float
    best_learned: np.ndarray
    best_cos: np.ndarray
    learned_to_true: np.ndarray
    learned_best_true: np.ndarray
    learned_best_cos: np.ndarray


def _unit64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def match_dictionary(
    true_dirs: np.ndarray | torch.Tensor,
    learned_dirs: np.ndarray | torch.Tensor,
    exclude: np.ndarray | None = None,
) -> MatchResult:
    """Match true to learned directions (scipy's linear_sum_assignment maximising total |cos|).

    ``exclude`` (bool [n_learned]): learned rows that may not be matched, e.g. dead latents, which
    otherwise can win a tie with the live latent that does the work (a dead row keeps whatever
    direction it had; when it sits on a true feature, matching it would misattribute the firing).
    """
    T, L = _unit64(true_dirs), _unit64(learned_dirs)
    if T.shape[1] != L.shape[1]:
        raise ValueError(f"true rows have d={T.shape[1]}, learned rows d={L.shape[1]}")
    C_all = T @ L.T
    C = C_all.copy()
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != (L.shape[0],):
            raise ValueError(f"exclude must be a bool mask of the {L.shape[0]} learned rows")
        C[:, exclude] = 0.0
        rows_keep = ~exclude
    else:
        rows_keep = np.ones(L.shape[0], dtype=bool)
    A = np.abs(C)
    rows, cols = linear_sum_assignment(A, maximize=True)
    keep = rows_keep[cols]
    rows, cols = rows[keep], cols[keep]
    n_true, n_learned = C.shape
    assignment = np.full(n_true, -1, np.int64)
    assignment[rows] = cols
    matched = np.zeros(n_true)
    matched[rows] = C[rows, cols]
    learned_to_true = np.full(n_learned, -1, np.int64)
    learned_to_true[cols] = rows
    best = A.argmax(axis=1)
    lbest = np.abs(C_all).argmax(axis=0)  # every learned row, excluded or not, gets its closest true row
    return MatchResult(
        assignment=assignment,
        matched_cos=matched,
        mcc=float(np.abs(matched).mean()) if n_true else float("nan"),
        mmcs=float(A.max(axis=1).mean()) if n_true and n_learned else float("nan"),
        best_learned=best.astype(np.int64),
        best_cos=C[np.arange(n_true), best],
        learned_to_true=learned_to_true,
        learned_best_true=lbest.astype(np.int64),
        learned_best_cos=C_all[lbest, np.arange(n_learned)],
    )


# ============================================================================ co-activation
def binary_fires(codes: sparse.spmatrix) -> sparse.csc_matrix:
    """1 where a code is > 0, as CSC (columns = features), the same "fires" rule as the cache."""
    m = sparse.csr_matrix(codes, copy=True)
    m.data = (m.data > 0).astype(np.int8)
    m.eliminate_zeros()
    return m.tocsc()


def jaccard_pairs(fires: sparse.spmatrix, pairs: np.ndarray) -> np.ndarray:
    """Token-level Jaccard index |A and B| / |A or B| of each (a, b) column pair (0 when neither fires)."""
    F = sparse.csc_matrix(fires)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    out = np.zeros(len(pairs))
    for i, (a, b) in enumerate(pairs):
        ra = F.indices[F.indptr[a] : F.indptr[a + 1]]
        rb = F.indices[F.indptr[b] : F.indptr[b + 1]]
        both = np.intersect1d(ra, rb, assume_unique=True).size
        union = ra.size + rb.size - both
        out[i] = both / union if union else 0.0
    return out


def sae_fires(sae: SAE, x: np.ndarray, batch: int = 8192) -> sparse.csc_matrix:
    """Binary firing matrix [n, d_sae] of the SAE's latents on x (activation > 0)."""
    rows, cols = [], []
    with torch.inference_mode():
        for s in range(0, x.shape[0], batch):
            xb = torch.from_numpy(np.ascontiguousarray(x[s : s + batch], dtype=np.float32))
            idx, val = sae.encode_sparse(xb)
            on = (val > 0).numpy()
            r = np.broadcast_to(np.arange(s, s + xb.shape[0])[:, None], on.shape)
            rows.append(r[on])
            cols.append(idx.numpy()[on])
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    m = sparse.csr_matrix((np.ones(r.size, np.int8), (r, c)), shape=(x.shape[0], sae.d_sae))
    m.sum_duplicates()
    m.data[:] = 1
    return m.tocsc()


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties count one half."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).sum()
    eq = (pos[:, None] == neg[None, :]).sum()
    return float((gt + 0.5 * eq) / (pos.size * neg.size))


# ============================================================================ evaluation
def _f(x: Any) -> float | None:
    """JSON-safe float (NaN -> None)."""
    x = float(x)
    return x if math.isfinite(x) else None


def evaluate_geometry(
    dictionary: SynthDictionary,
    learned_dirs: np.ndarray | torch.Tensor,
    match: MatchResult | None = None,
    true_fires: sparse.spmatrix | None = None,
    learned_fires: sparse.spmatrix | None = None,
    fpr: float = 0.01,
    k: int = 32,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the pipeline's geometry on the learned decoder and score it against the planted truth.

    For each task feature t (through its matched learned latent L(t)):

    * ``neighbours``: L(t)'s kNN list (`geometry.knn_cosine`, self excluded, descending cosine)
      with each entry mapped back to a true role relative to t: ``planted`` (with its rho),
      ``partner``, ``decoy``, ``other`` (another task's block), ``composite`` (an unmatched latent
      at cos >= COMPOSITE_COS to both t and one of its co-firing partners), ``duplicate`` (an
      unmatched latent whose closest true feature is t itself) or ``extra`` (another unmatched
      latent), plus ``dead`` when ``learned_fires`` is given;
    * ``planted_rank``: the positions of the planted neighbours in that list (None when beyond k),
      ``order_ok``: found and listed in descending rho; ``recovered``: cos(L(t), L(h_k)) vs rho;
    * ``flagged_*``: learned cosines above ``null_cosine(d_sae, d, fpr)``, the pipeline's rule.

    False positives are counted over ALL (task, partner) and (task, decoy) pairs from the cosine
    of their matched latents, not only within the first k. The null is set so that a task
    feature's list contains a false flag with probability ``fpr`` (family-wise); per pair the
    rate is p = 1 - (1 - fpr)^(1/(n-1)).

    Co-activation: token-level Jaccard of (task, partner) and (task, planted) pairs, from the true
    codes (``true_fires``, columns = true features) and from the SAE's latents (``learned_fires``,
    columns = learned latents), when given.
    """
    match = match or match_dictionary(dictionary.directions, learned_dirs)
    L = _unit64(learned_dirs)
    n, d = L.shape
    k = min(k, n - 1)
    nb_idx, nb_cos = geometry.knn_cosine(L.astype(np.float32), k=k, device=device, progress=False)
    null = geometry.null_cosine(n, d, fpr=fpr)
    p_pair = -math.expm1(math.log1p(-fpr) / (n - 1))
    G = L @ L.T  # learned cosines [n, n]
    r = dictionary.roles
    role_of = r["role"].to_numpy()
    task_of = r["task"].to_numpy()
    rho_of = r["target_cosine"].to_numpy()
    tasks = dictionary.ids("task")
    decoys = dictionary.ids("decoy")
    asg = match.assignment
    fires_count = (
        np.asarray(sparse.csc_matrix(learned_fires).getnnz(axis=0)).ravel()
        if learned_fires is not None
        else None
    )

    def describe(j: int, t: int) -> dict[str, Any]:
        out = describe_role(j, t)
        if fires_count is not None:
            out["dead"] = bool(fires_count[j] == 0)
        return out

    Ct = _unit64(dictionary.directions) @ L.T  # true x learned cosines

    def is_composite(j: int, t: int) -> bool:
        """An unmatched latent pointing between t and one of its co-firing partners."""
        return any(
            Ct[t, j] >= COMPOSITE_COS and Ct[int(p), j] >= COMPOSITE_COS for p in dictionary.partners_of(t)
        )

    def describe_role(j: int, t: int) -> dict[str, Any]:
        tj = int(match.learned_to_true[j])
        if tj < 0:
            bt = int(match.learned_best_true[j])
            role = "composite" if is_composite(j, t) else "duplicate" if bt == t else "extra"
            return {"true": bt, "role": role, "rho": None, "match_cos": _f(match.learned_best_cos[j])}
        role = str(role_of[tj])
        if role in ("planted", "partner") and task_of[tj] != t:
            role = "other"
        elif role == "task":
            role = "other"
        return {
            "true": tj,
            "role": role,
            "rho": _f(rho_of[tj]) if role == "planted" else None,
            "match_cos": _f(match.matched_cos[tj]),
        }

    per_task, rec_rows, fp_rows = [], [], []
    fp_tasks = 0
    pair_ok = pair_total = 0
    for t in tasks:
        lt = int(asg[t])
        planted = dictionary.planted_of(int(t))
        partners = dictionary.partners_of(int(t))
        entry: dict[str, Any] = {"task": int(t), "learned": lt, "match_cos": _f(match.matched_cos[t])}
        if lt < 0:
            entry["order_ok"] = False
            per_task.append(entry)
            continue
        row_idx, row_cos = nb_idx[lt], nb_cos[lt]
        entry["neighbours"] = [
            {
                "learned": int(j),
                "cosine": _f(c),
                "z": _f(geometry.cosine_z(float(c), d)),
                "above_null": bool(c > null),
                **describe(int(j), int(t)),
            }
            for j, c in zip(row_idx, row_cos, strict=True)
        ]
        pos_of = {int(j): i for i, j in enumerate(row_idx)}
        ranks, recovered = [], []
        for _, h in planted.iterrows():
            lh = int(asg[int(h["feature"])])
            rank = pos_of.get(lh) if lh >= 0 else None
            cos = float(G[lt, lh]) if lh >= 0 else float("nan")
            ranks.append(rank)
            recovered.append(
                {
                    "planted": int(h["feature"]),
                    "rho": float(h["target_cosine"]),
                    "learned": lh,
                    "cosine": _f(cos),
                    "rank": rank,
                    "above_null": bool(cos > null),
                    "planted_match_cos": _f(match.matched_cos[int(h["feature"])]),
                }
            )
            rec_rows.append(
                {
                    "task": int(t),
                    "rho": float(h["target_cosine"]),
                    "cosine": cos,
                    "above_null": bool(cos > null),
                    "merged": bool(match.best_learned[int(h["feature"])] == match.best_learned[t]),
                }
            )
        found = [x for x in ranks if x is not None]
        # a merge: the task feature and a planted neighbour have the same closest latent
        merged = [int(h) for h in planted["feature"] if match.best_learned[int(h)] == match.best_learned[t]]
        entry["merged_with"] = merged
        for row in recovered:
            row["merged"] = row["planted"] in merged
        entry["planted_rank"] = ranks
        entry["order_ok"] = len(found) == len(ranks) and all(
            a < b for a, b in zip(found, found[1:], strict=False)
        )
        for i in range(len(ranks)):
            for j in range(i + 1, len(ranks)):
                pair_total += 1
                pair_ok += ranks[i] is not None and ranks[j] is not None and ranks[i] < ranks[j]
        entry["planted_top"] = sorted(found) == list(range(len(ranks)))
        entry["recovered"] = recovered
        # false positives: every partner of this task and every decoy
        fps = []
        for j, kind in [(int(p), "partner") for p in partners] + [(int(q), "decoy") for q in decoys]:
            lj = int(asg[j])
            if lj < 0:
                continue
            cos = float(G[lt, lj])
            fp_rows.append(
                {"task": int(t), "feature": j, "kind": kind, "cosine": cos, "flagged": bool(cos > null)}
            )
            if cos > null:
                fps.append({"feature": j, "kind": kind, "learned": lj, "cosine": _f(cos)})
        fp_tasks += bool(fps)
        entry["false_flags"] = fps
        # unmatched latents above the null (duplicates of t are not a geometric claim about t)
        entry["flagged_unmatched"] = [
            e
            for e in entry["neighbours"]
            if e["above_null"] and e["role"] in ("duplicate", "extra", "composite")
        ]
        alive_l = fires_count > 0 if fires_count is not None else np.ones(n, bool)
        entry["composites"] = [
            int(j)
            for j in np.flatnonzero(alive_l)
            if match.learned_to_true[j] < 0 and is_composite(int(j), int(t))
        ]
        per_task.append(entry)

    rec = pd.DataFrame(rec_rows, columns=["task", "rho", "cosine", "above_null", "merged"])
    fp = pd.DataFrame(fp_rows, columns=["task", "feature", "kind", "cosine", "flagged"])
    by_rho = []
    for rho, g in rec.groupby("rho", sort=False):
        by_rho.append(
            {
                "rho": float(rho),
                "n": len(g),
                "mean_cosine": _f(g["cosine"].mean()),
                "std_cosine": _f(g["cosine"].std(ddof=0)),
                "mean_abs_error": _f((g["cosine"] - rho).abs().mean()),
                "above_null_fraction": _f(g["above_null"].mean()),
                "merged_with_task": int(g["merged"].sum()),
                "rho_above_null": bool(rho > null),
            }
        )
    n_tasks = len(tasks)
    fp_summary = {}
    for kind in ("partner", "decoy"):
        g = fp[fp["kind"] == kind]
        fp_summary[kind] = {
            "pairs": len(g),
            "flagged": int(g["flagged"].sum()),
            "max_cosine": _f(g["cosine"].max()) if len(g) else None,
            "mean_abs_cosine": _f(g["cosine"].abs().mean()) if len(g) else None,
        }
    n_pairs, n_flag = len(fp), int(fp["flagged"].sum())
    fp_summary.update(
        {
            "pairs": n_pairs,
            "flagged": n_flag,
            "pair_rate": _f(n_flag / n_pairs) if n_pairs else None,
            "expected_pair_rate": p_pair,
            "expected_flagged": p_pair * n_pairs,
            "tasks_with_false_flag": fp_tasks,
            "task_rate": _f(fp_tasks / n_tasks) if n_tasks else None,
            "fpr": fpr,
            "ok": bool(n_tasks and fp_tasks / n_tasks <= fpr),
        }
    )
    result: dict[str, Any] = {
        "null_cosine": null,
        "fpr": fpr,
        "n_latents": n,
        "d": d,
        "k": k,
        "order_accuracy": _f(np.mean([e["order_ok"] for e in per_task])) if per_task else None,
        "pairwise_order_accuracy": _f(pair_ok / pair_total) if pair_total else None,
        "planted_top_fraction": _f(np.mean([e.get("planted_top", False) for e in per_task]))
        if per_task
        else None,
        "recovered_by_rho": by_rho,
        "recovered_mean_abs_error": _f((rec["cosine"] - rec["rho"]).abs().mean()) if len(rec) else None,
        "false_positives": fp_summary,
        "flagged_unmatched_latents": int(sum(len(e.get("flagged_unmatched", [])) for e in per_task)),
        "flagged_composites": int(
            sum(sum(x["role"] == "composite" for x in e.get("flagged_unmatched", [])) for e in per_task)
        ),
        "tasks_with_composite": int(sum(bool(e.get("composites")) for e in per_task)),
        "tasks": per_task,
    }
    result["coactivation"] = _coactivation_summary(dictionary, match, true_fires, learned_fires, G, null)
    return result


def feature_fires(
    learned_fires: sparse.spmatrix, match: MatchResult, n_true: int, min_cos: float = 0.9
) -> sparse.csc_matrix:
    """Firing of each TRUE feature as the SAE sees it: the union over the latents that stand for it.

    A latent stands for true feature i when it is matched to i, or when i is its closest true
    feature at |cos| >= ``min_cos`` (a duplicate). TopK SAEs do split one direction into
    duplicates that fire in different contexts (e.g. one copy of a partner for when its task
    feature fires, another for when it fires alone), which hides co-activation from any single
    latent; this view undoes that split.
    """
    Fl = sparse.csc_matrix(learned_fires)
    n_learned = Fl.shape[1]
    owner = np.where(np.abs(match.learned_best_cos) >= min_cos, match.learned_best_true, -1)
    owner = np.where(match.learned_to_true >= 0, match.learned_to_true, owner)
    keep = owner >= 0
    M = sparse.csr_matrix(
        (np.ones(int(keep.sum()), np.int8), (np.flatnonzero(keep), owner[keep])), shape=(n_learned, n_true)
    )
    out = (Fl.astype(np.int32) @ M).tocsc()
    out.data = (out.data > 0).astype(np.int8)
    out.eliminate_zeros()
    return out


def _coactivation_summary(
    dictionary: SynthDictionary,
    match: MatchResult,
    true_fires: sparse.spmatrix | None,
    learned_fires: sparse.spmatrix | None,
    G: np.ndarray,
    null: float,
) -> dict[str, Any]:
    """Jaccard of (task, partner) vs (task, planted) pairs: from the true codes ("true"), from the
    matched latents as the pipeline would measure them ("latent"), and per true feature with
    duplicate latents merged (`feature_fires`, "feature")."""
    r = dictionary.roles
    part = r[r["role"] == "partner"]
    plant = r[r["role"] == "planted"]
    pairs = {
        "partner": np.stack([part["task"], part["feature"]], 1).astype(np.int64).reshape(-1, 2),
        "planted": np.stack([plant["task"], plant["feature"]], 1).astype(np.int64).reshape(-1, 2),
    }
    feat_fires = feature_fires(learned_fires, match, dictionary.n) if learned_fires is not None else None
    out: dict[str, Any] = {}
    raw: dict[str, dict[str, np.ndarray]] = {}
    for kind, pr in pairs.items():
        lp = match.assignment[pr]
        ok = (lp >= 0).all(axis=1)
        cos = G[lp[ok, 0], lp[ok, 1]]
        entry: dict[str, Any] = {
            "pairs": len(pr),
            "mean_learned_cosine": _f(cos.mean()) if ok.any() else None,
            "above_null_fraction": _f((cos > null).mean()) if ok.any() else None,
        }
        vals: dict[str, np.ndarray] = {}
        if true_fires is not None:
            vals["true"] = jaccard_pairs(true_fires, pr)
        if learned_fires is not None and ok.any():
            vals["latent"] = jaccard_pairs(learned_fires, lp[ok])
            vals["feature"] = jaccard_pairs(feat_fires, pr)
        for src, j in vals.items():
            if len(j):
                entry[f"{src}_jaccard_mean"] = _f(j.mean())
                entry[f"{src}_jaccard_min"] = _f(j.min())
                entry[f"{src}_jaccard_max"] = _f(j.max())
        if kind == "planted" and "latent" in vals:
            rho = plant["target_cosine"].to_numpy()[ok]
            entry["latent_jaccard_by_rho"] = {
                str(float(v)): _f(vals["latent"][rho == v].mean()) for v in np.unique(rho)[::-1]
            }
        out[kind] = entry
        raw[kind] = vals
    for src in ("true", "latent", "feature"):
        a, b = raw["partner"].get(src), raw["planted"].get(src)
        if a is not None and b is not None and len(a) and len(b):
            out[f"{src}_separation_auroc"] = _f(_auroc(a, b))
            out[f"{src}_separated"] = bool(a.min() > b.max())
    return out


# ============================================================================ training
def train_sae(
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
    """Train the project's TopK SAE (`precompute.training.train_sae`) on x in memory; returns (SAE, stats).

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
            rows = sample_rows(data, d_sae, seed + 1) * trainer.norm_factor - trainer.b_dec
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


# ============================================================================ one whole run
@dataclass
class SynthConfig:
    d: int = 64
    n_task: int = 8
    cosines: tuple[float, ...] = DEFAULT_COSINES
    n_partners: int | None = None  # default: one per task
    n_decoys: int = 12
    samples: int = 100_000
    firing_prob: float = 0.03
    n_active: int | None = 3  # fixed L0 per sample (k defaults to it); None: independent firing
    cofire_prob: float = 0.6
    partner_solo: float = 0.5
    magnitude: str = "uniform"
    magnitude_range: tuple[float, float] = (0.5, 1.5)
    noise: float = 0.01
    d_sae: int | None = None  # default: 2 x true features
    k: int | None = None  # default: default_k(expected true L0)
    steps: int = 3000
    batch_size: int = 1024
    lr: float | None = 0.005
    init: str = "random"
    fpr: float = 0.01
    neighbors: int = 32
    seed: int = 0

    def resolved(self) -> SynthConfig:
        out = SynthConfig(**asdict(self))
        out.cosines = tuple(float(c) for c in self.cosines)
        out.magnitude_range = tuple(float(v) for v in self.magnitude_range)  # type: ignore[assignment]
        n_part = self.n_task if self.n_partners is None else self.n_partners
        out.n_partners = n_part
        n_true = self.n_task * (1 + len(self.cosines)) + n_part + self.n_decoys
        if out.d_sae is None:
            out.d_sae = 2 * n_true
        return out


@dataclass
class SynthRun:
    config: SynthConfig
    dictionary: SynthDictionary
    data: SynthData
    sae: SAE
    match: MatchResult
    report: dict[str, Any]


def run_synth(config: SynthConfig, progress: bool = False) -> SynthRun:
    """Dictionary -> activations -> TopK SAE -> matching -> geometry/co-activation report."""
    cfg = config.resolved()
    t0 = time.perf_counter()
    dic = make_dictionary(cfg.d, cfg.n_task, cfg.cosines, cfg.n_partners, cfg.n_decoys, seed=cfg.seed)
    if cfg.n_active is not None:
        l0 = float(cfg.n_active)
        if cfg.k is None:
            cfg.k = int(cfg.n_active)
    else:
        l0 = expected_l0(dic, cfg.firing_prob, cfg.cofire_prob, cfg.partner_solo)
        if cfg.k is None:
            cfg.k = default_k(l0)
    data = generate_activations(
        dic,
        cfg.samples,
        cfg.firing_prob,
        cfg.cofire_prob,
        cfg.partner_solo,
        cfg.magnitude,
        cfg.magnitude_range,
        cfg.noise,
        seed=cfg.seed,
        n_active=cfg.n_active,
    )
    t_gen = time.perf_counter() - t0
    sae, train_stats = train_sae(
        data.x,
        int(cfg.d_sae),
        int(cfg.k),
        cfg.steps,
        cfg.batch_size,
        cfg.lr,
        seed=cfg.seed,
        init=cfg.init,
        progress=progress,
    )
    t1 = time.perf_counter()
    learned = sae.unit_directions().double().numpy()
    true_fires = data.fires()
    learned_fires = sae_fires(sae, data.x)
    dead = np.asarray(learned_fires.getnnz(axis=0)).ravel() == 0
    match = match_dictionary(dic.directions, learned, exclude=dead)
    geo = evaluate_geometry(dic, learned, match, true_fires, learned_fires, fpr=cfg.fpr, k=cfg.neighbors)
    t_eval = time.perf_counter() - t1
    alive = ~dead
    by_role = {
        role: _f(np.abs(match.matched_cos[dic.ids(role)]).mean()) for role in ROLES if len(dic.ids(role))
    }
    recovery = {
        "mcc": match.mcc,
        "mmcs": match.mmcs,
        "mcc_by_role": by_role,
        "min_matched_cos": _f(np.abs(match.matched_cos).min()),
        "true_features_below_0.9": int((np.abs(match.matched_cos) < 0.9).sum()),
        "alive_latents": int(alive.sum()),
        "dead_latents": int((~alive).sum()),
    }
    bars = {
        "mcc_ge_0.9": bool(match.mcc >= 0.9),
        "mmcs_ge_0.9": bool(match.mmcs >= 0.9),
        "planted_in_rho_order": bool(geo["order_accuracy"] == 1.0),
        "false_positive_rate_le_fpr": bool(geo["false_positives"]["ok"]),
        "coactivation_separates_true": bool(geo["coactivation"].get("true_separated", False)),
        "coactivation_separates_learned": bool(geo["coactivation"].get("feature_separated", False)),
    }
    notes = {
        "coactivation_separates_matched_latents": bool(geo["coactivation"].get("latent_separated", False))
    }
    report = {
        "config": _jsonable(asdict(cfg)),
        "dictionary": {
            "n_features": dic.n,
            "d": dic.d,
            "counts": dic.roles["role"].value_counts().to_dict(),
            "blocks_orthogonal": dic.blocks_orthogonal,
            "expected_l0": l0,
        },
        "data": data.params,
        "training": {k: v for k, v in train_stats.items() if k != "curve"},
        "training_curve": train_stats["curve"],
        "recovery": recovery,
        "geometry": geo,
        "bars": bars,
        "all_bars_met": all(bars.values()),
        "notes": notes,
        "timings_s": {
            "generate": t_gen,
            "train": train_stats["train_seconds"],
            "evaluate": t_eval,
            "total": time.perf_counter() - t0,
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    return SynthRun(cfg, dic, data, sae, match, report)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ============================================================================ outputs
def plot_recovered(report: dict[str, Any], path: Path) -> list[Path]:
    """Recovered vs planted cosine (one point per task x rho), partners/decoys at 0, the null line.

    Writes HTML (plotly, self-contained); also a PNG when plotly's image export (kaleido) is there.
    """
    import plotly.graph_objects as go

    geo = report["geometry"]
    xs, ys, text = [], [], []
    rng = np.random.default_rng(0)
    for e in geo["tasks"]:
        for r in e.get("recovered", []):
            if r["cosine"] is None:
                continue
            xs.append(r["rho"] + rng.uniform(-0.012, 0.012))
            ys.append(r["cosine"])
            text.append(f"task {e['task']} / planted {r['planted']}: rank {r['rank']}")
    fp_x, fp_y, fp_text = [], [], []
    for e in geo["tasks"]:
        for n in e.get("neighbours", []):
            if n["role"] in ("partner", "decoy"):
                fp_x.append(rng.uniform(-0.03, 0.03))
                fp_y.append(n["cosine"])
                fp_text.append(f"task {e['task']} / {n['role']} {n['true']}")
    null = geo["null_cosine"]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[-0.05, 1.0],
            y=[-0.05, 1.0],
            mode="lines",
            name="recovered = planted",
            line={"dash": "dot", "color": "grey"},
        )
    )
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers",
            name="planted harmful neighbour",
            text=text,
            marker={"size": 8, "color": "#d62728"},
        )
    )
    fig.add_trace(
        go.Scatter(
            x=fp_x,
            y=fp_y,
            mode="markers",
            name="partner / decoy in the kNN list (planted 0 or random)",
            text=fp_text,
            marker={"size": 6, "color": "#1f77b4", "opacity": 0.6},
        )
    )
    fig.add_hline(
        y=null,
        line={"color": "black", "dash": "dash"},
        annotation_text=f"null at fpr={geo['fpr']:g}: {null:.3f}",
        annotation_position="bottom right",
    )
    rc = report["recovery"]
    fig.update_layout(
        title=f"Planted ground truth: recovered vs planted decoder cosine (d={report['dictionary']['d']}, "
        f"{report['dictionary']['n_features']} true features, d_sae={report['config']['d_sae']}, "
        f"MCC {rc['mcc']:.3f})",
        xaxis_title="planted cosine rho",
        yaxis_title="learned decoder cosine to the task feature",
        template="plotly_white",
        width=900,
        height=600,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    written = [path]
    try:  # pragma: no cover - kaleido is optional and absent from the project's environment
        png = path.with_suffix(".png")
        fig.write_image(str(png))
        written.append(png)
    except Exception:
        pass
    return written


def write_outputs(run_: SynthRun, out: str | Path) -> dict[str, str]:
    """Report JSON, plot, true dictionary (npz) and the SAE in SAELens format under ``out``."""
    from precompute.sae.formats.saelens import save_saelens

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    plots = plot_recovered(run_.report, out / PLOT_FILE)
    files["plot"] = str(plots[0])
    if len(plots) > 1:
        files["plot_png"] = str(plots[1])
    roles = run_.dictionary.roles
    np.savez(
        out / DICTIONARY_FILE,
        directions=run_.dictionary.directions,
        feature=roles["feature"].to_numpy(),
        role=roles["role"].to_numpy().astype(str),
        task=roles["task"].to_numpy(),
        target_cosine=roles["target_cosine"].to_numpy(),
        assignment=run_.match.assignment,
        matched_cos=run_.match.matched_cos,
    )
    files["dictionary"] = str(out / DICTIONARY_FILE)
    sae = run_.sae
    sae.metadata = {k: v for k, v in sae.metadata.items() if k != "sparsity"}
    sae.metadata["synth_config"] = _jsonable(asdict(run_.config))
    save_saelens(sae, out / SAE_DIR)
    files["sae"] = str(out / SAE_DIR)
    report = dict(run_.report)
    report["files"] = files
    (out / REPORT_FILE).write_text(json.dumps(_jsonable(report), indent=1))
    files["report"] = str(out / REPORT_FILE)
    return files


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Human-readable summary of a run's report."""
    rc, geo, co = report["recovery"], report["geometry"], report["geometry"]["coactivation"]
    fp = geo["false_positives"]
    cfg = report["config"]
    lines = [
        f"dictionary: d={cfg['d']}, {report['dictionary']['n_features']} true features "
        f"{report['dictionary']['counts']}, true L0 {report['data']['true_l0']:.2f}; SAE d_sae={cfg['d_sae']}, "
        f"k={cfg['k']}, {cfg['steps']} steps, FVU {report['training']['fvu']:.4f}",
        f"recovery: MCC {rc['mcc']:.4f}, MMCS {rc['mmcs']:.4f}, min matched |cos| {rc['min_matched_cos']:.3f}, "
        f"{rc['true_features_below_0.9']} true features below 0.9",
        f"order: planted neighbours in rho order for {geo['order_accuracy']:.0%} of task features "
        f"(pairwise {geo['pairwise_order_accuracy']:.1%}); null cosine {geo['null_cosine']:.3f} at fpr {geo['fpr']:g}",
    ]
    for r in geo["recovered_by_rho"]:
        lines.append(
            f"  rho {r['rho']:.2f}: recovered {r['mean_cosine']:.3f} +- {r['std_cosine']:.3f}, "
            f"above null {r['above_null_fraction']:.0%}, merged with the task latent "
            f"{r['merged_with_task']}/{r['n']}"
        )
    lines.append(
        f"false positives: {fp['flagged']}/{fp['pairs']} partner/decoy pairs above the null "
        f"(expected {fp['expected_flagged']:.3f}); task features with a false flag "
        f"{fp['tasks_with_false_flag']} ({fp['task_rate']:.1%} vs fpr {fp['fpr']:g})"
    )
    p, q = co["partner"], co["planted"]
    if "latent_jaccard_mean" in p and "latent_jaccard_mean" in q:
        lines.append(
            f"co-activation (Jaccard, true / SAE feature-level / matched latent): partners "
            f"{p['true_jaccard_mean']:.3f} / {p['feature_jaccard_mean']:.3f} / {p['latent_jaccard_mean']:.3f} "
            f"(min {p['feature_jaccard_min']:.3f} feature-level) at learned cosine {p['mean_learned_cosine']:.3f}; "
            f"planted {q['true_jaccard_mean']:.3f} / {q['feature_jaccard_mean']:.3f} / {q['latent_jaccard_mean']:.3f} "
            f"(max {q['feature_jaccard_max']:.3f}) at cosine {q['mean_learned_cosine']:.3f}; separation AUROC "
            f"feature-level {co.get('feature_separation_auroc')}, matched latents {co.get('latent_separation_auroc')}"
        )
    lines.append(
        f"unmatched latents above the null in task lists: {geo['flagged_unmatched_latents']} "
        f"(composites of a task and its partner: {geo['flagged_composites']}; task features with a live "
        f"composite latent: {geo['tasks_with_composite']}/{len(geo['tasks'])})"
    )
    lines.append(f"bars: {report['bars']}")
    lines.append(f"time: {report['timings_s']['total']:.1f} s (train {report['timings_s']['train']:.1f} s)")
    return lines


# ============================================================================ command line
_at_least_2 = argtypes.number_in(int, 2, None)
_cosine = argtypes.number_in(float, -1, 1)
_non_negative_float = argtypes.number_in(float, 0, None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `featuregeom synth`."""
    d = SynthConfig()
    a = parser.add_argument
    a("--d", type=_at_least_2, default=d.d, help=f"activation dimension (default {d.d})")
    a(
        "--n-task",
        type=positive_int,
        default=d.n_task,
        help=f"task features, each with planted neighbours (default {d.n_task})",
    )
    a(
        "--cosines",
        type=_cosine,
        nargs="+",
        default=list(d.cosines),
        metavar="RHO",
        help="planted cosines of each task feature's harmful neighbours (default "
        + " ".join(f"{c:g}" for c in d.cosines)
        + ")",
    )
    a(
        "--partners",
        type=non_negative_int,
        default=None,
        help="co-firing orthogonal partners (default: one per task)",
    )
    a(
        "--decoys",
        type=non_negative_int,
        default=d.n_decoys,
        help=f"random decoy features (default {d.n_decoys})",
    )
    a("--samples", type=positive_int, default=d.samples, help=f"activations generated (default {d.samples})")
    a(
        "--n-active",
        type=non_negative_int,
        default=d.n_active,
        help=f"features firing in every sample (fixed L0; k defaults to it) (default {d.n_active}); "
        "0: every feature fires independently with --firing-prob",
    )
    a(
        "--firing-prob",
        type=fraction_closed,
        default=d.firing_prob,
        help=f"per-feature firing probability with --n-active 0 (default {d.firing_prob}); with a fixed L0, "
        "only partners' relative weight (x --partner-solo) matters",
    )
    a(
        "--cofire-prob",
        type=fraction_closed,
        default=d.cofire_prob,
        help=f"P(partner fires | its task feature fires) (default {d.cofire_prob})",
    )
    a(
        "--partner-solo",
        type=fraction_closed,
        default=d.partner_solo,
        help="a partner's firing probability without its task feature, as a fraction of --firing-prob "
        f"(default {d.partner_solo})",
    )
    a(
        "--noise",
        type=_non_negative_float,
        default=d.noise,
        help=f"Gaussian noise std per coordinate (default {d.noise})",
    )
    a("--d-sae", type=positive_int, default=None, help="SAE latents (default 2 x the true features)")
    a(
        "--k",
        type=positive_int,
        default=None,
        help="TopK k (default: expected true L0 + 1.5 sqrt(L0), rounded: k matched to the true L0)",
    )
    a("--steps", type=positive_int, default=d.steps, help=f"optimiser steps (default {d.steps})")
    a(
        "--batch-size",
        type=positive_int,
        default=d.batch_size,
        help=f"activations per step (default {d.batch_size})",
    )
    a("--lr", type=positive_float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    a(
        "--init",
        choices=("random", "data"),
        default=d.init,
        help="decoder initialisation: random (the project's train-sae recipe) or data (rows at random "
        f"training activations) (default {d.init})",
    )
    a(
        "--fpr",
        type=fraction_open,
        default=d.fpr,
        help=f"false-positive rate of the cosine null (default {d.fpr})",
    )
    a("--neighbors", type=positive_int, default=d.neighbors, help=f"kNN list length (default {d.neighbors})")
    a("--seed", type=seed_int, default=d.seed, help=f"seed for everything (default {d.seed})")
    a(
        "--out",
        default=None,
        metavar="DIR",
        help=f"write {REPORT_FILE}, {PLOT_FILE}, {DICTIONARY_FILE} and the SAE (SAELens, {SAE_DIR}/) here",
    )
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    return SynthConfig(
        d=args.d,
        n_task=args.n_task,
        cosines=tuple(args.cosines),
        n_partners=args.partners,
        n_decoys=args.decoys,
        samples=args.samples,
        firing_prob=args.firing_prob,
        n_active=args.n_active or None,
        cofire_prob=args.cofire_prob,
        partner_solo=args.partner_solo,
        noise=args.noise,
        d_sae=args.d_sae,
        k=args.k,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        init=args.init,
        fpr=args.fpr,
        neighbors=args.neighbors,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    """Run the planted-ground-truth check; exit status 0 when every bar is met, 1 otherwise."""
    cfg = config_from_args(args)
    result = run_synth(cfg, progress=getattr(args, "progress", True))
    for line in summary_lines(result.report):
        print(line)
    if args.out:
        files = write_outputs(result, args.out)
        print("wrote " + ", ".join(f"{k}: {v}" for k, v in files.items()))
    return 0 if result.report["all_bars_met"] else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m precompute.lab.synth ...` is `featuregeom synth ...` (one place handles errors)."""
    from precompute.cli import main as cli_main

    return cli_main(["synth", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
