"""Checkpoints of a bounded-disk harvest (`shard_storage = "recompute"`), so that a killed run does not
pay again for the model passes it finished: the aggregation's state after its two passes (per-feature,
not per-token), saved in the run's work folder beside `run.json` (whose fingerprint says which harvest
it belongs to) and used again only when the options that shaped it are the same (`key`). The passes
after it are not checkpointed: a rerun needs one pass for the token rows that choose the scores'
windows whatever it kept, and the examples share the next pass with the window maxima.

A checkpoint is `<name>.npz` (its arrays) and `<name>.json` (its other values, JSON, and its key),
written in that order, each atomically: the JSON's presence says the checkpoint is complete.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from precompute.atomic import write_atomic
from precompute.pipeline.context import log

T = TypeVar("T")
ARRAYS, VALUES = ".npz", ".json"


def key_of(*parts: Any) -> str:
    """A digest of the options (and inputs) a checkpointed result depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def save_state(path: Path, state: dict[str, Any], key: str, compress: bool = True) -> None:
    """`compress` False for a state read back at once (deflating gigabytes of arrays takes minutes)."""
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    values = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    savez = np.savez_compressed if compress else np.savez

    def write_arrays(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            savez(f, **arrays)  # type: ignore[arg-type]

    write_atomic(path.with_suffix(ARRAYS), write_arrays)
    payload = json.dumps({"key": key, "values": values})
    write_atomic(path.with_suffix(VALUES), lambda tmp: tmp.write_text(payload))


def load_state(path: Path, key: str) -> dict[str, Any] | None:
    """The state saved under `key`, or None (absent, incomplete, or saved under other options)."""
    values_file, arrays_file = path.with_suffix(VALUES), path.with_suffix(ARRAYS)
    if not values_file.is_file() or not arrays_file.is_file():
        return None
    try:
        record = json.loads(values_file.read_text())
        if record.get("key") != key:
            return None
        with np.load(arrays_file, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:  # damaged on disk: the passes run again
        log(f"ignoring the checkpoint {path.name} in {path.parent} ({type(exc).__name__}: {exc})")
        return None
    state.update(record["values"])
    return state


def resume_or_run(
    work_dir: Path | None,
    name: str,
    key: str,
    compute: Callable[[], T],
    to_state: Callable[[T], dict[str, Any]],
    from_state: Callable[[dict[str, Any]], T],
) -> T:
    """`compute()`, or its checkpoint from an earlier run of the same harvest; `work_dir` None: no
    checkpoint (a disk harvest resumes from its shards instead)."""
    if work_dir is None:
        return compute()
    path = work_dir / name
    state = load_state(path, key)
    if state is not None:
        log(f"resuming: {name} from its checkpoint in {work_dir} (its model passes are not run again)")
        return from_state(state)
    result = compute()
    save_state(path, to_state(result), key)
    return result


def remove_state(path: Path) -> None:
    path.with_suffix(VALUES).unlink(missing_ok=True)  # first: without it the arrays are not a checkpoint
    path.with_suffix(ARRAYS).unlink(missing_ok=True)


def has_checkpoints(work_dir: Path) -> bool:
    return any(work_dir.glob("*" + VALUES))


# ---------------------------------------------------------------- the two states the harvest saves
def aggregate_state(agg: dict[str, Any]) -> dict[str, Any]:
    """`aggregate`'s result as a state: its arrays, and its lists and counts as JSON."""
    return {k: (v if isinstance(v, np.ndarray) else _plain(v)) for k, v in agg.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def aggregate_from_state(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `aggregate_state`: (group, category) pairs are tuples again, as `aggregate` made them."""
    out = dict(state)
    for key in ("categories", "ctop_categories"):
        out[key] = [tuple(pair) for pair in state[key]]
    return out
