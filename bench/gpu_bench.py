"""One GPU benchmark, under 5 minutes on one H100/H200 (plus the UMAP part, below):
harvest tokens/s with and without the SAE (real SmolLM2-135M + the default SAE, block 15), and exact
top-32 cosine kNN at 262,144 × 2304 with the torch backend.

UMAP: the 2-D map of that same kNN graph (n_neighbors 15, seed 0) with every backend that can run
here (cuML when it imports, then umap-learn on the CPU, single-threaded because seeded: minutes at
262k; `--umap-backends cuml` skips it), each with its one-off warm-up (umap-learn: numba
compilation) timed apart from the fit, and neighbourhood preservation@15 of each map.

    python bench/gpu_bench.py --out bench/out/gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def umap_bench(indices: Any, cosine: Any, backends: list[str] | None) -> dict[str, Any]:
    """UMAP of one kNN graph with each backend (the pipeline's own `umap_layout`), timed."""
    from precompute.pipeline.layout import cuml_unavailable, neighbourhood_preservation, umap_layout

    idx = indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    cos = cosine.cpu().numpy() if isinstance(cosine, torch.Tensor) else np.asarray(cosine)
    why_no_cuml = cuml_unavailable()
    if backends is None:
        backends = (["cuml"] if why_no_cuml is None else []) + ["umap-learn"]
    out: dict[str, Any] = {"n": idx.shape[0], "n_neighbors": 15, "cuml_unavailable": why_no_cuml, "runs": []}
    for backend in backends:
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        Y = umap_layout(idx, cos, n_neighbors=15, seed=0, progress=False, backend=backend, info=info)
        info["wall_s"] = time.perf_counter() - t0
        info["preservation15"] = neighbourhood_preservation(idx, Y, 15)
        out["runs"].append(info)
        print(json.dumps(info), flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench/out/gpu.json"))
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--knn-n", type=int, default=262_144)
    p.add_argument("--knn-d", type=int, default=2304)
    p.add_argument(
        "--umap-backends",
        nargs="*",
        default=None,
        help="default: every backend that runs here; the flag with no name skips UMAP",
    )
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; run this on a GPU machine", file=sys.stderr)
        return 1
    import bench_harvest

    from precompute.pipeline import geometry

    ns = argparse.Namespace(
        sae=str(bench_harvest.DEFAULT_SAE),
        hook="blocks.15.hook_resid_post",
        device="cuda",
        batches=args.batches,
        batch_size=args.batch_size,
    )
    result = {
        "machine": bench_harvest.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "harvest": bench_harvest.bench_fraction(ns),
    }
    print(json.dumps(result["harvest"], indent=2), flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.knn_n, args.knn_d, device="cuda", generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    result["knn"] = {"n": args.knn_n, "d": args.knn_d, "k": 32}
    answers = {}
    for backend in ("torch", "torch-bf16"):  # plain fp32 blocks, then bf16 candidates + fp32 rescoring
        geometry.knn_cosine(x[:4096], k=32, device="cuda", backend=backend, progress=False)  # warm-up
        torch.cuda.synchronize()
        stats: dict[str, int] = {}
        t0 = time.perf_counter()
        answers[backend] = geometry.knn_cosine(
            x, k=32, device="cuda", backend=backend, progress=False, stats=stats
        )
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        # the n x n x d score matmul dominates: 2 n^2 d flops
        result["knn"][backend] = {
            "seconds": seconds,
            "tflops": 2 * args.knn_n**2 * args.knn_d / seconds / 1e12,
            **stats,
        }
    result["knn"]["speedup_bf16"] = result["knn"]["torch"]["seconds"] / result["knn"]["torch-bf16"]["seconds"]
    result["knn"]["same_neighbours"] = bool((answers["torch"][0] == answers["torch-bf16"][0]).all())
    print(json.dumps(result["knn"]), flush=True)
    result["umap"] = umap_bench(*answers["torch"], args.umap_backends)
    print(json.dumps(result["umap"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
