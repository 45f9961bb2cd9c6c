"""Fine-tune diff: predicted risk equals a brute-force cosine computation, per-feature changes and
Spearman against predicted risk equal direct computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from precompute.errors import FeatureGeomError
from precompute.lab.diff import diff_tables, predicted_risk
from precompute.lab.eval_acts import EvalActs
from precompute.sae.registry import load_sae
from tests.precompute.lab.conftest import HARMFUL, TASK


def test_predicted_risk_is_the_brute_force_max_cosine_to_task_features(cache, tiny_sae_dir) -> None:
    risk = predicted_risk(cache).set_index("feature")
    d = load_sae(str(tiny_sae_dir)).unit_directions().double()
    assert list(risk.index) == HARMFUL
    for h in HARMFUL:
        cos = {
            t: float(d[h] @ d[t]) for t in TASK if t != h
        }  # harmful 5 is also a task feature: no self-pair
        best = max(cos, key=cos.get)
        assert risk.loc[h, "risk_max_cos"] == pytest.approx(cos[best], abs=1e-6)
        assert risk.loc[h, "risk_task_feature"] == best
        assert risk.loc[h, "risk_sum"] == pytest.approx(
            sum(max(0.0, c - 0.1) for c in cos.values()), abs=1e-5
        )


def _acts(rng, n_em: int, n_neutral: int, f: int, shift: np.ndarray | None = None) -> EvalActs:
    n = n_em + n_neutral
    arrays = {}
    for pos in ("prompt", "response"):
        mean = rng.gamma(1.0, 1.0, size=(n, f)) * (rng.random((n, f)) < 0.5)
        if shift is not None:
            mean = mean + shift
        arrays[f"{pos}_mean"] = mean.astype(np.float32)
        arrays[f"{pos}_rate"] = (mean > 0).astype(np.float32) * 0.5
        arrays[f"{pos}_tokens"] = np.full(n, 10)
    prompts = pd.DataFrame(
        {"set": ["em"] * n_em + ["neutral"] * n_neutral, "question": [f"q{i}" for i in range(n)]}
    )
    return EvalActs(Path("."), arrays, prompts, {})


def test_diff_tables_match_direct_computation(cache) -> None:
    rng = np.random.default_rng(0)
    before = _acts(rng, 6, 8, 64)
    shift = np.zeros(64)
    shift[HARMFUL] = np.linspace(0.1, 0.5, len(HARMFUL))
    after = EvalActs(
        Path("."),
        {
            k: (v + shift if v.ndim == 2 else v).astype(v.dtype) if "mean" in k else v
            for k, v in before.arrays.items()
        },
        before.prompts,
        {},
    )
    control = _acts(rng, 6, 8, 64)
    risk = predicted_risk(cache)
    table, summary = diff_tables(
        before, after, control, risk, n_boot=200, seed=0, labels=("base", "ins", "sec")
    )
    assert set(table["comparison"]) == {"ins - base", "sec - base", "ins - sec"}
    assert len(table) == 2 * 2 * 3 * 64
    em = (before.prompts["set"] == "em").to_numpy()
    sel = table[
        (table.prompt_set == "em") & (table.position == "response") & (table.comparison == "ins - base")
    ]
    sel = sel.set_index("feature")
    np.testing.assert_allclose(sel["delta"].to_numpy(), shift, atol=1e-5)
    assert (sel.loc[HARMFUL, "delta_lo"] <= sel.loc[HARMFUL, "delta"]).all()
    other = table[
        (table.prompt_set == "neutral") & (table.position == "prompt") & (table.comparison == "ins - sec")
    ]
    expected = (after.arrays["prompt_mean"][~em] - control.arrays["prompt_mean"][~em]).mean(axis=0)
    np.testing.assert_allclose(other.sort_values("feature")["delta"].to_numpy(), expected, atol=1e-5)
    assert table.loc[table["is_harmful"], "feature"].unique().tolist() == HARMFUL

    s = summary["comparisons"]["em/response/ins - base"]
    rho = sps.spearmanr(risk["risk_max_cos"], shift[HARMFUL]).statistic
    assert s["spearman_risk_max_cos"][0] == pytest.approx(rho)
    assert s["harmful_mean_change"][0] == pytest.approx(float(shift[HARMFUL].mean()), abs=1e-5)
    assert s["n_prompts"] == 6
    # A deterministic shift on every prompt: the paired interval collapses onto it.
    assert s["harmful_mean_change"][1] == pytest.approx(s["harmful_mean_change"][2], abs=1e-5)

    mismatched = EvalActs(Path("."), control.arrays, control.prompts.assign(question="other"), {})
    with pytest.raises(FeatureGeomError, match="different prompts"):
        diff_tables(before, mismatched, None, risk)


def test_predicted_risk_without_task_features_is_a_clear_error(tiny_sae_dir, tmp_path: Path) -> None:
    """The scores step may find no task feature (a result); the diff then says so instead of failing."""
    from precompute.errors import CacheError
    from tests.tiny import write_feature_cache

    empty = write_feature_cache(tmp_path / "cache", tiny_sae_dir, 64, HARMFUL, [], 0.1)
    with pytest.raises(CacheError, match=r"has no task features .*n_task"):
        predicted_risk(empty)
