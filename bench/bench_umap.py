"""Benchmark UMAP from our exact kNN graph vs umap-learn's own approximate kNN (NN-descent).

Question answered: does feeding UMAP the exact neighbour lists (``precomputed_knn``) cost time
or buy faithfulness compared with letting umap-learn search neighbours itself? Both runs use the
same directions, n_neighbors, min_dist and seed, and are scored by neighbourhood preservation
against the exact cosine kNN (the lists the explorer shows).

numba compilation (~45-60 s per process in umap-learn/pynndescent) is excluded: both code paths
are warmed up first on a small input in this process. A fixed seed makes umap-learn run
single-threaded; that is the configuration the pipeline uses, so it is what is timed.

    python bench/bench_umap.py --n 16384 --d 576 --out bench/out/umap.json
    python bench/bench_umap.py --sae-npy decoder.npy     # [n_features, d] decoder rows
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.pipeline.knn import knn_cosine, unit_rows
from precompute.pipeline.layout import _rescale_unit_box, neighbourhood_preservation, umap_layout


def cpu_seconds() -> float:
    """Process CPU time (user + system, all threads): robust to other users of a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_directions(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    """'random': isotropic unit rows (no structure: the hardest case for any map).
    'clustered': unit rows around n/64 random centres (some neighbourhood structure)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        X = rng.standard_normal((n, d), dtype=np.float32)
    elif kind == "clustered":
        centres = rng.standard_normal((max(2, n // 64), d), dtype=np.float32)
        X = centres[rng.integers(0, centres.shape[0], n)] + 0.8 * rng.standard_normal(
            (n, d), dtype=np.float32
        )
    else:
        raise ValueError(kind)
    return unit_rows(X)


def umap_nndescent(X: np.ndarray, n_neighbors: int, seed: int, min_dist: float, **kw: Any) -> Any:
    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = umap.UMAP(n_neighbors=n_neighbors, metric="cosine", min_dist=min_dist, random_state=seed, **kw)
        r.fit_transform(X)
    return r


def run_one(X: np.ndarray, a: argparse.Namespace) -> dict[str, Any]:
    """Both methods on one set of directions; returns timings and quality numbers."""
    nn, k_eval = a.n_neighbors, 15
    n = X.shape[0]
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), cpu_seconds()
    idx, cos = knn_cosine(X, a.k, progress=False)
    t_knn, c_knn = time.perf_counter() - t0, cpu_seconds() - c0
    t0, c0 = time.perf_counter(), cpu_seconds()
    Y_exact = umap_layout(
        idx, cos, n_neighbors=nn, seed=a.seed, min_dist=a.min_dist, progress=False, directions=X
    )
    t_umap, c_umap = time.perf_counter() - t0, cpu_seconds() - c0

    t0, c0 = time.perf_counter(), cpu_seconds()
    r = umap_nndescent(X, nn, a.seed, a.min_dist)
    t_nnd, c_nnd = time.perf_counter() - t0, cpu_seconds() - c0
    Y_nnd = _rescale_unit_box(np.asarray(r.embedding_, dtype=np.float64))
    # umap-learn's own lists: self in column 0 (as ours), n_neighbors columns in all
    nnd_i = np.asarray(r._knn_indices)[:, 1:nn]
    exact = idx[:, : nn - 1]
    recall = float(np.mean([np.isin(nnd_i[i], exact[i]).mean() for i in range(n)]))
    return {
        "load_avg_1min_at_start": load,
        "k_eval": k_eval,
        "results": [
            {
                "method": "exact kNN (ours) + umap precomputed_knn",
                "knn_seconds": t_knn,
                "umap_seconds": t_umap,
                "total_seconds": t_knn + t_umap,
                "total_cpu_seconds": c_knn + c_umap,
                "knn_recall_vs_exact": 1.0,
                "preservation": neighbourhood_preservation(idx, Y_exact, k_eval),
            },
            {
                "method": "umap-learn NN-descent (metric='cosine')",
                "knn_seconds": None,
                "umap_seconds": None,
                "total_seconds": t_nnd,
                "total_cpu_seconds": c_nnd,
                "knn_recall_vs_exact": recall,
                "preservation": neighbourhood_preservation(idx, Y_nnd, k_eval),
            },
        ],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--data", nargs="+", choices=["random", "clustered"], default=["random"])
    ap.add_argument("--sae-npy", type=Path, help="decoder rows [n_features, d] as .npy (replaces --data)")
    ap.add_argument("--n-neighbors", type=int, default=15)
    ap.add_argument("--k", type=int, default=32, help="kNN list length computed (pipeline default)")
    ap.add_argument("--min-dist", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/out/umap.json"))
    a = ap.parse_args(argv)
    nn = a.n_neighbors

    # warm-up: compile both numba paths (precomputed graph; NN-descent forced on a small input)
    t0 = time.perf_counter()
    W = make_directions("clustered", 600, 32, 1)
    wi, wc = knn_cosine(W, nn, progress=False)
    umap_layout(wi, wc, n_neighbors=nn, seed=a.seed, progress=False, directions=W)
    umap_nndescent(W, nn, a.seed, a.min_dist, force_approximation_algorithm=True)
    warmup = time.perf_counter() - t0
    print(f"warm-up (numba compilation) {warmup:.1f} s", file=sys.stderr)

    if a.sae_npy:
        sources = [(str(a.sae_npy), lambda: unit_rows(np.load(a.sae_npy)))]
    else:
        sources = [
            (f"{kind} unit rows, seed {a.seed}", lambda kind=kind: make_directions(kind, a.n, a.d, a.seed))
            for kind in a.data
        ]
    runs = []
    for source, load_fn in sources:
        X = load_fn()
        run = {"data": source, "n": X.shape[0], "d": X.shape[1], **run_one(X, a)}
        runs.append(run)
        print(f"{source}: done", file=sys.stderr)

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cores": os.cpu_count(),
        "threads_env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "n_neighbors": nn,
        "seed": a.seed,
        "warmup_seconds": warmup,
        "runs": runs,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))

    f = lambda v: "(in total)" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"n_neighbors={nn}, seed={a.seed}; warm-up (numba compilation) {warmup:.1f} s excluded\n")
    print(
        f"| data | method | kNN wall (s) | UMAP wall (s) | total wall (s) | total CPU (s) | "
        f"kNN recall@{nn - 1} vs exact | neighbourhood preservation@15 | load at start |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        for r_ in run["results"]:
            print(
                f"| {run['data']} ({run['n']}x{run['d']}) | {r_['method']} | {f(r_['knn_seconds'])} "
                f"| {f(r_['umap_seconds'])} | {r_['total_seconds']:.2f} | {r_['total_cpu_seconds']:.1f} "
                f"| {r_['knn_recall_vs_exact']:.3f} | {r_['preservation']:.3f} | {run['load_avg_1min_at_start']:.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
