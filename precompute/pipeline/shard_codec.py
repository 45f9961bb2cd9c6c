"""Compact harvest shards (format 2): the same rows and activations in about half the bytes, losslessly.

Why: format 1 stored four int32 per token (context, position, token, document), an int64 row pointer
and int32 feature ids: 263-280 bytes per token at L0 32, ~26 GB per 100M tokens. Format 2 stores

- (context, document) once per run of rows that share them, not per token;
- positions as the step from the previous row of the run (almost always 1);
- each row's features in ascending order as gaps from the previous feature of the row (the first one
  absolute), its values in the same order (a row is a set: aggregation never reads the order);
- every integer array in the smallest type that holds its values, then byte-shuffled (all first
  bytes, then all second bytes, ...: the high bytes of small numbers are runs of zeros) and zlib'd;
- values as float32 (lossless, also shuffled and zlib'd), or float16 / bfloat16 when asked for
  (`--shard-values`), with the largest error of the stored values recorded in params/harvest.json.

`decode` returns exactly the format-1 arrays (rows in their order; within a row, features ascending),
so every reader goes through `Shard.load` and nothing else changes. Format-1 shards still load.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from precompute.errors import FeatureGeomError

FORMAT = 2
VALUE_TYPES = ("float32", "float16", "bfloat16")
COMPRESSIONS = ("zlib", "none")
ZLIB_LEVEL = 1  # level 1: ~1/3 of level 6's time for a few % more bytes; the harvest must not wait on it
HEADER = "header"
ROW_ARRAYS = ("context_id", "position", "token_id", "doc_id")
FLOAT16_MAX = float(np.finfo(np.float16).max)
_INT_TYPES = tuple(np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64"))


@dataclass(frozen=True)
class CodecParams:
    values: str = "float32"
    compression: str = "zlib"


@dataclass
class CodecStats:
    """What encoding cost: bytes written and the largest error of the stored values."""

    bytes: int = 0
    rows: int = 0
    nnz: int = 0
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0

    def add(self, other: CodecStats) -> None:
        self.bytes += other.bytes
        self.rows += other.rows
        self.nnz += other.nnz
        self.max_abs_error = max(self.max_abs_error, other.max_abs_error)
        self.max_rel_error = max(self.max_rel_error, other.max_rel_error)


def smallest_int(a: np.ndarray) -> np.dtype:
    """The narrowest integer type holding every value of `a`."""
    if a.size == 0:
        return np.dtype("uint8")
    lo, hi = int(a.min()), int(a.max())
    return next(t for t in _INT_TYPES if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max)


def _shuffle(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.view(np.uint8).reshape(-1, a.dtype.itemsize).T).reshape(-1)


def _unshuffle(raw: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(raw.reshape(dtype.itemsize, -1).T).reshape(-1).view(dtype)


def pack(a: np.ndarray, compression: str) -> tuple[np.ndarray, dict[str, Any]]:
    """One array as bytes (uint8) plus what `unpack` needs."""
    dtype = a.dtype if a.dtype.kind == "f" else smallest_int(a)
    data = _shuffle(a.astype(dtype, copy=False))
    if compression == "zlib":
        data = np.frombuffer(zlib.compress(data.tobytes(), ZLIB_LEVEL), dtype=np.uint8)
    return data, {"dtype": dtype.str, "length": int(a.size)}


def unpack(blob: np.ndarray, desc: dict[str, Any], compression: str) -> np.ndarray:
    dtype = np.dtype(desc["dtype"])
    try:
        raw = (
            np.frombuffer(zlib.decompress(blob.tobytes()), dtype=np.uint8) if compression == "zlib" else blob
        )
    except zlib.error as exc:
        raise FeatureGeomError(f"a harvest shard is damaged ({exc}); rerun the harvest") from exc
    if raw.size != desc["length"] * dtype.itemsize:
        raise FeatureGeomError(
            "a harvest shard is damaged (an array has the wrong length); rerun the harvest"
        )
    return _unshuffle(raw, dtype)


def _to_bfloat16_bits(v: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even, as torch does."""
    u = v.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _from_bfloat16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def _encode_values(value: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(array to store, the float32 values a reader will get back)."""
    if kind == "float32":
        return value.astype(np.float32), value.astype(np.float32)
    if kind == "float16":
        if value.size and float(np.abs(value).max()) > FLOAT16_MAX:
            raise FeatureGeomError(
                f"an activation of {float(np.abs(value).max()):.4g} exceeds float16's range ({FLOAT16_MAX:g}); "
                "harvest with --shard-values bfloat16 or float32"
            )
        stored = value.astype(np.float16)
        return stored, stored.astype(np.float32)
    bits = _to_bfloat16_bits(value)
    return bits, _from_bfloat16_bits(bits)


def _runs(context_id: np.ndarray, doc_id: np.ndarray) -> np.ndarray:
    """True where a row starts a new (context, document) run."""
    start = np.ones(len(context_id), dtype=bool)
    start[1:] = (context_id[1:] != context_id[:-1]) | (doc_id[1:] != doc_id[:-1])
    return start


def _gaps(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """values[i] - values[i-1], except values[i] itself where first[i]."""
    out = values.astype(np.int64)
    later = np.flatnonzero(~first)
    out[later] = values[later].astype(np.int64) - values[later - 1].astype(np.int64)
    return out


def _ungap(gaps: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Inverse of `_gaps`: a running sum restarted at every `first` (first[0] is always set)."""
    total = np.cumsum(gaps, dtype=np.int64)
    run = np.cumsum(first) - 1
    return total - (total - gaps)[np.flatnonzero(first)][run]


def encode(arrays: dict[str, np.ndarray], params: CodecParams) -> tuple[dict[str, np.ndarray], CodecStats]:
    """Format-1 arrays (context_id, position, token_id, doc_id, indptr, feature, value) -> format-2 npz arrays."""
    if params.values not in VALUE_TYPES or params.compression not in COMPRESSIONS:
        raise FeatureGeomError(f"unknown shard encoding {params}")
    ctx, doc = arrays["context_id"], arrays["doc_id"]
    indptr, feature, value = arrays["indptr"], arrays["feature"], arrays["value"]
    n_rows, nnz = len(ctx), len(feature)
    starts = _runs(ctx, doc)
    run_rows = np.diff(np.append(np.flatnonzero(starts), n_rows))
    row_nnz = np.diff(indptr)
    row = np.repeat(np.arange(n_rows, dtype=np.int64), row_nnz)
    order = np.lexsort((feature, row))  # each row's features ascending
    feat_sorted = feature[order]
    first_in_row = np.zeros(nnz, dtype=bool)
    first_in_row[indptr[:-1][row_nnz > 0]] = True
    stored, readback = _encode_values(value[order], params.values)
    logical = {
        "run_context": ctx[starts],
        "run_doc": doc[starts],
        "run_rows": run_rows,
        "position": _gaps(arrays["position"], starts),
        "token_id": arrays["token_id"],
        "row_nnz": row_nnz,
        "feature": _gaps(feat_sorted, first_in_row),
        "value": stored,
    }
    out: dict[str, np.ndarray] = {}
    header: dict[str, Any] = {"format": FORMAT, "rows": n_rows, "nnz": nnz, **params.__dict__, "arrays": {}}
    for name, a in logical.items():
        out[name], header["arrays"][name] = pack(np.asarray(a), params.compression)
    out[HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    stats = CodecStats(bytes=sum(a.nbytes for a in out.values()), rows=n_rows, nnz=nnz)
    if nnz:
        exact = value[order].astype(np.float32)
        err = np.abs(readback - exact)
        stats.max_abs_error = float(err.max())
        stats.max_rel_error = float((err / np.maximum(np.abs(exact), np.finfo(np.float32).tiny)).max())
    return out, stats


def is_compact(names: set[str] | list[str]) -> bool:
    return HEADER in names


def read_header(blob: np.ndarray) -> dict[str, Any]:
    try:
        header = json.loads(blob.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeatureGeomError(f"a harvest shard's header is damaged ({exc}); rerun the harvest") from exc
    if header.get("format") != FORMAT:
        raise FeatureGeomError(
            f"a harvest shard has format {header.get('format')}, this version reads {FORMAT}; rerun the harvest"
        )
    return header


def decode(z: Any, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Format-2 npz (`z[name]` works) -> format-1 arrays; `names` limits it to some of them (the row
    arrays alone do not decompress the activations)."""
    header = read_header(z[HEADER])
    comp, desc = header["compression"], header["arrays"]
    want = set(names or (*ROW_ARRAYS, "indptr", "feature", "value"))

    def get(name: str) -> np.ndarray:
        return unpack(z[name], desc[name], comp)

    out: dict[str, np.ndarray] = {}
    n_rows = header["rows"]
    if want & {"context_id", "doc_id", "position"}:
        run_rows = get("run_rows").astype(np.int64)
        starts = np.zeros(n_rows, dtype=bool)
        starts[np.cumsum(run_rows)[:-1]] = True
        if n_rows:
            starts[0] = True
        out["context_id"] = np.repeat(get("run_context"), run_rows).astype(np.int32)
        out["doc_id"] = np.repeat(get("run_doc"), run_rows).astype(np.int32)
        out["position"] = _ungap(get("position").astype(np.int64), starts).astype(np.int32)
    if "token_id" in want:
        out["token_id"] = get("token_id").astype(np.int32)
    if want & {"indptr", "feature", "value"}:
        row_nnz = get("row_nnz").astype(np.int64)
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(row_nnz, out=indptr[1:])
        first = np.zeros(header["nnz"], dtype=bool)
        first[indptr[:-1][row_nnz > 0]] = True
        out["indptr"] = indptr
        out["feature"] = _ungap(get("feature").astype(np.int64), first).astype(np.int32)
        stored = get("value")
        out["value"] = (
            _from_bfloat16_bits(stored) if header["values"] == "bfloat16" else stored.astype(np.float32)
        )
    return {k: v for k, v in out.items() if k in want}
