"""Overlaps review: flagged task↔harmful pairs, side by side, with verdicts that persist in SQLite."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from explorer import claims as C
from explorer import figures as F
from explorer import state
from explorer.data import CacheData, cache_findings
from explorer.overlap_verdicts import verdicts_section
from explorer.pair_status import BOTH, feature_accent, feature_kind, num, pair_status
from explorer.playground_panel import playground_section
from explorer.review_table import export_csv, export_json, history_table, merge_reviews
from explorer.reviews import STATUSES, UNREVIEWED, ReviewError, ReviewStore
from explorer.views import Page

PAGE = Page(title="Overlaps review", icon=":material/fact_check:")
HISTORY_COLUMNS = [
    "id",
    "cache",
    "task_feature",
    "harmful_feature",
    "reviewer",
    "verdict",
    "note",
    "created_at",
]
TABLE_COLUMNS = [
    "status",
    "consensus",
    "risk",
    "task_feature",
    "harmful_feature",
    "cosine",
    "both_ways",
    "cosine_percentile",
    "coactivation",
    "harm_category",
    "task_label",
    "harmful_label",
    "reviewers",
]


def read_verdicts(cache: CacheData, store: ReviewStore | None) -> pd.DataFrame | None:
    """Every reviewer's verdicts of this cache, or None (with a message) when they cannot be read."""
    if store is None:
        return None
    if store.problem:
        st.warning(state.md_escape(store.problem), icon="⚠️")
    try:
        return store.verdicts(cache.name)
    except ReviewError as exc:  # a damaged file: the pairs are still shown, without verdicts
        st.warning(state.md_escape(exc), icon="⚠️")
        return None


def full_history(cache: CacheData, store: ReviewStore | None, readable: bool) -> pd.DataFrame:
    """Every verdict saved on this cache's pairs, oldest first, for the exports ([] if unreadable)."""
    try:
        hist = store.history(cache.name) if store is not None and readable else None
    except ReviewError:
        hist = None
    if hist is None:
        hist = pd.DataFrame(columns=HISTORY_COLUMNS)
    return history_table(hist, cache.overlaps)


# --- filters, table, exports -------------------------------------------------------------------
def filtered(table: pd.DataFrame, null_cosine: float, null_label: str) -> tuple[pd.DataFrame, str]:
    """The filter widgets applied to `table`, sorted as chosen; (the view, its sort column)."""
    f1, f2, f3, f4, f5 = st.columns([1.2, 1.2, 1.6, 1.6, 1.1], vertical_alignment="bottom")
    risk_max = float(np.nanmax(table["risk"])) if table["risk"].notna().any() else 1.0
    min_risk = f1.slider("risk ≥", 0.0, max(0.01, round(risk_max, 2)), 0.0, step=0.01, key="ov_risk")
    cos_lo = float(table["cosine"].min())
    min_cos = f2.slider("cosine ≥", 0.0, 1.0, round(max(0.0, cos_lo - 0.005), 3), step=0.005, key="ov_cos")
    cats = sorted(table["harm_category"].dropna().astype(str).unique())
    pick_cats = f3.multiselect("harm category", cats, key="ov_cats", placeholder="all categories")
    pick_status = f4.multiselect(
        "status",
        STATUSES,
        key="ov_status",
        placeholder="any status",
        help="disputed: the reviewers of the pair disagree",
    )
    sort_by = f5.selectbox(
        "sort by", ["risk", "cosine", "cosine_percentile", "coactivation", "task_feature"], key="ov_sort"
    )

    view = table[(table["risk"].fillna(0) >= min_risk) & (table["cosine"] >= min_cos)]
    if pick_cats:
        view = view[view["harm_category"].isin(pick_cats)]
    if pick_status:
        view = view[view["status"].isin(pick_status)]
    view = view.sort_values(sort_by, ascending=sort_by == "task_feature", na_position="last").reset_index(
        drop=True
    )
    n_rev = int((table["status"] != UNREVIEWED).sum())
    st.caption(
        f"{len(view):,} of {len(table):,} pairs shown · {n_rev:,} reviewed · flagged above the "
        f"{null_label} {null_cosine:.3g} · click a row to open it"
    )
    return view, str(sort_by)


def pairs_table(view: pd.DataFrame, sort_by: str, null_cosine: float, risk_max: float) -> None:
    """The sortable table; a row clicked in it (read before drawing: one rerun) opens that pair."""
    ev = st.session_state.get("ov_table")
    rows = ((ev or {}).get("selection") or {}).get("rows") or []
    sig = (tuple(rows), len(view), sort_by)
    if rows and st.session_state.get("_ov_applied") != sig and rows[0] < len(view):
        st.session_state["_ov_applied"] = sig
        r = view.iloc[rows[0]]
        state.set_qp(task=int(r["task_feature"]), harmful=int(r["harmful_feature"]))
        st.session_state["_ov_scroll"] = True

    disp = view[[c for c in TABLE_COLUMNS if c in view]].copy()
    disp["× chance"] = (view["cosine"] / null_cosine).round(2)
    st.dataframe(
        disp,
        hide_index=True,
        on_select="rerun",
        selection_mode="single-row",
        key="ov_table",
        height=300,
        column_order=[*TABLE_COLUMNS[:6], "× chance", *TABLE_COLUMNS[6:]],
        column_config={
            "risk": st.column_config.ProgressColumn(
                "risk", min_value=0.0, max_value=max(risk_max, 1e-6), format="%.3f", color="red"
            ),
            "consensus": st.column_config.TextColumn(
                help="single: one reviewer · agree / disagree: the verdicts of several reviewers"
            ),
            "harm_category": st.column_config.TextColumn("category"),
            "task_label": st.column_config.TextColumn("task label"),
            "harmful_label": st.column_config.TextColumn("harmful label"),
            "task_feature": st.column_config.NumberColumn(
                "task", format="#%d", help="the task side of the pair (the harmful side is the next column)"
            ),
            "both_ways": st.column_config.CheckboxColumn(
                "both ways",
                help="both features are task and harmful and the pair is flagged in both directions; it is "
                "listed once, in the direction with the higher risk ('task' names that direction's task side)",
            ),
            "harmful_feature": st.column_config.NumberColumn("harmful", format="#%d"),
            "cosine": st.column_config.NumberColumn(format="%.3f"),
            "cosine_percentile": st.column_config.NumberColumn("NN pct", format="%.1f", help=F.NN_PCT_HELP),
            "coactivation": st.column_config.NumberColumn(format="%.3f"),
        },
    )


def exports(cache: CacheData, table: pd.DataFrame, history: Callable[[], pd.DataFrame]) -> None:
    """CSV of the pairs, CSV of every save, JSON of both. Built on every run rather than deferred to the
    click: in Streamlit 1.67 a deferred download disables every download button until its file is made,
    and with the verdicts' 5-s refresh running, a browser test saw "Export JSON" stay disabled for 2 min
    after "Export history CSV" (a reload cleared it). The review tables are small; building them is cheap.
    An export holds what this page last drew: a save here reruns the page; another reviewer's save shows
    up at the next rerun (the verdicts box says within 5 s that one happened)."""
    e1, e2, e3, _ = st.columns([1, 1.3, 1, 3])
    saves = history()
    e1.download_button(
        "Export CSV",
        data=export_csv(table),
        file_name=f"{cache.name}-reviews.csv",
        mime="text/csv",
        icon=":material/download:",
        help="the pairs with their consensus",
    )
    e2.download_button(
        "Export history CSV",
        data=export_csv(saves),
        file_name=f"{cache.name}-review-history.csv",
        mime="text/csv",
        icon=":material/download:",
        help="every verdict ever saved, who and when, oldest first",
    )
    e3.download_button(
        "Export JSON",
        data=export_json(table, saves),
        file_name=f"{cache.name}-reviews.json",
        mime="application/json",
        icon=":material/download:",
        help="the pairs and the full history",
    )


def table_section(
    cache: CacheData, store: ReviewStore | None, readable: bool, table: pd.DataFrame
) -> pd.DataFrame:
    """Filters, the sortable table (a click opens the pair) and the exports; returns the filtered view."""
    view, sort_by = filtered(table, cache.null_cosine, cache.null_label)
    risk_max = float(np.nanmax(table["risk"])) if table["risk"].notna().any() else 1.0
    pairs_table(view, sort_by, cache.null_cosine, risk_max)
    exports(cache, table, lambda: full_history(cache, store, readable))
    return view


# --- the open pair ---------------------------------------------------------------------------------
def open_pair(cache: CacheData, view: pd.DataFrame, table: pd.DataFrame) -> tuple[int, int]:
    """The pair in the URL (else the first shown) and a picker to open another."""
    t, h = state.qp_int("task"), state.qp_int("harmful")
    if t is None or h is None or not (cache.valid(t) and cache.valid(h)):
        first = view.iloc[0] if len(view) else table.iloc[0]
        t, h = int(first["task_feature"]), int(first["harmful_feature"])
        state.set_qp(task=t, harmful=h)
    flagged = set(zip(table["task_feature"].astype(int), table["harmful_feature"].astype(int), strict=False))
    if (t, h) not in flagged and (h, t) in flagged:  # pairs are undirected: open the flagged order
        st.info(f"Pairs are undirected: #{t} ↔ #{h} is listed as task #{h} ↔ harmful #{t}.", icon="↔️")
        t, h = h, t
        state.set_qp(task=t, harmful=h)
    pairs = list(zip(view["task_feature"].astype(int), view["harmful_feature"].astype(int), strict=False))
    if (t, h) not in pairs:
        pairs.insert(0, (t, h))
    pick = st.columns([2, 3])[0].selectbox(
        "Open pair",
        pairs,
        index=pairs.index((t, h)),
        key=f"ov_pick:{t}:{h}",
        # only a flagged pair has a task and a harmful side; a pair from a link is named as it is
        format_func=lambda p: (
            f"task #{p[0]} ↔ harmful #{p[1]}" if p in flagged else f"#{p[0]} ↔ #{p[1]} (not flagged)"
        ),
    )
    if pick != (t, h):
        state.set_qp(task=pick[0], harmful=pick[1])
        st.session_state["_ov_scroll"] = True
        st.rerun()
    return t, h


def pair_metrics(cache: CacheData, pair: dict[str, Any], cosine: float, flagged: bool) -> None:
    """risk, cosine, NN percentile, co-activation, P(harmful | task); '—' where the cache has no number."""
    m = st.columns(5)
    risk_help = "excess cosine over chance (scaled 0–1) × (2·harm − 1) × (2·task − 1)"
    m[0].metric(
        "risk", num(pair.get("risk"), ".3f"), help=risk_help if flagged else "only flagged pairs have one"
    )
    caption = F.closeness_caption(cosine, cache.null_cosine, cache.null_label, pair.get("cosine_percentile"))
    m[1].metric("cosine", num(cosine, ".3f"), help=caption)
    m[2].metric("NN percentile", num(pair.get("cosine_percentile"), ".1f"), help=F.NN_PCT_HELP)
    m[3].metric(
        "co-activation",
        num(pair.get("coactivation"), ".3f"),
        help="Jaccard index of the tokens on which both fire",
    )
    m[4].metric("P(harmful fires | task fires)", num(pair.get("cond_coactivation"), ".3f"))
    st.caption("Decoder " + caption + ".")


# our own constant markup (no cache text): the anchor scrolls itself to the top of the view
SCROLL_HTML = (
    '<span id="ov-open-pair"></span><script>'
    'document.getElementById("ov-open-pair")?.scrollIntoView({block: "start", behavior: "instant"});</script>'
)
KIND_WORDS = {
    BOTH: "task and harmful",
    "harmful": "harmful",
    "task": "task",
    "neither": "neither task nor harmful",
}


def pair_view(cache: CacheData, t: int, h: int) -> bool:
    """The pair's numbers, then both features side by side with their top examples; whether it is flagged.
    An unflagged pair says so and why, and each side is drawn in its true colour, not its URL role."""
    status = pair_status(cache, t, h, cache_findings(cache).flag_scope)
    pair = (
        cache.pair(t, h)
        if status.flagged
        else {"cosine_percentile": cache.neighbors.percentile(status.cosine)}
    )
    t_row, h_row = cache.row(t), cache.row(h)
    if st.session_state.pop("_ov_scroll", False):  # a pair just picked: bring it into view
        st.html(SCROLL_HTML, unsafe_allow_javascript=True)
    st.divider()
    if status.flagged:
        st.subheader(f"Task #{t} ↔ harmful #{h}")
    else:
        st.subheader(f"#{t} ↔ #{h}: not a flagged pair")
        st.warning(
            state.md_escape(
                f"Not flagged: this cache does not flag the pair #{t} ↔ #{h} (it is not in overlaps.parquet): "
                + "; ".join(status.reasons)
                + "."
            ),
            icon="ℹ️",
        )
    pair_metrics(cache, pair, float(pair["cosine"]) if status.flagged else status.cosine, status.flagged)

    a, b = st.columns(2, gap="large")
    for col, f, r, role in ((a, t, t_row, "task"), (b, h, h_row, "harmful")):
        accent = feature_accent(
            r
        )  # what the feature is, never the side of the pair (style's one colour rule)
        color = {None: F.TASK if role == "task" else F.HARM, BOTH: F.HARM}.get(accent, accent)
        with col:
            st.html(F.feature_header_html(r, role=role, accent=accent))
            if not status.flagged:
                st.caption(f"#{f} is {KIND_WORDS[feature_kind(r)]}")
            st.caption(
                f"harm {r['harm_score']:.2f} · task {r['task_score']:.2f} · fires on {r['frequency'] * 100:.3g}%"
            )
            ex = [e for e in cache.examples_of(f) if e.get("kind") == "top"]
            st.html(F.examples_html(ex[:6], color=str(color), window=20, documents=cache.documents))
            st.page_link(
                state.PAGES["feature"],
                label=f"Open #{f} on the feature page",
                icon=":material/open_in_new:",
                query_params=state.link_params(feature=f),
            )
    return status.flagged


# --- steering check --------------------------------------------------------------------------------
def steering_section(cache: CacheData, t: int, h: int) -> None:
    """`steering/task-<t>.parquet` in the cache, if there: observed vs predicted Δa and slope/R² per α."""
    from explorer.figures.steering import load_steering, steering_figure, summarize

    path = cache.path / "steering" / f"task-{t}.parquet"
    with st.expander("Steering check", expanded=False):
        if not path.is_file():
            sae = (cache.manifest.get("sae") or {}).get("source") or "<sae>"
            hook = (
                cache.manifest.get("hook") or (cache.manifest.get("sae") or {}).get("hook_name") or "<hook>"
            )
            cmd = (
                f"featuregeom steer --model smollm2 --sae {sae} --hook {hook} --task-feature {t} "
                f"--harmful-feature {h} --out {cache.path / 'steering' / f'task-{t}.parquet'}"
            )
            st.caption(f"No steering result for #{t} in this cache. Produce it with: {state.md_escape(cmd)}")
            st.code(cmd, language="bash")
            return
        try:
            df = load_steering(path)
            fig = steering_figure(df, t, harmful_feature=h, show_task=False)
            summ = summarize(df)
        except Exception as exc:  # a file added by hand: report it, keep the page
            st.warning(
                f"Could not read {state.md_escape(path.name)}: {state.md_escape(f'{type(exc).__name__}: {exc}')}"
            )
            return
        st.plotly_chart(fig, config=state.chart_config(f"steering-{t}-{h}"), key=f"ov_steer:{t}:{h}")
        sel = df[df["feature"] == h].sort_values("alpha")
        if len(sel):
            last = sel.iloc[-1]
            st.caption(
                state.md_escape(
                    f"Adding the task direction at strength α={float(last['alpha']):g} changes harmful feature #{h} "
                    f"by {float(last['observed']):+.4g} vs {float(last['predicted_gated']):+.4g} predicted "
                    f"(first order); slope and R² below fit all features, observed = slope · predicted."
                )
            )
        else:
            st.caption(
                state.md_escape(
                    f"Harmful feature #{h} is not in this steering result; slope and R² below "
                    f"fit all features, observed = slope · predicted (first order)."
                )
            )
        tab = summ[summ["subset"] == "all (gated)"][["alpha", "alpha_abs", "slope", "r2", "n"]]
        st.dataframe(
            tab.rename(columns={"alpha": "α", "alpha_abs": "|α|", "r2": "R²"}),
            hide_index=True,
            key=f"ov_steer_tab:{t}:{h}",
        )
        st.caption(
            state.md_escape(
                f"Read from {path.relative_to(cache.path)} without checksum verification: files added to a cache "
                f"after it was built are not in its manifest."
            )
        )


def render() -> None:
    cache = state.require_cache()
    store = state.review_store(cache)
    st.title("Overlaps review")
    ov = cache.overlaps
    what = (
        f"a task feature whose decoder direction is above the chance level ({cache.null_label}, "
        f"{cache.null_cosine:.3g}) to a harmful feature's"
    )
    st.caption(  # the table's legend only when there is a table
        f"Each row is a flagged pair: {what}; its NN percentile says whether it is also closer than a typical "
        "feature's nearest neighbour. Open a pair, read what makes each fire, and record whether the overlap "
        "is real and worrying (confirmed), harmless (benign), or unclear."
        if len(ov)
        else f"A flagged pair would be {what}."
    )
    if ov.empty:
        st.info(
            state.md_escape(C.flagged_sentence(cache_findings(cache)))
            + " Explore the map to look at features and their neighbours; a pair opened from a link "
            "(?task=…&harmful=…) can still be looked at here."
        )
        url_pair = (state.qp_int("task"), state.qp_int("harmful"))
        if None in url_pair or not all(cache.valid(x) for x in url_pair):
            st.stop()
    verdicts_now = read_verdicts(cache, store)
    readable = verdicts_now is not None
    table = merge_reviews(ov, pd.DataFrame() if verdicts_now is None else verdicts_now)
    view = table_section(cache, store, readable, table) if len(table) else table
    t, h = open_pair(cache, view, table)
    flagged = pair_view(cache, t, h)
    steering_section(cache, t, h)
    verdicts_section(cache, store, readable, t, h, flagged)
    playground_section(cache, [t, h], key=f"pg:{t}:{h}")


if __name__ == "__main__":
    render()
