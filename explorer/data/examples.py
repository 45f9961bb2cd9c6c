"""Per-feature access to examples.parquet: in memory when small, one parquet row group at a time when big.

Why lazy: a 262k-feature cache holds millions of example rows; the writer sorts them by feature in
small row groups, so the explorer reads only the groups that hold the feature in view (an LRU keeps
the recent ones) instead of holding every example in memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from precompute import schema

LAZY_EXAMPLES_BYTES = 48 << 20  # examples files above this (and sorted by feature) are read lazily


class ExampleStore:
    """Per-feature access to examples.parquet: in memory when small, by row group when big."""

    def __init__(self, path: Path, force_lazy: bool | None = None, cache_groups: int = 24):
        self.path = path
        pf = pq.ParquetFile(path)
        self._meta = pf.metadata
        schema.check_table(schema.EXAMPLES, schema.arrow_dtypes(pf.schema_arrow), path)
        self.columns = pf.schema_arrow.names
        feat = pf.read(columns=["feature"]).column("feature").to_numpy().astype(np.int64, copy=False)
        self.n_rows = len(feat)
        sorted_ = bool(np.all(feat[1:] >= feat[:-1])) if len(feat) > 1 else True
        big = path.stat().st_size > LAZY_EXAMPLES_BYTES
        self.lazy = (sorted_ and self._meta.num_row_groups > 1) and (
            big if force_lazy is None else force_lazy
        )
        self._lock = threading.Lock()
        self._groups: OrderedDict[int, pa.Table] = OrderedDict()
        self._cache_groups = cache_groups
        if sorted_:
            self._order = None
            self._sorted_feature = feat
        else:
            self._order = np.argsort(feat, kind="stable")
            self._sorted_feature = feat[self._order]
        rg_rows = [self._meta.row_group(i).num_rows for i in range(self._meta.num_row_groups)]
        self._rg_start = np.concatenate([[0], np.cumsum(rg_rows)]).astype(np.int64)
        self._table: pa.Table | None = None if self.lazy else pf.read()

    def _row_range(self, feature: int) -> tuple[int, int]:
        lo = int(np.searchsorted(self._sorted_feature, feature, side="left"))
        hi = int(np.searchsorted(self._sorted_feature, feature, side="right"))
        return lo, hi

    def _row_group(self, i: int) -> pa.Table:
        with self._lock:
            if i in self._groups:
                self._groups.move_to_end(i)
                return self._groups[i]
        with pq.ParquetFile(self.path, metadata=self._meta) as pf:  # own handle: thread-safe
            tbl = pf.read_row_group(i)
        with self._lock:
            self._groups[i] = tbl
            while len(self._groups) > self._cache_groups:
                self._groups.popitem(last=False)
        return tbl

    def rows(self, feature: int) -> pa.Table:
        """All example rows of one feature as an arrow table (may be empty)."""
        lo, hi = self._row_range(feature)
        if hi <= lo:
            empty = self._table if self._table is not None else self._row_group(0)
            return empty.slice(0, 0)
        if self._table is not None:
            if self._order is None:
                return self._table.slice(lo, hi - lo)
            return self._table.take(pa.array(self._order[lo:hi]))
        first = int(np.searchsorted(self._rg_start, lo, side="right") - 1)
        last = int(np.searchsorted(self._rg_start, hi - 1, side="right") - 1)
        parts = []
        for g in range(first, last + 1):
            g_lo, g_hi = self._rg_start[g], self._rg_start[g + 1]
            a, b = max(lo, g_lo) - g_lo, min(hi, g_hi) - g_lo
            parts.append(self._row_group(g).slice(a, b - a))
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def for_feature(self, feature: int) -> list[dict[str, Any]]:
        """Example dicts of one feature, top examples first (by rank), then quantile samples."""
        recs = self.rows(feature).to_pylist()
        recs.sort(key=lambda r: (r.get("kind") != "top", -(r.get("quantile") or 0.0), r.get("rank") or 0))
        return recs

    def scan(self, columns: list[str]) -> Any:
        """Yield the file as tables of `columns`, one row group at a time when lazy (bypassing the LRU)."""
        if self._table is not None:
            yield self._table.select(columns)
            return
        for i in range(self._meta.num_row_groups):
            with pq.ParquetFile(self.path, metadata=self._meta) as pf:
                yield pf.read_row_group(i, columns=columns)
