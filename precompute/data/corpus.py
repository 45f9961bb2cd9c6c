"""Read corpus sources (JSONL/CSV/TXT/JSON/YAML, optionally gzipped, and Parquet) into documents
and pack them into fixed-size token contexts.

Every document keeps its group and category so they travel into the examples. Text that is not
valid UTF-8 is skipped and counted, never fatal.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import random
import re
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from precompute.errors import CorpusError

GROUPS = ("task", "control", "harmful", "benign", "general")
# Field names tried, in order, when a source names no text field.
TEXT_FIELDS = (
    "messages",
    "text",
    "prompt",
    "forbidden_prompt",
    "Behavior",
    "goal",
    "Goal",
    "instruction",
    "question",
    "turns",
    "paraphrases",
    "chosen",
    "content",
)
_HH_TURN = re.compile(r"\n\n(Human|Assistant):\s?")
# Python's default CSV field limit (128 KiB) rejects long documents; 2**31 - 1 fits a C long everywhere.
_CSV_FIELD_LIMIT = 2**31 - 1

log = logging.getLogger(__name__)


@dataclass
class CorpusSource:
    path: str
    group: str = "general"
    category: str | None = None  # fixed category for every document
    category_field: str | None = None  # or read it per record from this field/column
    text_field: str | None = None
    format: str = "auto"  # auto | text | user (wrap plain text as one user chat turn) | chat
    where: dict[str, str] = field(default_factory=dict)  # keep records whose field equals the value
    # Keep only the first user turn of chat documents: multi-turn dialogues (hh-rlhf) next to
    # single prompts would otherwise let "is a dialogue" pass for "is harmful".
    first_user_turn: bool = False
    max_docs: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise CorpusError(
                f"unknown corpus group {self.group!r} for {self.path}; use one of {', '.join(GROUPS)}"
            )
        if self.format not in ("auto", "text", "user", "chat"):
            raise CorpusError(
                f"unknown corpus format {self.format!r} for {self.path}; use auto, text, user or chat"
            )

    @classmethod
    def parse(cls, spec: str) -> CorpusSource:
        """`PATH[:GROUP[:CATEGORY]]`; CATEGORY `@column` reads the category from that field."""
        parts = spec.split(":")
        # Allow Windows-style or odd paths by only splitting off known groups from the right.
        if len(parts) >= 3 and parts[-2] in GROUPS:
            path, group, category = ":".join(parts[:-2]), parts[-2], parts[-1]
        elif len(parts) >= 2 and parts[-1] in GROUPS:
            path, group, category = ":".join(parts[:-1]), parts[-1], None
        else:
            path, group, category = spec, "general", None
            # `data.csv:harmfull` is an existing file with a misspelt group: say so, not "file not found".
            if not Path(spec).expanduser().exists():
                for cut in (1, 2):
                    if len(parts) > cut and Path(":".join(parts[:-cut])).expanduser().is_file():
                        raise CorpusError(
                            f"unknown corpus group {parts[-cut]!r} in {spec!r}; use one of {', '.join(GROUPS)}"
                        )
        if category and category.startswith("@"):
            return cls(path=path, group=group, category_field=category[1:])
        return cls(path=path, group=group, category=category or None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorpusSource:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise CorpusError(f"unknown corpus option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, "auto") and v is not False}


@dataclass
class Document:
    doc_id: int
    source: int
    group: str
    category: str | None
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    index: int = 0  # record index in its file

    def preview(self, n: int = 300) -> str:
        if self.messages:
            return " | ".join(f"{m['role']}: {m['content']}" for m in self.messages)[:n]
        return (self.text or "")[:n]


@dataclass
class ReadStats:
    records: int = 0
    documents: int = 0
    skipped_non_utf8: int = 0
    skipped_malformed: int = 0
    skipped_empty: int = 0
    skipped_filtered: int = 0
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
            )
            if n
        ]
        if self.first_malformed:
            parts.append(f"first malformed: {self.first_malformed}")
        return ", ".join(parts)


class _MalformedRecord(ValueError):
    """A record that is valid JSON/CSV but cannot be a document (e.g. a chat turn without a role)."""


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
        f"the top level of {path} is {_kind(payload)} ({_short(repr(payload), 40)}); a {kind} corpus must "
        "hold a list of records (objects or strings) or an object (one record, or a `data` list of records)"
    )


def _records(path: Path, stats: ReadStats) -> Iterator[dict[str, Any]]:
    suffix = _base_suffix(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            # Plain Python values: lists stay lists (a `messages` column), nulls are None (not NaN).
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:
            raise CorpusError(f"could not read parquet file {path}: {exc}") from exc
        yield from rows
        return
    data = _open_bytes(path)
    if suffix == ".jsonl":
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
                stats.malformed(f"line {number} is {_kind(record)}, not a JSON object")
    elif suffix == ".csv":
        text = data.decode("utf-8", errors="surrogateescape")
        csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for row in reader:
                if any(isinstance(v, str) and _has_surrogates(v) for v in row.values()):
                    stats.skipped_non_utf8 += 1
                    continue
                yield row
        except csv.Error as exc:
            raise CorpusError(f"{path} line {reader.line_num} is not valid CSV ({exc})") from exc
    elif suffix == ".json":
        try:
            payload = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise CorpusError(f"{path} is not valid UTF-8 JSON ({_parse_failure(exc)})") from exc
        for item in _top_level_records(payload, path, "JSON"):
            yield item if isinstance(item, dict) else {"text": item}
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            payload = yaml.safe_load(data.decode("utf-8"))
        # ValueError: bad UTF-8, or a scalar YAML cannot convert (a huge integer, a bad date).
        except (ValueError, RecursionError, yaml.YAMLError) as exc:
            raise CorpusError(f"{path} is not valid UTF-8 YAML ({_parse_failure(exc)})") from exc
        for item in _top_level_records(payload, path, "YAML"):
            yield item if isinstance(item, dict) else {"text": item}
    elif suffix in (".txt", ".text", ".md", ""):
        text = data.decode("utf-8", errors="surrogateescape")
        for para in re.split(r"\n\s*\n", text):
            if _has_surrogates(para):
                stats.skipped_non_utf8 += 1
            elif para.strip():
                yield {"text": para.strip()}
    else:
        raise CorpusError(
            f"unsupported corpus file type {path.name!r}; use .jsonl, .csv, .txt, .json, .yaml "
            "(each optionally .gz) or .parquet"
        )


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_failure(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else _short(str(exc) or type(exc).__name__)


def _kind(value: Any) -> str:
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


def _hh_to_messages(text: str) -> list[dict[str, str]] | None:
    parts = _HH_TURN.split(text)
    if len(parts) < 3:
        return None
    messages = []
    for role, content in zip(parts[1::2], parts[2::2], strict=False):
        role = "user" if role == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + content.strip()
        else:
            messages.append({"role": role, "content": content.strip()})
    return messages if messages and messages[0]["role"] == "user" else None


def _chat_turns(value: list[Any], name: str) -> list[dict[str, str]]:
    """Validated `{role, content}` turns; anything else makes the whole record malformed."""
    turns = []
    for i, turn in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise _MalformedRecord(f"{where} is {_kind(turn)}, not a {{role, content}} object")
        role = turn.get("role")
        if role is None:
            raise _MalformedRecord(f"{where} has no role")
        if not isinstance(role, str) or not role.strip():
            raise _MalformedRecord(f"{where}.role is {_short(repr(role), 40)}, not a role name")
        turns.append({"role": role, "content": _turn_content(turn.get("content"), where)})
    return turns


def _turn_content(content: Any, where: str) -> str:
    """A turn's text: a string, nothing (null, as in tool-call turns), or a list of text parts (OpenAI)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(
        isinstance(part, str) or (isinstance(part, dict) and isinstance(part.get("text"), str))
        for part in content
    ):
        # Joined without a separator, as the chat templates that accept parts render them.
        return "".join(part if isinstance(part, str) else part["text"] for part in content)
    found = "a list with a part that is not text" if isinstance(content, list) else _kind(content)
    raise _MalformedRecord(f"{where}.content is {found}, not a string or a list of text parts")


def _to_documents(record: dict[str, Any], source: CorpusSource) -> list[tuple[str | None, list | None]]:
    docs = _to_documents_all_turns(record, source)
    if source.first_user_turn:
        docs = [(t, [m[0]] if m and m[0]["role"] == "user" else m) for t, m in docs]
    return docs


def _to_documents_all_turns(
    record: dict[str, Any], source: CorpusSource
) -> list[tuple[str | None, list | None]]:
    """One record -> list of (text, messages); a list of strings (paraphrases) gives several."""
    fields = [source.text_field] if source.text_field else [f for f in TEXT_FIELDS if f in record]
    if not fields or fields[0] not in record:
        return []
    name, value = fields[0], record[fields[0]]
    if name == "turns" and isinstance(value, list) and value:
        return [(None, [{"role": "user", "content": str(value[0])}])]
    if name == "messages" and not isinstance(value, list | str | None):
        raise _MalformedRecord(f"messages is {_kind(value)}, not a list of turns")
    # A `messages` list, or any list holding an object, is a chat: every element must be a turn.
    if isinstance(value, list) and (name == "messages" or any(isinstance(v, dict) for v in value)):
        messages = _chat_turns(value, name)
        if not messages:
            return []
        return (
            [(None, messages)]
            if source.format != "text"
            else [("\n".join(m["content"] for m in messages), None)]
        )
    values = value if isinstance(value, list) else [value]
    out: list[tuple[str | None, list | None]] = []
    for item in values:
        if item is None or (isinstance(item, float) and item != item):
            continue
        text = str(item)
        if not text.strip():
            continue
        if source.format in ("auto", "chat") and (hh := _hh_to_messages(text)) is not None:
            out.append((None, hh))
        elif source.format == "user":
            out.append((None, [{"role": "user", "content": text}]))
        else:
            out.append((text, None))
    return out


def read_source(
    source: CorpusSource, source_index: int, first_doc_id: int = 0, seed: int = 0
) -> tuple[list[Document], ReadStats]:
    path = Path(source.path).expanduser()
    if path.is_dir():
        raise CorpusError(f"corpus path {path} is a directory; name a file inside it (one --corpus per file)")
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    stats = ReadStats()
    docs: list[Document] = []
    category_field_seen = False
    for index, record in enumerate(_records(path, stats)):
        stats.records += 1
        category_field_seen = category_field_seen or source.category_field in record
        if any(str(record.get(k)) != str(v) for k, v in source.where.items()):  # TOML may give ints
            stats.skipped_filtered += 1
            continue
        category = source.category
        if source.category_field:
            raw = record.get(source.category_field)
            if isinstance(raw, list):
                raw = raw[0] if raw else None
            category = str(raw) if raw not in (None, "") else None
        try:
            items = _to_documents(record, source)
        except _MalformedRecord as exc:
            stats.malformed(f"record {index}: {exc}")
            continue
        if not items:
            stats.skipped_empty += 1
        for text, messages in items:
            for s in [text] + [m["content"] for m in messages or []]:
                if s is not None and _has_surrogates(s):
                    stats.skipped_non_utf8 += 1
                    break
            else:
                docs.append(Document(0, source_index, source.group, category, text, messages, index))
    # A seeded shuffle so a token budget takes a random subset, not the first rows of a sorted file.
    random.Random(f"{seed}:{source.path}").shuffle(docs)
    if source.max_docs is not None:
        docs = docs[: source.max_docs]
    for offset, doc in enumerate(docs):
        doc.doc_id = first_doc_id + offset
    stats.documents = len(docs)
    if source.category_field and stats.records and not category_field_seen:
        # A misspelt @column would otherwise leave every category empty without a word.
        raise CorpusError(
            f"no record of {path} has the category field {source.category_field!r} (@column in the corpus "
            "spec, or category_field); check the column name"
        )
    if not docs:
        first = f"; first malformed: {stats.first_malformed}" if stats.first_malformed else ""
        raise CorpusError(
            f"corpus source {path} (group {source.group!r}) yielded no documents "
            f"({stats.records} records, {stats.skipped_non_utf8} not UTF-8, {stats.skipped_malformed} malformed, "
            f"{stats.skipped_empty} without a text field, {stats.skipped_filtered} filtered out{first}); "
            f"check text_field (tried {source.text_field or ', '.join(TEXT_FIELDS)})"
        )
    if stats.skipped_non_utf8 or stats.skipped_malformed or stats.skipped_empty:
        log.warning("%s: %d documents read; skipped %s", path, stats.documents, stats.skipped_summary())
    return docs, stats


def chat_text(
    tokenizer: Any, messages: list[dict[str, str]], what: str, hint: str = "", **kwargs: Any
) -> str:
    """The model's chat template applied to `messages`; a template that rejects them (e.g. "roles must
    alternate user/assistant") is a CorpusError naming `what` (the record), not a jinja2 traceback."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as exc:
        raise CorpusError(
            f"the model's chat template rejects {what}: {exc}; fix or drop that record{hint}"
        ) from exc


def render(doc: Document, tokenizer: Any) -> list[int]:
    """Token ids of one document; chat messages go through the model's chat template."""
    if doc.messages is not None:
        if getattr(tokenizer, "chat_template", None):
            text = chat_text(
                tokenizer,
                doc.messages,
                f"record {doc.index} of corpus source {doc.source} (group {doc.group!r})",
                hint=", or read the source with format=text",
            )
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        text = "\n".join(f"{m['role']}: {m['content']}" for m in doc.messages)
        return list(tokenizer(text)["input_ids"])
    return list(tokenizer(doc.text)["input_ids"])


@dataclass
class Context:
    context_id: int
    source: int
    token_ids: list[int]
    doc_ids: list[int]  # per token
    positions_in_doc: list[int]


def pack_contexts(
    docs: list[Document],
    tokenizer: Any,
    context_size: int,
    mode: str = "split",
    max_tokens: int | None = None,
    first_context_id: int = 0,
) -> Iterator[Context]:
    """Cut one source's documents into contexts of at most `context_size` tokens.

    split: each document alone, long ones cut into consecutive windows;
    truncate: only each document's first window;
    pack: documents concatenated (never across sources) into full windows.
    """
    if mode not in ("split", "truncate", "pack"):
        raise CorpusError(f"unknown packing mode {mode!r}; use split, truncate or pack")
    if context_size < 2:
        raise CorpusError("--context-size must be at least 2")
    budget = max_tokens if max_tokens is not None else float("inf")
    used = 0
    cid = first_context_id
    buf_tok: list[int] = []
    buf_doc: list[int] = []
    buf_pos: list[int] = []
    source = docs[0].source if docs else 0
    for doc in docs:
        if used >= budget:
            break
        ids = render(doc, tokenizer)
        if not ids:
            continue
        windows = range(0, len(ids), context_size) if mode != "truncate" else range(0, 1)
        if mode == "pack":
            for pos, tok in enumerate(ids):
                buf_tok.append(tok)
                buf_doc.append(doc.doc_id)
                buf_pos.append(pos)
                if len(buf_tok) == context_size:
                    take = int(min(context_size, budget - used))
                    yield Context(cid, source, buf_tok[:take], buf_doc[:take], buf_pos[:take])
                    cid += 1
                    used += take
                    buf_tok, buf_doc, buf_pos = [], [], []
                    if used >= budget:
                        return
            continue
        for start in windows:
            window = ids[start : start + context_size]
            if len(window) < 2:  # a lone token (short document or tail) has no counted position; skip it
                continue
            take = int(min(len(window), budget - used))
            if take <= 1:  # the budget is spent
                return
            yield Context(cid, source, window[:take], [doc.doc_id] * take, list(range(start, start + take)))
            cid += 1
            used += take
            if used >= budget:
                return
    if mode == "pack" and len(buf_tok) > 1 and used < budget:
        take = int(min(len(buf_tok), budget - used))
        yield Context(cid, source, buf_tok[:take], buf_doc[:take], buf_pos[:take])
