"""What the fine-tune diff, patch-back and triage read from a precompute cache: the SAE it was built
with, its harmful and task feature sets and the null cosine (`HarmGeometry`), checked up front so a
cache that lacks them fails before anything expensive runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from precompute.errors import CacheError


@dataclass
class HarmGeometry:
    """The cache's harmful/task sets, its SAE and null cosine. Loaded once (the SAE is the expensive part)."""

    manifest: dict
    features: pd.DataFrame  # features.parquet indexed by feature id
    sae: Any
    null_cosine: float

    @property
    def harmful(self) -> np.ndarray:
        return self.features.loc[self.features["is_harmful"], "feature"].to_numpy().copy()

    @property
    def task(self) -> np.ndarray:
        return self.features.loc[self.features["is_task"], "feature"].to_numpy().copy()

    def directions(self) -> torch.Tensor:
        """Unit decoder rows [d_sae, d] in float32 on the SAE's device."""
        return self.sae.unit_directions().float()

    def cosines(self, rows: np.ndarray, cols: np.ndarray, exclude_self: bool = False) -> torch.Tensor:
        """Decoder cosines [len(rows), len(cols)] on the SAE's device; `exclude_self` sets a feature's
        cosine with itself (a feature in both sets) to -1, below any null."""
        d = self.directions()
        r, c = torch.as_tensor(rows, device=d.device), torch.as_tensor(cols, device=d.device)
        cos = d[r] @ d[c].T
        if exclude_self:
            cos[r[:, None] == c[None, :]] = -1.0
        return cos


def _check_features(cache: Path) -> None:
    import pyarrow.parquet as pq

    features = cache / "features.parquet"
    if not features.is_file():
        raise CacheError(f"{cache} has no features.parquet; build the cache with `featuregeom precompute`")
    try:
        columns = set(pq.read_schema(features).names)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid/OSError family for a damaged file
        raise CacheError(
            f"{features} is unreadable ({exc}); rebuild the cache with `featuregeom precompute`"
        ) from exc
    missing = sorted({"feature", "is_harmful", "is_task"} - columns)
    if missing:
        raise CacheError(
            f"{features} has no {', '.join(missing)} column: the scores step has not run on this cache; "
            f"run `featuregeom scores --out {cache}` (or `featuregeom precompute` with its scores step) first"
        )


def _check_null(cache: Path) -> None:
    neighbors = cache / "neighbors.npz"
    rerun_geometry = f"run `featuregeom geometry --sae SAE --out {cache}`"
    if not neighbors.is_file():
        raise CacheError(f"{cache} has no neighbors.npz (the null cosine); {rerun_geometry} first")
    try:
        with np.load(neighbors) as npz:
            has_null = "null_cosine" in npz.files
    except Exception as exc:  # a damaged archive: zipfile.BadZipFile, ValueError (not an .npz), OSError
        raise CacheError(f"{neighbors} is unreadable ({exc}); {rerun_geometry} again") from exc
    if not has_null:
        raise CacheError(f"{neighbors} has no null_cosine; {rerun_geometry} again")


def check_harm_cache(cache: str | Path) -> None:
    """Fail fast, before the SAE is loaded, when the cache lacks what risk, patch-back and triage read
    (harm/task sets, the null cosine), naming the step to run."""
    from precompute.cache import read_manifest

    cache = Path(cache)
    read_manifest(cache)
    _check_features(cache)
    _check_null(cache)


def load_harm_geometry(
    cache: str | Path | HarmGeometry,
    device: str = "cpu",
    d_model: int | None = None,
    model_name: str | None = None,
) -> HarmGeometry:
    """The cache's HarmGeometry (returned as is when given one). With `d_model`, the SAE is checked
    against the model it will read (`load_sae_for_model`)."""
    from precompute.cache import read_manifest
    from precompute.sae.registry import load_sae_for_model

    if isinstance(cache, HarmGeometry):
        return cache
    cache = Path(cache)
    check_harm_cache(cache)
    manifest = read_manifest(cache)
    features = pd.read_parquet(cache / "features.parquet").set_index("feature", drop=False)
    sae, _ = load_sae_for_model(
        manifest["sae"]["source"],
        manifest["sae"].get("format"),
        d_model=d_model,
        model_name=model_name,
        device=device,
    )
    null = float(np.load(cache / "neighbors.npz")["null_cosine"])
    return HarmGeometry(manifest, features, sae, null)
