"""The aggregation split by feature range over processes (what the ranks of a torchrun harvest do) against
one process aggregating every feature, side by side, on a cache's real shards.

    python bench/bench_rank_aggregate.py --cache cache/demo --ranks 1 2
    python bench/bench_rank_aggregate.py --cache bench/out/rss-1000000 --ranks 1 2 --repeats 2

For each ``--ranks`` R: R fresh processes (spawned, one thread each), rank r aggregating
``feature_ranges(n, R)[r]`` over every shard and saving its part as the ranks do
(`precompute.pipeline.rank_aggregate`: an uncompressed state in a folder; there rank 0 keeps its own
in memory, here every part goes through a file); then this process loads the parts and joins them. Timed: the wall time from the start of the processes to the joined result (the
ranks' share of a harvest's wall time), each rank's CPU seconds, and the join. R = 1 is the baseline:
one process, every feature, plus the same save and load. The joined result is checked equal to R = 1's,
array for array. The aggregation's options are the cache's own (params/harvest.json); the feature count
is the highest feature id in the shards + 1 unless ``--features`` says it. Results go to ``--out`` as
JSON and a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _params(cache: Path) -> Any:
    """The AggregateParams the cache's harvest used (its recorded options, through the harvest's own mapping)."""
    from precompute.pipeline.config import RunConfig
    from precompute.pipeline.harvest import aggregate_params

    recorded = json.loads((cache / "params" / "harvest.json").read_text())["params"]
    shaping = ("top_k_examples", "quantile_bins", "per_bin", "hist_bins", "seed", "top_k_per_group")
    shaping += ("per_bin_group", "top_k_per_category", "category_top_groups")
    return aggregate_params(RunConfig.load(None, {k: recorded[k] for k in shaping if k in recorded}))


def _labels(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    docs = pd.read_parquet(cache / "documents.parquet", columns=["group", "category"])
    return docs["group"].to_numpy(), docs["category"].fillna("").to_numpy()


def _rank(cache: str, n: int, lo: int, hi: int, folder: str, rank: int) -> dict[str, float]:
    """One rank: its feature range over every shard, saved as `rank_aggregate` saves it."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    from precompute.pipeline.aggregate import aggregate
    from precompute.pipeline.checkpoint import aggregate_state, save_state
    from precompute.pipeline.shards import list_shards

    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    groups, categories = _labels(Path(cache))
    params = _params(Path(cache))
    t0 = time.perf_counter()
    part = aggregate(list_shards(Path(cache) / "harvest"), n, groups, categories, params, False, (lo, hi))
    t1 = time.perf_counter()
    save_state(Path(folder) / f"part-{rank}", aggregate_state(part), "bench", compress=False)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime
    return {"aggregate_s": t1 - t0, "save_s": time.perf_counter() - t1, "cpu_s": cpu}


def run(cache: Path, n: int, ranks: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from precompute.pipeline.aggregate import feature_ranges, join_feature_ranges
    from precompute.pipeline.checkpoint import aggregate_from_state, load_state

    with tempfile.TemporaryDirectory(prefix="fg-rank-aggregate-") as folder:
        jobs = [(str(cache), n, lo, hi, folder, r) for r, (lo, hi) in enumerate(feature_ranges(n, ranks))]
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(ranks) as pool:
            per_rank = pool.starmap(_rank, jobs)
        t1 = time.perf_counter()
        states = [load_state(Path(folder) / f"part-{r}", "bench") for r in range(ranks)]
        joined = join_feature_ranges([aggregate_from_state(s) for s in states if s is not None])
        t2 = time.perf_counter()
    row = {
        "ranks": ranks,
        "wall_s": t2 - t0,
        "ranks_wall_s": t1 - t0,
        "join_s": t2 - t1,
        "rank_aggregate_s": [r["aggregate_s"] for r in per_rank],
        "rank_cpu_s": [r["cpu_s"] for r in per_rank],
        "load_1min": os.getloadavg()[0],
    }
    return row, joined


def _equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return set(a) == set(b) and all(
        np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=str(ROOT / "cache/demo"), help="a cache that keeps its harvest shards")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--features", type=int, help="the SAE's width (default: the highest id in the shards + 1)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each rank count, alternating the order")
    p.add_argument("--out", default=str(ROOT / "bench/out/rank_aggregate.json"))
    args = p.parse_args()
    cache = Path(args.cache)
    from precompute.pipeline.shards import list_shards, load_arrays

    shards = list_shards(cache / "harvest")
    n = args.features or 1 + max(int(load_arrays(s, ("feature",))["feature"].max(initial=-1)) for s in shards)
    rows: list[dict[str, Any]] = []
    reference: dict[str, Any] | None = None
    for repeat in range(args.repeats):
        order = args.ranks if repeat % 2 == 0 else list(reversed(args.ranks))
        for ranks in order:
            row, joined = run(cache, n, ranks)
            if ranks == 1:
                reference = reference or joined
            row["repeat"] = repeat
            rows.append(row)
            print(json.dumps(row), flush=True)
            if reference is not None:
                assert _equal(joined, reference), f"{ranks} ranks joined differ from one process"
    meta = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cache": str(cache),
        "shards": len(shards),
        "features": n,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    base = min(r["wall_s"] for r in rows if r["ranks"] == 1) if any(r["ranks"] == 1 for r in rows) else None
    print(
        "| ranks | wall (s) | of which the ranks (s) | join (s) | per-rank aggregate (s) | per-rank CPU (s) | x1 |"
    )
    print("|---:|---:|---:|---:|---|---|---:|")
    for r in rows:
        ratio = f"{base / r['wall_s']:.2f}" if base else "-"
        print(
            f"| {r['ranks']} | {r['wall_s']:.1f} | {r['ranks_wall_s']:.1f} | {r['join_s']:.1f} | "
            f"{', '.join(f'{x:.1f}' for x in r['rank_aggregate_s'])} | "
            f"{', '.join(f'{x:.1f}' for x in r['rank_cpu_s'])} | {ratio} |"
        )


if __name__ == "__main__":
    main()
