"""Regenerate the README's map and side-by-side screenshots from a cache, in a real browser, and print
their captions.

    python bench/readme_screenshots.py --cache /path/to/demo-cache --assets assets

Why a script: a screenshot in the README is a claim about the demo cache, so it is taken from the cache
and its caption is computed from the same cache, never typed by hand. Both open on the feature the story
follows when the cache flags no pair (explorer.story.example_feature: the harmful feature with the most
neighbours above the chance level): the map coloured by harm score, and the feature page side by side
with its closest harmful neighbour above chance (a flagged pair's two features when the cache has one). Needs
Playwright and Chromium (FEATUREGEOM_CHROMIUM, default /usr/bin/chromium), like the browser tests.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explorer.data import cache_findings, load_cache  # noqa: E402
from explorer.story import example_feature  # noqa: E402
from tests.explorer.helpers import launch_chromium, streamlit_server, wait_for_app  # noqa: E402


def map_caption(cache_dir: Path, feature: int) -> str:
    """What the map screenshot shows, every number from the cache."""
    c = load_cache(cache_dir)
    fd = cache_findings(c)
    row = c.row(feature)
    nb = c.neighbours_of(feature)
    above = nb[nb["cosine"] >= c.null_cosine]
    harm = int(above["is_harmful"].sum())
    cat = f" ({row['harm_category']})" if row.get("harm_category") else ""
    task = (
        "no feature passes the task test" if not fd.n_task else f"{fd.n_task:,} features pass the task test"
    )
    return (
        f"The explorer's map on the demo cache: {fd.n_features:,} features coloured by harm score "
        f"({fd.n_harmful:,} pass the harm test; {task}). The star is harmful feature #{feature}{cat}, joined "
        f"to its {len(above)} neighbour{'' if len(above) == 1 else 's'} above the calibrated chance cosine "
        f"{c.null_cosine:.3f} ({harm} harmful, in red)"
    )


def side_by_side(cache_dir: Path) -> tuple[int, int, str]:
    """(feature, compared feature, caption): the top flagged pair, else the followed harmful feature and its
    closest harmful neighbour above chance (its nearest neighbour when no harmful one is)."""
    c = load_cache(cache_dir)
    pair = c.default_pair()
    if pair is not None:
        t, h = pair
        return (
            t,
            h,
            f"Side by side on the demo cache: task feature #{t} and its flagged harmful neighbour #{h}",
        )
    feature, _ = example_feature(c)
    nb = c.neighbours_of(feature)
    harm = nb[nb["is_harmful"] & (nb["cosine"] >= c.null_cosine)]
    # no harmful neighbour above chance: show its nearest neighbour of any kind, and say which it is
    top = harm.iloc[0] if len(harm) else nb.iloc[0]
    h, cos = int(top["feature"]), float(top["cosine"])
    cats = [f" ({r['harm_category']})" if r.get("harm_category") else "" for r in (c.row(feature), c.row(h))]
    kind = "closest harmful neighbour" if len(harm) else "nearest neighbour (no harmful one is above chance)"
    level = f"{cos / c.null_cosine:.1f}× the calibrated chance level"
    return (
        feature,
        h,
        f"Side by side on the demo cache: harmful feature #{feature}{cats[0]} and its {kind} "
        f"#{h}{cats[1] if len(harm) else ''}, decoder cosine {cos:.2f} ({level}), with the text that makes "
        "each fire",
    )


def shoot(url: str, out: Path, width: int, height: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        wait_for_app(page)
        page.wait_for_timeout(1500)  # let plotly finish drawing
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, type=Path)
    ap.add_argument("--assets", default=Path("assets"), type=Path, help="where screenshot-*.png go")
    ap.add_argument("--width", type=int, default=1440)
    ap.add_argument("--height", type=int, default=900)
    args = ap.parse_args(argv)
    feature, _ = example_feature(load_cache(args.cache))
    a, b, pair_caption = side_by_side(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        with streamlit_server(args.cache, reviews=Path(tmp) / "reviews.sqlite", log_dir=Path(tmp)) as srv:
            shoot(
                f"{srv.url}/?feature={feature}", args.assets / "screenshot-map.png", args.width, args.height
            )
            shoot(
                f"{srv.url}/feature?feature={a}&compare={b}",
                args.assets / "screenshot-feature.png",
                args.width,
                args.height,
            )
    print(f"{args.assets / 'screenshot-map.png'}: {map_caption(args.cache, feature)}")
    print(f"{args.assets / 'screenshot-feature.png'}: {pair_caption}")


if __name__ == "__main__":
    main()
