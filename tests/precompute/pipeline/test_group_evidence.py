"""Per-group evidence on a real tiny cache: each feature's top contexts within each corpus group
(`group_top` examples) and its activation histogram split by group, against a brute-force scan of the
model + SAE run one context at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from precompute.pipeline.shards import Shard, list_shards
from tests.precompute.pipeline.test_run import brute_force_activations, built_cache  # noqa: F401
from tests.ranking import assert_ranking_equivalent


def _token_groups(cache: Path) -> dict[int, np.ndarray]:
    """context id -> the corpus group of each of its tokens' documents."""
    docs = pd.read_parquet(cache / "documents.parquet").set_index("doc_id")
    with np.load(cache / "harvest" / "contexts.npz") as z:
        offsets, doc_ids = z["offsets"], z["doc_ids"]
    group = docs["group"].to_dict()
    return {
        c: np.array([group[int(d)] for d in doc_ids[offsets[c] : offsets[c + 1]]], dtype=object)
        for c in range(len(offsets) - 1)
    }


@pytest.fixture(scope="module")
def dense(built_cache, tiny_model_dir, tiny_sae_dir):  # noqa: F811
    out, _ = built_cache
    return brute_force_activations(tiny_model_dir, tiny_sae_dir, out)


def test_group_top_examples_equal_a_brute_force_per_group_scan(built_cache, dense) -> None:  # noqa: F811
    out, cfg = built_cache
    k = cfg.top_k_per_group
    assert k == 5  # the default: the test must exercise it
    groups_of = _token_groups(out)
    examples = pd.read_parquet(out / "examples.parquet")
    group_top = examples[examples.kind == "group_top"]
    groups = sorted({g for gs in groups_of.values() for g in gs})
    assert set(group_top["group"]) == set(groups) == {"task", "control", "harmful", "benign"}
    n_ctx = len(dense)
    checked = 0
    for f in range(64):
        for g in groups:
            # a context's score for group g: the feature's max over the tokens of g's documents only
            score = np.array(
                [float(np.max(np.where(groups_of[c] == g, dense[c][:, f], 0.0))) for c in range(n_ctx)]
            )
            got = group_top[(group_top.feature == f) & (group_top.group == g)].sort_values("rank")
            assert got["rank"].tolist() == list(range(len(got)))
            assert_ranking_equivalent(
                got.context_id.tolist(), score, k, eligible=score > 0, what=f"feature {f}, group {g}"
            )
            for _, row in got.iterrows():
                c, pos = int(row.context_id), int(row.max_position)
                assert groups_of[c][pos] == g  # the peak shown lies on a document of that group
                assert row.max_activation == pytest.approx(score[c], rel=1e-5, abs=1e-5)
                np.testing.assert_allclose(row.activations, dense[c][:, f], rtol=1e-5, atol=1e-5)
                checked += 1
            if not (score > 0).any():
                assert got.empty  # never fires on the group: no example is invented
    assert checked > 100


def test_group_histograms_split_the_histogram_exactly(built_cache, dense) -> None:  # noqa: F811
    out, _ = built_cache
    with np.load(out / "histograms.npz") as z:
        counts, by_group, groups, bins = z["counts"], z["counts_group"], z["groups"].tolist(), int(z["bins"])
        mx = z["max_activation"]
    assert groups == ["benign", "control", "harmful", "task"] and by_group.shape == (64, 4, bins)
    np.testing.assert_array_equal(by_group.sum(axis=1), counts)
    # binning, written out plainly over the harvested values (dense per token)
    docs = pd.read_parquet(out / "documents.parquet").set_index("doc_id")["group"]
    expect = np.zeros_like(by_group)
    for path in list_shards(out / "harvest"):
        shard = Shard.load(path)
        m = shard.matrix(64).toarray()
        row_group = np.array([groups.index(docs[int(d)]) for d in shard.doc_id])
        for f in range(64):
            for r in np.flatnonzero(m[:, f] > 0):
                b = min(int(m[r, f] / mx[f] * bins), bins - 1)
                expect[f, row_group[r], b] += 1
    np.testing.assert_array_equal(by_group, expect)
    # and the firing counts per group equal the independent model + SAE scan
    groups_of = _token_groups(out)
    for gi, g in enumerate(groups):
        fires = sum((dense[c][groups_of[c] == g] > 0).sum(axis=0) for c in range(len(dense)))
        np.testing.assert_array_equal(by_group[:, gi].sum(axis=1), fires)


def test_no_group_examples_when_the_options_are_zero(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path):
    from precompute.pipeline.run import run_precompute
    from tests.precompute.pipeline.test_run import make_cfg

    out = tmp_path / "c"
    run_precompute(make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, out, top_k_per_group=0), ("harvest",))
    examples = pd.read_parquet(out / "examples.parquet")
    # the options are independent
    assert set(examples["kind"]) == {"top", "quantile", "group_quantile", "category_top"}
    run_precompute(  # the tiny corpus's task documents have no category: no category tops
        make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, out, category_top_groups="task", overwrite=True),
        ("harvest",),
    )
    assert "category_top" not in set(pd.read_parquet(out / "examples.parquet")["kind"])
    run_precompute(
        make_cfg(
            tiny_model_dir,
            tiny_sae_dir,
            tiny_corpus,
            out,
            top_k_per_group=0,
            per_bin_group=0,
            top_k_per_category=0,
            overwrite=True,
        ),
        ("harvest",),
    )
    examples = pd.read_parquet(out / "examples.parquet")
    assert set(examples["kind"]) == {"top", "quantile"}


def test_group_quantile_samples_equal_a_brute_force_draw(built_cache) -> None:  # noqa: F811
    """Per (feature, group, activation interval): the `per_bin_group` contexts with the smallest stable
    keys among those whose max on the group's tokens falls in the interval, leaving out the group's
    top contexts, ranked in interval order - recomputed from the shards, one context at a time."""
    from precompute.pipeline.aggregate import _stable_key

    out, cfg = built_cache
    k, qb = cfg.per_bin_group, cfg.quantile_bins
    assert k == 1  # the default: the test must exercise it
    docs = pd.read_parquet(out / "documents.parquet").set_index("doc_id")["group"]
    score: dict[
        tuple[int, str, int], np.float32
    ] = {}  # (feature, group, context) -> max on the group's tokens
    act_max = np.zeros(64, np.float32)
    for path in list_shards(out / "harvest"):
        shard = Shard.load(path)
        m = shard.matrix(64).toarray().astype(np.float32)
        act_max = np.maximum(act_max, m.max(axis=0))
        for r in range(shard.n_rows):
            g, c = docs[int(shard.doc_id[r])], int(shard.context_id[r])
            for f in np.flatnonzero(m[r] > 0):
                key = (int(f), g, c)
                score[key] = max(score.get(key, np.float32(0)), m[r, f])
    examples = pd.read_parquet(out / "examples.parquet")
    got_all = examples[examples.kind == "group_quantile"]
    gtop = examples[examples.kind == "group_top"]
    checked = 0
    for f in range(64):
        for g in ["benign", "control", "harmful", "task"]:
            cells: dict[int, list[tuple[int, int]]] = {}
            for (ff, gg, c), v in score.items():
                if ff == f and gg == g:
                    b = min(int(v / act_max[f] * qb), qb - 1)
                    cells.setdefault(b, []).append(
                        (int(_stable_key(cfg.seed, np.array([f]), np.array([c]))[0]), c)
                    )
            top = set(gtop[(gtop.feature == f) & (gtop.group == g)].context_id)
            want = [(b / qb, c) for b in range(qb) for _, c in sorted(cells.get(b, []))[:k] if c not in top]
            got = got_all[(got_all.feature == f) & (got_all.group == g)].sort_values("rank")
            assert got["rank"].tolist() == list(range(len(got)))
            assert list(zip(got["quantile"], got["context_id"], strict=True)) == want, (f, g)
            assert got["max_activation"].tolist() == pytest.approx([float(score[(f, g, c)]) for _, c in want])
            checked += len(want)
    assert checked > 50


def test_category_top_examples_equal_a_brute_force_per_category_scan(built_cache, dense) -> None:  # noqa: F811
    out, cfg = built_cache
    k = cfg.top_k_per_category
    assert k == 3  # the default: the test must exercise it
    docs = pd.read_parquet(out / "documents.parquet").set_index("doc_id")
    with np.load(out / "harvest" / "contexts.npz") as z:
        offsets, doc_ids = z["offsets"], z["doc_ids"]
    cat_of = docs["category"].fillna("")  # no category: none ranked within (the group top is theirs)
    key_of = {d: (g, c) for d, g, c in zip(docs.index, docs["group"], cat_of, strict=True)}
    keys_of = {  # context id -> (group, category) of each token's document
        c: [key_of[int(d)] for d in doc_ids[offsets[c] : offsets[c + 1]]] for c in range(len(offsets) - 1)
    }
    assert cfg.category_top_groups == "harmful"  # the default
    cats = sorted({(g, c) for g, c in key_of.values() if c and g == "harmful"})
    assert len(cats) >= 2  # the tiny corpus has two harm categories to rank within
    examples = pd.read_parquet(out / "examples.parquet")
    got_all = examples[examples.kind == "category_top"]
    assert set(zip(got_all["group"], got_all["category"], strict=True)) <= set(cats)
    checked = 0
    for f in range(64):
        for g, cat in cats:
            on = {c: np.array([kc == (g, cat) for kc in keys_of[c]]) for c in range(len(dense))}
            score = np.array([float(np.max(np.where(on[c], dense[c][:, f], 0.0))) for c in range(len(dense))])
            got = got_all[(got_all.feature == f) & (got_all.group == g) & (got_all.category == cat)]
            got = got.sort_values("rank")
            assert got["rank"].tolist() == list(range(len(got)))
            assert_ranking_equivalent(
                got.context_id.tolist(), score, k, eligible=score > 0, what=f"feature {f}, {g} · {cat}"
            )
            for _, row in got.iterrows():
                c, pos = int(row.context_id), int(row.max_position)
                assert keys_of[c][pos] == (g, cat)  # the peak shown lies on a document of that category
                assert row.max_activation == pytest.approx(score[c], rel=1e-5, abs=1e-5)
                np.testing.assert_allclose(row.activations, dense[c][:, f], rtol=1e-5, atol=1e-5)
                checked += 1
    assert checked > 100


def test_a_misspelt_category_group_is_refused_before_the_harvest(
    tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path
):
    from precompute.errors import ConfigError
    from precompute.pipeline.run import run_precompute
    from tests.precompute.pipeline.test_run import make_cfg

    out = tmp_path / "c"
    cfg = make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, out, category_top_groups="harmful, harmfull")
    with pytest.raises(ConfigError, match="unknown group.*'harmfull'.*comma-separated"):
        run_precompute(cfg, ("harvest",))
    assert not out.exists()  # nothing written, nothing harvested
    ok = make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, out, category_top_groups=" harmful ,control")
    assert ok.category_groups() == ("harmful", "control")
