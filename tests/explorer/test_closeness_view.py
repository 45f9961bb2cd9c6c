"""The Closeness page: its sentences and figures from closeness.json (pure), and the page through AppTest
on caches whose closeness.json says each verdict, is missing, or was tampered with; the exploratory
ranked comparison under its own heading, after the strict one, with a sentence only when testable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from explorer import figures as F
from explorer.data import read_closeness
from precompute import schema
from precompute.cache import stage
from precompute.errors import CacheError
from precompute.pipeline.closeness import ClosenessParams, closeness_report
from tests.explorer.test_apptest import all_text, plain, run_page
from tests.precompute.pipeline.test_closeness import dictionary

PAGE = "views/closeness.py"
PARAMS = ClosenessParams(n_permutations=1000, n_bootstrap=2000)


@pytest.fixture(scope="module")
def reports() -> dict[str, dict[str, Any]]:
    """One real report per verdict, from the closeness step's code on planted dictionaries."""
    out = {}
    for verdict, (a, b) in {
        "inducing_closer": (0.4, 0.05),
        "non_inducing_closer": (0.05, 0.4),
        "no_difference": (None, None),
    }.items():
        w, feats = dictionary(0, a, b)
        out[verdict] = json.loads(json.dumps(closeness_report(w, feats, 0.2, PARAMS)))
        assert out[verdict]["verdict"] == verdict
    w, feats = dictionary(0, 0.4, 0.05)
    out["not_testable"] = json.loads(
        json.dumps(closeness_report(w, feats.assign(is_control=False), 0.2, PARAMS))
    )
    return out


def with_closeness(cache: Path, report: dict[str, Any] | None) -> Path:
    """Rewrite the cache's closeness.json (None: remove it), with checksums, as the step would."""
    with stage(cache) as staged:
        path = staged.dir / schema.CLOSENESS
        if report is None:
            path.unlink()
        else:
            staged.path(schema.CLOSENESS).write_text(json.dumps(report))
        staged.commit()
    return cache


# ------------------------------------------------------------------------------ sentences and figures
def test_each_verdict_gets_its_own_sentence_with_the_files_numbers(
    reports: dict[str, dict[str, Any]],
) -> None:
    r = reports["inducing_closer"]
    s = F.closeness_sentence(r)
    assert s is not None and s.startswith("In this cache, task-specific features sit closer")
    for number in (
        f"{r['inducing']['mean']:.3f} vs {r['non_inducing']['mean']:.3f}",
        f"{r['difference']:+.3f}",
        f"95% CI {r['ci'][0]:+.3f} to {r['ci'][1]:+.3f}",
        f"n = {r['n_inducing']} and {r['n_non_inducing']}",
        f"one-sided p = {F.fmt_p(r['p_permutation'])}",
    ):
        assert number in s, number
    opposite = F.closeness_sentence(reports["non_inducing_closer"])
    assert (
        opposite is not None and "control-specific features sit closer" in opposite and "opposite" in opposite
    )
    none = F.closeness_sentence(reports["no_difference"])
    assert none is not None and "do not sit measurably closer" in none and "sit closer" not in none
    assert F.closeness_sentence(reports["not_testable"]) is None


@pytest.mark.parametrize("verdict", ["inducing_closer", "no_difference", "non_inducing_closer"])
def test_the_ranked_sentence_follows_its_own_verdict_and_says_exploratory(
    verdict: str, reports: dict[str, dict[str, Any]]
) -> None:
    r = json.loads(json.dumps(reports["no_difference"]["ranked"]))
    r["verdict"] = verdict
    s = F.ranked_sentence(r)
    assert s is not None and s.startswith("Exploratory, sets by rank rather than by significance")
    for number in (
        f"{r['difference']:+.3f}",
        f"95% CI {r['ci'][0]:+.3f} to {r['ci'][1]:+.3f}",
        f"n = {r['n']} each",
        f"one-sided p = {F.fmt_p(r['p_permutation'])}",
    ):
        assert number in s, number
    top_closer = f"the {r['n']} most task-leaning features (highest task score) sit closer"
    assert (top_closer in s) == (verdict == "inducing_closer")
    assert ("opposite of the claim" in s) == (verdict == "non_inducing_closer")
    assert ("do not sit measurably closer" in s) == (verdict == "no_difference")
    r["verdict"] = "not_testable"
    assert F.ranked_sentence(r) is None


def test_no_difference_names_a_frequency_made_difference() -> None:
    r = {
        "verdict": "no_difference",
        "inducing": {"mean": 0.3, "n": 10},
        "non_inducing": {"mean": 0.2, "n": 12},
        "difference": 0.1,
        "ci": [0.05, 0.15],
        "p_permutation": 0.4,
        "p_two_sided": 0.8,
        "null_difference_mean": 0.098,
    }
    s = F.closeness_sentence(r)
    assert s is not None and "what firing frequency alone gives" in s and "+0.098" in s


@pytest.mark.parametrize(
    ("p", "p_fewer", "words"),
    [
        (0.001, 0.999, "more than chance gives"),
        (0.99, 0.02, "fewer than chance gives"),
        (0.4, 0.6, "about what"),
    ],
)
def test_flagged_pairs_sentence_follows_the_p_values(
    reports: dict[str, dict[str, Any]], p: float, p_fewer: float, words: str
) -> None:
    r = json.loads(json.dumps(reports["inducing_closer"]))
    r["flagged_pairs"].update(p=p, p_fewer=p_fewer)
    s = F.flagged_pairs_sentence(r)
    assert s is not None and words in s and f"{r['flagged_pairs']['observed']:,} (task, harmful) pairs" in s
    r["flagged_pairs"]["testable"] = False
    assert F.flagged_pairs_sentence(r) is None and F.flagged_pairs_figure(r) is None


def test_the_figures_show_each_sets_share_and_the_observed_against_the_null(
    reports: dict[str, dict[str, Any]],
) -> None:
    r = reports["inducing_closer"]
    fig = F.closeness_sets_figure(r)
    assert fig is not None and len(fig.data) == 2
    for trace, key in zip(fig.data, ("inducing", "non_inducing"), strict=True):
        np.testing.assert_allclose(trace.y, np.array(r["histogram"][key]) / r[key]["n"])
        assert f"n = {r[key]['n']}" in trace.name
    null = F.difference_null_figure(r)
    assert null is not None and list(null.data[0].y) == r["permutation_null"]["counts"]
    assert null.layout.shapes[0].x0 == pytest.approx(r["difference"])
    assert F.closeness_sets_figure(reports["not_testable"]) is None
    assert F.difference_null_figure(reports["not_testable"]) is None


# ------------------------------------------------------------------------------ reading the file
def test_read_closeness_checks_the_file(cache_copy: Path, reports: dict[str, dict[str, Any]]) -> None:
    assert read_closeness(cache_copy) is not None
    bad = dict(reports["inducing_closer"])
    del bad["verdict"]
    with pytest.raises(CacheError, match="lacks the key\\(s\\) verdict .*closeness step"):
        read_closeness(with_closeness(cache_copy, bad))
    assert read_closeness(with_closeness(cache_copy, None)) is None
    with_closeness(cache_copy, reports["no_difference"])
    (cache_copy / schema.CLOSENESS).write_text(json.dumps(reports["inducing_closer"]))
    with pytest.raises(CacheError, match="checksum"):
        read_closeness(cache_copy)


# ------------------------------------------------------------------------------ the page
def sentences(at: AppTest) -> list[str]:
    return [plain(m.value) for m in at.markdown if plain(m.value).startswith("In this cache")]


@pytest.mark.parametrize("verdict", ["inducing_closer", "no_difference", "non_inducing_closer"])
def test_the_page_states_the_verdict(
    verdict: str, cache_copy: Path, reports: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    r = reports[verdict]
    at = run_page(PAGE, with_closeness(cache_copy, r), monkeypatch)
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    assert sentences(at) == [F.closeness_sentence(r)]
    assert not at.warning
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Task-specific (inducing)"] == f"n = {r['n_inducing']:,}"
    assert metrics["Control-specific (non-inducing)"] == f"n = {r['n_non_inducing']:,}"
    assert metrics["Difference"] == f"{r['difference']:+.3f}"
    assert metrics["95% CI"] == f"{r['ci'][0]:+.3f} to {r['ci'][1]:+.3f}"
    assert metrics["Permutation p"] == F.fmt_p(r["p_permutation"])
    assert F.flagged_pairs_sentence(r) in [plain(m.value) for m in at.markdown]
    ranked = r["ranked"]
    assert ranked["verdict"] == verdict  # the planted sets are also the ends of the ranking
    assert F.ranked_sentence(ranked) in [plain(m.value) for m in at.markdown]
    assert metrics["Ranked difference"] == f"{ranked['difference']:+.3f}"
    assert metrics["Ranked permutation p"] == F.fmt_p(ranked["p_permutation"])
    assert len(at.get("plotly_chart")) == 5
    headings = [plain(h.value) for h in at.subheader]
    assert headings.index("Closeness of the two sets") < headings.index(
        "Exploratory: the most task-leaning vs the most control-leaning features"
    )
    table = at.dataframe[0].value
    assert table["N asked"].tolist() == [row["n_requested"] for row in r["ranked_sensitivity"]]
    assert table["p (top closer)"].tolist() == [
        F.fmt_p(row["p_permutation"]) for row in r["ranked_sensitivity"]
    ]


def test_a_not_testable_cache_gets_the_reason_and_no_sentence(
    cache_copy: Path, reports: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    r = reports["not_testable"]
    at = run_page(PAGE, with_closeness(cache_copy, r), monkeypatch)
    assert not at.exception and not at.error
    assert sentences(at) == []
    warning = plain(at.warning[0].value)
    assert "Not testable" in warning and r["reason"] in warning and "No conclusion" in warning
    assert {m.label: m.value for m in at.metric}["Permutation p"] == "n/a"
    assert len(at.get("plotly_chart")) == 3  # the flagged pairs, which were testable, and the ranked pair
    assert F.ranked_sentence(r["ranked"]) in [plain(m.value) for m in at.markdown]


def test_a_not_testable_ranked_comparison_gets_its_reason_and_no_sentence(
    cache_copy: Path, reports: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    w, feats = dictionary(0, 0.4, 0.05)
    r = json.loads(json.dumps(closeness_report(w, feats.drop(columns="task_score"), 0.2, PARAMS)))
    assert r["verdict"] == "inducing_closer" and r["ranked"]["verdict"] == "not_testable"
    at = run_page(PAGE, with_closeness(cache_copy, r), monkeypatch)
    assert not at.exception and not at.error
    assert sentences(at) == [F.closeness_sentence(r)]
    assert not [m for m in at.markdown if plain(m.value).startswith("Exploratory")]
    (warning,) = [plain(w.value) for w in at.warning]
    assert "Not testable" in warning and "no column task_score" in warning
    assert "Ranked difference" not in {m.label for m in at.metric}
    assert len(at.get("plotly_chart")) == 3  # the strict comparison's two and the flagged pairs


def test_the_page_without_or_with_a_damaged_file(
    cache_copy: Path, synth_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = run_page(PAGE, synth_cache, monkeypatch)  # the synthetic cache's own closeness.json
    report = read_closeness(synth_cache)
    assert report is not None and not at.exception and not at.error
    if report["verdict"] != "not_testable":
        assert sentences(at) == [F.closeness_sentence(report)]
    with_closeness(cache_copy, None)
    at = run_page(PAGE, cache_copy, monkeypatch)
    assert not at.exception and "has no closeness.json" in at.info[0].value
    with_closeness(cache_copy, report)
    (cache_copy / schema.CLOSENESS).write_text("{}")
    at = run_page(PAGE, cache_copy, monkeypatch)
    assert not at.exception and "checksum" in all_text(at) + " ".join(e.value for e in at.error)


# ------------------------------------------------------------------------------ stability across seeds
def stability_report_from_code() -> dict[str, Any]:
    """A real stability.json: the step's code on a decoder and a replicate in which one of the two
    flagged pairs is not learnt again."""
    import pandas as pd

    from precompute.pipeline.knn import knn_bruteforce, unit_rows
    from precompute.pipeline.null import calibrated_null
    from precompute.pipeline.stability import StabilityParams, stability_report

    rng = np.random.default_rng(0)
    n, d = 200, 32
    a = unit_rows(rng.standard_normal((n, d)))
    a[1] = unit_rows((a[0] + a[1])[None])[0]  # a close pair (0, 1), cosine ~0.7
    b = a.copy()
    b[3] = unit_rows(rng.standard_normal((1, d)))[0]  # feature 3 is not learnt again
    indices, cosine = knn_bruteforce(a, 4)
    null = calibrated_null(a, 0.01, 2000, 0, "cpu")
    z = {"indices": indices, "cosine": cosine, "null_cosine": np.float64(null.cosine)}
    harmful = np.zeros(n, bool)
    harmful[[1, 3]] = True
    features = pd.DataFrame(
        {
            "is_harmful": harmful,
            "task_score": np.linspace(0.3, 0.7, n),
            "frequency": 0.01,
            "dead": False,
        }
    )
    overlaps = pd.DataFrame({"task_feature": [0, 2], "harmful_feature": [1, 3]})
    params = StabilityParams(0.7, 10, 0.01, 2000, 0)
    return json.loads(json.dumps(stability_report(a, b, features, z, overlaps, params, {"spec": "b"})))


def with_stability(cache: Path, report: dict[str, Any]) -> Path:
    with stage(cache) as staged:
        staged.path(schema.STABILITY).write_text(json.dumps(report))
        staged.commit()
    return cache


def test_stability_sentences_state_the_files_shares() -> None:
    report = stability_report_from_code()
    flagged = report["pair_sets"]["flagged"]
    assert [p["reappears"] for p in flagged["pairs"]] == [True, False]
    said = F.stability_sentences(report)
    assert (
        "Flagged pairs that reappear there, both features matched and still above its null: 1 of 2 (50%)."
        in said
    )
    assert said[0].endswith(
        f"for {report['match']['share_matched']:.0%} of this SAE's 200 live features "
        f"(median matched cosine {report['match']['quantiles']['0.5']:.2f})."
    )
    none_flagged = json.loads(json.dumps(report))
    none_flagged["pair_sets"]["flagged"].update(n_pairs=0, n_reappearing=0, pairs=[])
    assert "No pair is flagged in this cache" in " ".join(F.stability_sentences(none_flagged))


def test_the_page_shows_stability_or_says_it_was_not_measured(
    cache_copy: Path, reports: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    with_closeness(cache_copy, reports["no_difference"])
    at = run_page(PAGE, cache_copy, monkeypatch)
    assert any("Not measured: this cache has no stability.json" in i.value for i in at.info)
    report = stability_report_from_code()
    at = run_page(PAGE, with_stability(cache_copy, report), monkeypatch)
    assert not at.exception and not at.error
    shown = [plain(m.value) for m in at.markdown]
    for sentence in F.stability_sentences(report):
        assert sentence in shown
    (cache_copy / schema.STABILITY).write_text(json.dumps(report).replace('"b"', '"c"'))
    at = run_page(PAGE, cache_copy, monkeypatch)
    assert "checksum" in " ".join(e.value for e in at.error)


def test_sensitivity_sentence_says_when_the_verdict_depends_on_n() -> None:
    from explorer.figures.closeness import sensitivity_sentence

    def row(n: int, verdict: str, diff: float, lo: float, hi: float, p: float) -> dict:
        return {"n": n, "verdict": verdict, "difference": diff, "ci": [lo, hi], "p_two_sided": p}

    rows = [
        row(50, "non_inducing_closer", -0.0229, -0.0404, -0.0057, 0.0076),
        row(100, "no_difference", -0.0120, -0.0242, 0.0014, 0.128),
        row(200, "no_difference", -0.0050, -0.0130, 0.0030, 0.40),
    ]
    text = sensitivity_sentence(rows, "no_difference")
    assert text is not None and text.startswith("The verdict depends on N: at N = 50, the control-leaning")
    assert "-0.0229, 95% CI -0.0404 to -0.0057" in text and "With 3 values of N tried" in text
    assert "N = 100" not in text  # rows that agree with the headline are not repeated
    assert sensitivity_sentence(rows[1:], "no_difference") is None
