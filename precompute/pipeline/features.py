"""features.parquet: the one table every step adds its columns to (harvest rates, geometry's map,
scores), keyed by `feature`."""

from __future__ import annotations

import numpy as np
import pandas as pd

from precompute.cache import StagedCache
from precompute.schema import FEATURES


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
