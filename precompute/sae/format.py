"""What an SAE file format declares: one `SAEFormat` per format, built in that format's module.

Adding a format is a module in ``precompute.sae.formats`` ending in

    FORMAT = SAEFormat(name="myformat", files="...", detect=detect, load=load, aliases=(...))

plus one line in ``precompute.sae.registry.FORMAT_LIST``; the registry derives names, aliases,
detection and the "supported formats" message from that list.

``detect(spec)`` looks at the spec and the file names around it, never at file contents, and
returns 0 ("not mine") or a priority: when several formats claim one path, the highest wins
(ties go to the earlier format in the list). The priorities in use, highest first:

    SPEC (100, 90)   the spec's own syntax names the format: release:..., run_dir:hookpoint
    80 ... 40        a format's own file names: SAELens, sparsify, Gemma Scope v1, v2, dictionary_learning
    30               a sparsify run directory (hookpoint subdirectories)
    10               any other .safetensors file (the plain format)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from precompute.sae.base import SAE


class Loader(Protocol):
    def __call__(self, path: str, device: str = "cpu") -> SAE: ...


def _spec_is_path(spec: str) -> str | None:
    return spec


@dataclass(frozen=True)
class SAEFormat:
    """One on-disk SAE format: its name, what it expects, how to recognise and load it."""

    name: str
    files: str  # what the format expects on disk; listed whenever a format is unknown or undetectable
    detect: Callable[[str], int]  # 0: not this format; otherwise a priority (see the module docstring)
    load: Loader
    aliases: tuple[str, ...] = ()  # other spellings accepted by --sae-format
    # The local file or directory a spec names (None: not a local path, e.g. release:...); it must exist.
    local_path: Callable[[str], str | None] = _spec_is_path


def directory_names(spec: str) -> set[str] | None:
    """Names of the entries of the directory `spec`; None when it is not a directory."""
    p = Path(spec)
    return {c.name for c in p.iterdir()} if p.is_dir() else None


def file_and_siblings(spec: str) -> tuple[str, set[str]] | None:
    """(name, names beside it) for an existing path that is not a directory; None otherwise."""
    p = Path(spec)
    if not p.exists() or p.is_dir():
        return None
    return p.name, {c.name for c in p.parent.iterdir()}
