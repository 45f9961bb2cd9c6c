"""The aggregation split by feature range (what the ranks of a torchrun harvest each compute): the
ranges joined equal the whole, array for array and bit for bit, on a real tiny cache's shards."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from precompute.pipeline.aggregate import (
    PER_FEATURE,
    AggregateParams,
    aggregate,
    feature_ranges,
    join_feature_ranges,
    restrict_to_features,
)
from precompute.pipeline.context import RunContext
from precompute.pipeline.harvest import document_labels
from precompute.pipeline.shards import Shard, list_shards
from tests.precompute.pipeline.test_run import built_cache  # noqa: F401

# every selection on: group tops, category tops and group quantile samples, not only the overall ones
PARAMS = AggregateParams(
    top_k=4, quantile_bins=3, per_bin=2, hist_bins=8, seed=7, top_k_group=3, per_bin_group=2,
    top_k_category=2, category_groups=("harmful",),
)  # fmt: skip


@pytest.mark.parametrize("n, parts", [(10, 1), (10, 3), (64, 5), (3, 5), (0, 2)])
def test_feature_ranges_tile_the_features_in_order_with_sizes_one_apart(n: int, parts: int) -> None:
    ranges = feature_ranges(n, parts)
    assert len(ranges) == parts
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in pairwise(ranges))  # contiguous, no gap, no overlap
    sizes = [hi - lo for lo, hi in ranges]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1


def _labels(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    docs = pd.read_parquet(cache / "documents.parquet")
    return docs["group"].to_numpy(), docs["category"].fillna("").to_numpy()


def test_a_restricted_shard_holds_exactly_the_range_s_entries_renumbered(built_cache) -> None:  # noqa: F811
    out, _ = built_cache
    shard = Shard.load(list_shards(out / "harvest")[0])
    n = int(shard.feature.max()) + 1
    dense = shard.matrix(n).toarray()
    lo, hi = n // 4, n // 2
    part = restrict_to_features(shard, lo, hi)
    assert part.n_rows == shard.n_rows and part.feature.dtype == shard.feature.dtype
    np.testing.assert_array_equal(part.matrix(hi - lo).toarray(), dense[:, lo:hi])
    np.testing.assert_array_equal(part.context_id, shard.context_id)  # every token row is kept
    # within a row, entries keep their order (the CSR the aggregation reads)
    assert all(np.all(np.diff(part.feature[a:b]) > 0) for a, b in pairwise(part.indptr))


@pytest.mark.parametrize("split", ["halves", "fifths", "uneven with an empty range"])
def test_feature_ranges_joined_equal_the_whole_aggregation(built_cache, split: str) -> None:  # noqa: F811
    out, cfg = built_cache
    shards = list_shards(out / "harvest")
    groups, categories = _labels(out)
    n = 64
    whole = aggregate(shards, n, groups, categories, PARAMS, progress=False)
    assert any(len(v) for v in whole["ctop_categories"])  # the category tops are exercised
    assert np.isfinite(whole["gtop_val"]).any() and (whole["gq_ctx"] >= 0).any()
    ranges = {
        "halves": feature_ranges(n, 2),
        "fifths": feature_ranges(n, 5),
        "uneven with an empty range": [(0, 1), (1, 1), (1, 40), (40, 64)],
    }[split]
    parts = [
        aggregate(shards, n, groups, categories, PARAMS, progress=False, feature_range=r) for r in ranges
    ]
    joined = join_feature_ranges(parts)
    assert set(joined) == set(whole)
    for key, value in whole.items():
        if isinstance(value, np.ndarray):
            assert joined[key].dtype == value.dtype, key
            np.testing.assert_array_equal(joined[key], value, err_msg=key)  # exact, sums included
        else:
            assert joined[key] == value, key
    for part, (lo, hi) in zip(parts, ranges, strict=True):
        assert all(len(part[k]) == hi - lo for k in PER_FEATURE)


def test_a_range_outside_the_features_is_refused(built_cache) -> None:  # noqa: F811
    out, _ = built_cache
    groups, categories = _labels(out)
    with pytest.raises(ValueError, match="not inside"):
        aggregate(list_shards(out / "harvest"), 64, groups, categories, PARAMS, False, feature_range=(60, 65))


def test_document_labels_are_the_documents_table_s_columns(built_cache) -> None:  # noqa: F811
    out, cfg = built_cache
    plan = RunContext(cfg, out).plan  # the same corpus plan the harvest made
    groups, categories = document_labels(plan)
    expected_groups, expected_categories = _labels(out)
    assert groups.tolist() == expected_groups.tolist()
    assert categories.tolist() == expected_categories.tolist()
    assert "" in categories.tolist() and len(set(categories.tolist())) > 2  # blanks and real categories
