"""The planted dictionary and the activations drawn from it (docs/science.md section 4).

Every *task* feature t has *planted harmful* neighbours at chosen cosines (h_k = rho_k t + sqrt(1 -
rho_k^2) u_k with u_k orthogonal to t and to the other planted directions), *co-firing partners* that
fire together with t but are exactly orthogonal to it, and random *decoys*. Activations x = sum_i a_i
d_i + noise come from sparse codes in which the planted neighbours fire INDEPENDENTLY of their task
feature and the partners fire WITH it, so geometry (decoder cosine) and co-activation (Jaccard of
firing sets) point in opposite directions by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from precompute.lab.synth.config import DEFAULT_COSINES

ROLES = ("task", "planted", "partner", "decoy")


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


# -------------------------------------------------------------------------------- the activations
@dataclass
class SynthData:
    """Activations x [n, d] (float32) and the true codes [n, n_features] (CSR, float32, >= 0)."""

    x: np.ndarray
    codes: sparse.csr_matrix
    params: dict[str, Any] = field(default_factory=dict)

    def fires(self) -> sparse.csc_matrix:
        return binary_fires(self.codes)


def binary_fires(codes: sparse.csr_matrix) -> sparse.csc_matrix:
    """1 where a code is > 0, as CSC (columns = features), the same "fires" rule as the cache."""
    m = sparse.csr_matrix(codes, copy=True)
    m.data = (m.data > 0).astype(np.int8)
    m.eliminate_zeros()
    return m.tocsc()


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
    magnitude_range: Sequence[float] = (0.5, 1.5),
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
        sparse.vstack(blocks, format="csr")
        if blocks
        else sparse.csr_matrix(np.zeros((0, n_feat), np.float32))
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
