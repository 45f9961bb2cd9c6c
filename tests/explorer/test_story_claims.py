"""Every claim the story states, against a cache built to contradict it: the claim is withheld and the honest
sentence appears.

The table below lists each claim (a step and the words that state it) with an edit of the real synthetic test
cache (tests/explorer/conftest.py) that breaks the condition the claim rests on (docs/story.md lists them). The
unedited cache makes every claim (the positive control, so a claim that is never written fails the test); the
edited one must not make it, in the step nor in the exported HTML file, and must say the honest sentence
instead. Expected sentences are built from the values the edit wrote, not copied from the output.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from explorer.data import load_cache
from explorer.story import Step, build_result_story, example_feature, story_html, story_steps, story_title
from precompute import schema
from precompute.cache import stage

TAG = re.compile(r"<[^>]+>")
SHOWN = r"What this cache shows:(?:(?!What it does not show).)*"


def plain(text: str | None) -> str:
    """A lead or body as a reader sees it: tags dropped, entities decoded, whitespace folded."""
    return re.sub(r"\s+", " ", html.unescape(TAG.sub(" ", text or ""))).strip()


def step_texts(steps: list[Step]) -> dict[str, str]:
    return {s.key: plain(f"{s.title}\n{s.lead}\n{s.body or ''}") for s in steps}


def edit_cache(cache: Path, **frames: Callable[[pd.DataFrame], None]) -> None:
    """Rewrite parquet files of `cache` (name -> in-place edit) through the cache's own staging, so the
    checksums stay valid and only the contradiction differs."""
    names = {"features": schema.FEATURES, "overlaps": schema.OVERLAPS, "examples": schema.EXAMPLES}
    with stage(cache) as staged:
        for key, edit in frames.items():
            df = pd.read_parquet(cache / names[key])
            edit(df)
            df.to_parquet(staged.path(names[key]), index=False)
        staged.commit()


def write_closeness(cache: Path, report: dict[str, Any] | None) -> None:
    """Replace closeness.json (None: remove it, as on a cache where the closeness step never ran)."""
    with stage(cache) as staged:
        p = staged.path(schema.CLOSENESS)
        if report is not None:
            p.write_text(json.dumps(report))
        staged.commit()


def backed_report(cache: Path) -> dict[str, Any]:
    """The cache's closeness.json with a directional verdict its numbers back (as precompute decides one:
    permutation p < alpha and the 95% CI above 0)."""
    r = json.loads((cache / schema.CLOSENESS).read_text())
    r.update(
        verdict="inducing_closer",
        reason="",
        difference=0.05,
        ci=[0.02, 0.08],
        p_permutation=0.001,
        p_two_sided=0.002,
        p_non_inducing_closer=0.999,
        null_difference_mean=0.001,
        alpha=0.05,
    )
    r["inducing"] = {**r["inducing"], "n": 12, "mean": 0.40}
    r["non_inducing"] = {**r["non_inducing"], "n": 15, "mean": 0.35}
    return r


BACKED_CLAIM = (
    "In this cache, task-specific features sit closer to harmful features than control-specific features do"
)


@dataclass
class Case:
    """A claim (step key, regex) that the edit contradicts, and the honest sentence(s) (step key, text)."""

    name: str
    edit: Callable[[Path, int, int], dict[str, Any]]  # returns values used in the expected sentences
    claims: Callable[[int, int], list[tuple[str, Any]]]
    honest: Callable[[int, int, dict[str, Any]], list[tuple[str, Any]]]
    base: Callable[[Path], None] = field(default=lambda cache: None)  # makes the claim on the unedited cache


def _set(col: str, feature_of: str, value: Any) -> Callable[[Path, int, int], dict[str, Any]]:
    def edit(cache: Path, t: int, h: int) -> dict[str, Any]:
        f = t if feature_of == "t" else h

        def change(df: pd.DataFrame) -> None:
            df.loc[df["feature"] == f, col] = value

        edit_cache(cache, features=change)
        row = pd.read_parquet(cache / schema.FEATURES).set_index("feature").loc[f]
        return row.to_dict()

    return edit


def _below_null(cache: Path, t: int, h: int) -> dict[str, Any]:
    null = float(load_cache(cache).null_cosine)
    cos = round(0.9 * null, 4)

    def change(df: pd.DataFrame) -> None:
        df.loc[(df["task_feature"] == t) & (df["harmful_feature"] == h), "cosine"] = cos

    edit_cache(cache, overlaps=change)
    return {"cosine": cos, "null": null}


def _no_harmful_examples(cache: Path, t: int, h: int) -> dict[str, Any]:
    def change(df: pd.DataFrame) -> None:
        df.loc[(df["feature"] == h) & (df["group"] == "harmful"), "group"] = "benign"

    edit_cache(cache, examples=change)
    return {}


def _no_task_feature(cache: Path, t: int, h: int) -> dict[str, Any]:
    def no_task(df: pd.DataFrame) -> None:
        df["is_task"] = False

    def no_pairs(df: pd.DataFrame) -> None:
        df.drop(df.index, inplace=True)

    edit_cache(cache, features=no_task, overlaps=no_pairs)
    f = pd.read_parquet(cache / schema.FEATURES)
    best = f.loc[f["task_score"].idxmax()]
    return {"best": int(best["feature"]), "score": float(best["task_score"])}


def _closeness(report: Callable[[Path], dict[str, Any] | None]) -> Callable[[Path, int, int], dict[str, Any]]:
    def edit(cache: Path, t: int, h: int) -> dict[str, Any]:
        r = report(cache)
        write_closeness(cache, r)
        return r or {}

    return edit


def _unbacked(cache: Path) -> dict[str, Any]:
    r = json.loads((cache / schema.CLOSENESS).read_text())
    r.update(ci=[-0.01, 0.06], p_permutation=0.2)  # the verdict stays "inducing_closer"
    return r


def _not_testable(cache: Path) -> dict[str, Any]:
    r = json.loads((cache / schema.CLOSENESS).read_text())
    r.update(
        verdict="not_testable", reason="the non-inducing set has 3 feature(s); at least 5 each are needed"
    )
    return r


def _task_claims(t: int, h: int) -> list[tuple[str, Any]]:
    return [
        ("task", re.compile(f"^A task feature: #{t}")),
        ("task", "It fires more on the task text, the narrow data, than on its control text"),
        ("map", f"is task feature #{t}"),
        ("text", f"task feature #{t} on task text"),
        ("finetune", re.compile(f"{SHOWN}feature #{t} fires more on the task text")),
    ]


def _harm_claims(t: int, h: int) -> list[tuple[str, Any]]:
    return [
        ("neighbour", re.compile("^Its harmful neighbour")),
        ("neighbour", re.compile(f"#{h} — .* — fires more on harmful requests than on benign ones")),
        ("text", f"harmful feature #{h} on harmful requests"),
        ("finetune", re.compile(f"{SHOWN}feature #{h} fires more on harmful requests")),
    ]


def _bound_text(v: float) -> str:
    return f"{v:.2f}"


CASES = [
    Case(
        "task bound includes chance",
        _set("task_score_lo", "t", 0.45),
        _task_claims,
        lambda t, h, row: [
            (
                "task",
                f"The cache marks feature #{t} a task feature, but the lower 95% bound of its task score "
                f"({_bound_text(row['task_score_lo'])}) does not exclude 0.5 (chance), so this cache does not show "
                "that it fires more on the task text than on its control text",
            ),
            ("task", re.compile(f"^Feature #{t}")),
            ("finetune", f"What it does not show: that feature #{t} fires more on the task text"),
        ],
    ),
    Case(
        "not a task feature",
        _set("is_task", "t", False),
        _task_claims,
        lambda t, h, row: [
            (
                "task",
                f"The lower 95% bound of its task score ({_bound_text(row['task_score_lo'])}) is above 0.5, but it "
                "does not pass the task test, so the story does not call it a task feature.",
            ),
            ("text", f"feature #{t} on task text"),
        ],
    ),
    Case(
        "harm bound includes chance",
        _set("harm_score_lo", "h", 0.45),
        _harm_claims,
        lambda t, h, row: [
            (
                "neighbour",
                "the cache marks it harmful, but the lower 95% bound (0.45) does not exclude 0.5 (chance), so the "
                "story does not call it harmful",
            ),
            ("neighbour", re.compile(f"^Its neighbour #{h} is closer than chance")),
            (
                "finetune",
                re.compile(f"What it does not show: .*that feature #{h} fires more on harmful requests"),
            ),
        ],
    ),
    Case(
        "not a harmful feature",
        _set("is_harmful", "h", False),
        _harm_claims,
        lambda t, h, row: [
            (
                "neighbour",
                f"(lower 95% bound {_bound_text(row['harm_score_lo'])}) but does not pass the harm test, so the "
                "story does not call it harmful",
            ),
        ],
    ),
    Case(
        "pair not above the calibrated null",
        _below_null,
        lambda t, h: [
            ("neighbour", re.compile("^Its harmful neighbour is closer than chance")),
            ("neighbour", "the pair is closer than chance"),
            ("finetune", re.compile(f"{SHOWN}closer than chance")),
        ],
        lambda t, h, v: [
            (
                "neighbour",
                f"Its cosine {v['cosine']:.2f} is not above the chance level {v['null']:.3g} (the covariance null), "
                "so this cache does not show the pair closer than chance, although overlaps.parquet lists it",
            ),
            ("neighbour", re.compile("^Its harmful neighbour ")),
            ("finetune", re.compile("What it does not show: .*that their directions are closer than chance")),
        ],
    ),
    Case(
        "no harmful document among the harmful feature's examples",
        _no_harmful_examples,
        lambda t, h: [("text", "on harmful requests")],
        lambda t, h, v: [
            (
                "text",
                f"None of feature #{h}'s stored examples comes from a harmful request, so none is shown as one",
            ),
            ("text", f"harmful feature #{h}: strongest examples"),
        ],
    ),
    Case(
        "closeness verdict not backed by its numbers",
        _closeness(_unbacked),
        lambda t, h: [("sets", BACKED_CLAIM)],
        lambda t, h, r: [
            (
                "sets",
                "closeness.json says task-specific features sit closer to harmful features, but its own numbers "
                "do not back that (95% CI -0.010 to +0.060, p = 0.2 against alpha 0.05), so the story does not "
                "repeat the claim: this cache does not show a difference.",
            )
        ],
        base=lambda cache: write_closeness(cache, backed_report(cache)),
    ),
    Case(
        "closeness not testable",
        _closeness(_not_testable),
        lambda t, h: [("sets", BACKED_CLAIM)],
        lambda t, h, r: [
            (
                "sets",
                "Whether task-specific features sit closer to harmful features than control-specific ones is not "
                f"testable on this cache: {r['reason']}",
            )
        ],
        base=lambda cache: write_closeness(cache, backed_report(cache)),
    ),
    Case(
        "closeness never run",
        _closeness(lambda cache: None),
        lambda t, h: [("sets", BACKED_CLAIM)],
        lambda t, h, r: [
            ("sets", "The set-level closeness test has not run on this cache (`featuregeom closeness`)."),
        ],
        base=lambda cache: write_closeness(cache, backed_report(cache)),
    ),
    Case(
        "no task feature",
        _no_task_feature,
        lambda t, h: [
            ("task", re.compile("^A task feature")),
            ("map", "is task feature #"),
            ("finetune", "fires more on the task text"),
        ],
        lambda t, h, v: [
            ("task", re.compile("^No task feature")),
            (
                "task",
                f"so this cache has no task feature. The highest task score is {v['score']:.2f} "
                f"(feature #{v['best']})",
            ),
            ("withheld", "This cache has no task feature, so the story does not illustrate the mechanism"),
        ],
    ),
]


def _story(cache: Path) -> tuple[dict[str, str], str]:
    c = load_cache(cache)
    pair = c.default_pair()
    steps = story_steps(c, pair)
    return step_texts(steps), plain(story_html(steps, story_title(c, pair)).split("</head>", 1)[1])


def _find(texts: dict[str, str], key: str, pattern: str | re.Pattern[str]) -> bool:
    """A literal sentence, or a compiled pattern (for anchors and what lies between two words)."""
    if key not in texts:
        return False
    return pattern in texts[key] if isinstance(pattern, str) else pattern.search(texts[key]) is not None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_contradicted_claim_is_withheld(case: Case, synth_cache: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(synth_cache, cache)
    case.base(cache)
    t, h = load_cache(cache).default_pair()
    texts, _ = _story(cache)
    claims = case.claims(t, h)
    made = [(k, p) for k, p in claims if _find(texts, k, p)]
    assert made == claims, "positive control: the unedited cache makes every claim"
    values = case.edit(cache, t, h)
    texts, page = _story(cache)
    made = [(k, p) for k, p in claims if _find(texts, k, p)]
    assert not made, f"claims the cache contradicts: {made}"
    for key, pattern in case.honest(t, h, values):
        assert _find(texts, key, pattern), f"{key}: {pattern!r} not in {texts.get(key)!r}"
    # the exported file tells the same story (every step rendered into it)
    for _, pattern in case.honest(t, h, values):
        found = pattern in page if isinstance(pattern, str) else re.search(pattern.pattern.lstrip("^"), page)
        assert found, f"export lacks {pattern!r}"


def test_result_story_captions_harmful_requests_only_from_harmful_documents(
    notask_cache: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "notask"
    shutil.copytree(notask_cache, cache)
    ex, _ = example_feature(load_cache(cache))
    harmful = {s.key: s for s in build_result_story(load_cache(cache))}["harmful"]
    ex_rows = pd.read_parquet(cache / schema.EXAMPLES).query("feature == @ex")
    assert "Its strongest examples on harmful requests:" in harmful.lead
    # every example shown under that caption comes from a harmful document (the badge on each says its group)
    shown = re.findall(r">(task|control|harmful|benign|general)</span>", harmful.body or "")
    assert shown and set(shown) == {"harmful"} and (ex_rows["group"] == "harmful").any()

    def change(df: pd.DataFrame) -> None:
        df.loc[(df["feature"] == ex) & (df["group"] == "harmful"), "group"] = "general"

    edit_cache(cache, examples=change)
    harmful = {s.key: s for s in build_result_story(load_cache(cache))}["harmful"]
    assert "on harmful requests:" not in harmful.lead
    assert "None of its stored examples comes from a harmful request, so none is shown as one" in plain(
        harmful.lead
    )
    shown = re.findall(r">(task|control|harmful|benign|general)</span>", harmful.body or "")
    assert shown and "harmful" not in shown


def test_result_story_counts_only_pairs_above_the_null(synth_cache: Path, tmp_path: Path) -> None:
    """The cache's own result story (what story_steps tells without a pair) says every flagged pair is above
    the chance level only when each row's cosine is; a row below it is counted out, and the count said."""
    cache = tmp_path / "cache"
    shutil.copytree(synth_cache, cache)
    claim = "pairs are flagged: a task feature and a harmful feature whose decoder directions are above"
    pairs = {s.key: plain(s.lead) for s in build_result_story(load_cache(cache))}["pairs"]
    assert claim in pairs
    null = float(load_cache(cache).null_cosine)
    ov = pd.read_parquet(cache / schema.OVERLAPS)
    low = ov.index[:2]

    def change(df: pd.DataFrame) -> None:
        df.loc[low, "cosine"] = 0.9 * null

    edit_cache(cache, overlaps=change)
    pairs = {s.key: plain(s.lead) for s in build_result_story(load_cache(cache))}["pairs"]
    assert claim not in pairs
    assert (
        f"overlaps.parquet lists {len(ov)} (task, harmful) pairs, but only {len(ov) - 2} of them are above the "
        f"chance level {null:.3f}: the story calls only those closer than chance."
    ) in pairs


def test_the_page_renders_every_step_without_the_contradicted_claims(
    synth_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Story page itself (AppTest), on a cache where the pair's task bound includes chance, the harmful
    side's bound too, and the pair is below the null: each step rendered says none of the three claims."""
    from tests.explorer.test_apptest import html_text, run_page

    cache = tmp_path / "cache"
    shutil.copytree(synth_cache, cache)
    t, h = load_cache(cache).default_pair()

    def page_text(step: int) -> str:
        at = run_page("views/story.py", cache, monkeypatch, task=str(t), harmful=str(h), step=str(step))
        assert not at.exception and f"Step {step} of " in html_text(at)
        return plain(html_text(at))

    def says(text: str, pattern: str | re.Pattern[str]) -> bool:
        if isinstance(pattern, str):
            return pattern in text
        return re.search(pattern.pattern.replace("^", r"of \d+ "), text) is not None  # after "Step k of n"

    # positive control: the unedited page makes the claims, anchored titles included
    assert says(page_text(3), _task_claims(t, h)[0][1]) and says(page_text(4), _harm_claims(t, h)[0][1])
    _set("task_score_lo", "t", 0.45)(cache, t, h)
    _set("harm_score_lo", "h", 0.45)(cache, t, h)
    _below_null(cache, t, h)
    claims = [*_task_claims(t, h), *_harm_claims(t, h), ("neighbour", "the pair is closer than chance")]
    n = len(story_steps(load_cache(cache), (t, h)))
    seen = [page_text(step) for step in range(1, n + 1)]
    for step, text in enumerate(seen, 1):
        assert not [p for _, p in claims if says(text, p)], f"step {step}"
    said = " ".join(seen)
    assert f"The cache marks feature #{t} a task feature, but the lower 95% bound" in said
    assert "the cache marks it harmful, but the lower 95% bound (0.45) does not exclude 0.5" in said
    assert "so this cache does not show the pair closer than chance" in said


def test_not_isotropic_only_when_the_calibrated_null_is_higher(notask_cache: Path, tmp_path: Path) -> None:
    """'The decoder is not isotropic' rests on the calibrated null being above the isotropic one; a
    neighbors.npz whose isotropic null is the higher withholds it and says so."""
    import numpy as np

    cache = tmp_path / "notask"
    shutil.copytree(notask_cache, cache)
    claim = "The decoder is not isotropic: its directions sit closer to each other than uniform ones"
    null_step = {s.key: plain(s.lead) for s in build_result_story(load_cache(cache))}["null"]
    assert claim in null_step
    with np.load(cache / schema.NEIGHBORS) as z:
        arrays = {k: z[k] for k in z.files}
    cov = float(arrays["null_covariance"])
    arrays["null_isotropic"] = np.asarray(round(cov * 1.1, 4), dtype=arrays["null_isotropic"].dtype)
    with stage(cache) as staged:
        np.savez(staged.path(schema.NEIGHBORS), **arrays)
        staged.commit()
    null_step = {s.key: plain(s.lead) for s in build_result_story(load_cache(cache))}["null"]
    assert claim not in null_step and "× the isotropic one" not in null_step
    assert (
        f"The calibrated null, random directions with this decoder's own mean and covariance, reaches a cosine of "
        f"{cov:.3f} by chance (at a false-positive rate of 0.1%), no higher than uniformly random directions "
        f"({cov * 1.1:.3f}, the isotropic null): this cache does not show the decoder's directions sitting closer "
        "to each other than uniform ones."
    ) in null_step


def test_ranked_comparison_is_exploratory_and_backed(notask_cache: Path, tmp_path: Path) -> None:
    """closeness.json's ranked comparison is quoted as exploratory; a directional ranked verdict its own interval
    does not back is not repeated."""
    cache = tmp_path / "notask"
    shutil.copytree(notask_cache, cache)
    r = json.loads((cache / schema.CLOSENESS).read_text())
    ranked = {**r["ranked"], "verdict": "inducing_closer", "ci": [0.01, 0.04], "p_permutation": 0.001}
    write_closeness(cache, {**r, "ranked": ranked})
    pairs = {s.key: plain(s.lead) for s in build_result_story(load_cache(cache))}["pairs"]
    n = ranked["n"]
    claim = f"Exploratory, sets by rank rather than by significance: in this cache, the {n} most task-leaning features"
    assert (
        f"{claim} (highest task score) sit closer to harmful features than the {n} most control-leaning"
        in pairs
    )
    write_closeness(cache, {**r, "ranked": {**ranked, "ci": [-0.01, 0.04]}})
    pairs = {s.key: plain(s.lead) for s in build_result_story(load_cache(cache))}["pairs"]
    assert "sit closer to harmful features than the" not in pairs
    assert (
        "Exploratory, sets by rank rather than by significance: closeness.json says task-specific features sit "
        "closer to harmful features, but its own numbers do not back that (95% CI -0.010 to +0.040, p = 0.001 "
        "against alpha 0.05), so the story does not repeat the claim"
    ) in pairs
    write_closeness(cache, {k: v for k, v in r.items() if k != "ranked"})  # older files: no ranked comparison
    pairs = {s.key: plain(s.lead) for s in build_result_story(load_cache(cache))}["pairs"]
    assert "Exploratory" not in pairs


def test_counts_leave_out_flags_their_own_bounds_contradict(synth_cache: Path, tmp_path: Path) -> None:
    """'N features pass the task test' counts only task features whose lower bound excludes 0.5 (as the
    per-feature claims ask): a flag set against its own interval is not counted."""
    from explorer.data import cache_findings

    cache = tmp_path / "c"
    shutil.copytree(synth_cache, cache)
    before = cache_findings(load_cache(cache))
    f = pd.read_parquet(cache / schema.FEATURES)
    task = int(f.loc[f["is_task"] & (f["task_score_lo"] > 0.5), "feature"].iloc[0])
    harm = int(f.loc[f["is_harmful"] & (f["harm_score_lo"] > 0.5), "feature"].iloc[0])

    def contradict(df: pd.DataFrame) -> None:
        df.loc[df["feature"] == task, "task_score_lo"] = 0.45
        df.loc[df["feature"] == harm, "harm_score_lo"] = 0.5

    edit_cache(cache, features=contradict)
    after = cache_findings(load_cache(cache))
    assert (after.n_task, after.n_harmful) == (before.n_task - 1, before.n_harmful - 1)
