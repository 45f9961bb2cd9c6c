"""The result story's closeness figure: it draws the comparison the pairs step states, from closeness.json alone
(the sets by test when testable, else the exploratory ranked sets), in style's role colours, titled with the
file's own difference, interval and p; it is withheld, with a sentence, when the file cannot back it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from explorer import figures as F
from explorer.data import load_cache
from explorer.figures.closeness import INDUCING_NAME, NON_INDUCING_NAME
from explorer.story import build_result_story, build_story
from precompute import schema
from tests.explorer.test_story_claims import BACKED_CLAIM, backed_report, plain, write_closeness


def _pairs(cache: Path) -> Any:
    return {s.key: s for s in build_result_story(load_cache(cache))}["pairs"]


def _expected_bars(part: dict[str, Any]) -> list[tuple[list[float], list[float], int]]:
    """(bin centres, share of the set per bin, set size) of each set, from the histogram in the file."""
    edges = np.asarray(part["histogram"]["edges"], dtype=float)
    centres = ((edges[:-1] + edges[1:]) / 2).tolist()
    out = []
    for key in ("inducing", "non_inducing"):
        counts = np.asarray(part["histogram"][key], dtype=float)
        out.append((centres, (counts / counts.sum()).tolist(), int(counts.sum())))
    return out


def _check_bars(fig: Any, part: dict[str, Any], names: tuple[str, str], colors: tuple[str, str]) -> None:
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 2
    for bar, (x, y, n), name, color in zip(bars, _expected_bars(part), names, colors, strict=True):
        np.testing.assert_allclose(bar.x, x, rtol=0, atol=1e-12)
        np.testing.assert_allclose(bar.y, y, rtol=0, atol=1e-12)
        assert bar.name == f"{name}, n = {n}" and bar.marker.color == color
    # each set's mean, dashed, in its set's colour
    means = sorted((s.x0, s.line.color) for s in fig.layout.shapes)
    want = sorted((part[k]["mean"], c) for k, c in zip(("inducing", "non_inducing"), colors, strict=True))
    assert [c for _, c in means] == [c for _, c in want]
    np.testing.assert_allclose([m for m, _ in means], [m for m, _ in want], rtol=0, atol=1e-12)


def test_ranked_comparison_is_drawn_when_the_test_is_not(notask_cache: Path, tmp_path: Path) -> None:
    """The synthetic cache without task features: the comparison by test is not testable, the ranked one is;
    the lead states the ranked numbers and the step draws exactly the ranked histogram of closeness.json."""
    cache = tmp_path / "notask"
    shutil.copytree(notask_cache, cache)
    report = json.loads((cache / schema.CLOSENESS).read_text())
    ranked = report["ranked"]
    assert report["verdict"] == "not_testable" and ranked["verdict"] != "not_testable" and ranked["histogram"]
    step = _pairs(cache)
    assert step.figure is not None
    n = ranked["n"]
    _check_bars(
        step.figure,
        ranked,
        (f"top {n} by task score (task-leaning)", f"bottom {n} (control-leaning)"),
        (F.TASK_LIGHT, F.NEITHER_COLOR),  # neither set passes the task test: no task blue
    )
    lo, hi = ranked["ci"]
    assert step.figure.layout.title.text == F.esc(
        f"Exploratory: closeness to harmful features, top vs bottom {n} "
        f"(difference {ranked['difference']:+.3f}, 95% CI {lo:+.3f} to {hi:+.3f}, two-sided p = "
        f"{F.fmt_p(ranked['p_two_sided'])})"
    )
    assert len(step.figure.layout.title.text) <= 130  # one line in the story and the export
    assert step.figure_name == "notask-closeness-ranked-task-vs-control-leaning"
    assert (
        "The chart is that exploratory ranked comparison: the comparison by test is not testable here."
        in (plain(step.lead))
    )


def test_comparison_by_test_is_drawn_in_role_colours(notask_cache: Path, tmp_path: Path) -> None:
    """A testable comparison by test (with a histogram) is drawn instead: task features blue, control features
    (which pass no role test) slate, the title with the file's difference, interval and p."""
    cache = tmp_path / "notask"
    shutil.copytree(notask_cache, cache)
    r = backed_report(cache)
    r["histogram"] = {
        "edges": [0.0, 0.1, 0.2, 0.3, 0.4],
        "inducing": [1, 2, 6, 3],
        "non_inducing": [4, 6, 4, 1],
    }
    write_closeness(cache, r)
    step = _pairs(cache)
    assert step.figure is not None and step.figure_name == "notask-closeness-task-vs-control-sets"
    _check_bars(step.figure, r, (INDUCING_NAME, NON_INDUCING_NAME), (F.TASK, F.NEITHER_COLOR))
    assert step.figure.layout.title.text == F.esc(
        "Closeness to harmful features, task- vs control-specific sets (difference +0.050, "
        "95% CI +0.020 to +0.080, two-sided p = 0.002)"
    )
    assert len(step.figure.layout.title.text) <= 130  # one line in the story and the export
    assert "exploratory ranked comparison" not in plain(step.lead)


def test_figure_withheld_with_a_sentence(notask_cache: Path, tmp_path: Path) -> None:
    cache = tmp_path / "notask"
    shutil.copytree(notask_cache, cache)
    r = json.loads((cache / schema.CLOSENESS).read_text())
    cases: list[tuple[dict[str, Any] | None, str]] = [
        (  # a file that fails its schema check (no ranked part)
            {k: v for k, v in r.items() if k != "ranked"},
            "closeness.json cannot be read, so the story draws no closeness figure.",
        ),
        (  # not testable, nor the ranked one
            {**r, "ranked": {**r["ranked"], "verdict": "not_testable", "reason": "too few"}},
            "The comparison is not testable on this cache and closeness.json holds no testable ranked "
            "comparison, so the story draws no closeness figure.",
        ),
        (  # the ranked comparison is testable but its histogram is missing
            {**r, "ranked": {**r["ranked"], "histogram": None}},
            "closeness.json holds no histogram of the ranked sets, so no figure of them is drawn.",
        ),
        (  # a testable comparison by test without a histogram
            {**backed_report(cache), "histogram": None},
            "closeness.json holds no histogram of the two sets, so no figure of them is drawn.",
        ),
        (None, "closeness.json is not in this cache, so the story draws no closeness figure."),
    ]
    for report, said in cases:
        write_closeness(cache, report)
        step = _pairs(cache)
        assert step.figure is None, said
        assert said in plain(step.lead)


# --- the pair story: its sets step states the comparison and draws the same figure -------------------------


def _pair_steps(cache: Path) -> dict[str, Any]:
    c = load_cache(cache)
    pair = c.default_pair()
    assert pair is not None
    return {s.key: s for s in build_story(c, *pair)}


def test_pair_story_draws_the_comparison_it_states(synth_cache: Path, tmp_path: Path) -> None:
    """The pair story's sets step states closeness.json's comparison by test and draws exactly its histogram,
    the bars, means and title from the file, as the result story's pairs step does (one builder); the
    hypothesis step no longer states it (its figure is the hypothesis drawing)."""
    cache = tmp_path / "synth"
    shutil.copytree(synth_cache, cache)
    r = backed_report(cache)
    r["histogram"] = {"edges": [0.0, 0.1, 0.2, 0.3], "inducing": [2, 5, 5], "non_inducing": [6, 6, 3]}
    write_closeness(cache, r)
    steps = _pair_steps(cache)
    sets = steps["sets"]
    assert sets.title == "Beyond this pair: task and control features as whole sets"
    assert sets.figure is not None and sets.figure_name == "synth-closeness-task-vs-control-sets"
    _check_bars(sets.figure, r, (INDUCING_NAME, NON_INDUCING_NAME), (F.TASK, F.NEITHER_COLOR))
    assert sets.figure.layout.title.text == F.esc(
        "Closeness to harmful features, task- vs control-specific sets (difference +0.050, "
        "95% CI +0.020 to +0.080, two-sided p = 0.002)"
    )
    pairs = {s.key: s for s in build_result_story(load_cache(cache))}["pairs"]
    assert sets.figure.to_json() == pairs.figure.to_json()  # the very figure the result story draws
    lead = plain(sets.lead)
    assert lead.startswith("The paper's comparison is of whole sets")
    assert BACKED_CLAIM in lead
    hypothesis = plain(steps["finetune"].lead)
    assert "The paper's comparison" not in hypothesis and "closeness" not in hypothesis
    assert [t.name for t in steps["finetune"].figure.data] != [t.name for t in sets.figure.data]


def test_pair_story_withholds_the_figure_with_a_sentence(synth_cache: Path, tmp_path: Path) -> None:
    """Without a histogram (or without the file) the sets step draws nothing and says why, in its lead."""
    cache = tmp_path / "synth"
    shutil.copytree(synth_cache, cache)
    write_closeness(cache, {**backed_report(cache), "histogram": None})
    sets = _pair_steps(cache)["sets"]
    assert sets.figure is None and BACKED_CLAIM in plain(sets.lead)
    assert "closeness.json holds no histogram of the two sets, so no figure of them is drawn." in plain(
        sets.lead
    )
    write_closeness(cache, None)
    sets = _pair_steps(cache)["sets"]
    assert sets.figure is None and BACKED_CLAIM not in plain(sets.lead)
    assert (
        "The set-level closeness test has not run on this cache (`featuregeom closeness`). closeness.json is not "
        "in this cache, so the story draws no closeness figure."
    ) in plain(sets.lead)
