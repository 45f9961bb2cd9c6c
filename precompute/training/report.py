"""The parts of train-sae's training_report.json that describe its inputs: corpus, documents, machine."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from precompute.data.plan import CorpusPlan
from precompute.data.split import (
    DOCUMENT_HASH_HEX,
    TRAINED_DOCUMENTS_KEY,
    document_hash,
    documents_digest,
    split_record,
)
from precompute.provenance import library_versions
from precompute.training.config import TrainSAEConfig


def corpus_record(
    cfg: TrainSAEConfig, corpus_hashes: list[str], train_plan: CorpusPlan, held_plan: CorpusPlan
) -> list[dict[str, Any]]:
    return [
        {
            **src.to_dict(),
            "sha256": corpus_hashes[i],
            "train_tokens": train_plan.tokens_per_source[i],
            "heldout_tokens": held_plan.tokens_per_source[i],
            "train_documents": train_plan.stats[i].documents,
            "heldout_documents": held_plan.stats[i].documents,
        }
        for i, src in enumerate(cfg.corpus)
    ]


def documents_record(cfg: TrainSAEConfig, train_plan: CorpusPlan, held_plan: CorpusPlan) -> dict[str, Any]:
    """Which documents the SAE saw, by content hash, so a cache can prove it scores none of them."""
    train = sorted({document_hash(d)[:DOCUMENT_HASH_HEX] for d in train_plan.documents})
    held = sorted({document_hash(d)[:DOCUMENT_HASH_HEX] for d in held_plan.documents})
    return {
        **split_record(cfg.document_split, cfg.scoring_fraction),
        "hash": f"first {DOCUMENT_HASH_HEX} hex digits of the sha256 of each document's content",
        TRAINED_DOCUMENTS_KEY: train,
        "heldout_sha256": held,
        "train_digest": documents_digest(train),
    }


def machine_record(device: torch.device) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        **library_versions(("torch",)),
    }
