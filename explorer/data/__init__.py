"""The explorer's read side of a cache: plain data in, data out, no Streamlit (unit-testable).

- `load.py` opens a cache: verifies it, checks each file against `precompute.schema`, loads it once.
- `cache_data.py` is the loaded cache (`CacheData`) and the per-feature questions the pages ask.
- `examples.py` reads examples.parquet per feature (lazily, by row group, when it is big).
- `search.py` ranks features by how strongly they match a query (the score is documented there).
- `closeness.py` reads closeness.json, the closeness step's set-level test, and stability.json, the
  pairs across SAE seeds (both optional).
- `lab.py` reads the optional mechanism-lab results inside a cache (fine-tune diffs, triage), and says
  when a diff was computed with task/harmful features the cache no longer has.
- `findings.py` counts what the cache supports saying (task, harmful, flagged, the nulls, closeness).

Import what a page needs from here: the names below are the package's interface.
"""

from explorer.data.cache_data import CacheData, Neighbors
from explorer.data.closeness import read_closeness, read_stability
from explorer.data.examples import ExampleStore
from explorer.data.findings import Findings, cache_findings
from explorer.data.lab import (
    FINETUNE_FILES,
    MEASURES,
    TRIAGE_FILES,
    FinetuneRun,
    TriageRun,
    basis_problem,
    compare_runs_table,
    files_stamp,
    find_finetune_runs,
    find_triage_runs,
    load_finetune_run,
    load_finetune_summary,
    load_triage_run,
    read_diff_basis,
    spearman_of,
    triage_basis_problem,
)
from explorer.data.load import GROUP_ORDER, find_caches, is_cache, load_cache, reviews_path_for

__all__ = [
    "FINETUNE_FILES",
    "GROUP_ORDER",
    "MEASURES",
    "TRIAGE_FILES",
    "CacheData",
    "ExampleStore",
    "Findings",
    "FinetuneRun",
    "Neighbors",
    "TriageRun",
    "basis_problem",
    "cache_findings",
    "compare_runs_table",
    "files_stamp",
    "find_caches",
    "find_finetune_runs",
    "find_triage_runs",
    "is_cache",
    "load_cache",
    "load_finetune_run",
    "load_finetune_summary",
    "load_triage_run",
    "read_closeness",
    "read_stability",
    "read_diff_basis",
    "reviews_path_for",
    "spearman_of",
    "triage_basis_problem",
]
