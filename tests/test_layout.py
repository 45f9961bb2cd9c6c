"""Code layout rules that keep the code base readable: no Python module under precompute/ or explorer/
is longer than MAX_LINES (formatted); a longer one mixes jobs and is split into a package."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("precompute", "explorer")
MAX_LINES = 500


def module_lengths() -> dict[str, int]:
    return {
        str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines())
        for package in PACKAGES
        for p in sorted((REPO / package).rglob("*.py"))
    }


def test_modules_are_at_most_500_lines() -> None:
    lengths = module_lengths()
    assert "explorer/app.py" in lengths and "precompute/schema.py" in lengths
    too_long = {path: n for path, n in lengths.items() if n > MAX_LINES}
    listing = ", ".join(f"{p} ({n})" for p, n in sorted(too_long.items(), key=lambda kv: -kv[1]))
    assert not too_long, f"split these modules (lines > {MAX_LINES}): {listing}"
