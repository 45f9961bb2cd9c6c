"""Map page: the UMAP of all features; pick a feature (search or click) to see its neighbours."""

from __future__ import annotations

import html

import pandas as pd
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from explorer import figures as F
from explorer import state
from explorer.data import CacheData
from explorer.views import Page

PAGE = Page(title="Map", icon=":material/scatter_plot:", default=True)
KEY_CHART = "map_chart"


def clicked_feature(cache: CacheData) -> int | None:
    """A feature newly clicked on the map (read before drawing, so one rerun is enough)."""
    ev = st.session_state.get(KEY_CHART)
    pts = ((ev or {}).get("selection") or {}).get("points") or []
    if not pts:
        st.session_state["_map_applied_click"] = None  # a later click on the same dot counts again
    for p in pts:
        cd = p.get("customdata")
        cd = cd[0] if isinstance(cd, list) and cd else cd
        if isinstance(cd, (int, float)) and cache.valid(int(cd)):
            sig = (int(cd), p.get("curve_number"), p.get("point_index"))
            if st.session_state.get("_map_applied_click") != sig:
                st.session_state["_map_applied_click"] = sig
                return int(cd)
            return None
    return None


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
        snip = cache.snippet(f, int(r["ex_rank"]), int(r["ex_start"]), query)
        act = (
            f"{float(r['act_match']) * 100:.0f}% of its max on the match" if snip else "no example text match"
        )
        flag = ' <span class="fg-dense">dense</span>' if r["dense"] else ""
        items.append(
            f"<li><b>#{f}</b>{flag} <small>score {float(r['score']):.2f} · {act}</small>"
            f"<div class='fg-snip'>{snip or '<i>matched its ' + html.escape(str(r['match'])) + '</i>'}</div></li>"
        )
    return (
        "<style>.fg-results{max-height:300px;overflow-y:auto;padding-left:1.2em;font-size:0.85rem}"
        ".fg-snip{font-family:monospace;white-space:pre-wrap;color:#444}"
        ".fg-results mark{background:#ffe08a;padding:0 1px}"
        ".fg-dense{background:#eee;border-radius:3px;padding:0 4px;font-size:0.75rem}</style>"
        f"<ol class='fg-results' start='{int(page.attrs.get('first', 1))}'>{''.join(items)}</ol>"
    )


def search_results(cache: CacheData, query: str, where: DeltaGenerator) -> None:
    """The features matching the search box, ranked by match strength and paged; picking one selects
    it (once per query and pick)."""
    with st.spinner("Searching (the first text search indexes the examples once per server)…"):
        matches = cache.search(query)
    if matches.empty:
        where.info("No feature matches that search.")
        return
    q = query.strip().lower()
    n_pages = (len(matches) + PAGE_SIZE - 1) // PAGE_SIZE
    page_no = 1
    if n_pages > 1:
        page_no = int(
            where.number_input(f"Page (of {n_pages}, {PAGE_SIZE} a page)", 1, n_pages, 1, key=f"map_page:{q}")
        )
    page = matches.iloc[(page_no - 1) * PAGE_SIZE : page_no * PAGE_SIZE]
    page.attrs["first"] = (page_no - 1) * PAGE_SIZE + 1
    opts = page["feature"].astype(int).tolist()
    line = {int(r["feature"]): _result_line(r) for _, r in page.iterrows()}
    pick = where.selectbox(
        f"{len(matches):,} matching features",
        opts,
        format_func=lambda i: line[i],
        key=f"map_pick:{q}:{page_no}",
        help="Strongest match first. Score = 0.6 × the feature's activation on the matched text in its top examples (share of "
        "its max) + 0.3 if its label matches + 0.1 if its logit-lens tokens or explanation match, divided "
        "down for dense features (firing on over 10× the median share of tokens); ties go to the rarer "
        "feature.",
    )
    with where.expander("Where each result matched", expanded=False):
        st.html(snippets_html(cache, page, query))
    sig = (q, pick)
    if st.session_state.get("_map_applied_pick") != sig:
        st.session_state["_map_applied_pick"] = sig
        state.remember_feature(cache, int(pick))


def controls(cache: CacheData) -> tuple[str, float]:
    """Title, search (applied at once), colour mode and neighbour threshold: (colour mode, threshold)."""
    st.title("Map of features")
    st.caption(
        "Each dot is one feature of the sparse autoencoder — a direction the model uses to represent text. "
        "Features pointing in similar directions sit close together. Pick a feature by searching or by "
        "clicking a dot to see its nearest neighbours, harmful ones in red."
    )
    c_search, c_color, c_thr = st.columns([3, 1.2, 2], vertical_alignment="top")
    query = c_search.text_input(
        "Search features",
        key="map_q",
        placeholder="id, label, logit-lens token, or words from its top examples",
        help="Case-insensitive. Ranked by how strongly each feature matches: its activation on the "
        "matched text in its top examples, a label match, a logit-lens match; dense features are "
        "ranked down.",
    )
    color_by = c_color.selectbox("Colour by", list(F.COLOR_MODES), key="map_color")
    null = cache.null_cosine
    thr = c_thr.slider(
        "Show neighbours with cosine ≥",
        0.0,
        1.0,
        value=float(round(null, 3)),
        step=0.005,
        key=f"map_thr:{cache.name}",
        help=f"Starts at the chance level {null:.3g} ({cache.null_label}): the cosine random directions "
        "exceed only rarely. Raise it to keep only the closest neighbours.",
    )
    if query.strip():
        search_results(cache, query, c_search)
    return str(color_by), float(thr)


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
    st.dataframe(
        table[["feature", "cosine", "× chance", "category", "open", "label"]],
        hide_index=True,
        height=min(38 + 35 * max(1, len(table)), 330),
        key=f"map_nb:{feature}",
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


def render() -> None:
    cache = state.require_cache()
    clicked = clicked_feature(cache)
    if clicked is not None:
        state.remember_feature(cache, clicked)
    color_by, thr = controls(cache)
    feature = state.selected_feature(cache)
    nb = cache.neighbours_of(feature)
    sel = F.Selection(
        feature=feature,
        neighbours=nb["feature"].tolist(),
        cosines=nb["cosine"].tolist(),
        harmful=nb["is_harmful"].tolist(),
        threshold=thr,
    )
    left, right = st.columns([1.9, 1], gap="large")
    with left:
        fig = F.map_figure(cache.features, color_by, sel, max_points=state.max_points())
        st.plotly_chart(
            fig,
            key=KEY_CHART,
            on_select="rerun",
            selection_mode="points",
            config=state.chart_config(f"map-{feature}"),
        )
        st.caption(
            f"★ selected feature #{feature} · red dots: harmful neighbours · grey dots: other neighbours · "
            f"line width grows with cosine. Hover a dot for its label, scores and top tokens; click to select it."
        )
    with right:
        neighbour_panel(cache, feature, nb, thr)


if __name__ == "__main__":
    render()
