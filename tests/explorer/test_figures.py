"""Figure and HTML builders are pure: data in, figure out — and they escape everything from the cache."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from explorer import figures as F

PAYLOADS = [
    "<script>window.__xss=1</script>",
    '<img src=x onerror="window.__xss=1">',
    "[click](javascript:window.__xss=1)",
]


def _features(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "feature": np.arange(n),
            "umap_x": rng.uniform(-1, 1, n),
            "umap_y": rng.uniform(-1, 1, n),
            "harm_score": rng.uniform(0, 1, n),
            "task_score": rng.uniform(0, 1, n),
            "frequency": rng.uniform(0, 0.1, n),
            "harm_category": pd.array(rng.choice(["violence", "fraud", None], n), dtype="string"),
        }
    )
    df["hover"] = [f"#{i}" for i in range(n)]
    return df


def edge_ends(fig: go.Figure) -> dict[int, bool]:
    """{neighbour id: drawn as harmful} for the lines from the selection."""
    return {
        int(j): "harmful" in t.name
        for t in fig.data
        if (t.name or "").startswith("edges")
        for j in t.customdata
        if j is not None
    }


def _sel(n: int = 50) -> F.Selection:
    return F.Selection(
        feature=3,
        neighbours=[5, 9, 11, 20],
        cosines=[0.8, 0.5, 0.3, 0.1],
        harmful=[True, False, True, True],
        threshold=0.25,
    )


@pytest.mark.parametrize("mode", list(F.COLOR_MODES))
def test_map_figure_modes(mode: str) -> None:
    fig = F.map_figure(_features(300), mode, _sel())
    assert isinstance(fig, go.Figure)
    gl = [t for t in fig.data if t.type == "scattergl"]
    assert gl, "the map is WebGL"
    overlay = ("harmful neighbour", "other neighbour", "selected #3")
    drawn = sum(len(t.x) for t in gl if t.mode == "markers" and t.name not in overlay)
    assert drawn == 300, "every feature is drawn once below the decimation limit"
    if mode == "harm category":  # canonical categories: "violence" is violence_weapons, "fraud" unknown
        cats = _features(300)["harm_category"]
        n_v, n_f = int((cats == "violence").sum()), int((cats == "fraud").sum())
        colour = {t.name: t.marker.color for t in fig.data}
        assert colour[f"violence_weapons ({n_v})"] == F.CATEGORY_PALETTE["violence_weapons"]
        assert colour[f"unspecified ({n_f})"] == F.CATEGORY_PALETTE["unspecified"]
        assert colour["no harm category"] == F.NO_CATEGORY_COLOR


def test_selection_lines_filter_and_width() -> None:
    fig = F.map_figure(_features(100), "harm score", _sel())
    assert edge_ends(fig) == {5: True, 9: False, 11: True}  # cos 0.1 is below the threshold
    width = {
        j: t.line.width
        for t in fig.data
        if (t.name or "").startswith("edges")
        for j in t.customdata
        if j is not None
    }
    assert width[5] > width[9] > width[11] >= 1.0
    names = {t.name for t in fig.data}
    assert {"harmful neighbour", "other neighbour", "selected #3"} <= names
    harm = next(t for t in fig.data if t.name == "harmful neighbour")
    assert list(harm.customdata) == [5, 11]
    raised = F.map_figure(
        _features(100),
        "harm score",
        F.Selection(3, [5, 9, 11], [0.8, 0.5, 0.3], [True, False, True], threshold=0.6),
    )
    assert edge_ends(raised) == {5: True}


def test_line_width_monotone() -> None:
    w = [F.line_width(c, 0.2) for c in (0.2, 0.4, 0.6, 1.0, 1.5)]
    assert w == sorted(w) and w[0] == 1.0 and w[-1] == 9.0


def test_decimation_keeps_selection_and_budget() -> None:
    n = 50000
    df = _features(n)
    sel = F.Selection(
        feature=49999, neighbours=[1, 2, 3], cosines=[0.9, 0.8, 0.7], harmful=[True] * 3, threshold=0.1
    )
    fig = F.map_figure(df, "harm score", sel, max_points=4000)
    base = [t for t in fig.data if t.type == "scattergl" and t.name == "harm score"]
    assert len(base) == 1 and len(base[0].x) == 4000
    ids = set(np.asarray(base[0].customdata).tolist())
    assert {49999, 1, 2, 3} <= ids
    assert any(t.type == "heatmap" for t in fig.data), "far points are aggregated into a density layer"
    idx1 = F.decimate(df.umap_x.to_numpy(), df.umap_y.to_numpy(), 4000, keep=[7], focus=(0, 0))
    idx2 = F.decimate(df.umap_x.to_numpy(), df.umap_y.to_numpy(), 4000, keep=[7], focus=(0, 0))
    assert np.array_equal(idx1, idx2), "stable between reruns"
    d = np.hypot(df.umap_x.to_numpy()[idx1], df.umap_y.to_numpy()[idx1])
    assert (d < 0.2).sum() >= 900, "full detail around the selection"
    assert len(F.decimate(np.zeros(10), np.zeros(10), 100)) == 10


def test_map_figure_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError):
        F.map_figure(_features(10), "nonsense")


def test_small_charts() -> None:
    g = F.group_rates_figure(
        {"task": 0.01, "harmful": 0.002},
        pd.DataFrame({"group": ["harmful", "task"], "category": ["fraud", None], "frequency": [0.003, 0.01]}),
    )
    assert list(g.data[0].y) == ["task", "harmful", "harmful · fraud"]
    assert g.data[0].marker.color[0] == F.TASK and g.data[0].marker.color[1] == F.HARM
    h = F.histogram_figure(np.linspace(0, 4, 5), np.array([10, 5, 2, 1]))
    assert list(h.data[0].y) == [10, 5, 2, 1] and h.layout.yaxis.type == "log"
    c = F.closeness_figure(0.41, 0.095, 0.2)
    assert list(c.data[0].x) == [0.095, 0.2, 0.41]
    ft = F.finetune_figure(0.5)
    assert ft.layout.annotations and len(ft.data) == 3
    assert F.closeness_caption(0.41, 0.095) == "cosine 0.41 — 4.3× the chance level 0.095"
    assert (
        F.closeness_caption(0.41, 0.095, "covariance null", 97.4)
        == "cosine 0.41 — 4.3× the chance level 0.095 (covariance null); nearest-neighbour percentile 97.4"
    )
    named = F.closeness_figure(0.41, 0.095, null_label="covariance null")
    assert list(named.data[0].y)[0] == "random directions<br>(covariance null)"
    cfg = F.plotly_config("svg", "x")
    assert cfg["toImageButtonOptions"]["format"] == "svg"


def test_tokens_html_escapes_and_scales() -> None:
    toks = ["a", *PAYLOADS, "\n", "b"]
    acts = [0.0, 1.0, 2.0, 4.0, 0.5, 0.0]
    out = F.tokens_html(toks, acts, scale=4.0, center=3)
    assert "<script" not in out and "<img" not in out and "javascript:window" in out  # text, never a link
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in out
    assert "&lt;img src=x onerror=&quot;window.__xss=1&quot;&gt;" in out
    assert "<a " not in out and "href" not in out
    assert 'title="activation 4.000"' in out and "↵" in out
    assert "rgba(29,78,216,0.900)" in out  # the peak is the darkest
    windowed = F.tokens_html([str(i) for i in range(100)], [0.0] * 100, 1.0, center=50, window=5)
    assert windowed.count("<span title=") == 11 and "…" in windowed


def test_html_builders_escape_everything() -> None:
    row = {
        "feature": 7,
        "label": PAYLOADS[0],
        "explanation": PAYLOADS[1],
        "harm_category": PAYLOADS[2],
        "is_harmful": True,
        "is_task": True,
    }
    ex = [
        {
            "kind": "top",
            "rank": 0,
            "group": PAYLOADS[0],
            "category": PAYLOADS[1],
            "doc_id": 1,
            "tokens": PAYLOADS,
            "activations": [1, 2, 3],
            "max_activation": 3.0,
            "max_position": 2,
        }
    ]
    docs = pd.DataFrame({"doc_id": [1], "source": [PAYLOADS[1]]}).set_index("doc_id", drop=False)
    for out in (
        F.feature_header_html(row),
        F.examples_html(ex, documents=docs),
        F.token_chips_html(PAYLOADS, F.TASK, "promoted"),
        F.badge(PAYLOADS[0], F.HARM),
    ):
        assert "<script" not in out and "<img" not in out and "<a " not in out
    assert "No examples" in F.examples_html([])


def test_plotly_text_is_escaped_for_hover() -> None:
    df = _features(5)
    df.loc[2, "hover"] = F.esc(PAYLOADS[0])
    df.loc[1, "harm_category"] = PAYLOADS[1]
    fig = F.map_figure(df, "harm category")
    js = fig.to_json()
    assert "<script" not in js and "<img" not in json.dumps(json.loads(js))


def test_neighbour_table() -> None:
    nb = pd.DataFrame(
        {
            "feature": [4, 9],
            "label": ["x", None],
            "cosine": [0.5, 0.2],
            "percentile": [99.5, 40.0],
            "harm_score": [0.9, 0.5],
            "is_harmful": [True, False],
            "harm_category": pd.array(["fraud", None], dtype="string"),
        }
    )
    t = F.neighbour_table(nb, 0.25, extra_query="&cache=a")
    assert list(t["open"]) == ["feature?feature=4&cache=a", "feature?feature=9&cache=a"]
    assert list(t["× chance"]) == [2.0, 0.8] and list(t["above chance"]) == [True, False]
    assert list(t["NN percentile"]) == [99.5, 40.0]


def test_map_title_says_what_it_shows() -> None:
    """The map's PNG download carries its title: the colouring, the selection, and the decimation note."""
    plain = F.map_figure(_features(100), "task score")
    assert plain.layout.title.text == "Feature map coloured by task score"
    sel = F.map_figure(_features(100), "harm score", _sel())
    assert sel.layout.title.text == (
        "Feature map coloured by harm score, feature #3 selected with its neighbours above chance"
    )
    assert sel.layout.margin.t >= 48
    many = F.map_figure(_features(400), "harm score", _sel(), max_points=100, title="Story <map>")
    assert many.layout.title.text.startswith("Story &lt;map&gt;<br>")
    assert "100 of 400 features drawn" in many.layout.title.text


def test_map_layers_base_is_the_same_for_any_selection() -> None:
    """The page's map in three layers: the colours serialize to the same bytes whatever is selected, the points
    to the same bytes whatever is selected and whatever the colouring (so Streamlit's message cache sends a
    reference to them on a click, and to the points on a colour change); the overlay holds exactly the
    selection map_figure draws; all three on the same size, title room and axes."""
    df = _features(300)
    df["hover"] = [f"#{i} label {i}<br>harm 0.5<br>↑ tok" for i in range(300)]
    other = F.Selection(7, [1, 2], [0.9, 0.4], [False, True], threshold=0.25)
    colours, points, overlay = F.map_layers(df, "harm score", _sel())
    colours2, points2, overlay2 = F.map_layers(df, "harm score", other)
    assert colours.to_json() == colours2.to_json() and points.to_json() == points2.to_json()
    assert overlay.to_json() != overlay2.to_json()
    for mode in F.COLOR_MODES:
        c, p, _ = F.map_layers(df, mode, other)
        assert p.to_json() == points.to_json() and (c.to_json() == colours.to_json()) == (
            mode == "harm score"
        )
    # the colours carry no hover text nor ids; the points every feature once, invisible, with its hover text
    drawn = [t for t in colours.data if t.type == "scattergl"]
    assert [(t.text, t.customdata, t.hoverinfo) for t in drawn] == [(None, None, "skip")]
    (pts,) = points.data
    assert pts.name == "features" and pts.marker.color == "rgba(0,0,0,0)" and pts.type == "scattergl"
    assert np.asarray(pts.customdata).tolist() == list(range(300)), "every feature once"
    assert [
        f"#{i} {t}<br>{h}" for i, t, h in zip(pts.customdata, pts.text, pts.hovertext, strict=True)
    ] == list(df["hover"])
    assert np.array_equal(pts.x, df["umap_x"].to_numpy(np.float32))
    assert np.array_equal(pts.y, df["umap_y"].to_numpy(np.float32))
    # the colours' points are the same points, strongest on top
    order = np.argsort(df["harm_score"].to_numpy(np.float32), kind="stable")
    assert np.array_equal(drawn[0].x, pts.x[order]) and np.array_equal(drawn[0].y, pts.y[order])
    # plotly's own click selection does not restyle the points (the overlay shows the selection)
    assert pts.selected.marker.opacity == pts.unselected.marker.opacity == 1
    whole = F.map_figure(df, "harm score", _sel())
    n_base = len([t for t in whole.data if t.name == "harm score"])
    sel_traces = whole.data[n_base:]
    assert [t.name for t in overlay.data] == [t.name for t in sel_traces]
    assert {t.type for t in overlay.data} == {"scatter"}, "SVG: redrawing the overlay needs no WebGL context"
    for a, b in zip(overlay.data, sel_traces, strict=True):
        assert list(a.x) == list(b.x) and list(a.y) == list(b.y) and a.showlegend == b.showlegend
    assert edge_ends(overlay) == edge_ends(whole)
    assert [a.text for a in overlay.layout.annotations] == ["<b>#3</b>"]
    assert overlay.layout.height == colours.layout.height == points.layout.height
    assert overlay.layout.uirevision == colours.layout.uirevision == "map-harm score"
    assert points.layout.uirevision == "map"  # a colour change keeps the reader's pan and zoom
    # the overlay's title (clear on the page) names the selection: the page's saved image is drawn under it
    sel = _sel()
    assert overlay.layout.title.text == (
        f"{colours.layout.title.text}, feature #3 selected with its neighbours at cosine ≥ {sel.threshold:.3f}"
    )
    for layer in (overlay, points):
        assert layer.layout.title.font.color == "rgba(0,0,0,0)"
        assert layer.layout.paper_bgcolor == layer.layout.plot_bgcolor == "rgba(0,0,0,0)"
    # one plot area: the same fixed margins for the three, whatever the colouring (the page redraws none of them
    # to align it)
    margins = {
        json.dumps(layer.layout.margin.to_plotly_json(), sort_keys=True)
        for mode in F.COLOR_MODES
        for layer in F.map_layers(df, mode, _sel())
    }
    assert margins == {json.dumps({"autoexpand": False, "b": 10, "l": 10, "r": 125, "t": 48}, sort_keys=True)}
    for layer in (overlay, points, colours):
        assert list(layer.layout.xaxis.range) == list(layer.layout.yaxis.range) == [-1.08, 1.08]
    assert overlay.layout.showlegend and overlay.layout.legend.y == 0.99, "its legend inside, at the top"
    cats = F.map_layers(df, "harm category", _sel())[0]
    assert cats.layout.legend.itemclick is False and cats.layout.legend.itemdoubleclick is False
    assert (cats.layout.legend.y, cats.layout.legend.yanchor) == (0.01, "bottom"), (
        "inside the plot, bottom left"
    )


def test_map_layers_decimated_base_ignores_the_selection() -> None:
    """Above max_points the base is the fixed sample for every selection; the overlay still draws every
    neighbour above the threshold and the star, sampled or not."""
    df = _features(5000)
    far = F.Selection(4999, [10, 20, 30], [0.9, 0.8, 0.7], [True, False, True], threshold=0.1)
    near = F.Selection(0, [1], [0.9], [True], threshold=0.1)
    base, points, overlay = F.map_layers(df, "task score", far, max_points=500)
    assert base.to_json() == F.map_layers(df, "task score", near, max_points=500)[0].to_json()
    assert len(points.data[0].x) == 500 and "500 of 5,000 features drawn" in points.layout.title.text
    pts = next(t for t in base.data if t.name == "task score")
    assert len(pts.x) == 500 and any(t.type == "heatmap" for t in base.data)
    assert "500 of 5,000 features drawn" in base.layout.title.text
    assert edge_ends(overlay) == {10: True, 20: False, 30: True}
    star = next(t for t in overlay.data if t.name == "selected #4999")
    assert list(star.x) == [df.umap_x[4999]] and list(star.y) == [df.umap_y[4999]]
