"""Feature labels imported from a Neuronpedia export (a directory of explanation/feature batches, or
one JSON/JSONL file of explanation objects)."""

from __future__ import annotations

import gzip
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from precompute.errors import CorpusError

_BATCH_RE = re.compile(r"batch-(\d+)\.jsonl?(\.gz)?$")


def _open_text(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_json_records(path: Path) -> Iterator[Any]:
    """Objects of a JSON file (a list, or one object) or a JSONL file (one object a line)."""
    try:
        with _open_text(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise CorpusError(f"cannot read Neuronpedia export {path}: {e}") from e
    stripped = text.lstrip()
    if not stripped:
        return
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError:
        data = None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(
                    f"{path} line {lineno} is not JSON ({e.msg}); expected a Neuronpedia export "
                    "(JSON list or JSONL of explanation objects)"
                ) from e
        return
    if isinstance(data, list):
        yield from data
    else:
        yield data


def _explanations_in(record: Any) -> Iterator[dict]:
    """Explanation objects in one record: the record itself, or a feature's `explanations` list."""
    if not isinstance(record, dict):
        return
    if "description" in record and "index" in record:
        yield record
    nested = record.get("explanations")
    if isinstance(nested, list):
        for e in nested:
            if isinstance(e, dict) and "description" in e:
                if "index" not in e and "index" in record:
                    e = {**e, "index": record["index"]}
                if "layer" not in e and "layer" in record:
                    e = {**e, "layer": record["layer"]}
                if "modelId" not in e and "modelId" in record:
                    e = {**e, "modelId": record["modelId"]}
                yield e


def _batch_files(directory: Path) -> list[Path]:
    files = [p for p in directory.iterdir() if p.is_file() and _BATCH_RE.search(p.name)]
    return sorted(files, key=lambda p: (int(_BATCH_RE.search(p.name).group(1)), p.name))  # type: ignore[union-attr]


def _export_files(path: Path) -> list[Path]:
    """JSON(L) files of an export directory: explanations/ first, then features/."""
    roots = sorted(
        {
            p.parent.parent
            for sub in ("explanations", "features")
            for p in path.rglob(f"{sub}/batch-*")
            if _BATCH_RE.search(p.name)
        }
    )
    if not roots:
        raise CorpusError(
            f"{path} is not a Neuronpedia export: no explanations/batch-N.jsonl(.gz) or features/batch-N.jsonl(.gz) "
            "found under it; pass the export's source directory (exports/MODEL/SOURCE) or a JSON/JSONL file of "
            "explanations"
        )
    if len(roots) > 1:
        raise CorpusError(
            f"{path} holds {len(roots)} Neuronpedia sources ({', '.join(str(r) for r in roots[:4])}"
            f"{', ...' if len(roots) > 4 else ''}); pass the directory of the one that matches this SAE"
        )
    root = roots[0]
    files: list[Path] = []
    for sub in ("explanations", "features"):
        if (root / sub).is_dir():
            files.extend(_batch_files(root / sub))
    return files


@dataclass
class _Explanations:
    """Descriptions per feature index gathered from explanation objects, and what was skipped."""

    n_features: int
    descriptions: dict[int, list[str]] = field(default_factory=dict)
    sources: set[tuple[str, str]] = field(default_factory=set)  # (modelId, layer) pairs met
    n_records: int = 0
    n_expl: int = 0
    n_out_of_range: int = 0
    n_bad_index: int = 0

    def add(self, e: dict) -> None:
        self.n_expl += 1
        if e.get("modelId") is not None or e.get("layer") is not None:
            self.sources.add((str(e.get("modelId")), str(e.get("layer"))))
        try:
            index = int(str(e["index"]).strip())
        except (TypeError, ValueError):
            self.n_bad_index += 1
            return
        if index < 0:
            self.n_bad_index += 1
            return
        if index >= self.n_features:
            self.n_out_of_range += 1
            return
        desc = e.get("description")
        if not isinstance(desc, str) or not desc.strip():
            return
        lst = self.descriptions.setdefault(index, [])
        desc = desc.strip()
        if desc not in lst:
            lst.append(desc)


def import_neuronpedia(path: str | Path, n_features: int) -> pd.DataFrame:
    """Feature labels from a Neuronpedia export: DataFrame[feature int64, label, explanation].

    `path` is either an export directory (`explanations/batch-N.jsonl(.gz)` and/or
    `features/batch-N.jsonl(.gz)`, as written by neuronpedia-utils `export-data.py`; a parent
    holding exactly one such source also works) or one JSON / JSONL file (gzip or not) holding
    explanation objects (`index`, `description`, optionally `typeName`, `explanationModelName`,
    `modelId`, `layer`), or feature objects with an `explanations` list (the API's feature JSON).

    One row per feature that has a non-empty description, sorted by feature. `label` is the first
    description met in reading order (explanation batches in batch order, then feature batches);
    `explanation` is every distinct description of the feature, in that order, joined with " | ".
    The first-met rule is deterministic and keeps the label Neuronpedia lists first (the export
    is ordered by index, then by insertion); no explanation score is exported to choose better.
    Indices >= n_features are ignored with one warning giving the count. Raises CorpusError when
    the path holds no explanation objects at all, or mixes several SAEs (model/layer pairs).
    """
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"Neuronpedia export {path} does not exist")
    files = _export_files(path) if path.is_dir() else [path]

    found = _Explanations(n_features)
    for file in files:
        records: Iterable[Any] = _read_json_records(file)
        for record in records:
            found.n_records += 1
            for e in _explanations_in(record):
                found.add(e)
    if found.n_expl == 0:
        if path.is_dir() and found.n_records:
            warnings.warn(
                f"Neuronpedia export {path} has feature records but no explanations; no labels imported",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            raise CorpusError(
                f"{path} is not a Neuronpedia export: found {found.n_records} record(s) but none with `index` and "
                '`description` (expected explanation objects like {"index": "12", "description": ...})'
            )
    if len(found.sources) > 1:
        listed = ", ".join(f"{m}/{layer}" for m, layer in sorted(found.sources)[:4])
        raise CorpusError(
            f"{path} mixes explanations of {len(found.sources)} SAEs ({listed}); pass an export of the one "
            "SAE this cache uses"
        )
    if found.n_out_of_range:
        warnings.warn(
            f"ignored {found.n_out_of_range} Neuronpedia explanation(s) with index >= n_features ({n_features}); "
            "is the export for a different (wider) SAE?",
            RuntimeWarning,
            stacklevel=2,
        )
    if found.n_bad_index:
        warnings.warn(
            f"ignored {found.n_bad_index} Neuronpedia explanation(s) with a missing or non-integer index",
            RuntimeWarning,
            stacklevel=2,
        )
    feats = sorted(found.descriptions)
    source = _label_sources(path, files) if path.is_dir() else {}
    return pd.DataFrame(
        {
            "feature": np.asarray(feats, dtype=np.int64),
            "label": pd.Series([found.descriptions[f][0] for f in feats], dtype=object),
            "explanation": pd.Series([" | ".join(found.descriptions[f]) for f in feats], dtype=object),
            "label_source": pd.Series([source.get(f, IMPORTED) for f in feats], dtype=object),
        }
    )


IMPORTED = "neuronpedia"  # the label_source of a label read from Neuronpedia
EXPORT_MARKER = "featuregeom-export.json"  # written by `featuregeom export --neuronpedia` (precompute/export)


def _label_sources(path: Path, files: list[Path]) -> dict[int, str]:
    """feature -> where its label came from, when the export is one `featuregeom export` wrote: its
    marker (at DIR, two levels above the source directory) lists them (`label_sources`). A label it
    computed (e.g. from peak tokens) comes back as computed, not as a Neuronpedia explanation."""
    roots = {f.parent.parent for f in files}
    candidates = [path / EXPORT_MARKER, *(r.parent.parent / EXPORT_MARKER for r in roots)]
    for marker in candidates:
        if marker.is_file():
            try:
                listed = json.loads(marker.read_text(encoding="utf-8")).get("label_sources") or {}
            except (OSError, ValueError, AttributeError):
                return {}
            return {
                int(f): str(src)
                for src, feats in listed.items()
                if isinstance(feats, list)
                for f in feats
                if isinstance(f, int)
            }
    return {}
