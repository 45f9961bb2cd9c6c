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

--torchdr adds torchdr's torch UMAP (installed outside the project's venv, e.g.
`pip install --target /tmp/torchdr-site torchdr --no-deps` plus matplotlib and its pure deps, then
PYTHONPATH=/tmp/torchdr-site). It cannot take our kNN lists, so it searches them itself, exactly
(`backend=None`: torch, no faiss) with `metric='sqeuclidean'`: on unit rows 2 (1 - cos), so the same
neighbours and, UMAP's membership strengths being invariant to a global distance scale, the same graph.

--compile-probe measures what numba compilation costs one process instead (see `compile_probe`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.pipeline.knn import knn_cosine, unit_rows
from precompute.pipeline.layout import _rescale_unit_box, neighbourhood_preservation, umap_layout

ROOT = Path(__file__).resolve().parents[1]


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


def torchdr_umap(X: np.ndarray, n_neighbors: int, seed: int, min_dist: float, max_iter: int) -> np.ndarray:
    """torchdr's UMAP on the CPU, from the directions (see the module docstring)."""
    import torch
    import torchdr

    reducer = torchdr.UMAP(
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        metric="sqeuclidean",
        backend=None,
        device="cpu",
        random_state=seed,
        max_iter=max_iter,
        distributed=False,
    )
    Y = reducer.fit_transform(torch.from_numpy(X)).detach().numpy()
    return _rescale_unit_box(np.asarray(Y, dtype=np.float64))


def torchdr_results(X: np.ndarray, idx: np.ndarray, a: argparse.Namespace) -> list[dict[str, Any]]:
    import torchdr

    rows = []
    for max_iter in (1000, 200):  # torchdr's default, and umap-learn's epochs at this size
        t0, c0 = time.perf_counter(), cpu_seconds()
        Y = torchdr_umap(X, a.n_neighbors, a.seed, a.min_dist, max_iter)
        rows.append(
            {
                "method": f"torchdr {torchdr.__version__} UMAP (own exact kNN, sqeuclidean), max_iter {max_iter}",
                "knn_seconds": None,
                "umap_seconds": None,
                "total_seconds": time.perf_counter() - t0,
                "total_cpu_seconds": cpu_seconds() - c0,
                "knn_recall_vs_exact": 1.0,  # exact search, same order as cosine on unit rows
                "preservation": neighbourhood_preservation(idx, Y, 15),
            }
        )
    return rows


_PROBE = """
import json, sys, time
import numpy as np
from precompute.pipeline.layout import umap_layout
z = np.load(sys.argv[1])
first, second = {}, {}
umap_layout(z["idx"], z["cos"], n_neighbors=15, seed=0, progress=False, info=first)
umap_layout(z["idx"], z["cos"], n_neighbors=15, seed=0, progress=False, info=second)
print(json.dumps({"first": first, "second": second}))
"""


def compile_probe(X: np.ndarray, a: argparse.Namespace) -> list[dict[str, Any]]:
    """What umap-learn's one-off set-up (import + numba compilation, paid by `layout.warm_up`) costs
    a fresh process: with numba's on-disk cache empty (a new NUMBA_CACHE_DIR), again with that cache
    filled by the first process, and with the environment's own cache. Each process maps the same
    graph twice: the first fit (after the warm-up) against the second shows whether the warm-up
    compiled everything the real fit needs."""
    idx, cos = knn_cosine(X, a.k, progress=False)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "knn.npz", idx=idx, cos=cos)
        env_own = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
        env_new = {**env_own, "NUMBA_CACHE_DIR": str(Path(tmp) / "numba-cache")}
        for label, env in [
            ("fresh process, empty numba cache", env_new),
            ("second fresh process, that cache filled", env_new),
            ("fresh process, the environment's own numba cache", env_own),
        ]:
            load = os.getloadavg()[0]
            t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            r = subprocess.run(
                [sys.executable, "-c", _PROBE, str(Path(tmp) / "knn.npz")],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
            out = json.loads(r.stdout.strip().splitlines()[-1])
            runs.append(
                {
                    "process": label,
                    "load_avg_1min_at_start": load,
                    "process_wall_s": time.perf_counter() - t0,
                    "process_cpu_s": cpu,
                    "compile_s": out["first"]["umap_compile_s"],
                    "first_fit_s": out["first"]["umap_fit_s"],
                    "second_compile_s": out["second"]["umap_compile_s"],
                    "second_fit_s": out["second"]["umap_fit_s"],
                }
            )
            print(json.dumps(runs[-1]), file=sys.stderr)
    return runs


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
    extra = torchdr_results(X, idx, a) if a.torchdr else []
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
            *extra,
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
    ap.add_argument("--torchdr", action="store_true", help="also time torchdr's UMAP (see above)")
    ap.add_argument("--compile-probe", action="store_true", help="only the per-process compilation cost")
    a = ap.parse_args(argv)
    nn = a.n_neighbors
    if a.compile_probe:
        runs = compile_probe(make_directions(a.data[0], a.n, a.d, a.seed), a)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "runs": runs}, indent=2))
        print(
            "| process | warm-up (import + compile) s | 1st fit s | 2nd fit s | process wall s | process CPU s | load |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in runs:
            print(
                f"| {r['process']} | {r['compile_s']:.1f} | {r['first_fit_s']:.1f} | {r['second_fit_s']:.1f} "
                f"| {r['process_wall_s']:.1f} | {r['process_cpu_s']:.1f} | {r['load_avg_1min_at_start']:.1f} |"
            )
        return 0

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
