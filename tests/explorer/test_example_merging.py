"""Each passage of a document is shown once (data.evidence.merge_repeats), and an example list says what its
numbers mean: the story numbers what it shows (1., 2., ...), a filtered list says a top example's rank is among
all the feature's top examples.

The examples tables are built here, so every expectation is exact: which rows are kept, which one stands for
which, and how many were merged."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from explorer import figures as F
from explorer.data import load_cache
from explorer.data.evidence import merge_repeats, same_passage, shown_span
from explorer.story import build_result_story, example_feature
from precompute import schema

PASSAGE = ["def", " f", "(", "x", ")", ":", " return", " x", "+", "1"]  # peak on " return" (index 6)


def ex(
    ctx: int, doc: int, act: float, tokens: list[str], peak: int, rank: int, kind: str = "top"
) -> dict[str, Any]:
    acts = [0.0] * len(tokens)
    acts[peak] = act
    return {
        "feature": 3,
        "kind": kind,
        "rank": rank,
        "group": "task",
        "category": None,
        "doc_id": doc,
        "context_id": ctx,
        "tokens": tokens,
        "activations": acts,
        "max_activation": act,
        "max_position": peak,
        "quantile": None,
    }


def table() -> list[dict[str, Any]]:
    """A feature's top examples, by rank; document 7 repeats PASSAGE in three contexts."""
    pad = ["a", "b", "c", "d"]
    return [
        ex(10, 7, 9.0, PASSAGE, 6, 0),  # the passage
        ex(11, 7, 8.0, ["x"] * 6 + [" return"] + ["y"] * 3, 6, 1),  # same peak token, other text: kept
        ex(20, 8, 7.5, PASSAGE, 6, 2),  # the passage again, but in another document: kept
        ex(12, 7, 7.0, pad + PASSAGE, 10, 3),  # the passage again in document 7, 4 tokens later: merged
        ex(13, 7, 6.0, PASSAGE[3:], 3, 4),  # cut at the context start, still over half its window: merged
        ex(
            14, 7, 5.0, PASSAGE[:7], 6, 5
        ),  # cut at the context end: 4 common tokens of its 7, all agree: merged
        ex(
            15, 7, 9.5, ["z"] + PASSAGE, 7, 6
        ),  # the strongest of the passage, ranked last: it stands for the rest
    ]


def test_merge_keeps_the_strongest_of_each_passage() -> None:
    rows = table()
    merged = merge_repeats(rows, window=3)
    assert [(e["context_id"], e["repeats"]) for e in merged.examples] == [(11, 0), (20, 0), (15, 4)]
    assert merged.n_merged == 4
    assert rows[0].get("repeats") is None  # the input is not changed
    # the whole context shown: #4's context shows other tokens before the passage than #7's, so it stays
    full = merge_repeats(rows, window=None)
    assert [(e["context_id"], e["repeats"]) for e in full.examples] == [(11, 0), (20, 0), (12, 0), (15, 3)]
    assert full.n_merged == 3
    # a tie keeps the earlier example
    tie = [ex(30, 9, 2.0, PASSAGE, 6, 0), ex(31, 9, 2.0, PASSAGE, 6, 1)]
    assert [(e["context_id"], e["repeats"]) for e in merge_repeats(tie, 3).examples] == [(30, 1)]


def test_same_passage_needs_half_the_shorter_window() -> None:
    """Peaks at the edges of two contexts agree on too few tokens to be one passage."""
    a = ex(40, 9, 3.0, ["p", "q", "r", "s", "t", "u", " return"], 6, 0)  # peak on the last token
    b = ex(41, 9, 2.0, [" return", "u", "v", "w", "x", "y", "z"], 0, 1)  # peak on the first
    assert shown_span(7, 6, 2) == (4, 7) and shown_span(7, 0, 2) == (0, 3)
    assert not same_passage(a, b, window=2)  # 1 common token of windows of 3
    c = ex(42, 9, 2.0, ["q", "r", "t", "u", " return", "w", "x"], 4, 1)
    assert same_passage(a, c, window=2)  # t u return: 3 common tokens, all the shorter window shows
    assert not same_passage(a, {**c, "doc_id": 10}, window=2)
    assert not same_passage(a, {**c, "doc_id": None}, window=2)


def test_examples_html_heads_and_repeat_note() -> None:
    merged = merge_repeats(table(), window=3).examples
    heads = lambda html: re.findall(r'<b style="color:#111827">([^<]+)</b>', html)  # noqa: E731
    assert heads(F.examples_html(merged, window=3)) == ["#2", "#3", "#7"]
    assert heads(F.examples_html(merged, window=3, ranks="overall")) == [
        "#2 of its top examples",
        "#3 of its top examples",
        "#7 of its top examples",
    ]
    shown = F.examples_html(merged, window=3, ranks="shown")
    assert heads(shown) == ["1.", "2.", "3."]
    notes = re.findall(r'data-repeats="(\d+)"[^>]*>([^<]+)<', shown)
    assert notes == [("4", "4 more stored examples show this passage of the document (not repeated here)")]
    one = F.examples_html([{**merged[0], "repeats": 1}], window=3)
    assert "1 more stored example shows this passage of the document (not repeated here)" in one


def test_feature_page_shows_a_repeated_passage_once(
    synth_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The feature page on a cache whose feature 3 has the table above as its top examples (and nothing else):
    the merged ones are not drawn, the stronger one says how many it stands for, the caption counts them."""
    from tests.explorer.test_apptest import html_text, run_page

    cache = tmp_path / "cache"
    shutil.copytree(synth_cache, cache)
    rows = table()
    edit_examples(cache, rows)
    at = run_page("views/feature.py", cache, monkeypatch, feature="3")
    assert not at.exception, [e.value for e in at.exception]
    page = html_text(at)
    # the window shown (24 tokens either side) covers these short contexts whole: as merge_repeats(window=None)
    assert re.findall(r'<b style="color:#111827">(#\d+)</b>', page) == ["#2", "#3", "#4", "#7"]
    assert 'data-repeats="3"' in page and page.count("data-repeats=") == 1
    captions = [c.value for c in at.caption]
    assert (
        "Merged: 3 of the top examples show the same tokens around the peak, in the same document, as a stronger "
        "example: each passage is shown once, under the stronger example, and the ranks skip them."
    ) in captions


def edit_examples(cache: Path, rows: list[dict[str, Any]]) -> None:
    """Replace feature 3's examples in examples.parquet with `rows` (through the cache's staging)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from precompute.cache import stage

    df = pd.read_parquet(cache / schema.EXAMPLES)
    new = pd.DataFrame(rows)[list(df.columns)].astype({"quantile": "float64"})
    both = pd.concat([df[df["feature"] != 3], new], ignore_index=True).sort_values("feature", kind="stable")
    types = pq.read_schema(cache / schema.EXAMPLES)  # the file's own types (float32 activations)
    with stage(cache) as staged:
        pq.write_table(
            pa.Table.from_pandas(both, schema=types, preserve_index=False), staged.path(schema.EXAMPLES)
        )
        staged.commit()


def test_story_numbers_what_it_shows(notask_cache: Path, tmp_path: Path) -> None:
    """The result story's harmful examples: the followed feature's stored examples on harmful documents, one per
    context, numbered 1. to 3. as shown (its own ranks there skip the examples from other documents)."""
    cache = tmp_path / "notask"
    shutil.copytree(notask_cache, cache)
    c = load_cache(cache)
    ex_id, _ = example_feature(c)
    on_harm = [e for e in c.examples_of(ex_id) if e.get("group") == "harmful"]
    ranks = sorted({int(e["rank"]) + 1 for e in on_harm if e["kind"] == "top"})
    assert ranks[:3] != [
        1,
        2,
        3,
    ]  # the fixture's ranks on harmful documents skip: the case the numbering is for
    harmful = {s.key: s for s in build_result_story(c)}["harmful"]
    heads = re.findall(r'<b style="color:#111827">([^<]+)</b>', harmful.body or "")
    assert heads == ["1.", "2.", "3."]
    ctx = re.findall(r"doc (\d+)", harmful.body or "")
    assert len(ctx) == 3
