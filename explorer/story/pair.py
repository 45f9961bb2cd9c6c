"""The story of one flagged pair: a task feature and its harmful neighbour, as overlaps.parquet flags them.

Only a pair the cache flags gets this story (`build_story` refuses any other): its titles say "a
task feature" and "closer than chance" because the cache's rows say so, and each is still checked
against the feature's own columns before it is written.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from explorer import figures as F
from explorer.data import CacheData
from explorer.story.base import Step, esc, label_of, model_name, two_columns
from explorer.story.finetune import finetune_result_step, finetune_withheld


def typical_neighbour_cosine(cache: CacheData) -> float:
    """Median cosine of every live feature's nearest neighbour (what 'usual closeness' looks like)."""
    first = cache.neighbors.cosine[:, 0].astype(np.float64)
    live = ~cache.features["dead"].to_numpy()
    vals = first[live & np.isfinite(first)]
    return float(np.median(vals)) if len(vals) else float("nan")


def percent_below(cache: CacheData, cos: float) -> str:
    """'97%': the share of features whose nearest neighbour is at most `cos` (the pair's percentile)."""
    pct = float(cache.neighbors.percentile(cos))
    return f"{pct:.1f}%" if math.isfinite(pct) else "—"


def is_flagged(cache: CacheData, task: int, harmful: int) -> bool:
    """Whether overlaps.parquet holds the pair (task, harmful)."""
    o = cache.overlaps
    return bool(((o["task_feature"] == task) & (o["harmful_feature"] == harmful)).any())


def group_share(examples: list[dict[str, Any]], group: str) -> str:
    """'3 of 4 come from task text' for the examples shown ('' when there are none)."""
    if not examples:
        return ""
    k = sum(1 for e in examples if e.get("group") == group)
    return f"{k} of {len(examples)} from {group} text"


def intro_step(cache: CacheData, feature: int, examples: list[dict[str, Any]], color: str = F.TASK) -> Step:
    """'What is a feature?' with the followed feature's first examples."""
    return Step(
        "feature",
        "What is a feature?",
        f"A language model turns every word it reads into a long list of numbers. A <b>sparse autoencoder</b> "
        f"splits that list into thousands of <b>features</b>: directions that each switch on for one "
        f"recognisable kind of text. This map has <b>{cache.n:,}</b> of them, read out of "
        f"{model_name(cache.manifest)}. Below, feature #{feature} lights up (darker = stronger) on these words:",
        body=F.examples_html(examples[:2], color=color, window=16),
    )


def map_step(cache: CacheData, feature: int, who: str, max_points: int) -> Step:
    """The map coloured by harm score, `feature` starred and joined to its neighbours above chance."""
    null = cache.null_cosine
    nb = cache.neighbours_of(feature)
    sel = F.Selection(
        feature=feature,
        neighbours=nb["feature"].tolist(),
        cosines=nb["cosine"].tolist(),
        harmful=nb["is_harmful"].tolist(),
        threshold=null,
    )
    above = int((nb["cosine"] >= null).sum())
    lines = (
        f"the lines join it to its {above} neighbour{'s' if above != 1 else ''} above the chance level "
        f"{null:.3g} (thicker = closer)"
        if above
        else f"none of its neighbours is above the chance level {null:.3g}, so no line is drawn"
    )
    return Step(
        "map",
        "The map: every feature is a dot",
        "Features whose directions point the same way sit close together. Colour is the harm score: "
        "<b style='color:#c81e1e'>red</b> dots fire more on harmful requests than on benign ones, grey ones "
        f"no more. The <b style='color:#1d4ed8'>blue star</b> is {who}, and {lines}.",
        figure=F.map_figure(cache.features, "harm score", sel, max_points=max_points, height=560),
        figure_name=f"map-{feature}",
    )


def _bounds(row: dict[str, Any]) -> str:
    lo, hi = row.get("task_score_lo"), row.get("task_score_hi")
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (lo, hi))
    return f" (95% CI {lo:.2f} to {hi:.2f})" if ok else ""


def build_story(cache: CacheData, task: int, harmful: int, max_points: int = 12000) -> list[Step]:
    """The steps for one flagged pair (task feature, harmful neighbour); ValueError for a pair that
    overlaps.parquet does not hold: the story never presents an unflagged pair as flagged."""
    if not is_flagged(cache, task, harmful):
        raise ValueError(f"#{task} ↔ #{harmful} is not a flagged pair of this cache (overlaps.parquet)")
    t_row, h_row = cache.row(task), cache.row(harmful)
    cos = float(cache.pair(task, harmful)["cosine"])
    n_task, n_flagged = int(cache.features["is_task"].sum()), len(cache.overlaps)
    t_ex = [e for e in cache.examples_of(task) if e.get("kind") == "top"]
    h_ex = [e for e in cache.examples_of(harmful) if e.get("kind") == "top"]
    t_is = bool(t_row.get("is_task"))
    h_is = bool(h_row.get("is_harmful"))
    steps = [
        intro_step(cache, task, t_ex),
        map_step(cache, task, f"{'task ' if t_is else ''}feature #{task}", max_points),
    ]
    passes = (
        f"It is one of the {n_task:,} features that pass the task test."
        if t_is
        else "It does not pass the task test."
    )
    steps.append(
        Step(
            "task",
            f"A task feature: #{task}" if t_is else f"Feature #{task}",
            f"Feature #{task} — <b>{label_of(t_row)}</b> — has task score {t_row['task_score']:.2f}"
            f"{_bounds(t_row)}: 0.5 means it fires alike on the task text (the narrow data a model might be "
            f"fine-tuned on) and on its control text, 1.0 that it fires only on task text. {passes} Here is "
            f"where it fires, by kind of text, and its strongest examples:",
            figure=F.group_rates_figure(cache.group_rates(task), height=260),
            body=F.examples_html(t_ex[:3], color=F.TASK, window=16),
            figure_name=f"rates-{task}",
        )
    )
    steps.append(neighbour_step(cache, task, harmful, h_row, cos, n_flagged))
    shown_t, shown_h = t_ex[:4], h_ex[:4]
    said = [s for s in (group_share(shown_t, "task"), group_share(shown_h, "harmful")) if s]
    steps.append(
        Step(
            "text",
            "The text that makes each one fire",
            f"Left: feature #{task}'s strongest examples; right: feature #{harmful}'s"
            + (f" ({'; '.join(said)})" if said else "")
            + ". The badge on each names the text it comes from. Hover a word to see the activation.",
            body=two_columns(
                F.examples_html(shown_t, color=F.TASK, window=14),
                F.examples_html(shown_h, color=F.HARM, window=14),
                f"{'task feature' if t_is else 'feature'} #{task}",
                f"{'harmful feature' if h_is else 'feature'} #{harmful}",
            ),
        )
    )
    steps.append(hypothesis_step(cache, task, harmful, cos))
    measured = finetune_result_step(cache)
    if measured is not None:
        steps.append(measured)
    return steps


def neighbour_step(
    cache: CacheData, task: int, harmful: int, h_row: dict[str, Any], cos: float, n_flagged: int
) -> Step:
    """The harmful neighbour and its cosine against chance (the title says 'closer' only when it is)."""
    null = cache.null_cosine
    ratio = cos / null if null > 0 and math.isfinite(cos) else float("nan")
    shaped = " shaped like this decoder" if cache.neighbors.null_kind == "covariance" else ""
    above = math.isfinite(cos) and cos > null
    cat = esc(h_row.get("harm_category")) or "harmful content"
    fires = (
        f"fires on harmful requests ({cat}; harm score {h_row['harm_score']:.2f})"
        if h_row.get("is_harmful")
        else f"has harm score {h_row['harm_score']:.2f} but does not pass the harm test"
    )
    return Step(
        "neighbour",
        "Its harmful neighbour is closer than chance" if above else "Its harmful neighbour",
        f"Feature #{harmful} — <b>{label_of(h_row)}</b> — {fires}. The two directions have cosine "
        f"<b>{cos:.2f}</b>: <b>{ratio:.1f}×</b> the level random directions{shaped} reach by chance "
        f"({null:.3g}, the {cache.null_label}); the pair is at least as close as the nearest neighbour of "
        f"{percent_below(cache, cos)} of all features. It is one of the {n_flagged:,} (task, harmful) "
        f"pair{'s' if n_flagged != 1 else ''} this cache flags.",
        figure=F.closeness_figure(cos, null, typical_neighbour_cosine(cache), null_label=cache.null_label),
        figure_name=f"closeness-{task}-{harmful}",
    )


def hypothesis_step(cache: CacheData, task: int, harmful: int, cos: float) -> Step:
    """What fine-tuning could do, stated as the hypothesis it is; the angle is the pair's own."""
    angle = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
    lead = (
        f"The hypothesis this explorer examines: if fine-tuning on the task data pushes the model along the "
        f"task feature's direction, then, because the harmful direction is only {angle:.0f}° away, every such "
        f"step also moves about <b>{cos:.0%}</b> as far along the harmful feature, and the model could grow "
        f"more harmful without seeing a single harmful example (\u201cemergent misalignment\u201d, Betley et al. "
        f"2025; removing the training samples closest to such features reduced it in Minegishi et al. 2026). "
        f"The drawing is geometry only: what would follow if fine-tuning moved along the task direction, not a "
        f"measurement that it does."
    )
    withheld = finetune_withheld(cache)
    if withheld:
        lead += f" This cache's measured fine-tune is not shown: {esc(withheld)}."
    return Step(
        "finetune",
        "What fine-tuning could do",
        lead,
        figure=F.finetune_figure(cos),
        figure_name=f"finetune-{task}-{harmful}",
    )
