"""Overlaps review: flagged task↔harmful pairs, side by side, with verdicts that persist in SQLite."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from explorer import figures as F
from explorer import state
from explorer.reviews import UNREVIEWED, VERDICTS, ReviewError, export_csv, export_json, merge_reviews

cache = state.require_cache()
store = state.review_store(cache)

st.title("Overlaps review")
st.caption("Each row is a flagged pair: a task feature whose decoder direction is unusually close — above the "
           "chance level — to a harmful feature's. Open a pair, read what makes each fire, and record whether "
           "the overlap is real and worrying (confirmed), harmless (benign), or unclear.")

ov = cache.overlaps
url_pair = (state.qp_int("task"), state.qp_int("harmful"))
if ov.empty:
    st.info("This cache has no flagged pairs: no task feature has a harmful neighbour above the null threshold. "
            "Explore the map to look at near misses; a pair opened from a link (?task=…&harmful=…) can still be "
            "reviewed here.")
    if None in url_pair or not all(cache.valid(x) for x in url_pair):
        st.stop()

current = store.current() if store is not None else None
table = merge_reviews(ov, current) if current is not None else ov.assign(status=UNREVIEWED)


# --- filters, table, exports -------------------------------------------------------------------
def table_section(table: pd.DataFrame) -> pd.DataFrame:
    """Filters, the sortable table (a click opens the pair) and the exports; returns the filtered view."""
    f1, f2, f3, f4, f5 = st.columns([1.2, 1.2, 1.6, 1.6, 1.1], vertical_alignment="bottom")
    risk_max = float(np.nanmax(table["risk"])) if table["risk"].notna().any() else 1.0
    min_risk = f1.slider("risk ≥", 0.0, max(0.01, round(risk_max, 2)), 0.0, step=0.01, key="ov_risk")
    cos_lo = float(table["cosine"].min())
    min_cos = f2.slider("cosine ≥", 0.0, 1.0, round(max(0.0, cos_lo - 0.005), 3), step=0.005, key="ov_cos")
    cats = sorted(table["harm_category"].dropna().astype(str).unique())
    pick_cats = f3.multiselect("harm category", cats, key="ov_cats", placeholder="all categories")
    statuses = [UNREVIEWED, *VERDICTS]
    pick_status = f4.multiselect("status", statuses, key="ov_status", placeholder="any status")
    sort_by = f5.selectbox("sort by", ["risk", "cosine", "z", "coactivation", "task_feature"], key="ov_sort")

    view = table[(table["risk"].fillna(0) >= min_risk) & (table["cosine"] >= min_cos)]
    if pick_cats:
        view = view[view["harm_category"].isin(pick_cats)]
    if pick_status:
        view = view[view["status"].isin(pick_status)]
    view = view.sort_values(sort_by, ascending=sort_by == "task_feature", na_position="last").reset_index(drop=True)
    n_rev = int((table["status"] != UNREVIEWED).sum())
    st.caption(f"{len(view):,} of {len(table):,} pairs shown · {n_rev:,} reviewed · chance-level cosine "
               f"{cache.null_cosine:.3g} · click a row to open it")

    # a row clicked in the table (read before drawing: one rerun)
    ev = st.session_state.get("ov_table")
    rows = ((ev or {}).get("selection") or {}).get("rows") or []
    sig = (tuple(rows), len(view), sort_by)
    if rows and st.session_state.get("_ov_applied") != sig and rows[0] < len(view):
        st.session_state["_ov_applied"] = sig
        r = view.iloc[rows[0]]
        state.set_qp(task=int(r["task_feature"]), harmful=int(r["harmful_feature"]))

    cols = ["status", "risk", "task_feature", "harmful_feature", "cosine", "z", "coactivation", "harm_category",
            "task_label", "harmful_label", "reviewer"]
    disp = view[[c for c in cols if c in view]].copy()
    disp["× chance"] = (view["cosine"] / cache.null_cosine).round(2)
    st.dataframe(disp, hide_index=True, on_select="rerun", selection_mode="single-row", key="ov_table", height=300,
                 column_order=["status", "risk", "task_feature", "harmful_feature", "cosine", "× chance", "z",
                               "coactivation", "harm_category", "task_label", "harmful_label", "reviewer"],
                 column_config={
                     "risk": st.column_config.ProgressColumn("risk", min_value=0.0, max_value=max(risk_max, 1e-6),
                                                             format="%.3f", color="red"),
                     "harm_category": st.column_config.TextColumn("category"),
                     "task_label": st.column_config.TextColumn("task label"),
                     "harmful_label": st.column_config.TextColumn("harmful label"),
                     "task_feature": st.column_config.NumberColumn("task", format="#%d"),
                     "harmful_feature": st.column_config.NumberColumn("harmful", format="#%d"),
                     "cosine": st.column_config.NumberColumn(format="%.3f"),
                     "z": st.column_config.NumberColumn(format="%.1f"),
                     "coactivation": st.column_config.NumberColumn(format="%.3f"),
                 })

    e1, e2, _ = st.columns([1, 1, 4])
    e1.download_button("Export CSV", data=lambda: export_csv(table), file_name=f"{cache.name}-reviews.csv",
                       mime="text/csv", icon=":material/download:")
    e2.download_button("Export JSON", data=lambda: export_json(table), file_name=f"{cache.name}-reviews.json",
                       mime="application/json", icon=":material/download:")
    return view


view = table_section(table) if len(table) else table

# --- the open pair ---------------------------------------------------------------------------------
t, h = state.qp_int("task"), state.qp_int("harmful")
if t is None or h is None or not (cache.valid(t) and cache.valid(h)):
    first = view.iloc[0] if len(view) else table.iloc[0]
    t, h = int(first["task_feature"]), int(first["harmful_feature"])
    state.set_qp(task=t, harmful=h)

pairs = list(zip(view["task_feature"].astype(int), view["harmful_feature"].astype(int), strict=False))
if (t, h) not in pairs:
    pairs.insert(0, (t, h))
pick = st.columns([2, 3])[0].selectbox("Open pair", pairs, index=pairs.index((t, h)), key=f"ov_pick:{t}:{h}",
                    format_func=lambda p: f"task #{p[0]} ↔ harmful #{p[1]}")
if pick != (t, h):
    state.set_qp(task=pick[0], harmful=pick[1])
    st.rerun()

pair = cache.pair(t, h)
t_row, h_row = cache.row(t), cache.row(h)
st.divider()
st.subheader(f"Task #{t} ↔ harmful #{h}")
m = st.columns(5)
m[0].metric("risk", f"{pair.get('risk', float('nan')):.3f}",
            help="excess cosine over chance (scaled 0–1) × (2·harm − 1) × (2·task − 1)")
m[1].metric("cosine", f"{pair['cosine']:.3f}", help=F.closeness_caption(pair["cosine"], cache.null_cosine))
m[2].metric("z vs null", f"{pair.get('z', float('nan')):.1f}")
m[3].metric("co-activation", f"{pair.get('coactivation', float('nan')):.3f}",
            help="Jaccard index of the tokens on which both fire")
cond = pair.get("cond_coactivation")
m[4].metric("P(harmful fires | task fires)", f"{cond:.3f}" if cond is not None and cond == cond else "—")
st.caption("Decoder " + F.closeness_caption(pair["cosine"], cache.null_cosine) + ".")

a, b = st.columns(2, gap="large")
for col, f, r, color, role in ((a, t, t_row, F.TASK, "task"), (b, h, h_row, F.HARM, "harmful")):
    with col:
        st.html(F.feature_header_html(r, role=role))
        st.caption(f"harm {r['harm_score']:.2f} · task {r['task_score']:.2f} · fires on {r['frequency'] * 100:.3g}%")
        ex = [e for e in cache.examples_of(f) if e.get("kind") == "top"]
        st.html(F.examples_html(ex[:6], color=color, window=20, documents=cache.documents))
        st.page_link(state.PAGES["feature"], label=f"Open #{f} on the feature page", icon=":material/open_in_new:",
                     query_params=state.link_params(feature=f))

# --- steering check --------------------------------------------------------------------------------
def steering_section(t: int, h: int) -> None:
    """`steering/task-<t>.parquet` in the cache, if there: observed vs predicted Δa and slope/R² per α."""
    from precompute.steering import load_steering, steering_figure, summarize

    path = cache.path / "steering" / f"task-{t}.parquet"
    with st.expander("Steering check", expanded=False):
        if not path.is_file():
            sae = (cache.manifest.get("sae") or {}).get("source") or "<sae>"
            hook = cache.manifest.get("hook") or (cache.manifest.get("sae") or {}).get("hook_name") or "<hook>"
            cmd = (f"featuregeom steer --model smollm2 --sae {sae} --hook {hook} --task-feature {t} "
                   f"--harmful-feature {h} --out {cache.path / 'steering' / f'task-{t}.parquet'}")
            st.caption(f"No steering result for task #{t} in this cache. Produce it with: "
                       f"{state.md_escape(cmd)}")
            st.code(cmd, language="bash")
            return
        try:
            df = load_steering(path)
            fig = steering_figure(df, t, harmful_feature=h, show_task=False)
            summ = summarize(df)
        except Exception as exc:  # a file added by hand: report it, keep the page
            st.warning(f"Could not read {state.md_escape(path.name)}: {state.md_escape(f'{type(exc).__name__}: {exc}')}")
            return
        st.plotly_chart(fig, config=state.chart_config(f"steering-{t}-{h}"), key=f"ov_steer:{t}:{h}")
        sel = df[df["feature"] == h].sort_values("alpha")
        if len(sel):
            last = sel.iloc[-1]
            st.caption(state.md_escape(
                f"Adding the task direction at strength α={float(last['alpha']):g} changes harmful feature #{h} "
                f"by {float(last['observed']):+.4g} vs {float(last['predicted_gated']):+.4g} predicted "
                f"(first order); slope and R² below fit all features, observed = slope · predicted."))
        else:
            st.caption(state.md_escape(f"Harmful feature #{h} is not in this steering result; slope and R² below "
                                       f"fit all features, observed = slope · predicted (first order)."))
        tab = summ[summ["subset"] == "all (gated)"][["alpha", "alpha_abs", "slope", "r2", "n"]]
        st.dataframe(tab.rename(columns={"alpha": "α", "alpha_abs": "|α|", "r2": "R²"}), hide_index=True,
                     key=f"ov_steer_tab:{t}:{h}")
        st.caption(state.md_escape(
            f"Read from {path.relative_to(cache.path)} without checksum verification: files added to a cache "
            f"after it was built are not in its manifest."))


steering_section(t, h)

# --- verdict ---------------------------------------------------------------------------------------
st.divider()
st.subheader("Your verdict")
if store is None:
    st.stop()
cur = store.get(t, h)
if cur:
    st.html(f'<div style="font-size:15px">Current verdict: '
            f'{F.badge(cur["verdict"], {"confirmed": F.HARM, "benign": "#059669"}.get(cur["verdict"], "#d97706"), True)}'
            f' by <b>{F.esc(cur["reviewer"])}</b> at {F.esc(cur["updated_at"])}'
            f' ({int(cur["n_changes"])} change{"s" if int(cur["n_changes"]) != 1 else ""})</div>')
else:
    st.caption("No verdict yet for this pair.")

if "_reviewer" not in st.session_state:
    st.session_state["_reviewer"] = ""
with st.form(key=f"verdict:{t}:{h}", clear_on_submit=False, border=True):
    c1, c2 = st.columns([1, 2])
    reviewer = c1.text_input("Your name", value=st.session_state["_reviewer"], key=f"rev_name:{t}:{h}")
    verdict = c1.radio("Verdict", VERDICTS, index=VERDICTS.index(cur["verdict"]) if cur else None, key=f"rev_v:{t}:{h}",
                       captions=["the overlap is real and worrying", "harmless or spurious", "cannot tell yet"])
    note = c2.text_area("Note", key=f"rev_note:{t}:{h}", height=150,
                        placeholder="What did you see in the examples? What would settle it?")
    saved = st.form_submit_button("Save verdict", type="primary")
if saved:
    try:
        if verdict is None:
            raise ReviewError("choose a verdict")
        store.record(t, h, verdict, reviewer, note, cache=cache.name)
        st.session_state["_reviewer"] = reviewer.strip()
        st.toast(f"Saved: {verdict}")
        st.rerun()
    except ReviewError as exc:
        st.error(state.md_escape(exc))

hist = store.history(t, h)
if len(hist):
    st.markdown("**History of this pair**")
    st.dataframe(hist[["created_at", "reviewer", "verdict", "note"]], hide_index=True,
                 height=min(40 + 35 * len(hist), 260))
st.caption(f"Verdicts are stored in {state.md_escape(store.path)} (SQLite, WAL). Every change is kept.")
