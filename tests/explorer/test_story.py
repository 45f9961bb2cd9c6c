"""The story steps and the standalone HTML export (offline, escaped)."""

from __future__ import annotations

import re
from pathlib import Path

from explorer.data import load_cache
from explorer.story import build_story, story_html


def test_story_steps(synth_cache: Path) -> None:
    c = load_cache(synth_cache)
    t, h = c.default_pair()
    steps = build_story(c, t, h)
    assert [s.key for s in steps] == ["feature", "map", "task", "neighbour", "text", "finetune"]
    neighbour = steps[3]
    cos = c.pair(t, h)["cosine"]
    assert f"{cos:.2f}" in neighbour.lead and "by chance" in neighbour.lead
    assert all(s.figure is not None or s.body for s in steps)


def test_export_is_standalone_and_escaped(xss_cache: Path) -> None:
    c = load_cache(xss_cache)
    t, h = c.default_pair()
    assert "<script>" in c.row(t)["label"] and "onerror" in c.row(h)["label"]  # the payloads are in play
    page = story_html(build_story(c, t, h), f"Story {t}", "plain subtitle")
    assert len(page) > 1_000_000, "plotly.js is inlined so the file opens offline"
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not re.search(r"<script[^>]+src=", page), "no external scripts"
    assert "<script>window.__xss" not in page and "onerror=\"window" not in page
    assert page.count("&lt;script&gt;window.__xss=1&lt;/script&gt;") >= 3  # shown literally: labels, tokens
    assert "&lt;img src=x onerror=&quot;window.__xss=1&quot;&gt;" in page
    assert "cdn.plot.ly" not in page.split("</head>")[1]
