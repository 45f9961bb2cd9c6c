"""The set-level closeness comparison's figure, drawn from closeness.json alone, for every story that states it.

Why a module of its own: the result story's pairs step and the pair story's sets step state the same
comparison (claims.closeness_text, claims.ranked_text), so both draw it with the same chart, and neither
states it without the chart or the sentence saying why none is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import plotly.graph_objects as go

from explorer import claims as C
from explorer import figures as F
from explorer.data import Findings


@dataclass
class ClosenessChart:
    """The pairs step's figure of the set-level comparison it states, or None and `said`, why none is drawn."""

    figure: go.Figure | None
    name: str
    title: str
    said: str | None


def closeness_chart(fd: Findings, cache_name: str) -> ClosenessChart:
    """The comparison the pairs step states, drawn from closeness.json alone: both sets' closeness to harmful
    features (figures.closeness_sets_story_figure), the comparison by test when it is testable, else the
    exploratory ranked one (said to be so); withheld, with a sentence, when the file is absent, says neither
    is testable, or holds no histogram of the sets it compares."""
    report = fd.closeness
    name = f"{cache_name}-closeness-task-vs-control-sets"
    if report is None:
        said = "cannot be read" if fd.closeness_problem else "is not in this cache"
        return ClosenessChart(
            None, name, "", f"closeness.json {said}, so the story draws no closeness figure."
        )
    if F.closeness_sentence(report) is not None:
        made = F.closeness_sets_story_figure(report)
        if made is None:
            return ClosenessChart(
                None,
                name,
                "",
                "closeness.json holds no histogram of the two sets, so no figure of them is drawn.",
            )
        return ClosenessChart(made[0], name, made[1], None)
    ranked = report.get("ranked")
    if C.ranked_text(fd) is None or not isinstance(ranked, dict):
        return ClosenessChart(
            None,
            name,
            "",
            "The comparison is not testable on this cache and closeness.json holds no testable ranked "
            "comparison, so the story draws no closeness figure.",
        )
    name = f"{cache_name}-closeness-ranked-task-vs-control-leaning"
    made = F.closeness_sets_story_figure(ranked, ranked=True)
    if made is None:
        return ClosenessChart(
            None,
            name,
            "",
            "closeness.json holds no histogram of the ranked sets, so no figure of them is drawn.",
        )
    return ClosenessChart(
        made[0],
        name,
        made[1],
        "The chart is that exploratory ranked comparison: the comparison by test is not testable here.",
    )
