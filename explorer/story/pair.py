"""The story of one flagged pair: a task feature and its harmful neighbour, as overlaps.parquet flags them.

Only a pair the cache flags gets this story (`build_story` refuses any other): its titles say "a
task feature" and "closer than chance" because the cache's rows say so, and each is still checked
against the feature's own columns before it is written.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from explorer import claims as C
from explorer import figures as F
from explorer.data import CacheData, cache_findings
from explorer.data.evidence import group_examples
from explorer.story.base import Step, esc, examples_list, joined, label_of, model_name, two_columns
from explorer.story.closeness import closeness_chart
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


def examples_in(examples: list[dict[str, Any]], group: str) -> list[dict[str, Any]]:
    """The feature's stored examples from `group`'s documents, strongest first, one per context (a context that
    is both a top and a group_top example is listed once: data.evidence.group_examples), so 'on harmful
    requests' is said of harmful documents only."""
    return group_examples(examples, group).examples


def intro_step(cache: CacheData, feature: int, examples: list[dict[str, Any]]) -> Step:
    """'What is a feature?' with the followed feature's first examples, in its role's colour."""
    color = F.role_color(cache.row(feature))
    return Step(
        "feature",
        "What is a feature?",
        f"A language model turns every word it reads into a long list of numbers. A <b>sparse autoencoder</b> "
        f"splits that list into thousands of <b>features</b>: directions that each switch on for one "
        f"recognisable kind of text. This map has <b>{cache.n:,}</b> of them, read out of "
        f"{model_name(cache.manifest)}. Below, feature #{feature} lights up (darker = stronger) on these words:",
        body=examples_list(examples, 2, color, window=16),
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
    role = F.role_of(cache.row(feature))
    lines = (
        f"the lines join it to its {above} neighbour{'s' if above != 1 else ''} above the chance level "
        f"{null:.3g} (thicker = closer)"
        if above
        else f"none of its neighbours is above the chance level {null:.3g}, so no line is drawn"
    )
    return Step(
        "map",
        "The map: every feature is a dot",
        "Features whose directions point the same way sit close together. Colour is the harm score: the "
        "<b style='color:#c81e1e'>redder</b> a dot, the more it fires on harmful requests than on benign ones; "
        f"grey ones no more. The <b style='color:{F.role_color(role)}'>{F.ROLE_WORDS[role]} star</b> is {who}, and "
        f"{lines}.",
        figure=F.map_figure(
            cache.features,
            "harm score",
            sel,
            max_points=max_points,
            height=560,
            title=f"The feature map coloured by harm score, feature #{feature} starred with its neighbours above "
            "chance",
        ),
        figure_name=f"feature-{feature}-map",
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
    n_flagged = len(cache.overlaps)
    t_all, h_all = cache.examples_of(task), cache.examples_of(harmful)
    t_ex = [e for e in t_all if e.get("kind") == "top"]
    t_is = C.fires_on_task(t_row)
    steps = [
        intro_step(cache, task, t_ex),
        map_step(cache, task, f"{'task ' if t_is else ''}feature #{task}", max_points),
    ]
    n_task = int(cache.features["is_task"].sum())
    passes = f" It is one of the {n_task:,} features that pass the task test." if t_is else ""
    steps.append(
        Step(
            "task",
            f"A task feature: #{task}" if t_is else f"Feature #{task}",
            f"Feature #{task} — <b>{label_of(t_row)}</b> — has task score {t_row['task_score']:.2f}"
            f"{_bounds(t_row)}: 0.5 means it fires alike on the task text (the narrow data a model might be "
            f"fine-tuned on) and on its control text, 1.0 that it fires only on task text. "
            f"{esc(C.task_claim(t_row, task))}{passes} Here is where it fires, by kind of text, and its strongest examples:",
            figure=F.group_rates_figure(cache.group_rates(task), height=260),
            body=examples_list(t_ex, 3, F.role_color(t_row), window=16),
            figure_name=f"feature-{task}-firing-by-text",
            figure_title=f"Feature #{task}: share of tokens where it fires, by kind of text",
        )
    )
    steps.append(neighbour_step(cache, task, harmful, h_row, cos, n_flagged))
    steps.append(text_step(task, harmful, t_all, h_all, t_row, h_row))
    steps.append(sets_step(cache))
    steps.append(hypothesis_step(cache, task, harmful, cos))
    measured = finetune_result_step(cache)
    if measured is not None:
        steps.append(measured)
    return steps


def text_step(
    task: int,
    harmful: int,
    t_all: list[dict[str, Any]],
    h_all: list[dict[str, Any]],
    t_row: dict[str, Any],
    h_row: dict[str, Any],
) -> Step:
    """Each feature's examples on its own kind of text: the task feature's on task text, the harmful one's on
    harmful requests; where a feature has none there, its strongest examples, and the lead says so."""
    t_is, h_is = C.fires_on_task(t_row), C.fires_on_harm(h_row)
    t_on, h_on = examples_in(t_all, "task"), examples_in(h_all, "harmful")
    t_top = [e for e in t_all if e.get("kind") == "top"]
    h_top = [e for e in h_all if e.get("kind") == "top"]
    t_name = f"{'task feature' if t_is else 'feature'} #{task}"
    h_name = f"{'harmful feature' if h_is else 'feature'} #{harmful}"
    said = []
    if t_on:
        left, left_title = t_on, f"{t_name} on task text"
        said.append(f"Left: feature #{task}'s strongest examples on task text")
    else:
        left, left_title = t_top, f"{t_name}: strongest examples"
        said.append(
            f"Left: feature #{task}'s strongest examples (none of its stored examples comes from task text)"
        )
    if h_on:
        right, right_title = h_on, f"{h_name} on harmful requests"
        said.append(f"right: feature #{harmful}'s strongest examples on harmful requests")
    else:
        right, right_title = h_top, f"{h_name}: strongest examples"
        said.append(
            f"right: feature #{harmful}'s strongest examples. None of feature #{harmful}'s stored examples comes "
            "from a harmful request, so none is shown as one"
        )
    return Step(
        "text",
        "The text that makes each one fire",
        "; ".join(said)
        + ". The badge on each names the text it comes from. Hover a word to see the activation.",
        body=two_columns(
            examples_list(left, 4, F.role_color(t_row), window=14),
            examples_list(right, 4, F.role_color(h_row), window=14),
            left_title,
            right_title,
            t_row,
            h_row,
        ),
    )


def neighbour_step(
    cache: CacheData, task: int, harmful: int, h_row: dict[str, Any], cos: float, n_flagged: int
) -> Step:
    """The harmful neighbour and its cosine against chance (the title says 'closer' only when it is)."""
    null = cache.null_cosine
    ratio = cos / null if null > 0 and math.isfinite(cos) else float("nan")
    shaped = " shaped like this decoder" if cache.neighbors.null_kind == "covariance" else ""
    above, h_is = C.closer_than_chance(cos, null), C.fires_on_harm(h_row)
    noun = "harmful neighbour" if h_is else f"neighbour #{harmful}"
    return Step(
        "neighbour",
        f"Its {noun} is closer than chance" if above else f"Its {noun}",
        f"Feature #{harmful} — <b>{label_of(h_row)}</b> — {esc(C.harm_claim(h_row))}. The two directions have "
        f"cosine <b>{cos:.2f}</b>: <b>{ratio:.1f}×</b> the level random directions{shaped} reach by chance "
        f"({null:.3g}, the {cache.null_label}); the pair is at least as close as the nearest neighbour of "
        f"{percent_below(cache, cos)} of all features. "
        + esc(C.closer_claim(cos, null, cache.null_label, n_flagged)),
        figure=F.closeness_figure(
            cos,
            null,
            typical_neighbour_cosine(cache),
            null_label=cache.null_label,
            pair_name=f"#{task} ↔<br>#{harmful}",
        ),
        figure_name=f"features-{task}-{harmful}-cosine-vs-chance",
        figure_title=f"Features #{task} and #{harmful}: the cosine of their decoder directions against chance",
    )


def shown_and_not(cache: CacheData, task: int, harmful: int, cos: float) -> str:
    """What this cache shows about the pair, and what it does not (plain text)."""
    t_row, h_row = cache.row(task), cache.row(harmful)
    shows: list[str] = []
    lacks: list[str] = []
    (shows if C.fires_on_task(t_row) else lacks).append(
        f"that feature #{task} fires more on the task text than on its control text"
    )
    (shows if C.fires_on_harm(h_row) else lacks).append(
        f"that feature #{harmful} fires more on harmful requests than on benign ones"
    )
    (shows if C.closer_than_chance(cos, cache.null_cosine) else lacks).append(
        f"that their directions are closer than chance (cosine {cos:.2f} against {cache.null_cosine:.3g})"
    )
    lacks.append(
        "that fine-tuning on the task data moves the model along the task direction, or that moving along the "
        "harmful direction changes what the model does"
    )
    said = f"What this cache shows: {'; '.join(shows)}." if shows else "This cache shows none of it."
    said += f" What it does not show: {'; '.join(lacks)}."
    return said


def hypothesis_step(cache: CacheData, task: int, harmful: int, cos: float) -> Step:
    """What fine-tuning could do, stated as the hypothesis it is, then what this cache does and does not show
    about the pair (each part checked against the cache). The paper's set-level comparison is the step before,
    with its figure (sets_step): this step's figure is the hypothesis drawing."""
    angle = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
    said = shown_and_not(cache, task, harmful, cos)
    lead = (
        f"A hypothesis, not a finding: if fine-tuning on the task data pushes the model along feature #{task}'s "
        f"direction, then, because feature #{harmful}'s direction is {angle:.0f}° away, every such step also "
        f"moves about <b>{cos:.0%}</b> as far along it, and the model could grow more harmful without seeing a "
        f"single harmful example (\u201cemergent misalignment\u201d, Betley et al. 2025; removing the training "
        f"samples closest to such features reduced it in Minegishi et al. 2026). The drawing is geometry only: "
        f"what would follow if fine-tuning moved along the task direction, not a measurement that it does. "
        f"{esc(said)}"
    )
    withheld = finetune_withheld(cache)
    if withheld:
        lead += f" This cache's measured fine-tune is not shown: {esc(withheld)}."
    return Step(
        "finetune",
        "What fine-tuning could do: a hypothesis",
        lead,
        figure=F.finetune_figure(cos),
        figure_name=f"features-{task}-{harmful}-hypothesis",
        figure_title=f"Hypothesis, geometry only: a step along the direction of #{task} moves {cos:.0%} as far "
        f"along that of #{harmful}",
    )


def sets_step(cache: CacheData) -> Step:
    """The paper's set-level comparison as closeness.json states it (by test, else the exploratory ranked one),
    with the figure of exactly that comparison (story.closeness.closeness_chart, as the result story draws it),
    or the sentence saying why no figure is drawn."""
    fd = cache_findings(cache)
    chart = closeness_chart(fd, cache.name)
    return Step(
        "sets",
        "Beyond this pair: task and control features as whole sets",
        joined(C.PAPER_COMPARISON, C.closeness_text(fd), C.ranked_text(fd), chart.said),
        figure=chart.figure,
        figure_name=chart.name,
        figure_title=chart.title,
    )
