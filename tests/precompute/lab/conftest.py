"""A tiny precompute cache with harmful and task features, flagged overlaps and a null cosine of 0.1:
what the fine-tune diff and patch-back read."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import write_feature_cache

HOOK = "blocks.1.hook_resid_post"
HARMFUL, TASK = [1, 5, 9, 12, 20], [2, 5, 7, 30, 40, 41]


@pytest.fixture(scope="module")
def cache(tiny_sae_dir, tmp_path_factory) -> Path:
    return write_feature_cache(
        tmp_path_factory.mktemp("cache"),
        tiny_sae_dir,
        64,
        HARMFUL,
        TASK,
        0.1,
        flagged=[(2, 1), (7, 1), (30, 9)],
    )
