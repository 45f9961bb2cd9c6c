"""Memory-mapped reads of an npz archive's arrays.

`np.load` ignores `mmap_mode` for .npz files and reads each array whole on access: at 262k features
histograms.npz holds ~290 MB (`counts`, `counts_group`) of which a page shows one feature's row. The
cache writes its archives with `np.savez` (stored, not deflated), so each member's .npy data lies
uncompressed at a fixed offset in the file and can be mapped in place: a feature's row then costs a
page read, and the archive costs nothing to open.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

# zip local file header: signature, version, flags, method, time, date, crc, sizes (2), name and
# extra-field lengths (APPNOTE 4.3.7); the member's data follows the name and the extra field
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIGNATURE = 0x04034B50
# arrays smaller than this are read (a mapping costs a file handle and a page each)
MAP_AT_BYTES = 1 << 20


def map_npz(path: str | Path, map_at_bytes: int = MAP_AT_BYTES) -> dict[str, np.ndarray]:
    """Every array of the npz file at `path`, equal to `np.load(path)[name]`: stored members of at
    least `map_at_bytes` as read-only memory maps, the others (small, or deflated by
    `np.savez_compressed`) read into memory. Object arrays are refused, as by `np.load`.

    Raises OSError / ValueError / zipfile.BadZipFile on a file that is not a valid npz archive."""
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, path.open("rb") as raw:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[: -len(".npy")]
            mapped = _map_member(path, raw, info, map_at_bytes)
            if mapped is None:
                with zf.open(info) as fh:
                    mapped = np.lib.format.read_array(fh, allow_pickle=False)
            out[name] = mapped
    return out


def _map_member(path: Path, raw: BinaryIO, info: zipfile.ZipInfo, map_at_bytes: int) -> np.ndarray | None:
    """The member as a memory map, or None when it must be read (deflated, encrypted or small)."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    raw.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
    if fields[0] != _LOCAL_SIGNATURE:
        raise ValueError(f"{path}: member {info.filename} has no local header")
    raw.seek(info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10])
    version = np.lib.format.read_magic(raw)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(raw)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(raw)
    if dtype.hasobject:
        raise ValueError(f"{path}: {info.filename} holds Python objects; refusing to unpickle it")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < max(1, map_at_bytes):
        return None
    return np.memmap(
        path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape, order="F" if fortran else "C"
    )
