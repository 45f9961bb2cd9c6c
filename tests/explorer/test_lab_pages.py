"""Fine-tune diff and Dataset triage: loaders, figures and both pages, against the exact fixture values
that tests/explorer/lab_fixture.py writes into the synthetic cache."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from explorer import figures as F
from explorer.data import (
    compare_runs_table,
    find_finetune_runs,
    find_triage_runs,
    load_finetune_run,
    load_triage_run,
    spearman_of,
)
from precompute.errors import CacheError
from tests.explorer.lab_fixture import (
    BASE_RUNS,
    BOLD_PREVIEW,
    RUNS,
    TOP_DECILE,
    XSS_CATEGORY,
    XSS_TOKEN,
    LabFixture,
    heldout_of,
    mean_change_of,
)
from tests.explorer.test_apptest import all_text, html_text, plain, run_page

ESCAPED_TOKEN = "&lt;script&gt;alert(1)&lt;/script&gt;"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FEATUREGEOM_CACHE", raising=False)
    monkeypatch.setenv("FEATUREGEOM_REVIEWS", str(tmp_path / "reviews"))


def rows_of(
    lab: LabFixture, run: str, comparison: str, prompt_set: str = "em", position: str = "response"
) -> pd.DataFrame:
    """The fixture's harmful rows of one comparison, by feature id (what the page must plot)."""
    d = lab.diffs[run]
    sel = d[
        (d["comparison"] == comparison)
        & (d["prompt_set"] == prompt_set)
        & (d["position"] == position)
        & d["is_harmful"]
    ]
    return sel.sort_values("feature").reset_index(drop=True)


def _decode(obj: Any) -> Any:
    """Plotly's JSON ships numeric arrays as {'dtype', 'bdata'(, 'shape')}: back to lists."""
    if isinstance(obj, dict):
        if set(obj) >= {"dtype", "bdata"}:
            arr = np.frombuffer(base64.b64decode(obj["bdata"]), dtype=obj["dtype"])
            shape = obj.get("shape")
            if shape:
                arr = arr.reshape([int(x) for x in str(shape).split(",")])
            return arr.tolist()
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def figures(at: Any) -> list[go.Figure]:
    """The page's plotly charts, rebuilt as figures from the specs it sent."""
    return [go.Figure(_decode(json.loads(c.proto.spec))) for c in at.get("plotly_chart")]


def clean(text: str) -> str:
    return text.replace("\\", "")


# --- loaders -----------------------------------------------------------------------------------------


def test_find_and_load_runs(synth_cache: Path, lab: LabFixture) -> None:
    assert [p.name for p in find_finetune_runs(synth_cache)] == sorted(RUNS)
    run = load_finetune_run(synth_cache / "finetune" / "insecure")
    assert run.labels == ("base", "task", "control")
    assert run.comparisons() == {
        "after": "task - base",
        "control": "control - base",
        "direct": "task - control",
    }
    assert run.prompt_sets == ["em", "neutral"] and run.positions == ["prompt", "response"]
    assert len(run.diff) == 6 * 3 * 2 * 2 and run.diff["is_harmful"].all()  # non-harmful rows dropped
    got = run.harmful("em", "response", "task - base")
    want = rows_of(lab, "insecure", "task - base")
    assert got["feature"].tolist() == want["feature"].tolist() == sorted(lab.harmful)
    assert got["delta"].tolist() == want["delta"].tolist()
    assert run.stats("neutral", "prompt", "control - base")["harmful_mean_change"] == mean_change_of(
        1, 1, 1, 0
    )
    assert run.heldout_loss("task") == heldout_of(1, 1) and run.heldout_loss("control") is None
    nc = load_finetune_run(synth_cache / "finetune" / "a_nocontrol")
    assert nc.comparisons() == {"after": "post - pre", "control": None, "direct": None}
    assert spearman_of(run, "em", "response", "task - base", "mean") == (0.11, -0.2, 0.6)  # the summary's
    rho, lo, hi = spearman_of(run, "em", "response", "task - base", "rate")  # computed: risk order vs change
    want_rho = pd.Series(want["risk_max_cos"]).rank().corr(pd.Series(want["rate_delta"]).rank())
    assert rho == pytest.approx(want_rho) and lo <= rho <= hi


def test_find_skips_partial_and_staging_dirs(cache_copy: Path) -> None:
    fin = cache_copy / "finetune"
    shutil.copytree(fin / "insecure", fin / ".insecure.tmp-abc")  # an atomic write in progress
    shutil.copytree(fin / "insecure", fin / "insecure.old-1234")  # the copy it replaces, being deleted
    (fin / "half").mkdir()
    (fin / "half" / "summary.json").write_text("{}")  # no diff.parquet
    assert [p.name for p in find_finetune_runs(cache_copy)] == sorted(RUNS)
    assert find_finetune_runs(cache_copy / "nowhere") == [] and find_triage_runs(cache_copy / "nowhere") == []


def test_broken_run_raises_clear_error(cache_copy: Path) -> None:
    p = cache_copy / "finetune" / "patch" / "diff.parquet"
    pd.read_parquet(p).drop(columns=["delta_lo"]).to_parquet(p)
    with pytest.raises(CacheError, match="delta_lo"):
        load_finetune_run(p.parent)
    (cache_copy / "finetune" / "insecure" / "summary.json").write_text("{not json")
    with pytest.raises(CacheError, match="JSON"):
        load_finetune_run(cache_copy / "finetune" / "insecure")


def test_load_triage(synth_cache: Path, lab: LabFixture) -> None:
    assert [p.name for p in find_triage_runs(synth_cache)] == ["pool"]
    t = load_triage_run(synth_cache / "triage" / "pool")
    assert t.ranked["rank"].tolist() == list(range(1, 11))  # sorted by rank although shuffled on disk
    assert t.ranked["key"].tolist() == lab.ranked["key"].tolist()
    assert t.ranked["score"].tolist() == lab.ranked["score"].tolist()
    assert t.threshold == lab.ranked["score"].iloc[1]  # the lower of the two removed
    s = t.sample(1)
    assert s is not None and s["tokens"][4] == XSS_TOKEN and s["trained"] == [False] * 4 + [True] * 4
    assert s["direct"][4] == 2.0 and t.sample(5) is None  # middle ranks keep no tokens
    assert t.meta["n_removed"] == 2


# --- figures -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("measure", ["mean", "rate"])
def test_change_scatter_is_the_fixture(synth_cache: Path, lab: LabFixture, measure: str) -> None:
    run = load_finetune_run(synth_cache / "finetune" / "insecure")
    series = [
        (c, f"{c} legend", run.harmful("em", "response", c), color)
        for c, color in (("task - base", F.TASK), ("control - base", F.NEUTRAL))
    ]
    fig = F.change_scatter(series, measure, null_cosine=0.2)
    assert [t.name for t in fig.data] == ["task - base legend", "control - base legend"]
    col, lo, hi = {
        "mean": ("delta", "delta_lo", "delta_hi"),
        "rate": ("rate_delta", "rate_delta_lo", "rate_delta_hi"),
    }[measure]
    for trace, comparison in zip(fig.data, ("task - base", "control - base"), strict=True):
        want = rows_of(lab, "insecure", comparison)
        assert list(trace.x) == want["risk_max_cos"].tolist()
        assert list(trace.y) == want[col].tolist()
        assert [c[0] for c in trace.customdata] == want["feature"].tolist()
        np.testing.assert_allclose(trace.error_y.array, want[hi] - want[col], atol=1e-12)
        np.testing.assert_allclose(trace.error_y.arrayminus, want[col] - want[lo], atol=1e-12)
    js = fig.to_json()
    assert XSS_CATEGORY not in js and "<img" not in js and "&lt;img src=x" in js  # category escaped in hover


def test_compare_runs_figure_one_bar_per_run(synth_cache: Path) -> None:
    runs = [load_finetune_run(synth_cache / "finetune" / n) for n in BASE_RUNS]
    table = compare_runs_table(runs, "neutral", "response")
    fig = F.compare_runs_figure(table)
    after, control = fig.data
    assert list(after.x) == BASE_RUNS and list(control.x) == BASE_RUNS
    r_of = {n: list(RUNS).index(n) for n in BASE_RUNS}
    assert list(after.y) == [mean_change_of(r_of[n], 0, 1, 1)[0] for n in BASE_RUNS]
    assert list(control.y) == [mean_change_of(r_of[n], 1, 1, 1)[0] for n in BASE_RUNS]
    np.testing.assert_allclose(after.error_y.array, [0.006] * 3, atol=1e-9)
    np.testing.assert_allclose(after.error_y.arrayminus, [0.004] * 3, atol=1e-9)
    # hover: the held-out loss of each bar's own label; insecure's control has none
    assert [c[3] for c in after.customdata] == [f"{heldout_of(r_of[n], 1):.4f}" for n in BASE_RUNS]
    assert [c[3] for c in control.customdata] == ["—", f"{heldout_of(2, 2):.4f}", f"{heldout_of(3, 2):.4f}"]


def test_finetune_table_sorted_by_direct_change(synth_cache: Path, lab: LabFixture) -> None:
    run = load_finetune_run(synth_cache / "finetune" / "insecure")
    main = run.harmful("em", "response", "task - control")
    others = {"task - base": run.harmful("em", "response", "task - base")}
    t = F.finetune_table(main, "task - control", others, "mean", labels=["x"] * 600, extra_query="&cache=a")
    want = rows_of(lab, "insecure", "task - control").sort_values("delta", ascending=False)
    assert t["feature"].tolist() == want["feature"].tolist()
    assert t["Δ task - control"].tolist() == want["delta"].tolist()
    assert t["CI excludes 0"].tolist() == ((want["delta_lo"] > 0) | (want["delta_hi"] < 0)).tolist()
    base = rows_of(lab, "insecure", "task - base").set_index("feature")["delta"]
    assert t["Δ task - base"].tolist() == base.loc[t["feature"]].tolist()
    assert t["open"].iloc[0] == f"feature?feature={int(want['feature'].iloc[0])}&cache=a"
    assert (t["nearest task feature"] == lab.task).all()


def test_triage_figures_and_escaping(synth_cache: Path, lab: LabFixture) -> None:
    t = load_triage_run(synth_cache / "triage" / "pool")
    fig = F.triage_histogram(t.ranked["score"], t.ranked["removed"], t.threshold, bins=5)
    kept, removed = fig.data
    assert sum(kept.y) == 8 and sum(removed.y) == 2
    assert fig.layout.shapes[0].x0 == t.threshold
    table = F.triage_table(t.ranked)
    assert table["rank"].tolist() == list(range(1, 11))
    assert table["preview"].iloc[1] == BOLD_PREVIEW.replace("\n", "↵ ")  # plain text for the data grid
    assert table["top features"].iloc[0] == f"#{lab.harmful[0]}, #{lab.task}"
    sample = t.sample(1)
    assert sample is not None
    out, scale = F.triage_tokens_html(sample, "total")
    assert scale == 2.5  # the highest trained-token score: direct 2.0 + via 0.5 on the payload token
    assert ESCAPED_TOKEN in out and XSS_TOKEN not in out and "<script" not in out
    assert 'title="score 2.500 = direct 2.000 + via overlap 0.500"' in out
    assert 'title="score 0.500 = direct 0.500 + via overlap 0.000 · prompt, not trained"' in out
    assert out.count("color:#9ca3af;") == 4  # the four prompt tokens are greyed
    direct, dscale = F.triage_tokens_html(sample, "direct")
    assert dscale == 2.0 and ESCAPED_TOKEN in direct
    legend = F.score_legend_html(scale, F.HARM, "<i>x</i>")
    assert "&lt;i&gt;" in legend and "<i>" not in legend and "prompt token (not trained)" in legend


# --- pages through AppTest ---------------------------------------------------------------------------


def test_finetune_page_default_run(
    synth_cache: Path, lab: LabFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = run_page("views/finetune.py", synth_cache, monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error and not at.warning, [w.value for w in at.warning]
    qp = {k: at.query_params[k] for k in ("run", "set", "pos", "measure")}
    assert {k: v[0] if isinstance(v, list) else v for k, v in qp.items()} == {
        "run": "insecure",
        "set": "em",
        "pos": "prompt",
        "measure": "mean",
    }
    figs = figures(at)
    assert len(figs) == 3  # risk vs change, after vs control, compare runs
    scatter = figs[0].data
    assert [t.legendgroup for t in scatter] == ["task - base", "control - base"]
    want = rows_of(lab, "insecure", "task - base", position="prompt")
    assert (
        list(scatter[0].x) == want["risk_max_cos"].tolist() and list(scatter[0].y) == want["delta"].tolist()
    )
    assert scatter[0].name == "task - base: ρ = +0.11 [-0.20, +0.60]"
    direct = figs[1].data
    assert [t.legendgroup for t in direct] == ["task - control"]
    assert (
        list(direct[0].y) == rows_of(lab, "insecure", "task - control", position="prompt")["delta"].tolist()
    )
    bars = figs[2].data
    assert list(bars[0].x) == BASE_RUNS
    metrics = {clean(m.label): m.value for m in at.metric}
    est = mean_change_of(1, 0, 0, 0)  # EM questions, prompt tokens (p = 0)
    assert metrics["mean Δ · task - base"] == f"{est[0]:+.3g}"
    assert metrics["held-out loss · task"] == f"{heldout_of(1, 1):.4f}"
    assert metrics["held-out loss · control"] == "—"
    assert metrics["top-risk decile Δ · task - base"] == f"{TOP_DECILE['insecure'][0]:+.3g}"  # em, prompt
    assert metrics["top-risk decile Δ · task - control"] == f"{TOP_DECILE['insecure'][2]:+.3g}"
    text = clean(all_text(at))
    top = (
        rows_of(lab, "insecure", "task - control", position="prompt")
        .sort_values("delta", ascending=False)
        .iloc[0]
    )
    assert (
        f"fine-tuning on task changed harmful feature #{int(top['feature'])}'s mean activation by "
        f"{top['delta']:+.3g}"
    ) in text and "compared with control" in text
    assert "by chance alone" in text and "multiple comparisons" in text
    assert "do not by themselves show that the model became misaligned" in text
    table = next(d.value for d in at.dataframe if "Δ task - control" in d.value.columns)
    assert table["feature"].tolist() == top_order(lab, "insecure", "task - control")
    assert XSS_CATEGORY not in html_text(at)


def top_order(lab: LabFixture, run: str, comparison: str) -> list[int]:
    return rows_of(lab, run, comparison).sort_values("delta", ascending=False)["feature"].astype(int).tolist()


def test_finetune_page_url_state(synth_cache: Path, lab: LabFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    at = run_page(
        "views/finetune.py",
        synth_cache,
        monkeypatch,
        run="patch",
        set="neutral",
        pos="prompt",
        measure="rate",
    )
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="ft_run").value == "patch" and at.radio(key="ft_measure").value == "rate"
    scatter = figures(at)[0].data
    want = rows_of(lab, "patch", "patched - base", "neutral", "prompt")
    assert list(scatter[0].y) == want["rate_delta"].tolist()
    # switching the run writes it back to the URL
    at.selectbox(key="ft_run").set_value("a_nocontrol").run()
    assert not at.exception
    assert at.query_params["run"] in ("a_nocontrol", ["a_nocontrol"])
    assert len(figures(at)) == 1  # no control: no direct comparison; no other run starts from "pre"
    assert any("no control" in clean(i.value) for i in at.info)
    # an unknown run in the URL falls back to the default
    at = run_page("views/finetune.py", synth_cache, monkeypatch, run="nope", measure="x")
    assert at.selectbox(key="ft_run").value == "insecure" and at.radio(key="ft_measure").value == "mean"


def test_finetune_page_skips_broken_run(cache_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = cache_copy / "finetune" / "patch" / "diff.parquet"
    pd.read_parquet(p).drop(columns=["delta_lo"]).to_parquet(p)
    at = run_page("views/finetune.py", cache_copy, monkeypatch)
    assert not at.exception and not at.error
    assert len(at.warning) == 1 and "Skipped patch" in clean(at.warning[0].value)
    assert at.selectbox(key="ft_run").options == ["a_nocontrol", "insecure", "patch_random_1"]


def test_triage_page(synth_cache: Path, lab: LabFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    at = run_page("views/triage.py", synth_cache, monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error and not at.warning
    assert at.query_params["sample"] in ("1", ["1"]) and at.query_params["triage"] in ("pool", ["pool"])
    body = html_text(at)
    assert ESCAPED_TOKEN in body and XSS_TOKEN not in body
    assert "<b>bold" not in body  # previews only go to the data grid, as text
    table = next(d.value for d in at.dataframe if "preview" in d.value.columns)
    assert table["rank"].tolist() == list(range(1, 11)) and table["preview"].iloc[1].startswith(
        "user: make the"
    )
    hist = figures(at)[0].data
    assert [t.name for t in hist] == ["kept", "removed"] and sum(hist[1].y) == 2
    links = [str(e.proto.label) for e in at.get("page_link")]
    assert any(lab_link.startswith(f"#{lab.harmful[0]} · harmful") for lab_link in links), links
    assert any(lab_link.startswith(f"#{lab.task} · task") for lab_link in links), links
    assert "mean over its trained" in all_text(at)
    assert not any("part is 0 for all" in i.value for i in at.info)  # the fixture's samples have some
    # a sample from the URL; one without per-token scores says so and shows rank 1
    at = run_page("views/triage.py", synth_cache, monkeypatch, sample="10")
    assert at.selectbox(key="tr_sample").value == 10 and f"#{10}" in html_text(at)
    at = run_page("views/triage.py", synth_cache, monkeypatch, sample="5")
    assert at.selectbox(key="tr_sample").value == 1
    assert any("#5 is not among them" in i.value for i in at.info)


def test_triage_without_the_task_path_says_its_ranking_is_direct_only(
    synth_cache: Path, lab: LabFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache with no task feature overlapping a harmful one (the demo): every via-overlap part is 0, and
    the page says the ranking is by the direct part alone."""
    cache = tmp_path / "cache"
    shutil.copytree(synth_cache, cache)
    ranked = next((cache / "triage").glob("*/ranked.parquet"))
    table = pd.read_parquet(ranked)
    table.assign(via_overlap=0.0, score=table["direct"]).to_parquet(ranked, index=False)
    at = run_page("views/triage.py", cache, monkeypatch)
    assert not at.exception
    said = [i.value for i in at.info if "part is 0 for all" in i.value]
    assert len(said) == 1 and f"for all {len(table):,}" in said[0] and "direct part alone" in said[0]


@pytest.mark.parametrize(
    "page, command",
    [
        (
            "views/finetune.py",
            "featuregeom diff --before runs/base/eval --after runs/task-s{0,1,2}/eval --control runs/control-s{0,1,2}/eval",
        ),
        ("views/triage.py", "featuregeom triage DATASET.jsonl --cache"),
    ],
)
def test_missing_results_show_the_command(
    page: str, command: str, cache_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.rmtree(cache_copy / "finetune")
    shutil.rmtree(cache_copy / "triage")
    at = run_page(page, cache_copy, monkeypatch)
    assert not at.exception and not at.error
    codes = [c.value for c in at.code]
    assert "python bench/mechanism_lab.py" in codes
    assert any(command in c and str(cache_copy.resolve()) in c for c in codes), codes
    assert any("python bench/mechanism_lab.py" in c.value for c in at.caption)
    assert not at.get("plotly_chart")


def test_finetune_page_shows_the_controls_and_labels_an_exploratory_run(
    cache_copy: Path, lab: LabFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of the seeded diff (`featuregeom diff --task-set ranked:N`): the exploratory warning, the
    controls (null band, harmful − matched, seed coverage) and the log-prob readout; a ranked set the
    cache no longer ranks the same way withholds the risk like any stale basis."""
    from explorer.data.lab import basis_problem, ranked_task_mask
    from tests.explorer.test_claims import raw

    f, _ = raw(cache_copy)
    path = cache_copy / "finetune" / "insecure"
    summary = json.loads((path / "summary.json").read_text())
    n_lean = int(((f["task_score"] > 0.5) & ~f["is_harmful"] & (f["frequency"] > 0)).sum())
    spec = f"ranked:{n_lean}"  # every task-leaning feature: the fixture's task feature must be among them
    mask = ranked_task_mask(f, {"kind": "ranked", "spec": spec})
    assert mask is not None and mask[lab.task], "the fixture's task feature should lean towards the task"
    summary.update(
        exploratory=True,
        task_set={"kind": "ranked", "spec": spec, "n": n_lean},
        n_seeds={"after": 3, "control": 3},
    )
    key = "em/prompt/task - control"
    summary["comparisons"][key].update(
        rho_null={"mean": 0.05, "lo": -0.1, "hi": 0.2, "p_greater": 0.31, "excess": [0.06, -0.05, 0.17]},
        harmful_minus_matched=[0.001, -0.002, 0.004],
        harmful_minus_matched_top_decile=[0.002, -0.004, 0.008],
        covers_seeds={"harmful_mean_change": True, "harmful_minus_matched": False},
    )
    summary["behaviour"] = {
        "available": True,
        "n_prompts": 72,
        "n_base_questions": 56,
        "levels": {"base": {"margin": [-0.37, -0.55, -0.2]}},
        "comparisons": {"task - control": {"margin": [0.02, -0.01, 0.05]}},
    }
    (path / "summary.json").write_text(json.dumps(summary))
    at = run_page("views/finetune.py", cache_copy, monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    assert plain(at.warning[0].value).startswith(f"Exploratory: run insecure used the task set {spec}")
    controls = next(d.value for d in at.dataframe if "null band (reference sets)" in d.value.columns)
    row = controls.set_index("comparison").loc["task - control"]
    assert row["null band (reference sets)"] == "+0.050 [-0.100, +0.200]" and row["p (null ≥ ρ)"] == "0.310"
    assert row["harmful − matched"] == "+0.001 [-0.002, +0.004]"
    assert row["CIs cover each seed"] == "no: harmful_minus_matched"
    beh = next(d.value for d in at.dataframe if "margin" in d.value.columns).set_index("model or comparison")
    assert (
        beh.loc["base", "margin"] == "-0.37 [-0.55, -0.2]"
        and beh.loc["task - control", "margin"] == "+0.02 [-0.01, +0.05]"
    )
    from explorer.data import load_cache
    from explorer.story.finetune import finetune_summaries

    used, left_out = finetune_summaries(load_cache(cache_copy))
    assert "insecure" not in used and "exploratory task set" in left_out["insecure"]
    # rescored so that the diff's task feature no longer leans towards the task: its ranked basis is stale
    basis = pd.read_parquet(path / "diff.parquet")
    basis = basis[basis["is_harmful"]]
    assert basis_problem(f, basis, summary["task_set"]) is None
    rescored = f.copy()
    rescored.loc[rescored["feature"] == lab.task, "task_score"] = 0.4
    problem = basis_problem(rescored, basis, summary["task_set"])
    assert (
        problem
        == "1 of the 1 task features its predicted risk points at is not one of its ranked task features in this cache now"
    )


def test_seed_coverage_ignores_statistics_without_an_estimate() -> None:
    """covers_seeds None (nothing matched, so no interval) is neither a yes nor a no."""
    from explorer.views.finetune import _seeds

    assert _seeds({"harmful_mean_change": True, "harmful_minus_matched_top_decile": None}) == "yes"
    assert _seeds({"harmful_mean_change": False, "top": None}) == "no: harmful_mean_change"
    assert _seeds({"harmful_minus_matched_top_decile": None}) == "—"
