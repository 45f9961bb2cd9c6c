"""closeness.json: the closeness step's set-level test (docs/cache.md), read and checked.

The file is optional to the explorer (a cache built before the step has none). When present it is
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


def read_closeness(cache_dir: str | Path) -> dict[str, Any] | None:
    """The parsed closeness.json of a cache, None when the step has not run; CacheError when the file
    does not match its checksum or the cache format."""
    cache_dir = Path(cache_dir)
    path = cache_dir / schema.CLOSENESS
    if not path.is_file():
        return None
    verify_cache(cache_dir, (schema.CLOSENESS,))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path} is not readable JSON ({exc}); rerun `featuregeom closeness`") from exc
    schema.check_json(schema.CLOSENESS, data, path)
    return data
