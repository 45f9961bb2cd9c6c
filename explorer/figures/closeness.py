"""The Closeness page's figures and sentences, from closeness.json alone (pure: report in, figure or
plain text out).

A sentence never claims more than the report's `verdict`: it is written per verdict, and none is
written when the verdict is `not_testable` (the page says why instead). The ranked comparison's
sentence (`ranked_sentence`, from closeness.json `ranked`) opens with the word "Exploratory": its
sets are chosen by rank of task_score, not by significance. Sentences are plain text; the
page escapes them for markdown. Strings from the file reach a figure only through `esc`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

from explorer.figures.style import NEUTRAL, TASK, base_layout, esc

INDUCING_COLOR, NON_INDUCING_COLOR = TASK, "#d97706"
INDUCING_NAME = "task-specific (inducing)"
NON_INDUCING_NAME = "control-specific (non-inducing)"


def fmt_p(p: float | None) -> str:
    """0.24, 0.031, 0.0005, 2.0e-05."""
    if p is None:
        return "n/a"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _ci(ci: list[float] | None) -> str:
    return "n/a" if not ci else f"{ci[0]:+.3f} to {ci[1]:+.3f}"


def testable(report: dict[str, Any]) -> bool:
    return report.get("verdict") != "not_testable"


def _numbers(report: dict[str, Any], sizes: str) -> str:
    a, b = report["inducing"], report["non_inducing"]
    return (
        f"mean closeness {a['mean']:.3f} vs {b['mean']:.3f}, a difference of {report['difference']:+.3f} "
        f"(95% CI {_ci(report['ci'])}; {sizes})"
    )


def _shuffles(report: dict[str, Any]) -> str:
    return (
        f"shuffles of set membership within firing-frequency bins (one-sided p = "
        f"{fmt_p(report['p_permutation'])}, two-sided {fmt_p(report['p_two_sided'])})"
    )


def _frequency_note(report: dict[str, Any]) -> str:
    """For `no_difference` with an interval off 0: the raw difference is a frequency effect."""
    ci = report["ci"]
    if not ci or not (ci[0] > 0 or ci[1] < 0):
        return ""
    return (
        " The raw difference is about what firing frequency alone gives: frequency-matched shuffles "
        f"average {report['null_difference_mean']:+.3f}."
    )


def closeness_sentence(report: dict[str, Any]) -> str | None:
    """One sentence stating the comparison's result as far as its verdict goes; None when not testable."""
    verdict = report.get("verdict")
    if verdict not in ("inducing_closer", "no_difference", "non_inducing_closer"):
        return None
    numbers = _numbers(report, f"n = {report['inducing']['n']} and {report['non_inducing']['n']}")
    test = _shuffles(report)
    if verdict == "inducing_closer":
        return (
            "In this cache, task-specific features sit closer to harmful features than control-specific "
            f"features do: {numbers}, more than {test} give."
        )
    if verdict == "non_inducing_closer":
        return (
            "In this cache, control-specific features sit closer to harmful features than task-specific "
            f"features do, the opposite of the claim: {numbers}; {test}, p for this direction = "
            f"{fmt_p(report['p_non_inducing_closer'])}."
        )
    return (
        "In this cache, task-specific features do not sit measurably closer to harmful features than "
        f"control-specific features: {numbers}, no more than {test} give." + _frequency_note(report)
    )


def ranked_sentence(ranked: dict[str, Any]) -> str | None:
    """The ranked comparison (closeness.json `ranked`) as far as its verdict goes, labelled exploratory;
    None when not testable."""
    verdict = ranked.get("verdict")
    if verdict not in ("inducing_closer", "no_difference", "non_inducing_closer"):
        return None
    n = ranked["n"]
    top = f"the {n} most task-leaning features (highest task score)"
    bottom = f"the {n} most control-leaning ones (lowest)"
    numbers, test = _numbers(ranked, f"n = {n} each"), _shuffles(ranked)
    lead = "Exploratory, sets by rank rather than by significance: in this cache, "
    if verdict == "inducing_closer":
        return f"{lead}{top} sit closer to harmful features than {bottom}: {numbers}, more than {test} give."
    if verdict == "non_inducing_closer":
        return (
            f"{lead}the {n} most control-leaning features (lowest task score) sit closer to harmful "
            f"features than the {n} most task-leaning ones, the opposite of the claim: {numbers}; {test}, "
            f"p for this direction = {fmt_p(ranked['p_non_inducing_closer'])}."
        )
    return (
        f"{lead}{top} do not sit measurably closer to harmful features than {bottom}: {numbers}, no more "
        f"than {test} give." + _frequency_note(ranked)
    )


VERDICT_WORDS = {
    "inducing_closer": "the task-leaning features sit closer to harmful ones",
    "non_inducing_closer": "the control-leaning features sit closer to harmful ones (the opposite of the claim)",
    "no_difference": "no difference",
}


def sensitivity_sentence(rows: list[dict[str, Any]], headline: str) -> str | None:
    """What the other N say when any of them reaches another verdict than the headline N; None when all
    agree. Several N were tried, so one N that reaches significance alone is weak evidence."""
    other = [r for r in rows if r.get("verdict") in VERDICT_WORDS and r["verdict"] != headline]
    if not other:
        return None
    parts = [
        f"at N = {r['n']}, {VERDICT_WORDS[r['verdict']]} (difference {r['difference']:+.4f}, 95% CI "
        f"{r['ci'][0]:+.4f} to {r['ci'][1]:+.4f}, two-sided p = {fmt_p(r['p_two_sided'])})"
        for r in other
    ]
    return (
        "The verdict depends on N: "
        + "; ".join(parts)
        + f". With {len(rows)} values of N tried and no correction for that, a verdict reached at one N "
        "only is weak evidence."
    )


def flagged_pairs_sentence(report: dict[str, Any]) -> str | None:
    """The flagged-pair count against shuffled harm labels; None when it could not be tested."""
    fp = report.get("flagged_pairs") or {}
    if not fp.get("testable"):
        return None
    alpha = float(report.get("alpha", 0.05))
    if fp["p"] < alpha:
        where = "more than chance gives"
    elif fp["p_fewer"] < alpha:
        where = "fewer than chance gives"
    else:
        where = "about what chance gives"
    return (
        f"{fp['observed']:,} (task, harmful) pairs of the whole decoder lie above the chance cosine "
        f"{fp['threshold']:.3f}. Shuffling the harm labels among features of the same firing frequency "
        f"gives {fp['null_mean']:,.1f} on average (90% of shuffles between {fp['null_q05']:,.0f} and "
        f"{fp['null_q95']:,.0f}): the observed count is {where} "
        f"(P(shuffle ≥ observed) = {fmt_p(fp['p'])}, P(shuffle ≤ observed) = {fmt_p(fp['p_fewer'])})."
    )


def _centres(edges: list[float]) -> tuple[np.ndarray, float]:
    e = np.asarray(edges, dtype=float)
    return (e[:-1] + e[1:]) / 2, float(e[1] - e[0]) if e.size > 1 else 1.0


def closeness_sets_figure(
    report: dict[str, Any],
    height: int = 360,
    names: tuple[str, str] = (INDUCING_NAME, NON_INDUCING_NAME),
    colors: tuple[str, str] = (INDUCING_COLOR, NON_INDUCING_COLOR),
) -> go.Figure | None:
    """Both sets' closeness on shared bins, each as a share of its set, with each set's mean marked
    (`report`: closeness.json or its `ranked` part; `names`, `colors`: the two sets' legend names and colours)."""
    hist = report.get("histogram")
    if not hist:
        return None
    x, width = _centres(hist["edges"])
    fig = go.Figure()
    for key, name, color in (
        ("inducing", esc(names[0]), colors[0]),
        ("non_inducing", esc(names[1]), colors[1]),
    ):
        counts = np.asarray(hist[key], dtype=float)
        share = counts / max(counts.sum(), 1.0)
        fig.add_trace(
            go.Bar(
                x=x,
                y=share,
                width=width,
                name=f"{name}, n = {int(counts.sum())}",
                marker_color=color,
                opacity=0.55,
                customdata=counts,
                hovertemplate="closeness %{x:.3f}: %{customdata:.0f} features (%{y:.1%})<extra></extra>",
            )
        )
        mean = report[key]["mean"]
        if mean is not None:
            fig.add_vline(x=mean, line={"color": color, "dash": "dash", "width": 2})
    base_layout(fig, height, "Closeness to the nearest harmful feature (dashed: each set's mean)")
    fig.update_layout(barmode="overlay", legend={"orientation": "h", "y": -0.25})
    fig.update_xaxes(title="largest cosine to a harmful feature's decoder direction")
    fig.update_yaxes(title="share of the set", tickformat=".0%")
    return fig


def null_figure(
    hist: dict[str, Any] | None,
    observed: float | None,
    title: str,
    xlabel: str,
    fmt: str = "+.3f",
    height: int = 300,
) -> go.Figure | None:
    """A permutation null as a histogram, with the observed value as a vertical line."""
    if not hist or observed is None:
        return None
    x, width = _centres(hist["edges"])
    fig = go.Figure(
        go.Bar(
            x=x,
            y=hist["counts"],
            width=width,
            marker_color=NEUTRAL,
            name="shuffles",
            hovertemplate="%{x:.3f}: %{y} shuffles<extra></extra>",
        )
    )
    fig.add_vline(
        x=observed,
        line={"color": INDUCING_COLOR, "width": 3},
        annotation_text=esc(f"observed {observed:{fmt}}"),
        annotation_position="top",
    )
    base_layout(fig, height, title, showlegend=False)
    fig.update_xaxes(title=xlabel)
    fig.update_yaxes(title="shuffles")
    return fig


def difference_null_figure(
    report: dict[str, Any], xlabel: str = "mean closeness, inducing − non-inducing"
) -> go.Figure | None:
    return null_figure(
        report.get("permutation_null"),
        report.get("difference"),
        "The difference against frequency-matched shuffles of set membership",
        xlabel,
    )


def flagged_pairs_figure(report: dict[str, Any]) -> go.Figure | None:
    fp = report.get("flagged_pairs") or {}
    return null_figure(
        fp.get("null_histogram"),
        fp.get("observed") if fp.get("testable") else None,
        "Pairs above the chance cosine against frequency-matched shuffles of the harm labels",
        "(task, harmful) pairs above the chance cosine",
        fmt=",.0f",
    )


def _share(k: int, n: int) -> str:
    return f"{k} of {n:,} ({k / n:.0%})"


def stability_sentences(report: dict[str, Any]) -> list[str]:
    """stability.json in sentences: how much of the dictionary a second seed learns again, then each
    pair set's survival, the nearest-neighbour baseline last so the shares can be compared."""
    match, sets = report["match"], report["pair_sets"]
    out = []
    if match.get("share_matched") is not None:
        out.append(
            # the file names the replicate; that it shares the recipe is the user's --sae-replicate claim
            f"The replicate SAE ({report['replicate'].get('spec') or 'unnamed'}) has a counterpart at "
            f"decoder cosine ≥ "
            f"{match['threshold']:.2f} for {match['share_matched']:.0%} of this SAE's {match['n_live']:,} "
            f"live features (median matched cosine {match['quantiles']['0.5']:.2f})."
        )
    flagged = sets["flagged"]
    if flagged["n_pairs"]:
        out.append(
            f"Flagged pairs that reappear there, both features matched and still above its null: "
            f"{_share(flagged['n_reappearing'], flagged['n_pairs'])}."
        )
    else:
        out.append("No pair is flagged in this cache, so no flagged pair can be checked for stability.")
    ranked = sets["ranked_nearest_harmful"]
    if ranked["n_pairs"]:
        out.append(
            f"Exploratory: of the {ranked['n_pairs']} most task-leaning features paired with their nearest "
            f"harmful feature, {_share(ranked['n_reappearing'], ranked['n_pairs'])} of the pairs reappear "
            f"({ranked['n_above_null']} of them were above the chance level in this SAE to begin with)."
        )
    base = sets["nearest_neighbour"]
    if base["n_pairs"]:
        out.append(
            f"For comparison, {_share(base['n_reappearing'], base['n_pairs'])} of all above-null "
            "nearest-neighbour pairs reappear."
        )
    return out
