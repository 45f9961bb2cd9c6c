"""Compact shards (format 2): lossless round trip of every format-1 array (rows in order, each row's
features as a set), on edge cases; 16-bit values within their recorded error, bfloat16 rounding as
torch's; format-1 shards still load; a cache harvested with and without compression is the same."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from precompute.errors import FeatureGeomError
from precompute.pipeline.run import run_precompute
from precompute.pipeline.shard_codec import CodecParams, decode, encode, smallest_int
from precompute.pipeline.shards import Shard, load_arrays
from tests.precompute.pipeline.test_run import make_cfg


def _shard(rng: np.random.Generator, n_rows: int, d_sae: int, vocab: int, k: int) -> dict[str, np.ndarray]:
    """Format-1 arrays: contexts of random lengths, some split over two documents (packing), gaps in
    positions (skipped tokens), rows with no activation, features in TopK (unsorted) order."""
    lengths = rng.integers(1, 9, size=max(1, n_rows // 4))
    ctx = np.repeat(np.arange(len(lengths)) * 3 + 7, lengths)[:n_rows]
    doc = ctx // 2 + (rng.random(len(ctx)) < 0.1).cumsum() % 2
    pos = np.concatenate([np.sort(rng.choice(200, size=n, replace=False)) for n in lengths])[: len(ctx)]
    nnz = rng.integers(0, k + 1, size=len(ctx))
    nnz[rng.random(len(ctx)) < 0.2] = 0
    feats = [rng.choice(d_sae, size=n, replace=False) for n in nnz]
    indptr = np.zeros(len(ctx) + 1, np.int64)
    np.cumsum(nnz, out=indptr[1:])
    return {
        "context_id": ctx.astype(np.int32),
        "position": pos.astype(np.int32),
        "token_id": rng.integers(0, vocab, size=len(ctx)).astype(np.int32),
        "doc_id": doc.astype(np.int32),
        "indptr": indptr,
        "feature": (np.concatenate(feats) if feats else np.zeros(0)).astype(np.int32),
        "value": rng.gamma(2.0, 3.0, size=int(nnz.sum())).astype(np.float32),
    }


def _row_sets(a: dict[str, np.ndarray]) -> list[dict[int, float]]:
    ip = a["indptr"]
    return [
        dict(zip(a["feature"][s:e].tolist(), a["value"][s:e].tolist(), strict=True))
        for s, e in zip(ip[:-1], ip[1:], strict=True)
    ]


CASES = [(0, 64, 100, 4), (1, 64, 100, 4), (500, 4096, 49152, 32), (300, 1 << 20, 256_000, 80)]


@pytest.mark.parametrize(("n_rows", "d_sae", "vocab", "k"), CASES)
@pytest.mark.parametrize("compression", ["zlib", "none"])
def test_float32_round_trip_is_exact(n_rows: int, d_sae: int, vocab: int, k: int, compression: str) -> None:
    arrays = _shard(np.random.default_rng(n_rows + d_sae), n_rows, d_sae, vocab, k)
    packed, stats = encode(arrays, CodecParams("float32", compression))
    back = decode(packed)
    for name in ("context_id", "position", "token_id", "doc_id", "indptr"):
        assert back[name].dtype == arrays[name].dtype and np.array_equal(back[name], arrays[name]), name
    assert back["feature"].dtype == np.int32 and back["value"].dtype == np.float32
    assert _row_sets(back) == _row_sets(arrays)
    for s, e in zip(back["indptr"][:-1], back["indptr"][1:], strict=True):
        assert np.all(np.diff(back["feature"][s:e]) > 0)  # each row ascending
    assert (stats.max_abs_error, stats.rows, stats.nnz) == (
        0.0,
        len(arrays["context_id"]),
        len(arrays["feature"]),
    )
    rows_only = decode(packed, ("doc_id", "token_id"))
    assert set(rows_only) == {"doc_id", "token_id"} and np.array_equal(rows_only["doc_id"], arrays["doc_id"])


@pytest.mark.parametrize("kind", ["float16", "bfloat16"])
def test_16_bit_values_round_like_torch_and_record_their_error(kind: str) -> None:
    arrays = _shard(np.random.default_rng(3), 400, 4096, 49152, 32)
    packed, stats = encode(arrays, CodecParams(kind, "zlib"))
    back = decode(packed)
    want = torch.from_numpy(arrays["value"]).to(getattr(torch, kind)).float().numpy()
    ours = {(r, f): v for r, row in enumerate(_row_sets(back)) for f, v in row.items()}
    theirs = {(r, f): v for r, row in enumerate(_row_sets({**arrays, "value": want})) for f, v in row.items()}
    assert ours == theirs
    exact = np.array([v for row in _row_sets(arrays) for v in row.values()])
    got = np.array([ours[(r, f)] for r, row in enumerate(_row_sets(arrays)) for f in row])
    assert stats.max_abs_error == pytest.approx(float(np.abs(got - exact).max()), rel=1e-6)
    assert stats.max_rel_error == pytest.approx(float((np.abs(got - exact) / exact).max()), rel=1e-6)
    assert 0 < stats.max_rel_error <= {"float16": 2**-11, "bfloat16": 2**-8}[kind]


def test_float16_refuses_values_it_cannot_hold() -> None:
    arrays = _shard(np.random.default_rng(4), 50, 64, 100, 4)
    arrays["value"][0] = 70000.0
    with pytest.raises(FeatureGeomError, match="exceeds float16's range"):
        encode(arrays, CodecParams("float16"))


def test_smallest_int() -> None:
    assert [
        smallest_int(np.array(x)).name
        for x in ([0, 255], [-1, 127], [0, 256], [-129], [1 << 31], [-1, 1 << 31], [])
    ] == [
        "uint8",
        "int8",
        "uint16",
        "int16",
        "uint32",
        "int64",
        "uint8",
    ]


def test_format_1_shards_still_load(tmp_path: Path) -> None:
    arrays = _shard(np.random.default_rng(5), 200, 512, 1000, 8)
    old = tmp_path / "shard-00000.npz"
    np.savez(old, **arrays)
    loaded = Shard.load(old)
    for name, value in arrays.items():
        assert np.array_equal(getattr(loaded, name), value), name
    assert set(load_arrays(old, ("token_id",))) == {"token_id"}


def test_damaged_shard_is_a_clear_error() -> None:
    arrays = _shard(np.random.default_rng(6), 100, 64, 100, 4)
    packed, _ = encode(arrays, CodecParams("float32", "none"))
    packed["token_id"] = packed["token_id"][:-1]
    with pytest.raises(FeatureGeomError, match="damaged"):
        decode(packed)


def test_cache_is_the_same_with_and_without_compression_and_on_a_rerun(
    tiny_model_dir: Path, tiny_sae_dir: Path, tiny_corpus: dict[str, Path], tmp_path: Path
) -> None:
    """Also the same on a second run in the same process: without MKL_CBWR=STRICT (precompute/__init__.py)
    the forward differed in the last bit between runs here and near-tied top examples flipped."""
    assert os.environ.get("MKL_CBWR") == "AUTO,STRICT"
    caches = {}
    for name, compression in (("zlib", "zlib"), ("none", "none"), ("again", "zlib")):
        out = tmp_path / name
        run_precompute(
            make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, out, shard_compression=compression)
        )
        caches[name] = out
    for table in ("features.parquet", "examples.parquet", "overlaps.parquet", "documents.parquet"):
        for other in ("none", "again"):
            pd.testing.assert_frame_equal(
                pd.read_parquet(caches["zlib"] / table), pd.read_parquet(caches[other] / table)
            )
    sizes = {}
    for compression, out in ((c, caches[c]) for c in ("zlib", "none")):
        params = json.loads((out / "params" / "harvest.json").read_text())
        encoding = params["timings"]["shard_encoding"]
        assert encoding["compression"] == compression and encoding["max_abs_error"] == 0.0
        sizes[compression] = encoding["bytes_per_token"]
    assert sizes["zlib"] < sizes["none"]


def test_corrupt_compressed_bytes_or_header_are_a_clear_error() -> None:
    arrays = _shard(np.random.default_rng(7), 100, 64, 100, 4)
    packed, _ = encode(arrays, CodecParams("float32", "zlib"))
    broken = {**packed, "feature": packed["feature"][::-1].copy()}  # not a zlib stream any more
    with pytest.raises(FeatureGeomError, match="damaged"):
        decode(broken)
    with pytest.raises(FeatureGeomError, match="header is damaged"):
        decode({**packed, "header": packed["header"][:-3]})
