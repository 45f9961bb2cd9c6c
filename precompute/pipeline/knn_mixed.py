"""Exact kNN with a bfloat16 candidate search (backend "torch-bf16"): the speed of 16-bit matmuls on a
GPU's tensor cores, the answer of the float32 search.

Per block of rows: (1) scores of the block against every row in bfloat16 (fp32 accumulation), the
top m = k + margin of each row kept as candidates; (2) the candidates rescored exactly in float32 and
the top k taken (descending, ties by lower index, as `knn_cosine`); (3) a proof per row that no other
row can belong: for unit vectors the bfloat16 score is within

    EPS(d) = 2·2^-8 + 2^-16 + 2·d·2^-24

of the exact one (inputs rounded to 8 significant bits each, then d products summed in float32;
Cauchy-Schwarz bounds Σ|x_i y_i| by 1), so a row outside the candidates scores at most
v_m + EPS, where v_m is the m-th candidate's bfloat16 score. When the k-th exact score is above
that, the row is exact; otherwise (a crowded neighbourhood) the row is recomputed in float32 over all
rows. `stats` counts those rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MARGIN = 32  # candidates beyond k


def bf16_score_error(d: int) -> float:
    """Largest |bf16 score − exact score| between two unit vectors of dimension d (module docstring)."""
    return 2 * 2.0**-8 + 2.0**-16 + 2 * d * 2.0**-24


def _exact_rows(X: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 top-k of `rows` over every row of X (self excluded), descending, ties by lower index:
    the float32 backend's own per-row rule (`knn._exact_row_topk`), row by row."""
    from precompute.pipeline.knn import _exact_row_topk  # knn imports this module: import at call time

    S = X[rows] @ X.T
    S[torch.arange(len(rows), device=X.device), rows] = -torch.inf
    sel = torch.stack([torch.from_numpy(_exact_row_topk(S[i], k)).to(X.device) for i in range(len(rows))])
    return _top_by_value_then_index(S.gather(1, sel), sel, k)


def _top_by_value_then_index(
    vals: torch.Tensor, idx: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the k largest values, ties by lower index (sort by index, then stably by value)."""
    idx_sorted, perm = torch.sort(idx, dim=1)
    vals = vals.gather(1, perm)
    vals, perm = torch.sort(vals, dim=1, descending=True, stable=True)
    return idx_sorted.gather(1, perm)[:, :k], vals[:, :k]


def knn_torch_bf16(
    X: torch.Tensor, k: int, rows: int, bar: Any, margin: int = MARGIN, stats: dict[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine neighbours of the unit rows X [n, d] (float32), bf16 candidates + fp32 rescoring."""
    n, d = X.shape
    m = min(n - 1, k + margin)
    eps = bf16_score_error(d)
    low = X.to(torch.bfloat16)
    out_i = np.empty((n, k), dtype=np.int32)
    out_c = np.empty((n, k), dtype=np.float32)
    fallback = 0
    for s in range(0, n, rows):
        e = min(n, s + rows)
        block = torch.arange(s, e, device=X.device)
        S = (low[s:e] @ low.T).float()
        S[torch.arange(e - s, device=X.device), block] = -torch.inf
        v_low, cand = torch.topk(S, m, dim=1, largest=True, sorted=True)
        del S
        exact = torch.einsum("bd,bmd->bm", X[s:e], X[cand])  # fp32 rescoring of the candidates
        idx, vals = _top_by_value_then_index(exact, cand, k)
        unsure = torch.nonzero(vals[:, k - 1] <= v_low[:, m - 1] + eps).flatten()
        if len(unsure) and m < n - 1:  # with every other row a candidate, nothing was left out
            fallback += len(unsure)
            idx[unsure], vals[unsure] = _exact_rows(X, block[unsure], k)
        out_i[s:e] = idx.cpu().numpy()
        out_c[s:e] = vals.cpu().numpy()
        bar.update(e - s)
    if stats is not None:
        stats.update(rows=n, fallback_rows=fallback, candidates=m)
    return out_i, out_c
