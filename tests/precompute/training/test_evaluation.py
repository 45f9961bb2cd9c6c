"""Evaluation figures (`precompute.training.evaluation`)."""

from __future__ import annotations

import pytest
import torch

from precompute.training.evaluation import VarianceStats
from tests.precompute.training.helpers import explained_variance


def test_variance_stats_match_a_direct_computation():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0)) * 3 + 10
    x_hat = x + 0.5 * torch.randn(300, 5, generator=torch.Generator().manual_seed(1))
    stats = VarianceStats(5)
    for chunk in range(0, 300, 70):
        stats.add(x[chunk : chunk + 70], x_hat[chunk : chunk + 70])
    assert stats.explained_variance() == pytest.approx(explained_variance(x, x_hat), rel=1e-6)
