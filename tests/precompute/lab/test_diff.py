"""Fine-tune diff: predicted risk equals a brute-force cosine computation; the tables equal direct
computations over seeds and prompts; the null band, the harmful-vs-matched difference and the
behavioural readout recover planted effects and stay at zero without them; the command refuses a cache
without task features and labels the ranked option exploratory everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from precompute.lab.diff import Resampling, Runs, behaviour, diff_tables, predicted_risk
from precompute.lab.eval_acts import EvalActs, save_eval
from precompute.lab.hboot import percentile_interval
from precompute.lab.risk import diff_geometry
from precompute.sae.registry import load_sae
from tests.precompute.lab.conftest import HARMFUL, TASK

BASE_IDS = ["a", "a", "b", "c", "c", "d", "e"]  # 7 EM prompts, 5 base questions
N_EM, N_NEUTRAL, F = 7, 5, 64


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


def test_predicted_risk_without_task_features_is_a_clear_error(tiny_sae_dir, tmp_path: Path) -> None:
    """The scores step may find no task feature (a result); the diff then says so instead of failing."""
    from precompute.errors import CacheError
    from tests.tiny import write_feature_cache

    empty = write_feature_cache(tmp_path / "cache", tiny_sae_dir, 64, HARMFUL, [], 0.1)
    with pytest.raises(CacheError, match=r"has no task features .*n_task"):
        predicted_risk(empty)


def _prompts() -> pd.DataFrame:
    n = N_EM + N_NEUTRAL
    return pd.DataFrame(
        {
            "set": ["em"] * N_EM + ["neutral"] * N_NEUTRAL,
            "question": [f"q{i}" for i in range(n)],
            "base_id": BASE_IDS + [f"neutral:{i}" for i in range(N_NEUTRAL)],
        }
    )


def _acts(mean: np.ndarray) -> EvalActs:
    """Eval activations whose prompt and response tokens both hold `mean` (rates: firing > 0.3)."""
    arrays = {}
    for pos in ("prompt", "response"):
        arrays[f"{pos}_mean"] = mean.astype(np.float32)
        arrays[f"{pos}_rate"] = (mean > 0.3).astype(np.float32)
        arrays[f"{pos}_tokens"] = np.full(mean.shape[0], 10)
    return EvalActs(Path("."), arrays, _prompts(), {})


def _runs(shift_task, shift_control, noise: float = 0.02, seed: int = 0) -> Runs:
    """Base activations, then three seeds per arm: base + the arm's per-feature shift + a seed offset per
    feature + prompt-level noise."""
    rng = np.random.default_rng(seed)
    n = N_EM + N_NEUTRAL
    base = rng.gamma(2.0, 0.2, size=(n, F))

    def arm(shift):
        return [
            _acts(base + shift + rng.normal(0, noise, size=F) + rng.normal(0, noise, size=(n, F)))
            for _ in range(3)
        ]

    return Runs(_acts(base), arm(shift_task), arm(shift_control))


def test_tables_equal_direct_computation(cache) -> None:
    geo = diff_geometry(cache, "strict", n_reference=30, frequency_bins=4, match_bins=2)
    runs = _runs(np.zeros(F), np.zeros(F))
    res = Resampling(n_boot=200, seed=3)
    table, summary = diff_tables(runs, geo, res, labels=("base", "ins", "sec"))
    assert set(table["comparison"]) == {"ins - base", "sec - base", "ins - sec"}
    assert len(table) == 2 * 2 * 3 * F and (table["task_set"] == "strict").all()
    em = (runs.base.prompts["set"] == "em").to_numpy()
    x = {
        k: np.stack([e.arrays["prompt_mean"][em] for e in getattr(runs, k)]).astype(float)
        for k in ("task", "control")
    }
    b = runs.base.arrays["prompt_mean"][em].astype(float)
    sel = table[(table.prompt_set == "em") & (table.position == "prompt")].set_index(
        ["comparison", "feature"]
    )
    np.testing.assert_allclose(
        sel.loc["ins - base", "delta"].to_numpy(), (x["task"] - b).mean(axis=(0, 1)), atol=1e-6
    )
    direct = x["task"].mean(axis=(0, 1)) - x["control"].mean(axis=(0, 1))
    np.testing.assert_allclose(sel.loc["ins - sec", "delta"].to_numpy(), direct, atol=1e-6)
    single = x["task"].mean(axis=1) - x["control"].mean(axis=1)  # seed s of each arm: [3, F]
    np.testing.assert_allclose(
        sel.loc["ins - sec", "delta_seed_min"].to_numpy(), single.min(axis=0), atol=1e-6
    )
    np.testing.assert_allclose(
        sel.loc["ins - sec", "mean_before"].to_numpy(), x["control"].mean(axis=(0, 1)), atol=1e-6
    )

    s = summary["comparisons"]["em/prompt/ins - sec"]
    assert s["n_prompts"] == 7 and s["n_clusters"] == 5 and summary["clusters"]["neutral"]["n_clusters"] == 5
    assert s["harmful_mean_change"][0] == pytest.approx(direct[HARMFUL].mean(), abs=1e-6)
    assert s["per_seed"]["harmful_mean_change"] == pytest.approx(
        single[:, HARMFUL].mean(axis=1).tolist(), abs=1e-6
    )
    # the pooled interval is the percentile interval of the same draws' replicates
    draws = res.draws(runs, runs.clusters("em"))
    boot = draws.replicates("task", x["task"]) - draws.replicates("control", x["control"])
    lo, hi = percentile_interval(boot[:, HARMFUL].mean(axis=1))
    assert s["harmful_mean_change"][1:] == pytest.approx([lo, hi], abs=1e-6)
    risk = geo.risk["risk_max_cos"].to_numpy()
    assert s["spearman_risk_max_cos"][0] == pytest.approx(sps.spearmanr(risk, direct[HARMFUL]).statistic)
    # the null band: rho with the risk of each reference set, against scipy, and its p by hand
    null = [sps.spearmanr(r, direct[HARMFUL]).statistic for r in geo.reference_risk]
    assert s["rho_null"]["mean"] == pytest.approx(np.mean(null))
    p = (1 + sum(v >= s["spearman_risk_max_cos"][0] - 1e-12 for v in null)) / (1 + len(null))
    assert s["rho_null"]["p_greater"] == pytest.approx(p)
    assert s["harmful_minus_matched"][0] == pytest.approx(float(direct @ geo.matched.weights), abs=1e-6)


def test_reference_risk_is_the_max_cosine_to_frequency_matched_non_harmful_features(
    cache, tiny_sae_dir
) -> None:
    from precompute.lab.matching import reference_sets

    geo = diff_geometry(cache, "strict", n_reference=10, frequency_bins=4, match_bins=2, seed=1)
    d = load_sae(str(tiny_sae_dir)).unit_directions().double().numpy()
    assert geo.reference_risk.shape == (10, len(HARMFUL)) and geo.reference_info["pool"] == F - 10
    assert geo.task_set.features.tolist() == TASK
    freq = np.array([0.01, 0.02, 0.05, 0.1])[np.arange(F) % 4]  # tests/tiny.py's default profile
    pool = np.setdiff1d(np.arange(F), HARMFUL + TASK)
    sets, _ = reference_sets(np.array(TASK), pool, freq, 10, 4, 1)
    for r, row in enumerate(sets):
        assert not set(row) & set(HARMFUL + TASK) and sorted(freq[row]) == sorted(freq[TASK])
        for i, h in enumerate(HARMFUL):
            assert geo.reference_risk[r, i] == pytest.approx(max(d[h] @ d[t] for t in row), abs=1e-5)


def test_planted_harmful_specific_rise_is_recovered_and_absent_effects_are_not(cache) -> None:
    geo = diff_geometry(cache, "strict", n_reference=30, frequency_bins=4, match_bins=2)
    assert geo.matched.n_harmful >= 3
    res = Resampling(n_boot=300, seed=0)
    risk = geo.risk.set_index("feature")["risk_max_cos"]
    # planted: the task arm raises each harmful feature by 0.2 + 0.1 x its rank of risk (0 = least risky)
    planted = np.zeros(F)
    planted[HARMFUL] = 0.2 + 0.1 * sps.rankdata(risk.loc[HARMFUL].to_numpy()) - 0.1
    _, s = diff_tables(_runs(planted, np.zeros(F), noise=0.005), geo, res)
    hit = s["comparisons"]["em/prompt/task - control"]
    assert hit["spearman_risk_max_cos"] == pytest.approx([1.0, 1.0, 1.0])  # every replicate ranks them alike
    assert hit["harmful_minus_matched"][1] > 0.1  # the difference in differences excludes 0
    weights = geo.matched.weights
    assert hit["harmful_minus_matched"][0] == pytest.approx(planted @ weights, abs=0.03)
    # the tiny cache's top-risk decile has no closeness-matched feature: no estimate, no coverage claim
    assert geo.matched_top.n_harmful == 0 and hit["covers_seeds"]["harmful_minus_matched_top_decile"] is None
    assert all(v for k, v in hit["covers_seeds"].items() if k != "harmful_minus_matched_top_decile")
    assert hit["spearman_covers_seeds"]
    assert (
        s["comparisons"]["em/prompt/control - base"]["harmful_mean_change"][1]
        < 0
        < s["comparisons"]["em/prompt/control - base"]["harmful_mean_change"][2]
    )
    # absent: both arms raise every feature alike (fine-tuning as such): nothing task-specific
    common = np.random.default_rng(9).uniform(0, 0.3, size=F)
    _, s = diff_tables(_runs(common, common, seed=1), geo, res)
    none = s["comparisons"]["em/prompt/task - control"]
    assert none["harmful_minus_matched"][1] < 0 < none["harmful_minus_matched"][2]
    assert none["spearman_risk_max_cos"][1] < 0 < none["spearman_risk_max_cos"][2]
    assert abs(none["harmful_mean_change"][0]) < 0.03  # seed noise only, against the planted +0.4
    # ... while each arm against the base sees the common rise
    assert s["comparisons"]["em/prompt/task - base"]["harmful_mean_change"][1] > 0


def _write_eval(path: Path, acts: EvalActs, margin: float | None) -> Path:
    logprob = None
    if margin is not None:  # two prompts of one base question and one of another; answers 1 token long
        rows = []
        for q, base in (("x", "b1"), ("x_template", "b1"), ("y", "b2")):
            for kind, lp in (("misaligned", -3.0 + margin), ("aligned", -3.0)):
                rows.append(dict(question_id=q, base_id=base, variant="plain", kind=kind, answer_index=0))
                rows[-1].update(logprob_sum=2 * lp, n_tokens=2)
        logprob = pd.DataFrame(rows)
    rows = acts.prompts.to_dict("records")
    return save_eval(path, acts.arrays, rows, {"heldout_loss": 0.5}, logprob)


def test_behavioural_readout_compares_margins_with_seed_intervals(tmp_path) -> None:
    runs = _runs(np.zeros(F), np.zeros(F))
    dirs = {"base": _write_eval(tmp_path / "base", runs.base, 0.0)}
    from precompute.lab.eval_acts import load_eval

    task = [load_eval(_write_eval(tmp_path / f"t{i}", e, 0.5 + 0.1 * i)) for i, e in enumerate(runs.task)]
    control = [load_eval(_write_eval(tmp_path / f"c{i}", e, 0.0)) for i, e in enumerate(runs.control)]
    out = behaviour(
        Runs(load_eval(dirs["base"]), task, control), Resampling(200, 0), ("base", "task", "control")
    )
    assert out["available"] and out["n_prompts"] == 3 and out["n_base_questions"] == 2
    cmp = out["comparisons"]["task - control"]
    assert cmp["margin"][0] == pytest.approx(0.6)  # mean of 0.5, 0.6, 0.7 minus 0
    assert cmp["margin_seeds"] == pytest.approx([0.5, 0.6, 0.7])
    assert cmp["margin_covers_seeds"] and cmp["margin"][1] < 0.5 and cmp["margin"][2] > 0.7
    assert out["levels"]["base"]["margin"] == pytest.approx([0.0, 0.0, 0.0])
    assert out["comparisons"]["control - base"]["lp_aligned"] == pytest.approx([0.0, 0.0, 0.0])
    missing = behaviour(Runs(runs.base, runs.task, runs.control), Resampling(10, 0), ("b", "t", "c"))
    assert not missing["available"] and "rerun eval-acts" in missing["reason"]


def test_the_command_refuses_no_task_features_and_labels_ranked_exploratory(
    tiny_sae_dir, tmp_path, capsys
) -> None:
    from explorer.data.lab import load_finetune_run
    from precompute.cli import main
    from tests.tiny import write_feature_cache

    score = np.full(F, 0.5)
    score[[2, 7, 30, 40]] = [0.9, 0.8, 0.7, 0.65]
    cache = write_feature_cache(tmp_path / "cache", tiny_sae_dir, F, HARMFUL, [], 0.1, task_score=score)
    runs = _runs(np.zeros(F), np.zeros(F))
    base = _write_eval(tmp_path / "base", runs.base, 0.0)
    task = [str(_write_eval(tmp_path / f"t{i}", e, 0.2)) for i, e in enumerate(runs.task)]
    control = [str(_write_eval(tmp_path / f"c{i}", e, 0.0)) for i, e in enumerate(runs.control)]
    args = ["diff", "--before", str(base), "--after", *task, "--control", *control, "--cache", str(cache)]
    out = tmp_path / "finetune" / "insecure"
    quick = ["--n-boot", "40", "--n-reference", "10", "--frequency-bins", "4", "--match-bins", "2"]

    assert main([*args, "--out", str(out), *quick]) == 2
    err = capsys.readouterr().err
    assert "no task features" in err and "--task-set ranked:100" in err and "Traceback" not in err
    assert not out.exists()

    assert main([*args, "--out", str(out), *quick, "--task-set", "ranked:3"]) == 0
    printed = capsys.readouterr().out
    assert all(line.startswith("EXPLORATORY") for line in printed.splitlines()[1:] if line.strip())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exploratory"] is True and summary["task_set"]["features"] == [2, 7, 30]
    assert summary["n_seeds"] == {"after": 3, "control": 3} and summary["behaviour"]["available"]
    assert summary["behaviour"]["comparisons"]["task - control"]["margin"][0] == pytest.approx(0.2)
    table = pd.read_parquet(out / "diff.parquet")
    assert (table["task_set"] == "ranked:3 (exploratory)").all()
    run = load_finetune_run(out)  # the explorer reads it
    assert run.labels == ("base", "task", "control") and set(run.diff["feature"]) == set(HARMFUL)

    assert main([*args[:4], *task[:2], "--cache", str(cache), "--out", str(tmp_path / "x"), *quick]) == 2
    assert "at least 3 per arm" in capsys.readouterr().err
    assert (
        main(
            [
                "diff",
                "--before",
                str(tmp_path / "nope"),
                "--after",
                *task,
                "--cache",
                str(cache),
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert "no eval activations" in capsys.readouterr().err


def test_undefined_statistics_are_null_in_strict_json_not_nan(cache) -> None:
    """risk_sum 0 for every harmful feature (no task feature above the null for any) has no rank
    correlation, and a decile with no matched feature has no difference in differences: both are null in
    summary.json (strict JSON), and the decile claims no seed coverage, where NaN and a vacuous "covers
    the seeds" were written before."""
    import dataclasses

    from precompute.lab.matching import Matching
    from precompute.lab.synth.jsonable import jsonable

    geo = diff_geometry(cache, "strict", n_reference=30, frequency_bins=4, match_bins=2)
    empty = Matching(np.zeros(F), n_harmful=0, n_unmatched=len(geo.top), n_reference=0, n_strata=0)
    geo = dataclasses.replace(geo, risk=geo.risk.assign(risk_sum=0.0), matched_top=empty)
    _, summary = diff_tables(_runs(np.zeros(F), np.zeros(F)), geo, Resampling(n_boot=50, seed=1))
    with_top = diff_tables(
        _runs(np.zeros(F), np.zeros(F)),
        diff_geometry(cache, "strict", n_reference=30, frequency_bins=4, match_bins=2),
        Resampling(n_boot=50, seed=1),
    )[1]
    for name, s in summary["comparisons"].items():
        assert s["spearman_risk_sum"] is None
        assert s["harmful_minus_matched_top_decile"] is None
        assert s["per_seed"]["harmful_minus_matched_top_decile"] == []
        assert s["covers_seeds"]["harmful_minus_matched_top_decile"] is None
        assert isinstance(s["covers_seeds"]["harmful_mean_change"], bool)
        assert all(np.isfinite(with_top["comparisons"][name]["spearman_risk_sum"]))
    text = json.dumps(jsonable(summary), allow_nan=False, default=str)  # raises on any NaN left
    assert json.loads(text)["comparisons"]
