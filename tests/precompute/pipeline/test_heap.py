"""release_free_heap gives freed heap memory back to the system (glibc's malloc_trim)."""

from __future__ import annotations

import pytest

from precompute.pipeline.heap import _malloc_trim, release_free_heap, resident_mib


@pytest.mark.skipif(_malloc_trim() is None, reason="not glibc: there is no malloc_trim to call")
def test_freed_heap_blocks_below_a_live_one_go_back_to_the_system() -> None:
    # 100 KiB blocks come from the heap (under glibc's 128 KiB mmap threshold); the last one stays
    # alive above them, so free() cannot shrink the heap from its top and keeps ~200 MiB resident
    blocks = [bytearray(b"\x01" * (100 * 1024)) for _ in range(2048)]
    pin = bytearray(b"\x01" * (100 * 1024))
    del blocks
    held = resident_mib()
    assert release_free_heap() is True
    assert held - resident_mib() > 100
    del pin


def test_resident_memory_is_read_and_grows_with_an_allocation() -> None:
    before = resident_mib()
    block = bytearray(64 * 2**20)
    block[::4096] = b"\x01" * len(block[::4096])  # touch every page so it is resident
    assert resident_mib() - before > 48
    del block
