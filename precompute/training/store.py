"""Training data for `train-sae`: the held-out split of a corpus, the on-disk activation store and
the order in which its rows are read.

Activations come from `precompute.data.plan` and `precompute.model.activations` (the same planning, masking and batching as the
precompute harvest), are written once to a float16 ``.npy`` store under ``--work-dir`` (resumable
batch by batch) and then read in shuffled order, epoch after epoch. Held-out documents (chosen by
a hash of their content, so the split is stable across budgets, seeds and source order) never
reach the training store.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from precompute.atomic import write_text_atomic
from precompute.data.corpus import Context, CorpusSource, Document, pack_contexts, read_source
from precompute.data.plan import CorpusPlan
from precompute.data.records import ReadStats
from precompute.data.split import DEFAULT_SCORING_FRACTION, document_hash
from precompute.errors import CorpusError, FeatureGeomError
from precompute.model.activations import iter_activations
from precompute.model.hooks import HookReader

STORE_FILE = "train_activations.npy"
STORE_PROGRESS = "train_activations.progress.json"


# ============================================================================ data order
class ShuffledBatches:
    """Deterministic batch order over a [n, d] activation array: step -> row indices.

    Each epoch is a fresh permutation (seeded by seed and epoch). When n exceeds `buffer_rows`
    the permutation shuffles blocks of `buffer_rows` consecutive rows and rows within a block, so
    a batch reads from one contiguous stretch of a disk store. A step's rows depend only on
    (seed, step), which makes resuming exact.
    """

    def __init__(
        self, data: np.ndarray | torch.Tensor, batch_size: int, seed: int, buffer_rows: int | None = None
    ):
        self.data = data
        self.n = int(data.shape[0])
        if self.n < batch_size:
            raise FeatureGeomError(
                f"only {self.n} training activations, fewer than one batch of {batch_size}; "
                "use more tokens or a smaller --batch-size"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.buffer_rows = min(self.n, buffer_rows or self.n)
        self.steps_per_epoch = self.n // batch_size
        self._epoch = -1
        self._perm = np.arange(0)  # the current epoch's permutation, drawn on first use

    def permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.buffer_rows >= self.n:
            return rng.permutation(self.n)
        starts = np.arange(0, self.n, self.buffer_rows)
        parts = [s + rng.permutation(min(self.buffer_rows, self.n - s)) for s in rng.permutation(starts)]
        return np.concatenate(parts)

    def indices(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm, self._epoch = self.permutation(epoch), epoch
        return self._perm[j * self.batch_size : (j + 1) * self.batch_size]

    def batch(self, step: int, part: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """The rows of `step`; `part` (rank, ranks): that rank's equal slice of them (torchrun)."""
        idx = self.indices(step)
        rank, ranks = part
        if ranks > 1:
            size = self.batch_size // ranks
            idx = idx[rank * size : (rank + 1) * size]
        if isinstance(self.data, torch.Tensor):
            return self.data[torch.from_numpy(idx)].float()
        return torch.from_numpy(np.asarray(self.data[np.sort(idx)], dtype=np.float32))


# ============================================================================ corpus split
def is_heldout(doc: Document, fraction: float) -> bool:
    """Deterministic document-level split: a hash of the content, so duplicates fall on one side
    and the split does not move when budgets, seeds or the order of sources change."""
    return int(document_hash(doc)[:16], 16) / 2.0**64 < fraction


def _split_budget(budget: int | None, heldout_fraction: float) -> dict[str, int | None]:
    """A source's token budget shared between its training and held-out documents."""
    if budget is None:
        return {"train": None, "heldout": None}
    heldout = max(2, int(round(budget * heldout_fraction)))
    return {"train": max(2, budget - heldout), "heldout": heldout}


def plan_split(
    sources: list[CorpusSource],
    tokenizer: Any,
    context_size: int = 128,
    packing: str = "split",
    max_tokens: int | None = None,
    heldout_fraction: float = 0.08,
    seed: int = 0,
    document_split: str = "all",
    scoring_fraction: float = DEFAULT_SCORING_FRACTION,
) -> tuple[CorpusPlan, CorpusPlan]:
    """Like `plan_corpus`, but documents are first split into training and held-out sets.

    Each source's token budget (its own max_tokens, or an equal share of `max_tokens`) is split in
    the same proportion, so held-out tokens come from documents the SAE never saw.
    """
    if not sources:
        raise CorpusError("no corpus given: pass --corpus PATH[:GROUP[:CATEGORY]] at least once")
    unbudgeted = [s for s in sources if s.max_tokens is None]
    share = None
    if max_tokens is not None:
        fixed = sum(s.max_tokens or 0 for s in sources)
        share = max(0, max_tokens - fixed) // max(1, len(unbudgeted))
    parts: dict[str, dict[str, list]] = {
        name: {"documents": [], "contexts": [], "stats": [], "tokens": []} for name in ("train", "heldout")
    }
    next_doc, next_ctx = 0, 0
    for index, source in enumerate(sources):
        docs, stats = read_source(
            source,
            index,
            first_doc_id=next_doc,
            seed=seed,
            split=document_split,
            scoring_fraction=scoring_fraction,
        )
        next_doc += len(docs)
        budget = source.max_tokens if source.max_tokens is not None else share
        held = [d for d in docs if is_heldout(d, heldout_fraction)]
        train = [d for d in docs if not is_heldout(d, heldout_fraction)]
        budgets = _split_budget(budget, heldout_fraction)
        for name, subset in (("train", train), ("heldout", held)):
            made = list(pack_contexts(subset, tokenizer, context_size, packing, budgets[name], next_ctx))
            next_ctx += len(made)
            used = set(np.concatenate([ctx.doc_ids for ctx in made]).tolist()) if made else set()
            part = parts[name]
            part["documents"].extend(d for d in subset if d.doc_id in used)
            part["contexts"].extend(made)
            part["stats"].append(ReadStats(records=stats.records, documents=len(used)))
            part["tokens"].append(sum(len(c.token_ids) for c in made))
    for name in ("train", "heldout"):
        if not parts[name]["contexts"]:
            raise CorpusError(
                f"the {name} split got no tokens; use more documents or another --heldout-fraction"
            )
    train_plan, held_plan = (
        CorpusPlan(sources, p["documents"], p["contexts"], p["stats"], p["tokens"])
        for p in (parts["train"], parts["heldout"])
    )
    return train_plan, held_plan


def skip_ids_of(tokenizer: Any) -> set[int]:
    """Special tokens never count (same rule as the harvest)."""
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def pad_id_of(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0


def counted_positions(context: Context, skip_ids: set[int]) -> int:
    """Rows a context contributes to the activation store (position 0 and special tokens excluded)."""
    return int(
        np.count_nonzero(~np.isin(context.token_ids[1:], np.fromiter(skip_ids, np.int64, len(skip_ids))))
    )


# ============================================================================ activation store
def _store_layout(
    plan: CorpusPlan, batch_size: int, skip_ids: set[int], seed: int
) -> tuple[list[list[Context]], list[int], np.ndarray]:
    """The batches in their seeded order, the rows each adds to the store, and their offsets."""
    batches = plan.batches(batch_size)
    order = np.random.default_rng([seed, 7]).permutation(len(batches))
    batches = [batches[i] for i in order]
    rows_per_batch = [sum(counted_positions(c, skip_ids) for c in b) for b in batches]
    offsets = np.concatenate([[0], np.cumsum(rows_per_batch)]).astype(np.int64)
    return batches, rows_per_batch, offsets


def _open_store(work_dir: Path, shape: tuple[int, int], dtype: str, signature: str) -> tuple[np.memmap, int]:
    """The memory-mapped store and the batches already in it (0 unless an earlier run of the same
    data settings left a matching progress file)."""
    path, progress_path = work_dir / STORE_FILE, work_dir / STORE_PROGRESS
    done = 0
    if path.is_file() and progress_path.is_file():
        info = json.loads(progress_path.read_text())
        same = (info.get("rows"), info.get("d_in"), info.get("dtype"), info.get("signature"))
        if same == (shape[0], shape[1], dtype, signature):
            done = int(info["batches_done"])
    if done == 0 or not path.is_file():
        np_dtype = np.float16 if dtype == "float16" else np.float32
        return np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape), 0
    return np.lib.format.open_memmap(path, mode="r+"), done


def _checked_rows(acts: torch.Tensor, expected_rows: int, dtype: str) -> np.ndarray:
    if acts.shape[0] != expected_rows:
        raise FeatureGeomError(
            "internal error: the counted positions of a batch changed between plan and run"
        )
    np_dtype = np.float16 if dtype == "float16" else np.float32
    if float(acts.abs().max()) > np.finfo(np_dtype).max:
        raise FeatureGeomError(
            f"activations exceed the {dtype} range ({float(acts.abs().max()):.3g}); use --store-dtype float32"
        )
    return acts.numpy().astype(np_dtype)


def harvest_store(
    plan: CorpusPlan,
    reader: HookReader,
    tokenizer: Any,
    work_dir: Path,
    d_in: int,
    batch_size: int,
    device: torch.device,
    dtype: str = "float16",
    seed: int = 0,
    progress: bool = True,
    signature: str = "",
) -> np.ndarray:
    """Write the training activations to `work_dir/train_activations.npy`, resumable per batch.

    Batches are taken in a seeded random order (each is still length-homogeneous), so the rows of
    the store are already mixed across sources before any shuffling.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    skip_ids, pad_id = skip_ids_of(tokenizer), pad_id_of(tokenizer)
    batches, rows_per_batch, offsets = _store_layout(plan, batch_size, skip_ids, seed)
    n_rows = int(offsets[-1])
    store, done = _open_store(work_dir, (n_rows, d_in), dtype, signature)
    if done == len(batches):
        return store
    bar = tqdm(
        total=n_rows,
        initial=int(offsets[done]),
        desc="collect activations",
        unit="act",
        unit_scale=True,
        disable=not progress,
        smoothing=0.1,
    )
    last_flush = time.perf_counter()
    for batch in iter_activations(reader, batches, pad_id, skip_ids, device, start_batch=done):
        acts = batch.acts.cpu()
        rows = _checked_rows(acts, rows_per_batch[batch.index], dtype)
        store[offsets[batch.index] : offsets[batch.index + 1]] = rows
        bar.update(acts.shape[0])
        done = batch.index + 1
        if time.perf_counter() - last_flush > 30 or done == len(batches):
            store.flush()  # the rows first, then the progress file that vouches for them
            progress_info = {
                "rows": n_rows,
                "d_in": d_in,
                "dtype": dtype,
                "signature": signature,
                "batches_done": done,
                "batches": len(batches),
            }
            write_text_atomic(work_dir / STORE_PROGRESS, json.dumps(progress_info))
            last_flush = time.perf_counter()
    bar.close()
    return store


def sample_rows(data: np.ndarray | torch.Tensor, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, 11])
    idx = np.sort(rng.choice(data.shape[0], size=min(n, data.shape[0]), replace=False))
    if isinstance(data, torch.Tensor):
        return data[torch.from_numpy(idx)].float()
    return torch.from_numpy(np.asarray(data[idx], dtype=np.float32))
