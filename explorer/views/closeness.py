"""Closeness: do task-specific features sit closer to harmful features than control-specific ones?

Shows closeness.json (the closeness step, docs/cache.md): both sets' distributions, the difference
with its interval and permutation p, the set sizes, and one sentence per result, computed from the
file and never stronger than its verdict. A `not_testable` verdict gets its reason, no sentence.
The strict comparison (sets by significance) comes first; the ranked one (`ranked`: the N most
task-leaning vs the N most control-leaning features) follows under its own heading, labelled
exploratory, with its sensitivity to N. Then stability.json, when the cache has one: whether the
pairs reappear in a second SAE trained with another seed.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from explorer import figures as F
from explorer import state
from explorer.data import read_closeness, read_stability
from explorer.views import Page
from precompute.errors import CacheError

PAGE = Page(title="Closeness", icon=":material/compare_arrows:")
ABOUT = (
    "The claim under test (arXiv:2605.00842): features specific to misalignment-inducing data sit "
    "closer to harmful features than features specific to non-inducing data do. A feature's closeness "
    "is the largest cosine between its decoder direction and any harmful feature's."
)


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else f"{x:{fmt}}"


def set_metrics(report: dict[str, Any]) -> None:
    """Each set's size, mean and median; the difference with its interval and the p-values."""
    a, b = report["inducing"], report["non_inducing"]
    cols = st.columns(6)
    cols[0].metric(
        "Task-specific (inducing)",
        f"n = {a['n']:,}",
        help=state.md_escape(report["set_definitions"]["inducing"]),
    )
    cols[1].metric(
        "Control-specific (non-inducing)",
        f"n = {b['n']:,}",
        help=state.md_escape(report["set_definitions"]["non_inducing"]),
    )
    cols[2].metric("Mean closeness", f"{_num(a['mean'])} vs {_num(b['mean'])}")
    cols[3].metric(
        "Difference", _num(report["difference"], "+.3f"), help="Mean closeness, inducing − non-inducing."
    )
    ci = report["ci"]
    cols[4].metric(
        "95% CI",
        f"{ci[0]:+.3f} to {ci[1]:+.3f}" if ci else "n/a",
        help="Bootstrap: each set resampled alone.",
    )
    cols[5].metric(
        "Permutation p",
        F.fmt_p(report["p_permutation"]),
        help="One-sided (inducing closer): the share of shuffles of set membership within firing-frequency "
        f"bins whose difference is at least the observed one. Two-sided: {F.fmt_p(report['p_two_sided'])}.",
    )
    st.caption(
        state.md_escape(
            f"Two-sided p {F.fmt_p(report['p_two_sided'])}. Medians {_num(a['median'])} vs "
            f"{_num(b['median'])} (difference {_num(report['median_difference'], '+.3f')}). Sets: {report['set_definitions']['inducing']}; "
            f"{report['set_definitions']['non_inducing']}; {report['n_harmful']:,} harmful features; "
            f"{report['n_excluded_both']:,} features in both sets left out."
        )
    )


def comparison(report: dict[str, Any]) -> None:
    st.subheader("Closeness of the two sets")
    if F.closeness_sentence(report) is None:
        st.warning(
            "**Not testable.** " + state.md_escape(report["reason"]) + "  \nNo conclusion is drawn from "
            "this cache.",
            icon="⚠️",
        )
    else:
        st.markdown(state.md_escape(F.closeness_sentence(report)))
    set_metrics(report)
    shown = [f for f in (F.closeness_sets_figure(report), F.difference_null_figure(report)) if f is not None]
    if shown:
        for i, (col, fig) in enumerate(zip(st.columns(len(shown)), shown, strict=True)):
            col.plotly_chart(fig, config=state.chart_config(f"closeness-{i}"), key=f"closeness_fig:{i}")


def flagged_pairs(report: dict[str, Any]) -> None:
    st.subheader("Flagged pairs against shuffled harm labels")
    fp = report["flagged_pairs"]
    sentence = F.flagged_pairs_sentence(report)
    if sentence is None:
        st.warning("**Not testable.** " + state.md_escape(fp.get("reason") or "no task or harmful feature"))
        return
    st.markdown(state.md_escape(sentence))
    fig = F.flagged_pairs_figure(report)
    if fig is not None:
        st.plotly_chart(fig, config=state.chart_config("closeness-pairs"), key="closeness_fig:pairs")


def ranked_metrics(r: dict[str, Any]) -> None:
    rng = r["task_score_range"]
    cols = st.columns(5)
    for col, key, label in (
        (cols[0], "inducing", "Top N (task-leaning)"),
        (cols[1], "non_inducing", "Bottom N (control-leaning)"),
    ):
        span = rng[key]
        col.metric(
            label,
            f"n = {r[key]['n']:,}",
            help=f"task score {span[0]:.3f} to {span[1]:.3f}" if span else None,
        )
    cols[2].metric("Ranked difference", _num(r["difference"], "+.3f"), help="Mean closeness, top − bottom.")
    ci = r["ci"]
    cols[3].metric("Ranked 95% CI", f"{ci[0]:+.3f} to {ci[1]:+.3f}" if ci else "n/a")
    cols[4].metric(
        "Ranked permutation p",
        F.fmt_p(r["p_permutation"]),
        help=f"One-sided (top closer), shuffles within firing-frequency bins. Two-sided: {F.fmt_p(r['p_two_sided'])}.",
    )


def sensitivity(rows: list[dict[str, Any]]) -> None:
    table = pd.DataFrame(
        {
            "N asked": [r["n_requested"] for r in rows],
            "N used": [r["n"] for r in rows],
            "difference": [_num(r["difference"], "+.4f") for r in rows],
            "95% CI": [f"{r['ci'][0]:+.4f} to {r['ci'][1]:+.4f}" if r["ci"] else "n/a" for r in rows],
            "p (top closer)": [F.fmt_p(r["p_permutation"]) for r in rows],
            "p two-sided": [F.fmt_p(r["p_two_sided"]) for r in rows],
            "verdict": [r["verdict"] for r in rows],
        }
    )
    st.caption("The same comparison at other N:")
    st.dataframe(table, hide_index=True)


def ranked(report: dict[str, Any]) -> None:
    st.subheader("Exploratory: the most task-leaning vs the most control-leaning features")
    r = report["ranked"]
    st.caption(
        state.md_escape(
            f"Exploratory — {r['selection']}. Every eligible feature is ranked by its task score (task vs "
            f"control documents) and the two ends are compared with the same statistic and tests as above; "
            f"no feature in either set need separate task from control beyond chance. Eligible: "
            f"{r['eligibility']} ({r['n_eligible']:,} features)."
        )
    )
    sentence = F.ranked_sentence(r)
    if sentence is None:
        st.warning("**Not testable.** " + state.md_escape(r["reason"]), icon="⚠️")
        return
    st.markdown(state.md_escape(sentence))
    if r["reduction"]:
        st.caption(state.md_escape(r["reduction"] + "."))
    ranked_metrics(r)
    n = r["n"]
    names = (f"top {n} by task score (task-leaning)", f"bottom {n} (control-leaning)")
    shown = [
        f
        for f in (
            F.closeness_sets_figure(r, names=names),
            F.difference_null_figure(r, "mean closeness, top − bottom"),
        )
        if f is not None
    ]
    for i, (col, fig) in enumerate(zip(st.columns(len(shown)), shown, strict=True)):
        col.plotly_chart(
            fig, config=state.chart_config(f"closeness-ranked-{i}"), key=f"closeness_ranked_fig:{i}"
        )
    sensitivity(report["ranked_sensitivity"])
    note = F.sensitivity_sentence(report["ranked_sensitivity"], r["verdict"])
    if note:
        st.markdown(state.md_escape(note))


def method(report: dict[str, Any]) -> None:
    with st.expander("How this was computed"):
        st.markdown(
            state.md_escape(
                f"Statistic: {report['statistic']}. Interval: {report['n_bootstrap']:,} bootstrap resamples of "
                f"each set. p-values: {report['n_permutations']:,} shuffles within {report['frequency_bins']} "
                f"firing-frequency bins (seed {report['seed']}); frequency matching alone gives a mean "
                f"difference of {_num(report['null_difference_mean'], '+.4f')}. Verdict at alpha "
                f"{report['alpha']}, sets of at least {report['min_set_size']}; chance cosine of the pairs "
                f"{report['null_cosine_used']:.4f}."
            )
        )
        st.caption(state.md_escape(f"verdict: {report['verdict']} — {report['reason']}"))
        r = report["ranked"]
        st.caption(
            state.md_escape(
                f"Ranked (exploratory): N = {r['n_requested']} asked (`--closeness-ranked`), {r['n']} used; "
                f"verdict: {r['verdict']} — {r['reason']}"
            )
        )


def stability(cache_path: Any) -> None:
    st.subheader("Do the pairs survive another seed?")
    try:
        report = read_stability(cache_path)
    except CacheError as exc:
        st.error(f"**Cannot read the stability check.**  \n{state.md_escape(exc)}", icon="⚠️")
        return
    if report is None:
        st.info(
            "Not measured: this cache has no stability.json. Run `featuregeom stability --out DIR "
            "--sae-replicate SAE2` with a second SAE of the same recipe trained with another seed."
        )
        return
    for sentence in F.stability_sentences(report):
        st.markdown(state.md_escape(sentence))


def render() -> None:
    cache = state.require_cache()
    st.title("Closeness to harmful features")
    st.caption(ABOUT)
    try:
        report = read_closeness(cache.path)
    except CacheError as exc:
        st.error(f"**Cannot read the closeness test.**  \n{state.md_escape(exc)}", icon="⚠️")
        st.stop()
    if report is None:
        st.info(
            "This cache has no closeness.json: the closeness step has not run on it. Run "
            "`featuregeom closeness --out DIR` on the cache (it needs the cache's SAE)."
        )
        st.stop()
    assert report is not None
    comparison(report)
    flagged_pairs(report)
    ranked(report)
    stability(cache.path)
    method(report)


if __name__ == "__main__":
    render()
