"""bench/bench_growth.py's exponent fit: exact on power laws, robust to a constant factor, refuses what
cannot be fitted."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.bench_growth import exponents, fit_exponent, main


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0])
def test_exact_power_law(p: float) -> None:
    sizes = [16_384, 65_536, 262_144]
    fit = fit_exponent(sizes, [3.7e-9 * n**p for n in sizes])
    assert fit["exponent"] == pytest.approx(p, abs=1e-9)
    assert fit["prefactor"] == pytest.approx(3.7e-9, rel=1e-7)
    assert fit["max_rel_residual"] < 1e-9


def test_least_squares_slope_through_noise() -> None:
    """Off a power law the slope is the ordinary least-squares one of log cost on log size."""
    sizes = np.array([1e5, 3e5, 1e6])
    costs = np.array([64.0, 150.0, 320.0])
    x, y = np.log(sizes), np.log(costs)
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    fit = fit_exponent(sizes, costs)
    assert fit["exponent"] == pytest.approx(slope, rel=1e-12)
    assert 0.6 < fit["exponent"] < 0.75  # a fixed cost pulls a linear series below 1
    # the largest residual is the worst of the three points against the fitted line
    pred = fit["prefactor"] * sizes ** fit["exponent"]
    assert fit["max_rel_residual"] == pytest.approx(
        max(math.exp(abs(math.log(c / q))) - 1 for c, q in zip(costs, pred, strict=True))
    )


@pytest.mark.parametrize(
    "sizes, costs",
    [([1000], [1.0]), ([1000, 1000], [1.0, 2.0]), ([0, 10], [1.0, 2.0]), ([10, 20], [0.0, 1.0])],
)
def test_unfittable_inputs_are_refused(sizes: list[float], costs: list[float]) -> None:
    with pytest.raises(ValueError, match="two distinct positive sizes"):
        fit_exponent(sizes, costs)


def test_bad_sizes_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--features", "0"])
    assert e.value.code == 2
    assert "must be positive" in capsys.readouterr().err


def test_every_series_of_a_report_is_fitted() -> None:
    """A report whose costs follow known power laws gives those exponents, series by series."""
    tokens, feats = [100_000, 300_000, 1_000_000], [16_384, 65_536, 262_144]
    harvest = [
        {
            "tokens": n,
            "counted_tokens": n - 100,
            "cpu_s": 3e-4 * n,
            "wall_s": 1e-5 * n**1.2,
            "forward_to_hook_s": 2e-4 * n,
            "sae_encode_s": 1e-4 * n,
            "shard_bytes": 113 * (n - 100),
            "peak_rss_mib": 1200.0,
        }
        for n in tokens
    ]
    aggregate = [{"tokens": n, "cpu_s": 2e-5 * n, "wall_s": 3e-5 * n**0.9} for n in tokens]
    knn = [{"n": n, "cpu_s": 1e-8 * n**2, "wall_s": 2e-8 * n**2} for n in feats]
    got = {
        (e["series"], e["cost"]): e["exponent"]
        for e in exponents({"harvest": harvest, "aggregate": aggregate, "knn": knn})
    }
    want = {
        ("harvest", "cpu_s"): 1.0,
        ("harvest", "wall_s"): 1.2,
        ("harvest: forward + SAE only", "forward_sae_s"): 1.0,
        ("harvest: shard bytes", "shard_bytes"): 1.0,
        ("harvest: peak RSS", "peak_rss_mib"): 0.0,
        ("aggregate", "cpu_s"): 1.0,
        ("aggregate", "wall_s"): 0.9,
        ("kNN (exact)", "cpu_s"): 2.0,
        ("kNN (exact)", "wall_s"): 2.0,
    }
    assert got.keys() == want.keys()
    for key, p in want.items():
        assert got[key] == pytest.approx(p, abs=1e-9), key
    # a series measured at one size only has no exponent
    assert [e["series"] for e in exponents({"knn": knn[:1]})] == []
