"""Benchmark exact top-k cosine kNN: our blocked backends vs plain faiss and sklearn brute force.

Why each method runs in its own fresh subprocess: peak RSS (``ru_maxrss``) is a per-process
high-water mark, so sharing a process would let one method's peak hide another's. Each worker
reports the peak and the RSS just before the timed call; "peak over baseline" is the memory the
method itself needed (baseline = interpreter + imports + the n x d input).

Usage (opt-in, not part of the tests; a 65k run takes minutes on 2 cores):

    python bench/bench_knn.py --sizes 16384 65536 --d 576 --k 32 --out bench/out/knn.json
    python bench/bench_knn.py --decoder assets/sae/NAME/sae_weights.safetensors --threads 1 --repeat 3

``--decoder`` times a real SAE decoder (SAELens safetensors, key W_dec, or a .npy [n, d]) instead
of random unit rows; ``--margin`` sets our backends' candidates beyond k (`knn_cosine(margin=)`).

After timing, results are checked against our torch backend: indices must be equal, or where
they differ (near-ties), the cosines must agree to 1e-5. A mismatch fails the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ours_torch", "ours_faiss", "faiss_flatip", "sklearn_brute")
REFERENCE = "ours_torch"


def random_unit(n: int, d: int, seed: int) -> np.ndarray:
    """Seeded random unit rows, generated in float32 so no float64 copy inflates the baseline."""
    X = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X


def load_rows(n: int, d: int, seed: int, decoder: str | None) -> np.ndarray:
    """The benchmark's rows: a real decoder's (float32, as stored) or seeded random unit rows."""
    if not decoder:
        return random_unit(n, d, seed)
    if decoder.endswith(".npy"):
        return np.ascontiguousarray(np.load(decoder), dtype=np.float32)
    from safetensors.numpy import load_file

    return np.ascontiguousarray(load_file(decoder)["W_dec"], dtype=np.float32)


def _drop_self(idx: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove self by index from (n, k+1) lists; if self is absent (ties), drop the last column."""
    n, m = idx.shape
    is_self = idx == np.arange(n)[:, None]
    drop = is_self.copy()
    drop[~is_self.any(1), -1] = True
    return idx[~drop].reshape(n, m - 1), val[~drop].reshape(n, m - 1)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): less sensitive than wall time to
    other users of a shared machine, so reported next to it."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(
    method: str,
    n: int,
    d: int,
    k: int,
    seed: int,
    result: str,
    decoder: str | None = None,
    margin: int | None = None,
) -> None:
    """Run one method once in this (fresh) process and write its lists + measurements."""
    # import only what this method needs, before the baseline is taken
    if method.startswith("ours"):
        sys.path.insert(0, str(REPO))
        from precompute.pipeline.knn import knn_cosine
    elif method == "faiss_flatip":
        import faiss
    elif method == "sklearn_brute":
        from sklearn.neighbors import NearestNeighbors
    else:
        raise SystemExit(f"unknown method {method}")
    if method.startswith("ours"):
        import torch

        print(f"torch threads {torch.get_num_threads()}", file=sys.stderr)
    X = load_rows(n, d, seed, decoder)
    n, d = X.shape
    stats: dict[str, int] = {}
    base_rss, base_peak = _rss_mib(), _peak_mib()
    load = os.getloadavg()[0]
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    if method == "ours_torch":
        idx, cos = knn_cosine(X, k, backend="torch", device="cpu", progress=False, stats=stats, margin=margin)
    elif method == "ours_faiss":
        idx, cos = knn_cosine(X, k, backend="faiss", device="cpu", progress=False, stats=stats, margin=margin)
    elif method == "faiss_flatip":
        index = faiss.IndexFlatIP(d)
        index.add(X)
        D, Ix = index.search(X, k + 1)
        idx, cos = _drop_self(Ix, D)
    else:
        nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="cosine").fit(X)
        dist, Ix = nn.kneighbors(X)
        idx, cos = _drop_self(Ix, 1.0 - dist)
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    peak = _peak_mib()
    np.savez(result, indices=idx.astype(np.int32), cosine=cos.astype(np.float32))
    print(
        json.dumps(
            {
                "method": method,
                "n": n,
                "d": d,
                "k": k,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "load_avg_1min_at_start": load,
                "peak_rss_mib": peak,
                "baseline_rss_mib": base_rss,
                "baseline_peak_mib": base_peak,
                "peak_over_baseline_mib": peak - base_rss,
                "knn_stats": stats or None,
            }
        )
    )


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tol: float = 1e-5) -> dict[str, Any]:
    """Indices equal, or (near-ties) cosines at the differing positions equal to ``tol``."""
    ri, rc, gi, gc = ref["indices"], ref["cosine"], got["indices"], got["cosine"]
    if ri.shape != gi.shape:
        return {"ok": False, "reason": f"shape {gi.shape} != {ri.shape}"}
    diff = ri != gi
    cos_err = float(np.abs(rc.astype(np.float64) - gc).max())
    ok = cos_err <= tol and bool(np.all(np.abs(rc[diff] - gc[diff]) <= tol))
    return {
        "ok": ok,
        "index_mismatches": int(diff.sum()),
        "rows_with_mismatch": int(diff.any(1).sum()),
        "max_abs_cos_diff": cos_err,
    }


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load_avg_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16384])
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=0, help="threads per worker (OpenMP/BLAS/torch); 0 = library defaults"
    )
    ap.add_argument("--repeat", type=int, default=1, help="fresh-process runs per method (median reported)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", type=Path, default=Path("bench/out/knn.json"))
    ap.add_argument(
        "--decoder", help="SAELens sae_weights.safetensors (W_dec) or .npy [n, d]; replaces --sizes"
    )
    ap.add_argument("--margin", type=int, help="our backends' candidates beyond k (default: knn.FP32_MARGIN)")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.n, a.d, a.k, a.seed, a.result, a.decoder, a.margin)
        return 0

    methods = [REFERENCE] + [m for m in a.methods if m != REFERENCE]
    if a.decoder:
        a.sizes = [0]  # the worker reads n and d from the file
    rows: list[dict[str, Any]] = []
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.sizes:
            lists: dict[str, dict[str, np.ndarray]] = {}
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
            # repeats are interleaved across methods so a burst of load from other users of a
            # shared machine does not land on one method only
            for rep in range(a.repeat):
                for m in methods:
                    res = os.path.join(tmp, f"{m}_{n}.npz")
                    cmd = [sys.executable, __file__, "--worker", m, "--n", str(n), "--d", str(a.d)]
                    cmd += ["--k", str(a.k), "--seed", str(a.seed), "--result", res]
                    cmd += ["--decoder", a.decoder] if a.decoder else []
                    cmd += ["--margin", str(a.margin)] if a.margin is not None else []
                    env = dict(os.environ)
                    if a.threads:
                        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                            env[var] = str(a.threads)
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
                    runs[m].append(json.loads(out.strip().splitlines()[-1]))
                    if rep == 0:
                        with np.load(res) as z:
                            lists[m] = {"indices": z["indices"], "cosine": z["cosine"]}
                    print(f"n={n} {m} run {rep + 1}: {runs[m][-1]['seconds']:.2f} s", file=sys.stderr)
            for m in methods:
                times = [r["seconds"] for r in runs[m]]
                row = dict(runs[m][0])
                row.update(
                    seconds=float(np.median(times)),
                    seconds_min=min(times),
                    seconds_all=times,
                    cpu_seconds=float(np.median([r["cpu_seconds"] for r in runs[m]])),
                    load_avg_1min_at_start=[r["load_avg_1min_at_start"] for r in runs[m]],
                    peak_rss_mib=max(r["peak_rss_mib"] for r in runs[m]),
                    peak_over_baseline_mib=max(r["peak_over_baseline_mib"] for r in runs[m]),
                )
                row["check_vs_" + REFERENCE] = compare(lists[REFERENCE], lists[m])
                failures += not row["check_vs_" + REFERENCE]["ok"]
                rows.append(row)
                print(f"n={n} {m}: check {row['check_vs_' + REFERENCE]}", file=sys.stderr)
    report = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "args": {
            "sizes": a.sizes,
            "d": a.d,
            "k": a.k,
            "seed": a.seed,
            "repeat": a.repeat,
            "decoder": a.decoder,
            "margin": a.margin,
        },
        "threads": a.threads or "library defaults (torch, faiss/OpenMP and BLAS use every core)",
        "results": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(markdown_table(rows))
    if failures:
        print(f"{failures} method(s) disagree with {REFERENCE}", file=sys.stderr)
        return 1
    return 0


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| n | method | wall (s), median | runs (s) | CPU (s), median | load at start | peak RSS (MiB) "
        "| peak over baseline (MiB) | identical to ours_torch | rows redone over all rows |",
        "|---:|---|---:|---|---:|---|---:|---:|---|---:|",
    ]
    for r in rows:
        c = r["check_vs_" + REFERENCE]
        same = (
            "yes (indices equal)"
            if c["ok"] and c["index_mismatches"] == 0
            else (f"yes ({c['index_mismatches']} near-tie swaps, cos diff <= 1e-5)" if c["ok"] else "NO")
        )
        lines.append(
            f"| {r['n']} | {r['method']} | {r['seconds']:.2f} | {' / '.join(f'{t:.2f}' for t in r['seconds_all'])} "
            f"| {r['cpu_seconds']:.1f} | {' / '.join(f'{x:.1f}' for x in r['load_avg_1min_at_start'])} "
            f"| {r['peak_rss_mib']:.0f} | "
            f"{r['peak_over_baseline_mib']:.0f} | {same} | {(r.get('knn_stats') or {}).get('fallback_rows', '-')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
