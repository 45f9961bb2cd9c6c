"""Training data (`precompute.training.store`): the batch order and the held-out split by document."""

from __future__ import annotations

import numpy as np
import torch

from precompute.data.corpus import CorpusSource, Document
from precompute.training.store import ShuffledBatches, is_heldout, plan_split


def test_batches_cover_every_row_once_per_epoch():
    rows = np.arange(1000, dtype=np.float32)[:, None].repeat(2, axis=1)
    for buffer_rows in (None, 300):
        batches = ShuffledBatches(rows, 100, seed=3, buffer_rows=buffer_rows)
        seen = np.concatenate([batches.indices(step) for step in range(10)])
        assert sorted(seen.tolist()) == list(range(1000))
        assert not np.array_equal(batches.indices(0), batches.indices(10))  # a new order each epoch
        assert torch.equal(
            batches.batch(4)[:, 0], torch.from_numpy(np.sort(batches.indices(4)).astype(np.float32))
        )


def test_heldout_split_is_by_document_and_stable():
    docs = [Document(i, 0, "general", None, text=f"document number {i}") for i in range(2000)]
    held = {d.doc_id for d in docs if is_heldout(d, 0.1)}
    assert 150 < len(held) < 250
    shuffled = list(reversed(docs))
    assert held == {d.doc_id for d in shuffled if is_heldout(d, 0.1)}
    twin = Document(99999, 3, "task", "x", text="document number 7")  # same content, other source
    assert is_heldout(twin, 0.1) == (7 in held)


def test_plan_split_keeps_heldout_documents_out_of_training(tiny_setup):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_setup / "model")
    sources = [CorpusSource(path=str(tiny_setup / "corpus.txt"), group="general", max_tokens=3000)]
    train, held = plan_split(sources, tok, context_size=16, heldout_fraction=0.2)
    train_docs = {d.doc_id for d in train.documents}
    held_docs = {d.doc_id for d in held.documents}
    assert train_docs and held_docs and not train_docs & held_docs
    assert {i for c in held.contexts for i in c.doc_ids} <= held_docs
    assert all(is_heldout(d, 0.2) for d in held.documents)
    assert 2000 <= train.n_tokens + held.n_tokens <= 3000
