"""The overlaps pair view's "Steering check" section: with and without `steering/task-<T>.parquet`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from explorer.data import load_cache
from precompute.lab.steering_results import FEATURE_COLUMNS, save_steering
from tests.explorer.test_apptest import all_text, run_page


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FEATUREGEOM_CACHE", raising=False)
    monkeypatch.setenv("FEATUREGEOM_REVIEWS", str(tmp_path / "reviews"))


def _pair(cache_dir: Path) -> tuple[int, int]:
    row = load_cache(cache_dir).overlaps.iloc[0]
    return int(row["task_feature"]), int(row["harmful_feature"])


def _steering_df(task: int, harmful: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    features = sorted({*range(40), task, harmful})
    rows = []
    for alpha in (0.1, 0.5):
        for f in features:
            pred = alpha * rng.normal()
            rows.append(
                {
                    "alpha": alpha,
                    "alpha_abs": alpha * 10,
                    "feature": f,
                    "observed": 0.25 * alpha if f == harmful else 0.9 * pred + 0.01 * rng.normal(),
                    "predicted": pred,
                    "predicted_gated": 0.2 * alpha if f == harmful else pred,
                    "observed_pre": pred,
                    "observed_switch": 0.0,
                    "interference": pred / alpha,
                    "active_frac": 0.5,
                    "switched_frac": 0.0,
                    "base_mean": 0.1,
                    "is_task": f == task,
                }
            )
    df = pd.DataFrame(rows, columns=list(FEATURE_COLUMNS))
    df.attrs["meta"] = {"alpha_unit": "norm", "task_feature": task}
    return df


def test_steering_section_with_file(cache_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t, h = _pair(cache_copy)
    save_steering(_steering_df(t, h), cache_copy / "steering" / f"task-{t}.parquet")
    at = run_page("views/overlaps.py", cache_copy, monkeypatch, task=str(t), harmful=str(h))
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert "Steering check" in [e.label for e in at.expander]
    text = all_text(at).replace("\\", "")
    assert f"strength α=0.5 changes harmful feature #{h} by +0.125 vs +0.1 predicted" in text
    assert "slope" in text and "without checksum verification" in text
    assert "featuregeom steer" not in text
    tables = [d.value for d in at.dataframe if "slope" in d.value.columns]
    assert tables and list(tables[0]["slope"].round(6)) != [] and len(tables[0]) == 2


def test_steering_section_without_file(cache_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t, h = _pair(cache_copy)
    at = run_page("views/overlaps.py", cache_copy, monkeypatch, task=str(t), harmful=str(h))
    assert not at.exception, [e.value for e in at.exception]
    assert "Steering check" in [e.label for e in at.expander]
    cmd = (
        f"featuregeom steer --model smollm2 --sae bench/synthetic_cache.py --hook blocks.0.hook_resid_post "
        f"--task-feature {t} --harmful-feature {h} --out {cache_copy.resolve() / 'steering' / f'task-{t}.parquet'}"
    )
    assert cmd in [c.value for c in at.code]
    assert "No steering result" in all_text(at)
