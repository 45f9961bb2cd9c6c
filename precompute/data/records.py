"""Corpus files as records: JSONL, CSV, TXT, JSON and YAML (each optionally gzipped) and Parquet.

A record is one dict (a JSON object, a CSV row, a paragraph of text as {"text": ...}). Text that is
not valid UTF-8 is skipped and counted in `ReadStats`, never fatal; a file that cannot be parsed at
all is a CorpusError.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from precompute.errors import CorpusError

# Python's default CSV field limit (128 KiB) rejects long documents; 2**31 - 1 fits a C long everywhere.
_CSV_FIELD_LIMIT = 2**31 - 1


@dataclass
class ReadStats:
    records: int = 0
    documents: int = 0
    skipped_non_utf8: int = 0
    skipped_malformed: int = 0
    skipped_empty: int = 0
    skipped_filtered: int = 0
    other_split: int = 0  # documents left to the other side of the document split
    first_malformed: str | None = None  # where and why the first malformed record was skipped

    def malformed(self, where: str) -> None:
        self.skipped_malformed += 1
        if self.first_malformed is None:
            self.first_malformed = where

    def skipped_summary(self) -> str:
        parts = [
            f"{n} {what}"
            for n, what in (
                (self.skipped_non_utf8, "not UTF-8"),
                (self.skipped_malformed, "malformed"),
                (self.skipped_empty, "without a text field"),
                (self.skipped_filtered, "filtered out"),
                (self.other_split, "on the other side of the document split"),
            )
            if n
        ]
        if self.first_malformed:
            parts.append(f"first malformed: {self.first_malformed}")
        return ", ".join(parts)


def _open_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        # BadGzipFile (an OSError): bad header or CRC; EOFError: truncated; zlib.error: corrupt deflate data.
        except (OSError, EOFError, zlib.error) as exc:
            raise CorpusError(
                f"{path} is not a valid gzip file ({exc}); re-download or re-compress it"
            ) from exc
    return data


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _decode_lines(data: bytes, stats: ReadStats) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line that is valid UTF-8."""
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_non_utf8 += 1


def _top_level_records(payload: Any, path: Path, kind: str) -> list[Any]:
    """A JSON/YAML document's records: a list, an object's `data` list, or one object as one record."""
    if payload is None:  # an empty YAML file
        return []
    if isinstance(payload, list):
        return payload
    if isinstance(payload, dict):
        data = payload.get("data")
        return data if isinstance(data, list) else [payload]
    raise CorpusError(
        f"the top level of {path} is {kind_of(payload)} ({shorten(repr(payload), 40)}); a {kind} corpus must "
        "hold a list of records (objects or strings) or an object (one record, or a `data` list of records)"
    )


def _parquet_records(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        # Plain Python values: lists stay lists (a `messages` column), nulls are None (not NaN).
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:
        raise CorpusError(f"could not read parquet file {path}: {exc}") from exc
    yield from rows


def _jsonl_records(data: bytes, path: Path, stats: ReadStats) -> Iterator[dict[str, Any]]:
    for number, line in _decode_lines(data, stats):
        try:
            record = json.loads(line)
        # ValueError covers JSONDecodeError and integers over Python's digit limit; RecursionError
        # a line nested thousands of levels deep.
        except (ValueError, RecursionError):
            stats.malformed(f"line {number} is not valid JSON")
            continue
        if isinstance(record, dict):
            yield record
        else:
            stats.malformed(f"line {number} is {kind_of(record)}, not a JSON object")


def _csv_records(data: bytes, path: Path, stats: ReadStats) -> Iterator[dict[str, Any]]:
    text = data.decode("utf-8", errors="surrogateescape")
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if any(isinstance(v, str) and has_surrogates(v) for v in row.values()):
                stats.skipped_non_utf8 += 1
                continue
            yield row
    except csv.Error as exc:
        raise CorpusError(f"{path} line {reader.line_num} is not valid CSV ({exc})") from exc


def _json_records(data: bytes, path: Path, stats: ReadStats) -> Iterator[dict[str, Any]]:
    try:
        payload = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorpusError(f"{path} is not valid UTF-8 JSON ({_parse_failure(exc)})") from exc
    for item in _top_level_records(payload, path, "JSON"):
        yield item if isinstance(item, dict) else {"text": item}


def _yaml_records(data: bytes, path: Path, stats: ReadStats) -> Iterator[dict[str, Any]]:
    import yaml

    try:
        payload = yaml.safe_load(data.decode("utf-8"))
    # ValueError: bad UTF-8, or a scalar YAML cannot convert (a huge integer, a bad date).
    except (ValueError, RecursionError, yaml.YAMLError) as exc:
        raise CorpusError(f"{path} is not valid UTF-8 YAML ({_parse_failure(exc)})") from exc
    for item in _top_level_records(payload, path, "YAML"):
        yield item if isinstance(item, dict) else {"text": item}


def _text_records(data: bytes, path: Path, stats: ReadStats) -> Iterator[dict[str, Any]]:
    text = data.decode("utf-8", errors="surrogateescape")
    for para in re.split(r"\n\s*\n", text):
        if has_surrogates(para):
            stats.skipped_non_utf8 += 1
        elif para.strip():
            yield {"text": para.strip()}


# Readers of the formats that are read as bytes (gzip or not), by the file's base suffix.
_BYTE_READERS: dict[str, Callable[[bytes, Path, ReadStats], Iterator[dict[str, Any]]]] = {
    ".jsonl": _jsonl_records,
    ".csv": _csv_records,
    ".json": _json_records,
    ".yaml": _yaml_records,
    ".yml": _yaml_records,
    ".txt": _text_records,
    ".text": _text_records,
    ".md": _text_records,
    "": _text_records,
}


def read_records(path: Path, stats: ReadStats) -> Iterator[dict[str, Any]]:
    """The records of one corpus file, in file order; skipped ones are counted in `stats`."""
    suffix = _base_suffix(path)
    if suffix == ".parquet":
        yield from _parquet_records(path)
        return
    data = _open_bytes(path)
    reader = _BYTE_READERS.get(suffix)
    if reader is None:
        raise CorpusError(
            f"unsupported corpus file type {path.name!r}; use .jsonl, .csv, .txt, .json, .yaml "
            "(each optionally .gz) or .parquet"
        )
    yield from reader(data, path, stats)


def has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_failure(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else shorten(str(exc) or type(exc).__name__)


def kind_of(value: Any) -> str:
    """A JSON-ish name of a value's type for messages: 'a string', 'a number', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"
