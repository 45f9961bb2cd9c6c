"""Command-line parsing and markdown escaping used by every page."""

from __future__ import annotations

from explorer.state import md_escape, parse_args


def test_parse_args_reads_options_after_dashdash() -> None:
    a = parse_args(["--cache", "c/demo", "--reviews", "r.sqlite", "--max-points", "5000", "--unknown", "-q"])
    assert (a.cache, a.reviews, a.max_points) == ("c/demo", "r.sqlite", 5000)
    b = parse_args(["tests/explorer", "-q"])  # pytest's own argv: nothing picked up
    assert b.cache is None and b.reviews is None and b.max_points is None


def test_md_escape_makes_markdown_literal() -> None:
    s = md_escape("[click](javascript:alert(1)) **b** <img src=x> :red[x] $x$ `c`")
    for ch in "[]()*<>:$`":
        assert f"\\{ch}" in s
    assert "\\[click\\]\\(javascript\\:alert\\(1\\)\\)" in s
