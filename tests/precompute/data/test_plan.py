"""Corpus planning: the shared token budget, empty sources, deterministic batches sorted by length."""

from __future__ import annotations

import pytest

from precompute.data.corpus import Context, CorpusSource
from precompute.data.plan import CorpusPlan, plan_corpus
from precompute.errors import CorpusError


class WordTokenizer:
    """Token ids are the integers written in the text."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w) for w in text.split()]}


def txt_source(tmp_path, name, n_docs, words_per_doc, group="general", **kw) -> CorpusSource:
    path = tmp_path / f"{name}.txt"
    path.write_text(
        "\n\n".join(" ".join(str(100 * d + w) for w in range(words_per_doc)) for d in range(n_docs))
    )
    return CorpusSource(path=str(path), group=group, **kw)


# --------------------------------------------------------------------------- planning
def test_max_tokens_is_shared_equally_among_unbudgeted_sources(tmp_path):
    sources = [
        txt_source(tmp_path, "a", 20, 3, "task"),
        txt_source(tmp_path, "b", 20, 3, "harmful", max_tokens=8),
        txt_source(tmp_path, "c", 20, 3, "benign"),
    ]
    plan = plan_corpus(sources, WordTokenizer(), context_size=4, packing="split", max_tokens=48)
    # (48 - 8) // 2 = 20 each for a and c; b keeps its own 8.
    assert plan.tokens_per_source == [20, 8, 20]
    assert plan.n_tokens == 48
    for index, expected in enumerate([20, 8, 20]):
        ctxs = [c for c in plan.contexts if c.source == index]
        assert sum(len(c.token_ids) for c in ctxs) == expected
        assert [len(c.token_ids) for c in ctxs][:-1] == [3] * (len(ctxs) - 1)  # whole documents, last one cut
    assert [c.context_id for c in plan.contexts] == list(range(len(plan.contexts)))
    # Document ids are global and contiguous; every context points at documents of its own source.
    assert [d.doc_id for d in plan.documents] == list(range(60))
    by_id = {d.doc_id: d for d in plan.documents}
    assert all(by_id[i].source == c.source for c in plan.contexts for i in c.doc_ids)
    assert [s.documents for s in plan.stats] == [20, 20, 20]


def test_share_rounds_down(tmp_path):
    sources = [txt_source(tmp_path, n, 30, 5) for n in "abc"]
    plan = plan_corpus(sources, WordTokenizer(), context_size=8, packing="split", max_tokens=100)
    assert plan.tokens_per_source == [33, 33, 33]


def test_no_budget_reads_everything(tmp_path):
    sources = [txt_source(tmp_path, "a", 4, 6), txt_source(tmp_path, "b", 2, 3)]
    plan = plan_corpus(sources, WordTokenizer(), context_size=4, packing="split")
    assert plan.tokens_per_source == [24, 6]
    assert sorted(len(c.token_ids) for c in plan.contexts) == [2] * 4 + [3] * 2 + [4] * 4


def test_no_sources():
    with pytest.raises(CorpusError, match=r"no corpus given: pass --corpus PATH\[:GROUP\[:CATEGORY\]\]"):
        plan_corpus([], WordTokenizer())


def test_source_without_tokens_in_its_share(tmp_path):
    sources = [
        txt_source(tmp_path, "a", 4, 6, "task", max_tokens=10),
        txt_source(tmp_path, "b", 4, 6, "benign"),
    ]
    with pytest.raises(CorpusError, match=r"b\.txt \(group 'benign'\) gave no tokens within the budget"):
        plan_corpus(sources, WordTokenizer(), context_size=4, max_tokens=10)


# --------------------------------------------------------------------------- batches and mask
def ctx(cid, n, source=0):
    return Context.of(cid, source, list(range(1, n + 1)), [cid] * n, list(range(n)))


def test_batches_are_deterministic_and_sorted_by_length():
    lengths = [3, 7, 5, 7, 2, 5, 9]
    plan = CorpusPlan([], [], [ctx(i, n) for i, n in enumerate(lengths)], [])
    batches = plan.batches(3)
    assert [[c.context_id for c in b] for b in batches] == [[6, 1, 3], [2, 5, 0], [4]]
    assert [[len(c.token_ids) for c in b] for b in batches] == [[9, 7, 7], [5, 5, 3], [2]]
    again = CorpusPlan([], [], [ctx(i, n) for i, n in reversed(list(enumerate(lengths)))], []).batches(3)
    assert [[c.context_id for c in b] for b in again] == [[c.context_id for c in b] for b in batches]
    assert plan.n_tokens == sum(lengths)
