"""Provenance recorded with every output: content hashes of inputs and the library versions that ran."""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from precompute import __version__

# What a cache's numbers depend on; recorded in its manifest so a difference can be traced.
CACHE_LIBRARIES = ("torch", "transformers", "numpy", "pandas", "umap-learn", "faiss-cpu", "gguf")


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Files beside a model's weights that describe it without changing what it computes: editing a
# README or re-running an evaluation must not give the SAE a new identity (and its caches new
# fingerprints).
DESCRIPTIVE_SUFFIXES = (".md", ".txt", ".rst", ".png", ".jpg", ".svg", ".html")
DESCRIPTIVE_NAMES = ("training_report.json",)


def is_descriptive(path: Path) -> bool:
    return path.suffix.lower() in DESCRIPTIVE_SUFFIXES or path.name in DESCRIPTIVE_NAMES


def hash_path(path: str | Path, skip: Callable[[Path], bool] | None = None) -> str | None:
    """sha256 of a file, or of a directory's files (relative names + contents, sorted) other than
    those `skip` names; None when absent."""
    p = Path(path)
    if p.is_file():
        return sha256_of(p)
    if p.is_dir():
        h = hashlib.sha256()
        files = (q for q in p.rglob("*") if q.is_file() and not (skip and skip(q.relative_to(p))))
        for f in sorted(files):
            h.update(str(f.relative_to(p)).encode())
            h.update(sha256_of(f).encode())
        return h.hexdigest()
    return None


def library_versions(
    names: tuple[str, ...] = CACHE_LIBRARIES, *, featuregeom: bool = False
) -> dict[str, str]:
    """Python's version plus each installed distribution in `names` (missing ones are left out)."""
    out = {"python": platform.python_version()}
    if featuregeom:
        out["featuregeom"] = __version__
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
