"""Windowed contrast values: a constant-rate feature scores chance whatever the document lengths, a
feature of the shared template scores nothing, and the windowed max equals a direct per-document
computation (precompute.pipeline.windows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from precompute.pipeline.contrasts import contrast_scores
from precompute.pipeline.shards import doc_feature_max, shard_name
from precompute.pipeline.windows import (
    read_token_rows,
    shared_token_ids,
    token_texts,
    window_starts,
    windowed_values,
)

TEMPLATE = [101, 102, 103, 104]  # a "system prompt" every document starts with


def write_rows(
    path: Path,
    doc: np.ndarray,
    context: np.ndarray,
    position: np.ndarray,
    token: np.ndarray,
    acts: list[dict[int, float]],
) -> Path:
    """One shard in harvest's format (precompute.pipeline.shards): a row per counted token."""
    counts = np.array([len(a) for a in acts], np.int64)
    indptr = np.zeros(len(acts) + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    feats = [f for a in acts for f in sorted(a)]
    vals = [a[f] for a in acts for f in sorted(a)]
    np.savez(
        path,
        context_id=np.asarray(context, np.int32),
        position=np.asarray(position, np.int32),
        token_id=np.asarray(token, np.int32),
        doc_id=np.asarray(doc, np.int32),
        indptr=indptr,
        feature=np.asarray(feats, np.int32),
        value=np.asarray(vals, np.float32),
    )
    return path


def corpus(
    tmp_path: Path,
    lengths: list[int],
    rates: list[float],
    seed: int,
    template_acts: list[float] | None = None,
) -> list[Path]:
    """Documents of the given content lengths (after the template), one context each, two shards.
    Feature j fires on each content token with probability rates[j] (value uniform in (0, 1]);
    with `template_acts`, feature len(rates) fires on template token 103 of document d with value
    template_acts[d] and nowhere else."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, int, int, int, dict[int, float]]] = []
    for d, n in enumerate(lengths):
        tokens = TEMPLATE + rng.integers(1000, 1400, n).tolist()
        for p, t in enumerate(tokens, start=1):
            acts: dict[int, float] = {}
            if p > len(TEMPLATE):
                for j, r in enumerate(rates):
                    if rng.random() < r:
                        acts[j] = float(1.0 - rng.random())
            elif template_acts is not None and t == 103:
                acts[len(rates)] = template_acts[d]
            rows.append((d, d, p, t, acts))
    half = len(rows) // 2
    paths = []
    for i, part in enumerate((rows[:half], rows[half:])):  # a document straddles the two shards
        cols = list(zip(*part, strict=True))
        paths.append(write_rows(tmp_path / shard_name(i), *(np.array(c) for c in cols[:4]), list(cols[4])))
    return paths


# ------------------------------------------------------------------------------ the length confound


def test_constant_rate_feature_scores_chance_whatever_the_lengths(tmp_path: Path) -> None:
    """Long (300-token) task and harmful documents against short (40-token) control and benign ones.
    Per-document maxima separate them by length alone; windowed maxima do not."""
    n = 400
    groups = np.array(["task"] * n + ["control"] * n + ["harmful"] * n + ["benign"] * n, dtype=object)
    lengths = [300] * n + [40] * n + [300] * n + [40] * n
    rates = [0.0055, 0.02, 0.1]
    paths = corpus(tmp_path, lengths, rates, seed=1)
    cats = np.full(len(groups), None, dtype=object)
    nf = len(rates)

    old = contrast_scores(*doc_feature_max(paths, nf, progress=False), nf, groups, cats)
    (w,) = windowed_values(paths, groups, [16], 0.5, seed=0, progress=False)
    assert w.has_window.all()  # every document has at least 16 eligible tokens
    new = contrast_scores(*w.triples, nf, groups, cats)
    for j, rate in enumerate(rates):
        # the confound: a document of L tokens fires with probability 1 - (1 - rate)^L
        assert old.loc[j, "task_score"] > 0.6, (rate, old.loc[j, "task_score"])
        assert old.loc[j, "harm_score_all"] > 0.6
        assert new.loc[j, "task_score"] == pytest.approx(0.5, abs=0.05), rate
        assert new.loc[j, "harm_score_all"] == pytest.approx(0.5, abs=0.05), rate
        assert not new.loc[j, "is_task"] and not new.loc[j, "is_harmful"] and not new.loc[j, "is_control"]
    # the reviewer's example: rate 0.0055 fires in 1 - 0.9945^300 = 81% of long documents, 20% of short
    assert old.loc[0, "task_score"] > 0.75
    print(
        "constant-rate AUROC, per-document max vs 16-token windows:",
        [
            (r, round(old.loc[j, "task_score"], 3), round(new.loc[j, "task_score"], 3))
            for j, r in enumerate(rates)
        ],
    )


def test_template_feature_is_excluded(tmp_path: Path) -> None:
    """A feature firing only on a template token, twice as strongly in task and harmful documents,
    separates them perfectly by per-document max and not at all once the template is left out."""
    n = 30
    groups = np.array(["task"] * n + ["control"] * n + ["harmful"] * n + ["benign"] * n, dtype=object)
    lengths = [40] * (4 * n)
    template_acts = [2.0 if g in ("task", "harmful") else 1.0 for g in groups]
    paths = corpus(tmp_path, lengths, [0.05], seed=2, template_acts=template_acts)
    cats = np.full(len(groups), None, dtype=object)
    old = contrast_scores(*doc_feature_max(paths, 2, progress=False), 2, groups, cats)
    assert old.loc[1, "task_score"] == 1.0 and old.loc[1, "harm_score_all"] == 1.0
    (w,) = windowed_values(paths, groups, [16], 0.5, seed=0, progress=False)
    assert w.shared.ids.tolist() == TEMPLATE  # content tokens are drawn from 400 ids: none is shared
    assert w.shared.groups == ["task", "control", "harmful", "benign"]
    assert all((f == 1.0).all() for f in w.shared.doc_fraction.values())
    assert not np.any(w.feat == 1)  # the template feature has no value in any window
    new = contrast_scores(*w.triples, 2, groups, cats)
    assert new.loc[1, "task_score"] == 0.5 and new.loc[1, "harm_score_all"] == 0.5
    assert new.loc[1, "task_vs_benign"] == 0.5 and not new.loc[1, ["is_task", "is_harmful"]].any()


def test_shared_rule_needs_every_group() -> None:
    """A token common in one group only is content, not template; the threshold is inclusive."""
    groups = np.array(["task", "task", "control", "control", "harmful", "benign", "general"], dtype=object)
    # (doc, token): token 7 everywhere but the general document; 8 only in task; 9 in half of task
    pairs = [(d, 7) for d in range(6)] + [(0, 8), (1, 8), (0, 9), (2, 9), (4, 9), (5, 9), (6, 5)]
    doc, token = (np.array(x) for x in zip(*pairs, strict=True))
    shared = shared_token_ids(doc, token, groups, 0.5)
    assert shared.ids.tolist() == [7, 9]  # general is not a group of the rule
    assert shared.doc_fraction["task"].tolist() == [1.0, 0.5]
    assert shared_token_ids(doc, token, groups, 0.51).ids.tolist() == [7]
    # a group absent from the corpus does not veto
    no_control = np.where(groups == "control", "general", groups)
    assert shared_token_ids(doc, token, no_control, 0.5).groups == ["task", "harmful", "benign"]
    assert shared_token_ids(doc, token, np.full(7, "general", dtype=object), 0.5).ids.size == 0


# ------------------------------------------------------------------------------ windows vs brute force


def test_window_starts_are_seeded_and_in_range() -> None:
    n_eligible = np.array([0, 3, 4, 5, 10, 100] * 500)
    a = window_starts(n_eligible, 4, seed=7)
    assert np.array_equal(a, window_starts(n_eligible, 4, seed=7))
    assert not np.array_equal(a, window_starts(n_eligible, 4, seed=8))
    short = n_eligible < 4
    assert (a[short] == -1).all() and (a[n_eligible == 4] == 0).all()
    assert ((a[~short] >= 0) & (a[~short] <= n_eligible[~short] - 4)).all()
    # uniform over the 7 possible starts of a 10-token document
    counts = np.bincount(a[n_eligible == 10], minlength=7)
    assert counts.size == 7 and counts.min() > 40


def test_windowed_max_equals_direct_computation(tmp_path: Path) -> None:
    """Random documents split over several contexts, rows shuffled across three shards: the windowed
    max of every (document, feature) equals a direct scan of the document's tokens in order."""
    rng = np.random.default_rng(5)
    n_docs, n_feat, window = 60, 7, 6
    groups = np.array(["task", "control", "harmful", "benign", "general"] * 12, dtype=object)
    rows = []  # (doc, context, position, token, acts)
    ctx = 0
    for d in range(n_docs):
        length = int(rng.integers(1, 40))
        content = np.where(rng.random(length) < 0.2, 0, rng.integers(1, 100, length))  # token 0: common
        tokens = TEMPLATE[: int(rng.integers(2, 5))] + content.tolist()
        for start in range(0, len(tokens), 10):  # contexts of 10 tokens, position 0 not counted
            for p, t in enumerate(tokens[start : start + 10], start=1):
                acts = {int(f): float(rng.random()) for f in np.flatnonzero(rng.random(n_feat) < 0.3)}
                rows.append((d, ctx, p, t, acts))
            ctx += 1
    order = rng.permutation(len(rows))
    paths = []
    for i, part in enumerate(np.array_split(order, 3)):
        sel = [rows[k] for k in part]
        cols = list(zip(*sel, strict=True))
        paths.append(write_rows(tmp_path / shard_name(i), *(np.array(c) for c in cols[:4]), list(cols[4])))

    (w,) = windowed_values(paths, groups, [window], 0.5, seed=3, progress=False)
    # shared ids by definition
    present = [g for g in ("task", "control", "harmful", "benign")]
    frac = {
        g: {
            t: np.mean([any(r[3] == t for r in rows if r[0] == d) for d in range(n_docs) if groups[d] == g])
            for t in {r[3] for r in rows}
        }
        for g in present
    }
    expected_shared = sorted(t for t in frac["task"] if all(frac[g][t] >= 0.5 for g in present))
    assert w.shared.ids.tolist() == expected_shared
    got = {(int(d), int(f)): float(v) for d, f, v in zip(w.doc, w.feat, w.val, strict=True)}
    expected: dict[tuple[int, int], float] = {}
    starts = window_starts(w.n_eligible, window, seed=3)
    assert np.array_equal(starts, w.start)
    for d in range(n_docs):
        mine = sorted((r for r in rows if r[0] == d), key=lambda r: (r[1], r[2]))
        eligible = [r for r in mine if r[3] not in expected_shared]
        assert w.n_eligible[d] == len(eligible)
        if len(eligible) < window:
            assert w.start[d] == -1
            continue
        for r in eligible[starts[d] : starts[d] + window]:
            for f, v in r[4].items():
                expected[(d, f)] = max(expected.get((d, f), 0.0), np.float32(v))
    assert got.keys() == {k for k, v in expected.items() if v > 0}
    for k, v in got.items():
        assert v == expected[k], k
    # the test covers both cases, and shared and unshared template and content tokens
    assert w.has_window.sum() > 20 and (~w.has_window).sum() > 5
    assert {0, 101, 102} <= set(expected_shared) and 104 not in expected_shared


def test_several_windows_share_one_pass(tmp_path: Path) -> None:
    groups = np.array(["harmful", "benign"] * 20, dtype=object)
    paths = corpus(tmp_path, [int(x) for x in np.random.default_rng(0).integers(5, 60, 40)], [0.3], seed=4)
    short, long = windowed_values(paths, groups, [8, 32], 0.5, seed=0, progress=False)
    (alone,) = windowed_values(paths, groups, [32], 0.5, seed=0, progress=False)
    assert short.window == 8 and long.window == 32
    assert np.array_equal(long.start, alone.start) and np.array_equal(long.val, alone.val)
    assert np.array_equal(short.n_eligible, long.n_eligible)
    assert (short.has_window >= long.has_window).all() and short.has_window.sum() > long.has_window.sum()
    assert len(read_token_rows(paths).doc) == sum(len(TEMPLATE) + n for n in short.n_eligible)
    with pytest.raises(ValueError, match="at least one token"):
        windowed_values(paths, groups, [0], 0.5, seed=0, progress=False)


def test_token_texts_read_off_the_cache(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "contexts.npz",
        offsets=np.array([0, 3, 5]),
        token_ids=np.array([5, 6, 7, 7, 9], np.int32),
        doc_ids=np.zeros(5, np.int32),
        source=np.zeros(2, np.int32),
    )
    pd.DataFrame({"context_id": [1, 0], "tokens": [["x", "nine"], ["five", "six", "seven"]]}).to_parquet(
        tmp_path / "examples.parquet"
    )
    texts = token_texts([9, 5, 4], tmp_path / "contexts.npz", tmp_path / "examples.parquet")
    assert texts == {9: "nine", 5: "five", 4: None}

    class Tok:
        def decode(self, ids: list[int]) -> str:
            return f"<{ids[0]}>"

    assert token_texts([3], tmp_path / "missing.npz", tmp_path / "missing.parquet", Tok()) == {3: "<3>"}
    assert token_texts([3], tmp_path / "missing.npz", tmp_path / "missing.parquet") == {3: None}


def test_windowed_scores_use_both_windows_and_count_left_out_documents(tmp_path: Path) -> None:
    from precompute.errors import CorpusError
    from precompute.pipeline.config import RunConfig
    from precompute.pipeline.scores import windowed_scores

    groups = np.array(["task"] * 20 + ["control"] * 20 + ["harmful"] * 30 + ["benign"] * 30, dtype=object)
    lengths = [35 + i for i in range(40)] + [4 + i % 16 for i in range(60)]  # content tokens per document
    cats = np.array([None] * 40 + ["a", "b"] * 15 + [None] * 30, dtype=object)
    paths = corpus(tmp_path, lengths, [0.1, 0.3], seed=6)
    cfg = RunConfig(score_window=8, task_window=40, progress=False)
    got = windowed_scores(paths, groups, cats, 2, cfg)
    short, long = windowed_values(paths, groups, [8, 40], 0.5, seed=0, progress=False)
    assert np.array_equal(got.score.n_eligible, lengths) and got.task.window == 40
    n_short = {
        g: sum(n < 8 for n, x in zip(lengths, groups, strict=True) if x == g) for g in ("harmful", "benign")
    }
    assert got.left_out == {"task": 0, "control": 0, **n_short} and n_short["harmful"] == 8
    assert got.scored == {"task": 20, "control": 20, "harmful": 22, "benign": 30 - n_short["benign"]}
    assert got.task_left_out == {"task": 5, "control": 0}  # task documents of 35..39 tokens
    assert got.task_scored == {"task": 15, "control": 20}
    score_group = np.where(short.has_window, groups, "short")
    task_group = np.where(long.has_window, groups, "short")
    expected = contrast_scores(
        *short.triples, 2, score_group, cats, task_values=long.triples, task_doc_group=task_group
    )
    pd.testing.assert_frame_equal(got.table, expected)
    assert got.permutation is not None and got.permutation["n_permutations"] > 0
    with pytest.raises(
        CorpusError, match=r"no harmful document has 20 tokens.*longest has 19.*--score-window"
    ):
        windowed_scores(paths, groups, cats, 2, RunConfig(score_window=20, progress=False))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("score_window", 0),
        ("task_window", -1),
        ("shared_token_fraction", 0.0),
        ("shared_token_fraction", 1.5),
        ("min_docs", 0),
    ],
)
def test_window_options_are_range_checked(key: str, value: float) -> None:
    from precompute.errors import ConfigError
    from precompute.pipeline.config import RunConfig

    with pytest.raises(ConfigError, match="--" + key.replace("_", "-")):
        RunConfig.load(None, {key: value})
    assert (
        RunConfig.load(None, {}).to_dict()[key]
        == {
            "score_window": 12,
            "task_window": 64,
            "shared_token_fraction": 0.5,
            "min_docs": 3,
        }[key]
    )
