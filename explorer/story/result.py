"""The story of a cache with no flagged pair: what it found, told truthfully, and what it withholds.

A cache in which no feature passes the task test, or no task feature has a harmful neighbour above
chance, has no pair to present; borrowing the feature with the highest task score and calling it a
task feature would state what the cache does not show. This story says instead what the cache found,
every sentence computed from it (explorer/claims.py): how many features were scored and how many pass
each test, what chance is on this decoder, the flagged-pair count and the closeness verdict, and why
the mechanism is not illustrated.
"""

from __future__ import annotations

import numpy as np

from explorer import claims as C
from explorer import figures as F
from explorer.data import CacheData, Findings, cache_findings
from explorer.story.base import Step, esc, examples_list, joined, label_of
from explorer.story.closeness import closeness_chart
from explorer.story.finetune import finetune_result_step, finetune_withheld
from explorer.story.pair import examples_in, intro_step, map_step


def example_feature(cache: CacheData) -> tuple[int, str]:
    """The feature the story follows and why: the harmful feature with the most neighbours above the chance
    level (ties: the higher harm score), else the live feature that fires most often."""
    f = cache.features
    harm = f["harm_score"].to_numpy(dtype=np.float64, na_value=np.nan)
    lo = (
        f["harm_score_lo"].to_numpy(dtype=np.float64, na_value=np.nan)
        if "harm_score_lo" in f
        else np.full(len(f), np.nan)
    )
    # the harm test and its lower bound (claims.fires_on_harm): only such a feature is called harmful
    flagged = (
        f["is_harmful"].to_numpy(dtype=bool) & np.isfinite(harm) & (np.nan_to_num(lo, nan=0.0) > C.CHANCE)
    )
    if flagged.any():
        above = (np.nan_to_num(cache.neighbors.cosine, nan=-1.0) >= cache.null_cosine).sum(axis=1)
        key = np.where(flagged, above + 0.5 * np.clip(harm, 0.0, 1.0), -np.inf)  # harm < 1: breaks ties only
        best = int(np.argmax(key))
        n = int(above[best])
        why = (
            f"the harmful feature with the most neighbours above the chance level ({n} of its "
            f"{cache.neighbors.cosine.shape[1]} nearest)"
            if n
            else f"the harmful feature with the highest harm score ({harm[best]:.2f}); no harmful feature has "
            "a neighbour above the chance level"
        )
        return best, why
    freq = np.where(f["dead"].to_numpy(dtype=bool), -np.inf, f["frequency"].to_numpy(dtype=np.float64))
    return (int(np.argmax(freq)) if len(freq) else 0), "the feature that fires most often"


def build_result_story(cache: CacheData, max_points: int = 12000) -> list[Step]:
    """The steps for a cache without a flagged pair (any cache: every title and sentence is computed)."""
    fd = cache_findings(cache)
    ex, why = example_feature(cache)
    row = cache.row(ex)
    examples = [e for e in cache.examples_of(ex) if e.get("kind") == "top"]
    who = f"feature #{ex}, {why}"
    steps = [
        intro_step(cache, ex, examples),
        map_step(cache, ex, who, max_points),
    ]
    steps.append(harmful_step(cache, fd, ex, row, examples))
    steps.append(
        Step(
            "task",
            task_title(fd),
            joined(C.scored_sentence(fd), C.task_sentence(fd), C.lean_sentence(fd)),
            figure=F.task_scores_figure(cache.features["task_score"].to_numpy(np.float64), fd.task_threshold)
            if fd.n_task_scored
            else None,
            figure_name=f"{cache.name}-task-scores",
            figure_title=f"Task scores of the {fd.n_task_scored:,} scored features (task vs control text)",
        )
    )
    steps.append(
        Step(
            "null",
            "What counts as close",
            "Two features are close when their decoder directions point nearly the same way (a high cosine); "
            "close means closer than random directions get by chance. " + joined(C.null_sentence(fd)),
            figure=F.nulls_figure(fd.null_isotropic, fd.null_covariance, fd.typical_nn_cosine),
            figure_name=f"{cache.name}-chance-levels",
            figure_title="What cosine random directions reach by chance, against a typical nearest neighbour",
        )
    )
    chart = closeness_chart(fd, cache.name)
    steps.append(
        Step(
            "pairs",
            pairs_title(fd),
            joined(
                C.flagged_sentence(fd, below_null(cache)),
                C.PAPER_COMPARISON,
                C.closeness_text(fd),
                C.ranked_text(fd),
                chart.said,
            ),
            figure=chart.figure,
            figure_name=chart.name,
            figure_title=chart.title,
        )
    )
    measured = finetune_result_step(cache)
    withheld = finetune_withheld(cache)
    steps.append(
        Step(
            "withheld",
            "What this cache does not show",
            joined(
                C.withheld_sentence(fd),
                f"The fine-tune diff in this cache (finetune/insecure) is not quoted either: {withheld}."
                if withheld
                else None,
            ),
        )
    )
    if measured is not None:
        steps.append(measured)
    return steps


def below_null(cache: CacheData) -> int:
    """Rows of overlaps.parquet whose cosine is not above the calibrated null (0 on a consistent cache)."""
    cos = cache.overlaps["cosine"].to_numpy(dtype=np.float64)
    return int(sum(not C.closer_than_chance(float(c), cache.null_cosine) for c in cos))


def task_title(fd: Findings) -> str:
    if fd.n_task_scored == 0:
        return "No task scores"
    if not fd.n_task:
        return "No task feature"
    return f"{fd.n_task:,} task feature{'s' if fd.n_task != 1 else ''}"


def pairs_title(fd: Findings) -> str:
    if fd.n_flagged:
        return f"{fd.n_flagged:,} flagged pair{'s' if fd.n_flagged != 1 else ''}"
    return "No flagged pair"


def harmful_step(cache: CacheData, fd: Findings, ex: int, row: dict, examples: list[dict]) -> Step:
    """How many features pass the harm test, by category, and the followed one's examples on harmful requests
    (only examples from harmful documents are shown as such; without any, the lead says so)."""
    title = (
        f"{fd.n_harmful:,} harmful feature{'s' if fd.n_harmful != 1 else ''}"
        if fd.n_harmful
        else "No harmful feature"
    )
    lead = joined(C.harmful_sentence(fd))
    body = None
    if C.fires_on_harm(row):
        on_harm = examples_in(cache.examples_of(ex), "harmful")
        lead += f" Feature #{ex} — <b>{label_of(row)}</b> — {esc(C.harm_claim(row))}"
        if on_harm:
            lead += ". Its strongest examples on harmful requests:"
            body = examples_list(on_harm, 3, F.HARM, window=16)
        else:
            lead += (
                ". None of its stored examples comes from a harmful request, so none is shown as one; its "
                "strongest examples:"
            )
            body = examples_list(examples, 3, F.HARM, window=16)
    return Step(
        "harmful",
        title,
        lead,
        figure=F.category_counts_figure(fd.harm_categories[:12]) if fd.harm_categories else None,
        body=body,
        figure_name=f"{cache.name}-harmful-features-by-category",
        figure_title=f"The {fd.n_harmful:,} harmful features by category"
        + (" (the 12 most common)" if len(fd.harm_categories) > 12 else ""),
    )
