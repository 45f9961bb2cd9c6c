"""Every page through streamlit.testing.v1.AppTest: good caches, broken caches, URL state, interactions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from explorer.data import load_cache
from explorer.reviews import ReviewStore

APP = str(Path(__file__).resolve().parents[2] / "explorer" / "app.py")
PAGES = ["views/map.py", "views/feature.py", "views/overlaps.py", "views/story.py", "views/finetune.py",
         "views/triage.py"]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FEATUREGEOM_CACHE", raising=False)
    monkeypatch.setenv("FEATUREGEOM_REVIEWS", str(tmp_path / "reviews"))


def run_page(page: str, cache_dir: Path | str | None, monkeypatch: pytest.MonkeyPatch, **params: str) -> AppTest:
    if cache_dir is not None:
        monkeypatch.setenv("FEATUREGEOM_CACHE", str(cache_dir))
    at = AppTest.from_file(APP, default_timeout=60)
    for k, v in params.items():
        at.query_params[k] = v
    at.switch_page(page)
    at.run()
    return at


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
def test_bad_cache_clear_message(page: str, case: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                 request: pytest.FixtureRequest) -> None:
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
    other = int(c.features.index[(c.features["label"].fillna("").str.contains("planted"))
                                 & (c.features["feature"] != t)][0])
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
    # the threshold slider re-filters the neighbour count
    at.slider(key=f"map_thr:{synth_cache.name}").set_value(0.99).run()
    assert any(m.value.startswith("**0 of 32 neighbours**") for m in at.markdown)


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
    cur = store.get(t, h)
    assert cur["verdict"] == "confirmed" and cur["reviewer"] == "Ana Reviewer"
    assert "Current verdict" in html_text(at) and "Ana Reviewer" in html_text(at)
    # a fresh session (a reload) sees the persisted verdict
    again = run_page("views/overlaps.py", synth_cache, monkeypatch, task=str(t), harmful=str(h))
    assert "Ana Reviewer" in html_text(again) and "confirmed" in html_text(again)
    # filters
    again.multiselect(key="ov_status").set_value(["confirmed"]).run()
    assert any(cap.value.startswith("1 of ") for cap in again.caption)


def test_overlaps_requires_name(synth_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = load_cache(synth_cache)
    t, h = c.default_pair()
    at = run_page("views/overlaps.py", synth_cache, monkeypatch, task=str(t), harmful=str(h))
    at.radio(key=f"rev_v:{t}:{h}").set_value("benign")
    next(b for b in at.button if b.label == "Save verdict").click().run()
    assert not at.exception and at.error and "name" in at.error[0].value


def test_story_steps_and_navigation(synth_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = run_page("views/story.py", synth_cache, monkeypatch, step="3")
    assert "Step 3 of 7" in html_text(at) and "A task feature" in html_text(at)
    at.button(key="story_next").click().run()
    assert "Step 4 of 7" in html_text(at) and "closer than chance" in html_text(at)
    assert at.query_params["step"] in ("4", ["4"])
    at.button(key="story_back").click().run()
    assert "Step 3 of 7" in html_text(at)
    for step in ("1", "2", "5", "6", "99", "x"):
        a = run_page("views/story.py", synth_cache, monkeypatch, step=step)
        assert not a.exception and "Step" in html_text(a)
    # the last step, from the cache's fine-tune diffs (tests/explorer/lab_fixture.py)
    a = run_page("views/story.py", synth_cache, monkeypatch, step="7")
    assert not a.exception and "Step 7 of 7" in html_text(a) and "What fine-tuning did" in html_text(a)
    assert "raised the harmful feature nearest the task features by 0.027 (95% CI 0.014 to 0.04)" in html_text(a)
    assert len(a.get("plotly_chart")) == 1


def test_story_without_finetune_keeps_six_steps(cache_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.rmtree(cache_copy / "finetune")
    at = run_page("views/story.py", cache_copy, monkeypatch, step="99")
    assert not at.exception and "Step 6 of 6" in html_text(at) and "What fine-tuning would do" in html_text(at)


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
