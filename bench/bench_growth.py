"""How the CPU cost grows with the input: harvest and aggregation against tokens, exact kNN against features.

    python bench/bench_growth.py                      # everything, defaults below (~30-40 min on 2 cores)
    python bench/bench_growth.py --tokens 20000 40000 --features 4096 8192   # a quick check
    python bench/bench_growth.py --skip-knn           # harvest + aggregate only

Three measurements, each size in its own fresh subprocess (peak RSS, ``ru_maxrss``, is a per-process
high-water mark, so sharing a process would let one size's peak hide another's):

1. Harvest at each of ``--tokens``: the harvest step exactly as ``bench/bench_harvest.py --rss`` runs it
   (`rss_child`: packaged SmolLM2-135M-Instruct, default TopK SAE, hook at block 1 so a million tokens fit
   the time, batches of 32 x 128, the insecure/secure code corpus). The step includes loading the model,
   planning the corpus, the forward passes and shards, the aggregation and the example tables. Recorded:
   wall and CPU seconds (user + sys), the bytes of the harvest shards on disk (and per token), peak RSS,
   and the step's own split (forward to the hook, SAE encode) from the cache's params/harvest.json.
2. Aggregation alone (`precompute.pipeline.aggregate.aggregate`) over each harvest's shards, with the
   parameters that harvest recorded: wall and CPU seconds, peak RSS.
3. Exact kNN (`bench/bench_knn.py`'s worker, the project's default CPU backend) on seeded random unit
   directions of dimension ``--d`` at each of ``--features``: wall and CPU seconds, peak RSS.

For each series the exponent p of cost ~ size^p is the least-squares slope of log(cost) on log(size),
reported next to the expected one (1 for the harvest and the aggregation, 2 for the exact kNN). Fixed
costs (loading the model, imports) pull a fitted slope below its asymptote at small sizes.

Every child runs at ``--threads`` threads (default 1: OMP/MKL/OpenBLAS and torch), so that the CPU
seconds of different sizes are comparable and a shared machine's other jobs do not change the thread
count mid-series. CPU seconds are the steadier column on a shared machine; wall times move with the load,
which is recorded (1-minute load average) before and after each run. Results go to ``--out`` as JSON and
a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def fit_exponent(sizes: Sequence[float], costs: Sequence[float]) -> dict[str, float]:
    """Least-squares fit of log(cost) = log(c) + p log(size): the exponent p, the prefactor c and the
    largest relative residual of the fit. Needs at least two distinct positive sizes."""
    s, c = np.asarray(sizes, np.float64), np.asarray(costs, np.float64)
    if len(s) != len(c) or len(set(s.tolist())) < 2 or not (np.all(s > 0) and np.all(c > 0)):
        raise ValueError("an exponent needs at least two distinct positive sizes with positive costs")
    x, y = np.log(s), np.log(c)
    p, logc = np.polyfit(x, y, 1)
    resid = y - (logc + p * x)
    return {
        "exponent": float(p),
        "prefactor": float(math.exp(logc)),
        "max_rel_residual": float(np.expm1(np.abs(resid)).max()),
    }


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _harvest_dir(work: Path, tokens: int) -> Path:
    return work / f"harvest-{tokens}"


def child_harvest(tokens: int, sae: str, out: Path) -> dict[str, Any]:
    """One harvest (bench_harvest's --rss run), measured from inside this fresh process."""
    from bench.bench_harvest import rss_child
    from precompute.pipeline.shards import list_shards
    from precompute.schema import HARVEST_DIR

    load0 = os.getloadavg()[0]
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rss_child(tokens, sae, str(out))
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    shards = list_shards(out / HARVEST_DIR)
    shard_bytes = sum(p.stat().st_size for p in shards)
    timings = json.loads((out / "params" / "harvest.json").read_text()).get("timings", {})
    counted = int(timings.get("total_tokens") or timings.get("tokens") or 0)
    return {
        "max_tokens": tokens,
        "tokens": int(timings.get("tokens") or counted),
        "counted_tokens": counted,
        "wall_s": wall,
        "cpu_s": cpu,
        "forward_to_hook_s": timings.get("model_s"),
        "sae_encode_s": timings.get("sae_s"),
        "peak_rss_mib": _peak_mib(),
        "shards": len(shards),
        "shard_bytes": shard_bytes,
        # per counted token, i.e. per shard row (special tokens are not stored), as bench_shards reports
        "bytes_per_token": shard_bytes / max(1, counted),
        "load_1min_start": load0,
        "load_1min_end": os.getloadavg()[0],
        "bench_harvest_rss_child": json.loads(printed.getvalue().strip().splitlines()[-1]),
    }


def child_aggregate(out: Path) -> dict[str, Any]:
    """`aggregate` alone over a harvest's shards, with the parameters that harvest recorded."""
    import pandas as pd

    from precompute.pipeline.aggregate import AggregateParams, aggregate
    from precompute.pipeline.shards import list_shards
    from precompute.schema import HARVEST_DIR

    params = json.loads((out / "params" / "harvest.json").read_text())["params"]
    docs = pd.read_parquet(out / "documents.parquet", columns=["group", "category"])
    ap = AggregateParams(
        top_k=params["top_k_examples"],
        quantile_bins=params["quantile_bins"],
        per_bin=params["per_bin"],
        hist_bins=params["hist_bins"],
        seed=params["seed"],
        top_k_group=params["top_k_per_group"],
        per_bin_group=params["per_bin_group"],
        top_k_category=params["top_k_per_category"],
        # as RunConfig.category_groups reads the option (comma-separated group names)
        category_groups=tuple(g.strip() for g in params["category_top_groups"].split(",") if g.strip()),
    )
    shards = list_shards(out / HARVEST_DIR)
    n_features = _n_features(out)
    load0 = os.getloadavg()[0]
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    agg = aggregate(
        shards,
        n_features,
        docs["group"].to_numpy(),
        docs["category"].fillna("").to_numpy(),
        ap,
        progress=False,
    )
    return {
        "tokens": int(agg["total_tokens"]),
        "wall_s": time.perf_counter() - t0,
        "cpu_s": _cpu_seconds() - cpu0,
        "peak_rss_mib": _peak_mib(),
        "shards": len(shards),
        "n_features": n_features,
        "load_1min_start": load0,
        "load_1min_end": os.getloadavg()[0],
    }


def _n_features(out: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.read_metadata(out / "features.parquet").num_rows)


def _run_child(args: list[str], threads: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for var in THREAD_VARS:
        env[var] = str(threads)
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def knn_run(n: int, d: int, k: int, seed: int, threads: int) -> dict[str, Any]:
    """bench_knn's worker for the default CPU backend, in a fresh process; the lists are discarded
    (bench_knn and tests/precompute/pipeline/test_knn.py check them)."""
    from precompute.pipeline.knn import DEFAULT_CPU_BACKEND

    with tempfile.TemporaryDirectory() as tmp:
        row = _run_child(
            [
                str(ROOT / "bench/bench_knn.py"),
                "--worker",
                f"ours_{DEFAULT_CPU_BACKEND}",
                "--n",
                str(n),
                "--d",
                str(d),
            ]
            + ["--k", str(k), "--seed", str(seed), "--result", str(Path(tmp) / "lists.npz")],
            threads,
        )
    load_end = os.getloadavg()[0]
    return {
        "n": n,
        "backend": DEFAULT_CPU_BACKEND,
        "wall_s": row["seconds"],
        "cpu_s": row["cpu_seconds"],
        "peak_rss_mib": row["peak_rss_mib"],
        "peak_over_baseline_mib": row["peak_over_baseline_mib"],
        "load_1min_start": row["load_avg_1min_at_start"],
        "load_1min_end": load_end,
    }


# (name, rows, size key, cost, expected exponent, why that exponent)
SERIES: tuple[tuple[str, str, str, str, float, str], ...] = (
    ("harvest", "harvest", "tokens", "cpu_s", 1.0, "linear"),
    ("harvest", "harvest", "tokens", "wall_s", 1.0, "linear"),
    ("harvest: forward + SAE only", "harvest", "tokens", "forward_sae_s", 1.0, "linear, no fixed cost"),
    ("harvest: shard bytes", "harvest", "counted_tokens", "shard_bytes", 1.0, "linear"),
    ("harvest: peak RSS", "harvest", "tokens", "peak_rss_mib", 0.0, "flat: one shard in memory"),
    ("aggregate", "aggregate", "tokens", "cpu_s", 1.0, "linear"),
    ("aggregate", "aggregate", "tokens", "wall_s", 1.0, "linear"),
    ("kNN (exact)", "knn", "n", "cpu_s", 2.0, "quadratic: every pair"),
    ("kNN (exact)", "knn", "n", "wall_s", 2.0, "quadratic: every pair"),
)


def exponents(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The fitted exponent of every series that has at least two distinct sizes."""
    out = []
    for name, rows_key, size, cost, expected, why in SERIES:
        rows = report.get(rows_key) or []
        if len({r[size] for r in rows}) < 2:
            continue
        values = [
            r["forward_to_hook_s"] + r["sae_encode_s"] if cost == "forward_sae_s" else r[cost] for r in rows
        ]
        fit = fit_exponent([r[size] for r in rows], values)
        out.append({"series": name, "size": size, "cost": cost, "expected": expected, "why": why, **fit})
    return out


def machine() -> dict[str, Any]:
    model = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def markdown(report: dict[str, Any]) -> str:
    lines = []
    h, a, kn = report.get("harvest", []), report.get("aggregate", []), report.get("knn", [])
    if h:
        lines += [
            "| tokens | harvest wall (s) | harvest CPU (s) | forward to hook (s) | SAE encode (s) | shard bytes "
            "| bytes/token | peak RSS (MiB) | aggregate wall (s) | aggregate CPU (s) | aggregate peak RSS (MiB) | load |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in h:
            g = next((x for x in a if x["max_tokens"] == r["max_tokens"]), None)
            agg = f"{g['wall_s']:.1f} | {g['cpu_s']:.1f} | {g['peak_rss_mib']:,.0f}" if g else "- | - | -"
            lines.append(
                f"| {r['tokens']:,} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['forward_to_hook_s'] or 0:.1f} "
                f"| {r['sae_encode_s'] or 0:.1f} | {r['shard_bytes']:,} | {r['bytes_per_token']:.1f} "
                f"| {r['peak_rss_mib']:,.0f} | {agg} | {r['load_1min_start']:.1f}-{r['load_1min_end']:.1f} |"
            )
    if kn:
        lines += [
            "",
            "| features | kNN wall (s) | kNN CPU (s) | peak RSS (MiB) | over baseline (MiB) | load |",
        ]
        lines += ["|---:|---:|---:|---:|---:|---|"]
        for r in kn:
            lines.append(
                f"| {r['n']:,} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:,.0f} "
                f"| {r['peak_over_baseline_mib']:,.0f} | {r['load_1min_start']:.1f}-{r['load_1min_end']:.1f} |"
            )
    lines += ["", "| series | cost | size | expected exponent | fitted exponent | largest residual |"]
    lines += ["|---|---|---|---:|---:|---:|"]
    for e in report["exponents"]:
        lines.append(
            f"| {e['series']} | {e['cost']} | {e['size']} | {e['expected']:.0f} ({e['why']}) "
            f"| **{e['exponent']:.2f}** | {e['max_rel_residual']:.0%} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench_growth.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[100_000, 300_000, 1_000_000],
        help="harvest sizes, in tokens",
    )
    ap.add_argument(
        "--features", type=int, nargs="+", default=[16_384, 65_536, 262_144], help="kNN sizes, in directions"
    )
    ap.add_argument("--d", type=int, default=576, help="kNN dimension (576: SmolLM2-135M's residual width)")
    ap.add_argument("--k", type=int, default=32, help="kNN neighbours per direction")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kNN directions")
    ap.add_argument("--threads", type=int, default=1, help="threads of every child (OMP/MKL/OpenBLAS, torch)")
    ap.add_argument(
        "--sae", default=None, help="SAE of the harvest (default: bench_harvest's, the packaged one)"
    )
    ap.add_argument(
        "--work", type=Path, default=ROOT / "bench/out/growth", help="where the harvest caches go"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/growth.json", help="the JSON report")
    ap.add_argument("--skip-harvest", action="store_true", help="no harvest and no aggregation")
    ap.add_argument("--skip-knn", action="store_true", help="no kNN")
    ap.add_argument(
        "--refit",
        type=Path,
        metavar="JSON",
        help="measure nothing: refit and reprint a saved report into --out",
    )
    ap.add_argument("--child", choices=("harvest", "aggregate"), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if any(n <= 0 for n in [*a.tokens, *a.features]) or a.threads < 1:
        ap.error("--tokens, --features and --threads must be positive")
    if a.refit and not a.refit.is_file():
        ap.error(f"--refit: no such report {a.refit}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    sae = a.sae
    if a.refit:
        return write_report(json.loads(a.refit.read_text()), a.out)
    if a.child:
        if sae is None:
            from bench.bench_harvest import DEFAULT_SAE

            sae = str(DEFAULT_SAE)
        run = child_harvest(a.n, sae, _harvest_dir(a.work, a.n)) if a.child == "harvest" else None
        print(json.dumps(run if run is not None else child_aggregate(_harvest_dir(a.work, a.n))))
        return 0
    report: dict[str, Any] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "threads": a.threads,
        "args": {"tokens": a.tokens, "features": a.features, "d": a.d, "k": a.k, "seed": a.seed},
        "harvest": [],
        "aggregate": [],
        "knn": [],
        "exponents": [],
    }
    me = [str(Path(__file__).resolve()), "--work", str(a.work)] + (["--sae", sae] if sae else [])
    if not a.skip_harvest:
        for n in a.tokens:
            report["harvest"].append(_run_child([*me, "--child", "harvest", "--n", str(n)], a.threads))
            print(f"harvest {n}: {report['harvest'][-1]}", file=sys.stderr, flush=True)
            row = _run_child([*me, "--child", "aggregate", "--n", str(n)], a.threads)
            report["aggregate"].append({"max_tokens": n, **row})
            print(f"aggregate {n}: {row}", file=sys.stderr, flush=True)
    if not a.skip_knn:
        for n in a.features:
            report["knn"].append(knn_run(n, a.d, a.k, a.seed, a.threads))
            print(f"knn {n}: {report['knn'][-1]}", file=sys.stderr, flush=True)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return write_report(report, a.out)


def write_report(report: dict[str, Any], out: Path) -> int:
    report["exponents"] = exponents(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
