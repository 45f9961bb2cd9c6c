"""Length- and template-matched document values for the contrast scores (docs/cache.md
`features.parquet`; docs/science.md section 2, "Contrast scores need matched units").

An AUROC over each document's max activation measures document length: a feature firing at a
constant per-token rate p fires somewhere in a document of L tokens with probability 1 - (1-p)^L, so
300-token documents beat 40-token ones without any difference in content. And tokens every document
carries by construction (chat-template markers, the default system prompt) give a feature that
fires on them the same value in every group, or - in short documents, where the template is most of
the text - a head start. Two rules make the unit of comparison the same in every group:

1. **Shared tokens are left out.** A token id is *shared* when it occurs in at least
   `fraction` of the documents of every scored group present (task, control, harmful, benign:
   `SHARED_GROUPS`). Shared tokens are not eligible for scoring anywhere. The rule removes a
   template's words wherever they occur (e.g. "\\n" or "," inside code too); that costs some
   signal but no bias, since it removes the same ids from every group.
2. **One window per document.** Each document contributes the `window` consecutive eligible
   counted tokens starting at a seeded position (uniform over the possible starts, from
   `seed` and the document id only); its value for a feature is the feature's max over that
   window. Documents with fewer eligible tokens than `window` are left out of every contrast.

Eligible tokens are ordered as in the document: by (context, position), since a document's
contexts get increasing ids (`precompute.data.plan`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from precompute.pipeline.shards import Shard, ShardRef, load_arrays

SHARED_GROUPS = ("task", "control", "harmful", "benign")
_META = ("doc_id", "context_id", "position", "token_id")


@dataclass
class TokenRows:
    """The counted tokens of every shard, concatenated (no activations): 16 bytes a token."""

    doc: np.ndarray  # int64 [N]
    context: np.ndarray  # int64 [N]
    position: np.ndarray  # int64 [N]
    token: np.ndarray  # int64 [N]
    shard_offsets: np.ndarray  # int64 [n_shards + 1]: shard i is rows offsets[i]:offsets[i+1]


def read_token_rows(shard_paths: Sequence[ShardRef]) -> TokenRows:
    parts: dict[str, list[np.ndarray]] = {k: [] for k in _META}
    sizes = [0]
    for path in shard_paths:
        rows = load_arrays(path, _META)  # only these arrays: the activations are not decompressed
        for k in _META:
            parts[k].append(rows[k].astype(np.int64))
        sizes.append(len(parts["doc_id"][-1]))
    cat = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in parts.items()}
    return TokenRows(
        cat["doc_id"], cat["context_id"], cat["position"], cat["token_id"], np.cumsum(sizes, dtype=np.int64)
    )


@dataclass
class SharedTokens:
    ids: np.ndarray  # int64, sorted: the shared token ids
    doc_fraction: dict[str, np.ndarray]  # group -> fraction of its documents containing each shared id
    groups: list[str]  # the groups the rule was applied over (SHARED_GROUPS present in the corpus)


def shared_token_ids(
    doc: np.ndarray,
    token: np.ndarray,
    doc_group: np.ndarray,
    fraction: float,
    groups: Iterable[str] = SHARED_GROUPS,
) -> SharedTokens:
    """Token ids occurring in >= `fraction` of the documents of every group of `groups` that has
    documents among the rows (`doc`, `token`: one entry per counted token; `doc_group[d]`: the
    group of document d). No group present: nothing is shared."""
    doc = np.asarray(doc, np.int64)
    token = np.asarray(token, np.int64)
    if len(token) == 0:
        return SharedTokens(np.zeros(0, np.int64), {}, [])
    vocab = int(token.max()) + 1
    pairs = np.unique(doc * vocab + token)  # each (document, token id) once
    pair_doc, pair_tok = np.divmod(pairs, vocab)
    docs_present = np.unique(doc)
    group_of_doc = np.asarray(doc_group, dtype=object)
    present = [g for g in groups if np.any(group_of_doc[docs_present] == g)]
    if not present:
        return SharedTokens(np.zeros(0, np.int64), {}, [])
    pair_group = group_of_doc[pair_doc]
    frac = {}
    for g in present:
        n_docs = int(np.sum(group_of_doc[docs_present] == g))
        frac[g] = np.bincount(pair_tok[pair_group == g], minlength=vocab) / n_docs
    shared = np.flatnonzero(np.all([frac[g] >= fraction for g in present], axis=0)).astype(np.int64)
    return SharedTokens(shared, {g: frac[g][shared] for g in present}, present)


def _mix(seed: int, x: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, x): a deterministic pseudo-random uint64 per x, independent of order."""
    z = x.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(
        (seed * 0xD1B54A32D192ED03 + 1) % 2**64
    )
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def window_starts(n_eligible: np.ndarray, window: int, seed: int) -> np.ndarray:
    """Per document (index = doc id): the first eligible token of its window, uniform over the
    n_eligible - window + 1 possible starts; -1 where the document is shorter than `window`."""
    n_eligible = np.asarray(n_eligible, np.int64)
    room = n_eligible - int(window) + 1
    h = _mix(seed, np.arange(len(n_eligible), dtype=np.uint64))
    start = np.full(len(n_eligible), -1, np.int64)
    ok = room > 0
    start[ok] = (h[ok] % room[ok].astype(np.uint64)).astype(np.int64)
    return start


def select_window_rows(
    rows: TokenRows, eligible: np.ndarray, window: int, seed: int, n_docs: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(selected [N] bool over rows, n_eligible [n_docs], start [n_docs]) for one window per document."""
    idx = np.flatnonzero(eligible)
    order = np.lexsort((rows.position[idx], rows.context[idx], rows.doc[idx]))
    e = idx[order]
    d = rows.doc[e]
    n_eligible = np.bincount(d, minlength=n_docs).astype(np.int64)
    first = np.cumsum(n_eligible) - n_eligible  # where each document's eligible tokens begin in e
    rank = np.arange(len(e), dtype=np.int64) - first[d]
    start = window_starts(n_eligible, window, seed)
    s = start[d]
    inside = (s >= 0) & (rank >= s) & (rank < s + window)
    selected = np.zeros(len(rows.doc), bool)
    selected[e[inside]] = True
    return selected, n_eligible, start


def _max_per_pair(
    doc: np.ndarray, feat: np.ndarray, val: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc, feature, max value) per distinct pair, sorted by (feature, doc)."""
    if len(doc) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    order = np.lexsort((doc, feat))
    doc, feat, val = doc[order], feat[order], val[order]
    starts = np.flatnonzero(np.r_[True, (feat[1:] != feat[:-1]) | (doc[1:] != doc[:-1])])
    return doc[starts], feat[starts], np.maximum.reduceat(val, starts)


class WindowMax:
    """`window_feature_max` one shard at a time, so that another consumer can share its pass over the
    shards (a bounded-disk harvest computes each shard again for every pass)."""

    def __init__(self, selections: Sequence[np.ndarray], shard_offsets: np.ndarray) -> None:
        self.selections = selections
        self.shard_offsets = shard_offsets
        self.parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in selections]

    def add(self, i: int, shard: Shard, name: object = "") -> None:
        rows = shard.row_of_entry()
        for selected, out in zip(self.selections, self.parts, strict=True):
            mask = selected[self.shard_offsets[i] : self.shard_offsets[i + 1]]
            if len(mask) != shard.n_rows:
                raise ValueError(
                    f"{name or i} changed since its rows were read ({shard.n_rows} rows, not {len(mask)})"
                )
            keep = mask[rows]
            doc = shard.doc_id[rows[keep]].astype(np.int64)
            out.append(_max_per_pair(doc, shard.feature[keep].astype(np.int64), shard.value[keep]))

    def result(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        # a document can span shards: reduce again
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        return [
            _max_per_pair(*(np.concatenate([t[k] for t in (out or [empty])]) for k in range(3)))
            for out in self.parts
        ]


def window_feature_max(
    shard_paths: Sequence[ShardRef],
    selections: Sequence[np.ndarray],
    shard_offsets: np.ndarray,
    progress: bool = True,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each selection (a bool mask over all rows), the sparse per-document max activation over
    the selected rows only: (doc, feature, value) triples sorted by (feature, doc), the input of
    `precompute.pipeline.auroc`. One pass over the shards serves every selection."""
    acc = WindowMax(selections, shard_offsets)
    for i, path in enumerate(tqdm(shard_paths, desc="window max", disable=not progress)):
        acc.add(i, Shard.load(path), path)
    return acc.result()


@dataclass
class Windowed:
    """Each document's windowed feature values and how they were chosen."""

    doc: np.ndarray  # (doc, feature, value) triples: the max over the document's window
    feat: np.ndarray
    val: np.ndarray
    n_eligible: np.ndarray  # int64 [n_docs]: counted tokens that are not shared
    start: np.ndarray  # int64 [n_docs]: the window's first eligible token, -1 when too short
    shared: SharedTokens
    window: int

    @property
    def has_window(self) -> np.ndarray:
        return self.start >= 0

    @property
    def triples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.doc, self.feat, self.val


@dataclass
class WindowPlan:
    """Which rows each window length scores, chosen from the token rows alone (no activations)."""

    shared: SharedTokens
    chosen: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per window: (selected rows, n_eligible, start)
    windows: tuple[int, ...]
    shard_offsets: np.ndarray

    def accumulator(self) -> WindowMax:
        return WindowMax([c[0] for c in self.chosen], self.shard_offsets)

    def finish(self, values: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[Windowed]:
        return [
            Windowed(*triples, n_eligible, start, self.shared, int(w))
            for w, triples, (_, n_eligible, start) in zip(self.windows, values, self.chosen, strict=True)
        ]


def plan_windows(
    shard_paths: Sequence[ShardRef],
    doc_group: np.ndarray,
    windows: Sequence[int],
    shared_fraction: float,
    seed: int,
) -> WindowPlan:
    """The first of `windowed_values`' two passes: the token rows, the shared tokens and the windows."""
    if any(w < 1 for w in windows):
        raise ValueError(f"a score window must hold at least one token, got {list(windows)}")
    rows = read_token_rows(shard_paths)
    n_docs = len(doc_group)
    if len(rows.doc) and rows.doc.max() >= n_docs:
        raise ValueError(f"the shards refer to document {int(rows.doc.max())} but only {n_docs} are listed")
    shared = shared_token_ids(rows.doc, rows.token, doc_group, shared_fraction)
    eligible = ~np.isin(rows.token, shared.ids)
    chosen = [select_window_rows(rows, eligible, w, seed, n_docs) for w in windows]
    return WindowPlan(shared, chosen, tuple(int(w) for w in windows), rows.shard_offsets)


def windowed_values(
    shard_paths: Sequence[ShardRef],
    doc_group: np.ndarray,
    windows: Sequence[int],
    shared_fraction: float,
    seed: int,
    progress: bool = True,
) -> list[Windowed]:
    """The windowed per-document values of every feature, one `Windowed` per window length (module
    docstring: the two rules); the shards are read twice whatever the number of windows."""
    plan = plan_windows(shard_paths, doc_group, windows, shared_fraction, seed)
    values = window_feature_max(shard_paths, [c[0] for c in plan.chosen], plan.shard_offsets, progress)
    return plan.finish(values)


def token_texts(ids: Iterable[int], contexts: Path, examples: Path, tokenizer=None) -> dict[int, str | None]:
    """Text of each token id: the tokenizer's when given, else read off the cache, where
    examples.parquet holds some contexts' tokens decoded one by one and harvest/contexts.npz their
    ids (the step runs without the model). None for an id no stored example shows."""
    wanted = [int(i) for i in ids]
    if tokenizer is not None:
        return {i: tokenizer.decode([i]) for i in wanted}
    out: dict[int, str | None] = dict.fromkeys(wanted)
    if not wanted or not contexts.is_file() or not examples.is_file():
        return out
    import pyarrow.parquet as pq

    missing = set(wanted)
    with np.load(contexts) as z:
        offsets, token_ids = z["offsets"], z["token_ids"]
    for batch in pq.ParquetFile(examples).iter_batches(batch_size=4096, columns=["context_id", "tokens"]):
        for c, toks in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
            ctx_ids = token_ids[offsets[c] : offsets[c + 1]].tolist()
            if toks is None or len(toks) != len(ctx_ids):
                continue
            for t, s in zip(ctx_ids, toks, strict=True):
                if t in missing:
                    out[t] = s
                    missing.discard(t)
        if not missing:
            break
    return out
