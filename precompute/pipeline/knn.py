"""Exact cosine neighbours of the decoder directions, in memory-bounded blocks (torch or faiss).

Pure functions on arrays/tensors (no file I/O), so the pipeline, the tests and the benchmarks all
call the same code.

Why exact neighbours: the explorer's central claim is "feature j sits next to harmful feature h,
above chance". An approximate index can silently drop the very pair a user is looking for, and
exact search is cheap at SAE sizes (16k-1M rows).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from precompute.model.load import resolve_device
from precompute.pipeline.knn_mixed import MARGIN, knn_torch_bf16
from precompute.pipeline.knn_rescore import exact_topk, fp32_score_error

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

# Memory budget for one block's [block, n] float32 score matrix. 256 MiB keeps the CPU peak
# near (n*d*4 + ~1.3 * budget) bytes whatever n is; on a GPU a larger block wastes nothing and
# cuts kernel-launch overhead, so it gets more.
CPU_BLOCK_BUDGET_BYTES = 256 * 2**20
CUDA_BLOCK_BUDGET_BYTES = 2 * 2**30

# Default CPU backend: faiss, by measurement (bench/bench_knn.py; tables in bench/README.md).
# 2-core Xeon shared with other jobs, d=576, k=32, random unit rows, identical lists from both.
# One thread each, CPU seconds (what a busy machine distorts least): 16k rows torch 3.0 vs faiss
# 2.6; 32k 10.2-10.6 vs 8.2-8.3; 65k 47.6 vs 32.5 (mostly torch's separate topk pass over each score row).
# Peak memory over the input: +331 vs +121 MiB at 16k, +452 vs +349 MiB at 65k (torch's is the
# 256 MiB score block; the old unblocked torch code took 789 MiB / 2.4 GiB). On CUDA the torch
# backend is used: faiss-cpu has no GPU path (docs/design.md: plain torch blocks, 262k x 2304, 1.4 s).
DEFAULT_CPU_BACKEND = "faiss"
FAISS_QUERY_BLOCK = 4096

# Candidates beyond k that the float32 searches (torch, faiss) hand to the exact rescoring
# (`knn_rescore`); rows whose k-th exact cosine is not provably above every left-out row are redone
# over all rows. Measured in bench/README.md ("Exact rescoring").
FP32_MARGIN = 8

BACKENDS = ("torch", "faiss", "torch-bf16")


# --------------------------------------------------------------------------------------------
# Unit rows
# --------------------------------------------------------------------------------------------


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x)


def unit_rows(W_dec: ArrayLike) -> np.ndarray:
    """Return the rows of ``W_dec`` scaled to unit L2 norm, as float32 [n, d].

    Cosine between decoder rows is what the explorer shows, so every geometric step starts
    here. Norms are accumulated in float64 (in row chunks, to keep memory flat) so that rows
    with large or tiny scale still come out at norm 1 to float32 precision.

    Rows with zero norm (dead or pruned features) cannot be normalised; they stay zero, which
    gives them cosine 0 with everything, and a warning names how many and which. Non-finite
    entries are an error: they would poison every neighbour list they touch.
    """
    X = _to_numpy(W_dec)
    if X.ndim != 2:
        raise ValueError(f"unit_rows expects a 2-D [n_features, d] array, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float32)
    out = np.empty(X.shape, dtype=np.float32)
    zero: list[np.ndarray] = []
    chunk = max(1, (32 * 2**20) // max(1, X.shape[1] * 8))
    for s in range(0, X.shape[0], chunk):
        blk = np.asarray(X[s : s + chunk], dtype=np.float64)
        if not np.isfinite(blk).all():
            bad = s + np.flatnonzero(~np.isfinite(blk).all(axis=1))
            raise ValueError(
                f"decoder has non-finite values in {bad.size} row(s) of this chunk, e.g. rows "
                f"{bad[:5].tolist()}; fix the SAE weights before computing geometry"
            )
        norms = np.sqrt(np.einsum("ij,ij->i", blk, blk))
        z = norms == 0
        if z.any():
            zero.append(s + np.flatnonzero(z))
        norms[z] = 1.0
        out[s : s + chunk] = blk / norms[:, None]
    if zero:
        idx = np.concatenate(zero)
        msg = (
            f"{idx.size} of {X.shape[0]} decoder rows have zero norm (e.g. features "
            f"{idx[:10].tolist()}); they stay zero and have cosine 0 with every feature"
        )
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return out


def _unit_rows_torch(X: torch.Tensor) -> torch.Tensor:
    """Torch twin of `unit_rows` for tensors already on an accelerator (no host round trip).

    Norms are accumulated in float64 in row chunks, so no float64 copy of a 1M x 2304 matrix.
    """
    if not torch.isfinite(X).all():
        raise ValueError("directions contain non-finite values; fix the SAE weights first")
    chunk = max(1, (64 * 2**20) // max(1, X.shape[1] * 8))
    starts = range(0, X.shape[0], chunk)
    norms = torch.cat([torch.linalg.vector_norm(X[s : s + chunk].to(torch.float64), dim=1) for s in starts])
    zero = norms == 0
    n_zero = int(zero.sum())
    if n_zero:
        idx = torch.nonzero(zero).flatten()[:10].tolist()
        msg = (
            f"{n_zero} of {X.shape[0]} rows have zero norm (e.g. {idx}); they stay zero and "
            "have cosine 0 with every feature"
        )
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    norms = torch.where(zero, torch.ones_like(norms), norms)
    out = torch.empty(X.shape, dtype=torch.float32, device=X.device)
    for s in starts:
        out[s : s + chunk] = (X[s : s + chunk].to(torch.float64) / norms[s : s + chunk, None]).to(
            torch.float32
        )
    return out


# --------------------------------------------------------------------------------------------
# Exact kNN
# --------------------------------------------------------------------------------------------


def _clamp_k(n: int, k: int) -> int:
    """Clamp k to n-1 (with a warning) so toy SAEs with fewer than k+1 features still run."""
    if n < 2:
        raise ValueError(f"need at least 2 directions to find neighbours, got {n}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n - 1:
        msg = f"k={k} but only {n - 1} other directions exist; returning k={n - 1} neighbours"
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return n - 1
    return k


def _block_rows(n: int, block_size: int | None, budget_bytes: int) -> int:
    if block_size is not None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        return min(block_size, n)
    return max(1, min(n, budget_bytes // (4 * n)))


def _knn_torch(
    X: torch.Tensor, k: int, rows: int, bar: Any, margin: int, stats: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Blocked float32 matmul + topk picks k + margin candidates per row; `exact_topk` decides."""
    n, d = X.shape
    m = min(n - 1, k + margin)
    eps = fp32_score_error(d)
    out_i = np.empty((n, k), dtype=np.int32)
    out_c = np.empty((n, k), dtype=np.float32)
    XT = X.T
    fallback = 0
    for s in range(0, n, rows):
        e = min(n, s + rows)
        S = X[s:e] @ XT  # [b, n], the only large allocation
        ar = torch.arange(e - s, device=X.device)
        S[ar, ar + s] = -torch.inf  # exclude self by index: robust to duplicate rows
        vals, cand = torch.topk(S, m, dim=1, largest=True, sorted=False)
        del S
        # every row left out scored <= the smallest candidate's score
        bound = (vals.min(dim=1).values.double() + eps).cpu().numpy() if m < n - 1 else None
        out_i[s:e], out_c[s:e], f = exact_topk(X, np.arange(s, e), cand.cpu().numpy(), bound, k)
        fallback += f
        bar.update(e - s)
    stats.update(rows=n, candidates=m, fallback_rows=fallback)
    return out_i, out_c


def _knn_faiss(
    X: np.ndarray, k: int, rows: int, bar: Any, margin: int, stats: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """faiss IndexFlatIP picks k + margin candidates (+ self) per row; `exact_topk` decides."""
    import faiss

    n, d = X.shape
    index = faiss.IndexFlatIP(d)
    index.add(X)
    m = min(n, k + 1 + margin)  # one more for self, dropped by index in `exact_topk`
    eps = fp32_score_error(d)
    Xt = torch.from_numpy(X)  # shares memory
    out_i = np.empty((n, k), dtype=np.int32)
    out_c = np.empty((n, k), dtype=np.float32)
    fallback = 0
    for s in range(0, n, rows):
        e = min(n, s + rows)
        D, Ix = index.search(X[s:e], m)  # sorted: D[:, -1] is the smallest candidate's score
        bound = D[:, -1].astype(np.float64) + eps if m < n else None
        out_i[s:e], out_c[s:e], f = exact_topk(Xt, np.arange(s, e), Ix.astype(np.int64), bound, k)
        fallback += f
        bar.update(e - s)
    stats.update(rows=n, candidates=m - 1, fallback_rows=fallback)
    return out_i, out_c


def knn_cosine(
    directions: ArrayLike,
    k: int = 32,
    block_size: int | None = None,
    device: str = "auto",
    backend: str = "auto",
    progress: bool = True,
    memory_budget_bytes: int | None = None,
    stats: dict[str, int] | None = None,
    margin: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine neighbours of every row among all other rows.

    Returns ``(indices int32 [n, k], cosine float32 [n, k])``: self excluded (by index, so a
    duplicate row still appears as its twin's neighbour), sorted by descending cosine with ties
    broken by lower index. Every backend only proposes candidates (k + ``margin``); the cosines are
    then recomputed in one fixed order (`knn_rescore`), so on the CPU the arrays are bit-identical
    across backends, block sizes and thread counts. Rows are normalised here, so raw decoder
    weights may be passed. ``stats`` (optional) receives rows, candidates and ``fallback_rows``
    (rows recomputed over every row because the candidate edge was too close to call).

    Work goes in row blocks scored against all rows, never an n x n matrix. torch: peak memory
    is the [block, n] score matrix (``memory_budget_bytes``, default 256 MiB on CPU, 2 GiB on
    CUDA) plus the data. faiss: blocks of 4096 query rows (faiss tiles the scores itself, in
    16 MiB pieces) plus the data and faiss's copy of it.
    ``k`` larger than n-1 is clamped to n-1 with a warning (a toy SAE should still build a cache).

    backend: "torch" (blocked fp32 matmul + topk; runs on CUDA when ``device`` resolves there,
    with TF32 disabled so the error bound holds), "torch-bf16" (bfloat16 candidates: `knn_mixed`),
    "faiss" (IndexFlatIP, CPU only) or "auto" (torch on CUDA, otherwise ``DEFAULT_CPU_BACKEND``;
    see the measurement note next to it). ``margin``: default ``FP32_MARGIN``, bf16 ``knn_mixed.MARGIN``.
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    # faiss-cpu has no GPU path: an explicit faiss request with device="auto" means the CPU
    dev = torch.device("cpu") if (backend == "faiss" and device == "auto") else resolve_device(device)
    if backend == "auto":
        backend = "torch" if dev.type == "cuda" else DEFAULT_CPU_BACKEND
    if backend == "faiss" and dev.type != "cpu":
        raise ValueError("the faiss backend is CPU-only here (faiss-cpu); use backend='torch' on CUDA")
    shape = tuple(directions.shape)
    if len(shape) != 2:
        raise ValueError(f"directions must be 2-D [n, d], got shape {shape}")
    n = shape[0]
    k = _clamp_k(n, k)
    if margin is not None and margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    stats = {} if stats is None else stats
    if memory_budget_bytes is None:
        memory_budget_bytes = CUDA_BLOCK_BUDGET_BYTES if dev.type == "cuda" else CPU_BLOCK_BUDGET_BYTES
    if backend == "faiss" and block_size is None:
        # faiss keeps its own scratch small (4096 x 1024 score tiles) whatever the query block,
        # so our block only bounds the [b, m] results; 4096 matches faiss's query tile and
        # avoids many small parallel calls, which a busy machine punishes badly.
        block_size = FAISS_QUERY_BLOCK
    rows = _block_rows(n, block_size, memory_budget_bytes)

    with tqdm(total=n, unit="row", desc=f"kNN {backend}/{dev.type}", disable=not progress) as bar:
        if backend == "faiss":
            X = np.ascontiguousarray(unit_rows(directions))
            return _knn_faiss(X, k, rows, bar, FP32_MARGIN if margin is None else margin, stats)
        if isinstance(directions, torch.Tensor) and directions.device.type == dev.type:
            Xt = _unit_rows_torch(directions.detach().to(dev))
        else:
            Xt = torch.from_numpy(unit_rows(directions)).to(dev)
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # no TF32: neighbours must be exact
        try:
            with torch.inference_mode():
                if backend == "torch-bf16":
                    return knn_torch_bf16(Xt, k, rows, bar, MARGIN if margin is None else margin, stats)
                return _knn_torch(Xt, k, rows, bar, FP32_MARGIN if margin is None else margin, stats)
        finally:
            torch.set_float32_matmul_precision(prev)


def knn_bruteforce(directions: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference kNN from the full n x n float64 cosine matrix (tests and benchmarks only).

    Same contract as `knn_cosine` (self excluded by index, descending float32 cosine, lower index
    on ties); it exists so the backends can be checked against something with no blocking logic.
    """
    X = unit_rows(directions).astype(np.float64)
    n = X.shape[0]
    k = min(k, n - 1)
    S = (X @ X.T).astype(np.float32)
    np.fill_diagonal(S, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(n), S.shape), -S), axis=-1)[:, :k]
    return order.astype(np.int32), np.take_along_axis(S, order, 1)
