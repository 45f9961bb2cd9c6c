"""The made-up SAE behind the synthetic cache (bench/synthetic_cache.py): themed clusters of decoder
directions, their map positions and scores, task features planted right next to harmful ones, and the
exact cosine neighbours."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.synthetic_vocab import CATEGORIES


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-8)


def _topk_rows(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns of each row of `sims`, descending."""
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)


def neighbours(
    w: np.ndarray, cluster: np.ndarray, k: int, exact_limit: int = 20000
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine neighbours (self excluded); within clusters only for very large n."""
    n = len(w)
    idx = np.empty((n, k), dtype=np.int32)
    cos = np.empty((n, k), dtype=np.float32)
    if n <= exact_limit:
        for start in range(0, n, 2048):
            stop = min(n, start + 2048)
            sims = w[start:stop] @ w.T
            sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
            i, c = _topk_rows(sims, k)
            idx[start:stop], cos[start:stop] = i, c
        return idx, cos
    order = np.argsort(cluster, kind="stable")
    bounds = np.searchsorted(cluster[order], np.arange(cluster.max() + 2))
    for c in range(len(bounds) - 1):
        members = order[bounds[c] : bounds[c + 1]]
        if len(members) == 0:
            continue
        sims = w[members] @ w[members].T
        np.fill_diagonal(sims, -np.inf)
        kk = min(k, len(members) - 1)
        i, v = _topk_rows(sims, kk)
        idx[members, :kk], cos[members, :kk] = members[i], v
        if kk < k:  # tiny cluster: pad with random far features (keeps the [n, k] shape)
            idx[members, kk:], cos[members, kk:] = members[0], -1.0
    return idx, cos


@dataclass
class World:
    """The made-up SAE: each feature's theme, decoder direction, map position, scores and planted pairs."""

    n: int
    d: int
    theme: np.ndarray  # object [n]: a key of THEMES
    cluster: np.ndarray
    w: np.ndarray  # unit decoder directions [n, d]
    xy: np.ndarray
    harm: np.ndarray
    task: np.ndarray
    dead: np.ndarray
    planted_task: np.ndarray
    planted_harm: np.ndarray

    @property
    def is_harm_theme(self) -> np.ndarray:
        return np.isin(self.theme, CATEGORIES)


def make_world(rng: np.random.Generator, n: int, d: int) -> World:
    """Clusters with themes, then a few task features planted right next to harmful ones."""
    n_clusters = max(32, n // 64)
    cluster = rng.permutation(np.arange(n) % n_clusters).astype(np.int64)
    # cluster 0 is code (the task), then one cluster per harm category, the rest mostly benign
    c_theme = np.array(["benign"] * n_clusters, dtype=object)
    c_theme[0] = "code"
    for i, cat in enumerate(CATEGORIES):
        c_theme[1 + i] = cat
    extra = rng.random(n_clusters) < 0.06
    extra[: 1 + len(CATEGORIES)] = False
    c_theme[extra] = rng.choice(list(CATEGORIES) + ["code"], size=int(extra.sum()))
    theme = c_theme[cluster]

    centres = _unit(rng.standard_normal((n_clusters, d)))
    spread = 1.2  # pairwise cosine within a cluster around 0.4
    w = _unit(centres[cluster] + spread * _unit(rng.standard_normal((n, d))))
    c_xy = rng.uniform(-0.85, 0.85, size=(n_clusters, 2))
    xy = c_xy[cluster] + rng.normal(0, 0.035 if n > 50000 else 0.06, size=(n, 2))

    is_harm_theme = np.isin(theme, CATEGORIES)
    harm = np.where(is_harm_theme, rng.uniform(0.72, 0.98, n), rng.normal(0.5, 0.06, n))
    task = np.where(theme == "code", rng.uniform(0.7, 0.95, n), rng.normal(0.5, 0.06, n))

    n_planted = max(4, min(64, n // 200))
    harm_pool = np.flatnonzero(is_harm_theme & (harm > 0.85))
    planted_harm = rng.choice(harm_pool, size=n_planted, replace=False)
    cand = np.setdiff1d(np.flatnonzero(~is_harm_theme), planted_harm)
    planted_task = rng.choice(cand, size=n_planted, replace=False)
    target_cos = np.linspace(0.88, 0.62, n_planted)
    ortho = _unit(rng.standard_normal((n_planted, d)))
    hv = w[planted_harm]
    ortho = _unit(ortho - (ortho * hv).sum(1, keepdims=True) * hv)
    w[planted_task] = _unit(target_cos[:, None] * hv + np.sqrt(1 - target_cos[:, None] ** 2) * ortho)
    cluster[planted_task] = cluster[planted_harm]
    xy[planted_task] = xy[planted_harm] + rng.normal(0, 0.02, size=(n_planted, 2))
    task[planted_task] = np.linspace(0.97, 0.86, n_planted)
    harm[planted_task] = rng.normal(0.53, 0.02, n_planted)
    theme[planted_task] = "code"
    harm = harm.clip(0.02, 0.995)
    task = task.clip(0.02, 0.995)

    dead = rng.random(n) < 0.01
    dead[planted_task] = dead[planted_harm] = False
    harm[dead] = task[dead] = 0.5
    return World(n, d, theme, cluster, w, xy.clip(-1, 1), harm, task, dead, planted_task, planted_harm)
