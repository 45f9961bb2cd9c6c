"""The cache contract (precompute/schema/): its checker, and that the pipeline and the synthetic
fixture both write exactly it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from bench.synthetic_cache import write_synthetic_cache
from precompute import schema
from precompute.cli import main as cli_main
from precompute.errors import CacheError
from precompute.pipeline.steps import STEPS

READER_ARCHIVES = [name for name, spec in schema.ARCHIVES.items() if not spec.internal]


def full_dtypes(name: str) -> dict[str, str]:
    """Every column of table `name` (families as freq_task) with its contract type."""
    cols = {}
    for c in schema.TABLES[name].columns:
        cols[c.name.replace("<group>", "task")] = c.dtype
    return cols


# ------------------------------------------------------------------------------ the checker
def test_complete_table_passes_and_unknown_columns_are_allowed() -> None:
    for name in schema.TABLES:
        schema.check_table(name, full_dtypes(name) | {"added_later": "float64"})


def test_missing_column_names_it_and_the_step_to_rerun() -> None:
    dtypes = full_dtypes(schema.FEATURES)
    del dtypes["umap_x"], dtypes["harm_score"]
    with pytest.raises(CacheError) as err:
        schema.check_table(schema.FEATURES, dtypes, "CACHE/features.parquet")
    msg = str(err.value)
    assert msg.startswith("CACHE/features.parquet lacks the column(s) umap_x, harm_score")
    assert "geometry and scores steps" in msg and "docs/cache.md" in msg
    assert "`featuregeom geometry`, then `featuregeom scores`" in msg and "--overwrite" in msg


def test_optional_columns_and_families_may_be_absent() -> None:
    dtypes = full_dtypes(schema.FEATURES)
    for c in schema.TABLES[schema.FEATURES].optional:
        del dtypes[c.name]
    del dtypes["freq_task"]
    schema.check_table(schema.FEATURES, dtypes)
    assert {c.name for c in schema.TABLES[schema.FEATURES].optional} == {
        "top_promoted",
        "top_suppressed",
        # added after schema_version 2 (held-out validation): older caches lack them
        "harm_category_source",
        "harm_heldout_auroc",
        "harm_heldout_lo",
        "harm_heldout_set",
        "label_source",  # added with the labels step
        "top_promoted_values",  # added with the logit values
        "top_suppressed_values",
        "auto_explanation",  # only where featuregeom explain ran
        "auto_explanation_model",
        "auto_explanation_detection",
        "auto_explanation_scored",
    }
    docs = full_dtypes(schema.DOCUMENTS)
    del docs["category_source"], docs["validation"]  # a cache harvested before the harm taxonomy
    schema.check_table(schema.DOCUMENTS, docs)


def test_an_archive_may_lack_its_optional_arrays_but_not_hold_them_wrong() -> None:
    arrays = {"counts": ("int64", (3, 4)), "bins": ("int64", ()), "max_activation": ("float32", (3,))}
    schema.check_archive(schema.HISTOGRAMS, arrays)  # harvested before per-group histograms
    full = arrays | {"counts_group": ("int32", (3, 2, 4)), "groups": ("string", (2,))}
    schema.check_archive(schema.HISTOGRAMS, full)
    with pytest.raises(CacheError, match="counts_group is int64 with 2 axes"):
        schema.check_archive(schema.HISTOGRAMS, full | {"counts_group": ("int64", (3, 4))})
    with pytest.raises(CacheError, match="lacks the array"):
        schema.check_archive(schema.HISTOGRAMS, {k: v for k, v in full.items() if k != "bins"})


def test_wrong_type_is_refused_but_null_fits_a_nullable_column() -> None:
    schema.check_table(
        schema.FEATURES, full_dtypes(schema.FEATURES) | {"label": "null", "harm_category": "null"}
    )
    with pytest.raises(CacheError, match="column umap_y is float64, the cache format says float32"):
        schema.check_table(schema.FEATURES, full_dtypes(schema.FEATURES) | {"umap_y": "float64"})
    with pytest.raises(CacheError, match="column freq_general is string"):
        schema.check_table(schema.FEATURES, full_dtypes(schema.FEATURES) | {"freq_general": "string"})
    with pytest.raises(CacheError, match="column is_task is null"):  # not nullable
        schema.check_table(schema.FEATURES, full_dtypes(schema.FEATURES) | {"is_task": "null"})


def test_archive_checker(tmp_path: Path) -> None:
    good = {"indices": np.zeros((3, 2), np.int32), "cosine": np.zeros((3, 2), np.float32)}
    good |= {"z_isotropic": np.zeros((3, 2), np.float32), "null_cosine": np.float64(0.1)}
    good |= {"null_kind": np.array("covariance"), "null_isotropic": np.float64(0.08)}
    good |= {"null_covariance": np.float64(0.1), "null_samples": np.int64(1000)}
    good |= {"nn_cosine_quantiles": np.zeros(99), "fpr": np.float64(1e-3), "d": np.int64(8)}
    np.savez(tmp_path / "nb.npz", **good)
    assert schema.npz_arrays(tmp_path / "nb.npz")["indices"] == ("int32", (3, 2))
    schema.check_npz(tmp_path / "nb.npz", schema.NEIGHBORS)
    np.savez(tmp_path / "nb.npz", **(good | {"indices": np.zeros(3, np.int64)}))
    with pytest.raises(CacheError, match="indices is int64 with 1 axes, the cache format says int32 with 2"):
        schema.check_npz(tmp_path / "nb.npz", schema.NEIGHBORS)
    assert schema.npz_arrays(tmp_path / "nb.npz")["null_kind"] == ("string", ())  # any '<U' width
    np.savez(tmp_path / "nb.npz", **(good | {"null_kind": np.array("isotropic")}))
    schema.check_npz(tmp_path / "nb.npz", schema.NEIGHBORS)
    np.savez(tmp_path / "nb.npz", **{k: v for k, v in good.items() if k != "z_isotropic"})
    with pytest.raises(CacheError, match=r"lacks the array\(s\) z_isotropic \(written by the geometry step"):
        schema.check_npz(tmp_path / "nb.npz", schema.NEIGHBORS)
    (tmp_path / "nb.npz").write_bytes(b"not a zip")
    with pytest.raises(CacheError, match="is not a readable npz file .*rerun the geometry step"):
        schema.check_npz(tmp_path / "nb.npz", schema.NEIGHBORS)


def test_arrow_types_map_to_logical_names() -> None:
    cases = {
        pa.large_string(): "string",
        pa.string(): "string",
        pa.dictionary(pa.int32(), pa.string()): "string",
        pa.list_(pa.float32()): "list<float32>",
        pa.large_list(pa.large_string()): "list<string>",
        pa.float64(): "float64",
        pa.int32(): "int32",
        pa.bool_(): "bool",
        pa.null(): "null",
    }
    for arrow_type, name in cases.items():
        assert schema.arrow_dtype(arrow_type) == name, arrow_type


def test_schema_imports_nothing_heavy() -> None:
    code = (
        "import sys, precompute.schema; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'pandas', 'pyarrow', 'torch'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ writers keep the contract
@pytest.fixture(scope="module")
def pipeline_cache(
    tiny_model_dir: Path, tiny_sae_dir: Path, tiny_corpus: dict[str, Path], tmp_path_factory
) -> Path:
    """A cache built by `featuregeom precompute` on the tiny model, with logit lens."""
    out = tmp_path_factory.mktemp("schema") / "tiny"
    corpus = [
        f"{tiny_corpus['task']}:task",
        f"{tiny_corpus['control']}:control",
        f"{tiny_corpus['harmful']}:harmful:@category",
        f"{tiny_corpus['benign']}:benign",
    ]
    args = ["precompute", "--model", str(tiny_model_dir), "--sae", str(tiny_sae_dir)]
    args += ["--hook", "blocks.1.hook_resid_post", "--out", str(out), "--device", "cpu", "--no-progress"]
    args += ["--context-size", "24", "--batch-size", "4", "--neighbors", "8", "--top-k-examples", "5"]
    args += ["--umap-neighbors", "5", "--outlier-norm-factor", "0"]
    for spec in corpus:
        args += ["--corpus", spec]
    assert cli_main(args) == 0
    return out


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory) -> Path:
    return write_synthetic_cache(tmp_path_factory.mktemp("schema") / "synth", n_features=300, d=16, seed=0)


def contract_types(path: Path, name: str) -> dict[str, str]:
    """Table `name` of a cache as {contract column name: type}: a family counts once, and a nullable
    column stored without values (arrow null) has its contract type."""
    out: dict[str, str] = {}
    for column, dtype in schema.parquet_dtypes(path / name).items():
        spec = schema.TABLES[name].column(column)
        assert spec is not None, f"{name}: column {column} is not in precompute/schema/"
        out[spec.name] = spec.dtype if dtype == schema.NULL and spec.nullable else dtype
    return out


@pytest.mark.parametrize("which", ["pipeline", "synthetic"])
def test_caches_pass_the_schema_check(which: str, request: pytest.FixtureRequest) -> None:
    cache: Path = request.getfixturevalue(f"{which}_cache")
    for name in schema.TABLES:
        schema.check_parquet(cache / name, name)
    for name in READER_ARCHIVES:
        schema.check_npz(cache / name, name)
    if which == "pipeline":  # the harvest files travel with a real cache only
        schema.check_npz(cache / schema.CONTEXTS, schema.CONTEXTS)
        for shard in sorted((cache / schema.HARVEST_DIR).glob("shard-*.npz")):
            schema.check_npz(shard, schema.SHARDS)


def test_synthetic_cache_matches_the_pipeline(pipeline_cache: Path, synthetic_cache: Path) -> None:
    """Same columns (families counted once), same types, same arrays: the explorer's fixture is a cache
    the pipeline could have written."""
    for name in schema.TABLES:
        real, synth = contract_types(pipeline_cache, name), contract_types(synthetic_cache, name)
        assert synth == real, name
        # every column the precompute job writes, no extra (`featuregeom explain` adds its own later)
        assert set(real) == {c.name for c in schema.TABLES[name].columns if c.step in STEPS}, name
    for name in READER_ARCHIVES:
        real_arrays = {k: (d, len(s)) for k, (d, s) in schema.npz_arrays(pipeline_cache / name).items()}
        synth_arrays = {k: (d, len(s)) for k, (d, s) in schema.npz_arrays(synthetic_cache / name).items()}
        assert synth_arrays == real_arrays, name
        assert set(real_arrays) == {a.name for a in schema.ARCHIVES[name].arrays}, name
