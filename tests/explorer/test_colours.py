"""One colour rule on every page (explorer/figures/style.py): harmful red, task blue, a feature that is both
red with a blue edge (two stripes beside its name, a blue-edged diamond or star on a chart) wherever it appears;
and the canonical harm categories in colours a reader can tell apart (CIEDE2000, checked against published
reference values before it judges the palette)."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from explorer import figures as F
from explorer.data import load_cache
from explorer.story import build_story
from precompute.data import taxonomy
from tests.explorer.test_apptest import html_text, run_page

# --- CIEDE2000 (Sharma, Wu and Dalal 2005), from sRGB through CIE Lab (D65) ----------------------------------


def lab(hex_color: str) -> tuple[float, float, float]:
    h = hex_color.lstrip("#")
    rgb = [int(h[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb)
    x = (0.4124564 * r + 0.3575761 * g + 0.1804375 * b) / 0.95047
    y = 0.2126729 * r + 0.7151522 * g + 0.0721750 * b
    z = (0.0193339 * r + 0.1191920 * g + 0.9503041 * b) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def ciede2000(c1: tuple[float, float, float], c2: tuple[float, float, float]) -> float:
    (l1, a1, b1), (l2, a2, b2) = c1, c2
    cb = (math.hypot(a1, b1) + math.hypot(a2, b2)) / 2
    g = 0.5 * (1 - math.sqrt(cb**7 / (cb**7 + 25**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = math.hypot(a1p, b1), math.hypot(a2p, b2)
    h1p = math.degrees(math.atan2(b1, a1p)) % 360 if (a1p or b1) else 0.0
    h2p = math.degrees(math.atan2(b2, a2p)) % 360 if (a2p or b2) else 0.0
    dh = h2p - h1p
    if c1p * c2p == 0:
        dh = 0.0
    elif dh > 180:
        dh -= 360
    elif dh < -180:
        dh += 360
    d_l, d_c = l2 - l1, c2p - c1p
    d_h = 2 * math.sqrt(c1p * c2p) * math.sin(math.radians(dh / 2))
    lb, cbp = (l1 + l2) / 2, (c1p + c2p) / 2
    if c1p * c2p == 0:
        hb = h1p + h2p
    elif abs(h1p - h2p) <= 180:
        hb = (h1p + h2p) / 2
    else:
        hb = (h1p + h2p + 360) / 2 if h1p + h2p < 360 else (h1p + h2p - 360) / 2
    t = (
        1
        - 0.17 * math.cos(math.radians(hb - 30))
        + 0.24 * math.cos(math.radians(2 * hb))
        + 0.32 * math.cos(math.radians(3 * hb + 6))
        - 0.20 * math.cos(math.radians(4 * hb - 63))
    )
    rc = 2 * math.sqrt(cbp**7 / (cbp**7 + 25**7))
    rt = -math.sin(math.radians(60 * math.exp(-(((hb - 275) / 25) ** 2)))) * rc
    sl = 1 + 0.015 * (lb - 50) ** 2 / math.sqrt(20 + (lb - 50) ** 2)
    sc, sh = 1 + 0.045 * cbp, 1 + 0.015 * cbp * t
    return math.sqrt((d_l / sl) ** 2 + (d_c / sc) ** 2 + (d_h / sh) ** 2 + rt * (d_c / sc) * (d_h / sh))


# pairs 1, 2, 7, 17 and 25 of Sharma et al.'s test data: (Lab 1, Lab 2, ΔE00)
SHARMA = [
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    ((50.0, 3.1571, -77.2803), (50.0, 0.0, -82.7485), 2.8615),
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
    ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
]


@pytest.mark.parametrize("c1,c2,expected", SHARMA)
def test_ciede2000_matches_the_reference_data(c1, c2, expected) -> None:
    assert ciede2000(c1, c2) == pytest.approx(expected, abs=1e-4)
    assert ciede2000(c2, c1) == pytest.approx(expected, abs=1e-4)


def test_lab_of_reference_colours() -> None:
    assert lab("#ffffff") == pytest.approx((100.0, 0.0, 0.0), abs=0.01)
    assert lab("#ff0000") == pytest.approx((53.24, 80.09, 67.20), abs=0.05)  # sRGB red, D65


# --- the canonical harm categories ---------------------------------------------------------------------------

DISTINCT = 20.0  # CIEDE2000: ~2.3 is a just-noticeable difference; 20 reads as a different colour at a glance


def test_category_palette_covers_the_taxonomy_in_distinguishable_colours() -> None:
    assert list(F.CATEGORY_PALETTE) == [*taxonomy.CATEGORIES, taxonomy.UNSPECIFIED]
    labs = {c: lab(v) for c, v in F.CATEGORY_PALETTE.items()}
    worst = min((ciede2000(labs[a], labs[b]), a, b) for a, b in itertools.combinations(F.CATEGORY_PALETTE, 2))
    assert worst[0] >= DISTINCT, worst
    # none reads as the task blue, and each stands out from the uncategorised points behind it
    assert min(ciede2000(lab(F.TASK), v) for v in labs.values()) >= DISTINCT
    assert min(ciede2000(lab(F.NO_CATEGORY_COLOR), v) for v in labs.values()) >= 15


def test_category_colour_follows_the_taxonomy() -> None:
    for cat, colour in F.CATEGORY_PALETTE.items():
        assert F.category_color(cat) == colour
    assert F.category_color("Malware/Hacking") == F.CATEGORY_PALETTE[taxonomy.unify("Malware/Hacking")]
    assert F.category_color("not a category") == F.category_color(None) == F.CATEGORY_PALETTE["unspecified"]
    counts = [("hate_harassment", 6), ("illegal_goods", 1)]
    bars = F.category_counts_figure(counts).data[0]
    assert list(bars.marker.color) == [
        F.CATEGORY_PALETTE["hate_harassment"],
        F.CATEGORY_PALETTE["illegal_goods"],
    ]
    # the feature page's firing-rate bars: each category in its own colour, not by its position in the list
    cats = pd.DataFrame(
        {
            "group": ["harmful"] * 3 + ["benign"],
            "category": ["illegal_other", "hate_harassment", "Malware/Hacking", "hate_harassment"],
            "frequency": [0.01, 0.02, 0.03, 0.04],
        }
    )
    rates = F.group_rates_figure({"task": 0.1, "harmful": 0.2}, cats).data[0]
    assert list(rates.y) == [
        "task",
        "harmful",
        "harmful · illegal_other",
        "harmful · hate_harassment",
        "harmful · Malware/Hacking",
    ]
    assert list(rates.marker.color)[2:] == [
        F.CATEGORY_PALETTE["illegal_other"],
        F.CATEGORY_PALETTE["hate_harassment"],
        F.CATEGORY_PALETTE["cybercrime"],
    ]


# --- a feature that is both task and harmful, on every page ------------------------------------------------

BOTH_STRIPE = F.role_stripe(F.BOTH)  # border-left red + a blue box-shadow stripe
BLUE = F.rgba(F.TASK, 0.5).rsplit(",", 1)[0]  # "rgba(29,78,216"
RED = F.rgba(F.HARM, 0.5).rsplit(",", 1)[0]


def token_colours(html: str) -> set[str]:
    """The highlight colours of the example tokens (spans titled with their activation; the logit-lens chips,
    blue for promoted tokens whatever the feature is, are not examples)."""
    styles = re.findall(r'<span title="activation [^"]*" style="([^"]*)"', html)
    return {m.group(1) for st in styles if (m := re.search(r"background:(rgba\(\d+,\d+,\d+)", st))}


def header_stripes(html: str, feature: int) -> list[str]:
    """The style of each feature header of `feature` in the page (feature_header_html)."""
    return re.findall(
        rf'<div style="([^"]*)"><div style="font-size:13px;color:#6b7280">Feature #{feature}</div>', html
    )


def test_role_rule() -> None:
    both = {"is_task": True, "is_harmful": True}
    assert [F.role_of(r) for r in (both, {"is_harmful": True}, {"is_task": True}, {})] == [
        "both",
        "harmful",
        "task",
        "neither",
    ]
    assert F.role_color(both) == F.role_color({"is_harmful": True}) == F.HARM
    assert F.role_color({"is_task": True}) == F.TASK
    assert BOTH_STRIPE == f"border-left:5px solid {F.HARM};box-shadow:-5px 0 0 {F.TASK}"
    m = F.role_marker(both)
    assert (m["symbol"], m["color"], m["line"]["color"]) == ("diamond", F.HARM, F.TASK)
    assert F.role_marker({"is_harmful": True})["symbol"] == "circle"


def test_a_both_feature_looks_the_same_everywhere(
    bidir_cache: tuple[Path, tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bidir_cache's flagged pair (t, h): both features are task and harmful. Wherever either is drawn (its
    own page, the compare column, both sides of the overlaps pair, the map and the story), it gets the
    both-stripe, red examples and the blue-edged marker; never the plain blue of a task feature."""
    cache_dir, (t, h) = bidir_cache
    c = load_cache(cache_dir)
    assert F.role_of(c.row(t)) == F.role_of(c.row(h)) == F.BOTH
    seen: dict[str, str] = {}
    # figures: the header whatever role a page passes, and the map's marker for the selection and a neighbour
    for role in (None, "task", "harmful"):
        assert header_stripes(F.feature_header_html(c.row(t), role=role), t) == [
            BOTH_STRIPE + ";padding:2px 0 2px 12px;margin:4px 0 10px"
        ]
    nb = c.neighbours_of(t)
    sel = F.Selection(
        t, nb["feature"].tolist(), nb["cosine"].tolist(), nb["is_harmful"].tolist(), c.null_cosine
    )
    star = next(tr for tr in F.map_figure(c.features, "harm score", sel).data if tr.name == f"selected #{t}")
    assert (star.marker.color, star.marker.line.color, star.marker.line.width) == (F.HARM, F.TASK, 3)
    nb_h = c.neighbours_of(h)
    sel_h = F.Selection(
        h, nb_h["feature"].tolist(), [1.0] * len(nb_h), nb_h["is_harmful"].tolist(), c.null_cosine
    )
    both_nb = next(
        tr
        for tr in F.map_figure(c.features, "harm score", sel_h).data
        if tr.name == "task and harmful neighbour"
    )
    assert (
        t in list(both_nb.customdata)
        and both_nb.marker.symbol == "diamond"
        and both_nb.marker.line.color == F.TASK
    )
    # pages
    pages = {
        "feature page": run_page("views/feature.py", cache_dir, monkeypatch, feature=str(t)),
        "compare column": run_page(
            "views/feature.py", cache_dir, monkeypatch, feature=str(h), compare=str(t)
        ),
        "overlaps pair": run_page("views/overlaps.py", cache_dir, monkeypatch, task=str(t), harmful=str(h)),
    }
    for where, at in pages.items():
        assert not at.exception, (where, [e.value for e in at.exception])
        html = html_text(at)
        seen[where] = html
        stripes = header_stripes(html, t)
        assert stripes and all(s.startswith(BOTH_STRIPE) for s in stripes), (where, stripes)
        assert token_colours(html) == {RED}, where  # its examples highlighted red, none blue
    assert header_stripes(seen["overlaps pair"], h)[0].startswith(BOTH_STRIPE)
    # the story of the pair: the text step's columns, both striped and red
    text = next(s for s in build_story(c, t, h) if s.key == "text").body or ""
    assert text.count(BOTH_STRIPE) == 2 and token_colours(text) == {RED}


def test_a_feature_that_passes_neither_test_is_grey_never_task_blue(
    synth_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its own page and the compare column draw a feature that is neither task nor harmful in style's grey:
    the stripe and the example highlights, not the blue that says 'task feature'."""
    c = load_cache(synth_cache)
    f = c.features
    plain = f[~f["is_task"].astype(bool) & ~f["is_harmful"].astype(bool) & (f["frequency"] > 0)].index
    n = next(int(i) for i in plain if any(e.get("kind") == "top" for e in c.examples_of(int(i))))
    harmful = int(f[f["is_harmful"].astype(bool)].index[0])
    grey = F.rgba(F.role_color({}), 0.5).rsplit(",", 1)[0]
    assert F.role_color({}) not in (F.TASK, F.HARM)
    for where, at in {
        "feature page": run_page("views/feature.py", synth_cache, monkeypatch, feature=str(n)),
        "compare column": run_page(
            "views/feature.py", synth_cache, monkeypatch, feature=str(harmful), compare=str(n)
        ),
    }.items():
        assert not at.exception, (where, [e.value for e in at.exception])
        html = html_text(at)
        stripes = header_stripes(html, n)
        assert stripes and all(s.startswith(f"border-left:5px solid {F.role_color({})};") for s in stripes), (
            where,
            stripes,
        )
        assert grey in token_colours(html) and BLUE not in token_colours(html), where
