"""Tie-aware comparison of a ranking against brute-force scores.

Two computation orders (a batched harvest vs an unbatched scan, blocked vs full matrix products)
can move a float by ~1e-9, which reorders near-ties. A returned ranking is right when its items are
distinct and eligible, and its score sequence equals the brute-force sorted score sequence within a
tolerance: near-tied items are interchangeable, but a real ranking error (a wrong item, a missing
better item, a wrong order beyond the tolerance) still changes that sequence and fails."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def assert_ranking_equivalent(
    got: Sequence[int],
    scores: np.ndarray,
    k: int,
    eligible: np.ndarray | None = None,
    tol: float | None = None,
    what: str = "",
) -> None:
    """`got` is the top-`k` of `scores` (descending) over `eligible` items, up to near-ties."""
    scores = np.asarray(scores, dtype=np.float64)
    eligible = np.ones(len(scores), bool) if eligible is None else np.asarray(eligible, bool)
    if tol is None:  # float32 sums of a few hundred terms, ordered differently
        tol = 1e-5 * max(1.0, float(np.abs(scores[eligible]).max(initial=0.0)))
    got = [int(i) for i in got]
    assert len(set(got)) == len(got), f"{what}: repeated items in {got}"
    assert all(eligible[i] for i in got), f"{what}: ineligible item in {got}"
    expected = np.sort(scores[eligible])[::-1][:k]
    # near-zero items may count as eligible in one order and not the other: allow that at the tail only
    assert len(got) == len(expected) or (
        len(got) < len(expected) and np.all(np.abs(expected[len(got) :]) <= tol)
    ), f"{what}: {len(got)} items, expected {len(expected)}"
    np.testing.assert_allclose(
        scores[got],
        expected[: len(got)],
        rtol=0,
        atol=tol,
        err_msg=f"{what}: ranking {got} differs from brute force beyond ties",
    )
