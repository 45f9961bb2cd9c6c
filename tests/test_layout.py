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
    assert "explorer/app.py" in lengths and "precompute/schema/contract.py" in lengths
    too_long = {path: n for path, n in lengths.items() if n > MAX_LINES}
    listing = ", ".join(f"{p} ({n})" for p, n in sorted(too_long.items(), key=lambda kv: -kv[1]))
    assert not too_long, f"split these modules (lines > {MAX_LINES}): {listing}"


def test_every_document_the_code_cites_is_in_the_repository() -> None:
    """The code cites background (docs/science.md, docs/design.md, ...): each cited file must exist, so
    the repository stands alone."""
    import re

    cited: dict[str, set[str]] = {}
    sources = [p for d in (*PACKAGES, "tests", "bench", "configs") for p in sorted((REPO / d).rglob("*.*"))]
    for path in [*sources, REPO / "README.md"]:
        if path.suffix not in (".py", ".md", ".toml") or not path.is_file():
            continue
        for name in re.findall(r"\bdocs/[\w.-]+\.md\b", path.read_text(encoding="utf-8")):
            cited.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert "docs/science.md" in cited and "docs/cache.md" in cited
    missing = {name: sorted(users) for name, users in cited.items() if not (REPO / name).is_file()}
    assert not missing, f"cited but not in the repository: {missing}"
    stale = re.compile(r"(?<![\w/])(SCIENCE|DESIGN|FORMATS)\.md")
    offenders = [
        str(p.relative_to(REPO)) for p in sources if p.suffix == ".py" and stale.search(p.read_text())
    ]
    assert not offenders, f"cite docs/*.md instead of the old top-level names: {offenders}"
