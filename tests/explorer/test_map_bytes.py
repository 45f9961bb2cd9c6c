"""What a colour change sends: the map's layers as plotly serialises them (what Streamlit sends, plotly.io.to_json).

A new colouring sends the colours layer (and the overlay) in full, and a reference to the points layer, which holds
the hover text (most of the bytes) and does not depend on the colouring. Arrays go as base64 typed arrays ('bdata':
4-byte floats, 2-byte ids, not JSON lists), the hover text without what the template rebuilds: the id (from
customdata) and one line break. The text shown on hover is exactly the cache's escaped hover text."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import plotly.io as pio
import pytest

from explorer import figures as F
from explorer.data import load_cache


def _spec(cache: Path, mode: str, max_points: int, layer: int = 0) -> tuple[Any, dict[str, Any]]:
    """The cache and the spec of map_layers' `layer` (0 colours, 1 points, 2 overlay)."""
    c = load_cache(cache)
    f = c.default_feature()
    nb = c.neighbours_of(f)
    sel = F.Selection(
        f, nb["feature"].tolist(), nb["cosine"].tolist(), nb["is_harmful"].tolist(), c.null_cosine
    )
    layers = F.map_layers(c.features, mode, sel, max_points=max_points)
    return c, json.loads(pio.to_json(layers[layer], validate=False))


@pytest.mark.parametrize("mode", list(F.COLOR_MODES))
def test_base_arrays_are_typed(xss_cache: Path, mode: str) -> None:
    """Every 1-D numeric array of the colours and the points is a typed array: coordinates and colours float32,
    ids uint16 (600 features), the density of all (drawn when decimated) float32; the colours carry no hover
    text and no ids, the points no colours."""
    _, spec = _spec(xss_cache, mode, max_points=200)
    points = [t for t in spec["data"] if t["type"] == "scattergl"]
    assert points and sum(len(np.frombuffer(_raw(t["x"]), np.float32)) for t in points) == 200
    for t in points:
        assert t["x"]["dtype"] == t["y"]["dtype"] == "f4" and t["hoverinfo"] == "skip"
        assert not {"text", "hovertext", "customdata", "hovertemplate"} & set(t)
        if isinstance(t["marker"].get("color"), dict):
            assert t["marker"]["color"]["dtype"] == "f4"
    _, top = _spec(xss_cache, mode, max_points=200, layer=1)
    (t,) = top["data"]
    assert t["x"]["dtype"] == t["y"]["dtype"] == "f4" and t["customdata"]["dtype"] == "u2"
    assert t["marker"]["color"] == "rgba(0,0,0,0)"
    if mode != "harm category":
        assert isinstance(points[0]["marker"]["color"], dict)
    (density,) = [t for t in spec["data"] if t["type"] == "heatmap"]
    assert density["z"]["dtype"] == "f4" and density["z"]["shape"] == "140, 140"


def _raw(arr: dict[str, Any]) -> bytes:
    import base64

    return base64.b64decode(arr["bdata"])


def test_hover_shows_the_escaped_hover_text_exactly(xss_cache: Path) -> None:
    """The template (F.HOVER_TEMPLATE) rebuilds each point's hover text from its id, text and hovertext, equal to
    the cache's (escaped) hover column; the XSS payloads of the cache's labels and tokens stay escaped."""
    c, spec = _spec(xss_cache, "harm category", max_points=20000, layer=1)
    hover = c.features.set_index("feature")["hover"]
    shown = 0
    for t in (t for t in spec["data"] if t["type"] == "scattergl"):
        assert (
            t["hovertemplate"] == F.HOVER_TEMPLATE == "#%{customdata} %{text}<br>%{hovertext}<extra></extra>"
        )
        ids = np.frombuffer(_raw(t["customdata"]), np.uint16)
        for i, text, line in zip(ids, t["text"], t["hovertext"], strict=True):
            assert f"#{i} {text}<br>{line}" == hover[int(i)]
            shown += 1
    assert shown == c.n
    every = json.dumps([t.get("text") for t in spec["data"]] + [t.get("hovertext") for t in spec["data"]])
    assert "&lt;script&gt;" in every and "&lt;img" in every  # the payloads are in play, escaped
    # quotes as numeric entities, which plotly's hover label decodes ('&quot;' it shows as written)
    assert "onerror=&#34;window" in every and "&quot;" not in every
    assert not re.search(r"<(script|img)", json.loads(json.dumps(every)))


def test_hover_text_of_another_form_is_sent_as_it_is() -> None:
    """Text the template cannot rebuild (not '#id …<br>…') goes as it is, with a template that shows it."""
    text, lines, template = F.hover_fields(
        np.array(["#3 a<br>b<br>c", "no id"], dtype=object), np.array([3, 4])
    )
    assert (
        list(text) == ["#3 a<br>b<br>c", "no id"] and lines is None and template == "%{text}<extra></extra>"
    )
    text, lines, template = F.hover_fields(
        np.array(["#3 a<br>b<br>c", "#4 d<br>"], dtype=object), np.array([3, 4])
    )
    assert list(text) == ["a<br>b", "d"] and list(lines) == ["c", ""] and template == F.HOVER_TEMPLATE


def test_colour_change_sends_less_than_the_old_base(xss_cache: Path) -> None:
    """What a colour change sends in full (the colours layer) against the one base chart it sent before (the same
    points with their full hover text in `text`, float64 colours and density, int64 ids), on the same points:
    a fraction of it (bench/README.md measures 4k and 262k features). The points layer, sent once with the
    page, is the same for every colouring."""
    c = load_cache(xss_cache)
    hover = c.features.set_index("feature")["hover"]
    sel = F.Selection(c.default_feature(), [], [], [], c.null_cosine)
    points = None
    for mode in F.COLOR_MODES:
        colours, top, _ = F.map_layers(c.features, mode, sel)
        assert points is None or pio.to_json(top) == points
        points = pio.to_json(top)
        now = len(pio.to_json(colours, validate=False))
        old = F.map_figure(c.features, mode, None)  # the same points and colours, with hover
        for t in old.data:
            if t.type == "heatmap":
                t.z = np.asarray(t.z, dtype=np.float64)
                continue
            ids = np.asarray(t.customdata, dtype=np.int64)
            t.update(text=hover.loc[ids].to_numpy(dtype=object), hovertext=None, customdata=ids)
            t.hovertemplate = "%{text}<extra></extra>"
            if t.marker.color is not None and not isinstance(t.marker.color, str):
                t.marker.color = np.asarray(t.marker.color, dtype=np.float64)
        before = len(pio.to_json(old, validate=False))
        assert now < 0.15 * before, (mode, now, before)  # 0.11-0.13 on this cache's 600 features
