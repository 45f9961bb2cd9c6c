"""Feature page: what one feature is (examples, rates, histogram, logit lens, neighbours), or two side by side."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from explorer import figures as F
from explorer import state
from explorer.data import CacheData
from explorer.data import evidence as E
from explorer.evidence_panel import (
    GROUP_ALL,
    doc_href,
    document_panel,
    evidence_filters,
    finite,
    group_examples_block,
    merged_caption,
    peaks_caption,
)
from explorer.figures import evidence as EF
from explorer.playground_panel import playground_section
from explorer.views import Page
from precompute import schema

PAGE = Page(title="Feature", icon=":material/text_snippet:")


def heldout_help(row: dict[str, Any]) -> str:
    """What the held-out harm AUROC compared (docs/cache.md `harm_heldout_*`)."""
    text = (
        "AUROC on held-out, form-matched documents left out of the harm fit (XSTest unsafe vs safe prompts, "
        "JailbreakBench harmful vs benign behaviours); a harmful feature must pass it too"
    )
    held, lo, on = row.get("harm_heldout_auroc"), row.get("harm_heldout_lo"), row.get("harm_heldout_set")
    if not (finite(held) and finite(lo)):
        return text + "; not computed for this cache (no held-out documents)"
    what = "all held-out harmful documents" if str(on) == "all" else f"the held-out {on} documents"
    return text + f"; lower 95% bound {lo:.2f}, on {what}"


def metrics(cache: CacheData, row: dict[str, Any]) -> None:
    c = st.columns(6)
    lo = row.get("harm_score_lo")
    c[0].metric(
        "harm score",
        f"{row['harm_score']:.2f}",
        help="AUROC of the feature's max over a window of each document, harmful vs benign (0.5 = no signal)"
        + (f"; lower 95% bound {lo:.2f}" if finite(lo) else ""),
    )
    held = row.get("harm_heldout_auroc")
    c[5].metric("held-out harm", f"{held:.2f}" if finite(held) else "—", help=heldout_help(row))
    c[1].metric(
        "task score",
        f"{row['task_score']:.2f}",
        help="AUROC of the feature's max over a window of each document, task vs control (same format, "
        "different content; 0.5 = no difference); task vs benign + general: "
        + f"{row.get('task_vs_benign', float('nan')):.2f}",
    )
    c[2].metric("fires on", f"{row['frequency'] * 100:.3g}% of tokens")
    c[3].metric("max activation", f"{row['max_activation']:.2f}")
    mean = row.get("mean_activation")
    c[4].metric("mean when firing", f"{mean:.2f}" if finite(mean) else "—")


def examples_block(cache: CacheData, f: int, color: str, n_top: int, window: int | None) -> None:
    """The feature's global top examples, then its quantile samples (its per-group top is shown by
    the 'Documents' filter, not here)."""
    ex = cache.examples_of(f)
    found = E.merge_repeats([e for e in ex if e.get("kind") == "top"], window)
    top = found.examples
    quant = [e for e in ex if e.get("kind") == "quantile"]
    scale = max((float(e.get("max_activation") or 0) for e in top), default=1.0)
    href = doc_href(f)
    st.html(
        F.examples_html(
            top[:n_top], scale=scale, color=color, window=window, documents=cache.documents, doc_href=href
        )
    )
    merged_caption(found.n_merged, "top examples")
    if len(top) > n_top:
        st.caption(f"{len(top) - n_top} more top examples — raise “examples shown”.")
    if quant:
        st.markdown("**Quantile samples** — weaker activations, to show what the feature does more typically")
        st.html(
            F.examples_html(
                quant, scale=scale, color=color, window=window, documents=cache.documents, doc_href=href
            )
        )


def accent_of(row: dict[str, Any]) -> str:
    """The header stripe by style's one colour rule: both stripes, red, blue, or grey for a feature that
    passes neither test (never the blue of a task feature it is not)."""
    return F.BOTH if F.role_of(row) == F.BOTH else F.role_color(row)


def header_controls(cache: CacheData, feature: int, compare: int | None, nb: pd.DataFrame) -> None:
    """'Go to feature id' and 'Compare side by side with' (its neighbours, harmful first); a change
    reruns the page on the new URL."""
    c1, c2 = st.columns(2)
    jump = c1.number_input(
        "Go to feature id",
        min_value=0,
        max_value=cache.n - 1,
        value=feature,
        step=1,
        key=f"feat_jump:{feature}",
    )
    ordered = nb.sort_values(["is_harmful", "cosine"], ascending=[False, False])
    opts: list[int | None] = [None, *ordered["feature"].astype(int).tolist()]
    if compare is not None and compare not in opts:
        opts.append(compare)
    harm_of = dict(zip(ordered["feature"].astype(int), ordered["is_harmful"], strict=False))
    cos_of = dict(zip(ordered["feature"].astype(int), ordered["cosine"], strict=False))

    def _fmt(i: int | None) -> str:
        if i is None:
            return "— none —"
        tag = "harmful" if harm_of.get(i) else "neighbour"
        return f"#{i} · {tag} · cos {cos_of[i]:.2f}" if i in cos_of else f"#{i}"

    cmp_pick = c2.selectbox(
        "Compare side by side with",
        opts,
        index=opts.index(compare),
        format_func=_fmt,
        key=f"feat_cmp:{feature}:{compare}",
    )
    if int(jump) != feature:
        state.remember_feature(cache, int(jump))
        state.set_qp(compare=None)
        st.rerun()
    if cmp_pick != compare:
        state.set_qp(compare=cmp_pick)
        st.rerun()


def side_by_side(
    cache: CacheData, feature: int, compare: int, nb: pd.DataFrame, n_top: int, window: int | None
) -> None:
    row, other = cache.row(feature), cache.row(compare)
    m = nb[nb["feature"] == compare]
    cos = float(m["cosine"].to_numpy()[0]) if len(m) else float("nan")
    st.subheader(f"Side by side: #{feature} and #{compare}")
    st.caption(
        (
            "Decoder "
            + F.closeness_caption(cos, cache.null_cosine, cache.null_label, float(m["percentile"].iloc[0]))
            + "."
        )
        if len(m)
        else f"#{compare} is not among the {len(nb)} nearest neighbours of #{feature}."
    )
    flagged = cache.overlaps[
        (cache.overlaps["task_feature"] == feature) & (cache.overlaps["harmful_feature"] == compare)
    ]
    # one filter for both sides: e.g. each feature's evidence on harmful documents, side by side
    group, category = evidence_filters(cache, feature, cache.examples_of(feature))
    a, b = st.columns(2, gap="large")
    for col, f, r, color in (
        (a, feature, row, F.role_color(row)),
        (b, compare, other, F.role_color(other)),
    ):
        with col:
            st.html(F.feature_header_html(r, accent=accent_of(r)))
            st.caption(
                f"harm {r['harm_score']:.2f} · task {r['task_score']:.2f} · fires on {r['frequency'] * 100:.3g}%"
            )
            if group == GROUP_ALL:
                examples_block(cache, f, color, n_top, window)
            else:
                group_examples_block(cache, f, group, category, n_top, window, color)
            st.page_link(
                state.PAGES["feature"],
                label=f"Open #{f} alone",
                icon=":material/open_in_new:",
                query_params=state.link_params(feature=f),
            )
    if len(flagged):
        st.page_link(
            state.PAGES["overlaps"],
            label="Record a verdict on this pair",
            icon=":material/fact_check:",
            query_params=state.link_params(task=feature, harmful=compare),
        )


def single_feature(
    cache: CacheData, feature: int, row: dict[str, Any], n_top: int, window: int | None
) -> None:
    """Scores, examples (all, or of one group / harm category) and quantile samples; firing rates,
    histogram by group and logit lens with values beside them."""
    metrics(cache, row)
    left, right = st.columns([3, 2], gap="large")
    color = F.role_color(row)
    with left:
        h1, h2, h3 = st.columns([2.6, 1, 1], vertical_alignment="bottom")
        h1.subheader("Top-activating examples")
        h2.number_input("examples shown", 1, 100, 8, key="feat_n_top")
        h3.toggle("full context", key="feat_full")
        document_panel(cache, feature)
        group, category = evidence_filters(cache, feature, cache.examples_of(feature))
        st.caption(
            "Darker = stronger activation; the outlined token is where it peaks. Hover a token for its value. "
            "Badges: the text group (and harm category) each example comes from."
        )
        if group == GROUP_ALL:
            peaks_caption(cache, feature)
            examples_block(cache, feature, color, n_top, window)
        else:
            group_examples_block(cache, feature, group, category, n_top, window, color)
    with right:
        st.plotly_chart(
            F.group_rates_figure(
                cache.group_rates(feature),
                cache.category_rates_of(feature),
                height=250 + 18 * len(cache.category_rates_of(feature)),
            ),
            config=state.chart_config(f"rates-{feature}"),
            key="feat_rates",
        )
        histogram_section(cache, feature)
        logit_lens_section(cache, feature, row)


def histogram_section(cache: CacheData, feature: int) -> None:
    by_group = E.group_histogram(cache, feature)
    if by_group is not None and any(c.any() for c in by_group.counts.values()):
        st.plotly_chart(
            EF.group_histogram_figure(by_group), config=state.chart_config(f"hist-{feature}"), key="feat_hist"
        )
        st.dataframe(
            pd.DataFrame(EF.group_share_rows(by_group)), hide_index=True, key=f"feat_share:{feature}"
        )
        return
    hist = cache.histogram(feature)
    if hist is not None and hist[1].sum() > 0:
        st.plotly_chart(
            F.histogram_figure(*hist), config=state.chart_config(f"hist-{feature}"), key="feat_hist"
        )
        st.caption("Not split by group: this cache was harvested before per-group histograms.")
    else:
        st.caption(
            f"No activation histogram (the feature never fired, or the cache has no {schema.HISTOGRAMS})."
        )


def logit_lens_section(cache: CacheData, feature: int, row: dict[str, Any]) -> None:
    def values(col: str) -> list[float] | None:
        if col not in cache.lists.column_names:
            return None
        v = cache.lists.column(col)[int(feature)].as_py()
        return None if v is None else [float(x) for x in v]

    pv, sv = values("top_promoted_values"), values("top_suppressed_values")
    st.markdown("**Logit lens** — tokens this direction pushes the model to say, or not to say")
    st.html(
        EF.logit_chips_html(row.get("top_promoted") or [], pv, F.TASK, "promoted")
        + EF.logit_chips_html(row.get("top_suppressed") or [], sv, F.NEUTRAL, "suppressed")
    )
    if pv is None and row.get("top_promoted"):
        st.caption("No logit values: this cache was scored before they were stored.")
    elif pv is not None:
        st.caption(
            "Values: the token's logit from the unit-norm decoder direction through the final norm's gain "
            "(comparable between tokens and features; a real activation scales them)."
        )


def neighbours_section(feature: int, nb: pd.DataFrame, null: float, null_label: str) -> None:
    st.subheader("Nearest neighbours in decoder space")
    above = int((nb["cosine"] >= null).sum())
    st.caption(
        f"{above} of {len(nb)} neighbours are above the chance level {null:.3g} ({null_label}). NN percentile: "
        "where the cosine ranks among every feature's nearest-neighbour cosine (50 = as close as a typical "
        "feature's nearest neighbour). Open one with ↗, or compare it side by side above."
    )
    table = F.neighbour_table(nb, null, extra_query=state.extra_query())
    st.dataframe(
        table,
        hide_index=True,
        key=f"feat_nb:{feature}",
        column_config={
            "open": st.column_config.LinkColumn("open", display_text="open ↗", width="small"),
            "feature": st.column_config.NumberColumn("feature", format="#%d", width="small"),
            "cosine": st.column_config.ProgressColumn("cosine", min_value=0.0, max_value=1.0, format="%.3f"),
            "harm score": st.column_config.NumberColumn("harm score", format="%.2f"),
        },
    )
    st.page_link(
        state.PAGES["map"],
        label=f"Show #{feature} on the map",
        icon=":material/scatter_plot:",
        query_params=state.link_params(feature=feature),
    )


def render() -> None:
    cache = state.require_cache()
    feature = state.selected_feature(cache)
    compare = state.qp_int("compare")
    if compare is not None and (not cache.valid(compare) or compare == feature):
        state.set_qp(compare=None)
        compare = None
    row = cache.row(feature)
    nb = cache.neighbours_of(feature)

    top_l, top_r = st.columns([3, 2], vertical_alignment="bottom")
    with top_r:
        header_controls(cache, feature, compare, nb)
    with top_l:
        st.html(F.feature_header_html(row, accent=accent_of(row)))

    n_top = st.session_state.get("feat_n_top", 8)
    window = None if st.session_state.get("feat_full", False) else 24
    if compare is not None:
        side_by_side(cache, feature, compare, nb, n_top, window)
        return
    single_feature(cache, feature, row, n_top, window)
    neighbours_section(feature, nb, cache.null_cosine, cache.null_label)
    # steer this feature, watching it and its closest harmful neighbour (if it has one)
    harmful_nb = nb.loc[nb["is_harmful"].astype(bool)].sort_values("cosine", ascending=False)["feature"]
    playground_section(cache, [feature, *harmful_nb.astype(int).head(1)], key=f"pgf:{feature}")


if __name__ == "__main__":
    render()
