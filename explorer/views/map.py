"""Map page: the UMAP of all features; pick a feature (search or click) to see its neighbours."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from streamlit import config

from explorer import figures as F
from explorer import state
from explorer.data import CacheData
from explorer.map_search import search_box
from explorer.views import Page

PAGE = Page(title="Map", icon=":material/scatter_plot:", default=True)
KEY_CHART = "map_chart"
KEY_COLOR = "map_color"
ENV_NO_FRAGMENTS = (
    "FEATUREGEOM_NO_FRAGMENTS"  # "1": every click reruns the whole page (the benchmark's baseline)
)
VIEW = "map-view"  # the page's fragment: the map and the side panel


def fragments_on() -> bool:
    """Fragments unless turned off, and not under AppTest: it rebuilds its page registry on every run,
    so a fragment-only rerun there cannot resolve st.page_link (a real server keeps it)."""
    return os.environ.get(ENV_NO_FRAGMENTS, "") in ("", "0") and not config.get_option("global.appTest")


def part(key: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """st.fragment(key=...) so that a click reruns only the map and the side panel, not the page; the
    identity when fragments are off."""
    return st.fragment(key=key) if fragments_on() else (lambda fn: fn)


def select(cache: CacheData, feature: int) -> None:
    """Make `feature` the one in view (session and URL). From a widget inside the view fragment (a
    dot, a neighbour row) the default rerun is that fragment alone: one run, panel drawn first."""
    state.remember_feature(cache, int(feature))


def clicked_feature(cache: CacheData) -> int | None:
    """The feature of the map's current selection (a clicked dot), if any."""
    ev = st.session_state.get(KEY_CHART)
    pts = ((ev or {}).get("selection") or {}).get("points") or []
    for p in pts:
        cd = p.get("customdata")
        cd = cd[0] if isinstance(cd, list) and cd else cd
        if isinstance(cd, (int, float)) and cache.valid(int(cd)):
            return int(cd)
    return None


def _on_click(cache: CacheData) -> None:
    f = clicked_feature(cache)
    if f is not None:
        select(cache, f)


def _on_row(cache: CacheData, key: str, features: list[int]) -> None:
    rows = ((st.session_state.get(key) or {}).get("selection") or {}).get("rows") or []
    if rows and 0 <= rows[0] < len(features):
        select(cache, features[rows[0]])


def controls(cache: CacheData) -> None:
    """Title, search, colour mode and neighbour threshold (the view reads them from session state)."""
    st.title("Map of features")
    st.caption(
        "Each dot is one feature of the sparse autoencoder — a direction the model uses to represent text. "
        "Features pointing in similar directions sit close together. Pick a feature by searching or by "
        "clicking a dot to see its nearest neighbours, harmful ones in red."
    )
    c_search, c_color, c_thr = st.columns([3, 1.2, 2], vertical_alignment="top")
    with c_search:
        search_box(cache)
    c_color.selectbox(
        "Colour by",
        list(F.COLOR_MODES),
        key=KEY_COLOR,
    )
    null = cache.null_cosine
    c_thr.slider(
        "Show neighbours with cosine ≥",
        0.0,
        1.0,
        value=float(round(null, 3)),
        step=0.005,
        format="%.3f",  # the chance level to 3 places, as the panel says it (0.275, not 0.28)
        key=threshold_key(cache),
        help=f"Starts at the chance level {null:.3g} ({cache.null_label}): the cosine random directions "
        "exceed only rarely. Raise it to keep only the closest neighbours.",
    )


def threshold_key(cache: CacheData) -> str:
    return f"map_thr:{cache.name}"


def threshold(cache: CacheData) -> float:
    return float(st.session_state.get(threshold_key(cache), round(cache.null_cosine, 3)))


def neighbour_panel(cache: CacheData, feature: int, nb: pd.DataFrame, thr: float) -> None:
    """The selected feature's header and scores, its neighbours above the threshold, and links."""
    shown = nb[nb["cosine"] >= thr]
    harm_shown = shown[shown["is_harmful"]]
    row = cache.row(feature)
    st.html(F.feature_header_html(row))
    m1, m2, m3 = st.columns(3)
    m1.metric(
        "task",
        f"{row['task_score']:.2f}",
        help="task score: AUROC, task vs control text (0.5 = no difference)",
    )
    m2.metric(
        "harm", f"{row['harm_score']:.2f}", help="harm score: AUROC, harmful vs benign text (0.5 = none)"
    )
    m3.metric("fires on", f"{row['frequency'] * 100:.3g}%", help="share of all tokens")
    st.markdown(
        f"**{len(shown)} of {len(nb)} neighbours** have cosine ≥ {thr:.3f}; "
        f"**:red[{len(harm_shown)} harmful]**."
    )
    if len(harm_shown):
        top = harm_shown.iloc[0]
        st.caption(
            f"Closest harmful neighbour #{int(top['feature'])}: "
            f"{F.closeness_caption(float(top['cosine']), cache.null_cosine, cache.null_label, top['percentile'])}."
        )
    table = F.neighbour_table(shown, cache.null_cosine, extra_query=state.extra_query())
    key = f"map_nb:{feature}"
    st.dataframe(
        table[["feature", "cosine", "× chance", "category", "open", "label"]],
        hide_index=True,
        height=min(38 + 35 * max(1, len(table)), 330),
        key=key,
        on_select=partial(_on_row, cache, key, table["feature"].astype(int).tolist()),
        selection_mode="single-row",
        column_config={
            "open": st.column_config.LinkColumn("open", display_text="open ↗", width="small"),
            "cosine": st.column_config.ProgressColumn("cosine", min_value=0.0, max_value=1.0, format="%.3f"),
            "feature": st.column_config.NumberColumn("feature", format="#%d", width="small"),
        },
    )
    st.page_link(
        state.PAGES["feature"],
        label=f"Open feature #{feature}: examples, histogram, logit lens",
        icon=":material/text_snippet:",
        query_params=state.link_params(feature=feature),
    )
    if len(harm_shown):
        pair_links(cache, feature, int(harm_shown.iloc[0]["feature"]))


def pair_links(cache: CacheData, feature: int, h: int) -> None:
    """Links from the feature and its closest harmful neighbour to the pair's other views; the review and
    the story only for a pair the cache flags (overlaps.parquet)."""
    st.page_link(
        state.PAGES["feature"],
        label=f"Compare side by side with harmful #{h}",
        icon=":material/compare:",
        query_params=state.link_params(feature=feature, compare=h),
    )
    flagged = cache.overlaps[
        (cache.overlaps["task_feature"] == feature) & (cache.overlaps["harmful_feature"] == h)
    ]
    if not len(flagged):
        return
    st.page_link(
        state.PAGES["overlaps"],
        label=f"Review the flagged pair #{feature} ↔ #{h}",
        icon=":material/fact_check:",
        query_params=state.link_params(task=feature, harmful=h),
    )
    st.page_link(
        state.PAGES["story"],
        label="Present this pair as a story",
        icon=":material/slideshow:",
        query_params=state.link_params(task=feature, harmful=h, step=1),
    )


KEY_LAYERS, KEY_OVERLAY, KEY_COLOURS = "map_layers", "map_overlay", "map_colours"
# Three charts one over the other (figures.map_layers): the colours at the bottom, the selection overlay,
# and on top the invisible points (KEY_CHART) that take every pointer event (hover, click, pan, zoom); the
# two below let them through. The three have the same fixed margins, and the script keeps the axes of the
# two below on the points' while the reader pans or zooms (a script relayout of the points themselves made
# Chromium's next clicks on them go unheard, so they are never redrawn from here). The points keep their clicked dot as their widget value between reruns (their spec
# does not change), and Streamlit sends a click only when that value changes: once the page has moved to
# another feature (a neighbour row, the search), the script clears that value and plotly's own selection
# (as a double click on the map does), so a click on that dot selects it again. The points' camera button
# saves what the reader sees: the script takes the click before plotly does and draws the colours and the
# overlay at the colours' size, the overlay over the colours, into one PNG (or one SVG, the overlay's <svg>
# over the colours'), under the overlay's title (which names the selection) and the name feature-N-map. It
# reads plotly's state only (no page data) and runs once per browser tab.
_LAYERS_HTML = (
    "<style>.st-key-OVERLAY_KEY{position:absolute;top:0;left:0;right:0;z-index:2}"
    ".st-key-BASE_KEY{position:absolute;top:0;left:0;right:0;z-index:3}"
    ".st-key-LAYERS_KEY{position:relative}"
    ".st-key-OVERLAY_KEY,.st-key-OVERLAY_KEY *,.st-key-COLOURS_KEY,.st-key-COLOURS_KEY *"
    "{pointer-events:none!important}</style>"
    """<script>(() => {
  if (window.__fgMapLayers) return;
  window.__fgMapLayers = true;
  const plot = (k) => document.querySelector(".st-key-" + k + " .js-plotly-plot");
  const id = (cd) => (Array.isArray(cd) ? cd[0] : cd);
  let clicked = null, shown = false;
  const selected = (o) => {
    const star = ((o && o.data) || []).find((t) => String(t.name).startsWith("selected #"));
    return star && star.customdata ? id(star.customdata[0]) : null;
  };
  const image = (u) => new Promise((ok, no) => {
    const i = new Image();
    i.onload = () => ok(i);
    i.onerror = no;
    i.src = u;
  });
  const save = async (b, o, c) => {
    const opts = b._context.toImageButtonOptions || {}, L = c._fullLayout, P = window.Plotly;
    const fmt = opts.format === "svg" ? "svg" : "png";
    const size = {format: fmt, width: L.width, height: L.height, scale: opts.scale || 1};
    const title = Object.assign({}, c.layout.title, {text: o.layout.title.text});
    const urls = await Promise.all([
      P.toImage({data: c.data, layout: Object.assign({}, c.layout, {title: title})}, size),
      P.toImage({data: o.data, layout: o.layout}, size),
    ]);
    let blob;
    if (fmt === "svg") {
      const parse = (u) => new DOMParser().parseFromString(
        decodeURIComponent(u.slice(u.indexOf(",") + 1)), "image/svg+xml").documentElement;
      const [bs, os] = urls.map(parse), out = bs.cloneNode(false);
      out.appendChild(bs);
      out.appendChild(os);
      blob = new Blob([new XMLSerializer().serializeToString(out)], {type: "image/svg+xml"});
    } else {
      const [bi, oi] = await Promise.all(urls.map(image)), c = document.createElement("canvas");
      c.width = bi.naturalWidth;
      c.height = bi.naturalHeight;
      const ctx = c.getContext("2d");
      ctx.drawImage(bi, 0, 0);
      ctx.drawImage(oi, 0, 0, c.width, c.height);
      blob = await new Promise((ok) => c.toBlob(ok, "image/png"));
    }
    const cur = selected(o), a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = (cur !== null ? "feature-" + cur + "-map" : opts.filename || "feature-map") + "." + fmt;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
  };
  const camera = (e) => {
    const btn = e.target && e.target.closest ? e.target.closest(".modebar-btn") : null;
    const b = plot("BASE_KEY"), o = plot("OVERLAY_KEY"), c = plot("COLOURS_KEY");
    if (!btn || !String(btn.getAttribute("data-title")).startsWith("Download plot") || !o || !b || !c) return;
    e.stopPropagation();  // plotly's own handler would save the invisible points alone
    e.preventDefault();
    save(b, o, c).catch((err) => console.error("map image", err));
  };
  const sync = () => {
    const b = plot("BASE_KEY"), o = plot("OVERLAY_KEY"), c = plot("COLOURS_KEY");
    if (!b || !o || !c || !b._fullLayout || !o._fullLayout || !c._fullLayout || !window.Plotly) return;
    for (const gd of [b, o, c]) if (!gd.__fgSync) {
      gd.__fgSync = true;
      ["plotly_relayout", "plotly_relayouting", "plotly_afterplot"].forEach((e) => gd.on(e, sync));
      if (gd === b) gd.addEventListener("click", camera, true);
      if (gd === b) gd.on("plotly_click", (e) => {
        clicked = e && e.points && e.points.length ? id(e.points[0].customdata) : null;
        shown = false;
      });
    }
    const cur = selected(o);
    if (clicked !== null && cur !== null) {
      if (cur === clicked) shown = true;
      else if (shown) {
        clicked = null;
        window.Plotly.restyle(b, {selectedpoints: [null]});
        b.emit("plotly_deselect", null);
      }
    }
    // the axes follow the points, which the reader pans and zooms; the three share fixed margins
    // (figures.map_layers), so the points, which take the clicks, are never redrawn from here
    const B = b._fullLayout, eq = (u, v) => u[0] === v[0] && u[1] === v[1];
    for (const gd of [c, o]) {
      const L = gd._fullLayout;
      if (!eq(L.xaxis.range, B.xaxis.range) || !eq(L.yaxis.range, B.yaxis.range))
        window.Plotly.relayout(gd, {"xaxis.range": B.xaxis.range.slice(), "yaxis.range": B.yaxis.range.slice()});
    }
  };
  setInterval(sync, 250);
})();</script>"""
)
LAYERS_HTML = (
    _LAYERS_HTML.replace("LAYERS_KEY", KEY_LAYERS)
    .replace("OVERLAY_KEY", KEY_OVERLAY)
    .replace("BASE_KEY", KEY_CHART)
    .replace("COLOURS_KEY", KEY_COLOURS)
)


def map_layers(
    cache: CacheData, color_by: str, sel: F.Selection, max_points: int
) -> tuple[go.Figure, go.Figure, go.Figure]:
    """figures.map_layers of the cache: the colours and the points, which no selection changes, built once
    per cache (and colouring) and shared by every session (st.plotly_chart only reads a figure), kept
    (figures.KeptFigure: no deep copy on each run); the overlay drawn for `sel`."""
    colours = cache.derived(
        ("map colours", color_by, max_points),
        lambda: F.keep(F.colour_layer(cache.features, color_by, max_points)),
    )
    points = cache.derived(
        ("map points", max_points), lambda: F.keep(F.points_layer(cache.features, max_points))
    )
    return colours, points, F.overlay_layer(cache.features, color_by, sel, max_points)


def draw_map(cache: CacheData, feature: int, nb: pd.DataFrame) -> None:
    """The map as three charts, one over the other (figures.map_layers): the colours, the selection overlay
    (the only chart a click changes) and the invisible points that the reader hovers and clicks (the same
    for any selection and colouring: Streamlit's message cache sends a reference to a chart it has sent).
    A click on a dot reaches the points: it selects that dot."""
    sel = F.Selection(
        feature=feature,
        neighbours=nb["feature"].tolist(),
        cosines=nb["cosine"].tolist(),
        harmful=nb["is_harmful"].tolist(),
        threshold=threshold(cache),
    )
    color_by = str(st.session_state.get(KEY_COLOR) or next(iter(F.COLOR_MODES)))
    colours, points, overlay = map_layers(cache, color_by, sel, state.max_points())
    st.html(LAYERS_HTML, unsafe_allow_javascript=True)
    still = {"displayModeBar": False, "staticPlot": True}
    with st.container(key=KEY_LAYERS):
        # the small overlay first, then the colours: when a larger chart is sent in full (first view, colour
        # change) what changed does not wait behind it; the two upper charts are absolutely placed, so the
        # order does not change the layout
        st.plotly_chart(overlay, key=KEY_OVERLAY, config=still)
        st.plotly_chart(colours, key=KEY_COLOURS, config=still)
        st.plotly_chart(
            points,
            key=KEY_CHART,
            on_select=partial(_on_click, cache),
            selection_mode="points",
            config=state.chart_config("feature-map"),
        )
    st.caption(
        f"★ selected feature #{feature} · red dots: harmful neighbours · grey dots: other neighbours · "
        "line width grows with cosine. Hover a dot for its label, scores and top tokens; click to "
        "select it."
    )


def view_part(cache: CacheData) -> None:
    """The map and the side panel: one fragment, so a click on a dot or a neighbour row reruns only it
    (one run, no page-level work), the panel before the map."""

    @part(VIEW)
    def _view() -> None:
        feature = state.selected_feature(cache)
        nb = cache.neighbours_of(feature)
        left, right = st.columns([1.9, 1], gap="large")
        with right:  # drawn first: after a click, the panel is what the reader waits for
            neighbour_panel(cache, feature, nb, threshold(cache))
        with left:
            draw_map(cache, feature, nb)

    _view()


def render() -> None:
    cache = state.require_cache()
    controls(cache)
    view_part(cache)


if __name__ == "__main__":
    render()
