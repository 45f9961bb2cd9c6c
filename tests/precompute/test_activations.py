"""Corpus planning, batching, the count mask, and streamed activations against a one-context forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precompute.data.activations import CorpusPlan, count_mask, iter_activations, plan_corpus
from precompute.data.corpus import Context, CorpusSource
from precompute.errors import CorpusError
from precompute.model.loading import HookReader, load_model, resolve_hook


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
    return Context(cid, source, list(range(1, n + 1)), [cid] * n, list(range(n)))


def test_batches_are_deterministic_and_sorted_by_length():
    lengths = [3, 7, 5, 7, 2, 5, 9]
    plan = CorpusPlan([], [], [ctx(i, n) for i, n in enumerate(lengths)], [])
    batches = plan.batches(3)
    assert [[c.context_id for c in b] for b in batches] == [[6, 1, 3], [2, 5, 0], [4]]
    assert [[len(c.token_ids) for c in b] for b in batches] == [[9, 7, 7], [5, 5, 3], [2]]
    again = CorpusPlan([], [], [ctx(i, n) for i, n in reversed(list(enumerate(lengths)))], []).batches(3)
    assert [[c.context_id for c in b] for b in again] == [[c.context_id for c in b] for b in batches]
    assert plan.n_tokens == sum(lengths)


def test_count_mask_excludes_first_position_padding_and_special_tokens():
    ids = torch.tensor([[1, 5, 6, 2, 7], [5, 0, 8, 9, 9], [4, 4, 9, 9, 9]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    mask = count_mask(ids, attention, skip_ids={0, 1, 2})
    assert mask.tolist() == [
        [False, True, True, False, True],
        [False, False, True, False, False],
        [False, True, False, False, False],
    ]
    keep_first = count_mask(ids, attention, skip_ids={0, 1, 2}, exclude_first=False)
    assert keep_first[:, 0].tolist() == [False, True, True]
    assert keep_first[:, 1:].tolist() == mask[:, 1:].tolist()
    assert attention.tolist()[1] == [1, 1, 1, 0, 0]  # the input is not modified


# --------------------------------------------------------------------------- activations
@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def plan(lm, tiny_corpus):
    sources = [
        CorpusSource.parse(f"{tiny_corpus['task']}:task"),
        CorpusSource.parse(f"{tiny_corpus['benign']}:benign"),
    ]
    return plan_corpus(sources, lm.tokenizer, context_size=24, packing="split", max_tokens=400)


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.0.hook_resid_pre"])
def test_batched_activations_equal_each_context_alone(lm, plan, hook):
    reader = HookReader(lm.model, resolve_hook(lm.model, hook))
    batches = plan.batches(5)
    lengths = {len(c.token_ids) for c in plan.contexts}
    assert len(lengths) > 1  # the batches really are padded
    skip = set(lm.tokenizer.all_special_ids)
    assert lm.tokenizer.pad_token_id in skip
    seen = set()
    n_rows = 0
    for batch in iter_activations(reader, batches, lm.tokenizer.pad_token_id, skip, torch.device("cpu")):
        assert batch.contexts is batches[batch.index]
        assert batch.acts.dtype == torch.float32 and batch.acts.shape == (len(batch.position), 32)
        by_id = {c.context_id: c for c in batch.contexts}
        for cid in np.unique(batch.context_id):
            c = by_id[int(cid)]
            rows = np.flatnonzero(batch.context_id == cid)
            alone = reader(torch.tensor([c.token_ids]))[0]
            expected_pos = [p for p, t in enumerate(c.token_ids) if p > 0 and t not in skip]
            assert batch.position[rows].tolist() == expected_pos
            assert batch.token_id[rows].tolist() == [c.token_ids[p] for p in expected_pos]
            assert batch.doc_id[rows].tolist() == [c.doc_ids[p] for p in expected_pos]
            torch.testing.assert_close(batch.acts[rows], alone[expected_pos], atol=1e-5, rtol=1e-5)
            seen.add(int(cid))
        n_rows += len(batch.position)
    # every context has counted positions here, and each row is one counted token
    assert seen == {c.context_id for c in plan.contexts}
    assert n_rows == sum(
        1 for c in plan.contexts for p, t in enumerate(c.token_ids) if p > 0 and t not in skip
    )


def test_chat_contexts_have_special_tokens_masked(lm, plan):
    skip = set(lm.tokenizer.all_special_ids)
    task = [c for c in plan.contexts if c.source == 0]
    assert any(t in skip for c in task for t in c.token_ids[1:])  # <|im_start|>/<|im_end|> inside windows
    reader = HookReader(lm.model, resolve_hook(lm.model, "model.layers.0"))
    for batch in iter_activations(
        reader, CorpusPlan([], [], task, []).batches(8), lm.tokenizer.pad_token_id, skip, torch.device("cpu")
    ):
        assert not set(batch.token_id.tolist()) & skip
        assert (batch.position > 0).all()


def test_start_batch_resumes(lm, plan):
    reader = HookReader(lm.model, resolve_hook(lm.model, "model.layers.0"))
    batches = plan.batches(4)
    pad, skip = lm.tokenizer.pad_token_id, set(lm.tokenizer.all_special_ids)
    full = list(iter_activations(reader, batches, pad, skip, torch.device("cpu")))
    tail = list(iter_activations(reader, batches, pad, skip, torch.device("cpu"), start_batch=2))
    assert [b.index for b in tail] == list(range(2, len(batches)))
    for a, b in zip(full[2:], tail, strict=True):
        assert np.array_equal(a.context_id, b.context_id) and np.array_equal(a.position, b.position)
        torch.testing.assert_close(a.acts, b.acts, atol=0, rtol=0)
