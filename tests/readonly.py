"""A directory that no process can write, even root: a tmpfs remounted read-only (where the tests
may mount, as root in CI), or mode bits for an ordinary user."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def read_only_directory(path: Path, fill: Callable[[Path], None] = lambda p: None) -> Iterator[Path]:
    """`path` created, filled by `fill(path)` while writable, then made read-only for the block."""
    path.mkdir()
    if os.geteuid() != 0:
        fill(path)
        for p in [path, *path.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        yield path
        return
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True
    ).returncode:
        pytest.skip("root without mount rights: no way to make a read-only directory here")
    try:
        fill(path)
        gc.collect()  # files still open for writing would make the remount "busy"
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        yield path
    finally:
        gc.collect()  # close files the block left to the garbage collector (e.g. sqlite connections)
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(path)], check=True)
