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
    expect(page).to_have_url(re.compile(rf"[?&]feature={h}\b"))  # retried: the URL follows the run
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
    expect(page).to_have_url(re.compile(rf"[?&]feature={first}\b"))  # retried: the URL follows the run
    assert FRAGMENT_RUN in rec.finished and FULL_RUN not in rec.finished, rec.finished


SELECTION_TRACES = ("harmful neighbour", "task and harmful neighbour", "other neighbour")


def _dot(page: Any, feature: int) -> tuple[float, float]:
    """Page coordinates of `feature`'s dot on the base map."""
    xy = page.evaluate(
        """(f) => { const gd = document.querySelector('.st-key-map_chart .js-plotly-plot');
          const L = gd._fullLayout, r = gd.getBoundingClientRect();
          for (const t of gd._fullData) {
            const i = t.customdata ? Array.from(t.customdata).indexOf(f) : -1;
            if (i >= 0) return [r.left + L._size.l + L.xaxis.l2p(t.x[i]), r.top + L._size.t + L.yaxis.l2p(t.y[i])];
          }
          return null; }""",
        feature,
    )
    assert xy, f"#{feature} is drawn"
    return float(xy[0]), float(xy[1])


def _geometry(page: Any) -> list[Any]:
    """Plot area and axis ranges of the map's three layers (colours, overlay, points), as plotly drew them."""
    return page.evaluate(
        """() => [...document.querySelectorAll('.js-plotly-plot')].map(g => {
            const L = g._fullLayout, s = L._size;
            return [s.l, s.t, s.w, s.h, L.xaxis.range.map(v => +v.toFixed(6)), L.yaxis.range.map(v => +v.toFixed(6))];
        })"""
    )


def test_click_resends_only_the_selection_layer(server: Any, page: Any, browser_cache_dir: Path) -> None:
    """A click sends the selection overlay and references to the colours and the points the browser already
    holds (Streamlit's message cache): the points are not sent again, and what is sent is a small fraction
    of them. The three layers share one plot area and axes, also after a pan."""
    from playwright.sync_api import expect

    t = load_cache(browser_cache_dir, verify=False).default_feature()
    rec = open_map(page, server, t)
    wait_for_app(page)
    base_size = sum(size for names, size in rec.charts if "harm score" in names or "features" in names)
    seen = [t]
    for _ in range(2):
        h, x, y = isolated_points(page, 1, seen)[0]
        seen.append(h)
        page.mouse.move(x, y)
        page.wait_for_timeout(300)
        rec.reset()
        page.mouse.click(x, y)
        expect(page.get_by_text(f"Feature #{h}", exact=True)).to_be_visible()
        map_ready(page, f"selected #{h}")
        wait_for_app(page)
        sent = [n for names, _ in rec.charts for n in names]
        assert f"selected #{h}" in sent, rec.charts
        extra = {n for n in sent if n != f"selected #{h}" and n not in SELECTION_TRACES}
        assert all(n.startswith("edges ") for n in extra), f"only the selection is sent: {rec.charts}"
        assert rec.refs >= 2, "the colours and the points are sent as references to the cached ones"
        assert rec.bytes < base_size / 3, (rec.bytes, base_size)  # before: the whole figure, > base_size
    page.wait_for_timeout(600)
    geo = _geometry(page)
    assert len(geo) == 3 and geo[0] == geo[1] == geo[2], geo
    # pan the base: the overlay follows
    gx, gy = _dot(page, seen[-1])
    page.mouse.move(gx + 40, gy + 40)
    page.mouse.down()
    page.mouse.move(gx + 120, gy + 90, steps=6)
    page.mouse.up()
    page.wait_for_timeout(800)
    moved = _geometry(page)
    assert moved[0] != geo[0] and moved[0] == moved[1] == moved[2], moved
    # select another feature outside the map (search), then click the earlier dot again: it is selected
    # (the base chart keeps its own selection state between reruns, so the old value must not mask it)
    box = page.get_by_label("Search features", exact=True)
    box.fill(str(t))
    box.press("Enter")
    expect(page.get_by_text(f"Feature #{t}", exact=True)).to_be_visible()
    wait_for_app(page)
    x, y = _dot(page, seen[-1])
    page.mouse.move(x, y)
    page.wait_for_timeout(300)
    page.mouse.click(x, y)
    expect(page.get_by_text(f"Feature #{seen[-1]}", exact=True)).to_be_visible()


def _star(page: Any) -> tuple[int, list[float], tuple[int, int, int]]:
    """The selected feature on the overlay: its id, its centre in chart pixels and its colour (RGB)."""
    fid, xy, color = page.evaluate(
        """() => { const o = document.querySelector('.st-key-map_overlay .js-plotly-plot');
          const t = o.data.find(t => String(t.name).startsWith('selected #')), L = o._fullLayout;
          return [t.customdata[0], [L._size.l + L.xaxis.l2p(t.x[0]), L._size.t + L.yaxis.l2p(t.y[0])], t.marker.color]; }"""
    )
    h = str(color).lstrip("#")
    return int(fid), xy, (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))


def _count_colour(png: bytes, rgb: tuple[int, int, int]) -> int:
    import io

    import numpy as np
    from PIL import Image

    px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return int((np.abs(px - np.array(rgb)).max(axis=2) <= 12).sum())


def test_camera_button_saves_the_map_with_its_selection(
    server: Any, page: Any, browser_cache_dir: Path, tmp_path: Path
) -> None:
    """The base chart's camera button saves what the reader sees: the base with the selection overlay drawn
    over it (the star, in its colour, where the page draws it), titled with the selection and named after it;
    the base alone (what plotly's own button saved) lacks the star. In SVG, the overlay's <svg> over the base's."""
    import base64
    import io

    from PIL import Image

    t = load_cache(browser_cache_dir, verify=False).default_feature()
    open_map(page, server, t)
    wait_for_app(page)
    fid, (sx, sy), rgb = _star(page)
    assert fid == t
    base_only = page.evaluate(
        """async () => { const b = document.querySelector('.st-key-map_colours .js-plotly-plot'), L = b._fullLayout;
          return await window.Plotly.toImage(b, {format: 'png', width: L.width, height: L.height, scale: 2}); }"""
    )
    base_png = base64.b64decode(base_only.split(",", 1)[1])
    chart = page.locator(".st-key-map_chart .js-plotly-plot")
    chart.hover()
    with page.expect_download(timeout=60000) as dl:
        chart.locator(".modebar-btn[data-title^='Download plot']").click()
    assert dl.value.suggested_filename == f"feature-{t}-map.png"
    saved = tmp_path / dl.value.suggested_filename
    dl.value.save_as(saved)
    png = saved.read_bytes()
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.size == Image.open(io.BytesIO(base_png)).size  # the base's size, at the button's 2x scale
    assert img.getpixel((round(sx * 2), round(sy * 2))) == pytest.approx(rgb, abs=12), (
        "the star where it is drawn"
    )
    # the star (24 px across, ~150 px² at 1x, ~600 at 2x) is in the saved image, not in the base alone
    assert _count_colour(png, rgb) - _count_colour(base_png, rgb) > 300
    # SVG: the sidebar's format; the saved file nests the overlay's svg over the base's, under the selection title
    page.get_by_role("radio", name="svg").dispatch_event("click")
    wait_for_app(page)
    map_ready(page, f"selected #{t}")
    # plotly takes the new config after Streamlit's run has ended (a loaded machine shows the lag), and the
    # button saves in the format of the chart's config at the click
    page.wait_for_function(
        """() => { const b = document.querySelector('.st-key-map_chart .js-plotly-plot');
          return !!b && (b._context.toImageButtonOptions || {}).format === 'svg'; }""",
        timeout=60000,
    )
    chart = page.locator(".st-key-map_chart .js-plotly-plot")
    chart.hover()
    with page.expect_download(timeout=60000) as dl:
        chart.locator(".modebar-btn[data-title^='Download plot']").click()
    assert dl.value.suggested_filename == f"feature-{t}-map.svg"
    dl.value.save_as(tmp_path / "map.svg")
    svg = (tmp_path / "map.svg").read_text()
    assert svg.count("<svg") == 3  # the file's own root, the base and the overlay
    assert f"feature #{t} selected with its neighbours at cosine" in svg
    assert f">selected #{t}<" in svg  # the overlay's legend


def test_hover_shows_the_features_hover_text(server: Any, page: Any, browser_cache_dir: Path) -> None:
    """The base's hover label, rebuilt by its template from the id, text and hovertext (what a colour change
    sends), reads as the cache's hover text: id, label, scores, top tokens."""
    import html

    c = load_cache(browser_cache_dir, verify=False)
    t = c.default_feature()
    open_map(page, server, t)
    wait_for_app(page)
    h, x, y = isolated_points(page, 1, [t])[0]
    page.mouse.move(x, y)
    label = page.locator(".st-key-map_chart .hoverlayer .hovertext")
    label.wait_for()
    want = html.unescape(str(c.features.loc[h, "hover"]).replace("<br>", ""))
    assert want.startswith(f"#{h} ") and label.text_content() == want


def test_colour_change_resends_the_colours_not_the_points(
    server: Any, page: Any, browser_cache_dir: Path
) -> None:
    """A new colouring sends the colours layer (and the overlay) in full and the points, with their hover text,
    as a reference to the ones the browser holds; the three layers keep one plot area, the one they had."""
    from playwright.sync_api import expect

    t = load_cache(browser_cache_dir, verify=False).default_feature()
    rec = open_map(page, server, t)
    wait_for_app(page)
    points_size = max(size for names, size in rec.charts if names == ["features"])
    before = _geometry(page)
    rec.reset()
    page.get_by_label("Colour by").click()
    page.get_by_role("option", name="harm category", exact=True).click()
    map_ready(page, "no harm category")
    wait_for_app(page)
    sent = [names for names, _ in rec.charts]
    assert any("no harm category" in names for names in sent), sent
    assert ["features"] not in sent and rec.refs >= 1, (sent, rec.refs)
    assert rec.bytes < points_size / 2, (rec.bytes, points_size)
    page.wait_for_timeout(800)
    geo = _geometry(page)
    assert geo[0] == geo[1] == geo[2] == before[0], (before, geo)
    expect(page.get_by_text(f"Feature #{t}", exact=True)).to_be_visible()
