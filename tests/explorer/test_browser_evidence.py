"""The feature page's evidence filter in real Chromium: 'harmful documents only' shows the harmful feature's
examples on harmful documents (the URL keeps the filter), an example's link opens its whole document,
and a document carrying `<img onerror>` / `<script>` stays text."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from explorer.data import evidence as E
from explorer.data import load_cache
from tests.explorer.helpers import CHROMIUM, launch_chromium, streamlit_server, wait_for_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(xss_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("server-evidence")
    with streamlit_server(xss_cache, reviews=tmp / "reviews.sqlite", log_dir=tmp) as srv:
        yield srv


@pytest.fixture(scope="module")
def page(server: Any) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium (or set FEATUREGEOM_CHROMIUM)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30000)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        pg = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
        pg.set_default_timeout(45000)
        yield pg
        browser.close()


def test_harmful_documents_only_then_the_whole_document(server: Any, page: Any, xss_cache: Path) -> None:
    from playwright.sync_api import expect

    c = load_cache(xss_cache)
    _, h = c.default_pair()
    expect_rows = E.group_examples(c.examples_of(h), "harmful").examples
    assert expect_rows
    page.goto(server.url + f"/feature?feature={h}")
    wait_for_app(page)
    page.get_by_label("Documents", exact=True).click()
    page.get_by_role("option", name="harmful documents only").click()
    wait_for_app(page)
    expect(page).to_have_url(re.compile(r"[?&]group=harmful"))  # retried: the URL follows the run
    expect(page.get_by_text("#1 on harmful").first).to_be_visible()
    shown = [int(x) for x in re.findall(r"· doc (\d+)", page.locator("body").inner_text())][
        : len(expect_rows)
    ]
    assert shown == [e["doc_id"] for e in expect_rows[:8]][: len(shown)] and shown

    first = expect_rows[0]
    page.locator(f'a[data-doc-link="{first["doc_id"]}"]').first.click()
    wait_for_app(page)
    panel = page.locator(f'[data-document="{first["doc_id"]}"]')
    expect(panel).to_be_visible()
    expect(page).to_have_url(re.compile(rf"[?&]doc={first['doc_id']}"))  # retried: the URL follows the run

    # a document whose text is an <img onerror> / <script> payload is shown as text and runs nothing
    docs = c.documents
    hostile = int(docs.index[docs["text"].str.contains("onerror", regex=False).fillna(False)][0])
    page.goto(server.url + f"/feature?feature={h}&doc={hostile}")
    wait_for_app(page)
    panel = page.locator(f'[data-document="{hostile}"]')
    expect(panel).to_contain_text('<img src=x onerror="window.__xss=1">')
    assert panel.locator("img").count() == 0 and panel.locator("script").count() == 0
    assert page.evaluate("() => window.__xss") is None
    page.get_by_role("button", name="Close the document").click()
    wait_for_app(page)
    expect(page.locator("[data-document]")).to_have_count(0)


def test_a_harm_category_shows_its_own_top_first(server: Any, page: Any, xss_cache: Path) -> None:
    """harmful · one category (from the URL, as a shared link would open it): the category's exact top
    leads, headed '#1 on harmful · CATEGORY', and the caption says it is ranked on that category."""
    from playwright.sync_api import expect

    c = load_cache(xss_cache)
    _, h = c.default_pair()
    tops = [e for e in c.examples_of(h) if e["kind"] == E.CATEGORY_TOP and e["group"] == "harmful"]
    assert tops  # the synthetic cache writes category tops as the harvest does
    cat = sorted({e["category"] for e in tops})[0]
    expect_rows = E.group_examples(c.examples_of(h), "harmful", cat).examples
    assert expect_rows[0]["kind"] == E.CATEGORY_TOP
    page.goto(server.url + f"/feature?feature={h}&group=harmful&category={cat}")
    wait_for_app(page)
    expect(page.get_by_text(f"#1 on harmful · {cat}").first).to_be_visible()
    expect(page.get_by_text("ranked on those documents' tokens only").first).to_be_visible()
    shown = [int(x) for x in re.findall(r"· doc (\d+)", page.locator("body").inner_text())]
    assert shown[: len(expect_rows)] == [e["doc_id"] for e in expect_rows][: len(shown)] and shown
