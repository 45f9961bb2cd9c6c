"""Exact kNN with a bfloat16 candidate search (backend "torch-bf16"): the speed of 16-bit matmuls on a
GPU's tensor cores, the answer of the float32 search.

Per block of rows: (1) scores of the block against every row in bfloat16 (fp32 accumulation), the
top m = k + margin of each row kept as candidates; (2) the candidates rescored exactly and the top k
taken, with a proof per row that no other row can belong, and a recomputation over every row where
the proof fails (`knn_rescore.exact_topk`, shared with the float32 backends, so all return the same
arrays bit for bit). The proof needs a bound on the bfloat16 score's error: for unit vectors it is within

    EPS(d) = 2·2^-8 + 2^-16 + 2·d·2^-24

of the exact one (inputs rounded to 8 significant bits each, then d products summed in float32;
Cauchy-Schwarz bounds Σ|x_i y_i| by 1), so a row outside the candidates scores at most
v_m + EPS, where v_m is the m-th candidate's bfloat16 score. `stats` counts the recomputed rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from precompute.pipeline.knn_rescore import exact_topk, fp32_score_error

MARGIN = 32  # candidates beyond k


def bf16_score_error(d: int) -> float:
    """Largest |bf16 score − exact score| between two unit vectors of dimension d (module docstring)."""
    return 2 * 2.0**-8 + 2.0**-16 + 2 * d * 2.0**-24


def knn_torch_bf16(
    X: torch.Tensor, k: int, rows: int, bar: Any, margin: int = MARGIN, stats: dict[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine neighbours of the unit rows X [n, d] (float32), bf16 candidates + exact rescoring."""
    n, d = X.shape
    m = min(n - 1, k + margin)
    # the float32 part of fp32_score_error covers the rescoring's own error and the float32 rounding
    eps = bf16_score_error(d) + fp32_score_error(d)
    low = X.to(torch.bfloat16)
    out_i = np.empty((n, k), dtype=np.int32)
    out_c = np.empty((n, k), dtype=np.float32)
    fallback = 0
    for s in range(0, n, rows):
        e = min(n, s + rows)
        S = (low[s:e] @ low.T).float()
        ar = torch.arange(e - s, device=X.device)
        S[ar, ar + s] = -torch.inf
        v_low, cand = torch.topk(S, m, dim=1, largest=True, sorted=False)
        del S
        bound = (v_low.min(dim=1).values.double() + eps).cpu().numpy() if m < n - 1 else None
        out_i[s:e], out_c[s:e], f = exact_topk(X, np.arange(s, e), cand.cpu().numpy(), bound, k)
        fallback += f
        bar.update(e - s)
    if stats is not None:
        stats.update(rows=n, fallback_rows=fallback, candidates=m)
    return out_i, out_c
