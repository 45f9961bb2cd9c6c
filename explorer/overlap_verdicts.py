"""The overlaps page's verdicts: every reviewer's verdict on the open pair, a notice when someone saves
meanwhile, the form and the pair's history. A pair the cache does not flag takes a verdict only when the
reviewer ticks "review this unflagged pair anyway"; that verdict is stored marked `unflagged`.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from explorer import state
from explorer.data import CacheData
from explorer.review_table import verdicts_html
from explorer.reviews import (
    MAX_REVIEWER,
    VERDICTS,
    ReviewError,
    ReviewStore,
    clean_reviewer,
    describe_changes,
)


# --- verdicts ---------------------------------------------------------------------------------------
def try_read(read: Any) -> Any:
    """read(), or None after a warning: a damaged file loses what it lost, not the rest of the page."""
    try:
        return read()
    except ReviewError as exc:
        st.warning(state.md_escape(exc), icon="⚠️")
        return None


@st.fragment(run_every=5)
def watch_pair(store: ReviewStore, cache_name: str, t: int, h: int, version_key: str) -> None:
    """Say so when someone saves on this pair after the page was drawn (else it would keep showing the
    old state)."""
    shown = st.session_state.get(version_key)
    try:
        newest = store.pair_version(t, h, cache_name)
        changes = store.history(cache_name, t, h) if shown is not None and newest > shown else None
    except ReviewError:
        return
    if changes is not None:
        st.info(
            state.md_escape(
                f"Saved on this pair after the page was drawn: "
                f"{describe_changes(changes[changes['id'] > shown])}."
            ),
            icon="🔄",
        )
        if st.button("Show the latest verdicts", key=f"ov_refresh:{t}:{h}"):
            st.rerun()


def verdict_form(
    cache: CacheData, store: ReviewStore, t: int, h: int, expected_version: int, unflagged: bool = False
) -> None:
    """The reviewer's name, verdict and note; a save refused as stale is explained above the form."""
    name_now = state.reviewer_name()
    try:
        mine = store.get(t, h, name_now, cache.name) if name_now.strip() else None
    except ReviewError:
        mine = None
    notice = st.container()  # a refused save is explained here, right under the verdicts it refers to
    with st.form(key=f"verdict:{t}:{h}", clear_on_submit=False, border=True):
        c1, c2 = st.columns([1, 2])
        reviewer = c1.text_input(
            "Your name",
            value=name_now,
            key=f"rev_name:{t}:{h}",
            max_chars=MAX_REVIEWER,
            help="Each reviewer keeps their own verdict; it is remembered in the URL (?reviewer=).",
        )
        verdict = c1.radio(
            "Verdict",
            VERDICTS,
            index=VERDICTS.index(mine["verdict"]) if mine else None,
            key=f"rev_v:{t}:{h}",
            captions=["the overlap is real and worrying", "harmless or spurious", "cannot tell yet"],
        )
        note = c2.text_area(
            "Note",
            key=f"rev_note:{t}:{h}",
            height=150,
            placeholder="What did you see in the examples? What would settle it?",
        )
        saved = st.form_submit_button("Save verdict", type="primary", disabled=store.read_only)
    if not saved:
        return
    try:
        if verdict is None:
            raise ReviewError("choose a verdict")
        name = clean_reviewer(reviewer)
        state.remember_reviewer(name)
        store.record(
            t,
            h,
            verdict,
            name,
            note,
            cache=cache.name,
            expected_version=expected_version,
            unflagged=unflagged,
        )
        st.toast(f"Saved: {verdict}")
        st.rerun()
    except ReviewError as exc:  # a stale save names the verdicts saved since; the form keeps what was typed
        notice.error(state.md_escape(exc), icon="⚠️")


def verdicts_section(
    cache: CacheData, store: ReviewStore | None, readable: bool, t: int, h: int, flagged: bool = True
) -> None:
    """Every reviewer's verdict on the pair, a notice when someone saves meanwhile, the form, history.
    An unflagged pair shows its verdicts but takes one only after the reviewer opts in."""
    st.divider()
    st.subheader("Verdicts")
    if store is None or not readable:
        st.caption(
            "Verdicts are unavailable (see the message at the top of the page); everything else works."
        )
        return
    version_key = f"_ov_version:{cache.name}:{t}:{h}"
    # a save is checked against the version the reviewer was shown, i.e. the one the previous run drew
    shown_version = st.session_state.get(version_key)
    # the version before the verdicts: a save between the two reads is then refused, never missed
    version = try_read(lambda: store.pair_version(t, h, cache.name))
    pair_verdicts = try_read(lambda: store.verdicts(cache.name, t, h))
    pair_history = try_read(lambda: store.history(cache.name, t, h))
    if version is None or pair_verdicts is None:
        st.caption("Saving is off: the verdicts of this pair cannot be read.")
        return
    st.session_state[version_key] = version
    if len(pair_verdicts):
        st.html(verdicts_html(pair_verdicts))
    else:
        st.caption("No verdict yet for this pair.")
    watch_pair(store, cache.name, t, h, version_key)
    opted_in = flagged or st.checkbox(
        "Review this unflagged pair anyway",
        key=f"ov_optin:{t}:{h}",
        help="The cache does not flag this pair; a verdict saved here is marked 'unflagged pair'.",
    )
    if opted_in:
        verdict_form(
            cache, store, t, h, version if shown_version is None else shown_version, unflagged=not flagged
        )
    else:
        st.caption("Not a flagged pair: no verdict is taken unless you tick the box above.")
    if pair_history is not None and len(pair_history):
        st.markdown("**History of this pair**")
        st.dataframe(
            pair_history[["created_at", "reviewer", "verdict", "unflagged", "note"]],
            hide_index=True,
            height=min(40 + 35 * len(pair_history), 260),
            column_config={"unflagged": st.column_config.CheckboxColumn(help="saved on an unflagged pair")},
        )
    st.caption(
        f"Verdicts are stored in {state.md_escape(store.path)} (SQLite, WAL): one per reviewer, every save kept."
    )
