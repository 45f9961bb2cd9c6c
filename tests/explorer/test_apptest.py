"""Every page through streamlit.testing.v1.AppTest: good caches, broken caches, URL state, interactions."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from explorer.data import load_cache
from explorer.reviews import ReviewStore

APP = str(Path(__file__).resolve().parents[2] / "explorer" / "app.py")
PAGES = [
    "views/map.py",
    "views/feature.py",
    "views/overlaps.py",
    "views/closeness.py",
    "views/story.py",
    "views/finetune.py",
    "views/triage.py",
]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FEATUREGEOM_CACHE", raising=False)
    monkeypatch.setenv("FEATUREGEOM_REVIEWS", str(tmp_path / "reviews"))


def run_page(
    page: str, cache_dir: Path | str | None, monkeypatch: pytest.MonkeyPatch, **params: str
) -> AppTest:
    if cache_dir is not None:
        monkeypatch.setenv("FEATUREGEOM_CACHE", str(cache_dir))
    at = AppTest.from_file(APP, default_timeout=60)
    for k, v in params.items():
        at.query_params[k] = v
    at.switch_page(page)
    at.run()
    return at


def plain(markdown: str) -> str:
    """Text passed through state.md_escape, as the reader sees it."""
    return re.sub(r"\\(.)", r"\1", markdown)


def html_text(at: AppTest) -> str:
    return "\n".join(str(h.proto.body) for h in at.html)


def all_text(at: AppTest) -> str:
    parts = [e.value for e in (*at.title, *at.header, *at.subheader, *at.markdown, *at.caption)]
    return "\n".join(map(str, parts)) + html_text(at)


@pytest.mark.parametrize("page", PAGES)
def test_page_renders(page: str, synth_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = run_page(page, synth_cache, monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert all_text(at).strip()


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("case", ["missing", "schema", "tampered", "none", "not_a_cache"])
def test_bad_cache_clear_message(
    page: str, case: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if case == "missing":
        cache, expect = tmp_path / "does-not-exist", "does not exist"
    elif case == "schema":
        cache, expect = request.getfixturevalue("wrong_schema_cache"), "schema_version"
    elif case == "tampered":
        cache, expect = request.getfixturevalue("tampered_cache"), "checksum"
    elif case == "none":
        cache, expect = None, "No cache given"
    else:
        (tmp_path / "empty").mkdir()
        cache, expect = tmp_path / "empty", "is not a cache"
    at = run_page(page, cache, monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1
    msg = at.error[0].value
    assert expect in msg.replace("\\", ""), msg
    assert "Traceback" not in msg


def test_map_query_param_and_search(synth_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = load_cache(synth_cache)
    t, h = c.default_pair()
    at = run_page("views/map.py", synth_cache, monkeypatch, feature=str(t))
    assert f"Feature #{t}" in html_text(at)
    assert any("harmful" in m.value for m in at.markdown)
    assert any(f"Closest harmful neighbour #{h}" in cap.value for cap in at.caption)
    other = int(
        c.features.index[
            (c.features["label"].fillna("").str.contains("planted")) & (c.features["feature"] != t)
        ][0]
    )
    at.text_input(key="map_q").input(str(other)).run()
    assert not at.exception
    assert at.query_params["feature"] == [str(other)] or at.query_params["feature"] == str(other)
    assert f"Feature #{other}" in html_text(at)
    # a text search that matches a label
    at.text_input(key="map_q").input("planted").run()
    assert not at.exception and any(sb.label.endswith("matching features") for sb in at.selectbox)
    for mode in ("task score", "harm category", "firing rate"):
        at.selectbox(key="map_color").set_value(mode).run()
        assert not at.exception
    # the threshold slider starts at the chance level, shown to the 3 places the panel uses, and re-filters
    slider = at.slider(key=f"map_thr:{synth_cache.name}")
    assert slider.value == round(c.null_cosine, 3) and slider.proto.format == "%.3f"
    assert any(f"cosine ≥ {slider.proto.format % slider.value}" in m.value for m in at.markdown)
    slider.set_value(0.99).run()
    assert any(m.value.startswith("**0 of 32 neighbours**") for m in at.markdown)


def test_map_base_chart_is_byte_identical_across_selections(
    synth_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Selecting another feature changes only the selection overlay: the colours' and the points' elements
    (what Streamlit hashes for its message cache) are the same bytes, so a click does not resend every point;
    a new colouring changes the colours alone, so the points' hover text is not resent either."""
    c = load_cache(synth_cache)
    t, h = c.default_pair()
    at = run_page("views/map.py", synth_cache, monkeypatch, feature=str(t))

    def charts(mode: str = "harm score") -> tuple[bytes, bytes, str]:
        specs = [ch.proto for ch in at.get("plotly_chart")]
        colours = [p for p in specs if f'"name":"{mode}"' in p.spec or '"name":"no harm category"' in p.spec]
        points = [p for p in specs if '"name":"features"' in p.spec]
        over = [p for p in specs if '"name":"selected #' in p.spec]
        assert len(colours) == len(points) == len(over) == 1 and len(specs) == 3, [p.spec[:80] for p in specs]
        assert "selected #" not in colours[0].spec + points[0].spec
        assert not any("text" in tr for tr in json.loads(colours[0].spec)["data"]), (
            "no hover text in the colours"
        )
        return (
            colours[0].SerializeToString(deterministic=True),
            points[0].SerializeToString(deterministic=True),
            over[0].spec,
        )

    colours, points, over = charts()
    assert f'"name":"selected #{t}"' in over
    at.text_input(key="map_q").input(str(h)).run()
    assert not at.exception and f"Feature #{h}" in html_text(at)
    colours2, points2, over2 = charts()
    assert colours2 == colours and points2 == points
    assert f'"name":"selected #{h}"' in over2 and over2 != over
    at.selectbox(key="map_color").set_value("task score").run()
    colours3, points3, _ = charts("task score")
    assert points3 == points and colours3 != colours


def test_invalid_feature_param_warns(synth_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = run_page("views/feature.py", synth_cache, monkeypatch, feature="999999")
    assert not at.exception and at.warning and "not in this cache" in at.warning[0].value
    at = run_page("views/feature.py", synth_cache, monkeypatch, feature="abc")
    assert not at.exception and at.warning


def test_feature_page_and_compare(synth_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = load_cache(synth_cache)
    t, h = c.default_pair()
    at = run_page("views/feature.py", synth_cache, monkeypatch, feature=str(t))
    body = html_text(at)
    assert f"Feature #{t}" in body and 'title="activation' in body
    assert any(s.value == "Top-activating examples" for s in at.subheader)
    assert any(s.value == "Nearest neighbours in decoder space" for s in at.subheader)
    assert len(at.get("plotly_chart")) == 2  # group rates, histogram
    # the held-out AUROC, and the set it was computed on
    held = next(m for m in at.metric if m.label == "held-out harm")
    row = c.row(t)
    on = row["harm_heldout_set"]
    where = "all held-out harmful documents" if on == "all" else f"the held-out {on} documents"
    assert held.value == f"{row['harm_heldout_auroc']:.2f}"
    assert held.help.endswith(f"lower 95% bound {row['harm_heldout_lo']:.2f}, on {where}")
    at.selectbox(key=f"feat_cmp:{t}:None").set_value(h).run()
    assert not at.exception
    assert any(s.value == f"Side by side: #{t} and #{h}" for s in at.subheader)
    assert f"Feature #{h}" in html_text(at)
    assert any("the chance level" in cap.value for cap in at.caption)


def test_overlaps_record_verdict(synth_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    c = load_cache(synth_cache)
    t, h = c.default_pair()
    at = run_page("views/overlaps.py", synth_cache, monkeypatch, task=str(t), harmful=str(h))
    assert not at.exception and any(s.value == f"Task #{t} ↔ harmful #{h}" for s in at.subheader)
    at.text_input(key=f"rev_name:{t}:{h}").input("Ana Reviewer")
    at.radio(key=f"rev_v:{t}:{h}").set_value("confirmed")
    at.text_area(key=f"rev_note:{t}:{h}").input("<script>alert(1)</script> both fire on eval()")
    next(b for b in at.button if b.label == "Save verdict").click().run()
    assert not at.exception and not at.error
    store = ReviewStore(tmp_path / "reviews" / f"{synth_cache.name}.reviews.sqlite")
    cur = store.get(t, h, "Ana Reviewer", cache=synth_cache.name)
    assert cur["verdict"] == "confirmed" and cur["note"] == "<script>alert(1)</script> both fire on eval()"
    assert "Consensus: <b>single reviewer</b>" in html_text(at) and "<b>Ana Reviewer</b>" in html_text(at)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text(at) and "<script>" not in html_text(at)
    assert at.query_params["reviewer"] in ("Ana Reviewer", ["Ana Reviewer"])  # the name survives a reload
    # a fresh session (a reload) sees the persisted verdict
    again = run_page("views/overlaps.py", synth_cache, monkeypatch, task=str(t), harmful=str(h))
    assert "Ana Reviewer" in html_text(again) and "confirmed" in html_text(again)
    # filters
    again.multiselect(key="ov_status").set_value(["confirmed"]).run()
    assert any(cap.value.startswith("1 of ") for cap in again.caption)


def test_overlaps_stale_save_is_refused_and_shows_the_other_verdict(
    synth_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    c = load_cache(synth_cache)
    t, h = c.default_pair()
    at = run_page("views/overlaps.py", synth_cache, monkeypatch, task=str(t), harmful=str(h))
    assert "No verdict yet for this pair." in [cap.value for cap in at.caption]
    # another reviewer saves on the pair while this page is open
    store = ReviewStore(tmp_path / "reviews" / f"{synth_cache.name}.reviews.sqlite")
    store.record(t, h, "benign", "Ben", "only harmless code", cache=synth_cache.name)
    at.text_input(key=f"rev_name:{t}:{h}").input("Ana")
    at.radio(key=f"rev_v:{t}:{h}").set_value("confirmed")
    at.text_area(key=f"rev_note:{t}:{h}").input("shell commands and threats")
    next(b for b in at.button if b.label == "Save verdict").click().run()
    assert not at.exception and len(at.error) == 1
    assert "Not saved: this pair changed after the page showed it (Ben: benign at" in plain(at.error[0].value)
    assert list(store.verdicts(synth_cache.name, t, h)["reviewer"]) == ["Ben"] and store.count_history() == 1
    assert "<b>Ben</b>" in html_text(at) and "only harmless code" in html_text(
        at
    )  # the other verdict is shown
    assert (
        at.text_area(key=f"rev_note:{t}:{h}").value == "shell commands and threats"
    )  # nothing typed is lost
    # having seen it, the second save goes through, beside Ben's
    next(b for b in at.button if b.label == "Save verdict").click().run()
    assert not at.exception and not at.error
    got = store.verdicts(synth_cache.name, t, h)
    assert sorted(zip(got["reviewer"], got["verdict"], strict=True)) == [
        ("Ana", "confirmed"),
        ("Ben", "benign"),
    ]
    assert "Consensus: <b>2 reviewers disagree</b>" in html_text(at)
    assert at.dataframe[0].value["status"].tolist().count("disputed") == 1


def test_reviewer_name_comes_from_the_url(
    synth_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    c = load_cache(synth_cache)
    t, h = c.default_pair()
    ReviewStore(tmp_path / "reviews" / f"{synth_cache.name}.reviews.sqlite").record(
        t, h, "needs-more-evidence", "Ana", cache=synth_cache.name
    )
    at = run_page("views/overlaps.py", synth_cache, monkeypatch, task=str(t), harmful=str(h), reviewer="Ana")
    assert at.text_input(key=f"rev_name:{t}:{h}").value == "Ana"
    assert at.radio(key=f"rev_v:{t}:{h}").value == "needs-more-evidence"  # her own verdict, ready to change


@pytest.mark.parametrize("table", ["verdict_history", "verdicts"])
def test_damaged_review_database_is_read_only_and_pages_work(
    synth_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, table: str
) -> None:
    from tests.explorer.helpers import write_damaged_reviews

    c = load_cache(synth_cache)
    t, h = c.default_pair()
    db = write_damaged_reviews(
        tmp_path / "reviews" / f"{synth_cache.name}.reviews.sqlite",
        [(t, h, "confirmed", "Ana")],
        cache=synth_cache.name,
        table=table,
    )
    before = db.read_bytes()
    at = run_page("views/overlaps.py", synth_cache, monkeypatch, task=str(t), harmful=str(h))
    assert not at.exception and not at.error
    warnings = [plain(w.value) for w in at.warning]
    assert f"The review database {db} is damaged" in warnings[0] and "saving is off" in warnings[0]
    assert any(s.value == f"Task #{t} ↔ harmful #{h}" for s in at.subheader)  # the pair is still shown
    statuses = at.dataframe[0].value["status"].tolist()
    captions = [cap.value for cap in at.caption]
    if table == "verdict_history":  # the verdicts survive: shown, with saving off
        assert statuses.count("confirmed") == 1
        assert "<b>Ana</b>" in html_text(at)
        assert next(b for b in at.button if b.label == "Save verdict").disabled
        assert any("cannot read the verdicts" in w for w in warnings[1:])  # the pair's history is lost
    else:  # no verdict can be read: the pairs are listed without them, and no form is offered
        assert set(statuses) == {"unreviewed"}
        assert any("cannot read the verdicts" in w for w in warnings[1:])
        assert (
            "Verdicts are unavailable (see the message at the top of the page); everything else works."
            in captions
        )
        assert not [b for b in at.button if b.label == "Save verdict"]
    # the other pages do not use the verdicts and work as usual
    m = run_page("views/map.py", synth_cache, monkeypatch)
    assert (
        not m.exception
        and not m.error
        and not m.warning
        and [x.value for x in m.title] == ["Map of features"]
    )
    f = run_page("views/feature.py", synth_cache, monkeypatch, feature=str(t))
    assert not f.exception and not f.error and not f.warning and f"Feature #{t}" in html_text(f)
    assert db.read_bytes() == before


def test_overlaps_requires_name(synth_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = load_cache(synth_cache)
    t, h = c.default_pair()
    at = run_page("views/overlaps.py", synth_cache, monkeypatch, task=str(t), harmful=str(h))
    at.radio(key=f"rev_v:{t}:{h}").set_value("benign")
    next(b for b in at.button if b.label == "Save verdict").click().run()
    assert not at.exception and at.error and "name" in at.error[0].value


def test_story_steps_and_navigation(synth_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = run_page("views/story.py", synth_cache, monkeypatch, step="3")
    assert "Step 3 of 8" in html_text(at) and "A task feature" in html_text(at)
    at.button(key="story_next").click().run()
    assert "Step 4 of 8" in html_text(at) and "closer than chance" in html_text(at)
    assert at.query_params["step"] in ("4", ["4"])
    at.button(key="story_back").click().run()
    assert "Step 3 of 8" in html_text(at)
    # the set-level comparison, drawn (the synthetic cache's closeness.json: the exploratory ranked sets)
    a = run_page("views/story.py", synth_cache, monkeypatch, step="6")
    assert "Step 6 of 8" in html_text(a) and "Beyond this pair" in html_text(a)
    assert len(a.get("plotly_chart")) == 1
    for step in ("1", "2", "5", "7", "99", "x"):
        a = run_page("views/story.py", synth_cache, monkeypatch, step=step)
        assert not a.exception and "Step" in html_text(a)
    # the last step, from the cache's fine-tune diffs (tests/explorer/lab_fixture.py)
    a = run_page("views/story.py", synth_cache, monkeypatch, step="8")
    assert not a.exception and "Step 8 of 8" in html_text(a) and "What fine-tuning did" in html_text(a)
    assert (
        "raised the harmful feature nearest the task features by 0.027 (95% CI 0.014 to 0.04)" in html_text(a)
    )
    assert len(a.get("plotly_chart")) == 1


def test_story_without_finetune_keeps_seven_steps(cache_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.rmtree(cache_copy / "finetune")
    at = run_page("views/story.py", cache_copy, monkeypatch, step="99")
    assert (
        not at.exception and "Step 7 of 7" in html_text(at) and "What fine-tuning could do" in html_text(at)
    )


def test_cache_root_picker(synth_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(synth_cache, root / "after-ft")
    shutil.copytree(synth_cache, root / "before-ft")
    at = run_page("views/map.py", root, monkeypatch)
    assert not at.exception and not at.error
    assert at.query_params["cache"] in ("after-ft", ["after-ft"])
    pick = at.sidebar.selectbox[0]
    assert pick.options == ["after-ft", "before-ft"]
    at = run_page("views/feature.py", root, monkeypatch, cache="before-ft")
    assert not at.exception and at.sidebar.selectbox[0].value == "before-ft"


def test_held_out_harm_help_names_what_was_compared() -> None:
    from explorer.views.feature import heldout_help

    row = {"harm_heldout_auroc": 0.81, "harm_heldout_lo": 0.66, "harm_heldout_set": "violence_weapons"}
    assert heldout_help(row).endswith("lower 95% bound 0.66, on the held-out violence_weapons documents")
    assert heldout_help(row | {"harm_heldout_set": "all"}).endswith("on all held-out harmful documents")
    assert heldout_help({"harm_heldout_auroc": float("nan"), "harm_heldout_set": None}).endswith(
        "not computed for this cache (no held-out documents)"
    )


def test_a_computed_label_from_an_html_peak_token_stays_text(
    cache_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The labels step stores corpus tokens raw; the feature header, the map's hover and the search show them
    as text, never as markup."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from precompute.pipeline.config import RunConfig
    from precompute.pipeline.run import run_step

    payload, f = "<img src=x onerror=f()>", 5  # short enough to be shown whole
    ex = pq.read_table(cache_copy / "examples.parquet")
    rows = ex.to_pylist()
    for r in rows:  # every top example of feature f peaks on the payload
        if r["feature"] == f and r["kind"] == "top":
            r["tokens"][r["max_position"]] = payload
    pq.write_table(pa.Table.from_pylist(rows, schema=ex.schema), cache_copy / "examples.parquet")
    feats = pd.read_parquet(cache_copy / "features.parquet")
    feats.loc[f, "label"] = None  # no imported label: the step computes one
    feats.to_parquet(cache_copy / "features.parquet", index=False)
    run_step("labels", RunConfig.load(None, {"out": str(cache_copy)}))

    c = load_cache(cache_copy)
    label = c.features.loc[f, "label"]
    assert label.startswith(f'"{payload}" (') and c.features.loc[f, "label_source"] == "peak_tokens"
    assert "<img" not in c.features.loc[f, "hover"]
    at = run_page("views/feature.py", cache_copy, monkeypatch, feature=str(f))
    body = html_text(at)
    assert not at.exception and "&lt;img src=x onerror=f()&gt;" in body and "<img" not in body
    at = run_page("views/map.py", cache_copy, monkeypatch)
    at.text_input(key="map_q").input("onerror").run()
    assert not at.exception
    picks = [sb for sb in at.selectbox if sb.label.endswith("matching features")]
    # a selectbox option is plain text in the browser: the label shows literally, as it was written
    assert picks and any(o.startswith(f"#{f} · {label[:70]} · matched label · ") for o in picks[0].options)
