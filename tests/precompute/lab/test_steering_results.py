"""The steering result table: fits through the origin, and its file replaces only earlier results."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from precompute.errors import FeatureGeomError
from precompute.lab.steering_results import (
    FEATURE_COLUMNS,
    fit_slope,
    load_steering,
    pearson_r,
    save_steering,
)


def test_fit_slope_on_a_known_line_and_with_noise():
    x = np.linspace(-3, 3, 50)
    slope, r2, n = fit_slope(2.5 * x, x)
    assert slope == pytest.approx(2.5) and r2 == pytest.approx(1.0) and n == 50
    rng = np.random.default_rng(0)
    y = 2.0 * x + rng.normal(0, 0.5, x.size)
    slope, r2, n = fit_slope(y, x)
    assert slope == pytest.approx(float(x @ y / (x @ x)))
    assert r2 == pytest.approx(1 - ((y - slope * x) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    assert pearson_r(y, x) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert all(math.isnan(v) for v in fit_slope([1.0, 2.0], [0.0, 0.0])[:2])
    assert fit_slope([np.nan, 1.0], [1.0, 1.0])[2] == 1


def test_save_steering_replaces_only_its_own_files(tmp_path) -> None:
    df = pd.DataFrame({c: [0.0, 1.0] for c in FEATURE_COLUMNS})
    df.attrs = {"meta": {"task_feature": 1}, "summary": []}
    for name in ("s.parquet", "s.json"):
        out = save_steering(df, tmp_path / name)
        save_steering(df, out)  # an earlier steering output may be replaced
        assert load_steering(out).attrs["meta"] == {"task_feature": 1}
    precious = tmp_path / "notes.json"
    precious.write_text('{"mine": true}')
    with pytest.raises(FeatureGeomError, match="is not an earlier steering output"):
        save_steering(df, precious)
    assert precious.read_text() == '{"mine": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json", "s.json", "s.parquet"]
