"""The map's fast paths give exactly what the slow ones give (bench/README.md "At a million features"):
an id typed in the search box selects the ranking's first result without ranking; an id query tests only the
labels and lens text holding a digit and ranks as the full scan does; the colours and points layers the page
keeps (per cache and colouring, figures.KeptFigure) equal freshly built ones, and stay unchanged by use."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.io as pio
import pytest

from explorer import figures as F
from explorer.data import load_cache
from explorer.data.search import (
    DENSE_FACTOR,
    W_LABEL,
    W_LENS,
    SearchCache,
    dense_threshold,
    digit_rows,
    label_text,
    pinned_id,
    rank_features,
)
from explorer.map_search import query_pick
from explorer.views.map import map_layers as kept_layers
from tests.explorer.test_apptest import html_text, run_page

ID_QUERIES = [
    "17",
    "#17",
    " 17 ",
    "0",
    "#0",
    "599",
    "600",
    "6000",
    "#",
    "##17",
    "١٧",
    "²",
    "17a",
    "-17",
    "1 7",
]


def test_an_id_query_picks_the_rankings_first_result(synth_cache: Path) -> None:
    c = load_cache(synth_cache)
    for q in ID_QUERIES:
        ranked = c.search(q)
        want = int(ranked["feature"].iloc[0]) if len(ranked) else None
        assert query_pick(c, q) == want, q
        if pinned_id(q, c.n) is not None:
            assert want == pinned_id(q, c.n) and ranked["match"].iloc[0] == "id", q
    assert pinned_id("17", c.n) == 17 and pinned_id("#17", c.n) == 17 and pinned_id("١٧", c.n) == 17
    assert pinned_id("600", c.n) is None and pinned_id("²", c.n) is None and pinned_id("1 7", c.n) is None
    assert query_pick(c, "   ") is None


def _with_digits(synth_cache: Path) -> tuple[pd.DataFrame, object]:
    """The synthetic cache with digits in a few labels and explanations (ids are searched there too)."""
    c = load_cache(synth_cache)
    f = c.features.copy()
    f.loc[[5, 40, 41], "label"] = ["Layer 17 TOKENS", "1717", "year 2017"]
    f.loc[[40, 300, 17], "explanation"] = ["fires on 17", "counts: 7, 17, 170", "no digit here"]
    f.loc[300, "frequency"] = 0.5  # a dense one among the matches
    fresh = {"_search_text": None, "_prep": None, "_searches": SearchCache(), "_derived": OrderedDict()}
    return f, dataclasses.replace(c, features=f, **fresh)


def brute_force_no_examples(f: pd.DataFrame, lens: list[str], q: str) -> list[tuple[int, float, str]]:
    """The documented score without example text (an id query does not look there), the id pinned first."""
    ql = q.strip().lower()
    freqs = sorted(x for x in f["frequency"] if x > 0)
    dense = DENSE_FACTOR * float(np.median(freqs))
    rows = []
    for i, (label, freq) in enumerate(zip(f["label"].fillna(""), f["frequency"], strict=True)):
        lab, lns = ql in str(label).lower(), ql in lens[i].lower()
        if lab or lns:
            d = dense / freq if freq > dense else 1.0
            rows.append(
                (i, (W_LABEL * lab + W_LENS * lns) * d, freq, "label" if lab else "logit lens / explanation")
            )
    rows.sort(key=lambda r: (-r[1], r[2], r[0]))
    out = [(i, s, m) for i, s, _, m in rows]
    pin = pinned_id(q, len(f))
    if pin is not None:
        mine = [r for r in out if r[0] == pin]
        score = mine[0][1] if mine else 0.0
        out = [(pin, score, "id")] + [r for r in out if r[0] != pin]
    return out


@pytest.mark.parametrize("q", ["17", "#17", "7", "1717", "2017", "#40", "599"])
def test_an_id_query_ranks_as_the_full_scan_and_the_brute_force(synth_cache: Path, q: str) -> None:
    f, c = _with_digits(synth_cache)
    labels, lens = label_text(f), c._lens_text()  # type: ignore[attr-defined]
    assert {5, 40, 41}.issubset(digit_rows(labels)) and {40, 300}.issubset(digit_rows(lens))
    rows = set(digit_rows(labels))  # exactly the labels holding an ASCII digit
    assert rows == {i for i, t in enumerate(labels.to_pylist()) if any(ch in "0123456789" for ch in t)}
    fast = c.search(q)  # type: ignore[attr-defined]  # digit rows and the density threshold kept
    full = rank_features(f, lens, None, q)  # every row scanned, the threshold computed afresh
    pd.testing.assert_frame_equal(fast, full)
    want = brute_force_no_examples(f, lens.to_pylist(), q)
    assert fast["feature"].tolist() == [i for i, _, _ in want]
    np.testing.assert_allclose(fast["score"].to_numpy(), [s for _, s, _ in want], rtol=1e-12, atol=1e-12)
    assert fast["match"].tolist() == [m for _, _, m in want]
    if q == "17":  # the planted digits are found: in labels (5, 40, 41), in explanations (40, 300)
        assert {17, 5, 40, 41, 300}.issubset(fast["feature"]) and fast["dense"].any()


def test_a_word_with_a_digit_ranks_as_the_full_scan(synth_cache: Path) -> None:
    """A query holding a digit and letters tests the digit rows only for labels and lens, and still searches
    the examples: the same frame as the full scan."""
    f, c = _with_digits(synth_cache)
    lens = c._lens_text()  # type: ignore[attr-defined]
    idx = c.search_index()  # type: ignore[attr-defined]
    for q in ("layer 17", "LAYER 17 t", "r 2017", "a1"):
        fast = c.search(q)  # type: ignore[attr-defined]
        pd.testing.assert_frame_equal(fast, rank_features(f, lens, idx, q))
    assert c.search("layer 17")["feature"].tolist()[:1] == [5]  # type: ignore[attr-defined]
    freq = f["frequency"].to_numpy(dtype=np.float64)
    assert c._search_prep()[3] == dense_threshold(freq)  # type: ignore[attr-defined]


def _sel(c, feature: int) -> F.Selection:  # type: ignore[no-untyped-def]
    nb = c.neighbours_of(feature)
    return F.Selection(
        feature=feature,
        neighbours=nb["feature"].tolist(),
        cosines=nb["cosine"].tolist(),
        harmful=nb["is_harmful"].tolist(),
        threshold=float(round(c.null_cosine, 3)),
    )


@pytest.mark.parametrize("max_points", [20000, 200])
def test_kept_layers_equal_fresh_ones_and_stay_unchanged(synth_cache: Path, max_points: int) -> None:
    c = load_cache(synth_cache)
    t, h = c.default_pair()
    for mode in F.COLOR_MODES:
        for f in (t, h):
            kept = kept_layers(c, mode, _sel(c, f), max_points)
            fresh = F.map_layers(c.features, mode, _sel(c, f), max_points=max_points)
            for k, w in zip(kept, fresh, strict=True):
                assert pio.to_json(k, validate=False) == pio.to_json(w, validate=False)
                assert pio.to_json(k, validate=False) == pio.to_json(w, validate=False), "read twice"
            again = kept_layers(c, mode, _sel(c, f), max_points)
            assert again[0] is kept[0] and again[1] is kept[1], "built once per cache and colouring"
    colours = kept_layers(c, "harm score", _sel(c, t), max_points)
    other = kept_layers(c, "task score", _sel(c, t), max_points)
    assert other[1] is colours[1] and other[0] is not colours[0], "the points serve every colouring"
    assert isinstance(colours[0], F.KeptFigure) and not isinstance(colours[2], F.KeptFigure)
    # what to_json changes (the traces' uids) and what a caller might change is a copy; arrays are read only
    d = colours[1].to_dict()
    d["data"][0]["uid"] = "changed"
    d["layout"] = {}
    assert "uid" not in colours[1].to_dict()["data"][0] and colours[1].to_dict()["layout"]
    arrays = [v for tr in d["data"] for v in tr.values() if isinstance(v, np.ndarray)]
    assert arrays and not any(a.flags.writeable for a in arrays)


def test_the_map_page_draws_fresh_layers_after_switches(
    synth_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the page: after switches by id and a colour change, its three charts are exactly the ones a
    fresh figures.map_layers draws for the selection (here decimated: 200 of 600 features drawn)."""
    monkeypatch.setenv("FEATUREGEOM_MAX_POINTS", "200")
    c = load_cache(synth_cache)
    t, h = c.default_pair()
    at = run_page("views/map.py", synth_cache, monkeypatch, feature=str(t))

    def check(feature: int, mode: str) -> None:
        assert not at.exception and f"Feature #{feature}" in html_text(at)
        got = sorted(ch.proto.spec for ch in at.get("plotly_chart"))
        fresh = F.map_layers(c.features, mode, _sel(c, feature), max_points=200)
        assert got == sorted(pio.to_json(w, validate=False) for w in fresh)
        assert "200 of 600 features drawn" in json.dumps(got)

    check(t, "harm score")
    for q, f in ((str(h), h), (f"#{t}", t), ("17", 17)):
        at.text_input(key="map_q").input(q).run()
        check(f, "harm score")
    at.selectbox(key="map_color").set_value("harm category").run()
    check(17, "harm category")
