"""GPU timing of the exact kNN torch backend (one CUDA device), printed as one JSON line.

Why: docs/design.md's anchors (d 2304: 65k 0.09 s, 262k 1.4 s) were measured with plain torch
blocks; this checks that `precompute.pipeline.geometry.knn_cosine` (exact fp32, no TF32, tie-breaking and
self-exclusion by index) stays in that range on a GPU, and spot-checks rows against float64.

    python bench/gpu_knn.py --n 262144 --d 2304 --k 32

Without CUDA it prints {"error": ...} and exits with status 2 instead of falling back to a
CPU run that would take far too long at this size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.pipeline.knn import knn_cosine  # noqa: E402


class NoCudaError(RuntimeError):
    """Raised when the benchmark is started on a machine without a CUDA device."""


def bench_knn_gpu(
    n: int = 262144, d: int = 2304, k: int = 32, seed: int = 0, check_rows: int = 256
) -> dict[str, Any]:
    """Time `knn_cosine(backend="torch", device="cuda")` on n random unit rows of dim d."""
    if not torch.cuda.is_available():
        raise NoCudaError("no CUDA device visible to torch; run this on a GPU machine")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    X = torch.randn(n, d, device=dev, generator=g)
    X = X / torch.linalg.vector_norm(X, dim=1, keepdim=True)

    knn_cosine(X[:4096], k, device="cuda", backend="torch", progress=False)  # cuBLAS/cuda init
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    idx, cos = knn_cosine(X, k, device="cuda", backend="torch", progress=False)  # returns on host
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base

    # spot check in float64 against the full rows (exact contract: self excluded, desc cosine)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:check_rows].to(dev)
    S = X[rows].double() @ X.double().T
    S[torch.arange(rows.numel(), device=dev), rows] = -torch.inf
    ref_c, ref_i = torch.topk(S, k, dim=1)
    got_i = torch.from_numpy(idx).to(dev)[rows].long()
    got_c = torch.from_numpy(cos).to(dev)[rows].double()
    max_cos_diff = float((ref_c - got_c).abs().max())
    mismatch = int((ref_i != got_i).sum())
    return {
        "device": torch.cuda.get_device_name(dev),
        "n": n,
        "d": d,
        "k": k,
        "seconds": seconds,
        "tflops_matmul_equiv": 2.0 * n * n * d / seconds / 1e12,
        "peak_gpu_mib_over_data": peak / 2**20,
        "checked_rows": int(rows.numel()),
        "index_mismatches_vs_fp64": mismatch,
        "max_abs_cos_diff_vs_fp64": max_cos_diff,
        "ok": max_cos_diff <= 1e-5,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--d", type=int, default=2304)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        result = bench_knn_gpu(a.n, a.d, a.k, a.seed)
    except NoCudaError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
