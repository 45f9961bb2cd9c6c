"""The one harm taxonomy (precompute.data.taxonomy): every harm label that the configured datasets
really hold maps to a unified category (read from the files themselves), unknown labels fall back to
`unspecified`, and docs/science.md documents exactly the categories and the mapping the code uses."""

from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path

import pytest

from precompute.data import taxonomy
from precompute.data.corpus import CorpusSource, read_source
from precompute.data.taxonomy import CATEGORIES, TAXONOMY, UNSPECIFIED, known, unify

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def harmful_sources() -> list[tuple[str, CorpusSource]]:
    out = []
    for config in CONFIGS:
        for table in tomllib.loads(config.read_text()).get("corpus", []):
            source = CorpusSource.from_dict(table)
            if source.group == "harmful" and (ROOT / source.path).is_file():
                out.append((config.name, CorpusSource.from_dict(table | {"path": str(ROOT / source.path)})))
    return out


def test_the_configs_name_harmful_datasets() -> None:
    names = {Path(s.path).name for _, s in harmful_sources()}
    assert {
        "harmbench_behaviors_text_all.csv",
        "strongreject_dataset.csv",
        "jbb_behaviors_harmful.csv",
    } <= names
    assert {
        "xstest_prompts.csv",
        "advbench_harmful_behaviors.csv",
        "hh_rlhf_harmless_base_test.jsonl.gz",
    } <= names


@pytest.mark.parametrize(
    ("config", "source"), harmful_sources(), ids=lambda x: x if isinstance(x, str) else Path(x.path).name
)
def test_every_label_of_a_configured_harmful_dataset_is_in_the_table(
    config: str, source: CorpusSource
) -> None:
    """The documents as the harvest reads them (filters, category field and all)."""
    docs, _ = read_source(source, 0)
    labels = {d.category for d in docs}
    assert None not in labels, f"{config}: {source.path} gives documents without a harm label"
    unknown = sorted(str(c) for c in labels if not known(str(c)))
    assert not unknown, f"{config}: {source.path} labels missing from precompute/data/taxonomy.py: {unknown}"


def test_the_demo_fills_most_categories() -> None:
    """Over the demo's harmful datasets, the mapping spreads documents over the taxonomy, not into one bin."""
    demo = [s for c, s in harmful_sources() if c == "demo.toml"]
    used = {unify(d.category) for s in demo for d in read_source(s, 0)[0]}
    assert used >= set(CATEGORIES) - {"self_harm"}, set(CATEGORIES) - used


def test_the_real_dataset_labels_map_where_the_docs_say() -> None:
    assert unify("cybercrime_intrusion") == unify("Malware/Hacking") == "cybercrime"
    assert (
        unify("Hate, harassment and discrimination")
        == unify("Harassment/Discrimination")
        == "hate_harassment"
    )
    assert unify("misinformation_disinformation") == unify("Disinformation") == "misinformation"
    assert unify("Sexual content") == unify("Sexual/Adult content") == "sexual"
    assert (
        unify("contrast_privacy") == unify("Privacy") == unify("information_hazard") == "privacy_surveillance"
    )
    assert unify("advbench") == unify("hh_rlhf_red_team") == unify("harmful") == UNSPECIFIED


def test_labels_match_whatever_their_case_and_punctuation() -> None:
    assert unify("SEXUAL / ADULT CONTENT") == unify(" sexual_adult-content ") == "sexual"
    assert unify("Malware-Hacking") == "cybercrime"


def test_unknown_and_missing_labels_fall_back_and_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    taxonomy._warned.discard("a brand-new harm")
    with caplog.at_level(logging.WARNING, logger="precompute.data.taxonomy"):
        assert unify("a brand-new harm") == UNSPECIFIED
        assert unify("a brand-new harm") == UNSPECIFIED
    assert len([r for r in caplog.records if "a brand-new harm" in r.getMessage()]) == 1
    assert unify(None) == unify(float("nan")) == UNSPECIFIED
    assert not known("a brand-new harm")


def test_mapping_is_idempotent_and_lands_in_the_taxonomy() -> None:
    assert set(TAXONOMY.values()) == set(CATEGORIES) | {UNSPECIFIED}
    for label, unified in TAXONOMY.items():
        assert unify(unified) == unified, label
    assert UNSPECIFIED not in CATEGORIES


def test_no_label_is_mapped_twice_to_different_categories() -> None:
    seen: dict[str, str] = {}
    for rows in taxonomy._TABLE.values():
        for label, unified in rows:
            key = taxonomy._key(label)
            assert seen.setdefault(key, unified) == unified, f"{label!r} maps to {seen[key]} and {unified}"


def science_taxonomy_rows() -> dict[str, str]:
    """docs/science.md "Harm taxonomy" table: unified category -> its cell of dataset labels."""
    text = (ROOT / "docs" / "science.md").read_text(encoding="utf-8")
    section = text.split("### Harm taxonomy", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    out = {}
    for row in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        out[cells[0].strip("`")] = cells[-1]
    return out


def test_science_md_documents_the_taxonomy_the_code_uses() -> None:
    rows = science_taxonomy_rows()
    assert set(rows) == set(CATEGORIES) | {UNSPECIFIED}
    documented = {
        taxonomy._key(label): cat for cat, cell in rows.items() for label in re.findall(r"`([^`]+)`", cell)
    }
    table = {
        taxonomy._key(label): unified
        for name, rows_ in taxonomy._TABLE.items()
        if name != "unified"
        for label, unified in rows_
    }
    assert documented == table
