"""Checking a file against the contract: one clear CacheError naming what is missing and the step to rerun."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from precompute.errors import CacheError
from precompute.schema.contract import ARCHIVES, BOOL, JSON_FILES, NULL, STEPS, STRING, TABLES, Column


# ------------------------------------------------------------------------------ checking a file
def _step_names(steps: Iterable[str]) -> str:
    """'the geometry step', 'the harvest and scores steps', in pipeline order."""
    given = set(steps)
    names = [s for s in STEPS if s in given]
    if len(names) == 1:
        return f"the {names[0]} step"
    return f"the {', '.join(names[:-1])} and {names[-1]} steps"


def _rebuild_hint(steps: Iterable[str]) -> str:
    given = set(steps)
    reruns = ", then ".join(f"`featuregeom {s}`" for s in STEPS if s in given)
    return (
        "rebuild the cache with this version of featuregeom (`featuregeom precompute ... --overwrite`, "
        f"or rerun {reruns} on it)"
    )


def table_problems(file: str, dtypes: Mapping[str, str]) -> tuple[list[Column], list[tuple[Column, str]]]:
    """(required columns missing, (column, its type on disk) for each of the wrong type) of table `file`
    (a name in TABLES) whose columns have the logical `dtypes` (see parquet_dtypes). Columns the
    contract does not know are allowed: a cache may be extended, never renamed."""
    spec = TABLES[file]
    missing = [c for c in spec.required if c.name not in dtypes]
    wrong = []
    for name, dtype in dtypes.items():
        col = spec.column(name)
        if col is not None and not col.accepts(dtype):
            wrong.append((Column(name, col.dtype, col.step, col.nullable, col.when), dtype))
    return missing, wrong


def check_table(file: str, dtypes: Mapping[str, str], where: str | Path | None = None) -> None:
    """Raise CacheError naming each missing required column (and the step that writes it), or each
    column of the wrong type, of table `file`; `where` is the path for the message."""
    missing, wrong = table_problems(file, dtypes)
    if missing:
        steps = [c.step for c in missing]
        raise CacheError(
            f"{where or file} lacks the column(s) {', '.join(c.name for c in missing)} (written by "
            f"{_step_names(steps)}; docs/cache.md): {_rebuild_hint(steps)}"
        )
    if wrong:
        what = "; ".join(f"column {c.name} is {dtype}, the cache format says {c.dtype}" for c, dtype in wrong)
        raise CacheError(
            f"{where or file}: {what} (docs/cache.md): {_rebuild_hint(c.step for c, _ in wrong)}"
        )


def check_archive(
    file: str, arrays: Mapping[str, tuple[str, tuple[int, ...]]], where: str | Path | None = None
) -> None:
    """Raise CacheError when npz `file` (a name in ARCHIVES) lacks an array or holds one of the wrong
    type or number of axes; `arrays` maps each array's name to (dtype, shape) (see npz_arrays)."""
    spec = ARCHIVES[file]
    missing = [a.name for a in spec.arrays if a.name not in arrays and not a.optional]
    if missing:
        raise CacheError(
            f"{where or file} lacks the array(s) {', '.join(missing)} (written by {_step_names([spec.step])}; "
            f"docs/cache.md): {_rebuild_hint([spec.step])}"
        )
    wrong = [
        f"{a.name} is {arrays[a.name][0]} with {len(arrays[a.name][1])} axes, the cache format says "
        f"{a.dtype} with {len(a.shape)}"
        for a in spec.arrays
        if a.name in arrays and (arrays[a.name][0], len(arrays[a.name][1])) != (a.dtype, len(a.shape))
    ]
    if wrong:
        raise CacheError(f"{where or file}: {'; '.join(wrong)} (docs/cache.md): {_rebuild_hint([spec.step])}")


_JSON_KINDS: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "number": (int, float),
    "integer": int,
    "string": str,
    "boolean": bool,
}


def check_json(file: str, data: Any, where: str | Path | None = None) -> None:
    """Raise CacheError when the JSON result `file` (a name in JSON_FILES), parsed as `data`, lacks a
    key or holds one of the wrong kind (a bool is not a number; null only where the key is nullable)."""
    spec, data = JSON_FILES[file], data if isinstance(data, dict) else {}
    rerun = _rebuild_hint([spec.step])
    missing = [k.name for k in spec.keys if k.name not in data]
    if missing:
        raise CacheError(
            f"{where or file} lacks the key(s) {', '.join(missing)} (written by {_step_names([spec.step])}; "
            f"docs/cache.md): {rerun}"
        )
    wrong = [
        f"{k.name} is {type(v).__name__}, the cache format says {k.kind}"
        for k, v in ((k, data[k.name]) for k in spec.keys)
        if not (v is None and k.nullable)
        and (not isinstance(v, _JSON_KINDS[k.kind]) or (isinstance(v, bool) and k.kind != "boolean"))
    ]
    if wrong:
        raise CacheError(f"{where or file}: {'; '.join(wrong)} (docs/cache.md): {rerun}")


# ------------------------------------------------------------------------------ reading types from disk
def arrow_dtype(dtype: Any) -> str:
    """The logical name of a pyarrow DataType (`large_string` -> "string", `list<float>` -> "list<float32>")."""
    import pyarrow as pa

    if pa.types.is_dictionary(dtype):
        return arrow_dtype(dtype.value_type)
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return STRING
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
        return f"list<{arrow_dtype(dtype.value_type)}>"
    if pa.types.is_floating(dtype):
        return f"float{dtype.bit_width}"
    return {"bool": BOOL, "null": NULL}.get(str(dtype), str(dtype))


def arrow_dtypes(arrow_schema: Any) -> dict[str, str]:
    """Column name -> logical type of a pyarrow Schema."""
    return {name: arrow_dtype(t) for name, t in zip(arrow_schema.names, arrow_schema.types, strict=True)}


def parquet_dtypes(path: str | Path) -> dict[str, str]:
    """Column name -> logical type of a parquet file, from its footer (no data is read)."""
    import pyarrow.parquet as pq

    return arrow_dtypes(pq.read_schema(path))


def npz_arrays(path: str | Path, step: str = "") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Array name -> (dtype, shape) of an npz file, from each array's header (no data is read).
    CacheError when the file is not an npz archive (`step`: the step that writes it, for the message)."""
    import zipfile

    import numpy as np

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                # a numpy unicode array ('<U10', any width) is the logical "string"
                name = STRING if np.dtype(dtype).kind == "U" else str(dtype)
                out[info.filename[: -len(".npy")]] = (name, tuple(shape))
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        rerun = f"rerun the {step} step" if step else "rerun the step that writes it"
        raise CacheError(f"{path} is not a readable npz file ({exc}); {rerun}") from exc
    return out


def check_parquet(path: str | Path, name: str) -> None:
    """check_table() on the parquet file at `path`, which holds table `name` (a key of TABLES)."""
    check_table(name, parquet_dtypes(path), path)


def check_npz(path: str | Path, name: str) -> None:
    """check_archive() on the npz file at `path`, which holds archive `name` (a key of ARCHIVES)."""
    check_archive(name, npz_arrays(path, ARCHIVES[name].step), path)


def check_files(cache_dir: str | Path, names: Iterable[str]) -> None:
    """Check each named file of a cache (a table, archive or JSON result of the contract) against the
    contract: CacheError naming the first file that is missing or out of date, with the step to rerun."""
    import json

    cache_dir = Path(cache_dir)
    for name in names:
        path = cache_dir / name
        if not path.is_file():
            raise CacheError(f"{cache_dir} has no {name} (docs/cache.md)")
        if name in TABLES:
            check_parquet(path, name)
        elif name in ARCHIVES:
            check_npz(path, name)
        else:
            check_json(name, json.loads(path.read_text(encoding="utf-8")), path)
