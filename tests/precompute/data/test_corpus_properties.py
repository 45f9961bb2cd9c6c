"""Property-based: whatever a corpus file holds, reading it (and rendering and packing what was read)
either succeeds or raises a FeatureGeomError, which the CLI prints as one clear line with exit 2. Any
other exception would reach the user as "internal error ... This is a bug".

Random JSON values, chat `messages` lists, CSV text, Parquet tables, raw bytes under every supported
extension, and gzip wrapping that is truncated or corrupted. Derandomized (the same examples on every
run, no example database), so CI cannot flake; about 20 s in all on one core.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import string
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from precompute.data.corpus import TEXT_FIELDS, CorpusSource, pack_contexts, read_source
from precompute.data.records import ReadStats, read_records
from precompute.errors import FeatureGeomError
from precompute.lab.triage import _skip_reason, _why_no_document

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SUFFIXES = (
    ".jsonl",
    ".csv",
    ".txt",
    ".md",
    ".json",
    ".yaml",
    ".yml",
    ".parquet",
    "",
    ".jsonl.gz",
    ".csv.gz",
    ".txt.gz",
    ".json.gz",
    ".yaml.gz",
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    # One directory for every example (hypothesis cannot use the function-scoped tmp_path).
    return tmp_path_factory.mktemp("properties")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.tiny import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def read_render_pack(path: Path, tokenizer=None, **options: Any) -> None:
    """The whole corpus path of a run: read, then render and pack what was read. A FeatureGeomError is
    a clear error and fine; any other exception propagates and fails the property."""
    try:
        docs, _ = read_source(CorpusSource(path=str(path), **options), 0)
        if tokenizer is not None:
            list(pack_contexts(docs[:4], tokenizer, context_size=16, mode="split"))
        event("read, with chat documents" if any(d.messages for d in docs) else "read, text only")
    except FeatureGeomError as exc:
        event(f"clear error: {type(exc).__name__}")  # --hypothesis-show-statistics shows the mix


# --------------------------------------------------------------------------- strategies
FIELD_NAMES = st.sampled_from(
    (*TEXT_FIELDS, "role", "content", "data", "category", "type", "text", "")
) | st.text(max_size=4)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(FIELD_NAMES, inner, max_size=4),
    max_leaves=12,
)
ROLES = st.sampled_from(("user", "assistant", "system", "tool", "", " ")) | st.text(max_size=6) | SCALARS
CONTENTS = (
    st.text(max_size=40)
    | SCALARS
    | st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(("text", "image_url"))}, optional={"text": SCALARS})
        | st.text(max_size=10),
        max_size=3,
    )
    | st.dictionaries(FIELD_NAMES, SCALARS, max_size=2)
)
VALID_TURN = st.fixed_dictionaries(
    {"role": st.sampled_from(("user", "assistant", "system")), "content": st.text(max_size=40)}
)
HOSTILE_TURN = (
    st.fixed_dictionaries({}, optional={"role": ROLES, "content": CONTENTS})
    | SCALARS
    | st.lists(SCALARS, max_size=2)
)
# Mostly well-formed turns, so that rendering through the chat template is exercised too.
TURNS = st.one_of(VALID_TURN, VALID_TURN, VALID_TURN, HOSTILE_TURN)
MESSAGES = st.one_of(
    st.lists(TURNS, min_size=1, max_size=5),
    st.lists(TURNS, min_size=1, max_size=5),
    SCALARS,
    st.dictionaries(FIELD_NAMES, SCALARS, max_size=2),
)
# Records that name a text field, next to arbitrary JSON values.
RECORDS = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=60)}, optional={"category": SCALARS}),
    st.fixed_dictionaries({"messages": MESSAGES}),
    st.dictionaries(st.sampled_from(TEXT_FIELDS), JSON_VALUES, min_size=1, max_size=2),
    JSON_VALUES,
)
SAFE_OPTIONS = {
    "format": st.sampled_from(("auto", "text", "user", "chat")),
    "first_user_turn": st.booleans(),
    "max_docs": st.integers(1, 3),
}
# Options that name fields: often absent from the records, which is a clear error by design.
FIELD_OPTIONS = {
    "text_field": FIELD_NAMES,
    "category_field": FIELD_NAMES,
    "where": st.dictionaries(FIELD_NAMES, st.text(max_size=3) | st.integers(0, 2), max_size=1),
}
OPTIONS = st.one_of(
    st.just({}),
    st.fixed_dictionaries({}, optional=SAFE_OPTIONS),
    st.fixed_dictionaries({}, optional={**SAFE_OPTIONS, **FIELD_OPTIONS}),
)
CSV_CHARS = st.text(alphabet=string.ascii_letters[:6] + ',"\n\r\t \x00é€', max_size=200)


def write_jsonl(path: Path, values: list[Any]) -> None:
    path.write_text("\n".join(json.dumps(v) for v in values) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- properties
@PROPERTY
@given(
    document=st.lists(RECORDS, max_size=6) | JSON_VALUES,
    layout=st.sampled_from(("jsonl", "json", "yaml")),
    options=OPTIONS,
)
def test_random_json_values(workdir, tokenizer, document, layout, options) -> None:
    path = workdir / f"values.{layout}"
    if layout == "jsonl":  # one value a line
        write_jsonl(path, document if isinstance(document, list) else [document])
    elif layout == "json":  # the whole document, whatever its top level
        path.write_text(json.dumps(document), encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(document), encoding="utf-8")
    read_render_pack(path, tokenizer, **options)


@PROPERTY
@given(
    records=st.lists(
        st.one_of(
            st.fixed_dictionaries({"messages": st.lists(VALID_TURN, min_size=1, max_size=4)}),
            st.fixed_dictionaries({"messages": MESSAGES}, optional={"text": SCALARS}),
        ),
        min_size=1,
        max_size=5,
    ),
    options=OPTIONS,
)
def test_random_messages_lists(workdir, tokenizer, records, options) -> None:
    path = workdir / "chat.jsonl"
    write_jsonl(path, records)
    read_render_pack(path, tokenizer, **options)
    # triage's per-record reasons over the same records
    source = CorpusSource(path=str(path), group="task")
    by_index = dict(enumerate(read_records(path, ReadStats())))
    try:
        docs, _ = read_source(source, 0)
    except FeatureGeomError:
        docs = []
    for doc in docs:
        _skip_reason(doc, by_index[doc.index])
    for index in set(by_index) - {d.index for d in docs}:
        _why_no_document(by_index[index], source)


@PROPERTY
@given(
    header=st.lists(
        st.sampled_from(("text", "prompt", "category", "messages")) | st.text(max_size=6), max_size=4
    ),
    rows=st.lists(st.lists(CSV_CHARS, max_size=5), max_size=6),
    raw=st.booleans(),
    long_field=st.booleans(),
    options=OPTIONS,
)
def test_random_csv_rows(workdir, tokenizer, header, rows, raw, long_field, options) -> None:
    path = workdir / "rows.csv"
    if long_field:  # over Python's default 128 KiB field limit
        rows = [*rows, ["word " * 30_000]]
    if raw:  # hand-joined: unbalanced quotes, stray newlines and NULs as a careless export writes them
        text = "\n".join(",".join(cells) for cells in [header, *rows])
    else:
        buffer = io.StringIO()
        csv.writer(buffer).writerows([header, *rows])
        text = buffer.getvalue()
    path.write_text(text, encoding="utf-8", newline="")
    read_render_pack(path, tokenizer, **options)


@PROPERTY
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "text": st.none() | st.text(max_size=30),
                "messages": st.none()
                | st.lists(
                    st.fixed_dictionaries(
                        {
                            "role": st.sampled_from(("user", "assistant", None)) | st.text(max_size=6),
                            "content": st.none() | st.text(max_size=20),
                        }
                    ),
                    max_size=3,
                ),
                "category": st.none() | st.text(max_size=4),
            }
        ),
        min_size=1,
        max_size=5,
    ),
    options=OPTIONS,
)
def test_random_parquet_tables(workdir, tokenizer, rows, options) -> None:
    path = workdir / "table.parquet"
    pd.DataFrame(rows).to_parquet(path)
    read_render_pack(path, tokenizer, **options)


@PROPERTY
@given(data=st.binary(max_size=600), suffix=st.sampled_from(SUFFIXES), options=OPTIONS)
def test_random_bytes_under_every_extension(workdir, data, suffix, options) -> None:
    path = workdir / f"bytes{suffix}"
    path.write_bytes(data)
    read_render_pack(path, **options)


@PROPERTY
@given(
    values=st.lists(RECORDS, min_size=1, max_size=4),
    suffix=st.sampled_from(SUFFIXES),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
)
def test_valid_files_with_bytes_flipped(workdir, values, suffix, flips) -> None:
    path = workdir / f"flipped{suffix}"
    base = suffix.removesuffix(".gz")
    if base == ".parquet":
        pd.DataFrame({"text": [json.dumps(v) for v in values]}).to_parquet(path)
    else:
        write_jsonl(path, values)
        if base == ".csv":
            path.write_text("text\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
        if suffix.endswith(".gz"):
            path.write_bytes(gzip.compress(path.read_bytes()))
    data = bytearray(path.read_bytes())
    for position, byte in flips:
        data[position % len(data)] = byte
    path.write_bytes(bytes(data))
    read_render_pack(path)


@PROPERTY
@given(
    values=st.lists(RECORDS, min_size=1, max_size=4),
    suffix=st.sampled_from((".jsonl.gz", ".csv.gz", ".txt.gz", ".json.gz", ".yaml.gz")),
    damage=st.sampled_from(("none", "truncate", "corrupt", "append", "double")),
    cut=st.integers(0, 10**6),
    garbage=st.binary(min_size=1, max_size=20),
)
def test_gzip_wrapping_and_corruption(workdir, values, suffix, damage, cut, garbage) -> None:
    payload = "\n".join(json.dumps(v) for v in values).encode()
    packed = gzip.compress(payload)
    if damage == "truncate":
        packed = packed[: cut % len(packed)]
    elif damage == "corrupt":  # overwrite part of the deflate stream (after the 10-byte header)
        at = 10 + cut % max(1, len(packed) - 10)
        packed = packed[:at] + garbage + packed[at + len(garbage) :]
    elif damage == "append":
        packed += garbage
    elif damage == "double":  # gzip of gzip: decompresses once to binary
        packed = gzip.compress(packed)
    path = workdir / f"wrapped{suffix}"
    path.write_bytes(packed)
    read_render_pack(path)
