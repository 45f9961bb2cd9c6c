"""The cache contract in code: what a cache directory holds, by name.

The writer (`precompute.pipeline`), the reader (`explorer.data`), the synthetic fixture
(`bench/synthetic_cache.py`) and `docs/cache.md` (checked by a test) all use these names.
"""

from __future__ import annotations

SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
FEATURES = "features.parquet"
NEIGHBORS = "neighbors.npz"
EXAMPLES = "examples.parquet"
OVERLAPS = "overlaps.parquet"
DOCUMENTS = "documents.parquet"
CATEGORY_RATES = "category_rates.parquet"
HISTOGRAMS = "histograms.npz"
HARVEST_DIR = "harvest"
CONTEXTS = f"{HARVEST_DIR}/contexts.npz"
PARAMS_DIR = "params"  # one `<step>.json` sidecar per step

# Files whose checksums are verified on every open (cheap, and what the explorer reads).
CORE_FILES = (FEATURES, NEIGHBORS, EXAMPLES, OVERLAPS)

# Mechanism-lab result folders inside a cache: each is its own atomic output with its own sidecar
# (`featuregeom diff/triage --out CACHE/finetune/RUN`, `steer --out CACHE/steering/task-T.parquet`),
# carried along when a step rewrites the cache but not part of its manifest, so a rerun of the lab
# never invalidates the cache's checksums.
LAB_DIRS = ("finetune", "triage", "steering")


def params_file(step: str) -> str:
    return f"{PARAMS_DIR}/{step}.json"
