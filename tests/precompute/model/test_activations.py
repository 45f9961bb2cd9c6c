"""The count mask, and streamed activations against a one-context forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precompute.data.corpus import CorpusSource
from precompute.data.plan import CorpusPlan, plan_corpus
from precompute.model.activations import count_mask, iter_activations
from precompute.model.hooks import HookReader, resolve_hook


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
            alone = reader(torch.as_tensor(c.token_ids, dtype=torch.long)[None])[0]
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
