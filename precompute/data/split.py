"""Disjoint SAE-training and scoring documents.

An SAE trained on the very documents a cache scores can learn dataset-identity latents ("this is a
HarmBench prompt") that then score as perfect harm or task features. Every source is therefore split
by a salted hash of each document's content into a scoring side (`scoring_fraction` of documents) and
an SAE side: `train-sae` reads only the SAE side (`document_split = "sae"`), the precompute only the
scoring side (`document_split = "scoring"`). The rule depends on content alone, so duplicates fall
on one side, and the split does not move when budgets, seeds or the order of sources change. The
salt keeps it independent of train-sae's own held-out split (`training.store.is_heldout`, unsalted).

Both sides record the sha256 of every document they used (the SAE in its training report, a cache
in documents.parquet), so `scored_in_sae_training` can count the overlap exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

DOCUMENT_SPLITS = ("all", "sae", "scoring")
DOCUMENT_SPLIT_HELP = (
    "which documents of every source to read: all, the SAE-training side (sae) or the scoring side "
    "(scoring) of a salted content-hash split, so that no scored document was seen in SAE training"
)
SCORING_FRACTION_HELP = "share of every source's documents on the scoring side of --document-split"
DEFAULT_SCORING_FRACTION = 0.5
SPLIT_SALT = "featuregeom/document-split/v1"
# An SAE's training report lists its training documents under this key, by hash prefix (64 bits:
# no collision is expected among millions of documents, and the report stays small).
TRAINING_REPORT = "training_report.json"
DOCUMENTS_KEY = "documents"
TRAINED_DOCUMENTS_KEY = "train_sha256"
DOCUMENT_HASH_HEX = 16


class HasContent(Protocol):
    text: str | None
    messages: list[dict[str, str]] | None


def document_key(doc: HasContent) -> str:
    """What identifies a document across configs: its content (text or chat messages)."""
    if doc.messages is not None:
        return json.dumps(doc.messages, sort_keys=True, ensure_ascii=False)
    return doc.text or ""


def _encoded(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")


def document_hash(doc: HasContent) -> str:
    """sha256 (hex) of the document's content: the name both sides record it under."""
    return hashlib.sha256(_encoded(document_key(doc))).hexdigest()


def split_value(doc: HasContent) -> float:
    """A uniform number in [0, 1) fixed by the content and the salt."""
    digest = hashlib.sha256(_encoded(SPLIT_SALT + "\0" + document_key(doc))).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def on_side(doc: HasContent, split: str, scoring_fraction: float = DEFAULT_SCORING_FRACTION) -> bool:
    """Whether `doc` belongs to `split` ("all" takes every document)."""
    if split == "all":
        return True
    if split not in DOCUMENT_SPLITS:
        raise ValueError(f"unknown document split {split!r}; use one of {', '.join(DOCUMENT_SPLITS)}")
    scoring = split_value(doc) < scoring_fraction
    return scoring if split == "scoring" else not scoring


def split_record(split: str, scoring_fraction: float) -> dict[str, Any]:
    """How a split was made, for a manifest or a training report."""
    return {
        "split": split,
        "scoring_fraction": scoring_fraction if split != "all" else None,
        "salt": SPLIT_SALT,
        "rule": "scoring iff int(sha256(salt + NUL + content)[:8]) / 2**64 < scoring_fraction",
    }


def documents_digest(hashes: Iterable[str]) -> str:
    """One sha256 naming a set of documents (order and duplicates ignored)."""
    h = hashlib.sha256()
    for value in sorted(set(hashes)):
        h.update(value.encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


def trained_documents(sae_path: str | Path) -> set[str] | None:
    """The hash prefixes of the documents an SAE directory was trained on, from its training report;
    None when the SAE records none (another trainer, or a report from before the split existed)."""
    report = Path(sae_path) / TRAINING_REPORT
    if not report.is_file():
        return None
    try:
        recorded = json.loads(report.read_text()).get(DOCUMENTS_KEY) or {}
    except (OSError, ValueError):
        return None
    hashes = recorded.get(TRAINED_DOCUMENTS_KEY)
    return set(hashes) if isinstance(hashes, list) else None


def sae_training_overlap(scored_hashes: Iterable[str], sae_path: str | Path) -> dict[str, Any]:
    """How many scored documents the SAE was trained on (None when the SAE does not say)."""
    trained = trained_documents(sae_path)
    scored = {h[:DOCUMENT_HASH_HEX] for h in scored_hashes}
    return {
        "scored_documents": len(scored),
        "scored_digest": documents_digest(scored),
        "sae_training_documents": None if trained is None else len(trained),
        "sae_training_digest": None if trained is None else documents_digest(trained),
        "scored_in_sae_training": None if trained is None else len(scored & trained),
    }
