"""closeness.json (the closeness step's set-level test) and stability.json (the stability step's
pairs across SAE seeds), read and checked (docs/cache.md).

Each file is optional to the explorer (a cache built before the step has none). When present it is
checked like the cache's other files: its checksum against the manifest, its keys against
`precompute.schema.JSON_FILES`, so a page never shows numbers from a damaged or foreign file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from precompute import schema
from precompute.cache import verify_cache
from precompute.errors import CacheError


def _read_result(cache_dir: str | Path, name: str) -> dict[str, Any] | None:
    """The parsed JSON result `name` of a cache, None when its step has not run; CacheError when the
    file does not match its checksum or the cache format."""
    cache_dir = Path(cache_dir)
    path = cache_dir / name
    if not path.is_file():
        return None
    verify_cache(cache_dir, (name,))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        step = schema.JSON_FILES[name].step
        raise CacheError(f"{path} is not readable JSON ({exc}); rerun `featuregeom {step}`") from exc
    schema.check_json(name, data, path)
    return data


def read_closeness(cache_dir: str | Path) -> dict[str, Any] | None:
    """closeness.json, checked; None when the closeness step has not run."""
    return _read_result(cache_dir, schema.CLOSENESS)


def read_stability(cache_dir: str | Path) -> dict[str, Any] | None:
    """stability.json, checked; None when the stability step had no replicate SAE."""
    return _read_result(cache_dir, schema.STABILITY)
