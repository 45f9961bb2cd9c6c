"""map_npz equals np.load array by array, mapping only stored members above its threshold."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from explorer.data.npz_map import map_npz


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "counts_group": rng.integers(0, 1000, (64, 5, 40)).astype(np.int32),
        "fortran": np.asfortranarray(rng.normal(size=(33, 17)).astype(np.float32)),
        "bins": np.array(40),
        "groups": np.array(["task", "control", "harmful"]),
        "empty": np.zeros((0, 3), np.int64),
        "big_endian": np.arange(100, dtype=">i8"),
    }


def _same(got: dict[str, np.ndarray], path: Path) -> None:
    with np.load(path) as want:
        assert set(got) == set(want.files)
        for name in want.files:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
            np.testing.assert_array_equal(got[name], want[name])


def test_stored_members_are_mapped_and_equal(tmp_path: Path) -> None:
    path = tmp_path / "h.npz"
    np.savez(path, **_arrays())
    got = map_npz(path, map_at_bytes=1)
    _same(got, path)
    mapped = {k for k, v in got.items() if isinstance(v, np.memmap)}
    assert mapped == {"counts_group", "fortran", "bins", "groups", "big_endian"}  # all but the empty one
    assert got["fortran"].flags.f_contiguous and not got["counts_group"].flags.writeable


def test_small_members_are_read_not_mapped(tmp_path: Path) -> None:
    path = tmp_path / "h.npz"
    np.savez(path, **_arrays())
    got = map_npz(path, map_at_bytes=64 * 5 * 40 * 4)  # exactly counts_group's size: it alone is mapped
    _same(got, path)
    assert {k for k, v in got.items() if isinstance(v, np.memmap)} == {"counts_group"}


def test_compressed_members_are_read(tmp_path: Path) -> None:
    path = tmp_path / "h.npz"
    np.savez_compressed(path, **_arrays())
    got = map_npz(path, map_at_bytes=1)
    _same(got, path)
    assert not any(isinstance(v, np.memmap) for v in got.values())


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.npz"
    np.savez(path, objects=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match="objects"):
        map_npz(path, map_at_bytes=1)


def test_a_file_that_is_not_an_archive_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "h.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(zipfile.BadZipFile):
        map_npz(path)
