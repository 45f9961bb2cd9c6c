"""JSON-ready values for the synth report: NaN becomes null, numpy scalars plain numbers."""

from __future__ import annotations

import math
from typing import Any


def json_float(x: Any) -> float | None:
    """JSON-safe float (NaN -> None)."""
    x = float(x)
    return x if math.isfinite(x) else None


def jsonable(x: Any) -> Any:
    """`x` with every dict key a string, tuples as lists, numpy scalars as Python numbers, NaN as None."""
    import numpy as np

    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
