"""The bfloat16-candidate kNN returns the float32 search's neighbours row for row (and the float64
truth up to near-ties), on clustered data that crowds neighbourhoods (the fallback runs) and on spread data (it
does not); its error bound holds on real roundings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precompute.pipeline.knn import knn_bruteforce, knn_cosine, unit_rows
from precompute.pipeline.knn_mixed import bf16_score_error
from tests.ranking import assert_ranking_equivalent


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((8, d))
    return (centers[rng.integers(0, 8, n)] + 0.15 * rng.standard_normal((n, d))).astype(np.float32)


@pytest.mark.parametrize(("data", "crowded"), [("clustered", True), ("spread", False)])
def test_equals_brute_force(data: str, crowded: bool) -> None:
    rng = np.random.default_rng(1)
    X = _clustered(1500, 48, 2) if data == "clustered" else rng.standard_normal((1500, 48)).astype(np.float32)
    stats: dict[str, int] = {}
    idx, cos = knn_cosine(
        X, k=10, backend="torch-bf16", device="cpu", progress=False, block_size=200, stats=stats
    )
    fp32_i, fp32_c = knn_cosine(X, k=10, backend="torch", device="cpu", progress=False, block_size=200)
    assert np.array_equal(idx, fp32_i)  # the float32 search's answer, row for row
    assert np.array_equal(cos, fp32_c)  # bit for bit: both are rescored exactly (knn_rescore)
    exact = unit_rows(X).astype(np.float64) @ unit_rows(X).astype(np.float64).T
    others = ~np.eye(len(X), dtype=bool)  # self is not a neighbour
    for i in range(len(X)):  # and the float64 truth, up to near-ties float32 cannot order
        assert_ranking_equivalent(idx[i], exact[i], 10, eligible=others[i], what=f"row {i}")
    assert stats["rows"] == 1500 and stats["candidates"] == 10 + 32
    assert (stats["fallback_rows"] > 0) == crowded  # the proof fails in crowds, and only there


def test_duplicates_and_ties_follow_the_lower_index_rule() -> None:
    X = np.repeat(np.eye(6, 16, dtype=np.float32), 5, axis=0)  # 5 identical copies of 6 directions
    idx, cos = knn_cosine(X, k=6, backend="torch-bf16", device="cpu", progress=False)
    want_i, want_c = knn_bruteforce(X, 6)
    assert np.array_equal(idx, want_i) and np.array_equal(cos, want_c)


def test_error_bound_holds() -> None:
    X = torch.from_numpy(unit_rows(np.random.default_rng(3).standard_normal((400, 2304)).astype(np.float32)))
    exact = X.double() @ X.double().T
    low = (X.to(torch.bfloat16) @ X.to(torch.bfloat16).T).double()
    worst = float((low - exact).abs().max())
    assert worst <= bf16_score_error(2304)
    assert worst > bf16_score_error(2304) / 100  # the bound is not vacuous
