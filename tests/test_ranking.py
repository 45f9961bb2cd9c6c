"""The tie-aware ranking check accepts swapped near-ties and rejects real ranking errors."""

import numpy as np
import pytest

from tests.ranking import assert_ranking_equivalent

SCORES = np.array([0.5, 0.9, 0.9 + 1e-9, 0.1, 0.0, 0.7])


def test_accepts_exact_and_near_tie_orders() -> None:
    assert_ranking_equivalent([2, 1, 5], SCORES, 3)
    assert_ranking_equivalent([1, 2, 5], SCORES, 3)  # 1e-9 apart: interchangeable


@pytest.mark.parametrize(
    "got",
    [
        [2, 1, 0],  # 0.5 returned where 0.7 belongs
        [5, 2, 1],  # order wrong beyond the tolerance
        [2, 2, 5],  # repeated item
        [2, 1],  # one short while eligible items remain
        [2, 1, 5, 0, 3, 4],  # an ineligible (zero) item included
    ],
)
def test_rejects_real_ranking_errors(got: list[int]) -> None:
    with pytest.raises(AssertionError):
        assert_ranking_equivalent(got, SCORES, 6 if len(got) > 3 else 3, eligible=SCORES > 0)
