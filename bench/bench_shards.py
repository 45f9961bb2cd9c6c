"""Harvest shard size and codec cost on a real cache's shards (default: the demo cache).

    python bench/bench_shards.py [--cache cache/demo] [--repeats 3]

For each encoding (format 1 as it was: the arrays themselves in an uncompressed npz; format 2 with
float32 values, zlib or none; float16; bfloat16) over every shard of the cache: bytes per token
(the npz file as written), encode and decode time per 1,000 tokens (median of --repeats), and the
largest error of the stored values. The rows are the same in every case (`Shard.load`).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from precompute.pipeline.shard_codec import CodecParams, decode, encode
from precompute.pipeline.shards import list_shards, load_arrays


def _npz_bytes(arrays: dict[str, np.ndarray]) -> int:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.tell()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default="cache/demo")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    shards = [load_arrays(p) for p in list_shards(Path(args.cache) / "harvest")]
    if not shards:
        raise SystemExit(f"{args.cache} has no harvest shards")
    tokens = sum(len(s["context_id"]) for s in shards)
    nnz = sum(len(s["feature"]) for s in shards)
    print(f"{args.cache}: {len(shards)} shards, {tokens:,} tokens, L0 {nnz / tokens:.1f}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| encoding | bytes/token | encode ms/1k tok | decode ms/1k tok | max abs error | max rel error |")
    print("|---|---:|---:|---:|---:|---:|")
    size = sum(_npz_bytes(s) for s in shards)
    print(f"| format 1 (int32/int64/float32 arrays) | {size / tokens:.1f} | — | — | 0 | 0 |")
    for values, compression in (
        ("float32", "zlib"),
        ("float32", "none"),
        ("float16", "zlib"),
        ("bfloat16", "zlib"),
    ):
        params = CodecParams(values, compression)
        enc_t, dec_t, size, abs_err, rel_err = [], [], 0, 0.0, 0.0
        for r in range(args.repeats):
            t_enc = t_dec = 0.0
            for s in shards:
                t = time.perf_counter()
                packed, stats = encode(s, params)
                t_enc += time.perf_counter() - t
                t = time.perf_counter()
                decode(packed)
                t_dec += time.perf_counter() - t
                if r == 0:
                    size += _npz_bytes(packed)
                    abs_err, rel_err = max(abs_err, stats.max_abs_error), max(rel_err, stats.max_rel_error)
            enc_t.append(t_enc)
            dec_t.append(t_dec)
        per_k = 1000 / tokens * 1000
        print(
            f"| format 2, {values}, {compression} | {size / tokens:.1f} | {statistics.median(enc_t) * per_k:.2f} | "
            f"{statistics.median(dec_t) * per_k:.2f} | {abs_err:.3g} | {rel_err:.3g} |"
        )


if __name__ == "__main__":
    main()
