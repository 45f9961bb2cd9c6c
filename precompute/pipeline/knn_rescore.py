"""The last step of every kNN backend: rescore the candidates exactly, in one fixed order, and prove
that no other row belongs.

Why: a BLAS or faiss search sums each cosine's d products in an order set by the thread count and
the block tiling, so the same decoder gave cosines 1.8e-7 apart with 1 and 2 threads (and hence a
different neighbors.npz and UMAP map on another machine). The candidate search therefore only picks
candidates; the value stored is `exact_cosines`: float64 products of the float32 unit rows (exact:
24-bit x 24-bit mantissas fit in 53 bits) summed by numpy's einsum kernel, which is single-threaded
and never calls BLAS (``optimize=False``), then rounded to float32. Each pair's value is the same
whatever the batch it is computed in (tested), so every backend, block size and thread count returns
the same arrays bit for bit; the order is descending float32 cosine, ties by lower index.

Boundary: the search returns k + margin candidates. An unreturned row scored at most v_m (the last
candidate's search score), so its exact cosine is at most v_m + eps, where eps bounds the search's
error (`fp32_score_error`, or the bf16 bound in `knn_mixed`) plus the float32 rounding of the stored
value. A row whose k-th exact cosine exceeds that is proven complete; otherwise (a near-tie across
the candidate edge, duplicated or zero rows) it is redone over every row: its float32 scores pick
every row within 2·eps of the k-th score (a provable superset of the exact top-k), which are then
rescored exactly. `stats["fallback_rows"]` counts those rows.
"""

from __future__ import annotations

import numpy as np
import torch

# Pairs per einsum call: the float64 gathers stay ~2 MiB (cache-sized: measured faster than 4-16 MiB).
_PAIR_BYTES = 2 * 2**20
# On a GPU each chunk costs a few kernel launches: far larger chunks (1M x 2304 rows, k+32 candidates:
# ~220 rows per chunk rather than 1).
_PAIR_BYTES_CUDA = 256 * 2**20
# Slack for rounding the stored cosine to float32 (half an ulp is <= 2^-24 for |cos| <= 1).
_ROUNDING_SLACK = 2.0**-22


def fp32_score_error(d: int) -> float:
    """A bound on |float32 dot product − exact| for two unit rows of dimension d, any summation order.

    Rounding error of a sum of d products in float32 is <= γ_d·Σ|x_i y_i| with γ_d ≈ d·2^-24
    (Higham, Accuracy and Stability of Numerical Algorithms, §3.1) and Σ|x_i y_i| <= |x||y| ≈ 1; the
    factor 2 covers norms a float32 ulp away from 1 and the float64 rescoring's own error (d·2^-53).
    Also the stored value's float32 rounding (`_ROUNDING_SLACK`).
    """
    return 2 * d * 2.0**-24 + _ROUNDING_SLACK


def exact_cosines(X: torch.Tensor, rows: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """float64 [b, m] dot products X[rows[i]]·X[cand[i, j]] of unit float32 rows, thread-independent.

    CPU: numpy's einsum over float64 copies (no BLAS, no threads; per-pair identical whatever the
    shape of the batch). CUDA: the same float64 products summed by torch on the device, which repeats
    run to run on one GPU (not compared with the CPU here: no GPU was available).
    """
    b, m = cand.shape
    d = X.shape[1]
    out = np.empty((b, m), dtype=np.float64)
    budget = _PAIR_BYTES if X.device.type == "cpu" else _PAIR_BYTES_CUDA
    step = max(1, budget // max(1, m * d * 8))
    if X.device.type == "cpu":
        Xn = X.numpy()
        for s in range(0, b, step):
            q = Xn[rows[s : s + step]].astype(np.float64)
            c = Xn[cand[s : s + step]].astype(np.float64)
            out[s : s + step] = np.einsum("bd,bmd->bm", q, c, optimize=False)
        return out
    rows_t = torch.as_tensor(rows, device=X.device)
    cand_t = torch.as_tensor(cand, device=X.device)
    for s in range(0, b, step):
        q = X[rows_t[s : s + step]].double()
        c = X[cand_t[s : s + step]].double()
        out[s : s + step] = (q[:, None, :] * c).sum(-1).cpu().numpy()
    return out


def _rank(rows: np.ndarray, cand: np.ndarray, exact: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the k best candidates by float32 cosine, ties by lower index; self excluded."""
    cos = exact.astype(np.float32)
    cos[cand == rows[:, None]] = -np.inf
    order = np.lexsort((cand, -cos), axis=-1)[:, :k]
    return np.take_along_axis(cand, order, 1), np.take_along_axis(cos, order, 1)


def _fallback_row(X: torch.Tensor, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One row's exact top-k over every row (module docstring: the superset within 2·eps)."""
    eps = fp32_score_error(X.shape[1])
    with torch.inference_mode():
        f = (X @ X[row]).double().cpu().numpy()  # any order: it only bounds which rows can belong
    f[row] = -np.inf
    t = np.partition(f, f.size - k)[f.size - k]  # k-th largest float32 score
    sel = np.flatnonzero(f >= t - 2 * eps)
    rows = np.array([row])
    return _rank(rows, sel[None, :], exact_cosines(X, rows, sel[None, :]), k)


def exact_topk(
    X: torch.Tensor,
    rows: np.ndarray,
    cand: np.ndarray,
    bound: np.ndarray | None,
    k: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact top-k of `rows` from their search candidates; (indices int32, cosine float32, fallbacks).

    X: unit rows [n, d] float32 (CPU or CUDA). cand: int64 [b, m], the search's best m per row
    (self may be among them; it is dropped by index). bound: float64 [b], the largest exact cosine a
    non-candidate can have (the last candidate's search score + eps), or None when every other row is
    a candidate; rows whose k-th cosine does not exceed it are redone over every row.
    """
    idx, cos = _rank(rows, cand, exact_cosines(X, rows, cand), k)
    unsure = np.zeros(len(rows), bool) if bound is None else cos[:, k - 1].astype(np.float64) <= bound
    for r in np.flatnonzero(unsure):
        idx[r], cos[r] = _fallback_row(X, int(rows[r]), k)
    return idx.astype(np.int32), cos, int(unsure.sum())
