"""Fine-tune diff and dataset triage pages: change vs predicted risk, runs compared, triage scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from explorer.data import MEASURES
from explorer.figures.feature import tokens_html
from explorer.figures.style import HARM, INK, NEUTRAL, TASK, base_layout, esc, rgba

# comparison kind -> colour: the fine-tuned run (after) in the task blue, its control grey, the direct
# difference purple (every point is a harmful feature, so red would say nothing)
COMPARISON_COLORS = {"after": TASK, "control": NEUTRAL, "direct": "#7c3aed"}
MEASURE_NAMES = {"mean": "mean activation", "rate": "firing rate"}


def _ci_arrays(y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Error-bar lengths (plus, minus) from a CI; missing bounds draw no bar."""
    return np.nan_to_num(np.clip(hi - y, 0, None)), np.nan_to_num(np.clip(y - lo, 0, None))


def change_scatter(
    series: Sequence[tuple[str, str, pd.DataFrame, str]],
    measure: str = "mean",
    null_cosine: float | None = None,
    height: int = 460,
) -> go.Figure:
    """Observed change vs predicted risk of harmful features, error bars = 95% CI over prompts.

    `series`: (comparison, legend name, diff rows of that comparison, colour), one trace each; x =
    risk_max_cos, y = the measure's change. Names and categories come from files: escaped."""
    col, lo_c, hi_c = MEASURES[measure]
    fig = go.Figure()
    for comparison, legend, df, color in series:
        y = df[col].to_numpy(dtype=np.float64)
        lo, hi = df[lo_c].to_numpy(dtype=np.float64), df[hi_c].to_numpy(dtype=np.float64)
        plus, minus = _ci_arrays(y, lo, hi)
        cats = [esc(c) or "no category" for c in df["harm_category"]]
        task = [f"#{int(t)}" if t == t and t is not None else "?" for t in df["risk_task_feature"]]
        cd = [
            [int(f), float(a), float(b), c, t]
            for f, a, b, c, t in zip(df["feature"], lo, hi, cats, task, strict=True)
        ]
        fig.add_trace(
            go.Scatter(
                x=df["risk_max_cos"].to_numpy(dtype=np.float64),
                y=y,
                mode="markers",
                name=esc(legend),
                legendgroup=esc(comparison),
                customdata=cd,
                error_y={
                    "type": "data",
                    "array": plus,
                    "arrayminus": minus,
                    "thickness": 1,
                    "width": 0,
                    "color": rgba(color, 0.35),
                },
                marker={"size": 7, "color": color, "opacity": 0.85, "line": {"width": 0.5, "color": "white"}},
                hovertemplate=(
                    "<b>harmful #%{customdata[0]}</b> · %{customdata[3]}<br>predicted risk: cosine %{x:.3f}"
                    " with task %{customdata[4]}<br>change %{y:+.4g} (95% CI %{customdata[1]:+.4g} to "
                    f"%{{customdata[2]:+.4g}})<extra>{esc(comparison)}</extra>"
                ),
            )
        )
    fig.add_hline(y=0, line_color="#9ca3af", line_width=1)
    if null_cosine is not None and np.isfinite(null_cosine):
        fig.add_vline(
            x=float(null_cosine),
            line_dash="dash",
            line_color=INK,
            line_width=1,
            annotation_text=f"chance {null_cosine:.2f}",
            annotation_position="top left",
        )
    base_layout(fig, height, legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0})
    fig.update_xaxes(title_text="predicted risk: max cosine of the decoder direction to a task feature's")
    fig.update_yaxes(title_text=f"change in {MEASURE_NAMES[measure]}", zeroline=False)
    return fig


def _ci_bars(sub: pd.DataFrame, x: list[str], name: str, color: str, first: pd.Series, hover: str) -> go.Bar:
    """Bars of `sub` (columns est, lo, hi, heldout_loss, comparison) with 95% CI error bars; customdata is
    [escaped `first`, lo, hi, held-out loss text, escaped comparison] for the hover template."""
    y = sub["est"].to_numpy(dtype=np.float64)
    plus, minus = _ci_arrays(y, sub["lo"].to_numpy(dtype=np.float64), sub["hi"].to_numpy(dtype=np.float64))
    loss = ["—" if v is None or v != v else f"{float(v):.4f}" for v in sub["heldout_loss"]]
    cd = [
        [esc(f), float(a), float(b), ls, esc(c)]
        for f, a, b, ls, c in zip(first, sub["lo"], sub["hi"], loss, sub["comparison"], strict=True)
    ]
    return go.Bar(
        x=x,
        y=y,
        name=name,
        marker_color=color,
        customdata=cd,
        hovertemplate=hover,
        error_y={"type": "data", "array": plus, "arrayminus": minus, "thickness": 1.2, "color": INK},
    )


def compare_runs_figure(table: pd.DataFrame, height: int = 360) -> go.Figure:
    """Pooled change of all harmful features vs the shared `before`, per run: its fine-tune and its control.

    `table` is data.compare_runs_table(); error bars = 95% CI over prompts; hover adds held-out loss."""
    fig = go.Figure()
    for kind, name in (("after", "fine-tuned run − before"), ("control", "its control − before")):
        sub = table[table["kind"] == kind]
        if not len(sub):
            continue
        fig.add_trace(
            _ci_bars(
                sub,
                [esc(r) for r in sub["run"]],
                name,
                COMPARISON_COLORS[kind],
                sub["label"],
                "<b>%{x}</b>: %{customdata[4]}<br>harmful features' mean change %{y:+.4g}"
                "<br>95% CI %{customdata[1]:+.4g} to %{customdata[2]:+.4g}"
                "<br>held-out task loss of %{customdata[0]}: %{customdata[3]}<extra></extra>",
            )
        )
    fig.add_hline(y=0, line_color="#9ca3af", line_width=1)
    base_layout(
        fig, height, barmode="group", legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0}
    )
    fig.update_xaxes(type="category")  # run names, even ones that look like numbers
    fig.update_yaxes(title_text="mean change, all harmful features")
    return fig


CHANGE_BAR_COLORS = {**COMPARISON_COLORS, "patch": "#0f766e", "random": "#99f6e4"}


def change_bars_figure(
    bars: pd.DataFrame, legend: dict[str, str], y_title: str, height: int = 380
) -> go.Figure:
    """One bar per comparison with its 95% CI, coloured (and named in the legend) by `kind`.

    `bars` has columns name (the x label), kind, comparison (as in the file), est, lo, hi and
    heldout_loss (None when unknown); the bars keep their row order. Every string is escaped."""
    fig = go.Figure()
    for kind, title in legend.items():
        sub = bars[bars["kind"] == kind]
        if not len(sub):
            continue
        fig.add_trace(
            _ci_bars(
                sub,
                [esc(n) for n in sub["name"]],
                esc(title),
                CHANGE_BAR_COLORS.get(kind, NEUTRAL),
                sub["comparison"],
                "<b>%{x}</b> (%{customdata[0]})<br>change %{y:+.4g}"
                "<br>95% CI %{customdata[1]:+.4g} to %{customdata[2]:+.4g}"
                "<br>held-out task loss: %{customdata[3]}<extra></extra>",
            )
        )
    fig.add_hline(y=0, line_color="#9ca3af", line_width=1)
    base_layout(
        fig, height, legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0}, showlegend=True
    )
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=[esc(n) for n in bars["name"]])
    fig.update_yaxes(title_text=esc(y_title))
    return fig


def triage_histogram(
    scores: Sequence[float] | np.ndarray | pd.Series,
    removed: Sequence[bool] | np.ndarray | pd.Series,
    threshold: float | None = None,
    bins: int = 40,
    height: int = 300,
) -> go.Figure:
    """Sample scores, stacked kept (grey) / removed (red) on shared bins, the removal threshold marked."""
    s = np.asarray(scores, dtype=np.float64)
    rm = np.asarray(removed, dtype=bool)
    ok = np.isfinite(s)
    edges = np.histogram_bin_edges(s[ok], bins=bins) if ok.any() else np.linspace(0.0, 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    rng = [[float(a), float(b)] for a, b in zip(edges[:-1], edges[1:], strict=True)]
    fig = go.Figure()
    for name, mask, color in (("kept", ok & ~rm, NEUTRAL), ("removed", ok & rm, HARM)):
        counts, _ = np.histogram(s[mask], bins=edges)
        fig.add_trace(
            go.Bar(
                x=centres,
                y=counts,
                name=name,
                marker_color=color,
                width=(edges[1] - edges[0]) * 0.95,
                customdata=rng,
                hovertemplate=f"score %{{customdata[0]:.3g}}–%{{customdata[1]:.3g}}: "
                f"%{{y}} samples {name}<extra></extra>",
            )
        )
    if threshold is not None and np.isfinite(threshold):
        fig.add_vline(
            x=float(threshold),
            line_dash="dash",
            line_color=INK,
            line_width=1,
            annotation_text=f"removed: score ≥ {threshold:.3g}",
            annotation_position="top left",
        )
    base_layout(
        fig, height, barmode="stack", legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0}
    )
    fig.update_xaxes(title_text="sample score (push per trained token)")
    fig.update_yaxes(title_text="samples")
    return fig


TRIAGE_PARTS = {
    "total": "direct + via overlap",
    "direct": "direct (harmful features)",
    "via_overlap": "via overlap (task features)",
}


def triage_token_scores(sample: dict[str, Any], part: str = "total") -> np.ndarray:
    """Per-token score of a triage sample: direct, via_overlap, or their sum ('total')."""
    d = np.asarray(sample["direct"], dtype=np.float64)
    v = np.asarray(sample["via_overlap"], dtype=np.float64)
    return d + v if part == "total" else d if part == "direct" else v


def triage_tokens_html(sample: dict[str, Any], part: str = "total", color: str = HARM) -> tuple[str, float]:
    """(HTML, scale): the sample's tokens highlighted by score, prompt (untrained) tokens greyed.

    The scale is the highest score over trained tokens, so a large score on the shared system
    prompt does not wash the answer out."""
    toks, trained = list(sample["tokens"]), np.asarray(sample["trained"], dtype=bool)
    d = np.asarray(sample["direct"], dtype=np.float64)
    v = np.asarray(sample["via_overlap"], dtype=np.float64)
    n = min(len(toks), len(trained), len(d), len(v))
    toks, trained, d, v = toks[:n], trained[:n], d[:n], v[:n]
    score = triage_token_scores({"direct": d, "via_overlap": v}, part)
    top = score[trained] if trained.any() else score
    scale = float(np.nanmax(top)) if len(top) and np.nanmax(top) > 0 else 1.0
    titles = [
        f"score {a + b:.3f} = direct {a:.3f} + via overlap {b:.3f}" + ("" if t else " · prompt, not trained")
        for a, b, t in zip(d, v, trained, strict=True)
    ]
    return tokens_html(toks, score, scale, color=color, muted=~trained, titles=titles), scale


def score_legend_html(scale: float, color: str = HARM, what: str = "score") -> str:
    """Legend of the token highlighting: four shades with their values, and a greyed prompt token."""
    cells = []
    for frac in (0.25, 0.5, 0.75, 1.0):
        fg = "color:white;" if frac > 0.6 else ""
        cells.append(
            f'<span style="background:{rgba(color, 0.12 + 0.78 * frac)};{fg}padding:1px 6px;'
            f'border-radius:3px;margin-right:3px">{frac * scale:.3g}</span>'
        )
    return (
        f'<div style="font-size:12.5px;color:#4b5563;margin:2px 0 8px">{esc(what)} per trained token: '
        + "".join(cells)
        + ' <span style="margin-left:10px;color:#9ca3af;background:'
        f'{rgba(NEUTRAL, 0.2)};padding:1px 6px;border-radius:3px">prompt token (not trained)</span></div>'
    )


def finetune_table(
    main: pd.DataFrame,
    comparison: str,
    others: dict[str, pd.DataFrame] | None = None,
    measure: str = "mean",
    labels: Sequence[Any] | None = None,
    extra_query: str = "",
    link_base: str = "feature",
) -> pd.DataFrame:
    """Display table of harmful features, largest change of `comparison` first (pure).

    `main` holds that comparison's rows; `others` adds the change of more comparisons by feature;
    `labels[i]` is feature i's label (None: no label column). Links keep the chosen cache."""
    col, lo_c, hi_c = MEASURES[measure]
    m = main.sort_values([col, "feature"], ascending=[False, True], na_position="last").reset_index(drop=True)
    feats = m["feature"].astype(int).to_numpy()
    lo, hi = m[lo_c].to_numpy(dtype=np.float64), m[hi_c].to_numpy(dtype=np.float64)
    task = pd.array(
        [int(t) if t == t and t is not None else None for t in m["risk_task_feature"]], dtype="Int64"
    )
    df = pd.DataFrame(
        {
            "feature": feats,
            "open": [f"{link_base}?feature={int(f)}{extra_query}" for f in feats],
            f"Δ {comparison}": m[col].to_numpy(dtype=np.float64),
            "CI low": lo,
            "CI high": hi,
            "CI excludes 0": (lo > 0) | (hi < 0),
            "risk (max cos)": m["risk_max_cos"].to_numpy(dtype=np.float64),
            "nearest task feature": task,
            "category": m["harm_category"].astype("string").fillna("").to_numpy(dtype=object),
        }
    )
    for name, other in (others or {}).items():
        by = other.drop_duplicates("feature").set_index("feature")[col]
        df[f"Δ {name}"] = by.reindex(feats).to_numpy(dtype=np.float64)
    if labels is not None:
        df["label"] = [
            ("" if labels[f] is None or labels[f] is pd.NA else str(labels[f]))
            if 0 <= f < len(labels)
            else ""
            for f in feats.tolist()
        ]
    return df


def triage_table(ranked: pd.DataFrame) -> pd.DataFrame:
    """Display table of a triage ranking (pure): previews stay plain text (newlines shown as ↵) for st.dataframe."""
    return pd.DataFrame(
        {
            "rank": ranked["rank"].astype(int).to_numpy(),
            "key": ranked["key"].astype(str).to_numpy(dtype=object),
            "score": ranked["score"].to_numpy(dtype=np.float64),
            "direct": ranked["direct"].to_numpy(dtype=np.float64),
            "via overlap": ranked["via_overlap"].to_numpy(dtype=np.float64),
            "removed": ranked["removed"].astype(bool).to_numpy(),
            "random removed": ranked["random_removed"].astype(bool).to_numpy(),
            "trained tokens": ranked["n_tokens"].astype(int).to_numpy(),
            "top features": [", ".join(f"#{int(f)}" for f in fs) for fs in ranked["top_features"]],
            "preview": [
                ("" if p is None or p is pd.NA else str(p)).replace("\r", "").replace("\n", "↵ ")
                for p in ranked["preview"]
            ],
        }
    )
