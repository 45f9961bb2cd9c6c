"""features.parquet: the one table every step adds its columns to (harvest rates, geometry's map,
scores), keyed by `feature`."""

from __future__ import annotations

import numpy as np
import pandas as pd

from precompute.cache import StagedCache
from precompute.errors import CacheError
from precompute.schema import FEATURES, NEIGHBORS, check_npz


def merge_feature_columns(staged: StagedCache, n_features: int, columns: pd.DataFrame) -> None:
    """Add/replace columns of features.parquet (created when missing), keyed by `feature`."""
    path = staged.dir / FEATURES
    if path.is_file():
        base = pd.read_parquet(path)
        base = base.drop(columns=[c for c in columns.columns if c != "feature" and c in base.columns])
    else:
        base = pd.DataFrame({"feature": np.arange(n_features, dtype=np.int64)})
    merged = base.merge(columns, on="feature", how="left")
    merged.to_parquet(staged.path(FEATURES), index=False)


def scored_features_and_neighbors(staged: StagedCache) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """What the steps after scores read: features.parquet with its harm scores, and neighbors.npz checked
    against the contract. A cache missing either names the step to run."""
    npath = staged.dir / NEIGHBORS
    if not npath.is_file():
        raise CacheError(f"{staged.target} has no {NEIGHBORS}; run `featuregeom geometry` first")
    features = pd.read_parquet(staged.dir / FEATURES)
    if "is_harmful" not in features.columns:
        raise CacheError(f"{staged.target} has no harm scores; run `featuregeom scores` first")
    check_npz(npath, NEIGHBORS)
    with np.load(npath) as z:
        return features, {k: z[k] for k in z.files}
