"""The cache reader: loading, per-feature lookups, search and clear errors for bad caches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.synthetic_cache import write_synthetic_cache
from explorer.data import ExampleStore, find_caches, load_cache, reviews_path_for
from explorer.data.search import build_index
from precompute.cache import SCHEMA_VERSION, verify_cache
from precompute.errors import CacheError


def test_synthetic_cache_is_schema_complete(synth_cache: Path) -> None:
    m = verify_cache(synth_cache)  # every checksum
    assert m["schema_version"] == SCHEMA_VERSION and m["n_features"] == 600
    for name in (
        "features.parquet",
        "neighbors.npz",
        "examples.parquet",
        "histograms.npz",
        "category_rates.parquet",
        "documents.parquet",
        "overlaps.parquet",
        "params/geometry.json",
    ):
        assert name in m["files"]
    cols = set(pq.read_schema(synth_cache / "features.parquet").names)
    assert {
        "feature",
        "umap_x",
        "umap_y",
        "frequency",
        "freq_task",
        "freq_harmful",
        "max_activation",
        "mean_activation",
        "dead",
        "harm_score",
        "harm_score_lo",
        "harm_category",
        "is_harmful",
        "task_score",
        "task_score_lo",
        "task_score_hi",
        "is_task",
        "is_control",
        "task_vs_benign",
        "task_vs_benign_lo",
        "top_promoted",
        "top_suppressed",
        "label",
        "explanation",
    } <= cols
    ex = set(pq.read_schema(synth_cache / "examples.parquet").names)
    assert {
        "feature",
        "rank",
        "kind",
        "group",
        "category",
        "doc_id",
        "context_id",
        "tokens",
        "activations",
        "max_activation",
        "max_position",
        "quantile",
    } <= ex
    ov = set(pq.read_schema(synth_cache / "overlaps.parquet").names)
    assert {
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
    } <= ov


def test_load_and_lookups(synth_cache: Path) -> None:
    c = load_cache(synth_cache)
    assert c.n == 600 and c.groups == ["task", "control", "harmful", "benign", "general"]
    t, h = c.default_pair()
    assert c.features.at[t, "is_task"] and c.features.at[h, "is_harmful"]
    nb = c.neighbours_of(t)
    assert len(nb) == 32 and (np.diff(nb["cosine"].to_numpy()) <= 1e-6).all()
    assert h in set(nb["feature"]) and t not in set(nb["feature"])
    assert (c.neighbours_of(t, threshold=0.99)["cosine"] >= 0.99).all()
    ex = c.examples_of(t)
    assert ex and ex[0]["kind"] == "top" and ex[0]["rank"] == 0
    assert len(ex[0]["tokens"]) == len(ex[0]["activations"])
    row = c.row(t)
    assert isinstance(row["top_promoted"], list) and row["top_promoted"]
    assert set(c.group_rates(t)) == set(c.groups)
    edges, counts = c.histogram(t)
    assert len(edges) == len(counts) + 1
    assert not c.category_rates_of(t).empty
    assert c.pair(t, h)["cosine"] > c.null_cosine
    # the nulls: named, and a neighbour's percentile is its rank among all nearest-neighbour cosines
    assert c.null_label == "covariance null" and c.neighbors.null_isotropic < c.null_cosine
    nearest = c.neighbors.cosine[:, 0].astype(np.float64)
    for cos, pct in zip(nb["cosine"], nb["percentile"], strict=True):
        assert pct == 100.0 * np.sum(nearest <= cos) / len(nearest)
    row = c.overlaps.iloc[0]
    assert row["cosine_percentile"] == c.neighbors.percentile(row["cosine"])


def test_dead_feature_has_no_examples(synth_cache: Path) -> None:
    c = load_cache(synth_cache)
    dead = np.flatnonzero(c.features["dead"].to_numpy())
    assert len(dead) and c.examples_of(int(dead[0])) == []


def test_lazy_example_store_matches_in_memory(synth_cache: Path) -> None:
    path = synth_cache / "examples.parquet"
    lazy = ExampleStore(path, force_lazy=True, cache_groups=2)
    eager = ExampleStore(path, force_lazy=False)
    assert lazy.lazy and not eager.lazy
    for f in (0, 1, 299, 599):
        assert lazy.for_feature(f) == eager.for_feature(f)
    cols = ["feature", "kind", "rank", "tokens", "activations"]
    il, ie = build_index(lazy.scan(cols)), build_index(eager.scan(cols))  # the search's example index
    assert il.text.equals(ie.text) and len(il.feature) > 0
    for name in ("feature", "rank", "nz_row", "nz_start", "nz_end", "nz_val"):
        assert np.array_equal(getattr(il, name), getattr(ie, name)), name


def test_unsorted_examples_still_work(tmp_path: Path, synth_cache: Path) -> None:
    t = pq.read_table(synth_cache / "examples.parquet")
    shuffled = t.take(np.random.default_rng(0).permutation(t.num_rows))
    pq.write_table(shuffled, tmp_path / "ex.parquet", row_group_size=500)
    s = ExampleStore(tmp_path / "ex.parquet")
    ref = ExampleStore(synth_cache / "examples.parquet")
    key = lambda r: (r["kind"], r["group"], r["rank"])  # noqa: E731 - group_top ranks restart per group
    assert sorted(s.for_feature(5), key=key) == sorted(ref.for_feature(5), key=key)


def test_search(synth_cache: Path) -> None:
    c = load_cache(synth_cache)
    assert c.search("#17")["feature"].iloc[0] == 17
    assert c.search("17")["feature"].iloc[0] == 17
    hits = c.search("planted")
    assert len(hits) and hits["label"].str.contains("planted").all()
    tok = c.search("ransomware")  # a logit-lens / example token of the cybercrime theme
    assert len(tok)
    ex_only = c.search(" detonator", examples=True)
    assert len(ex_only) and set(ex_only["match"]) <= {"label", "logit lens / explanation", "examples"}
    assert c.search("no-such-text-anywhere-xyz").empty
    assert c.search("   ").empty


@pytest.mark.parametrize(
    "damage", ["missing", "schema", "tampered", "no_manifest", "bad_json", "missing_column"]
)
def test_bad_caches_raise_cache_error(damage: str, cache_copy: Path, tmp_path: Path) -> None:
    target = cache_copy
    if damage == "missing":
        target = tmp_path / "nope"
    elif damage == "schema":
        m = json.loads((cache_copy / "manifest.json").read_text())
        m["schema_version"] = SCHEMA_VERSION - 1  # a cache from the previous contract
        (cache_copy / "manifest.json").write_text(json.dumps(m))
    elif damage == "tampered":
        with open(cache_copy / "neighbors.npz", "r+b") as fh:
            fh.seek(100)
            fh.write(b"\x00\x01\x02")
    elif damage == "no_manifest":
        (cache_copy / "manifest.json").unlink()
    elif damage == "bad_json":
        (cache_copy / "manifest.json").write_text("{not json")
    elif damage == "missing_column":  # valid checksums, but a column the explorer needs is gone
        from precompute.cache import stage

        with stage(cache_copy) as st:
            t = pq.read_table(cache_copy / "features.parquet").drop_columns(["umap_x"])
            pq.write_table(t, st.path("features.parquet"))
            st.commit()
    with pytest.raises(CacheError) as err:
        load_cache(target)
    msg = str(err.value)
    assert len(msg) > 30 and "Traceback" not in msg
    if damage == "missing_column":
        assert "umap_x" in msg


def test_optional_file_missing_a_column_is_named_on_open(cache_copy: Path) -> None:
    """A present optional file must be complete: the message names the column and the step to rerun."""
    from precompute.cache import stage

    with stage(cache_copy) as st:
        t = pq.read_table(cache_copy / "documents.parquet").drop_columns(["source_path"])
        pq.write_table(t, st.path("documents.parquet"))
        st.commit()
    with pytest.raises(
        CacheError, match=r"documents.parquet lacks the column\(s\) source_path .*harvest step"
    ):
        load_cache(cache_copy)


def test_find_caches_and_reviews_path(tmp_path: Path, synth_cache: Path) -> None:
    shutil.copytree(synth_cache, tmp_path / "root" / "before")
    shutil.copytree(synth_cache, tmp_path / "root" / "after")
    (tmp_path / "root" / "notes").mkdir()
    assert [p.name for p in find_caches(tmp_path / "root")] == ["after", "before"]
    rp = reviews_path_for(tmp_path / "root" / "after")
    assert rp == tmp_path / "root" / "after.reviews.sqlite"  # beside, not inside, the cache
    assert reviews_path_for(tmp_path, "/x/y.sqlite") == Path("/x/y.sqlite")


def test_large_cache_uses_lazy_examples(tmp_path: Path) -> None:
    p = write_synthetic_cache(tmp_path / "big", n_features=3000, d=16, seed=3, row_group_size=256)
    import explorer.data.examples as D

    old = D.LAZY_EXAMPLES_BYTES
    D.LAZY_EXAMPLES_BYTES = 0
    try:
        c = load_cache(p)
    finally:
        D.LAZY_EXAMPLES_BYTES = old
    assert c.examples.lazy
    t, _ = c.default_pair()
    assert c.examples_of(t)[0]["feature"] == t
