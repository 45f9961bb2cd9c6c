"""Hand the C heap's free pages back to the system after the harvest's shard loop.

The loop's buffers (forward activations, a shard's arrays, the writer's compression) are freed, but
glibc keeps them: its mmap threshold rises after the first large free, so later large buffers come
from the heap, and a heap with live data above its free space cannot shrink. Measured on the harvest
(bench/bench_rss_phases.py, bench/README.md "Harvest memory by phase"): the memory held after the loop
grew by 283 MiB from 100k to 1M tokens (773 to 1,056), and every later phase started from that level.
`malloc_trim` returns those free pages (glibc >= 2.8 releases them in the middle of the heap too) in
one call: 663 to 722 MiB, at no measurable cost. Fixing the threshold instead (MALLOC_MMAP_THRESHOLD_)
does as well but pays page faults for every fresh buffer: 3-6x the system time, +21% wall at 1M."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (musl, macOS, Windows: nothing to call)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Give the heap's free pages back to the system; True when some were (glibc only)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def resident_mib() -> float:
    """This process's resident memory now (not its high-water mark), from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
