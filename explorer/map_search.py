"""The map page's search box and its results: a new search selects its strongest match (an id jumps at once),
and the ranked matches page 50 at a time with where each matched."""

from __future__ import annotations

import html

import pandas as pd
import streamlit as st

from explorer import state
from explorer.data import CacheData
from explorer.data.search import pinned_id

KEY_QUERY = "map_q"


def query_pick(cache: CacheData, query: str) -> int | None:
    """The feature a search selects: its strongest match. An id ("17", "#17") is that feature without a
    ranking (the ranking puts it first: search.pinned_id)."""
    if not query.strip():
        return None
    pinned = pinned_id(query, cache.n)
    if pinned is not None:
        return pinned
    hits = cache.search(query, limit=1)
    return int(hits["feature"].iloc[0]) if len(hits) else None


def _on_query(cache: CacheData) -> None:
    """A new search selects its strongest match at once."""
    f = query_pick(cache, str(st.session_state.get(KEY_QUERY) or ""))
    if f is not None:
        state.remember_feature(cache, f)


def _on_pick(cache: CacheData, key: str) -> None:
    pick = st.session_state.get(key)
    if pick is not None and cache.valid(pick):
        state.remember_feature(cache, int(pick))


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
