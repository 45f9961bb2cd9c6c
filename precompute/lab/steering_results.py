"""A steering check's result table (`featuregeom steer --out`): its columns, the fits per α, and the
file it is written to and read back from.

Torch-free on purpose (numpy, pandas, json only): the explorer reads these files without loading torch.
The measurement itself is `precompute.lab.steering`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from precompute.errors import FeatureGeomError

DEFAULT_ALPHAS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)  # in units of ALPHA_UNITS[0]
ALPHA_UNITS = ("norm", "rms", "abs")
SUBSETS = ("pre-activation", "all", "all (gated)", "active")
FEATURE_COLUMNS = (
    "alpha",
    "alpha_abs",
    "feature",
    "observed",
    "predicted",
    "predicted_gated",
    "observed_pre",
    "observed_switch",
    "interference",
    "active_frac",
    "switched_frac",
    "base_mean",
    "is_task",
)
SUMMARY_COLUMNS = ["alpha", "alpha_abs", "subset", "slope", "r2", "pearson_r", "n"]


# -------------------------------------------------------------------------------------------- fits
def fit_slope(observed: Any, predicted: Any) -> tuple[float, float, int]:
    """Least-squares slope of observed = slope · predicted (through the origin), its R², and n.

    R² is the centred one, 1 − Σ(y − b·x)² / Σ(y − ȳ)² (it can be negative for a bad fit). NaN
    where undefined (no points, all predictions zero, or constant observations not fit exactly).
    """
    x = np.asarray(predicted, dtype=np.float64).ravel()
    y = np.asarray(observed, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"observed has {y.size} values, predicted {x.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    sxx = float(x @ x)
    if n == 0 or sxx == 0.0:
        return math.nan, math.nan, n
    slope = float(x @ y) / sxx
    ss_res = float(((y - slope * x) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot == 0.0:
        r2 = 1.0 if ss_res <= 1e-30 else math.nan
    else:
        r2 = 1.0 - ss_res / ss_tot
    return slope, r2, n


def pearson_r(observed: Any, predicted: Any) -> float:
    x = np.asarray(predicted, dtype=np.float64).ravel()
    y = np.asarray(observed, dtype=np.float64).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per α and subset (SUBSETS): slope through the origin, R², Pearson r and n (see
    `precompute.lab.steering` for what each subset compares)."""
    rows = []
    for (alpha, alpha_abs), part in df.groupby(["alpha", "alpha_abs"], sort=True):
        active = part[part["active_frac"] > 0]
        pairs = {
            "pre-activation": (part["observed_pre"], part["predicted"]),
            "all": (part["observed"], part["predicted"]),
            "all (gated)": (part["observed"], part["predicted_gated"]),
            "active": (active["observed"], active["predicted_gated"]),
        }
        for subset, (y, x) in pairs.items():
            slope, r2, n = fit_slope(y, x)
            rows.append(
                {
                    "alpha": float(alpha),  # type: ignore[arg-type]  # pandas-stubs: group keys are Hashable
                    "alpha_abs": float(alpha_abs),  # type: ignore[arg-type]
                    "subset": subset,
                    "slope": slope,
                    "r2": r2,
                    "pearson_r": pearson_r(y, x),
                    "n": n,
                }
            )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# ------------------------------------------------------------------------------------------- files
def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def load_steering(path: str | Path) -> pd.DataFrame:
    """Read `save_steering`'s file back; meta and summary in `df.attrs`."""
    path = Path(path)
    if path.suffix == ".json":
        payload = json.loads(path.read_text())
        df = pd.DataFrame(payload["features"], columns=list(FEATURE_COLUMNS))
        df.attrs = {"meta": payload.get("meta", {}), "summary": payload.get("summary", [])}
        return df
    return pd.read_parquet(path)


def _is_steering_output(path: Path) -> bool:
    try:
        df = load_steering(path)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return "meta" in df.attrs and set(FEATURE_COLUMNS) <= set(df.columns)


def save_steering(df: pd.DataFrame, path: str | Path) -> Path:
    """`.json`: {"meta", "summary", "features"}; `.parquet`: the feature rows, meta/summary in attrs.

    Written atomically (a reader never sees half a file); an existing file is replaced only when it
    is an earlier steering output, never anything else."""
    from precompute.atomic import write_atomic

    path = Path(path)
    if path.suffix not in (".json", ".parquet"):
        raise FeatureGeomError(f"--out must end in .json or .parquet, got {path.name!r}")
    if path.exists() and not (path.is_file() and _is_steering_output(path)):
        raise FeatureGeomError(
            f"--out {path} exists and is not an earlier steering output; featuregeom never "
            "replaces it. Choose another --out"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    meta, summary = df.attrs.get("meta", {}), df.attrs.get("summary") or summarize(df).to_dict("records")

    def write(tmp: Path) -> None:
        if path.suffix == ".json":
            payload = {"meta": meta, "summary": summary, "features": df.to_dict("records")}
            tmp.write_text(json.dumps(_clean(payload), indent=1))
        else:
            out = df.copy()
            out.attrs = {"meta": _clean(meta), "summary": _clean(summary)}
            out.to_parquet(tmp, index=False)

    return write_atomic(path, write)
