"""What one feature is: firing rates, activation histogram, examples with per-token highlighting,
logit-lens chips, header, and its neighbour table (Feature, Map and Overlaps pages, the story)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from explorer.data.evidence import shown_span
from explorer.figures.style import (
    GROUP_COLORS,
    HARM,
    INK,
    NEUTRAL,
    TASK,
    badge,
    base_layout,
    category_color,
    esc,
    rgba,
    role_of,
    show_token,
)
from precompute.pipeline.auroc import hanley_mcneil  # numpy only: the explorer stays torch-free


def group_rates_figure(
    rates: dict[str, float], categories: pd.DataFrame | None = None, height: int = 260
) -> go.Figure:
    """Firing rate per corpus group (and per harm category inside 'harmful', when known)."""
    names: list[str] = []
    vals: list[float] = []
    colors: list[str] = []
    for g, v in rates.items():
        names.append(esc(g))
        vals.append(float(v) * 100)
        colors.append(GROUP_COLORS.get(g, NEUTRAL))
    if categories is not None and len(categories):
        harm = categories[(categories["group"] == "harmful") & categories["category"].notna()]
        for cat, v in zip(harm["category"], harm["frequency"], strict=False):
            names.append(f"harmful · {esc(cat)}")
            vals.append(float(v) * 100)
            colors.append(category_color(cat))  # its fixed colour, as on the map and in the story
    fig = go.Figure(
        go.Bar(
            x=vals,
            y=names,
            orientation="h",
            marker_color=colors,
            hovertemplate="%{y}: %{x:.3g}% of tokens<extra></extra>",
        )
    )
    base_layout(fig, height, title="Firing rate by text group (% of tokens)")
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text="% of tokens where it fires", ticksuffix="%")
    return fig


def histogram_figure(
    edges: np.ndarray, counts: np.ndarray, color: str = TASK, height: int = 230
) -> go.Figure:
    """Distribution of the feature's activation where it fires (log count axis)."""
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure(
        go.Bar(
            x=centres,
            y=counts,
            marker_color=color,
            width=(edges[1] - edges[0]) * 0.95,
            hovertemplate="activation %{x:.2f}: %{y:,} tokens<extra></extra>",
        )
    )
    base_layout(fig, height, title="Activation histogram (tokens where it fires)")
    fig.update_yaxes(type="log", dtick=1, title_text="tokens")
    fig.update_xaxes(title_text="activation")
    return fig


# --------------------------------------------------------------------------------------------------
# HTML builders (everything escaped, inline styles only)


def tokens_html(
    tokens: Sequence[Any],
    activations: Sequence[float] | np.ndarray,
    scale: float,
    color: str = TASK,
    center: int | None = None,
    window: int | None = None,
    muted: Sequence[bool] | np.ndarray | None = None,
    titles: Sequence[str] | None = None,
) -> str:
    """One context as inline spans: background opacity = activation / scale; hover shows the value.

    `muted[i]` greys token i (text and highlight), e.g. prompt tokens a fine-tune does not train on;
    `titles[i]` replaces its hover text (escaped)."""
    n = len(tokens)
    lo, hi = shown_span(n, center, window)  # the span merge_repeats compares
    scale = scale if scale and scale > 0 else 1.0
    out = [
        '<span style="font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;'
        'line-height:1.9;white-space:pre-wrap;word-break:break-word">'
    ]
    if lo > 0:
        out.append('<span style="color:#9ca3af">… </span>')
    for i in range(lo, hi):
        a = float(activations[i]) if i < len(activations) and activations[i] is not None else 0.0
        alpha = min(1.0, max(0.0, a / scale))
        style = "padding:1px 0;border-radius:3px;"
        grey = muted is not None and i < len(muted) and bool(muted[i])
        if grey:
            style += "color:#9ca3af;"
            if a > 0:
                style += f"background:{rgba(NEUTRAL, 0.08 + 0.3 * alpha)};"
        elif a > 0:
            style += f"background:{rgba(color, 0.12 + 0.78 * alpha)};"
            if alpha > 0.6:
                style += "color:white;"
        if i == center:
            style += f"outline:2px solid {color};"
        title = esc(titles[i]) if titles is not None and i < len(titles) else f"activation {a:.3f}"
        out.append(f'<span title="{title}" style="{style}">{show_token(tokens[i])}</span>')
    if hi < n:
        out.append('<span style="color:#9ca3af"> …</span>')
    out.append("</span>")
    return "".join(out)


def examples_html(
    examples: Sequence[dict[str, Any]],
    scale: float | None = None,
    color: str = TASK,
    window: int | None = 24,
    limit: int | None = None,
    documents: pd.DataFrame | None = None,
    doc_href: Callable[[dict[str, Any]], str | None] | None = None,
    ranks: str = "rank",
) -> str:
    """A list of examples: metadata line (rank, group, category, document) + highlighted tokens.

    `doc_href(example)`, when given, links each example to its whole document; an example shorter than
    its document says it is one context of it (the harvest reads documents in contexts). `ranks` heads each
    example: "rank" its rank within its kind (#4, #1 on harmful), "overall" the same with a top example's rank
    said to be among all the feature's top examples (a filtered list, where ranks skip), "shown" its place in
    this list (1., 2., ...: a list whose lead says what it holds). An example standing for repeats of its
    passage (data.evidence.merge_repeats) says so."""
    if not examples:
        return (
            '<div style="color:#6b7280;font-style:italic;padding:6px 0">No examples in this cache '
            "(the feature never fired on the corpus).</div>"
        )
    if scale is None:
        scale = max((float(e.get("max_activation") or 0) for e in examples), default=1.0) or 1.0
    rows = []
    for i, e in enumerate(examples[:limit] if limit else examples, 1):
        group = e.get("group") or ""
        kind = e.get("kind") or "top"
        if ranks == "shown":
            head = f'<b style="color:{INK}">{i}.</b>'
        elif kind == "top":
            overall = " of its top examples" if ranks == "overall" else ""
            head = f'<b style="color:{INK}">#{int(e.get("rank") or 0) + 1}{overall}</b>'
        elif kind == "group_top":
            head = f'<b style="color:{INK}">#{int(e.get("rank") or 0) + 1} on {esc(group)}</b>'
        elif kind == "category_top":
            where = f"{esc(group)} · {esc(e.get('category') or '')}"
            head = f'<b style="color:{INK}">#{int(e.get("rank") or 0) + 1} on {where}</b>'
        else:
            q = e.get("quantile")
            head = f'<b style="color:#6b7280">quantile {float(q):.2f}</b>' if q is not None else "sample"
        meta = [head, badge(group, GROUP_COLORS.get(str(group), NEUTRAL), filled=True)]
        if e.get("category"):
            meta.append(badge(e["category"], HARM))
        meta.append(
            f'<span style="color:#6b7280;font-size:12px">max {float(e.get("max_activation") or 0):.2f}'
            f" · doc {esc(e.get('doc_id'))}</span>"
        )
        src = _doc_source(documents, e.get("doc_id"))
        if src:
            meta.append(f'<span style="color:#9ca3af;font-size:12px">{esc(src)}</span>')
        meta.append(_context_note(documents, e))
        if e.get("repeats"):
            k = int(e["repeats"])
            meta.append(
                f'<span data-repeats="{k}" style="color:#b45309;font-size:12px">{k} more stored example'
                f"{'s show' if k != 1 else ' shows'} this passage of the document (not repeated here)</span>"
            )
        href = doc_href(e) if doc_href is not None else None
        if href:
            meta.append(
                f'<a href="{esc(href)}" target="_self" data-doc-link="{esc(e.get("doc_id"))}" '
                'style="font-size:12px">whole document ↗</a>'
            )
        body = tokens_html(
            e.get("tokens") or [],
            e.get("activations") or [],
            scale,
            color=color,
            center=e.get("max_position"),
            window=window,
        )
        rows.append(
            f'<div style="padding:6px 0 8px;border-bottom:1px solid #f1f5f9">'
            f'<div style="margin-bottom:2px">{" ".join(meta)}</div>{body}</div>'
        )
    return "<div>" + "".join(rows) + "</div>"


def _context_note(documents: pd.DataFrame | None, e: dict[str, Any]) -> str:
    """'context of 128 of the document's 412 tokens' when the example is a cut of a longer document."""
    n = len(e.get("tokens") or [])
    doc_id = e.get("doc_id")
    if documents is None or doc_id is None or doc_id not in documents.index or "n_tokens" not in documents:
        return ""
    total = int(documents["n_tokens"].get(doc_id, 0) or 0)
    if total <= n:
        return ""
    return f'<span style="color:#b45309;font-size:12px">context of {n} of the document\'s {total:,} tokens</span>'


def _doc_source(documents: pd.DataFrame | None, doc_id: Any) -> str | None:
    """The file a document came from (basename of source_path, else a string source), or None."""
    if documents is None or doc_id is None or doc_id not in documents.index:
        return None
    for col in ("source_path", "source"):
        if col in documents:
            v = documents.at[doc_id, col]
            if isinstance(v, str) and v:
                return v.replace("\\", "/").rsplit("/", 1)[-1]
    return None


def token_chips_html(tokens: Sequence[Any], color: str, title: str) -> str:
    """Logit-lens tokens as chips."""
    chips = "".join(
        f'<span style="display:inline-block;margin:2px 4px 2px 0;padding:1px 8px;border-radius:6px;'
        f"background:{rgba(color, 0.1)};border:1px solid {rgba(color, 0.4)};font-family:ui-monospace,Menlo,"
        f'monospace;font-size:13px;white-space:pre">{show_token(t)}</span>'
        for t in tokens
    )
    if not chips:
        chips = '<span style="color:#6b7280">—</span>'
    return f'<div style="margin:2px 0 8px"><div style="font-size:12px;color:#6b7280">{esc(title)}</div>{chips}</div>'


def feature_header_html(row: dict[str, Any], role: str | None = None, accent: str | None = None) -> str:
    """Title block of a feature: id, label, role/flags, explanation. `accent` overrides the stripe's
    colour; accent "both" draws a red and a blue stripe (a feature both harmful and task)."""
    color = accent or (
        "both"
        if role_of(row) == "both"
        else HARM
        if role == "harmful" or (role is None and row.get("is_harmful"))
        else TASK
    )
    stripe = f"{HARM};box-shadow:-5px 0 0 {TASK}" if color == "both" else color
    flags = []
    if row.get("is_task"):
        flags.append(badge("task feature", TASK, filled=True))
    if row.get("is_harmful"):
        flags.append(badge("harmful", HARM, filled=True))
    if row.get("harm_category"):
        flags.append(badge(row["harm_category"], HARM))
    if row.get("dead"):
        flags.append(badge("dead", NEUTRAL, filled=True))
    label = esc(row.get("label")) or '<span style="color:#9ca3af">(no label)</span>'
    expl = esc(row.get("explanation"))
    return (
        f'<div style="border-left:5px solid {stripe};padding:2px 0 2px 12px;margin:4px 0 10px">'
        f'<div style="font-size:13px;color:#6b7280">Feature #{int(row["feature"])}</div>'
        f'<div style="font-size:22px;font-weight:650;color:{INK};line-height:1.3">{label}</div>'
        f'<div style="margin-top:4px">{"".join(flags)}</div>'
        + (f'<div style="color:#4b5563;font-size:14px;margin-top:4px">{expl}</div>' if expl else "")
        + auto_explanation_html(row)
        + "</div>"
    )


def auto_explanation_html(row: dict[str, Any]) -> str:
    """`featuregeom explain`'s explanation with its detection score, worded by what the score shows:
    "better than chance" only when the AUROC's lower 95% bound is above 0.5."""
    text = row.get("auto_explanation")
    if not isinstance(text, str) or not text:
        return ""
    auc, n = row.get("auto_explanation_detection"), row.get("auto_explanation_scored")
    model = esc(row.get("auto_explanation_model") or "a language model")
    if isinstance(auc, float) and np.isfinite(auc) and isinstance(n, (int, float)) and n >= 2:
        half = int(n) // 2
        better = float(hanley_mcneil(auc, half, int(n) - half)[0]) > 0.5
        score = f"detection AUROC {auc:.2f} on {int(n)} held-out contexts: " + (
            "tells the feature's contexts from matched ones better than chance"
            if better
            else "not shown to tell the feature's contexts from matched ones better than chance"
        )
    else:
        score = "not scored"
    return (
        '<div style="color:#4b5563;font-size:14px;margin-top:4px">'
        f'Model explanation: \u201c{esc(text)}\u201d <span style="color:#9ca3af;font-size:12px">({model}; {score})</span></div>'
    )


NN_PCT_HELP = (
    "the cosine's percentile among every feature's nearest-neighbour cosine: 50 = as close as a typical "
    "feature's nearest neighbour, 99 = closer than the nearest neighbour of 99% of features"
)


def closeness_caption(
    cosine: float, null_cosine: float, null_label: str | None = None, percentile: float | None = None
) -> str:
    """'cosine 0.41 — 4.3× the chance level 0.095 (covariance null); nearest-neighbour percentile 97.4'
    (plain text, no cache strings): `null_label` names the null, `percentile` is the cosine's rank
    among every feature's nearest-neighbour cosine."""
    if not np.isfinite(cosine):
        return "not in the neighbour list"
    text = f"cosine {cosine:.2f}"
    if null_cosine and null_cosine > 0:
        text += f" — {cosine / null_cosine:.1f}× the chance level {null_cosine:.3g}"
        if null_label:
            text += f" ({null_label})"
    if percentile is not None and np.isfinite(percentile):
        text += f"; nearest-neighbour percentile {percentile:.1f}"
    return text


def neighbour_table(
    nbrs: pd.DataFrame, null_cosine: float, link_base: str = "feature", extra_query: str = ""
) -> pd.DataFrame:
    """Display table of neighbours (pure): id, link, label, cosine, × chance, percentile, harm, category.

    "× chance" is the cosine over the flagging null; "NN percentile" its rank (0-100) among every
    feature's nearest-neighbour cosine (`neighbours_of`'s `percentile`).

    `extra_query` (e.g. "&cache=after") is appended to each link so links keep the chosen cache."""
    df = pd.DataFrame(
        {
            "feature": nbrs["feature"].astype(int),
            "open": [f"{link_base}?feature={int(f)}{extra_query}" for f in nbrs["feature"]],
            "label": nbrs["label"].astype("string").fillna(""),
            "cosine": nbrs["cosine"].round(3),
            "× chance": (nbrs["cosine"] / null_cosine).round(2) if null_cosine > 0 else np.nan,
            "NN percentile": nbrs["percentile"].round(1),
            "harm score": nbrs["harm_score"].round(3),
            "harmful": nbrs["is_harmful"].astype(bool),
            "category": nbrs["harm_category"].astype("string").fillna(""),
            "above chance": nbrs["cosine"] >= null_cosine,
        }
    )
    return df.reset_index(drop=True)
