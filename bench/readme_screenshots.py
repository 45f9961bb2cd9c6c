"""Regenerate the README's screenshots of every explorer page from a cache, in a real browser, and print
their captions (as README markdown).

    python bench/readme_screenshots.py --cache /path/to/demo-cache --assets assets

Why a script: a screenshot in the README is a claim about the demo cache, so it is taken from the cache
and its caption is computed from the same cache, never typed by hand. Every shot follows the feature the
story follows when the cache flags no pair (explorer.story.example_feature: the harmful feature with the
most neighbours above the chance level):

* map: the map coloured by harm score, that feature selected;
* feature: its feature page side by side with its closest harmful neighbour above chance (a flagged pair's
  two features when the cache has one);
* feature-harmful: its feature page with "Documents" set to harmful documents;
* overlaps: the Overlaps review opened on it and its closest harmful neighbour (a flagged pair when the
  cache has one; otherwise the page says "not flagged", and so does the caption);
* closeness: the set-level closeness test;
* story-first, story-result: the story's first step and the step that states the result;
* playground: the steering playground on its feature page after one Generate (the cache's own model runs
  locally, so this shot takes a model load and two generations).

Needs Playwright and Chromium (FEATUREGEOM_CHROMIUM, default /usr/bin/chromium), like the browser tests.
PNGs are palette-quantised (256 colours) to keep the repository small.
"""

from __future__ import annotations

import argparse
import html
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explorer import claims as C  # noqa: E402
from explorer.data import CacheData, cache_findings, load_cache  # noqa: E402
from explorer.data import evidence as E  # noqa: E402
from explorer.pair_status import feature_kind, pair_status  # noqa: E402
from explorer.story import example_feature, story_steps  # noqa: E402
from explorer.story.base import model_name  # noqa: E402
from tests.explorer.helpers import launch_chromium, streamlit_server, wait_for_app  # noqa: E402

GENERATE_TIMEOUT_MS = 600_000  # the first Generate loads the model (tens of seconds on a loaded CPU)
KIND_WORDS = {"both": "task-and-harmful", "harmful": "harmful", "task": "task", "neither": "plain"}


@dataclass
class Shot:
    """One screenshot: assets/screenshot-<name>.png of the page at `path`, and its caption.

    `act` runs on the loaded page before the shot (click, scroll) and returns what the page then says that
    the caption should quote (e.g. a generation's measured time), or ''."""

    name: str
    title: str  # the image's alt text: which page, no claim (the caption below it makes the claims)
    path: str
    caption: str
    act: Callable[[Any], str] | None = None


# --- captions: every number from the cache ----------------------------------------------------------
def who(c: CacheData, feature: int) -> str:
    """'harmful feature #1889 (hate_harassment)': what the cache says the feature is."""
    row = c.row(feature)
    cat = f" ({row['harm_category']})" if row.get("harm_category") else ""
    return f"{KIND_WORDS[feature_kind(row)]} feature #{feature}{cat}"


def plain(lead: str) -> str:
    """A story lead (safe HTML) as plain text."""
    return html.unescape(re.sub(r"<[^>]+>", "", lead))


def first_sentence(text: str) -> str:
    return re.split(r"(?<=\.)\s", text.strip(), maxsplit=1)[0]


def closest_harmful(c: CacheData, feature: int) -> tuple[int, float] | None:
    """The feature's closest harmful neighbour (any cosine) and their cosine; None when it has none."""
    nb = c.neighbours_of(feature)
    harm = nb[nb["is_harmful"].astype(bool)]
    return (int(harm.iloc[0]["feature"]), float(harm.iloc[0]["cosine"])) if len(harm) else None


def versus_chance(c: CacheData, cos: float) -> str:
    side = "above" if C.closer_than_chance(cos, c.null_cosine) else "not above"
    return f"decoder cosine {cos:.3f}, {side} the calibrated chance level {c.null_cosine:.3f}"


def map_caption(c: CacheData, feature: int) -> str:
    """What the map screenshot shows, every number from the cache."""
    fd = cache_findings(c)
    nb = c.neighbours_of(feature)
    above = nb[nb["cosine"] >= c.null_cosine]
    harm = int(above["is_harmful"].sum())
    task = (
        "no feature passes the task test" if not fd.n_task else f"{fd.n_task:,} features pass the task test"
    )
    return (
        f"The explorer's map on the demo cache: {fd.n_features:,} features coloured by harm score "
        f"({fd.n_harmful:,} pass the harm test; {task}). The star is {who(c, feature)}, joined "
        f"to its {len(above)} neighbour{'' if len(above) == 1 else 's'} above the calibrated chance cosine "
        f"{c.null_cosine:.3f} ({harm} harmful, in red)"
    )


def side_by_side(c: CacheData) -> tuple[int, int, str]:
    """(feature, compared feature, caption): the top flagged pair, else the followed harmful feature and its
    closest harmful neighbour above chance (its nearest neighbour when no harmful one is)."""
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
    kind = "closest harmful neighbour" if len(harm) else "nearest neighbour (no harmful one is above chance)"
    level = f"{cos / c.null_cosine:.2f}× the calibrated chance level"
    return (
        feature,
        h,
        f"Side by side on the demo cache: {who(c, feature)} and its {kind} {who(c, h) if len(harm) else f'#{h}'}, "
        f"decoder cosine {cos:.2f} ({level}), with the text that makes each fire",
    )


def group_caption(c: CacheData, feature: int, group: str) -> str:
    """The feature page filtered to one group's documents: its firing rate there and what its group top holds."""
    found = E.group_examples(c.examples_of(feature), group)
    top = [e for e in found.examples if e.get("kind") == E.GROUP_TOP]
    cats = Counter(str(e.get("category") or "no category") for e in top)
    mix = ", ".join(f"{n} {cat}" for cat, n in cats.most_common())
    rate = c.group_rates(feature).get(group, float("nan"))
    held = (
        f"its top {len(top)} contexts within {group} documents come first ({mix}), each linked to its whole "
        "document"
        if top
        else f"it shows the {len(found.examples)} stored examples that peak on {group} documents"
    )
    return (
        f"The feature page of {who(c, feature)} with “Documents” set to {group} documents only: it fires on "
        f"{rate:.2%} of {group}-document tokens ({float(c.row(feature)['frequency']):.3%} of all tokens); {held}"
    )


def review_pair(c: CacheData, feature: int) -> tuple[int, int, str]:
    """(task side, harmful side, caption) for the Overlaps review: the top flagged pair, else the followed
    feature and its closest harmful neighbour, said to be not flagged with the cache's own reasons."""
    pair = c.default_pair()
    if pair is not None:
        t, h = pair
        return t, h, f"Overlaps review on the demo cache: the flagged pair task #{t} ↔ harmful #{h}"
    near = closest_harmful(c, feature)
    h, cos = near if near is not None else (int(c.neighbours_of(feature).iloc[0]["feature"]), float("nan"))
    status = pair_status(c, feature, h, cache_findings(c).flag_scope)
    why = "; ".join(status.reasons)
    return (
        feature,
        h,
        f"Overlaps review on the demo cache, which flags no pair: opened from a link on {who(c, feature)} and "
        f"its closest harmful neighbour #{h} ({versus_chance(c, cos)}), it says “not flagged” and why: {why}",
    )


def closeness_caption(c: CacheData) -> str:
    """The closeness page: the set-level verdict (or why there is none) and the exploratory ranked result."""
    fd = cache_findings(c)
    report = fd.closeness or {}
    ranked = report.get("ranked") or {}
    main = (
        f"not testable ({report.get('reason')})"
        if report.get("verdict") == "not_testable"
        else f"{str(report.get('verdict')).replace('_', ' ')} ({report.get('reason')})"
    )
    text = f"The Closeness page on the demo cache: the task-specific vs control-specific test is {main}"
    if ranked.get("verdict") not in (None, "not_testable"):
        lo, hi = ranked["ci"]
        text += (
            f"; exploratory, the {ranked['n']} most task-leaning features against the {ranked['n']} most "
            f"control-leaning: {str(ranked['verdict']).replace('_', ' ')}, difference in mean closeness "
            f"{ranked['difference']:+.3f} (95% CI {lo:+.3f} to {hi:+.3f})"
        )
    return text


def story_shots(c: CacheData) -> list[Shot]:
    """The story's first step and the step that states the result (the flagged pair's hypothesis step, or
    the result story's 'pairs' step), each captioned with its title and its lead's first sentence; step 1
    by the examples it shows instead (its lead is the same on every cache)."""
    pair = c.default_pair()
    steps = story_steps(c, pair)
    result = next((i for i, s in enumerate(steps, 1) if s.key in ("pairs", "finetune")), len(steps))
    query = f"task={pair[0]}&harmful={pair[1]}&" if pair is not None else ""
    head = "The presenter's story on the demo cache, step {k} of " + f"{len(steps)}, “{{title}}”: "
    # step 1 shows the followed feature's first two top examples (story.pair.intro_step)
    feature = pair[0] if pair is not None else example_feature(c)[0]
    shown = [e for e in c.examples_of(feature) if e.get("kind") == "top"][:2]
    groups = Counter(str(e.get("group")) for e in shown)
    first = (
        f"{model_name(c.manifest)} read through a sparse autoencoder; {who(c, feature)} lights up on its "
        f"{len(shown)} strongest examples ({' and '.join(f'{n} {g}' for g, n in groups.items())} text)"
    )
    return [
        Shot(
            "story-first",
            "Story, first step",
            f"/story?{query}step=1",
            head.format(k=1, title=steps[0].title) + first,
        ),
        Shot(
            "story-result",
            "Story, the step that states the result",
            f"/story?{query}step={result}",
            head.format(k=result, title=steps[result - 1].title)
            + first_sentence(plain(steps[result - 1].lead)),
        ),
    ]


def playground_caption(c: CacheData, feature: int) -> str:
    near = closest_harmful(c, feature)
    watched = (
        f" and its closest harmful neighbour #{near[0]} ({versus_chance(c, near[1])})"
        if near is not None
        else ""
    )
    return (
        f"The steering playground on the feature page of {who(c, feature)} after one Generate with the default "
        f"prompt: {model_name(c.manifest)}'s unsteered and steered greedy completions side by side, each token "
        f"shaded by #{feature}'s activation; it steers along and watches #{feature}{watched}"
    )


# --- the browser -------------------------------------------------------------------------------------
# idle and drawn: Streamlit reports 'notRunning' while a page's elements are still skeletons (~1-2 s on a
# loaded machine), so wait_for_app alone can shoot placeholders
SETTLED_JS = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    return !!app && app.getAttribute('data-test-script-state') === 'notRunning'
        && !document.querySelector('[data-testid*="keleton"]') && !document.querySelector('[data-stale="true"]');
}"""


def settle(page: Any, timeout_ms: float = 120_000) -> None:
    """Wait until the page is idle with nothing left to draw, twice 1.5 s apart (plotly draws after)."""
    for _ in range(2):
        wait_for_app(page, timeout=timeout_ms)
        page.wait_for_function(SETTLED_JS, timeout=timeout_ms)
        page.wait_for_timeout(1500)


def scroll_to_heading(page: Any, name: str) -> None:
    page.get_by_role("heading", name=name).evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)


def generate(page: Any) -> str:
    """Click Generate once, wait for both completions, bring the playground to the top; the page's own
    'strength …; N tokens in S s' sentence for the caption."""
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("Unsteered", exact=True).wait_for(timeout=GENERATE_TIMEOUT_MS)
    settle(page, timeout_ms=GENERATE_TIMEOUT_MS)
    scroll_to_heading(page, "Steering playground")
    said = page.get_by_text("Greedy decoding;").inner_text()
    m = re.search(r"strength (\S+) .*?(\d+) tokens in ([\d.]+) s", said)
    return (
        f"; strength {m[1]}, {m[2]} new tokens, the steered completion generated in {m[3]} s here"
        if m
        else ""
    )


def optimise(png: Path) -> None:
    """256-colour palette PNG: a UI screenshot keeps its look at a fraction of the size."""
    from PIL import Image

    with Image.open(png) as im:
        small = im.convert("RGB").quantize(
            colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    small.save(png, optimize=True)


def take(shots: list[Shot], base: str, assets: Path, width: int, height: int) -> list[str]:
    """Each shot in one Chromium; returns the captions, with what each `act` read off its page."""
    from playwright.sync_api import sync_playwright

    assets.mkdir(parents=True, exist_ok=True)
    captions = []
    with sync_playwright() as p:
        browser = launch_chromium(p)
        for shot in shots:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(base + shot.path)
            settle(page)
            extra = shot.act(page) if shot.act is not None else ""
            out = assets / f"screenshot-{shot.name}.png"
            page.screenshot(path=str(out))
            optimise(out)
            captions.append(shot.caption + extra)
            page.close()
        browser.close()
    return captions


def plan(c: CacheData) -> list[Shot]:
    feature, _ = example_feature(c)
    a, b, pair_caption = side_by_side(c)
    t, h, review_caption = review_pair(c, feature)
    return [
        Shot("map", "Map", f"/?feature={feature}", map_caption(c, feature)),
        Shot("feature", "Feature page, side by side", f"/feature?feature={a}&compare={b}", pair_caption),
        Shot(
            "feature-harmful",
            "Feature page, harmful documents only",
            f"/feature?feature={feature}&group=harmful",
            group_caption(c, feature, "harmful"),
        ),
        Shot("overlaps", "Overlaps review", f"/overlaps?task={t}&harmful={h}", review_caption),
        Shot("closeness", "Closeness", "/closeness", closeness_caption(c)),
        *story_shots(c),
        Shot(
            "playground",
            "Steering playground",
            f"/feature?feature={feature}",
            playground_caption(c, feature),
            act=generate,
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, type=Path)
    ap.add_argument("--assets", default=Path("assets"), type=Path, help="where screenshot-*.png go")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--only", nargs="*", help="shot names to take (default: all)")
    args = ap.parse_args(argv)
    shots = plan(load_cache(args.cache))
    if args.only:
        shots = [s for s in shots if s.name in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        with streamlit_server(args.cache, reviews=Path(tmp) / "reviews.sqlite", log_dir=Path(tmp)) as srv:
            captions = take(shots, srv.url, args.assets, args.width, args.height)
    for shot, caption in zip(shots, captions, strict=True):
        caption = caption.rstrip(".")
        print(f"![{shot.title}]({args.assets / f'screenshot-{shot.name}.png'})\n*{caption}.*\n")


if __name__ == "__main__":
    main()
