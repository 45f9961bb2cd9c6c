"""The cache directory: staging and atomic commit, checksums, schema version, and --out checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from precompute import SCHEMA_VERSION, __version__
from precompute.cache import (
    MANIFEST,
    check_output_dir,
    read_manifest,
    sha256_of,
    stage,
    verify_cache,
)
from precompute.errors import CacheError

IDENTITY = {"model": "tiny", "sae": "sae-a", "hook": "blocks.1.hook_resid_post"}


def make_cache(target, files=None, identity=IDENTITY):
    files = files or {"features.parquet": b"features-v1", "harvest/shard-0.npz": b"shard-0"}
    with stage(target, fresh=True, base_manifest={"identity": identity}) as staged:
        for name, data in files.items():
            staged.path(name).write_bytes(data)
        staged.record_step("harvest", {"batch_size": 4}, 1.23456)
        staged.commit()
    return target


def leftovers(parent, target):
    return sorted(p.name for p in parent.iterdir() if p.name != target.name)


def test_commit_writes_a_verified_manifest(tmp_path):
    target = make_cache(tmp_path / "cache")
    manifest = verify_cache(target)
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["tool_version"] == __version__
    assert manifest["identity"] == IDENTITY
    assert manifest["files"] == {
        "features.parquet": sha256_of(target / "features.parquet"),
        "harvest/shard-0.npz": sha256_of(target / "harvest" / "shard-0.npz"),
        "params/harvest.json": sha256_of(target / "params" / "harvest.json"),
    }
    assert manifest["steps"] == ["harvest"]
    assert manifest["params"] == {"harvest": {"batch_size": 4}}
    assert manifest["timings"] == {"harvest": 1.235}
    assert manifest["created"] == manifest["updated"]
    sidecar = json.loads((target / "params" / "harvest.json").read_text())
    assert (sidecar["step"], sidecar["params"], sidecar["seconds"]) == ("harvest", {"batch_size": 4}, 1.235)
    assert leftovers(tmp_path, target) == []  # no staging directory, no .old- directory
    assert not (target / (MANIFEST + ".tmp")).exists()


def test_second_step_keeps_files_and_created(tmp_path):
    target = make_cache(tmp_path / "cache")
    created = read_manifest(target)["created"]
    with stage(target) as staged:
        staged.path("neighbors.npz").write_bytes(b"nbrs")
        staged.record_step("geometry", {"k": 8}, 0.5)
        staged.record_step("geometry", {"k": 8}, 0.5)  # recorded once
        staged.commit()
    manifest = verify_cache(target)
    assert manifest["steps"] == ["harvest", "geometry"]
    assert manifest["created"] == created
    assert (target / "features.parquet").read_bytes() == b"features-v1"
    assert set(manifest["files"]) == {
        "features.parquet",
        "harvest/shard-0.npz",
        "neighbors.npz",
        "params/harvest.json",
        "params/geometry.json",
    }


def test_failure_inside_stage_leaves_the_old_cache_intact(tmp_path):
    target = make_cache(tmp_path / "cache")
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="boom"):
        with stage(target) as staged:
            staged.path("features.parquet").write_bytes(b"half-written")
            staged.path("neighbors.npz").write_bytes(b"new")
            assert staged.dir.parent == tmp_path and staged.dir.name.startswith(".cache.tmp-")
            raise RuntimeError("boom")
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    verify_cache(target)
    assert leftovers(tmp_path, target) == []


def test_failure_in_a_fresh_stage_creates_nothing(tmp_path):
    target = tmp_path / "new-cache"
    with pytest.raises(ValueError):
        with stage(target, fresh=True) as staged:
            staged.path("features.parquet").write_bytes(b"x")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_stage_into_an_existing_empty_directory(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()  # e.g. made by the user before `featuregeom harvest --out cache`
    check_output_dir(target, IDENTITY, overwrite=False)
    with stage(target, base_manifest={"identity": IDENTITY}) as staged:
        staged.path("features.parquet").write_bytes(b"x")
        staged.commit()
    assert verify_cache(target)["identity"] == IDENTITY


def test_stage_without_commit_changes_nothing(tmp_path):
    target = make_cache(tmp_path / "cache")
    with stage(target) as staged:
        staged.path("features.parquet").write_bytes(b"never committed")
    assert (target / "features.parquet").read_bytes() == b"features-v1"
    assert leftovers(tmp_path, target) == []


def test_fresh_stage_replaces_everything(tmp_path):
    target = make_cache(tmp_path / "cache")
    make_cache(target, files={"examples.parquet": b"ex"}, identity={"model": "other"})
    manifest = verify_cache(target)
    assert set(manifest["files"]) == {"examples.parquet", "params/harvest.json"}
    assert manifest["identity"] == {"model": "other"}
    assert not (target / "features.parquet").exists()


def test_hard_linked_staging_never_modifies_the_live_cache(tmp_path):
    target = make_cache(tmp_path / "cache")
    live = target / "features.parquet"
    inode = live.stat().st_ino
    with stage(target) as staged:
        staged_file = staged.dir / "features.parquet"
        assert staged_file.stat().st_ino == inode  # a hard link, not a copy
        with open(staged.path("features.parquet"), "w") as f:  # a step rewriting the file in place
            f.write("features-v2")
        assert live.read_bytes() == b"features-v1"  # the live cache is untouched before the commit
        assert live.stat().st_ino == inode
        staged.commit()
    assert (target / "features.parquet").read_bytes() == b"features-v2"
    assert (target / "harvest" / "shard-0.npz").read_bytes() == b"shard-0"
    verify_cache(target)


# --------------------------------------------------------------------------- verification
def test_verify_detects_a_changed_file(tmp_path):
    target = make_cache(tmp_path / "cache")
    (target / "harvest" / "shard-0.npz").write_bytes(b"tampered")
    verify_cache(target, files=("features.parquet",))  # only the named files are checked
    with pytest.raises(CacheError, match=r"shard-0\.npz does not match the checksum in manifest\.json"):
        verify_cache(target)


def test_verify_detects_a_missing_file(tmp_path):
    target = make_cache(tmp_path / "cache")
    (target / "features.parquet").unlink()
    with pytest.raises(CacheError, match=r"features\.parquet is listed in the manifest but missing"):
        verify_cache(target, files=("features.parquet", "not-recorded.npz"))


def test_schema_version_mismatch(tmp_path):
    target = make_cache(tmp_path / "cache")
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["schema_version"] = 99
    (target / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        CacheError,
        match=f"has cache schema_version 99, this tool reads version {SCHEMA_VERSION}; "
        r"rebuild it .*--overwrite",
    ):
        read_manifest(target)
    with pytest.raises(CacheError, match="schema_version 99"):
        verify_cache(target)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(CacheError, match="does not exist; build one with `featuregeom precompute`"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(CacheError, match="has no manifest.json: it is not a featuregeom cache"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(CacheError, match="is not valid JSON"):
        read_manifest(tmp_path)


# --------------------------------------------------------------------------- --out checks
def test_check_output_dir_new_or_empty(tmp_path):
    check_output_dir(tmp_path / "new", IDENTITY, overwrite=False)
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", IDENTITY, overwrite=False)


def test_check_output_dir_refuses_a_foreign_directory(tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for overwrite in (False, True):  # --overwrite replaces caches only, never a user's folder
        with pytest.raises(
            CacheError,
            match="is a non-empty directory that is not a featuregeom cache; "
            "featuregeom never replaces such a directory, even with --overwrite",
        ):
            check_output_dir(out, IDENTITY, overwrite=overwrite)
    assert (out / "thesis.tex").read_text() == "precious"
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(CacheError, match="exists and is not a directory"):
        check_output_dir(afile, IDENTITY, overwrite=False)


def test_check_output_dir_identity(tmp_path):
    target = make_cache(tmp_path / "cache")
    check_output_dir(target, dict(IDENTITY), overwrite=False)  # same identity: resume
    other = dict(IDENTITY, sae="sae-b", hook="blocks.0.hook_resid_post")
    with pytest.raises(
        CacheError,
        match=r"already holds a different cache \(differs in: hook, sae\); "
        "pass --overwrite",
    ):
        check_output_dir(target, other, overwrite=False)
    check_output_dir(target, other, overwrite=True)
    with pytest.raises(CacheError, match=r"differs in: seed"):
        check_output_dir(target, dict(IDENTITY, seed=1), overwrite=False)


def test_concurrent_reader_never_sees_half_a_cache(tmp_path):
    # The swap is two renames: the target is always either the old or the new complete cache.
    target = make_cache(tmp_path / "cache")
    with stage(target) as staged:
        staged.path("features.parquet").write_bytes(b"v2")
        staged_dir = staged.dir
        verify_cache(target)  # still the old one while staging
        staged.commit()
    assert not staged_dir.exists()
    assert verify_cache(target)["files"]["features.parquet"] == sha256_of(target / "features.parquet")
    assert os.listdir(tmp_path) == ["cache"]


def test_write_dir_atomic_replaces_whole_folders_and_keeps_the_old_one_on_failure(tmp_path):
    from precompute.cache import write_dir_atomic

    out = tmp_path / "result"

    def writer(*names):
        return lambda d: [(d / n).write_text(n) for n in ("out.json", *names)]

    write_dir_atomic(out, writer("a.txt"), marker="out.json")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "out.json"]
    write_dir_atomic(out, writer("b.txt"), marker="out.json")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", "out.json"]  # replaced, not merged

    def killed(d):
        (d / "c.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomic(out, killed, marker="out.json")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", "out.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]  # no staging left behind


def test_write_dir_atomic_never_replaces_a_user_folder(tmp_path):
    from precompute.cache import write_dir_atomic

    home = tmp_path / "work"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    with pytest.raises(
        CacheError, match=r"is a non-empty directory that is not a diff output \(no summary.json\)"
    ):
        write_dir_atomic(
            home, lambda d: (d / "summary.json").write_text("{}"), marker="summary.json", what="diff output"
        )
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]
    assert (home / "notes.txt").read_text() == "precious"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(CacheError, match="exists and is not a directory"):
        write_dir_atomic(afile, lambda d: None, marker="summary.json")
    assert afile.read_text() == "x"


def test_manifest_without_checksums_is_refused(tmp_path):
    target = make_cache(tmp_path / "cache")
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["files"] = {}
    (target / MANIFEST).write_text(json.dumps(manifest))
    with open(target / "features.parquet", "r+b") as f:  # a flipped byte nobody vouches for
        f.write(b"X")
    with pytest.raises(
        CacheError,
        match=r"holds features\.parquet, harvest/shard-0\.npz, params/harvest\.json "
        "without a checksum",
    ):
        verify_cache(target)
    with pytest.raises(CacheError, match=r"holds features\.parquet without a checksum"):
        verify_cache(target, files=("features.parquet", "neighbors.npz"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "is not a featuregeom manifest"),
        ("42", "is not a featuregeom manifest"),
        ('{"schema_version": 1, "files": []}', "'files' must map each file name to its sha256"),
        ('{"schema_version": 1, "files": {"a": 5}}', "'files' must map each file name to its sha256"),
    ],
)
def test_malformed_manifests_are_clear_errors(tmp_path, text, message):
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(CacheError, match=message):
        verify_cache(tmp_path)


def test_a_second_writer_on_the_same_output_is_refused(tmp_path):
    from precompute.cache import output_lock

    target = make_cache(tmp_path / "cache")
    with output_lock(target):
        # another process: flock is per open file, so a child process sees the lock
        code = (
            "import sys; from precompute.cache import stage\n"
            "try:\n    stage(sys.argv[1]).__enter__()\nexcept Exception as e: print(e); sys.exit(3)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(target)], capture_output=True, text=True, env={**os.environ}
        )
        assert proc.returncode == 3, proc.stderr
        assert f"another featuregeom run is writing {target} right now" in proc.stdout
        with stage(target) as staged:  # the same process may nest (precompute holds it around its steps)
            staged.commit()
    verify_cache(target)


def test_stale_staging_of_a_killed_run_is_removed_on_the_next_run(tmp_path):
    target = make_cache(tmp_path / "cache")
    stale = tmp_path / ".cache.tmp-abcd1234"
    (stale / "harvest").mkdir(parents=True)
    (stale / "harvest" / "big.npz").write_bytes(b"x" * 1000)
    old = tmp_path / "cache.old-0123abcd"
    old.mkdir()
    keep = tmp_path / ".cache.tmp-not-ours-at-all"  # not a name mkdtemp makes: not ours, kept
    keep.mkdir()
    other = tmp_path / ".other.tmp-abcd1234"  # another output's staging: kept
    other.mkdir()
    with stage(target) as staged:
        staged.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cache", keep.name, other.name])


def test_lab_folders_ride_along_but_stay_out_of_the_manifest(tmp_path):
    target = make_cache(tmp_path / "cache")
    (target / "finetune" / "run").mkdir(parents=True)
    (target / "finetune" / "run" / "summary.json").write_text("{}")
    verify_cache(target)  # a lab output written after the cache does not invalidate it
    with stage(target) as staged:
        staged.path("features.parquet").write_bytes(b"v2")
        staged.commit()
    assert (target / "finetune" / "run" / "summary.json").read_text() == "{}"  # carried over
    assert not any(name.startswith("finetune/") for name in read_manifest(target)["files"])
    (target / "finetune" / "run" / "summary.json").write_text('{"rerun": 1}')
    verify_cache(target)
