"""End-to-end tests in a real browser: Debian chromium driven by Playwright against `streamlit run`.

The cache comes from the `browser_cache_dir` fixture (synthetic by default; FEATUREGEOM_TEST_CACHE or
a conftest override swaps in a real one). Screenshots of every page land in bench/out/screenshots/.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bench.bench_clicks import isolated_points
from explorer.data import load_cache
from explorer.reviews import ReviewStore
from tests.explorer.helpers import CHROMIUM, REPO, download, launch_chromium, streamlit_server, wait_for_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SHOTS = REPO / "bench" / "out" / "screenshots"
PAYLOADS = [
    "<script>window.__xss=1</script>",
    '<img src=x onerror="window.__xss=1">',
    "[click](javascript:window.__xss=1)",
]


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium (or set FEATUREGEOM_CHROMIUM)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30000)  # the CI box is small and shared: be patient, not flaky
    with sync_playwright() as p:
        browser = launch_chromium(p)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(browser_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("server")
    with streamlit_server(browser_cache_dir, reviews=tmp / "reviews.sqlite", log_dir=tmp) as srv:
        srv.reviews = tmp / "reviews.sqlite"  # type: ignore[attr-defined]
        srv.cache_name = browser_cache_dir.name  # type: ignore[attr-defined]
        yield srv


@pytest.fixture(scope="module")
def pair(browser_cache_dir: Path) -> tuple[int, int]:
    """A flagged pair that is not the default one, so selecting it really changes the view."""
    c = load_cache(browser_cache_dir)
    ov = c.overlaps
    if len(ov) > 1:
        r = ov.sort_values("risk", ascending=False).iloc[1]
        return int(r["task_feature"]), int(r["harmful_feature"])
    p = c.default_pair()
    assert p is not None, "the browser tests need a cache with at least one task↔harmful pair"
    return p


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    ctx = chromium.new_context(viewport={"width": 1500, "height": 1300})
    pg = ctx.new_page()
    pg.set_default_timeout(45000)
    yield pg
    ctx.close()


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(600)  # let plotly finish drawing
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def visible_text(page: Any, text: str) -> Any:
    """The first visible element with this text (data grids keep hidden copies of their cells)."""
    return page.get_by_text(text).filter(visible=True).first


def plot_traces(page: Any, index: int = 0) -> list[str]:
    return page.evaluate(
        "(i) => { const gd = document.querySelectorAll('.js-plotly-plot')[i];"
        " return gd && gd.data ? gd.data.map(t => t.name || '') : []; }",
        index,
    )


def edge_ends(page: Any) -> dict[int, bool]:
    """{neighbour id: harmful} of the lines drawn from the selection on the map."""
    pairs = page.evaluate(
        """() => { const gd = document.querySelector('.js-plotly-plot'); const out = [];
            for (const t of gd._fullData) if ((t.name || '').startsWith('edges'))
                for (const j of Array.from(t.customdata || [])) if (j !== null && j !== undefined)
                    out.push([j, t.name.includes('harmful')]);
            return out; }"""
    )
    return {int(j): bool(h) for j, h in pairs}


def test_map_search_highlights_neighbours(
    server: Any, page: Any, pair: tuple[int, int], browser_cache_dir: Path
) -> None:
    from playwright.sync_api import expect

    t, h = pair
    page.goto(server.url + "/")
    wait_for_app(page)
    expect(page.get_by_role("heading", name="Map of features")).to_be_visible()
    expect(page.locator(".js-plotly-plot").first).to_be_visible()
    search = page.get_by_label("Search features", exact=True)
    search.fill(str(t))
    search.press("Enter")
    expect(page.get_by_text(f"Feature #{t}", exact=True)).to_be_visible()
    wait_for_app(page)
    expect(page).to_have_url(re.compile(rf"[?&]feature={t}\b"))  # retried: the URL follows the run
    names = plot_traces(page)
    assert f"selected #{t}" in names, names
    expect(page.get_by_text(re.compile(r"\d+ of \d+ neighbours"))).to_be_visible()
    c = load_cache(browser_cache_dir, verify=False)
    above = c.neighbours_of(t, threshold=c.null_cosine)  # the slider starts at the null threshold
    ends = edge_ends(page)
    for j in above["feature"]:
        assert int(j) in ends, f"a line joins #{t} to its neighbour #{j}"
    harmful = above[above["is_harmful"]]
    if len(harmful):
        assert "harmful neighbour" in names
        expect(page.locator(".legendtext", has_text="harmful neighbour")).to_be_visible()
        first = int(harmful["feature"].iloc[0])
        expect(page.get_by_text(f"Closest harmful neighbour #{first}", exact=False)).to_be_visible()
        assert ends[first], "lines to harmful neighbours are drawn red"
    shot(page, "map")


def test_map_click_selects_feature(server: Any, page: Any, pair: tuple[int, int]) -> None:
    from playwright.sync_api import expect

    t, _ = pair
    page.goto(server.url + f"/?feature={t}")
    wait_for_app(page)
    expect(page.get_by_text(f"Feature #{t}", exact=True)).to_be_visible()
    page.wait_for_function(
        "() => { const gd = document.querySelector('.st-key-map_chart .js-plotly-plot');"
        " return !!(gd && gd.data && gd._fullLayout && gd._fullLayout.xaxis); }"
    )
    page.wait_for_timeout(500)
    # a dot of the points layer (the one the reader clicks) with no other drawn near it, from plotly's axes
    target, x, y = isolated_points(page, 1, [t])[0]
    h = int(target)
    xy = (x, y)
    page.mouse.move(xy[0], xy[1])
    page.wait_for_timeout(300)
    page.mouse.click(xy[0], xy[1])
    expect(page.get_by_text(f"Feature #{h}", exact=True)).to_be_visible(timeout=20000)
    wait_for_app(page)
    expect(page).to_have_url(re.compile(rf"[?&]feature={h}\b"))  # retried: the URL follows the run


def test_open_examples(server: Any, page: Any, pair: tuple[int, int]) -> None:
    from playwright.sync_api import expect

    t, _ = pair
    page.goto(server.url + f"/?feature={t}")
    wait_for_app(page)
    page.get_by_role("link", name=re.compile(rf"Open feature #{t}")).click()
    expect(page.get_by_role("heading", name="Top-activating examples")).to_be_visible()
    wait_for_app(page)
    assert "/feature" in page.url and f"feature={t}" in page.url
    tokens = page.locator('span[title^="activation "]')
    assert tokens.count() > 10
    expect(page.get_by_role("heading", name="Nearest neighbours in decoder space")).to_be_visible()
    assert len(page.locator(".js-plotly-plot").all()) >= 1
    shot(page, "feature")


def test_compare_side_by_side(server: Any, page: Any, pair: tuple[int, int]) -> None:
    from playwright.sync_api import expect

    t, h = pair
    page.goto(server.url + f"/feature?feature={t}&compare={h}")
    wait_for_app(page)
    expect(page.get_by_role("heading", name=f"Side by side: #{t} and #{h}")).to_be_visible()
    expect(page.get_by_text(f"Feature #{h}", exact=True)).to_be_visible()
    shot(page, "compare")


def test_record_verdict_persists(server: Any, page: Any, pair: tuple[int, int]) -> None:
    from playwright.sync_api import expect

    t, h = pair
    page.goto(server.url + f"/overlaps?task={t}&harmful={h}")
    wait_for_app(page)
    expect(page.get_by_role("heading", name=f"Task #{t} ↔ harmful #{h}")).to_be_visible()
    page.get_by_label("Your name", exact=True).fill("Rita Reviewer")
    page.locator('[data-testid="stRadio"]').get_by_text("confirmed", exact=True).click()
    page.get_by_label("Note", exact=True).fill("Both fire on shell commands; the harmful one on threats.")
    page.get_by_role("button", name="Save verdict").click()
    verdict_block = verdicts_block(page)
    expect(verdict_block).to_contain_text("Consensus: single reviewer")
    expect(verdict_block).to_contain_text(re.compile(r"confirmed\s*Rita Reviewer at 20\d\d-"))
    wait_for_app(page)
    shot(page, "overlaps")
    page.reload()
    wait_for_app(page)
    expect(verdicts_block(page)).to_contain_text(re.compile(r"confirmed\s*Rita Reviewer at 20\d\d-"))
    cur = ReviewStore(server.reviews).get(t, h, "Rita Reviewer", cache=server.cache_name)
    assert (
        cur["verdict"] == "confirmed"
        and cur["note"] == "Both fire on shell commands; the harmful one on threats."
    )


def verdicts_block(page: Any) -> Any:
    """The list of a pair's verdicts, one line per reviewer under a consensus line."""
    return page.locator('[data-testid="stHtml"]').filter(has_text="Consensus:")


def save_verdict(page: Any, verdict: str, note: str, name: str | None = None) -> None:
    from playwright.sync_api import expect

    if name is not None:
        page.get_by_label("Your name", exact=True).fill(name)
    page.locator('[data-testid="stRadio"]').get_by_text(verdict, exact=True).click()
    page.get_by_label("Note", exact=True).fill(note)
    page.get_by_role("button", name="Save verdict").click()
    expect(page.locator('[data-testid="stApp"][data-test-script-state="running"]')).to_have_count(0)
    wait_for_app(page)


def test_two_reviewers_never_overwrite_each_other(
    server: Any, chromium: Any, browser_cache_dir: Path, tmp_path: Path
) -> None:
    """Ana and Ben open the same pair; Ana saves first. Ben's save, made on a page that never showed Ana's
    verdict, is refused with hers shown; his next save stands beside it; Ana's open page learns of it."""
    from playwright.sync_api import expect

    ov = load_cache(browser_cache_dir).overlaps.sort_values("risk", ascending=False)
    if len(ov) < 3:
        pytest.skip("needs a third flagged pair (the others are used by other tests)")
    t, h = int(ov.iloc[2]["task_feature"]), int(ov.iloc[2]["harmful_feature"])
    store = ReviewStore(server.reviews)
    assert store.verdicts(server.cache_name, t, h).empty
    url = server.url + f"/overlaps?task={t}&harmful={h}"
    ctx_a = chromium.new_context(viewport={"width": 1500, "height": 1300}, accept_downloads=True)
    ctx_b = chromium.new_context(viewport={"width": 1500, "height": 1300})
    ana, ben = ctx_a.new_page(), ctx_b.new_page()
    for pg in (ana, ben):
        pg.set_default_timeout(45000)
        pg.goto(url)
        wait_for_app(pg)
        expect(pg.get_by_text("No verdict yet for this pair.")).to_be_visible()

    save_verdict(ana, "confirmed", "Shell commands next to threats.", name="Ana")
    expect(verdicts_block(ana)).to_contain_text(re.compile(r"confirmed\s*Ana at 20\d\d-"))

    save_verdict(ben, "benign", "Only harmless code.", name="Ben")
    refusal = ben.get_by_text(
        re.compile(r"Not saved: this pair changed after the page showed it \(Ana: confirmed at")
    )
    expect(refusal).to_be_visible()
    expect(verdicts_block(ben)).to_contain_text(
        re.compile(r"confirmed\s*Ana at 20\d\d-")
    )  # her verdict, shown
    expect(ben.get_by_label("Note", exact=True)).to_have_value("Only harmless code.")  # his text is kept
    got = store.verdicts(server.cache_name, t, h)
    assert list(zip(got["reviewer"], got["verdict"], strict=True)) == [("Ana", "confirmed")]
    assert len(store.history(server.cache_name, t, h)) == 1
    shot(ben, "overlaps-refused")

    ben.get_by_role("button", name="Save verdict").click()  # having seen Ana's verdict
    expect(verdicts_block(ben)).to_contain_text("Consensus: 2 reviewers disagree")
    got = store.verdicts(server.cache_name, t, h)
    assert sorted(zip(got["reviewer"], got["verdict"], strict=True)) == [
        ("Ana", "confirmed"),
        ("Ben", "benign"),
    ]

    # Ana's page, untouched since her save, says that Ben saved (it checks every 5 s)
    expect(
        ana.get_by_text(re.compile(r"Saved on this pair after the page was drawn: Ben: benign at 20\d\d-"))
    ).to_be_visible(timeout=30000)
    ana.get_by_role("button", name="Show the latest verdicts").click()
    expect(verdicts_block(ana)).to_contain_text("Consensus: 2 reviewers disagree")
    expect(verdicts_block(ana)).to_contain_text(re.compile(r"benign\s*Ben at 20\d\d-"))

    # her name survives a reload (?reviewer=), with her own verdict preselected
    assert re.search(r"[?&]reviewer=Ana(&|$)", ana.url), ana.url
    ana.reload()
    wait_for_app(ana)
    expect(ana.get_by_label("Your name", exact=True)).to_have_value("Ana")
    expect(ana.get_by_role("radio", name="confirmed", exact=True)).to_be_checked()
    save_verdict(ana, "needs-more-evidence", "Second look: unsure.")
    expect(verdicts_block(ana)).to_contain_text(re.compile(r"needs-more-evidence\s*Ana at 20\d\d-"))
    assert store.get(t, h, "Ana", cache=server.cache_name)["n_changes"] == 2

    # the exports hold every save of every reviewer
    expected = store.history(server.cache_name).sort_values("id")
    download(ana, "Export history CSV", tmp_path / "history.csv")
    csv = pd.read_csv(tmp_path / "history.csv")
    assert list(csv["history_id"]) == list(expected["id"])
    mine = csv[(csv["task_feature"] == t) & (csv["harmful_feature"] == h)]
    assert list(zip(mine["reviewer"], mine["verdict"], mine["note"], strict=True)) == [
        ("Ana", "confirmed", "Shell commands next to threats."),
        ("Ben", "benign", "Only harmless code."),
        ("Ana", "needs-more-evidence", "Second look: unsure."),
    ]
    download(ana, "Export JSON", tmp_path / "reviews.json")
    doc = json.loads((tmp_path / "reviews.json").read_text())
    assert [r["history_id"] for r in doc["history"]] == list(expected["id"])
    row = next(p for p in doc["pairs"] if (p["task_feature"], p["harmful_feature"]) == (t, h))
    assert (row["status"], row["consensus"], row["reviewers"]) == (
        "disputed",
        "disagree",
        "Ana: needs-more-evidence · Ben: benign",
    )
    ctx_a.close()
    ctx_b.close()


def test_story_steps_have_urls(server: Any, page: Any, pair: tuple[int, int]) -> None:
    from playwright.sync_api import expect

    t, h = pair
    page.goto(server.url + f"/story?task={t}&harmful={h}&step=4")
    wait_for_app(page)
    expect(page.get_by_text(re.compile(r"^Step 4 of \d+$"))).to_be_visible()
    expect(page.get_by_text("Its harmful neighbour is closer than chance")).to_be_visible()
    assert not page.locator('[data-testid="stSidebar"]').is_visible()
    shot(page, "story")
    # as drawn: Streamlit adds each button's shortcut key (an arrow) to its label; one arrow each, not two
    drawn = {k: page.locator(f".st-key-story_{k} button").inner_text() for k in ("back", "next")}
    assert [drawn["back"].count("←"), drawn["next"].count("→")] == [1, 1], drawn
    assert "→" not in drawn["back"] and "←" not in drawn["next"], drawn
    page.get_by_role("button", name=re.compile(r"^Next\b")).click()
    expect(page.get_by_text(re.compile(r"^Step 5 of \d+$"))).to_be_visible()
    wait_for_app(page)
    assert "step=5" in page.url
    page.get_by_role("button", name=re.compile(r"^Back\b")).click()
    expect(page.get_by_text(re.compile(r"^Step 4 of \d+$"))).to_be_visible()


def test_story_keys_navigate(server: Any, page: Any) -> None:
    """A presenter's clicker: Right/PageDown/Space go forward, Left/PageUp back; keys typed into an input
    on the page (the pair picker's search box; a plain text box on a cache without pairs) do not move it."""
    from playwright.sync_api import expect

    page.goto(server.url + "/story?step=2")  # the default pair's story, or the result story without one
    wait_for_app(page)

    def at(step: int) -> None:
        expect(page.get_by_text(re.compile(rf"^Step {step} of \d+$"))).to_be_visible()
        wait_for_app(page)
        expect(page).to_have_url(re.compile(rf"[?&]step={step}\b"))  # retried: the URL follows the run

    at(2)
    page.locator(".story-title").click()  # focus the page, as a presenter's first click does
    for key, step in [("ArrowRight", 3), ("ArrowLeft", 2), ("PageDown", 3), ("Space", 4), ("PageUp", 3)]:
        page.keyboard.press(key)
        at(step)
    page.get_by_role(
        "button", name=re.compile(r"^Next\b")
    ).click()  # Space on the focused button moves one step, not two
    at(4)
    page.keyboard.press("Space")
    at(5)
    page.get_by_text("Presenter settings").click()
    picker = page.get_by_role("combobox").filter(visible=True)
    if not picker.count():  # no flagged pair, no picker: any text box on the page must behave the same
        page.evaluate("document.querySelector('.story-title').after(document.createElement('input'))")
        picker = page.locator(".story-title + input")
    picker = picker.first
    picker.click()
    expect(picker).to_be_focused()  # the keys below go to a real input
    for key in ["ArrowRight", "ArrowLeft", "PageDown", "Space", "PageUp"]:
        picker.press(key)
    picker.press_sequentially("12 ")
    page.wait_for_timeout(1500)  # time for a (wrong) rerun to start
    at(5)


# ---------------------------------------------------------------------------------------------------
# XSS: cache text with <script>, <img onerror> and javascript: links must show literally and never run


@pytest.fixture(scope="module")
def xss_server(xss_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("xss-server")
    with streamlit_server(xss_cache, reviews=tmp / "reviews.sqlite", log_dir=tmp) as srv:
        yield srv


def _assert_inert(page: Any, dialogs: list[str]) -> None:
    assert page.evaluate("() => typeof window.__xss") == "undefined"
    assert dialogs == []
    assert page.locator('img[src="x"]').count() == 0
    assert page.locator('a[href^="javascript:"]').count() == 0
    # no script element carries a payload as code (figure JSON may hold it as an escaped string)
    assert (
        page.evaluate(
            """() => Array.from(document.scripts).filter(s => s.textContent.trim().startsWith('window.__xss')
              || s.textContent.includes('<script>window.__xss') || s.textContent.includes('onerror="window')
              ).length"""
        )
        == 0
    )


def test_xss_payloads_are_inert_and_literal(
    xss_server: Any, xss_cache: Path, chromium: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    c = load_cache(xss_cache)
    t, h = c.default_pair()
    assert PAYLOADS[0] in c.row(t)["label"]
    ctx = chromium.new_context(viewport={"width": 1500, "height": 1300}, accept_downloads=True)
    page = ctx.new_page()
    page.set_default_timeout(45000)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    urls = [
        f"/?feature={t}",
        f"/feature?feature={t}",
        f"/feature?feature={t}&compare={h}",
        f"/overlaps?task={t}&harmful={h}",
        f"/story?task={t}&harmful={h}&step=1",
        f"/story?task={t}&harmful={h}&step=3",
        f"/story?task={t}&harmful={h}&step=5",
    ]
    for url in urls:
        page.goto(xss_server.url + url)
        wait_for_app(page)
        page.wait_for_timeout(500)
        expect(visible_text(page, PAYLOADS[0])).to_be_visible()
        if "/feature" in url or "/overlaps" in url or "step=5" in url:
            expect(visible_text(page, PAYLOADS[1])).to_be_visible()
            expect(visible_text(page, PAYLOADS[2])).to_be_visible()
        _assert_inert(page, dialogs)
    shot(page, "xss-story")
    page.goto(xss_server.url + f"/feature?feature={t}")
    wait_for_app(page)
    shot(page, "xss-feature")
    # search results list the label literally
    page.goto(xss_server.url + "/")
    wait_for_app(page)
    search = page.get_by_label("Search features", exact=True)
    search.fill("window.__xss")
    search.press("Enter")
    wait_for_app(page)
    expect(page.get_by_text(re.compile(r"matching features"))).to_be_visible()
    _assert_inert(page, dialogs)
    # the exported story opens offline, draws its figures, and stays inert
    page.goto(xss_server.url + f"/story?task={t}&harmful={h}&step=1")
    wait_for_app(page)
    page.get_by_text("Presenter settings").click()
    with page.expect_download() as dl:
        page.get_by_role("button", name=re.compile("Download the whole story")).click()
    out = tmp_path / "story.html"
    dl.value.save_as(out)
    ctx.close()
    off = chromium.new_context(offline=True)
    p2 = off.new_page()
    d2: list[str] = []
    p2.on("dialog", lambda d: (d2.append(d.message), d.dismiss()))
    requests: list[str] = []
    p2.on("request", lambda r: requests.append(r.url))
    p2.goto(out.as_uri())
    p2.wait_for_function(
        "() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= 4", timeout=30000
    )
    expect(visible_text(p2, PAYLOADS[0])).to_be_visible()
    _assert_inert(p2, d2)
    assert all(u.startswith(("file:", "data:", "blob:", "about:")) for u in requests), requests
    off.close()


def test_lab_pages(server: Any, page: Any, browser_cache_dir: Path) -> None:
    """Fine-tune diff and Dataset triage open from their URLs and draw (the fixture cache holds results)."""
    from playwright.sync_api import expect

    if not (browser_cache_dir / "finetune").is_dir() or not (browser_cache_dir / "triage").is_dir():
        pytest.skip("the browser cache holds no finetune/ or triage/ results")
    # A sub-page URL as the first request gets the full app (top navigation), not a page run on its own
    # (Streamlit's legacy mode for a folder named pages/, which is why the pages live in explorer/views/).
    page.goto(server.url + "/finetune")
    wait_for_app(page)
    expect(page.get_by_role("heading", name="Fine-tune diff")).to_be_visible()
    expect(page.get_by_role("link", name="Dataset triage")).to_be_visible()
    expect(page.get_by_role("link", name="Map")).to_be_visible()
    expect(page.locator(".js-plotly-plot").first).to_be_visible()
    expect(visible_text(page, "Harmful features, largest change first")).to_be_visible()
    assert "run=" in page.url and "measure=" in page.url
    shot(page, "finetune")
    page.goto(server.url + "/triage")
    wait_for_app(page)
    expect(page.get_by_role("heading", name="Dataset triage")).to_be_visible()
    # the planted token shows literally in the highlighted sample and never runs
    expect(page.locator('span[title^="score "]').filter(has_text="<script>alert(1)</script>")).to_be_visible()
    assert (
        page.evaluate("() => Array.from(document.scripts).some(s => s.textContent.includes('alert(1)'))")
        is False
    )
    assert "sample=1" in page.url
    shot(page, "triage")
