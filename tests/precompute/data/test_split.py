"""The document split: SAE-training and scoring sides are disjoint, cover every document, honour the
fraction, ignore order, seeds and budgets, are independent of train-sae's held-out split, and a
cache can count exactly how many of its scored documents an SAE was trained on."""

from __future__ import annotations

import json
import math

import pytest

from precompute.data.corpus import CorpusSource, read_source
from precompute.data.plan import plan_corpus
from precompute.data.split import (
    DOCUMENT_HASH_HEX,
    document_hash,
    documents_digest,
    on_side,
    sae_training_overlap,
    split_value,
    trained_documents,
)
from precompute.errors import CorpusError
from precompute.training.store import is_heldout, plan_split
from tests.precompute.data.helpers import WordTokenizer, doc

N = 4000


def _docs(n: int = N):
    return [doc(i, " ".join(str(i * 10 + w) for w in range(3))) for i in range(n)]


def _within_binomial(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_sides_are_disjoint_and_cover_every_document():
    docs = _docs()
    sae = {d.doc_id for d in docs if on_side(d, "sae", 0.5)}
    scoring = {d.doc_id for d in docs if on_side(d, "scoring", 0.5)}
    assert not sae & scoring
    assert sae | scoring == {d.doc_id for d in docs}
    assert all(on_side(d, "all") for d in docs)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.8])
def test_scoring_fraction_is_honoured(fraction):
    docs = _docs()
    n_scoring = sum(on_side(d, "scoring", fraction) for d in docs)
    assert _within_binomial(n_scoring, N, fraction)


def test_split_depends_on_content_only():
    a = doc(0, "1 2 3", source=0)
    b = doc(99, "1 2 3", source=5)  # same content, other id and source: a duplicate
    assert split_value(a) == split_value(b)
    assert on_side(a, "scoring") == on_side(b, "scoring")
    assert document_hash(a) == document_hash(b)
    assert document_hash(a) != document_hash(doc(0, "1 2 4"))


def test_independent_of_train_sae_heldout_split():
    """The salt decorrelates the two hashes: train-sae's 8% held-out split still holds ~8% of the
    SAE side (an unsalted split on the same hash would leave it empty or doubled)."""
    docs = [d for d in _docs() if on_side(d, "sae", 0.5)]
    held = sum(is_heldout(d, 0.08) for d in docs)
    assert _within_binomial(held, len(docs), 0.08)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown document split"):
        on_side(doc(0, "1"), "train")


def test_digest_ignores_order_and_duplicates():
    assert documents_digest(["b", "a", "a"]) == documents_digest(["a", "b"])
    assert documents_digest(["a"]) != documents_digest(["a", "b"])


def _source(tmp_path, n=200, **kw) -> CorpusSource:
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(" ".join(str(100 * d + w) for w in range(4)) for d in range(n)))
    return CorpusSource(path=str(path), **kw)


def test_read_source_keeps_one_side_whatever_the_seed(tmp_path):
    source = _source(tmp_path)
    everything, _ = read_source(source, 0)
    expected = {d.text for d in everything if on_side(d, "scoring", 0.5)}
    for seed in (0, 1, 7):
        docs, stats = read_source(source, 0, seed=seed, split="scoring", scoring_fraction=0.5)
        assert {d.text for d in docs} == expected
        assert stats.documents == len(expected)
        assert stats.other_split == len(everything) - len(expected)
    sae_docs, _ = read_source(source, 0, split="sae", scoring_fraction=0.5)
    assert {d.text for d in sae_docs} == {d.text for d in everything} - expected


def test_a_source_with_nothing_on_its_side_is_an_error(tmp_path):
    source = _source(tmp_path, n=1)
    side = "scoring" if not on_side(read_source(source, 0)[0][0], "scoring", 0.5) else "sae"
    with pytest.raises(CorpusError, match="no document on the"):
        read_source(source, 0, split=side, scoring_fraction=0.5)


def test_sae_plans_and_scoring_plans_share_no_document(tmp_path):
    """What the defaults rely on: train-sae (sae side, with its own held-out split) and the
    precompute (scoring side) read disjoint documents of the same sources, whatever the budgets."""
    sources = [_source(tmp_path, n=300, max_tokens=600)]
    tok = WordTokenizer()
    train, held = plan_split(sources, tok, 16, heldout_fraction=0.1, document_split="sae")
    scoring = plan_corpus(sources, tok, 16, max_tokens=None, document_split="scoring")
    sae_texts = {d.text for d in train.documents} | {d.text for d in held.documents}
    assert train.documents and held.documents and scoring.documents
    assert not sae_texts & {d.text for d in scoring.documents}


def test_overlap_is_counted_from_the_training_report(tmp_path):
    scored = [document_hash(doc(i, str(i))) for i in range(10)]
    sae_dir = tmp_path / "sae"
    sae_dir.mkdir()
    assert trained_documents(sae_dir) is None
    assert sae_training_overlap(scored, sae_dir)["scored_in_sae_training"] is None

    trained = [h[:DOCUMENT_HASH_HEX] for h in scored[7:]] + ["f" * DOCUMENT_HASH_HEX]
    (sae_dir / "training_report.json").write_text(json.dumps({"documents": {"train_sha256": trained}}))
    record = sae_training_overlap(scored, sae_dir)
    assert record["scored_in_sae_training"] == 3
    assert record["scored_documents"] == 10
    assert record["sae_training_documents"] == 4
    assert record["sae_training_digest"] == documents_digest(trained)


@pytest.mark.parametrize("command", ["precompute", "harvest", "train-sae"])
def test_every_command_that_reads_a_corpus_takes_the_split_flags(command, capsys):
    """The split is a command-line choice too, not only a TOML key (the docs show it as a flag)."""
    from precompute.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "--document-split {all,sae,scoring}" in text and "--scoring-fraction" in text
