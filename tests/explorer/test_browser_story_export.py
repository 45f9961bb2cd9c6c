"""The offline story export in real Chromium: each chart's camera button saves a PNG under the name of the
feature(s) it shows, drawn with the title that says what it shows (Debian chromium via Playwright, no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from explorer.data import load_cache
from explorer.story import story_html, story_steps, story_title
from tests.explorer.helpers import CHROMIUM, launch_chromium

PNG = b"\x89PNG\r\n\x1a\n"


def test_exported_story_charts_download_titled_pngs(synth_cache: Path, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium (or set FEATUREGEOM_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    c = load_cache(synth_cache)
    pair = c.default_pair()
    steps = story_steps(c, pair)
    out = tmp_path / "story.html"
    out.write_text(story_html(steps, story_title(c, pair)), encoding="utf-8")
    figures = [(i, s) for i, s in enumerate(steps, 1) if s.figure is not None]
    checked = [figures[0], figures[2]]  # the map (feature-N-map) and the pair's cosine against chance
    with sync_playwright() as p:
        browser = launch_chromium(p)
        ctx = browser.new_context(offline=True, accept_downloads=True)
        page = ctx.new_page()
        page.goto(out.as_uri())
        page.wait_for_function(
            f"() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= {len(figures)}",
            timeout=60000,
        )
        buttons = page.evaluate(
            "() => Array.from(document.querySelectorAll('#fig-2 .modebar-btn')).map(b => b.getAttribute('data-title'))"
        )
        assert (
            "Download plot as a PNG" in buttons and "Share chart..." not in buttons
        )  # nothing leaves the file
        for i, step in checked:
            title = page.evaluate(f"() => document.getElementById('fig-{i}').layout.title.text")
            drawn = page.locator(f"#fig-{i} .gtitle").text_content() or ""
            assert title == step.figure.layout.title.text and drawn.startswith(step.figure_title[:40])
            page.locator(f"#fig-{i}").hover()
            with page.expect_download(timeout=60000) as dl:
                page.locator(f"#fig-{i} .modebar-btn[data-title^='Download plot']").click()
            assert dl.value.suggested_filename == f"{step.figure_name}.png"
            saved = tmp_path / dl.value.suggested_filename
            dl.value.save_as(saved)
            assert saved.read_bytes()[:8] == PNG and saved.stat().st_size > 10_000
        ctx.close()
        browser.close()
    assert [s.figure_name for _, s in checked] == [
        f"feature-{pair[0]}-map",
        f"features-{pair[0]}-{pair[1]}-cosine-vs-chance",
    ]
