"""Instant clicks on the map page, in real Chromium: a click on a dot or on a neighbour row updates the
side panel and the URL by rerunning only the panel and map fragments (never the whole page), and the URL
it leaves reopens the same view."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.bench_clicks import WsRecorder, isolated_points, map_ready
from explorer.data import load_cache
from tests.explorer.helpers import CHROMIUM, launch_chromium, streamlit_server, wait_for_app

FULL_RUN, FRAGMENT_RUN = 0, 3  # ForwardMsg.script_finished values


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium (or set FEATUREGEOM_CHROMIUM)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60000)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(browser_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("server-map")
    with streamlit_server(browser_cache_dir, reviews=tmp / "reviews.sqlite", log_dir=tmp) as srv:
        yield srv


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    ctx = chromium.new_context(viewport={"width": 1500, "height": 1300})
    pg = ctx.new_page()
    pg.set_default_timeout(60000)
    yield pg
    ctx.close()


def open_map(page: Any, server: Any, feature: int) -> WsRecorder:
    from playwright.sync_api import expect

    rec = WsRecorder(page)
    page.goto(server.url + f"/?feature={feature}")
    wait_for_app(page)
    expect(page.get_by_text(f"Feature #{feature}", exact=True)).to_be_visible()
    map_ready(page)
    return rec


def test_map_click_updates_panel_and_url_without_a_full_rerun(
    server: Any, page: Any, browser_cache_dir: Path
) -> None:
    from playwright.sync_api import expect

    t = load_cache(browser_cache_dir, verify=False).default_feature()
    rec = open_map(page, server, t)
    page.get_by_label("Search features", exact=True).fill("planted")  # state outside the fragments
    page.get_by_label("Search features", exact=True).press("Enter")
    wait_for_app(page)
    pts = isolated_points(page, 1, [t])
    assert pts, "an isolated dot to click"
    h, x, y = pts[0]
    page.mouse.move(x, y)
    page.wait_for_timeout(300)
    rec.reset()
    page.mouse.click(x, y)
    expect(page.get_by_text(f"Feature #{h}", exact=True)).to_be_visible()
    map_ready(page, f"selected #{h}")  # the map follows: the star moved to the clicked dot
    wait_for_app(page)
    assert re.search(rf"[?&]feature={h}\b", page.url), page.url
    assert FRAGMENT_RUN in rec.finished and FULL_RUN not in rec.finished, rec.finished
    assert page.get_by_label("Search features", exact=True).input_value() == "planted"
    # the URL the click left is a deep link to the same view
    page.reload()
    wait_for_app(page)
    expect(page.get_by_text(f"Feature #{h}", exact=True)).to_be_visible()


def test_neighbour_row_click_selects_it(server: Any, page: Any, browser_cache_dir: Path) -> None:
    from playwright.sync_api import expect

    c = load_cache(browser_cache_dir, verify=False)
    t = c.default_feature()
    first = int(c.neighbours_of(t, threshold=c.null_cosine)["feature"].iloc[0])
    rec = open_map(page, server, t)
    grid = page.locator('[data-testid="stDataFrame"]').first
    grid.scroll_into_view_if_needed()
    box = grid.bounding_box()
    rec.reset()
    page.mouse.click(box["x"] + 12, box["y"] + 35 + 17)  # the first row's selection cell, under the header
    expect(page.get_by_text(f"Feature #{first}", exact=True)).to_be_visible()
    wait_for_app(page)
    assert re.search(rf"[?&]feature={first}\b", page.url), page.url
    assert FRAGMENT_RUN in rec.finished and FULL_RUN not in rec.finished, rec.finished
