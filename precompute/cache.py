"""The cache directory: the contract between precompute/ and explorer/ (schema_version 1).

Writes are atomic at the level of the whole directory: a step builds a staging copy (hard links
for files it does not touch), writes its files there, rewrites manifest.json with a sha256 of
every file, and swaps the staging directory into place. A reader checks the schema version and,
on request, every checksum, so it never uses half a cache.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from precompute import SCHEMA_VERSION, __version__
from precompute.errors import CacheError

MANIFEST = "manifest.json"
# Files whose checksums are verified on every open (cheap, and what the explorer reads).
CORE_FILES = ("features.parquet", "neighbors.npz", "examples.parquet", "overlaps.parquet")


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not cache_dir.is_dir():
        raise CacheError(f"cache directory {cache_dir} does not exist; build one with `featuregeom precompute`")
    if not path.is_file():
        raise CacheError(
            f"{cache_dir} has no {MANIFEST}: it is not a featuregeom cache, or a run was interrupted before "
            "it finished. Rerun the same `featuregeom precompute` command (it resumes) or pass --overwrite."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path} is not valid JSON ({exc}); rebuild the cache with --overwrite") from exc
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CacheError(
            f"{cache_dir} has cache schema_version {version!r}, this tool reads version {SCHEMA_VERSION}; "
            f"rebuild it with this version of featuregeom (`featuregeom precompute ... --overwrite`)"
        )
    return manifest


def verify_cache(cache_dir: str | Path, files: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Check schema version and sha256 of `files` (all recorded files when None)."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    recorded: dict[str, str] = manifest.get("files", {})
    names = list(recorded) if files is None else [f for f in files if f in recorded]
    for name in names:
        path = cache_dir / name
        if not path.is_file():
            raise CacheError(f"{path} is listed in the manifest but missing; rerun the step that writes it")
        if sha256_of(path) != recorded[name]:
            raise CacheError(
                f"{path} does not match the checksum in {MANIFEST}: the file was changed or only partly "
                "written. Rerun the step that writes it (see manifest 'steps'), or rebuild with --overwrite."
            )
    return manifest


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class StagedCache:
    """A writable staging copy of a cache; `commit()` swaps it into place atomically."""

    def __init__(self, target: Path, staging: Path, manifest: dict[str, Any]):
        self.target = target
        self.dir = staging
        self.manifest = manifest

    def path(self, name: str) -> Path:
        p = self.dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists():  # never write through a hard link into the live cache
            p.unlink()
        return p

    def record_step(self, step: str, params: dict[str, Any], seconds: float, extra: dict | None = None) -> None:
        sidecar = {"step": step, "params": params, "seconds": round(seconds, 3), "finished": now_iso()}
        if extra:
            sidecar.update(extra)
        self.path(f"params/{step}.json").write_text(json.dumps(sidecar, indent=2, default=str))
        self.manifest.setdefault("params", {})[step] = params
        self.manifest.setdefault("timings", {})[step] = round(seconds, 3)
        steps = self.manifest.setdefault("steps", [])
        if step not in steps:
            steps.append(step)

    def commit(self) -> None:
        files = {}
        for p in sorted(self.dir.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                files[str(p.relative_to(self.dir))] = sha256_of(p)
        self.manifest["files"] = files
        self.manifest["schema_version"] = SCHEMA_VERSION
        self.manifest["tool_version"] = __version__
        self.manifest["updated"] = now_iso()
        self.manifest.setdefault("created", self.manifest["updated"])
        os.chmod(self.dir, 0o755)  # mkdtemp makes 0700; a cache is meant to be shared read-only
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2, default=str))
        os.replace(tmp, self.dir / MANIFEST)
        _swap_into_place(self.dir, self.target)


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(target.name + ".old-" + os.urandom(4).hex())
    os.replace(target, old)  # two renames: a reader sees the old cache, nothing, or the new one
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def write_dir_atomic(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a fresh staging directory with `write(staging)`, then swap it into `out`: readers see the old
    folder, nothing, or the new one, and a killed run leaves only a `.NAME.tmp-*` folder (ignored)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(staging)
        os.chmod(staging, 0o755)  # mkdtemp makes 0700
        _swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


@contextmanager
def stage(target: str | Path, fresh: bool = False, base_manifest: dict | None = None) -> Iterator[StagedCache]:
    """Open a staging copy of `target` (empty when `fresh`), yield it, discard it on error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # An existing empty directory (which check_output_dir accepts) starts a new cache too.
        if fresh or not target.exists() or (target.is_dir() and not any(target.iterdir())):
            manifest = dict(base_manifest or {})
        else:
            manifest = read_manifest(target)
            for p in target.rglob("*"):
                if p.is_file() and p.name != MANIFEST:
                    _link_or_copy(p, staging / p.relative_to(target))
        yield StagedCache(target, staging, manifest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def check_output_dir(out: str | Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Refuse to write over a directory that holds a different cache (or anything else)."""
    out = Path(out)
    if not out.exists() or overwrite:
        return
    if not out.is_dir():
        raise CacheError(f"--out {out} exists and is not a directory; choose another path")
    if not (out / MANIFEST).is_file():
        if any(out.iterdir()):
            raise CacheError(
                f"--out {out} is a non-empty directory that is not a featuregeom cache; "
                "choose an empty or new directory (or pass --overwrite to replace it)"
            )
        return
    manifest = read_manifest(out)
    theirs = manifest.get("identity", {})
    if theirs and theirs != identity:
        diff = sorted(k for k in set(theirs) | set(identity) if theirs.get(k) != identity.get(k))
        raise CacheError(
            f"--out {out} already holds a different cache (differs in: {', '.join(diff)}); "
            "pass --overwrite to replace it, or choose another --out"
        )
