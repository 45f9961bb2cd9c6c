"""The cache directory: the contract between precompute/ and explorer/ (`precompute.schema`).

Writes are atomic at the level of the whole directory: a step builds a staging copy (hard links
for files it does not touch), writes its files there, rewrites manifest.json with a sha256 of
every file, and swaps the staging directory into place. A reader checks the schema version and,
on request, every checksum, so it never uses half a cache.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from precompute import __version__
from precompute.errors import CacheError
from precompute.provenance import sha256_of
from precompute.schema import CORE_FILES, LAB_DIRS, MANIFEST, SCHEMA_VERSION, params_file

__all__ = ["CORE_FILES", "LAB_DIRS", "MANIFEST", "SCHEMA_VERSION", "sha256_of"]


def _is_lab_file(relative: Path) -> bool:
    return len(relative.parts) > 1 and relative.parts[0] in LAB_DIRS


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not cache_dir.is_dir():
        raise CacheError(
            f"cache directory {cache_dir} does not exist; build one with `featuregeom precompute`"
        )
    if not path.is_file():
        raise CacheError(
            f"{cache_dir} has no {MANIFEST}: it is not a featuregeom cache, or a run was interrupted before "
            "it finished. Rerun the same `featuregeom precompute` command (it resumes) or pass --overwrite."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path} is not valid JSON ({exc}); rebuild the cache with --overwrite") from exc
    except OSError as exc:
        raise CacheError(f"{path} cannot be read ({exc.strerror}); check its permissions") from exc
    if not isinstance(manifest, dict):
        raise CacheError(
            f"{path} is not a featuregeom manifest (a JSON object); rebuild the cache with --overwrite"
        )
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise CacheError(
            f"{path}: 'files' must map each file name to its sha256; rebuild the cache with --overwrite"
        )
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CacheError(
            f"{cache_dir} has cache schema_version {version!r}, this tool reads version {SCHEMA_VERSION}; "
            f"rebuild it with this version of featuregeom (`featuregeom precompute ... --overwrite`)"
        )
    return manifest


def _files_on_disk(cache_dir: Path) -> list[str]:
    return sorted(
        str(p.relative_to(cache_dir))
        for p in cache_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST and not _is_lab_file(p.relative_to(cache_dir))
    )


def verify_cache(cache_dir: str | Path, files: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Check schema version and sha256 of `files` (every file in the directory when None).

    A file present on disk must be recorded with its checksum: a manifest that lists nothing
    (`"files": {}`) must not vouch for files it never saw."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    recorded: dict[str, str] = manifest.get("files", {})
    present = _files_on_disk(cache_dir) if files is None else [f for f in files if (cache_dir / f).is_file()]
    unrecorded = [f for f in present if f not in recorded]
    if unrecorded:
        raise CacheError(
            f"{cache_dir} holds {', '.join(unrecorded[:5])}{' ...' if len(unrecorded) > 5 else ''} without a "
            f"checksum in {MANIFEST}: the cache was edited or not written by featuregeom. Rebuild it with "
            "`featuregeom precompute ... --overwrite`"
        )
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

    def record_step(
        self, step: str, params: dict[str, Any], seconds: float, extra: dict | None = None
    ) -> None:
        sidecar = {"step": step, "params": params, "seconds": round(seconds, 3), "finished": now_iso()}
        if extra:
            sidecar.update(extra)
        self.path(params_file(step)).write_text(json.dumps(sidecar, indent=2, default=str))
        self.manifest.setdefault("params", {})[step] = params
        self.manifest.setdefault("timings", {})[step] = round(seconds, 3)
        steps = self.manifest.setdefault("steps", [])
        if step not in steps:
            steps.append(step)

    def commit(self) -> None:
        files = {}
        for p in sorted(self.dir.rglob("*")):
            if p.is_file() and p.name != MANIFEST and not _is_lab_file(p.relative_to(self.dir)):
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


def is_cache_dir(path: str | Path) -> bool:
    """Does `path` hold a featuregeom cache (of any schema version)? Only such a directory may ever be
    replaced by --overwrite: a user's folder is never deleted."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "schema_version" in manifest


# ------------------------------------------------------------------------------ one writer per output
_held_locks: dict[Path, tuple[int, int]] = {}  # lock file -> (fd, depth): re-entrant within a process
_STAGING_SUFFIX = re.compile(r"[a-z0-9_]{8}")  # what tempfile.mkdtemp appends


def cache_root() -> Path:
    """featuregeom's own per-user directory (converted models, locks); FEATUREGEOM_HOME overrides it."""
    return Path(os.environ.get("FEATUREGEOM_HOME", Path.home() / ".cache" / "featuregeom"))


def lock_path(target: Path) -> Path:
    """Locks live in featuregeom's own directory, keyed by the output's real path, so nothing is left
    beside a user's output."""
    key = hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:24]
    return cache_root() / "locks" / f"{key}.lock"


def _remove_stale_staging(target: Path) -> None:
    """Staging and swap leftovers of this output from a run that was killed (SIGKILL, power loss).
    Called with the output's lock held, so no live run owns them."""
    for p in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        if p.is_dir() and _STAGING_SUFFIX.fullmatch(p.name[len(f".{target.name}.tmp-") :]):
            shutil.rmtree(p, ignore_errors=True)
    for p in target.parent.glob(f"{glob.escape(target.name)}.old-*"):
        if p.is_dir() and re.fullmatch(r"[0-9a-f]{8}", p.name[len(f"{target.name}.old-") :]):
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def output_lock(target: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `target` for the whole run: a second run on the same output is
    refused at once (it would share staging and work directories), instead of one deleting what the
    other still needs. The (empty) lock file stays in cache_root()/locks: removing it would race."""
    target = Path(target).absolute()
    lock = lock_path(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    if lock in _held_locks:
        fd, depth = _held_locks[lock]
        _held_locks[lock] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held_locks[lock]
            _held_locks[lock] = (fd, depth - 1)
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CacheError(
            f"another featuregeom run is writing {target} right now (lock {lock}); wait for it to "
            "finish, or choose another --out"
        ) from None
    _held_locks[lock] = (fd, 1)
    try:
        _remove_stale_staging(target)
        yield
    finally:
        del _held_locks[lock]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def check_writable_parent(out: Path) -> None:
    """Fail before any work when --out cannot be written (under a file, read-only, /proc)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.rmdir(probe)
    except OSError as exc:
        raise CacheError(
            f"cannot write --out {out}: {exc.strerror or exc} ({exc.filename or out.parent}); "
            "choose a writable directory"
        ) from exc


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(target.name + ".old-" + os.urandom(4).hex())
    os.replace(target, old)  # two renames: a reader sees the old cache, nothing, or the new one
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def check_replaceable(out: Path, what: str, is_ours: Callable[[Path], bool], missing: str = "") -> None:
    """`out` may be replaced only when it is missing, empty, or an earlier output of the same kind
    (`is_ours(out)`): never a user's folder or file, whatever flag was given. `missing` names what such
    an output would hold, for the message."""
    if not out.exists():
        return
    if not out.is_dir():
        raise CacheError(f"--out {out} exists and is not a directory; choose another path")
    if any(out.iterdir()) and not is_ours(out):
        raise CacheError(
            f"--out {out} is a non-empty directory that is not a {what}{missing}; featuregeom never "
            "replaces such a directory, even with --overwrite. Choose a new or empty --out"
        )


def check_replaceable_output(out: str | Path, marker: str, what: str) -> None:
    """check_replaceable for an output identified by its sidecar `marker`: call it before the work, so
    a refused --out costs nothing."""
    check_replaceable(Path(out), what, lambda d: (d / marker).is_file(), f" (no {marker})")


def write_dir_atomic(
    out: str | Path, write: Callable[[Path], None], marker: str, what: str = "featuregeom output"
) -> Path:
    """Fill a fresh staging directory with `write(staging)`, then swap it into `out`: readers see the old
    folder, nothing, or the new one, and a killed run leaves only a `.NAME.tmp-*` folder that the next
    run on `out` removes. `out` is replaced only if it is an earlier output holding `marker`."""
    out = Path(out)
    with output_lock(out):
        check_replaceable_output(out, marker, what)
        check_writable_parent(out)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            write(staging)
            if not (staging / marker).is_file():
                raise AssertionError(f"writer of {what} did not write its marker {marker}")
            os.chmod(staging, 0o755)  # mkdtemp makes 0700
            _swap_into_place(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out


@contextmanager
def stage(
    target: str | Path, fresh: bool = False, base_manifest: dict | None = None
) -> Iterator[StagedCache]:
    """Open a staging copy of `target` (empty when `fresh`), yield it, discard it on error."""
    target = Path(target)
    with output_lock(target):
        check_replaceable(target, "featuregeom cache", is_cache_dir)
        check_writable_parent(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        yield from _stage_in(target, staging, fresh, base_manifest)


def _stage_in(target: Path, staging: Path, fresh: bool, base_manifest: dict | None) -> Iterator[StagedCache]:
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
    """Refuse to write over a directory that holds a different cache (without --overwrite) or anything
    that is not a featuregeom cache (even with --overwrite: a user's folder is never deleted)."""
    out = Path(out)
    if not out.exists():
        check_writable_parent(out)
        return
    check_replaceable(out, "featuregeom cache", is_cache_dir)
    if overwrite or not any(out.iterdir()):
        return
    manifest = read_manifest(out)
    theirs = manifest.get("identity", {})
    if theirs and theirs != identity:
        diff = sorted(k for k in set(theirs) | set(identity) if theirs.get(k) != identity.get(k))
        raise CacheError(
            f"--out {out} already holds a different cache (differs in: {', '.join(diff)}); "
            "pass --overwrite to replace it, or choose another --out"
        )
