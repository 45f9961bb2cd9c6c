"""Matching learned SAE directions to the true dictionary, and who fires when (the co-activation side)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import linear_sum_assignment

from precompute.sae.base import SAE


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


# ------------------------------------------------------------------------------------ co-activation
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
