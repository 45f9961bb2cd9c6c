"""Tests for precompute.pipeline.overlaps: token co-firing vs a dense brute force, flagged pairs vs a
brute-force scan of the neighbour lists (percentile among all features' nearest-neighbour cosines,
excess over the null), risk values, ordering and the empty table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from precompute.pipeline.overlaps import OVERLAP_COLUMNS, coactivation, find_overlaps
from precompute.pipeline.shards import shard_name

CACHE_COLUMNS = [
    "task_feature",
    "harmful_feature",
    "cosine",
    "cosine_percentile",
    "cosine_excess",
    "z_isotropic",
    "null_cosine",
    "coactivation",
    "cond_coactivation",
    "harm_score",
    "task_score",
    "harm_category",
    "neighbor_rank",
    "risk",
]


def write_dense_shard(path: Path, dense: np.ndarray, doc_ids: np.ndarray) -> None:
    """A shard in harvest's format from a dense [tokens, features] activation matrix."""
    rows, feats = np.nonzero(dense)
    indptr = np.zeros(dense.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=indptr[1:])
    n = dense.shape[0]
    np.savez(
        path,
        context_id=np.asarray(doc_ids, np.int32),
        position=np.arange(n, dtype=np.int32),
        token_id=np.zeros(n, np.int32),
        doc_id=np.asarray(doc_ids, np.int32),
        indptr=indptr,
        feature=feats.astype(np.int32),
        value=dense[rows, feats].astype(np.float32),
    )


def random_shards(tmp_path: Path, n_features: int, seed: int = 0) -> tuple[list[Path], np.ndarray]:
    rng = np.random.default_rng(seed)
    paths, blocks = [], []
    for i, n_tok in enumerate([30, 0, 45, 17]):  # includes an empty shard
        density = rng.uniform(0.0, 0.5, n_features)
        dense = np.where(
            rng.random((n_tok, n_features)) < density, rng.uniform(0.1, 4, (n_tok, n_features)), 0.0
        )
        dense = dense.astype(np.float32)
        dense[:, 0] = 0.0  # feature 0 never fires
        p = tmp_path / shard_name(i)
        write_dense_shard(p, dense, np.arange(n_tok) // 5)
        paths.append(p)
        blocks.append(dense)
    return paths, np.concatenate(blocks) > 0


# ---------------------------------------------------------------------------------- coactivation


def test_coactivation_matches_dense_brute_force(tmp_path: Path) -> None:
    n = 25
    paths, fires = random_shards(tmp_path, n)
    rng = np.random.default_rng(1)
    pairs = rng.integers(0, n, (60, 2))
    pairs[:3] = [[0, 5], [5, 0], [7, 7]]  # never-firing task / harmful side, same feature on both sides
    pairs[3] = pairs[4]  # duplicate pair
    co = coactivation(paths, pairs, n)
    for i, (t, h) in enumerate(pairs):
        both = int((fires[:, t] & fires[:, h]).sum())
        nt, nh = int(fires[:, t].sum()), int(fires[:, h].sum())
        assert co["both"][i] == both and co["task_fires"][i] == nt and co["harm_fires"][i] == nh
        union = int((fires[:, t] | fires[:, h]).sum())
        assert co["jaccard"][i] == pytest.approx(both / union if union else 0.0)
        if nt:
            assert co["cond"][i] == pytest.approx(both / nt)
        else:
            assert np.isnan(co["cond"][i])
    assert co["jaccard"][2] == 1.0 and co["cond"][2] == 1.0  # a feature with itself
    assert np.isnan(co["cond"][0]) and co["jaccard"][0] == 0.0


def test_coactivation_no_pairs(tmp_path: Path) -> None:
    paths, _ = random_shards(tmp_path, 5)
    co = coactivation(paths, np.zeros((0, 2), np.int64), 5)
    assert all(len(v) == 0 for v in co.values())


# ---------------------------------------------------------------------------------- find_overlaps


def random_geometry(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    indices = np.zeros((n, k), np.int32)
    for i in range(n):
        others = np.delete(np.arange(n), i)
        indices[i] = rng.choice(others, k, replace=False)
    cosine = -np.sort(-rng.uniform(-0.2, 0.9, (n, k)), axis=1).astype(np.float32)
    z = (cosine / 0.05).astype(np.float32)
    task_score = np.round(rng.uniform(0.3, 1.0, n), 2)  # rounded: ties in task_score and risk
    harm_score = np.round(rng.uniform(0.3, 1.0, n), 2)
    features = pd.DataFrame(
        {
            "feature": np.arange(n, dtype=np.int64),
            "task_score": task_score,
            "is_task": rng.random(n) < 0.4,
            "harm_score": harm_score,
            "is_harmful": rng.random(n) < 0.4,
            "harm_category": pd.Series(
                [["weapons", "fraud"][i % 2] if i % 3 else None for i in range(n)], dtype=object
            ),
        }
    )
    return features, indices, cosine, z


def brute_force(
    features: pd.DataFrame,
    indices,
    cosine,
    z,
    null: float,
    fires: np.ndarray | None,
    n_task: int,
    min_cosine: float | None = None,
) -> pd.DataFrame:
    f = features.set_index("feature").sort_index()
    tasks = sorted(
        (fi for fi in f.index if f.loc[fi, "is_task"]), key=lambda fi: (-f.loc[fi, "task_score"], fi)
    )
    thr = null if min_cosine is None else max(null, min_cosine)
    rows = []
    for t in tasks[:n_task]:
        for r in range(indices.shape[1]):
            h = int(indices[t, r])
            c = float(cosine[t, r])
            if h == t or not f.loc[h, "is_harmful"] or not c > thr:
                continue
            if fires is not None:
                both = (fires[:, t] & fires[:, h]).sum()
                union = (fires[:, t] | fires[:, h]).sum()
                jac = both / union if union else 0.0
                cond = both / fires[:, t].sum() if fires[:, t].sum() else np.nan
            else:
                jac = cond = np.nan
            hs, ts = f.loc[h, "harm_score"], f.loc[t, "task_score"]
            risk = (
                min(max((c - null) / (1 - null), 0), 1)
                * min(max(2 * hs - 1, 0), 1)
                * min(max(2 * ts - 1, 0), 1)
            )
            nearest = [float(cosine[i, 0]) for i in range(indices.shape[0])]  # every feature's best
            rows.append(
                {
                    "task_feature": t,
                    "harmful_feature": h,
                    "cosine": c,
                    "cosine_percentile": 100.0 * sum(v <= c for v in nearest) / len(nearest),
                    "cosine_excess": c - null,
                    "z_isotropic": float(z[t, r]),
                    "null_cosine": null,
                    "coactivation": jac,
                    "cond_coactivation": cond,
                    "harm_score": hs,
                    "task_score": ts,
                    "harm_category": f.loc[h, "harm_category"],
                    "neighbor_rank": r,
                    "risk": risk,
                }
            )
    out = pd.DataFrame(rows, columns=CACHE_COLUMNS)
    out = out.sort_values(
        ["risk", "task_feature", "harmful_feature"], ascending=[False, True, True], kind="mergesort"
    ).reset_index(drop=True)
    seen: set[frozenset[int]] = set()  # each unordered pair once: its best row (first after the sort)
    keep = []
    for t, h in zip(out["task_feature"], out["harmful_feature"], strict=True):
        keep.append(frozenset((int(t), int(h))) not in seen)
        seen.add(frozenset((int(t), int(h))))
    return out[keep].reset_index(drop=True)


def assert_same(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(got.columns) == CACHE_COLUMNS
    assert len(got) == len(expected) > 0
    assert (
        got[["task_feature", "harmful_feature", "neighbor_rank"]].to_numpy().tolist()
        == expected[["task_feature", "harmful_feature", "neighbor_rank"]].to_numpy().tolist()
    )
    for c in (
        "cosine",
        "cosine_percentile",
        "cosine_excess",
        "z_isotropic",
        "null_cosine",
        "coactivation",
        "cond_coactivation",
        "harm_score",
        "task_score",
        "risk",
    ):
        np.testing.assert_allclose(
            got[c].to_numpy(float), expected[c].to_numpy(float), rtol=1e-12, atol=1e-12, err_msg=c
        )
    assert got["harm_category"].tolist() == [None if pd.isna(c) else c for c in expected["harm_category"]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_find_overlaps_matches_brute_force(tmp_path: Path, seed: int) -> None:
    n, k = 30, 8
    paths, fires = random_shards(tmp_path, n, seed)
    features, indices, cosine, z = random_geometry(n, k, seed)
    # Rows in a different order than feature ids, as a parquet round trip may leave them.
    shuffled = features.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    got = find_overlaps(shuffled, indices, cosine, z, 0.3, paths, n_task=6)
    assert_same(got, brute_force(features, indices, cosine, z, 0.3, fires, n_task=6))
    assert (got["risk"].diff().dropna() <= 0).all()
    assert got.dtypes.astype(str).to_dict() == OVERLAP_COLUMNS
    # min_cosine only raises the bar; risk stays relative to the null.
    got = find_overlaps(features, indices, cosine, z, 0.3, paths, n_task=6, min_cosine=0.5)
    assert_same(got, brute_force(features, indices, cosine, z, 0.3, fires, n_task=6, min_cosine=0.5))
    assert (got["cosine"] > 0.5).all()


def test_find_overlaps_planted_pair_and_self_exclusion(tmp_path: Path) -> None:
    n = 6
    fires = np.zeros((20, n), np.float32)
    fires[:10, 1] = 1.0  # task feature 1 fires on tokens 0-9
    fires[5:15, 2] = 2.0  # harmful feature 2 on 5-14: both on 5 tokens, union 15
    write_dense_shard(tmp_path / shard_name(0), fires, np.zeros(20))
    features = pd.DataFrame(
        {
            "feature": np.arange(n),
            "task_score": [0.5, 0.9, 0.5, 0.5, 0.5, 0.5],
            "is_task": [False, True, False, False, False, False],
            "harm_score": [0.5, 0.95, 0.8, 0.9, 0.9, 0.5],
            "is_harmful": [False, True, True, True, True, False],
            "harm_category": [None, "x", "weapons", "fraud", "fraud", None],
        }
    )
    indices = np.array([[1, 2, 3, 4, 5]] * n, np.int32)
    indices[1] = [1, 2, 3, 4, 5]  # a self entry (should not happen) is excluded
    cosine = np.array([[0.9, 0.6, 0.3, 0.1, -0.1]] * n, np.float32)
    z = cosine * 10
    out = find_overlaps(features, indices, cosine, z, 0.2, [tmp_path / shard_name(0)])
    assert out["harmful_feature"].tolist() == [2, 3]  # 4 is below the null, 1 is itself
    row = out.iloc[0]
    assert row["task_feature"] == 1 and row["neighbor_rank"] == 1 and row["harm_category"] == "weapons"
    assert row["coactivation"] == pytest.approx(5 / 15) and row["cond_coactivation"] == pytest.approx(0.5)
    expected_risk = (np.float32(0.6) - 0.2) / 0.8 * (2 * 0.8 - 1) * (2 * 0.9 - 1)
    assert row["risk"] == pytest.approx(expected_risk)
    # every feature's nearest neighbour sits at 0.9: a pair at 0.6 is above the null, yet closer than
    # no feature's nearest neighbour (percentile 0); at 0.3 likewise
    assert out["cosine_percentile"].tolist() == [0.0, 0.0]
    assert out["cosine_excess"].to_numpy() == pytest.approx([np.float32(0.6) - 0.2, np.float32(0.3) - 0.2])
    cosine[0, 0] = 0.5  # now one feature's nearest neighbour (0.5) is below the pair at 0.6
    assert find_overlaps(features, indices, cosine, z, 0.2, [])["cosine_percentile"].tolist() == [
        100.0 / n,
        0.0,
    ]
    # Without shards, co-activation is unknown rather than zero.
    no_shards = find_overlaps(features, indices, cosine, z, 0.2, [])
    assert no_shards["coactivation"].isna().all() and no_shards["cond_coactivation"].isna().all()
    assert no_shards["risk"].tolist() == out["risk"].tolist()


def test_find_overlaps_lists_a_bidirectional_pair_once() -> None:
    """Features 0 and 1 are both task and harmful and each other's nearest neighbour: (0, 1) and (1, 0)
    both qualify; only the higher-risk one (task 1: the higher task score) is kept."""
    features = pd.DataFrame(
        {
            "feature": np.arange(3),
            "task_score": [0.8, 0.9, 0.5],
            "is_task": [True, True, False],
            "harm_score": [0.9, 0.7, 0.5],
            "is_harmful": [True, True, False],
            "harm_category": ["x", "y", None],
        }
    )
    indices = np.array([[1, 2], [0, 2], [0, 1]], np.int32)
    cosine = np.array([[0.6, 0.1], [0.6, 0.1], [0.1, 0.1]], np.float32)
    out = find_overlaps(features, indices, cosine, cosine * 10, 0.2, [])
    risk = lambda hs, ts: (np.float32(0.6) - 0.2) / 0.8 * (2 * hs - 1) * (2 * ts - 1)  # noqa: E731
    assert risk(0.9, 0.9) > risk(0.7, 0.8)  # task 1 / harmful 0 beats task 0 / harmful 1
    assert out[["task_feature", "harmful_feature"]].to_numpy().tolist() == [[1, 0]]
    assert out["risk"].tolist() == pytest.approx([risk(0.9, 0.9)])
    # with both directions at equal risk, the smaller task feature id is kept
    features["harm_score"] = [0.9, 0.9, 0.5]
    features["task_score"] = [0.9, 0.9, 0.5]
    out = find_overlaps(features, indices, cosine, cosine * 10, 0.2, [])
    assert out[["task_feature", "harmful_feature"]].to_numpy().tolist() == [[0, 1]]


def test_find_overlaps_empty_result_has_schema(tmp_path: Path) -> None:
    paths, _ = random_shards(tmp_path, 10)
    features, indices, cosine, z = random_geometry(10, 4, 0)
    for feats, null in [
        (features.assign(is_harmful=False), 0.3),
        (features, 0.99),
        (features.assign(is_task=False), 0.3),
    ]:
        out = find_overlaps(feats, indices, cosine, z, null, paths)
        assert out.empty and list(out.columns) == CACHE_COLUMNS
        assert out.dtypes.astype(str).to_dict() == OVERLAP_COLUMNS
    out = find_overlaps(features, indices, cosine, z, 0.3, paths, n_task=0)
    assert out.empty and list(out.columns) == CACHE_COLUMNS


def test_find_overlaps_reads_parquet_round_trip(tmp_path: Path) -> None:
    paths, fires = random_shards(tmp_path, 20, 5)
    features, indices, cosine, z = random_geometry(20, 5, 5)
    features.to_parquet(tmp_path / "features.parquet", index=False)
    back = pd.read_parquet(tmp_path / "features.parquet")
    got = find_overlaps(back, indices, cosine, z, 0.25, paths, n_task=8)
    assert_same(got, brute_force(features, indices, cosine, z, 0.25, fires, n_task=8))
    got.to_parquet(tmp_path / "overlaps.parquet", index=False)
    assert list(pd.read_parquet(tmp_path / "overlaps.parquet").columns) == CACHE_COLUMNS
