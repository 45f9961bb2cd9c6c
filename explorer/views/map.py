"""Map page: the UMAP of all features; pick a feature (search or click) to see its neighbours."""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from functools import partial

import pandas as pd
import streamlit as st
from streamlit import config

from explorer import figures as F
from explorer import state
from explorer.data import CacheData
from explorer.views import Page

PAGE = Page(title="Map", icon=":material/scatter_plot:", default=True)
KEY_CHART = "map_chart"
KEY_QUERY = "map_q"
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


def _on_query(cache: CacheData) -> None:
    """A new search selects its strongest match at once."""
    q = str(st.session_state.get(KEY_QUERY) or "")
    hits = cache.search(q, limit=1) if q.strip() else None
    if hits is not None and len(hits):
        state.remember_feature(cache, int(hits["feature"].iloc[0]))


def _on_pick(cache: CacheData, key: str) -> None:
    pick = st.session_state.get(key)
    if pick is not None and cache.valid(pick):
        select(cache, int(pick))


PAGE_SIZE = 50  # search results per page


def _result_line(r: pd.Series) -> str:
    """One result as plain text (a selectbox option is never HTML)."""
    label = str(r["label"]) if isinstance(r["label"], str) and r["label"] else "(no label)"
    dense = f" · dense: fires on {float(r['frequency']) * 100:.3g}% of tokens" if r["dense"] else ""
    return (
        f"#{int(r['feature'])} · {label[:70]} · matched {r['match']} · score {float(r['score']):.2f}{dense}"
    )


def snippets_html(cache: CacheData, page: pd.DataFrame, query: str) -> str:
    """The page's results with the matched example text (escaped, the match in <mark>)."""
    items = []
    for _, r in page.iterrows():
        f = int(r["feature"])
        snip = cache.snippet(f, int(r["ex_rank"]), int(r["ex_token"]), query)
        act = (
            f"{float(r['act_match']) * 100:.0f}% of its max on the match" if snip else "no example text match"
        )
        flag = ' <span class="fg-dense">dense</span>' if r["dense"] else ""
        items.append(
            f"<li><b>#{f}</b>{flag} <small>score {float(r['score']):.2f} · {act}</small>"
            f"<div class='fg-snip'>{snip or '<i>matched its ' + html.escape(str(r['match'])) + '</i>'}</div></li>"
        )
    return (
        "<style>.fg-results{max-height:230px;overflow-y:auto;padding-left:1.2em;font-size:0.85rem}"
        ".fg-snip{font-family:monospace;white-space:pre-wrap;color:#444}"
        ".fg-results mark{background:#ffe08a;padding:0 1px}"
        ".fg-dense{background:#eee;border-radius:3px;padding:0 4px;font-size:0.75rem}</style>"
        f"<ol class='fg-results' start='{int(page.attrs.get('first', 1))}'>{''.join(items)}</ol>"
    )


def search_results(cache: CacheData, query: str) -> None:
    """The features matching the search box, ranked by match strength, 50 a page, with where each
    matched; picking one selects it."""
    with st.spinner("Searching (the first text search indexes the examples once per server)…"):
        found = cache.search(query)
    # a feature whose examples contain the text but which fires on none of it (score 0) is not a match
    matches = found[found["score"] > 0]
    inert = len(found) - len(matches)
    if matches.empty:
        st.info(
            "No feature matches that search."
            + (f" {inert:,} features have it in their top examples but do not fire on it." if inert else "")
        )
        return
    if inert:
        st.caption(
            f"{inert:,} more features have it in their top examples but do not fire on it: not listed."
        )
    q = query.strip().lower()
    n_pages = (len(matches) + PAGE_SIZE - 1) // PAGE_SIZE
    page_no = 1
    if n_pages > 1:
        page_no = int(
            st.number_input(f"Page (of {n_pages}, {PAGE_SIZE} a page)", 1, n_pages, 1, key=f"map_page:{q}")
        )
    page = matches.iloc[(page_no - 1) * PAGE_SIZE : page_no * PAGE_SIZE]
    page.attrs["first"] = (page_no - 1) * PAGE_SIZE + 1
    opts = page["feature"].astype(int).tolist()
    line = {int(r["feature"]): _result_line(r) for _, r in page.iterrows()}
    current = st.session_state.get(f"_feature:{cache.name}")
    key = f"map_pick:{q}:{page_no}"
    st.selectbox(
        f"{len(matches):,} matching features",
        opts,
        index=opts.index(current) if current in opts else None,
        placeholder="Pick a result on this page",
        format_func=lambda i: line[i],
        key=key,
        on_change=_on_pick,
        args=(cache, key),
        help="Strongest match first. Score = 0.6 × the feature's activation on the matched text in its "
        "top examples (share of its max) + 0.3 if its label matches + 0.1 if its logit-lens tokens or "
        "explanation match, divided down for dense features (firing on over 10× the median share of "
        "tokens); ties go to the rarer feature.",
    )
    with st.expander("Where each result matched", expanded=True):
        st.html(snippets_html(cache, page, query))


def search_box(cache: CacheData) -> None:
    """The search box, then its results. Search, colour and threshold rerun the whole page: measured in
    Chromium (bench/bench_clicks.py), a fragment rerun asked for by key from their callbacks was slower
    than the page's own rerun."""
    st.text_input(
        "Search features",
        key=KEY_QUERY,
        placeholder="id, label, logit-lens token, or words from its top examples",
        on_change=_on_query,
        args=(cache,),
        help="Case-insensitive. Ranked by how strongly each feature matches: its activation on the "
        "matched text in its top examples, a label match, a logit-lens match; dense features are "
        "ranked down. A new search selects its strongest match.",
    )

    query = str(st.session_state.get(KEY_QUERY) or "")
    if query.strip():
        search_results(cache, query)


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
    colours, points, overlay = F.map_layers(cache.features, color_by, sel, max_points=state.max_points())
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
