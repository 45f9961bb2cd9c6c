"""The held-out (validation) sets of the demo: the vendored JailbreakBench benign behaviours are the
file NOTICE.md describes and the twins of the harmful ones, and configs/demo.toml holds XSTest and
JailbreakBench out of the harm fit, both sides of each, leaving harmful and benign data to fit on."""

from __future__ import annotations

import csv
import hashlib
import re
import tomllib
from pathlib import Path

from precompute.data.corpus import CorpusSource

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "assets" / "data"
BENIGN = DATA / "benign" / "jbb_behaviors_benign.csv"
HARMFUL = DATA / "harmful" / "jbb_behaviors_harmful.csv"


def test_the_vendored_file_is_the_one_notice_md_names() -> None:
    notice = (DATA / "NOTICE.md").read_text(encoding="utf-8")
    section = notice.split("## `benign/jbb_behaviors_benign.csv`", 1)[1]
    sha = re.search(r"sha256 `([0-9a-f]{64})`", section)
    assert sha is not None
    assert hashlib.sha256(BENIGN.read_bytes()).hexdigest() == sha.group(1)


def test_benign_behaviours_are_the_twins_of_the_harmful_ones() -> None:
    with BENIGN.open(newline="", encoding="utf-8") as f:
        benign = list(csv.DictReader(f))
    with HARMFUL.open(newline="", encoding="utf-8") as f:
        harmful = list(csv.DictReader(f))
    assert len(benign) == len(harmful) == 100
    for b, h in zip(benign, harmful, strict=True):
        assert (b["index"], b["behavior"], b["category"]) == (h["Index"], h["Behavior"], h["Category"])
        assert b["goal"] and b["goal"] != h["Goal"]


def demo_sources() -> list[CorpusSource]:
    return [
        CorpusSource.from_dict(t)
        for t in tomllib.loads((ROOT / "configs" / "demo.toml").read_text())["corpus"]
    ]


def test_the_demo_holds_out_both_sides_of_xstest_and_jailbreakbench() -> None:
    held = {(Path(s.path).name, s.group, str(s.where)) for s in demo_sources() if s.validation}
    assert held == {
        ("xstest_prompts.csv", "harmful", "{'label': 'unsafe'}"),
        ("xstest_prompts.csv", "benign", "{'label': 'safe'}"),
        ("jbb_behaviors_harmful.csv", "harmful", "{}"),
        ("jbb_behaviors_benign.csv", "benign", "{}"),
    }
    fit = [s for s in demo_sources() if not s.validation]
    assert {s.group for s in fit} >= {"harmful", "benign"}
    # no held-out file also feeds the fit
    assert not {s.path for s in fit if s.group in ("harmful", "benign")} & {
        s.path for s in demo_sources() if s.validation
    }
