"""docs/cache.md documents exactly the cache contract of precompute/schema/: the same files, and for
each table and archive the same columns (arrays), types, shapes, steps and optional columns. Change
one and this test names what the other lacks."""

from __future__ import annotations

import re
from pathlib import Path

from precompute import schema

DOC = Path(__file__).resolve().parents[1] / "docs" / "cache.md"


def sections() -> dict[str, str]:
    """'## heading' -> its text, for every second-level heading of the doc."""
    parts = re.split(r"(?m)^## (.+)$", DOC.read_text(encoding="utf-8"))
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def table_rows(text: str) -> list[list[str]]:
    """The cells of each body row of the first markdown table in `text` (`\\|` stays inside a cell)."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows[2:]]


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def file_section(file: str) -> str:
    return sections()[f"`{file}`"]


def documented_columns(file: str) -> dict[str, tuple[str, bool, str, bool]]:
    """column -> (type, nullable, step, required) as the doc's table for `file` says."""
    out = {}
    for name_cell, type_cell, written, _meaning in table_rows(file_section(file)):
        dtype, _, nullable = type_cell.partition(", ")
        step, _, condition = written.partition(", ")
        for name in names(name_cell):
            assert name not in out, f"{file}: {name} documented twice"
            out[name] = (dtype, nullable == "nullable", step, not condition)
    return out


def test_the_doc_has_a_section_per_table_and_archive() -> None:
    documented = {h.strip("`") for h in sections() if h.startswith("`")}
    contract = set(schema.TABLES) | set(schema.ARCHIVES) | {schema.MANIFEST, schema.params_file("<step>")}
    assert documented == contract | set(schema.JSON_FILES)


def test_the_files_table_lists_every_file() -> None:
    listed = {n for row in table_rows(sections()["Files"]) for n in names(row[0])}
    files = {
        schema.MANIFEST,
        schema.params_file("<step>"),
        *schema.TABLES,
        *schema.ARCHIVES,
        *schema.JSON_FILES,
    }
    assert listed == files


def test_every_table_is_documented_column_by_column() -> None:
    for file, table in schema.TABLES.items():
        contract = {c.name: (c.dtype, c.nullable, c.step, c.required) for c in table.columns}
        assert documented_columns(file) == contract, file


def test_every_archive_is_documented_array_by_array() -> None:
    for file, archive in schema.ARCHIVES.items():
        text = file_section(file)
        assert f"Written by the {archive.step} step" in text, file
        assert ("internal" in text) == archive.internal, file
        documented = {}
        for name_cell, dtype, shape, meaning in table_rows(text):
            axes = () if shape == "scalar" else tuple(a.strip() for a in shape.strip("[]").split(","))
            documented[names(name_cell)[0]] = (dtype, axes, meaning.startswith("optional"))
        assert documented == {a.name: (a.dtype, a.shape, a.optional) for a in archive.arrays}, file


def test_every_json_file_is_documented_key_by_key() -> None:
    for file, spec in schema.JSON_FILES.items():
        text = file_section(file)
        assert f"Written by the {spec.step} step" in text, file
        documented = {}
        for name_cell, kind_cell, _meaning in table_rows(text):
            kind, _, nullable = kind_cell.partition(", ")
            for name in names(name_cell):
                documented[name] = (kind, nullable == "nullable")
        assert documented == {k.name: (k.kind, k.nullable) for k in spec.keys}, file


def test_schema_version_and_lab_folders_are_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert text.startswith(f"# Cache format (schema_version {schema.SCHEMA_VERSION})")
    lab = sections()["Mechanism-lab folders"]
    for path in (
        f"{schema.STEERING_DIR}/task-<t>.parquet",
        f"{schema.FINETUNE_DIR}/<run>/{schema.FINETUNE_DIFF}",
        f"{schema.FINETUNE_DIR}/<run>/{schema.FINETUNE_SUMMARY}",
        f"{schema.TRIAGE_DIR}/<name>/{schema.TRIAGE_RANKED}",
        f"{schema.TRIAGE_DIR}/<name>/{schema.TRIAGE_TOKENS}",
        f"{schema.TRIAGE_DIR}/<name>/{schema.TRIAGE_META}",
    ):
        assert f"`{path}" in lab, path
    folders = {p.split("/")[0] for row in table_rows(lab) for p in names(row[0]) if "/" in p}
    assert folders == set(schema.LAB_DIRS)
